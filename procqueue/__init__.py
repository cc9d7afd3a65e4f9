"""procqueue: a Postgres-backed task processor for Python, one OS process per worker.

    from procqueue import register_task_handler

    @register_task_handler()
    def send_email(to: str) -> None: ...

    send_email.delay(args=("ada@example.com",))
"""

from .config import TaskRunMethod
from .enqueue import TaskArgumentError, configure, enqueue_many
from .errors import ConfigError, DatabaseError, ProcqueueError, TaskError
from .execution import TaskTimeoutError
from .records import RunOutcome, RunRecord, TaskPriority, TaskRecord, TaskState
from .registry import TaskBackoffError, TaskCall, TaskHandler, register_recurring_task, register_task_handler

__version__ = "0.1.0"


def get_task(task_id: int) -> "TaskRecord | None":
    """The task row with this id, read on this process's connection."""
    from .enqueue import client_connection

    conn, queries = client_connection()
    return queries.get_task(conn, task_id)


def get_task_runs(task_id: int) -> "list[RunRecord]":
    """Every run (attempt) of a task, oldest first, with errors and tracebacks."""
    from .enqueue import client_connection

    conn, queries = client_connection()
    return queries.get_runs(conn, task_id)


def cancel(task_id: int) -> bool:
    """Cancel a queued task; False if it is running, finished or unknown."""
    from .enqueue import client_connection

    conn, queries = client_connection()
    return queries.cancel(conn, task_id)


__all__ = [
    "ConfigError", "DatabaseError", "ProcqueueError", "RunOutcome", "RunRecord", "TaskArgumentError",
    "TaskBackoffError", "TaskCall", "TaskError", "TaskHandler", "TaskPriority", "TaskRecord", "TaskRunMethod",
    "TaskState", "TaskTimeoutError", "cancel", "configure", "enqueue_many", "get_task", "get_task_runs",
    "register_recurring_task", "register_task_handler",
]
