"""pgqueuer's side of the peers benchmark: its worker factory (for `pgq run`), its task,
and enqueueing as an app does (asyncpg, pgqueuer's default driver)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

import asyncpg
from pgqueuer import AsyncpgDriver, PgQueuer, Queries
from pgqueuer.models import Job

import peer_common


@contextlib.asynccontextmanager
async def create():
    """`pgq run pgqueuer_side:create`"""
    connection = await asyncpg.connect(os.environ["PEER_DATABASE_URL"])
    pgq = PgQueuer(AsyncpgDriver(connection))

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        kwargs = json.loads(job.payload) if job.payload else {}
        peer_common.picked_up(kwargs.get("t0"))
        if kwargs.get("work_ms"):
            await asyncio.sleep(peer_common.sleep_seconds(kwargs["work_ms"]))

    try:
        yield pgq
    finally:
        await connection.close()


async def _queries():
    connection = await asyncpg.connect(os.environ["PEER_DATABASE_URL"])
    return connection, Queries(AsyncpgDriver(connection))


def prepare() -> None:
    async def install() -> None:
        connection, queries = await _queries()
        await queries.install()
        await connection.close()

    asyncio.run(install())


def _payload(kwargs) -> bytes:
    return json.dumps(kwargs).encode()


def enqueue_single(kwargs_list) -> float:
    async def run() -> float:
        connection, queries = await _queries()
        await queries.enqueue("noop", _payload({}))  # untimed: every system's first call pays for warming up
        started = time.perf_counter()
        for kwargs in kwargs_list:
            await queries.enqueue("noop", _payload(kwargs))
        elapsed = time.perf_counter() - started
        await connection.close()
        return elapsed

    return asyncio.run(run())


def enqueue_stamped(count: int, spacing: float) -> None:
    async def run() -> None:
        connection, queries = await _queries()
        await queries.enqueue("noop", _payload({}))  # unstamped: the first call's warm-up is not pickup
        for _ in range(count):
            await asyncio.sleep(spacing)
            await queries.enqueue("noop", _payload({"t0": time.time()}))
        await connection.close()

    asyncio.run(run())


def enqueue_bulk(kwargs_list, chunk: int) -> float:
    async def run() -> float:
        connection, queries = await _queries()
        started = time.perf_counter()
        for start in range(0, len(kwargs_list), chunk):
            part = kwargs_list[start:start + chunk]
            await queries.enqueue(["noop"] * len(part), [_payload(k) for k in part], [0] * len(part))
        elapsed = time.perf_counter() - started
        await connection.close()
        return elapsed

    return asyncio.run(run())
