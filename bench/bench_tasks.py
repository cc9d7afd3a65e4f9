"""The tasks the benchmarks run: imported by the benchmark itself (to enqueue them) and by
its processors (`--import bench_tasks`, with bench/ on PYTHONPATH)."""

from __future__ import annotations

import os
import time

import psycopg2

from procqueue import register_task_handler

PICKUP_TABLE = "public.bench_pickup"
STARTED_CHANNEL = "bench_started"

_connection = None  # (pid, connection): this worker process's own, opened on first use


def _own_connection():
    """A connection of the task's own, from the DATABASE_URL the benchmark gave the
    processor: procqueue's own client connection is internal API."""
    global _connection
    if _connection is None or _connection[0] != os.getpid():
        conn = psycopg2.connect(os.environ["DATABASE_URL"], application_name="bench-task")
        conn.autocommit = True
        _connection = (os.getpid(), conn)
    return _connection[1]


@register_task_handler(task_name="bench.noop")
def noop() -> None:
    """Does nothing: all that is measured is procqueue around it."""


@register_task_handler(task_name="bench.record_start")
def record_start(sample: int) -> None:
    started = time.time()  # before anything else: the pickup latency ends here
    with _own_connection().cursor() as cur:
        # One implicit transaction: the row is visible by the time the NOTIFY arrives,
        # and the benchmark waits on the NOTIFY instead of polling the table.
        cur.execute(
            f"INSERT INTO {PICKUP_TABLE} (sample, started) VALUES (%(sample)s, %(started)s); "
            f"SELECT pg_notify('{STARTED_CHANNEL}', %(payload)s)",
            {"sample": sample, "started": started, "payload": str(sample)},
        )
