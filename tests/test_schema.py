"""schema.sql and `procqueue migrate`: idempotent, versioned, schema-configurable."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psycopg2
import pytest
from psycopg2 import sql

from procqueue.migrations import SCHEMA_VERSION, installed_version, migrate
from procqueue.queries import schema_sql

from helpers import REPO


@pytest.fixture
def fresh_schema(database_url):
    name = f"pq_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    yield conn, name
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    conn.close()


def test_migrate_applies_once_and_records_the_version(fresh_schema):
    conn, name = fresh_schema
    assert installed_version(conn, name) == 0
    assert migrate(conn, name) is True
    assert installed_version(conn, name) == SCHEMA_VERSION
    assert migrate(conn, name) is False


def test_schema_file_applied_twice_by_hand_is_harmless(fresh_schema):
    conn, name = fresh_schema
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        cur.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(name)))
        cur.execute(schema_sql())
        cur.execute(schema_sql())
        cur.execute("SELECT version FROM schema_version ORDER BY version")
        assert cur.fetchall()[-1] == (SCHEMA_VERSION,)


def test_repository_schema_is_the_one_shipped_in_the_package():
    assert (REPO / "schema.sql").read_text() == schema_sql()


def test_claiming_uses_the_partial_index(db):
    from procqueue.queries import Queries

    with db.cursor() as cur:
        cur.execute("INSERT INTO procqueue.tasks (task_name, state, finished_at) "
                    "SELECT 'old', 'succeeded', now() FROM generate_series(1, 20000)")
        cur.execute("INSERT INTO procqueue.tasks (task_name, run_at) "
                    "SELECT 'later', now() + interval '1 hour' FROM generate_series(1, 2000)")
        cur.execute("INSERT INTO procqueue.tasks (task_name) SELECT 'new' FROM generate_series(1, 50)")
        cur.execute("ANALYZE procqueue.tasks")
        claim = Queries("procqueue").text("claim")
        cur.execute("EXPLAIN " + claim, {"processor": "p", "worker": 0, "limit": 10, "queues": None})
        plan = "\n".join(row[0] for row in cur.fetchall())
    assert "tasks_claimable" in plan, plan


def test_a_second_schema_is_an_independent_queue(fresh_schema, database_url):
    conn, name = fresh_schema
    result = subprocess.run([sys.executable, "-m", "procqueue", "migrate", "--schema", name],
                            env=dict(os.environ, DATABASE_URL=database_url, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"procqueue schema '{name}' version {SCHEMA_VERSION}: applied" in result.stdout
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*) FROM {}.tasks").format(sql.Identifier(name)))
        assert cur.fetchone()[0] == 0


def test_version_1_database_is_upgraded_in_place(fresh_schema):
    conn, name = fresh_schema
    migrate(conn, name)
    table = sql.Identifier(name)
    with conn.cursor() as cur:  # wind it back to what version 1 created
        cur.execute(sql.SQL("ALTER TABLE {}.recurring_tasks DROP COLUMN args, DROP COLUMN kwargs").format(table))
        cur.execute(sql.SQL("DROP INDEX {}.tasks_failed_by_queue").format(table))
        cur.execute(sql.SQL("DELETE FROM {}.schema_version WHERE version >= 2").format(table))
        cur.execute(sql.SQL("INSERT INTO {}.tasks (task_name) VALUES ('kept')").format(table))
    assert installed_version(conn, name) == 1
    assert migrate(conn, name) is True
    assert installed_version(conn, name) == SCHEMA_VERSION
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT args, kwargs FROM {}.recurring_tasks").format(table))
        cur.execute("SELECT to_regclass(%s)", (f"{name}.tasks_failed_by_queue",))
        assert cur.fetchone()[0] is not None
        cur.execute(sql.SQL("SELECT task_name FROM {}.tasks").format(table))
        assert cur.fetchall() == [("kept",)]  # data survives the upgrade


def test_version_3_database_with_tasks_in_flight_is_upgraded_in_place(fresh_schema):
    conn, name = fresh_schema
    table = sql.Identifier(name)
    with conn.cursor() as cur:  # as version 3 left it, two recurring runs claimed at once included
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(table))
        cur.execute(sql.SQL("SET search_path TO {}").format(table))
        cur.execute((REPO / "tests" / "schema_v3.sql").read_text())
        cur.execute("RESET search_path")
        cur.execute(sql.SQL("INSERT INTO {}.tasks (task_name, state, recurring_slot, started_at, finished_at) VALUES "
                            "('done', 'succeeded', NULL, now(), now()), "
                            "('r', 'running', now() - interval '1 minute', now(), NULL), "
                            "('r', 'running', now(), now(), NULL)").format(table))
    assert installed_version(conn, name) == 3
    assert migrate(conn, name) is True
    assert installed_version(conn, name) == SCHEMA_VERSION
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT task_name, state, expires_at FROM {}.tasks ORDER BY id").format(table))
        assert cur.fetchall() == [("done", "succeeded", None), ("r", "running", None), ("r", "running", None)]
        cur.execute(sql.SQL("UPDATE {}.tasks SET state = 'missed' WHERE task_name = 'done'").format(table))
        cur.execute("SELECT to_regclass(%s), to_regclass(%s)", (f"{name}.tasks_finished_at", f"{name}.tasks_finished"))
        assert cur.fetchone() == (None, f"{name}.tasks_finished")  # the retention index counts 'missed' now



def test_version_5_database_with_schedules_is_upgraded_to_count_failures(fresh_schema):
    conn, name = fresh_schema
    migrate(conn, name)
    table = sql.Identifier(name)
    with conn.cursor() as cur:  # wind it back to version 5, with a schedule and one of its runs
        cur.execute(sql.SQL("ALTER TABLE {}.recurring_tasks DROP COLUMN consecutive_failures, "
                            "DROP COLUMN disabled_at").format(table))
        cur.execute(sql.SQL("DELETE FROM {}.schema_version WHERE version >= 6").format(table))
        cur.execute(sql.SQL("INSERT INTO {}.recurring_tasks (task_name, run_every, first_run_at, next_run_at) "
                            "VALUES ('reports.daily', '1 day', now(), now() + interval '1 day')").format(table))
        cur.execute(sql.SQL("INSERT INTO {}.tasks (task_name, state, recurring_slot, expires_at, finished_at) "
                            "VALUES ('reports.daily', 'failed', now(), now() + interval '1 day', now())").format(table))
    assert installed_version(conn, name) == 5
    assert migrate(conn, name) is True
    assert installed_version(conn, name) == SCHEMA_VERSION == 6
    with conn.cursor() as cur:  # every existing schedule starts enabled, with no failure counted
        cur.execute(sql.SQL("SELECT task_name, consecutive_failures, disabled_at FROM {}.recurring_tasks").format(table))
        assert cur.fetchall() == [("reports.daily", 0, None)]
        cur.execute(sql.SQL("SELECT task_name, state FROM {}.tasks").format(table))
        assert cur.fetchall() == [("reports.daily", "failed")]
