"""Task handlers: the functions a processor is allowed to run, by name.

A row in the database can only ever run a function registered here, in the processor's
own process: the row carries a name and JSON arguments, never code.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, replace
from datetime import datetime, time, timedelta, timezone
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from .arguments import require_fitting, serialise_arguments, signature_of
from .errors import TaskError, TaskProcessingError
from .records import NO_TIMEOUT_SECONDS, TaskCall, TaskPriority, validated_priority

DEFAULT_TIMEOUT = timedelta(seconds=60)
DEFAULT_RECURRING_TIMEOUT = timedelta(minutes=30)
# What `timeout=None` means, as in Flagsmith: no timeout (ten years, so the worker's alarm
# and the supervisor's deadline need no case of their own).
NO_TIMEOUT = timedelta(seconds=NO_TIMEOUT_SECONDS)
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_QUEUE = "default"
DEFAULT_RETRY_BACKOFF = timedelta(seconds=5)
MAX_RETRY_BACKOFF = timedelta(hours=1)


class TaskBackoffError(TaskProcessingError):
    """Raise from a task to have it run again later (Flagsmith's name, and, as there, a
    TaskProcessingError).

    `delay_until`: when to run it again (default: TASK_BACKOFF_DEFAULT_DELAY_SECONDS, 5 s,
    from now). The run is recorded with outcome `backoff` and uses an attempt, as in
    Flagsmith: on the last of `max_attempts` the task ends `failed` instead. A recurring
    run that backs off ends `missed`: the next slot is its retry.
    """

    def __init__(self, delay_until: Optional[datetime] = None, *args: object) -> None:
        super().__init__(*args)
        if delay_until is not None and delay_until.tzinfo is None:
            raise TaskError(f"TaskBackoffError delay_until must be timezone-aware, got {delay_until!r}")
        self.delay_until = delay_until


class TaskHandler:
    """A registered task: callable like the function, plus `.delay()` to enqueue it."""

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        task_name: str,
        queue_size: Optional[int],
        priority: int,
        timeout: timedelta,
        max_attempts: int,
        queue: str,
        retry_backoff: timedelta,
        transaction_on_commit: bool = True,
    ) -> None:
        self.func = func
        self.task_name = task_name
        self.queue_size = queue_size
        self.priority = int(priority)
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.queue = queue
        self.retry_backoff = retry_backoff
        self.transaction_on_commit = bool(transaction_on_commit)
        self.signature = signature_of(func)  # worked out once: checked at every .delay()
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function with these very arguments (not as JSON gives them back), once
        they are known to be ones `.delay()` could store, as Flagsmith checks them: else
        InvalidArgumentsError. Arguments that do not fit the function fail as in any call."""
        serialise_arguments(self.task_name, args, kwargs)
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<TaskHandler {self.task_name}>"

    def serialise(self, args: Sequence[Any], kwargs: Optional[Mapping[str, Any]],
                  max_bytes: Optional[int] = None) -> Tuple[str, str]:
        """The arguments as JSON, once they are known to fit the function; else a TypeError
        (InvalidArgumentsError) naming what is wrong, before anything is written."""
        args_json, kwargs_json = serialise_arguments(self.task_name, args, kwargs, max_bytes)
        require_fitting(self.task_name, self.signature, args, kwargs)
        return args_json, kwargs_json

    def call(
        self,
        *,
        args: Sequence[Any] = (),
        kwargs: Optional[Mapping[str, Any]] = None,
        delay_until: Optional[datetime] = None,
        priority: Optional[int] = None,
    ) -> TaskCall:
        """Describe one invocation without enqueuing it, for `procqueue.enqueue_many`."""
        return TaskCall(self, args, kwargs, delay_until, priority)

    def delay(
        self,
        *,
        args: Sequence[Any] = (),
        kwargs: Optional[Mapping[str, Any]] = None,
        delay_until: Optional[datetime] = None,
        priority: Optional[int] = None,
        connection: Any = None,
    ) -> Optional[int]:
        """Enqueue the task (or run it, per TASK_RUN_METHOD). Returns the new task's id, or
        None when it ran locally or was skipped because `queue_size` tasks are waiting."""
        from .enqueue import delay

        return delay(self.call(args=args, kwargs=kwargs, delay_until=delay_until, priority=priority), connection)

    def run_in_thread(self, *, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None) -> threading.Thread:
        """Run the function in a new, unmanaged daemon thread (Flagsmith's fallback): now,
        or, with `transaction_on_commit` and a transaction to hook (the Django app's), once
        the caller's transaction commits. Returns the thread, started or to be started."""
        from .enqueue import run_in_thread

        return run_in_thread(self.call(args=args, kwargs=kwargs))

    @property
    def timeout_seconds(self) -> float:
        return self.timeout.total_seconds()

    def retry_delay_seconds(self, attempt: int) -> float:
        return backoff_delay(self.retry_backoff, attempt)


