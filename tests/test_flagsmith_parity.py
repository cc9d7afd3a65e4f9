"""Flagsmith's task-processor test suite, behaviour by behaviour, on procqueue.

Each test names the test of `Flagsmith/flagsmith-common` (tests/unit/task_processor/)
whose behaviour it holds procqueue to. Where procqueue differs on purpose, README.md's
"Porting a Django project" table says how and why, and no test here pretends otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import enum
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import types
import uuid
from datetime import date, time as time_of_day, timedelta, timezone
from decimal import Decimal

import pytest

import procqueue
from procqueue import (InvalidArgumentsError, RunOutcome, TaskBackoffError, TaskPriority, TaskProcessingError,
                       TaskRunMethod, TaskState, client, maintenance, register_recurring_task, register_task_handler,
                       registry)
from procqueue.config import ConfigError, RetentionConfig, processor_config, retention_config_from_env
from procqueue.execution import soft_timeout
from procqueue.queries import MAX_CONSECUTIVE_FAILURES, Queries
from procqueue.registry import NO_TIMEOUT
from procqueue.worker import Worker

from helpers import REPO, TESTS, wait_until


# -- clean-up, health, monitoring and settings (test_unit_task_processor_tasks.py, _health.py, _monitoring.py, _utils.py) --


@pytest.fixture
def retention():
    """Sets the retention the clean-up task uses, as a processor's supervisor does (Flagsmith's
    tests set Django settings); puts back what was there after the test."""
    before = procqueue.client.settings()
    yield lambda **settings: procqueue.configure(retention=RetentionConfig(**settings))
    procqueue.client.use_settings(before)


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
    (TASK_DELETE_INCLUDE_FAILED_TASKS is false by default). (Its run records go by their
    own retention, as every run's: the task keeps its last error.)"""
    insert_task(db, "succeeded", finished_days_ago=3)
    insert_task(db, "succeeded", finished_days_ago=3)
    recent = insert_task(db, "succeeded", finished_days_ago=1)
    future = insert_task(db, "queued", run_in_hours=1)
    failed = insert_task(db, "failed", finished_days_ago=3)
    insert_run(db, failed, finished_days_ago=3)
    insert_run(db, failed, finished_days_ago=1)
    retention(task_days=2, run_days=2, batch_size=1)
    maintenance.clean_up_old_tasks()
    assert task_ids(db) == [recent, future, failed]
    assert run_task_ids(db) == [failed]  # the recent run only


def test_clean_up_deletes_run_records_past_retention(db, retention):
    """Mirrors `test_unit_task_processor_tasks.py::test_clean_up_old_recurring_task_runs`:
    with RECURRING_TASK_RUN_RETENTION_DAYS 2, the two runs finished 3 days ago are deleted and
    the one finished 1 day ago is kept (procqueue applies it to every run record, of
    recurring tasks and others)."""
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


SCHEMA = "procqueue"
queries = Queries(SCHEMA)


# -- retries, backoff and recurring tasks (test_unit_task_processor_processor.py) --

ran: list = []


@pytest.fixture(autouse=True)
def clear_ran():
    ran.clear()


def runs(task_id):
    return procqueue.get_task_runs(task_id)


@contextlib.contextmanager
def alarm_lent_to_the_worker():
    """The worker's soft timeout uses SIGALRM, which pytest-timeout also keeps: lend it to
    the worker for the block, then give it back."""
    saved_handler = signal.getsignal(signal.SIGALRM)
    saved_timer = signal.getitimer(signal.ITIMER_REAL)
    began = time.monotonic()
    soft_timeout.install()
    try:
        yield
    finally:
        soft_timeout.installed = False
        signal.signal(signal.SIGALRM, saved_handler)
        if saved_timer[0]:
            signal.setitimer(signal.ITIMER_REAL, max(saved_timer[0] - (time.monotonic() - began), 0.1))


def standard_task(name, func, **options):
    return procqueue.register_task_handler(task_name=f"parity.{name}", **options)(func)


def recurring_task(db, worker, name, func, run_every=timedelta(hours=1), timeout=timedelta(minutes=30)):
    """Register a recurring task as a processor does at start, for `worker` to schedule."""
    handler = procqueue.register_recurring_task(run_every=run_every, task_name=f"parity.{name}",
                                                timeout=timeout)(func)
    register(db, handler.task_name)
    worker.recurring_names = [*worker.recurring_names, handler.task_name]
    return handler


def register(db, task_name):
    [schedule] = [s for s in registry.recurring_schedules() if s.task_name == task_name]
    queries.register_recurring(db, name=schedule.task_name, run_every=schedule.run_every,
                               first_run_at=schedule.first_run_at, timeout_seconds=schedule.timeout.total_seconds(),
                               args_json=schedule.args_json, kwargs_json=schedule.kwargs_json)


def run_slot(db, worker, task_name, *, due=True):
    """One worker step with `task_name`'s next slot due now (the test stands in for the
    passing of its interval). Returns how many tasks the step ran."""
    if due:
        with db.cursor() as cur:
            cur.execute(f"UPDATE {SCHEMA}.recurring_tasks SET next_run_at = now() WHERE task_name = %s", (task_name,))
    worker.next_recurring_check = 0.0
    return worker.step()


def schedule_state(db, task_name):
    with db.cursor() as cur:
        cur.execute(f"SELECT consecutive_failures, disabled_at IS NOT NULL FROM {SCHEMA}.recurring_tasks "
                    "WHERE task_name = %s", (task_name,))
        return cur.fetchone()


def recurring_runs(db, task_name):
    with db.cursor() as cur:
        cur.execute(f"SELECT r.outcome FROM {SCHEMA}.task_runs AS r WHERE r.task_name = %s ORDER BY r.id",
                    (task_name,))
        return [RunOutcome(row[0]) for row in cur.fetchall()]


def succeed(*args, **kwargs):
    ran.append((args, kwargs))


def fail(*args, **kwargs):
    ran.append((args, kwargs))
    raise RuntimeError("Error!")


def sleep_ten_seconds():
    time.sleep(10)


