"""Recurring tasks: once per interval across every processor sharing the database."""

from __future__ import annotations

import os
import signal
from datetime import datetime, time as time_of_day, timedelta, timezone

import pytest

import procqueue
from procqueue import RunOutcome, TaskState
from procqueue.queries import Queries

from helpers import wait_until

queries = Queries("procqueue")


def schedule_row(db, name):
    with db.cursor() as cur:
        cur.execute("SELECT run_every, first_run_at, next_run_at FROM procqueue.recurring_tasks WHERE task_name = %s", (name,))
        return cur.fetchone()


def test_first_registration_is_due_at_once_and_reregistering_keeps_the_slot(db):
    queries.register_recurring(db, name="r.a", run_every=timedelta(minutes=5), first_run_at=None, timeout_seconds=60)
    _, first, next_run = schedule_row(db, "r.a")
    assert next_run == first
    queries.register_recurring(db, name="r.a", run_every=timedelta(minutes=5), first_run_at=None, timeout_seconds=60)
    assert schedule_row(db, "r.a")[2] == next_run  # a second processor starting changes nothing


def test_time_of_day_anchor_schedules_the_next_occurrence(db):
    from procqueue.registry import _anchor

    anchor = _anchor("r.daily", time_of_day(3, 0))
    queries.register_recurring(db, name="r.daily", run_every=timedelta(days=1), first_run_at=anchor, timeout_seconds=60)
    next_run = schedule_row(db, "r.daily")[2]
    now = datetime.now(timezone.utc)
    assert now <= next_run < now + timedelta(days=1)
    assert (next_run.hour, next_run.minute) == (3, 0)


def test_changing_run_every_reschedules(db):
    anchor = datetime.now(timezone.utc) + timedelta(hours=1)
    queries.register_recurring(db, name="r.b", run_every=timedelta(hours=1), first_run_at=anchor, timeout_seconds=60)
    assert schedule_row(db, "r.b")[2] == anchor
    queries.register_recurring(db, name="r.b", run_every=timedelta(minutes=1),
                               first_run_at=anchor - timedelta(hours=2), timeout_seconds=60)
    run_every, _, next_run = schedule_row(db, "r.b")
    assert run_every == timedelta(minutes=1)
    now = datetime.now(timezone.utc)
    assert now - timedelta(seconds=1) <= next_run <= now + timedelta(minutes=1)  # next minute slot, not in an hour


def test_one_task_per_slot_and_slots_missed_while_no_processor_ran_are_skipped(db):
    anchor = datetime.now(timezone.utc) - timedelta(minutes=10, seconds=30)
    queries.register_recurring(db, name="r.c", run_every=timedelta(minutes=1), first_run_at=anchor,
                               timeout_seconds=60)
    with db.cursor() as cur:  # as if no processor ran for ten minutes
        cur.execute("UPDATE procqueue.recurring_tasks SET next_run_at = first_run_at WHERE task_name = 'r.c'")
    [first] = queries.schedule_recurring(db, ["r.c"])
    again = queries.schedule_recurring(db, ["r.c"])
    assert first.task_id is not None and again == []
    # The run is the current slot's (the ten before it are skipped, not run late), and it
    # expires when the next slot is due.
    assert (first.slot, first.skipped_slots) == (anchor + timedelta(minutes=10), 10)
    next_run = schedule_row(db, "r.c")[2]
    assert next_run == anchor + timedelta(minutes=11)
    with db.cursor() as cur:
        cur.execute("SELECT max_attempts, timeout_seconds, recurring_slot, expires_at FROM procqueue.tasks "
                    "WHERE task_name = 'r.c'")
        assert cur.fetchall() == [(1, 60.0, first.slot, next_run)]


def test_schedules_not_registered_by_this_processor_are_left_alone(db):
    queries.register_recurring(db, name="r.other", run_every=timedelta(minutes=1), first_run_at=None, timeout_seconds=60)
    assert queries.schedule_recurring(db, ["r.mine"]) == []


@pytest.mark.timeout(90)
def test_three_processors_run_a_recurring_task_at_most_once_per_slot(db, start_processor):
    processors = [start_processor("--numthreads", "1", "--import", "sample_recurring", "--sleepintervalms", "200")
                  for _ in range(3)]
    wait_until(lambda: succeeded_runs(db) >= 5, timeout=30, message="five one-second slots")
    for processor in processors:
        assert processor.stop() == 0
    with db.cursor() as cur:
        cur.execute("SELECT recurring_slot, state FROM procqueue.tasks "
                    "WHERE task_name = 'sample.every_second' ORDER BY recurring_slot")
        slots = cur.fetchall()
    run_every, anchor, next_run = schedule_row(db, "sample.every_second")
    # Not asserted, because nothing guarantees it: that the processors share the runs
    # (whichever checks first wins a slot, and one may win them all), or that consecutive
    # slots are one interval apart (a check that comes late, as under load, enqueues one run
    # for the slots it missed: collapsed, as documented). What is guaranteed: every run is
    # on a slot boundary, no slot is enqueued twice, the schedule moves past each slot...
    assert all((slot - anchor) % run_every == timedelta(0) for slot, _ in slots), slots
    assert all(a[0] < b[0] for a, b in zip(slots, slots[1:])), slots  # ordered, so unique
    assert next_run > slots[-1][0] and (next_run - anchor) % run_every == timedelta(0)
    # ...and each slot that ran, ran exactly once (by whichever processor won it).
    succeeded = [slot for slot in slots if slot[1] == "succeeded"]
    assert execution_count(db, "every_second") == len(succeeded) == succeeded_runs(db) >= 5


