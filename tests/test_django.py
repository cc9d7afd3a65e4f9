"""The Django app (procqueue.contrib.django) in a real, small Django project.

tests/django_project is a shop as a Flagsmith-era project would have it: its settings
use Flagsmith's names, its `orders` app has a `tasks` module and a view that saves an
order and enqueues its confirmation in one transaction. Every test runs `manage.py` in a
subprocess (django.setup() is once per process), against a database of its own on the
test server, on both of Django's PostgreSQL drivers where the driver matters.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import psycopg2
import pytest

from databases import own_database
from helpers import SESSION_ID, SESSION_MARKER, TESTS, wait_until

PROJECT = TESTS / "django_project"
EXAMPLE = TESTS.parent / "examples" / "django"
DRIVERS = ["psycopg", "psycopg2"]
# What the test run's own environment may hold that would decide for the project.
NOT_INHERITED = ("DATABASE_URL", "PROCQUEUE_SCHEMA", "TASK_RUN_METHOD", "PROCQUEUE_IMPORTS", "DJANGO_SETTINGS_MODULE")


def project_environment(database_url: str, **extra: str) -> Dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in NOT_INHERITED}
    env.update({SESSION_MARKER: SESSION_ID, "SHOP_DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def manage(database_url: str, *args: str, timeout: float = 90, project: Path = PROJECT,
           **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=project, env=project_environment(database_url, **extra),
                          capture_output=True, text=True, timeout=timeout)


def start_runprocessor(database_url: str, *args: str, log: Path, project: Path = PROJECT, **extra: str) -> subprocess.Popen:
    with open(log, "wb") as output:
        return subprocess.Popen([sys.executable, "manage.py", "runprocessor", *args], cwd=project,
                                env=project_environment(database_url, **extra), stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(processor: subprocess.Popen) -> None:
    if processor.poll() is None:
        os.killpg(processor.pid, signal.SIGKILL)
        processor.wait()


def shell(database_url: str, code: str, project: Path = PROJECT, **extra: str) -> dict:
    """Run `code` in `manage.py shell`; it prints one JSON object as its last line."""
    done = manage(database_url, "shell", "-c", code, project=project, **extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows(database_url: str, query: str, params: tuple = ()) -> List[tuple]:
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def shop_database(server_url):
    """An empty database, then `manage.py migrate`: Django's tables and procqueue's."""
    with own_database(server_url, schema=None, prefix="procqueue_django_") as url:
        migrated = manage(url, "migrate", "--noinput")
        assert migrated.returncode == 0, migrated.stderr
        yield url, migrated.stdout


@pytest.fixture
def shop(shop_database):
    url, _ = shop_database
    for statement in ("TRUNCATE orders_order, orders_tick RESTART IDENTITY",
                      "TRUNCATE procqueue.tasks, procqueue.task_runs, procqueue.recurring_tasks, procqueue.processors"):
        rows_changed(url, statement)
    return url


def rows_changed(database_url: str, statement: str) -> None:
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def test_migrate_applies_procqueues_schema_to_the_queue_database(shop_database):
    url, output = shop_database
    assert "procqueue schema 'procqueue' version" in output
    assert rows(url, "SELECT to_regclass('procqueue.tasks') IS NOT NULL, to_regclass('public.orders_order') IS NOT NULL") \
        == [(True, True)]


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_view_enqueues_in_its_own_transaction_committed_or_rolled_back(shop, driver):
    """Flagsmith's `.delay()` saves a model in the caller's transaction: the order and its
    confirmation task exist together, or (the request failed) neither does."""
    answers = shell(shop, """
import json
from django.db import connection
from django.test import Client
client = Client()
paid = client.post("/orders/", {"item": "teapot"})
declined = client.post("/orders/", {"item": "kettle", "fail": "1"})
print(json.dumps({"paid": [paid.status_code, paid.json()], "declined": declined.status_code,
                  "driver": type(connection.connection).__module__}))
""", SHOP_DRIVER=driver)
    assert answers["driver"].split(".")[0] == driver  # the driver the test meant to use
    status, paid = answers["paid"]
    assert (status, answers["declined"]) == (200, 402)
    assert rows(shop, "SELECT id, item FROM orders_order") == [(paid["order"], "teapot")]
    assert rows(shop, "SELECT id, task_name, args, state FROM procqueue.tasks") == \
        [(paid["task"], "tasks.confirm_order", [paid["order"]], "queued")]


def test_runprocessor_runs_the_projects_tasks_and_checktaskprocessorthreadhealth_says_so(shop, tmp_path):
    """`manage.py runprocessor` with Flagsmith's flags: the task written by the view runs
    in a worker process through the ORM, the `tasks` module's recurring task runs on
    schedule, and the health command exits 0 while it runs and 1 once it has stopped."""
    order = shell(shop, """
