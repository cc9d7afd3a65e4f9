"""Recording progress while the worker's main thread runs a task.

A worker records outcomes in batches, after a task ends. Without help, the outcomes of
the quick tasks before a slow (or wedged) one would wait for it to end: were the worker
killed meanwhile, they would be lost and those tasks run again. And the database would
not know that the slow one had started, so were its whole processor to die, the rescue
could not tell it from the tasks still waiting their turn. While the main thread runs
task code, the worker's own database connection sits idle; this thread borrows it for
that time only, records what has waited FLUSH_AFTER_SECONDS, and marks the task in hand
started once it has run that long; and once the batch has run that long, it puts back
the tasks claimed behind, for other workers to run meanwhile.

The connection passes between the two threads under one lock: the main thread lends it
just before a task starts and takes it back (waiting for a flush under way) as soon as
the task ends, so the two never use it at once. Should the connection break during the
loan (the database restarted, the backend was terminated), this thread opens a new one,
without holding the lock, and carries on with it: outcomes wait no longer for a broken
connection than the database takes to answer again.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, List, Optional, Protocol

from .db import Connection, is_connection_error
from .records import RunningTask
from .threads import start_deaf

# After a statement failed for its connection, a new one is opened this much later; after
# a failed attempt to open one, the next comes this much later.
RETRY_DELAY_SECONDS = 0.05
RECONNECT_DELAY_SECONDS = 0.5
# While tasks flow (a loan began within BUSY_SECONDS), this thread looks between loans
# this often instead of waiting to be notified by the next one; a task that starts just
# after a look is timed from the next, well within FLUSH_AFTER_SECONDS.
BETWEEN_TASKS_POLL_SECONDS = 0.05
BUSY_SECONDS = 1.0


class LendingWorker(Protocol):
    """What this thread uses of the worker that lends it its connection (worker.Worker),
    stated here so that this module does not import the worker, which imports it."""

    conn: Optional[Connection]
    pending: List[Any]  # outcomes not yet recorded
    pending_since: float
    current: Optional[RunningTask]  # the task whose code runs now
    waiting: List[Any]  # tasks claimed behind it, not yet begun
    batch_began: float  # when its batch started running

    def clock(self) -> float: ...

    def mark_started(self) -> None: ...

    def release_waiting(self) -> None: ...

    def flush(self) -> None: ...

    def open_connection(self) -> Connection: ...

    def replace_connection(self, conn: Connection) -> None: ...


class FlushDuringTasks:
    def __init__(self, worker: LendingWorker, flush_after_seconds: float) -> None:
        self.worker = worker
        self.flush_after_seconds = flush_after_seconds
        self.condition = threading.Condition(threading.Lock())
        self.lent = False  # the main thread is in task code: the connection is ours
        self.failed = False  # a flush failed during this loan: leave it to the main thread
        self.retry_at = 0.0  # after a failed reconnect, when to try again
        self.loan = 0  # counts loans: a reconnect that outlived its loan must not touch the next
        self.lent_at = float("-inf")  # when the last loan began
        self.waiting_for_work = True  # blocked with no deadline: needs a notify to look again
        self.thread = threading.Thread(target=self._run, name="procqueue-flush", daemon=True)

    def start(self) -> None:
        start_deaf(self.thread)

    @contextlib.contextmanager
    def connection_lent(self) -> Iterator[None]:
        """Around the running of one task's code."""
        try:
            with self.condition:
                self.lent, self.failed, self.retry_at = True, False, 0.0
                self.loan += 1
                self.lent_at = self.worker.clock()
                # Woken only when it sleeps with nothing to time: a notify per task would
                # cost a thread switch per task on a stream of quick ones.
                if self.waiting_for_work:
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
                wait = self._seconds_until_due()
                if wait is None:
                    self.waiting_for_work = True
                    self.condition.wait()
                    self.waiting_for_work = False
                elif wait > 0:
                    self.condition.wait(wait)
                else:
                    self._record_progress()

    def _seconds_until_due(self) -> Optional[float]:
        """How long until something is due (an outcome to record, the task in hand to mark
        started); None when there is nothing to time, or the connection is not ours."""
        worker = self.worker
        if self.failed:
            return None
        if not self.lent:
            # Between two tasks of a busy worker: look again shortly. Sleeping until the
            # next loan's notify would cost a thread switch per task on a stream of quick
            # ones (woken by it, this thread mostly finds that task over already).
            return BETWEEN_TASKS_POLL_SECONDS if worker.clock() - self.lent_at < BUSY_SECONDS else None
        if worker.clock() < self.retry_at:
            return self.retry_at - worker.clock()  # nothing can be done before then
        due = []
        if worker.pending:
            due.append(worker.pending_since + self.flush_after_seconds)
        current = worker.current
        if current is not None and not current.marked:
            due.append(current.began + self.flush_after_seconds)
        if worker.waiting:
            due.append(worker.batch_began + self.flush_after_seconds)
        return min(due) - worker.clock() if due else None

    def _record_progress(self) -> None:
        try:
            if self.worker.conn is None or self.worker.conn.closed:
                self._reconnect()
            self.worker.mark_started()
            self.worker.release_waiting()
            if self.worker.pending and self.worker.clock() - self.worker.pending_since >= self.flush_after_seconds:
                self.worker.flush()
        except ConnectionLost:
            self.retry_at = self.worker.clock() + RECONNECT_DELAY_SECONDS
        except BaseException as exc:  # noqa: B902 (the main thread meets the same error and handles it)
            if is_connection_error(exc) and self.lent:
                # Closed, not dropped: should the main thread get it back like this, its next
                # statement fails and it recovers as from any lost connection.
                self.worker.conn.close()
                self.retry_at = self.worker.clock() + RETRY_DELAY_SECONDS
            else:
                self.failed = True

    def _reconnect(self) -> None:
        """Open a new connection with the lock released (connecting may take seconds, and
        the main thread must get the connection back the moment its task ends); use it if
        the loan lasted, else leave the main thread to recover in its own way (by then it
        may have reconnected and lent its new connection for another task)."""
        loan = self.loan
        self.condition.release()
        try:
            conn = self.worker.open_connection()
        except BaseException as exc:  # noqa: B902 (any failure: try again shortly)
            conn = None
            failure = exc
        finally:
            self.condition.acquire()
        if conn is None:
            raise ConnectionLost(failure)
        if not self.lent or self.loan != loan:
            conn.close()
            raise ConnectionLost("the loan ended while connecting")
        self.worker.replace_connection(conn)


class ConnectionLost(Exception):
    """The flush thread could not get a working connection this time round."""
