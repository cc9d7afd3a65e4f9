"""Rescue of a dead processor's tasks and release of a dead worker's, statement by statement
against real Postgres: what goes back untouched, what is recorded lost, what fails, and
what a recurring run becomes. The processes that reach these statements have their own
tests (test_outages.py); here each outcome is set up exactly."""

from __future__ import annotations

from datetime import timedelta

import pytest

from procqueue import TaskState, client, current_task, register_task_handler
from procqueue.supervisor_database import RESCUES_BEFORE_FAILING
from procqueue.queries import Queries
from procqueue.records import ExpiredTask, ReleasedTask, RunOutcome

import sample_tasks

queries = Queries("procqueue")
started_when_run = {}


@register_task_handler(task_name="test_rescue.report_started")
def report_started() -> None:
    """Notes whether the database knew this run had started when its function began."""
    conn, _ = client.connection()
    with conn.cursor() as cur:
        cur.execute("SELECT started_at IS NOT NULL FROM procqueue.tasks WHERE id = %s", (current_task().id,))
        started_when_run[current_task().id] = cur.fetchone()[0]


def claim_as(db, processor, limit=10):
    """Claim due tasks as a processor that then dies at once: its heartbeat an hour old."""
    with db.cursor() as cur:
        cur.execute("INSERT INTO procqueue.processors (id, hostname, pid, heartbeat_at) "
                    "VALUES (%s, 'gone', 1, now() - interval '1 hour')", (processor,))
    return queries.claim(db, processor=processor, worker=0, limit=limit)


def rescue(db):
    return queries.rescue_dead_processors(db, expiry_seconds=60, rescuer="alive",
                                          max_losses=RESCUES_BEFORE_FAILING)


def runs(db, task_id):
    return [(run.outcome.value, run.attempt) for run in queries.get_runs(db, task_id)]


def recurring_run(db, name="r.every_minute"):
    queries.register_recurring(db, name=name, run_every=timedelta(minutes=1), first_run_at=None, timeout_seconds=60)
    [scheduled] = queries.schedule_recurring(db, [name])
    return scheduled.task_id


def test_a_task_only_claimed_by_dying_hosts_goes_back_untouched_however_often(db):
    task_id = sample_tasks.record_once.delay(args=("never started",))  # max_attempts=1
    for death in range(RESCUES_BEFORE_FAILING + 2):
        [claimed] = claim_as(db, f"host-{death}")
        assert claimed.id == task_id and claimed.attempts == 1
        assert rescue(db) == [ReleasedTask(task_id, "sample.record_once", False, TaskState.QUEUED, started=False)]
        assert queries.get_task(db, task_id).attempts == 0
    task = queries.get_task(db, task_id)
    assert (task.state, task.attempts, task.last_error, task.started_at) == (TaskState.QUEUED, 0, None, None)
    assert runs(db, task_id) == []  # nothing ran, so nothing is recorded


def test_a_started_task_is_recorded_lost_uncharged_and_fails_on_its_third_loss(db):
    task_id = sample_tasks.record_task.delay(args=("kills its host",))
    for death in range(1, RESCUES_BEFORE_FAILING + 1):
        [claimed] = claim_as(db, f"host-{death}")
        assert queries.start_run(db, processor=f"host-{death}", worker=0, task=claimed) is not None
        [rescued] = rescue(db)
        expected = TaskState.FAILED if death == RESCUES_BEFORE_FAILING else TaskState.QUEUED
        assert (rescued.state, rescued.started) == (expected, True)
    task = queries.get_task(db, task_id)
    assert task.attempts == 0  # the hosts died, not the task: no attempt charged
    assert f"lost with its processor {RESCUES_BEFORE_FAILING} times: failed" in task.last_error
    assert runs(db, task_id) == [("lost", 1)] * RESCUES_BEFORE_FAILING


def test_only_the_started_task_of_a_dead_hosts_batch_counts_as_lost(db):
    first, second, third = [sample_tasks.record_task.delay(args=(f"batch {n}",)) for n in range(3)]
    claimed = claim_as(db, "host")
    queries.start_run(db, processor="host", worker=0, task=claimed[0])
    outcome = {task.task_id: task.started for task in rescue(db)}
    assert outcome == {first: True, second: False, third: False}
    assert [runs(db, task_id) for task_id in (first, second, third)] == [[("lost", 1)], [], []]


def test_a_started_recurring_run_of_a_dead_host_is_missed_not_run_again(db):
    task_id = recurring_run(db)
    [claimed] = claim_as(db, "host")
    assert queries.start_run(db, processor="host", worker=0, task=claimed) is not None
    [rescued] = rescue(db)
    assert (rescued.state, rescued.recurring, rescued.started) == (TaskState.MISSED, True, True)
    task = queries.get_task(db, task_id)
    assert task.finished_at is not None and "the next slot is its retry" in task.last_error
    assert runs(db, task_id) == [("lost", 1)]
    assert claim_as(db, "another") == []  # never claimed again