import json
from django.test import Client
print(json.dumps(Client().post("/orders/", {"item": "teapot"}).json()))
""")["order"]
    status_file = tmp_path / "status.json"
    log = tmp_path / "runprocessor.log"
    processor = start_runprocessor(shop, "--sleepintervalms", "2000", "--numthreads", "2", "--graceperiodms", "20000",
                                   "--status-file", str(status_file), log=log)
    try:
        confirmed = wait_until(lambda: rows(shop, "SELECT confirmed_by_pid FROM orders_order WHERE id = %s AND confirmed",
                                            (order,)), timeout=30, message=lambda: log.read_text())
        assert confirmed[0][0] not in (None, processor.pid)  # a worker process, not the supervisor
        wait_until(lambda: rows(shop, "SELECT count(*) FROM orders_tick")[0][0] >= 2, timeout=30,
                   message="two runs of the recurring task")
        health = manage(shop, "checktaskprocessorthreadhealth", "--status-file", str(status_file))
        assert (health.returncode, health.stdout.startswith("healthy: 2 of 2 workers")) == (0, True), health
        processor.send_signal(signal.SIGTERM)
        assert processor.wait(timeout=30) == 0, log.read_text()
        health = manage(shop, "checktaskprocessorthreadhealth", "--status-file", str(status_file))
        assert health.returncode == 1 and "unhealthy" in health.stderr, health
    finally:
        stop(processor)


@pytest.mark.parametrize("driver", DRIVERS)
def test_transaction_on_commit_threads_start_when_the_transaction_commits(shop, driver):
    """Flagsmith's SEPARATE_THREAD with transaction_on_commit (its default): the thread
    starts at commit, never after a rollback; with transaction_on_commit=False at once."""
    seen = shell(shop, """
import json, threading
from django.db import transaction
from procqueue import register_task_handler

ran = []
@register_task_handler(task_name="shop.note")
def note(word):
    ran.append(word)

@register_task_handler(task_name="shop.note_now", transaction_on_commit=False)
def note_now(word):
    ran.append(word)

with transaction.atomic():
    committed = note.run_in_thread(args=("committed",))
    now = note_now.run_in_thread(args=("now",))
    started_inside = committed.ident is not None
    now.join(10)
committed.join(10)
try:
    with transaction.atomic():
        rolled_back = note.run_in_thread(args=("rolled back",))
        raise RuntimeError
except RuntimeError:
    pass
note.delay(args=("delayed",))  # outside a transaction: at once
print(json.dumps({"started_inside": started_inside, "ran": sorted(ran),
                  "rolled_back_started": rolled_back.ident is not None}))
