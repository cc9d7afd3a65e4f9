"""The HTTP endpoints' server: idle and slow clients cannot shut out scrapes and probes."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request

import pytest

from procqueue import http
from procqueue.http import MonitoringServer

from helpers import http_get, wait_until


def serving(metrics: bytes = b"procqueue_up 1\n") -> MonitoringServer:
    document = {"queue": {"waiting": 7, "checked_at_unix": time.time()}}
    server = MonitoringServer("127.0.0.1", 0, status_source=lambda: document,
                              metrics_source=lambda accept: (metrics, "text/plain; version=0.0.4"))
    server.start()
    return server


@pytest.fixture
def server():
    server = serving()
    yield server
    server.stop()


@contextlib.contextmanager
def idle_sockets(port: int, count: int):
    """`count` connections that never send a byte."""
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.timeout(60)
def test_a_hundred_idle_sockets_leave_scrapes_and_probes_answered(db, start_processor):
    # Before: the server closed every connection beyond 16 while each idle one held its
    # slot for 5 s; 16 idle sockets let 3 of 40 scrapes through.
    processor = start_processor("--numthreads", "1", "--metrics-port", "0")
    port = processor.metrics_port()
    processor.wait_for_status(lambda d: d["workers"][0]["state"] == "idle")
    stop_opening = threading.Event()
    opened = []

    def keep_opening() -> None:  # and more arriving, three a second, as in the attack
        while not stop_opening.wait(0.33):
            with contextlib.suppress(OSError):
                opened.append(socket.create_connection(("127.0.0.1", port)))

    with idle_sockets(port, 100):
        opener = threading.Thread(target=keep_opening, daemon=True)
        opener.start()
        try:
            answers = []
            for path in ["/metrics", "/healthz"] * 20:
                asked = time.monotonic()
                status, _, _ = http_get(port, path)
                answers.append((path, status, time.monotonic() - asked))
        finally:
            stop_opening.set()
            opener.join()
            for sock in opened:
                sock.close()
    assert [(path, status) for path, status, _ in answers if status != 200] == []
    assert max(took for _, _, took in answers) < 3.0, answers  # a loaded CI machine: still far below 5 s
    assert processor.stop() == 0


def is_closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_beyond_the_connection_limit_the_oldest_connections_are_closed(server, monkeypatch):
    monkeypatch.setattr(http, "REQUEST_HEAD_SECONDS", 60.0)  # only the limit closes anything here
    port = server.address[1]
    with idle_sockets(port, http.MAX_CONNECTIONS + 20) as sockets:
        # Answered at once, so every connection before it has been accepted, and the 21
        # oldest closed: 20 for the idle ones over the limit, one for this one.
        assert http_get(port, "/monitoring")[0] == 200
        wait_until(lambda: is_closed_by_server(sockets[20]), timeout=5, message="the 21st oldest closed")
        assert [index for index, sock in enumerate(sockets) if is_closed_by_server(sock)] == list(range(21))


def test_a_client_that_sends_no_request_is_dropped_at_the_head_deadline(server):
    with socket.create_connection(server.address) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\n")  # and never the blank line
        connected = time.monotonic()
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
        assert http.REQUEST_HEAD_SECONDS - 0.1 < time.monotonic() - connected < http.REQUEST_HEAD_SECONDS + 3


def test_head_is_answered_as_get_without_a_body_and_the_server_header_names_no_versions(server):
    port = server.address[1]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/monitoring", method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200  # before: 501
        assert response.headers["Server"] == "procqueue"  # before: "procqueue Python/3.11.7"
        assert int(response.headers["Content-Length"]) == len(b'{\n "waiting": 7\n}\n')
        assert response.read() == b""
    status, _, body = http_get(port, "/monitoring")
    assert (status, body) == (200, b'{\n "waiting": 7\n}\n')


@pytest.mark.parametrize("request_bytes, expected", [
    (b"GARBAGE\r\n\r\n", b"HTTP/1.0 400 Bad Request"),
    (b"GET /status HTTP/2.0\r\n\r\n", b"HTTP/1.0 400 Bad Request"),
    (b"GET /status HTTP/1.1\r\nno colon here\r\n\r\n", b"HTTP/1.0 400 Bad Request"),
    (b"GET /status HTTP/1.1\r\nX-Big: " + b"a" * 9000, b"HTTP/1.0 431 Request Header Fields Too Large"),
    (b"GET /status HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", b"HTTP/1.0 431 Request Header"),
    (b"DELETE /status HTTP/1.1\r\n\r\n", b"HTTP/1.0 405 Method Not Allowed"),
    (b"GET //[ HTTP/1.1\r\n\r\n", b"HTTP/1.0 404 Not Found"),  # before: the server's thread died
    ("GET //\u00e9/metrics HTTP/1.1\r\n\r\n".encode("utf-8"), b"HTTP/1.0 404 Not Found"),
    (b"GET /monitoring HTTP/1.0\n\n", b"HTTP/1.0 200 OK"),  # bare newlines, as some scripts send
])
def test_bad_requests_get_a_status_and_a_close(server, request_bytes, expected):
    answer = raw_exchange(server.address[1], request_bytes)
    assert answer.startswith(expected), answer
    if b"405" in expected:
        assert b"\r\nAllow: GET, HEAD\r\n" in answer
    assert http_get(server.address[1], "/monitoring")[0] == 200  # and the server serves on


def test_a_client_that_does_not_read_its_answer_holds_up_no_one():
    server = serving(metrics=b"x" * (8 * 2**20))  # far more than the socket buffers hold
    try:
        port = server.address[1]
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # and never read
            wait_until(lambda: any(c.unsent for c in list(server.connections.values())), timeout=5,
                       message="the answer only partly sent")
            started = time.monotonic()
            assert http_get(port, "/monitoring")[0] == 200
            assert time.monotonic() - started < 3.0
            wait_until(lambda: not server.connections, timeout=http.REQUEST_DEADLINE_SECONDS + 3,
                       message="the reader closed at its deadline")
    finally:
        server.stop()
