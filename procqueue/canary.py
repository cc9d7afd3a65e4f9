"""The application's side of health: is some processor running the tasks it enqueues?

Flagsmith's `is_processor_healthy`: enqueue a no-op task and see it done. The processor's
own probes (`procqueue-health`, `/healthz`) say a processor is alive; this says the whole
path works from where the application stands: its database, its schema, a processor
that takes tasks from it.
"""

from __future__ import annotations

import time
import uuid

from . import client
from .config import TaskRunMethod
from .maintenance import HEALTH_CHECK_TASK_NAME, health_check
from .records import TaskState


def is_processor_healthy(max_tries: int = 5, factor: float = 0.1) -> bool:
    """True once a processor has run a no-op task enqueued now, looked for `max_tries`
    times, `factor * 2**n` seconds apart (0.1, 0.2, 0.4, 0.8 s: about 1.5 s by default);
    False otherwise. Either way the task's row is deleted (left if a worker holds it at
    that moment: it finishes, and retention takes it), so a processor that is down does
    not collect canaries. Under SYNCHRONOUSLY or SEPARATE_THREAD the task runs here, no
    processor is involved, and the answer is True."""
    canary = str(uuid.uuid4())
    if client.settings().task_run_method is not TaskRunMethod.TASK_PROCESSOR:
        health_check.delay(args=(canary,))
        return True
    # procqueue's own autocommit connection, not the application's default one: inside
    # a request's transaction the canary would stay invisible to every processor.
    conn, queries = client.connection(create_schema=True)
    try:
        task_id = health_check.delay(args=(canary,), connection=conn)
        try:
            return _succeeds(queries, conn, task_id, max_tries, factor)
        finally:
            queries.delete_canary(conn, task_id=task_id, task_name=HEALTH_CHECK_TASK_NAME)
    finally:
        # Not kept open between checks: a health check every few seconds does not need
        # it, and under Django's test runner it would keep the test database from being
        # dropped.
        client.close_connection()


def _succeeds(queries, conn, task_id: int, max_tries: int, factor: float) -> bool:
    for attempt in range(max_tries):
        if attempt:
            time.sleep(factor * 2 ** (attempt - 1))
        task = queries.get_task(conn, task_id)
        if task is not None and task.state == TaskState.SUCCEEDED:
            return True
    return False
