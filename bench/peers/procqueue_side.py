"""procqueue's side of the peers benchmark: its task, and enqueueing as an app does."""

from __future__ import annotations

import os
import time

import procqueue
from procqueue import register_task_handler

import peer_common


@register_task_handler(task_name="peers.noop")
def noop(work_ms: float = 0, t0: float = None) -> None:
    peer_common.picked_up(t0)
    if work_ms:
        time.sleep(peer_common.sleep_seconds(work_ms))


def connect() -> None:
    """Configured as an app is, its connection open (the others connect before timing too)."""
    from procqueue import client

    procqueue.configure(database_url=os.environ["PEER_DATABASE_URL"], schema="procqueue",
                        task_run_method=procqueue.TaskRunMethod.TASK_PROCESSOR)
    client.connection()


def prepare() -> None:
    import psycopg2

    from procqueue.migrations import migrate

    conn = psycopg2.connect(os.environ["PEER_DATABASE_URL"])
    migrate(conn, "procqueue")
    conn.close()


def enqueue_single(kwargs_list) -> float:
    connect()
    noop.delay(kwargs={})  # untimed: every system's first call pays for warming up
    started = time.perf_counter()
    for kwargs in kwargs_list:
        noop.delay(kwargs=kwargs)
    return time.perf_counter() - started


def enqueue_stamped(count: int, spacing: float) -> None:
    connect()
    noop.delay(kwargs={})  # unstamped: the first call's warm-up is not pickup
    for _ in range(count):
        time.sleep(spacing)
        noop.delay(kwargs={"t0": time.time()})


def enqueue_bulk(kwargs_list, chunk: int) -> float:
    connect()
    started = time.perf_counter()
    for start in range(0, len(kwargs_list), chunk):
        procqueue.enqueue_many([noop.call(kwargs=kwargs) for kwargs in kwargs_list[start:start + chunk]])
    return time.perf_counter() - started
