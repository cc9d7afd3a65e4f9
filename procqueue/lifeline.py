"""How a worker learns that its supervisor died, even while a task sits in C code.

The kernel's death signal (PR_SET_PDEATHSIG) runs a Python handler, and Python runs
handlers only between bytecodes: a task waiting inside a C library (a long SQL statement
in libpq, which retries its poll() on EINTR) never lets it run. So the supervisor also
holds the write end of a pipe that nobody writes to; each worker closes its inherited
copy of that end at once and keeps a thread blocked reading the other. The read returns
end-of-file the moment the last writer, the supervisor, is gone, however it died; the
thread, which needs only the GIL that such a call has released, then starts the
worker's orphan clock (see Worker.orphaned).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable

from .threads import start_deaf


class Lifeline:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()

    def hold_in_child(self) -> int:
        """In a freshly forked worker: give up the write end, keep the read end."""
        os.close(self.write_fd)
        return self.read_fd

    def close(self) -> None:
        """Idempotent: a second close must not close whatever reused these numbers."""
        for fd in (self.write_fd, self.read_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.read_fd = self.write_fd = -1


def watch(read_fd: int, on_supervisor_gone: Callable[[], None]) -> threading.Thread:
    """Call `on_supervisor_gone` from a daemon thread when the pipe reaches end-of-file."""

    def wait_for_end_of_file() -> None:
        try:
            while os.read(read_fd, 1):  # nobody writes; a byte would be a stray, ignore it
                pass
        except OSError:
            return  # the descriptor was closed under us: the worker is leaving anyway
        on_supervisor_gone()

    thread = threading.Thread(target=wait_for_end_of_file, name="procqueue-lifeline", daemon=True)
    start_deaf(thread)
    return thread
