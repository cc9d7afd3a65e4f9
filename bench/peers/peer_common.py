"""What every system's side of the peers benchmark shares: the task body and its marks.

Runs in the benchmark's own virtualenv (bench/peers.py makes it), inside each system's
workers and enqueuers. The task is the same everywhere: optionally wait `work_ms` (as a
task waiting on I/O would: time.sleep, or asyncio.sleep in an async system), and, when it
carries `t0` (the wall time just before its enqueue call), append its pickup delay to
PEER_PICKUP_FILE. Systems the harness cannot count in SQL (Celery) also mark each task
done in PEER_DONE_FILE, one byte per task.
"""

from __future__ import annotations

import os
import time
from typing import Optional

_files = {}


def _append(variable: str, text: str) -> None:
    path = os.environ.get(variable)
    if not path:
        return
    handle = _files.get(variable)
    if handle is None:  # one descriptor per process; O_APPEND keeps lines whole across processes
        handle = _files[variable] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(handle, text.encode())


def picked_up(t0: Optional[float]) -> None:
    if t0 is not None:
        _append("PEER_PICKUP_FILE", f"{time.time() - t0:.6f}\n")


def done() -> None:
    _append("PEER_DONE_FILE", ".")


def sleep_seconds(work_ms: float) -> float:
    return work_ms / 1000.0