def backoff_delay(base: timedelta, attempt: int) -> float:
    """Exponential backoff after failed attempt number `attempt` (1-based), capped."""
    exponent = min(max(attempt - 1, 0), 32)  # 2**32 times any base is past the cap already
    return min(base.total_seconds() * (2 ** exponent), MAX_RETRY_BACKOFF.total_seconds())


@dataclass(frozen=True)
class RecurringSchedule:
    task_name: str
    run_every: timedelta
    first_run_at: Optional[datetime]  # an anchor; None means "from first registration"
    timeout: timedelta
    args_json: str = "[]"
    kwargs_json: str = "{}"


_handlers: Dict[str, TaskHandler] = {}
_recurring: Dict[str, RecurringSchedule] = {}
# Recurring tasks whose schedule is switched off by a setting (the clean-up, with
# ENABLE_CLEAN_UP_OLD_TASKS=false): left out of recurring_schedules(), handler kept.
_unscheduled: Set[str] = set()


def register_task_handler(
    task_name: Optional[str] = None,
    queue_size: Optional[int] = None,
    priority: Union[TaskPriority, int] = TaskPriority.NORMAL,
    timeout: Optional[timedelta] = DEFAULT_TIMEOUT,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    queue: str = DEFAULT_QUEUE,
    retry_backoff: timedelta = DEFAULT_RETRY_BACKOFF,
    transaction_on_commit: bool = True,
) -> Callable[[Callable[..., Any]], TaskHandler]:
    """Register a function as a task. The function stays callable directly.

    `timeout=None`: no timeout, as in Flagsmith (NO_TIMEOUT). `transaction_on_commit`
    (Flagsmith's, for SEPARATE_THREAD): start the thread when the caller's transaction
    commits, where there is one to hook (`procqueue.contrib.django` hooks Django's);
    False starts it at once."""

    def decorator(func: Callable[..., Any]) -> TaskHandler:
        name = task_name or default_task_name(func)
        handler = TaskHandler(
            func,
            task_name=name,
            queue_size=_validated_queue_size(name, queue_size),
            priority=validated_priority(name, priority),
            timeout=_validated_timeout(name, NO_TIMEOUT if timeout is None else timeout),
            max_attempts=_validated_max_attempts(name, max_attempts),
            queue=_validated_queue(name, queue),
            retry_backoff=_validated_retry_backoff(name, retry_backoff),
            transaction_on_commit=transaction_on_commit,
        )
        _register(handler)
        return handler

    return decorator


def register_recurring_task(
    run_every: timedelta,
    task_name: Optional[str] = None,
    args: Sequence[Any] = (),
    kwargs: Optional[Mapping[str, Any]] = None,
    first_run_time: Union[time, datetime, None] = None,
    timeout: Optional[timedelta] = DEFAULT_RECURRING_TIMEOUT,
) -> Callable[[Callable[..., Any]], TaskHandler]:
    """Register a function to run once per `run_every` across all processors, called with
    `args`/`kwargs` each time (Flagsmith's signature, in Flagsmith's order).

    `first_run_time`: a `datetime.time` runs it at that time of day (UTC) and every
    `run_every` after; a timezone-aware `datetime` anchors the schedule there. Without it,
    the first run is when a processor first registers the schedule. `timeout=None`: no
    timeout, as in Flagsmith (NO_TIMEOUT).
    """

    def decorator(func: Callable[..., Any]) -> TaskHandler:
        name = task_name or default_task_name(func)
        _validated_run_every(name, run_every)
        handler = TaskHandler(
            func,
            task_name=name,
            queue_size=None,
            priority=TaskPriority.NORMAL,
            timeout=_validated_timeout(name, NO_TIMEOUT if timeout is None else timeout),
            max_attempts=1,  # the next interval is the retry
            queue=DEFAULT_QUEUE,
            retry_backoff=DEFAULT_RETRY_BACKOFF,
        )
        # No size limit: fixed in code, and a limit could only make its module fail to import.
        args_json, kwargs_json = handler.serialise(args, kwargs)
        _register(handler)
        _recurring[name] = RecurringSchedule(
            name, run_every, _anchor(name, first_run_time), handler.timeout, args_json, kwargs_json
        )
        return handler

    return decorator


