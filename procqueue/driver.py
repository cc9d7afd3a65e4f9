"""The connections a caller may lend `.delay(connection=)`, and the errors they raise.

A psycopg2 connection, a psycopg 3 `psycopg.Connection`, or a Django database connection
to PostgreSQL. psycopg 3 and Django are not procqueue's dependencies: a connection of
theirs can only exist once their module is imported, so they are looked up in
sys.modules, never imported here.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import psycopg2.extensions

UNDEFINED_TABLE = "42P01"  # SQLSTATE (psycopg2.errorcodes.UNDEFINED_TABLE)

ACCEPTED = ("a psycopg2 connection, a psycopg 3 psycopg.Connection, or a Django PostgreSQL connection "
            "(django.db.connection, django.db.connections[alias])")


def lent(connection: Any) -> Any:
    """What to run procqueue's statements on for a caller's `connection`: something with
    `.cursor()`, writing in whatever transaction the caller has open. TypeError (one
    line, naming the type) for anything else."""
    if isinstance(connection, psycopg2.extensions.connection):
        return connection
    if _is_django(connection):
        # Through Django's own cursor: its transaction management (atomic(), autocommit
        # outside it) and its query logging see procqueue's statement like any other.
        if connection.vendor != "postgresql":
            raise TypeError(f"connection= is a Django connection to {connection.vendor}; procqueue needs {ACCEPTED}")
        return connection
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(connection, psycopg.Connection):
        if connection.pgconn.pipeline_status:  # libpq's PQpipelineStatus: 0 is off
            # Results arrive only at the pipeline's next sync, so the new task's id (and
            # whether queue_size skipped it) cannot be known when .delay() returns.
            raise TypeError("connection= is a psycopg 3 connection in pipeline mode; call .delay() outside "
                            "its `with conn.pipeline():` block")
        return Psycopg3Connection(connection)
    kind = type(connection)
    raise TypeError(f"connection= must be {ACCEPTED}; got {kind.__module__}.{kind.__qualname__}")


def _is_django(connection: Any) -> bool:
    # django.db.connection is a ConnectionProxy forwarding every attribute to the
    # wrapper of the default alias; connections[alias] is the wrapper itself.
    kinds = (_attribute("django.db.backends.base.base", "BaseDatabaseWrapper"),
             _attribute("django.utils.connection", "ConnectionProxy"))
    return any(kind is not None and isinstance(connection, kind) for kind in kinds)


def _attribute(module: str, name: str) -> Optional[type]:
    return getattr(sys.modules.get(module), name, None)


class Psycopg3Connection:
    """A caller's psycopg 3 connection as procqueue's statements need it: cursors whose
    rows are tuples (whatever row_factory the caller chose) and whose statements are
    never prepared. psycopg prepares a statement it has run prepare_threshold times;
    a caller's session is not procqueue's to leave prepared statements in (behind a
    transaction-mode pooler they would be found missing on the next server session)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def cursor(self) -> "_UnpreparedCursor":
        from psycopg.rows import tuple_row

        return _UnpreparedCursor(self.connection.cursor(row_factory=tuple_row))


class _UnpreparedCursor:
    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def __enter__(self) -> "_UnpreparedCursor":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._cursor.close()

    def execute(self, query: str, params: Any = None) -> None:
        self._cursor.execute(query, params, prepare=False)

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def fetchall(self) -> list:
        return self._cursor.fetchall()


def server_error(exc: BaseException) -> Optional[BaseException]:
    """The driver's error behind `exc` when the server refused a statement: `exc` itself
    (psycopg2, psycopg 3) or the one a Django exception wraps (its __cause__); else None."""
    for error in (exc, exc.__cause__):
        if error is not None and sqlstate(error) is not None:
            return error
    return None


def sqlstate(error: BaseException) -> Optional[str]:
    """The SQLSTATE of a psycopg2 (`pgcode`) or psycopg 3 (`sqlstate`) error."""
    return getattr(error, "pgcode", None) or getattr(error, "sqlstate", None)