def succeeded_runs(db):
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM procqueue.task_runs WHERE task_name = 'sample.every_second' "
                    "AND outcome = 'succeeded'")
        return cur.fetchone()[0]


def execution_count(db, key):
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM public.executions WHERE key = %s", (key,))
        return cur.fetchone()[0]


def executions_by_task(db, prefix):
    """{task id: [start, end or None]} of the runs that recorded `prefix`:start/end."""
    with db.cursor() as cur:
        cur.execute("SELECT task_id, key, at, pid FROM public.executions WHERE key LIKE %s ORDER BY at",
                    (prefix + ":%",))
        runs = {}
        for task_id, key, at, pid in cur.fetchall():
            run = runs.setdefault(task_id, {"starts": 0, "start": None, "end": None, "pid": pid})
            if key.endswith(":start"):
                run["starts"] += 1
                run["start"] = at
            else:
                run["end"] = at
        return runs


def assert_never_overlapping(runs, ended_at):
    """Runs of one recurring task, sorted by start: each began after the last one ended
    (its own end record, or for a run cut short, when its end was recorded)."""
    ordered = sorted(runs.items(), key=lambda item: item[1]["start"])
    for (earlier_id, earlier), (later_id, later) in zip(ordered, ordered[1:]):
        end = earlier["end"] or ended_at(earlier_id)
        assert end is not None and end <= later["start"], (earlier_id, earlier, later_id, later)


def recorded_end(db, task_id):
    with db.cursor() as cur:
        cur.execute("SELECT max(finished_at) FROM procqueue.task_runs WHERE task_id = %s", (task_id,))
        return cur.fetchone()[0]


def slots_of(db, name):
    with db.cursor() as cur:
        cur.execute("SELECT t.id, t.state, t.recurring_slot, t.expires_at, t.last_error, r.started_at "
                    "FROM procqueue.tasks AS t LEFT JOIN procqueue.task_runs AS r ON r.task_id = t.id "
                    "WHERE t.task_name = %s ORDER BY t.recurring_slot", (name,))
        return cur.fetchall()


@pytest.mark.timeout(120)
def test_runs_of_a_recurring_task_longer_than_its_interval_never_overlap(db, start_processor):
    # Every 2 s, each run takes 5 s: two processors with idle workers to spare.
    processors = [start_processor("--numthreads", "2", "--import", "sample_recurring_slow", "--sleepintervalms", "200")
                  for _ in range(2)]
    wait_until(lambda: execution_count(db, "slow_recurring:end") >= 3, timeout=60, message="three runs")
    for processor in processors:
        assert processor.stop() == 0
    runs = executions_by_task(db, "slow_recurring")
    assert all(run["starts"] == 1 for run in runs.values()), runs  # no slot started twice
    assert_never_overlapping(runs, lambda task_id: recorded_end(db, task_id))
    slots = slots_of(db, "sample.slow_recurring")
    # A slot whose run could not start before the next slot was due is missed, not run late.
    missed = [slot for slot in slots if slot[1] == "missed"]
    assert missed and all("the next slot of its recurring schedule was due" in slot[4] for slot in missed)
    for task_id, state, slot, expires_at, _, started_at in slots:
        assert state in ("succeeded", "missed", "queued"), (task_id, state)
        assert started_at is None or slot <= started_at < expires_at  # started within its own slot


@pytest.mark.timeout(120)
def test_a_recurring_run_cut_short_by_its_supervisors_death_is_missed_and_never_run_again(db, start_processor):
    first = start_processor("--numthreads", "1", "--import", "sample_recurring_slow", "--rescue-after", "4")
    started = wait_until(lambda: executions_by_task(db, "slow_recurring"), timeout=30, message="a run started")
    [(task_id, run)] = started.items()
    second = start_processor("--numthreads", "1", "--import", "sample_recurring_slow", "--rescue-after", "4")
    second.wait_for_log("event=worker.started")
    os.kill(first.pid, signal.SIGKILL)  # the supervisor alone dies; its worker is orphaned
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.MISSED, timeout=15, message="run missed")
    [lost] = procqueue.get_task_runs(task_id)
    assert lost.outcome is RunOutcome.LOST and "is not run again" in lost.error
    # The next slots run on the live processor, each after the last ended.
    wait_until(lambda: any(r["end"] and r["pid"] != run["pid"] for r in executions_by_task(db, "slow_recurring").values()),
               timeout=30, message="a later slot run by the live processor")
    assert second.stop() == 0
    runs = executions_by_task(db, "slow_recurring")
    assert runs[task_id]["starts"] == 1 and runs[task_id]["end"] is None  # cut short, never run again
    assert [r.outcome for r in procqueue.get_task_runs(task_id)] == [RunOutcome.LOST]
    assert_never_overlapping(runs, lambda tid: recorded_end(db, tid))


