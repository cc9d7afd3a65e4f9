"""The chaos suite's verdict: the invariants procqueue promises, checked after the attack
against what the tasks wrote themselves (`chaos_executions`), the queue's own tables, and
the attack log.

Each check returns violations (a broken promise) and figures for the report. A re-run of
work that had completed is a violation unless a kill explains it: the process that ran
it was killed within FLUSH_WINDOW_LIMIT seconds of the work ending (its outcome was
still waiting to be written: at-least-once, as documented), or a restart of PostgreSQL
held the outcome back. A kill noted up to END_ROW_LAG before the work's `end` row counts:
that row's time is the server's, taken when it ran an INSERT the task sent before dying.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

FINAL_STATES = ("succeeded", "failed", "cancelled", "missed")
# A completed execution run again is explained by a kill of its process at most this long
# after it ended: outcomes wait up to 0.2 s to be written in a batch, plus the write itself.
FLUSH_WINDOW_LIMIT = timedelta(seconds=1.0)
KILLS = ("worker", "node", "supervisor")
# A restart whose recovery was not measured is allowed this long for its clients to return.
RECOVERY_ALLOWANCE_S = 5.0
# After it, a worker reconnecting with backoff may take this much longer to write.
RECONNECT_ALLOWANCE = timedelta(seconds=3.5)  # attacks whose pids died at once (the supervisor's alone)
# A task's `end` row carries the time Postgres ran its INSERT (clock_timestamp()), which
# can come after the kill of the process that sent it (seen: 81 us after the time the
# harness noted for the kill): a kill noted this much before an end may still follow it.
END_ROW_LAG = timedelta(seconds=0.5)
# A task cancelled as it runs is stopped by its processor within this: the next heartbeat
# round (a quarter of --rescue-after, 1 s in a chaos run), the stack dump and SIGTERM, and
# SIGKILL 0.5 s later; with room for a PostgreSQL restart on the way.
CANCEL_STOP_LIMIT = timedelta(seconds=10)
# A task cancelled while claimed in a worker's batch, not begun, counts as running: the
# worker may begin it before the kill comes (a batch begins or gives back what it holds
# within a fraction of a second). Begun later than this after the cancel, it is a violation.
BEGUN_IN_BATCH_LIMIT = timedelta(seconds=2)


@dataclass(frozen=True)
class Attack:
    kind: str  # worker, supervisor, node, sigterm, backend, restart_fast, restart_immediate, cancel, retry;
    # exit (by itself)
    at: datetime  # when it struck (UTC)
    pids: Tuple[int, ...] = ()  # the processes it killed at once
    node: str = ""  # the processor it hit, by its processor id
    seconds: Optional[float] = None  # node: rescued after; restart: back after; sigterm: drained in
    recovered: Optional[float] = None  # restart: until every processor ran tasks again
    ok: bool = True  # sigterm: the processor exited 0
    task_id: int = 0  # cancel, retry: the task


@dataclass(frozen=True)
class Execution:
    task_id: int
    attempt: int
    pid: int
    start: datetime
    end: Optional[datetime]  # its `end`, `fail` or `interrupted` row: the task's code was over
    completed: bool  # it wrote `end`: its work was done


@dataclass(frozen=True)
class Task:
    id: int
    name: str
    state: str
    attempts: int
    max_attempts: int
    last_error: Optional[str]
    run_at: datetime
    recurring_slot: Optional[datetime]
    expires_at: Optional[datetime]
    tag: Optional[str]  # the producer's name for the call


@dataclass
class Findings:
    violations: List[str] = field(default_factory=list)
    figures: Dict[str, object] = field(default_factory=dict)

    def violate(self, what: str, examples: Sequence[object] = ()) -> None:
        shown = ", ".join(str(example) for example in list(examples)[:8])
        self.violations.append(f"{what}" + (f" (e.g. {shown})" if shown else ""))


def load_tasks(conn) -> Dict[int, Task]:
    """The chaos tasks (procqueue's own clean-up task keeps no execution log)."""
    with conn.cursor() as cur:
        cur.execute("SELECT id, task_name, state, attempts, max_attempts, last_error, run_at, recurring_slot, "
                    "expires_at, kwargs->>'tag' FROM procqueue.tasks WHERE task_name LIKE 'chaos.%%'")
        return {row[0]: Task(*row) for row in cur.fetchall()}


def load_executions(conn) -> Dict[int, List[Execution]]:
    """Every execution of every task, in start order. Rows are paired by (task, pid,
    attempt): one process runs one attempt of one task at most once (a re-run is another
    attempt or another process), so a second `start` of an open key is the same row
    written twice (its first commit's reply was lost to an attack, and it was retried)."""
    with conn.cursor() as cur:
        cur.execute("SELECT task_id, attempt, event, pid, at FROM public.chaos_executions ORDER BY at")
        rows = cur.fetchall()
    open_runs: Dict[Tuple[int, int, int], dict] = {}
    executions: Dict[int, List[Execution]] = defaultdict(list)
    for task_id, attempt, event, pid, at in rows:
        key = (task_id, pid, attempt)
        if event == "start":
            open_runs.setdefault(key, {"task_id": task_id, "attempt": attempt, "pid": pid, "start": at})
        elif key in open_runs:  # end, fail or interrupted: the task's code is over
            executions[task_id].append(_closed(open_runs.pop(key), at, event == "end"))
    for run in open_runs.values():
        executions[run["task_id"]].append(_closed(run, None, False))
    for runs in executions.values():
        runs.sort(key=lambda execution: execution.start)
    return executions


def _closed(run: dict, end: Optional[datetime], completed: bool) -> Execution:
    return Execution(run["task_id"], run["attempt"], run["pid"], run["start"], end, completed)


def load_run_ends(conn) -> Dict[Tuple[int, int], List[datetime]]:
    """When each (task, attempt)'s runs were recorded over by the worker that ran them or
    the supervisor that reaped it: either saw the run stop. (A rescuer's record, worker
    NULL, is left out: it is written without seeing anything stop.)"""
    with conn.cursor() as cur:
        cur.execute("SELECT task_id, attempt, finished_at FROM procqueue.task_runs WHERE worker IS NOT NULL "
                    "ORDER BY finished_at")
        ends: Dict[Tuple[int, int], List[datetime]] = defaultdict(list)
        for task_id, attempt, finished_at in cur.fetchall():
            ends[(task_id, attempt)].append(finished_at)
        return ends


def load_run_starts(conn) -> Dict[int, List[datetime]]:
    """When the database recorded each task's runs as started (for a recurring run, the
    moment it was allowed to start)."""
    with conn.cursor() as cur:
        cur.execute("SELECT task_id, started_at FROM procqueue.task_runs WHERE started_at IS NOT NULL")
        starts: Dict[int, List[datetime]] = defaultdict(list)
        for task_id, started_at in cur.fetchall():
            starts[task_id].append(started_at)
        return starts


def first_after(moments: Iterable[datetime], start: datetime) -> Optional[datetime]:
    later = [at for at in moments if at >= start]
    return min(later) if later else None


def load_operator_acts(conn, outcome: str) -> Dict[int, List[datetime]]:
    """When the chaos operator cancelled (or retried) each task, by the database's clock."""
    with conn.cursor() as cur:
        cur.execute("SELECT task_id, finished_at FROM procqueue.task_runs WHERE outcome = %s "
                    "AND actor = 'chaos operator' ORDER BY finished_at", (outcome,))
        acts: Dict[int, List[datetime]] = defaultdict(list)
        for task_id, at in cur.fetchall():
            acts[task_id].append(at)
        return acts


def load_stuck_kills(conn) -> Dict[Tuple[int, int], datetime]:
    """(task, attempt) of each run its supervisor ended by killing the worker, and when."""
    with conn.cursor() as cur:
        cur.execute("SELECT task_id, attempt, finished_at FROM procqueue.task_runs "
                    "WHERE outcome = 'timed_out' AND error LIKE '%%worker killed%%'")
        return {(task_id, attempt): finished_at for task_id, attempt, finished_at in cur.fetchall()}


class Checker:
    def __init__(self, conn, attacks: Sequence[Attack], *, deaths: Dict[int, List[datetime]],
                 recurring_cutoff: datetime, acknowledged: Set[str]) -> None:
        self.tasks = load_tasks(conn)
        self.executions = load_executions(conn)
        self.run_starts = load_run_starts(conn)
        self.run_ends = load_run_ends(conn)
        self.stuck_ends = load_stuck_kills(conn)
        self.cancels = load_operator_acts(conn, "cancelled")
        self.retries = load_operator_acts(conn, "retried")
        self.attacks = list(attacks)
        self.acknowledged = acknowledged
        # Every kill the attacker made, and every death the harness saw, by pid: a pid may
        # be reused, so each is a list, and an execution takes the first after its start.
        self.kills: Dict[int, List[datetime]] = defaultdict(list)
        for attack in self.attacks:
            if attack.kind in KILLS:
                for pid in attack.pids:
                    self.kills[pid].append(attack.at)
        self.deaths: Dict[int, List[datetime]] = defaultdict(list)
        for pid, ats in list(deaths.items()) + list(self.kills.items()):
            self.deaths[pid] += ats
        self.stuck_kills = self.find_stuck_kills()
        self.recurring_cutoff = recurring_cutoff
        self.findings = Findings()

    def check(self, orphans: Sequence[str]) -> Findings:
        self.check_states()
        self.check_ran_as_recorded()
        self.check_overlaps()
        self.check_reruns()
        self.check_recurring()
        self.check_cancels()
        self.check_processes(orphans)
        return self.findings

    def find_stuck_kills(self) -> Dict[int, List[datetime]]:
        """Workers their supervisor killed as stuck, by pid, and when: the process of an
        execution whose run was recorded `timed_out ... worker killed`."""
        killed: Dict[int, List[datetime]] = defaultdict(list)
        for task_id, runs in self.executions.items():
            for execution in runs:
                end = self.stuck_ends.get((task_id, execution.attempt))
                if end is not None and not execution.completed and end >= execution.start:
                    killed[execution.pid].append(end)
        return killed

    # -- states ---------------------------------------------------------------------------

    def check_states(self) -> None:
        states = Counter(task.state for task in self.tasks.values())
        self.findings.figures["states"] = dict(sorted(states.items()))
        self.findings.figures["tasks"] = len(self.tasks)
        cancelled = [task.id for task in self.tasks.values() if task.state == "cancelled" and task.id not in self.cancels]
        if cancelled:
            self.findings.violate(f"{len(cancelled)} tasks ended cancelled that nobody cancelled", cancelled)
        running = [task.id for task in self.tasks.values() if task.state == "running"]
        if running:
            self.findings.violate(f"{len(running)} tasks left running after every processor stopped", running)
        stuck = [task.id for task in self.tasks.values()
                 if task.state == "queued" and task.recurring_slot is None and task.run_at <= self.recurring_cutoff]
        if stuck:
            self.findings.violate(f"{len(stuck)} tasks due before the drain still queued after it", stuck)
        unexplained = [task.id for task in self.tasks.values() if task.state == "failed" and not task.last_error]
        if unexplained:
            self.findings.violate(f"{len(unexplained)} tasks failed without a recorded error", unexplained)
        missed = [task.id for task in self.tasks.values() if task.state == "missed" and task.recurring_slot is None]
        if missed:
            self.findings.violate(f"{len(missed)} tasks that are not recurring runs ended missed", missed)
        missing = self.acknowledged - {task.tag for task in self.tasks.values()}
        if missing:
            self.findings.violate(f"{len(missing)} enqueued tasks are not in the queue at all", sorted(missing))
        over = [task.id for task in self.tasks.values() if task.attempts > task.max_attempts]
        if over:
            self.findings.violate(f"{len(over)} tasks with more attempts than max_attempts", over)

    def check_ran_as_recorded(self) -> None:
        """Succeeded: its work was done at least once. Failed: it did start, at least once."""
        unrun = [t.id for t in self.tasks.values() if t.state == "succeeded"
                 and not any(e.completed for e in self.executions.get(t.id, []))]
        if unrun:
            self.findings.violate(f"{len(unrun)} tasks succeeded without their work being done", unrun)
        failed_unrun = [t.id for t in self.tasks.values() if t.state == "failed" and not self.executions.get(t.id)]
        self.findings.figures["failed_unrun"] = len(failed_unrun)
        if failed_unrun:
            self.findings.violate(f"{len(failed_unrun)} tasks failed that never started", failed_unrun)
        causes = Counter(_failure_cause(t.last_error) for t in self.tasks.values() if t.state == "failed")
        self.findings.figures["failed_by_cause"] = dict(causes.most_common())

    # -- executions -----------------------------------------------------------------------

    def ended_at(self, execution: Execution) -> Optional[datetime]:
        """When an execution was over for certain: its own last row (end, fail, or
        interrupted on its way out); else the earliest of its process's death (killed by
        the attacker, or seen gone by the harness, up to 0.1 s late) and its run's
        record by the worker or the supervisor that reaped it."""
        if execution.end is not None:
            return execution.end
        return first_after(self.deaths[execution.pid] + self.run_ends.get((execution.task_id, execution.attempt), []),
                           execution.start)

    def check_overlaps(self) -> None:
        overlapping, unverifiable = [], []
        recurring: Dict[str, List[Execution]] = defaultdict(list)
        for task_id, runs in self.executions.items():
            task = self.tasks.get(task_id)
            if task is not None and task.recurring_slot is not None:
                recurring[task.name] += runs
            else:
                self._find_overlaps(runs, overlapping, unverifiable)
        for runs in recurring.values():  # one timeline per recurring task
            self._find_overlaps(sorted(runs, key=lambda execution: execution.start), overlapping, unverifiable)
        self.findings.figures["overlaps_unverifiable"] = len(unverifiable)
        if overlapping:
            self.findings.violate(f"{len(overlapping)} executions ran beside another of the same task", overlapping)
        if unverifiable:
            self.findings.violate(f"{len(unverifiable)} executions followed one whose end is unknown", unverifiable)

    def _find_overlaps(self, runs: List[Execution], overlapping: list, unverifiable: list) -> None:
        busy_until: Optional[datetime] = None
        holder: Optional[Execution] = None
        for execution in runs:
            if holder is not None and (busy_until is None or execution.start < busy_until):
                until = f"{busy_until:%H:%M:%S.%f}" if busy_until else "?"
                (unverifiable if busy_until is None else overlapping).append(
                    f"task {execution.task_id} pid {execution.pid} from {execution.start:%H:%M:%S.%f} beside task "
                    f"{holder.task_id} pid {holder.pid} from {holder.start:%H:%M:%S.%f} until {until}")
            end = self.ended_at(execution)
            if busy_until is None or end is None or end > busy_until:
                busy_until, holder = end, execution

    def database_away(self, end: datetime, killed: datetime) -> bool:
        """Whether a restart of PostgreSQL kept the outcome from being written: its outage
        (away, then until the processors were back) overlapped the flush window after the
        work ended, and the kill came soon after it was over (a worker reconnects with
        backoff: 0.5 s, then 1 s, 2 s...)."""
        for attack in self.attacks:
            if not attack.kind.startswith("restart"):
                continue
            over = attack.at + timedelta(seconds=(attack.seconds or 0) + (attack.recovered or RECOVERY_ALLOWANCE_S))
            if attack.at <= killed and over >= end - FLUSH_WINDOW_LIMIT \
                    and killed - max(end, over) <= FLUSH_WINDOW_LIMIT + RECONNECT_ALLOWANCE:
                return True
        return False

    def check_reruns(self) -> None:
        """Work done and then done again: a duplicate, to be explained by a kill of its
        process while its outcome waited to be written. Work cut short and done again is
        what at-least-once promises: a retry (the attempt counted: it failed, timed out,
        or its worker died under it) or a re-run (uncharged: its node or supervisor died,
        or a drain ran out of time). Those are counted, not judged."""
        retries, reruns, in_window, in_outage, gaps, unexplained = 0, 0, 0, 0, [], []
        for task_id, runs in self.executions.items():
            if task_id in self.tasks and self.tasks[task_id].recurring_slot is not None:
                continue  # checked by check_recurring: a recurring slot never starts twice
            for earlier, later in zip(runs, runs[1:]):
                if self.retried_between(task_id, earlier.start, later.start):
                    continue  # an operator sent it back to the queue: running it again is asked for
                if not earlier.completed:
                    if later.attempt > earlier.attempt:
                        retries += 1
                    else:
                        reruns += 1
                    continue
                killed_at = first_after(self.kills[earlier.pid] + self.stuck_kills[earlier.pid],
                                        earlier.end - END_ROW_LAG)
                gap = max(killed_at - earlier.end, timedelta(0)) if killed_at is not None else None
                # An outage first: a Postgres restart holds outcomes back for as long as it
                # lasts, which says nothing of the flush window the figure below measures.
                if gap is not None and self.database_away(earlier.end, killed_at):
                    in_outage += 1
                elif gap is not None and gap <= FLUSH_WINDOW_LIMIT:
                    in_window += 1
                    gaps.append(gap.total_seconds())
                else:
                    unexplained.append(f"task {task_id} (done by pid {earlier.pid} at {earlier.end:%H:%M:%S.%f})")
        self.findings.figures["retries"] = retries
        self.findings.figures["reruns_uncharged"] = reruns
        self.findings.figures["reruns_in_flush_window"] = in_window
        self.findings.figures["reruns_in_outage"] = in_outage
        self.findings.figures["flush_window_max_s"] = max(gaps) if gaps else None
        if unexplained:
            self.findings.violate(f"{len(unexplained)} completed tasks ran again with no kill to explain it",
                                  unexplained)

    def retried_between(self, task_id: int, after: datetime, before: datetime) -> bool:
        return any(after <= at <= before for at in self.retries.get(task_id, []))

    # -- an operator's hand ---------------------------------------------------------------

    def check_cancels(self) -> None:
        """A task cancelled never starts again unless retried after; one running when it
        was cancelled is stopped by its processor within CANCEL_STOP_LIMIT; and one not
        retried after its last cancel ends cancelled."""
        started_after, slow, unstopped, stop_times, wrong_state, begun_in_batch = [], [], [], [], [], 0
        for task_id, cancels in self.cancels.items():
            runs = self.executions.get(task_id, [])
            for cancelled_at in cancels:
                for execution in runs:
                    if self.retried_between(task_id, cancelled_at, execution.start):
                        continue
                    if execution.start > cancelled_at + BEGUN_IN_BATCH_LIMIT:
                        started_after.append(f"task {task_id} (pid {execution.pid} at {execution.start:%H:%M:%S.%f})")
                        continue
                    if execution.start > cancelled_at:
                        begun_in_batch += 1  # claimed before the cancel, begun after: stopped as a running one
                    if execution.end is None or execution.end > cancelled_at:
                        over = self.ended_at(execution)
                        if over is None:
                            unstopped.append(f"task {task_id} (pid {execution.pid})")
                            continue
                        seconds = max((over - cancelled_at).total_seconds(), 0.0)
                        stop_times.append(seconds)
                        if seconds > CANCEL_STOP_LIMIT.total_seconds():
                            slow.append(f"task {task_id} ({seconds:.1f}s)")
            task = self.tasks.get(task_id)
            if task is not None and task.state != "cancelled" and not self.retried_between(
                    task_id, cancels[-1], datetime.max.replace(tzinfo=cancels[-1].tzinfo)):
                wrong_state.append(f"task {task_id} ({task.state})")
        self.findings.figures["cancel_to_stop_s"] = stop_times
        self.findings.figures["cancel_begun_in_batch"] = begun_in_batch
        self.findings.figures["retried_after_cancel"] = sum(
            1 for task_id, cancels in self.cancels.items() if any(at > cancels[0] for at in self.retries.get(task_id, [])))
        if started_after:
            self.findings.violate(f"{len(started_after)} executions started after their task was cancelled",
                                  started_after)
        if slow or unstopped:
            self.findings.violate(f"{len(slow) + len(unstopped)} cancelled tasks kept running over "
                                  f"{CANCEL_STOP_LIMIT.total_seconds():g}s", slow + unstopped)
        if wrong_state:
            self.findings.violate(f"{len(wrong_state)} tasks cancelled, never retried, not ended cancelled",
                                  wrong_state)

    # -- recurring ------------------------------------------------------------------------

    def check_recurring(self) -> None:
        slots = [task for task in self.tasks.values() if task.recurring_slot is not None]
        self.findings.figures["recurring_slots"] = dict(sorted(Counter(task.state for task in slots).items()))
        twice = [task.id for task in slots if len(self.executions.get(task.id, [])) > 1]
        if twice:
            self.findings.violate(f"{len(twice)} recurring slots started more than once", twice)
        late, margins = [], []
        for task in slots:
            for started in self.run_starts.get(task.id, []):  # when the database let it start
                margin = (started - task.expires_at).total_seconds()
                margins.append(margin)
                if margin >= 0:
                    late.append(f"task {task.id} started {margin:.3f}s after the next slot was due")
        self.findings.figures["recurring_latest_start_s"] = max(margins) if margins else None
        unrecorded = [task.id for task in slots if self.executions.get(task.id) and not self.run_starts.get(task.id)]
        if unrecorded:  # a recurring run must be recorded started before its function runs
            self.findings.violate(f"{len(unrecorded)} recurring runs ran with no start recorded", unrecorded)
        if late:
            self.findings.violate(f"{len(late)} recurring runs started once the next slot was due", late)
        missed_unexplained = [task.id for task in slots if task.state == "missed" and not task.last_error]
        if missed_unexplained:
            self.findings.violate(f"{len(missed_unexplained)} missed slots without a recorded reason",
                                  missed_unexplained)

    # -- processes ------------------------------------------------------------------------

    def check_processes(self, orphans: Sequence[str]) -> None:
        self.findings.figures["orphans"] = len(orphans)
        if orphans:
            self.findings.violate(f"{len(orphans)} processes outlived the run", orphans)
        bad_exits = [attack for attack in self.attacks if attack.kind == "sigterm" and not attack.ok]
        if bad_exits:
            self.findings.violate(f"{len(bad_exits)} processors did not drain and exit 0 on SIGTERM",
                                  [attack.node for attack in bad_exits])
        crashed = [attack.node for attack in self.attacks if attack.kind == "exit"]
        if crashed:
            self.findings.violate(f"{len(crashed)} processors exited though nobody stopped them", crashed)


def _failure_cause(error: Optional[str]) -> str:
    """The kind of a failure, from its recorded error, for the report."""
    text = error or ""
    for marker, cause in (("flaky:", "raised (flaky)"), ("TaskTimeoutError", "timed out"),
                          ("past its timeout; worker killed", "timed out (killed)"),
                          ("killed by signal 9", "worker killed"), ("lost with its processor", "lost 3 times")):
        if marker in text:
            return cause
    return text.strip().splitlines()[-1][:60] if text.strip() else "?"


def summarise(values: Iterable[Optional[float]]) -> str:
    figures = sorted(v for v in values if v is not None)
    if not figures:
        return "-"
    median = figures[len(figures) // 2]
    return f"median {median:.2f}s, max {figures[-1]:.2f}s (n={len(figures)})"
