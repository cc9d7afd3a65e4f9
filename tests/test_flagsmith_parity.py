"""Flagsmith's task-processor test suite, behaviour by behaviour, on procqueue.

Each test names the test of `Flagsmith/flagsmith-common` (tests/unit/task_processor/)
whose behaviour it holds procqueue to. Where procqueue differs on purpose, README.md's
"Porting a Django project" table says how and why, and no test here pretends otherwise.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest

import procqueue
from procqueue import maintenance
from procqueue.config import ConfigError, RetentionConfig, processor_config, retention_config_from_env

from helpers import REPO, wait_until


# -- clean-up, health, monitoring and settings (test_unit_task_processor_tasks.py, _health.py, _monitoring.py, _utils.py) --


@pytest.fixture
def retention():
    """Sets the retention the clean-up task uses, as a processor's supervisor does (Flagsmith's
    tests set Django settings); puts back what was there after the test."""
    before = procqueue.client.settings().retention
    yield lambda **settings: procqueue.configure(retention=RetentionConfig(**settings))
    procqueue.configure(retention=before)


def insert_task(db, state: str, *, finished_days_ago=None, run_in_hours=None) -> int:
    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO procqueue.tasks (task_name, state, attempts, finished_at, run_at, locked_by, locked_at)"
            " VALUES ('some.identifier', %s, %s,"
            "         now() - %s * interval '1 day', now() + coalesce(%s, 0) * interval '1 hour', %s, %s)"
            " RETURNING id",
            (state, 3 if state == "failed" else 1, finished_days_ago, run_in_hours,
             "elsewhere" if state == "running" else None, datetime.datetime.now(datetime.timezone.utc)
             if state == "running" else None))
        return cur.fetchone()[0]


def insert_run(db, task_id: int, finished_days_ago: float) -> None:
    with db.cursor() as cur:
        cur.execute("INSERT INTO procqueue.task_runs (task_id, task_name, attempt, started_at, finished_at, outcome)"
                    " VALUES (%s, 'some.identifier', 1, now() - %s * interval '1 day', now() - %s * interval '1 day',"
                    " 'succeeded')", (task_id, finished_days_ago, finished_days_ago))


def task_ids(db) -> list:
    with db.cursor() as cur:
        cur.execute("SELECT id FROM procqueue.tasks ORDER BY id")
        return [row[0] for row in cur.fetchall()]


def run_task_ids(db) -> list:
    with db.cursor() as cur:
        cur.execute("SELECT task_id FROM procqueue.task_runs ORDER BY id")
        return [row[0] for row in cur.fetchall()]


def test_clean_up_with_nothing_to_delete_deletes_nothing(db, retention):
    """Mirrors `test_unit_task_processor_tasks.py::test_clean_up_old_tasks_does_nothing_when_no_tasks`
    and `::test_clean_up_old_recurring_task_runs_does_nothing_when_no_runs`: on an empty
    queue the clean-up runs and leaves it empty."""
    retention()
    maintenance.clean_up_old_tasks()
    assert task_ids(db) == [] and run_task_ids(db) == []


def test_clean_up_deletes_finished_tasks_past_retention_and_keeps_failed_ones(db, retention):
    """Mirrors `test_unit_task_processor_tasks.py::test_clean_up_old_tasks`: with a retention
    of 2 days and batches of 1, the two tasks completed 3 days ago are deleted; the one
    completed 1 day ago, the one not yet due, and the failed one from 3 days ago are kept
    (TASK_DELETE_INCLUDE_FAILED_TASKS is false by default), and so are the failed one's runs."""
    insert_task(db, "succeeded", finished_days_ago=3)
    insert_task(db, "succeeded", finished_days_ago=3)
    recent = insert_task(db, "succeeded", finished_days_ago=1)
    future = insert_task(db, "queued", run_in_hours=1)
    failed = insert_task(db, "failed", finished_days_ago=3)
    insert_run(db, failed, finished_days_ago=3)
    retention(task_days=2, run_days=2, batch_size=1)
    maintenance.clean_up_old_tasks()
    assert task_ids(db) == [recent, future, failed]
    assert run_task_ids(db) == [failed]


