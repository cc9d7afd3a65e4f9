"""The worker loop, driven one step at a time in-process against real Postgres."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

import procqueue
from procqueue import RunOutcome, TaskBackoffError, TaskPriority, TaskState, register_task_handler
from procqueue.execution import soft_timeout
from procqueue.worker import Worker

calls = []


@register_task_handler(task_name="test_worker.collect")
def collect(value):
    calls.append(value)


@register_task_handler(task_name="test_worker.explode", max_attempts=3, retry_backoff=timedelta(seconds=10))
def explode(message):
    raise RuntimeError(message)


@register_task_handler(task_name="test_worker.backoff", max_attempts=2)
def backoff(seconds):
    raise TaskBackoffError(delay_until=datetime.now(timezone.utc) + timedelta(seconds=seconds))


@register_task_handler(task_name="test_worker.slow", timeout=timedelta(milliseconds=200), max_attempts=2)
def slow():
    try:
        time.sleep(5)
    except Exception:  # a task that swallows everything still cannot outlive its timeout
        pass


@pytest.fixture(autouse=True)
def reset_calls():
    calls.clear()


def runs_of(task_id):
    return procqueue.get_task_runs(task_id)


def make_due(db, task_id):
    """Move a retry's run_at to now: the test stands in for the passing of time."""
    with db.cursor() as cur:
        cur.execute("UPDATE procqueue.tasks SET run_at = now() WHERE id = %s", (task_id,))


def test_claim_run_complete_records_success(worker):
    task_id = collect.delay(args=("a",))
    assert worker.step() == 1
    assert calls == ["a"]
    task = procqueue.get_task(task_id)
    assert task.state is TaskState.SUCCEEDED
    assert task.attempts == 1 and task.locked_by is None and task.finished_at is not None
    [run] = runs_of(task_id)
    assert (run.outcome, run.attempt, run.error, run.worker) == (RunOutcome.SUCCEEDED, 1, None, 0)
    assert run.started_at <= run.finished_at


def test_claims_in_priority_then_run_at_order(worker):
    collect.delay(args=("normal-1",))
    collect.delay(args=("lower",), priority=TaskPriority.LOWER)
    collect.delay(args=("highest",), priority=TaskPriority.HIGHEST)
    collect.delay(args=("normal-2",))
    collect.delay(args=("high",), priority=TaskPriority.HIGH)
    assert worker.step() == 5
    assert calls == ["highest", "high", "normal-1", "normal-2", "lower"]


class FakeClock:
    """The worker's clock, moved only by the test (and the tasks it runs)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_claims_start_at_queue_pop_size_and_grow_while_tasks_are_quick(db, processor_config):
    from dataclasses import replace

    worker = Worker(replace(processor_config, queue_pop_size=3), processor_id="p", index=0, clock=FakeClock())
    worker.recurring_names = []
    try:
        procqueue.enqueue_many([collect.call(args=(n,)) for n in range(20)])
        # 3, then twice as many while claims come back full of tasks that take no time;
        # the last claim takes what is left.
        assert [worker.step(), worker.step(), worker.step()] == [3, 6, 11]
        assert sorted(calls) == list(range(20))
        assert worker.claim_size == 3  # a claim that got fewer than it asked for: back to the start
    finally:
        worker.close()


clock_of_the_test = FakeClock()


@register_task_handler(task_name="test_worker.take_120ms")
def take_120ms(value):
    clock_of_the_test.now += 0.12
    calls.append(value)


def test_a_batch_that_has_run_long_gives_back_what_it_has_not_begun(db, processor_config):
    worker = Worker(processor_config, processor_id="p", index=0, clock=clock_of_the_test)
    worker.recurring_names = []
    try:
        ids = procqueue.enqueue_many([take_120ms.call(args=(n,)) for n in range(5)])
        # 0.12 s after the first, 0.24 s after the second: past 0.2 s the other three go back.
        assert worker.step() == 2
        assert calls == [0, 1]
        for task_id in ids[2:]:
            task = procqueue.get_task(task_id)
            assert (task.state, task.attempts, task.locked_by) == (TaskState.QUEUED, 0, None)
            assert runs_of(task_id) == []
        assert worker.leases == {}
    finally:
        worker.close()


waiting_behind = []


@register_task_handler(task_name="test_worker.wait_until_given_back")
def wait_until_given_back():
    """Runs until the tasks claimed behind it are back in the queue (or 10 s have passed)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(procqueue.get_task(task_id).state is TaskState.QUEUED for task_id in waiting_behind):
            return
        time.sleep(0.02)
    raise AssertionError("the tasks claimed behind this one were never given back")


