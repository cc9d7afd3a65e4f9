"""Throughput: how fast procqueue drains N no-op tasks, next to what Postgres itself
manages with the same claim-and-complete statements, measured in the same run.

    .venv/bin/python bench/throughput.py [--tasks N] [--fast-disk]
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List, Sequence

import psutil

import bench_tasks
import common
from procqueue.config import DatabaseConfig, ProcessorConfig
from procqueue.queries import Queries
from procqueue.records import RunOutcome, TaskOutcome, TaskState
from procqueue.worker import Worker

TASK_NAME = bench_tasks.noop.task_name
# How often the processor scenario checks for a drained queue: short next to the drain
# (seconds), and the check itself is two index probes.
POLL_SECONDS = 0.02
PROCESSOR_ARGS = ["--numthreads", "2", "--queuepopsize", "50", "--log-level", "warning", "--import", "bench_tasks"]


def drain_raw(url: str, batch: int) -> float:
    """The baseline: procqueue's own claim and complete statements back to back on plain
    psycopg2, each claimed task given a synthetic success; nothing runs, nothing is logged."""
    queries = Queries(common.SCHEMA)
    conn = common.connect(url)
    try:
        started = time.perf_counter()
        while True:
            claimed = queries.claim(conn, processor="bench-raw", worker=0, limit=batch)
            if not claimed:
                break
            now = datetime.now(timezone.utc)
            outcomes = [TaskOutcome(t.id, TaskState.SUCCEEDED, RunOutcome.SUCCEEDED, now, now) for t in claimed]
            queries.complete(conn, processor="bench-raw", worker=0, outcomes=outcomes,
                             leases={t.id: t.leased_at for t in claimed})
        return time.perf_counter() - started
    finally:
        conn.close()


def drain_worker(url: str, pop_size: int) -> float:
    """procqueue's worker loop in this process: `step()` until a step finds nothing."""
    # sleep_interval_ms=1: the last step, which finds the queue empty, waits only 1 ms.
    config = ProcessorConfig(database=DatabaseConfig(url=url, schema=common.SCHEMA), num_workers=1,
                             queue_pop_size=pop_size, sleep_interval_ms=1)
    worker = Worker(config, processor_id="bench-worker", index=0)
    worker.ensure_connected()  # connecting is not what is measured
    try:
        started = time.perf_counter()
        while worker.step():
            pass
        return time.perf_counter() - started
    finally:
        worker.close()


@dataclass
class Usage:
    """What the processor's processes used, sampled while it drained."""

    peak_rss: Dict[int, int] = field(default_factory=dict)  # pid -> bytes
    cpu: Dict[int, float] = field(default_factory=dict)  # pid -> user+sys seconds, last seen
    supervisor: int = 0
    working_seconds: float = 0.0  # first claim to last task finished, from the task rows

    def sample(self) -> None:
        try:
            supervisor = psutil.Process(self.supervisor)
            family = [supervisor] + supervisor.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for process in family:
            try:
                rss, times = process.memory_info().rss, process.cpu_times()
            except psutil.NoSuchProcess:
                continue  # a worker that just exited keeps its last sample
            self.peak_rss[process.pid] = max(rss, self.peak_rss.get(process.pid, 0))
            self.cpu[process.pid] = times.user + times.system


def drain_processor(conn, url: str, usage: Usage, extra_args: Sequence[str] = ()) -> float:
    """The real thing: `run-task-processor` started on a full queue, timed from launch
    (interpreter start and forks included) until no task is queued or running."""
    started = time.perf_counter()
    processor = common.Processor(url, [*PROCESSOR_ARGS, *extra_args])
    usage.supervisor = processor.pid
    try:
        while True:
            processor.check_alive()
            usage.sample()
            if not common.unfinished(conn):
                break
            time.sleep(POLL_SECONDS)
        seconds = time.perf_counter() - started
        usage.sample()  # CPU up to the moment the queue drained, before shutdown
        usage.working_seconds = working_seconds(conn)
        return seconds
    finally:
        processor.stop()