def test_clean_up_deletes_run_records_past_retention(db, retention):
    """Mirrors `test_unit_task_processor_tasks.py::test_clean_up_old_recurring_task_runs`:
    with RECURRING_TASK_RUN_RETENTION_DAYS 2, the two runs finished 3 days ago are deleted and
    the one finished 1 day ago is kept (procqueue applies it to every run record, of
    recurring tasks and others, whose task is not kept as failed)."""
    for task_id in (101, 102):
        insert_run(db, task_id, finished_days_ago=3)
    insert_run(db, 103, finished_days_ago=1)
    retention(task_days=2, run_days=2, batch_size=1)
    maintenance.clean_up_old_tasks()
    assert run_task_ids(db) == [103]


def test_clean_up_deletes_failed_tasks_when_told_to(db, retention):
    """Mirrors `test_unit_task_processor_tasks.py::test_clean_up_old_tasks_include_failed_tasks`:
    with TASK_DELETE_INCLUDE_FAILED_TASKS a task that failed 3 days ago goes with a 2-day
    retention, its runs too."""
    failed = insert_task(db, "failed", finished_days_ago=3)
    insert_run(db, failed, finished_days_ago=3)
    assert retention_config_from_env({"TASK_DELETE_INCLUDE_FAILED_TASKS": "True"}).include_failed
    retention(task_days=2, run_days=2, include_failed=True)
    maintenance.clean_up_old_tasks()
    assert task_ids(db) == [] and run_task_ids(db) == []


def test_clean_up_disabled_sends_no_statement_and_deletes_nothing(db, retention, monkeypatch):
    """Mirrors `test_unit_task_processor_tasks.py::test_clean_up_old_tasks_does_not_run_if_disabled`
    and `::test_clean_up_old_recurring_task_runs_does_not_run_if_disabled`: with
    ENABLE_CLEAN_UP_OLD_TASKS false the clean-up runs without a query (it never asks for
    a connection) and a task and a run from 60 days ago are still there."""
    old = insert_task(db, "succeeded", finished_days_ago=60)
    insert_run(db, old, finished_days_ago=60)
    assert not retention_config_from_env({"ENABLE_CLEAN_UP_OLD_TASKS": "False"}).enabled
    retention(task_days=2, run_days=2, enabled=False)

    def no_connection(*args, **kwargs):
        raise AssertionError("the disabled clean-up asked for a connection")

    monkeypatch.setattr(procqueue.client, "connection", no_connection)
    maintenance.clean_up_old_tasks()
    monkeypatch.undo()
    assert task_ids(db) == [old] and run_task_ids(db) == [old]


@pytest.mark.parametrize("env, every, at", [
    ({}, timedelta(minutes=15), None),  # procqueue's own: small batches every 15 minutes
    ({"TASK_DELETE_RUN_TIME": "05:00"}, timedelta(days=1), datetime.time(5, 0)),
    ({"TASK_DELETE_RUN_EVERY": "43200"}, timedelta(hours=12), datetime.time(1, 0)),
    ({"TASK_DELETE_RUN_EVERY": "6h", "TASK_DELETE_RUN_TIME": "00:30:15"}, timedelta(hours=6),
     datetime.time(0, 30, 15)),
])
def test_clean_up_schedule_comes_from_flagsmiths_settings(env, every, at):
    """Mirrors the `@register_recurring_task(run_every=settings.TASK_DELETE_RUN_EVERY,
    first_run_time=settings.TASK_DELETE_RUN_TIME)` of Flagsmith's `tasks.py`, read by
    environs (`env.timedelta`: seconds or 1d/6h..., `env.time`): either setting switches to
    Flagsmith's schedule, the other taking its API default (every day, at 01:00 UTC)."""
    assert retention_config_from_env(env).schedule == (every, at)


def test_a_processor_registers_the_clean_up_at_the_configured_time_and_says_when_it_is_off(db, start_processor):
    """Mirrors Flagsmith's clean-up settings as a deployment sets them: a processor started
    with TASK_DELETE_RUN_TIME=05:00 schedules the clean-up daily at 05:00 UTC; one with
    ENABLE_CLEAN_UP_OLD_TASKS=false says at start that it deletes nothing."""
    processor = start_processor("--numthreads", "1", extra_env={"TASK_DELETE_RUN_TIME": "05:00"})
    processor.wait_for_log("event=processor.started")

    def schedule():
        with db.cursor() as cur:
            cur.execute("SELECT run_every, (next_run_at AT TIME ZONE 'UTC')::time FROM procqueue.recurring_tasks"
                        " WHERE task_name = %s", (maintenance.CLEANUP_TASK_NAME,))
            return cur.fetchone()

    assert wait_until(schedule) == (timedelta(days=1), datetime.time(5, 0))
    assert "clean_up=on clean_up_every_seconds=86400 clean_up_at=05:00:00" in processor.log()
    assert processor.stop() == 0
    off = start_processor("--numthreads", "1", extra_env={"ENABLE_CLEAN_UP_OLD_TASKS": "off"})
    off.wait_for_log("event=processor.started")
    assert off.log().count('clean_up="off (ENABLE_CLEAN_UP_OLD_TASKS=false: nothing is deleted)"') == 1
    assert off.stop() == 0


