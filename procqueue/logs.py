"""Logging as an interface: one line per event, a stable event name, key=value fields."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Optional, Tuple

# Milliseconds: events of a stuck worker's kill, a dead one's replacement, follow each
# other within a second.
_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(processName)s %(message)s"


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log `event` with its fields, e.g. `event=task.failed task_id=7 task=app.send`."""
    if not logger.isEnabledFor(level):
        return
    parts = [f"event={event}"]
    parts.extend(f"{key}={format_value(value)}" for key, value in fields.items())
    # The fields ride along unformatted for the JSON formatter.
    logger.log(level, " ".join(parts), extra={"procqueue_event": event, "procqueue_fields": fields})



def log_recurring_disabled(logger: logging.Logger, task_name: str, failures: int, **fields: Any) -> None:
    """Once per disabling of a recurring schedule, by whoever recorded the failure that did
    it: a worker (complete) or the supervisor (release_worker_tasks, a run it killed)."""
    log_event(logger, logging.WARNING, "recurring.disabled", task=task_name, failures=failures, **fields,
              note="its runs failed too often in a row; no slot runs until an operator enables it "
                   "(procqueue recurring enable)")

_NEEDS_QUOTES = ' "='
# One event, one line: every control character is escaped, never emitted raw.
_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
_ESCAPES.update({code: f"\\x{code:02x}" for code in range(32) if code not in _ESCAPES})
_ESCAPES[0x7F] = "\\x7f"


def format_value(value: Any) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if text == "" or any(ch in text for ch in _NEEDS_QUOTES) or not text.isprintable():
        return '"' + text.translate(_ESCAPES) + '"'
    return text


LOG_FORMATS = ("text", "json")
# Keys of a JSON log line that a field of the same name must not overwrite.
_JSON_BASE_KEYS = ("time", "level", "process", "logger", "event", "message", "exception")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: the event's fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "process": record.processName,
            "logger": record.name,
        }
        event = getattr(record, "procqueue_event", None)
        if event is None:
            line["message"] = record.getMessage()
        else:
            line["event"] = event
            for key, value in getattr(record, "procqueue_fields", {}).items():
                line[f"field_{key}" if key in _JSON_BASE_KEYS else key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to stderr, and never into what a task left under its number.

    A task can close fd 2 and open a file or a socket, which then gets number 2: a line
    written there would corrupt it. So each line first checks that the descriptor is the
    one the process started with (one fstat, against some 20 us to format the line); if
    not, the number is pointed at /dev/null and the lines are dropped from then on. The
    worker notices the change between batches and is replaced (OutputWatch). A line that
    cannot be written (a task closed sys.stderr) is dropped without a word too: logging's
    default reports it on sys.stderr, and with sys.stderr closed that report raises in
    turn, out of the worker's log call."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        try:
            self.fd: Optional[int] = stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
            self.fd = None
        self.identity = _file_identity(self.fd) if self.fd is not None else None
        self.cut_off = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.identity is not None and not self.cut_off and _file_identity(self.fd) != self.identity:
            _silence(self.fd)
            self.cut_off = True
        if not self.cut_off:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], (OSError, ValueError)):
            return
        super().handleError(record)


def _utc_text_formatter() -> logging.Formatter:
    # UTC, as the JSON lines, `procqueue tasks list` and the database: a host's TZ (which
    # Django sets from its TIME_ZONE setting) must not shift one log against another.
    formatter = logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    return formatter


def setup_logging(level: str, log_format: str = "text") -> None:
    """Configure the root logger for a procqueue command (stderr, one line per event)."""
    handler = _StderrHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_utc_text_formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class OutputWatch:
    """Where this process's log lines go: file descriptors 1 and 2, and the streams of the
    root logger's handlers. A task can close or replace any of them (os.close(2),
    sys.stderr.close(), a dup2 to capture output); every log line after that would be lost
    without a sound, so the worker checks between batches and has itself replaced (each
    log line itself makes sure it does not go astray meanwhile: _StderrHandler)."""

    def __init__(self) -> None:
        self.identities = {fd: _file_identity(fd) for fd in (1, 2)}

    def problem(self) -> Optional[str]:
        """What happened to the output, or None while it is as it was. A descriptor found
        closed or replaced is pointed at /dev/null at once: its number may already be (or
        soon be) a file or socket the task or the worker opened, which the worker's log
        lines would otherwise be written into."""
        for fd, identity in self.identities.items():
            if identity is not None and _file_identity(fd) != identity:
                _silence(fd)
                return f"{'stdout' if fd == 1 else 'stderr'} (fd {fd}) was closed or replaced by a task"
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                return f"the log stream {getattr(stream, 'name', '?')} was closed by a task"
        return None


def _silence(fd: int) -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _file_identity(fd: int) -> Optional[Tuple[int, int]]:
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    return info.st_dev, info.st_ino
