"""Task arguments: JSON only, checked before anything is written.

A non-serialisable argument fails at `.delay()` (or at registration, for a recurring
task's fixed arguments) with a TypeError naming the argument, never later in a worker.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from .errors import TaskError


# jsonb (and text) reject these, so they are refused at .delay(), not by the database.
NUL_PROBLEM = "the NUL character (\\x00), which Postgres cannot store"
SURROGATE_PROBLEM = "a lone surrogate (not valid Unicode, as from bytes decoded with surrogateescape), which Postgres cannot store"


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
        problem = string_problem(key)
        if problem:
            raise TaskArgumentError(f"task {task_name}: kwargs key {short_repr(key)} contains {problem}")
    for position, value in enumerate(args):
        require_json(task_name, f"args[{position}]", value)
    for key, value in kwargs.items():
        require_json(task_name, f"kwargs[{key!r}]", value)
    return json.dumps(list(args), allow_nan=False), json.dumps(dict(kwargs), allow_nan=False)


def signature_of(func: Callable[..., Any]) -> Optional[inspect.Signature]:
    """The function's signature, or None when Python cannot tell it (some builtins)."""
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def require_fitting(task_name: str, signature: Optional[inspect.Signature], args: Sequence[Any],
                    kwargs: Optional[Mapping[str, Any]]) -> None:
    """Refuse arguments the function cannot be called with, as Celery does at apply time:
    enqueued, they would fail every attempt in a worker, far from the mistake."""
    if signature is None:
        return
    try:
        signature.bind(*args, **(kwargs or {}))
    except TypeError as exc:
        raise TaskArgumentError(f"task {task_name}: args {short_repr(list(args))} and kwargs "
                                f"{short_repr(dict(kwargs or {}))} do not fit its parameters "
                                f"{_parameters(signature)}: {exc}") from None


def _parameters(signature: inspect.Signature) -> str:
    """`(name, punctuation='!')`: annotations left out, which under `from __future__
    import annotations` are strings and would print quoted."""
    plain = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=plain, return_annotation=inspect.Signature.empty))


def require_json(task_name: str, label: str, value: Any) -> None:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TaskArgumentError(
            f"task {task_name}: argument {label} = {short_repr(value)} cannot be stored as JSON ({exc})"
        ) from None
    # Valid JSON, but jsonb rejects \u0000 and lone surrogates. Both show in the text as a
    # \u escape, so this cheap test misses none; it also matches an escaped backslash
    # followed by "u0000", or a valid pair such as an emoji's, so the walk decides.
    if "\\u0000" in text or "\\ud" in text:
        _require_storable(task_name, label, value)


def _require_storable(task_name: str, label: str, value: Any) -> None:
    """Raise naming the string (or dictionary key) in `value`, at any depth, that Postgres
    cannot store."""
    if isinstance(value, str):
        problem = string_problem(value)
        if problem:
            raise TaskArgumentError(f"task {task_name}: argument {label} = {short_repr(value)} contains {problem}")
    if isinstance(value, dict):
        for key, item in value.items():
            problem = string_problem(key) if isinstance(key, str) else None
            if problem:
                raise TaskArgumentError(
                    f"task {task_name}: argument {label} has a key {short_repr(key)} that contains {problem}"
                )
            _require_storable(task_name, f"{label}[{key!r}]", item)
    if isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            _require_storable(task_name, f"{label}[{position}]", item)


def string_problem(text: str) -> Optional[str]:
    if "\x00" in text:
        return NUL_PROBLEM
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATE_PROBLEM
    return None


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
