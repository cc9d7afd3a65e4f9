"""The application side: `.delay()`, bulk enqueue and TASK_RUN_METHOD."""

from __future__ import annotations

import functools
import json
import logging
import threading
import traceback
from datetime import datetime
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import psycopg2

from . import client, driver
from .config import TaskRunMethod
from .db import first_line, is_connection_error, tables_missing
from .errors import DatabaseError, TaskError
from .logs import log_event
from .metrics import ENQUEUED
from .queries import EnqueueRow, Queries
from .records import TaskCall, validated_priority

logger = logging.getLogger("procqueue.enqueue")


def delay(call: TaskCall, connection: Any = None) -> Optional[int]:
    ids = enqueue_many([call], connection=connection)
    return ids[0] if ids else None


def enqueue_many(calls: Iterable[TaskCall], connection: Any = None) -> List[int]:
    """Insert many tasks in one round trip; returns the ids of the tasks created.

    With `connection` (a psycopg2 or psycopg 3 connection, or a Django connection), the
    insert joins the caller's transaction: the tasks exist only if the caller commits.
    Tasks skipped by `queue_size` get no id.

    TASK_RUN_METHOD applies as to `.delay()`: with SYNCHRONOUSLY each call runs inline, in
    order (an exception propagates, and the calls after it do not run); with
    SEPARATE_THREAD each call runs in a new thread. Either way nothing is written and the
    result is []. Every call's arguments are checked before the first one runs. A call
    with `delay_until` does not run at all (as in Flagsmith): nothing could run it later.
    """
    calls = list(calls)
    settings = client.settings()
    method = settings.task_run_method
    if method is not TaskRunMethod.TASK_PROCESSOR:
        _run_locally(calls, method)
        return []
    rows = [_enqueue_row(call, settings.max_arguments_bytes) for call in calls]
    if not rows:
        return []
    queries = _queries_for(settings.database.schema, settings.database.pooler.keeps_sessions)
    if connection is None and settings.default_connection is not None:
        connection = settings.default_connection()
    if connection is not None:
        return _insert_on_callers_connection(queries, connection, rows)
    return _insert_on_own_connection(queries, rows)


@functools.lru_cache(maxsize=None)
def _queries_for(schema: str, prepare: bool) -> Queries:
    """One per schema for the process: it renders each statement once, not per call."""
    return Queries(schema, prepare=prepare)


def run_in_thread(call: TaskCall) -> threading.Thread:
    args, kwargs = _json_round_trip(call)
    return _start_thread(call, args, kwargs, client.settings().on_commit)


def _run_locally(calls: List[TaskCall], method: TaskRunMethod) -> None:
    # All or nothing, like a batch written in one statement: a bad argument in the last
    # call stops the batch before the first call runs.
    arguments = [_json_round_trip(call) for call in calls]
    on_commit = client.settings().on_commit
    for call, (args, kwargs) in zip(calls, arguments):
        if call.delay_until is not None:
            log_event(logger, logging.WARNING, "task.not_scheduled", task=call.handler.task_name,
                      delay_until=call.delay_until, task_run_method=method.value,
                      reason="cannot schedule tasks to run in the future without the task processor")
        elif method is TaskRunMethod.SYNCHRONOUSLY:
            call.handler.func(*args, **kwargs)
        else:
            _start_thread(call, args, kwargs, on_commit)


def _start_thread(call: TaskCall, args: List[Any], kwargs: Mapping[str, Any],
                  on_commit: Optional[Callable[[Callable[[], None]], None]]) -> threading.Thread:
    """A daemon thread running the call: started now, or when the caller's transaction
    commits if the task wants that (`transaction_on_commit`) and there is a transaction
    to hook (`on_commit`, which runs the start at once outside a transaction)."""
    def target() -> None:
        log_event(logger, logging.INFO, "task.thread_started", task=call.handler.task_name)
        try:
            call.handler.func(*args, **kwargs)
        except Exception as exc:
            log_event(logger, logging.ERROR, "task.failed_in_thread", task=call.handler.task_name, error=repr(exc),
                      traceback=traceback.format_exc())

    thread = threading.Thread(target=target, name=f"procqueue:{call.handler.task_name}", daemon=True)
    if call.handler.transaction_on_commit and on_commit is not None:
        on_commit(thread.start)
    else:
        thread.start()
    return thread


