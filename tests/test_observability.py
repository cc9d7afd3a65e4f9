"""What an operator sees of a running processor: /metrics, the status file,
procqueue-health, /healthz, /status, /monitoring, `procqueue status|stats` and the logs.
Real processors, real signals, real Postgres."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

import psutil
import pytest
from psycopg2.extensions import make_dsn, parse_dsn

import procqueue
from procqueue import TaskState
from procqueue.health import judge
from procqueue.http import MonitoringServer

from helpers import REPO, http_get, sample, scrape, wait_until

import sample_tasks

FINISHED = "procqueue_tasks_finished_total"
MONOTONIC_SUFFIXES = ("_total", "_count", "_bucket", "_sum")


def finished(samples, task, result, task_type="standard"):
    return sample(samples, FINISHED, task_identifier=task, task_type=task_type, result=result)


class CounterWatch:
    """Scrapes /metrics and fails the test the moment any counter is lower than before."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: dict = {}
        self.scrapes = 0

    def scrape(self) -> dict:
        samples = scrape(self.port)
        for key, value in samples.items():
            if key[0].startswith("procqueue_") and key[0].endswith(MONOTONIC_SUFFIXES):
                previous = self.seen.get(key)
                assert previous is None or value >= previous, f"{key} went back from {previous} to {value}"
                self.seen[key] = value
        self.scrapes += 1
        return samples


def run_command(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "procqueue", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))


def health(processor, *args):
    return subprocess.run([sys.executable, "-c", "from procqueue.health_probe import main; main()",
                           "--status-file", str(processor.status_path), *args],
                          capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.timeout(90)
def test_metrics_follow_tasks_that_succeed_fail_time_out_and_die_with_their_worker(db, start_processor):
    processor = start_processor("--numthreads", "2", "--metrics-port", "0")
    watch = CounterWatch(processor.metrics_port())
    first = watch.scrape()
    # Registered tasks are exported at zero from the start, so a first failure is an increase.
    assert (FINISHED, frozenset({"task_identifier": "sample.fail", "task_type": "standard",
                                 "result": "failed"}.items())) in first
    procqueue.enqueue_many([sample_tasks.noop.call() for _ in range(5)])
    sample_tasks.fail.delay(args=("card declined",))  # two attempts: retried, then failed
    sample_tasks.busy_loop.delay()  # interrupted by its worker at its timeout
    sample_tasks.wedged.delay()  # only the supervisor can stop it: worker killed
    expected = {("sample.noop", "succeeded"): 5, ("sample.fail", "retried"): 1, ("sample.fail", "failed"): 1,
                ("sample.busy_loop", "timed_out"): 1, ("sample.wedged", "timed_out"): 1}

    seen = {}

    def all_counted():
        samples = watch.scrape()
        seen.update({key: finished(samples, *key) for key in expected})
        # Restarts come from the status document, refreshed as the supervisor acts.
        seen["restarts stuck"] = sample(samples, "procqueue_worker_restarts_total", reason="stuck")
        return samples if seen == {**expected, "restarts stuck": 1} else None

    samples = wait_until(all_counted, timeout=30, interval=0.1,
                         message=lambda: f"outcomes and restart counted: expected {expected} and 1 stuck, saw {seen}")
    duration_count = "procqueue_task_duration_seconds_count"
    assert sample(samples, duration_count, task_identifier="sample.noop", task_type="standard", result="succeeded") == 5
    assert sample(samples, "procqueue_task_pickup_latency_seconds_count", task_identifier="sample.noop",
                  queue="default") == 5

    task_id = sample_tasks.sleep_then_record.delay(args=(5, "lost once"))
    os.kill(processor.wait_until_started(task_id), signal.SIGKILL)

    def retried():
        samples = watch.scrape()
        done = finished(samples, "sample.sleep_then_record", "succeeded") == 1
        return samples if done and sample(samples, "procqueue_worker_restarts_total", reason="crashed") == 1 else None

    samples = wait_until(retried, timeout=30, interval=0.1, message="retry of the lost task")
    assert finished(samples, "sample.sleep_then_record", "lost") == 1
    document = processor.status()
    assert document["totals"]["tasks_lost"] == 2  # the wedged task's run and this one
    assert document["totals"]["restarts"] == {"stuck": 1, "crashed": 1, "recycled": 0}
    assert watch.scrapes > 10
    assert processor.stop() == 0


@pytest.mark.timeout(120)
def test_counts_survive_hundreds_of_replaced_workers_while_being_scraped(db, start_processor, tmp_path):
    # Every task ends its worker's life, while another thread scrapes every endpoint: the
    # supervisor forks with its HTTP thread running, and no fork may hang.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    processor = start_processor("--numthreads", "2", "--queuepopsize", "1", "--max-tasks-per-worker", "1",
                                "--log-level", "warning", "--metrics-port", "0", extra_env={"TMPDIR": str(scratch)})
    watch = CounterWatch(processor.metrics_port())
    stop = threading.Event()
    errors = []

    def scrape_everything():
        while not stop.is_set():
            try:
                watch.scrape()
                for path in ("/status", "/healthz", "/monitoring"):
                    assert http_get(watch.port, path)[0] in (200, 503)
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)
                return

    scraper = threading.Thread(target=scrape_everything)
    scraper.start()
    try:
        procqueue.enqueue_many([sample_tasks.noop.call() for _ in range(200)])
        wait_until(lambda: finished(scrape(watch.port), "sample.noop", "succeeded") == 200, timeout=100,
                   interval=0.2, message="200 runs counted")
        [metrics_dir] = list(scratch.glob("procqueue-metrics-*"))
        # Dead workers' files are folded away: what is left is the archive, the supervisor's
        # file and those of the workers alive now (or just exiting).
        assert len(list(metrics_dir.glob("*.db"))) <= 3 + 2 * 2 + 2
    finally:
        stop.set()
        scraper.join()
    assert errors == []
    samples = watch.scrape()
    assert finished(samples, "sample.noop", "succeeded") == 200  # not one increment lost to a dead worker
    assert sample(samples, "procqueue_worker_restarts_total", reason="recycled") >= 199
    assert processor.stop() == 0
    assert list(scratch.glob("procqueue-metrics-*")) == []  # removed on the way out


