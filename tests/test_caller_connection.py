"""`.delay(connection=)` and `enqueue_many(connection=)` on the caller's own connection:
psycopg2, psycopg 3 (both cursor kinds) and Django's (both drivers). The task joins the
caller's transaction: it exists only if the caller commits."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import psycopg
import psycopg2
import pytest
from psycopg.rows import dict_row

import procqueue
from procqueue import register_task_handler

TESTS = os.path.dirname(os.path.abspath(__file__))


@register_task_handler(task_name="test_caller_connection.greet")
def greet(name):
    pass


@register_task_handler(task_name="test_caller_connection.limited", queue_size=2)
def limited():
    pass


CONNECT = {
    "psycopg2": psycopg2.connect,
    "psycopg": psycopg.connect,
    "psycopg ClientCursor": lambda url: psycopg.connect(url, cursor_factory=psycopg.ClientCursor),
    "psycopg dict_row": lambda url: psycopg.connect(url, row_factory=dict_row),
}


@pytest.fixture(params=sorted(CONNECT))
def conn(request, db, database_url):
    """A caller's connection, in a transaction (autocommit off: each driver's default)."""
    conn = CONNECT[request.param](database_url)
    yield conn
    conn.close()


def tasks(db):
    with db.cursor() as cur:
        cur.execute("SELECT task_name, args->>0 FROM procqueue.tasks ORDER BY id")
        return [f"{name.split('.')[1]}({arg})" if arg else name.split(".")[1] for name, arg in cur.fetchall()]


def test_a_task_exists_only_if_the_caller_commits(db, conn):
    greet.delay(args=("rolled back",), connection=conn)
    conn.rollback()
    assert tasks(db) == []
    task_id = greet.delay(args=("committed",), connection=conn)
    assert tasks(db) == []  # not visible until the caller commits
    conn.commit()
    assert tasks(db) == ["greet(committed)"]
    assert procqueue.get_task(task_id).args == ["committed"]


def test_a_batch_with_queue_size_and_delay_until(db, conn):
    when = datetime.now(timezone.utc) + timedelta(hours=1)
    calls = [limited.call(), greet.call(args=("later",), delay_until=when), limited.call(), limited.call()]
    ids = procqueue.enqueue_many(calls, connection=conn)
    conn.commit()
    assert len(ids) == 3 and tasks(db) == ["limited", "greet(later)", "limited"]
    assert procqueue.get_task(ids[1]).run_at == when


def test_a_batch_with_neither_queue_size_nor_delay_until(db, conn):
    """The batch statement's run_at and queue_size arrays are then all NULL."""
    ids = procqueue.enqueue_many([greet.call(args=("a",)), greet.call(args=("b",))], connection=conn)
    conn.rollback()
    assert len(ids) == 2 and tasks(db) == []
    procqueue.enqueue_many([greet.call(args=("a",)), greet.call(args=("b",))], connection=conn)
    conn.commit()
    assert tasks(db) == ["greet(a)", "greet(b)"]


def test_nothing_is_prepared_on_a_callers_connection(db, conn):
    """psycopg 3 prepares a statement run 5 times (prepare_threshold): not procqueue's."""
    for _ in range(7):
        greet.delay(args=("again",), connection=conn)
        procqueue.enqueue_many([limited.call(), greet.call(args=("again",))], connection=conn)
    conn.commit()
    with conn.cursor() as cur:
        cur.execute("SELECT name FROM pg_prepared_statements")
        assert cur.fetchall() == []


def test_missing_tables_are_procqueues_error(db, conn):
    procqueue.configure(schema="nosuch")
    try:
        with pytest.raises(procqueue.DatabaseError, match=r'^the procqueue tables are not in schema "nosuch" of '
                                                          r"this database: is the schema name right .* "
                                                          r"run `procqueue migrate`$"):
            greet.delay(args=("x",), connection=conn)
    finally:
        procqueue.configure(schema="procqueue")


def test_any_other_database_error_is_the_drivers_own(db, conn):
    """The transaction is the caller's: its failure reaches the caller as their driver raised it."""
    with pytest.raises((psycopg2.errors.DivisionByZero, psycopg.errors.DivisionByZero)):
        conn.cursor().execute("SELECT 1/0")
    with pytest.raises((psycopg2.errors.InFailedSqlTransaction, psycopg.errors.InFailedSqlTransaction)):
        greet.delay(args=("x",), connection=conn)
    conn.rollback()
    assert tasks(db) == []


@pytest.mark.parametrize("make, named", [
    (object, "builtins.object"),
    (lambda: sqlite3.connect(":memory:"), "sqlite3.Connection"),
    (lambda: "postgresql://localhost/app", "builtins.str"),
])
def test_a_connection_of_another_kind_is_refused_by_name(db, make, named):
    with pytest.raises(TypeError) as refused:
        greet.delay(args=("x",), connection=make())
    message = str(refused.value)
    assert message == (f"connection= must be a psycopg2 connection, a psycopg 3 psycopg.Connection, or a Django "
                       f"PostgreSQL connection (django.db.connection, django.db.connections[alias]); got {named}")
    assert tasks(db) == []


def test_a_psycopg_connection_in_pipeline_mode_is_refused(db, database_url):
    """In a pipeline the insert's result (the id, or queue_size's skip) comes only at the
    next sync: refused, rather than a written task reported as skipped."""
    import psycopg

    with psycopg.connect(database_url) as lent:
        with lent.pipeline():
            with pytest.raises(TypeError, match="pipeline mode; call .delay\\(\\) outside"):
                greet.delay(args=("x",), connection=lent)
        lent.commit()
    assert tasks(db) == []


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "psycopg-server-binding"])
def test_a_django_connection_follows_djangos_transactions(db, database_url, driver):
    """Through Django's cursor: autocommit outside atomic(), atomic() commits or rolls back."""
    result = subprocess.run([sys.executable, os.path.join(TESTS, "sample_django_app.py"), database_url, driver],
                            capture_output=True, text=True, timeout=60, cwd=TESTS)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    missing = ('procqueue.errors.DatabaseError: the procqueue tables are not in schema "nosuch" of this database: '
               "is the schema name right (--schema, PROCQUEUE_SCHEMA, procqueue.configure(schema=...))? If so, run "
               "`procqueue migrate`")
    assert report == {
        "driver": "psycopg2" if driver == "psycopg2" else "psycopg",
        "outside atomic": ["django.greet(autocommit)"],
        "inside atomic, before commit": ["django.greet(autocommit)"],
        "after commit": ["django.greet(autocommit)", "django.greet(committed)"],
        "after rollback": ["django.greet(autocommit)", "django.greet(committed)"],
        "batch ids": 3,
        "after batch": ["django.greet(autocommit)", "django.greet(committed)", "django.limited",
                        "django.greet(later)", "django.limited"],
        "later run_at": True,
        "plain batch ids": 2,
        "missing tables": missing,
        "missing tables in atomic": missing,
        # Postgres's own answer, through Django, as to any statement after a failed one.
        "the next statement in that atomic": "django.db.utils.InternalError: current transaction is aborted, "
                                             "commands ignored until end of transaction block",
        "sqlite": "builtins.TypeError: connection= is a Django connection to sqlite; procqueue needs a psycopg2 "
                  "connection, a psycopg 3 psycopg.Connection, or a Django PostgreSQL connection "
                  "(django.db.connection, django.db.connections[alias])",
        "prepared statements": 0,
    }
