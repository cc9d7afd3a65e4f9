"""Helper threads of a worker process, which must never receive its signals."""

from __future__ import annotations

import signal
import threading


def start_deaf(thread: threading.Thread) -> None:
    """Start `thread` with every signal blocked. Signals must keep going to the main
    thread alone: a task that blocks one there (as C libraries do) would otherwise have it
    delivered to a helper thread instead, which wakes the task's sleep and changes who
    stops it. A thread inherits its creator's signal mask, so it is born deaf."""
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
