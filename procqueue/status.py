"""The status document: what a processor tells scripts, the health probe and /status.

The supervisor builds it once a second from its shared-memory slots and what it knows
itself, and rewrites the status file with it atomically (a temporary file in the same
directory, then a rename over the old one), so a reader sees the previous document or
the new one, never half of one. `version` changes when a field changes meaning; every
field is described in the README.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from .config import ProcessorConfig
from .errors import ConfigError
from .health import DEFAULT_MAX_AGE_SECONDS, STATUS_VERSION, StatusError, load_status, supervisor_alive
from .heartbeat import WorkerSlot, WorkerState, read_slot
from .private_files import UnsafePathError, open_private_directory, write_file
from .records import QueueStats
from .worker_fate import judge_view


@dataclass(frozen=True)
class SupervisorFacts:
    """What the supervisor knows beyond the slots, handed to the report each second."""

    state: str  # waiting_for_database, running, stopping, stopped
    database_up: bool
    queue_stats: Optional[QueueStats]
    restarts: Mapping[str, int]  # by reason
    restarts_by_slot: Mapping[int, int]
    rss_by_slot: Mapping[int, int] = field(default_factory=dict)
    pids_by_slot: Mapping[int, int] = field(default_factory=dict)  # forked, perhaps not yet in its slot
    vacant_since_by_slot: Mapping[int, float] = field(default_factory=dict)  # monotonic; empty slots
    failed_starts_by_slot: Mapping[int, int] = field(default_factory=dict)  # in a row, before the loop
    tasks_lost: int = 0
    tasks_rescued: int = 0
    metrics_address: Optional[str] = None  # http://host:port, once listening


class StatusReport:
    """Builds status documents for one processor."""

    def __init__(self, config: ProcessorConfig, *, processor_id: str, started_at: float) -> None:
        self.config = config
        self.processor_id = processor_id
        self.started_at = started_at
        self.hostname = socket.gethostname()
        self.public_config = config.public_dict()

    def document(self, slots, facts: SupervisorFacts, *, now: float, monotonic_now: float) -> dict:
        grace = self.config.grace_period_ms / 1000
        workers = [worker_entry(index, slot, facts, now=monotonic_now, grace=grace) for index, slot in enumerate(slots)]
        return {
            "version": STATUS_VERSION,
            "processor_id": self.processor_id,
            "pid": os.getpid(),
            "hostname": self.hostname,
            "state": facts.state,
            "started_at": iso(self.started_at),
            "started_at_unix": round(self.started_at, 3),
            "updated_at": iso(now),
            "updated_at_unix": round(now, 3),
            "database_up": facts.database_up,
            "metrics_url": facts.metrics_address,
            "config": self.public_config,
            "workers": workers,
            "queue": queue_section(facts.queue_stats),
            "totals": totals_section(workers, facts),
        }


def worker_entry(index: int, slot: WorkerSlot, facts: SupervisorFacts, *, now: float, grace: float) -> dict:
    # One view of the slot, which the worker writes while this runs: the task shown, its
    # state and the stuck verdict all come from the same reading.
    view = read_slot(slot)
    state, pid, heartbeat = view.state, view.pid, view.heartbeat
    forked_pid = facts.pids_by_slot.get(index)
    if not pid and forked_pid:  # forked, but not yet as far as writing its slot
        state, pid = WorkerState.STARTING, forked_pid
    task = None
    if state == WorkerState.BUSY and view.task_id and view.whole:
        task = {"id": view.task_id, "name": view.task_name or "-",
                "running_seconds": round(max(now - view.task_started, 0.0), 3),
                "timeout_seconds": round(view.task_deadline - view.task_started, 3)}
    verdict = judge_view(view, now, grace)
    vacant_since = facts.vacant_since_by_slot.get(index)
    return {
        "slot": index,
        "pid": pid or None,
        "state": WorkerState(state).name.lower() if pid else "empty",
        "heartbeat_age_seconds": round(now - heartbeat, 3) if pid and heartbeat else None,
        "vacant_seconds": None if pid or vacant_since is None else round(now - vacant_since, 3),
        # A worker seen in its loop ends its slot's run of failed starts, even if the
        # supervisor has not noticed yet (it writes this document at the end of its tick).
        "failed_starts": 0 if state in (WorkerState.IDLE, WorkerState.BUSY) else facts.failed_starts_by_slot.get(index, 0),
        "task": task,
        "tasks_done": slot.tasks_done,
        "tasks_failed": slot.tasks_failed,
        "restarts": facts.restarts_by_slot.get(index, 0),
        "rss_bytes": facts.rss_by_slot.get(index),
        "stuck": verdict[1] if verdict else None,
    }


def queue_section(stats: Optional[QueueStats]) -> Optional[dict]:
    if stats is None:
        return None
    total = stats.total()
    return {
        "checked_at": iso(stats.checked_at),
        "checked_at_unix": round(stats.checked_at, 3),
        **depth_fields(total),
        "by_queue": {name: depth_fields(depth) for name, depth in stats.queues.items()},
    }


def depth_fields(depth) -> dict:
    age = depth.oldest_waiting_age_seconds
    return {"waiting": depth.waiting, "scheduled": depth.scheduled, "running": depth.running,
            "failed": depth.failed, "oldest_waiting_age_seconds": None if age is None else round(age, 3)}


def totals_section(workers: List[dict], facts: SupervisorFacts) -> dict:
    return {
        "workers_running": sum(1 for w in workers if w["pid"]),
        "tasks_done": sum(w["tasks_done"] for w in workers),
        "tasks_failed": sum(w["tasks_failed"] for w in workers),
        "restarts": {reason: facts.restarts.get(reason, 0) for reason in ("stuck", "crashed", "recycled")},
        "tasks_lost": facts.tasks_lost,
        "tasks_rescued": facts.tasks_rescued,
    }


def iso(unix_seconds: float) -> str:
    return datetime.fromtimestamp(unix_seconds, timezone.utc).isoformat(timespec="milliseconds")


def starting_document() -> dict:
    """What the file says until the supervisor's first full report."""
    now = time.time()
    return {"version": STATUS_VERSION, "state": "starting", "pid": os.getpid(), "hostname": socket.gethostname(),
            "updated_at": iso(now), "updated_at_unix": round(now, 3)}


