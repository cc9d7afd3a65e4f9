"""What the Django app connects, once, when Django is ready.

- procqueue's client to the project's settings and to Django's connection of the queue's
  alias: `.delay()` writes there, so inside `transaction.atomic()` a task commits or rolls
  back with the business change, and `transaction_on_commit` threads wait for the commit;
- the read API (`procqueue.get_task`, `get_task_runs`, `cancel`) goes there too, so a
  test sees what its own transaction enqueued, in its test database;
- `manage.py migrate` on that alias applies procqueue's schema;
- a worker calls `close_old_connections` around each task, as Django does around a request;
- a mistake in the settings becomes a system check error (`manage.py check`), a one-line
  error of the management commands, and the error every `.delay()` raises: never a
  traceback while Django starts.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from django.core import checks
from django.core.management.base import CommandError
from django.db import close_old_connections, connections, transaction
from django.db.models.signals import post_migrate

from ... import client
from ...config import DatabaseConfig, TaskRunMethod, processor_config
from ...errors import ProcqueueError
from ...execution import on_task_boundary
from .settings import database_alias, environment

_problem: Optional[ProcqueueError] = None  # the settings' mistake, if any
_alias: Optional[str] = None


def connect(app_config: Any) -> None:
    post_migrate.connect(apply_schema, sender=app_config, dispatch_uid="procqueue.apply_schema")
    checks.register(check_settings, "procqueue")
    on_task_boundary(close_old_connections)
    configure()


def configure() -> None:
    """procqueue's client from the settings, or, when they are wrong, one that refuses."""
    global _problem, _alias
    try:
        alias = database_alias()
        settings = client.settings_from_environment(
            environment(),
            default_connection=lambda: connections[alias],
            # The default database's transaction, as Flagsmith hooks it: a SEPARATE_THREAD
            # task writes nothing to the queue's database, and must wait for the caller's
            # data, which lives in the default one (also with a separate task database).
            on_commit=transaction.on_commit,
        )
    except ProcqueueError as exc:
        _problem, _alias = exc, None
        client.use_settings(client.ClientSettings(DatabaseConfig(embedded_allowed=False), TaskRunMethod.TASK_PROCESSOR,
                                                  default_connection=_refusal(exc)))
        return
    _problem, _alias = None, alias
    client.use_settings(settings)


APP_LABEL = "procqueue"  # apps.ProcqueueConfig.label


def queue_alias() -> Optional[str]:
    """The DATABASES alias of the queue, or None while the settings are wrong."""
    return _alias


def problem() -> Optional[ProcqueueError]:
    """What is wrong with the settings, as the management commands report it."""
    return _problem


def _refusal(exc: ProcqueueError) -> Callable[[], Any]:
    def refuse() -> Any:
        raise type(exc)(str(exc))

    return refuse


def apply_schema(sender: Any, using: str, verbosity: int = 1, **kwargs: Any) -> None:
    """`manage.py migrate --database ALIAS` on the queue's alias: procqueue's tables,
    created or upgraded as `procqueue migrate` does. Another alias is not the queue's."""
    configure()  # the settings as they are now: under Django's test runner, its test database's
    if _problem is not None or using != _alias:
        return
    from ...db import connect as connect_to
    from ...migrations import SCHEMA_VERSION, migrate

    database = client.settings().database
    try:
        conn = connect_to(database, application_name="procqueue-migrate")
        try:
            applied = migrate(conn, database.schema)
        finally:
            conn.close()
    except ProcqueueError as exc:  # one line, as a failed migration of Django's own reads
        raise CommandError(str(exc)) from None
    if verbosity >= 1:
        state = "applied" if applied else "already up to date"
        sys.stdout.write(f"  procqueue schema {database.schema!r} version {SCHEMA_VERSION}: {state}\n")


def check_settings(app_configs: Any = None, **kwargs: Any) -> list:
    """`manage.py check`: the settings `.delay()` uses, and the processor's too (as
    `manage.py runprocessor` would read them with no flags)."""
    problem = _problem
    if problem is None:
        try:
            processor_config(env=environment())
        except ProcqueueError as exc:
            problem = exc
    if problem is None:
        return []
    return [checks.Error(str(problem), hint="See README.md, 'Porting a Django project'.", id="procqueue.E001")]
