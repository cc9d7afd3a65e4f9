"""Logging as an interface: one line per event, a stable event name, key=value fields."""

from __future__ import annotations

import logging
import sys
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(message)s"


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log `event` with its fields, e.g. `event=task.failed task_id=7 task=app.send`."""
    if not logger.isEnabledFor(level):
        return
    parts = [f"event={event}"]
    parts.extend(f"{key}={format_value(value)}" for key, value in fields.items())
    logger.log(level, " ".join(parts))


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


def setup_logging(level: str) -> None:
    """Configure the root logger for a procqueue command (stderr, one line per event)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
