"""Throwaway PostgreSQL for the tests and the benchmarks (bench/common.py imports this):
an embedded server in a temporary directory, or an external one, and a database of our
own on it, migrated, dropped on the way out however the run ends.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, List, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg2


def with_database(url: str, dbname: str) -> str:
    """The same server URL (libpq URL or key=value DSN) pointing at another database."""
    if "://" in url:
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))
    return f"{url} dbname={dbname}"


def run_sql(url: str, *statements: str, application_name: str = "procqueue-tests") -> None:
    conn = psycopg2.connect(url, application_name=application_name)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


@contextlib.contextmanager
def embedded_server(*, durable: bool, prefix: str, preload: Sequence[str] = ()) -> Iterator[str]:
    """An embedded PostgreSQL in a temporary directory; its admin URL. Without `durable`,
    fsync and synchronous_commit are off (durability not under test; speed welcome).
    `preload`: shared libraries to load (pg_stat_statements), which takes a restart."""
    from procqueue.embedded import embedded_server_module

    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    server = None
    try:
        with deferred_interrupts():  # a start cut short by Ctrl-C could orphan a server
            server = embedded_server_module().get_server(data_dir, cleanup_mode="delete")
        if not durable:
            run_sql(server.get_uri(), "ALTER SYSTEM SET fsync = off",
                    "ALTER SYSTEM SET synchronous_commit = off", "SELECT pg_reload_conf()")
        if preload:
            run_sql(server.get_uri(), f"ALTER SYSTEM SET shared_preload_libraries = '{','.join(preload)}'")
            with deferred_interrupts():  # pg_ctl restart keeps the server's command line
                embedded_server_module().pg_ctl(["-w", "-m", "fast", "-l", str(data_dir / "log"), "restart"],
                                                pgdata=data_dir, user=server.system_user, timeout=60)
        yield server.get_uri()
    finally:
        with deferred_interrupts():
            # By its pid file: the wrapper knows only the first postmaster, not one a
            # restart started, nor one whose start was cut short.
            stop_stray_postmaster(data_dir)
            if server is not None:
                server.cleanup()  # deletes the data directory
            shutil.rmtree(data_dir, ignore_errors=True)


def stop_stray_postmaster(data_dir: Path) -> None:
    """Stop the postmaster of `data_dir`, found by its pid file (a server whose start was
    interrupted has no handle to stop it with, and a restarted one a stale handle); its
    command line must name our directory before it is signalled."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        postmaster = psutil.Process(pid)
        if str(data_dir) not in " ".join(postmaster.cmdline()):
            return
        postmaster.send_signal(signal.SIGINT)  # Postgres' "fast" shutdown
        postmaster.wait(10)
    except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
        pass
    except psutil.TimeoutExpired:
        postmaster.kill()


@contextlib.contextmanager
def own_database(admin_url: str, *, schema: Optional[str], prefix: str,
                 synchronous_commit: bool = True) -> Iterator[str]:
    """A new database on the server, with procqueue's schema applied (unless `schema` is
    None: an empty database); its URL. Dropped at the end, with whatever is still
    connected to it."""
    from procqueue import client
    from procqueue.migrations import migrate

    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    try:
        run_sql(admin_url, f'CREATE DATABASE "{name}"')
        if not synchronous_commit:  # per database, so an external server's other users are unaffected
            run_sql(admin_url, f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        url = with_database(admin_url, name)
        if schema is not None:
            conn = psycopg2.connect(url)
            try:
                migrate(conn, schema)
            finally:
                conn.close()
        yield url
    finally:
        with deferred_interrupts():
            client.close_connection()  # this process's, if it opened one
            run_sql(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block is done (a clean-up cut in half is
    what leaves servers behind), then act on them."""
    received: List[int] = []
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, lambda s, f: received.append(s)) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:  # also replaces an error it caused (Ctrl-C reaches pg_ctl and initdb too)
            raise KeyboardInterrupt(f"signal {received[0]}")
