"""procqueue: a Postgres-backed task processor for Python, one OS process per worker.

    from procqueue import register_task_handler

    @register_task_handler()
    def send_email(to: str) -> None: ...

    send_email.delay(args=("ada@example.com",))

The public names below are imported on first use (PEP 562), not with the package: a
liveness probe (`procqueue-health`) runs `procqueue.health_probe` every few seconds and must not
pay for psycopg2, click and prometheus-client, which importing everything would load.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "TaskRunMethod": "config",
    "is_processor_healthy": "canary",
    "cancel": "client",
    "configure": "client",
    "get_task": "client",
    "get_task_runs": "client",
    "InvalidArgumentsError": "arguments",
    "TaskArgumentError": "arguments",
    "enqueue_many": "enqueue",
    "ConfigError": "errors",
    "DatabaseError": "errors",
    "ProcqueueError": "errors",
    "TaskError": "errors",
    "TaskProcessingError": "errors",
    "TaskTimeoutError": "execution",
    "current_task": "execution",
    "ClaimedTask": "records",
    "RunOutcome": "records",
    "RunRecord": "records",
    "TaskPriority": "records",
    "TaskRecord": "records",
    "TaskState": "records",
    "UnreadableJson": "records",
    "TaskBackoffError": "registry",
    "TaskCall": "records",
    "TaskHandler": "registry",
    "register_recurring_task": "registry",
    "register_task_handler": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'procqueue' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))
