"""The supervisor's HTTP endpoints: /metrics, /healthz, /readyz, /status and /monitoring
(and the dashboard's paths, handed to the dashboard's own process: see hand_off).

Served by one daemon thread of the supervisor, which waits on every socket at once
(`selectors`): an idle or slow client costs a file descriptor, never a thread, and holds
nothing that an answer to someone else waits for. Each connection must send its request
head within REQUEST_HEAD_SECONDS and be answered within REQUEST_DEADLINE_SECONDS of being
accepted; at MAX_CONNECTIONS the oldest connection is closed to admit a new one, so a
flood of sockets that send nothing cannot shut out Prometheus or the kubelet: theirs are
the newest and are answered within milliseconds of arriving.

The supervisor keeps forking workers while this thread runs, and fork() copies only the
forking thread: a lock the thread held at that instant would stay locked for ever in the
child. So it touches nothing a worker uses: it logs nothing (the logging and stderr
locks), opens no database connection (libpq and OpenSSL state) and imports nothing once
started (the import locks). The only lock it takes is the metrics store's, which workers
never touch. What it serves comes from the supervisor's latest status document, replaced
whole once a second, and from the metrics files.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Callable, Dict, Optional, Tuple
from urllib.parse import parse_qs

from . import health
from .dashboard_handoff import is_dashboard_path, send_connection
from .errors import ConfigError

ENDPOINTS = ("/metrics", "/healthz", "/readyz", "/status", "/monitoring")
# From accept to the blank line that ends the request head. A scrape or a probe sends its
# few hundred bytes at once; a client still sending after this is not one of them.
REQUEST_HEAD_SECONDS = 2.0
# From accept to the last byte of the answer, whatever the client does.
REQUEST_DEADLINE_SECONDS = 5.0
# Connections open at once; beyond it the oldest is closed. Each costs a descriptor only.
MAX_CONNECTIONS = 256
# A request head longer than this is refused (431): ours are a line and a few headers.
MAX_HEAD_BYTES = 8192
# Out of file descriptors with no connection to close: how long to stop accepting, rather
# than spin on a listener that stays readable.
ACCEPT_PAUSE_SECONDS = 0.1
# After the answer: how long to read and discard what the client still sends before
# closing, so that the close does not reset the connection under an unread answer.
LINGER_SECONDS = 1.0
# Queue depth is read every few seconds; older than this, the database has not answered
# for a while and /monitoring says so instead of repeating an old number.
MONITORING_STALE_SECONDS = 30.0
# Names the program, not its version nor Python's.
SERVER_HEADER = "procqueue"
METHODS = ("GET", "HEAD")


class MonitoringServer:
    """Listens on host:port and answers from `status_source` and `metrics_source`."""

    def __init__(self, host: str, port: int, *, status_source: Callable[[], Optional[dict]],
                 metrics_source: Callable[[str], Tuple[bytes, str]]) -> None:
        self.status_source = status_source
        self.metrics_source = metrics_source
        self.listener = listen(host, port, refused=f"cannot serve metrics on --metrics-host {host} --metrics-port {port}")
        self.connections: Dict[socket.socket, _Connection] = {}  # oldest first
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.selector.register(self.wake_reader, selectors.EVENT_READ)
        self.stopping = False
        self.accept_paused_until: Optional[float] = None
        self.thread: Optional[threading.Thread] = None
        # Held from accept() to the socket's entry in `connections`, and from its removal
        # to close(), and by the supervisor around fork(): a worker forked in between
        # would keep a copy close_in_child cannot see, holding the connection open.
        self.fork_lock = threading.Lock()
        # The dashboard (procqueue.dashboard_process): its requests are handed, socket and
        # all, to its own process over `dashboard_channel`; the first one makes it wanted.
        self.dashboard_enabled = False
        self.dashboard_wanted = False
        self.dashboard_channel: Optional[socket.socket] = None
        self.dashboard_full_since: Optional[float] = None  # monotonic; the supervisor kills a hung process

    @property
    def address(self) -> Tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
        return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"

    def start(self) -> None:
        self.thread = threading.Thread(target=self.serve, name="procqueue-http", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        if self.thread is not None:
            self.wake_writer.send(b"x")
            self.thread.join(timeout=5)
            if self.thread.is_alive():  # stuck in an answer: a daemon, gone with the process
                return
        for sock in list(self.connections):
            sock.close()
        self.connections.clear()
        for sock in (self.listener, self.wake_reader, self.wake_writer):
            sock.close()
        self.selector.close()

    def close_in_child(self) -> None:
        """In a freshly forked worker: let go of the listening socket and the open
        connections, which are the supervisor's. Kept, they would hold the port after the
        supervisor is gone (an orphaned worker lives on for a while) and keep answered
        connections from closing. close() only: shutdown() would cut them for the
        supervisor too."""
        for sock in [self.listener, self.wake_reader, self.wake_writer, *self.connections]:
            sock.close()
        if self.dashboard_channel is not None:
            self.dashboard_channel.close()
        self.selector.close()

    # -- the loop ------------------------------------------------------------------------

    def serve(self) -> None:
        while not self.stopping:
            for key, events in self.selector.select(timeout=0.25):
                try:
                    self.handle(key, events)
                except Exception:  # a bug of ours, or a request we did not foresee: that
                    if isinstance(key.data, _Connection):  # connection is lost, never the thread
                        self.close(key.data)
            now = time.monotonic()
            self.close_expired(now)
            if self.accept_paused_until is not None and now >= self.accept_paused_until:
                self.accept_paused_until = None
                self.selector.register(self.listener, selectors.EVENT_READ)

    def handle(self, key: selectors.SelectorKey, events: int) -> None:
        if key.fileobj is self.listener:
            self.accept()
        elif key.fileobj is self.wake_reader:
            _discard(self.wake_reader)
        elif events & selectors.EVENT_WRITE:
            self.send(key.data)
        else:
            self.receive(key.data)

    def accept(self) -> None:
        for _ in range(64):  # then back to the others: a flood must not starve answers
            with self.fork_lock:
                try:
                    sock, _ = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    self.make_room()
                    return
                if len(self.connections) >= MAX_CONNECTIONS:
                    self.close_unlocked(next(iter(self.connections.values())))
                sock.setblocking(False)
                connection = _Connection(sock, time.monotonic())
                self.connections[sock] = connection
            self.selector.register(sock, selectors.EVENT_READ, connection)

    def make_room(self) -> None:
        """accept() failed (out of descriptors, of memory): close the oldest connection so
        the next round can accept, or with none to close stop accepting for a moment. The
        listener stays readable meanwhile, and would spin this thread at full speed."""
        if self.connections:
            self.close_unlocked(next(iter(self.connections.values())))
        elif self.accept_paused_until is None:
            self.selector.unregister(self.listener)
            self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS

    def receive(self, connection: "_Connection") -> None:
        try:
            data = connection.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data or connection.lingering:  # gone, or what it sends after the answer
            if not data:
                self.close(connection)
            return
        connection.received += data
        end, _ = head_end(connection.received)
        if (end < 0 and len(connection.received) > MAX_HEAD_BYTES) or end > MAX_HEAD_BYTES:
            self.answer(connection, _plain_answer(431, "request head too long\n"))
        elif end >= 0:
            head = connection.received[:end].decode("latin-1")
            if self.dashboard_enabled and is_dashboard_path(_path_of(head)):
                self.hand_off(connection)
            else:
                self.answer(connection, self.answer_to(head))

    def hand_off(self, connection: "_Connection") -> None:
        """Give a dashboard request to the dashboard process: the socket, with what was
        read of it, then forget it. Never waits: with the process not started, gone, or
        its channel full, the answer is a 503 from here, which a browser retries."""
        with self.fork_lock:  # the supervisor swaps and closes the channel under it
            channel = self.dashboard_channel
            if channel is None:
                self.dashboard_wanted = True
                unavailable = "starting"
            else:
                try:
                    send_connection(channel, connection.sock, connection.accepted, connection.received)
                except BlockingIOError:
                    unavailable = "busy"
                    if self.dashboard_full_since is None:
                        self.dashboard_full_since = time.monotonic()
                except OSError:
                    unavailable = "restarting"
                else:
                    self.dashboard_full_since = None
                    self.close_unlocked(connection)
                    return
        self.answer(connection, _dashboard_unavailable(unavailable))

    def answer_to(self, head: str) -> bytes:
        """The bytes to send for a request head (its request line and headers)."""
        request_line, *header_lines = [line.rstrip("\r") for line in head.split("\n")]
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
            return _plain_answer(400, "bad request line\n")
        method, target, _ = parts
        headers = {}
        for line in header_lines:
            name, colon, value = line.partition(":")
            if not colon:
                return _plain_answer(400, "bad header line\n")
            headers[name.strip().lower()] = value.strip()
        if method not in METHODS:
            body = json.dumps({"error": f"{method} not allowed: these endpoints answer GET and HEAD"}) + "\n"
            return _answer(405, "application/json", body.encode(), extra_headers="Allow: GET, HEAD\r\n")
        # Split by hand: urlsplit() would read "//host/metrics" as a host, raise on "//[",
        # and import unicodedata for a non-ASCII one (an import lock, across a fork).
        path, _, query = target.partition("?")
        try:
            status, content_type, body = self.respond(path, query, headers.get("accept", ""))
        except Exception as exc:  # a bug of ours must cost one request, not the thread
            status, content_type = 500, "text/plain; charset=utf-8"
            body = f"internal error: {type(exc).__name__}: {exc}\n".encode("utf-8")
        return _answer(status, content_type, body, include_body=method == "GET")

    def answer(self, connection: "_Connection", data: bytes) -> None:
        connection.unsent = memoryview(data)
        connection.received = b""
        self.selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
        self.send(connection)  # most answers fit the socket's buffer: no wait for the loop

    def send(self, connection: "_Connection") -> None:
        send_answer(self.selector, connection, self.close)

    def close_expired(self, now: float) -> None:
        for connection in list(self.connections.values()):
            if connection.expired(now):
                self.close(connection)

    def close(self, connection: "_Connection") -> None:
        with self.fork_lock:
            self.close_unlocked(connection)

    def close_unlocked(self, connection: "_Connection") -> None:
        self.connections.pop(connection.sock, None)
        try:
            self.selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        connection.sock.close()

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


class _Connection:
    __slots__ = ("sock", "accepted", "received", "unsent", "lingering", "linger_until")

    def __init__(self, sock: socket.socket, accepted: float) -> None:
        self.sock = sock
        self.accepted = accepted
        self.received = b""
        self.unsent: Optional[memoryview] = None  # the answer, once there is one
        self.lingering = False
        self.linger_until = 0.0

    def expired(self, now: float) -> bool:
        if self.lingering:
            return now >= self.linger_until
        if self.unsent is None:  # still reading its request
            return now - self.accepted >= REQUEST_HEAD_SECONDS
        return now - self.accepted >= REQUEST_DEADLINE_SECONDS


def listen(host: str, port: int, *, refused: str) -> socket.socket:
    """A non-blocking listener on host:port; ConfigError("<refused>: <why>") if it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        listener.setblocking(False)
    except OSError as exc:
        listener.close()
        raise ConfigError(f"{refused}: {exc.strerror or exc}") from None
    return listener


