"""Test helpers: polling with deadlines, and a real processor in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple, TypeVar, Union

REPO = Path(__file__).resolve().parent.parent
# Every process a test run starts carries this in its environment, so whatever survives
# a test (a crashed test, a timeout) can still be found and killed at the end of the run.
SESSION_MARKER = "PROCQUEUE_TEST_SESSION"
PROCESSOR_MARKER = "PROCQUEUE_TEST_PROCESSOR"
SESSION_ID = f"{os.getpid()}-{time.time_ns()}"
TESTS = Path(__file__).resolve().parent
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
               message: Union[str, Callable[[], str]] = "") -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds.
    `message` may be a callable, asked at the deadline for what was last seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            said = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {said or predicate}")
        time.sleep(interval)


def start_run_task_processor(args: List[str], *, database_url: str, import_path: List[Path], status_file: Path,
                             stdout, env: Optional[dict] = None, python: str = sys.executable) -> subprocess.Popen:
    """`bin/run-task-processor` as a user runs it (the tests' and the benchmarks' way),
    its output (both streams) to `stdout`: in a session of its own, so a signal meant for
    the test run reaches it only when sent to it; with its own status file, never the
    shared default under /tmp, which would outlive the run; `env` over the rest."""
    environment = dict(os.environ, DATABASE_URL=database_url, PROCQUEUE_STATUS_FILE=str(status_file))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [*map(str, import_path), environment.get("PYTHONPATH")]))
    environment.pop("TASK_RUN_METHOD", None)
    environment.update(env or {})
    command = [python, str(REPO / "bin" / "run-task-processor"), *args]
    return subprocess.Popen(command, env=environment, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)


class ProcessorProcess:
    """`run-task-processor` as a user runs it, with its log captured to a file."""

    def __init__(self, database_url: str, args: List[str], log_path: Path, extra_env: Optional[dict] = None):
        # Every process of this processor carries its own marker too: a test that kills the
        # supervisor orphans its workers, which are then nobody's children to look under.
        self.marker = uuid.uuid4().hex
        self.status_path = log_path.with_name(log_path.stem + ".status.json")
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {SESSION_MARKER: SESSION_ID, PROCESSOR_MARKER: self.marker, **(extra_env or {})}
        self.proc = start_run_task_processor(args, database_url=database_url, import_path=[TESTS, REPO],
                                             status_file=self.status_path, stdout=self._log, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 15.0, count: int = 1) -> None:
        wait_until(lambda: self.log().count(text) >= count or self._died(), timeout, message=f"log line {text!r}")
        assert self.log().count(text) >= count, f"processor exited early:\n{self.log()}"

    def _died(self) -> bool:
        return self.proc.poll() is not None

    def status(self) -> Optional[dict]:
        """The status document it last wrote, or None before the first."""
        try:
            document = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return None
        return document if document.get("state") != "starting" else None

    def wait_for_status(self, predicate: Callable[[dict], bool], timeout: float = 15.0, message: str = "") -> dict:
        def matching():
            document = self.status()
            return document if document is not None and predicate(document) else None

        return wait_until(matching, timeout, message=message or "status document")

    def wait_until_started(self, task_id: int, timeout: float = 15.0) -> int:
        """Wait until a worker shows `task_id` as the task it is running, and return that
        worker's pid. A task's `running` state means only claimed: a worker may hold it
        behind another task of its batch."""
        def running_it(document: dict) -> bool:
            return any((worker["task"] or {}).get("id") == task_id for worker in document["workers"])

        document = self.wait_for_status(running_it, timeout, f"task {task_id} started")
        return next(w["pid"] for w in document["workers"] if (w["task"] or {}).get("id") == task_id)

    def metrics_port(self, timeout: float = 15.0) -> int:
        document = self.wait_for_status(lambda d: bool(d.get("metrics_url")), timeout, "metrics endpoint")
        return int(document["metrics_url"].rsplit(":", 1)[1])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as Kubernetes stops a pod; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """Make sure nothing of this processor outlives the test: its supervisor, workers
        (orphaned ones included) and whatever their tasks started, all gone before the
        test's directory is removed."""
        import psutil

        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        survivors = processes_marked(PROCESSOR_MARKER, self.marker)
        for process in survivors:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(survivors, timeout=10)
        self._log.close()


def processes_marked(variable: str, value: str) -> list:
    """The live processes (never this one) whose environment has variable=value."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(variable) == value:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_session_leftovers() -> int:
    """Kill every process this test run started that is still alive; returns how many."""
    import psutil

    leftovers = processes_marked(SESSION_MARKER, SESSION_ID)
    for proc in leftovers:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return len(leftovers)


Samples = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]


def http_get(port: int, path: str, accept: str = "") -> Tuple[int, str, bytes]:
    """(status, content type, body) of GET http://127.0.0.1:port/path."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def scrape(port: int) -> Samples:
    """Every sample on /metrics, parsed by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = http_get(port, "/metrics")
    assert status == 200, body
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def claimed_task(task_name: str, **fields):
    """A task as a claim hands it to a worker, for running it in-process; `fields` over
    the defaults (one attempt of three, 60 s timeout, no recurring slot, run now)."""
    from datetime import datetime, timezone

    from procqueue.records import ClaimedTask

    now = datetime.now(timezone.utc)
    values = dict(id=1, task_name=task_name, args=[], kwargs={}, queue="default", priority=50, run_at=now,
                  attempts=1, max_attempts=3, timeout_seconds=60, recurring_slot=None, leased_at=now)
    return ClaimedTask(**{**values, **fields})


def execution_count(db, key=None) -> int:
    """Executions the sample tasks recorded (with `key`, of that key only)."""
    with db.cursor() as cur:
        if key is None:
            cur.execute("SELECT count(*) FROM public.executions")
        else:
            cur.execute("SELECT count(*) FROM public.executions WHERE key = %s", (key,))
        return cur.fetchone()[0]


def states(db, task_name="sample.record") -> dict:
    """How many tasks of `task_name` are in each state."""
    with db.cursor() as cur:
        cur.execute("SELECT state, count(*) FROM procqueue.tasks WHERE task_name = %s GROUP BY state", (task_name,))
        return dict(cur.fetchall())


def worker_idle_after_empty_claim(db) -> bool:
    """The worker's session is idle and its last statement was a claim: it is waiting."""
    with db.cursor() as cur:
        cur.execute("SELECT state, query FROM pg_stat_activity WHERE application_name = 'procqueue-worker-0'")
        row = cur.fetchone()
    return row is not None and row[0] == "idle" and row[1].startswith("EXECUTE procqueue_claim_")  # prepared
