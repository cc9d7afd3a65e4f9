"""A self-pipe: how a signal handler wakes a loop blocked in select() without doing work."""

from __future__ import annotations

import os


class SelfPipe:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        """Safe from a signal handler: one non-blocking write, a full pipe is fine."""
        try:
            os.write(self.write_fd, b"!")
        except OSError:
            pass

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        """Idempotent: a second close must not close whatever reused these numbers."""
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.read_fd = self.write_fd = -1
