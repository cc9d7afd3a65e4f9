"""The shared-memory board where workers publish liveness and the supervisor reads it.

One `WorkerSlot` per worker, allocated by the supervisor before it forks. While a worker
is in a slot, that worker is its only writer and the supervisor only reads; the
supervisor writes a slot only while no worker is in it (just before the fork, and after
reaping), so no lock is needed: every field is a naturally aligned 8-byte value, written
and read whole. Fields that are
judged together are written in an order that keeps every intermediate state healthy:
the heartbeat first, the state last when a task starts, first when it ends.

Times are `time.monotonic()`: on Linux one clock for every process, and immune to the
wall clock being stepped (an NTP jump must not look like every worker going silent).
"""

from __future__ import annotations

import ctypes
import enum
import time
from dataclasses import dataclass, replace
from typing import Callable


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
    from multiprocessing.sharedctypes import RawArray  # here: the health probe imports this module

    return RawArray(WorkerSlot, count)


def allocate_last_look():
    """A shared double (call before forking): when, on the monotonic clock (one for every
    process of the host), a worker of this processor last claimed. An idle processor
    looks for work nothing announced once per --sleepintervalms, whichever worker is idle
    then (worker.Worker.wait_for_work). Without a lock: a worker killed while holding one
    would leave the others waiting for ever, while two idle workers that both read an old
    value only look twice."""
    from multiprocessing.sharedctypes import RawValue

    return RawValue("d", float("-inf"))


def await_worker(slot: WorkerSlot, now: float) -> None:
    """The supervisor, about to fork a worker into the empty slot: its start-up is timed
    from now (the stuck rule judges a starting worker by its heartbeat)."""
    slot.heartbeat = now


def clear(slot: WorkerSlot) -> None:
    """The supervisor, after reaping the slot's worker: nothing runs in it."""
    slot.pid, slot.state, slot.task_id, slot.task_deadline = 0, int(WorkerState.EMPTY), 0, 0.0


class SlotWriter:
    """A worker's handle on its own slot. Built by the supervisor before the fork, which
    never writes through it: in the worker process, claim() comes first, and from then on
    the worker is the slot's only writer. (A worker run without a supervisor, in tests or
    an embedding program, writes to a slot of its own that no one reads.)"""

    def __init__(self, slot: WorkerSlot, clock: Callable[[], float] = time.monotonic) -> None:
        self.slot = slot
        self.clock = clock

    def claim(self, pid: int) -> None:
        self.slot.pid = pid
        self.slot.task_id = 0
        self.slot.task_deadline = 0.0
        self.set_state(WorkerState.STARTING)

    def beat(self) -> None:
        self.slot.heartbeat = self.clock()

    def set_state(self, state: WorkerState) -> None:
        self.slot.heartbeat = self.clock()
        self.slot.state = int(state)

    def task_started(self, task_id: int, timeout_seconds: float, task_name: str = "") -> None:
        now = self.clock()
        self.slot.task_name = task_name.encode("utf-8", "replace")[: TASK_NAME_BYTES - 1]
        self.slot.heartbeat = now
        self.slot.task_started = now
        self.slot.task_deadline = now + timeout_seconds
        self.slot.task_id = task_id
        self.slot.state = int(WorkerState.BUSY)

    def task_finished(self, failed: bool) -> None:
        self.slot.heartbeat = self.clock()
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
    tasks_done: int = 0  # by the slot's workers since the processor started
    whole: bool = True  # False: it changed under every reading (see read_slot)


# Reads that straddle a worker's writes are retried; its writes are a handful of stores,
# once per task, so a second reading nearly always comes out whole.
READ_ATTEMPTS = 20


def read_slot(slot: WorkerSlot) -> SlotView:
    """The slot's fields as one view: the task fields all of one task (its id read before
    and after them), and no busy state without them (a task ending between the reads).
    Decisions must come from one view (worker_fate.judge_view says why)."""
    for _ in range(READ_ATTEMPTS):
        task_id = slot.task_id
        view = SlotView(slot.pid, slot.state, slot.heartbeat, task_id, slot.task_started, slot.task_deadline,
                        slot.task_name.decode("utf-8", "replace"), slot.tasks_done)
        whole_task = view.state != WorkerState.BUSY or (task_id and view.task_started and view.task_deadline)
        if whole_task and slot.task_id == task_id:
            return view
    # A slot that changed under every reading belongs to a worker that is getting through
    # tasks: nothing in it is judged or shown as a task.
    return replace(view, whole=False)

