"""Tasks flow through real processors: each runs once, picked up at once, outcomes recorded in batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psycopg2
import pytest

import procqueue
from procqueue import TaskState

from helpers import REPO, execution_count, states, wait_until, worker_idle_after_empty_claim

import sample_tasks


@pytest.mark.timeout(120)
def test_ten_thousand_tasks_each_run_exactly_once(db, start_processor):
    script = (
        "import procqueue, sample_tasks\n"
        "calls = [sample_tasks.record_task.call(args=(f'k{n}',)) for n in range(10000)]\n"
        "for start in range(0, 10000, 1000):\n"
        "    procqueue.enqueue_many(calls[start:start + 1000])\n"
    )
    processor = start_processor("--numthreads", "2", "--queuepopsize", "50")
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{REPO}", DATABASE_URL=processor_database_url(db))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    wait_until(lambda: states(db) == {"succeeded": 10000}, timeout=90, interval=0.2,
               message="10,000 tasks succeeded")
    with db.cursor() as cur:
        cur.execute("SELECT count(DISTINCT key), count(*) FROM public.executions")
        assert cur.fetchone() == (10000, 10000)
        cur.execute("SELECT count(*) FROM procqueue.task_runs WHERE task_name = 'sample.record' AND outcome = 'succeeded'")
        assert cur.fetchone()[0] == 10000
    assert processor.stop() == 0


def processor_database_url(db):
    return procqueue.client.settings().database.url


def test_idle_processor_picks_up_a_new_task_at_once_via_notify(db, start_processor):
    # Polling every 60 s: only LISTEN/NOTIFY can explain a pickup within a second.
    processor = start_processor("--numthreads", "1", "--sleepintervalms", "60000")
    sample_tasks.record_task.delay(args=("first",))
    wait_until(lambda: execution_count(db, "first") == 1, timeout=15, message="first task")
    wait_until(lambda: worker_idle_after_empty_claim(db), timeout=5, message="worker idle")
    enqueued = time.monotonic()
    sample_tasks.record_task.delay(args=("notified",))
    wait_until(lambda: execution_count(db, "notified") == 1, timeout=5, interval=0.005, message="pickup")
    # The worker's next poll is 60 s away and its next recurring check up to 30 s: a
    # pickup this fast is the NOTIFY.
    assert time.monotonic() - enqueued < 0.5
    assert processor.stop() == 0


def test_failing_task_shows_its_traceback_in_run_history(db, start_processor):
    processor = start_processor("--numthreads", "1")
    task_id = sample_tasks.fail.delay(args=("card declined",))
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.FAILED, timeout=15, message="task failed")
    runs = procqueue.get_task_runs(task_id)
    assert [r.outcome.value for r in runs] == ["failed", "failed"]
    assert all("RuntimeError: card declined" in r.error and "Traceback" in r.error for r in runs)
    assert "event=task.failed" in processor.log() and f"task_id={task_id}" in processor.log()
    shown = subprocess.run([sys.executable, "-m", "procqueue", "show", str(task_id)], capture_output=True, text=True,
                           env=dict(os.environ, DATABASE_URL=processor_database_url(db), PYTHONPATH=str(REPO)))
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["task"]["state"] == "failed"
    assert "RuntimeError: card declined" in document["runs"][-1]["error"]
    assert processor.stop() == 0


def test_a_batch_records_its_finished_tasks_while_a_later_one_still_runs(db, start_processor):
    # Claimed in one batch: the quick task's outcome must not wait for the slow one, or a
    # worker killed during the slow task would have the quick one run again.
    quick_id, slow_id = procqueue.enqueue_many([sample_tasks.record_task.call(args=("quick",)),
                                                sample_tasks.sleep.call(args=(60,))])
    processor = start_processor("--numthreads", "1", "--queuepopsize", "10")
    pid = processor.wait_until_started(slow_id)
    wait_until(lambda: procqueue.get_task(quick_id).state is TaskState.SUCCEEDED, timeout=5,
               message="the quick task recorded while the slow one runs")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: [r.outcome.value for r in procqueue.get_task_runs(slow_id)] == ["lost"], timeout=15,
               message="the slow task's run recorded as lost")
    assert procqueue.get_task(quick_id).state is TaskState.SUCCEEDED
    assert [r.outcome.value for r in procqueue.get_task_runs(quick_id)] == ["succeeded"]
    assert execution_count(db, "quick") == 1


def test_a_batch_records_its_finished_tasks_on_a_new_connection_when_its_own_breaks_mid_task(db, start_processor):
    processor = start_processor("--numthreads", "1", "--queuepopsize", "10")
    ids = procqueue.enqueue_many([sample_tasks.record_task.call(args=(f"before the cut {n}",)) for n in range(3)]
                                 + [sample_tasks.cut_worker_connection_then_wedge.call()])
    wait_until(lambda: procqueue.get_task(ids[-1]).state is TaskState.FAILED, timeout=20, message="wedged one killed")
    assert execution_count(db, "unwritten before the cut: 3") == 1  # the cut came with all three unwritten
    for n, task_id in enumerate(ids[:3]):  # recorded before the kill: not run again
        wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=10, message=f"task {n}")
        assert execution_count(db, f"before the cut {n}") == 1
    assert 'event=worker.reconnected worker=0 by="flush thread"' in processor.log()
    assert processor.stop() == 0


def test_a_task_that_ends_while_its_batch_flush_is_stalled_is_not_charged_a_timeout(db, database_url,
                                                                                     start_processor):
    # The helper thread's flush waits on a lock held elsewhere; the slow task ends within
    # its 4 s timeout meanwhile and must show as ended, not run on to its deadline and be
    # killed as stuck when the lock is held past it.
    quick_id, slow_id = procqueue.enqueue_many([sample_tasks.record_task.call(args=("quick",)),
                                                sample_tasks.sleep_within_4s.call(args=(1.5,))])
    blocker = psycopg2.connect(database_url)
    try:
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE procqueue.task_runs IN SHARE MODE")  # blocks recording runs
        processor = start_processor("--numthreads", "1", "--queuepopsize", "10")
        processor.wait_until_started(slow_id)
        time.sleep(6)  # the outage itself: past the slow task's deadline and the 1 s margin
    finally:
        blocker.rollback()
        blocker.close()
    wait_until(lambda: procqueue.get_task(slow_id).state is TaskState.SUCCEEDED, timeout=15, message="recorded")
    assert [r.outcome.value for r in procqueue.get_task_runs(slow_id)] == ["succeeded"]
    assert "event=worker.stuck" not in processor.log()
    assert procqueue.get_task(quick_id).state is TaskState.SUCCEEDED
