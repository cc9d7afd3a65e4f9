"""Peers: procqueue next to pgqueuer, procrastinate and Celery, side by side in one run.

    .venv/bin/python bench/peers.py                  # all tests, 3 rounds (about 35 min)
    .venv/bin/python bench/peers.py --quick          # fewer tasks, 1 round (about 5 min)

Installs the peers into a benchmark-only virtualenv (.bench-venv/, made once), starts a
throwaway PostgreSQL (durable: fsync on, as in production) with a database per system,
and a Redis of its own for Celery (or leaves Celery out, saying why). Then runs every test
for every configuration, interleaved, over several rounds, and prints the medians and
procqueue's advantage over each peer computed within each round (a ratio holds on a noisy
machine where absolute figures do not). Writes the figures as JSON and a chart as PNG.

Tests: enqueue one at a time and in bulk; drain N no-op tasks, and tasks that wait 1 ms
and 10 ms (as on I/O); pickup latency on an idle processor; idle cost (CPU, and
transactions reaching Postgres or commands reaching Redis); memory (USS) after draining
many tasks. Every system runs at its own defaults except for what the row's label says.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import psutil
import psycopg2

import common
from databases import run_sql, with_database
from helpers import start_run_task_processor

PEERS_DIR = common.BENCH_DIR / "peers"
BENCH_VENV = common.REPO / ".bench-venv"
# What the peers are measured at; change a version here and the virtualenv is remade.
PEER_REQUIREMENTS = ("pgqueuer==1.6.0", "asyncpg>=0.30", "procrastinate==3.10.0", "celery[redis]==5.7.0",
                     "matplotlib>=3.8",
                     # pgqueuer 1.6.0's `pgq run` fails with typer 0.29 (its log-level enum
                     # arrives as a str: AttributeError 'str' object has no attribute 'name').
                     "typer==0.16.0")
HEADLINE = "procqueue"
POLL_SECONDS = 0.1  # a count(*) on the same 2-core server: not too often
STATS_IDLE_REPORT_SECONDS = 10  # PGSTAT_IDLE_INTERVAL: an idle backend's counts are reported after this


# -- what is measured ------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One row: a system and how its workers are started."""

    label: str
    system: str
    worker_args: Sequence[str] = ()
    processes: int = 1  # separate worker commands (pgqueuer scales out by processes)


CONFIGS = (
    Config("procqueue", "procqueue", ("--numthreads", "2")),  # the headline: defaults, 2 workers (issue 14)
    Config("procqueue, pop 50", "procqueue", ("--numthreads", "2", "--queuepopsize", "50")),
    Config("pgqueuer", "pgqueuer"),
    Config("pgqueuer x2, batch 50", "pgqueuer", ("--batch-size", "50"), processes=2),
    Config("procrastinate, concurrency 4", "procrastinate", ("--concurrency", "4")),
    Config("celery prefork 4", "celery", ("--concurrency", "4", "--pool", "prefork")),
)


@dataclass
class Options:
    rounds: int
    tasks: int
    work_tasks: int
    single_tasks: int
    samples: int
    idle_seconds: float
    memory_tasks: int
    tests: Sequence[str]
    long_test_rounds: int  # idle and memory take minutes: run in the first rounds only
    out: Path
    chart: Path


# -- the benchmark's own virtualenv ----------------------------------------------------------

def ensure_bench_venv() -> Path:
    return common.ensure_venv(BENCH_VENV, PEER_REQUIREMENTS, "the peers")


# -- Redis, for Celery ---------------------------------------------------------------------------

class Redis:
    """A redis-server of our own on a free port, keeping nothing on disk."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                self.command("PING")
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *words: str) -> bytes:
        """One command over RESP; the raw reply (enough for PING, FLUSHALL and INFO)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(("*%d\r\n" % len(words) + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)).encode())
            reply = b""
            while not complete(reply):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            return reply

    def commands_processed(self) -> int:
        for line in self.command("INFO", "stats").decode().splitlines():
            if line.startswith("total_commands_processed:"):
                return int(line.split(":", 1)[1])
        raise RuntimeError("INFO stats has no total_commands_processed")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def complete(reply: bytes) -> bool:
    """A whole RESP reply: a line, or a bulk string ($N, then N bytes and CRLF)."""
    if not reply.endswith(b"\r\n"):
        return False
    if not reply.startswith(b"$"):
        return True
    header, _, rest = reply.partition(b"\r\n")
    return int(header[1:]) < 0 or len(rest) >= int(header[1:]) + 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- one system: its database, its counting, its workers ---------------------------------------

