"""Retention clean-up: the built-in recurring task deletes only what is old and finished."""

from __future__ import annotations

import pytest

import procqueue
from procqueue import maintenance, registry
from procqueue.config import RetentionConfig
from procqueue.queries import Queries
from procqueue.registry import recurring_schedules

queries = Queries("procqueue")


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


@pytest.fixture
def clean_up_setting():
    """Sets the clean-up's schedule as a processor's supervisor does at start; back to the
    default after the test."""
    yield lambda **settings: maintenance.schedule_clean_up(RetentionConfig(**settings))
    maintenance.schedule_clean_up(RetentionConfig())


def clean_up_tasks(db) -> list:
    with db.cursor() as cur:
        cur.execute("SELECT state FROM procqueue.tasks WHERE task_name = %s", (maintenance.CLEANUP_TASK_NAME,))
        return [state for state, in cur.fetchall()]


def test_a_processor_with_the_clean_up_off_does_not_schedule_it(db, processor_config, clean_up_setting):
    """ENABLE_CLEAN_UP_OLD_TASKS=false: no clean-up run every interval (each would add task
    and run rows nothing deletes). The processor neither registers the schedule nor looks
    for its slots, so one kept by a processor with the clean-up on is left to that one: due,
    it is enqueued and run once, by that processor's worker. The handler stays registered."""
    from procqueue.worker import Worker

    clean_up_setting(enabled=False)
    assert maintenance.CLEANUP_TASK_NAME not in [s.task_name for s in recurring_schedules()]
    assert registry.get_handler(maintenance.CLEANUP_TASK_NAME) is not None
    off = Worker(processor_config, processor_id="clean-up-off", index=0)
    off.ensure_connected()
    try:
        assert maintenance.CLEANUP_TASK_NAME not in off.recurring_names
        # A processor with the clean-up on registered it; its slot is due now.
        clean_up_setting(enabled=True)
        [schedule] = [s for s in recurring_schedules() if s.task_name == maintenance.CLEANUP_TASK_NAME]
        queries.register_recurring(db, name=schedule.task_name, run_every=schedule.run_every,
                                   first_run_at=schedule.first_run_at,
                                   timeout_seconds=schedule.timeout.total_seconds())
        assert off.step() == 0
        assert clean_up_tasks(db) == []
        on = Worker(processor_config, processor_id="clean-up-on", index=0)
        on.ensure_connected()
        try:
            assert on.step() == 1
            assert off.step() == 0 and on.step() == 0
        finally:
            on.close()
    finally:
        off.close()
    assert clean_up_tasks(db) == ["succeeded"]