""", SHOP_DRIVER=driver, SHOP_TASK_RUN_METHOD="SEPARATE_THREAD")
    assert seen == {"started_inside": False, "ran": ["committed", "delayed", "now"], "rolled_back_started": False}


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_projects_own_tests_see_tasks_in_djangos_test_database(shop, driver):
    """`manage.py test`: `.delay()`, `procqueue.get_task`, `procqueue.cancel` and
    `procqueue.is_processor_healthy` in a
    TestCase go to the test database, inside the test's transaction, and Django can drop
    that database afterwards (nothing of procqueue's holds it open)."""
    ran = manage(shop, "test", "orders", "--noinput", timeout=120, SHOP_DRIVER=driver)
    assert ran.returncode == 0, ran.stderr
    assert "OK" in ran.stderr and "Ran 2 tests" in ran.stderr
    assert rows(shop, "SELECT count(*) FROM procqueue.tasks") == [(0,)]  # nothing written to the real one


def test_a_separate_task_database_as_flagsmith_configures_it(server_url, shop):
    """TASK_PROCESSOR_DATABASES = ["task_processor"] with DATABASES["task_processor"] and
    procqueue's router in DATABASE_ROUTERS: the queue lives there, `manage.py migrate
    --database task_processor` creates it (and none of the project's tables), and
    `.delay()` writes there."""
    with own_database(server_url, schema=None, prefix="procqueue_django_tasks_") as task_url:
        extra = {"SHOP_TASK_DATABASE_URL": task_url}
        migrated = manage(shop, "migrate", "--database", "task_processor", "--noinput", **extra)
        assert migrated.returncode == 0, migrated.stderr
        assert "procqueue schema 'procqueue' version" in migrated.stdout
        # The router keeps the project's own apps out of the queue's database.
        assert rows(task_url, "SELECT to_regclass('public.orders_order') IS NULL, "
                              "to_regclass('procqueue.tasks') IS NOT NULL") == [(True, True)]
        task_id = shell(shop, """
import json
from orders.tasks import confirm_order
print(json.dumps(confirm_order.delay(args=(1,))))
""", **extra)
        assert rows(task_url, "SELECT id, args FROM procqueue.tasks") == [(task_id, [1])]
        assert rows(shop, "SELECT count(*) FROM procqueue.tasks") == [(0,)]


def test_settings_mistakes_are_one_line_from_every_command(shop):
    """A bad setting stops nothing from starting with a traceback: `check` names it and
    `runprocessor` exits 2 with one line; a mistake in what `.delay()` needs (here the
    queue's alias) is also the error every `.delay()` raises."""
    bad = {"SHOP_BAD_SETTING": "1"}
    checked = manage(shop, "check", **bad)
    assert checked.returncode == 1
    assert "(procqueue.E001) invalid value for TASK_PROCESSOR_NUM_THREADS: 'lots' (expected an integer >= 1)" \
        in checked.stderr
    run = manage(shop, "runprocessor", **bad)
    assert (run.returncode, run.stderr) == (
        2, "manage.py runprocessor: error: invalid value for TASK_PROCESSOR_NUM_THREADS: 'lots' "
           "(expected an integer >= 1)\n")
    unknown_alias = {"SHOP_QUEUE_ALIAS": "queue"}
    expected = "invalid value for PROCQUEUE_DATABASE: the DATABASES alias 'queue' is not in DATABASES " \
               "(expected one of 'default')"
    assert f"(procqueue.E001) {expected}" in manage(shop, "check", **unknown_alias).stderr
    refused = shell(shop, """
import json
from orders.tasks import confirm_order
try:
    confirm_order.delay(args=(1,))
except Exception as exc:
    print(json.dumps([type(exc).__name__, str(exc)]))
""", **unknown_alias)
    assert refused == ["ConfigError", expected]
    flag = manage(shop, "runprocessor", "--numthreads", "none")
    assert (flag.returncode, flag.stderr) == (
        2, "manage.py runprocessor: error: invalid value for --numthreads: 'none' is not a valid integer "
           "(see manage.py runprocessor --help)\n")


def test_a_projects_own_postgresql_backend_is_postgresql(shop):
    """A backend subclassing Django's (django-prometheus', a pooling wrapper's) is accepted:
    the check is the backend's vendor, not the ENGINE's name."""
    engine = {"SHOP_ENGINE": "shop.backend"}
    assert manage(shop, "check", **engine).returncode == 0
    task_id = shell(shop, """
import json
from orders.tasks import confirm_order
print(json.dumps(confirm_order.delay(args=(5,))))
""", **engine)
    assert rows(shop, "SELECT args FROM procqueue.tasks WHERE id = %s", (task_id,)) == [([5],)]


def test_the_commands_take_their_flags_from_call_command_too(shop, tmp_path):
    """`call_command("checktaskprocessorthreadhealth", "--status-file", PATH)`: the flags
    reach procqueue's parser as they do from `manage.py`."""
    missing = tmp_path / "none.json"
    answer = shell(shop, f"""
import json
from django.core.management import call_command
try:
    call_command("checktaskprocessorthreadhealth", "--status-file", {str(missing)!r})
    code = 0
except SystemExit as exit:
    code = exit.code
print(json.dumps(code))
""")
    assert answer == 1


@pytest.mark.timeout(90)
def test_workers_never_share_a_django_connection_opened_before_they_forked(shop, tmp_path):
    """A task module that queries when imported (`-i orders.warm`), with persistent
    connections: each worker still gets a database session of its own, never the one
    the supervisor opened before forking."""
    ids = shell(shop, """
import json
from orders.tasks import note_backend
print(json.dumps([note_backend.delay() for _ in range(12)]))
""")
    persistent = {"SHOP_PERSISTENT_CONNECTIONS": "1"}
    log = tmp_path / "runprocessor.log"
    processor = start_runprocessor(shop, "--numthreads", "3", "-i", "orders.warm", "--queuepopsize", "1",
                                   "--status-file", str(tmp_path / "status.json"), log=log, **persistent)
    try:
        wait_until(lambda: rows(shop, "SELECT count(*) FROM procqueue.tasks WHERE id = ANY(%s) AND state = 'succeeded'",
                                (ids,)) == [(12,)], timeout=60, message=lambda: log.read_text())
    finally:
        stop(processor)
    seen = rows(shop, "SELECT DISTINCT worker_pid, backend_pid FROM backends_seen")
    by_backend = collections.defaultdict(set)
    for worker_pid, backend_pid in seen:
        by_backend[backend_pid].add(worker_pid)
    assert all(len(workers) == 1 for workers in by_backend.values()), seen


def test_transaction_on_commit_waits_for_the_default_database_with_a_separate_task_database(server_url, shop):
    """With Flagsmith's separate task database, a SEPARATE_THREAD task still waits for the
    caller's transaction, on the default database, as Flagsmith hooks it."""
    with own_database(server_url, schema=None, prefix="procqueue_django_tasks_") as task_url:
        seen = shell(shop, """
import json
from django.db import transaction
from procqueue import register_task_handler

@register_task_handler(task_name="shop.note_separate")
def note():
    pass

with transaction.atomic():
    committed = note.run_in_thread()
    started_inside = committed.ident is not None
committed.join(10)
try:
    with transaction.atomic():
        rolled_back = note.run_in_thread()
        raise RuntimeError
except RuntimeError:
    pass
print(json.dumps([started_inside, committed.ident is not None, rolled_back.ident is not None]))
""", SHOP_TASK_DATABASE_URL=task_url, SHOP_TASK_RUN_METHOD="SEPARATE_THREAD")
    assert seen == [False, True, False]


def test_runprocessor_takes_run_task_processors_flags(shop_database):
    url, _ = shop_database
    helped = manage(url, "runprocessor", "--help")
    assert helped.returncode == 0
    for flag in ("--numthreads", "--sleepintervalms", "--graceperiodms", "--queuepopsize", "--database-url"):
        assert flag in helped.stdout
    assert helped.stdout.startswith("Usage: manage.py runprocessor [OPTIONS]")
    elsewhere = manage(url, "runprocessor", "--database-url", "postgresql://elsewhere/db")
    assert (elsewhere.returncode, elsewhere.stderr) == (
        2, "manage.py runprocessor: error: --database-url is not taken here: the queue's database is DATABASES' "
           "(PROCQUEUE_DATABASE names the alias; run-task-processor takes a URL)\n")


def test_djangos_own_options_are_taken_as_by_any_management_command(shop_database, tmp_path):
    """Flagsmith's commands were Django commands: -v 2, --traceback, --no-color and
    --settings are taken (and mean nothing more here), never refused as unknown flags."""
    url, _ = shop_database
    missing = tmp_path / "none.json"
    checked = manage(url, "checktaskprocessorthreadhealth", "-v", "2", "--traceback", "--no-color",
                     "--settings", "shop.settings", "--status-file", str(missing))
    assert checked.returncode == 1 and "does not exist" in checked.stderr, checked


def test_the_example_project_welcomes_a_sign_up(server_url, tmp_path):
    """examples/django, as its README runs it: migrate, a sign-up through the view, the
    welcome email sent by `runprocessor`'s worker, and the health command."""
    with own_database(server_url, schema=None, prefix="procqueue_example_") as url:
        example = {"project": EXAMPLE, "DATABASE_URL": url, "PROCQUEUE_METRICS_PORT": "0"}
        migrated = manage(url, "migrate", "--noinput", **example)
        assert migrated.returncode == 0, migrated.stderr
        signup = shell(url, """
import json
from django.test import Client
print(json.dumps(Client().post("/sign-up/", {"email": "ada@example.com"}).json()))
""", **example)["signup"]
        status_file = tmp_path / "status.json"
        log = tmp_path / "runprocessor.log"
        processor = start_runprocessor(url, "--numthreads", "2", "--status-file", str(status_file), log=log, **example)
        try:
            wait_until(lambda: rows(url, "SELECT welcomed_at IS NOT NULL FROM signups_signup WHERE id = %s",
                                    (signup,)) == [(True,)], timeout=30, message=lambda: log.read_text())
            health = manage(url, "checktaskprocessorthreadhealth", "--status-file", str(status_file), **example)
            assert health.returncode == 0, health
            assert ("tasks.report_unwelcomed",) in rows(url, "SELECT task_name FROM procqueue.recurring_tasks")
        finally:
            stop(processor)
