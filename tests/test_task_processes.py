"""What a task starts ends with it: a task that ends abnormally (its timeout, a hard kill,
its supervisor's death, the shutdown timeout) takes its processes with it, a child in a
session of its own and a daemon that is nobody's child included; and processes a task
leaves to exit are reaped, not left as zombies."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

import procqueue
from procqueue import TaskState

import sample_tasks
from helpers import wait_until


def started_processes(pid_dir: Path) -> list:
    """The child and the daemon a sample task started, once both pid files are written."""
    files = [pid_dir / "child.pid", pid_dir / "daemon.pid"]
    wait_until(lambda: all(f.exists() for f in files), timeout=15, message="the task's processes started")
    return [int(f.read_text()) for f in files]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_all_gone(pids: list, timeout: float = 5.0) -> None:
    wait_until(lambda: all(gone(pid) for pid in pids), timeout=timeout,
               message=lambda: f"processes still alive: {[pid for pid in pids if not gone(pid)]}")


@pytest.fixture
def pid_dir(tmp_path):
    """Where the task writes its processes' pids; any left alive are killed after the test."""
    yield tmp_path
    for pid_file in tmp_path.glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_a_task_interrupted_at_its_timeout_takes_its_processes_with_it(db, start_processor, pid_dir):
    processor = start_processor("--numthreads", "1")
    task_id = sample_tasks.spawn_and_overrun.delay(args=(str(pid_dir),))
    processes = started_processes(pid_dir)
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.FAILED, timeout=15, message="timed out")
    assert procqueue.get_task_runs(task_id)[0].outcome.value == "timed_out"
    assert_all_gone(processes)
    processor.wait_for_log("event=task.processes_stopped", timeout=5)  # logged once they are reaped
    # The worker itself carried on: it handled the timeout, nobody killed it.
    assert "event=worker.stuck" not in processor.log() and processor.log().count("event=worker.started") == 1
    assert processor.stop() == 0


def test_a_hung_task_is_killed_with_the_processes_it_started(db, start_processor, pid_dir):
    processor = start_processor("--numthreads", "1")
    task_id = sample_tasks.spawn_hanging_child.delay(args=(str(pid_dir),))
    processes = started_processes(pid_dir)
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.FAILED, timeout=20, message="killed")
    assert_all_gone(processes)
    assert procqueue.get_task_runs(task_id)[0].outcome.value == "timed_out"
    assert processor.stop() == 0


def test_the_shutdown_timeout_kills_a_task_with_its_processes(db, start_processor, pid_dir):
    processor = start_processor("--numthreads", "1", "--shutdown-timeout", "1")
    task_id = sample_tasks.spawn_and_wait.delay(args=(str(pid_dir), 60))
    processes = started_processes(pid_dir)
    processor.proc.send_signal(signal.SIGTERM)  # not stop(): its clean-up would kill them for us
    assert processor.proc.wait(timeout=30) == 0
    assert_all_gone(processes)
    task = procqueue.get_task(task_id)
    assert task.state is TaskState.QUEUED and task.attempts == 0  # put back uncharged, as documented


@pytest.mark.timeout(60)
def test_an_orphaned_worker_stops_its_task_with_its_processes(db, start_processor, pid_dir):
    processor = start_processor("--numthreads", "1", "--rescue-after", "4")
    task_id = sample_tasks.spawn_and_wait.delay(args=(str(pid_dir), 60))
    processes = started_processes(pid_dir)
    [worker] = psutil.Process(processor.pid).children()
    os.kill(processor.pid, signal.SIGKILL)
    assert_all_gone([worker.pid], timeout=10)  # interrupted at 1/4 of --rescue-after, then it leaves
    assert_all_gone(processes)
    assert [r.outcome.value for r in procqueue.get_task_runs(task_id)] == ["lost"]
    assert procqueue.get_task(task_id).state is TaskState.QUEUED


@pytest.mark.timeout(60)
def test_an_orphaned_worker_stuck_in_c_code_kills_its_tasks_processes_before_it_goes(db, start_processor, pid_dir):
    processor = start_processor("--numthreads", "1", "--rescue-after", "4")
    sample_tasks.spawn_then_sql_sleep.delay(args=(str(pid_dir), 60))
    processes = started_processes(pid_dir)
    [worker] = psutil.Process(processor.pid).children()
    try:
        os.kill(processor.pid, signal.SIGKILL)
        # The interrupt cannot reach pg_sleep; at half of --rescue-after the worker goes,
        # its task's processes killed just before.
        # (An exited worker is init's to reap now: a zombie counts as gone.)
        assert_all_gone([worker.pid], timeout=4 * 3 / 4)
        assert_all_gone(processes, timeout=1)
    finally:
        db.cursor().execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE query LIKE 'SELECT pg_sleep%%' AND pid <> pg_backend_pid()")