def test_run_task_success_creates_a_succeeded_run(worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_task__success__creates_task_run_object`:
    a task that returns ends succeeded with one run record, started and finished, without error."""
    task = standard_task("dummy", succeed)
    task_id = task.delay(args=("foo",), kwargs={"arg_two": "bar"})
    assert worker.step() == 1
    assert ran == [(("foo",), {"arg_two": "bar"})]
    record = procqueue.get_task(task_id)
    assert record.state is TaskState.SUCCEEDED and record.locked_by is None
    [run] = runs(task_id)
    assert run.outcome is RunOutcome.SUCCEEDED and run.error is None
    assert run.started_at is not None and run.started_at <= run.finished_at


def test_run_task_failure_creates_a_failed_run_with_its_traceback(worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_task__failure__creates_task_run_object`:
    a task that raises gets a failed run with the traceback and is not finished (it will be
    retried). (Flagsmith leaves the run's finished_at empty; procqueue records when it ended.)"""
    task = standard_task("raise_exception", fail)
    task_id = task.delay(args=("Error!",))
    assert worker.step() == 1
    record = procqueue.get_task(task_id)
    assert record.state is TaskState.QUEUED and record.finished_at is None and record.locked_by is None
    [run] = runs(task_id)
    assert run.outcome is RunOutcome.FAILED
    assert "Traceback (most recent call last)" in run.error and "RuntimeError: Error!" in run.error


@pytest.mark.timeout(60)
def test_run_task_past_its_timeout_is_interrupted_within_two_seconds(worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_task__timeout__kills_task` and
    `::test_run_task__timeout__does_not_block`: a task of timeout 0.1 s sleeping 10 s is
    stopped well within 2 s, its run timed_out with TimeoutError in its error, one attempt
    used, and it goes back to the queue. (Flagsmith's task thread runs on; procqueue's is
    interrupted.)"""
    task = standard_task("sleeper", sleep_ten_seconds, timeout=timedelta(milliseconds=100))
    task_id = task.delay()
    with alarm_lent_to_the_worker():
        began = time.monotonic()
        assert worker.step() == 1
        elapsed = time.monotonic() - began
    assert elapsed < 2
    record = procqueue.get_task(task_id)
    assert (record.state, record.attempts, record.locked_by) == (TaskState.QUEUED, 1, None)
    [run] = runs(task_id)
    assert run.outcome is RunOutcome.TIMED_OUT and "TimeoutError" in run.error


def test_run_task_failed_task_runs_again_at_once_with_no_backoff(worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_task__failed_task__runs_again`:
    a failed task is picked again on the next run, both runs failed, the task not finished
    and not locked. (Flagsmith retries at once; procqueue does with retry_backoff=0, and
    waits 5 s doubling by default.)"""
    task = standard_task("fails_twice", fail, retry_backoff=timedelta(0))
    task_id = task.delay()
    assert worker.step() == 1
    assert worker.step() == 1
    assert [run.outcome for run in runs(task_id)] == [RunOutcome.FAILED, RunOutcome.FAILED]
    record = procqueue.get_task(task_id)
    assert (record.state, record.attempts, record.locked_by) == (TaskState.QUEUED, 2, None)


def test_run_task_multiple_priorities_run_highest_first(worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_task__multiple_priorities__runs_in_correct_order`:
    of two HIGH tasks and a HIGHEST one enqueued after them, the HIGHEST runs first, then
    the HIGH ones in the order they were enqueued."""
    task = standard_task("ordered", succeed)
    task.delay(args=("high-1",), priority=TaskPriority.HIGH)
    task.delay(args=("high-2",), priority=TaskPriority.HIGH)
    task.delay(args=("highest",), priority=TaskPriority.HIGHEST)
    for _ in range(3):
        worker.claim_size = 1  # one task a claim, as Flagsmith's test pops one at a time
        assert worker.step() == 1
    assert [args[0] for args, _ in ran] == ["highest", "high-1", "high-2"]


def test_run_tasks_a_locked_task_is_skipped_and_the_next_one_runs(db, worker, processor_config, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_tasks__locked_task__skips_locked`:
    while one worker holds a task, another worker does not take it, and runs the next one."""
    task = standard_task("locked", succeed)
    held_id = task.delay(args=("held",))
    other_id = task.delay(args=("other",))
    [held] = worker.queries.claim(worker.conn, processor=worker.processor_id, worker=worker.index, limit=1)
    assert held.id == held_id
    second = Worker(processor_config, processor_id="test-processor", index=1)
    second.recurring_names = []
    second.ensure_connected()
    try:
        assert second.step() == 1
    finally:
        second.close()
    assert ran == [(("other",), {})]
    assert procqueue.get_task(other_id).state is TaskState.SUCCEEDED
    assert procqueue.get_task(held_id).state is TaskState.RUNNING  # still the first worker's


def test_run_tasks_multiple_tasks_all_run(worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_tasks__multiple_tasks__runs_all`:
    five tasks enqueued, five successful runs."""
    task = standard_task("five", succeed)
    task_ids = [task.delay(args=(n,)) for n in range(5)]
    assert worker.step() == 5
    assert [procqueue.get_task(i).state for i in task_ids] == [TaskState.SUCCEEDED] * 5
    assert sorted(args[0] for args, _ in ran) == [0, 1, 2, 3, 4]


def backoff_until(seconds):
    raise TaskBackoffError(delay_until=datetime.datetime.now(timezone.utc) + timedelta(seconds=seconds))


def backoff_by_default():
    raise TaskBackoffError()


@pytest.mark.parametrize("delay_until", [True, False], ids=["delay_until", "default_delay_setting"])
def test_run_task_backoff_persists_the_next_run(db, database_url, delay_until, throwaway_tasks, caplog):
    """Mirrors `test_unit_task_processor_processor.py::test_run_task__backoff__persists_expected`:
    a task raising TaskBackoffError is put back to run at its delay_until, or without one
    at now + TASK_BACKOFF_DEFAULT_DELAY_SECONDS (set to 10 here), and the backoff is logged
    at INFO with when it runs again. (It uses an attempt, as Flagsmith's does.)"""
    config = processor_config(database_url=database_url, schema=SCHEMA,
                              env={"TASK_BACKOFF_DEFAULT_DELAY_SECONDS": "10"})
    worker = Worker(config, processor_id="test-processor", index=0)
    worker.recurring_names = []
    worker.ensure_connected()
    if delay_until:
        task_id = standard_task("backoff_until", backoff_until).delay(args=(30,))
        expected = timedelta(seconds=30)
    else:
        task_id = standard_task("backoff_default", backoff_by_default).delay()
        expected = timedelta(seconds=10)
    try:
        with caplog.at_level(logging.INFO, logger="procqueue.worker"):
            before = datetime.datetime.now(timezone.utc)
            assert worker.step() == 1
    finally:
        worker.close()
    record = procqueue.get_task(task_id)
    assert (record.state, record.attempts) == (TaskState.QUEUED, 1)
    assert before + expected - timedelta(seconds=1) <= record.run_at <= datetime.datetime.now(timezone.utc) + expected
    [run] = runs(task_id)
    assert run.outcome is RunOutcome.BACKOFF
    [line] = [r for r in caplog.records if "event=task.backoff" in r.getMessage()]
    assert line.levelno == logging.INFO and f"task_id={task_id}" in line.getMessage()
    assert "retry_at=" in line.getMessage()


def test_run_task_backoff_on_the_last_attempt_ends_failed(db, worker, throwaway_tasks, caplog):
    """Mirrors `test_unit_task_processor_processor.py::test_run_task__backoff_max_num_failures__noop`:
    a backoff on a task's last allowed attempt does not put it back (no INFO backoff line);
    it ends failed, its error saying it backed off on its last attempt, with the traceback.
    (Flagsmith leaves the task unfinished and never picked again; procqueue names it failed.)"""
    task_id = standard_task("backoff_always", backoff_by_default, max_attempts=3).delay()
    with db.cursor() as cur:  # two attempts used already, as Flagsmith's test sets num_failures
        cur.execute(f"UPDATE {SCHEMA}.tasks SET attempts = 2 WHERE id = %s", (task_id,))
    with caplog.at_level(logging.INFO, logger="procqueue.worker"):
        assert worker.step() == 1
    record = procqueue.get_task(task_id)
    assert (record.state, record.attempts) == (TaskState.FAILED, 3)
    assert record.last_error.startswith("backed off on its last attempt (3 of 3)")
    assert "Traceback (most recent call last)" in record.last_error and "TaskBackoffError" in record.last_error
    [run] = runs(task_id)
    assert run.outcome is RunOutcome.BACKOFF
    assert not [r for r in caplog.records if "event=task.backoff" in r.getMessage() and r.levelno == logging.INFO]


def test_run_recurring_task_backoff_ends_the_run_missed(db, worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_task__backoff_recurring__raises_expected`:
    Flagsmith raises AssertionError("Attempt to back off a recurring task (currently not
    supported)"); procqueue ends the run missed with a backoff run (the next slot is its
    retry), and does not count it as a failure of the schedule."""
    handler = recurring_task(db, worker, "recurring_backoff", backoff_by_default)
    assert run_slot(db, worker, handler.task_name, due=False) == 1
    assert recurring_runs(db, handler.task_name) == [RunOutcome.BACKOFF]
    assert schedule_state(db, handler.task_name) == (0, False)
    with db.cursor() as cur:
        cur.execute(f"SELECT state FROM {SCHEMA}.tasks WHERE task_name = %s", (handler.task_name,))
        assert cur.fetchall() == [("missed",)]


def test_run_recurring_task_success_creates_a_succeeded_run(db, worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_recurring_task__success__creates_recurring_task_run_object`:
    a recurring run that returns is recorded succeeded."""
    handler = recurring_task(db, worker, "recurring_ok", succeed)
    assert run_slot(db, worker, handler.task_name, due=False) == 1
    assert recurring_runs(db, handler.task_name) == [RunOutcome.SUCCEEDED]


def test_run_recurring_task_failure_creates_a_failed_run(db, worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_recurring_task__failure__creates_recurring_task_run_object`:
    a recurring run that raises is recorded failed, and counted once on its schedule."""
    handler = recurring_task(db, worker, "recurring_fails", fail)
    assert run_slot(db, worker, handler.task_name, due=False) == 1
    assert recurring_runs(db, handler.task_name) == [RunOutcome.FAILED]
    assert schedule_state(db, handler.task_name) == (1, False)


@pytest.mark.timeout(60)
def test_run_recurring_task_past_its_timeout_is_interrupted(db, worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_recurring_task__timeout__kills_task`:
    a recurring run of timeout 0.1 s sleeping 10 s is stopped within 2 s and recorded
    timed_out, with TimeoutError in its error; it counts as a failure of its schedule."""
    handler = recurring_task(db, worker, "recurring_sleeper", sleep_ten_seconds, timeout=timedelta(milliseconds=100))
    with alarm_lent_to_the_worker():
        began = time.monotonic()
        assert run_slot(db, worker, handler.task_name, due=False) == 1
        elapsed = time.monotonic() - began
    assert elapsed < 2
    with db.cursor() as cur:
        cur.execute(f"SELECT t.state, r.outcome, r.error FROM {SCHEMA}.tasks AS t JOIN {SCHEMA}.task_runs AS r "
                    "ON r.task_id = t.id WHERE t.task_name = %s", (handler.task_name,))
        [(state, outcome, error)] = cur.fetchall()
    assert (state, outcome) == ("failed", "timed_out") and "TimeoutError" in error
    assert schedule_state(db, handler.task_name) == (1, False)


def test_run_recurring_task_called_twice_within_its_interval_runs_once(db, worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_recurring_task__called_before_interval__executes_only_once`
    and `::test_run_recurring_task__multiple_runs__executes_expected_times`: a second look
    within the interval runs nothing; the next interval runs it again."""
    handler = recurring_task(db, worker, "recurring_once", succeed)
    assert run_slot(db, worker, handler.task_name, due=False) == 1
    assert run_slot(db, worker, handler.task_name, due=False) == 0  # still within its hour
    assert len(ran) == 1
    assert run_slot(db, worker, handler.task_name) == 1  # the next slot
    assert len(ran) == 2


def test_run_recurring_task_multiple_tasks_each_run_once(db, worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_recurring_task__multiple_tasks__loops_over_all`:
    three hourly tasks and four looks run each exactly once."""
    names = [recurring_task(db, worker, f"hourly_{n}", succeed).task_name for n in range(3)]
    total = sum(run_slot(db, worker, names[0], due=False) for _ in range(4))
    assert total == 3
    for name in names:
        assert recurring_runs(db, name) == [RunOutcome.SUCCEEDED]


def test_run_recurring_task_four_consecutive_failures_disable_it(db, worker, throwaway_tasks, caplog):
    """Mirrors `test_unit_task_processor_processor.py::test_run_recurring_task__four_consecutive_failures__auto_disables`:
    after four failed runs in a row the schedule is disabled with a count of 4, and no
    further run is picked up. procqueue logs the disabling once, at WARNING."""
    handler = recurring_task(db, worker, "always_fails", fail)
    with caplog.at_level(logging.INFO, logger="procqueue.worker"):
        for _ in range(MAX_CONSECUTIVE_FAILURES):
            assert run_slot(db, worker, handler.task_name) == 1
        assert schedule_state(db, handler.task_name) == (4, True)
        assert run_slot(db, worker, handler.task_name) == 0  # the fifth slot: not enqueued
    assert recurring_runs(db, handler.task_name) == [RunOutcome.FAILED] * 4
    disabled = [r for r in caplog.records if "event=recurring.disabled" in r.getMessage()]
    assert len(disabled) == 1 and disabled[0].levelno == logging.WARNING
    assert f"task={handler.task_name} failures=4" in disabled[0].getMessage()


def test_run_recurring_task_success_resets_consecutive_failures(db, worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_recurring_task__success_resets_consecutive_failures`:
    a schedule with two failures in a row that then succeeds is back at 0, enabled."""
    handler = recurring_task(db, worker, "recovers", succeed)
    with db.cursor() as cur:
        cur.execute(f"UPDATE {SCHEMA}.recurring_tasks SET consecutive_failures = 2 WHERE task_name = %s",
                    (handler.task_name,))
    assert run_slot(db, worker, handler.task_name) == 1
    assert schedule_state(db, handler.task_name) == (0, False)


def test_run_recurring_task_disabled_task_is_not_picked_up(db, worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_recurring_task__disabled_task__not_picked_up`:
    a disabled schedule, though due, does not run."""
    handler = recurring_task(db, worker, "disabled", succeed)
    with db.cursor() as cur:
        cur.execute(f"UPDATE {SCHEMA}.recurring_tasks SET disabled_at = now() WHERE task_name = %s",
                    (handler.task_name,))
    assert run_slot(db, worker, handler.task_name) == 0
    assert ran == [] and recurring_runs(db, handler.task_name) == []


def test_run_recurring_task_reenabled_by_an_operator_runs_again(db, database_url, worker, throwaway_tasks):
    """Mirrors the "Re-enable selected tasks" admin action that
    `test_unit_task_processor_processor.py::test_run_recurring_task__four_consecutive_failures__auto_disables`
    leaves to an operator: `procqueue recurring enable NAME` resets the count, and the
    schedule runs again."""
    handler = recurring_task(db, worker, "flaky_schedule", fail)
    for _ in range(MAX_CONSECUTIVE_FAILURES):
        run_slot(db, worker, handler.task_name)
    assert schedule_state(db, handler.task_name) == (4, True)
    with db.cursor() as cur:  # disabled for a while: its next slot passed
        cur.execute(f"UPDATE {SCHEMA}.recurring_tasks SET next_run_at = now() - interval '90 minutes' "
                    "WHERE task_name = %s", (handler.task_name,))
    env = dict(os.environ, DATABASE_URL=database_url, PROCQUEUE_SCHEMA=SCHEMA,
               PYTHONPATH=f"{TESTS}{os.pathsep}{REPO}")
    enabled = subprocess.run([sys.executable, "-m", "procqueue", "recurring", "enable", handler.task_name],
                             env=env, capture_output=True, text=True, timeout=60)
    assert (enabled.returncode, enabled.stdout.strip()) == (0, f"enabled {handler.task_name}"), enabled.stderr
    assert schedule_state(db, handler.task_name) == (0, False)
    assert run_slot(db, worker, handler.task_name, due=False) == 1  # the latest slot, at once
    assert recurring_runs(db, handler.task_name)[-1] is RunOutcome.FAILED
    assert schedule_state(db, handler.task_name) == (1, False)


def test_run_recurring_task_reregistered_at_start_stays_disabled(db, worker, throwaway_tasks):
    """Mirrors Flagsmith's registration at start (`update_or_create` keeps `is_disabled`),
    which `test_unit_task_processor_processor.py::test_run_recurring_task__disabled_task__not_picked_up`
    relies on: a processor starting and registering a disabled schedule again does not
    enable it, nor reset its count."""
    handler = recurring_task(db, worker, "still_broken", fail)
    for _ in range(MAX_CONSECUTIVE_FAILURES):
        run_slot(db, worker, handler.task_name)
    register(db, handler.task_name)  # what every processor does when it starts
    assert schedule_state(db, handler.task_name) == (4, True)
    assert run_slot(db, worker, handler.task_name) == 0



def test_run_recurring_task_unknown_to_this_processor_does_not_count_towards_disabling(db, worker, throwaway_tasks):
    """Beyond Flagsmith (its processors skip a schedule they do not know): during a rolling
    deploy, a processor of the older release claims a run of a schedule only the newer
    release has. The run is recorded failed ("not registered in this processor"), but that
    says nothing about the task: its schedule's count stays, and it is not disabled."""
    name = "parity.new_in_next_release"
    queries.register_recurring(db, name=name, run_every=timedelta(hours=1), first_run_at=None,
                               timeout_seconds=60, args_json="[]", kwargs_json="{}")
    with db.cursor() as cur:  # three real failures already: a fourth would disable it
        cur.execute(f"UPDATE {SCHEMA}.recurring_tasks SET consecutive_failures = 3 WHERE task_name = %s", (name,))
    [run] = queries.schedule_recurring(db, [name])  # a processor of the newer release enqueued it
    assert worker.step() == 1  # this one does not know it
    [record] = runs(run.task_id)
    assert record.outcome is RunOutcome.FAILED and "not registered in this processor" in record.error
    assert schedule_state(db, name) == (3, False)


def test_run_recurring_task_disabled_ends_its_next_slot_already_queued_missed(db, worker, throwaway_tasks):
    """Beyond Flagsmith: a run longer than its interval leaves the next slot enqueued when
    its fourth failure in a row disables the schedule. That run never starts: it ends
    missed (no run record: nothing ran), and the schedule keeps its count of 4. Were it to
    run and succeed, the schedule would show (0, disabled): no count saying why."""
    calls = []

    def fails_four_times_then_succeeds():
        calls.append(1)
        if len(calls) < MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError("Error!")
        if len(calls) == MAX_CONSECUTIVE_FAILURES:
            # The fourth run outlasts its interval: meanwhile the next slot is enqueued.
            with db.cursor() as cur:
                cur.execute(f"UPDATE {SCHEMA}.recurring_tasks SET next_run_at = now() WHERE task_name = %s",
                            (handler.task_name,))
            [next_slot.id] = [run.task_id for run in queries.schedule_recurring(db, [handler.task_name])]
            raise RuntimeError("Error!")

    next_slot = types.SimpleNamespace(id=None)
    handler = recurring_task(db, worker, "slow_and_failing", fails_four_times_then_succeeds)
    for _ in range(MAX_CONSECUTIVE_FAILURES):
        assert run_slot(db, worker, handler.task_name) == 1
    assert schedule_state(db, handler.task_name) == (4, True)
    task = procqueue.get_task(next_slot.id)
    assert task.state is TaskState.MISSED and "schedule was disabled (4 failures in a row)" in task.last_error
    assert runs(next_slot.id) == []
    assert run_slot(db, worker, handler.task_name, due=False) == 0  # nothing left to run
    assert len(calls) == MAX_CONSECUTIVE_FAILURES
    assert schedule_state(db, handler.task_name) == (4, True)


@pytest.mark.parametrize("func", [succeed, fail], ids=["succeeds", "fails"])
def test_run_recurring_task_under_way_when_disabled_leaves_the_count(db, worker, throwaway_tasks, func):
    """Beyond Flagsmith: a run already under way when its schedule is disabled (by another
    run's fourth failure, recorded meanwhile) ends as it may, but neither resets nor adds to
    the disabled schedule's count: it says why it was disabled until an operator enables it."""
    def disabled_meanwhile():
        with db.cursor() as cur:
            cur.execute(f"UPDATE {SCHEMA}.recurring_tasks SET consecutive_failures = 4, disabled_at = now() "
                        "WHERE task_name = %s", (handler.task_name,))
        func()

    handler = recurring_task(db, worker, "disabled_meanwhile", disabled_meanwhile)
    assert run_slot(db, worker, handler.task_name) == 1
    assert recurring_runs(db, handler.task_name) == [RunOutcome.SUCCEEDED if func is succeed else RunOutcome.FAILED]
    assert schedule_state(db, handler.task_name) == (4, True)

# -- arguments, decorators and enqueueing (test_unit_task_processor_decorators.py, _models.py) --

received: list = []


def receive(*args, **kwargs):
    received.append((args, kwargs))


@pytest.fixture
def receiver(throwaway_tasks):
    """A task, `parity.receive`, that keeps what it is called with."""
    received.clear()
    return register_task_handler(task_name="parity.receive")(receive)


@pytest.fixture
def local_settings():
    """The process's client settings put back after the test (configure() cannot unset
    an on_commit hook)."""
    saved = client.settings()
    yield
    client.use_settings(saved)


def join_task_threads(task_name: str) -> None:
    """Wait for the threads SEPARATE_THREAD started for `task_name` to end."""
    for thread in threading.enumerate():
        if thread.name == f"procqueue:{task_name}":
            thread.join(5)


def count_tasks(db) -> int:
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM procqueue.tasks")
        return cur.fetchone()[0]


def stored_arguments(db, task_id):
    """The task row's arguments as the database holds them (jsonb, as text)."""
    with db.cursor() as cur:
        cur.execute("SELECT args::text, kwargs::text FROM procqueue.tasks WHERE id = %s", (task_id,))
        return cur.fetchone()


def test_task_run(db, worker, receiver):
    """Mirrors `test_unit_task_processor_models.py::test_task_run`: a task created with
    args and kwargs runs its function with them."""
    task_id = receiver.delay(args=("foo",), kwargs={"arg_two": "bar"})
    assert worker.step() == 1
    assert received == [(("foo",), {"arg_two": "bar"})]
    assert procqueue.get_task(task_id).state is TaskState.SUCCEEDED


@pytest.mark.parametrize("value, stored, expected", [
    (Decimal("10"), '{"value": 10}', 10),
    (Decimal("10.12345"), '{"value": 10.12345}', 10.12345),
    # Beyond Flagsmith's rows: simplejson writes 1E+2 and its task reads back 100.0; the
    # jsonb column would turn that text into 100, so procqueue writes the float itself.
    (Decimal("1E+2"), '{"value": 100.0}', 100.0),
])
def test_serialize_data_handles_decimal_objects(db, worker, receiver, value, stored, expected):
    """Mirrors `test_unit_task_processor_models.py::test_serialize_data_handles_decimal_objects`:
    a Decimal is stored as a JSON number, and the task receives what reading that number
    back gives: an int for Decimal("10"), a float for Decimal("10.12345")."""
    task_id = receiver.delay(kwargs={"value": value})
    assert stored_arguments(db, task_id)[1] == stored
    worker.step()
    [(_, kwargs)] = received
    assert kwargs["value"] == expected and type(kwargs["value"]) is type(expected)


Point = collections.namedtuple("Point", "x y")


def test_serialize_data_converts_what_djangos_encoder_converts(db, worker, receiver):
    """Mirrors `src/task_processor/models.py::Task.serialize_data` (simplejson with
    DjangoJSONEncoder.default; no Flagsmith test covers these rows): datetimes to ECMA-262
    strings (milliseconds, "Z" for UTC, other offsets kept), dates and naive times to ISO
    strings, timedeltas to ISO 8601 durations, UUIDs and lazy translations to str,
    namedtuples to objects. The task receives those strings and objects."""
    from django.utils.functional import lazy  # gettext_lazy's kind of string, without Django's settings

    utc, plus_two = timezone.utc, timezone(timedelta(hours=2))
    sent = {
        "aware": datetime.datetime(2024, 1, 2, 3, 4, 5, 123456, utc),
        "offset": datetime.datetime(2024, 1, 2, 3, 4, 5, 123456, plus_two),
        "naive": datetime.datetime(2024, 1, 2, 3, 4, 5, 500),
        "whole_second": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=utc),
        "date": date(2024, 1, 2),
        "time": time_of_day(3, 4, 5, 123456),
        "duration": timedelta(days=1, seconds=7203),
        "negative": timedelta(microseconds=-1),
        "uuid": uuid.UUID(int=1),
        "lazy": lazy(lambda: "hi", str)(),
        "point": Point(1, [Decimal("2.5"), date(2024, 1, 2)]),
    }
    receiver.delay(args=(Point(x=1, y=2),), kwargs=sent)
    worker.step()
    assert received == [(({"x": 1, "y": 2},), {
        "aware": "2024-01-02T03:04:05.123Z",
        "offset": "2024-01-02T03:04:05.123+02:00",
        "naive": "2024-01-02T03:04:05.000",
        "whole_second": "2024-01-02T03:04:05Z",
        "date": "2024-01-02",
        "time": "03:04:05.123",
        "duration": "P1DT02H00M03S",
        "negative": "-P0DT00H00M00.000001S",
        "uuid": "00000000-0000-0000-0000-000000000001",
        "lazy": "hi",
        "point": {"x": 1, "y": [2.5, "2024-01-02"]},
    })]


def test_serialize_data_refuses_a_timezone_aware_time(db, receiver):
    """Mirrors `src/task_processor/models.py::Task.serialize_data`: DjangoJSONEncoder
    raises "JSON can't represent timezone-aware times." for an aware time. procqueue
    raises InvalidArgumentsError naming the argument, before anything is written."""
    with pytest.raises(InvalidArgumentsError, match=r"argument kwargs\['at'\]\['when'\] = datetime.time\(3, 4, "
                                                    r"tzinfo=.*\) cannot be stored as JSON \(JSON can't represent "
                                                    r"timezone-aware times\)"):
        receiver.delay(kwargs={"at": {"when": time_of_day(3, 4, tzinfo=timezone.utc)}})
    assert count_tasks(db) == 0


class Colour(enum.Enum):
    RED = 1


@pytest.mark.parametrize("value, problem", [
    ({1, 2}, "Object of type set is not JSON serializable"),
    (Colour.RED, "Object of type Colour is not JSON serializable"),
    (object(), "Object of type object is not JSON serializable"),
    (float("nan"), "not a finite number"),
    (Decimal("NaN"), "not a finite number"),
    # Deliberate differences: simplejson decodes bytes as UTF-8 (binary data would arrive
    # mangled) and writes the key 1 as "1" (the task would get another dictionary).
    (b"\x00\xff", "Object of type bytes is not JSON serializable"),
    ({1: "x"}, "has a key 1 that is not a string"),
])
def test_serialize_data_refuses_what_it_cannot_store(db, receiver, value, problem):
    """Mirrors `src/task_processor/models.py::Task.serialize_data`: sets, Enums and other
    objects raise TypeError there too, and NaN ValueError (simplejson 4). procqueue raises
    InvalidArgumentsError (a TypeError), naming the argument."""
    with pytest.raises(InvalidArgumentsError, match=r"task parity.receive: argument args\[0\]") as raised:
        receiver.delay(args=(value,))
    assert problem in str(raised.value) and isinstance(raised.value, TypeError)
    assert count_tasks(db) == 0


class NonSerializableObj:
    pass


def test_register_task_handler_validates_inputs(db, receiver):
    """Mirrors `test_unit_task_processor_decorators.py::test_register_task_handler_validates_inputs`:
    calling the task directly with an argument that cannot be serialised raises
    InvalidArgumentsError (a TaskProcessingError); one that can be runs the function with
    the very objects given, not as JSON would give them back."""
    with pytest.raises(InvalidArgumentsError) as raised:
        receiver(NonSerializableObj())
    assert isinstance(raised.value, TaskProcessingError)
    assert received == []
    amount, when = Decimal("1.50"), date(2024, 1, 2)
    receiver(amount, when=when)
    assert received == [((amount,), {"when": when})] and type(received[0][0][0]) is Decimal


@pytest.mark.parametrize("method", [TaskRunMethod.SEPARATE_THREAD, TaskRunMethod.SYNCHRONOUSLY])
def test_inputs_are_validated_when_run_without_task_processor(db, receiver, method):
    """Mirrors `test_unit_task_processor_decorators.py::test_inputs_are_validated_when_run_without_task_processor`:
    under SEPARATE_THREAD and SYNCHRONOUSLY, `.delay()` with an argument that cannot be
    serialised raises InvalidArgumentsError and runs nothing."""
    procqueue.configure(task_run_method=method)
    with pytest.raises(InvalidArgumentsError):
        receiver.delay(args=(NonSerializableObj(),))
    join_task_threads("parity.receive")
    assert received == []


@pytest.mark.parametrize("method", [TaskRunMethod.SEPARATE_THREAD, TaskRunMethod.SYNCHRONOUSLY])
def test_delay_until_is_not_run_without_task_processor(db, receiver, method, caplog):
    """Mirrors `src/task_processor/decorators.py::TaskHandler.delay` (no Flagsmith test):
    given `delay_until` while TASK_RUN_METHOD is not TASK_PROCESSOR, the call is not run
    and a warning says it cannot be scheduled in the future without the task processor;
    `.delay()` returns None. In a batch only such calls are skipped."""
    procqueue.configure(task_run_method=method)
    later = datetime.datetime.now(timezone.utc) + timedelta(hours=1)
    with caplog.at_level(logging.WARNING, logger="procqueue.enqueue"):
        assert receiver.delay(args=("later",), delay_until=later) is None
        assert procqueue.enqueue_many([receiver.call(args=("now",)),
                                       receiver.call(args=("later too",), delay_until=later)]) == []
    join_task_threads("parity.receive")
    assert received == [(("now",), {})]
    warnings = [r.getMessage() for r in caplog.records if "event=task.not_scheduled" in r.getMessage()]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in caplog.records)
    assert ('task=parity.receive' in warnings[0] and f"task_run_method={method.value}" in warnings[0]
            and 'reason="cannot schedule tasks to run in the future without the task processor"' in warnings[0])


def test_register_task_handler_run_in_thread__transaction_commit__true__default(db, receiver, local_settings,
                                                                                 caplog):
    """Mirrors `test_unit_task_processor_decorators.py::test_register_task_handler_run_in_thread__transaction_commit__true__default`:
    `run_in_thread` (transaction_on_commit defaulting to True) starts a daemon thread
    running the function with the args and kwargs when the caller's transaction commits
    (here, when the on-commit hook given to configure() fires), and logs that one line."""
    on_commit = []
    procqueue.configure(on_commit=on_commit.append)
    with caplog.at_level(logging.DEBUG, logger="procqueue.enqueue"):
        thread = receiver.run_in_thread(args=("foo",), kwargs={"bar": "baz"})
        assert len(on_commit) == 1 and not thread.is_alive() and received == []
        on_commit[0]()  # the commit
        thread.join(5)
    assert thread.daemon and received == [(("foo",), {"bar": "baz"})]
    [line] = [r for r in caplog.records if r.name == "procqueue.enqueue"]
    assert (line.levelno, line.getMessage()) == (logging.INFO, "event=task.thread_started task=parity.receive")


def test_register_task_handler_run_in_thread__transaction_commit__false(db, local_settings, throwaway_tasks, caplog):
    """Mirrors `test_unit_task_processor_decorators.py::test_register_task_handler_run_in_thread__transaction_commit__false`:
    with transaction_on_commit=False the thread starts at once, transaction or not, and
    logs that one line."""
    received.clear()
    handler = register_task_handler(task_name="parity.at_once", transaction_on_commit=False)(receive)
    on_commit = []
    procqueue.configure(on_commit=on_commit.append)
    with caplog.at_level(logging.DEBUG, logger="procqueue.enqueue"):
        handler.run_in_thread(args=("foo",), kwargs={"bar": "baz"}).join(5)
    assert on_commit == [] and received == [(("foo",), {"bar": "baz"})]
    [line] = [r for r in caplog.records if r.name == "procqueue.enqueue"]
    assert (line.levelno, line.getMessage()) == (logging.INFO, "event=task.thread_started task=parity.at_once")


def test_register_recurring_task(db, processor_config, throwaway_tasks):
    """Mirrors `test_unit_task_processor_decorators.py::test_register_recurring_task`: once
    the processor registers its recurring tasks, the schedule's row holds the kwargs
    given (converted as any task's arguments) and its run_every; timeout=None is stored
    as no timeout."""
    from procqueue.metrics import TaskMetrics
    from procqueue.supervisor_database import SupervisorDatabase

    task_kwargs = {"first_arg": "foo", "second_arg": "bar", "amount": Decimal("10")}
    run_every = timedelta(minutes=10)
    register_recurring_task(run_every=run_every, task_name="parity.a_function", args=(date(2024, 1, 2),),
                            kwargs=task_kwargs, timeout=None)(lambda day, first_arg, second_arg, amount: None)
    database = SupervisorDatabase(processor_config, processor_id="parity", clock=time.monotonic,
                                  task_metrics=TaskMetrics())
    database.start()  # what a processor does as it starts
    database.close()
    with db.cursor() as cur:
        cur.execute("SELECT args, kwargs, run_every, timeout_seconds FROM procqueue.recurring_tasks "
                    "WHERE task_name = 'parity.a_function'")
        row = cur.fetchone()
    assert row == (["2024-01-02"], {"first_arg": "foo", "second_arg": "bar", "amount": 10}, run_every,
                   NO_TIMEOUT.total_seconds())
    assert procqueue.registry.get_handler("parity.a_function") is not None


def test_delay_returns_none_if_task_queue_is_full(db, throwaway_tasks, caplog):
    """Mirrors `test_unit_task_processor_decorators.py::test_delay_returns_none_if_task_queue_is_full`:
    with 10 tasks of its name waiting and queue_size=1, `.delay()` returns None; a
    warning names the task and its queue size (one line per skipped `.delay()`; one line
    with the count for a batch)."""
    my_function = register_task_handler(task_name="parity.my_function", queue_size=1)(receive)
    with db.cursor() as cur:
        cur.execute("INSERT INTO procqueue.tasks (task_name) SELECT 'parity.my_function' FROM generate_series(1, 10)")
    with caplog.at_level(logging.WARNING, logger="procqueue.enqueue"):
        assert my_function.delay() is None
        assert procqueue.enqueue_many([my_function.call() for _ in range(3)]) == []
    assert [r.getMessage() for r in caplog.records] == [
        "event=task.queue_full task=parity.my_function queue_size=1 skipped=1",
        "event=task.queue_full task=parity.my_function queue_size=1 skipped=3",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_queue_size_zero_is_no_limit_and_a_full_queue_is_counted_in_waiting_tasks(db, throwaway_tasks):
    """Mirrors `src/task_processor/models.py::Task._is_queue_full` (no Flagsmith test):
    queue_size=0 (like None) sets no limit (`if queue_size and ...`). Where procqueue
    differs on purpose: it counts waiting tasks only and admits a call while fewer than
    queue_size wait, so queue_size=1 with one task waiting is full (Flagsmith counts
    running and retrying tasks too, and admits up to queue_size + 1)."""
    unlimited = register_task_handler(task_name="parity.unlimited", queue_size=0)(receive)
    assert unlimited.queue_size is None
    assert all(unlimited.delay() for _ in range(5))
    one = register_task_handler(task_name="parity.one", queue_size=1)(receive)
    assert one.delay() is not None
    assert one.delay() is None


def test_delay__expected_metrics(db, throwaway_tasks):
    """Mirrors `test_unit_task_processor_decorators.py::test_delay__expected_metrics`:
    `.delay()` counts the task in the enqueued counter, labelled with its name
    (procqueue_enqueued_tasks_total for Flagsmith's
    flagsmith_task_processor_enqueued_tasks_total)."""
    from prometheus_client import REGISTRY

    def enqueued():
        return REGISTRY.get_sample_value("procqueue_enqueued_tasks_total",
                                         {"task_identifier": "parity.counted"}) or 0.0

    my_function = register_task_handler(task_name="parity.counted", queue_size=1)(receive)
    before = enqueued()
    my_function.delay()
    assert enqueued() == before + 1


def test_can_create_task_with_priority(db, throwaway_tasks):
    """Mirrors `test_unit_task_processor_decorators.py::test_can_create_task_with_priority`:
    a task registered with priority=HIGH is stored with priority 25."""
    my_function = register_task_handler(task_name="parity.high", priority=TaskPriority.HIGH)(receive)
    task = procqueue.get_task(my_function.delay())
    assert task.priority == TaskPriority.HIGH == 25


def test_timeout_none_means_no_timeout(db, worker, throwaway_tasks):
    """Mirrors `src/task_processor/decorators.py::register_task_handler` (no Flagsmith
    test): timeout=None runs the task with no time limit. It is stored as NO_TIMEOUT, and
    the worker arms no alarm for it: such a task sleeping 1.5 s succeeds while the same
    task with a 1 s timeout times out."""
    alarms = []

    def sleep():
        alarms.append(signal.getitimer(signal.ITIMER_REAL)[0])
        time.sleep(1.5)

    unlimited = register_task_handler(task_name="parity.no_timeout", timeout=None)(sleep)
    limited = register_task_handler(task_name="parity.one_second", timeout=timedelta(seconds=1))(sleep)
    unlimited_id, limited_id = unlimited.delay(), limited.delay()
    assert procqueue.get_task(unlimited_id).timeout_seconds == NO_TIMEOUT.total_seconds() == 3650 * 86400
    with alarm_lent_to_the_worker():
        ran = sum(worker.step() for _ in range(2))  # a step may claim one at a time
    assert ran == 2
    assert alarms[0] == 0 and 0 < alarms[1] <= 1
    assert procqueue.get_task(unlimited_id).state is TaskState.SUCCEEDED
    [run] = procqueue.get_task_runs(limited_id)
    assert run.outcome is RunOutcome.TIMED_OUT


def test_timeout_none_is_shown_as_none(db, throwaway_tasks):
    """Where a person reads a task's timeout (`procqueue status`, the dashboard's task
    page), NO_TIMEOUT reads "none"."""
    from procqueue.dashboard_pages import View, task_page
    from procqueue.status_text import worker_row

    row = worker_row({"slot": 0, "pid": 1, "state": "busy", "tasks_done": 0,
                      "task": {"id": 7, "name": "t", "running_seconds": 90.0,
                               "timeout_seconds": NO_TIMEOUT.total_seconds() - 0.001}})
    assert row[5] == "1m30s/none"
    unlimited = register_task_handler(task_name="parity.no_timeout", timeout=None)(receive)
    page = task_page(View(token_configured=False, private=False), now=datetime.datetime.now(timezone.utc),
                     task=procqueue.get_task(unlimited.delay()), runs=[])
    assert "<tr><th>timeout</th><td>none</td></tr>" in page


# -- the rest of the processor's and the models' tests (test_unit_task_processor_processor.py, _models.py,
#    _threads.py) --


def test_run_recurring_task_unregistered_new_task_does_nothing(db, worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_recurring_task__unregistered_new_task__does_nothing`:
    a due schedule whose task this processor does not know is not run, and its row stays.
    (Flagsmith deletes such a row once it is 30 minutes old; procqueue keeps it until an
    operator removes it: a deliberate difference, in README's porting table.)"""
    with db.cursor() as cur:
        cur.execute(f"INSERT INTO {SCHEMA}.recurring_tasks (task_name, run_every, first_run_at, timeout_seconds, "
                    "next_run_at, registered_at) VALUES ('parity.unknown', interval '1 hour', now(), 60, now(), "
                    "now() - interval '1 day')")
    assert run_slot(db, worker, "parity.unknown", due=False) == 0
    with db.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {SCHEMA}.recurring_tasks WHERE task_name = 'parity.unknown'")
        assert cur.fetchone() == (1,)
        cur.execute(f"SELECT count(*) FROM {SCHEMA}.tasks")
        assert cur.fetchone() == (0,)


def first_slot_seconds_from_now(db, name, first_run_time) -> float:
    handler = procqueue.register_recurring_task(run_every=timedelta(days=1), task_name=f"parity.{name}",
                                                first_run_time=first_run_time)(succeed)
    register(db, handler.task_name)
    with db.cursor() as cur:
        cur.execute(f"SELECT extract(epoch FROM next_run_at - now()) FROM {SCHEMA}.recurring_tasks "
                    "WHERE task_name = %s", (handler.task_name,))
        return float(cur.fetchone()[0])


def test_recurring_task_first_run_time_ahead_waits_for_it(db, throwaway_tasks):
    """Mirrors `test_unit_task_processor_models.py::test_recurring_task_run_should_execute_first_run_at`
    (first_run_time an hour ahead: not yet) and
    `::test_recurring_task_should_execute__first_run_time_after_midnight__returns_false`
    (23:05:23 with a first_run_time of 00:05:23: not yet): a new schedule's first run waits
    for that time of day, across midnight too."""
    now = datetime.datetime.now(timezone.utc)
    ahead = (now + timedelta(hours=1)).time().replace(microsecond=0)
    assert 3590 <= first_slot_seconds_from_now(db, "an_hour_ahead", ahead) <= 3601


def test_recurring_task_first_run_time_passed_waits_for_the_next_day(db, throwaway_tasks):
    """The other half of `test_unit_task_processor_models.py::test_recurring_task_run_should_execute_first_run_at`
    and `::test_recurring_task_should_execute__first_run_time_before_midnight__returns_true`,
    where procqueue differs on purpose (README's porting table): a first_run_time that passed
    an hour ago runs tomorrow at that time, not now."""
    now = datetime.datetime.now(timezone.utc)
    passed = (now - timedelta(hours=1)).time().replace(microsecond=0)
    assert 23 * 3600 - 10 <= first_slot_seconds_from_now(db, "an_hour_ago", passed) <= 23 * 3600 + 1


def test_run_tasks__tasks_executed__expected_metrics(db, worker, throwaway_tasks):
    """Mirrors `test_unit_task_processor_processor.py::test_run_tasks__tasks_executed__expected_metrics`:
    each run is counted in the finished counter and the duration histogram labelled with
    task_identifier, task_type (standard, recurring) and result, as Flagsmith labels them
    (procqueue_tasks_finished_total for flagsmith_task_processor_finished_tasks_total,
    results `succeeded` for `success`, `retried`/`failed` for `failure`)."""
    from prometheus_client import CollectorRegistry

    from procqueue.metrics import DURATION, FINISHED

    exported = CollectorRegistry()  # as the processor exports them, from its workers' files
    exported.register(FINISHED)
    exported.register(DURATION)

    def counted(name, task_type, result, metric="procqueue_tasks_finished_total"):
        labels = {"task_identifier": name, "task_type": task_type, "result": result}
        return exported.get_sample_value(metric, labels) or 0.0

    dummy = standard_task("metrics_dummy", succeed)
    raising = standard_task("metrics_raise", fail)
    expected = [(dummy.task_name, "standard", "succeeded"), (raising.task_name, "standard", "retried"),
                ("parity.metrics_recurring", "recurring", "succeeded")]
    before = {key: (counted(*key), counted(*key, metric="procqueue_task_duration_seconds_count")) for key in expected}
    dummy.delay()
    raising.delay()
    assert worker.step() == 2
    recurring = recurring_task(db, worker, "metrics_recurring", succeed)
    assert run_slot(db, worker, recurring.task_name) == 1
    for key in expected:
        assert (counted(*key), counted(*key, metric="procqueue_task_duration_seconds_count")) == \
            (before[key][0] + 1, before[key][1] + 1), key


@pytest.mark.timeout(60)
def test_task_runner_is_resilient_to_errors(db, start_processor):
    """Mirrors `test_unit_task_processor_threads.py::test_task_runner_is_resilient_to_errors`:
    a database error in a worker's round is logged and the worker carries on: its
    connection killed under it, it reconnects and runs the next task."""
    import sample_tasks

    processor = start_processor("--numthreads", "1")
    processor.wait_for_status(lambda document: document["workers"][0]["state"] == "idle", message="an idle worker")
    with db.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'procqueue-worker-0'")
        assert cur.fetchone() == (True,)
    task_id = sample_tasks.record_task.delay(args=("after the error",))
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=30,
               message=lambda: processor.log())
    assert "event=worker.database_error" in processor.log() or "event=worker.reconnected" in processor.log()