@pytest.mark.timeout(60)
def test_queue_depth_and_monitoring_match_the_database(db, start_processor):
    # This processor runs only the 'elsewhere' queue: what is enqueued on 'default' waits.
    processor = start_processor("--numthreads", "1", "--queue", "elsewhere", "--metrics-port", "0")
    port = processor.metrics_port()
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    procqueue.enqueue_many([sample_tasks.noop.call() for _ in range(7)]
                           + [sample_tasks.noop.call(delay_until=later) for _ in range(3)])
    failed_id = sample_tasks.fail_elsewhere.delay()
    wait_until(lambda: procqueue.get_task(failed_id).state is TaskState.FAILED, timeout=15, message="failed")
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM procqueue.tasks WHERE state = 'queued' AND run_at <= now()")
        waiting_in_database = cur.fetchone()[0]
    assert waiting_in_database == 7

    def monitoring():
        status, _, body = http_get(port, "/monitoring")
        return json.loads(body) if status == 200 and json.loads(body)["waiting"] == waiting_in_database else None

    assert wait_until(monitoring, timeout=15, interval=0.2, message="/monitoring caught up") == {"waiting": 7}
    samples = scrape(port)
    depth = "procqueue_queue_tasks"
    assert sample(samples, depth, queue="default", state="waiting") == 7
    assert sample(samples, depth, queue="default", state="scheduled") == 3
    assert sample(samples, depth, queue="elsewhere", state="failed") == 1
    assert sample(samples, "procqueue_queue_oldest_waiting_age_seconds", queue="default") > 0
    stats = run_command("stats", env={"DATABASE_URL": procqueue.client.settings().database.url})
    assert stats.returncode == 0, stats.stderr
    document = json.loads(stats.stdout)
    assert (document["waiting"], document["scheduled"], document["failed"]) == (7, 3, 1)
    assert document["by_queue"]["default"]["waiting"] == 7
    assert processor.status()["queue"]["by_queue"]["elsewhere"]["failed"] == 1
    assert processor.stop() == 0


