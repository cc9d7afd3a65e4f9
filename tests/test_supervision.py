"""The supervisor and its workers: stuck, killed, orphaned, recycled and replaced workers, tasks retried."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

import procqueue
from procqueue import TaskState

from helpers import execution_count, states, wait_until, worker_idle_after_empty_claim

import sample_tasks


def test_worker_killed_mid_task_is_replaced_and_its_task_retried(db, start_processor):
    processor = start_processor("--numthreads", "1")
    task_id = sample_tasks.sleep_then_record.delay(args=(5, "survivor"))
    processor.wait_until_started(task_id)
    [worker] = psutil.Process(processor.pid).children()
    os.kill(worker.pid, signal.SIGKILL)
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=30, message="retried")
    runs = procqueue.get_task_runs(task_id)
    assert [r.outcome.value for r in runs] == ["lost", "succeeded"]
    assert "worker 0 killed by signal 9" in runs[0].error
    assert execution_count(db, "survivor") == 1
    assert "event=worker.died" in processor.log()
    assert processor.stop() == 0


def test_a_worker_whose_overdue_task_ends_before_the_kill_is_spared_with_its_next_task(db, start_processor):
    # The supervisor judges the first task stuck and signals for a stack dump, which
    # ends that task; by the time SIGKILL is due the worker runs the next task of its
    # batch, which did nothing wrong and must not be killed or charged.
    overrun_id, next_id = procqueue.enqueue_many([sample_tasks.overrun_until_dumped.call(),
                                                  sample_tasks.sleep_then_record.call(args=(2, "next"))])
    processor = start_processor("--numthreads", "1", "--queuepopsize", "10")
    wait_until(lambda: procqueue.get_task(next_id).state is TaskState.SUCCEEDED, timeout=30, message="next task done")
    assert [r.outcome.value for r in procqueue.get_task_runs(next_id)] == ["succeeded"]
    assert procqueue.get_task(overrun_id).state is TaskState.FAILED
    assert [r.outcome.value for r in procqueue.get_task_runs(overrun_id)] == ["timed_out"]
    log = processor.log()
    assert "event=worker.stuck" in log and "event=worker.recovered" in log and "event=worker.died" not in log
    assert execution_count(db, "next") == 1
    assert processor.stop() == 0


def test_task_the_worker_cannot_interrupt_is_killed_by_the_supervisor(db, start_processor):
    processor = start_processor("--numthreads", "1")
    task_id = sample_tasks.wedged.delay()
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.FAILED, timeout=20, message="killed")
    [run] = procqueue.get_task_runs(task_id)
    assert run.outcome.value == "timed_out"
    assert "past its timeout; worker killed" in run.error
    assert (run.finished_at - run.started_at).total_seconds() < 4  # timeout 1 s + margin + a tick
    assert "event=worker.stuck" in processor.log() and "task=sample.wedged" in processor.log()
    # The worker's Python stack, dumped before the kill, shows where it hung.
    assert "most recent call first" in processor.log() and 'in wedged' in processor.log()
    sample_tasks.record_task.delay(args=("after",))  # the slot was refilled and works
    wait_until(lambda: execution_count(db, "after") == 1, timeout=15, message="replacement worker")
    assert processor.stop() == 0


def test_processor_whose_workers_cannot_start_exits_nonzero(db, start_processor):
    processor = start_processor("--numthreads", "3", "--import", "sample_broken_worker")
    assert processor.proc.wait(timeout=60) == 1
    assert "event=processor.workers_cannot_start" in processor.log()


def test_workers_do_not_outlive_a_killed_supervisor(db, start_processor):
    processor = start_processor("--numthreads", "2", "--queuepopsize", "1")
    task_id = sample_tasks.sleep_then_record.delay(args=(4, "orphaned"))
    processor.wait_until_started(task_id)
    workers = psutil.Process(processor.pid).children()
    assert len(workers) == 2
    os.kill(processor.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []
    task = procqueue.get_task(task_id)  # the worker finished its task and recorded it on the way out
    assert task.state is TaskState.SUCCEEDED and execution_count(db, "orphaned") == 1


@pytest.mark.timeout(90)
def test_a_task_outliving_its_supervisor_is_never_run_twice_at_once(db, start_processor):
    # The supervisor alone dies (the OOM killer, kill -9 of its pid): its worker must be
    # done with the task before a peer, seeing the heartbeat stop, rescues and reruns it.
    first = start_processor("--numthreads", "1", "--rescue-after", "4")
    task_id = sample_tasks.long.delay(args=(30, "span"))
    first.wait_until_started(task_id)
    second = start_processor("--numthreads", "1", "--rescue-after", "4", "--shutdown-timeout", "1")
    second.wait_for_log("event=worker.started")
    os.kill(first.pid, signal.SIGKILL)
    wait_until(lambda: execution_count(db, "span:start") == 2, timeout=30, message="run again")
    runs = procqueue.get_task_runs(task_id)
    assert runs[0].outcome.value == "lost" and "the supervisor died" in runs[0].error
    with db.cursor() as cur:
        cur.execute("SELECT at FROM public.executions WHERE key = 'span:start' ORDER BY at")
        _, second_start = [row[0] for row in cur.fetchall()]
    assert runs[0].finished_at <= second_start  # the first copy was over before the second began
    task = procqueue.get_task(task_id)
    assert task.attempts == 1 and task.state is TaskState.RUNNING  # the interrupted run cost no attempt
    assert second.stop() == 0


def test_a_worker_waiting_in_c_code_is_gone_before_peers_could_rescue_its_task(db, start_processor):
    # pg_sleep keeps the worker inside libpq, where the kernel's death signal cannot reach
    # Python: the lifeline pipe must, or the task would run on next to its rescued copy.
    rescue_after = 8
    processor = start_processor("--numthreads", "1", "--rescue-after", str(rescue_after))
    task_id = sample_tasks.sql_sleep.delay(args=(60, "in-libpq"))
    processor.wait_until_started(task_id)
    wait_until(lambda: execution_count(db, "in-libpq:start") == 1, timeout=10, message="inside pg_sleep")
    [worker] = psutil.Process(processor.pid).children()
    try:
        os.kill(processor.pid, signal.SIGKILL)
        # Peers rescue from 3/4 of --rescue-after after the supervisor's last heartbeat.
        gone, alive = psutil.wait_procs([worker], timeout=rescue_after * 3 / 4)
        assert alive == [], "the orphaned worker outlived the point where its task is rescued"
        log = processor.log()
        assert "event=worker.orphaned" in log
        assert "in sql_sleep" in log  # faulthandler's dump on the way out says where it was
    finally:
        db.cursor().execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE query LIKE 'SELECT pg_sleep%%' AND pid <> pg_backend_pid()")


@pytest.mark.timeout(60)
def test_a_task_killed_past_its_timeout_is_retried_in_a_new_worker(db, start_processor):
    processor = start_processor("--numthreads", "1")
    task_id = sample_tasks.wedged_once.delay(args=("wedged once",))
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=30, message="retried")
    runs = procqueue.get_task_runs(task_id)
    assert [r.outcome.value for r in runs] == ["timed_out", "succeeded"]
    assert "past its timeout; worker killed" in runs[0].error
    assert execution_count(db, "wedged once") == 2
    assert "event=worker.stuck" in processor.log()
    assert "event=task.timed_out" in processor.log() and "event=task.lost" not in processor.log()
    assert processor.stop() == 0


def test_a_busy_looping_task_is_interrupted_at_its_timeout(db, start_processor):
    processor = start_processor("--numthreads", "1")
    task_id = sample_tasks.busy_loop.delay()
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.FAILED, timeout=20, message="interrupted")
    [run] = procqueue.get_task_runs(task_id)
    assert run.outcome.value == "timed_out" and "TaskTimeoutError" in run.error
    assert "event=worker.stuck" not in processor.log()  # the worker handled it itself
    assert processor.stop() == 0


@pytest.mark.timeout(120)
def test_workers_replaced_hundreds_of_times_while_tasks_flow(db, start_processor):
    # Every task ends its worker's life: 300 forks under load, none may hang or lose work.
    processor = start_processor("--numthreads", "2", "--queuepopsize", "1", "--max-tasks-per-worker", "1",
                                "--log-level", "warning")
    procqueue.enqueue_many([sample_tasks.record_task.call(args=(f"fork{n}",)) for n in range(300)])
    wait_until(lambda: execution_count(db) >= 300, timeout=100, interval=0.2, message="300 tasks")
    assert execution_count(db) == 300
    with db.cursor() as cur:
        cur.execute("SELECT count(DISTINCT key), count(DISTINCT pid) FROM public.executions")
        distinct_keys, distinct_pids = cur.fetchone()
    assert distinct_keys == 300 and distinct_pids == 300  # each ran once, each in a fresh worker
    assert processor.stop() == 0


def test_worker_is_recycled_after_max_tasks(db, start_processor):
    processor = start_processor("--numthreads", "1", "--max-tasks-per-worker", "3")
    procqueue.enqueue_many([sample_tasks.record_task.call(args=(f"r{n}",)) for n in range(7)])
    wait_until(lambda: execution_count(db) == 7, timeout=20, message="7 tasks")
    with db.cursor() as cur:
        cur.execute("SELECT pid, count(*) FROM public.executions GROUP BY pid ORDER BY min(at)")
        assert [count for _, count in cur.fetchall()] == [3, 3, 1]
    assert processor.log().count("event=worker.recycled") >= 2
    assert "event=worker.died" not in processor.log()
    assert processor.stop() == 0


def test_worker_is_recycled_after_max_memory(db, start_processor):
    processor = start_processor("--numthreads", "1", "--max-memory-per-worker", "150")
    procqueue.enqueue_many([sample_tasks.grow.call(args=(60, f"m{n}")) for n in range(4)])
    wait_until(lambda: execution_count(db) == 4, timeout=20, message="4 tasks")
    with db.cursor() as cur:
        cur.execute("SELECT count(DISTINCT pid) FROM public.executions")
        assert cur.fetchone()[0] >= 2  # the hoard outgrew 150 MB and its worker was replaced
    assert "--max-memory-per-worker 150" in processor.log()
    assert processor.stop() == 0


def test_a_c_call_holding_the_gil_is_caught_by_the_supervisor(db, start_processor):
    processor = start_processor("--numthreads", "1")
    task_id = sample_tasks.c_call_holding_gil.delay()
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.FAILED, timeout=20, message="killed")
    [run] = procqueue.get_task_runs(task_id)
    assert run.outcome.value == "timed_out" and "past its timeout; worker killed" in run.error
    assert "in c_call_holding_gil" in processor.log()  # faulthandler's dump, despite the held GIL
    assert processor.stop() == 0


def test_a_frozen_idle_worker_is_replaced_after_the_grace_period(db, start_processor):
    processor = start_processor("--numthreads", "1", "--graceperiodms", "1500")
    # Idle, not busy: a busy worker is judged by its task's timeout, not the grace period
    # (and at start it runs the built-in clean-up task).
    wait_until(lambda: states(db, "procqueue.clean_up_old_tasks") == {"succeeded": 1}, timeout=15,
               message="start-up clean-up done")
    wait_until(lambda: worker_idle_after_empty_claim(db), timeout=15, message="worker idle")
    [worker] = psutil.Process(processor.pid).children()
    os.kill(worker.pid, signal.SIGSTOP)  # alive, but its loop makes no progress: no beats
    frozen = time.monotonic()
    processor.wait_for_log("event=worker.started", count=2, timeout=10)
    assert time.monotonic() - frozen < 1.5 + 1.5  # grace period, a tick, the kill's grace, a fork
    assert "no heartbeat for" in processor.log()
    sample_tasks.record_task.delay(args=("after freeze",))
    wait_until(lambda: execution_count(db, "after freeze") == 1, timeout=10, message="replacement works")
    assert processor.stop() == 0
