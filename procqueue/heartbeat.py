"""The shared-memory board where workers publish liveness and the supervisor reads it.

One `WorkerSlot` per worker, allocated by the supervisor before it forks. Each slot has
exactly one writer (its worker), and the supervisor only reads, so no lock is needed:
every field is a naturally aligned 8-byte value, written and read whole. Fields that are
judged together are written in an order that keeps every intermediate state healthy:
the heartbeat first, the state last when a task starts, first when it ends.

Times are `time.monotonic()`: on Linux one clock for every process, and immune to the
wall clock being stepped (an NTP jump must not look like every worker going silent).
"""

from __future__ import annotations

import ctypes
import enum
import multiprocessing
import time
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from . import health
from .records import RunOutcome


class WorkerState(enum.IntEnum):
    EMPTY = 0  # no process in the slot
    STARTING = 1
    IDLE = 2
    BUSY = 3
    STOPPING = 4


TASK_NAME_BYTES = 120


class WorkerSlot(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_int64),
        ("state", ctypes.c_int64),
        ("heartbeat", ctypes.c_double),  # monotonic time of the last beat
        ("task_id", ctypes.c_int64),  # 0 when idle
        ("task_started", ctypes.c_double),  # monotonic time the current task started; 0 idle
        ("task_deadline", ctypes.c_double),  # monotonic time by which the task must end; 0 idle
        ("tasks_done", ctypes.c_int64),
        ("tasks_failed", ctypes.c_int64),
        # Only for messages about the task (logged when the worker is killed); judged by
        # nobody, so a torn read of it costs a garbled log field at worst.
        ("task_name", ctypes.c_char * TASK_NAME_BYTES),
    ]


def allocate_slots(count: int):
    """A zeroed shared array of `count` slots (call before forking)."""
    return multiprocessing.RawArray(WorkerSlot, count)


class SlotWriter:
    """A worker's handle on its own slot."""

    def __init__(self, slot: Optional[WorkerSlot], pid: int) -> None:
        self.slot = slot
        if slot is not None:
            slot.pid = pid
            slot.task_id = 0
            slot.task_deadline = 0.0
            self.set_state(WorkerState.STARTING)

    def beat(self) -> None:
        if self.slot is not None:
            self.slot.heartbeat = time.monotonic()

    def set_state(self, state: WorkerState) -> None:
        if self.slot is not None:
            self.slot.heartbeat = time.monotonic()
            self.slot.state = int(state)

    def task_started(self, task_id: int, timeout_seconds: float, task_name: str = "") -> None:
        if self.slot is not None:
            now = time.monotonic()
            self.slot.task_name = task_name.encode("utf-8", "replace")[: TASK_NAME_BYTES - 1]
            self.slot.heartbeat = now
            self.slot.task_started = now
            self.slot.task_deadline = now + timeout_seconds
            self.slot.task_id = task_id
            self.slot.state = int(WorkerState.BUSY)

    def task_finished(self, failed: bool) -> None:
        if self.slot is not None:
            self.slot.heartbeat = time.monotonic()
            self.slot.state = int(WorkerState.IDLE)
            self.slot.task_deadline = 0.0
            self.slot.task_started = 0.0
            self.slot.task_id = 0
            self.slot.tasks_done += 1
            if failed:
                self.slot.tasks_failed += 1


@dataclass(frozen=True)
class SlotView:
    """One consistent reading of a slot its worker may be writing meanwhile."""

    pid: int
    state: int
    heartbeat: float
    task_id: int
    task_started: float
    task_deadline: float
    task_name: str
    whole: bool = True  # False: it changed under every reading (see read_slot)


# Reads that straddle a worker's writes are retried; its writes are a handful of stores,
# once per task, so a second reading nearly always comes out whole.
READ_ATTEMPTS = 20


def read_slot(slot: WorkerSlot) -> SlotView:
    """The slot's fields as one view: the task fields all of one task (its id read before
    and after them), and no busy state without them (a task ending between the reads).
    Decisions must come from one view: read field by field, a deadline read as set and
    then as the 0.0 of a task that just ended made a worker look its whole uptime overdue."""
    for _ in range(READ_ATTEMPTS):
        task_id = slot.task_id
        view = SlotView(slot.pid, slot.state, slot.heartbeat, task_id, slot.task_started, slot.task_deadline,
                        slot.task_name.decode("utf-8", "replace"))
        whole_task = view.state != WorkerState.BUSY or (task_id and view.task_started and view.task_deadline)
        if whole_task and slot.task_id == task_id:
            return view
    # A slot that changed under every reading belongs to a worker that is getting through
    # tasks: nothing in it is judged or shown as a task.
    return replace(view, whole=False)


def stuck_reason(view: SlotView, now: float, grace_seconds: float) -> Optional[Tuple[RunOutcome, str]]:
    """Why the worker seen in `view` counts as stuck, and what its task's run is then
    recorded as; None when it is fine. The rule is health.stuck_reason, shared with the probe."""
    if view.pid == 0 or view.state == WorkerState.EMPTY or not view.whole:
        return None
    busy = view.state == WorkerState.BUSY
    reason = health.stuck_reason(
        busy=busy,
        silent_seconds=now - view.heartbeat if view.heartbeat else 0.0,
        overdue_seconds=now - view.task_deadline if busy and view.task_deadline else 0.0,
        task_id=view.task_id,
        grace_seconds=grace_seconds,
    )
    if reason is None:
        return None
    return (RunOutcome.TIMED_OUT if busy else RunOutcome.LOST), f"{reason}; worker killed"
