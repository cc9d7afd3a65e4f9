"""The exception families procqueue raises for users.

Each carries a one-line message naming the bad value and what was expected; the CLI turns
them into that line on stderr and a non-zero exit code, never a traceback.
"""


class ProcqueueError(Exception):
    """Base of every error procqueue raises on purpose."""

    exit_code = 1


class ConfigError(ProcqueueError):
    """A setting (flag, environment variable, argument) has a value we cannot use."""

    exit_code = 2


class DatabaseError(ProcqueueError):
    """Postgres cannot be reached, or is not in the shape procqueue needs."""

    exit_code = 3


class DatabaseUnavailable(DatabaseError):
    """Postgres cannot be reached now, for a reason that may pass by itself (refused, timed
    out, starting up, shutting down, out of connections): worth trying again, unlike a
    wrong password or a database that does not exist."""


class TaskProcessingError(Exception):
    """Flagsmith's base of its task errors, for code ported from it that catches them:
    procqueue's task errors (TaskError, so argument errors too) and TaskBackoffError are
    ones. Not TaskTimeoutError, a BaseException so that a task cannot swallow it."""


class TaskError(ProcqueueError, TaskProcessingError):
    """A task cannot be registered or enqueued as asked."""

    exit_code = 4
