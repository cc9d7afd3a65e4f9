"""The supervisor's dealings with the database: set the processor up, prove it alive, put
back what dead workers held, rescue the tasks of dead processors, count the queue, and
deregister on the way out.

None of it may stall the supervisor's loop, which also reaps and kills workers: every
wait is bounded (db.bound_every_wait), and after a failure its work waits out a short
backoff while reaping and killing go on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Dict, List, Optional, Set

import psycopg2

from . import admin, registry
from .config import Pooler, ProcessorConfig
from .db import Connection, connect, first_line, is_connection_error, one_transaction, savepoint, waits_unbounded
from .errors import DatabaseError, DatabaseUnavailable
from .logs import log_event, log_recurring_disabled
from .metrics import TaskMetrics, result_label
from .migrations import migrate
from .queries import Queries
from .records import ExpiredTask, QueueStats, ReleasedTask, RunOutcome, TaskState

logger = logging.getLogger("procqueue.supervisor")

RETRY_BACKOFF_SECONDS = (0.5, 1, 2, 4, 8)
# Queue depth is read from Postgres at most this often, however often /metrics is scraped,
# and each read may take at most QUEUE_STATS_TIMEOUT_SECONDS (a vast backlog is slow to count).
QUEUE_STATS_INTERVAL_SECONDS = 5.0
QUEUE_STATS_TIMEOUT_SECONDS = 2.0
# A task lost with its processor this many times is failed rather than put back again.
RESCUES_BEFORE_FAILING = 3
# How often queued tasks past their expires_at are ended as missed. Until then a claim
# skips them all the same; this only settles their state, so it need not be often.
EXPIRY_CHECK_SECONDS = 5.0
# On the way out, how long to keep trying to put back what killed workers held.
FINAL_RELEASE_SECONDS = 10.0


@dataclass(frozen=True)
class Release:
    """What a gone worker held, to be put back before its slot is refilled."""

    index: int
    in_flight: Optional[int]
    cause: str
    outcome: RunOutcome
    charge: bool
    in_flight_started: Optional[datetime] = None


def next_step(task: ReleasedTask) -> str:
    return {TaskState.QUEUED: "retry", TaskState.MISSED: "missed"}.get(task.state, "failed")


class SupervisorDatabase:
    def __init__(self, config: ProcessorConfig, *, processor_id: str, clock: Callable[[], float],
                 task_metrics: TaskMetrics) -> None:
        self.config = config
        self.processor_id = processor_id
        self.clock = clock
        self.task_metrics = task_metrics
        self.queries = Queries(config.database.schema)
        self.conn: Optional[Connection] = None
        self.pending_releases: Dict[int, Release] = {}
        self.queue_stats: Optional[QueueStats] = None
        # Tasks an operator cancelled while this processor's workers held them: task id ->
        # worker slot. The supervisor kills the worker it sees running one, and says
        # (cancelled_in_hand) which of them a worker runs or is being killed over; the
        # others are let go once LET_GO_AFTER_SECONDS have passed since the cancel.
        self.tasks_to_stop: Dict[int, int] = {}
        self.cancelled_ages: Dict[int, float] = {}
        self.cancelled_in_hand: Set[int] = set()
        self.tasks_lost = 0
        self.tasks_rescued = 0
        self.up = False
        self.since: Optional[float] = None  # start of the current unbroken run of database contact
        self.failures = 0
        self.retry_at = 0.0
        self.next_heartbeat = 0.0
        self.next_rescue = 0.0
        self.next_expiry_check = 0.0
        self.next_queue_stats = 0.0

    # -- at start and at the end -------------------------------------------------------

    def start(self) -> None:
        """Connect, apply the schema, register the recurring schedules, first heartbeat.
        Failures here are the processor's failure to start: they propagate, the connection
        closed; a lost connection as DatabaseUnavailable (worth trying again)."""
        try:
            self.conn = connect(self.config.database, application_name="procqueue-supervisor")
            with waits_unbounded():  # creating an index on a large table rightly takes long
                applied = migrate(self.conn, self.config.database.schema)
            if applied:
                log_event(logger, logging.INFO, "schema.applied", schema=self.config.database.schema)
            self.say_how_work_is_found()
            for schedule in registry.recurring_schedules():
                self.queries.register_recurring(
                    self.conn, name=schedule.task_name, run_every=schedule.run_every,
                    first_run_at=schedule.first_run_at, timeout_seconds=schedule.timeout.total_seconds(),
                    args_json=schedule.args_json, kwargs_json=schedule.kwargs_json,
                )
            self.periodic_round(heartbeat=True, rescue=False, expiry=False, stats=True)
        except (psycopg2.Error, DatabaseError) as exc:
            self.close()
            if isinstance(exc, psycopg2.Error) and is_connection_error(exc):
                raise DatabaseUnavailable(f"lost the database while starting: {first_line(exc)}") from None
            raise
        self.up, self.since = True, self.clock()
        self.next_rescue = self.clock() + self.config.rescue_after_seconds

    def say_how_work_is_found(self) -> None:
        """Whether workers hear of new tasks by LISTEN. A pooler cannot be asked its pool
        mode from a client's connection, so --pooler says it; when a pooler is seen in front
        and nobody said, a warning names the setting (LISTEN may be silently deaf)."""
        database = self.config.database
        if not database.pooler.keeps_sessions:
            log_event(logger, logging.INFO, "listen.off", pooler=database.pooler.value,
                      pickup_within_ms=self.config.sleep_interval_ms,
                      reason="a transaction-mode pooler hands LISTEN's session to other clients, so NOTIFY "
                             "would not reach the workers; idle workers look for work every --sleepintervalms")
        elif database.pooler is Pooler.NONE and self.queries.behind_a_pooler(self.conn):
            log_event(logger, logging.WARNING, "database.pooler_detected",
                      note="the server answering is not the one connected to: a pooler is in front. In "
                           "transaction mode LISTEN cannot work (new tasks would wait for the next "
                           "--sleepintervalms look): set --pooler transaction (PROCQUEUE_POOLER); "
                           "in session mode, --pooler session silences this")

    def finish(self) -> None:
        """Put back what the last workers held, then deregister; a peer rescues whatever
        could not be put back once this processor's heartbeat expires."""
        deadline = self.clock() + FINAL_RELEASE_SECONDS
        while self.pending_releases and self.clock() < deadline:
            self.retry_at = 0.0
            self.run(stopping=True)
            if self.pending_releases:
                time.sleep(0.5)
        if self.pending_releases:
            log_event(logger, logging.ERROR, "processor.release_incomplete", workers=sorted(self.pending_releases))
            return
        try:
            self.ensure_connected()
            self.queries.deregister_processor(self.conn, self.processor_id)
            self.conn.close()
        except (psycopg2.Error, DatabaseError) as exc:
            log_event(logger, logging.WARNING, "processor.deregister_failed", error=first_line(exc))

    def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close()

    # -- every tick ----------------------------------------------------------------------

    def release(self, release: Release) -> None:
        """A worker is gone: put back what it held (now, or once the database answers)."""
        self.pending_releases[release.index] = release

    def holds_for(self, index: int) -> bool:
        """Whether a slot's last tenant still has tasks to put back. The slot must not be
        refilled before: the new worker's leases would look the same to the release."""
        return index in self.pending_releases

    def run(self, *, stopping: bool) -> None:
        if self.clock() < self.retry_at:
            return
        try:
            self.ensure_connected()
            self.release_pending(self.conn)
            now = self.clock()
            heartbeat, expiry, stats = (now >= self.next_heartbeat, now >= self.next_expiry_check,
                                        now >= self.next_queue_stats)
            rescue = now >= self.next_rescue and not stopping and self.may_judge_peers()
            if heartbeat or rescue or expiry or stats:
                self.periodic_round(heartbeat=heartbeat, rescue=rescue, expiry=expiry, stats=stats)
            self.failures = 0
            self.up = True
            if self.since is None:
                self.since = self.clock()
        except (psycopg2.Error, DatabaseError) as exc:
            self.on_error(exc)

    def release_pending(self, conn: Connection) -> None:
        for index, release in list(self.pending_releases.items()):
            released = self.queries.release_worker_tasks(
                conn, processor=self.processor_id, worker=index, in_flight=release.in_flight,
                error=release.cause, outcome=release.outcome, charge=release.charge,
                in_flight_started=release.in_flight_started,
            )
            del self.pending_releases[index]
            for task in released:
                self.tasks_lost += 1
                self.count_lost(task, task.outcome)
                # Named as its run is recorded: a hard-killed overrun is timed_out, not lost.
                log_event(logger, logging.WARNING, f"task.{task.outcome.value}", task_id=task.task_id,
                          task=task.task_name, worker=index, next=next_step(task), cause=release.cause)
                if task.disabled_schedule_after is not None:
                    self.task_metrics.recurring_disabled(task.task_name)
                    log_recurring_disabled(logger, task.task_name, task.disabled_schedule_after, worker=index)

    def count_lost(self, task: ReleasedTask, outcome: RunOutcome) -> None:
        self.task_metrics.run_finished(task.task_name, task.recurring, result_label(outcome, task.state), None)
        if task.state is TaskState.MISSED:
            self.task_metrics.slots_missed(task.task_name)

    def periodic_round(self, *, heartbeat: bool, rescue: bool, expiry: bool, stats: bool) -> None:
        """One commit for whatever is due: at the defaults all four fall due together every
        5 s, and an idle processor's cost in Postgres is mostly this round. Each chore after
        the heartbeat runs in a savepoint of its own, so that one failing (or a count cut
        short by its time limit) undoes only itself, never the heartbeat: a lost beat
        could let peers take this live processor for dead. What the chores found is logged
        and counted once committed."""
        reports: List[Callable[[], None]] = []
        with one_transaction(self.conn):
            if heartbeat:
                self.heartbeat(self.conn)
                reports.append(self.chore("cancellations", self.find_tasks_to_stop))
            if rescue:
                self.next_rescue = self.clock() + self.config.rescue_after_seconds / 4
                reports.append(self.chore("rescue", self.rescue))
            if expiry:
                self.next_expiry_check = self.clock() + EXPIRY_CHECK_SECONDS
                reports.append(self.chore("expiry", self.miss_expired))
            if stats:  # last: its time limit lasts to the end of the transaction
                self.next_queue_stats = self.clock() + QUEUE_STATS_INTERVAL_SECONDS
                reports.append(self.chore("queue_stats", self.refresh_queue_stats,
                                          when_cut_short=self.report_count_cut_short))
        for report in reports:
            report()

    def chore(self, name: str, work: Callable[[Connection], Callable[[], None]], *,
              when_cut_short: Optional[Callable[[], None]] = None) -> Callable[[], None]:
        """Run `work` in a savepoint; returns its report (to run once committed). A failure
        that is not the connection's is logged and leaves the rest of the round standing;
        so does a statement cut short by a time limit (psycopg2 calls that an
        OperationalError, as it does a lost connection, but the connection is fine)."""
        try:
            with savepoint(self.conn, name):
                return work(self.conn)
        except psycopg2.errors.QueryCanceled as exc:
            if when_cut_short is not None:
                return when_cut_short
            error = first_line(exc)
        except psycopg2.Error as exc:
            if is_connection_error(exc):
                raise
            error = first_line(exc)
        return lambda: log_event(logger, logging.WARNING, "supervisor.database_error", chore=name, error=error)

    def report_count_cut_short(self) -> None:
        log_event(logger, logging.WARNING, "queue_stats.timeout", timeout_s=QUEUE_STATS_TIMEOUT_SECONDS,
                  note="counting the queue took too long; the figures shown are older")

    def heartbeat(self, conn: Connection) -> None:
        self.queries.processor_heartbeat(conn, processor=self.processor_id, hostname=socket.gethostname(),
                                         pid=os.getpid())
        self.next_heartbeat = self.clock() + self.config.rescue_after_seconds / 4

    def find_tasks_to_stop(self, conn: Connection) -> Callable[[], None]:
        let_go = [task_id for task_id, age in self.cancelled_ages.items()
                  if age >= admin.LET_GO_AFTER_SECONDS and task_id not in self.cancelled_in_hand]
        found = self.queries.tasks_to_stop(conn, processor=self.processor_id, let_go=let_go)

        def report() -> None:
            self.tasks_to_stop = {task_id: worker for task_id, (worker, _) in found.items()}
            self.cancelled_ages = {task_id: age for task_id, (_, age) in found.items()}
        return report

    def may_judge_peers(self) -> bool:
        """A peer's stale heartbeat proves it dead only if this processor could have seen
        it beat: after a database outage every heartbeat is stale, the living included,
        and the first processor back must not re-run the others' tasks. So rescue waits
        until this one has been in unbroken contact for a whole --rescue-after."""
        return self.since is not None and self.clock() - self.since >= self.config.rescue_after_seconds

    def rescue(self, conn: Connection) -> Callable[[], None]:
        rescued = self.queries.rescue_dead_processors(
            conn, expiry_seconds=self.config.rescue_after_seconds, rescuer=self.processor_id,
            max_losses=RESCUES_BEFORE_FAILING,
        )
        self.queries.let_go_of_dead_holders(conn)
        return lambda: self.report_rescued(rescued)

    def report_rescued(self, rescued: List[ReleasedTask]) -> None:
        for task in rescued:
            self.tasks_rescued += 1
            if task.started:
                self.count_lost(task, RunOutcome.LOST)
        if rescued:
            started = [task for task in rescued if task.started]
            log_event(logger, logging.WARNING, "tasks.rescued", count=len(rescued), started=len(started),
                      task_ids=[task.task_id for task in rescued[:20]],
                      missed=[task.task_id for task in started if task.state is TaskState.MISSED][:20] or "-",
                      failed=[task.task_id for task in started if task.state is TaskState.FAILED][:20] or "-")

    def miss_expired(self, conn: Connection) -> Callable[[], None]:
        """End the queued tasks whose time ran out (a recurring run whose next slot is due)."""
        expired = self.queries.miss_expired_tasks(conn)
        return lambda: self.report_missed(expired)

    def report_missed(self, expired: List[ExpiredTask]) -> None:
        for task in expired:
            if task.recurring:
                self.task_metrics.slots_missed(task.task_name)
            log_event(logger, logging.WARNING, "task.missed", task_id=task.task_id, task=task.task_name,
                      reason="not started before it expired" + (" (the next slot was due)" if task.recurring else ""))

    def refresh_queue_stats(self, conn: Connection) -> Callable[[], None]:
        stats = self.queries.queue_stats(conn, timeout_seconds=QUEUE_STATS_TIMEOUT_SECONDS, now=time.time())

        def report() -> None:
            self.queue_stats = stats.including(set(registry.registered_queues()) | set(self.config.queues))
        return report

    def on_error(self, exc: BaseException) -> None:
        self.failures += 1
        self.next_heartbeat = 0.0  # a round that failed committed nothing: beat as soon as it can
        self.up, self.since = False, None
        # Retry well within a heartbeat period, or peers would take this live processor
        # for dead (and re-run its tasks) after an outage of some seconds.
        delay = min(RETRY_BACKOFF_SECONDS[min(self.failures, len(RETRY_BACKOFF_SECONDS)) - 1],
                    self.config.rescue_after_seconds / 4)
        log_event(logger, logging.WARNING, "supervisor.database_error", error=first_line(exc), retry_in_s=float(delay),
                  pending_releases=len(self.pending_releases))
        if self.conn is not None and not self.conn.closed:
            self.conn.close()
        self.conn = None
        self.retry_at = self.clock() + delay

    def ensure_connected(self) -> None:
        if self.conn is None or self.conn.closed:
            # A short timeout: while the database is unreachable the loop must go on
            # reaping and killing; the work waits for the next try.
            self.conn = connect(self.config.database, application_name="procqueue-supervisor", timeout=3)
