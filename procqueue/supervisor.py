"""The supervisor: fork the workers, watch them, replace the ones that exit, shut down.

Signal handlers only queue the signal and write a byte to a self-pipe; every decision
(reap, release, respawn, stop) is taken in `step()`, which a test can drive.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import Callable, Deque, Dict, List, Optional

from . import client, maintenance, registry
from .supervisor_database import Release, SupervisorDatabase
from .config import ProcessorConfig
from .db import bound_every_wait
from .errors import DatabaseUnavailable
from .heartbeat import SlotView, allocate_last_look, allocate_slots, await_worker, clear, read_slot
from .lifeline import Lifeline
from .records import RunOutcome
from .process_tree import KILL_GRACE_SECONDS, begin_kill, finish_kill, kill_group, kill_now
from .logs import log_event
from .metrics import MultiprocessMetrics, TaskMetrics, initialise_series
from .monitor import STATUS_INTERVAL_SECONDS, Monitor
from .selfpipe import SelfPipe
from .starting import STOP_SIGNALS
from .status import SupervisorFacts
from .worker import Worker
from .worker_fate import (Departure, Exit, ExitVerdict, Slot, Watch, WatchVerdict, cancelled_in_hand, filled,
                          got_going, has_reached_loop, judge_exit, kill_begun, left_on_purpose, may_refill, reaped,
                          sigkill_sent, slots_for, spared, vacated, watch, workers_cannot_start)
from .worker_process import run_worker_process

logger = logging.getLogger("procqueue.supervisor")

# Between tries of a database that cannot be reached at start (each failure logged once).
DATABASE_RETRY_SECONDS = (1, 2, 4, 8, 15)
# No statement of the supervisor may keep its loop waiting longer than this: reaping,
# killing and signals wait behind it.
SUPERVISOR_WAIT_SECONDS = 3.0
LOOP_TICK_SECONDS = 0.25

_STOP_SIGNALS = STOP_SIGNALS
_HANDLED_SIGNALS = _STOP_SIGNALS + (signal.SIGCHLD,)


class Supervisor:
    def __init__(self, config: ProcessorConfig, *, clock=time.monotonic,
                 metrics_store: Optional[MultiprocessMetrics] = None,
                 on_start: Optional[Callable[[], None]] = None,
                 on_stop: Optional[Callable[[], None]] = None) -> None:
        self.config = config
        self.on_start = on_start  # called once start-up succeeded, before the first fork
        self.on_stop = on_stop  # called once, from the loop, when stopping begins
        self.clock = clock
        self.processor_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.board = allocate_slots(config.num_workers)  # shared memory: what the workers publish
        self.last_look = allocate_last_look()  # shared memory: when a worker last claimed
        self.slots: List[Slot] = slots_for(config.num_workers)  # what the supervisor knows of each
        self.any_worker_ran = False
        self.signals: Deque[int] = deque()
        self.stopping = False
        self.stop_deadline: Optional[float] = None
        self.exit_code = 0
        self.restarts: Dict[str, int] = {"stuck": 0, "crashed": 0, "recycled": 0}
        self.next_status = 0.0
        self.database = SupervisorDatabase(config, processor_id=self.processor_id, clock=clock, task_metrics=TaskMetrics())
        self.monitor = Monitor(config, processor_id=self.processor_id, board=self.board, metrics_store=metrics_store)
        self.warned_threads = False
        self.wakeup = SelfPipe()
        self.previous_handlers: Dict[int, object] = {}  # what run() replaced, given back at the end
        self.lifeline: Optional[Lifeline] = None  # made in prepare(); workers watch it to learn of our death

    # -- the run -----------------------------------------------------------------------

    def run(self) -> int:
        self.install_signal_handlers()  # from here on a signal is a flag the loop acts on
        try:
            self.prepare()
            reached = self.wait_for_database()
        except BaseException:
            self.abandon_start()
            raise
        if not reached:
            self.abandon_start()
            log_event(logger, logging.INFO, "processor.stopped", processor=self.processor_id, exit_code=0,
                      note="stopped while waiting for the database")
            return 0
        self.announce_start()
        try:
            while not (self.stopping and not self.running()):
                self.step()
                self.sleep()
        finally:
            self.finish()
        return self.exit_code

    def prepare(self) -> None:
        """Everything that must happen once, before the database is reached and the first fork."""
        multiprocessing.current_process().name = "supervisor"
        bound_every_wait(SUPERVISOR_WAIT_SECONDS)
        self.monitor.open()
        self.lifeline = Lifeline()
        maintenance.schedule_clean_up(self.config.retention)  # before the schedules are registered
        if self.monitor.metrics_store is not None:
            initialise_series(registry.registered_names(), [s.task_name for s in registry.recurring_schedules()])
        client.configure(database_url=self.config.database.url, schema=self.config.database.schema,
                         retention=self.config.retention, pooler=self.config.database.pooler)
        self.monitor.start_serving()  # /healthz and /readyz answer while the database is awaited

    def wait_for_database(self) -> bool:
        """Connect, apply the schema and register the schedules, retrying a database that
        cannot be reached (refused, timed out, restarting) with capped backoff for up to
        --database-wait seconds: a fail-over or a maintenance window must not crash-loop
        the pod. The status file says so meanwhile (alive, not ready). A failure retrying
        cannot cure (a wrong password, no such database) is raised at once. Returns False
        when a stop signal came first."""
        give_up_at = self.clock() + self.config.database_wait_seconds
        failures = 0
        while True:
            self.handle_signals()  # one that came during prepare() too
            if self.stopping:
                return False
            try:
                self.database.start()
                return True
            except DatabaseUnavailable as exc:
                remaining = give_up_at - self.clock()
                if remaining <= 0:
                    raise self.gave_up_waiting(exc) from None
                failures += 1
                delay = min(DATABASE_RETRY_SECONDS[min(failures, len(DATABASE_RETRY_SECONDS)) - 1], remaining)
                log_event(logger, logging.WARNING, "database.waiting", error=str(exc), retry_in_s=float(delay),
                          gives_up_in_s=round(remaining, 1))
                if not self.wait_a_while(delay):
                    return False

    def gave_up_waiting(self, exc: DatabaseUnavailable) -> DatabaseUnavailable:
        wait = self.config.database_wait_seconds
        return DatabaseUnavailable(f"{exc} (gave up after --database-wait {wait:g}s)" if wait else str(exc))

    def wait_a_while(self, seconds: float) -> bool:
        """Sleep, publishing the status and obeying signals; False once asked to stop."""
        until = self.clock() + seconds
        while True:
            self.handle_signals()
            if self.stopping:
                return False
            if self.clock() >= self.next_status:
                self.publish_status(state="waiting_for_database")
            remaining = until - self.clock()
            if remaining <= 0:
                return True
            self.sleep(min(remaining, LOOP_TICK_SECONDS))

    def announce_start(self) -> None:
        if self.config.database.url is None:  # said once it is in use: not before a start-up error
            log_event(logger, logging.WARNING, "database.embedded", where=self.config.database.display_url,
                      note="no DATABASE_URL: fine for development; processors and apps elsewhere cannot see it")
        log_event(logger, logging.INFO, "processor.started", processor=self.processor_id,
                  pid=os.getpid(), tasks=len(registry.registered_names()), **self.config.public_dict())
        if not self.config.imports and not any(name.split(".", 1)[0] != "procqueue"
                                               for name in registry.registered_names()):
            # Only procqueue's own tasks: with none imported (by --import, or by a
            # framework such as Django's app before the processor started), say so.
            log_event(logger, logging.WARNING, "processor.no_task_modules",
                      note="no --import (PROCQUEUE_IMPORTS): only procqueue's own tasks are registered; "
                           "any other task is put back as unknown, and fails after its attempts")
        if self.on_start is not None:
            self.on_start()

    def step(self) -> None:
        self.handle_signals()
        self.note_running_workers()
        self.reap_workers()
        self.murder_stuck_workers()
        self.database.run(stopping=self.stopping)
        if self.stopping:
            self.enforce_stop_deadline()
        else:
            self.spawn_missing_workers()
        if self.clock() >= self.next_status:
            self.publish_status()
        self.monitor.look_after_dashboard(self.clock(), stopping=self.stopping)

    def sleep(self, seconds: float = LOOP_TICK_SECONDS) -> None:
        try:
            select.select([self.wakeup.read_fd], [], [], seconds)
        except InterruptedError:
            pass
        self.wakeup.drain()

    def finish(self) -> None:
        self.kill_all_workers()
        self.reap_workers(block=True)
        self.database.finish()
        self.publish_status(state="stopped")
        self.close()
        log_event(logger, logging.INFO, "processor.stopped", processor=self.processor_id, exit_code=self.exit_code)

    def abandon_start(self) -> None:
        """prepare() failed (no database, a port taken...): leave no status file saying a
        processor is starting, for a probe or a script to wait on, and nothing open."""
        if self.monitor.owns_status_file:
            with contextlib.suppress(Exception):
                self.publish_status(state="stopped")
        if self.database.up:
            self.database.finish()
        self.close()

    def close(self) -> None:
        """Give back what run() took, so a program embedding the supervisor can carry on:
        its signal handlers first, for only ours write to the wakeup pipe."""
        self.restore_signal_handlers()
        self.wakeup.close()
        self.database.close()
        self.monitor.close()
        if self.lifeline is not None:
            self.lifeline.close()

    # -- what the outside world sees ---------------------------------------------------

    def publish_status(self, state: Optional[str] = None) -> None:
        """Refresh the status document (file, /status, /healthz, /metrics)."""
        self.next_status = self.clock() + STATUS_INTERVAL_SECONDS
        self.monitor.publish(self.facts(state), monotonic_now=self.clock())

    def facts(self, state: Optional[str] = None) -> SupervisorFacts:
        return SupervisorFacts(
            state=state or ("stopping" if self.stopping else "running"),
            database_up=self.database.up,
            queue_stats=self.database.queue_stats,
            restarts=dict(self.restarts),
            restarts_by_slot={slot.index: slot.restarts for slot in self.slots if slot.restarts},
            rss_by_slot={slot.index: self.monitor.rss.read(slot.pid) for slot in self.running()},
            pids_by_slot={slot.index: slot.pid for slot in self.running()},
            vacant_since_by_slot={slot.index: slot.vacant_since for slot in self.slots
                                  if slot.vacant_since is not None},
            failed_starts_by_slot={slot.index: slot.failed_starts for slot in self.slots if slot.failed_starts},
            tasks_lost=self.database.tasks_lost,
            tasks_rescued=self.database.tasks_rescued,
            metrics_address=None if state == "stopped" else self.monitor.url,  # not served any more
        )

    # -- signals -----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Idempotent: the CLI installs them before run() does, so that no signal falls
        between the handlers it used while starting and these."""
        if self.previous_handlers:
            return
        for signum in _HANDLED_SIGNALS:
            self.previous_handlers[signum] = signal.signal(signum, self._queue_signal)

    def restore_signal_handlers(self) -> None:
        while self.previous_handlers:
            signum, handler = self.previous_handlers.popitem()
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _queue_signal(self, signum, frame) -> None:
        self.signals.append(signum)
        self.wakeup.wake()

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            if signum in _STOP_SIGNALS:
                self.begin_stop(signal.Signals(signum).name)

    def begin_stop(self, reason: str) -> None:
        if self.stopping:
            # A second signal: stop waiting for running tasks.
            log_event(logger, logging.WARNING, "processor.stop_now", reason=reason)
            self.stop_deadline = self.clock()
            return
        self.stopping = True
        self.stop_deadline = self.clock() + self.config.shutdown_timeout_seconds
        log_event(logger, logging.INFO, "processor.stopping", reason=reason,
                  workers=len(self.running()), timeout_s=self.config.shutdown_timeout_seconds)
        if self.on_stop is not None:
            try:
                self.on_stop()
            except Exception as exc:  # the embedder's bug must not stop the drain
                log_event(logger, logging.ERROR, "processor.on_stop_failed", error=repr(exc))
        for slot in self.running():
            _signal_quietly(slot.pid, signal.SIGTERM)

    def enforce_stop_deadline(self) -> None:
        if self.stop_deadline is not None and self.clock() >= self.stop_deadline and self.running():
            log_event(logger, logging.WARNING, "processor.stop_timeout", workers=len(self.running()))
            self.kill_all_workers()

    # -- workers -----------------------------------------------------------------------
    # Every rule about a worker's life is a decision in worker_fate; these carry them out.

    def running(self) -> List[Slot]:
        return [slot for slot in self.slots if slot.occupied]

    def spawn_missing_workers(self) -> None:
        now = self.clock()
        for slot in self.slots:
            if may_refill(slot, now, holding_release=self.database.holds_for(slot.index)):
                self.spawn_worker(slot)

    def spawn_worker(self, slot: Slot) -> None:
        # The worker object is built before the fork and does nothing until after it.
        entry = self.board[slot.index]
        worker = Worker(self.config, processor_id=self.processor_id, index=slot.index, slot=entry,
                        last_look=self.last_look)
        await_worker(entry, self.clock())
        self.warn_if_threads_running()
        # Signals stay blocked across the fork until the child has its own handlers: a
        # SIGTERM landing in between would otherwise run the supervisor's handler there.
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
        with self.monitor.fork_guard():
            pid = os.fork()
        if pid == 0:
            self._become_worker(worker)  # never returns
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)
        try:
            os.setpgid(pid, pid)  # also here, so a kill right after fork finds the group
        except OSError:
            pass
        filled(slot, pid, entry.tasks_done)
        log_event(logger, logging.DEBUG, "worker.spawned", worker=slot.index, pid=pid)

    def warn_if_threads_running(self) -> None:
        """fork() copies only the calling thread: a lock another thread held (in logging,
        an SDK's exporter) stays locked for ever in the child. Say so once."""
        # Our own HTTP thread is built to be safe across fork (see procqueue.http).
        others = [t for t in threading.enumerate()
                  if t is not threading.current_thread() and not t.name.startswith("procqueue-")]
        if others and not self.warned_threads:
            self.warned_threads = True
            names = ", ".join(sorted(t.name for t in others))
            log_event(logger, logging.WARNING, "processor.threads_before_fork", threads=names,
                      note="a task module started threads; forked workers may deadlock on their locks")

    def _become_worker(self, worker: Worker) -> None:
        code = 1
        try:
            self.wakeup.close()  # the supervisor's, not this worker's
            self.monitor.close_in_child()
            if self.lifeline is None:
                raise RuntimeError("worker forked before Supervisor.prepare()")
            code = run_worker_process(worker, lifeline_fd=self.lifeline.hold_in_child())
        except BaseException as exc:
            log_event(logger, logging.ERROR, "worker.crashed", worker=worker.index, error=repr(exc),
                      traceback=traceback.format_exc())
        finally:
            logging.shutdown()
            os._exit(code)

    def reap_workers(self, block: bool = False) -> None:
        """Collect exited workers. Waits on our own workers' pids only, so a process the
        embedding program started itself is never reaped from under it."""
        for slot in self.running():
            exit = self.exit_of(slot, block)
            if exit is not None:
                self.reap(slot, exit)
        if os.getpid() == 1:
            self.reap_orphans()

    def exit_of(self, slot: Slot, block: bool) -> Optional[Exit]:
        """How the slot's worker exited, seen without reaping it (None: it runs). If it did
        not leave by itself, the processes its task started (its process group) are killed
        first. Its pid, and so its group's id, cannot be reused before it is reaped, so the
        kill cannot reach a stranger."""
        try:
            info = os.waitid(os.P_PID, slot.pid, os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG))
        except ChildProcessError:
            return Exit(code=0)
        if info is None:
            return None
        exit = Exit(code=info.si_status) if info.si_code == os.CLD_EXITED else Exit(signal=info.si_status)
        if not left_on_purpose(exit, self.board[slot.index].state):
            kill_group(slot.pid)
        return exit

    def reap(self, slot: Slot, exit: Exit) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(slot.pid, 0)
        self.on_worker_exit(slot, reaped(slot), exit)

    def reap_orphans(self) -> None:
        """As PID 1 in a container we inherit every orphaned process (a task's grandchild
        whose parent died): reap them so they do not pile up as zombies. Each exited child
        is seen before it is reaped, so a worker among them still has its process group
        killed first (exit_of)."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            slot = next((slot for slot in self.running() if slot.pid == info.si_pid), None)
            exit = self.exit_of(slot, block=False) if slot is not None else None
            if slot is not None and exit is not None:
                self.reap(slot, exit)
                continue
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)

    def on_worker_exit(self, slot: Slot, pid: int, exit: Exit) -> None:
        """Put back what the worker held, record its exit, say why it went."""
        entry = self.board[slot.index]
        view = read_slot(entry)
        self.monitor.forget_worker(pid)
        self.next_status = 0.0  # show it at once, not up to a second later
        if has_reached_loop(slot, view):
            self.note_got_going(slot)
        verdict = judge_exit(slot, view, exit, stopping=self.stopping)
        self.release(slot, view, verdict)
        clear(entry)
        vacated(slot, verdict, exit, self.clock())
        self.report_exit(slot.index, pid, verdict)
        if verdict.departure.is_failure:
            self.give_up_if_workers_cannot_start(exit.describe(slot.index))

    def release(self, slot: Slot, view: SlotView, verdict: ExitVerdict) -> None:
        started = wall_time_of(view.task_started, self.clock()) if verdict.in_flight else None
        self.database.release(Release(slot.index, verdict.in_flight, verdict.cause, verdict.outcome,
                                      verdict.charge, started))
        self.database.run(stopping=self.stopping)

    def report_exit(self, index: int, pid: int, verdict: ExitVerdict) -> None:
        departure = verdict.departure
        if departure is Departure.STOPPED:
            log_event(logger, logging.DEBUG, "worker.exited", worker=index, pid=pid)
            return
        self.restarts[departure.restart_reason] += 1
        if departure is Departure.OUTPUT_LOST:
            log_event(logger, logging.WARNING, "worker.output_lost", worker=index, pid=pid,
                      note="a task closed or replaced the worker's stdout or stderr; replaced so that "
                           "its log lines are not lost")
        elif departure is Departure.RECYCLED:
            log_event(logger, logging.INFO, "worker.recycled", worker=index, pid=pid)
        elif departure is Departure.KILLED_CANCELLED:
            log_event(logger, logging.INFO, "worker.replaced", worker=index, pid=pid, cause=verdict.cause)
        else:
            log_event(logger, logging.WARNING, "worker.died", worker=index, pid=pid,
                      cause=verdict.cause, task_id=verdict.in_flight or "-")

    def give_up_if_workers_cannot_start(self, last_cause: str) -> None:
        if workers_cannot_start(self.slots, any_worker_ran=self.any_worker_ran):
            log_event(logger, logging.ERROR, "processor.workers_cannot_start",
                      failures=sum(slot.failed_starts for slot in self.slots), last_cause=last_cause)
            self.exit_code = 1
            self.begin_stop("no worker could start")

    def note_running_workers(self) -> None:
        """Remember which workers got as far as running their loop."""
        for slot in self.running():
            if not slot.reached_loop and has_reached_loop(slot, read_slot(self.board[slot.index])):
                self.note_got_going(slot)

    def note_got_going(self, slot: Slot) -> None:
        got_going(slot)
        self.any_worker_ran = True

    def murder_stuck_workers(self) -> None:
        """Stop workers whose shared-memory slot shows them stuck, in two steps (stack dump
        and SIGTERM to the tree, then SIGKILL); reaping then records and replaces them."""
        now, grace = self.clock(), self.config.grace_period_ms / 1000
        cancelled = self.database.tasks_to_stop
        in_hand = set()
        for slot in self.running():
            view = read_slot(self.board[slot.index])
            in_hand.update(cancelled_in_hand(slot, view, cancelled))
            verdict = watch(slot, view, now, grace, cancelled)
            if verdict.action is Watch.BEGIN_KILL:
                self.begin_murder(slot, view, verdict)
            elif verdict.action is Watch.SPARE:
                self.spare(slot, view)
            elif verdict.action is Watch.FINISH_KILL:
                self.finish_murder(slot)
        self.database.cancelled_in_hand = in_hand

    def begin_murder(self, slot: Slot, view: SlotView, verdict: WatchVerdict) -> None:
        if verdict.outcome is RunOutcome.CANCELLED:
            log_event(logger, logging.WARNING, "task.cancel_kill", worker=slot.index, pid=slot.pid,
                      task_id=view.task_id, task=view.task_name or "-", reason=verdict.reason)
        else:
            log_event(logger, logging.ERROR, "worker.stuck", worker=slot.index, pid=slot.pid,
                      task_id=view.task_id or "-", task=view.task_name or "-", reason=verdict.reason)
        tree = begin_kill(slot.pid)  # first: the grace before SIGKILL starts once SIGTERM is out
        kill_begun(slot, verdict, view, sigkill_at=self.clock() + KILL_GRACE_SECONDS, tree=tree)

    def finish_murder(self, slot: Slot) -> None:
        finish_kill(slot.pid, sigkill_sent(slot))

    def spare(self, slot: Slot, view: SlotView) -> None:
        log_event(logger, logging.WARNING, "worker.recovered", worker=slot.index, pid=slot.pid,
                  task_id=slot.kill.task_id, now_running=view.task_id or "-")
        spared(slot)

    def kill_all_workers(self) -> None:
        for slot in self.running():
            kill_now(slot.pid)


def wall_time_of(monotonic_time: float, monotonic_now: float) -> datetime:
    """A moment of the monotonic clock (a slot's task start), on the wall clock."""
    return datetime.now(timezone.utc) - timedelta(seconds=max(0.0, monotonic_now - monotonic_time))


def _signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