def reschedule_recurring(task_name: str, *, run_every: timedelta, first_run_time: Union[time, datetime, None],
                         timeout: timedelta, enabled: bool = True) -> None:
    """Change a registered recurring task's schedule (before a processor registers it):
    for procqueue's own clean-up, whose schedule is a setting, not code. `enabled=False`:
    this processor does not schedule it at all (neither registers the schedule nor
    enqueues its runs); its handler stays, for a run another processor enqueued."""
    schedule = _recurring[task_name]
    _recurring[task_name] = replace(schedule, run_every=_validated_run_every(task_name, run_every),
                                    first_run_at=_anchor(task_name, first_run_time),
                                    timeout=_validated_timeout(task_name, timeout))
    if enabled:
        _unscheduled.discard(task_name)
    else:
        _unscheduled.add(task_name)


def default_task_name(func: Callable[..., Any]) -> str:
    """Flagsmith's task identifier: the module's last component and the function's name
    (`myapp.tasks.send_email` -> `tasks.send_email`), so names, and dashboards filtering
    on them, carry over."""
    return f"{func.__module__.rsplit('.', 1)[-1]}.{func.__name__}"


def get_handler(task_name: str) -> Optional[TaskHandler]:
    return _handlers.get(task_name)


def registered_names() -> List[str]:
    return sorted(_handlers)


def registered_queues() -> List[str]:
    return sorted({handler.queue for handler in _handlers.values()})


def recurring_schedules() -> List[RecurringSchedule]:
    """The schedules this processor registers and runs."""
    return [_recurring[name] for name in sorted(_recurring) if name not in _unscheduled]


def unregister(task_names: Iterable[str]) -> None:
    """Forget handlers (tests register throwaway tasks)."""
    for name in task_names:
        _handlers.pop(name, None)
        _recurring.pop(name, None)
        _unscheduled.discard(name)


def _register(handler: TaskHandler) -> None:
    existing = _handlers.get(handler.task_name)
    if existing is not None and _func_identity(existing.func) != _func_identity(handler.func):
        raise TaskError(
            f"task name {handler.task_name!r} is already registered to "
            f"{_func_identity(existing.func)}; give one of them another task_name"
        )
    _handlers[handler.task_name] = handler
    _recurring.pop(handler.task_name, None)


def _func_identity(func: Callable[..., Any]) -> str:
    # Re-importing a module (e.g. `python -m module` plus an import) re-registers the same
    # function under a new object; same module and qualname means the same task.
    return f"{func.__module__}.{func.__qualname__}"


def _anchor(name: str, first_run_time: Union[time, datetime, None]) -> Optional[datetime]:
    if first_run_time is None:
        return None
    if isinstance(first_run_time, datetime):
        if first_run_time.tzinfo is None:
            raise TaskError(f"recurring task {name}: first_run_time datetime must be timezone-aware")
        return first_run_time
    if isinstance(first_run_time, time):
        # A fixed date, so every processor computes the same anchor and slots line up.
        return datetime.combine(datetime(2000, 1, 1).date(), first_run_time.replace(tzinfo=None), timezone.utc)
    raise TaskError(f"recurring task {name}: first_run_time must be a time or datetime, got {first_run_time!r}")


def _validated_queue_size(name: str, queue_size: Optional[int]) -> Optional[int]:
    if queue_size is not None and (not isinstance(queue_size, int) or queue_size < 0):
        raise TaskError(f"task {name}: queue_size must be an integer >= 0 or None, got {queue_size!r}")
    return queue_size or None  # 0 is no limit, as in Flagsmith (`if queue_size and ...`)


def _validated_run_every(name: str, run_every: timedelta) -> timedelta:
    if not isinstance(run_every, timedelta) or run_every <= timedelta(0):
        raise TaskError(f"recurring task {name}: run_every must be a positive timedelta, got {run_every!r}")
    return run_every


def _validated_timeout(name: str, timeout: timedelta) -> timedelta:
    if not isinstance(timeout, timedelta) or timeout <= timedelta(0):
        raise TaskError(f"task {name}: timeout must be a positive timedelta, got {timeout!r}")
    return timeout


def _validated_max_attempts(name: str, max_attempts: int) -> int:
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise TaskError(f"task {name}: max_attempts must be an integer >= 1, got {max_attempts!r}")
    return max_attempts


def _validated_retry_backoff(name: str, retry_backoff: timedelta) -> timedelta:
    # Checked here: a number slips through to the worker, which needs a timedelta only at
    # the task's first retry, and crashes there.
    if not isinstance(retry_backoff, timedelta) or retry_backoff < timedelta(0):
        raise TaskError(f"task {name}: retry_backoff must be a timedelta >= 0, got {retry_backoff!r}")
    return retry_backoff


def _validated_queue(name: str, queue: str) -> str:
    if not isinstance(queue, str) or not queue:
        raise TaskError(f"task {name}: queue must be a non-empty string, got {queue!r}")
    return queue
