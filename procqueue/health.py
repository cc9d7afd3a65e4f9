"""The health verdict on a processor, read from its status document.

One verdict, three doors: `procqueue-health` (health_probe, a Kubernetes liveness probe run
every few seconds), `procqueue health`, and the supervisor's `/healthz`. A probe must
answer fast, so this module imports only the standard library, `procqueue.private_files`
and the stuck rule from `procqueue.worker_fate` (which the supervisor judges its workers
with, so the probe and the supervisor never disagree about a worker; it brings
`heartbeat`, `records` and `errors`, all standard library only); never psycopg2, click,
psutil or prometheus-client. tests/test_health.py checks the list.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from .private_files import UnsafePathError, read_owned_file
from .worker_fate import FAILED_STARTS_LIMIT, stuck_reason

STATUS_VERSION = 1
# The supervisor rewrites the status file every second, but its loop may wait up to about
# 15 s on a database that stopped answering (TCP user timeout): a liveness probe must not
# restart a pod for that, since a restart would not bring the database back.
DEFAULT_MAX_AGE_SECONDS = 30.0
# The supervisor refills an empty slot at once, or after a restart backoff of at most
# 30 s for a worker that keeps dying as it starts. Empty for longer than this, with the
# database up, the slot is being neglected. (With the database down a slot stays empty
# until what its last worker held has been released: nothing a restart would fix.)
VACANT_SLOT_LIMIT_SECONDS = 60.0
DEFAULT_MIN_HEALTHY_WORKERS = 1

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2


class StatusError(Exception):
    """The status file cannot be used: missing, unreadable, not a status document."""


@dataclass
class Verdict:
    healthy: bool
    reasons: List[str] = field(default_factory=list)
    state: Optional[str] = None
    age_seconds: Optional[float] = None
    workers_healthy: int = 0
    workers_replacing: int = 0  # empty slots the supervisor is about to refill
    workers: int = 0


def load_status(path: Path, owner: Optional[int] = None) -> dict:
    """The status document at `path`, or StatusError saying in one line what is wrong.
    Trusted only if it belongs to `owner` (by default the user reading it), in a directory
    no one else can write to: otherwise another local user could make a probe lie."""
    named = owner is not None
    owner = os.geteuid() if owner is None else owner
    try:
        text = read_owned_file(Path(path), owner).decode("utf-8")
    except UnsafePathError as exc:
        hint = " (if another user runs the processor, name it with --owner)" if exc.wrong_owner and not named else ""
        raise StatusError(f"status file not trusted: {exc}{hint}") from None
    except FileNotFoundError:
        raise StatusError(f"status file {path} does not exist (is the processor running with this --status-file?)")
    except OSError as exc:
        raise StatusError(f"cannot read status file {path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        raise StatusError(f"status file {path} is not text (not UTF-8)") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise StatusError(f"status file {path} is not valid JSON ({exc})") from None
    if not (isinstance(document, dict) and "version" in document and well_formed(document)):
        raise StatusError(f"status file {path} is not a procqueue status document")
    return document


def well_formed(document: dict) -> bool:
    """The fields the verdict and `procqueue status` read have the types they expect."""
    number = (int, float)
    checks = [
        isinstance(document.get("updated_at_unix", 0), number) and not isinstance(document.get("updated_at_unix"), bool),
        isinstance(document.get("state", ""), str),
        isinstance(document.get("config", {}), dict)
        and _number_or_none((document.get("config") or {}).get("graceperiodms")),
        isinstance(document.get("workers", []), list),
        all(isinstance(worker, dict) and all(_number_or_none(worker.get(key)) for key in _WORKER_NUMBERS)
            and isinstance(worker.get("task") or {}, dict)
            and all(_number_or_none((worker.get("task") or {}).get(key)) for key in _TASK_NUMBERS)
            for worker in document.get("workers", [])),
    ]
    return all(checks)


_WORKER_NUMBERS = ("heartbeat_age_seconds", "vacant_seconds", "failed_starts")
_TASK_NUMBERS = ("running_seconds", "timeout_seconds")


def _number_or_none(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def supervisor_alive(document: dict) -> Optional[bool]:
    """Whether the supervisor that wrote the document still runs, when that can be told:
    only on the host (and in the container) it runs in; None elsewhere."""
    pid = document.get("pid")
    if not pid or document.get("hostname") != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def judge(document: dict, *, now: float, max_age: float, min_healthy_workers: int,
          alive: Callable[[dict], Optional[bool]] = supervisor_alive, ready: bool = False) -> Verdict:
    """Healthy when the supervisor runs, updated the document within `max_age` seconds, no
    worker is stuck, and at least `min_healthy_workers` workers are running. A processor
    starting up (applying a schema may take minutes), waiting for its database, or
    draining is healthy while it runs: restarting it would only make things worse.
    With `ready`, the stricter question of a readiness probe: is it running tasks now,
    which a processor that is starting, waiting for its database or draining is not."""
    if document.get("version") != STATUS_VERSION:
        return Verdict(False, [f"unsupported status document version {document.get('version')!r} "
                               f"(this procqueue reads version {STATUS_VERSION})"])
    verdict = Verdict(True, state=document.get("state"))
    verdict.age_seconds = max(0.0, now - float(document.get("updated_at_unix", 0)))
    if verdict.state == "stopped":
        verdict.reasons.append(f"processor stopped at {document.get('updated_at')}")
    elif alive(document) is False:
        verdict.reasons.append(f"the supervisor (pid {document.get('pid')}) is not running")
    elif verdict.state == "starting":
        pass
    elif verdict.age_seconds > max_age:
        verdict.reasons.append(f"status is {verdict.age_seconds:.1f}s old (max {max_age:g}s): "
                               f"the supervisor (pid {document.get('pid')}) is not updating it")
    elif verdict.state == "running":
        judge_workers(document, verdict, min_healthy_workers)
    if ready and not verdict.reasons:
        verdict.reasons.extend(not_ready_reasons(document, verdict))
    verdict.healthy = not verdict.reasons
    return verdict


def not_ready_reasons(document: dict, verdict: Verdict) -> List[str]:
    if verdict.state != "running":
        return [NOT_READY_STATES.get(str(verdict.state), str(verdict.state))]
    if document.get("database_up") is False:
        return ["the database cannot be reached"]
    if verdict.workers_healthy == 0:
        return ["no worker is running"]
    return []


NOT_READY_STATES = {"starting": "starting", "waiting_for_database": "waiting for the database",
                    "stopping": "stopping"}


def judge_workers(document: dict, verdict: Verdict, min_healthy_workers: int) -> None:
    # The document was true at updated_at; the clock has moved on since, and a worker
    # that has not beaten since is that much more silent now.
    elapsed = verdict.age_seconds or 0.0
    grace = float(document.get("config", {}).get("graceperiodms", 0)) / 1000
    workers = document.get("workers", [])
    verdict.workers = len(workers)
    database_up = document.get("database_up", True) is not False
    for worker in workers:
        failed_starts = worker.get("failed_starts") or 0
        if failed_starts >= FAILED_STARTS_LIMIT and database_up:
            verdict.reasons.append(f"slot {worker.get('slot')}: its last {failed_starts} workers died while "
                                   "starting (see worker.died in the log)")
            continue
        if not worker.get("pid"):
            judge_vacant_slot(worker, verdict, elapsed, database_up=database_up)
            continue
        problem = worker_problem(worker, elapsed, grace)
        if problem:
            verdict.reasons.append(f"worker {worker.get('slot')} (pid {worker.get('pid')}) is stuck: {problem}")
        else:
            verdict.workers_healthy += 1
    # A worker being replaced counts: one replacement must not fail a probe of a
    # processor with one worker, and the supervisor is doing its job.
    if verdict.workers_healthy + verdict.workers_replacing < min_healthy_workers:
        replacing = f", {verdict.workers_replacing} being replaced" if verdict.workers_replacing else ""
        verdict.reasons.append(f"{verdict.workers_healthy} of {verdict.workers} workers healthy{replacing} "
                               f"(at least {min_healthy_workers} required)")


def judge_vacant_slot(worker: dict, verdict: Verdict, elapsed: float, *, database_up: bool) -> None:
    vacant = worker.get("vacant_seconds")
    vacant = None if vacant is None else float(vacant) + elapsed
    if vacant is None or vacant <= VACANT_SLOT_LIMIT_SECONDS or not database_up:
        verdict.workers_replacing += 1
    else:
        verdict.reasons.append(f"slot {worker.get('slot')} has had no worker for {vacant:.1f}s "
                               f"(the supervisor refills a slot within {VACANT_SLOT_LIMIT_SECONDS:g}s)")


def worker_problem(worker: dict, elapsed: float, grace_seconds: float) -> Optional[str]:
    task = worker.get("task")
    if worker.get("state") == "busy" and task:
        overdue = float(task.get("running_seconds", 0)) + elapsed - float(task.get("timeout_seconds", 0))
        return stuck_reason(busy=True, silent_seconds=0.0, overdue_seconds=overdue, task_id=task.get("id"),
                            grace_seconds=grace_seconds)
    silent = float(worker.get("heartbeat_age_seconds") or 0) + elapsed
    return stuck_reason(busy=False, silent_seconds=silent, overdue_seconds=0.0, task_id=None,
                        grace_seconds=grace_seconds)


def check_file(path: Path, *, max_age: float, min_healthy_workers: int, now: Optional[float] = None,
               ready: bool = False, owner: Optional[int] = None) -> Verdict:
    try:
        document = load_status(path, owner)
    except StatusError as exc:
        return Verdict(False, [str(exc)])
    return judge(document, now=time.time() if now is None else now, max_age=max_age,
                 min_healthy_workers=min_healthy_workers, ready=ready)


def summary_line(verdict: Verdict, ready: bool = False) -> str:
    if not verdict.healthy:
        return "; ".join(verdict.reasons)
    word = "ready" if ready else "healthy"
    if verdict.state in NOT_READY_STATES:
        return f"{word}: {NOT_READY_STATES[verdict.state]}, status {verdict.age_seconds:.1f}s old"
    replacing = f", {verdict.workers_replacing} being replaced" if verdict.workers_replacing else ""
    return (f"{word}: {verdict.workers_healthy} of {verdict.workers} workers{replacing}, "
            f"status {verdict.age_seconds:.1f}s old")
