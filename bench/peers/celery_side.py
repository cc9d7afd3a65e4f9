"""Celery's side of the peers benchmark (Redis broker, no result backend): its app (for
`celery -A celery_side worker`), its task, and `.delay()` as an app calls it. Celery has
no bulk enqueue; its task marks itself done in PEER_DONE_FILE (there is no table to count)."""

from __future__ import annotations

import os
import time

from celery import Celery

import peer_common

app = Celery("peers", broker=os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


@app.task(name="noop")
def noop(work_ms: float = 0, t0: float = None) -> None:
    peer_common.picked_up(t0)
    if work_ms:
        time.sleep(peer_common.sleep_seconds(work_ms))
    peer_common.done()


def prepare() -> None:
    pass  # Redis needs no schema


def enqueue_single(kwargs_list) -> float:
    noop.delay()  # untimed: every system's first call pays for warming up (Celery connects lazily)
    started = time.perf_counter()
    for kwargs in kwargs_list:
        noop.delay(**kwargs)
    return time.perf_counter() - started


def enqueue_stamped(count: int, spacing: float) -> None:
    noop.delay()  # unstamped: the first call's warm-up is not pickup
    for _ in range(count):
        time.sleep(spacing)
        noop.delay(t0=time.time())


enqueue_bulk = None  # Celery has no bulk enqueue
