"""Flagsmith's task-processor test suite, behaviour by behaviour, on procqueue.

Each test names the test of `Flagsmith/flagsmith-common` (tests/unit/task_processor/)
whose behaviour it holds procqueue to. Where procqueue differs on purpose, README.md's
"Porting a Django project" table says how and why, and no test here pretends otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

import procqueue
from procqueue import RunOutcome, TaskBackoffError, TaskPriority, TaskState, registry
from procqueue.config import processor_config
from procqueue.execution import soft_timeout
from procqueue.queries import MAX_CONSECUTIVE_FAILURES, Queries
from procqueue.worker import Worker

from helpers import REPO, TESTS

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
    raise TaskBackoffError(delay_until=datetime.now(timezone.utc) + timedelta(seconds=seconds))


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
            before = datetime.now(timezone.utc)
            assert worker.step() == 1
    finally:
        worker.close()
    record = procqueue.get_task(task_id)
    assert (record.state, record.attempts) == (TaskState.QUEUED, 1)
    assert before + expected - timedelta(seconds=1) <= record.run_at <= datetime.now(timezone.utc) + expected
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