def received_notifications(conn, count, seconds=5):
    """Whether `count` NOTIFYs reach `conn` within `seconds`; clears them."""
    import select

    deadline = time.monotonic() + seconds
    while len(conn.notifies) < count and time.monotonic() < deadline:
        select.select([conn], [], [], max(0.0, deadline - time.monotonic()))
        conn.poll()
    arrived = len(conn.notifies)
    conn.notifies.clear()
    return arrived == count


def test_tasks_claimed_behind_a_slow_one_go_back_for_other_workers(db, processor_config):
    worker = Worker(processor_config, processor_id="p", index=0)
    other = Worker(processor_config, processor_id="p", index=1)
    for w in (worker, other):
        w.recurring_names = []
        w.ensure_connected()
    worker.flush_during_tasks()  # as in a worker process: the thread that gives them back
    try:
        slow_id = wait_until_given_back.delay(priority=TaskPriority.HIGHEST)
        waiting_behind[:] = [collect.delay(args=(n,)) for n in range(4)]
        assert received_notifications(other.conn, 5)  # the enqueues' own, one each

        assert worker.step() == 1  # the slow one; the four behind it went back meanwhile
        assert calls == []
        assert procqueue.get_task(slow_id).state is TaskState.SUCCEEDED
        for task_id in waiting_behind:
            task = procqueue.get_task(task_id)
            assert (task.state, task.attempts, task.locked_by, task.started_at) == (TaskState.QUEUED, 0, None, None)
            assert runs_of(task_id) == []
        assert received_notifications(other.conn, 1)  # idle workers are woken for them
        assert other.step() == 4
        assert sorted(calls) == [0, 1, 2, 3]
        assert worker.claim_size == processor_config.queue_pop_size
    finally:
        worker.close()
        other.close()


def test_delay_until_holds_a_task_back_until_due(worker):
    task_id = collect.delay(args=("later",), delay_until=datetime.now(timezone.utc) + timedelta(seconds=0.5))
    assert worker.step() == 0
    assert calls == []
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        worker.step()
    assert calls == ["later"]
    assert procqueue.get_task(task_id).state is TaskState.SUCCEEDED


def test_failure_records_traceback_and_retries_with_exponential_backoff(db, worker):
    task_id = explode.delay(args=("kaboom",))
    before = datetime.now(timezone.utc)
    worker.step()
    task = procqueue.get_task(task_id)
    assert task.state is TaskState.QUEUED and task.attempts == 1
    assert timedelta(seconds=9) <= task.run_at - before <= timedelta(seconds=11)
    [run] = runs_of(task_id)
    assert run.outcome is RunOutcome.FAILED
    assert "Traceback (most recent call last)" in run.error and "RuntimeError: kaboom" in run.error
    assert 'in explode' in run.error

    make_due(db, task_id)
    before = datetime.now(timezone.utc)
    worker.step()
    task = procqueue.get_task(task_id)
    assert task.attempts == 2
    assert timedelta(seconds=19) <= task.run_at - before <= timedelta(seconds=21)


def test_task_fails_for_good_after_max_attempts(db, worker):
    task_id = explode.delay(args=("always",))
    for _ in range(3):
        make_due(db, task_id)
        worker.step()
    task = procqueue.get_task(task_id)
    assert task.state is TaskState.FAILED and task.attempts == 3
    assert "RuntimeError: always" in task.last_error
    assert [r.attempt for r in runs_of(task_id)] == [1, 2, 3]
    make_due(db, task_id)
    assert worker.step() == 0  # a failed task is never claimed again


