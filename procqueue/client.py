"""The application process's view of the queue: its settings and its own connection.

Used by `.delay()`, by tasks that enqueue other tasks, by the CLI and by the read API
(`procqueue.get_task` ...). One connection per thread, opened on first use, never shared
across a fork.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Mapping, Optional, Tuple, Union

from . import config as config_module
from .config import DatabaseConfig, RetentionConfig, TaskRunMethod
from .db import Connection, connect
from .errors import ConfigError
from .migrations import migrate
from .queries import Queries
from .records import RunRecord, TaskRecord


@dataclass(frozen=True)
class ClientSettings:
    database: DatabaseConfig
    task_run_method: TaskRunMethod
    max_arguments_bytes: Optional[int] = config_module.DEFAULT_MAX_ARGUMENTS_BYTES  # None: no limit
    # How long finished tasks are kept, for the clean-up task: a processor's supervisor
    # sets its config's before forking the workers that run it.
    retention: Optional[RetentionConfig] = None  # None: read from the environment where the clean-up runs
    # Where `.delay()` writes when the caller passes no connection: a function returning
    # one (the Django app's: Django's connection, so the task joins its transaction), or
    # None for procqueue's own autocommit connection.
    default_connection: Optional[Callable[[], Any]] = None
    # How SEPARATE_THREAD defers a `transaction_on_commit` task's thread until the
    # caller's transaction commits (the Django app's: transaction.on_commit); None: no
    # transaction to hook, the thread starts at once.
    on_commit: Optional[Callable[[Callable[[], None]], None]] = None


_settings: Optional[ClientSettings] = None
_settings_lock = threading.Lock()
_local = threading.local()
_inherited_connections: list = []


def configure(
    *,
    database_url: Optional[str] = None,
    schema: Optional[str] = None,
    task_run_method: Optional[TaskRunMethod] = None,
    max_arguments_bytes: Optional[int] = None,
    retention: Optional[RetentionConfig] = None,
    pooler: Union[str, config_module.Pooler, None] = None,
    default_connection: Optional[Callable[[], Any]] = None,
    on_commit: Optional[Callable[[Callable[[], None]], None]] = None,
) -> None:
    """Set, in code, what the environment would otherwise decide for this process.
    `max_arguments_bytes`: 0 lifts the limit. `pooler`: "transaction" behind a
    transaction-mode pooler (PROCQUEUE_POOLER), where `.delay()` prepares nothing.
    `default_connection`: a function returning the connection `.delay()` writes on when
    given none (its transaction then decides whether the task exists). `on_commit`: a
    function taking a callback to run when the current transaction commits, for
    SEPARATE_THREAD's `transaction_on_commit`. None leaves a value as it is (a hook once
    set stays; `use_settings(settings_from_environment())` starts over)."""
    global _settings
    with _settings_lock:
        current = _current_settings_unlocked()
        database = current.database
        if database_url is not None:
            database = replace(database, url=database_url)
        if schema is not None:
            database = replace(database, schema=schema)
        if pooler is not None:
            database = replace(database, pooler=config_module.pooler_of(pooler, "pooler"))
        method = TaskRunMethod(task_run_method) if task_run_method is not None else current.task_run_method
        limit = (current.max_arguments_bytes if max_arguments_bytes is None
                 else config_module.max_arguments_bytes(max_arguments_bytes))
        for name, value in (("default_connection", default_connection), ("on_commit", on_commit)):
            if value is not None and not callable(value):
                raise ConfigError(f"invalid value for {name}: {value!r} (expected a function)")
        _settings = ClientSettings(database, method, limit, retention or current.retention,
                                   default_connection or current.default_connection, on_commit or current.on_commit)
    close_connection()


def settings() -> ClientSettings:
    with _settings_lock:
        return _current_settings_unlocked()


def _current_settings_unlocked() -> ClientSettings:
    global _settings
    if _settings is None:
        _settings = settings_from_environment()
    return _settings


def settings_from_environment(env: Optional[Mapping[str, str]] = None, **hooks: Any) -> ClientSettings:
    """The settings `env` (default: the process's environment) gives, with `hooks`
    (`default_connection`, `on_commit`) as `configure` takes them."""
    return ClientSettings(
        config_module.database_config_from_env(env), config_module.task_run_method_from_env(env),
        # Not the retention: only the clean-up task, in a processor, needs it, and a mistake in
        # it must not break every `.delay()` of the application.
        config_module.max_arguments_bytes_from_env(env), None, **hooks,
    )


def use_settings(new: ClientSettings) -> None:
    """Replace this process's settings as a whole (a framework's integration, which reads
    them from its own settings; see procqueue.contrib.django)."""
    global _settings
    with _settings_lock:
        _settings = new
    close_connection()


def connection(*, create_schema: bool = False) -> Tuple[Connection, Queries]:
    """This thread's own autocommit connection, and the statements of the configured schema.

    With `create_schema` (the enqueue path), on the embedded server, which is ours to set
    up, the schema is created if missing, so enqueueing into a fresh one just works. Reads
    never create anything: a misspelled schema is an error, not a new empty queue."""
    conn = getattr(_local, "conn", None)
    database = settings().database
    if conn is None or getattr(_local, "pid", None) != os.getpid() or conn.closed:
        forget_inherited_connection()
        conn = connect(database, application_name="procqueue-client")
        _local.conn, _local.pid, _local.migrated = conn, os.getpid(), None
    if create_schema and database.url is None and _local.migrated != database.schema:
        migrate(conn, database.schema)
        _local.migrated = database.schema
    return conn, Queries(database.schema)


def close_connection() -> None:
    conn = getattr(_local, "conn", None)
    if conn is not None and getattr(_local, "pid", None) == os.getpid():
        _local.conn = None
        conn.close()
    else:
        forget_inherited_connection()


def forget_inherited_connection() -> None:
    """Drop a connection inherited across fork without closing it: closing (or letting it
    be garbage-collected) would send the parent's session a Terminate message on the
    shared socket. It stays referenced, untouched, for the life of the process."""
    conn = getattr(_local, "conn", None)
    if conn is not None and getattr(_local, "pid", None) != os.getpid():
        _inherited_connections.append(conn)
        _local.conn = None


def get_task(task_id: int) -> Optional[TaskRecord]:
    """The task row with this id."""
    conn, queries = _reading_connection()
    return queries.get_task(conn, task_id)


def get_task_runs(task_id: int) -> List[RunRecord]:
    """Every run (attempt) of a task, oldest first, with errors and tracebacks."""
    conn, queries = _reading_connection()
    return queries.get_runs(conn, task_id)


def _reading_connection() -> Tuple[Any, Queries]:
    """Where the read API goes: the `default_connection` `.delay()` writes on, if one is
    configured (in a Django project, Django's: a test sees the tasks its own transaction
    enqueued, and no second connection holds its test database open), else our own."""
    current = settings()
    if current.default_connection is None:
        return connection()
    from .driver import lent

    return lent(current.default_connection()), Queries(current.database.schema, prepare=False)


def cancel(task_id: int) -> bool:
    """Cancel a queued task; False if it is running, finished or unknown. Recorded in the
    task's runs as `procqueue.cancel()` by this user and host (`procqueue tasks cancel`
    also stops running tasks)."""
    from .admin import actor

    conn, queries = _reading_connection()
    return bool(queries.cancel_tasks(conn, ids=[task_id], by=actor("procqueue.cancel()"), states=["queued"]))
