"""Connections to Postgres: opening one, and the error wording when that fails."""

from __future__ import annotations

import contextlib
import json
import re
import select
import time
from typing import Any, Iterator, Optional

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

from .config import DatabaseConfig
from .embedded import embedded_server_url
from .errors import ConfigError, DatabaseError, DatabaseUnavailable
from .records import UnreadableJson

Connection = psycopg2.extensions.connection

# TCP keepalives make an idle connection to a vanished host (node died, NAT dropped the
# flow) fail in about 25 s instead of the kernel's two hours; tcp_user_timeout does the
# same for a statement whose bytes go unacknowledged, so no call hangs on a dead peer.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
               "tcp_user_timeout": 15000}


def resolve_url(database: DatabaseConfig) -> str:
    """The libpq URL to connect to, starting the embedded server if none was given."""
    if database.url is not None:
        return database.url
    if not database.embedded_allowed:
        raise DatabaseError("DATABASE_URL is not set (and PROCQUEUE_EMBEDDED=0 forbids the embedded PostgreSQL)")
    from .config import default_embedded_dir

    return embedded_server_url(database.embedded_dir or default_embedded_dir())


def connect(
    database: DatabaseConfig, *, autocommit: bool = True, application_name: str = "procqueue", timeout: int = 10
) -> Connection:
    """Open a connection, or raise DatabaseError with a one-line, password-free reason."""
    url = resolve_url(database)
    try:
        conn = psycopg2.connect(url, application_name=application_name, connect_timeout=timeout, **_KEEPALIVES)
    except psycopg2.Error as exc:
        if database.display_url.startswith("<unparseable"):
            # libpq's message would quote the mangled fields, which may hold the password.
            raise ConfigError(
                "invalid database URL: libpq cannot parse it (expected postgresql://user:password@host:port/dbname "
                "or key=value pairs; a '/', '?', '#' or '@' in a password must be percent-encoded)"
            ) from None
        reason = first_line(exc)
        error = DatabaseError if is_permanent_connect_failure(reason) else DatabaseUnavailable
        raise error(f"cannot connect to {database.display_url}: {reason}{_hint(reason)}") from None
    conn.autocommit = autocommit
    psycopg2.extras.register_default_jsonb(conn, loads=read_json)
    return conn


@contextlib.contextmanager
def one_transaction(conn: Connection) -> Iterator[None]:
    """The block's statements in one transaction, on a connection otherwise in autocommit
    mode: committed together, or (on an error) not at all."""
    conn.autocommit = False
    try:
        yield
        if conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INERROR:
            # An error the block caught left the transaction failed: COMMIT would roll it
            # back without a word.
            raise DatabaseError("a statement failed inside a transaction; nothing of it was committed")
        conn.commit()
    except BaseException:
        if not conn.closed:
            with contextlib.suppress(psycopg2.Error):  # the first error is the one to report
                conn.rollback()
        raise
    finally:
        if not conn.closed:
            conn.autocommit = True


