"""Command-line entry points: `procqueue ...` and `run-task-processor`.

The edge where user mistakes become one-line messages and exit codes: every ProcqueueError
is caught here (by cli_common.user_errors), nowhere deeper.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, List, Mapping, Optional, Tuple

import click

from . import config as config_module
from .arguments import MAX_ARGUMENT_DEPTH, short_repr
from .cli_operations import (hidden_alias, psql_command, purge_command, recurring_group, tasks_cancel,
                             tasks_group, tasks_show)
from .config import (
    DEFAULT_GRACE_PERIOD_MS,
    DEFAULT_NUM_WORKERS,
    DEFAULT_QUEUE_POP_SIZE,
    DEFAULT_DATABASE_WAIT_SECONDS,
    DEFAULT_RESCUE_AFTER_SECONDS,
    DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
    DEFAULT_METRICS_HOST,
    DEFAULT_SLEEP_INTERVAL_MS,
    ProcessorConfig,
    default_status_file,
)
from .cli_common import (DATABASE_URL_HELP, database_of, database_options, fail, queue_connection, set_program,
                         user_errors, warn_of_password_in_arguments)
from .errors import ConfigError, ProcqueueError, TaskError
from .logs import LOG_FORMATS, setup_logging

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)
LOG_FORMAT = click.Choice(list(LOG_FORMATS), case_sensitive=False)
DEMO_SCHEMA = "procqueue_demo"
DEMO_RATES = (0.1, 1000.0)  # tasks per second the demo's producer may be asked for


def _run_click(command: click.Command, prog_name: str, args: Optional[List[str]] = None, obj: Any = None) -> None:
    """Run a click command with usage errors as one line too (click prints four).
    `args`: the arguments (default: the command line's); `obj`: click's context object."""
    set_program(prog_name)
    try:
        command.main(args=args, prog_name=prog_name, standalone_mode=False, obj=obj)
    except click.exceptions.MissingParameter as exc:  # a BadParameter with no value to name
        kind = "argument" if isinstance(exc.param, click.Argument) else "option"
        name = exc.param.human_readable_name if exc.param is not None else "value"
        fail(f"missing {kind} {name} (see {_help_path(exc.ctx, command, prog_name)} --help)", exc.exit_code)
    except click.exceptions.BadParameter as exc:
        # Worded as procqueue's own checks word theirs: the flag, the value, what is expected.
        flag = exc.param.opts[0] if exc.param is not None and exc.param.opts else (exc.param_hint or "a value")
        fail(f"invalid value for {flag}: {exc.message.rstrip('.')} "
              f"(see {_help_path(exc.ctx, command, prog_name)} --help)", exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:
        # `procqueue` alone: the help a user asked for by typing it, not an error.
        click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message(), err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.UsageError as exc:
        fail(f"{exc.format_message()} (see {_help_path(exc.ctx, command, prog_name)} --help)", exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)


def _help_path(ctx: Optional[click.Context], command: click.Command, prog_name: str) -> str:
    """The command whose --help to point at: the subcommand's, even when click reports
    an option error against the group (`procqueue stats --schema` with no value)."""
    if ctx is not None and ctx.command is not command:
        return ctx.command_path
    if isinstance(command, click.Group):
        named = next((arg for arg in sys.argv[1:] if arg in command.commands), None)
        if named is not None:
            return f"{prog_name} {named}"
    return ctx.command_path if ctx is not None else prog_name


def procqueue_cli() -> None:
    """The `procqueue` command line (its entry point, procqueue.starting.procqueue_main,
    arms stop signals first for the commands that run a processor)."""
    _run_click(main, "procqueue")


def run_task_processor_cli(args: Optional[List[str]] = None, prog_name: str = "run-task-processor",
                           environment: Optional[Mapping[str, str]] = None) -> None:
    """The `run-task-processor` command line (see procqueue.starting). A program running
    it under another name passes `args`, `prog_name` and the `environment` its settings
    make (`manage.py runprocessor`: Django settings over the process's environment)."""
    _run_click(run_task_processor, prog_name, args, environment)


def _processor_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--numthreads", "num_workers", type=int, default=None, metavar="N",
                     help=f"Worker processes to run. [env: TASK_PROCESSOR_NUM_THREADS; default: {DEFAULT_NUM_WORKERS}]"),
        click.option("--sleepintervalms", "sleep_interval_ms", type=int, default=None, metavar="MS",
                     help="How often the processor looks for work no NOTIFY announced (a delayed task "
                          "now due, a retry): an idle worker claims once no worker has claimed for this long. "
                          f"[env: TASK_PROCESSOR_SLEEP_INTERVAL_MS; default: {DEFAULT_SLEEP_INTERVAL_MS}]"),
        click.option("--graceperiodms", "grace_period_ms", type=int, default=None, metavar="MS",
                     help="How long a worker between tasks may go without a heartbeat before it is killed "
                          "as stuck (a running task is held to its own timeout instead). "
                          f"[env: TASK_PROCESSOR_GRACE_PERIOD_MS; default: {DEFAULT_GRACE_PERIOD_MS}]"),
        click.option("--queuepopsize", "queue_pop_size", type=int, default=None, metavar="N",
                     help="Tasks a worker claims per round trip to begin with; claims grow while tasks "
                          "are quick, up to 10 times this. "
                          f"[env: TASK_PROCESSOR_QUEUE_POP_SIZE; default: {DEFAULT_QUEUE_POP_SIZE}]"),
        click.option("--shutdown-timeout", "shutdown_timeout", type=float, default=None, metavar="SECONDS",
                     help="On SIGTERM/SIGINT, how long running tasks may take to finish before they are "
                          f"killed and put back. [default: {DEFAULT_SHUTDOWN_TIMEOUT_SECONDS:g}]"),
        click.option("--rescue-after", "rescue_after", type=float, default=None, metavar="SECONDS",
                     help="A processor (of any host) silent this long is dead: its tasks are put back "
                          f"by a live one. [default: {DEFAULT_RESCUE_AFTER_SECONDS:g}]"),
        click.option("--database-wait", "database_wait", type=float, default=None, metavar="SECONDS",
                     help="At start, how long to keep retrying a database that cannot be reached (refused, "
                          "timed out, restarting) before giving up; 0: give up at once. "
                          f"[env: PROCQUEUE_DATABASE_WAIT; default: {DEFAULT_DATABASE_WAIT_SECONDS:g}]"),
        click.option("--pooler", "pooler", default=None, metavar="MODE",
                     help="What is between the processor and Postgres: none, session (a session-mode pooler) "
                          "or transaction (a transaction-mode pooler such as PgBouncer's pool_mode = transaction: "
                          "no LISTEN, workers poll every --sleepintervalms; no prepared statements). "
                          "[env: PROCQUEUE_POOLER; default: none]"),
        click.option("--max-tasks-per-worker", "max_tasks_per_worker", type=int, default=None, metavar="N",
                     help="Replace a worker after it has run N tasks. [default: never]"),
        click.option("--max-memory-per-worker", "max_memory_per_worker", type=int, default=None, metavar="MB",
                     help="Replace a worker, after its current task, once its RSS exceeds MB megabytes. "
                          "[default: never]"),
        click.option("--import", "-i", "imports", multiple=True, metavar="MODULE",
                     help="Module that registers tasks; repeatable. [env: PROCQUEUE_IMPORTS, comma-separated]"),
        click.option("--queue", "-q", "queues", multiple=True, metavar="NAME",
                     help="Only run tasks of this queue; repeatable. [default: every queue]"),
        click.option("--metrics-port", "metrics_port", type=int, default=None, metavar="PORT",
                     help="Serve /metrics, /healthz, /readyz, /status and /monitoring on this port; 0 picks a free "
                          "one. [env: PROCQUEUE_METRICS_PORT; default: not served]"),
        click.option("--metrics-host", "metrics_host", default=None, metavar="HOST",
                     help=f"Address to serve them on. [env: PROCQUEUE_METRICS_HOST; default: {DEFAULT_METRICS_HOST}]"),
        click.option("--dashboard/--no-dashboard", "dashboard", default=None,
                     help="Serve the web dashboard at / on the metrics port (its process starts on the first "
                          "request and holds one more database connection). "
                          "[env: PROCQUEUE_DASHBOARD=on|off; default: on]"),
        click.option("--dashboard-token-file", "dashboard_token_file", type=click.Path(dir_okay=False), default=None,
                     metavar="PATH", help="File holding the dashboard's token (served at / on the metrics port): "
                     "logging in with it shows task arguments and errors and allows retry and cancel. "
                     "[env: PROCQUEUE_DASHBOARD_TOKEN; default: none, a read-only dashboard]"),
        click.option("--status-file", "status_file", type=click.Path(dir_okay=False), default=None, metavar="PATH",
                     help="JSON status file, rewritten every second; what procqueue-health reads. "
                          f"[env: PROCQUEUE_STATUS_FILE; default: {default_status_file()}]"),
        click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True),
        click.option("--log-format", type=LOG_FORMAT, default="text", show_default=True,
                     help="text: one key=value line per event; json: one JSON object per line."),
    ]
    for option in reversed(options):
        func = option(func)
    return database_options(func)


