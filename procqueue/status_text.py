"""The status document as a person reads it: what `procqueue status` prints."""

from __future__ import annotations

from typing import Optional

from .records import is_no_timeout


def render_text(document: dict, now: float) -> str:
    """The status document as a person reads it: a header, the queue, a table of workers."""
    lines = [header_line(document, now), f"database: {document.get('config', {}).get('database', '?')}"
             + (f"   metrics: {document['metrics_url']}" if document.get("metrics_url") else ""),
             queue_line(document.get("queue"), now), ""]
    rows = [("SLOT", "PID", "STATE", "HEARTBEAT", "TASK", "RUNNING", "DONE", "FAILED", "RESTARTS", "RSS")]
    rows += [worker_row(worker) for worker in document.get("workers", [])]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    workers = document.get("workers", [])
    lines += [""] + [f"STUCK worker {w.get('slot')}: {w['stuck']}" for w in workers if w.get("stuck")]
    lines += [f"FAILING slot {w.get('slot')}: {w['failed_starts']} workers in a row died while starting"
              if w["failed_starts"] > 1 else f"FAILING slot {w.get('slot')}: its last worker died while starting"
              for w in workers if (w.get("failed_starts") or 0) > 0]
    totals = document.get("totals", {})
    restarts = totals.get("restarts", {})
    lines.append(f"restarts: stuck {restarts.get('stuck', 0)}, crashed {restarts.get('crashed', 0)}, "
                 f"recycled {restarts.get('recycled', 0)}; tasks lost {totals.get('tasks_lost', 0)}, "
                 f"rescued from dead processors {totals.get('tasks_rescued', 0)}")
    return "\n".join(lines)


def header_line(document: dict, now: float) -> str:
    age = now - document.get("updated_at_unix", 0)
    up = document.get("updated_at_unix", 0) - document.get("started_at_unix", 0)
    return (f"processor {document.get('processor_id')} (pid {document.get('pid')}) on {document.get('hostname')}: "
            f"{document.get('state')}, up {duration(up)}, status {age:.1f}s old")


def queue_line(queue: Optional[dict], now: float) -> str:
    if not queue:
        return "queue: not read from the database yet"
    oldest = queue.get("oldest_waiting_age_seconds")
    waited = f" (oldest waited {duration(oldest)})" if oldest else ""
    counts = {state: queue.get(state, "?") for state in ("waiting", "scheduled", "running", "failed")}
    return (f"queue: {counts['waiting']} waiting{waited}, {counts['scheduled']} scheduled, "
            f"{counts['running']} running, {counts['failed']} failed   "
            f"(read {now - float(queue.get('checked_at_unix') or now):.0f}s ago)")


def worker_row(worker: dict) -> tuple:
    task = worker.get("task")
    heartbeat = worker.get("heartbeat_age_seconds")
    rss = worker.get("rss_bytes")
    return (
        str(worker.get("slot", "?")), str(worker.get("pid") or "-"), str(worker.get("state", "?")),
        "-" if heartbeat is None or task else f"{heartbeat:.1f}s",
        f"#{task.get('id')} {task.get('name')}" if task else "-",
        f"{duration(task.get('running_seconds', 0))}/{timeout(task.get('timeout_seconds', 0))}" if task else "-",
        str(worker.get("tasks_done", 0)), str(worker.get("tasks_failed", 0)), str(worker.get("restarts", 0)),
        f"{rss / 2**20:.0f} MB" if rss else "-",
    )


def timeout(seconds: float) -> str:
    return "none" if is_no_timeout(seconds) else duration(seconds)


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
