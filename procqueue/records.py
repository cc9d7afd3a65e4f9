"""The records procqueue passes around: task states, run outcomes, and rows as dataclasses."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Mapping, Optional, Set, Union

from .errors import TaskError


class TaskState(str, enum.Enum):
    """Every state a task row can be in (the `tasks.state` column)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # A recurring run that did not complete through no fault of its own: it could not
    # start before the next slot was due, or its processor died under it (a recurring
    # slot runs at most once). The next slot is its retry.
    MISSED = "missed"


class RunOutcome(str, enum.Enum):
    """How one run (attempt) of a task ended (the `task_runs.outcome` column)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # raised, or its name is not registered here
    TIMED_OUT = "timed_out"  # ran past its timeout
    BACKOFF = "backoff"  # raised TaskBackoffError: asked to run again later
    LOST = "lost"  # its worker or processor died under it
    CANCELLED = "cancelled"  # an operator cancelled it (before or while it ran)
    RETRIED = "retried"  # not a run: an operator sent the finished task back to the queue


# `timeout=None` (Flagsmith's "no timeout"): ten years, stored and enforced like any
# timeout, so nothing downstream needs a case for a missing one.
NO_TIMEOUT_SECONDS = 3650 * 86400.0


def is_no_timeout(seconds: float) -> bool:
    """Whether a timeout is NO_TIMEOUT_SECONDS, to show as "none". With a second's margin:
    the status file's is a deadline less its start, a float difference."""
    return seconds >= NO_TIMEOUT_SECONDS - 1


class TaskPriority(enum.IntEnum):
    """Flagsmith's priority levels: lower runs first."""

    HIGHEST = 0
    HIGH = 25
    NORMAL = 50
    LOW = 75
    LOWER = 100


@dataclass(frozen=True)
class ClaimedTask:
    """A task a worker holds the lease on."""

    id: int
    task_name: str
    args: Union[List[Any], "UnreadableJson"]  # UnreadableJson: a row Python cannot read
    kwargs: Union[Dict[str, Any], "UnreadableJson"]
    queue: str
    priority: int
    run_at: datetime
    attempts: int  # including the run about to happen
    max_attempts: int
    timeout_seconds: float
    recurring_slot: Optional[datetime]
    leased_at: datetime  # the claim's fencing token: its outcome is recorded only under this lease
    rescues: int = 0  # how often it was put back from a dead processor (claimed or running)


class UnreadableJson:
    """What a JSON column holds when Python cannot read it: a row written by hand, nested
    deeper than Python's JSON decoder goes, or with an integer longer than Python converts
    (`.delay()` writes neither). Stands in for the value so that one such row fails alone,
    instead of taking the worker's whole claimed batch (or `procqueue show`) down with it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __str__(self) -> str:
        return f"<unreadable JSON: {self.reason}>"

    __repr__ = __str__


@dataclass(frozen=True)
class TaskCall:
    """One invocation of a handler, ready to enqueue (see `procqueue.enqueue_many`)."""

    handler: Any  # a registry.TaskHandler (registry imports this module, not the reverse)
    args: tuple = ()
    kwargs: Optional[Mapping[str, Any]] = None
    delay_until: Optional[datetime] = None
    priority: Optional[int] = None


def validated_priority(name: str, priority: Union[TaskPriority, int]) -> int:
    if not isinstance(priority, int) or not -32768 <= priority <= 32767:
        raise TaskError(f"task {name}: priority must be an integer from -32768 to 32767 (TaskPriority: "
                        f"HIGHEST 0 to LOWER 100, lower runs first), got {priority!r}")
    return int(priority)


@dataclass
class RunningTask:
    """The task a worker's main thread is running now, as its flush thread sees it."""

    task: ClaimedTask
    began: float  # the worker's clock when the run began
    started_at: datetime  # the same moment, by the wall clock, as the database records it
    began_boot: float  # the same moment, on the clock process start times are kept on
    marked: bool = False  # the database has been told it started (start_run)


@dataclass(frozen=True)
class TaskOutcome:
    """What became of one claimed task; `complete` writes a batch of these at once."""

    task_id: int
    state: TaskState  # where the task goes next: succeeded, failed, queued (retry) or missed
    outcome: RunOutcome
    started_at: datetime
    finished_at: datetime
    error: Optional[str] = None
    retry_in_seconds: Optional[float] = None  # relative retry (backoff after a failure)
    retry_at: Optional[datetime] = None  # absolute retry (TaskBackoffError.delay_until)
    refund_attempt: bool = False  # the run does not count against max_attempts
    summary: Optional[str] = None  # one line for the log: the exception type and message
    # Not run: its name is not registered in this processor (an older release's, during a
    # rolling deploy). A recurring run's failure of that kind is not counted on its schedule.
    task_unknown: bool = False


