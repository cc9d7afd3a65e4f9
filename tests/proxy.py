"""A TCP proxy in front of Postgres that a test can cut, as a restart or a network
failure would (every open connection dropped, new ones refused until it is restored),
or stall, as a hung server or an exhausted connection pooler would (connections stay
open and bytes are taken, but nothing is answered until it resumes)."""

from __future__ import annotations

import socket
import threading
from typing import List

from psycopg2.extensions import make_dsn, parse_dsn


class CuttableProxy:
    def __init__(self, database_url: str) -> None:
        self.params = parse_dsn(database_url)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.sockets: List[socket.socket] = []
        self.refusing = False
        self.closed = False
        self.flowing = threading.Event()
        self.flowing.set()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        """A DSN for the same database, through the proxy."""
        return make_dsn(**{**self.params, "host": "127.0.0.1", "port": str(self.port)})

    def cut(self) -> None:
        """Drop every connection and refuse new ones until `restore()`."""
        with self.lock:
            self.refusing = True
            for sock in self.sockets:
                _close(sock)
            self.sockets.clear()

    def restore(self) -> None:
        with self.lock:
            self.refusing = False

    def stall(self) -> None:
        """Hold every byte in both directions until `resume()`."""
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        self.cut()
        _close(self.listener)

    def _upstream(self) -> socket.socket:
        host = self.params.get("host") or "/var/run/postgresql"
        port = int(self.params.get("port") or 5432)
        if host.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(f"{host}/.s.PGSQL.{port}")
            return sock
        return socket.create_connection((host, port))

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.refusing:
                    _close(client)
                    continue
                upstream = self._upstream()
                self.sockets += [client, upstream]
            for pair in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(*pair, self.flowing), daemon=True).start()


def _pump(source: socket.socket, target: socket.socket, flowing: threading.Event) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            flowing.wait()
            target.sendall(data)
    except OSError:
        pass
    _close(source)
    _close(target)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