@pytest.mark.parametrize("env, message", [
    ({"ENABLE_CLEAN_UP_OLD_TASKS": "maybe"},
     "invalid value for ENABLE_CLEAN_UP_OLD_TASKS: 'maybe' (expected true or false)"),
    ({"TASK_DELETE_INCLUDE_FAILED_TASKS": "2"}, "invalid value for TASK_DELETE_INCLUDE_FAILED_TASKS: '2'"),
    ({"TASK_DELETE_RUN_TIME": "1am"}, "invalid value for TASK_DELETE_RUN_TIME: '1am' (expected a time of day, UTC"),
    ({"TASK_DELETE_RUN_TIME": "24:00"}, "invalid value for TASK_DELETE_RUN_TIME: '24:00'"),
    ({"TASK_DELETE_RUN_EVERY": "0"}, "invalid value for TASK_DELETE_RUN_EVERY: '0' (expected seconds >= 1"),
    ({"TASK_DELETE_RUN_EVERY": "1 fortnight"}, "invalid value for TASK_DELETE_RUN_EVERY: '1 fortnight'"),
])
def test_clean_up_settings_mistakes_are_one_line_naming_the_variable(env, message):
    """Mirrors environs' refusal of a bad `env.bool`/`env.time`/`env.timedelta` in
    Flagsmith's settings, as procqueue's one-line configuration error (exit 2)."""
    with pytest.raises(ConfigError) as error:
        processor_config(env=env)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_django_time_and_timedelta_settings_are_read_as_flagsmith_writes_them():
    """Mirrors Flagsmith's settings module, which holds `TASK_DELETE_RUN_TIME = env.time(...)`
    and `TASK_DELETE_RUN_EVERY = env.timedelta(...)`: the Django app spells such values so
    procqueue's config reads the same schedule."""
    pytest.importorskip("django")
    from procqueue.contrib.django.settings import setting_text

    env = {"TASK_DELETE_RUN_TIME": setting_text("TASK_DELETE_RUN_TIME", datetime.time(5, 0)),
           "TASK_DELETE_RUN_EVERY": setting_text("TASK_DELETE_RUN_EVERY", timedelta(days=1)),
           "TASK_DELETE_INCLUDE_FAILED_TASKS": setting_text("TASK_DELETE_INCLUDE_FAILED_TASKS", False)}
    config = retention_config_from_env(env)
    assert config.schedule == (timedelta(days=1), datetime.time(5, 0)) and not config.include_failed
    assert retention_config_from_env(
        {"TASK_DELETE_RUN_EVERY": setting_text("TASK_DELETE_RUN_EVERY", timedelta(minutes=90, seconds=0.5))}
    ).run_every == timedelta(minutes=90, seconds=0.5)


def health_check_rows(db) -> int:
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM procqueue.tasks WHERE task_name = %s", (maintenance.HEALTH_CHECK_TASK_NAME,))
        return cur.fetchone()[0]


def test_is_processor_healthy_is_false_without_a_processor_and_leaves_no_row(db):
    """Mirrors `test_unit_task_processor_health.py::test_is_processor_healthy_returns_false_if_task_not_processed`:
    with no processor the canary is never run; after its tries (0.1 + 0.2 + 0.4 + 0.8 s of
    waiting) the answer is False, and the canary it enqueued is gone."""
    started = time.monotonic()
    assert procqueue.is_processor_healthy() is False
    assert 1.4 < time.monotonic() - started < 5
    assert health_check_rows(db) == 0


