"""The tasks the benchmarks run: imported by the benchmark itself (to enqueue them) and by
its processors (`--import bench_tasks`, with bench/ on PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

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


# -- supervision.py: tasks that say when they started, then hang or hold on ------------

MARKS_TABLE = "public.bench_marks"
MARKS_CHANNEL = "bench_marks"
# bench.wedged's timeout: short, so the supervisor's hard kill comes soon.
WEDGED_TIMEOUT_SECONDS = 1
HOLD_SECONDS = 600  # far longer than any scenario: a held task ends only by being killed


def mark(label: str) -> None:
    """Note that the task labelled `label` started, with the pid of the worker running it
    and this machine's monotonic clock (system-wide, so the benchmark's own readings are
    comparable), and NOTIFY the benchmark. The clock is read first."""
    started = time.monotonic()
    with _own_connection().cursor() as cur:
        cur.execute(
            f"INSERT INTO {MARKS_TABLE} (label, pid, started) VALUES (%(label)s, %(pid)s, %(started)s); "
            f"SELECT pg_notify('{MARKS_CHANNEL}', %(label)s)",
            {"label": label, "pid": os.getpid(), "started": started},
        )


@register_task_handler(task_name="bench.mark")
def mark_task(label: str) -> None:
    """A probe: the worker that runs it was ready to claim work."""
    mark(label)


@register_task_handler(task_name="bench.wedged", timeout=timedelta(seconds=WEDGED_TIMEOUT_SECONDS), max_attempts=1)
def wedged(label: str) -> None:
    """Stands in for C code that never returns to the interpreter: the worker's timeout
    signal (SIGALRM) is blocked, so only the supervisor's hard kill can end it. The stack
    dump signal interrupts the sleep, which then resumes (PEP 475)."""
    mark(label)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(HOLD_SECONDS)


@register_task_handler(task_name="bench.hold", timeout=timedelta(seconds=2 * HOLD_SECONDS), max_attempts=1)
def hold(label: str) -> None:
    """Runs until its worker is killed. One attempt: once lost it is failed, not retried,
    so the replacement worker's first claim is the benchmark's probe."""
    mark(label)
    time.sleep(HOLD_SECONDS)


@register_task_handler(task_name="bench.hold_doomed", timeout=timedelta(seconds=2 * HOLD_SECONDS),
                       max_attempts=3)
def hold_doomed(label: str) -> None:
    """The same with attempts to spare, so that a rescue puts it back `queued` (a task out
    of attempts is rescued as `failed`). supervision.py enqueues it on a queue of the
    processor that is to die, which only that processor serves."""
    mark(label)
    time.sleep(HOLD_SECONDS)