def test_unknown_task_is_never_run_nor_dropped(db, worker):
    with db.cursor() as cur:
        cur.execute("INSERT INTO procqueue.tasks (task_name, max_attempts) VALUES ('newer_release.task', 2) RETURNING id")
        task_id = cur.fetchone()[0]
    worker.step()
    task = procqueue.get_task(task_id)
    assert task.state is TaskState.QUEUED and task.run_at > datetime.now(timezone.utc)
    assert "'newer_release.task' is not registered in this processor" in task.last_error
    make_due(db, task_id)
    worker.step()
    task = procqueue.get_task(task_id)
    assert task.state is TaskState.FAILED
    assert [r.outcome for r in runs_of(task_id)] == [RunOutcome.FAILED, RunOutcome.FAILED]


def test_backoff_error_reschedules_and_uses_an_attempt(db, worker):
    task_id = backoff.delay(args=(30,))
    worker.step()
    task = procqueue.get_task(task_id)
    assert task.state is TaskState.QUEUED
    assert task.attempts == 1  # a backoff counts, as in Flagsmith
    assert timedelta(seconds=28) <= task.run_at - datetime.now(timezone.utc) <= timedelta(seconds=31)
    [run] = runs_of(task_id)
    assert run.outcome is RunOutcome.BACKOFF and run.attempt == 1
    make_due(db, task_id)
    worker.step()  # its second and last attempt backs off too: failed
    task = procqueue.get_task(task_id)
    assert task.state is TaskState.FAILED and task.attempts == 2
    assert "backed off on its last attempt (2 of 2)" in task.last_error
    assert [r.outcome for r in runs_of(task_id)] == [RunOutcome.BACKOFF, RunOutcome.BACKOFF]


def test_task_past_its_timeout_is_interrupted_and_retried(worker):
    import signal

    # pytest-timeout also keeps its alarm on SIGALRM: lend it to the worker, then give it back.
    saved_handler = signal.getsignal(signal.SIGALRM)
    saved_timer = signal.getitimer(signal.ITIMER_REAL)
    soft_timeout.install()
    try:
        task_id = slow.delay()
        started = time.monotonic()
        worker.step()
        elapsed = time.monotonic() - started
        assert elapsed < 3
    finally:
        soft_timeout.installed = False
        signal.signal(signal.SIGALRM, saved_handler)
        if saved_timer[0]:
            signal.setitimer(signal.ITIMER_REAL, max(saved_timer[0] - elapsed, 0.1))
    task = procqueue.get_task(task_id)
    assert task.state is TaskState.QUEUED and task.attempts == 1
    [run] = runs_of(task_id)
    assert run.outcome is RunOutcome.TIMED_OUT
    assert "ran past its timeout of 0.2s" in run.error


def test_outcome_of_a_task_whose_lease_was_taken_is_dropped(db, worker):
    task_id = collect.delay(args=("x",))
    [claimed] = worker.claim()
    # Meanwhile the task was rescued from this worker and handed back to the queue.
    with db.cursor() as cur:
        cur.execute("UPDATE procqueue.tasks SET state = 'queued', locked_by = NULL, locked_worker = NULL WHERE id = %s", (task_id,))
    worker.run_one(claimed)
    worker.flush()
    assert procqueue.get_task(task_id).state is TaskState.QUEUED
    assert runs_of(task_id) == []


