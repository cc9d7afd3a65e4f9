"""The health verdict and `procqueue-health`, on status documents written to real files.

The documents here are built by hand so that every rule can be shown on its own; the
processor's own documents are judged in test_observability.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from procqueue.health import check_file, judge

from helpers import REPO

NOW = 1_800_000_000.0


def worker(slot, *, state="idle", heartbeat_age=0.2, task=None, pid=None):
    return {"slot": slot, "pid": pid if pid is not None else 1000 + slot, "state": state,
            "heartbeat_age_seconds": heartbeat_age, "task": task, "tasks_done": 0, "tasks_failed": 0,
            "restarts": 0, "rss_bytes": None, "stuck": None}


def document(*workers, state="running", age=0.5, grace_ms=20000, version=1):
    return {"version": version, "pid": 42, "state": state, "updated_at": "then", "updated_at_unix": NOW - age,
            "config": {"graceperiodms": grace_ms}, "workers": list(workers) or [worker(0), worker(1)]}


def verdict_of(doc, max_age=30, min_healthy=1):
    return judge(doc, now=NOW, max_age=max_age, min_healthy_workers=min_healthy)


def test_fresh_document_with_working_workers_is_healthy():
    verdict = verdict_of(document())
    assert verdict.healthy and verdict.reasons == [] and verdict.workers_healthy == 2


def test_stale_document_means_the_supervisor_is_not_running_its_loop():
    verdict = verdict_of(document(age=45))
    assert not verdict.healthy
    assert verdict.reasons == ["status is 45.0s old (max 30s): the supervisor (pid 42) is not updating it"]


def test_stopped_processor_is_unhealthy_even_with_a_fresh_file():
    verdict = verdict_of(document(state="stopped", age=0.1))
    assert not verdict.healthy and "processor stopped" in verdict.reasons[0]


def test_draining_processor_is_healthy():
    # Killing a pod that is draining would cut its running tasks short.
    assert verdict_of(document(worker(0, state="stopping", heartbeat_age=60), state="stopping")).healthy


def test_idle_worker_silent_past_the_grace_period_is_stuck():
    verdict = verdict_of(document(worker(0, heartbeat_age=21), worker(1), grace_ms=20000, age=0))
    assert not verdict.healthy
    assert verdict.reasons == ["worker 0 (pid 1000) is stuck: no heartbeat for 21.0s (grace period 20s)"]


def test_silence_keeps_growing_after_the_document_was_written():
    # Beat 15 s before a document that is itself 6 s old: 21 s of silence by now.
    verdict = verdict_of(document(worker(0, heartbeat_age=15), age=6, grace_ms=20000))
    assert not verdict.healthy and "no heartbeat for 21.0s" in verdict.reasons[0]


def test_busy_worker_is_judged_by_its_task_deadline_not_its_heartbeat():
    running_long = {"id": 7, "name": "app.report", "running_seconds": 50, "timeout_seconds": 60}
    assert verdict_of(document(worker(0, state="busy", heartbeat_age=50, task=running_long), grace_ms=1000)).healthy
    overdue = dict(running_long, running_seconds=61.5)
    verdict = verdict_of(document(worker(0, state="busy", heartbeat_age=61.5, task=overdue), age=0))
    assert not verdict.healthy and "task 7 ran 1.5s past its timeout" in verdict.reasons[0]


def test_too_few_running_workers_is_unhealthy():
    stuck = worker(1, heartbeat_age=25)
    assert verdict_of(document(worker(0), stuck), min_healthy=1).reasons[0].startswith("worker 1 (pid 1001) is stuck")
    verdict = verdict_of(document(worker(0), worker(1), worker(2)), min_healthy=4)
    assert not verdict.healthy and verdict.reasons == ["3 of 3 workers healthy (at least 4 required)"]


def test_a_slot_being_refilled_counts_as_healthy():
    # Between a worker's exit and its replacement (restart backoff: up to 30 s), a probe
    # of a processor with one worker must not fail: the supervisor is doing its job.
    replacing = worker(1, pid=0, state="empty", heartbeat_age=None)
    replacing["vacant_seconds"] = 25.0
    verdict = verdict_of(document(worker(0), replacing), min_healthy=2)
    assert verdict.healthy and (verdict.workers_healthy, verdict.workers_replacing) == (1, 1)
    verdict = verdict_of(document(worker(0), replacing), min_healthy=3)
    assert verdict.reasons == ["1 of 2 workers healthy, 1 being replaced (at least 3 required)"]


def test_a_slot_left_empty_is_unhealthy_unless_the_database_is_down():
    neglected = worker(1, pid=0, state="empty", heartbeat_age=None)
    neglected["vacant_seconds"] = 59.0
    doc = document(worker(0), neglected, age=2)  # empty for 61 s by now
    assert verdict_of(doc).reasons == ["slot 1 has had no worker for 61.0s (the supervisor refills a slot within 60s)"]
    # With the database down, a slot waits for its last worker's tasks to be released.
    doc["database_up"] = False
    assert verdict_of(doc).healthy


def test_a_slot_whose_workers_keep_dying_while_starting_is_unhealthy():
    # Starting and empty in turn looks like a replacement each time; the count says not.
    crashing = worker(1, state="starting", heartbeat_age=0.1)
    crashing["failed_starts"] = 4
    assert verdict_of(document(worker(0), crashing)).healthy
    crashing["failed_starts"] = 5
    doc = document(worker(0), crashing)
    assert verdict_of(doc).reasons == ["slot 1: its last 5 workers died while starting (see worker.died in the log)"]
    # Workers killed while waiting for a database that does not answer: not the pod's fault.
    doc["database_up"] = False
    assert verdict_of(doc).healthy


def test_a_document_of_another_version_is_not_guessed_at():
    verdict = verdict_of(document(version=2))
    assert not verdict.healthy and "unsupported status document version 2" in verdict.reasons[0]


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    ("{\"version\": 1, \"state\": \"runn", "is not valid JSON"),
    ("[1, 2]", "is not a procqueue status document"),
    (b"\xff\xfe", "is not text"),
    ('{"version": 1, "updated_at_unix": "x"}', "is not a procqueue status document"),
    ('{"version": 1, "workers": [1]}', "is not a procqueue status document"),
    ('{"version": 1, "workers": [{"slot": 0, "failed_starts": "many"}]}', "is not a procqueue status document"),
    ('{"version": 1, "workers": [{"slot": 0, "task": {"running_seconds": "x"}}]}', "is not a procqueue status document"),
    ('{"version": 1, "config": {"graceperiodms": "soon"}}', "is not a procqueue status document"),
])
def test_missing_or_corrupt_file_is_unhealthy_with_the_reason(tmp_path, content, expected):
    path = tmp_path / "status.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    verdict = check_file(path, max_age=30, min_healthy_workers=1)
    assert not verdict.healthy and expected in verdict.reasons[0] and str(path) in verdict.reasons[0]


# -- the command ---------------------------------------------------------------------


def run_health(*args, command=("procqueue-health",)):
    entry = {"procqueue-health": "from procqueue.health_probe import main; main()",
             "procqueue": "from procqueue.entry_points import procqueue_main; procqueue_main()"}[command[0]]
    return subprocess.run([sys.executable, "-c", entry, *command[1:], *args], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, PYTHONPATH=str(REPO)))


def write_document(path, doc):
    path.write_text(json.dumps(doc))
    return path


def live_document(**overrides):
    doc = document(**overrides)
    doc["updated_at_unix"] = time.time() - overrides.get("age", 0.5)
    return doc


def test_healthy_exits_zero_with_a_summary(tmp_path):
    path = write_document(tmp_path / "s.json", live_document())
    result = run_health("--status-file", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("healthy: 2 of 2 workers") and result.stderr == ""


def test_unhealthy_exits_one_with_one_line_on_stderr(tmp_path):
    path = write_document(tmp_path / "s.json", live_document(age=100))
    result = run_health("--status-file", str(path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "procqueue-health: unhealthy: status is 100" in result.stderr


def test_missing_file_exits_one(tmp_path):
    result = run_health("--status-file", str(tmp_path / "none.json"))
    assert result.returncode == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_json_prints_the_verdict_and_its_reasons(tmp_path):
    path = write_document(tmp_path / "s.json", live_document(grace_ms=1000, age=0.1))
    doc = json.loads(path.read_text())
    doc["workers"][0]["heartbeat_age_seconds"] = 5
    write_document(path, doc)
    result = run_health("--status-file", str(path), "--json")
    assert result.returncode == 1
    verdict = json.loads(result.stdout)
    assert verdict["healthy"] is False and verdict["status_file"] == str(path)
    assert verdict["workers_healthy"] == 1 and "worker 0 (pid 1000) is stuck" in verdict["reasons"][0]


def test_status_file_comes_from_the_environment_like_the_processor(tmp_path):
    path = write_document(tmp_path / "from-env.json", live_document())
    result = subprocess.run([sys.executable, "-c", "from procqueue.health_probe import main; main()"], capture_output=True,
                            text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(REPO),
                                                            PROCQUEUE_STATUS_FILE=str(path)))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, expected", [
    (["--max-age", "soon"], "argument --max-age: invalid value 'soon' (expected seconds > 0)"),
    (["--max-age", "0"], "invalid value '0' (expected seconds > 0)"),
    (["--min-healthy-workers", "-1"], "invalid value '-1' (expected an integer >= 0)"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_usage_errors_exit_two_in_one_line(args, expected):
    result = run_health(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and expected in result.stderr and "Traceback" not in result.stderr


def test_procqueue_health_is_the_same_command(tmp_path):
    path = write_document(tmp_path / "s.json", live_document(age=100, grace_ms=1_000_000))
    result = run_health("--status-file", str(path), "--max-age", "200", command=("procqueue", "health"))
    assert result.returncode == 0, result.stderr
    result = run_health("--max-age", "x", command=("procqueue", "health"))
    assert result.returncode == 2 and result.stderr.startswith("procqueue health: error:")


def test_the_probe_imports_no_database_driver_nor_metrics_library(tmp_path):
    """A liveness probe runs every few seconds: it must stay a light import."""
    path = write_document(tmp_path / "s.json", live_document())
    code = ("import sys; from procqueue import health_probe; code = health_probe.run(['--status-file', %r]);"
            "heavy = [m for m in ('psycopg2', 'prometheus_client', 'click', 'psutil') if m in sys.modules];"
            "print(heavy); print(sorted(m for m in sys.modules if m.startswith('procqueue.')))" % str(path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    heavy, ours = result.stdout.strip().splitlines()[-2:]
    assert heavy == "[]", result.stdout + result.stderr
    # What it reads of ours, and no more (health.py's docstring and the README say so).
    assert ours == str(["procqueue.config", "procqueue.errors", "procqueue.health", "procqueue.health_probe",
                        "procqueue.heartbeat", "procqueue.private_files", "procqueue.records",
                        "procqueue.worker_fate"])


def test_a_processor_starting_up_is_healthy_however_long_it_takes():
    # Applying a schema to a large table may take minutes: a restart would start it over.
    doc = {"version": 1, "state": "starting", "pid": 42, "updated_at_unix": NOW - 600}
    assert verdict_of(doc).healthy


def test_a_supervisor_gone_from_this_host_is_unhealthy_at_once():
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    doc = dict(document(age=0), hostname=socket.gethostname(), pid=gone.pid)
    verdict = judge(doc, now=NOW, max_age=30, min_healthy_workers=1)
    assert not verdict.healthy and verdict.reasons == [f"the supervisor (pid {gone.pid}) is not running"]
    # From another host the pid means nothing: the document's age decides.
    assert judge(dict(doc, hostname="elsewhere"), now=NOW, max_age=30, min_healthy_workers=1).healthy
