"""The supervisor's periodic round in Postgres (procqueue.supervisor_database), driven
in-process with a clock of the test's own against real Postgres."""

from __future__ import annotations

import logging

import psycopg2
import pytest

import procqueue.supervisor_database as supervisor_database
from procqueue.metrics import TaskMetrics
from procqueue.supervisor_database import SupervisorDatabase


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def database(db, processor_config, clock):
    database = SupervisorDatabase(processor_config, processor_id="round-test", clock=clock, task_metrics=TaskMetrics())
    database.start()
    yield database
    database.close()


def expired_task(db) -> int:
    with db.cursor() as cur:
        cur.execute("INSERT INTO procqueue.tasks (task_name, expires_at) VALUES ('test.expired', now()) RETURNING id")
        return cur.fetchone()[0]


def written_at(db, sql: str, row_id):
    """A now() the round wrote: the start of the transaction that wrote it, the same for
    every statement of one transaction (savepoints included), different for another."""
    with db.cursor() as cur:
        cur.execute(sql, (row_id,))
        return cur.fetchone()[0]


def test_what_falls_due_together_is_one_transaction(db, database, clock):
    """An idle processor's cost in Postgres is its periodic round: one commit, not one per chore."""
    task_id = expired_task(db)
    clock.now += 60  # heartbeat, expiry check and queue count all due
    database.run(stopping=False)
    with db.cursor() as cur:
        cur.execute("SELECT state FROM procqueue.tasks WHERE id = %s", (task_id,))
        assert cur.fetchone()[0] == "missed"
    beat = written_at(db, "SELECT heartbeat_at FROM procqueue.processors WHERE id = %s", "round-test")
    assert beat == written_at(db, "SELECT finished_at FROM procqueue.tasks WHERE id = %s", task_id)
    assert database.conn.autocommit  # back to one statement, one transaction


def test_a_queue_count_past_its_time_limit_undoes_only_itself(db, database, clock, monkeypatch, caplog):
    with db.cursor() as cur:  # enough rows that counting them takes longer than the limit
        cur.execute("INSERT INTO procqueue.tasks (task_name) SELECT 'test.many' FROM generate_series(1, 300000)")
    task_id = expired_task(db)
    before = database.queue_stats
    monkeypatch.setattr(supervisor_database, "QUEUE_STATS_TIMEOUT_SECONDS", 0.001)
    with db.cursor() as cur:
        cur.execute("SELECT heartbeat_at FROM procqueue.processors WHERE id = 'round-test'")
        [beat_before] = cur.fetchone()
    clock.now += 60
    with caplog.at_level(logging.WARNING, logger="procqueue.supervisor"):
        database.run(stopping=False)
    assert "event=queue_stats.timeout" in caplog.text
    assert database.queue_stats is before  # the figures shown are the older ones...
    with db.cursor() as cur:  # ...while the rest of the round stands
        cur.execute("SELECT heartbeat_at > %s FROM procqueue.processors WHERE id = 'round-test'", (beat_before,))
        assert cur.fetchone()[0]
        cur.execute("SELECT state FROM procqueue.tasks WHERE id = %s", (task_id,))
        assert cur.fetchone()[0] == "missed"
    assert database.up and database.failures == 0


def test_a_rescue_cut_short_by_a_time_limit_leaves_the_heartbeat_standing(db, database, clock, database_url, caplog):
    """psycopg2 reports a cancelled statement as an OperationalError, as it does a lost
    connection; the round must tell them apart, or the heartbeat goes with the rescue."""
    with db.cursor() as cur:  # a dead peer, whose row another session holds locked
        cur.execute("INSERT INTO procqueue.processors (id, hostname, pid, heartbeat_at) "
                    "VALUES ('dead-peer', 'h', 1, now() - interval '1 hour')")
    locker = psycopg2.connect(database_url)
    try:
        with locker.cursor() as cur:
            cur.execute("SELECT 1 FROM procqueue.processors WHERE id = 'dead-peer' FOR UPDATE")
        with database.conn.cursor() as cur:
            cur.execute("SET statement_timeout = '200ms'")  # the rescue waits on the lock, then is cancelled
        with db.cursor() as cur:
            cur.execute("SELECT heartbeat_at FROM procqueue.processors WHERE id = 'round-test'")
            [beat_before] = cur.fetchone()
        clock.now += 60  # may judge peers, and everything is due
        database.since = clock.now - 60
        with caplog.at_level(logging.WARNING, logger="procqueue.supervisor"):
            database.run(stopping=False)
    finally:
        locker.close()
    assert "event=supervisor.database_error chore=rescue" in caplog.text
    with db.cursor() as cur:
        cur.execute("SELECT heartbeat_at > %s FROM procqueue.processors WHERE id = 'round-test'", (beat_before,))
        assert cur.fetchone()[0]
    assert database.up and database.failures == 0
