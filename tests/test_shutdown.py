"""Stopping a processor: SIGTERM drains, a second signal or the shutdown timeout cuts it short, nothing is charged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


import procqueue
from procqueue import TaskState

from helpers import REPO, SESSION_ID, SESSION_MARKER, execution_count, wait_until

import sample_tasks


def test_sigterm_lets_the_running_task_finish_then_exits_zero(db, start_processor):
    processor = start_processor("--numthreads", "1")
    processor.wait_for_log("event=worker.started")
    task_id = sample_tasks.sleep_then_record.delay(args=(4, "drained"))
    processor.wait_until_started(task_id)
    assert processor.stop() == 0
    assert procqueue.get_task(task_id).state is TaskState.SUCCEEDED
    assert execution_count(db, "drained") == 1
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM procqueue.processors")
        assert cur.fetchone()[0] == 0  # deregistered on the way out


def test_sigterm_puts_claimed_but_unstarted_tasks_back_untouched(db, start_processor):
    processor = start_processor("--numthreads", "1", "--queuepopsize", "5")
    processor.wait_for_log("event=worker.started")
    ids = procqueue.enqueue_many([sample_tasks.sleep_then_record.call(args=(2, f"batch{n}")) for n in range(5)])
    processor.wait_until_started(ids[0])  # its batch claimed with it
    assert processor.stop() == 0
    tasks = [procqueue.get_task(task_id) for task_id in ids]
    finished = [t for t in tasks if t.state is TaskState.SUCCEEDED]
    waiting = [t for t in tasks if t.state is TaskState.QUEUED]
    assert len(finished) >= 1 and len(finished) + len(waiting) == 5
    assert all(t.attempts == 0 and t.locked_by is None for t in waiting)
    assert execution_count(db) == len(finished)


def test_shutdown_timeout_kills_an_overlong_task_and_requeues_it_without_charge(db, start_processor):
    processor = start_processor("--numthreads", "1", "--shutdown-timeout", "1")
    task_id = sample_tasks.sleep_then_record.delay(args=(60, "too long"))
    processor.wait_until_started(task_id)
    started = time.monotonic()
    assert processor.stop() == 0
    assert time.monotonic() - started < 5
    task = procqueue.get_task(task_id)
    assert task.state is TaskState.QUEUED and task.attempts == 0
    [run] = procqueue.get_task_runs(task_id)
    assert run.outcome.value == "lost" and "killed at shutdown" in run.error


def test_second_signal_stops_waiting_for_running_tasks(db, start_processor):
    processor = start_processor("--numthreads", "1", "--shutdown-timeout", "60")
    task_id = sample_tasks.sleep_then_record.delay(args=(60, "interrupted"))
    processor.wait_until_started(task_id)
    processor.proc.send_signal(signal.SIGTERM)
    processor.wait_for_log("event=processor.stopping")
    started = time.monotonic()
    processor.proc.send_signal(signal.SIGINT)
    assert processor.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert procqueue.get_task(task_id).state is TaskState.QUEUED


def test_an_embedded_supervisor_gives_back_what_it_took(db, database_url, tmp_path):
    status = tmp_path / "status.json"
    env = dict(os.environ, DATABASE_URL=database_url, PROCQUEUE_STATUS_FILE=str(status),
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]), **{SESSION_MARKER: SESSION_ID})
    program = subprocess.Popen([sys.executable, str(REPO / "tests" / "sample_embedding.py")], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: status.exists() and '"state": "running"' in status.read_text(), timeout=30,
                   message="embedded supervisor running")
        program.send_signal(signal.SIGTERM)
        out, err = program.communicate(timeout=30)
    finally:
        program.kill()
    assert program.returncode == 0, err
    assert json.loads(out) == {"exit_code": 0, "on_start_calls": 1, "on_stop_calls": 1, "handler_restored": True,
                               "left_open": {}}
