"""The worker loop: claim a batch, run it, record the outcomes, wait for more.

`Worker.step()` is one iteration, callable from a test in-process; `Worker.loop()` repeats
it until asked to stop and survives a lost database connection. Forking, signals and
process exit belong to the supervisor; this module never calls `os.fork` or `os._exit`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import select
import time
import traceback
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Callable, Dict, List, Optional, Set

import psutil
import psycopg2
import psycopg2.errors

from . import registry
from .claim_size import cap_for_recycling, next_claim_size
from .config import ProcessorConfig
from .db import Connection, connect, first_line, is_connection_error
from .errors import DatabaseError
from .execution import SupervisorGoneError, execute, soft_timeout, utcnow
from .flusher import FlushDuringTasks
from .heartbeat import SlotWriter, WorkerSlot, WorkerState, allocate_last_look
from .logs import OutputWatch, log_event, log_recurring_disabled
from .metrics import TaskMetrics, result_label
from .process_tree import boot_clock, reap_exited_children, stop_descendants
from .queries import Queries
from .selfpipe import SelfPipe
from .records import ClaimedTask, RunOutcome, RunningTask, TaskOutcome, TaskState

logger = logging.getLogger("procqueue.worker")

# Outcomes are written in batches, but never held longer than this while a batch of slow
# tasks runs (in the worker process, FlushDuringTasks records them during a long task): a
# crash loses at most this much bookkeeping, and the run history stays fresh. A task that
# has run this long is also marked started in the database (so a rescue after its whole
# processor died knows it had started), and its outcome is recorded the moment it ends.
FLUSH_AFTER_SECONDS = 0.2
# A recurring run due while the previous slot's run is still under way waits this long
# before trying again (until its own slot ends: then it is missed): short, so that it
# starts soon after the previous run ends, also when little of its slot is left.
RECURRING_BUSY_RETRY_SECONDS = 0.25
# A worker checks for due recurring schedules when the earliest is due, but at least this
# often (another processor may have registered an earlier one) and at most this often
# (a due schedule another processor holds the lock on is retried soon).
RECURRING_CHECK_MAX_SECONDS = 30.0
RECURRING_CHECK_MIN_SECONDS = 0.5
# An idle worker beats at least this often, however long --sleepintervalms is.
IDLE_BEAT_SECONDS = 1.0
# Idle workers' looks for unannounced work fall due this far apart, by worker index: the
# first one's claim, seen by the others as they wake, spares them theirs.
IDLE_LOOK_STAGGER_SECONDS = 0.005
RECONNECT_BACKOFF_SECONDS = (0.5, 1, 2, 4, 8)
# How long before faulthandler ends an orphaned worker its task's processes are killed.
ORPHAN_CLEANUP_LEAD_SECONDS = 0.25


@dataclass(frozen=True)
class Start:
    """Whether a claimed task may run now, and when the database recorded its start (if
    it had to know before the task's function is called)."""

    allowed: bool
    recorded_at: Optional[datetime]


class Worker:
    def __init__(
        self,
        config: ProcessorConfig,
        *,
        processor_id: str,
        index: int,
        slot=None,
        last_look=None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.processor_id = processor_id
        self.index = index
        self.clock = clock
        self.queries = Queries(config.database.schema, prepare=config.database.pooler.keeps_sessions)
        # Without a supervisor (tests, an embedding program) a slot of its own, read by no one.
        self.slot_writer = SlotWriter(slot if slot is not None else WorkerSlot(), clock)
        self.conn: Optional[Connection] = None
        self.pending: List[TaskOutcome] = []
        self.leases: Dict[int, datetime] = {}  # task id -> leased_at of the claim that holds it
        self.claim_size = config.queue_pop_size  # grows and shrinks with how quick tasks are (claim_size)
        self.waiting: List[ClaimedTask] = []  # claimed, not yet begun, in the order they run
        self.batch_began = 0.0  # when the batch they belong to started running
        # A put-back whose reply was lost may have committed: the tasks behind it are then
        # each checked in the database before they start (begin).
        self.lease_in_doubt = False
        self.pending_since = 0.0
        self.current: Optional[RunningTask] = None  # the task in hand, for the flush thread
        self.in_hand: Optional[RunningTask] = None  # ... until its processes are seen to (after_task)
        self.stopping = False
        self.wakeup: Optional[SelfPipe] = None  # set in the worker process: signals write to it
        # Only schedules this processor would run: one that serves other queues must not
        # enqueue a task per interval that nobody here will ever claim.
        self.recurring_names = [
            s.task_name for s in registry.recurring_schedules()
            if not config.queues or registry.get_handler(s.task_name).queue in config.queues
        ]
        self.next_recurring_check = 0.0
        # When a worker of this processor last claimed (heartbeat.allocate_last_look):
        # shared with the others under a supervisor, else this worker's own.
        self.last_look = last_look if last_look is not None else allocate_last_look()
        self.unprompted = True  # the next claim is a look of our own, not an answer to a NOTIFY
        self.connection_failures = 0
        self.parent_pid = os.getppid()
        self.tasks_run = 0
        self.recycle_reason: Optional[str] = None
        self.outputs = OutputWatch()  # the supervisor's, inherited at fork
        self.output_lost: Optional[str] = None
        self.orphaned_at: Optional[float] = None
        self.orphan_logged = False
        self.metrics = TaskMetrics()
        self.flusher: Optional[FlushDuringTasks] = None  # started in the worker process

    # -- lifecycle ---------------------------------------------------------------------

    def bind_process(self) -> None:
        """Called first thing in the forked worker process: claim the slot as this pid,
        and remember the supervisor, whose death this worker must not outlive."""
        self.parent_pid = os.getppid()
        self.slot_writer.claim(os.getpid())

    def loop(self) -> None:
        """Run steps until `request_stop()`; a database outage only pauses the loop."""
        log_event(logger, logging.INFO, "worker.started", worker=self.index, pid=os.getpid())
        while not self.stopping:
            try:
                self.step()
                self.connection_failures = 0
                self.check_output()
            except (psycopg2.Error, DatabaseError) as exc:
                self._pause_and_reconnect("worker.database_error", logging.WARNING, error=first_line(exc))
            except Exception as exc:  # a bug of ours must not kill a worker holding leases
                self._pause_and_reconnect("worker.error", logging.ERROR, error=repr(exc),
                                          traceback=traceback.format_exc())
        self.shutdown()

    def request_stop(self) -> None:
        """Finish the task in hand, record it, release the rest, and leave the loop."""
        self.stopping = True

    def orphaned(self) -> None:
        """The supervisor died (the kernel told us: PR_SET_PDEATHSIG). Its heartbeat has
        stopped, and peers rescue its tasks once the heartbeat is --rescue-after old, which
        is as early as 3/4 of --rescue-after from now: the task in hand must be over
        before that, or it would run twice at once. So it gets a quarter to finish, then is
        interrupted and put back; and should it not return to the interpreter (C code),
        faulthandler's own thread, which needs no GIL, dumps the stack and ends the
        process at half (just before, the lifeline thread kills what the task started:
        see lifeline_cut). Called from the death-signal handler and from the lifeline
        thread: sets flags and timers only."""
        if self.orphaned_at is not None:
            return
        self.orphaned_at = self.clock()
        self.stopping = True
        window = self.config.rescue_after_seconds
        soft_timeout.interrupt_within(window / 4, SupervisorGoneError)
        faulthandler.dump_traceback_later(window / 2, exit=True)

    def lifeline_cut(self) -> None:
        """The lifeline thread's last duty: the supervisor is gone; should this worker
        still be here just before faulthandler ends it, kill what its task started, which
        would otherwise outlive it. (That needs the GIL, which C code waiting on I/O has
        released; C code holding it keeps them alive, as it keeps the worker.)"""
        self.supervisor_gone()
        exit_at = self.orphaned_at + self.config.rescue_after_seconds / 2 - ORPHAN_CLEANUP_LEAD_SECONDS
        time.sleep(max(0.0, exit_at - self.clock()))
        running = self.in_hand
        if running is not None:
            stop_descendants(running.began_boot, grace_seconds=0.0)

    def supervisor_gone(self) -> None:
        """The lifeline thread saw the supervisor die (or the loop saw a new parent pid):
        start the orphan clock, wake the loop should it be waiting, and say so once. The
        clock goes first: logging takes locks that the task's thread may be holding."""
        self.orphaned()
        if self.wakeup is not None:
            self.wakeup.wake()
        if self.orphan_logged:
            return
        self.orphan_logged = True
        log_event(logger, logging.WARNING, "worker.orphaned", worker=self.index)

    def shutdown(self) -> None:
        self.slot_writer.set_state(WorkerState.STOPPING)
        try:
            self.ensure_connected()
            self.flush()
            self._release_unstarted()
        except (psycopg2.Error, DatabaseError) as exc:
            # The supervisor releases whatever this worker still holds once it has exited.
            log_event(logger, logging.WARNING, "worker.shutdown_incomplete", worker=self.index, error=first_line(exc))
        self.close()
        log_event(logger, logging.INFO, "worker.stopped", worker=self.index, pid=os.getpid(),
                  reason=self.recycle_reason or "asked to stop")

    def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close()
        self.conn = None

    def flush_during_tasks(self) -> None:
        """Record finished outcomes from a thread while a later task runs (see flusher)."""
        self.flusher = FlushDuringTasks(self, FLUSH_AFTER_SECONDS)
        self.flusher.start()

    # -- one iteration -----------------------------------------------------------------

    def step(self) -> int:
        """Claim and run one batch, or wait for work. Returns how many tasks ran."""
        self.ensure_connected()
        self.slot_writer.beat()
        if os.getppid() != self.parent_pid:
            # The supervisor is gone: nobody would enforce timeouts or release our leases.
            self.supervisor_gone()
            return 0
        self.schedule_recurring_if_due()
        tasks = self.claim()
        if not tasks:
            self.claim_size = self.config.queue_pop_size  # idle: the next flood starts small
            self.flush()
            self.wait_for_work()
            return 0
        self.waiting = list(tasks)
        self.batch_began = self.clock()
        ran = 0
        while self.waiting and not self.stopping:
            self.release_waiting()  # once the batch has run long, the rest goes back
            if self.waiting and self.run_one(self.waiting.pop(0)) is not None:
                ran += 1
        self.claim_size = next_claim_size(current=self.claim_size, pop_size=self.config.queue_pop_size,
                                          claimed=len(tasks), ran=ran, seconds=self.clock() - self.batch_began)
        self.lease_in_doubt = False
        self.flush()
        if self.stopping:
            self._release_unstarted()
        return ran

    def claim(self) -> List[ClaimedTask]:
        # Any NOTIFY that arrived before this claim is answered by it.
        self.conn.notifies.clear()
        limit = cap_for_recycling(self.claim_size, self._tasks_left())
        tasks = self.queries.claim(
            self.conn, processor=self.processor_id, worker=self.index, limit=limit, queues=self.config.queues)
        self.last_look.value = self.clock()  # whatever woke it, a claim finds all that is due
        self.leases.update((task.id, task.leased_at) for task in tasks)
        if self.unprompted and len(tasks) == self.claim_size:
            self.queries.announce(self.conn)  # nothing told the others: there may be more for them
        self.unprompted = False
        return tasks

    def _tasks_left(self) -> Optional[int]:
        limit = self.config.max_tasks_per_worker
        return None if limit is None else limit - self.tasks_run

    def run_one(self, task: ClaimedTask) -> Optional[TaskOutcome]:
        """Run one claimed task and queue its outcome; None when it was not run after all
        (a recurring run whose slot passed, or whose previous run is still under way)."""
        start = self.begin(task)
        if not start.allowed:
            return None
        self.slot_writer.task_started(task.id, task.timeout_seconds, task.task_name)
        running = self.current = self.in_hand = RunningTask(
            task, self.clock(), start.recorded_at or utcnow(), boot_clock(), marked=start.recorded_at is not None)
        with self.flusher.connection_lent() if self.flusher is not None else contextlib.nullcontext():
            outcome = execute(task, started=start.recorded_at,
                              backoff_delay_seconds=self.config.backoff_default_delay_seconds)
            # Shown as ended before the connection is taken back, which waits for a flush
            # under way: a flush stalled on a lock must not leave a finished task showing
            # as running to its deadline, to be killed and charged a timeout it never had.
            self.slot_writer.task_finished(failed=outcome.outcome is not RunOutcome.SUCCEEDED)
        self.current = None
        self.slot_writer.set_state(WorkerState.IDLE)
        self.tasks_run += 1
        self.record_metrics(task, outcome)
        self.check_recycling()
        if not self.pending:
            self.pending_since = self.clock()
        self.pending.append(outcome)
        self._log_outcome(task, outcome)
        try:
            # Recorded at once: a recurring run (were this worker to die before the batch's
            # flush, the slot would count as lost), and a task that ran long or was marked
            # started (one more round trip is nothing next to its run, and its outcome is
            # not left to the flush window).
            ran_long = self.clock() - running.began >= FLUSH_AFTER_SECONDS or running.marked
            if ran_long or task.recurring_slot is not None or self.clock() - self.pending_since >= FLUSH_AFTER_SECONDS:
                self.flush()
        finally:  # its processes stopped even when the database did not take the outcome
            self.after_task(outcome, running)
        return outcome

    def begin(self, task: ClaimedTask) -> "Start":
        """Before a task's function is called: the database is told it started when that
        cannot wait for the flush thread. A recurring run, which never starts twice; and a
        task a rescue put back before (its node died while it was claimed), which may be
        what kills nodes: told at once, a run that takes its node down within the flush
        thread's 0.2 s still counts towards failing it."""
        if task.recurring_slot is not None:
            recorded_at = self.begin_recurring_run(task)
            return Start(recorded_at is not None, recorded_at)
        if not task.rescues and not self.lease_in_doubt:
            return Start(True, None)
        recorded_at = self.queries.start_run(self.conn, processor=self.processor_id, worker=self.index, task=task)
        if recorded_at is None:  # taken back meanwhile (this worker was thought dead): not ours to run
            self.leases.pop(task.id, None)
            log_event(logger, logging.WARNING, "task.lease_lost", task_id=task.id, worker=self.index)
        return Start(recorded_at is not None, recorded_at)

    def begin_recurring_run(self, task: ClaimedTask) -> Optional[datetime]:
        """Mark a recurring run started in the database before its function is called: from
        then on it never starts again, whatever dies (a recurring slot runs at most once).
        Returns the start as the database recorded it, or None, having put the task back,
        when it may not start: its slot has passed (it is then missed), or another run of
        the same task is under way (it tries again shortly, while its slot lasts)."""
        try:
            started_at = self.queries.start_run(self.conn, processor=self.processor_id, worker=self.index, task=task)
        except psycopg2.errors.UniqueViolation:
            self._put_back(task, RECURRING_BUSY_RETRY_SECONDS)
            log_event(logger, logging.DEBUG, "recurring.waiting", task_id=task.id, task=task.task_name,
                      worker=self.index, reason="the previous slot's run is still under way")
            return None
        if started_at is None:
            if self._put_back(task, 0.0):
                log_event(logger, logging.INFO, "recurring.not_started", task_id=task.id, task=task.task_name,
                          worker=self.index, reason="its slot passed before it could start")
            else:
                log_event(logger, logging.WARNING, "task.lease_lost", task_id=task.id, worker=self.index)
        return started_at

    def _put_back(self, task: ClaimedTask, delay_seconds: float) -> bool:
        """False when the task was no longer ours to put back."""
        self.leases.pop(task.id, None)
        return self.queries.put_back(self.conn, processor=self.processor_id, worker=self.index, task=task,
                                     delay_seconds=delay_seconds)

    def mark_started(self) -> None:
        """From the flush thread, with the connection lent: tell the database the task in
        hand has started, once it has run FLUSH_AFTER_SECONDS (a quick task never costs
        the write; its outcome, recorded soon after, says the same)."""
        current = self.current
        if current is None or current.marked or self.clock() - current.began < FLUSH_AFTER_SECONDS:
            return
        self.queries.start_run(self.conn, processor=self.processor_id, worker=self.index, task=current.task,
                               started_at=current.started_at)
        current.marked = True

    def release_waiting(self) -> None:
        """Once the batch has run FLUSH_AFTER_SECONDS, its tasks not yet begun go back to
        the queue, for other workers (woken by the statement's NOTIFY) to run now rather
        than after the rest of it: however slow its tasks turn out, a claim holds the ones
        behind for at most that long. Called between tasks by the loop, and during a task
        by the flush thread (with the connection lent)."""
        if not self.waiting or self.clock() - self.batch_began < FLUSH_AFTER_SECONDS:
            return
        waiting = self.waiting
        try:
            released = self.queries.put_back_unstarted(self.conn, processor=self.processor_id, worker=self.index,
                                                       tasks=waiting)
        except BaseException:
            self.lease_in_doubt = True  # it may have committed all the same
            raise
        self.waiting = []
        for task in waiting:  # put back now or, by an attempt whose reply was lost, before
            self.leases.pop(task.id, None)
        log_event(logger, logging.DEBUG, "batch.released", worker=self.index, count=len(released))

    def after_task(self, outcome: TaskOutcome, running: RunningTask) -> None:
        """A task interrupted (its timeout, its supervisor's death) had no chance to stop
        the processes it started: they are stopped with it, once its outcome is safe (what
        earlier tasks left running is not its). Any child that exited is reaped."""
        if outcome.outcome in (RunOutcome.TIMED_OUT, RunOutcome.LOST):
            stopped = stop_descendants(running.began_boot)
            if stopped:
                log_event(logger, logging.WARNING, "task.processes_stopped", task_id=outcome.task_id,
                          worker=self.index, count=stopped)
        self.in_hand = None
        reap_exited_children()

    def record_metrics(self, task: ClaimedTask, outcome: TaskOutcome) -> None:
        recurring = task.recurring_slot is not None
        duration = (outcome.finished_at - outcome.started_at).total_seconds()
        self.metrics.run_started(task.task_name, task.queue, (outcome.started_at - task.run_at).total_seconds())
        self.metrics.run_finished(task.task_name, recurring, result_label(outcome.outcome, outcome.state), duration)
        if outcome.state is TaskState.MISSED:
            self.metrics.slots_missed(task.task_name)

    def check_recycling(self) -> None:
        """Past --max-tasks-per-worker or --max-memory-per-worker, finish up and leave: the
        supervisor forks a fresh worker (as Celery's max_tasks_per_child, gunicorn's
        max_requests), which is how a leak in task code stays bounded."""
        limit = self.config.max_tasks_per_worker
        if limit is not None and self.tasks_run >= limit:
            self.recycle(f"ran {self.tasks_run} tasks (--max-tasks-per-worker {limit})")
            return
        limit_mb = self.config.max_memory_per_worker_mb
        if limit_mb is not None:
            rss_mb = psutil.Process().memory_info().rss / 2**20
            if rss_mb > limit_mb:
                self.recycle(f"RSS {rss_mb:.0f} MB (--max-memory-per-worker {limit_mb})")

    def check_output(self) -> None:
        """Between batches: a task that closed or replaced stdout or stderr has silenced
        every later log line of this worker. It leaves to be replaced by one with the
        supervisor's output (the supervisor says why: this worker's own line would be lost)."""
        problem = self.outputs.problem()
        if problem is not None and self.output_lost is None:
            self.output_lost = problem
            self.recycle(problem)

    def recycle(self, reason: str) -> None:
        self.recycle_reason = reason
        self.request_stop()

    def flush(self) -> None:
        """Record every pending outcome in one statement."""
        if not self.pending:
            return
        try:
            moved = self._complete(self.pending)
        except (psycopg2.Error, ValueError) as exc:  # ValueError: text psycopg2 cannot send
            if is_connection_error(exc):
                raise  # kept pending; recorded after reconnecting, the lease is still ours
            moved = self._complete_one_by_one(self.pending)
        for outcome in self.pending:
            if outcome.task_id not in moved:
                # Someone took the lease away (the task was rescued as lost): its new
                # state stands, and this outcome is dropped rather than overwrite it.
                log_event(logger, logging.WARNING, "task.lease_lost", task_id=outcome.task_id, worker=self.index)
            del self.leases[outcome.task_id]
        self.pending = []

    def _complete(self, outcomes: List[TaskOutcome]) -> Set[int]:
        recorded = self.queries.complete(self.conn, processor=self.processor_id, worker=self.index,
                                         outcomes=outcomes, leases=self.leases)
        for name, failures in recorded.disabled.items():
            self.metrics.recurring_disabled(name)
            log_recurring_disabled(logger, name, failures, worker=self.index)
        return recorded.moved

    def _complete_one_by_one(self, outcomes: List[TaskOutcome]) -> Set[int]:
        """The batch was refused for its data: record each alone, so one bad outcome cannot
        block the others or, retried for ever, the worker."""
        moved: Set[int] = set()
        for outcome in outcomes:
            try:
                moved |= self._complete([outcome])
            except (psycopg2.Error, ValueError) as exc:
                if is_connection_error(exc):
                    raise
                log_event(logger, logging.ERROR, "task.outcome_unrecordable", task_id=outcome.task_id,
                          error=first_line(exc))
                moved |= self._complete([replace(outcome, error=f"outcome could not be recorded: {exc!r}"[:2000])])
        return moved

    def schedule_recurring_if_due(self) -> None:
        if not self.recurring_names or self.clock() < self.next_recurring_check:
            return
        for run in self.queries.schedule_recurring(self.conn, self.recurring_names):
            if run.task_id is not None:
                log_event(logger, logging.DEBUG, "recurring.enqueued", task_id=run.task_id, task=run.task_name,
                          slot=run.slot.isoformat(), worker=self.index)
            if run.skipped_slots:
                self.metrics.slots_missed(run.task_name, run.skipped_slots)
                log_event(logger, logging.WARNING, "recurring.slots_skipped", task=run.task_name,
                          count=run.skipped_slots, worker=self.index,
                          note="no processor ran them in time; they are skipped, not run late")
        due_in = self.queries.seconds_until_next_recurring(self.conn, self.recurring_names)
        due_in = RECURRING_CHECK_MAX_SECONDS if due_in is None else due_in
        self.next_recurring_check = self.clock() + min(max(due_in, RECURRING_CHECK_MIN_SECONDS),
                                                       RECURRING_CHECK_MAX_SECONDS)

    def wait_for_work(self) -> None:
        """Sleep until a NOTIFY, a stop request, a due recurring check, or until no worker of
        this processor has claimed for --sleepintervalms (then this one looks for work
        nothing announced), beating at least every IDLE_BEAT_SECONDS. The last claim is
        read afresh on every wake-up; idle workers' deadlines are staggered by index, so
        the first to wake looks and the others, finding its claim, sleep on."""
        self.slot_writer.set_state(WorkerState.IDLE)
        interval = self.config.sleep_interval_ms / 1000
        while not self.stopping:
            deadline = self.last_look.value + interval + self.index * IDLE_LOOK_STAGGER_SECONDS
            if self.recurring_names:
                deadline = min(deadline, self.next_recurring_check)
            remaining = deadline - self.clock()
            if remaining <= 0:
                self.unprompted = True
                return
            if self._wait_readable(min(remaining, IDLE_BEAT_SECONDS)):
                return
            self.slot_writer.beat()
            reap_exited_children()  # what a finished task left running may have exited since

    # -- helpers -----------------------------------------------------------------------

    def _wait_readable(self, timeout: float) -> bool:
        """Wait on the LISTEN connection and the wake-up pipe; True when there is news."""
        if self.conn.notifies:  # read along with an earlier statement's reply
            self.conn.notifies.clear()
            return True
        watched = [self.conn] + ([self.wakeup.read_fd] if self.wakeup is not None else [])
        try:
            readable, _, _ = select.select(watched, [], [], timeout)
        except InterruptedError:
            return True
        if self.wakeup is not None and self.wakeup.read_fd in readable:
            self.wakeup.drain()
        if self.conn in readable:
            self.conn.poll()
            had_news = bool(self.conn.notifies)
            self.conn.notifies.clear()
            return had_news or self.stopping
        return self.stopping

    def ensure_connected(self) -> None:
        if self.conn is not None and not self.conn.closed:
            return
        self.conn = self.open_connection()
        if self.connection_failures:
            self.recover_leases()
            log_event(logger, logging.INFO, "worker.reconnected", worker=self.index)

    def open_connection(self) -> Connection:
        """A new connection, listening for enqueued work unless behind a transaction-mode
        pooler: there LISTEN would take hold in whichever server session ran it, which then
        serves other clients, and the NOTIFYs would reach them, not this worker (which
        finds the work by its look every --sleepintervalms instead)."""
        conn = connect(self.config.database, application_name=f"procqueue-worker-{self.index}")
        if not self.config.database.pooler.keeps_sessions:
            return conn
        try:
            self.queries.listen(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def replace_connection(self, conn: Connection) -> None:
        """From the flush thread, during a loan: a new connection for one that broke. What
        this worker holds is unchanged (its leases, its outcomes still to record), so
        nothing is recovered: the loan's outcomes are recorded on the new one."""
        if self.conn is not None and not self.conn.closed:
            self.conn.close()
        self.conn = conn
        log_event(logger, logging.INFO, "worker.reconnected", worker=self.index, by="flush thread")

    def recover_leases(self) -> None:
        """After a lost connection, settle everything still leased to this worker. A claim
        whose reply was lost committed all the same, and a batch cut short by a failed
        flush has tasks that will never run here: both sit in `running` under a live
        processor, which no rescue touches. Outcomes still pending are recorded first
        (those runs happened); whatever else this slot holds goes back, unstarted."""
        self.flush()
        self._release_unstarted()

    def _release_unstarted(self) -> None:
        self.waiting, self.lease_in_doubt = [], False
        self.queries.release_worker_tasks(
            self.conn, processor=self.processor_id, worker=self.index, in_flight=None, error="worker stopping"
        )  # unstarted tasks go back without a run record: nothing to log per task
        self.leases.clear()  # called with nothing pending: this slot now holds nothing

    def _pause_and_reconnect(self, event: str, level: int, **fields) -> None:
        """After a failed step, whatever failed: log it, drop the connection (its state is
        unknown), and wait, beating, with backoff while failures repeat."""
        self.connection_failures += 1
        delay = RECONNECT_BACKOFF_SECONDS[min(self.connection_failures, len(RECONNECT_BACKOFF_SECONDS)) - 1]
        log_event(logger, level, event, worker=self.index, **fields, retry_in_s=float(delay))
        self.close()
        deadline = self.clock() + delay
        while not self.stopping and self.clock() < deadline:
            self.slot_writer.beat()
            self._sleep_interruptibly(min(IDLE_BEAT_SECONDS, deadline - self.clock()))

    def _sleep_interruptibly(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.wakeup is None:
            time.sleep(seconds)
            return
        readable, _, _ = select.select([self.wakeup.read_fd], [], [], seconds)
        if readable:
            self.wakeup.drain()

    def _log_outcome(self, task: ClaimedTask, outcome: TaskOutcome) -> None:
        duration_ms = (outcome.finished_at - outcome.started_at).total_seconds() * 1000
        fields = dict(task_id=task.id, task=task.task_name, attempt=task.attempts, worker=self.index,
                      duration_ms=duration_ms)
        if outcome.outcome is RunOutcome.SUCCEEDED:
            log_event(logger, logging.INFO, "task.succeeded", **fields)
            return
        if outcome.outcome is RunOutcome.BACKOFF and outcome.state is TaskState.QUEUED:
            # Asked for, not a failure: it uses an attempt all the same (the `attempt` field).
            log_event(logger, logging.INFO, "task.backoff", **fields, retry_at=_retry_at(outcome).isoformat())
            return
        next_step = {TaskState.QUEUED: "retry", TaskState.MISSED: "missed"}.get(outcome.state, "failed")
        log_event(logger, logging.WARNING, f"task.{outcome.outcome.value}", **fields, next=next_step,
                  error=outcome.summary or outcome.error or "")


def _retry_at(outcome: TaskOutcome) -> datetime:
    """When a task put back will run again, as the log shows it (the database counts a
    relative delay from its own clock, a moment later)."""
    if outcome.retry_at is not None:
        return outcome.retry_at
    return outcome.finished_at + timedelta(seconds=outcome.retry_in_seconds or 0.0)
