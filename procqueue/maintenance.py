"""Built-in recurring tasks every processor registers: retention clean-up."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from .logs import log_event
from .registry import register_recurring_task

logger = logging.getLogger("procqueue.maintenance")

CLEANUP_TASK_NAME = "procqueue.clean_up_old_tasks"
CLEANUP_EVERY = timedelta(minutes=15)

# One run deletes until nothing is left or this much time has passed, so a backlog is
# worked off over a few runs without one run hogging a worker.
TIME_BUDGET_SECONDS = 300.0


@register_recurring_task(run_every=CLEANUP_EVERY, timeout=timedelta(minutes=10), task_name=CLEANUP_TASK_NAME)
def clean_up_old_tasks() -> None:
    """Delete finished tasks and run records past their retention, in batches.

    Batches keep each DELETE short, so the clean-up never holds locks long enough to
    stall claiming; it stops after a bounded number so one run cannot take forever.
    """
    from . import client

    retention = client.settings().retention  # the processor's config (its supervisor set it), else the environment's
    conn, queries = client.connection()
    try:
        deadline = time.monotonic() + TIME_BUDGET_SECONDS
        tasks = _delete_in_batches(
            lambda: queries.delete_finished_tasks(conn, days=retention.task_days, batch=retention.batch_size),
            deadline)
        runs = _delete_in_batches(
            lambda: queries.delete_old_runs(conn, days=retention.run_days, batch=retention.batch_size), deadline
        )
    finally:
        # Closed after each run (every 15 minutes) rather than kept for the worker's life:
        # between runs a processor holds --numthreads + 1 connections, no more.
        client.close_connection()
    log_event(logger, logging.INFO, "retention.cleaned", tasks_deleted=tasks, runs_deleted=runs,
              task_days=retention.task_days, run_days=retention.run_days)


def _delete_in_batches(delete_batch, deadline: float) -> int:
    total = 0
    while time.monotonic() < deadline:
        deleted = delete_batch()
        total += deleted
        if deleted == 0:
            break
    return total