def test_status_file_is_a_whole_document_at_every_read_during_a_run(db, start_processor):
    processor = start_processor("--numthreads", "2")
    processor.wait_for_status(lambda d: d["state"] == "running")
    procqueue.enqueue_many([sample_tasks.noop.call() for _ in range(2000)])
    reads, updates, last = 0, set(), 0.0
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        document = json.loads(processor.status_path.read_text())  # raises on half a document
        assert document["version"] == 1 and document["updated_at_unix"] >= last
        last = document["updated_at_unix"]
        updates.add(last)
        reads += 1
    assert reads > 1000 and len(updates) >= 3
    assert processor.stop() == 0


def test_status_shows_what_each_worker_is_doing(db, start_processor):
    processor = start_processor("--numthreads", "2", "--metrics-port", "0")
    task_id = sample_tasks.sleep.delay(args=(3,))
    pid = processor.wait_until_started(task_id)
    document = processor.status()
    [busy] = [w for w in document["workers"] if w["pid"] == pid]
    assert busy["state"] == "busy" and busy["task"]["name"] == "sample.sleep"
    assert 0 <= busy["task"]["running_seconds"] < 3 and busy["task"]["timeout_seconds"] == 60
    assert busy["rss_bytes"] > 1_000_000 and busy["stuck"] is None
    assert document["config"]["numthreads"] == 2 and document["hostname"]
    assert datetime.fromisoformat(document["updated_at"]).timestamp() == pytest.approx(document["updated_at_unix"])
    table = run_command("status", "--status-file", str(processor.status_path))
    assert table.returncode == 0, table.stderr
    assert f"#{task_id} sample.sleep" in table.stdout and "SLOT" in table.stdout
    raw = run_command("status", "--status-file", str(processor.status_path), "--json")
    assert json.loads(raw.stdout)["processor_id"] == document["processor_id"]
    served = json.loads(http_get(processor.metrics_port(), "/status")[2])
    assert served["processor_id"] == document["processor_id"]
    assert processor.stop() == 0


