"""How a processor's HTTP thread hands a dashboard request to the dashboard process.

One message per connection on a Unix SOCK_SEQPACKET socketpair: the connection's file
descriptor (SCM_RIGHTS), when it was accepted, and the bytes the thread has already read
of it. A message arrives whole or is not sent at all, so a full channel never leaves half
a request in it. The accept time is `time.monotonic()`, one clock for every process of
the host, so the dashboard process holds the request to deadlines counted from the
accept, not from the handoff.

Imported by procqueue.http before its thread starts: standard library only.
"""

from __future__ import annotations

import array
import fcntl
import socket
import struct
import termios
from typing import Optional, Tuple

# Where the dashboard answers; every other path stays with the HTTP thread.
DASHBOARD_PATHS = ("/", "/login", "/logout", "/schedules", "/tasks")
_ACCEPTED = struct.Struct("!d")
# The thread hands over a request head (at most 8 KiB) and what came with it in one read.
MAX_MESSAGE_BYTES = 256 * 1024
_FD_SIZE = array.array("i").itemsize
# What may wait in the channel for the dashboard process, in bytes of kernel memory (the
# kernel doubles it): some dozens of connections. Beyond, the processor answers 503 itself,
# and a channel full for long tells it the process hangs.
CHANNEL_BUFFER_BYTES = 32 * 1024


def is_dashboard_path(path: str) -> bool:
    return path in DASHBOARD_PATHS or path.startswith("/tasks/")


def channel_pair() -> Tuple[socket.socket, socket.socket]:
    """(the processor's end, the dashboard process's end)."""
    processor_end, dashboard_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    processor_end.setblocking(False)
    processor_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_BUFFER_BYTES)
    return processor_end, dashboard_end


def unread_bytes(channel: socket.socket) -> int:
    """Bytes sent on the processor's end that the dashboard process has not read yet
    (SIOCOUTQ: for a Unix socket, what waits in the peer's queue)."""
    buffer = array.array("i", [0])
    fcntl.ioctl(channel.fileno(), termios.TIOCOUTQ, buffer)
    return buffer[0]


def send_connection(channel: socket.socket, sock: socket.socket, accepted: float, received: bytes) -> None:
    """Never waits: BlockingIOError when the channel is full, another OSError when the
    dashboard process is gone (its end closed)."""
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))]
    channel.sendmsg([_ACCEPTED.pack(accepted), received], rights, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)


def receive_connection(channel: socket.socket) -> Optional[Tuple[socket.socket, float, bytes]]:
    """The next handed-over connection: (socket, accepted, bytes read so far); None once
    the processor has closed its end (it stopped or died)."""
    data, ancillary, _, _ = channel.recvmsg(MAX_MESSAGE_BYTES, socket.CMSG_SPACE(4 * _FD_SIZE))
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % _FD_SIZE])
    if not data and not fds:
        return None
    for extra in fds[1:]:  # one per message is the protocol: close anything else
        socket.close(extra)
    if not fds or len(data) < _ACCEPTED.size:
        raise OSError("malformed dashboard handoff message")
    sock = socket.socket(fileno=fds[0])
    return sock, _ACCEPTED.unpack_from(data)[0], data[_ACCEPTED.size:]
