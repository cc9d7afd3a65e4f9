"""The supervisor's HTTP endpoints: /metrics, /healthz, /status and /monitoring.

Served by daemon threads of the supervisor: one accepts, one per connection answers (at
most MAX_CONNECTIONS at once, each within REQUEST_DEADLINE_SECONDS in all, so a client
that trickles bytes cannot keep a probe waiting, nor the supervisor from exiting). The
supervisor keeps forking workers while these threads run, and fork() copies only the
forking thread: a lock one of them held at that instant would stay locked for ever in the
child. So they touch nothing a worker uses: it logs nothing (the logging and stderr locks), opens no database connection
(libpq and OpenSSL state), and imports nothing after it starts (the import locks); the
only lock it takes is the metrics store's, which workers never touch. What it serves
comes from the supervisor's latest status document, replaced whole once a second, and
from the metrics files.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from . import health
from .errors import ConfigError

ENDPOINTS = ("/metrics", "/healthz", "/status", "/monitoring")
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
        if path == "/status":
            document = self.status_source()
            return (200, document) if document else (503, {"error": "no status yet"})
        if path == "/monitoring":
            return self.monitoring()
        return 404, {"error": f"no endpoint {path}", "endpoints": list(ENDPOINTS)}

    def healthz(self, query: str) -> Tuple[int, dict]:
        """The verdict of `procqueue-health`, with its options as query parameters."""
        try:
            max_age, min_healthy = _health_options(parse_qs(query))
        except ValueError as exc:
            return 400, {"error": str(exc)}
        document = self.status_source()
        if document is None:
            return 503, {"healthy": False, "reasons": ["no status yet"]}
        verdict = health.judge(document, now=time.time(), max_age=max_age, min_healthy_workers=min_healthy)
        body = {"healthy": verdict.healthy, "reasons": verdict.reasons, "state": verdict.state,
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
    daemon_threads = True  # never waited for at exit: each ends by its deadline anyway

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.connection_slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address) -> None:
        if not self.connection_slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: this one is turned away
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_slots.release()

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
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.connection.settimeout(_remaining(self.deadline))  # sendall: a total, not per chunk
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        """Silent: logging from this thread could leave a lock held across a fork."""
