"""The web dashboard's process: `python -m procqueue.dashboard` (started by a processor)
or `procqueue dashboard --port N` (on a machine with no processor).

Its own process, never a thread of the supervisor: it opens a database connection and
blocks on it, which the supervisor's HTTP thread must never do (see procqueue.http). A
processor's HTTP thread hands it each dashboard request, socket and all, over a channel
(procqueue.dashboard_handoff); standalone, it accepts connections itself. Either way it
answers with the deadlines procqueue.http keeps: a request must arrive whole within
REQUEST_SECONDS of the accept and be answered within ANSWER_SECONDS, and at
MAX_CONNECTIONS the oldest connection is closed, so idle sockets cannot shut anyone out.
Requests are answered one at a time; each statement is bounded by the app's timeout.
"""

from __future__ import annotations

import argparse
import logging
import selectors
import signal
import socket
import sys
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Dict, Optional

from .dashboard_app import DashboardApp, Request, Response
from .dashboard_handoff import receive_connection
from .errors import ConfigError
from .http import head_end, listen as listen_on, send_answer
from .logs import log_event

logger = logging.getLogger("procqueue.dashboard")

REQUEST_SECONDS = 5.0
ANSWER_SECONDS = 15.0
MAX_CONNECTIONS = 128
MAX_HEAD_BYTES = 8192
MAX_BODY_BYTES = 16384
TICK_SECONDS = 0.5
METHODS = ("GET", "HEAD", "POST")
SERVER_HEADER = "procqueue"


class DashboardServer:
    """Serves `app` to connections from `listener` (standalone) or `channel` (handed over
    by a processor). With a channel, it stops when the processor closes its end."""

    def __init__(self, app: DashboardApp, *, listener: Optional[socket.socket] = None,
                 channel: Optional[socket.socket] = None) -> None:
        self.app = app
        self.listener = listener
        self.channel = channel
        self.selector = selectors.DefaultSelector()
        self.connections: Dict[socket.socket, _Connection] = {}  # oldest first
        self.stopping = False
        for source in (listener, channel):
            if source is not None:
                source.setblocking(False)
                self.selector.register(source, selectors.EVENT_READ)

    def serve_forever(self) -> None:
        while not self.stopping:
            self.step()
        self.close()

    def step(self, timeout: float = TICK_SECONDS) -> None:
        for key, events in self.selector.select(timeout=timeout):
            try:
                self.handle(key, events)
            except Exception as exc:  # one connection lost, never the process
                if isinstance(key.data, _Connection):
                    self.drop(key.data)
                else:
                    log_event(logger, logging.ERROR, "dashboard.accept_failed", error=repr(exc))
        now = time.monotonic()
        for connection in list(self.connections.values()):
            if connection.expired(now):
                self.drop(connection)
        self.app.sample(now)

    def handle(self, key: selectors.SelectorKey, events: int) -> None:
        if key.fileobj is self.listener:
            self.accept()
        elif key.fileobj is self.channel:
            self.take_over()
        elif events & selectors.EVENT_WRITE:
            self.send(key.data)
        else:
            self.receive(key.data)

    def accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.admit(sock, time.monotonic(), b"")

    def take_over(self) -> None:
        for _ in range(64):
            try:
                handed = receive_connection(self.channel)
            except (BlockingIOError, InterruptedError):
                return
            if handed is None:  # the processor closed its end: it stopped or died
                log_event(logger, logging.INFO, "dashboard.stopping", reason="the processor closed the channel")
                self.stopping = True
                return
            sock, accepted, received = handed
            self.admit(sock, accepted, received)
            self.receive(self.connections[sock], already=True)

    def admit(self, sock: socket.socket, accepted: float, received: bytes) -> None:
        if len(self.connections) >= MAX_CONNECTIONS:
            self.drop(next(iter(self.connections.values())))
        sock.setblocking(False)
        connection = _Connection(sock, accepted, received, _remote(sock))
        self.connections[sock] = connection
        self.selector.register(sock, selectors.EVENT_READ, connection)

    def receive(self, connection: "_Connection", already: bool = False) -> None:
        if not already:
            try:
                data = connection.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.drop(connection)
                return
            if connection.lingering:
                return
            connection.received += data
        parsed = _parse(connection.received)
        if parsed is None:
            return  # not all of it yet
        if isinstance(parsed, Response):
            self.answer(connection, parsed, include_body=True)
            return
        request = Request(parsed.method, parsed.path, parsed.query, parsed.headers, parsed.body, connection.remote)
        self.answer(connection, self.respond(request), include_body=request.method != "HEAD")

    def respond(self, request: Request) -> Response:
        try:
            return self.app.handle(Request("GET" if request.method == "HEAD" else request.method, request.path,
                                           request.query, request.headers, request.body, request.remote))
        except Exception as exc:  # a bug of ours costs one request
            log_event(logger, logging.ERROR, "dashboard.request_failed", path=request.path, error=repr(exc))
            return Response(500, b"internal error\n", "text/plain; charset=utf-8")

    def answer(self, connection: "_Connection", response: Response, *, include_body: bool) -> None:
        connection.unsent = memoryview(_encode(response, include_body))
        connection.received = b""
        self.selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
        self.send(connection)

    def send(self, connection: "_Connection") -> None:
        send_answer(self.selector, connection, self.drop)

    def drop(self, connection: "_Connection") -> None:
        self.connections.pop(connection.sock, None)
        try:
            self.selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        connection.sock.close()

    def close(self) -> None:
        for connection in list(self.connections.values()):
            self.drop(connection)
        for source in (self.listener, self.channel):
            if source is not None:
                source.close()
        self.selector.close()
        self.app.forget_connection()