@pytest.mark.timeout(90)
def test_health_follows_the_processor_through_freezes_and_shutdown(db, start_processor):
    processor = start_processor("--numthreads", "1", "--graceperiodms", "1500", "--metrics-port", "0")
    port = processor.metrics_port()
    document = processor.wait_for_status(lambda d: d["workers"][0]["state"] == "idle", message="worker idle")
    result = health(processor)
    assert result.returncode == 0 and result.stdout.startswith("healthy: 1 of 1 workers"), result.stderr
    status, _, body = http_get(port, "/healthz")
    assert status == 200 and json.loads(body)["healthy"] is True
    status, _, body = http_get(port, "/healthz?min_healthy_workers=3")
    assert status == 503 and json.loads(body)["reasons"] == ["1 of 1 workers healthy (at least 3 required)"]
    assert http_get(port, "/healthz?max_age=soon")[0] == 400

    # The supervisor stops updating: the file goes stale.
    os.kill(processor.pid, signal.SIGSTOP)
    try:
        # (Its frozen worker soon looks stuck too; staleness, judged first, wins once past --max-age.)
        stale = wait_until(lambda: (lambda r: r if "is not updating it" in r.stderr else None)(
            health(processor, "--max-age", "1")), timeout=10, interval=0.1, message="stale verdict")
        assert stale.returncode == 1
    finally:
        os.kill(processor.pid, signal.SIGCONT)
    wait_until(lambda: health(processor, "--max-age", "1").returncode == 0, timeout=10, message="fresh again")

    # A worker freezes, and its supervisor with it before it can act: the probe sees the
    # worker's silence grow past the grace period from the last document alone.
    worker_pid = document["workers"][0]["pid"]
    os.kill(worker_pid, signal.SIGSTOP)
    os.kill(processor.pid, signal.SIGSTOP)
    try:
        stuck = wait_until(lambda: (lambda r: r if r.returncode == 1 else None)(health(processor, "--max-age", "60")),
                           timeout=10, interval=0.1, message="stuck verdict")
        assert f"worker 0 (pid {worker_pid}) is stuck: no heartbeat for" in stuck.stderr
    finally:
        os.kill(processor.pid, signal.SIGCONT)
    # Running again, the supervisor kills the frozen worker and starts another.
    replaced = processor.wait_for_status(lambda d: d["workers"][0]["pid"] not in (None, worker_pid)
                                         and d["workers"][0]["state"] == "idle", timeout=15, message="replaced")
    assert replaced["workers"][0]["restarts"] == 1
    wait_until(lambda: health(processor).returncode == 0, timeout=10, message="healthy again")

    assert processor.stop() == 0
    result = health(processor)
    assert result.returncode == 1 and "processor stopped at" in result.stderr


def test_health_fails_at_once_when_the_supervisor_is_killed(db, start_processor):
    processor = start_processor("--numthreads", "1")
    processor.wait_for_status(lambda d: d["state"] == "running")
    assert health(processor).returncode == 0
    os.kill(processor.pid, signal.SIGKILL)
    processor.proc.wait(timeout=10)
    result = health(processor)  # no waiting for --max-age: the pid is gone
    assert result.returncode == 1 and f"the supervisor (pid {processor.pid}) is not running" in result.stderr


def test_a_worker_being_replaced_never_fails_the_probe(db, start_processor):
    # With one worker, every instant between its death and its replacement reaching its
    # loop must still read as healthy: a liveness probe landing there would restart a pod
    # whose supervisor is doing exactly its job.
    processor = start_processor("--numthreads", "1")
    first = processor.wait_for_status(lambda d: d["workers"][0]["state"] == "idle")["workers"][0]["pid"]
    seen = []

    def replaced() -> bool:
        document = processor.status()
        if document is None or document["updated_at_unix"] in {d["updated_at_unix"] for d, _ in seen}:
            return False
        seen.append((document, judge(document, now=time.time(), max_age=30, min_healthy_workers=1)))
        slot = document["workers"][0]
        return slot["pid"] not in (first, None) and slot["state"] == "idle"

    os.kill(first, signal.SIGKILL)
    wait_until(replaced, timeout=15, interval=0.002, message="worker replaced")
    unhealthy = [(d["workers"], v.reasons) for d, v in seen if not v.healthy]
    assert unhealthy == []
    assert processor.stop() == 0


@pytest.mark.timeout(90)
def test_a_slot_whose_workers_keep_dying_at_start_fails_the_probe_until_one_starts(db, start_processor, tmp_path):
    # Once a worker has run, the supervisor never gives up on a slot; the probe must not
    # read the endless starting/empty alternation as a worker being replaced.
    marker = tmp_path / "break-workers"
    processor = start_processor("--numthreads", "1", "--import", "sample_fragile_worker",
                                extra_env={"SAMPLE_BREAK_WORKERS_FILE": str(marker)})
    first = processor.wait_for_status(lambda d: d["workers"][0]["state"] == "idle")["workers"][0]["pid"]
    marker.touch()
    os.kill(first, signal.SIGKILL)
    broken = processor.wait_for_status(lambda d: d["workers"][0]["failed_starts"] >= 5, timeout=40)
    assert broken["state"] == "running"
    result = health(processor)
    assert result.returncode == 1
    assert re.search(r"slot 0: its last \d+ workers died while starting", result.stderr), result.stderr
    marker.unlink()
    processor.wait_for_status(lambda d: d["workers"][0]["state"] == "idle", timeout=40)
    assert health(processor).returncode == 0
    assert processor.stop() == 0


