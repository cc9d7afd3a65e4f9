"""Built-in tasks every processor registers: the retention clean-up, and the health
check's no-op canary (`procqueue.is_processor_healthy()`)."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from .config import DEFAULT_CLEAN_UP_EVERY, RetentionConfig, retention_config_from_env
from .logs import log_event
from .records import TaskPriority
from .registry import register_recurring_task, register_task_handler, reschedule_recurring

logger = logging.getLogger("procqueue.maintenance")

CLEANUP_TASK_NAME = "procqueue.clean_up_old_tasks"
HEALTH_CHECK_TASK_NAME = "procqueue.health_check"

# One run deletes until nothing is left or its time budget has passed, so a backlog is
# worked off over a few runs without one run hogging a worker: a third of the interval
# (five minutes of every fifteen by default), at most 25 minutes, so that with a daily
# schedule it ends, timeout included, within Flagsmith's 30-minute recurring timeout.
MAX_TIME_BUDGET = timedelta(minutes=25)
# Past the budget, the batch under way finishes: the timeout leaves it this much room.
TIMEOUT_MARGIN = timedelta(minutes=5)


def time_budget(run_every: timedelta) -> timedelta:
    return min(run_every / 3, MAX_TIME_BUDGET)


@register_recurring_task(run_every=DEFAULT_CLEAN_UP_EVERY, task_name=CLEANUP_TASK_NAME,
                         timeout=time_budget(DEFAULT_CLEAN_UP_EVERY) + TIMEOUT_MARGIN)
def clean_up_old_tasks() -> None:
    """Delete finished tasks and run records past their retention, in batches.

    Batches keep each DELETE short, so the clean-up never holds locks long enough to
    stall claiming; it stops after a bounded time so one run cannot take forever.
    """
    from . import client

    # The processor's config (its supervisor set it), else the environment's.
    retention = client.settings().retention or retention_config_from_env()
    if not retention.enabled:
        return  # said once, at the processor's start (clean_up=off); not a statement sent
    conn, queries = client.connection()
    try:
        deadline = time.monotonic() + time_budget(retention.schedule[0]).total_seconds()
        tasks = _delete_in_batches(
            lambda: queries.delete_finished_tasks(conn, days=retention.task_days, batch=retention.batch_size,
                                                  include_failed=retention.include_failed),
            deadline)
        runs = _delete_in_batches(
            lambda: queries.delete_old_runs(conn, days=retention.run_days, batch=retention.batch_size),
            deadline)
    finally:
        # Closed after each run rather than kept for the worker's life: between runs a
        # processor holds --numthreads + 1 connections, no more.
        client.close_connection()
    log_event(logger, logging.INFO, "retention.cleaned", tasks_deleted=tasks, runs_deleted=runs,
              task_days=retention.task_days, run_days=retention.run_days)


def schedule_clean_up(retention: RetentionConfig) -> None:
    """Give the clean-up the schedule of the processor's config (TASK_DELETE_RUN_EVERY,
    TASK_DELETE_RUN_TIME): the supervisor calls this before registering the schedules.

    With ENABLE_CLEAN_UP_OLD_TASKS=false the processor does not schedule it at all (a run
    per interval that deletes nothing only adds rows nothing deletes), nor touches its
    schedule's row, which a processor with the clean-up on may be keeping: registering it
    would impose this processor's interval on that one's, and workers watching a slot they
    never enqueue would find it due at every look. Its handler stays registered, for a run
    such a processor enqueued and this one claims (it deletes nothing here)."""
    every, at = retention.schedule
    reschedule_recurring(CLEANUP_TASK_NAME, run_every=every, first_run_time=at,
                         timeout=time_budget(every) + TIMEOUT_MARGIN, enabled=retention.enabled)


def _delete_in_batches(delete_batch, deadline: float) -> int:
    total = 0
    while time.monotonic() < deadline:
        deleted = delete_batch()
        total += deleted
        if deleted == 0:
            break
    return total


@register_task_handler(task_name=HEALTH_CHECK_TASK_NAME, priority=TaskPriority.HIGHEST, max_attempts=1,
                       timeout=timedelta(seconds=10))
def health_check(canary: str) -> None:
    """Does nothing: that a processor ran it is the whole answer (see canary.py)."""