@contextlib.contextmanager
def savepoint(conn: Connection, name: str) -> Iterator[None]:
    """Within one_transaction: an error in the block undoes the block only."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SAVEPOINT {}").format(sql.Identifier(name)))
    try:
        yield
    except psycopg2.Error:
        if not conn.closed and conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INERROR:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(sql.Identifier(name)))
        raise
    with conn.cursor() as cur:
        cur.execute(sql.SQL("RELEASE SAVEPOINT {}").format(sql.Identifier(name)))


def read_json(text: str) -> Any:
    """A jsonb value as Python; one Python cannot read becomes an UnreadableJson."""
    try:
        return json.loads(text)
    except RecursionError:
        return UnreadableJson("nested too deeply for Python's JSON decoder")
    except ValueError as exc:  # an integer past sys.get_int_max_str_digits()
        return UnreadableJson(first_line(exc))


# What libpq says when connecting fails for a reason that waiting will not cure: the
# credentials, the database or the role are wrong, or the server refuses this client.
_PERMANENT_CONNECT_FAILURES = re.compile(
    r"authentication failed|does not exist|no pg_hba\.conf entry|permission denied|"
    r"not permitted to log in|invalid (sslmode|connection option|integer value|port)|"
    r"server does not support SSL|unsupported frontend protocol|invalid URI|unsupported startup parameter",
    re.IGNORECASE)


def _hint(reason: str) -> str:
    if "unsupported startup parameter" in reason:
        # PgBouncer's word for a setting in the URL (options=-c ..., say) it does not pass on.
        return (" (a pooler refuses this setting of the database URL: remove it, or list it in PgBouncer's "
                "ignore_startup_parameters)")
    return ""


def is_permanent_connect_failure(message: str) -> bool:
    return bool(_PERMANENT_CONNECT_FAILURES.search(message))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_connection_error(exc: BaseException) -> bool:
    """True when the connection itself is gone (server restart, network cut), as opposed
    to a statement that failed on a healthy connection. psycopg2 says so as an
    OperationalError or InterfaceError, but a connection that breaks as a reply arrives
    surfaces as a bare DatabaseError ("server closed the connection unexpectedly"): the
    connection, closed by then, tells."""
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return True
    cursor = getattr(exc, "cursor", None)
    if cursor is not None and cursor.connection.closed:
        return True
    return isinstance(exc, psycopg2.DatabaseError) and "server closed the connection" in str(exc)


# -- client-side time limits -------------------------------------------------------------


class StatementTimeout(psycopg2.OperationalError):
    """The server did not answer within the client-side limit; the connection is closed."""


_wait_budget: Optional[float] = None


def _wait_with_budget(conn: Connection) -> None:
    """psycopg2's wait callback ("green" mode): the waits libpq would block in, done with
    select() and a deadline. statement_timeout cannot help when the server, or a pooler in
    front of it, takes the bytes and never answers; TCP keepalives cannot either, since
    the peer does acknowledge. Raising here closes the connection."""
    budget = _wait_budget
    deadline = None if budget is None else time.monotonic() + budget
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise StatementTimeout(f"the database did not answer within {budget:g}s")
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn.fileno()], [], [], remaining)
        elif state == psycopg2.extensions.POLL_WRITE:
            select.select([], [conn.fileno()], [], remaining)
        else:
            raise psycopg2.OperationalError(f"unexpected connection poll state {state}")


def bound_every_wait(seconds: float) -> None:
    """From now on, no connection of this process waits longer than `seconds` for the
    server (connecting included). For the supervisor, whose loop also reaps and kills
    workers and must never hang on the database. Process-wide: a forked worker calls
    `unbound_waits()` before it connects."""
    global _wait_budget
    _wait_budget = seconds
    psycopg2.extensions.set_wait_callback(_wait_with_budget)


def unbound_waits() -> None:
    global _wait_budget
    _wait_budget = None
    psycopg2.extensions.set_wait_callback(None)


@contextlib.contextmanager
def waits_unbounded() -> Iterator[None]:
    """No limit for the duration (applying a schema may rightly take minutes)."""
    global _wait_budget
    saved, _wait_budget = _wait_budget, None
    try:
        yield
    finally:
        _wait_budget = saved


def tables_missing(exc: BaseException) -> DatabaseError:
    """What an UndefinedTable from a procqueue statement (psycopg2's or psycopg 3's) means,
    said the same way by the CLI and by `.delay()`: the schema named is the one from
    Postgres's message ('relation "x.tasks" does not exist'), which is the schema the
    statement used."""
    diag = getattr(exc, "diag", None)
    match = re.search(r'relation "([^".]+)\.', getattr(diag, "message_primary", None) or "")
    where = f'schema "{match.group(1)}"' if match else "the schema"
    return DatabaseError(f"the procqueue tables are not in {where} of this database: is the schema name right "
                         "(--schema, PROCQUEUE_SCHEMA, procqueue.configure(schema=...))? If so, run `procqueue migrate`")