def head_end(received: bytes) -> Tuple[int, int]:
    """Where the blank line that ends the request head starts (bare newlines accepted), and
    its length; (-1, 0) while there is none yet."""
    found = [(end, size) for end, size in ((received.find(b"\r\n\r\n"), 4), (received.find(b"\n\n"), 2)) if end >= 0]
    return min(found) if found else (-1, 0)


def send_answer(selector: selectors.BaseSelector, connection, close: Callable[[object], None]) -> None:
    """Send what the connection's answer still has (`unsent`) without waiting. All sent:
    end our side and wait briefly for the client to end its own (`lingering`, then the
    selector reads and discards); closing with its bytes unread would reset the
    connection, which can discard the answer before the client has read it. `close` ends
    a connection whose socket failed. Shared with the dashboard process's server."""
    try:
        sent = connection.sock.send(connection.unsent)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        close(connection)
        return
    connection.unsent = connection.unsent[sent:]
    if connection.unsent:
        return
    try:
        connection.sock.shutdown(socket.SHUT_WR)
    except OSError:
        close(connection)
        return
    connection.lingering = True
    connection.linger_until = time.monotonic() + LINGER_SECONDS
    selector.modify(connection.sock, selectors.EVENT_READ, connection)


def _path_of(head: str) -> str:
    parts = head.split("\n", 1)[0].rstrip("\r").split(" ")
    return parts[1].partition("?")[0] if len(parts) == 3 else ""


def _dashboard_unavailable(reason: str) -> bytes:
    """A page that reloads itself: the dashboard is usually there a second later."""
    body = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"1\">"
            f"<title>procqueue dashboard {reason}</title></head><body><p>The procqueue dashboard is {reason}; "
            "this page reloads itself.</p></body></html>\n").encode()
    return _answer(503, "text/html; charset=utf-8", body,
                   extra_headers="Retry-After: 1\r\nContent-Security-Policy: default-src 'none'\r\n")


def _discard(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _plain_answer(status: int, text: str) -> bytes:
    return _answer(status, "text/plain; charset=utf-8", text.encode("utf-8"))


def _answer(status: int, content_type: str, body: bytes, *, extra_headers: str = "",
            include_body: bool = True) -> bytes:
    """A whole HTTP/1.0 answer; a HEAD request gets the same head with no body."""
    head = (f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\n"
            f"Server: {SERVER_HEADER}\r\n"
            f"Date: {formatdate(usegmt=True)}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Cache-Control: no-store\r\n{extra_headers}"
            "Connection: close\r\n\r\n").encode("latin-1")
    return head + body if include_body else head