def test_an_unstarted_recurring_run_of_a_dead_host_may_still_run_in_its_slot(db):
    task_id = recurring_run(db)
    claim_as(db, "host")
    [rescued] = rescue(db)
    assert (rescued.state, rescued.started) == (TaskState.QUEUED, False)
    [again] = claim_as(db, "another")
    assert again.id == task_id and again.attempts == 1


def test_a_recurring_run_past_its_slot_never_starts_and_ends_missed(db):
    task_id = recurring_run(db)
    [claimed] = claim_as(db, "host")
    with db.cursor() as cur:  # the next slot comes due while the run waits its turn in a batch
        cur.execute("UPDATE procqueue.tasks SET expires_at = now() - interval '1 second' WHERE id = %s", (task_id,))
    assert queries.start_run(db, processor="host", worker=0, task=claimed) is None
    assert queries.put_back(db, processor="host", worker=0, task=claimed)
    assert claim_as(db, "another") == []  # past its slot: never claimed
    assert queries.miss_expired_tasks(db) == [ExpiredTask(task_id, "r.every_minute", True)]
    task = queries.get_task(db, task_id)
    assert task.state is TaskState.MISSED and "the next slot of its recurring schedule was due" in task.last_error
    assert (task.attempts, runs(db, task_id)) == (0, [])  # it never ran


def test_two_runs_of_one_recurring_task_cannot_both_be_started(db):
    import psycopg2.errors

    first = recurring_run(db)
    with db.cursor() as cur:  # the next slot is due while the first run is still going
        cur.execute("UPDATE procqueue.recurring_tasks SET next_run_at = now()")
    second = queries.schedule_recurring(db, ["r.every_minute"])[0].task_id
    claimed = {task.id: task for task in claim_as(db, "host")}
    assert queries.start_run(db, processor="host", worker=0, task=claimed[first]) is not None
    with pytest.raises(psycopg2.errors.UniqueViolation):
        queries.start_run(db, processor="host", worker=0, task=claimed[second])
    assert queries.get_task(db, second).started_at is None


def test_a_dead_workers_recurring_run_is_missed_when_uncharged_and_failed_when_charged(db):
    for charge, expected in ((False, TaskState.MISSED), (True, TaskState.FAILED)):
        task_id = recurring_run(db, name=f"r.charge_{charge}")
        [claimed] = claim_as(db, f"host-{charge}")
        [released] = queries.release_worker_tasks(db, processor=f"host-{charge}", worker=0, in_flight=claimed.id,
                                                  error="worker 0 killed", charge=charge)
        assert released.state is expected
        assert runs(db, task_id) == [("lost", 1)]
        assert claim_as(db, f"later-{charge}") == []


def test_a_dead_workers_unstarted_tasks_go_back_untouched_and_its_task_in_hand_is_recorded(db):
    in_hand, waiting = [sample_tasks.record_task.delay(args=(f"w{n}",)) for n in range(2)]
    claim_as(db, "host")
    [released] = queries.release_worker_tasks(db, processor="host", worker=0, in_flight=in_hand,
                                              error="worker 0 killed by signal 9", outcome=RunOutcome.LOST)
    assert (released.task_id, released.state) == (in_hand, TaskState.QUEUED)
    assert runs(db, in_hand) == [("lost", 1)] and queries.get_task(db, in_hand).attempts == 1
    assert runs(db, waiting) == [] and queries.get_task(db, waiting).attempts == 0


def test_a_dead_workers_recurring_run_that_ended_unrecorded_is_missed_not_run_again(db):
    # It ran and ended; the worker died before writing its outcome, between tasks (the
    # slot shows nothing in flight). Its start is in the database: it must not run again.
    task_id = recurring_run(db)
    [claimed] = claim_as(db, "host")
    queries.start_run(db, processor="host", worker=0, task=claimed)
    [released] = queries.release_worker_tasks(db, processor="host", worker=0, in_flight=None,
                                              error="worker 0 killed by signal 9")
    assert (released.task_id, released.state, released.outcome) == (task_id, TaskState.MISSED, RunOutcome.LOST)
    assert runs(db, task_id) == [("lost", 1)]
    assert "before its outcome was recorded" in queries.get_task(db, task_id).last_error
    assert claim_as(db, "another") == []


def test_a_task_put_back_by_a_rescue_says_so_to_its_next_claim(db):
    # So the worker tells the database at once that it started: a task that takes its
    # node down within moments would otherwise never count as having started.
    task_id = sample_tasks.record_task.delay(args=("claimed when its host died",))
    assert claim_as(db, "host")[0].rescues == 0
    rescue(db)
    [again] = claim_as(db, "another")
    assert (again.id, again.rescues) == (task_id, 1)


def test_a_rescued_task_is_marked_started_before_its_function_runs(db, processor_config):
    from procqueue.worker import Worker

    rescued = report_started.delay()
    claim_as(db, "host")
    rescue(db)
    fresh = report_started.delay()
    worker = Worker(processor_config, processor_id="alive", index=0)
    worker.recurring_names = []
    worker.ensure_connected()
    try:
        assert worker.step() == 2
    finally:
        worker.close()
    # The quick fresh one is left to its outcome (no write of its own); the one a rescue
    # put back is told at once, so a node it takes down counts it as started.
    assert started_when_run == {rescued: True, fresh: False}