def working_seconds(conn) -> float:
    """The drain without the processor's start-up: first claim (the database clock) to last task finished (the worker's)."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8 "
                    f"FROM {common.SCHEMA}.tasks WHERE task_name = %s", (TASK_NAME,))
        return cur.fetchone()[0]


def measure(conn, url: str, tasks: int, drain: Callable[[], float]) -> float:
    common.reset_queue(conn)
    common.enqueue_tasks(url, bench_tasks.noop, tasks)
    common.settle(conn)
    seconds = drain()
    common.require_succeeded(conn, TASK_NAME, tasks)
    return seconds


def scenarios(conn, url: str, usage: Usage, metered: Usage) -> List[tuple]:
    """(label, drain) in the order they run; the first is the baseline the rest are
    compared with. The last two differ only in serving metrics: their difference is what
    counting every run in the multiprocess files costs."""
    return [
        ("baseline: raw claim+complete, batch 50", lambda: drain_raw(url, 50)),
        ("baseline: raw claim+complete, batch 10", lambda: drain_raw(url, 10)),
        ("baseline: raw claim+complete, batch 1", lambda: drain_raw(url, 1)),
        ("Worker.step() in-process, queuepopsize 10", lambda: drain_worker(url, 10)),
        ("Worker.step() in-process, queuepopsize 50", lambda: drain_worker(url, 50)),
        ("run-task-processor, 2 workers, queuepopsize 50", lambda: drain_processor(conn, url, usage)),
        ("... with --metrics-port 0 (metrics counted)",
         lambda: drain_processor(conn, url, metered, ["--metrics-port", "0", "--metrics-host", "127.0.0.1"])),
    ]


def print_results(results: List[tuple], tasks: int, usage: Usage, metered: Usage) -> None:
    baseline_rate = tasks / results[0][1]
    rows = [(label, tasks, f"{seconds:.2f}", f"{tasks / seconds:.0f}", f"{tasks / seconds / baseline_rate:.2f}")
            for label, seconds in results]
    print()
    common.print_table(["scenario", "tasks", "seconds", "tasks/s", "x baseline b50"], rows)
    print()
    print_usage("run-task-processor", usage, tasks, results[-2][1])
    print_usage("... with --metrics-port 0", metered, tasks, results[-1][1])


def print_usage(label: str, usage: Usage, tasks: int, seconds: float) -> None:
    total = sum(usage.cpu.values())
    print(f"{label}: {seconds:.2f} s from launch to drained, of which first claim to last "
          f"task finished {usage.working_seconds:.2f} s ({tasks / usage.working_seconds:.0f} tasks/s)")
    print(f"  CPU (user+sys), launch to drained: {total:.2f} s = {total / seconds:.2f} of "
          f"{os.cpu_count()} cores")
    for pid in sorted(usage.cpu, key=lambda pid: pid != usage.supervisor):  # supervisor first
        role = "supervisor" if pid == usage.supervisor else "worker"
        print(f"  {role:10} pid {pid}: CPU {usage.cpu[pid]:.2f} s, peak RSS {usage.peak_rss[pid] / 2**20:.1f} MB")


def main() -> None:
    parser = common.argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20000, help="no-op tasks drained per scenario (default 20000)")
    args = parser.parse_args()
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    print(f"procqueue throughput: {args.tasks} no-op tasks per scenario; {common.machine()}")
    with common.bench_database(args.fast_disk) as url:
        conn = common.connect(url)
        usage, metered = Usage(), Usage()
        # Unrecorded: the first drain on a fresh server pays for cold caches and connections.
        measure(conn, url, min(args.tasks, 2000), lambda: drain_raw(url, 50))
        results = []
        for label, drain in scenarios(conn, url, usage, metered):
            common.progress(label)
            results.append((label, measure(conn, url, args.tasks, drain)))
        conn.close()
        print_results(results, args.tasks, usage, metered)


if __name__ == "__main__":
    common.run_main(main)