@pytest.mark.timeout(60)
def test_a_trickling_client_blocks_neither_probes_nor_a_prompt_shutdown(db, start_processor):
    processor = start_processor("--numthreads", "1", "--metrics-port", "0")
    port = processor.metrics_port()
    trickling = socket.create_connection(("127.0.0.1", port))
    trickling.sendall(b"GET /metrics HTTP/1.0\r\n")
    stop_trickling = threading.Event()

    def trickle() -> None:  # a header byte every half second, never the blank line
        while not stop_trickling.wait(0.5):
            try:
                trickling.sendall(b"X")
            except OSError:
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        connected = time.monotonic()
        assert http_get(port, "/healthz")[0] == 200  # answered meanwhile
        # A worker replaced while the connection's thread runs: that thread is ours and
        # fork-safe, so the supervisor must not warn of a task module's threads.
        first = processor.wait_for_status(lambda d: d["workers"][0]["state"] == "idle")["workers"][0]["pid"]
        os.kill(first, signal.SIGKILL)
        replacement = processor.wait_for_status(
            lambda d: d["workers"][0]["pid"] not in (first, None))["workers"][0]["pid"]
        trickling.setblocking(False)
        with pytest.raises(BlockingIOError):  # still open, so it was open at that fork
            trickling.recv(1)
        # The new worker holds neither that connection nor the listening socket: both are
        # the supervisor's, and a worker outliving it must not keep the port.
        assert [c for c in psutil.Process(replacement).net_connections() if c.laddr and c.laddr.port == port] == []
        trickling.settimeout(20)
        with contextlib.suppress(ConnectionResetError):
            assert trickling.recv(1) == b""  # the server hung up on it...
        assert time.monotonic() - connected < 10  # ...at its deadline, though it kept sending
        again = socket.create_connection(("127.0.0.1", port))  # and one more, open at shutdown
        again.sendall(b"GET /status HTTP/1.0\r\n")
        asked_to_stop = time.monotonic()
        assert processor.stop() == 0
        # Not held up by the open connection (that would take its 5 s deadline).
        assert time.monotonic() - asked_to_stop < 4
        again.close()
        assert "processor.threads_before_fork" not in processor.log()
    finally:
        stop_trickling.set()
        thread.join()
        trickling.close()


def test_monitoring_says_when_its_queue_depth_is_stale():
    # The supervisor reads queue depth every few seconds; with the database away, an old
    # number served as current would tell an autoscaler all is well.
    document = {"queue": {"waiting": 4, "checked_at_unix": time.time() - 45}}
    server = MonitoringServer("127.0.0.1", 0, status_source=lambda: document,
                              metrics_source=lambda accept: (b"", "text/plain"))
    server.start()
    try:
        status, _, body = http_get(server.address[1], "/monitoring")
        assert status == 503 and "last read from the database 45s ago" in json.loads(body)["error"]
        document["queue"]["checked_at_unix"] = time.time() - 2
        status, _, body = http_get(server.address[1], "/monitoring")
        assert (status, json.loads(body)) == (200, {"waiting": 4})
    finally:
        server.stop()


