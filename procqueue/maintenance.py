"""Built-in recurring tasks every processor registers: retention clean-up."""

from __future__ import annotations

import logging
from datetime import timedelta

from .config import RetentionConfig
from .logs import log_event
from .registry import register_recurring_task

logger = logging.getLogger("procqueue.maintenance")

CLEANUP_TASK_NAME = "procqueue.clean_up_old_tasks"
CLEANUP_EVERY = timedelta(minutes=15)

# Set by the supervisor from its config before it forks (data flows CLI -> config -> here).
_retention = RetentionConfig()


def configure(retention: RetentionConfig) -> None:
    global _retention
    _retention = retention


@register_recurring_task(run_every=CLEANUP_EVERY, timeout=timedelta(minutes=10), task_name=CLEANUP_TASK_NAME)
def clean_up_old_tasks() -> None:
    """Delete finished tasks and run records past their retention, in batches.

    Batches keep each DELETE short, so the clean-up never holds locks long enough to
    stall claiming; it stops after a bounded number so one run cannot take forever.
    """
    from . import client

    conn, queries = client.connection()
    tasks = _delete_in_batches(lambda: queries.delete_finished_tasks(conn, days=_retention.task_days, batch=_retention.batch_size))
    runs = _delete_in_batches(lambda: queries.delete_old_runs(conn, days=_retention.run_days, batch=_retention.batch_size))
    log_event(logger, logging.INFO, "retention.cleaned", tasks_deleted=tasks, runs_deleted=runs,
              task_days=_retention.task_days, run_days=_retention.run_days)


def _delete_in_batches(delete_batch, max_batches: int = 100) -> int:
    total = 0
    for _ in range(max_batches):
        deleted = delete_batch()
        total += deleted
        if deleted == 0:
            break
    return total
