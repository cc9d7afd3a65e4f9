"""Task arguments: JSON, checked before anything is written.

Besides JSON's own types, what Flagsmith's encoder (simplejson with Django's
DjangoJSONEncoder) turns into JSON is converted as it converts it, so a ported project's
tasks receive what they received there: a Decimal becomes a number, a date, time,
datetime or timedelta Django's string for it, a UUID or a lazy translation its str, a
namedtuple an object. Anything else fails at `.delay()` (or at registration, for a
recurring task's fixed arguments) with a TypeError naming the argument, never later in a
worker.
"""

from __future__ import annotations

import datetime
import inspect
import json
import math
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .config import ENV_MAX_ARGUMENTS_BYTES
from .errors import TaskError


# jsonb (and text) reject these, so they are refused at .delay(), not by the database.
NUL_PROBLEM = "the NUL character (\\x00), which Postgres cannot store"
SURROGATE_PROBLEM = "a lone surrogate (not valid Unicode, as from bytes decoded with surrogateescape), which Postgres cannot store"
# Deeper than any data a task needs, shallow enough that encoding and decoding it stays
# far from Python's recursion limit (about 1,000), in the application and in the worker.
MAX_ARGUMENT_DEPTH = 100


class TaskArgumentError(TaskError, TypeError):
    """An argument cannot be stored as JSON. A TypeError, as `.delay()` promises."""


class InvalidArgumentsError(TaskArgumentError):
    """Flagsmith's name for arguments a task cannot be given; what procqueue raises for
    them. A TaskArgumentError (so a TypeError) and a TaskProcessingError."""


def serialise_arguments(
    task_name: str, args: Sequence[Any], kwargs: Optional[Mapping[str, Any]], max_bytes: Optional[int] = None
) -> Tuple[str, str]:
    """The arguments as JSON text, or InvalidArgumentsError naming the one that is not JSON.
    `max_bytes`: the most the two JSON texts may take together (None: no limit)."""
    if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
        raise InvalidArgumentsError(f"task {task_name}: args must be a list or tuple, got {type(args).__name__}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, Mapping):
        raise InvalidArgumentsError(f"task {task_name}: kwargs must be a dict, got {type(kwargs).__name__}")
    for key in kwargs:
        try:
            _require_key(key)
        except _Refused as refused:
            raise InvalidArgumentsError(f"task {task_name}: kwargs {refused.problem}") from None
    try:
        _require_all_json(task_name, args, kwargs)
    except _Converts:
        args, kwargs = _converted_arguments(task_name, args, kwargs)
    args_json, kwargs_json = json.dumps(list(args), allow_nan=False), json.dumps(dict(kwargs), allow_nan=False)
    # ASCII (json.dumps escapes the rest), so characters are bytes.
    size = len(args_json) + len(kwargs_json)
    if max_bytes and size > max_bytes:
        raise InvalidArgumentsError(
            f"task {task_name}: arguments take {size} bytes as JSON, over the limit of {max_bytes} "
            f"({ENV_MAX_ARGUMENTS_BYTES}); pass a reference to large data (a key, a URL) instead")
    return args_json, kwargs_json


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
        raise InvalidArgumentsError(f"task {task_name}: args {short_repr(list(args))} and kwargs "
                                f"{short_repr(dict(kwargs or {}))} do not fit its parameters "
                                f"{_parameters(signature)}: {exc}") from None


def _parameters(signature: inspect.Signature) -> str:
    """`(name, punctuation='!')`: annotations left out, which under `from __future__
    import annotations` are strings and would print quoted."""
    plain = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=plain, return_annotation=inspect.Signature.empty))


def require_json(task_name: str, label: str, value: Any) -> None:
    """Refuse, naming it, anything in `value` that would not come back from JSON as it
    went in (a dictionary key that is not a string would come back as one), that JSON
    cannot hold (NaN, objects), that Postgres cannot store, or that is nested so deep
    that decoding it would exhaust the stack. _Converts if it holds a value Flagsmith's
    encoder converts (a Decimal, a date...)."""
    try:
        _require_plain(value, 0, set())
    except _Refused as refused:
        where = label + "".join(reversed(refused.path))
        raise InvalidArgumentsError(f"task {task_name}: argument {where} {refused.problem}") from None


