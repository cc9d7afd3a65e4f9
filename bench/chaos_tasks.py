"""The tasks the chaos suite's processors run (`--import chaos_tasks`).

Each takes a `tag` (the producer's name for the call, so the checker finds every call
it enqueued) and writes its own execution log to `public.chaos_executions`: a `start` row as it
begins, and an `end` row when it has done its work (or `fail` before it raises on
purpose), with its task id and attempt from `procqueue.current_task()` and its pid. The
checker reads the log against the queue: what ran, how often, when, and in which process.

A task interrupted from outside (its timeout, its supervisor's death: both raise a
BaseException into it) writes `interrupted` on its way out; one killed outright writes
nothing, and the harness knows when its process died. A log write that meets a Postgres
restart is retried for a while, so the attack on the database shows up as a late row
rather than a task failed for what it did not do.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta

import psycopg2

from procqueue import DatabaseError, client, current_task, register_recurring_task, register_task_handler

LOG_TABLE = "public.chaos_executions"
LOG_RETRY_SECONDS = 30.0
RECURRING_EVERY = timedelta(seconds=5)

CREATE_LOG_TABLE = f"""
CREATE TABLE IF NOT EXISTS {LOG_TABLE} (
    task_id bigint NOT NULL,
    attempt integer NOT NULL,
    event text NOT NULL,  -- start, end, fail, interrupted
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)"""


def log(event: str) -> None:
    task = current_task()
    if task is None:
        return  # run outside a worker (a plain call): nothing to attribute
    deadline = time.monotonic() + LOG_RETRY_SECONDS
    while True:
        try:
            conn, _ = client.connection()
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {LOG_TABLE} (task_id, attempt, event, pid) VALUES (%s, %s, %s, %s)",
                            (task.id, task.attempts, event, os.getpid()))
            return
        except (psycopg2.Error, DatabaseError):  # it broke (psycopg2 says so in several ways), or cannot be opened
            client.close_connection()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def logged(func):
    """Writes `interrupted` when the task is interrupted from outside."""
    import functools

    @functools.wraps(func)
    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception:
            raise  # the task's own failure: it wrote `fail` itself
        except BaseException:
            log("interrupted")
            raise

    return run


def work_for(seconds: float) -> None:
    """Pure Python with short sleeps: an interrupt (timeout, supervisor gone) reaches it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


@register_task_handler(task_name="chaos.quick", max_attempts=5, retry_backoff=timedelta(seconds=1))
@logged
def quick(tag: str = "") -> None:
    log("start")
    log("end")


@register_task_handler(task_name="chaos.work", timeout=timedelta(seconds=20), max_attempts=5,
                       retry_backoff=timedelta(seconds=1))
@logged
def work(seconds: float, tag: str = "") -> None:
    log("start")
    work_for(seconds)
    log("end")


@register_task_handler(task_name="chaos.flaky", max_attempts=4, retry_backoff=timedelta(seconds=1))
@logged
def flaky(fail_first: int, tag: str = "") -> None:
    """Raises on its first `fail_first` attempts: 4 or more, and it fails for good."""
    log("start")
    if current_task().attempts <= fail_first:
        log("fail")
        raise RuntimeError(f"flaky: attempt {current_task().attempts} of the first {fail_first} fails")
    log("end")


@register_task_handler(task_name="chaos.overrun", timeout=timedelta(seconds=1), max_attempts=2,
                       retry_backoff=timedelta(seconds=1))
@logged
def overrun(tag: str = "") -> None:
    """Runs past its timeout in Python: its worker's own timeout interrupts it."""
    log("start")
    work_for(30)


@register_task_handler(task_name="chaos.wedge", timeout=timedelta(seconds=1), max_attempts=2,
                       retry_backoff=timedelta(seconds=1))
@logged
def wedge(tag: str = "") -> None:
    """Runs past its timeout beyond its worker's reach (the alarm blocked, as C code may):
    the supervisor kills the worker."""
    log("start")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(30)


@register_task_handler(task_name="chaos.spawn", timeout=timedelta(seconds=20), max_attempts=5,
                       retry_backoff=timedelta(seconds=1))
@logged
def spawn(seconds: float, tag: str = "") -> None:
    """Starts a process and works beside it, stopping it only if it gets to the end (no
    try/finally, on purpose): cut short, the task leaves it to the processor to stop."""
    log("start")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    work_for(seconds)
    child.kill()
    child.wait()
    log("end")


@register_recurring_task(run_every=RECURRING_EVERY, task_name="chaos.recurring", timeout=timedelta(seconds=30))
@logged
def recurring() -> None:
    """Every 5 s, across all processors; a run takes 0.5 to 7 s, so some outlast the next
    slot (which must then wait, or be missed: never run beside it)."""
    log("start")
    work_for(random.choice((0.5, 1, 2, 3, 7)))
    log("end")