@dataclass(frozen=True)
class TaskRecord:
    """A row of `tasks`, as `procqueue.get_task()` returns it."""

    id: int
    task_name: str
    args: Union[List[Any], "UnreadableJson"]  # UnreadableJson: a row Python cannot read
    kwargs: Union[Dict[str, Any], "UnreadableJson"]
    queue: str
    priority: int
    run_at: datetime
    state: TaskState
    attempts: int
    max_attempts: int
    timeout_seconds: float
    locked_by: Optional[str]
    locked_worker: Optional[int]
    locked_at: Optional[datetime]
    last_error: Optional[str]
    recurring_slot: Optional[datetime]
    created_at: datetime
    started_at: Optional[datetime]  # of the current or last run, once the database knows it started
    finished_at: Optional[datetime]
    expires_at: Optional[datetime] = None  # not started by then, it never starts (a recurring run's next slot)


@dataclass(frozen=True)
class RunRecord:
    """A row of `task_runs`: one attempt of a task."""

    id: int
    task_id: int
    task_name: str
    attempt: int
    started_at: Optional[datetime]
    finished_at: datetime
    outcome: RunOutcome
    error: Optional[str]
    processor: Optional[str]
    worker: Optional[int]
    actor: Optional[str] = None  # who cancelled or retried it (outcomes cancelled, retried)


@dataclass(frozen=True)
class ReleasedTask:
    """A running task taken back from a worker or processor that died under it."""

    task_id: int
    task_name: str
    recurring: bool
    state: TaskState  # where it went: queued (to run again), failed or missed
    started: bool = True  # it had started (else it was only claimed, and went back untouched)
    outcome: RunOutcome = RunOutcome.LOST  # how its run was recorded (timed_out: a killed overrun)
    # A recurring run whose failure disabled its schedule: the schedule's failures in a row.
    disabled_schedule_after: Optional[int] = None


@dataclass(frozen=True)
class RecordedOutcomes:
    """What `complete` did with a batch of outcomes."""

    moved: Set[int]  # the tasks still held under the claim that ran them: recorded
    # Recurring schedules this batch disabled (their runs failed too often in a row), by
    # name, with their count of consecutive failures.
    disabled: Dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ExpiredTask:
    """A queued task whose expires_at passed before it could start: ended missed."""

    task_id: int
    task_name: str
    recurring: bool


@dataclass(frozen=True)
class ScheduledRun:
    """What one check of a due recurring schedule did."""

    task_id: Optional[int]  # the run enqueued for the current slot (None: another processor had)
    task_name: str
    slot: datetime
    skipped_slots: int  # earlier slots that passed while no processor ran: skipped, not run late


@dataclass(frozen=True)
class QueueDepth:
    """How many tasks of one queue are in each state that matters to an operator."""

    waiting: int = 0  # queued and due: what `{"waiting": N}` counts
    scheduled: int = 0  # queued for later (delay_until, a retry's backoff)
    running: int = 0
    failed: int = 0  # failed for good, kept until purged (or TASK_DELETE_INCLUDE_FAILED_TASKS)
    oldest_waiting_age_seconds: Optional[float] = None  # how long the oldest due task has waited


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of every queue, taken at `checked_at` (Unix seconds)."""

    checked_at: float
    queues: Mapping[str, QueueDepth]

    def including(self, queue_names) -> "QueueStats":
        """The same, with an all-zero entry for each named queue that holds no task, so
        a queue a processor serves is reported (as empty) before its first task."""
        queues = {name: QueueDepth() for name in queue_names}
        queues.update(self.queues)
        return QueueStats(self.checked_at, dict(sorted(queues.items())))

    def total(self) -> QueueDepth:
        depths = list(self.queues.values())
        ages = [d.oldest_waiting_age_seconds for d in depths if d.oldest_waiting_age_seconds is not None]
        return QueueDepth(
            waiting=sum(d.waiting for d in depths),
            scheduled=sum(d.scheduled for d in depths),
            running=sum(d.running for d in depths),
            failed=sum(d.failed for d in depths),
            oldest_waiting_age_seconds=max(ages) if ages else None,
        )


@dataclass(frozen=True)
class ProcessorRecord:
    """A row of `processors`: one supervisor, on some host."""

    id: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime


@dataclass(frozen=True)
class HeldTask:
    """A task some processor's worker holds now."""

    id: int
    task_name: str
    queue: str
    locked_by: Optional[str]
    locked_worker: Optional[int]
    locked_at: Optional[datetime]
    started_at: Optional[datetime]  # None: claimed, waiting its turn in its worker's batch