def test_a_worker_killed_from_outside_takes_its_tasks_processes_with_it(db, start_processor, pid_dir):
    processor = start_processor("--numthreads", "1", "--shutdown-timeout", "1")
    task_id = sample_tasks.child_in_group_then_wait.delay(args=(str(pid_dir),))
    wait_until(lambda: (pid_dir / "child.pid").exists(), timeout=15, message="the task's child started")
    child = int((pid_dir / "child.pid").read_text())
    [worker] = psutil.Process(processor.pid).children()
    os.kill(worker.pid, signal.SIGKILL)  # the OOM killer, an operator: nobody asks the worker
    assert_all_gone([child])  # its process group, killed as the supervisor reaps it
    wait_until(lambda: procqueue.get_task_runs(task_id), timeout=10, message="its run recorded")
    assert procqueue.get_task_runs(task_id)[0].outcome.value == "lost"
    assert processor.stop() == 0


def test_processes_a_task_leaves_to_exit_are_reaped(db, start_processor):
    # Before: 50 zombies per such task, 200 after four, until the worker exited.
    processor = start_processor("--numthreads", "1")
    task_ids = [sample_tasks.fork_and_return.delay(args=(50,)) for _ in range(4)]
    task_ids.append(sample_tasks.fork_tree_and_return.delay(args=(20,)))  # orphaned grandchildren too
    wait_until(lambda: all(procqueue.get_task(task_id).state is TaskState.SUCCEEDED for task_id in task_ids),
               timeout=30, message="done")
    [worker] = psutil.Process(processor.pid).children()

    def zombies():
        return [child for child in worker.children() if child.status() == psutil.STATUS_ZOMBIE]

    # Reaped between tasks, and by an idle worker at each heartbeat (within a second).
    wait_until(lambda: not worker.children(), timeout=5,
               message=lambda: f"{len(zombies())} zombies and {len(worker.children())} processes under the worker")
    assert processor.stop() == 0


@pytest.mark.parametrize("how", ["descriptors", "stream"])
def test_a_worker_whose_task_closed_its_output_is_replaced_and_logs_again(db, start_processor, how):
    # Before: the worker ran on, every later log line of it silently lost.
    processor = start_processor("--numthreads", "1")
    processor.wait_for_log("event=worker.started")
    first = processor.wait_for_status(lambda d: d["workers"][0]["state"] == "idle")["workers"][0]["pid"]
    sample_tasks.close_output.delay(args=(how,))
    processor.wait_for_log("event=worker.output_lost")
    processor.wait_for_status(lambda d: d["workers"][0]["pid"] not in (None, first)
                              and d["workers"][0]["state"] == "idle")
    task_id = sample_tasks.fail.delay(args=("heard again",))
    processor.wait_for_log(f"task_id={task_id}")  # the new worker's lines reach the log
    assert processor.status()["totals"]["restarts"]["recycled"] == 1
    assert processor.stop() == 0


def test_a_file_a_task_opened_under_stderrs_number_gets_none_of_the_workers_lines(db, start_processor, tmp_path):
    # A task closes fd 2 and opens a file, which gets number 2: the worker's next lines
    # (this task's outcome, the next task's) would have been written into that file.
    processor = start_processor("--numthreads", "1", "--queuepopsize", "2")
    victim = tmp_path / "the-tasks-own-file"
    first = sample_tasks.close_output.delay(args=(str(victim),))
    second = sample_tasks.fail.delay(args=("logged after it",))  # claimed in the same batch
    wait_until(lambda: procqueue.get_task_runs(second), timeout=15, message="the batch's second task ran")
    processor.wait_for_log("event=worker.output_lost")
    assert victim.read_bytes() == b""
    assert procqueue.get_task(first).state is TaskState.SUCCEEDED
    assert processor.stop() == 0


@pytest.mark.parametrize("code", [0, 4, 5])
def test_a_task_ending_its_worker_with_a_workers_own_exit_code_is_a_crash(db, start_processor, pid_dir, code):
    # Before: os._exit(4) in a task read as the worker recycling itself (os._exit(5) as
    # its output lost), and the task's processes were left running.
    processor = start_processor("--numthreads", "1")
    task_id = sample_tasks.child_then_exit.delay(args=(str(pid_dir), code))
    wait_until(lambda: (pid_dir / "child.pid").exists(), timeout=15, message="the task's child started")
    assert_all_gone([int((pid_dir / "child.pid").read_text())])
    processor.wait_for_log("event=worker.died")
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.FAILED, timeout=15, message="failed")
    assert "event=worker.recycled" not in processor.log() and "event=worker.output_lost" not in processor.log()
    # The status document follows the log line within a supervisor tick.
    processor.wait_for_status(lambda d: d["totals"]["restarts"] == {"stuck": 0, "crashed": 1, "recycled": 0})
    assert processor.stop() == 0
