"""Test helpers: polling with deadlines, and a real processor in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

REPO = Path(__file__).resolve().parent.parent
# Every process a test run starts carries this in its environment, so whatever survives
# a test (a crashed test, a timeout) can still be found and killed at the end of the run.
SESSION_MARKER = "PROCQUEUE_TEST_SESSION"
SESSION_ID = f"{os.getpid()}-{time.time_ns()}"
TESTS = Path(__file__).resolve().parent
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, message: str = "") -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


class ProcessorProcess:
    """`run-task-processor` as a user runs it, with its log captured to a file."""

    def __init__(self, database_url: str, args: List[str], log_path: Path, extra_env: Optional[dict] = None):
        env = dict(os.environ)
        env["DATABASE_URL"] = database_url
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
        env.pop("TASK_RUN_METHOD", None)
        env[SESSION_MARKER] = SESSION_ID
        env.update(extra_env or {})
        self.log_path = log_path
        self._log = open(log_path, "wb")
        command = [sys.executable, str(REPO / "bin" / "run-task-processor"), *args]
        self.proc = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

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

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as Kubernetes stops a pod; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """Make sure nothing of this processor outlives the test (workers included)."""
        for pgid in self._process_groups():
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()

    def _process_groups(self) -> List[int]:
        import psutil

        groups = {self.proc.pid}
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    groups.add(os.getpgid(child.pid))
                except ProcessLookupError:
                    pass
        except psutil.NoSuchProcess:
            pass
        return sorted(groups)


def kill_session_leftovers() -> int:
    """Kill every process this test run started that is still alive; returns how many."""
    import psutil

    killed = 0
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(SESSION_MARKER) == SESSION_ID:
                proc.kill()
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return killed
