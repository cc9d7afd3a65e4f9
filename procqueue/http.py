"""The supervisor's HTTP endpoints: /metrics, /healthz, /status and /monitoring.

Served by daemon threads of the supervisor: one accepts, one per connection answers (at
most MAX_CONNECTIONS at once, each within REQUEST_DEADLINE_SECONDS in all, so a client
that trickles bytes cannot keep a probe waiting, nor the supervisor from exiting).

The supervisor keeps forking workers while these threads run, and fork() copies only the
forking thread: a lock one of them held at that instant would stay locked for ever in the
child. So these threads touch nothing a worker uses: they log nothing (the logging and
stderr locks), open no database connection (libpq and OpenSSL state) and import nothing
once started (the import locks). The only lock they take is the metrics store's, which
workers never touch. What they serve comes from the supervisor's latest status document,
replaced whole once a second, and from the metrics files.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from . import health
from .errors import ConfigError

ENDPOINTS = ("/metrics", "/healthz", "/readyz", "/status", "/monitoring")
# From accept to the last byte sent, whatever the client does: reading the request and
# writing the answer both count against it.
REQUEST_DEADLINE_SECONDS = 5.0
# Connections answered at once; more are closed on arrival. Prometheus and the kubelet
# need one or two; the bound is against a flood of idle connections.
MAX_CONNECTIONS = 16
# Queue depth is read every few seconds; older than this, the database has not answered
# for a while and /monitoring says so instead of repeating an old number.
MONITORING_STALE_SECONDS = 30.0


class MonitoringServer:
    """Listens on host:port and answers from `status_source` and `metrics_source`."""

    def __init__(self, host: str, port: int, *, status_source: Callable[[], Optional[dict]],
                 metrics_source: Callable[[str], Tuple[bytes, str]]) -> None:
        self.status_source = status_source
        self.metrics_source = metrics_source
        server_class = _IPv6Server if ":" in host else _Server
        try:
            self.server = server_class((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on --metrics-host {host} --metrics-port {port}: {exc.strerror or exc}"
            ) from None
        self.server.app = self  # type: ignore[attr-defined]
        self.thread: Optional[threading.Thread] = None

    @property
    def address(self) -> Tuple[str, int]:
        host, port = self.server.server_address[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
        return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"

    def start(self) -> None:
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="procqueue-http", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()

    def close_in_child(self) -> None:
        """In a freshly forked worker: let go of the listening socket and the open
        connections, which are the supervisor's. Kept, they would hold the port after the
        supervisor is gone (an orphaned worker lives on for a while) and keep answered
        connections from closing. close() only: shutdown() would cut them for the
        supervisor too."""
        self.server.socket.close()
        for connection in list(self.server.connections):
            connection.close()

    # -- the endpoints -----------------------------------------------------------------

    def respond(self, path: str, query: str, accept: str) -> Tuple[int, str, bytes]:
        """(HTTP status, content type, body) for a GET of `path`."""
        if path == "/metrics":
            body, content_type = self.metrics_source(accept)
            return 200, content_type, body
        status, payload = self.json_endpoint(path, query)
        return status, "application/json", (json.dumps(payload, indent=1) + "\n").encode("utf-8")

    def json_endpoint(self, path: str, query: str) -> Tuple[int, dict]:
        if path == "/healthz":
            return self.healthz(query)
        if path == "/readyz":
            return self.healthz(query, ready=True)
        if path == "/status":
            document = self.status_source()
            return (200, document) if document else (503, {"error": "no status yet"})
        if path == "/monitoring":
            return self.monitoring()
        return 404, {"error": f"no endpoint {path}", "endpoints": list(ENDPOINTS)}

    def healthz(self, query: str, ready: bool = False) -> Tuple[int, dict]:
        """The verdict of `procqueue-health` (with `ready`, of `procqueue-health --ready`),
        with its options as query parameters."""
        try:
            max_age, min_healthy = _health_options(parse_qs(query))
        except ValueError as exc:
            return 400, {"error": str(exc)}
        document = self.status_source()
        if document is None:
            return 503, {"healthy": False, "reasons": ["no status yet"]}
        verdict = health.judge(document, now=time.time(), max_age=max_age, min_healthy_workers=min_healthy,
                               ready=ready)
        body = {("ready" if ready else "healthy"): verdict.healthy, "reasons": verdict.reasons, "state": verdict.state,
                "workers_healthy": verdict.workers_healthy, "workers_replacing": verdict.workers_replacing,
                "workers": verdict.workers}
        return (200 if verdict.healthy else 503), body

    def monitoring(self) -> Tuple[int, dict]:
        """Flagsmith's monitoring answer: how many tasks are due and not yet started."""
        document = self.status_source()
        queue = document.get("queue") if document else None
        if not queue:
            return 503, {"waiting": None, "error": "queue depth not read from the database yet"}
        age = time.time() - queue["checked_at_unix"]
        if age > MONITORING_STALE_SECONDS:
            return 503, {"waiting": queue["waiting"], "error": f"queue depth last read from the database "
                                                               f"{age:.0f}s ago (is the database reachable?)"}
        return 200, {"waiting": queue["waiting"]}