def test_http_answers_unknown_paths_and_openmetrics(db, start_processor):
    processor = start_processor("--numthreads", "1", "--metrics-port", "0")
    port = processor.metrics_port()
    status, _, body = http_get(port, "/nope")
    assert status == 404 and "/monitoring" in json.loads(body)["endpoints"]
    status, content_type, body = http_get(port, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    posted = urllib.request.Request(f"http://127.0.0.1:{port}/healthz", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(posted, timeout=10)
    assert (refused.value.code, refused.value.headers["Allow"]) == (405, "GET, HEAD")
    assert "POST not allowed" in json.loads(refused.value.read())["error"]
    assert processor.stop() == 0
    assert processor.status()["metrics_url"] is None  # stopped: nothing serves it any more


def test_json_logs_and_no_password_anywhere(db, start_processor):
    url = procqueue.client.settings().database.url
    password = parse_dsn(url).get("password")
    if not password:  # the test server trusts us: a password it ignores still must not leak
        password = "pw-MUST-NOT-LEAK"
        url = make_dsn(url, password=password)
    processor = start_processor("--numthreads", "1", "--metrics-port", "0", "--log-format", "json",
                                extra_env={"DATABASE_URL": url})
    port = processor.metrics_port()
    sample_tasks.fail.delay(args=("visible error",))
    processor.wait_for_log('"event": "task.failed"', count=2)
    exposed = {"log": processor.log(), "status file": processor.status_path.read_text(),
               "/metrics": http_get(port, "/metrics")[2].decode(), "/status": http_get(port, "/status")[2].decode()}
    for where, text in exposed.items():
        assert password not in text, f"the password is in the {where}"
    assert processor.stop() == 0
    lines = [json.loads(line) for line in processor.log().splitlines()]
    started = next(line for line in lines if line.get("event") == "processor.started")
    assert started["numthreads"] == 1 and started["level"] == "info" and "password=***" in started["database"]
    failure = next(line for line in lines if line.get("event") == "task.failed")
    assert failure["task"] == "sample.fail" and "visible error" in failure["error"] and failure["next"] == "retry"


def url_with_password():
    url = procqueue.client.settings().database.url
    if parse_dsn(url).get("password"):
        return url, parse_dsn(url)["password"]
    return make_dsn(url, password="pw-MUST-NOT-LEAK"), "pw-MUST-NOT-LEAK"  # trusted: ignored, yet secret


def test_a_password_given_on_the_command_line_is_warned_about_once_and_never_shown(db, start_processor):
    url, password = url_with_password()
    processor = start_processor("--numthreads", "1", "--database-url", url)
    processor.wait_for_status(lambda d: d["state"] == "running")
    assert processor.stop() == 0
    log = processor.log()
    assert log.count("event=config.password_on_command_line") == 1
    assert "give it in DATABASE_URL, PGPASSWORD or a ~/.pgpass file instead" in log and password not in log
    stats = subprocess.run([sys.executable, "-m", "procqueue", "stats", "--database-url", url, "--schema", "procqueue"],
                           capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert stats.returncode == 0, stats.stderr
    assert stats.stderr.strip().splitlines() == [
        "procqueue: warning: --database-url holds a password, which every user of this host can read in `ps`; "
        "give it in DATABASE_URL, PGPASSWORD or a ~/.pgpass file instead"]
    assert "waiting" in json.loads(stats.stdout)
    quiet = subprocess.run([sys.executable, "-m", "procqueue", "stats", "--schema", "procqueue"], capture_output=True,
                           text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO), DATABASE_URL=url))
    assert quiet.returncode == 0 and quiet.stderr == ""  # from the environment: nothing to warn about


def test_a_second_processor_may_not_take_a_live_processors_status_file(db, start_processor):
    first = start_processor("--numthreads", "1")
    first.wait_for_status(lambda d: d["state"] == "running")
    second = start_processor("--numthreads", "1", extra_env={"PROCQUEUE_STATUS_FILE": str(first.status_path)})
    assert second.proc.wait(timeout=30) == 2
    assert second.log().strip().splitlines() == [
        f"run-task-processor: error: --status-file {first.status_path} is being written by another processor "
        f"(pid {first.pid}); give this one a file of its own"]
    assert first.status()["pid"] == first.pid and health(first).returncode == 0
    assert first.stop() == 0


def test_status_of_a_processor_that_died_while_starting(tmp_path):
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"version": 1, "state": "starting", "pid": gone.pid, "hostname": socket.gethostname(),
                                "updated_at": "then", "updated_at_unix": time.time()}))
    result = run_command("status", "--status-file", str(path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"procqueue: error: the processor that wrote {path} (pid {gone.pid}) died while starting"


@pytest.mark.timeout(120)
def test_reading_commands_never_create_a_schema_on_the_embedded_server(tmp_path):
    # With no DATABASE_URL, enqueueing creates the schema (the embedded server is ours to
    # set up); a read names a misspelled schema as missing instead of creating it.
    env = {"PROCQUEUE_EMBEDDED_DIR": str(tmp_path / "pgdata"), "DATABASE_URL": "", "PROCQUEUE_SCHEMA": "nosuch"}
    result = run_command("stats", env=env, timeout=90)
    assert result.returncode == 3, result.stderr
    assert "schema 'nosuch' of this database holds no procqueue queue" in result.stderr
    again = run_command("stats", env=env, timeout=90)
    assert again.returncode == 3  # still not there: the first read created nothing
    running = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path / "pgdata") in " ".join(p.info["cmdline"] or [])]
    assert running == []  # the embedded server stopped with the last command that used it


