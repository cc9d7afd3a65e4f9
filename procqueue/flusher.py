"""Recording a batch's finished outcomes while a later task of the batch runs.

A worker records outcomes in batches, after a task ends. Without help, the outcomes of
the quick tasks before a slow (or wedged) one would wait for it to end: were the worker
killed meanwhile, they would be lost and those tasks run again. While the main thread
runs task code, the worker's own database connection sits idle; this thread borrows it
for that time only, and records what has waited FLUSH_AFTER_SECONDS.

The connection passes between the two threads under one lock: the main thread lends it
just before a task starts and takes it back (waiting for a flush under way) as soon as
the task ends, so the two never use it at once.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Iterator

from .threads import start_deaf

if TYPE_CHECKING:
    from .worker import Worker


class FlushDuringTasks:
    def __init__(self, worker: "Worker", flush_after_seconds: float) -> None:
        self.worker = worker
        self.flush_after_seconds = flush_after_seconds
        self.condition = threading.Condition(threading.Lock())
        self.lent = False  # the main thread is in task code: the connection is ours
        self.failed = False  # a flush failed during this loan: leave it to the main thread
        self.waiting_for_work = True  # blocked with no deadline: needs a notify to look again
        self.thread = threading.Thread(target=self._run, name="procqueue-flush", daemon=True)

    def start(self) -> None:
        start_deaf(self.thread)

    @contextlib.contextmanager
    def connection_lent(self) -> Iterator[None]:
        """Around the running of one task's code."""
        try:
            with self.condition:
                self.lent, self.failed = True, False
                # Woken only when it has something to time: a notify per task would cost
                # a thread switch per task on a stream of quick ones.
                if self.waiting_for_work and self.worker.pending:
                    self.condition.notify()
            yield
        finally:
            self._take_back()

    def _take_back(self) -> None:
        # An exception a signal handler raises (the orphan interrupt) may land while this
        # waits for the lock; the connection must come back all the same, then it goes on.
        interrupted = None
        while True:
            try:
                with self.condition:
                    self.lent = False
                break
            except BaseException as exc:  # noqa: B902 (re-raised below)
                interrupted = exc
        if interrupted is not None:
            raise interrupted

    def _run(self) -> None:
        with self.condition:
            while True:
                if not self.lent or self.failed or not self.worker.pending:
                    self.waiting_for_work = True
                    self.condition.wait()
                    self.waiting_for_work = False
                    continue
                wait = self.worker.pending_since + self.flush_after_seconds - self.worker.clock()
                if wait > 0:
                    self.condition.wait(wait)
                    continue
                try:
                    self.worker.flush()
                except BaseException:  # noqa: B902 (the main thread meets the same error and handles it)
                    self.failed = True
