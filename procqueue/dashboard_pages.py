"""The dashboard's HTML: plain server-rendered pages, no script, no external asset.

Every value from the database goes through `_e` (html.escape): a task may be named or
argued with markup. What a page shows of arguments and errors is decided by the caller
(`View.private`): without a login, names, states, counts and times only.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Dict, Iterable, List, Optional, Sequence
from urllib.parse import urlencode

from .admin import RETRYABLE_STATES, Schedule, TaskSummary
from .records import HeldTask, ProcessorRecord, QueueStats, RunRecord, TaskRecord, TaskState, is_no_timeout

TASK_STATES = tuple(state.value for state in TaskState)
CANCELLABLE_STATES = ("queued", "running")  # a running one: its processor stops it
# Processors silent this long are shown as such (a peer rescues their tasks at 20 s).
SILENT_PROCESSOR_SECONDS = 10
CHART_WIDTH, CHART_HEIGHT, CHART_MARGIN = 720, 180, 36
ONE_HOUR = 3600.0
SHORTEST_WINDOW = 300.0

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:8px 20px;display:flex;gap:20px;align-items:center}
header a{color:#fff;text-decoration:none}header .brand{font-weight:700}
header form{margin-left:auto}main{padding:12px 20px;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:24px}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e3e6ea;vertical-align:top}
th{background:#eef1f4;font-weight:600}td.num{text-align:right}
pre{background:#fff;border:1px solid #e3e6ea;padding:8px;overflow:auto;max-height:400px;margin:0}
.state{padding:1px 6px;border-radius:3px;background:#e3e6ea}
.s-failed,.s-missed,.s-disabled{background:#f8d7da}.s-succeeded{background:#d4edda}
.s-running{background:#cce5ff}.s-queued{background:#fff3cd}
.note{color:#5a6570}.flash{background:#d4edda;padding:6px 10px}.error{background:#f8d7da;padding:6px 10px}
svg{background:#fff;border:1px solid #e3e6ea}
.waiting{stroke:#e76f51;fill:none;stroke-width:2}.running{stroke:#2a9d8f;fill:none;stroke-width:2}
.axis{stroke:#98a2ad}.grid{stroke:#eef1f4}svg text{font-size:11px;fill:#5a6570}
.legend-waiting{color:#e76f51}.legend-running{color:#2a9d8f}
form.inline{display:inline}button{cursor:pointer}
"""


@dataclass(frozen=True)
class View:
    """Who is looking: what a page may show, and what its forms must carry."""

    token_configured: bool
    private: bool  # logged in: arguments, errors and buttons
    csrf: str = ""  # the session's CSRF value, for the forms of a logged-in page
    nonce: str = ""  # this response's CSP nonce, for the one <style>


@dataclass(frozen=True)
class Sample:
    """Queue depth, all queues together, at one moment (Unix seconds)."""

    at: float
    waiting: int
    running: int


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _time(value: Optional[datetime]) -> str:
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _ago(value: Optional[datetime], now: datetime) -> str:
    if value is None:
        return "-"
    seconds = (now - value).total_seconds()
    if seconds < 0:
        return f"in {_duration(-seconds)}"
    return f"{_duration(seconds)} ago"


def _axis_label(seconds: float) -> str:
    """A chart tick, exact (225 s is 3m45s, not a rounded "4 min")."""
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds}s"
    minutes, rest = divmod(seconds, 60)
    return f"{minutes} min" if rest == 0 else f"{minutes}m{rest:02d}s"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _state(state: str) -> str:
    return f'<span class="state s-{_e(state)}">{_e(state)}</span>'


def _task_link(task_id: int) -> str:
    return f'<a href="/tasks/{int(task_id)}">{int(task_id)}</a>'


