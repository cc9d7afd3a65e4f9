"""execute(): whatever a task raises becomes an outcome; nothing escapes into the worker."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone

import pytest

import procqueue
from procqueue import RunOutcome, TaskBackoffError, TaskState, register_task_handler
from procqueue.execution import execute, summarise
from procqueue.records import ClaimedTask

from helpers import claimed_task


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("__str__ is broken too")


class UnprintableBackoff(TaskBackoffError):
    def __str__(self):
        raise RuntimeError("__str__ is broken too")


def raise_unprintable():
    raise UnprintableError()


def call_sys_exit():
    sys.exit(3)


def raise_keyboard_interrupt():
    raise KeyboardInterrupt


def interrupted_as_orphan():
    from procqueue.execution import SupervisorGoneError

    raise SupervisorGoneError()  # as the orphaned worker's interrupt lands in a task


def ask_for_backoff():
    raise TaskBackoffError()


def report_current_task():
    from procqueue.execution import current_task

    seen.append(current_task())


seen: list = []


def record_arguments(*args, **kwargs):
    seen.append((args, kwargs))


def raise_unprintable_backoff():
    raise UnprintableBackoff()


TASKS = {f"test_execution.{func.__name__}": func
         for func in (raise_unprintable, call_sys_exit, raise_keyboard_interrupt, raise_unprintable_backoff,
                      interrupted_as_orphan, report_current_task, ask_for_backoff, record_arguments)}


@pytest.fixture(autouse=True)
def registered():
    for name, func in TASKS.items():
        register_task_handler(task_name=name)(func)
    yield
    procqueue.registry.unregister(TASKS)


def claimed(func, attempts=1, max_attempts=3, recurring_slot=None) -> ClaimedTask:
    return claimed_task(f"test_execution.{func.__name__}", attempts=attempts, max_attempts=max_attempts,
                        recurring_slot=recurring_slot)


def run(task: ClaimedTask):
    """execute(), with anything escaping it a test failure: an escaped SystemExit or
    KeyboardInterrupt would otherwise end the test run itself."""
    try:
        return execute(task)
    except BaseException as exc:
        pytest.fail(f"execute() let {type(exc).__name__} escape")


def test_summary_of_an_exception_whose_str_raises_names_its_type():
    assert summarise(UnprintableError()) == "UnprintableError: <str() failed>"


def test_an_exception_whose_str_raises_is_a_failed_run_with_its_traceback():
    outcome = run(claimed(raise_unprintable))
    assert (outcome.state, outcome.outcome) == (TaskState.QUEUED, RunOutcome.FAILED)  # retried per its attempts
    assert outcome.summary == "UnprintableError: <str() failed>"
    assert "Traceback" in outcome.error and "in raise_unprintable" in outcome.error


def test_a_backoff_whose_str_raises_still_backs_off():
    outcome = run(claimed(raise_unprintable_backoff))
    assert (outcome.state, outcome.outcome) == (TaskState.QUEUED, RunOutcome.BACKOFF)
    assert outcome.error == "TaskBackoffError: <str() failed>"


# SystemExit and KeyboardInterrupt raised by a task are the task's failure, not a request to
# stop the worker: a worker's stop signals only set a flag (worker_process), so these can
# only come from the task's own code.
@pytest.mark.parametrize("func, summary", [(call_sys_exit, "SystemExit: 3"),
                                           (raise_keyboard_interrupt, "KeyboardInterrupt")])
def test_sys_exit_or_keyboard_interrupt_in_a_task_is_a_failed_run(func, summary):
    outcome = run(claimed(func, attempts=3, max_attempts=3))
    assert (outcome.state, outcome.outcome, outcome.summary) == (TaskState.FAILED, RunOutcome.FAILED, summary)
    assert f"in {func.__name__}" in outcome.error


def test_a_worker_records_sys_exit_in_a_task_and_carries_on(worker):
    exits = procqueue.registry.get_handler("test_execution.call_sys_exit")
    first, second = procqueue.enqueue_many([exits.call(), exits.call()])
    try:
        ran = worker.step()
    except SystemExit:
        pytest.fail("SystemExit raised by a task escaped the worker's step")
    assert ran == 2  # the first did not end the worker
    for task_id in (first, second):
        [run] = procqueue.get_task_runs(task_id)
        assert run.outcome is RunOutcome.FAILED and "SystemExit: 3" in run.error
        assert procqueue.get_task(task_id).state is TaskState.QUEUED


def test_a_task_cut_short_by_its_supervisors_death_goes_back_uncharged():
    outcome = run(claimed(interrupted_as_orphan))
    assert (outcome.state, outcome.outcome, outcome.refund_attempt) == (TaskState.QUEUED, RunOutcome.LOST, True)


def test_a_recurring_run_cut_short_by_its_supervisors_death_is_missed_not_run_again():
    outcome = run(claimed(interrupted_as_orphan, max_attempts=1, recurring_slot=datetime.now(timezone.utc)))
    assert (outcome.state, outcome.outcome, outcome.refund_attempt) == (TaskState.MISSED, RunOutcome.LOST, False)
    assert "is not run again (the next slot is its retry)" in outcome.error


def test_a_task_sees_itself_as_the_current_task_and_nothing_does_outside_one():
    from procqueue.execution import current_task

    task = claimed(report_current_task, attempts=2)
    seen.clear()
    run(task)
    assert seen == [task] and current_task() is None


def test_a_recurring_run_asking_for_a_backoff_is_missed_not_run_again_in_its_slot():
    outcome = run(claimed(ask_for_backoff, max_attempts=1, recurring_slot=datetime.now(timezone.utc)))
    assert (outcome.state, outcome.outcome) == (TaskState.MISSED, RunOutcome.BACKOFF)
    assert "the next slot is its retry" in outcome.error
    ordinary = run(claimed(ask_for_backoff))
    assert (ordinary.state, ordinary.refund_attempt) == (TaskState.QUEUED, False)  # a backoff uses an attempt


def test_a_backoff_on_the_last_attempt_fails_with_its_traceback():
    outcome = run(claimed(ask_for_backoff, attempts=3, max_attempts=3))
    assert (outcome.state, outcome.outcome) == (TaskState.FAILED, RunOutcome.BACKOFF)
    assert outcome.error.startswith("backed off on its last attempt (3 of 3)")
    assert "Traceback" in outcome.error and "in ask_for_backoff" in outcome.error
    assert outcome.summary == "TaskBackoffError (backed off on its last attempt)"


def test_a_row_whose_args_are_not_an_array_or_kwargs_not_an_object_fails_without_running(db, worker):
    """A row edited by hand: an object's keys must not become positional arguments."""
    handler = procqueue.registry.get_handler("test_execution.record_arguments")
    args_object, kwargs_array = procqueue.enqueue_many([handler.call(args=[1]), handler.call(kwargs={"a": 1})])
    with db.cursor() as cur:
        cur.execute("""UPDATE procqueue.tasks SET args = '{"x": 1, "y": 2}' WHERE id = %s""", (args_object,))
        cur.execute("UPDATE procqueue.tasks SET kwargs = '[1, 2]' WHERE id = %s", (kwargs_array,))
    seen.clear()
    assert worker.step() == 2
    assert seen == []  # neither ran
    for task_id, problem in ((args_object, "args must be a JSON array, got an object"),
                             (kwargs_array, "kwargs must be a JSON object, got an array")):
        task = procqueue.get_task(task_id)
        [run] = procqueue.get_task_runs(task_id)
        assert task.state is TaskState.FAILED  # for good: no attempt would go differently
        assert run.outcome is RunOutcome.FAILED and problem in run.error


