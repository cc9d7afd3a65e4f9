"""Applying schema.sql: idempotent, versioned, and safe when many replicas start at once."""

from __future__ import annotations

import zlib

import psycopg2

from .db import first_line, is_connection_error
from .errors import DatabaseError, DatabaseUnavailable
from .queries import Queries, schema_sql

SCHEMA_VERSION = 6


def _lock_key(schema: str) -> int:
    """One advisory lock per schema. Every processor of every replica may migrate at
    start: the lock serialises them, and the version check then makes the late ones a
    no-op (so they never take the exclusive lock that re-creating the trigger needs)."""
    return zlib.crc32(f"procqueue.migrate.{schema}".encode()) - 2**31


def migrate(conn, schema: str) -> bool:
    """Bring `schema` up to SCHEMA_VERSION. Returns True when anything was applied."""
    queries = Queries(schema)
    previous_autocommit = conn.autocommit
    conn.autocommit = False
    try:
        queries.lock_migrations(conn, _lock_key(schema))
        if queries.schema_version(conn) >= SCHEMA_VERSION:
            conn.rollback()
            return False
        queries.create_schema(conn)
        queries.use_schema(conn)
        with conn.cursor() as cur:
            cur.execute(schema_sql())
        conn.commit()
        return True
    except psycopg2.Error as exc:
        if not conn.closed:
            conn.rollback()
        error = DatabaseUnavailable if is_connection_error(exc) else DatabaseError
        raise error(f"cannot apply the procqueue schema to {schema!r}: {first_line(exc)}") from None
    finally:
        conn.autocommit = previous_autocommit


def installed_version(conn, schema: str) -> int:
    return Queries(schema).schema_version(conn)