def _converted_arguments(task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Tuple[list, dict]:
    """Copies of the arguments with what Flagsmith's encoder converts converted, checked
    as plain JSON: that finds any problem left and names where it is."""
    args = [_json_ready(value, 0, {}) for value in args]
    kwargs = {key: _json_ready(value, 0, {}) for key, value in kwargs.items()}
    _require_all_json(task_name, args, kwargs)
    return args, kwargs


def _require_all_json(task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for position, value in enumerate(args):
        require_json(task_name, f"args[{position}]", value)
    for key, value in kwargs.items():
        require_json(task_name, f"kwargs[{key!r}]", value)


class _Refused(Exception):
    """Raised where the walk found a problem; each level adds its step to `path` on the
    way out, so a label is only built for a value that is refused."""

    def __init__(self, problem: str, *, located: bool = True) -> None:
        self.problem = problem
        self.located = located  # False: named by the argument alone (a path 100 deep says nothing)
        self.path: List[str] = []


class _Converts(Exception):
    """Raised where the walk met a value to convert. An exception, not a result every
    level returns, so the walk of plain JSON, `.delay()`'s usual case, costs no more for
    the conversions it does not need."""


def _require_plain(value: Any, depth: int, enclosing: set) -> None:
    """`enclosing`: the ids of the containers `value` is inside, to tell a cycle (which
    JSON cannot hold) from mere depth."""
    if isinstance(value, str):  # a str Enum too: JSON writes the string itself
        problem = string_problem(value)
        if problem:
            raise _Refused(f"= {short_repr(value)} contains {problem}")
    elif value is None or value is True or value is False:
        return
    elif isinstance(value, int):  # an IntEnum too
        limit = sys.get_int_max_str_digits()
        if limit and value.bit_length() > _SAFE_BITS_PER_DIGIT_LIMIT * limit:
            _require_convertible(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _Refused(f"= {value!r} cannot be stored as JSON (not a finite number)")
    elif isinstance(value, (list, dict)) or value.__class__ is tuple:
        if id(value) in enclosing:
            raise _Refused("contains itself (a cycle), which JSON cannot hold")
        if depth >= MAX_ARGUMENT_DEPTH:
            raise _Refused(f"is nested deeper than {MAX_ARGUMENT_DEPTH} levels", located=False)
        enclosing.add(id(value))
        is_dict = isinstance(value, dict)
        for key, item in (value.items() if is_dict else enumerate(value)):
            if is_dict:
                _require_key(key)
            try:
                _require_plain(item, depth + 1, enclosing)
            except _Refused as refused:
                if refused.located:
                    refused.path.append(f"[{key!r}]")
                raise
        enclosing.discard(id(value))
    elif isinstance(value, tuple):  # a namedtuple, or another tuple subclass: copied as a dict or a list
        _namedtuple_fields(value)  # refused here if it says it is one and is not
        raise _Converts
    else:
        _converted(value)  # refused here if it cannot be
        raise _Converts


def _json_ready(value: Any, depth: int, ancestors: Dict[int, Any]) -> Any:
    """A copy of `value` with what Flagsmith's encoder converts converted. What cannot be
    converted (an object, what lies too deep) is left as it is, and a cycle is copied as
    a cycle (`ancestors`: the copies of the containers `value` is inside, by the id of
    their original), for the check that follows to refuse, naming where it is."""
    if isinstance(value, (str, int, float)) or value is None:
        return value
    if not isinstance(value, (list, tuple, dict)):
        try:
            return _converted(value)
        except _Refused:
            return value
    if id(value) in ancestors:
        return ancestors[id(value)]
    if depth >= MAX_ARGUMENT_DEPTH:
        return value
    try:
        fields = _namedtuple_fields(value)
    except _Refused:
        return value
    if fields is not None:
        return _json_ready(fields, depth, ancestors)
    ready: Any = {} if isinstance(value, dict) else []
    ancestors[id(value)] = ready
    if isinstance(value, dict):
        for key, item in value.items():
            ready[key] = _json_ready(item, depth + 1, ancestors)
    else:
        ready.extend(_json_ready(item, depth + 1, ancestors) for item in value)
    del ancestors[id(value)]
    return ready


def _namedtuple_fields(value: Any) -> Optional[dict]:
    """A namedtuple's fields, which simplejson (namedtuple_as_object) writes as an object;
    None for anything else."""
    if type(value) is tuple or not isinstance(value, tuple):
        return None
    as_dict = getattr(value, "_asdict", None)
    if not callable(as_dict):
        return None
    fields = as_dict()
    if not isinstance(fields, dict):
        raise _Refused(f"= {short_repr(value)} cannot be stored as JSON (its _asdict() returned "
                       f"{type(fields).__name__}, not a dict)")
    return fields


def _converted(value: Any) -> Any:
    """What Flagsmith's encoder writes for a value JSON has no type for: simplejson's own
    Decimal, then DjangoJSONEncoder.default, to the character (Django's
    core/serializers/json.py). The modules of Decimal, UUID and Django's lazy strings are
    looked up, not imported: a value of their type means they are loaded already, and
    `.delay()` need not pay for importing them."""
    if isinstance(value, datetime.datetime):
        text = value.isoformat()
        if value.microsecond:  # milliseconds, as ECMA-262's date time string format has
            text = text[:23] + text[26:]
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, datetime.time):
        if value.utcoffset() is not None:
            raise _Refused(f"= {short_repr(value)} cannot be stored as JSON (JSON can't represent timezone-aware times)")
        text = value.isoformat()
        return text[:12] if value.microsecond else text
    if isinstance(value, datetime.timedelta):
        return duration_iso_string(value)
    decimal = sys.modules.get("decimal")
    if decimal is not None and isinstance(value, decimal.Decimal):
        return _decimal_number(value)
    uuid = sys.modules.get("uuid")
    if uuid is not None and isinstance(value, uuid.UUID):
        return str(value)
    functional = sys.modules.get("django.utils.functional")
    if functional is not None and isinstance(value, functional.Promise):  # a lazy translation
        text = str(value)
        problem = string_problem(text)
        if problem:
            raise _Refused(f"= {short_repr(text)} contains {problem}")
        return text
    raise _Refused(f"= {short_repr(value)} cannot be stored as JSON "
                   f"(Object of type {type(value).__name__} is not JSON serializable)")


def _decimal_number(value: Any) -> Any:
    """The number a Flagsmith task gets for a Decimal: simplejson writes str(value) as a
    JSON number and reads it back as Python reads JSON, an int for digits alone, else a
    float. That int or float is what is written here: the text itself would not survive
    jsonb, which writes 1E+2 back as 100, an int where Flagsmith's task gets 100.0."""
    if not value.is_finite():
        raise _Refused(f"= {short_repr(value)} cannot be stored as JSON (not a finite number)")
    text = str(value)
    if "." not in text and "E" not in text.upper():
        limit = sys.get_int_max_str_digits()
        if limit and len(text.lstrip("-")) > limit:
            raise _Refused(f"is an integer of more than {limit} digits, which JSON cannot carry here")
        return int(value)
    number = float(value)
    if not math.isfinite(number):
        raise _Refused(f"= {short_repr(value)} cannot be stored as JSON (not a finite number as a float, "
                       "which is what the task would read)")
    return number


def duration_iso_string(duration: datetime.timedelta) -> str:
    """Django's duration_iso_string (django/utils/duration.py): ISO 8601, days not folded
    into months, e.g. P1DT02H00M03S."""
    sign = ""
    if duration < datetime.timedelta(0):
        if duration == datetime.timedelta.min:  # its negation overflows, in Django too
            raise _Refused(f"= {short_repr(duration)} cannot be stored as JSON (timedelta.min cannot be negated)")
        sign, duration = "-", -duration
    minutes, seconds = divmod(duration.seconds, 60)
    hours, minutes = divmod(minutes, 60)
    fraction = f".{duration.microseconds:06d}" if duration.microseconds else ""
    return f"{sign}P{duration.days}DT{hours:02d}H{minutes:02d}M{seconds:02d}{fraction}S"


# An integer of fewer bits than this times Python's digit limit (sys.get_int_max_str_digits,
# 4,300 by default; 0 for none) has fewer digits than the limit (a digit is 3.32 bits);
# a larger one is converted as json would, and refused if Python refuses.
_SAFE_BITS_PER_DIGIT_LIMIT = 3


def _require_convertible(value: int) -> None:
    try:
        int.__repr__(value)  # what json.dumps calls
    except ValueError:
        raise _Refused(f"is an integer of more than {sys.get_int_max_str_digits()} digits, which JSON "
                       "cannot carry here") from None


def _require_key(key: Any) -> None:
    if not isinstance(key, str):
        raise _Refused(f"has a key {short_repr(key)} that is not a string (JSON would turn it into one)")
    problem = string_problem(key)
    if problem:
        raise _Refused(f"has a key {short_repr(key)} that contains {problem}")


def string_problem(text: str) -> Optional[str]:
    if "\x00" in text:
        return NUL_PROBLEM
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATE_PROBLEM
    return None


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