class _Connection:
    __slots__ = ("sock", "accepted", "received", "remote", "unsent", "lingering", "linger_until")

    def __init__(self, sock: socket.socket, accepted: float, received: bytes, remote: str) -> None:
        self.sock = sock
        self.accepted = accepted
        self.received = received
        self.remote = remote
        self.unsent: Optional[memoryview] = None
        self.lingering = False
        self.linger_until = 0.0

    def expired(self, now: float) -> bool:
        if self.lingering:
            return now >= self.linger_until
        if self.unsent is None:
            return now - self.accepted >= REQUEST_SECONDS
        return now - self.accepted >= ANSWER_SECONDS


class _Parsed:
    __slots__ = ("method", "path", "query", "headers", "body")

    def __init__(self, method: str, path: str, query: str, headers: Dict[str, str], body: bytes) -> None:
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body


def _parse(received: bytes):
    """The request in `received`: a _Parsed, a Response refusing it, or None (incomplete)."""
    end, separator = head_end(received)
    if end < 0:
        return _plain(431, "request head too long\n") if len(received) > MAX_HEAD_BYTES else None
    if end > MAX_HEAD_BYTES:
        return _plain(431, "request head too long\n")
    request_line, *lines = [line.rstrip("\r") for line in received[:end].decode("latin-1").split("\n")]
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return _plain(400, "bad request line\n")
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            return _plain(400, "bad header line\n")
        headers[name.strip().lower()] = value.strip()
    method = parts[0]
    if method not in METHODS:
        return _plain(405, f"{method} not allowed\n")
    body = received[end + separator:]
    length = headers.get("content-length", "0" if method != "POST" else "")
    if not length.isdigit():
        return _plain(411, "a POST needs a Content-Length\n")
    if int(length) > MAX_BODY_BYTES:
        return _plain(413, "request body too large\n")
    if len(body) < int(length):
        return None
    path, _, query = parts[1].partition("?")
    return _Parsed(method, path, query, headers, body[:int(length)])


def _plain(status: int, text: str) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8")


def _encode(response: Response, include_body: bool) -> bytes:
    style = f"style-src 'nonce-{response.nonce}'" if response.nonce else "style-src 'none'"
    headers = [
        ("Server", SERVER_HEADER), ("Date", formatdate(usegmt=True)), ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))), ("Cache-Control", "no-store"),
        ("Content-Security-Policy",
         f"default-src 'none'; {style}; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
        ("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "same-origin"),
        *response.headers, ("Connection", "close"),
    ]
    head = f"HTTP/1.0 {response.status} {HTTPStatus(response.status).phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return head.encode("latin-1") + (response.body if include_body else b"")


def _remote(sock: socket.socket) -> str:
    try:
        address = sock.getpeername()
    except OSError:
        return "-"
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address or "-")


def listen(host: str, port: int) -> socket.socket:
    return listen_on(host, port, refused=f"cannot serve the dashboard on --host {host} --port {port}")


def serve(server: DashboardServer) -> None:
    """Until SIGTERM or SIGINT (or, for a processor's, the end of its channel)."""
    def stop(signum, frame) -> None:
        server.stopping = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    server.serve_forever()


def main(argv: Optional[list] = None) -> int:
    """A processor's dashboard process: configuration from the environment the processor
    gave it (procqueue.config.dashboard_process_environment), connections from --channel-fd."""
    from .config import dashboard_config
    from .logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m procqueue.dashboard")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    arguments = parser.parse_args(argv)
    setup_logging(arguments.log_level)
    try:
        config = dashboard_config()
    except ConfigError as exc:
        log_event(logger, logging.ERROR, "dashboard.bad_config", error=str(exc))
        return 2
    channel = socket.socket(fileno=arguments.channel_fd)
    log_event(logger, logging.INFO, "dashboard.serving", login="token" if config.token else "none (read-only)")
    serve(DashboardServer(DashboardApp(config), channel=channel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
