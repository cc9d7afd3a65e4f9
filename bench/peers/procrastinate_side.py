"""procrastinate's side of the peers benchmark: its app (for `procrastinate --app
procrastinate_side.app worker`), its task, and deferring as an app does."""

from __future__ import annotations

import asyncio
import os
import time

import procrastinate

import peer_common

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=os.environ.get("PEER_DATABASE_URL", "")))


@app.task(name="noop")
async def noop(work_ms: float = 0, t0: float = None) -> None:
    peer_common.picked_up(t0)
    if work_ms:
        await asyncio.sleep(peer_common.sleep_seconds(work_ms))


def prepare() -> None:
    async def apply() -> None:
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    asyncio.run(apply())


def enqueue_single(kwargs_list) -> float:
    async def run() -> float:
        async with app.open_async():
            await noop.defer_async()  # untimed: every system's first call pays for warming up
            started = time.perf_counter()
            for kwargs in kwargs_list:
                await noop.defer_async(**kwargs)
            return time.perf_counter() - started

    return asyncio.run(run())


def enqueue_stamped(count: int, spacing: float) -> None:
    async def run() -> None:
        async with app.open_async():
            await noop.defer_async()  # unstamped: the first call's warm-up is not pickup
            for _ in range(count):
                await asyncio.sleep(spacing)
                await noop.defer_async(t0=time.time())

    asyncio.run(run())


def enqueue_bulk(kwargs_list, chunk: int) -> float:
    async def run() -> float:
        async with app.open_async():
            started = time.perf_counter()
            for start in range(0, len(kwargs_list), chunk):
                await noop.batch_defer_async(*kwargs_list[start:start + chunk])
            return time.perf_counter() - started

    return asyncio.run(run())