def _table(headings: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    """`rows` hold HTML already escaped."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="note">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headings)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _first_line(text: Optional[str]) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- the frame ---------------------------------------------------------------------------


def layout(title: str, body: str, view: View, *, refresh_seconds: Optional[int] = None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_seconds)}">' if refresh_seconds else ""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_e(title)} - procqueue</title>{refresh}'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<style nonce="{_e(view.nonce)}">{_STYLE}</style></head><body>'
        f"<header>{_navigation(view)}</header><main><h1>{_e(title)}</h1>{body}</main></body></html>\n"
    )


def _navigation(view: View) -> str:
    links = ('<a class="brand" href="/">procqueue</a><a href="/">Overview</a>'
             '<a href="/tasks">Tasks</a><a href="/tasks?state=failed">Failures</a><a href="/schedules">Schedules</a>')
    if view.private:
        return links + (f'<form method="post" action="/logout">{_csrf_field(view)}'
                        '<button type="submit">Log out</button></form>')
    if view.token_configured:
        return links + '<a href="/login" class="login">Log in</a>'
    return links + '<span class="note">read-only</span>'


def _csrf_field(view: View) -> str:
    return f'<input type="hidden" name="csrf" value="{_e(view.csrf)}">'


# -- the pages ---------------------------------------------------------------------------


def overview_page(view: View, *, now: datetime, samples: Sequence[Sample], stats: Optional[QueueStats],
                  processors: Sequence[ProcessorRecord], held: Sequence[HeldTask],
                  failures: Sequence[TaskSummary]) -> str:
    body = (
        "<h2>Queue depth</h2>" + depth_chart(samples, now.timestamp())
        + "<h2>Queues</h2>" + _queues_table(stats)
        + "<h2>Processors and their workers</h2>" + _processors_table(processors, held, now)
        + '<h2>Recent failures <a class="note" href="/tasks?state=failed">(all)</a></h2>'
        + _task_table(failures, view, now, empty="No failed tasks.")
    )
    return layout("Overview", body, view, refresh_seconds=10)


def depth_chart(samples: Sequence[Sample], now: float) -> str:
    """Waiting and running tasks over the last hour, as inline SVG; labelled with how much
    history there really is, for the dashboard process keeps it in memory only."""
    recent = [s for s in samples if now - s.at <= ONE_HOUR]
    if not recent:
        return '<p class="note">No sample yet: the queue is read every 10 seconds.</p>'
    span = now - recent[0].at
    label = ("the last hour" if span >= ONE_HOUR - 60 else
             f"the last {_duration(span)} only: the dashboard has been sampling the queue since then")
    window = min(ONE_HOUR, max(SHORTEST_WINDOW, span))  # less history: a narrower window, not a squeezed line
    top = max(1, max(max(s.waiting, s.running) for s in recent))
    plot_w, plot_h = CHART_WIDTH - 2 * CHART_MARGIN, CHART_HEIGHT - CHART_MARGIN - 10

    def point(at: float, value: int) -> str:
        x = CHART_MARGIN + plot_w * (1 - (now - at) / window)
        y = CHART_MARGIN // 2 + plot_h * (1 - value / top)
        return f"{x:.1f},{y:.1f}"

    waiting = " ".join(point(s.at, s.waiting) for s in recent)
    running = " ".join(point(s.at, s.running) for s in recent)
    base = CHART_MARGIN // 2 + plot_h
    ticks = "".join(
        f'<text x="{CHART_MARGIN + plot_w * (1 - quarter / 4):.0f}" y="{base + 16}" text-anchor="middle">'
        f'{"now" if quarter == 0 else "-" + _axis_label(window * quarter / 4)}</text>' for quarter in (4, 3, 2, 1, 0))
    last = recent[-1]
    return (
        f'<svg role="img" aria-label="queue depth" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" xmlns="http://www.w3.org/2000/svg">'
        f'<line class="grid" x1="{CHART_MARGIN}" y1="{CHART_MARGIN // 2}" x2="{CHART_WIDTH - CHART_MARGIN}" '
        f'y2="{CHART_MARGIN // 2}"/>'
        f'<line class="axis" x1="{CHART_MARGIN}" y1="{base}" x2="{CHART_WIDTH - CHART_MARGIN}" y2="{base}"/>'
        f'<text x="{CHART_MARGIN - 4}" y="{CHART_MARGIN // 2 + 4}" text-anchor="end">{top}</text>'
        f'<text x="{CHART_MARGIN - 4}" y="{base + 4}" text-anchor="end">0</text>{ticks}'
        f'<polyline class="waiting" points="{waiting}"/><polyline class="running" points="{running}"/></svg>'
        f'<p class="note">Over {_e(label)}. <span class="legend-waiting">&#9632; waiting</span> '
        f'(due, not started): {last.waiting}; <span class="legend-running">&#9632; running</span>: {last.running}.</p>'
    )


def _queues_table(stats: Optional[QueueStats]) -> str:
    if stats is None:
        return '<p class="note">Not read from the database yet.</p>'
    rows = []
    linked = [(f'<a href="/tasks?{urlencode({"queue": queue})}">{_e(queue)}</a>', depth)
              for queue, depth in stats.queues.items()]
    for label, depth in [*linked, ("all queues", stats.total())]:
        age = "-" if depth.oldest_waiting_age_seconds is None else _duration(depth.oldest_waiting_age_seconds)
        rows.append([label, *(
            f"{n}" for n in (depth.waiting, depth.scheduled, depth.running, depth.failed)), _e(age)])
    return _table(["queue", "waiting", "scheduled", "running", "failed", "oldest waiting"], rows, "No tasks.")


def _processors_table(processors: Sequence[ProcessorRecord], held: Sequence[HeldTask], now: datetime) -> str:
    by_processor: Dict[str, List[HeldTask]] = {}
    for task in held:
        by_processor.setdefault(task.locked_by or "", []).append(task)
    rows = []
    for processor in processors:
        silent = (now - processor.heartbeat_at).total_seconds()
        beat = _ago(processor.heartbeat_at, now) + (" (silent)" if silent > SILENT_PROCESSOR_SECONDS else "")
        tasks = by_processor.pop(processor.id, [])
        rows.append([_e(processor.hostname), _e(processor.pid), _e(processor.id), _e(_ago(processor.started_at, now)),
                     _e(beat), _held_list(tasks, now)])
    for owner, tasks in by_processor.items():  # held by a processor no longer registered
        rows.append(["-", "-", _e(owner or "-"), "-", "gone", _held_list(tasks, now)])
    return _table(["host", "pid", "processor", "started", "heartbeat", "running tasks (worker: task)"], rows,
                  "No processor is registered.")


def _held_list(tasks: Sequence[HeldTask], now: datetime) -> str:
    if not tasks:
        return '<span class="note">idle</span>'
    items = []
    for task in tasks:
        since = f"started {_ago(task.started_at, now)}" if task.started_at else "claimed, not started"
        items.append(f"worker {_e(task.locked_worker)}: {_task_link(task.id)} {_e(task.task_name)} "
                     f'<span class="note">({_e(since)})</span>')
    return "<br>".join(items)


def _task_table(tasks: Sequence[TaskSummary], view: View, now: datetime, *, empty: str) -> str:
    headings = ["id", "task", "queue", "state", "attempts", "created", "finished"]
    if view.private:
        headings.append("error")
    rows = []
    for task in tasks:
        row = [_task_link(task.id), _e(task.task_name), _e(task.queue), _state(task.state),
               f"{task.attempts}/{task.max_attempts}", _e(_ago(task.created_at, now)), _e(_ago(task.finished_at, now))]
        if view.private:
            row.append(_e(_first_line(task.last_error)))
        rows.append(row)
    return _table(headings, rows, empty)


def tasks_page(view: View, *, now: datetime, tasks: Sequence[TaskSummary], state: str, name: str, queue: str,
               limit: int) -> str:
    options = "".join(f'<option value="{s}"{" selected" if s == state else ""}>{s}</option>'
                      for s in ("", *TASK_STATES))
    form = (f'<form method="get" action="/tasks">State <select name="state">{options}</select> '
            f'Name <input name="name" value="{_e(name)}"> Queue <input name="queue" value="{_e(queue)}"> '
            '<button type="submit">Filter</button></form>')
    shown = f'<p class="note">The newest {limit} matching tasks at most.</p>'
    return layout("Tasks", form + shown + _task_table(tasks, view, now, empty="No matching task."), view)


def task_page(view: View, *, now: datetime, task: TaskRecord, runs: Sequence[RunRecord], result: str = "") -> str:
    state = task.state.value
    facts = [
        ("state", _state(state)), ("queue", _e(task.queue)), ("priority", _e(task.priority)),
        ("attempts", f"{task.attempts} of {task.max_attempts}"), ("created", _e(_time(task.created_at))),
        ("run at", _e(_time(task.run_at))), ("started", _e(_time(task.started_at))),
        ("finished", _e(_time(task.finished_at))),
        ("timeout", "none" if is_no_timeout(task.timeout_seconds) else f"{task.timeout_seconds:g} s"),
        ("recurring slot", _e(_time(task.recurring_slot))),
        ("held by", _e(f"{task.locked_by} worker {task.locked_worker}" if task.locked_by else "-")),
    ]
    if view.private:
        facts += [("args", f"<pre>{_e(_json(task.args))}</pre>"), ("kwargs", f"<pre>{_e(_json(task.kwargs))}</pre>")]
    body = (f'<p class="flash">{_e(result)}</p>' if result else "") + _buttons(view, task)
    body += "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in facts) + "</table>"
    if view.private and task.last_error:
        body += f"<h2>Last error</h2><pre>{_e(task.last_error)}</pre>"
    elif not view.private:
        body += ('<p class="note">Arguments and errors are hidden: they can hold personal data or secrets'
                 + (" (log in to see them)." if view.token_configured else ".") + "</p>")
    body += "<h2>Runs</h2>" + _runs(view, runs)
    title = f"Task {task.id}: {task.task_name}"
    return layout(title, body, view, refresh_seconds=5 if state in ("queued", "running") else None)


def _json(value: object) -> str:
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _buttons(view: View, task: TaskRecord) -> str:
    if not view.private:
        return ""
    buttons = []
    if task.state.value in RETRYABLE_STATES and task.recurring_slot is None:  # admin.retry's rules
        buttons.append(_post_button(f"/tasks/{task.id}/retry", "Retry", view))
    if task.state.value in CANCELLABLE_STATES:
        buttons.append(_post_button(f"/tasks/{task.id}/cancel", "Cancel", view))
    return f"<p>{' '.join(buttons)}</p>" if buttons else ""


def _post_button(action: str, label: str, view: View) -> str:
    return (f'<form class="inline" method="post" action="{_e(action)}">{_csrf_field(view)}'
            f'<button type="submit" name="do" value="{_e(label.lower())}">{_e(label)}</button></form>')


def _runs(view: View, runs: Sequence[RunRecord]) -> str:
    rows = []
    for run in runs:
        where = f"{run.processor or '-'} worker {run.worker}" if run.worker is not None else run.processor or "-"
        row = [_e(run.attempt), _state(run.outcome.value), _e(_time(run.started_at)), _e(_time(run.finished_at)),
               _e(f"by {run.actor}" if run.actor else where)]
        if view.private:
            row.append(f"<pre>{_e(run.error)}</pre>" if run.error else "")
        rows.append(row)
    headings = ["attempt", "outcome", "started", "finished", "where / by"] + (["error"] if view.private else [])
    return _table(headings, rows, "No run yet.")


def schedules_page(view: View, *, now: datetime, schedules: Sequence[Schedule], result: str = "") -> str:
    rows = [[_e(s.task_name), _e(_every(s.run_every)),
             "-" if s.disabled else _e(f"{_time(s.next_run_at)} ({_ago(s.next_run_at, now)})"),
             _schedule_status(view, s, now), _e(s.consecutive_failures),
             _task_link(s.last_task_id) if s.last_task_id is not None else "-",
             _state(s.last_outcome) if s.last_outcome else "-", _e(_ago(s.last_started_at, now)),
             _e(_ago(s.last_finished_at, now))] for s in schedules]
    table = _table(["task", "every", "next run", "status", "failed in a row", "latest run", "its state", "started",
                    "finished"], rows, "No recurring schedule is registered.")
    flash = f'<p class="flash">{_e(result)}</p>' if result else ""
    note = ('<p class="note">A schedule whose runs fail four times in a row (raise, or time out) is disabled: '
            'no slot runs until an operator enables it.</p>')
    return layout("Recurring schedules", flash + table + note, view)


def _schedule_status(view: View, schedule: Schedule, now: datetime) -> str:
    """Enabled, or disabled since when, with the button to enable it for a logged-in operator
    (as `procqueue recurring enable`)."""
    if not schedule.disabled:
        return "enabled"
    status = f'{_state("disabled")} {_e(_ago(schedule.disabled_at, now))}'
    if not view.private:
        return status
    return (f'{status} <form class="inline" method="post" action="/schedules/enable">{_csrf_field(view)}'
            f'<input type="hidden" name="name" value="{_e(schedule.task_name)}">'
            '<button type="submit">Enable</button></form>')


def _every(interval: timedelta) -> str:
    return _duration(interval.total_seconds()).replace(" ago", "")


def login_page(view: View, *, error: str = "") -> str:
    if not view.token_configured:
        body = ('<p>No dashboard token is configured: this dashboard is read-only. Set PROCQUEUE_DASHBOARD_TOKEN '
                'or --dashboard-token-file to see arguments and errors and to retry or cancel tasks.</p>')
        return layout("Log in", body, view)
    body = (f'<p class="error">{_e(error)}</p>' if error else "") + (
        '<form method="post" action="/login"><label>Dashboard token '
        '<input type="password" name="token" autocomplete="current-password" autofocus></label> '
        '<button type="submit">Log in</button></form>')
    return layout("Log in", body, view)


def message_page(view: View, title: str, message: str) -> str:
    return layout(title, f"<p>{_e(message)}</p>", view)