class StatusFile:
    """The file, rewritten whole in a directory only this user can write (private_files):
    a temporary file beside it, then a rename."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.temporary = f".{self.path.name}.{os.getpid()}.tmp"
        self.directory_fd: Optional[int] = None

    def prepare(self) -> None:
        """Create the directory and prove the file can be written, or say why not: a
        processor that cannot tell its liveness probe it is alive would be restarted over
        and over, so this is a start-up error, not a warning. So is a directory another
        user controls (they could make the probe lie, or make this processor write where
        they point), and a file another live processor is writing: the two would take
        turns, and each one's probe would judge the other."""
        try:
            self.open_directory()
        except UnsafePathError as exc:
            raise ConfigError(f"unsafe --status-file {self.path}: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot write --status-file {self.path}: {exc.strerror or exc}") from None
        owner = self.live_owner()
        if owner is not None:
            raise ConfigError(f"--status-file {self.path} is being written by another processor (pid {owner}); "
                              "give this one a file of its own")
        try:
            self.write(starting_document())
        except (OSError, UnsafePathError) as exc:
            raise ConfigError(f"cannot write --status-file {self.path}: {getattr(exc, 'strerror', None) or exc}") from None

    def open_directory(self) -> None:
        self.close()
        self.directory_fd = open_private_directory(self.path.parent)

    def live_owner(self) -> Optional[int]:
        """The pid of another processor on this host that keeps this file fresh, if any."""
        try:
            document = load_status(self.path)
        except StatusError:
            return None
        fresh = time.time() - float(document.get("updated_at_unix") or 0) < DEFAULT_MAX_AGE_SECONDS
        running = document.get("state") in ("starting", "waiting_for_database", "running", "stopping")
        if fresh and running and document.get("pid") != os.getpid() and supervisor_alive(document):
            return document.get("pid")
        return None

    def write(self, document: Dict) -> None:
        """Raises OSError (disk full...) or UnsafePathError; the caller decides what that
        means. A directory removed meanwhile (a tmp cleaner) is made again: the file is the
        liveness probe's only evidence, and without it a healthy pod would be restarted."""
        data = json.dumps(document, indent=1, sort_keys=False).encode("utf-8")
        if self.directory_fd is None:
            self.open_directory()
        try:
            write_file(self.directory_fd, self.path.name, data, self.temporary)
        except FileNotFoundError:
            self.open_directory()
            write_file(self.directory_fd, self.path.name, data, self.temporary)

    def remove_temporary(self) -> None:
        if self.directory_fd is None:
            return
        try:
            os.unlink(self.temporary, dir_fd=self.directory_fd)
        except OSError:
            pass

    def close(self) -> None:
        if self.directory_fd is not None:
            os.close(self.directory_fd)
            self.directory_fd = None
