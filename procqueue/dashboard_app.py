"""The dashboard's answers: one request in, one response out, on its own connection.

GET and HEAD only read. Every POST that changes something needs a token configured, its
session cookie, the session's CSRF value and a same-origin Origin/Referer (see
procqueue.dashboard_auth); the login POST needs the token and the same origin.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Deque, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlencode

import psycopg2
import psycopg2.errors

from . import admin
from . import dashboard_pages as pages
from .config import DashboardConfig
from .dashboard_auth import Sessions, expired_cookie, same_origin, session_cookie, session_from
from .db import Connection, connect, first_line
from .errors import DatabaseError
from .logs import log_event
from .queries import Queries
from .records import QueueStats

logger = logging.getLogger("procqueue.dashboard")

# No page waits on the database longer than this: the process answers one request at a time.
STATEMENT_TIMEOUT_SECONDS = 5.0
SAMPLE_SECONDS = 10.0
SAMPLES_KEPT = int(pages.ONE_HOUR / SAMPLE_SECONDS) + 1
LIST_LIMIT = 100
FAILURES_SHOWN = 10
_TASK_PATH = re.compile(r"^/tasks/([0-9]{1,18})(?:/(retry|cancel))?$")
# What admin.retry and admin.cancel said, as the page after the button shows it; any
# other is admin's reason for not doing it, shown only if it reads as one (a crafted
# link cannot put a sentence of its own on the page).
_WHY_NOT = re.compile(r"^(is|has|was|does) [a-z ()]{1,100}$")
_RESULTS = {"retried": "Retried: queued to run now.", "cancelled": "Cancelled: it will not run.",
            "cancelling": "Cancelling: the processor running it stops it within seconds."}
# What admin.enable_recurring said, as the schedules page after the Enable button shows it.
_ENABLE_RESULTS = {"enabled": "Enabled: it runs on schedule again (at once, if a slot passed while it was disabled).",
                   "not-disabled": "It was not disabled (its count of failures is reset).",
                   "gone": "Not done: there is no such schedule (removed meanwhile?)."}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    headers: Dict[str, str]
    body: bytes = b""
    remote: str = "-"

    def param(self, name: str) -> str:
        return parse_qs(self.query).get(name, [""])[-1].strip()

    def form(self, name: str) -> str:
        return parse_qs(self.body.decode("utf-8", "replace")).get(name, [""])[-1]


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: List[Tuple[str, str]] = field(default_factory=list)
    nonce: str = ""


class DashboardApp:
    def __init__(self, config: DashboardConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.queries = Queries(config.database.schema)
        self.sessions = Sessions(config.token, clock=clock)
        self.conn: Optional[Connection] = None
        self.samples: Deque[pages.Sample] = deque(maxlen=SAMPLES_KEPT)
        self.latest_stats: Optional[QueueStats] = None
        self.next_sample = 0.0  # on the monotonic clock

    # -- the database --------------------------------------------------------------------

    def connection(self) -> Connection:
        if self.conn is None or self.conn.closed:
            conn = connect(self.config.database, application_name="procqueue-dashboard", timeout=5)
            try:
                # Behind a transaction-mode pooler a session setting would land on whichever
                # server session it was lent, and stay there: its own query_timeout rules.
                if self.config.database.pooler.keeps_sessions:
                    self.queries.dashboard_session(conn, timeout_seconds=STATEMENT_TIMEOUT_SECONDS)
            except BaseException:
                conn.close()
                raise
            self.conn = conn
        return self.conn

    def forget_connection(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def sample(self, monotonic_now: float) -> None:
        """Read the queue depth every SAMPLE_SECONDS into an hour's ring buffer."""
        if monotonic_now < self.next_sample:
            return
        self.next_sample = monotonic_now + SAMPLE_SECONDS
        try:
            stats = self.queries.queue_stats(self.connection(), timeout_seconds=2.0, now=self.clock())
        except (psycopg2.Error, DatabaseError) as exc:
            self.forget_connection_after(exc)
            return
        self.latest_stats = stats
        total = stats.total()
        self.samples.append(pages.Sample(stats.checked_at, total.waiting, total.running))

    def forget_connection_after(self, exc: Exception) -> None:
        """A statement cut short by its timeout leaves a usable connection; anything else
        may not have, and is reconnected on the next use."""
        if not isinstance(exc, psycopg2.errors.QueryCanceled):
            self.forget_connection()

    # -- requests ------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        session = session_from(request.headers)
        logged_in = self.sessions.valid(session)
        view = pages.View(token_configured=self.sessions.configured, private=logged_in,
                          csrf=self.sessions.csrf_for(session) if logged_in and session else "", nonce=nonce)
        try:
            response = self.route(request, view, session if logged_in else None)
        except (psycopg2.Error, DatabaseError) as exc:
            self.forget_connection_after(exc)
            reason = first_line(exc) if isinstance(exc, psycopg2.Error) else str(exc)
            response = self.page(503, view, pages.message_page(view, "Database unavailable",
                                                               f"The database did not answer: {reason}"))
        response.nonce = nonce
        return response

    def route(self, request: Request, view: pages.View, session: Optional[str]) -> Response:
        path, method = request.path, request.method
        posting = method == "POST"
        task_match = _TASK_PATH.match(path)
        if path == "/login":
            return self.login(request, view) if posting else self.page(200, view, pages.login_page(view))
        if path == "/logout" and posting:
            return self.logout(request, session)
        if task_match and task_match.group(2) and posting:
            return self.act(request, session, int(task_match.group(1)), task_match.group(2))
        if path == "/schedules/enable" and posting:
            return self.enable(request, session)
        if posting or (task_match and task_match.group(2)) or path in ("/logout", "/schedules/enable"):
            return Response(405, b"use the buttons: this path answers POST only\n" if not posting else
                            b"this page answers GET and HEAD\n", "text/plain; charset=utf-8",
                            [("Allow", "POST" if not posting else "GET, HEAD")])
        if path == "/":
            return self.overview(view)
        if path == "/tasks":
            return self.task_list(request, view)
        if path == "/schedules":
            return self.page(200, view, pages.schedules_page(
                view, now=self.now(), schedules=admin.recurring_schedules(self.connection(), self.queries),
                result=_ENABLE_RESULTS.get(request.param("result"), "")))
        if task_match:
            return self.task(request, view, int(task_match.group(1)))
        return self.page(404, view, pages.message_page(view, "Not found", f"No dashboard page at {path}."))

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), timezone.utc)

    @staticmethod
    def page(status: int, view: pages.View, text: str, headers: Optional[List[Tuple[str, str]]] = None) -> Response:
        return Response(status, text.encode("utf-8"), headers=headers or [])

    # -- pages ---------------------------------------------------------------------------

    def overview(self, view: pages.View) -> Response:
        conn = self.connection()
        text = pages.overview_page(
            view, now=self.now(), samples=list(self.samples), stats=self.latest_stats,
            processors=self.queries.dashboard_processors(conn), held=self.queries.dashboard_running(conn),
            failures=admin.list_tasks(conn, self.queries, states=["failed"], limit=FAILURES_SHOWN))
        return self.page(200, view, text)

    def task_list(self, request: Request, view: pages.View) -> Response:
        state, name, queue = request.param("state"), request.param("name"), request.param("queue")
        if state and state not in pages.TASK_STATES:
            return self.page(400, view, pages.message_page(
                view, "Bad filter", f"No task state {state!r}: expected one of {', '.join(pages.TASK_STATES)}."))
        tasks = admin.list_tasks(self.connection(), self.queries, states=[state] if state else [], name=name or None,
                                 queue=queue or None, limit=LIST_LIMIT)
        return self.page(200, view, pages.tasks_page(view, now=self.now(), tasks=tasks, state=state, name=name,
                                                     queue=queue, limit=LIST_LIMIT))

    def task(self, request: Request, view: pages.View, task_id: int) -> Response:
        conn = self.connection()
        task = self.queries.get_task(conn, task_id)
        if task is None:
            return self.page(404, view, pages.message_page(view, "Not found", f"No task with id {task_id}."))
        said = request.param("result")
        result = _RESULTS.get(said, f"Not done: the task {said}." if _WHY_NOT.match(said) else "")
        return self.page(200, view, pages.task_page(view, now=self.now(), task=task,
                                                    runs=self.queries.get_runs(conn, task_id), result=result))

    # -- what changes something ----------------------------------------------------------

    def login(self, request: Request, view: pages.View) -> Response:
        if not self.sessions.configured:
            return self.page(403, view, pages.login_page(view))
        if not same_origin(request.headers):
            return _refused("the login form must be sent from this dashboard's own page")
        if not self.sessions.token_matches(request.form("token")):
            log_event(logger, logging.WARNING, "dashboard.login_refused", remote=request.remote)
            return self.page(403, view, pages.login_page(view, error="That is not the dashboard token."))
        log_event(logger, logging.INFO, "dashboard.login", remote=request.remote)
        return _redirect("/", [("Set-Cookie", session_cookie(self.sessions.new_session()))])

    def logout(self, request: Request, session: Optional[str]) -> Response:
        refusal = self.refusal(request, session)
        if refusal is not None:
            return refusal
        return _redirect("/", [("Set-Cookie", expired_cookie())])

    def act(self, request: Request, session: Optional[str], task_id: int, action: str) -> Response:
        refusal = self.refusal(request, session)
        if refusal is not None:
            return refusal
        act = admin.retry if action == "retry" else admin.cancel
        outcome = act(self.connection(), self.queries, [task_id], by=f"dashboard ({request.remote})")[task_id]
        log_event(logger, logging.INFO, f"dashboard.{action}", task_id=task_id, by=request.remote, outcome=outcome)
        return _redirect(f"/tasks/{task_id}?{urlencode({'result': outcome})}")

    def enable(self, request: Request, session: Optional[str]) -> Response:
        """The Enable button of a schedule its failures disabled (`procqueue recurring enable`)."""
        refusal = self.refusal(request, session)
        if refusal is not None:
            return refusal
        name = request.form("name")
        was_disabled = admin.enable_recurring(self.connection(), self.queries, name)
        outcome = "gone" if was_disabled is None else "enabled" if was_disabled else "not-disabled"
        log_event(logger, logging.INFO, "dashboard.enable", task=name, by=request.remote, outcome=outcome)
        return _redirect(f"/schedules?{urlencode({'result': outcome})}")

    def refusal(self, request: Request, session: Optional[str]) -> Optional[Response]:
        """Why this POST may not change anything, or None when it may."""
        if not self.sessions.configured:
            return _refused("this dashboard is read-only: no dashboard token is configured")
        if session is None:
            return _refused("log in first")
        if not self.sessions.csrf_valid(session, request.form("csrf")):
            return _refused("the form's CSRF value is missing or wrong: reload the page and try again")
        if not same_origin(request.headers):
            return _refused("the request did not come from this dashboard's own page (Origin/Referer)")
        return None


def _redirect(location: str, headers: Optional[List[Tuple[str, str]]] = None) -> Response:
    return Response(303, b"", "text/plain; charset=utf-8", [("Location", location), *(headers or [])])


def _refused(reason: str) -> Response:
    return Response(403, f"refused: {reason}\n".encode(), "text/plain; charset=utf-8")
