"""Running one claimed task to an outcome: look up, call under a timeout, classify."""

from __future__ import annotations

import logging
import signal
import traceback
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Callable, List, Optional

from .config import DEFAULT_BACKOFF_DELAY_SECONDS
from .logs import log_event
from .records import ClaimedTask, RunOutcome, TaskOutcome, TaskState, UnreadableJson
from .registry import TaskBackoffError, TaskHandler, backoff_delay, get_handler

logger = logging.getLogger("procqueue.worker")


class TaskTimeoutError(BaseException):
    """Raised inside a task that ran past its timeout.

    A BaseException, like KeyboardInterrupt, so a task's own `except Exception` cannot
    swallow it and carry on past its deadline.
    """


class SupervisorGoneError(BaseException):
    """Raised inside a task whose supervisor died, before peers could rescue the task and
    run it a second time at once (see Worker.orphaned). A BaseException for the reason
    TaskTimeoutError is one."""


MAX_ALARM_SECONDS = 10 ** 8  # about three years


class _SoftTimeout:
    """SIGALRM-based timeout for the task running in this (main) thread.

    This is the gentle half of timeout enforcement: it interrupts Python code and lets the
    worker record the run and carry on. Code that never returns to the interpreter (a C
    call holding the GIL) is beyond it; the supervisor's hard kill covers that.
    """

    def __init__(self) -> None:
        self.armed = False
        self.installed = False
        self.cause = TaskTimeoutError  # what the alarm raises

    def install(self) -> None:
        signal.signal(signal.SIGALRM, self._on_alarm)
        self.installed = True

    def _on_alarm(self, signum, frame) -> None:
        if self.armed:
            self.armed = False
            raise self.cause()

    def arm(self, seconds: float) -> None:
        if self.installed:
            self.armed, self.cause = True, TaskTimeoutError
            # Armed, so a stop can still interrupt the task (interrupt_within), but with no
            # timer past MAX_ALARM_SECONDS: timeout=None is ten years, which some kernels'
            # setitimer refuses (BSD's, over 10**8 s), and no alarm that far off matters.
            signal.setitimer(signal.ITIMER_REAL, seconds if seconds <= MAX_ALARM_SECONDS else 0)

    def interrupt_within(self, seconds: float, cause: type) -> None:
        """Have the running task (if any) interrupted with `cause` within `seconds`, unless
        its own timeout comes first. Safe in a signal handler."""
        if not (self.installed and self.armed):
            return
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        if 0 < remaining <= seconds:
            return
        self.cause = cause
        signal.setitimer(signal.ITIMER_REAL, seconds)

    def disarm(self) -> None:
        if self.installed:
            self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)


soft_timeout = _SoftTimeout()

_current: Optional[ClaimedTask] = None
_boundary_hooks: List[Callable[[], None]] = []


def on_task_boundary(hook: Callable[[], None]) -> None:
    """Have `hook` called in a worker before and after every task, as a web framework
    calls its own around each request (the Django app registers close_old_connections, so
    a task starts on a working connection and CONN_MAX_AGE holds). Registered before the
    workers fork. A hook that raises is logged; the task's outcome is its own."""
    if hook not in _boundary_hooks:
        _boundary_hooks.append(hook)


def _at_task_boundary() -> None:
    for hook in _boundary_hooks:
        try:
            hook()
        except Exception as exc:
            log_event(logger, logging.WARNING, "task.boundary_hook_failed", hook=getattr(hook, "__qualname__", repr(hook)),
                      error=summarise(exc))


def current_task() -> Optional[ClaimedTask]:
    """The task being run, when called from a task's code in a processor's worker: its id,
    attempt, recurring slot and the rest (as Celery's current_task, RQ's get_current_job).
    None anywhere else (a plain call, TASK_RUN_METHOD=SYNCHRONOUSLY)."""
    return _current


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# A task whose name this processor does not know was most likely enqueued by a newer
# release during a rolling deploy: wait long enough for a processor that knows it.
UNKNOWN_TASK_BACKOFF = timedelta(seconds=60)


def execute(task: ClaimedTask, now: Callable[[], datetime] = utcnow, started: Optional[datetime] = None,
            backoff_delay_seconds: float = DEFAULT_BACKOFF_DELAY_SECONDS) -> TaskOutcome:
    """Run `task` and say what became of it. Never raises for anything the task does.
    `started`: when the run began, if the database already recorded it (a recurring run).
    `backoff_delay_seconds`: how long a `TaskBackoffError()` without `delay_until` waits
    (TASK_BACKOFF_DEFAULT_DELAY_SECONDS)."""
    started = started or now()
    handler = get_handler(task.task_name)
    if handler is None:
        error = (
            f"task {task.task_name!r} is not registered in this processor "
            "(is its module passed with --import?)"
        )
        # Flagged: this failure says nothing about the task itself, so a recurring run's
        # does not count towards disabling its schedule (see `complete` in queries.sql).
        return replace(_failure(task, None, started, now(), RunOutcome.FAILED, error), task_unknown=True)
    malformed = malformed_arguments(task)
    if malformed:  # a row written by hand: no attempt would go differently
        return TaskOutcome(task.id, TaskState.FAILED, RunOutcome.FAILED, started, now(), error=malformed,
                           summary=malformed)
    global _current
    _at_task_boundary()
    try:
        soft_timeout.arm(task.timeout_seconds)
        try:
            _current = task
            handler.func(*task.args, **task.kwargs)
        finally:
            soft_timeout.disarm()
            _current = None
            _at_task_boundary()
    except TaskBackoffError as backoff:
        return _backoff(task, started, now(), backoff, backoff_delay_seconds)
    except SupervisorGoneError:
        return _supervisor_gone(task, started, now())
    except TaskTimeoutError:
        error = f"task ran past its timeout of {task.timeout_seconds:g}s\n" + traceback.format_exc()
        return _failure(task, handler, started, now(), RunOutcome.TIMED_OUT, error,
                        f"TaskTimeoutError: ran past its timeout of {task.timeout_seconds:g}s")
    except BaseException as exc:
        # SystemExit and KeyboardInterrupt too: a worker's stop signals only set a flag
        # (worker_process), so these come from the task's own code (sys.exit(), a library
        # giving up). Let through, they would end the worker mid-batch, its unrecorded
        # outcomes with it, and the run would be recorded as `lost`, without its traceback.
        return _failure(task, handler, started, now(), RunOutcome.FAILED, traceback.format_exc(), summarise(exc))
    return TaskOutcome(task.id, TaskState.SUCCEEDED, RunOutcome.SUCCEEDED, started, now())


