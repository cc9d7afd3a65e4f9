"""The application side: .delay(), bulk enqueue, transactions, queue_size, run methods."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import psycopg2
import pytest

import procqueue
from procqueue import client
from procqueue import TaskPriority, TaskRunMethod, register_task_handler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@register_task_handler(task_name="test_enqueue.greet")
def greet(name, punctuation="!"):
    return f"hello {name}{punctuation}"


@register_task_handler(task_name="test_enqueue.limited", queue_size=2)
def limited():
    pass


@register_task_handler(task_name="test_enqueue.urgent", priority=TaskPriority.HIGH, max_attempts=5,
                       timeout=timedelta(seconds=7), queue="mail")
def urgent():
    pass


def count_tasks(db, name=None):
    with db.cursor() as cur:
        if name:
            cur.execute("SELECT count(*) FROM procqueue.tasks WHERE task_name = %s", (name,))
        else:
            cur.execute("SELECT count(*) FROM procqueue.tasks")
        return cur.fetchone()[0]


def test_delay_stores_name_json_arguments_and_handler_settings(db):
    task_id = urgent.delay()
    greet_id = greet.delay(args=("ada",), kwargs={"punctuation": "?"})
    task = procqueue.get_task(greet_id)
    assert (task.task_name, task.args, task.kwargs) == ("test_enqueue.greet", ["ada"], {"punctuation": "?"})
    assert task.state is procqueue.TaskState.QUEUED and task.attempts == 0
    assert (task.priority, task.max_attempts, task.queue) == (TaskPriority.NORMAL, 3, "default")
    assert task.timeout_seconds == 60
    urgent_task = procqueue.get_task(task_id)
    assert (urgent_task.priority, urgent_task.max_attempts, urgent_task.queue) == (25, 5, "mail")
    assert urgent_task.timeout_seconds == 7


def test_decorated_function_stays_callable_directly(db):
    assert greet("bob") == "hello bob!"
    assert count_tasks(db) == 0


def test_delay_until_and_priority_override_are_stored(db):
    when = datetime.now(timezone.utc) + timedelta(hours=1)
    task = procqueue.get_task(greet.delay(args=("x",), delay_until=when, priority=TaskPriority.LOWER))
    assert task.run_at == when
    assert task.priority == 100


def test_non_json_argument_fails_before_anything_is_written(db):
    with pytest.raises(TypeError, match=r"args\[1\].*cannot be stored as JSON"):
        greet.delay(args=("ok", b"bytes"))  # not decoded as UTF-8 behind the caller's back
    with pytest.raises(TypeError, match=r"kwargs\['punctuation'\]"):
        greet.delay(args=("ok",), kwargs={"punctuation": {1, 2}})
    with pytest.raises(TypeError, match="args must be a list or tuple"):
        greet.delay(args="ada")
    with pytest.raises(TypeError, match="kwargs has a key 1 that is not a string"):
        greet.delay(kwargs={1: "x"})
    with pytest.raises(TypeError, match="cannot be stored as JSON"):
        greet.delay(args=(float("nan"),))
    assert count_tasks(db) == 0


def test_a_dictionary_key_that_is_not_a_string_is_refused_at_any_depth(db):
    # JSON would turn 1 into "1": the task would get a different dictionary than was sent.
    with pytest.raises(TypeError, match=r"argument kwargs\['punctuation'\]\['a'\] has a key 1 that is not a string"):
        greet.delay(args=("ok",), kwargs={"punctuation": {"a": {1: "x"}}})
    with pytest.raises(TypeError, match=r"argument args\[1\]\[0\] has a key None that is not a string"):
        greet.delay(args=("ok", [{None: 1}]))
    assert count_tasks(db) == 0


def test_a_cyclic_argument_or_a_string_enum_holding_nul_is_refused(db):
    import enum

    looped: list = [1]
    looped.append(looped)
    with pytest.raises(procqueue.TaskArgumentError, match=r"argument args\[1\]\[1\] contains itself \(a cycle\)"):
        greet.delay(args=("ok", looped))

    class Bad(str, enum.Enum):
        NUL = "a\x00b"

    with pytest.raises(procqueue.TaskArgumentError, match=r"argument args\[1\] = .* contains the NUL"):
        greet.delay(args=("ok", Bad.NUL))  # JSON writes the value, not str(Bad.NUL)
    assert count_tasks(db) == 0


def test_an_argument_nested_too_deep_is_refused_with_the_argument_error(db):
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(procqueue.TaskArgumentError, match=r"^task test_enqueue.greet: argument args\[1\] "
                                                          r"is nested deeper than 100 levels$"):
        greet.delay(args=("ok", deep))
    fits: list = []
    for _ in range(99):
        fits = [fits]
    assert greet.delay(args=("ok", fits))  # the limit itself is fine
    assert count_tasks(db) == 1


@pytest.fixture
def argument_limit():
    before = procqueue.client.settings().max_arguments_bytes
    yield
    procqueue.configure(max_arguments_bytes=before or 0)


def test_arguments_over_the_size_limit_are_refused(db, argument_limit):
    big = "x" * (1024 * 1024)
    with pytest.raises(procqueue.TaskArgumentError, match=r"^task test_enqueue.greet: arguments take 1048582 bytes "
                                                          r"as JSON, over the limit of 1048576 "
                                                          r"\(PROCQUEUE_MAX_ARGUMENTS_BYTES\); pass a reference"):
        greet.delay(args=(big,))
    procqueue.configure(max_arguments_bytes=100)
    with pytest.raises(procqueue.TaskArgumentError, match="over the limit of 100 "):
        greet.delay(args=("y" * 100,))
    procqueue.configure(max_arguments_bytes=0)  # no limit
    assert greet.delay(args=(big,))
    assert count_tasks(db) == 1


def test_the_size_limit_is_read_from_the_environment():
    from procqueue.config import max_arguments_bytes_from_env

    assert max_arguments_bytes_from_env({}) == 1024 * 1024
    assert max_arguments_bytes_from_env({"PROCQUEUE_MAX_ARGUMENTS_BYTES": "2000"}) == 2000
    assert max_arguments_bytes_from_env({"PROCQUEUE_MAX_ARGUMENTS_BYTES": "0"}) is None
    with pytest.raises(procqueue.ConfigError, match=r"^invalid value for PROCQUEUE_MAX_ARGUMENTS_BYTES: '1MB' "
                                          r"\(expected a number of bytes >= 0; 0 means no limit\)$"):
        max_arguments_bytes_from_env({"PROCQUEUE_MAX_ARGUMENTS_BYTES": "1MB"})


def test_arguments_that_do_not_fit_the_function_fail_before_anything_is_written(db):
    # As Celery checks at apply time: enqueued, they would fail every attempt in a worker.
    with pytest.raises(TypeError, match=r"^task test_enqueue.greet: args \['ada', '\?', 'extra'\] and kwargs \{\} "
                                        r"do not fit its parameters \(name, punctuation='!'\): too many positional"):
        greet.delay(args=("ada", "?", "extra"))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'shout'"):
        greet.delay(args=("ada",), kwargs={"shout": True})
    with pytest.raises(TypeError, match=r"missing a required argument: 'name'"):
        procqueue.enqueue_many([greet.call(args=("ok",)), greet.call()])  # all or nothing
    assert count_tasks(db) == 0
    assert greet.delay(kwargs={"name": "ada", "punctuation": "?"})


def test_arguments_that_do_not_fit_never_run_synchronously_either(db, throwaway_tasks):
    ran = []

    @register_task_handler(task_name="test_enqueue.capture_fit")
    def capture(value):
        ran.append(value)

    procqueue.configure(task_run_method=TaskRunMethod.SYNCHRONOUSLY)
    with pytest.raises(TypeError, match="do not fit its parameters"):
        procqueue.enqueue_many([capture.call(args=("ok",)), capture.call(args=(1, 2, 3))])
    assert ran == [] and count_tasks(db) == 0


def test_nul_character_anywhere_fails_before_anything_is_written(db):
    # jsonb cannot hold \u0000: caught here, naming where it is, not as a database error.
    with pytest.raises(procqueue.TaskArgumentError, match=r"argument args\[0\] = 'a\\x00b'.*NUL"):
        greet.delay(args=("a\x00b",))
    with pytest.raises(TypeError, match=r"argument kwargs\['punctuation'\]\[1\]\['deep'\] = 'x\\x00'"):
        greet.delay(args=("ok",), kwargs={"punctuation": ["fine", {"deep": "x\x00"}]})
    with pytest.raises(TypeError, match=r"argument args\[1\]\[0\] has a key 'k\\x00'.*NUL"):
        greet.delay(args=("ok", [{"k\x00": 1}]))
    with pytest.raises(TypeError, match=r"kwargs has a key 'a\\x00' .*NUL"):
        greet.delay(kwargs={"a\x00": 1})
    with pytest.raises(TypeError, match=r"args\[0\]"):
        procqueue.enqueue_many([greet.call(args=("fine",)), greet.call(args=("\x00",))])
    assert count_tasks(db) == 0
    # A backslash followed by "u0000" is just text, in a value or in a key.
    task_id = greet.delay(args=("a\\u0000b",), kwargs={"punctuation": {"\\u0000": "\\\\u0000"}})
    task = procqueue.get_task(task_id)
    assert (task.args, task.kwargs) == (["a\\u0000b"], {"punctuation": {"\\u0000": "\\\\u0000"}})


def test_a_lone_surrogate_fails_before_anything_is_written(db):
    # What bytes decoded with errors="surrogateescape" leave behind; jsonb rejects it.
    with pytest.raises(procqueue.TaskArgumentError, match=r"argument args\[0\]\[1\] = 'a\\udc80b'.*lone surrogate"):
        greet.delay(args=(["fine", "a\udc80b"],))
    with pytest.raises(TypeError, match=r"kwargs has a key 'k\\udc80' that contains a lone surrogate"):
        greet.delay(kwargs={"k\udc80": 1})
    assert count_tasks(db) == 0
    # Characters beyond the BMP travel as surrogate pairs in JSON text, and are fine.
    task_id = greet.delay(args=("caf\u00e9 \U0001F600",))
    assert procqueue.get_task(task_id).args == ["caf\u00e9 \U0001F600"]


def test_out_of_range_priority_is_rejected_before_writing(db):
    with pytest.raises(procqueue.TaskError, match="priority must be an integer from -32768 to 32767"):
        greet.delay(args=("x",), priority=99999)
    assert count_tasks(db) == 0


def test_naive_delay_until_is_rejected(db):
    with pytest.raises(procqueue.TaskError, match="timezone-aware"):
        greet.delay(args=("x",), delay_until=datetime.now())
    assert count_tasks(db) == 0


def test_queue_size_skips_enqueue_while_that_many_are_waiting(db):
    assert limited.delay() is not None
    assert limited.delay() is not None
    assert limited.delay() is None
    assert count_tasks(db, "test_enqueue.limited") == 2
    # Other tasks are not limited by it.
    assert greet.delay(args=("x",)) is not None


def test_bulk_enqueue_admits_only_what_fits_in_queue_size(db):
    ids = procqueue.enqueue_many([limited.call() for _ in range(10)])
    assert len(ids) == 2 and count_tasks(db, "test_enqueue.limited") == 2
    assert procqueue.enqueue_many([limited.call() for _ in range(3)]) == []


def test_bulk_enqueue_counts_tasks_already_waiting_and_keeps_call_order(db):
    assert limited.delay() is not None  # one of the two places is taken
    calls = [limited.call(), greet.call(args=("a",)), limited.call(), greet.call(args=("b",)), limited.call()]
    ids = procqueue.enqueue_many(calls)
    assert [procqueue.get_task(task_id).task_name for task_id in ids] == [
        "test_enqueue.limited", "test_enqueue.greet", "test_enqueue.greet"]
    assert [procqueue.get_task(task_id).args for task_id in ids[1:]] == [["a"], ["b"]]
    assert count_tasks(db, "test_enqueue.limited") == 2


def test_transactional_enqueue_exists_only_if_the_caller_commits(db, database_url):
    conn = psycopg2.connect(database_url)
    try:
        greet.delay(args=("rolled back",), connection=conn)
        conn.rollback()
        assert count_tasks(db) == 0
        task_id = greet.delay(args=("committed",), connection=conn)
        assert count_tasks(db) == 0  # not visible until the caller commits
        conn.commit()
        assert procqueue.get_task(task_id).args == ["committed"]
    finally:
        conn.close()


def prepared_statements(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT name FROM pg_prepared_statements")
        return [name for (name,) in cur.fetchall()]


def test_a_callers_connection_is_left_as_it_was_lent(db, database_url):
    """procqueue prepares `.delay()`'s statement on its own connection, never on a caller's."""
    conn = psycopg2.connect(database_url)
    try:
        greet.delay(args=("lent",), connection=conn)
        conn.commit()
        assert prepared_statements(conn) == []
    finally:
        conn.close()
    greet.delay(args=("own",))
    own, _ = client.connection()
    assert [name for name in prepared_statements(own) if name.startswith("procqueue_enqueue_one")]


def test_delay_survives_a_session_that_forgot_its_prepared_statements(db):
    """A pooler's DISCARD ALL (or a server-side reset) drops prepared statements: the next
    call prepares again instead of failing."""
    greet.delay(args=("before",))
    own, _ = client.connection()
    with own.cursor() as cur:
        cur.execute("DEALLOCATE ALL")
    task_id = greet.delay(args=("after",))
    assert procqueue.get_task(task_id).args == ["after"]


def test_delay_copes_with_a_statement_prepared_before_it_could_note_it(db):
    """An exception landing between PREPARE and procqueue noting it (a task's timeout while
    the task calls `.delay()`) leaves the session with a statement procqueue does not
    know it has: preparing it again must not fail every later call."""
    from procqueue import queries

    greet.delay(args=("first",))
    own, _ = client.connection()
    queries._prepared.pop(own)  # forgotten by procqueue, still prepared in the session
    assert procqueue.get_task(greet.delay(args=("second",))).args == ["second"]


def test_bulk_enqueue_inserts_many_in_one_call(db):
    calls = [greet.call(args=(f"user{n}",)) for n in range(500)]
    ids = procqueue.enqueue_many(calls)
    assert len(ids) == 500 and len(set(ids)) == 500
    assert count_tasks(db, "test_enqueue.greet") == 500


def test_enqueue_notifies_listeners(db, database_url):
    listener = psycopg2.connect(database_url)
    listener.autocommit = True
    try:
        with listener.cursor() as cur:
            cur.execute('LISTEN "procqueue_procqueue"')
        greet.delay(args=("x",))
        import select

        assert select.select([listener], [], [], 5)[0], "no NOTIFY within 5 s"
        listener.poll()
        assert [n.channel for n in listener.notifies] == ["procqueue_procqueue"]
    finally:
        listener.close()


def test_synchronously_runs_inline_with_json_round_tripped_arguments(db):
    seen = []

    @register_task_handler(task_name="test_enqueue.capture_sync")
    def capture(value):
        seen.append(value)

    try:
        procqueue.configure(task_run_method=TaskRunMethod.SYNCHRONOUSLY)
        assert capture.delay(args=((1, 2),)) is None
        assert seen == [[1, 2]]  # a tuple arrives as JSON gives it back: a list
        assert count_tasks(db) == 0
    finally:
        procqueue.registry.unregister(["test_enqueue.capture_sync"])


def test_synchronously_propagates_the_task_exception(db):
    @register_task_handler(task_name="test_enqueue.raises_sync")
    def raises():
        raise ValueError("inline failure")

    try:
        procqueue.configure(task_run_method=TaskRunMethod.SYNCHRONOUSLY)
        with pytest.raises(ValueError, match="inline failure"):
            raises.delay()
    finally:
        procqueue.registry.unregister(["test_enqueue.raises_sync"])


def test_separate_thread_runs_in_another_thread(db):
    ran = threading.Event()
    threads = []

    @register_task_handler(task_name="test_enqueue.capture_thread")
    def capture():
        threads.append(threading.current_thread())
        ran.set()

    try:
        procqueue.configure(task_run_method=TaskRunMethod.SEPARATE_THREAD)
        assert capture.delay() is None
        assert ran.wait(5)
        assert threads[0] is not threading.main_thread()
        assert count_tasks(db) == 0
        thread = capture.run_in_thread()
        thread.join(5)
        assert len(threads) == 2
    finally:
        procqueue.registry.unregister(["test_enqueue.capture_thread"])


def test_bulk_enqueue_synchronously_runs_each_call_inline_in_order(db):
    seen = []

    @register_task_handler(task_name="test_enqueue.capture_bulk_sync")
    def capture(value):
        if value == "boom":
            raise ValueError("inline failure")
        seen.append(value)

    try:
        procqueue.configure(task_run_method=TaskRunMethod.SYNCHRONOUSLY)
        assert procqueue.enqueue_many([capture.call(args=((1, 2),)), capture.call(kwargs={"value": "b"})]) == []
        assert seen == [[1, 2], "b"]
        with pytest.raises(ValueError, match="inline failure"):
            procqueue.enqueue_many([capture.call(args=("boom",)), capture.call(args=("after",))])
        with pytest.raises(TypeError, match=r"args\[0\]"):  # every call is checked before the first runs
            procqueue.enqueue_many([capture.call(args=("first",)), capture.call(args=(object(),))])
        assert seen == [[1, 2], "b"]
        assert count_tasks(db) == 0
    finally:
        procqueue.registry.unregister(["test_enqueue.capture_bulk_sync"])


def test_bulk_enqueue_in_separate_threads_starts_one_thread_per_call(db):
    seen = []
    all_ran = threading.Barrier(3, timeout=5)  # the two calls and this test meet: they run at once

    @register_task_handler(task_name="test_enqueue.capture_bulk_thread")
    def capture(value):
        seen.append((value, threading.current_thread()))
        all_ran.wait()

    try:
        procqueue.configure(task_run_method=TaskRunMethod.SEPARATE_THREAD)
        assert procqueue.enqueue_many([capture.call(args=((1,),)), capture.call(args=("b",))]) == []
        all_ran.wait()
        assert sorted(json.dumps(value) for value, _ in seen) == ['"b"', "[1]"]  # as JSON gives them back
        threads = {thread for _, thread in seen}
        assert len(threads) == 2 and threading.main_thread() not in threads
        assert count_tasks(db) == 0
    finally:
        procqueue.registry.unregister(["test_enqueue.capture_bulk_thread"])


def test_task_run_method_from_environment():
    from procqueue.config import ConfigError, task_run_method_from_env

    assert task_run_method_from_env({}) is TaskRunMethod.TASK_PROCESSOR
    assert task_run_method_from_env({"TASK_RUN_METHOD": "SYNCHRONOUSLY"}) is TaskRunMethod.SYNCHRONOUSLY
    with pytest.raises(ConfigError, match="invalid value for TASK_RUN_METHOD: 'SOMETIMES'"):
        task_run_method_from_env({"TASK_RUN_METHOD": "SOMETIMES"})


def test_registering_two_functions_under_one_name_is_an_error(throwaway_tasks):
    @register_task_handler(task_name="test_enqueue.twice")
    def first():
        pass

    with pytest.raises(procqueue.TaskError, match="already registered"):
        @register_task_handler(task_name="test_enqueue.twice")
        def second():
            pass


def test_bad_handler_settings_are_rejected_at_registration(throwaway_tasks):
    with pytest.raises(procqueue.TaskError, match="max_attempts must be an integer >= 1, got 0"):
        register_task_handler(task_name="test_enqueue.bad", max_attempts=0)(lambda: None)
    with pytest.raises(procqueue.TaskError, match="timeout must be a positive timedelta"):
        register_task_handler(task_name="test_enqueue.bad2", timeout=timedelta(0))(lambda: None)
    with pytest.raises(procqueue.TaskError, match="queue_size must be an integer >= 0 or None, got -1"):
        register_task_handler(task_name="test_enqueue.bad3", queue_size=-1)(lambda: None)


def test_retry_backoff_must_be_a_timedelta_of_zero_or_more(throwaway_tasks):
    # Unchecked, 5 (seconds?) was accepted and crashed the worker at the task's first retry.
    with pytest.raises(procqueue.TaskError,
                       match=r"^task test_enqueue.bad5: retry_backoff must be a timedelta >= 0, got 5$"):
        register_task_handler(task_name="test_enqueue.bad5", retry_backoff=5)(lambda: None)
    with pytest.raises(procqueue.TaskError, match="retry_backoff must be a timedelta >= 0, got datetime.timedelta"):
        register_task_handler(task_name="test_enqueue.bad6", retry_backoff=timedelta(seconds=-1))(lambda: None)
    handler = register_task_handler(task_name="test_enqueue.no_backoff", retry_backoff=timedelta(0))(lambda: None)
    assert handler.retry_delay_seconds(1) == 0


def enqueue_cli(database_url, *args):
    env = dict(os.environ, DATABASE_URL=database_url, PYTHONPATH=f"{REPO}{os.pathsep}{os.path.join(REPO, 'tests')}")
    return subprocess.run([sys.executable, "-m", "procqueue", "enqueue", "sample.record", "-i", "sample_tasks", *args],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("delay, shown", [("nan", "nan"), ("inf", "inf"), ("1e12", "1e+12"), ("-1", "-1")])
def test_cli_enqueue_rejects_a_delay_that_is_not_a_sane_number_of_seconds(db, database_url, delay, shown):
    result = enqueue_cli(database_url, "--args", '["x"]', "--delay", delay)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"procqueue: error: invalid value for --delay: {shown} (expected "), line
    assert "seconds" in line
    assert count_tasks(db) == 0


def test_cli_enqueue_refuses_arguments_that_do_not_fit_in_one_line(db, database_url):
    result = enqueue_cli(database_url, "--args", '["x", "y", "z"]')
    assert result.returncode == 4, result.stderr
    [line] = result.stderr.splitlines()
    assert line == ("procqueue: error: task sample.record: args ['x', 'y', 'z'] and kwargs {} do not fit its "
                    "parameters (key): too many positional arguments"), line
    assert count_tasks(db) == 0


@pytest.mark.parametrize("flag, raw, expected", [
    ("--args", "[" * 5000 + "1" + "]" * 5000, "is nested deeper than Python can read (arguments may be nested 100 "
                                              "levels deep)"),
    ("--kwargs", '{"a": ' + "[" * 5000 + "]" * 5000 + "}", "is nested deeper than Python can read"),
    ("--args", "[" + "9" * 4301 + "]", "holds an integer of more than 4300 digits"),
])
def test_cli_enqueue_refuses_json_python_cannot_read_in_one_line(db, database_url, flag, raw, expected):
    # Before: a RecursionError or ValueError traceback of 46 lines, exit 1.
    result = enqueue_cli(database_url, flag, raw)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"procqueue: error: invalid value for {flag}: ") and expected in line, line
    assert count_tasks(db) == 0


def test_an_integer_of_more_digits_than_json_can_carry_is_the_argument_error(db):
    with pytest.raises(procqueue.TaskArgumentError, match=r"argument args\[1\]\[0\] is an integer of more than "
                                                          r"4300 digits"):
        greet.delay(args=("ok", [10 ** 5000]))
    assert greet.delay(args=("ok", [10 ** 4000]))  # fewer digits: carried
    assert count_tasks(db) == 1


def test_get_task_reads_json_back(db):
    task = procqueue.get_task(greet.delay(args=({"nested": [1, "two", None]},)))
    assert json.dumps(task.args) == '[{"nested": [1, "two", null]}]'


def test_default_task_name_follows_flagsmith(throwaway_tasks):
    def send_report():
        pass

    send_report.__module__ = "myapp.tasks"
    assert register_task_handler()(send_report).task_name == "tasks.send_report"


def test_recurring_task_arguments_must_be_json(throwaway_tasks):
    from procqueue import register_recurring_task

    with pytest.raises(TypeError, match=r"argument kwargs\['when'\]"):
        register_recurring_task(run_every=timedelta(minutes=1), task_name="test_enqueue.bad_recurring",
                                kwargs={"when": object()})(lambda when: None)


def test_recurring_task_arguments_must_fit_the_function(throwaway_tasks):
    from procqueue import register_recurring_task

    with pytest.raises(TypeError, match=r"do not fit its parameters \(when\): missing a required argument: 'when'"):
        register_recurring_task(run_every=timedelta(minutes=1), task_name="test_enqueue.unfit_recurring")(
            lambda when: None)
    assert "test_enqueue.unfit_recurring" not in procqueue.registry.registered_names()