def test_a_recurring_run_the_supervisor_killed_past_its_timeout_counts_as_a_failure(db):
    """The supervisor records a run it hard-killed (timed_out) in release_worker_tasks, not
    through complete: it counts on the schedule all the same; a run lost to a crash does not."""
    queries.register_recurring(db, name="r.hang", run_every=timedelta(minutes=1), first_run_at=None,
                               timeout_seconds=1)
    with db.cursor() as cur:
        cur.execute("UPDATE procqueue.recurring_tasks SET consecutive_failures = 3 WHERE task_name = 'r.hang'")

    def release_a_started_run(outcome):
        [run] = queries.schedule_recurring(db, ["r.hang"])
        [claimed] = queries.claim(db, processor="p", worker=0, limit=1)
        assert queries.start_run(db, processor="p", worker=0, task=claimed) is not None
        with db.cursor() as cur:  # the next slot due at once, for the next call
            cur.execute("UPDATE procqueue.recurring_tasks SET next_run_at = now() WHERE task_name = 'r.hang'")
        return queries.release_worker_tasks(db, processor="p", worker=0, in_flight=run.task_id, error="killed",
                                            outcome=outcome)

    [lost] = release_a_started_run(RunOutcome.LOST)
    assert (lost.state, lost.disabled_schedule_after) == (TaskState.FAILED, None)
    [killed] = release_a_started_run(RunOutcome.TIMED_OUT)
    assert (killed.state, killed.outcome, killed.disabled_schedule_after) == (TaskState.FAILED, RunOutcome.TIMED_OUT, 4)
    with db.cursor() as cur:
        cur.execute("SELECT consecutive_failures, disabled_at IS NOT NULL FROM procqueue.recurring_tasks")
        assert cur.fetchall() == [(4, True)]
    assert queries.schedule_recurring(db, ["r.hang"]) == []  # disabled: nothing enqueued


def test_a_killed_run_that_disables_its_schedule_ends_the_next_slot_queued_and_a_disabled_count_stays(db):
    """release_worker_tasks disables as complete does: the schedule's run already queued for
    the next slot ends missed (no run record), and a later killed run of the disabled
    schedule (one held when it was disabled) does not add to its count."""
    queries.register_recurring(db, name="r.hang", run_every=timedelta(minutes=1), first_run_at=None,
                               timeout_seconds=1)
    with db.cursor() as cur:
        cur.execute("UPDATE procqueue.recurring_tasks SET consecutive_failures = 3 WHERE task_name = 'r.hang'")

    def claim_and_start():
        [claimed] = queries.claim(db, processor="p", worker=0, limit=1)
        assert queries.start_run(db, processor="p", worker=0, task=claimed) is not None
        return claimed

    def next_slot_due():
        with db.cursor() as cur:
            cur.execute("UPDATE procqueue.recurring_tasks SET next_run_at = now() WHERE task_name = 'r.hang'")
        [run] = queries.schedule_recurring(db, ["r.hang"])
        return run.task_id

    next_slot_due()
    killed = claim_and_start()
    queued = next_slot_due()  # enqueued while the first run overran
    [released] = queries.release_worker_tasks(db, processor="p", worker=0, in_flight=killed.id, error="killed",
                                              outcome=RunOutcome.TIMED_OUT)
    assert released.disabled_schedule_after == 4
    task = procqueue.get_task(queued)
    assert task.state is TaskState.MISSED and "disabled (4 failures in a row)" in task.last_error
    assert procqueue.get_task_runs(queued) == []

    with db.cursor() as cur:  # a run of the same schedule, held by a worker when it was disabled
        cur.execute("UPDATE procqueue.tasks SET state = 'queued', finished_at = NULL, last_error = NULL "
                    "WHERE id = %s", (queued,))
    held = claim_and_start()
    [released] = queries.release_worker_tasks(db, processor="p", worker=0, in_flight=held.id, error="killed",
                                              outcome=RunOutcome.TIMED_OUT)
    assert released.disabled_schedule_after is None
    with db.cursor() as cur:
        cur.execute("SELECT consecutive_failures, disabled_at IS NOT NULL FROM procqueue.recurring_tasks")
        assert cur.fetchall() == [(4, True)]