def _health_options(params: dict) -> Tuple[float, int]:
    max_age = params.get("max_age", [str(health.DEFAULT_MAX_AGE_SECONDS)])[-1]
    min_healthy = params.get("min_healthy_workers", [str(health.DEFAULT_MIN_HEALTHY_WORKERS)])[-1]
    try:
        max_age_value = float(max_age)
        assert 0 < max_age_value < float("inf")
    except (ValueError, AssertionError):
        raise ValueError(f"invalid max_age: {max_age!r} (expected seconds > 0)") from None
    if not min_healthy.isdigit():
        raise ValueError(f"invalid min_healthy_workers: {min_healthy!r} (expected an integer >= 0)")
    return max_age_value, int(min_healthy)


class _Server(ThreadingHTTPServer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.connection_slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.connections: set = set()  # open ones, for a forked worker to close

    def process_request(self, request, client_address) -> None:
        """A daemon thread per connection, named as ours: the supervisor warns about
        threads it does not know before each fork, and these are built to be fork-safe.
        Never waited for at exit: each ends by its deadline anyway."""
        if not self.connection_slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: this one is turned away
            return
        self.connections.add(request)
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="procqueue-http-connection", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: this connection is turned away too
            self.connection_slots.release()
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_slots.release()

    def close_request(self, request) -> None:
        self.connections.discard(request)
        super().close_request(request)

    def handle_error(self, request, client_address) -> None:
        """Silent, as log_message: a client that hangs up mid-answer is its own business,
        and a traceback on stderr from this thread could hold a lock across a fork."""


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _DeadlineReader(io.RawIOBase):
    """The request socket, read with what is left of the connection's deadline as the
    timeout of each read: a byte every few seconds no longer keeps a connection open."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.sock.settimeout(_remaining(self.deadline))
        return self.sock.recv_into(buffer)


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise socket.timeout("request deadline passed")
    return remaining


class _Handler(BaseHTTPRequestHandler):
    server_version = "procqueue"

    def setup(self) -> None:
        self.deadline = time.monotonic() + REQUEST_DEADLINE_SECONDS
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self.deadline))

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        parts = urlsplit(self.path)
        try:
            status, content_type, body = self.server.app.respond(  # type: ignore[attr-defined]
                parts.path, parts.query, self.headers.get("Accept", ""))
        except Exception as exc:  # a bug of ours must cost one request, not the thread
            status, content_type = 500, "text/plain; charset=utf-8"
            body = f"internal error: {type(exc).__name__}: {exc}\n".encode("utf-8")
        self.answer(status, content_type, body)

    def do_POST(self) -> None:  # noqa: N802 (the endpoints are read-only)
        body = (json.dumps({"error": f"{self.command} not allowed: these endpoints answer GET"}) + "\n").encode()
        self.answer(405, "application/json", body, extra_headers="Allow: GET\r\n")

    do_PUT = do_DELETE = do_PATCH = do_POST  # noqa: N815

    def answer(self, status: int, content_type: str, body: bytes, extra_headers: str = "") -> None:
        head = (f"{self.protocol_version} {status} {HTTPStatus(status).phrase}\r\n"
                f"Server: {self.version_string()}\r\n"
                f"Date: {self.date_time_string()}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Cache-Control: no-store\r\n{extra_headers}"
                "Connection: close\r\n\r\n").encode("latin-1")
        # One sendall for the whole answer: its timeout is a total, not a limit per chunk.
        self.connection.settimeout(_remaining(self.deadline))
        self.connection.sendall(head + body)
        self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        """Silent: logging from this thread could leave a lock held across a fork."""
