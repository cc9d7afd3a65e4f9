"""A real PgBouncer in transaction pool mode in front of the tests' database: started on a
free 127.0.0.1 port with its own temporary directory (configuration, pid file, log),
stopped and removed at the end."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import psycopg2
from psycopg2.extensions import parse_dsn

from helpers import wait_until

INSTALL = "install PgBouncer: apt-get install -y pgbouncer"
# Fewer server sessions than a processor has connections, so that they are really shared.
POOL_SIZE = 2


def pgbouncer_program() -> Optional[str]:
    if os.access("/usr/sbin/pgbouncer", os.X_OK):
        return "/usr/sbin/pgbouncer"
    return shutil.which("pgbouncer")


@dataclass(frozen=True)
class Bouncer:
    url: str  # the test database, through the pooler
    admin_url: str  # PgBouncer's own console (SHOW CLIENTS, SHOW SERVERS)
    log_path: Path

    def show(self, what: str) -> List[dict]:
        conn = psycopg2.connect(self.admin_url)
        conn.autocommit = True  # the console takes no transactions
        try:
            with conn.cursor() as cur:
                cur.execute(f"SHOW {what}")
                names = [column.name for column in cur.description]
                return [dict(zip(names, row)) for row in cur.fetchall()]
        finally:
            conn.close()

    def sessions(self, dbname: str) -> Tuple[int, int]:
        """(client connections, server sessions) of the pooled database."""
        clients = [c for c in self.show("CLIENTS") if c["database"] == dbname]
        servers = [s for s in self.show("SERVERS") if s["database"] == dbname]
        return len(clients), len(servers)


@contextlib.contextmanager
def running_pgbouncer(program: str, database_url: str) -> Iterator[Bouncer]:
    server = parse_dsn(database_url)
    user, dbname = server.get("user") or pwd.getpwuid(os.geteuid()).pw_name, server["dbname"]
    directory = Path(tempfile.mkdtemp(prefix="procqueue-test-pgbouncer-"))
    process = None
    try:
        port = _free_port()
        _write_configuration(directory, server, user, dbname, port)
        command = [program, str(directory / "pgbouncer.ini")]
        if os.geteuid() == 0:  # PgBouncer will not run as root
            runner = _unprivileged_user(server)
            for path in [directory, *directory.iterdir()]:
                shutil.chown(path, runner)
            command[1:1] = ["-u", runner]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        bouncer = Bouncer(url=f"postgresql://{user}@127.0.0.1:{port}/{dbname}",
                          admin_url=f"postgresql://{user}@127.0.0.1:{port}/pgbouncer",
                          log_path=directory / "pgbouncer.log")
        wait_until(lambda: process.poll() is not None or _answers(bouncer.url), timeout=15,
                   message=lambda: f"PgBouncer to answer; its log:\n{_log(bouncer.log_path)}")
        assert process.poll() is None, f"PgBouncer exited {process.returncode}:\n{_log(bouncer.log_path)}"
        yield bouncer
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # immediate shutdown: clients are the test's
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def _write_configuration(directory: Path, server: dict, user: str, dbname: str, port: int) -> None:
    target = [f"host={server.get('host') or '127.0.0.1'}", f"port={server.get('port') or 5432}", f"dbname={dbname}"]
    if server.get("password"):  # an external server's: PgBouncer logs in with it
        target.append(f"password={server['password']}")
    (directory / "users.txt").write_text(f'"{user}" ""\n')
    (directory / "pgbouncer.ini").write_text("\n".join([
        "[databases]",
        f"{dbname} = {' '.join(target)}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        # Only this test run's processes reach 127.0.0.1:port, for the few minutes it runs.
        "auth_type = trust",
        f"auth_file = {directory / 'users.txt'}",
        f"admin_users = {user}",
        "pool_mode = transaction",
        f"default_pool_size = {POOL_SIZE}",
        "max_client_conn = 200",
        f"logfile = {directory / 'pgbouncer.log'}",
        f"pidfile = {directory / 'pgbouncer.pid'}",
        "",
    ]))


def _unprivileged_user(server: dict) -> str:
    """Who PgBouncer runs as under root: the owner of the embedded server's socket, who
    can reach it; for a server over TCP, nobody."""
    host = server.get("host") or ""
    if host.startswith("/"):
        socket_path = Path(host) / f".s.PGSQL.{server.get('port') or 5432}"
        return pwd.getpwuid(socket_path.stat().st_uid).pw_name
    return "nobody"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        psycopg2.connect(url, connect_timeout=2).close()
        return True
    except psycopg2.OperationalError:
        return False


def _log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no log)"