def test_an_outcome_lands_only_on_the_claim_that_ran_it(db, worker):
    from procqueue.queries import Queries

    task_id = collect.delay(args=("x",))
    [claimed] = worker.claim()
    # Meanwhile the task was put back and claimed again by this same worker slot (its
    # processor and slot match): only the claim's token tells the two leases apart.
    with db.cursor() as cur:
        cur.execute("UPDATE procqueue.tasks SET state = 'queued', locked_by = NULL, locked_worker = NULL, "
                    "locked_at = NULL WHERE id = %s", (task_id,))
    [again] = Queries("procqueue").claim(db, processor="test-processor", worker=0, limit=1)
    assert again.leased_at != claimed.leased_at
    worker.run_one(claimed)
    worker.flush()
    task = procqueue.get_task(task_id)
    assert (task.state, task.locked_at) == (TaskState.RUNNING, again.leased_at)  # the newer claim stands
    assert runs_of(task_id) == []


def test_stopping_mid_batch_releases_unstarted_tasks_without_charging_them(db, processor_config):
    worker = Worker(processor_config, processor_id="p", index=0)
    worker.recurring_names = []

    @register_task_handler(task_name="test_worker.stop_after_first")
    def stop_after_first(n):
        calls.append(n)
        worker.request_stop()

    try:
        ids = procqueue.enqueue_many([stop_after_first.call(args=(n,)) for n in range(4)])
        assert worker.step() == 1
        states = [procqueue.get_task(i) for i in ids]
        assert [t.state for t in states] == [TaskState.SUCCEEDED] + [TaskState.QUEUED] * 3
        assert [t.attempts for t in states] == [1, 0, 0, 0]
        assert all(t.locked_by is None for t in states)
    finally:
        worker.close()
        procqueue.registry.unregister(["test_worker.stop_after_first"])


def test_cancel_only_affects_queued_tasks(worker):
    queued = collect.delay(args=("never",), delay_until=datetime.now(timezone.utc) + timedelta(hours=1))
    done = collect.delay(args=("done",))
    worker.step()
    assert procqueue.cancel(queued) is True
    assert procqueue.cancel(done) is False
    assert procqueue.get_task(queued).state is TaskState.CANCELLED
    assert procqueue.get_task(done).state is TaskState.SUCCEEDED


def test_worker_runs_only_its_queues(db, processor_config):
    from dataclasses import replace

    @register_task_handler(task_name="test_worker.on_mail_queue", queue="mail")
    def on_mail_queue(n):
        calls.append(("mail", n))

    worker = Worker(replace(processor_config, queues=("mail",)), processor_id="p", index=0)
    worker.recurring_names = []
    try:
        other = collect.delay(args=("default queue",))
        mail = on_mail_queue.delay(args=(1,))
        worker.ensure_connected()
        worker.step()
        assert calls == [("mail", 1)]
        assert procqueue.get_task(mail).state is TaskState.SUCCEEDED
        assert procqueue.get_task(other).state is TaskState.QUEUED
    finally:
        worker.close()
        procqueue.registry.unregister(["test_worker.on_mail_queue"])


def test_tasks_whose_claim_reply_was_lost_are_put_back_when_the_worker_reconnects(db, processor_config):
    from procqueue.queries import Queries

    worker = Worker(processor_config, processor_id="p", index=0)
    worker.recurring_names = []
    ids = procqueue.enqueue_many([collect.call(args=(n,)) for n in range(3)])
    try:
        worker.ensure_connected()
        # The worker's claim committed on the server, then the connection died before the
        # reply came: the tasks are leased to this worker, which never saw them.
        Queries("procqueue").claim(db, processor="p", worker=0, limit=10)
        worker.conn.close()
        worker.connection_failures = 1  # as the loop counts a lost connection
        ran = worker.step()  # reconnects, puts them back, claims them again
        while ran:
            ran = worker.step()
        assert sorted(calls) == [0, 1, 2]
        tasks = [procqueue.get_task(task_id) for task_id in ids]
        assert [(t.state, t.attempts) for t in tasks] == [(TaskState.SUCCEEDED, 1)] * 3  # no attempt charged
    finally:
        worker.close()