# -- serialising ---------------------------------------------------------------------


def _enqueue_row(call: TaskCall, max_arguments_bytes: Optional[int]) -> EnqueueRow:
    handler = call.handler
    args_json, kwargs_json = handler.serialise(call.args, call.kwargs, max_arguments_bytes)
    priority = handler.priority if call.priority is None else validated_priority(handler.task_name, call.priority)
    if call.delay_until is not None and (not isinstance(call.delay_until, datetime) or call.delay_until.tzinfo is None):
        raise TaskError(f"task {handler.task_name}: delay_until must be a timezone-aware datetime, got {call.delay_until!r}")
    return EnqueueRow(
        task_name=handler.task_name,
        args_json=args_json,
        kwargs_json=kwargs_json,
        queue=handler.queue,
        priority=priority,
        run_at=call.delay_until,
        max_attempts=handler.max_attempts,
        timeout_seconds=handler.timeout_seconds,
        queue_size=handler.queue_size,
    )


def _json_round_trip(call: TaskCall):
    """The arguments exactly as a processor would receive them (tuples become lists...),
    refused as `.delay()` would refuse them."""
    args_json, kwargs_json = call.handler.serialise(call.args, call.kwargs, client.settings().max_arguments_bytes)
    return json.loads(args_json), json.loads(kwargs_json)


# -- inserting -----------------------------------------------------------------------


def _insert_on_callers_connection(queries: Queries, connection: Any, rows: List[EnqueueRow]) -> List[int]:
    lent = driver.lent(connection)
    try:
        inserted = queries.enqueue(lent, rows)
    except Exception as exc:
        error = driver.server_error(exc)
        if error is not None and driver.sqlstate(error) == driver.UNDEFINED_TABLE:
            raise tables_missing(error) from None
        raise  # unchanged, whatever the driver: the transaction, and so its failure, are the caller's
    return counted(inserted, rows)


def counted(inserted: List[Tuple[int, str]], rows: List[EnqueueRow]) -> List[int]:
    """Count the new tasks in procqueue_enqueued_tasks_total, report the calls queue_size
    skipped; return the new tasks' ids."""
    for _, task_name in inserted:
        ENQUEUED.labels(task_name).inc()
    if len(inserted) < len(rows):
        report_queue_full(inserted, rows)
    return [task_id for task_id, _ in inserted]


def report_queue_full(inserted: List[Tuple[int, str]], rows: List[EnqueueRow]) -> None:
    """One line per task name and batch, with the number of calls skipped: one per
    skipped `.delay()`, and not a thousand for a batch of a thousand calls to a full
    queue (Flagsmith, which has no batches, logs each call)."""
    skipped: Dict[str, int] = {}
    for row in rows:
        skipped[row.task_name] = skipped.get(row.task_name, 0) + 1
    for _, task_name in inserted:
        skipped[task_name] -= 1
    sizes = {row.task_name: row.queue_size for row in rows}
    for task_name, count in skipped.items():
        if count:
            log_event(logger, logging.WARNING, "task.queue_full", task=task_name, queue_size=sizes[task_name],
                      skipped=count)


def _insert_on_own_connection(queries: Queries, rows: List[EnqueueRow]) -> List[int]:
    # One retry on a dropped connection (a Postgres restart closes idle connections). When
    # the connection broke before the statement was sent, as it does for an idle one, the
    # retry is exact; had it broken after the commit but before the reply, the task is
    # enqueued twice: at-least-once, never lost.
    for attempt in (1, 2):
        conn, _ = client.connection(create_schema=True)
        try:
            ids = counted(queries.enqueue(conn, rows, own_connection=True), rows)
            log_event(logger, logging.DEBUG, "task.enqueued", count=len(ids), task=rows[0].task_name)
            return ids
        except psycopg2.errors.UndefinedTable as exc:
            raise tables_missing(exc) from None
        except psycopg2.Error as exc:
            if not is_connection_error(exc):
                raise DatabaseError(f"cannot enqueue {rows[0].task_name}: {first_line(exc)}") from None
            client.close_connection()
            if attempt == 2:
                raise DatabaseError(f"cannot enqueue {rows[0].task_name}: {first_line(exc)}") from None
    raise AssertionError("unreachable")
