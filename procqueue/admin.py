"""An operator's acts on the queue: find tasks, retry, cancel, purge, and the recurring
schedules (list, remove, enable one its failures disabled). What `procqueue tasks ...`,
`procqueue purge`, `procqueue recurring ...` and the dashboard share; each function runs
on a connection it is given (autocommit: every statement is its own transaction) and
returns plain records.

Retrying and cancelling leave a run record naming who did it (`actor`), so a task's
history tells a retry by an operator from one by the processor.
"""

from __future__ import annotations

import getpass
import re
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Dict, List, Optional, Sequence

from .queries import Queries
from .records import TaskState

# A running task cancelled keeps its lease until the processor holding it has seen that
# no worker of its runs it (it kills the one that does), at least this long after the
# cancel: a task claimed in a batch and not begun yet is begun or given back well within
# it. Until then the task cannot be retried: its old run might still be going.
LET_GO_AFTER_SECONDS = 5.0
FINISHED_STATES = ("succeeded", "failed", "cancelled", "missed")
RETRYABLE_STATES = ("failed", "cancelled", "missed")
PURGE_BATCH = 5000
MAX_AGE = timedelta(days=100 * 365)  # far beyond any task; nearer than datetime's limits

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class TaskSummary:
    """One line of a task listing."""

    id: int
    task_name: str
    queue: str
    state: str
    attempts: int
    max_attempts: int
    run_at: datetime
    created_at: datetime
    finished_at: Optional[datetime]
    last_error: Optional[str]

    @property
    def error_line(self) -> str:
        """The last error's last non-empty line: for a traceback, the exception itself."""
        lines = [line.strip() for line in (self.last_error or "").splitlines() if line.strip()]
        return lines[-1] if lines else ""


@dataclass(frozen=True)
class Schedule:
    """A recurring schedule and its latest run."""

    task_name: str
    run_every: timedelta
    next_run_at: datetime
    timeout_seconds: float
    last_task_id: Optional[int]
    last_outcome: Optional[str]  # the latest run's task state (queued, running, succeeded, ...)
    last_started_at: Optional[datetime]
    last_finished_at: Optional[datetime]
    consecutive_failures: int = 0  # its latest runs that failed (raised, timed out) in a row
    disabled_at: Optional[datetime] = None  # when those failures disabled it; None: enabled

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None


def actor(via: str) -> str:
    """Who acts: the operating-system user and host, and through what."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a uid with no name (a container's numeric USER)
        user = "unknown user"
    return f"{user}@{socket.gethostname()} via {via}"


def parse_age(text: str) -> timedelta:
    """'7d', '12h', '30m', '90s', '2w' -> a timedelta; ValueError naming what is expected."""
    match = _AGE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not an age: expected a number and a unit, like 7d, 12h, 30m, 90s or 2w")
    seconds = float(match.group(1)) * _AGE_UNITS[match.group(2).lower()]
    if seconds > MAX_AGE.total_seconds():
        raise ValueError(f"{text!r} is too long ago: at most {MAX_AGE.days // 365} years")
    return timedelta(seconds=seconds)


def list_tasks(conn, queries: Queries, *, states: Sequence[str] = (), name: Optional[str] = None,
               queue: Optional[str] = None, since: Optional[datetime] = None, until: Optional[datetime] = None,
               limit: int = 50) -> List[TaskSummary]:
    """Tasks newest first. since/until compare when a task finished, or for one that has
    not, when it was enqueued."""
    rows = queries.list_tasks(conn, states=states, name=name, queue=queue, since=since, until=until, limit=limit)
    return [TaskSummary(*row) for row in rows]


def retry(conn, queries: Queries, ids: Sequence[int], *, by: str) -> Dict[int, str]:
    """Send finished tasks back to the queue, due now with their attempts reset. Returns,
    for each id, "retried" or why not."""
    done = set(queries.retry_tasks(conn, ids=list(ids), name=None, since=None, by=by))
    return {task_id: "retried" if task_id in done else _why_not_retried(conn, queries, task_id) for task_id in ids}


def retry_failed(conn, queries: Queries, *, name: Optional[str] = None, since: Optional[datetime] = None,
                 by: str) -> List[int]:
    """Retry every failed task (of one name, failed since a time): the ids retried."""
    return sorted(queries.retry_tasks(conn, ids=None, name=name, since=since, by=by))


def _why_not_retried(conn, queries: Queries, task_id: int) -> str:
    task = queries.get_task(conn, task_id)
    if task is None:
        return "does not exist"
    if task.recurring_slot is not None:
        return "is a run of a recurring schedule (its next slot runs on schedule)"
    if task.state is TaskState.CANCELLED:
        return "is still being stopped by the processor that ran it (retry it in a few seconds)"
    return {TaskState.QUEUED: "is already queued", TaskState.RUNNING: "is running",
            TaskState.SUCCEEDED: "has already succeeded"}.get(task.state, f"is {task.state.value}")


def cancel(conn, queries: Queries, ids: Sequence[int], *, by: str) -> Dict[int, str]:
    """Cancel tasks: "cancelled" for one that was waiting (it never starts), "cancelling"
    for one that was running (the processor holding it kills the worker running it within
    seconds, as it would one that overran its timeout), or why not."""
    was = queries.cancel_tasks(conn, ids=list(ids), by=by)
    result = {}
    for task_id in ids:
        if task_id in was:
            result[task_id] = "cancelling" if was[task_id] is TaskState.RUNNING else "cancelled"
        else:
            task = queries.get_task(conn, task_id)
            result[task_id] = "does not exist" if task is None else {
                TaskState.SUCCEEDED: "has already succeeded", TaskState.FAILED: "has already failed",
                TaskState.CANCELLED: "was already cancelled", TaskState.MISSED: "was already missed",
            }.get(task.state, f"is {task.state.value}")
    return result


def recurring_schedules(conn, queries: Queries) -> List[Schedule]:
    return [Schedule(*row) for row in queries.recurring_schedules(conn)]


def remove_recurring(conn, queries: Queries, name: str, *, by: str) -> Optional[int]:
    """Delete a schedule and cancel its waiting runs: how many, or None when no schedule
    has that name. A processor that registers it recreates it when it next starts."""
    return queries.remove_recurring(conn, name, by=by)


def enable_recurring(conn, queries: Queries, name: str) -> Optional[bool]:
    """Enable a schedule its failures disabled, its count of failures reset: True if it
    was disabled, False if it was not (the count is reset all the same), None when no
    schedule has that name. If slots passed while it was disabled, the latest runs at once."""
    return queries.enable_recurring(conn, name)


def purgeable(conn, queries: Queries, *, before: datetime, states: Sequence[str] = FINISHED_STATES) -> int:
    return queries.count_purgeable(conn, states=states, before=before)


def purge(conn, queries: Queries, *, before: datetime, states: Sequence[str] = FINISHED_STATES,
          batch: int = PURGE_BATCH, on_batch: Callable[[int], None] = lambda deleted: None) -> int:
    """Delete finished tasks that finished before `before`, with their run records, in
    batches (each its own transaction); `on_batch` hears each batch's count."""
    unfinished = sorted(set(states) - set(FINISHED_STATES))
    if unfinished:
        raise ValueError(f"cannot purge {', '.join(unfinished)} tasks: only finished ones "
                         f"({', '.join(FINISHED_STATES)})")
    total = 0
    while True:
        deleted = queries.purge_tasks(conn, states=states, before=before, batch=batch)
        total += deleted
        on_batch(deleted)
        if deleted < batch:
            return total
