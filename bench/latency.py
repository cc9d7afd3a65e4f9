"""Pickup latency: how long an idle processor takes to start a task after `.delay()`,
next to raw Postgres NOTIFY round trips measured in the same run.

    .venv/bin/python bench/latency.py [--samples N] [--fast-disk]
"""

from __future__ import annotations

import queue
import random
import select
import threading
import time
from typing import Dict, List

import bench_tasks
import common
import procqueue

PROCESSOR_ARGS = ["--numthreads", "2", "--sleepintervalms", "2000", "--log-level", "warning",
                  "--import", "bench_tasks"]
WORKERS = 2
GAP_SECONDS = (0.005, 0.050)  # random pause before each sample, so none lands in step with a poll
WAIT_SECONDS = 10.0  # for any one sample: far beyond any plausible latency, short of a hang


def wait_for_notify(conn, payload: str, timeout: float = WAIT_SECONDS) -> None:
    """Block on a LISTEN connection until a notification with `payload` arrives."""
    deadline = time.monotonic() + timeout
    while True:
        for notify in conn.notifies:
            if notify.payload == payload:
                conn.notifies.clear()
                return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no notification {payload!r} within {timeout:g}s")
        if select.select([conn], [], [], remaining)[0]:
            conn.poll()


def listen(url: str, channel: str):
    conn = common.connect(url)
    with conn.cursor() as cur:
        cur.execute(f"LISTEN {channel}")
    return conn


def wait_until_idle(conn, processor: common.Processor) -> None:
    """Idle: every worker connected (so LISTENing), the retention task a processor
    enqueues at start already run, and nothing queued or running."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        processor.check_alive()
        with conn.cursor() as cur:
            cur.execute("SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name LIKE 'procqueue-worker-%'), "
                        f"(SELECT count(*) FROM {common.SCHEMA}.recurring_tasks WHERE last_enqueued_at IS NULL)")
            workers, never_enqueued = cur.fetchone()
        if workers == WORKERS and never_enqueued == 0 and not common.unfinished(conn):
            time.sleep(1.0)  # let each worker finish the step it is in and block in select()
            return
        time.sleep(0.05)
    raise RuntimeError("the processor did not become idle within 30 s")


def enqueue_one_at_a_time(url: str, samples: int, rng: random.Random) -> Dict[int, tuple]:
    """Enqueue `samples` tasks, each only once the previous one has started.
    Returns sample -> (time before .delay(), time .delay() returned)."""
    procqueue.configure(database_url=url, schema=common.SCHEMA,
                        task_run_method=procqueue.TaskRunMethod.TASK_PROCESSOR)
    started = listen(url, bench_tasks.STARTED_CHANNEL)
    times = {}
    try:
        for sample in range(-1, samples):  # sample -1 warms up the client connection, unrecorded
            time.sleep(rng.uniform(*GAP_SECONDS))
            before = time.time()
            bench_tasks.record_start.delay(args=(sample,))
            times[sample] = (before, time.time())
            wait_for_notify(started, str(sample))
    finally:
        started.close()
    del times[-1]
    return times


def measure_pickup(conn, url: str, samples: int, rng: random.Random) -> tuple:
    """Returns (pickup latencies, .delay() call durations), both in ms."""
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {bench_tasks.PICKUP_TABLE} (sample int PRIMARY KEY, started float8 NOT NULL)")
    processor = common.Processor(url, PROCESSOR_ARGS)
    try:
        wait_until_idle(conn, processor)
        enqueued = enqueue_one_at_a_time(url, samples, rng)
    finally:
        processor.stop()
    with conn.cursor() as cur:
        cur.execute(f"SELECT sample, started FROM {bench_tasks.PICKUP_TABLE} WHERE sample >= 0")
        started = dict(cur.fetchall())
    pickup = [(started[n] - before) * 1000 for n, (before, _) in enqueued.items()]
    calls = [(returned - before) * 1000 for before, returned in enqueued.values()]
    return pickup, calls


# Raw Postgres doing procqueue's wake-up with nothing of procqueue's around it: what it
# takes for a committed statement's NOTIFY to reach a LISTENer. (label, channel, statement)
BASELINES = [
    ("baseline: pg_notify() -> LISTENer has it", "bench_rtt", "SELECT pg_notify('bench_rtt', '')"),
    ("baseline: 1-row INSERT into tasks -> LISTENer has its trigger's NOTIFY", f"procqueue_{common.SCHEMA}",
     f"INSERT INTO {common.SCHEMA}.tasks (task_name) VALUES ('bench.never_run')"),
]


def measure_round_trips(url: str, samples: int, rng: random.Random, channel: str, statement: str) -> List[float]:
    """Run `statement` (autocommit) on one connection, one sample at a time, until a LISTEN
    connection waiting in select() in its own thread has the notification. In ms."""
    inbox: "queue.Queue[float]" = queue.Queue()
    listener = listen(url, channel)
    thread = threading.Thread(target=_receive, args=(listener, inbox, samples), daemon=True)
    thread.start()
    sender = common.connect(url)
    rtts = []
    try:
        for _ in range(samples):
            time.sleep(rng.uniform(*GAP_SECONDS))
            before = time.time()
            with sender.cursor() as cur:
                cur.execute(statement)
            rtts.append((inbox.get(timeout=WAIT_SECONDS) - before) * 1000)
    finally:
        sender.close()
        thread.join(WAIT_SECONDS)
        listener.close()
    return rtts


def _receive(conn, inbox: "queue.Queue[float]", count: int) -> None:
    """The listening thread: the time each notification arrived."""
    while count > 0 and select.select([conn], [], [], WAIT_SECONDS)[0]:
        conn.poll()
        received = time.time()
        for _ in conn.notifies:
            inbox.put(received)
            count -= 1
        conn.notifies.clear()


def print_results(samples: int, pickup: List[float], calls: List[float], baselines: List[tuple]) -> None:
    def row(label, values):
        return [label] + [f"{common.percentile(values, p):.2f}" for p in (50, 90, 99, 100)]

    print()
    print(f"{samples} samples, one at a time, {GAP_SECONDS[0] * 1000:g}-{GAP_SECONDS[1] * 1000:g} ms apart")
    common.print_table(["ms", "p50", "p90", "p99", "max"], [
        row("procqueue pickup: .delay() called -> task starts", pickup),
        row("  of which .delay() until it returns", calls),
    ] + [row(label, rtts) for label, rtts in baselines])


def main() -> None:
    parser = common.argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="tasks enqueued, and round trips of each baseline (default 200)")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    print(f"procqueue pickup latency: idle run-task-processor {' '.join(PROCESSOR_ARGS[:4])}; {common.machine()}")
    rng = random.Random()
    with common.bench_database(args.fast_disk) as url:
        conn = common.connect(url)
        common.progress(f"pickup latency, {args.samples} tasks")
        pickup, calls = measure_pickup(conn, url, args.samples, rng)
        baselines = []
        for label, channel, statement in BASELINES:  # with the processor stopped: no one else about
            common.progress(f"{label}, {args.samples} samples")
            baselines.append((label, measure_round_trips(url, args.samples, rng, channel, statement)))
        conn.close()
    print_results(args.samples, pickup, calls, baselines)


if __name__ == "__main__":
    common.run_main(main)