# What is left to run, per system, read by the harness itself (Celery: its done file).
REMAINING_SQL = {
    "procqueue": "SELECT count(*) FROM procqueue.tasks WHERE state IN ('queued', 'running')",
    "pgqueuer": "SELECT count(*) FROM pgqueuer",
    "procrastinate": "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')",
}
RESET_SQL = {
    "procqueue": "TRUNCATE procqueue.tasks, procqueue.task_runs, procqueue.recurring_tasks, procqueue.processors "
                 "RESTART IDENTITY",
    "pgqueuer": "TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics",
    "procrastinate": "TRUNCATE procrastinate_jobs, procrastinate_events, procrastinate_periodic_defers, "
                     "procrastinate_workers RESTART IDENTITY CASCADE",
}


class System:
    """A system under test: its own database (or Redis), reset between tests."""

    def __init__(self, name: str, admin_url: str, python: Path, scratch: Path, redis: Optional[Redis],
                 fast_disk: bool = False) -> None:
        self.name = name
        self.python = python
        self.scratch = scratch
        self.redis = redis
        self.dbname = f"peers_{name}"
        run_sql(admin_url, f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)', f'CREATE DATABASE "{self.dbname}"')
        if fast_disk:  # per database, as for the bench database: an external server's others unaffected
            run_sql(admin_url, f'ALTER DATABASE "{self.dbname}" SET synchronous_commit = off')
        self.admin_url = admin_url
        self.url = with_database(admin_url, self.dbname)
        self.done_file = scratch / f"{name}.done"
        self.pickup_file = scratch / f"{name}.pickup"
        self.peer("prepare")
        self.conn = common.connect(self.url)

    def env(self) -> Dict[str, str]:
        env = dict(os.environ, PEER_DATABASE_URL=self.url, PEER_DONE_FILE=str(self.done_file),
                   PEER_PICKUP_FILE=str(self.pickup_file), PGDSN=self.url)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PEERS_DIR), env.get("PYTHONPATH")]))
        if self.redis is not None:
            env["PEER_REDIS_URL"] = self.redis.url
        return env

    def peer(self, *args: str) -> str:
        result = subprocess.run([str(self.python), str(PEERS_DIR / "peer.py"), self.name, *args], env=self.env(),
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{self.name} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def reset(self) -> None:
        if self.name == "celery":
            self.redis.command("FLUSHALL")
        else:
            with self.conn.cursor() as cur:
                cur.execute(RESET_SQL[self.name])
                # Every system starts from the same state: fresh statistics, and a
                # checkpoint just taken so none falls due in the middle of a measurement.
                cur.execute("VACUUM ANALYZE")
                with contextlib.suppress(psycopg2.errors.InsufficientPrivilege):
                    cur.execute("CHECKPOINT")
        for path in (self.done_file, self.pickup_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def remaining(self, enqueued: int) -> int:
        if self.name == "celery":
            try:
                return max(0, enqueued - self.done_file.stat().st_size)
            except FileNotFoundError:
                return enqueued
        with self.conn.cursor() as cur:
            cur.execute(REMAINING_SQL[self.name])
            return cur.fetchone()[0]

    def enqueue(self, mode: str, count: int, work_ms: float = 0) -> Optional[float]:
        """Tasks per second of `count` tasks enqueued one at a time or in bulk (None: no bulk)."""
        figures = json.loads(self.peer("enqueue", mode, str(count), "--work-ms", str(work_ms)).strip().splitlines()[-1])
        return None if figures["seconds"] is None else count / figures["seconds"]

    def fill(self, count: int, work_ms: float = 0) -> None:
        """Queue `count` tasks before a drain, the fastest way the system has."""
        self.enqueue("bulk" if self.name != "celery" else "single", count, work_ms)
        if self.remaining(count) != count:
            raise RuntimeError(f"{self.name}: {self.remaining(count)} tasks queued, expected {count}")

    def transactions(self) -> int:
        """Transactions and commands reaching the system's store so far."""
        if self.name == "celery":
            return self.redis.commands_processed()
        admin = common.connect(self.admin_url)
        try:
            with admin.cursor() as cur:
                cur.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                            (self.dbname,))
                return cur.fetchone()[0]
        finally:
            admin.close()

    def store_processes(self) -> List[psutil.Process]:
        """The store's processes, whose CPU counts too: redis-server for Celery; for the
        others the PostgreSQL server's (found through its data directory's pid file, so
        only a server on this machine; none otherwise)."""
        if self.name == "celery":
            return [psutil.Process(self.redis.proc.pid)]
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT current_setting('data_directory')")
                postmaster = psutil.Process(int((Path(cur.fetchone()[0]) / "postmaster.pid").read_text().split()[0]))
            return [postmaster] + postmaster.children(recursive=True)
        except (OSError, ValueError, IndexError, psutil.Error, psycopg2.Error):
            return []

    def pickups(self) -> List[float]:
        try:
            return [float(line) for line in self.pickup_file.read_text().split()]
        except FileNotFoundError:
            return []

    def close(self) -> None:
        self.conn.close()
        run_sql(self.admin_url, f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')


class Workers:
    """A configuration's worker processes, each in a session of its own."""

    def __init__(self, config: Config, system: System) -> None:
        self.config = config
        self.log_path = system.scratch / f"{config.system}.log"
        self.log = open(self.log_path, "wb")
        self.procs: List[subprocess.Popen] = []
        for number in range(config.processes):
            self.procs.append(self.start(system, number))
        self.roots = [psutil.Process(proc.pid) for proc in self.procs]

    def start(self, system: System, number: int) -> subprocess.Popen:
        bin_dir = system.python.parent
        if self.config.system == "procqueue":
            status = system.scratch / f"status-{number}.json"
            return start_run_task_processor(
                ["--import", "procqueue_side", *self.config.worker_args], database_url=system.url,
                import_path=[PEERS_DIR], status_file=status, stdout=self.log,
                env={**system.env(), "TMPDIR": str(system.scratch)}, python=str(system.python))
        command = {
            "pgqueuer": [str(bin_dir / "pgq"), "run", "pgqueuer_side:create"],
            "procrastinate": [str(bin_dir / "procrastinate"), "--app", "procrastinate_side.app", "worker"],
            "celery": [str(bin_dir / "celery"), "-A", "celery_side", "worker"],
        }[self.config.system] + list(self.config.worker_args)
        return subprocess.Popen(command, env=system.env(), stdout=self.log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def family(self) -> List[psutil.Process]:
        found = []
        for root in self.roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                found += [root] + root.children(recursive=True)
        return found

    def cpu_seconds(self) -> float:
        return cpu_of(self.family())

    def memory(self) -> Dict[str, float]:
        """In MB, of the largest top-level process and the largest process under one: USS
        (its own pages) and PSS (shared pages split among their sharers). A forked worker
        shares its parent's pages until it writes them: its USS alone flatters it."""
        tops, children = [], []
        for root in self.roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                tops.append(root.memory_full_info())
                children += [child.memory_full_info() for child in root.children(recursive=True)]
        workers = children or tops
        return {"main_uss_mb": max(m.uss for m in tops) / 2 ** 20, "worker_uss_mb": max(m.uss for m in workers) / 2 ** 20,
                "main_pss_mb": max(m.pss for m in tops) / 2 ** 20, "worker_pss_mb": max(m.pss for m in workers) / 2 ** 20}

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.config.label}: a worker exited early with {proc.returncode}; its log:\n{tail}")

    def stop(self) -> None:
        family = self.family()  # before: once the top process is gone its children are init's
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for process in family:  # procqueue's workers have process groups of their own
            with contextlib.suppress(psutil.Error):
                process.kill()
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.log.close()


def cpu_of(processes: Sequence[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


@contextlib.contextmanager
def running(config: Config, system: System):
    workers = Workers(config, system)
    try:
        yield workers
    finally:
        workers.stop()


# -- the tests ------------------------------------------------------------------------------------

def wait_until_drained(system: System, workers: Workers, enqueued: int, timeout: float) -> Dict[str, float]:
    """Poll until nothing is left. The rate counts from the first task seen done, so a
    system's start-up time is not charged to its drain (its CPU is, from then on)."""
    deadline = time.monotonic() + timeout
    first_at = first_left = first_cpu = first_store = None
    while True:
        left = system.remaining(enqueued)
        now = time.monotonic()
        if first_at is None and left < enqueued:
            first_at, first_left, first_cpu, first_store = now, left, workers.cpu_seconds(), cpu_by_pid(system)
        if left == 0:
            break
        if now > deadline:
            raise RuntimeError(f"{workers.config.label}: {left} of {enqueued} tasks still queued after {timeout:g}s")
        workers.check_alive()
        time.sleep(POLL_SECONDS)
    seconds = max(now - first_at, POLL_SECONDS)
    worker_cpu = workers.cpu_seconds() - first_cpu
    last_store = cpu_by_pid(system)
    # Backends started since count from zero; the harness's own polls are in it too.
    store_cpu = sum(cpu - first_store.get(pid, 0.0) for pid, cpu in last_store.items())
    return {"tasks_per_s": first_left / seconds, "cpu_us_per_task": worker_cpu / first_left * 1e6,
            "total_cpu_us_per_task": (worker_cpu + store_cpu) / first_left * 1e6 if last_store else None}


def cpu_by_pid(system: System) -> Dict[int, float]:
    """CPU seconds of each of the store's processes now (the tree is read afresh: the
    workers' backends may be newer than the last reading)."""
    found = {}
    for process in system.store_processes():
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            found[process.pid] = times.user + times.system
    return found


def test_enqueue(config: Config, system: System, options: Options) -> Dict[str, Optional[float]]:
    system.reset()
    single = system.enqueue("single", options.single_tasks)
    system.reset()
    bulk = system.enqueue("bulk", options.tasks)
    return {"single_per_s": single, "bulk_per_s": bulk}


def drain_test(work_ms: float) -> Callable[[Config, System, Options], Dict[str, float]]:
    def test(config: Config, system: System, options: Options) -> Dict[str, float]:
        count = options.tasks if not work_ms else options.work_tasks
        system.reset()
        system.fill(count, work_ms)
        with running(config, system) as workers:
            return wait_until_drained(system, workers, count, timeout=600)

    return test


def test_pickup(config: Config, system: System, options: Options) -> Dict[str, float]:
    system.reset()
    with running(config, system) as workers:
        settle_idle(workers)
        system.peer("stamped", str(options.samples), "--spacing", "0.05")
        deadline = time.monotonic() + 30
        while len(system.pickups()) < options.samples and time.monotonic() < deadline:
            time.sleep(0.1)
        delays = sorted(d * 1000 for d in system.pickups())
    if len(delays) < options.samples:
        raise RuntimeError(f"{config.label}: {len(delays)} of {options.samples} stamped tasks ran")
    return {"p50_ms": common.percentile(delays, 50), "p95_ms": common.percentile(delays, 95),
            "p99_ms": common.percentile(delays, 99),
            "max_ms": delays[-1]}


def test_idle(config: Config, system: System, options: Options) -> Dict[str, float]:
    system.reset()
    with running(config, system) as workers:
        # Postgres counts a backend's transactions when it reports them: at once only if
        # a second has passed since its last report, else once it has been idle for 10 s.
        # Start-up's transactions (schemas checked, schedules registered) must not land
        # in the window measured.
        settle_idle(workers, seconds=STATS_IDLE_REPORT_SECONDS + 5)
        cpu, xacts, started = workers.cpu_seconds(), system.transactions(), time.monotonic()
        time.sleep(options.idle_seconds)
        workers.check_alive()
        seconds = time.monotonic() - started
        spent = workers.cpu_seconds() - cpu
        reached = system.transactions() - xacts - (1 if config.system == "celery" else 0)  # our own INFO
    return {"cpu_percent": spent / seconds * 100, "xacts_per_s": reached / seconds}


def test_memory(config: Config, system: System, options: Options) -> Dict[str, float]:
    system.reset()
    system.fill(options.memory_tasks)
    with running(config, system) as workers:
        wait_until_drained(system, workers, options.memory_tasks, timeout=1800)
        return workers.memory()


def settle_idle(workers: Workers, seconds: float = 5) -> None:
    """Started and quiet: a few seconds for the slowest to boot (Celery), then idle."""
    time.sleep(seconds)
    workers.check_alive()


TESTS: Dict[str, Callable[[Config, System, Options], Dict[str, float]]] = {
    "enqueue": test_enqueue,
    "drain": drain_test(0),
    "drain_1ms": drain_test(1),
    "drain_10ms": drain_test(10),
    "pickup": test_pickup,
    "idle": test_idle,
    "memory": test_memory,
}
LONG_TESTS = ("idle", "memory")
# Per figure: whether more is better (for procqueue's advantage: >1 means procqueue is better).
HIGHER_IS_BETTER = {"single_per_s": True, "bulk_per_s": True, "tasks_per_s": True}


# -- running it all ----------------------------------------------------------------------------

def run_rounds(options: Options, systems: Dict[str, System], configs: Sequence[Config]) -> dict:
    """results[test][label] = one dict of figures per round."""
    results: Dict[str, Dict[str, List[dict]]] = {test: {} for test in options.tests}
    for round_number in range(1, options.rounds + 1):
        for test in options.tests:
            if test in LONG_TESTS and round_number > options.long_test_rounds:
                continue
            order = list(configs)
            random.shuffle(order)  # no configuration always runs right after the same one
            for config in order:
                if test == "enqueue" and config.label != first_of_system(configs, config.system).label:
                    continue  # enqueueing does not depend on how the workers run
                common.progress(f"round {round_number}/{options.rounds}: {test}, {config.label}")
                figures = TESTS[test](config, systems[config.system], options)
                results[test].setdefault(config.label, []).append(figures)
    return results


def first_of_system(configs: Sequence[Config], system: str) -> Config:
    return next(config for config in configs if config.system == system)


def summarise(results: dict, configs: Sequence[Config]) -> dict:
    """Medians per figure, and procqueue's advantage over each row computed within each
    round, then the median of those."""
    summary = {}
    for test, by_label in results.items():
        headline = by_label.get(HEADLINE, [])
        summary[test] = {}
        for label, rounds in sorted(by_label.items(), key=lambda item: [c.label for c in configs].index(item[0])):
            figures = {}
            for name in rounds[0]:
                values = [r[name] for r in rounds if r[name] is not None]
                if not values:
                    figures[name] = {"median": None, "advantage": None}
                    continue
                advantages = []
                for ours, theirs in zip(headline, rounds):
                    if ours.get(name) and theirs.get(name):
                        higher = HIGHER_IS_BETTER.get(name, False)
                        advantages.append(ours[name] / theirs[name] if higher else theirs[name] / ours[name])
                figures[name] = {"median": statistics.median(values),
                                 "advantage": statistics.median(advantages) if advantages else None}
            summary[test][label] = figures
    return summary


def print_summary(summary: dict) -> None:
    for test, by_label in summary.items():
        names = list(next(iter(by_label.values())).keys())
        headers = ["configuration", *names, *[f"{HEADLINE} adv. {n}" for n in names]]
        rows = []
        for label, figures in by_label.items():
            rows.append([label, *[shown(figures[n]["median"]) for n in names],
                         *["-" if label == HEADLINE or figures[n]["advantage"] is None
                           else f'{figures[n]["advantage"]:.2f}x' for n in names]])
        print(f"\n{test}")
        common.print_table(headers, rows)
    print(f"\n'{HEADLINE} adv.': how many times better procqueue at its defaults did than the row, the "
          "median of ratios taken within each round (>1: procqueue better; for rates more is better, "
          "for latency, CPU, idle cost and memory less is).")


def shown(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def parse_options():
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=20000, help="no-op tasks per drain and bulk enqueue")
    parser.add_argument("--work-tasks", type=int, default=5000, help="tasks per drain with 1 ms and 10 ms of work")
    parser.add_argument("--single-tasks", type=int, default=2000, help="tasks enqueued one at a time")
    parser.add_argument("--samples", type=int, default=200, help="pickup latency samples")
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--memory-tasks", type=int, default=100000)
    parser.add_argument("--tests", default=",".join(TESTS), help=f"comma-separated, of {', '.join(TESTS)}")
    parser.add_argument("--long-test-rounds", type=int, default=1,
                        help=f"rounds that run {' and '.join(LONG_TESTS)} (minutes each; default 1: the first)")
    parser.add_argument("--only", default="", help="comma-separated systems (default: all)")
    parser.add_argument("--quick", action="store_true", help="1 round, fewer tasks, 10 s idle: a smoke run")
    parser.add_argument("--out", type=Path, default=common.BENCH_DIR / "results" / "peers.json")
    parser.add_argument("--chart", type=Path, default=common.BENCH_DIR / "results" / "peers.png")
    args = parser.parse_args()
    tests = [t for t in args.tests.split(",") if t]
    unknown = [t for t in tests if t not in TESTS]
    if unknown:
        parser.error(f"unknown test {unknown[0]!r} (expected some of {', '.join(TESTS)})")
    if args.quick:
        args.rounds, args.tasks, args.work_tasks, args.single_tasks = 1, 5000, 500, 500
        args.samples, args.idle_seconds, args.memory_tasks = 50, 10, 10000
    args.only_systems = [s for s in args.only.split(",") if s]
    systems = sorted({config.system for config in CONFIGS})
    if any(s not in systems for s in args.only_systems):
        parser.error(f"unknown system in --only {args.only!r} (expected some of {', '.join(systems)})")
    options = Options(args.rounds, args.tasks, args.work_tasks, args.single_tasks, args.samples, args.idle_seconds,
                      args.memory_tasks, tests, args.long_test_rounds, args.out, args.chart)
    return options, args


def main() -> None:
    options, args = parse_options()
    python = ensure_bench_venv()
    configs = [c for c in CONFIGS if not args.only_systems or c.system in args.only_systems]
    scratch = Path(tempfile.mkdtemp(prefix="procqueue-peers-"))
    redis = None
    try:
        if any(c.system == "celery" for c in configs):
            if shutil.which("redis-server"):
                redis = Redis(scratch)
            else:
                print("note: no redis-server on PATH (apt-get install -y redis-server): Celery left out")
                configs = [c for c in configs if c.system != "celery"]
        with common.bench_database(args.fast_disk) as url:
            run_on_server(options, configs, with_database(url, "postgres"), python, scratch, redis, args.fast_disk)
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def run_on_server(options: Options, configs: Sequence[Config], admin_url: str, python: Path, scratch: Path,
                  redis: Optional[Redis], fast_disk: bool) -> None:
    systems: Dict[str, System] = {}
    try:
        for config in configs:
            if config.system not in systems:
                systems[config.system] = System(config.system, admin_url, python, scratch, redis, fast_disk)
        print(f"{common.machine()}; {options.rounds} round(s); peers: {', '.join(PEER_REQUIREMENTS[:4])}")
        results = run_rounds(options, systems, configs)
        summary = summarise(results, configs)
        print_summary(summary)
        write_results(options, results, summary, configs)
    finally:
        with common.deferred_interrupts():  # an external server keeps what is not dropped
            for system in systems.values():
                system.close()


def write_results(options: Options, results: dict, summary: dict, configs: Sequence[Config]) -> None:
    options.out.parent.mkdir(parents=True, exist_ok=True)
    document = {"machine": common.machine(), "peers": list(PEER_REQUIREMENTS), "rounds": options.rounds,
                "configs": [config.label for config in configs], "summary": summary, "rounds_raw": results,
                "settings": {"long_test_rounds": options.long_test_rounds, "tasks": options.tasks, "work_tasks": options.work_tasks,
                             "single_tasks": options.single_tasks, "samples": options.samples,
                             "idle_seconds": options.idle_seconds, "memory_tasks": options.memory_tasks}}
    options.out.write_text(json.dumps(document, indent=2))
    print(f"\nfigures: {options.out}")
    chart = subprocess.run([str(BENCH_VENV / "bin" / "python"), str(PEERS_DIR / "chart.py"), str(options.out),
                            str(options.chart)], capture_output=True, text=True)
    print(f"chart: {options.chart}" if chart.returncode == 0 else f"chart failed: {chart.stderr[-500:]}")


if __name__ == "__main__":
    common.run_main(main)
