"""The supervisor's side of the dashboard: start its process when the first dashboard
request comes, restart it with backoff when it dies, stop it on shutdown.

A fresh interpreter (subprocess, never a fork of the supervisor), so nothing of the
supervisor's state, locks or connections goes with it. The database URL and the token
reach it in its environment, never its argv (`ps` shows argv to every local user). It
runs only while the supervisor does: it exits when the channel's other end closes, which
happens however the supervisor ends, SIGKILL included.

Called from the supervisor's loop only; the HTTP thread just reads `channel`.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from typing import Optional

from .config import DatabaseConfig, dashboard_process_environment
from .dashboard_handoff import channel_pair, unread_bytes
from .db import resolve_url
from .errors import ProcqueueError
from .http import MonitoringServer
from .logs import log_event

logger = logging.getLogger("procqueue.supervisor")

RESTART_DELAYS_SECONDS = (1, 2, 5, 10, 30)
# A process that lived this long before dying starts its backoff afresh.
STABLE_SECONDS = 60.0
STOP_SECONDS = 3.0
# Its channel refused connections (full) for this long: it takes none, so it is hung.
HUNG_SECONDS = 15.0


class DashboardProcess:
    def __init__(self, server: MonitoringServer, *, database: DatabaseConfig, token: Optional[str]) -> None:
        self.server = server
        self.database = database
        self.token = token
        self.process: Optional[subprocess.Popen] = None
        self.started_at = 0.0
        self.failures = 0
        self.start_after = 0.0

    def step(self, now: float, *, stopping: bool = False) -> None:
        """One look, from the supervisor's loop: reap a dead process, start a wanted one
        (none once the processor is stopping)."""
        if self.process is not None:
            if self.process.poll() is None:
                self.kill_if_hung()
                return
            self.exited(now)
        if self.server.dashboard_wanted and now >= self.start_after and not stopping:
            self.start(now)

    def start(self, now: float) -> None:
        processor_end, dashboard_end = channel_pair()
        try:
            env = dashboard_process_environment(resolve_url(self.database), self.database, self.token)
            command = [sys.executable, "-m", "procqueue.dashboard", "--channel-fd", str(dashboard_end.fileno())]
            # A session of its own: a Ctrl-C meant for the processor, which stops it in
            # good order, must not kill the dashboard under it; the dashboard exits when
            # the channel closes, however the processor ends.
            self.process = subprocess.Popen(command, env=env, pass_fds=[dashboard_end.fileno()],
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        except (OSError, ProcqueueError) as exc:
            processor_end.close()
            self.failed(now, f"cannot start it: {exc}")
            return
        finally:
            dashboard_end.close()  # the child's now: the channel ends with the child
        self.started_at = now
        with self.server.fork_lock:  # never swapped while the HTTP thread sends on it
            self.server.dashboard_channel = processor_end
        log_event(logger, logging.INFO, "dashboard.started", pid=self.process.pid)

    def kill_if_hung(self) -> None:
        """Killed, it is restarted as a crashed one is (see step). Hung means the channel
        refused a connection HUNG_SECONDS ago and still holds connections it has not
        taken: a burst that filled it once, taken since, is no hang."""
        full_since = self.server.dashboard_full_since
        if full_since is None or time.monotonic() - full_since < HUNG_SECONDS:
            return
        with self.server.fork_lock:
            channel = self.server.dashboard_channel
            waiting = unread_bytes(channel) if channel is not None else 0
        if not waiting:
            self.server.dashboard_full_since = None
        else:
            log_event(logger, logging.ERROR, "dashboard.hung", pid=self.process.pid,
                      note=f"it took no connection for {HUNG_SECONDS:g}s: killed")
            self.server.dashboard_full_since = None
            self.process.kill()

    def exited(self, now: float) -> None:
        code = self.process.returncode if self.process is not None else None
        self.process = None
        self.detach_channel()
        if now - self.started_at >= STABLE_SECONDS:
            self.failures = 0
        self.failed(now, f"exited with code {code}")

    def failed(self, now: float, reason: str) -> None:
        delay = RESTART_DELAYS_SECONDS[min(self.failures, len(RESTART_DELAYS_SECONDS) - 1)]
        self.failures += 1
        self.start_after = now + delay
        log_event(logger, logging.WARNING, "dashboard.down", reason=reason, restart_in_s=float(delay))

    def detach_channel(self) -> None:
        with self.server.fork_lock:
            channel, self.server.dashboard_channel = self.server.dashboard_channel, None
        if channel is not None:
            channel.close()

    def stop(self) -> None:
        self.detach_channel()
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