def build_processor_config(env: Optional[Mapping[str, str]] = None, **values: Any) -> ProcessorConfig:
    """The processor's configuration from the command line's values and then `env` (the
    process's environment, or what a caller such as `manage.py runprocessor` gives)."""
    config = _processor_config_of(env, **values)
    if values.get("database_url") and config_module.has_password(values["database_url"]):
        config = replace(config, database=replace(config.database, password_in_arguments=True))
    return config


def _processor_config_of(env: Optional[Mapping[str, str]], **values: Any) -> ProcessorConfig:
    return config_module.processor_config(
        env=env,
        database_url=values.get("database_url"),
        schema=values.get("schema"),
        pooler=values.get("pooler"),
        num_workers=values.get("num_workers"),
        sleep_interval_ms=values.get("sleep_interval_ms"),
        grace_period_ms=values.get("grace_period_ms"),
        queue_pop_size=values.get("queue_pop_size"),
        shutdown_timeout_seconds=values.get("shutdown_timeout"),
        rescue_after_seconds=values.get("rescue_after"),
        database_wait_seconds=values.get("database_wait"),
        max_tasks_per_worker=values.get("max_tasks_per_worker"),
        max_memory_per_worker_mb=values.get("max_memory_per_worker"),
        imports=tuple(values.get("imports") or ()),
        queues=tuple(values.get("queues") or ()),
        metrics_port=values.get("metrics_port"),
        metrics_host=values.get("metrics_host"),
        status_file=values.get("status_file"),
        dashboard_token_file=values.get("dashboard_token_file"),
        dashboard=values.get("dashboard"),
    )


