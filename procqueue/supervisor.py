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
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Deque, Dict, Optional

from . import client, registry
from .chores import DatabaseChores, Release
from .config import ProcessorConfig
from .db import bound_every_wait
from .errors import DatabaseUnavailable
from .health import FAILED_STARTS_LIMIT
from .heartbeat import SlotView, WorkerState, allocate_slots, read_slot, stuck_reason
from .lifeline import Lifeline
from .process_tree import KILL_GRACE_SECONDS, begin_kill, finish_kill, kill_group, kill_now
from .logs import log_event
from .metrics import MultiprocessMetrics, TaskMetrics, initialise_series
from .monitor import STATUS_INTERVAL_SECONDS, Monitor
from .selfpipe import SelfPipe
from .starting import STOP_SIGNALS
from .records import RunOutcome
from .status import SupervisorFacts
from .worker import Worker
from .worker_process import WORKER_BOOT_ERROR, WORKER_OUTPUT_LOST, WORKER_RECYCLED, run_worker_process

logger = logging.getLogger("procqueue.supervisor")

RESPAWN_BACKOFF_SECONDS = (0.5, 1, 2, 4, 8, 16, 30)
# Between tries of a database that cannot be reached at start (each failure logged once).
DATABASE_RETRY_SECONDS = (1, 2, 4, 8, 15)
# No statement of the supervisor may keep its loop waiting longer than this: reaping,
# killing and signals wait behind it.
SUPERVISOR_WAIT_SECONDS = 3.0
LOOP_TICK_SECONDS = 0.25

_STOP_SIGNALS = STOP_SIGNALS
_HANDLED_SIGNALS = _STOP_SIGNALS + (signal.SIGCHLD,)


