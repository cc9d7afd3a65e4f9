"""Task arguments: JSON only, checked before anything is written.

A non-serialisable argument fails at `.delay()` (or at registration, for a recurring
task's fixed arguments) with a TypeError naming the argument, never later in a worker.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence, Tuple

from .errors import TaskError


class TaskArgumentError(TaskError, TypeError):
    """An argument cannot be stored as JSON. A TypeError, as `.delay()` promises."""


def serialise_arguments(
    task_name: str, args: Sequence[Any], kwargs: Optional[Mapping[str, Any]]
) -> Tuple[str, str]:
    """The arguments as JSON text, or TaskArgumentError naming the one that is not JSON."""
    if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
        raise TaskArgumentError(f"task {task_name}: args must be a list or tuple, got {type(args).__name__}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, Mapping):
        raise TaskArgumentError(f"task {task_name}: kwargs must be a dict, got {type(kwargs).__name__}")
    for key in kwargs:
        if not isinstance(key, str):
            raise TaskArgumentError(f"task {task_name}: kwargs key {key!r} is not a string")
    for position, value in enumerate(args):
        require_json(task_name, f"args[{position}]", value)
    for key, value in kwargs.items():
        require_json(task_name, f"kwargs[{key!r}]", value)
    return json.dumps(list(args), allow_nan=False), json.dumps(dict(kwargs), allow_nan=False)


def require_json(task_name: str, label: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TaskArgumentError(
            f"task {task_name}: argument {label} = {short_repr(value)} cannot be stored as JSON ({exc})"
        ) from None


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
