"""procqueue: a Postgres-backed task processor for Python, one OS process per worker.

    from procqueue import register_task_handler

    @register_task_handler()
    def send_email(to: str) -> None: ...

    send_email.delay(args=("ada@example.com",))
"""

from .config import TaskRunMethod
from .client import cancel, configure, get_task, get_task_runs
from .enqueue import TaskArgumentError, enqueue_many
from .errors import ConfigError, DatabaseError, ProcqueueError, TaskError
from .execution import TaskTimeoutError
from .records import RunOutcome, RunRecord, TaskPriority, TaskRecord, TaskState
from .registry import TaskBackoffError, TaskCall, TaskHandler, register_recurring_task, register_task_handler

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DatabaseError", "ProcqueueError", "RunOutcome", "RunRecord", "TaskArgumentError",
    "TaskBackoffError", "TaskCall", "TaskError", "TaskHandler", "TaskPriority", "TaskRecord", "TaskRunMethod",
    "TaskState", "TaskTimeoutError", "cancel", "configure", "enqueue_many", "get_task", "get_task_runs",
    "register_recurring_task", "register_task_handler",
]