def malformed_arguments(task: ClaimedTask) -> Optional[str]:
    """What is wrong with a row's arguments, which `.delay()` always writes as an array and
    an object: an object's keys must not silently become positional arguments."""
    for name, value in (("args", task.args), ("kwargs", task.kwargs)):
        if isinstance(value, UnreadableJson):
            return f"the task's {name} cannot be read: {value.reason} (was the row written by hand?)"
    if not isinstance(task.args, list):
        return f"the task's args must be a JSON array, got {json_type(task.args)} (was the row written by hand?)"
    if not isinstance(task.kwargs, dict):
        return f"the task's kwargs must be a JSON object, got {json_type(task.kwargs)} (was the row written by hand?)"
    return None


def json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _supervisor_gone(task: ClaimedTask, started: datetime, finished: datetime) -> TaskOutcome:
    """It did nothing wrong: back to the queue without losing an attempt. A recurring run
    is the exception: it started, so it never runs again (the next slot is its retry)."""
    summary = "SupervisorGoneError: supervisor died"
    if task.recurring_slot is not None:
        error = clean_text("the supervisor died; the recurring run was interrupted and is not run again "
                           "(the next slot is its retry)\n" + traceback.format_exc())
        return TaskOutcome(task.id, TaskState.MISSED, RunOutcome.LOST, started, finished, error=error, summary=summary)
    error = clean_text("the supervisor died; the task was interrupted so that no other processor "
                       "runs it at the same time\n" + traceback.format_exc())
    return TaskOutcome(task.id, TaskState.QUEUED, RunOutcome.LOST, started, finished, error=error,
                       retry_in_seconds=0.0, refund_attempt=True, summary=summary)


def _failure(
    task: ClaimedTask,
    handler: Optional[TaskHandler],
    started: datetime,
    finished: datetime,
    outcome: RunOutcome,
    error: str,
    summary: Optional[str] = None,
) -> TaskOutcome:
    error = clean_text(error)
    summary = clean_text(summary or error.strip().splitlines()[-1])
    if task.attempts >= task.max_attempts:
        return TaskOutcome(task.id, TaskState.FAILED, outcome, started, finished, error=error, summary=summary)
    base = handler.retry_backoff if handler is not None else UNKNOWN_TASK_BACKOFF
    delay = backoff_delay(base, task.attempts)
    return TaskOutcome(task.id, TaskState.QUEUED, outcome, started, finished, error=error,
                       retry_in_seconds=delay, summary=summary)


def _backoff(
    task: ClaimedTask, started: datetime, finished: datetime, backoff: TaskBackoffError, default_delay_seconds: float
) -> TaskOutcome:
    """A backoff uses an attempt, as a failure does (Flagsmith counts it as one): a task
    that keeps asking to run later runs at most max_attempts times, whatever the mix of
    failures and backoffs. Called inside the except clause: the traceback is the task's."""
    message = safe_str(backoff)
    error = clean_text(f"TaskBackoffError: {message}" if message else "TaskBackoffError")
    if task.recurring_slot is not None:
        # A recurring run that started never starts again: the next slot is its retry.
        return TaskOutcome(task.id, TaskState.MISSED, RunOutcome.BACKOFF, started, finished,
                           error=error + " (a recurring run is not run again: the next slot is its retry)")
    if task.attempts >= task.max_attempts:
        last = (f"backed off on its last attempt ({task.attempts} of {task.max_attempts}): a backoff uses an "
                f"attempt, so it is not run again\n")
        return TaskOutcome(task.id, TaskState.FAILED, RunOutcome.BACKOFF, started, finished,
                           error=clean_text(last + traceback.format_exc()),
                           summary=f"{error} (backed off on its last attempt)")
    if backoff.delay_until is not None:
        return TaskOutcome(task.id, TaskState.QUEUED, RunOutcome.BACKOFF, started, finished,
                           error=error, retry_at=backoff.delay_until)
    return TaskOutcome(task.id, TaskState.QUEUED, RunOutcome.BACKOFF, started, finished, error=error,
                       retry_in_seconds=float(default_delay_seconds))


def summarise(exc: BaseException) -> str:
    """`Type: first line of the message`: psycopg2 errors, for one, end in HINT lines that
    would otherwise stand in for the error in a one-line log."""
    lines = safe_str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def safe_str(exc: BaseException) -> str:
    """str(exc), or `<str() failed>` when the exception's own __str__ raises: a task's
    broken exception class must not break the worker recording its failure."""
    try:
        return str(exc)
    except Exception:
        return "<str() failed>"


def clean_text(text: str) -> str:
    """Text Postgres will store: no NUL bytes, no lone surrogates (both come from
    exception messages of tasks handling binary data)."""
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
