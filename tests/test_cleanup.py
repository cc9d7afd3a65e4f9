"""Retention clean-up: the built-in recurring task deletes only what is old and finished."""

from __future__ import annotations

import pytest

import procqueue
from procqueue import maintenance
from procqueue.config import RetentionConfig
from procqueue.registry import recurring_schedules


@pytest.fixture
def retention():
    """Sets the retention the clean-up task uses, as a processor's supervisor does;
    puts back what was there after the test."""
    before = procqueue.client.settings()
    yield lambda **settings: procqueue.configure(retention=RetentionConfig(**settings))
    procqueue.client.use_settings(before)


def test_cleanup_is_a_registered_recurring_task():
    names = [s.task_name for s in recurring_schedules()]
    assert maintenance.CLEANUP_TASK_NAME in names


def test_cleanup_deletes_old_finished_tasks_and_runs_only(db, retention):
    with db.cursor() as cur:
        cur.execute("""
            INSERT INTO procqueue.tasks (task_name, state, finished_at) VALUES
              ('old.ok', 'succeeded', now() - interval '20 days'),
              ('old.failed', 'failed', now() - interval '20 days'),
              ('old.cancelled', 'cancelled', now() - interval '20 days'),
              ('recent.ok', 'succeeded', now() - interval '1 day');
            INSERT INTO procqueue.tasks (task_name, state, run_at) VALUES
              ('old.still.queued', 'queued', now() - interval '30 days');
            INSERT INTO procqueue.task_runs (task_id, task_name, attempt, finished_at, outcome) VALUES
              (1, 'old.ok', 1, now() - interval '20 days', 'succeeded'),
              (4, 'recent.ok', 1, now() - interval '1 day', 'succeeded');
        """)
    retention(task_days=15, run_days=15, batch_size=1)  # batches of one row
    maintenance.clean_up_old_tasks()
    with db.cursor() as cur:
        cur.execute("SELECT task_name FROM procqueue.tasks ORDER BY id")
        # Failed tasks are kept (TASK_DELETE_INCLUDE_FAILED_TASKS is false by default).
        assert [r[0] for r in cur.fetchall()] == ["old.failed", "recent.ok", "old.still.queued"]
        cur.execute("SELECT task_name FROM procqueue.task_runs")
        assert [r[0] for r in cur.fetchall()] == ["recent.ok"]


def test_retention_comes_from_flagsmith_environment_variables():
    from procqueue.config import processor_config

    config = processor_config(env={"TASK_DELETE_RETENTION_DAYS": "3", "RECURRING_TASK_RUN_RETENTION_DAYS": "7",
                                   "TASK_DELETE_BATCH_SIZE": "500"})
    assert config.retention == RetentionConfig(task_days=3, run_days=7, batch_size=500)


def test_a_processors_retention_is_what_its_clean_up_uses(db, retention, monkeypatch):
    # The supervisor hands its config's retention over before forking the workers that
    # run the clean-up; the environment it was built from is not read again there.
    with db.cursor() as cur:
        cur.execute("INSERT INTO procqueue.tasks (task_name, state, finished_at) VALUES "
                    "('five.days.old', 'succeeded', now() - interval '5 days')")
    monkeypatch.setenv("TASK_DELETE_RETENTION_DAYS", "30")  # would keep it
    retention(task_days=3, run_days=3, batch_size=100)
    maintenance.clean_up_old_tasks()
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM procqueue.tasks")
        assert cur.fetchone()[0] == 0
