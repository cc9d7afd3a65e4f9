"""procqueue's settings read from a Django project's.

What procqueue's config reads from the environment, with every Django setting of the same
name laid over it (Flagsmith's TASK_RUN_METHOD, TASK_DELETE_RETENTION_DAYS, ...,
TASK_PROCESSOR_NUM_THREADS; procqueue's PROCQUEUE_SCHEMA, PROCQUEUE_POOLER, ...), and the
queue database taken from DATABASES: the one place a Django project's settings become
procqueue's. The result is an environment-shaped mapping, so every rule about a value
(parsing, limits, the one-line error naming it) stays in procqueue.config.
"""

from __future__ import annotations

import datetime
import enum
import os
from pathlib import PurePath
from typing import Any, Dict, Mapping

from django.conf import settings as django_settings
from django.db import connections

from ... import config
from ...errors import ConfigError

ALIAS_SETTING = "PROCQUEUE_DATABASE"  # the DATABASES alias of the queue, when not "default"
# Flagsmith's: the databases its processor reads; "task_processor" among them means a
# separate task database under that alias.
FLAGSMITH_DATABASES_SETTING = "TASK_PROCESSOR_DATABASES"
FLAGSMITH_TASK_ALIAS = "task_processor"
POSTGRES_ENGINES = ("django.db.backends.postgresql", "django.contrib.gis.db.backends.postgis")

# libpq's connection keywords (PostgreSQL 17's list): the OPTIONS a DATABASES entry may
# hold that mean something to a connection of procqueue's own. The rest of OPTIONS is
# Django's (isolation_level, server_side_binding, pool, assume_role, ...) and libpq would
# refuse it.
LIBPQ_KEYWORDS = frozenset("""
    host hostaddr port dbname user password passfile require_auth channel_binding connect_timeout
    client_encoding options application_name fallback_application_name keepalives keepalives_idle
    keepalives_interval keepalives_count tcp_user_timeout replication gssencmode sslmode requiressl
    sslcompression sslcert sslkey sslpassword sslcertmode sslrootcert sslcrl sslcrldir sslsni
    requirepeer ssl_min_protocol_version ssl_max_protocol_version krbsrvname gsslib gssdelegation
    service target_session_attrs load_balance_hosts sslnegotiation
""".split())


def database_alias() -> str:
    """The DATABASES alias of the queue: PROCQUEUE_DATABASE, else Flagsmith's
    "task_processor" when TASK_PROCESSOR_DATABASES lists it, else "default"."""
    alias = getattr(django_settings, ALIAS_SETTING, None)
    source = ALIAS_SETTING
    if alias is None:
        listed = getattr(django_settings, FLAGSMITH_DATABASES_SETTING, None) or ()
        alias, source = ((FLAGSMITH_TASK_ALIAS, FLAGSMITH_DATABASES_SETTING) if FLAGSMITH_TASK_ALIAS in listed
                         else ("default", "DATABASES"))
    databases = django_settings.DATABASES
    if not isinstance(alias, str) or alias not in databases:
        raise ConfigError(f"invalid value for {source}: the DATABASES alias {alias!r} is not in DATABASES "
                          f"(expected one of {', '.join(map(repr, databases)) or 'none: DATABASES is empty'})")
    # By the backend's vendor, not its ENGINE's name: a project's own backend (a
    # subclass of Django's, for metrics or pooling) is as much PostgreSQL.
    try:
        vendor = connections[alias].vendor
    except Exception as exc:  # an ENGINE Django cannot load: its own message says which
        raise ConfigError(f"invalid value for DATABASES[{alias!r}]['ENGINE']: {exc}") from None
    if vendor != "postgresql":
        engine = databases[alias].get("ENGINE", "")
        raise ConfigError(f"invalid value for DATABASES[{alias!r}]['ENGINE']: {engine!r} is {vendor} "
                          f"(expected a PostgreSQL backend such as {POSTGRES_ENGINES[0]!r}: procqueue's queue "
                          "lives in PostgreSQL)")
    return alias


def database_dsn(alias: str) -> str:
    """A libpq key=value string for the database Django connects to under `alias`, as
    Django now has it (under its test runner, the test database)."""
    from psycopg2.extensions import make_dsn

    settings_dict = connections[alias].settings_dict
    params: Dict[str, Any] = {
        "dbname": settings_dict.get("NAME"),
        "user": settings_dict.get("USER"),
        "password": settings_dict.get("PASSWORD"),
        "host": settings_dict.get("HOST"),
        "port": settings_dict.get("PORT"),
    }
    for key, value in (settings_dict.get("OPTIONS") or {}).items():
        if key not in LIBPQ_KEYWORDS:
            continue  # Django's own (isolation_level, server_side_binding, pool, assume_role, ...)
        if isinstance(value, os.PathLike):  # sslrootcert=BASE_DIR / "ca.pem"
            value = os.fspath(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            params[key] = value
    return make_dsn(**{key: str(value) for key, value in params.items() if value not in (None, "")})


def environment(base: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """`base` with the project's Django settings over it: what procqueue's config reads."""
    env = dict(base)
    for name in config.SETTING_NAMES:
        value = getattr(django_settings, name, None)
        if value is not None:
            env[name] = setting_text(name, value)
    env[config.ENV_DATABASE_URL] = database_dsn(database_alias())
    env[config.ENV_EMBEDDED] = "0"  # the database is the project's, never the embedded one
    return env


def setting_text(name: str, value: Any) -> str:
    """A Django setting's value as the environment variable of that name would spell it."""
    if isinstance(value, enum.Enum):  # TaskRunMethod.SYNCHRONOUSLY, Flagsmith's or ours
        return str(value.name)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime.timedelta):  # Flagsmith's TASK_DELETE_RUN_EVERY = env.timedelta(...)
        seconds = value.total_seconds()
        return str(int(seconds)) if seconds.is_integer() else str(seconds)
    if isinstance(value, datetime.time):  # Flagsmith's TASK_DELETE_RUN_TIME = env.time(...), UTC
        if value.utcoffset() not in (None, datetime.timedelta(0)) or value.microsecond:
            raise ConfigError(f"invalid value for settings.{name}: {value!r} (expected a time of day in UTC, "
                              "to the second)")
        return value.replace(tzinfo=None).isoformat()
    if isinstance(value, (str, int, float, PurePath)):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return ",".join(value)  # PROCQUEUE_IMPORTS
    # The type, not the value: it may be a secret (PROCQUEUE_DASHBOARD_TOKEN).
    raise ConfigError(f"invalid value for settings.{name}: a {type(value).__name__} (expected a string, a number, "
                      "a boolean, a datetime.time or a datetime.timedelta)")