def import_task_modules(modules: Tuple[str, ...]) -> None:
    """Import the user's task modules (and ours), from the current directory too."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    importlib.import_module("procqueue.maintenance")
    for module in modules:
        try:
            importlib.import_module(module)
        except ProcqueueError:
            raise
        except Exception as exc:
            raise ConfigError(f"cannot import task module {module!r}: {type(exc).__name__}: {exc}") from None


def run_processor(config: ProcessorConfig, log_level: str, log_format: str = "text",
                  on_start: Optional[Callable[[], None]] = None, on_stop: Optional[Callable[[], None]] = None) -> int:
    from .logs import log_event
    from .metrics import MultiprocessMetrics
    from .starting import StoppedWhileStarting, arm
    from .supervisor import Supervisor

    starting = arm()  # the entry points armed it already; a program calling this may not have
    store = None
    try:
        setup_logging(log_level, log_format)
        if config.database.password_in_arguments:
            log_event(logging.getLogger("procqueue.supervisor"), logging.WARNING, "config.password_on_command_line",
                      note=config_module.PASSWORD_IN_ARGUMENTS_WARNING)
        store = MultiprocessMetrics.create() if config.metrics_port is not None else None
        if store is not None:
            store.enable()  # before task modules are imported: they may create metrics
        import_task_modules(config.imports)
        supervisor = Supervisor(config, metrics_store=store, on_start=on_start, on_stop=on_stop)
        supervisor.install_signal_handlers()  # from here on a signal is a flag its loop acts on
        try:
            starting.over()
        except StoppedWhileStarting:
            supervisor.close()
            raise
        return supervisor.run()
    except StoppedWhileStarting as stop:
        log_event(logging.getLogger("procqueue.supervisor"), logging.INFO, "processor.stopped", exit_code=0,
                  reason=str(stop), note="stopped while starting")
        return 0
    finally:
        starting.restore()
        if store is not None:
            store.remove()


# -- procqueue -----------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """procqueue: a Postgres-backed task processor with one process per worker."""


@main.command("run")
@_processor_options
@user_errors
def run_command(log_level: str, log_format: str, **values: Any) -> None:
    """Run the task processor (same as run-task-processor)."""
    sys.exit(run_processor(build_processor_config(**values), log_level, log_format))


@main.command("migrate")
@database_options
@user_errors
def migrate_command(database_url: Optional[str], schema: Optional[str]) -> None:
    """Create or upgrade the procqueue tables (idempotent)."""
    from .db import connect
    from .migrations import SCHEMA_VERSION, migrate

    database = database_of(database_url, schema)
    conn = connect(database)
    try:
        applied = migrate(conn, database.schema)
    finally:
        conn.close()
    state = "applied" if applied else "already up to date"
    click.echo(f"procqueue schema {database.schema!r} version {SCHEMA_VERSION}: {state} ({database.display_url})")


@main.command("enqueue")
@click.argument("task_name")
@click.option("--args", "args_json", default="[]", metavar="JSON", help="Positional arguments, a JSON array.")
@click.option("--kwargs", "kwargs_json", default="{}", metavar="JSON", help="Keyword arguments, a JSON object.")
@click.option("--delay", "delay_seconds", type=float, default=None, metavar="SECONDS",
              help="Run no sooner than this many seconds from now (at most ten years).")
@click.option("--priority", type=int, default=None, help="Override the task's priority (lower runs first).")
@click.option("--import", "-i", "imports", multiple=True, metavar="MODULE", help="Module that registers the task.")
@database_options
@user_errors
def enqueue_command(task_name: str, args_json: str, kwargs_json: str, delay_seconds: Optional[float],
                    priority: Optional[int], imports: Tuple[str, ...], database_url: Optional[str],
                    schema: Optional[str]) -> None:
    """Enqueue TASK_NAME (registered by an --import module); prints the task id."""
    from . import client, registry

    # Checked here rather than by a click.FloatRange: nan passes every comparison a range
    # makes, and a huge delay (1e12) overflows the datetime it is added to.
    max_delay = timedelta(days=3650)
    if delay_seconds is not None and not 0 <= delay_seconds <= max_delay.total_seconds():
        raise ConfigError(f"invalid value for --delay: {delay_seconds:g} "
                          f"(expected a number of seconds from 0 to {max_delay.total_seconds():.0f}, ten years)")

    config = config_module.processor_config(database_url=database_url, schema=schema, imports=imports)
    warn_of_password_in_arguments(database_url)
    import_task_modules(config.imports)
    handler = registry.get_handler(task_name)
    if handler is None:
        raise TaskError(_unknown_task(task_name, config.imports))
    args = _json_option("--args", args_json, list, "a JSON array")
    kwargs = _json_option("--kwargs", kwargs_json, dict, "a JSON object")
    delay_until = datetime.now(timezone.utc) + timedelta(seconds=delay_seconds) if delay_seconds else None
    client.configure(database_url=config.database.url, schema=config.database.schema)
    task_id = handler.delay(args=args, kwargs=kwargs, delay_until=delay_until, priority=priority)
    click.echo("skipped: queue_size reached" if task_id is None else str(task_id))


@main.command("status")
@click.option("--status-file", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help=f"The processor's status file. [env: PROCQUEUE_STATUS_FILE; default: {default_status_file()}, "
                   "or that of the --owner user]")
@click.option("--owner", default=None, metavar="USER",
              help="The user (name or uid) the processor runs as; a status file belonging to anyone else is "
                   "not trusted. [default: the user running this command]")
@click.option("--json", "as_json", is_flag=True, help="Print the status document itself.")
@user_errors
def status_command(status_file: Optional[str], owner: Optional[str], as_json: bool) -> None:
    """Show a running processor's workers and queue, from its status file."""
    from .health import StatusError, load_status, supervisor_alive
    from .private_files import user_id
    from .status_text import render_text

    try:
        owner_uid = None if owner is None else user_id(owner)
    except ValueError as exc:
        raise ConfigError(f"invalid value for --owner: {exc}") from None
    path = status_file or default_status_file(uid=owner_uid)
    try:
        document = load_status(path, owner_uid)
    except StatusError as exc:
        raise ConfigError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(document, indent=2))
    elif document.get("state") != "starting":
        click.echo(render_text(document, time.time()))
    elif supervisor_alive(document) is False:
        raise ProcqueueError(f"the processor that wrote {path} (pid {document.get('pid')}) died while starting")
    else:
        click.echo(f"processor pid {document.get('pid')} on {document.get('hostname')}: starting "
                   f"(connecting, applying the schema) since {document.get('updated_at')}")