@dataclass
class WorkerProcess:
    pid: int
    index: int
    started_at: float  # monotonic
    kill_reason: Optional[str] = None  # set when the supervisor killed it on purpose
    kill_outcome: RunOutcome = RunOutcome.LOST
    kill_at: float = 0.0  # when SIGTERM gives way to SIGKILL
    kill_task_id: int = 0  # the task it was judged on (0: judged idle)
    kill_heartbeat: float = 0.0  # its slot's heartbeat then: a later one is progress
    tree: Optional[list] = None  # the processes being killed, until SIGKILL is sent
    reached_loop: bool = False  # it got as far as its loop: a later death is no boot failure
    done_at_spawn: int = 0  # the slot's tasks_done counter (kept across tenants) at fork


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
        self.slots = allocate_slots(config.num_workers)
        self.workers: Dict[int, WorkerProcess] = {}
        self.respawn_at: Dict[int, float] = {}
        self.quick_deaths: Dict[int, int] = {}
        self.failed_starts: Dict[int, int] = {}  # slot -> consecutive deaths before reaching the loop
        self.vacant_since: Dict[int, float] = {}  # slot -> when its worker exited, until refilled
        self.any_worker_ran = False
        self.signals: Deque[int] = deque()
        self.stopping = False
        self.stop_deadline: Optional[float] = None
        self.exit_code = 0
        self.restarts: Dict[str, int] = {"stuck": 0, "crashed": 0, "recycled": 0}
        self.restarts_by_slot: Dict[int, int] = {}
        self.next_status = 0.0
        self.chores = DatabaseChores(config, processor_id=self.processor_id, clock=clock, task_metrics=TaskMetrics())
        self.monitor = Monitor(config, processor_id=self.processor_id, slots=self.slots, metrics_store=metrics_store)
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
            while not (self.stopping and not self.workers):
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
        if self.monitor.metrics_store is not None:
            initialise_series(registry.registered_names(), [s.task_name for s in registry.recurring_schedules()])
        client.configure(database_url=self.config.database.url, schema=self.config.database.schema,
                         retention=self.config.retention)
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
                self.chores.start()
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
        if not self.config.imports:
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
        self.chores.run(stopping=self.stopping)
        if self.stopping:
            self.enforce_stop_deadline()
        else:
            self.spawn_missing_workers()
        if self.clock() >= self.next_status:
            self.publish_status()

    def sleep(self, seconds: float = LOOP_TICK_SECONDS) -> None:
        try:
            select.select([self.wakeup.read_fd], [], [], seconds)
        except InterruptedError:
            pass
        self.wakeup.drain()

    def finish(self) -> None:
        self.kill_all_workers()
        self.reap_workers(block=True)
        self.chores.finish()
        self.publish_status(state="stopped")
        self.close()
        log_event(logger, logging.INFO, "processor.stopped", processor=self.processor_id, exit_code=self.exit_code)

    def abandon_start(self) -> None:
        """prepare() failed (no database, a port taken...): leave no status file saying a
        processor is starting, for a probe or a script to wait on, and nothing open."""
        if self.monitor.owns_status_file:
            with contextlib.suppress(Exception):
                self.publish_status(state="stopped")
        if self.chores.up:
            self.chores.finish()
        self.close()

    def close(self) -> None:
        """Give back what run() took, so a program embedding the supervisor can carry on:
        its signal handlers first, for only ours write to the wakeup pipe."""
        self.restore_signal_handlers()
        self.wakeup.close()
        self.chores.close()
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
            database_up=self.chores.up,
            queue_stats=self.chores.queue_stats,
            restarts=dict(self.restarts),
            restarts_by_slot=dict(self.restarts_by_slot),
            rss_by_slot={w.index: self.monitor.rss.read(w.pid) for w in self.workers.values()},
            pids_by_slot={w.index: w.pid for w in self.workers.values()},
            vacant_since_by_slot=dict(self.vacant_since),
            failed_starts_by_slot=dict(self.failed_starts),
            tasks_lost=self.chores.tasks_lost,
            tasks_rescued=self.chores.tasks_rescued,
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
                  workers=len(self.workers), timeout_s=self.config.shutdown_timeout_seconds)
        if self.on_stop is not None:
            try:
                self.on_stop()
            except Exception as exc:  # the embedder's bug must not stop the drain
                log_event(logger, logging.ERROR, "processor.on_stop_failed", error=repr(exc))
        for worker in self.workers.values():
            _signal_quietly(worker.pid, signal.SIGTERM)

    def enforce_stop_deadline(self) -> None:
        if self.stop_deadline is not None and self.clock() >= self.stop_deadline and self.workers:
            log_event(logger, logging.WARNING, "processor.stop_timeout", workers=len(self.workers))
            self.kill_all_workers()

    # -- workers -----------------------------------------------------------------------

    def spawn_missing_workers(self) -> None:
        now = self.clock()
        for index in range(self.config.num_workers):
            # Never refill a slot whose last tenant's tasks are not released yet: the new
            # worker's leases would look the same, and the late release would take them.
            if self.chores.holds_for(index):
                continue
            if index not in self.workers and now >= self.respawn_at.get(index, 0.0):
                self.spawn_worker(index)

    def spawn_worker(self, index: int) -> None:
        # The worker object is built before the fork and does nothing until after it.
        worker = Worker(self.config, processor_id=self.processor_id, index=index, slot=self.slots[index])
        self.slots[index].heartbeat = self.clock()  # its start-up is timed from now
        self.vacant_since.pop(index, None)
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
        self.workers[index] = WorkerProcess(pid=pid, index=index, started_at=self.clock(),
                                            done_at_spawn=self.slots[index].tasks_done)
        log_event(logger, logging.DEBUG, "worker.spawned", worker=index, pid=pid)

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
        for worker in list(self.workers.values()):
            if self.has_exited(worker, block):
                self.reap(worker)
        if os.getpid() == 1:
            self.reap_orphans()

    def has_exited(self, worker: WorkerProcess, block: bool) -> bool:
        """Whether the worker has exited, seen without reaping it; if it did not leave by
        itself, the processes its task started (its process group) are killed first. Its
        pid, and so its group's id, cannot be reused before it is reaped, so the kill
        cannot reach a stranger."""
        try:
            info = os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG))
        except ChildProcessError:
            return True
        if info is None:
            return False
        if not self.left_on_purpose(worker, info.si_status if info.si_code == os.CLD_EXITED else None):
            kill_group(worker.pid)
        return True

    def left_on_purpose(self, worker: WorkerProcess, exit_code: Optional[int]) -> bool:
        """The worker ran its shutdown and exited with one of its own codes. The code alone
        does not tell: a task calling os._exit(4) leaves a busy slot, not a stopping one."""
        return (exit_code in (0, WORKER_RECYCLED, WORKER_OUTPUT_LOST)
                and self.slots[worker.index].state == WorkerState.STOPPING)

    def reap(self, worker: WorkerProcess) -> None:
        try:
            _, status = os.waitpid(worker.pid, 0)
        except ChildProcessError:
            status = 0
        self.on_worker_exit(worker, status)

    def reap_orphans(self) -> None:
        """As PID 1 in a container we inherit every orphaned process (a task's grandchild
        whose parent died): reap them so they do not pile up as zombies. Each exited child
        is seen before it is reaped, so a worker among them still has its process group
        killed first (has_exited)."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            worker = next((w for w in self.workers.values() if w.pid == info.si_pid), None)
            if worker is not None and self.has_exited(worker, block=False):
                self.reap(worker)
                continue
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)

    def on_worker_exit(self, worker: WorkerProcess, status: int) -> None:
        del self.workers[worker.index]
        self.monitor.forget_worker(worker.pid)
        self.next_status = 0.0  # show it at once, not up to a second later
        slot = self.slots[worker.index]
        if slot.state in (WorkerState.IDLE, WorkerState.BUSY) or slot.tasks_done > worker.done_at_spawn:
            self.mark_reached_loop(worker)
        view = read_slot(slot)
        in_flight = view.task_id or None
        cause = worker.kill_reason or describe_exit(worker.index, status)
        outcome = worker.kill_outcome
        left_on_purpose = self.left_on_purpose(worker, os.WEXITSTATUS(status) if os.WIFEXITED(status) else None)
        if self.stopping and worker.kill_reason is None and not os.WIFEXITED(status):
            cause = f"killed at shutdown: still running after --shutdown-timeout ({cause})"
        expected = self.stopping and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        # A task killed only because the processor is shutting down did nothing wrong: it
        # goes back without losing an attempt.
        charge = not (self.stopping and worker.kill_reason is None)
        if worker.kill_reason is not None and in_flight not in (None, worker.kill_task_id):
            # Nor did one the worker started in the instant between the verdict and SIGKILL.
            judged = f"on task {worker.kill_task_id}" if worker.kill_task_id else "while idle"
            cause = f"worker {worker.index} killed as stuck {judged} as this one started"
            outcome, charge = RunOutcome.LOST, False
        started = wall_time_of(view.task_started, self.clock()) if in_flight else None
        self.chores.release(Release(worker.index, in_flight, cause, outcome, charge, started))
        self.chores.run(stopping=self.stopping)
        slot.pid, slot.state, slot.task_id, slot.task_deadline = 0, int(WorkerState.EMPTY), 0, 0.0
        self.vacant_since[worker.index] = self.clock()
        if expected:
            log_event(logger, logging.DEBUG, "worker.exited", worker=worker.index, pid=worker.pid)
            return
        self.restarts_by_slot[worker.index] = self.restarts_by_slot.get(worker.index, 0) + 1
        if left_on_purpose and os.WEXITSTATUS(status) in (WORKER_RECYCLED, WORKER_OUTPUT_LOST):
            self.restarts["recycled"] += 1
            if os.WEXITSTATUS(status) == WORKER_OUTPUT_LOST:
                log_event(logger, logging.WARNING, "worker.output_lost", worker=worker.index, pid=worker.pid,
                          note="a task closed or replaced the worker's stdout or stderr; replaced so that "
                               "its log lines are not lost")
            else:
                log_event(logger, logging.INFO, "worker.recycled", worker=worker.index, pid=worker.pid)
            return  # refilled on this tick: no backoff, not a failed start
        self.restarts["stuck" if worker.kill_reason else "crashed"] += 1
        log_event(logger, logging.WARNING, "worker.died", worker=worker.index, pid=worker.pid,
                  cause=cause, task_id=in_flight or "-")
        self.plan_respawn(worker, status)

    def plan_respawn(self, worker: WorkerProcess, status: int) -> None:
        """Replace at once a worker that died after it got going (a task crashed it, or it
        was killed for being stuck: its task's attempts bound that); back off, per slot,
        from one that keeps dying before it gets going; give up when every slot keeps
        failing that way and no worker has ever run. A worker that could not connect says
        so (WORKER_BOOT_ERROR): that is the database's trouble, which a restart would not
        cure, so it is retried with backoff for as long as it lasts."""
        cannot_connect = os.WIFEXITED(status) and os.WEXITSTATUS(status) == WORKER_BOOT_ERROR
        quick = cannot_connect or not worker.reached_loop
        deaths = self.quick_deaths.get(worker.index, 0) + 1 if quick else 0
        self.quick_deaths[worker.index] = deaths
        if quick and not cannot_connect:
            self.failed_starts[worker.index] = self.failed_starts.get(worker.index, 0) + 1
        else:
            self.failed_starts.pop(worker.index, None)
        if self.workers_cannot_start():
            log_event(logger, logging.ERROR, "processor.workers_cannot_start", failures=sum(self.failed_starts.values()),
                      last_cause=describe_exit(worker.index, status))
            self.exit_code = 1
            self.begin_stop("no worker could start")
            return
        delay = RESPAWN_BACKOFF_SECONDS[min(deaths, len(RESPAWN_BACKOFF_SECONDS)) - 1] if deaths else 0.0
        self.respawn_at[worker.index] = self.clock() + delay

    def workers_cannot_start(self) -> bool:
        """Every slot failed to start FAILED_STARTS_LIMIT times in a row (with backoff in
        between) and no worker has ever run: the task modules break forked workers. Once
        one has run, the supervisor keeps trying, and the health verdict fails instead."""
        return not self.any_worker_ran and all(
            self.failed_starts.get(index, 0) >= FAILED_STARTS_LIMIT for index in range(self.config.num_workers))

    def note_running_workers(self) -> None:
        """Remember which workers got as far as running their loop."""
        for worker in self.workers.values():
            if not worker.reached_loop and self.slots[worker.index].state in (WorkerState.IDLE, WorkerState.BUSY):
                self.mark_reached_loop(worker)

    def mark_reached_loop(self, worker: WorkerProcess) -> None:
        """A worker got going: it is no boot failure, and its slot's run of failed starts is over."""
        worker.reached_loop = self.any_worker_ran = True
        self.failed_starts.pop(worker.index, None)

    def murder_stuck_workers(self) -> None:
        """Stop workers whose shared-memory slot shows them stuck, in two steps (stack dump
        and SIGTERM to the tree, then SIGKILL); reaping then records and replaces them."""
        now = self.clock()
        grace = self.config.grace_period_ms / 1000
        for worker in self.workers.values():
            view = read_slot(self.slots[worker.index])
            if worker.kill_reason is not None:
                if worker.tree is not None and now >= worker.kill_at:
                    if view.heartbeat != worker.kill_heartbeat:
                        self.spare(worker, view.task_id)
                        continue
                    finish_kill(worker.pid, worker.tree)
                    worker.tree = None
                continue
            verdict = stuck_reason(view, now, grace)
            if verdict is not None:
                self.begin_murder(worker, view, *verdict)

    def begin_murder(self, worker: WorkerProcess, view: SlotView, outcome: RunOutcome, reason: str) -> None:
        worker.kill_outcome, worker.kill_reason, worker.kill_task_id = outcome, reason, view.task_id
        worker.kill_heartbeat = view.heartbeat
        log_event(logger, logging.ERROR, "worker.stuck", worker=worker.index, pid=worker.pid,
                  task_id=view.task_id or "-", task=view.task_name or "-", reason=reason)
        worker.tree = begin_kill(worker.pid)
        worker.kill_at = self.clock() + KILL_GRACE_SECONDS

    def spare(self, worker: WorkerProcess, now_running: int) -> None:
        """The worker beat again before SIGKILL was due: its overdue task ended (the stack
        dump's signal can cut a C call short), or the statement it was silent in returned.
        It is not stuck any more; killed now, it would take a task that did nothing wrong
        with it. (A busy worker's heartbeat moves only when its task ends.)"""
        log_event(logger, logging.WARNING, "worker.recovered", worker=worker.index, pid=worker.pid,
                  task_id=worker.kill_task_id, now_running=now_running or "-")
        worker.kill_reason, worker.kill_outcome, worker.kill_task_id = None, RunOutcome.LOST, 0
        worker.kill_heartbeat = 0.0
        worker.tree = None

    def kill_all_workers(self) -> None:
        for worker in self.workers.values():
            kill_now(worker.pid)


def wall_time_of(monotonic_time: float, monotonic_now: float) -> datetime:
    """A moment of the monotonic clock (a slot's task start), on the wall clock."""
    return datetime.now(timezone.utc) - timedelta(seconds=max(0.0, monotonic_now - monotonic_time))


def describe_exit(index: int, status: int) -> str:
    if os.WIFSIGNALED(status):
        signame = signal.Signals(os.WTERMSIG(status)).name
        return f"worker {index} killed by signal {os.WTERMSIG(status)} ({signame})"
    return f"worker {index} exited with code {os.WEXITSTATUS(status)}"


def _signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
