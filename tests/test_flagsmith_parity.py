"""Flagsmith's task-processor test suite, behaviour by behaviour, on procqueue.

Each test names the test of `Flagsmith/flagsmith-common` (tests/unit/task_processor/)
whose behaviour it holds procqueue to. Where procqueue differs on purpose, README.md's
"Porting a Django project" table says how and why, and no test here pretends otherwise.
"""

from __future__ import annotations

import collections
import enum
import logging
import signal
import threading
import time
import uuid
from datetime import date, datetime, time as time_of_day, timedelta, timezone
from decimal import Decimal

import pytest

import procqueue
from procqueue import (InvalidArgumentsError, RunOutcome, TaskPriority, TaskProcessingError, TaskRunMethod,
                       TaskState, client, register_recurring_task, register_task_handler)
from procqueue.execution import soft_timeout
from procqueue.registry import NO_TIMEOUT


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
        "aware": datetime(2024, 1, 2, 3, 4, 5, 123456, utc),
        "offset": datetime(2024, 1, 2, 3, 4, 5, 123456, plus_two),
        "naive": datetime(2024, 1, 2, 3, 4, 5, 500),
        "whole_second": datetime(2024, 1, 2, 3, 4, 5, tzinfo=utc),
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
    later = datetime.now(timezone.utc) + timedelta(hours=1)
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


@pytest.fixture
def alarm_lent():
    """The worker's timeout alarm installed in this process. pytest-timeout keeps its own
    alarm on SIGALRM: it is lent to the worker, then given back."""
    saved_handler, saved_timer = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    soft_timeout.install()
    yield
    soft_timeout.installed = False
    signal.signal(signal.SIGALRM, saved_handler)
    if saved_timer[0]:
        signal.setitimer(signal.ITIMER_REAL, max(saved_timer[0] - (time.monotonic() - started), 0.1))


def test_timeout_none_means_no_timeout(db, worker, throwaway_tasks, alarm_lent):
    """Mirrors `src/task_processor/decorators.py::register_task_handler` (no Flagsmith
    test): timeout=None runs the task with no time limit. It is stored as NO_TIMEOUT, and
    the worker arms no short alarm: such a task sleeping 1.5 s succeeds while the same
    task with a 1 s timeout times out."""
    alarms = []

    def sleep():
        alarms.append(signal.getitimer(signal.ITIMER_REAL)[0])
        time.sleep(1.5)

    unlimited = register_task_handler(task_name="parity.no_timeout", timeout=None)(sleep)
    limited = register_task_handler(task_name="parity.one_second", timeout=timedelta(seconds=1))(sleep)
    unlimited_id, limited_id = unlimited.delay(), limited.delay()
    assert procqueue.get_task(unlimited_id).timeout_seconds == NO_TIMEOUT.total_seconds() == 3650 * 86400
    assert sum(worker.step() for _ in range(2)) == 2  # a step may claim one at a time
    assert alarms[0] > 3640 * 86400 and alarms[1] <= 1
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
    page = task_page(View(token_configured=False, private=False), now=datetime.now(timezone.utc),
                     task=procqueue.get_task(unlimited.delay()), runs=[])
    assert "<tr><th>timeout</th><td>none</td></tr>" in page
