"""What the supervisor shows the outside world, refreshed once a second.

The status document (the status file, /status), the health verdict (/healthz), the
Prometheus metrics (/metrics) and Flagsmith's `{"waiting": N}` (/monitoring) all come
from one document per second, so they never disagree. Nothing here may stop the
supervisor: a status file that cannot be written is logged, and the supervisor carries on
killing and replacing workers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Dict, Optional

import psutil

from .config import ProcessorConfig
from .dashboard_process import DashboardProcess
from .http import ENDPOINTS, MonitoringServer
from .logs import log_event
from .metrics import MultiprocessMetrics, exposition, processor_registry
from .private_files import UnsafePathError
from .status import StatusFile, StatusReport, SupervisorFacts

logger = logging.getLogger("procqueue.supervisor")

STATUS_INTERVAL_SECONDS = 1.0


class Monitor:
    def __init__(self, config: ProcessorConfig, *, processor_id: str, board,
                 metrics_store: Optional[MultiprocessMetrics]) -> None:
        self.config = config
        self.board = board  # the shared-memory slots the workers write
        self.report = StatusReport(config, processor_id=processor_id, started_at=time.time())
        self.file = StatusFile(config.status_file)
        self.metrics_store = metrics_store
        self.server: Optional[MonitoringServer] = None
        self.latest: Optional[dict] = None  # replaced whole, read by the HTTP thread
        self.file_failing = False
        self.owns_status_file = False  # the file is ours to write: no other live processor's
        self.rss = RssReader()
        self.dashboard: Optional[DashboardProcess] = None

    def open(self) -> None:
        """Before anything else starts: fail now, with a clear message, if the status file
        cannot be written or the metrics port cannot be bound."""
        self.file.prepare()
        self.owns_status_file = True
        if self.config.metrics_port is not None and self.metrics_store is not None:
            registry = processor_registry(self.metrics_store, lambda: self.latest)
            self.server = MonitoringServer(
                self.config.metrics_host, self.config.metrics_port, status_source=lambda: self.latest,
                metrics_source=lambda accept: exposition(registry, accept),
            )
            if self.config.dashboard:
                self.server.dashboard_enabled = True
                self.dashboard = DashboardProcess(self.server, database=self.config.database,
                                                  token=self.config.dashboard_token)

    def start_serving(self) -> None:
        if self.server is not None:
            self.server.start()
            host, port = self.server.address
            log_event(logger, logging.INFO, "metrics.listening", url=f"{self.server.url}/metrics", host=host,
                      port=port, endpoints=",".join(ENDPOINTS))

    @property
    def url(self) -> Optional[str]:
        return self.server.url if self.server is not None else None

    def publish(self, facts: SupervisorFacts, *, monotonic_now: float) -> None:
        self.latest = self.report.document(self.board, facts, now=time.time(), monotonic_now=monotonic_now)
        try:
            self.file.write(self.latest)
        except (OSError, UnsafePathError) as exc:  # a directory remade by someone else: not written there
            if not self.file_failing:  # once per failure streak, not once a second
                log_event(logger, logging.ERROR, "status.write_failed", path=str(self.file.path),
                          error=getattr(exc, "strerror", None) or str(exc))
            self.file_failing = True
            return
        if self.file_failing:
            log_event(logger, logging.INFO, "status.write_recovered", path=str(self.file.path))
        self.file_failing = False

    def look_after_dashboard(self, monotonic_now: float, *, stopping: bool) -> None:
        """From the supervisor's loop, once the database is up: start the dashboard's
        process when first asked for, restart it when it died (not while the processor
        stops)."""
        if self.dashboard is not None:
            self.dashboard.step(monotonic_now, stopping=stopping)

    def forget_worker(self, pid: int) -> None:
        """A worker was reaped: keep its counts (archived), drop its process handle."""
        self.rss.forget(pid)
        if self.metrics_store is None:
            return
        try:
            self.metrics_store.archive_process(pid)
        except (OSError, ValueError) as exc:  # disk full, a damaged file: metrics suffer, not workers
            log_event(logger, logging.ERROR, "metrics.archive_failed", pid=pid, error=str(exc))

    def fork_guard(self):
        """Held around fork(): no connection is half accepted or half closed in the child."""
        return self.server.fork_lock if self.server is not None else contextlib.nullcontext()

    def close_in_child(self) -> None:
        """In a freshly forked worker: drop what belongs to the supervisor alone."""
        if self.server is not None:
            self.server.close_in_child()
        self.file.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.metrics_store is not None:
            self.metrics_store.remove()
        self.file.remove_temporary()
        self.file.close()


class RssReader:
    """Resident memory of worker processes, for the status document and /metrics."""

    def __init__(self) -> None:
        self.processes: Dict[int, psutil.Process] = {}

    def read(self, pid: int) -> Optional[int]:
        try:
            process = self.processes.get(pid)
            if process is None:
                process = self.processes[pid] = psutil.Process(pid)
            return process.memory_info().rss
        except psutil.Error:
            return None

    def forget(self, pid: int) -> None:
        self.processes.pop(pid, None)
