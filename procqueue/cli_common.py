"""What every `procqueue` command shares: one-line errors and their exit codes, the
database options, and the connection to the queue a command works on. Its own module so
that the command modules (cli, cli_operations) import it, never each other."""

from __future__ import annotations

import functools
import sys
from datetime import datetime
from typing import Any, Callable, Optional

import click
import psycopg2

from . import config as config_module
from .db import first_line, tables_missing
from .driver import UNDEFINED_TABLE
from .errors import DatabaseError, ProcqueueError
from .records import UnreadableJson



def set_program(name: str) -> None:
    """Name the command being run, as its errors are to name it."""
    global _program
    _program = name


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ProcqueueError (and any database error) into one line on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ProcqueueError as exc:
            fail(str(exc), exc.exit_code)
        except psycopg2.Error as exc:
            # By its code, not `except psycopg2.errors.UndefinedTable`: a stop signal that
            # lands inside psycopg2's import leaves psycopg2.errors half made, and such a
            # clause, looked up as the stop unwinds through here, raised AttributeError.
            if exc.pgcode == UNDEFINED_TABLE:
                fail(with_other_schemas(str(tables_missing(exc))), DatabaseError.exit_code)
            fail(f"database error: {first_line(exc)}", DatabaseError.exit_code)

    return wrapper


_program = "procqueue"  # the command being run, as errors name it


def fail(message: str, exit_code: int) -> None:
    click.echo(f"{_program}: error: {message}", err=True)
    sys.exit(exit_code)


DATABASE_URL_HELP = ("libpq URL of the queue database. A password in it shows to every local user in `ps`: "
                     "prefer DATABASE_URL, PGPASSWORD or ~/.pgpass. "
                     "[env: DATABASE_URL; default: the embedded PostgreSQL]")


def database_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--schema", default=None, metavar="NAME",
        help="Postgres schema of the queue tables. [env: PROCQUEUE_SCHEMA; default: procqueue]",
    )(func)
    func = click.option(
        "--database-url", default=None, metavar="URL", help=DATABASE_URL_HELP,
    )(func)
    return func


def queue_connection(database_url: Optional[str], schema: Optional[str]):
    """The connection and statements of the queue a command works on, which must exist:
    when its schema has no procqueue tables, the error names the schemas that do."""
    from . import client

    database = database_of(database_url, schema)
    client.configure(database_url=database.url, schema=database.schema)
    conn, queries = client.connection()
    if queries.schema_version(conn) == 0:
        raise DatabaseError(with_other_schemas(
            f"schema {database.schema!r} of this database holds no procqueue queue "
            "(--schema, PROCQUEUE_SCHEMA); `procqueue migrate` creates one", conn, queries))
    return conn, queries


def with_other_schemas(message: str, conn=None, queries=None) -> str:
    """The message, and the schemas of the database that do hold a queue: after a demo,
    the tables are in procqueue_demo, and `migrate` would make an empty queue elsewhere.
    Best effort: without a connection to ask, the message alone."""
    from . import client

    try:
        if conn is None:
            conn, queries = client.connection()
        others = [name for name in queries.procqueue_schemas(conn) if name != queries.schema]
    except (psycopg2.Error, ProcqueueError):
        return message
    if not others:
        return message
    return f"{message}. Queues in this database: {', '.join(others)} (pass --schema {others[0]})"


def database_of(database_url: Optional[str], schema: Optional[str]) -> config_module.DatabaseConfig:
    """The database a command works on, with a warning on stderr when its password came
    on the command line."""
    warn_of_password_in_arguments(database_url)
    return config_module.processor_config(database_url=database_url, schema=schema).database


def warn_of_password_in_arguments(database_url: Optional[str]) -> None:
    if database_url and config_module.has_password(database_url):
        click.echo(f"procqueue: warning: {config_module.PASSWORD_IN_ARGUMENTS_WARNING}", err=True)


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UnreadableJson):  # not to be mistaken for a string argument
        return {"unreadable_json": value.reason}
    return str(value)
