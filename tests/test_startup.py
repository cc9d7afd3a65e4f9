"""Starting while the database cannot be reached: wait for it (alive, not ready), within
--database-wait; give up at once on what waiting cannot cure; stop on a signal."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import procqueue
from procqueue import TaskState

import sample_tasks
from helpers import REPO, ProcessorProcess, http_get, wait_until
from proxy import CuttableProxy

UNREACHABLE = "postgresql://app:s3cret@127.0.0.1:1/nowhere"


def health(processor, *args):
    return subprocess.run([sys.executable, "-c", "from procqueue.health_probe import main; main()",
                           "--status-file", str(processor.status_path), *args], capture_output=True, text=True, timeout=30)


def run_processor(*args, timeout=60):
    return subprocess.run([sys.executable, str(REPO / "bin" / "run-task-processor"), "--numthreads", "1", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(90)
def test_a_processor_waits_for_a_database_that_cannot_be_reached_then_runs(db, database_url, tmp_path):
    proxy = CuttableProxy(database_url)
    proxy.cut()  # the database is down (a fail-over, a maintenance window)
    processor = ProcessorProcess(proxy.url, ["--import", "sample_tasks", "--numthreads", "1", "--metrics-port", "0",
                                             "--metrics-host", "127.0.0.1"], tmp_path / "processor.log")
    try:
        document = processor.wait_for_status(lambda d: d["state"] == "waiting_for_database", message="waiting")
        assert document["database_up"] is False
        processor.wait_for_log("event=database.waiting", count=2)  # once per try, with backoff
        alive, ready = health(processor), health(processor, "--ready")
        assert alive.returncode == 0 and "healthy: waiting for the database" in alive.stdout
        assert ready.returncode == 1 and "not ready: waiting for the database" in ready.stderr
        port = processor.metrics_port()
        assert http_get(port, "/healthz")[0] == 200 and http_get(port, "/readyz")[0] == 503
        proxy.restore()
        processor.wait_for_log("event=worker.started", timeout=30)
        task_id = sample_tasks.record_task.delay(args=("after the wait",))
        wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=15, message="ran")
        wait_until(lambda: health(processor, "--ready").returncode == 0, timeout=10, message="ready")
        assert http_get(port, "/readyz")[0] == 200
        assert "Traceback" not in processor.log()
        assert processor.stop() == 0
    finally:
        processor.kill()
        proxy.close()


def test_the_wait_for_the_database_gives_up_after_database_wait():
    began = time.monotonic()
    result = run_processor("--database-url", UNREACHABLE, "--database-wait", "2")
    assert result.returncode == 3
    assert 2 <= time.monotonic() - began < 15
    errors = [line for line in result.stderr.splitlines() if line.startswith("run-task-processor: error:")]
    assert errors == ["run-task-processor: error: cannot connect to host=127.0.0.1 port=1 dbname=nowhere user=app "
                      "password=***: " + errors[0].split("password=***: ", 1)[1]]
    assert errors[0].endswith("(gave up after --database-wait 2s)")
    assert "event=database.waiting" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_a_database_that_does_not_exist_is_not_waited_for(database_url):
    from databases import with_database

    began = time.monotonic()
    result = run_processor("--database-url", with_database(database_url, "no_such_database_here"))
    assert result.returncode == 3  # at once, although --database-wait is ten minutes
    assert time.monotonic() - began < 20
    assert 'database "no_such_database_here" does not exist' in result.stderr
    assert "event=database.waiting" not in result.stderr


def test_a_stop_signal_ends_the_wait_for_the_database(tmp_path):
    processor = ProcessorProcess(UNREACHABLE, ["--numthreads", "1"], tmp_path / "processor.log")
    try:
        processor.wait_for_log("event=database.waiting")
        stopped = time.monotonic()
        assert processor.stop(timeout=15) == 0
        assert time.monotonic() - stopped < 3
        assert json.loads(processor.status_path.read_text())["state"] == "stopped"
    finally:
        processor.kill()


def test_a_stop_signal_while_task_modules_import_stops_the_processor_cleanly(tmp_path, database_url):
    mark = tmp_path / "importing"
    processor = ProcessorProcess(database_url, ["--numthreads", "1", "--import", "sample_slow_import"],
                                 tmp_path / "processor.log", extra_env={"SAMPLE_SLOW_IMPORT_MARK": str(mark)})
    try:
        wait_until(mark.exists, timeout=15, message="the slow import under way")  # a pod deleted as it starts
        stopped = time.monotonic()
        assert processor.stop(timeout=15) == 0
        assert time.monotonic() - stopped < 3
        assert "event=processor.stopped" in processor.log() and "stopped while starting" in processor.log()
        assert "Traceback" not in processor.log()
    finally:
        processor.kill()


def test_starting_handlers_raise_once_leave_ignored_signals_alone_and_give_back_what_they_replaced():
    import os
    import signal as signals

    from procqueue.starting import StartingSignals, StoppedWhileStarting

    saved = {signum: signals.getsignal(signum) for signum in (signals.SIGTERM, signals.SIGHUP)}
    signals.signal(signals.SIGHUP, signals.SIG_IGN)  # as under nohup
    starting = StartingSignals()
    try:
        starting.arm()
        assert signals.getsignal(signals.SIGHUP) is signals.SIG_IGN  # still ignored
        with pytest.raises(StoppedWhileStarting):
            os.kill(os.getpid(), signals.SIGTERM)
            time.sleep(1)  # the handler runs as soon as the interpreter looks: well before this ends
        os.kill(os.getpid(), signals.SIGTERM)  # a second one, as the first unwinds: nothing more
        starting.restore()
        assert signals.getsignal(signals.SIGTERM) == saved[signals.SIGTERM]
    finally:
        starting.restore()
        for signum, handler in saved.items():
            signals.signal(signum, handler)


def test_a_stop_signal_whose_exception_c_code_swallowed_still_stops_the_start():
    # psycopg2's import, run as the signal lands, swallows the exception the handler
    # raises: a processor went on to run for good, deaf to the SIGTERM it was sent.
    import signal as signals

    from procqueue.starting import StartingSignals, StoppedWhileStarting

    starting = StartingSignals()
    try:
        starting.arm()
        try:
            starting.handle(signals.SIGTERM, None)  # as the handler runs inside C code...
        except StoppedWhileStarting:
            pass  # ...which drops what it raised
        with pytest.raises(StoppedWhileStarting):
            starting.over()  # the supervisor's handlers are in: it stops now
    finally:
        starting.restore()


def test_whatever_error_a_stop_signal_turned_into_during_the_start_counts_as_the_stop():
    # Raised inside an import, the handler's exception can come out as a RuntimeError
    # (a class body's __set_name__ wraps it) or as an AttributeError on a half-imported
    # psycopg2.errors: both exited 1 with a traceback (seen about once in 150 starts).
    import signal as signals

    from procqueue import starting as starting_module

    starting = starting_module.arm()
    try:
        assert not starting_module.stopped_while_starting(RuntimeError("a bug of ours"))
        try:
            starting.handle(signals.SIGTERM, None)
        except starting_module.StoppedWhileStarting:
            pass
        assert starting_module.stopped_while_starting(RuntimeError("Error calling __set_name__"))
        assert starting_module.stopped_while_starting(AttributeError("UndefinedTable"))
    finally:
        starting.restore()
    assert not starting_module.stopped_while_starting(RuntimeError("a bug of ours"))


@pytest.mark.timeout(120)
def test_a_stop_signal_at_any_moment_of_the_start_ends_the_processor(tmp_path):
    # Before Python runs procqueue's first line the signal's default applies (-15); from
    # then on it is exit 0, however deep in an import (C code included) it lands.
    import os
    import signal as signals

    outcomes = {}
    for delay_ms in range(20, 320, 20):
        process = subprocess.Popen([sys.executable, str(REPO / "bin" / "run-task-processor"), "--numthreads", "1",
                                    "--database-url", UNREACHABLE, "--database-wait", "30"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=dict(os.environ, PROCQUEUE_STATUS_FILE=str(tmp_path / f"{delay_ms}.json")))
        time.sleep(delay_ms / 1000)  # the moment under test, not synchronisation
        process.send_signal(signals.SIGTERM)
        try:
            outcomes[delay_ms] = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            outcomes[delay_ms] = "still running"
    assert all(code in (0, -signals.SIGTERM) for code in outcomes.values()), outcomes
    assert outcomes[300] == 0, outcomes