def test_a_worker_schedules_only_recurring_tasks_of_the_queues_it_runs(processor_config):
    from dataclasses import replace

    import procqueue.maintenance  # noqa: F401 (registers the clean-up, a default-queue recurring task)

    every_queue = Worker(processor_config, processor_id="p", index=0)
    mail_only = Worker(replace(processor_config, queues=("mail",)), processor_id="p", index=0)
    assert "procqueue.clean_up_old_tasks" in every_queue.recurring_names
    # It would enqueue one task per interval that no processor of its kind ever claims.
    assert mail_only.recurring_names == []


def test_exception_messages_postgres_cannot_store_are_recorded_cleaned(worker):
    @register_task_handler(task_name="test_worker.binary_error", max_attempts=1)
    def binary_error():
        raise ValueError("bad byte \x00 and lone surrogate \udc80")

    try:
        task_id = binary_error.delay()
        worker.step()
        task = procqueue.get_task(task_id)
        assert task.state is TaskState.FAILED
        assert "bad byte \\x00 and lone surrogate \\udc80" in task.last_error
    finally:
        procqueue.registry.unregister(["test_worker.binary_error"])


def test_failure_log_line_names_the_error_not_its_hint(worker, caplog):
    @register_task_handler(task_name="test_worker.bad_sql", max_attempts=1)
    def bad_sql():
        from procqueue import client

        conn, _ = client.connection()
        with conn.cursor() as cur:
            cur.execute("SELECT 1 + 'a'::text")

    try:
        bad_sql.delay()
        with caplog.at_level("WARNING", logger="procqueue.worker"):
            worker.step()
        [line] = [r.getMessage() for r in caplog.records if "event=task.failed" in r.getMessage()]
        assert 'error="UndefinedFunction: operator does not exist' in line
        assert "HINT" not in line
    finally:
        procqueue.registry.unregister(["test_worker.bad_sql"])


def test_a_connection_that_broke_as_its_reply_arrived_is_a_lost_connection_not_a_failed_statement():
    import psycopg2
    import psycopg2.errors

    from procqueue.db import is_connection_error

    # What psycopg2 raises when the server goes away mid-reply: a bare DatabaseError.
    assert is_connection_error(psycopg2.DatabaseError("server closed the connection unexpectedly\n\t..."))
    assert is_connection_error(psycopg2.OperationalError("could not connect"))
    assert not is_connection_error(psycopg2.errors.UniqueViolation("duplicate key value"))


def test_a_claim_survives_a_session_that_forgot_its_prepared_statements(worker):
    collect.delay(args=("a",))
    assert worker.step() == 1
    with worker.conn.cursor() as cur:
        cur.execute("DEALLOCATE ALL")  # as a pooler's DISCARD ALL does
    collect.delay(args=("b",))
    assert worker.step() == 1
    assert calls == ["a", "b"]


def test_idle_workers_share_one_look_per_interval(db, processor_config):
    """Idle, the processor asks Postgres for unannounced work once per --sleepintervalms,
    not once per worker: 3 workers over 2 s at 200 ms look about 10 times, not 30."""
    import threading
    from dataclasses import replace

    from procqueue.heartbeat import allocate_last_look

    config = replace(processor_config, sleep_interval_ms=200, num_workers=3)
    last_look = allocate_last_look()
    workers = [Worker(config, processor_id="p", index=i, last_look=last_look) for i in range(3)]
    claims = []
    for worker in workers:
        worker.recurring_names = []
        worker.ensure_connected()
        claim = worker.queries.claim

        def counted_claim(*args, _claim=claim, **kwargs):
            claims.append(time.monotonic())
            return _claim(*args, **kwargs)

        worker.queries.claim = counted_claim
    stop_at = time.monotonic() + 2.0

    def idle(worker):
        while time.monotonic() < stop_at:
            worker.step()

    threads = [threading.Thread(target=idle, args=(worker,)) for worker in workers]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    finally:
        for worker in workers:
            worker.close()
    # Each worker's first claim, then one look per interval between them (a little slack).
    assert 3 + 6 <= len(claims) <= 3 + 10 + 3, len(claims)
