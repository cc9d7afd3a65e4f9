"""Recurring tasks: once per interval across every processor sharing the database."""

from __future__ import annotations

from datetime import datetime, time as time_of_day, timedelta, timezone

import pytest

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


def test_one_task_per_slot_and_missed_slots_collapse(db):
    queries.register_recurring(db, name="r.c", run_every=timedelta(minutes=1),
                               first_run_at=datetime.now(timezone.utc) - timedelta(minutes=10, seconds=30),
                               timeout_seconds=60)
    with db.cursor() as cur:  # as if no processor ran for ten minutes
        cur.execute("UPDATE procqueue.recurring_tasks SET next_run_at = first_run_at WHERE task_name = 'r.c'")
    first = queries.schedule_recurring(db, ["r.c"])
    again = queries.schedule_recurring(db, ["r.c"])
    assert len(first) == 1 and again == []
    next_run = schedule_row(db, "r.c")[2]
    assert datetime.now(timezone.utc) < next_run <= datetime.now(timezone.utc) + timedelta(minutes=1)
    with db.cursor() as cur:
        cur.execute("SELECT max_attempts, timeout_seconds FROM procqueue.tasks WHERE task_name = 'r.c'")
        assert cur.fetchall() == [(1, 60.0)]


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
