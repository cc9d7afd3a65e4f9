"""The web dashboard over real sockets: `procqueue dashboard` on its own port, and the
dashboard a running processor serves at / on its metrics port (its own process, handed
each connection by the processor's HTTP thread)."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Optional
from urllib.parse import urlencode

import psutil
import pytest

import sample_tasks
from helpers import REPO, SESSION_ID, SESSION_MARKER, http_get, wait_until

TOKEN = "dashboard-token-for-tests-0123456789"
SECRET_ARGUMENT = "card-4111-1111-1111-1111"
SECRET_ERROR = "password=hunter2 rejected"
PAGES = ("/", "/tasks", "/tasks?state=failed", "/tasks/1", "/schedules")


@dataclass
class Answer:
    status: int
    headers: Dict[str, str]
    body: str


def exchange(port: int, method: str, path: str, *, headers: Optional[dict] = None,
             form: Optional[dict] = None) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        body = urlencode(form) if form is not None else None
        sent = dict(headers or {})
        if body is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                      response.read().decode("utf-8", "replace"))
    finally:
        conn.close()


@dataclass
class Browser:
    """What a browser keeps between requests: the session cookie."""

    port: int
    cookie: str = ""
    origin: str = field(default="")

    def __post_init__(self) -> None:
        self.origin = f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> Answer:
        return exchange(self.port, "GET", path, headers={"Cookie": self.cookie} if self.cookie else {})

    def post(self, path: str, form: dict, *, origin: Optional[str] = "same") -> Answer:
        headers = {"Cookie": self.cookie} if self.cookie else {}
        if origin is not None:
            headers["Origin"] = self.origin if origin == "same" else origin
        return exchange(self.port, "POST", path, headers=headers, form=form)

    def log_in(self, token: str = TOKEN) -> Answer:
        answer = self.post("/login", {"token": token})
        if answer.status == 303:
            self.cookie = answer.headers["set-cookie"].split(";", 1)[0]
        return answer

    def csrf(self, path: str) -> str:
        match = re.search(r'name="csrf" value="([0-9a-f]+)"', self.get(path).body)
        assert match, f"no CSRF field on {path}"
        return match.group(1)


class Dashboard:
    """`procqueue dashboard --port 0` as a user runs it."""

    def __init__(self, database_url: str, log_path, token: Optional[str], args=()) -> None:
        env = dict(os.environ, DATABASE_URL=database_url, PROCQUEUE_SCHEMA="procqueue", **{SESSION_MARKER: SESSION_ID})
        env.pop("PROCQUEUE_DASHBOARD_TOKEN", None)
        if token is not None:
            env["PROCQUEUE_DASHBOARD_TOKEN"] = token
        env["PYTHONPATH"] = str(REPO)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "procqueue", "dashboard", "--port", "0", *args], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def port(self) -> int:
        found = wait_until(lambda: re.search(r"url=http://127\.0\.0\.1:(\d+)/", self.log()) or self.proc.poll() is not None,
                           timeout=20, message="dashboard.listening")
        assert self.proc.poll() is None, self.log()
        return int(found.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            assert self.proc.wait(timeout=10) == 0, self.log()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


@pytest.fixture
def start_dashboard(database_url, tmp_path):
    started = []

    def start(token: Optional[str] = TOKEN, *args: str) -> Dashboard:
        dashboard = Dashboard(database_url, tmp_path / f"dashboard-{len(started)}.log", token, args)
        started.append(dashboard)
        return dashboard

    yield start
    for dashboard in started:
        dashboard.stop()


def add_failed_task(db, *, name: str = "billing.charge", args: str = f'["{SECRET_ARGUMENT}"]',
                    queue: str = "default") -> int:
    error = f"Traceback (most recent call last):\n  File \"billing.py\", line 3\nRuntimeError: {SECRET_ERROR}"
    with db.cursor() as cur:
        cur.execute("INSERT INTO procqueue.tasks (task_name, args, queue, state, attempts, max_attempts, last_error, "
                    "finished_at) VALUES (%s, %s, %s, 'failed', 3, 3, %s, now()) RETURNING id",
                    (name, args, queue, error))
        task_id = cur.fetchone()[0]
        cur.execute("INSERT INTO procqueue.task_runs (task_id, task_name, attempt, started_at, outcome, error) "
                    "VALUES (%s, %s, 3, now(), 'failed', %s)", (task_id, name, error))
        cur.execute("INSERT INTO procqueue.recurring_tasks (task_name, run_every, first_run_at, next_run_at) "
                    "VALUES ('reports.nightly', interval '1 day', now(), now() + interval '1 day') "
                    "ON CONFLICT DO NOTHING")
    return task_id


def task_state(db, task_id: int) -> str:
    with db.cursor() as cur:
        cur.execute("SELECT state FROM procqueue.tasks WHERE id = %s", (task_id,))
        return cur.fetchone()[0]


def test_without_a_token_every_page_loads_read_only_with_no_arguments_or_errors(db, start_dashboard):
    task_id = add_failed_task(db)
    port = start_dashboard(token=None).port()
    for path in PAGES:
        answer = exchange(port, "GET", path)
        assert answer.status == 200, (path, answer.body)
        assert SECRET_ARGUMENT not in answer.body and "hunter2" not in answer.body, path
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["content-security-policy"].startswith("default-src 'none'; style-src 'nonce-")
        assert "<script" not in answer.body and "http://" not in answer.body.replace('xmlns="http://www.w3.org', "")
    assert "billing.charge" in exchange(port, "GET", "/").body  # names, states, counts: yes
    assert "reports.nightly" in exchange(port, "GET", "/schedules").body
    assert "read-only" in exchange(port, "GET", "/login").body
    refused = exchange(port, "POST", f"/tasks/{task_id}/retry", headers={"Origin": f"http://127.0.0.1:{port}"},
                       form={"csrf": "x"})
    assert refused.status == 403 and "read-only" in refused.body
    assert task_state(db, task_id) == "failed"


def test_with_the_token_a_login_shows_arguments_and_tracebacks(db, start_dashboard):
    task_id = add_failed_task(db)
    port = start_dashboard().port()
    browser = Browser(port)
    assert SECRET_ARGUMENT not in browser.get(f"/tasks/{task_id}").body
    wrong = browser.log_in("not-the-token-at-all-0000")
    assert wrong.status == 403 and not browser.cookie
    answer = browser.log_in()
    assert answer.status == 303
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    page = browser.get(f"/tasks/{task_id}").body
    assert SECRET_ARGUMENT in page and "hunter2" in page and "Traceback" in page
    assert 'action="/tasks/1/retry"' in page
    logged_out = browser.post("/logout", {"csrf": browser.csrf("/")})
    assert logged_out.status == 303 and "Max-Age=0" in logged_out.headers["set-cookie"]


def test_the_processor_reads_the_token_from_its_file_and_never_shows_it(tmp_path):
    from procqueue.config import processor_config

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = processor_config(dashboard_token_file=token_file, env={})
    assert config.dashboard_token == TOKEN
    assert TOKEN not in repr(config) and TOKEN not in str(config.public_dict())


def test_every_value_is_escaped(db, start_dashboard):
    task_id = add_failed_task(db, name='<script>alert("name")</script>', args='["<script>alert(1)</script>"]',
                              queue="<img src=x onerror=alert(2)>")
    port = start_dashboard().port()
    browser = Browser(port)
    browser.log_in()
    for path in (*PAGES, "/tasks?name=%3Cscript%3E&queue=%3Cb%3E"):
        body = browser.get(path).body
        assert "<script" not in body and "<img" not in body and "<b>" not in body, path
    assert "&lt;script&gt;alert(&quot;name&quot;)" in browser.get(f"/tasks/{task_id}").body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in browser.get(f"/tasks/{task_id}").body


def test_a_post_needs_session_csrf_and_same_origin_and_a_get_changes_nothing(db, start_dashboard):
    task_id = add_failed_task(db)
    port = start_dashboard().port()
    stranger, browser = Browser(port), Browser(port)
    browser.log_in()
    csrf = browser.csrf(f"/tasks/{task_id}")
    retry = f"/tasks/{task_id}/retry"
    assert stranger.post(retry, {"csrf": csrf}).status == 403  # no session
    assert browser.post(retry, {}).status == 403  # no CSRF value
    assert browser.post(retry, {"csrf": "0" * 64}).status == 403  # a wrong one
    assert browser.post(retry, {"csrf": csrf}, origin="http://evil.example").status == 403
    assert browser.post(retry, {"csrf": csrf}, origin=None).status == 403  # neither Origin nor Referer
    assert Browser(port).post("/login", {"token": TOKEN}, origin="http://evil.example").status == 403
    assert browser.get(retry).status == 405
    assert exchange(port, "HEAD", retry, headers={"Cookie": browser.cookie}).status == 405
    assert task_state(db, task_id) == "failed"
    done = browser.post(retry, {"csrf": csrf})
    assert done.status == 303 and done.headers["location"] == f"/tasks/{task_id}?result=retried"
    assert task_state(db, task_id) == "queued"
    assert "Retried" in browser.get(done.headers["location"]).body


def test_a_disabled_schedule_is_shown_and_a_logged_in_operator_can_enable_it(db, start_dashboard):
    with db.cursor() as cur:
        cur.execute("INSERT INTO procqueue.recurring_tasks (task_name, run_every, first_run_at, next_run_at, "
                    "consecutive_failures, disabled_at) VALUES ('reports.nightly', interval '1 day', now(), "
                    "now() - interval '1 hour', 4, now() - interval '1 hour')")
    port = start_dashboard().port()
    stranger, browser = Browser(port), Browser(port)
    page = stranger.get("/schedules").body
    assert 'class="state s-disabled"' in page and "Enable" not in page  # read-only without a login
    browser.log_in()
    page = browser.get("/schedules").body
    assert 'action="/schedules/enable"' in page and 'name="name" value="reports.nightly"' in page
    csrf = browser.csrf("/schedules")
    assert stranger.post("/schedules/enable", {"csrf": csrf, "name": "reports.nightly"}).status == 403
    assert browser.post("/schedules/enable", {"name": "reports.nightly"}).status == 403  # no CSRF value
    assert browser.post("/schedules/enable", {"csrf": csrf, "name": "reports.nightly"},
                        origin="http://evil.example").status == 403
    assert browser.get("/schedules/enable").status == 405
    done = browser.post("/schedules/enable", {"csrf": csrf, "name": "reports.nightly"})
    assert done.status == 303 and done.headers["location"] == "/schedules?result=enabled"
    with db.cursor() as cur:
        cur.execute("SELECT consecutive_failures, disabled_at FROM procqueue.recurring_tasks")
        assert cur.fetchall() == [(0, None)]
    page = browser.get(done.headers["location"]).body
    assert "Enabled: it runs on schedule again" in page and 'class="state s-disabled"' not in page


@pytest.mark.parametrize("setting, expected", [
    ({"token": "short"}, "invalid dashboard token in PROCQUEUE_DASHBOARD_TOKEN: expected at least 16"),
    ({"args": ("--token-file", "/nonexistent/token")}, "invalid value for --token-file: cannot read"),
])
def test_a_bad_token_setting_is_one_line_and_an_exit_code(database_url, tmp_path, setting, expected):
    dashboard = Dashboard(database_url, tmp_path / "dashboard.log", setting.get("token"), setting.get("args", ()))
    assert dashboard.proc.wait(timeout=20) == 2
    dashboard._log.close()
    output = dashboard.log().strip()
    assert output.startswith("procqueue: error: ") and expected in output and "\n" not in output, output


# -- served by a processor -----------------------------------------------------------------


def dashboard_processes(processor) -> list:
    return [child for child in psutil.Process(processor.pid).children()
            if "procqueue.dashboard" in " ".join(child.cmdline())]


def processor_serving_the_dashboard(start_processor):
    """A processor whose dashboard process has served a page: (processor, port, process)."""
    processor = start_processor("--numthreads", "1", "--metrics-port", "0")
    port = processor.metrics_port()
    exchange(port, "GET", "/")
    until_served(port)
    [dashboard] = dashboard_processes(processor)
    return processor, port, dashboard


def until_served(port: int, path: str = "/") -> Answer:
    return wait_until(lambda: (lambda a: a if a.status == 200 else None)(exchange(port, "GET", path)), timeout=20,
                      message=f"{path} answered 200")


@pytest.mark.timeout(90)
def test_a_processor_serves_the_dashboard_from_its_own_process(db, start_processor):
    processor = start_processor("--numthreads", "1", "--metrics-port", "0",
                                extra_env={"PROCQUEUE_DASHBOARD_TOKEN": TOKEN})
    port = processor.metrics_port()
    assert dashboard_processes(processor) == []  # started on demand: nothing until asked
    first = exchange(port, "GET", "/")
    assert first.status == 503 and 'http-equiv="refresh"' in first.body
    assert "Processors and their workers" in until_served(port).body
    [dashboard] = dashboard_processes(processor)
    assert TOKEN not in " ".join(dashboard.cmdline()) and "postgres" not in " ".join(dashboard.cmdline())
    assert http_get(port, "/metrics")[0] == 200 and http_get(port, "/healthz")[0] == 200

    task = sample_tasks.fail_until_retried.delay(args=("through-the-processor",))
    wait_until(lambda: task_state(db, task) == "failed", timeout=20, message="the first run failed")
    browser = Browser(port)
    assert browser.log_in().status == 303
    assert browser.post(f"/tasks/{task}/retry", {"csrf": browser.csrf(f"/tasks/{task}")}).status == 303
    wait_until(lambda: task_state(db, task) == "succeeded", timeout=20, message="the retry succeeded")
    assert "succeeded" in browser.get(f"/tasks/{task}").body
    assert processor.stop() == 0
    assert not dashboard.is_running() or dashboard.status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(90)
def test_a_killed_dashboard_process_is_restarted_and_metrics_carry_on(db, start_processor):
    processor, port, first = processor_serving_the_dashboard(start_processor)
    first.kill()
    first.wait(timeout=10)
    seen = []

    def new_dashboard_serves() -> bool:
        status = exchange(port, "GET", "/tasks").status
        seen.append(status)
        assert http_get(port, "/metrics")[0] == 200  # whatever the dashboard does
        return status == 200 and [p.pid for p in dashboard_processes(processor)] not in ([], [first.pid])

    wait_until(new_dashboard_serves, timeout=30, message=lambda: f"a new dashboard process (answers: {seen})")
    assert 503 in seen  # while it was down, the processor answered for it
    assert processor.stop() == 0


@pytest.mark.timeout(60)
def test_idle_and_half_sent_requests_cannot_shut_the_dashboard_out(db, start_dashboard):
    from procqueue import dashboard as dashboard_module

    port = start_dashboard().port()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(dashboard_module.MAX_CONNECTIONS + 20)]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as half:
            half.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\ntoken=")  # and no more
            started = time.monotonic()
            assert exchange(port, "GET", "/").status == 200
            assert time.monotonic() - started < 3.0
            with contextlib.suppress(ConnectionResetError):
                assert half.recv(1) == b""  # closed at the request deadline, unanswered
            assert time.monotonic() - started < dashboard_module.REQUEST_SECONDS + 3
    finally:
        for sock in idle:
            sock.close()


def fill_the_channel(port: int, handed: list) -> None:
    """Send dashboard requests, 20 at a time, until the processor answers one 503 itself:
    the channel to the (stopped) dashboard process is full. The sockets go in `handed`."""
    def answered_busy() -> bool:
        batch = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        handed.extend(batch)
        for sock in batch:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        batch[-1].settimeout(1.0)
        try:
            return b" 503 " in batch[-1].recv(200)
        except socket.timeout:  # handed over: it waits in the stopped process's channel
            return False

    wait_until(answered_busy, timeout=30, message="the full channel answered for by the processor")


@pytest.mark.timeout(120)
def test_a_hung_dashboard_process_is_answered_for_then_killed_and_replaced(db, start_processor):
    from procqueue.dashboard_process import HUNG_SECONDS

    processor, port, hung = processor_serving_the_dashboard(start_processor)
    hung.suspend()  # SIGSTOP: alive, taking nothing
    handed = []
    try:
        fill_the_channel(port, handed)
        assert http_get(port, "/metrics")[0] == 200
        wait_until(lambda: hung.pid not in [p.pid for p in dashboard_processes(processor)],
                   timeout=HUNG_SECONDS + 10, message="the hung dashboard process killed")
        until_served(port)
        assert processor.log().count("dashboard.hung") == 1
    finally:
        for sock in handed:
            sock.close()
    assert processor.stop() == 0


@pytest.mark.timeout(120)
def test_a_burst_that_filled_the_channel_once_is_no_hang(db, start_processor):
    from procqueue.dashboard_process import HUNG_SECONDS

    processor, port, dashboard = processor_serving_the_dashboard(start_processor)
    dashboard.suspend()
    handed = []
    try:
        fill_the_channel(port, handed)
        full_at = time.monotonic()
        dashboard.resume()  # it takes what waits, then nothing more comes for a while
        wait_until(lambda: "dashboard.hung" in processor.log() or time.monotonic() > full_at + HUNG_SECONDS + 3,
                   timeout=HUNG_SECONDS + 15, message="the hang deadline to pass")
    finally:
        for sock in handed:
            sock.close()
    assert "dashboard.hung" not in processor.log()
    assert [p.pid for p in dashboard_processes(processor)] == [dashboard.pid]
    assert until_served(port).status == 200
    assert processor.stop() == 0


@pytest.mark.timeout(60)
def test_no_dashboard_leaves_the_metrics_port_to_the_monitoring_endpoints(db, start_processor):
    processor = start_processor("--numthreads", "1", "--metrics-port", "0", "--no-dashboard")
    port = processor.metrics_port()
    assert exchange(port, "GET", "/").status == 404
    assert http_get(port, "/metrics")[0] == 200
    assert dashboard_processes(processor) == []
    assert processor.stop() == 0