def test_is_processor_healthy_is_true_when_a_processor_runs_the_canary(db, start_processor):
    """Mirrors `test_unit_task_processor_health.py::test_is_processor_healthy_returns_true_if_task_processed`
    with a real processor: it runs the no-op task within the tries, the answer is True,
    and neither the task nor its run is left behind."""
    processor = start_processor("--numthreads", "1")
    processor.wait_for_status(lambda d: d["state"] == "running")
    assert procqueue.is_processor_healthy() is True
    assert health_check_rows(db) == 0
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM procqueue.task_runs WHERE task_name = %s",
                    (maintenance.HEALTH_CHECK_TASK_NAME,))
        assert cur.fetchone()[0] == 0
    assert processor.stop() == 0


def test_is_processor_healthy_under_synchronously_runs_inline_and_writes_nothing(db):
    """Mirrors `test_unit_task_processor_health.py::test_is_processor_healthy_returns_true_if_task_processed`
    (run under TASK_RUN_METHOD=SYNCHRONOUSLY): the canary runs in the caller, the answer
    is True at once, and no row is written."""
    procqueue.configure(task_run_method=procqueue.TaskRunMethod.SYNCHRONOUSLY)
    try:
        started = time.monotonic()
        assert procqueue.is_processor_healthy() is True
        assert time.monotonic() - started < 1
    finally:
        procqueue.configure(task_run_method=procqueue.TaskRunMethod.TASK_PROCESSOR)
    assert health_check_rows(db) == 0


def test_waiting_counts_only_due_unclaimed_tasks(db, database_url):
    """Mirrors `test_unit_task_processor_monitoring.py::test_get_num_waiting_tasks`: of a task
    due now, one scheduled for later, one completed and one running (locked), one is
    waiting; `procqueue stats` (as `/monitoring`) says `"waiting": 1`."""
    insert_task(db, "queued", run_in_hours=-1)
    insert_task(db, "queued", run_in_hours=1)
    insert_task(db, "succeeded", finished_days_ago=0)
    insert_task(db, "running")
    env = dict(os.environ, DATABASE_URL=database_url, PROCQUEUE_SCHEMA="procqueue", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "procqueue", "stats"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["waiting"] == 1 and stats["scheduled"] == 1 and stats["running"] == 1


def flags(config) -> tuple:
    return config.num_workers, config.sleep_interval_ms, config.grace_period_ms, config.queue_pop_size


def test_no_environment_gives_the_run_docker_defaults():
    """Mirrors `test_unit_task_processor_utils.py::test_add_arguments__no_env__uses_run_docker_defaults`:
    5 workers, 20000 ms grace, 10 per claim; the sleep interval is procqueue's documented
    2000 ms, not current Flagsmith's 500 (with LISTEN it only bounds how late a delayed
    task or a retry may start while idle: README, `--sleepintervalms`)."""
    assert flags(processor_config(env={})) == (5, 2000, 20000, 10)


def test_environment_values_are_used():
    """Mirrors `test_unit_task_processor_utils.py::test_add_arguments__env_set__uses_env_values`."""
    env = dict(zip(("TASK_PROCESSOR_NUM_THREADS", "TASK_PROCESSOR_SLEEP_INTERVAL_MS", "TASK_PROCESSOR_GRACE_PERIOD_MS",
                    "TASK_PROCESSOR_QUEUE_POP_SIZE"), ("8", "250", "15000", "20")))
    assert flags(processor_config(env=env)) == (8, 250, 15000, 20)


def test_legacy_sleep_interval_is_the_fallback():
    """Mirrors `test_unit_task_processor_utils.py::test_add_arguments__legacy_sleep_interval__used_as_fallback`:
    Flagsmith's older TASK_PROCESSOR_SLEEP_INTERVAL (milliseconds too) is read when the _MS
    name is unset."""
    assert processor_config(env={"TASK_PROCESSOR_SLEEP_INTERVAL": "750"}).sleep_interval_ms == 750


def test_sleep_interval_ms_takes_precedence_over_legacy():
    """Mirrors `test_unit_task_processor_utils.py::test_add_arguments__sleep_interval_ms__takes_precedence_over_legacy`:
    with both set, TASK_PROCESSOR_SLEEP_INTERVAL_MS wins (and the legacy one is not even
    checked, as in Flagsmith, which reads it only in the absence of the other)."""
    env = {"TASK_PROCESSOR_SLEEP_INTERVAL_MS": "300", "TASK_PROCESSOR_SLEEP_INTERVAL": "750"}
    assert processor_config(env=env).sleep_interval_ms == 300
    assert processor_config(env={**env, "TASK_PROCESSOR_SLEEP_INTERVAL": "not a number"}).sleep_interval_ms == 300
