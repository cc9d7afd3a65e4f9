"""The shared-memory board where workers publish liveness and the supervisor reads it.

One `WorkerSlot` per worker, allocated by the supervisor before it forks. Each slot has
exactly one writer (its worker), and the supervisor only reads, so no lock is needed:
every field is a naturally aligned 8-byte value, written and read whole.
"""

from __future__ import annotations

import ctypes
import enum
import multiprocessing
import time
from typing import Optional


class WorkerState(enum.IntEnum):
    EMPTY = 0  # no process in the slot
    STARTING = 1
    IDLE = 2
    BUSY = 3
    STOPPING = 4


class WorkerSlot(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_int64),
        ("state", ctypes.c_int64),
        ("heartbeat", ctypes.c_double),  # time.time() of the last beat
        ("task_id", ctypes.c_int64),  # 0 when idle
        ("task_deadline", ctypes.c_double),  # time.time() by which the task must end; 0 idle
        ("tasks_done", ctypes.c_int64),
        ("tasks_failed", ctypes.c_int64),
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
            self.slot.heartbeat = time.time()

    def set_state(self, state: WorkerState) -> None:
        if self.slot is not None:
            self.slot.state = int(state)
            self.slot.heartbeat = time.time()

    def task_started(self, task_id: int, timeout_seconds: float) -> None:
        if self.slot is not None:
            now = time.time()
            self.slot.task_id = task_id
            self.slot.task_deadline = now + timeout_seconds
            self.slot.state = int(WorkerState.BUSY)
            self.slot.heartbeat = now

    def task_finished(self, failed: bool) -> None:
        if self.slot is not None:
            self.slot.task_id = 0
            self.slot.task_deadline = 0.0
            self.slot.tasks_done += 1
            if failed:
                self.slot.tasks_failed += 1
            self.slot.heartbeat = time.time()