def test_a_processor_that_cannot_start_leaves_a_stopped_status_file(start_processor):
    # A probe or script reading the file must not see a "starting" processor that is gone.
    unreachable = "postgresql://procqueue:hunter2@127.0.0.1:1/nowhere?connect_timeout=2"
    failed = start_processor("--numthreads", "1", "--database-wait", "1", extra_env={"DATABASE_URL": unreachable})
    assert failed.proc.wait(timeout=60) != 0
    document = json.loads(failed.status_path.read_text())
    assert (document["state"], document["pid"]) == ("stopped", failed.pid)
    assert "hunter2" not in failed.status_path.read_text() + failed.log()
    result = run_command("health", "--status-file", str(failed.status_path))
    assert result.returncode == 1 and "stopped" in result.stderr


def test_a_port_in_use_is_a_one_line_start_up_error(db, start_processor):
    first = start_processor("--numthreads", "1", "--metrics-port", "0")
    port = first.metrics_port()
    second = start_processor("--numthreads", "1", "--metrics-port", str(port))
    assert second.proc.wait(timeout=30) == 2
    assert second.log().strip().splitlines() == [
        f"run-task-processor: error: cannot serve metrics on --metrics-host 0.0.0.0 --metrics-port {port}: "
        "Address already in use"]
    assert first.stop() == 0


def test_enqueued_tasks_are_counted_on_the_application_side(db):
    from prometheus_client import REGISTRY

    def enqueued(name):
        return REGISTRY.get_sample_value("procqueue_enqueued_tasks_total", {"task_identifier": name}) or 0.0

    noop, record = enqueued("sample.noop"), enqueued("sample.record")
    sample_tasks.noop.delay()
    procqueue.enqueue_many([sample_tasks.noop.call(), sample_tasks.record_task.call(args=("k",))])
    assert (enqueued("sample.noop"), enqueued("sample.record")) == (noop + 2, record + 1)


def test_workers_reported_by_state_and_heartbeat(db, start_processor):
    processor = start_processor("--numthreads", "2", "--metrics-port", "0")
    port = processor.metrics_port()
    processor.wait_for_status(lambda d: all(w["state"] == "idle" for w in d["workers"]), message="workers idle")
    samples = scrape(port)
    assert sample(samples, "procqueue_workers", state="idle") == 2
    assert sample(samples, "procqueue_workers_configured") == 2
    assert 0 <= sample(samples, "procqueue_worker_heartbeat_age_seconds", slot="1") < 5
    assert sample(samples, "procqueue_database_up") == 1
    workers = {child.pid for child in psutil.Process(processor.pid).children()}
    assert len(workers) == 2
    assert processor.stop() == 0