@main.command("stats")
@database_options
@user_errors
def stats_command(database_url: Optional[str], schema: Optional[str]) -> None:
    """Queue depth by state and queue, read from the database now, as JSON."""
    from .status import queue_section

    conn, queries = queue_connection(database_url, schema)
    stats = queries.queue_stats(conn, timeout_seconds=60, now=time.time())
    click.echo(json.dumps(queue_section(stats), indent=2))


@main.command("health", add_help_option=False,
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def health_command(arguments: Tuple[str, ...]) -> None:
    """Exit 0 if the processor is healthy, 1 if not (same as procqueue-health; see --help)."""
    from . import health_probe

    sys.exit(health_probe.run(list(arguments), prog="procqueue health"))


@main.command("demo")
@click.option("--rate", type=float, default=4.0, show_default=True,
              help=f"Example tasks enqueued per second ({DEMO_RATES[0]:g} to {DEMO_RATES[1]:g}).")
@click.option("--numthreads", "num_workers", type=int, default=2, show_default=True, help="Worker processes.")
@click.option("--schema", default=DEMO_SCHEMA, show_default=True, metavar="NAME",
              help="Postgres schema of the demo's queue: its own, so its tasks never mix with yours.")
@click.option("--database-url", default=None, metavar="URL", help=DATABASE_URL_HELP)
@click.option("--status-file", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help=f"Its status file. [env: PROCQUEUE_STATUS_FILE; default: {default_status_file()}]")
@user_errors
def demo_command(rate: float, num_workers: int, database_url: Optional[str], schema: str,
                 status_file: Optional[str]) -> None:
    """Run a processor with example tasks flowing in, until Ctrl-C.

    It serves its metrics and status on a free local port (see the metrics.listening line)."""
    if not DEMO_RATES[0] <= rate <= DEMO_RATES[1]:  # also refuses nan, which compares false to all
        raise ConfigError(f"invalid value for --rate: {rate:g} "
                          f"(expected tasks per second from {DEMO_RATES[0]:g} to {DEMO_RATES[1]:g})")
    config = build_processor_config(database_url=database_url, schema=schema, num_workers=num_workers,
                                    sleep_interval_ms=1000, imports=("procqueue.examples",),
                                    metrics_port=0, metrics_host="127.0.0.1", status_file=status_file)
    from .db import resolve_url

    click.echo(f"procqueue demo: database {config.database.display_url}; Ctrl-C to stop", err=True)
    producers: List[subprocess.Popen] = []

    def start_producer() -> None:  # once the processor is up: its checks passed, its schema applied
        env = dict(os.environ, DATABASE_URL=resolve_url(config.database), PROCQUEUE_SCHEMA=config.database.schema)
        producers.append(subprocess.Popen([sys.executable, "-m", "procqueue.examples", "--rate", str(rate)], env=env))

    def stop_producer() -> None:  # at the first signal, so the drain is not fed new tasks
        for producer in producers:
            producer.terminate()

    try:
        code = run_processor(config, "info", on_start=start_producer, on_stop=stop_producer)
    finally:
        for producer in producers:
            producer.terminate()
            try:
                # A SIGTERM landing while it imports psycopg2 can be swallowed there.
                producer.wait(timeout=3)
            except subprocess.TimeoutExpired:
                producer.kill()
                producer.wait()
    sys.exit(code)


def _unknown_task(task_name: str, imports: Tuple[str, ...]) -> str:
    from . import registry

    names = registry.registered_names()
    close = difflib.get_close_matches(task_name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    if not imports:
        return f"unknown task {task_name!r}: no module registers it here; pass its module with --import{hint}"
    return (f"unknown task {task_name!r}: {', '.join(imports)} registered {', '.join(names) or 'no tasks'}"
            f"{hint}")


def _json_option(flag: str, raw: str, expected_type: type, description: str) -> Any:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid value for {flag}: {short_repr(raw)} is not JSON ({exc.msg}); "
                          f"expected {description}") from None
    except RecursionError:
        raise ConfigError(f"invalid value for {flag}: {short_repr(raw)} is nested deeper than Python can read "
                          f"(arguments may be nested {MAX_ARGUMENT_DEPTH} levels deep)") from None
    except ValueError:  # the only other ValueError: an integer of more digits than Python converts
        raise ConfigError(f"invalid value for {flag}: {short_repr(raw)} holds an integer of more than "
                          f"{sys.get_int_max_str_digits()} digits") from None
    if not isinstance(value, expected_type):
        raise ConfigError(f"invalid value for {flag}: {short_repr(raw)} (expected {description})")
    return value


# The operator's commands live in cli_operations.
for _command in (tasks_group, purge_command, recurring_group, psql_command):
    main.add_command(_command)
main.add_command(hidden_alias(tasks_show), "show")
main.add_command(hidden_alias(tasks_cancel), "cancel")


# -- run-task-processor --------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_processor_options
@user_errors
def run_task_processor(log_level: str, log_format: str, **values: Any) -> None:
    """Run the procqueue task processor (Flagsmith's `runprocessor` flags)."""
    sys.exit(run_processor(build_processor_config(_callers_environment(), **values), log_level, log_format))


def _callers_environment() -> Optional[Mapping[str, str]]:
    """The settings a program running this command passed as click's `obj` (the Django
    app's: Django settings over the environment), or None for the environment."""
    obj = click.get_current_context().obj
    return obj if isinstance(obj, Mapping) else None


# -- procqueue dashboard ---------------------------------------------------------------


@main.command("dashboard")
@click.option("--port", type=int, required=True, metavar="PORT", help="Port to serve the dashboard on; 0 picks one.")
@click.option("--host", default=None, metavar="HOST",
              help=f"Address to serve it on. [default: {config_module.DEFAULT_DASHBOARD_HOST}]")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="File holding the token that unlocks arguments, errors, retry and cancel. "
                   "[env: PROCQUEUE_DASHBOARD_TOKEN; default: none, read-only]")
@click.option("--log-level", default="info", type=LOG_LEVELS, show_default=True)
@database_options
@user_errors
def dashboard_command(port: int, host: Optional[str], token_file: Optional[str], log_level: str,
                      database_url: Optional[str], schema: Optional[str]) -> None:
    """Serve the web dashboard on its own port, for a machine with no processor (a
    processor serves it at / on its --metrics-port)."""
    from .client import close_connection as close_client_connection
    from .dashboard import DashboardServer, listen, serve
    from .dashboard_app import DashboardApp
    from .logs import log_event

    warn_of_password_in_arguments(database_url)
    config = config_module.dashboard_config(database_url=database_url, schema=schema, token_file=token_file,
                                            host=host, port=port)
    setup_logging(log_level)
    app = DashboardApp(config)
    app.connection()  # a wrong URL or password: one line and an exit code now, not a 503 page later
    queue_connection(database_url, schema)  # ... and a schema with no queue, naming those with one
    close_client_connection()
    listener = listen(config.host, port)
    bound = listener.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    log_event(logging.getLogger("procqueue.dashboard"), logging.INFO, "dashboard.listening",
              url=f"http://{shown}:{bound[1]}/", login="token" if config.token else "none (read-only)")
    serve(DashboardServer(app, listener=listener))