def test_a_row_python_cannot_read_fails_alone_and_the_rest_of_its_batch_runs(db, worker):
    """A row edited by hand past what Python's JSON decoder takes (nested 3,000 deep; an
    integer of 5,000 digits) used to fail the whole claimed batch at decoding, again and
    again; now that row fails, saying why, and the others run."""
    handler = procqueue.registry.get_handler("test_execution.record_arguments")
    deep, huge, fine = procqueue.enqueue_many([handler.call(args=[1]), handler.call(args=[2]), handler.call(args=[3])])
    with db.cursor() as cur:
        cur.execute("UPDATE procqueue.tasks SET args = %s::jsonb WHERE id = %s", ("[" * 3000 + "]" * 3000, deep))
        cur.execute("UPDATE procqueue.tasks SET kwargs = %s::jsonb WHERE id = %s", ('{"n": ' + "7" * 5000 + "}", huge))
    seen.clear()
    assert worker.step() == 3
    assert seen == [((3,), {})]
    problems = [(deep, "args cannot be read: nested too deeply for Python's JSON decoder")]
    if hasattr(sys, "get_int_max_str_digits"):  # Python 3.10.7 and later limit digits
        problems.append((huge, "kwargs cannot be read: Exceeds the limit"))
    for task_id, problem in problems:
        [run] = procqueue.get_task_runs(task_id)
        assert procqueue.get_task(task_id).state is TaskState.FAILED
        assert run.outcome is RunOutcome.FAILED and problem in run.error, run.error
    command = [sys.executable, "-m", "procqueue", "show", str(deep), "--database-url", worker.config.database.url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["task"]["args"] == {"unreadable_json": "nested too deeply for Python's JSON decoder"}
