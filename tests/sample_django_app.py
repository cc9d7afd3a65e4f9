"""A Django program enqueueing through its own database connection: `.delay(connection=)`
inside and outside `transaction.atomic()`. Prints a JSON report of what another
connection saw. Its own process, since django.setup() is for the life of one.

    python sample_django_app.py DATABASE_URL psycopg2|psycopg|psycopg-server-binding
"""

import json
import sys
from datetime import datetime, timedelta, timezone

url, driver = sys.argv[1], sys.argv[2]
if driver == "psycopg2":
    sys.modules["psycopg"] = None  # Django takes psycopg 3 when it can import it

import django  # noqa: E402
import psycopg2  # noqa: E402
from django.conf import settings  # noqa: E402

dsn = psycopg2.extensions.parse_dsn(url)
options = {"server_side_binding": True} if driver == "psycopg-server-binding" else {}
settings.configure(USE_TZ=True, INSTALLED_APPS=[], DATABASES={
    "default": {"ENGINE": "django.db.backends.postgresql", "NAME": dsn["dbname"], "USER": dsn.get("user", ""),
                "PASSWORD": dsn.get("password", ""), "HOST": dsn.get("host", ""), "PORT": dsn.get("port", ""),
                "OPTIONS": options},
    "lite": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
})
django.setup()

from django.db import connection, connections, transaction  # noqa: E402

import procqueue  # noqa: E402
from procqueue import register_task_handler  # noqa: E402

procqueue.configure(database_url=url, schema="procqueue", task_run_method=procqueue.TaskRunMethod.TASK_PROCESSOR)


@register_task_handler(task_name="django.greet")
def greet(name):
    pass


@register_task_handler(task_name="django.limited", queue_size=2)
def limited():
    pass


class Rollback(Exception):
    pass


observer = psycopg2.connect(url)
observer.autocommit = True


def tasks():
    with observer.cursor() as cur:
        cur.execute("SELECT task_name, args->>0 FROM procqueue.tasks ORDER BY id")
        return [f"{name}({arg})" if arg else name for name, arg in cur.fetchall()]


def refusal(action):
    try:
        action()
    except Exception as exc:
        return f"{type(exc).__module__}.{type(exc).__name__}: {exc}".splitlines()[0]
    return None


report = {}

greet.delay(args=("autocommit",), connection=connection)
report["outside atomic"] = tasks()
report["driver"] = type(connection.connection).__module__.split(".")[0]

with transaction.atomic():
    greet.delay(args=("committed",), connection=connection)
    report["inside atomic, before commit"] = tasks()
report["after commit"] = tasks()

try:
    with transaction.atomic(using="default"):
        greet.delay(args=("rolled back",), connection=connections["default"])
        raise Rollback()
except Rollback:
    pass
report["after rollback"] = tasks()

when = datetime.now(timezone.utc) + timedelta(hours=1)
with transaction.atomic():
    ids = procqueue.enqueue_many([limited.call(), greet.call(args=("later",), delay_until=when), limited.call(),
                                  limited.call()], connection=connections["default"])
report["batch ids"] = len(ids)
report["after batch"] = tasks()
report["later run_at"] = procqueue.get_task(ids[1]).run_at == when

with transaction.atomic():
    ids = procqueue.enqueue_many([greet.call(args=("plain 1",)), greet.call(args=("plain 2",))],
                                 connection=connection)
report["plain batch ids"] = len(ids)

procqueue.configure(schema="nosuch")
report["missing tables"] = refusal(lambda: greet.delay(args=("x",), connection=connection))
with transaction.atomic():
    report["missing tables in atomic"] = refusal(lambda: greet.delay(args=("x",), connection=connection))
    report["the next statement in that atomic"] = refusal(lambda: connection.cursor().execute("SELECT 1"))
procqueue.configure(schema="procqueue")

report["sqlite"] = refusal(lambda: greet.delay(args=("x",), connection=connections["lite"]))

for _ in range(7):
    greet.delay(args=("again",), connection=connection)
    procqueue.enqueue_many([limited.call(), greet.call(args=("again",))], connection=connection)
with connection.cursor() as cur:
    cur.execute("SELECT count(*) FROM pg_prepared_statements")
    report["prepared statements"] = cur.fetchone()[0]

print(json.dumps(report))
