"""procqueue through a real PgBouncer in transaction pool mode, with fewer server sessions
(2) than a processor has connections: `--pooler transaction` turns LISTEN and prepared
statements off; without it, tasks still run, found by polling, and a warning says why."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import psycopg2
import pytest

import procqueue
from procqueue import client
from procqueue.config import ConfigError, Pooler, processor_config

from helpers import REPO, execution_count, states, wait_until
from pgbouncer import INSTALL, POOL_SIZE, pgbouncer_program, running_pgbouncer

import sample_tasks  # noqa: F401 (registers sample.record for .delay())

SCHEMA = "procqueue"


@pytest.fixture(scope="module")
def bouncer(database_url):
    program = pgbouncer_program()
    if program is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PgBouncer is missing on CI: {INSTALL}")
        pytest.skip(INSTALL)
    with running_pgbouncer(program, database_url) as running:
        yield running


@pytest.fixture
def through_pooler(db, bouncer):
    """`.delay()` of this process goes through the pooler (as --pooler transaction says)."""
    procqueue.configure(database_url=bouncer.url, schema=SCHEMA, pooler="transaction")
    yield bouncer
    client.close_connection()


def dbname(url: str) -> str:
    return psycopg2.extensions.parse_dsn(url)["dbname"]


def record_all(keys):
    return [sample_tasks.record_task.delay(args=(key,)) for key in keys]


# -- the setting -------------------------------------------------------------------------


def test_the_setting_comes_from_the_flag_or_the_environment():
    assert processor_config(env={}).database.pooler is Pooler.NONE
    assert processor_config(env={"PROCQUEUE_POOLER": "Transaction"}).database.pooler is Pooler.TRANSACTION
    assert processor_config(pooler="session", env={"PROCQUEUE_POOLER": "transaction"}).database.pooler is Pooler.SESSION
    with pytest.raises(ConfigError, match=r"PROCQUEUE_POOLER: 'txn' \(expected one of none, session, transaction\)"):
        processor_config(env={"PROCQUEUE_POOLER": "txn"})


def test_statement_pooling_is_refused_in_one_line_saying_why():
    result = subprocess.run([sys.executable, str(REPO / "bin" / "run-task-processor"), "--pooler", "statement"],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, DATABASE_URL="x"))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "--pooler: 'statement'" in line and "multi-statement transactions" in line, line


# -- a processor behind the pooler -------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_processor_drains_through_the_pooler_with_more_workers_than_server_sessions(db, through_pooler,
                                                                                   start_processor):
    processor = start_processor("--numthreads", "4", "--sleepintervalms", "100", "--pooler", "transaction",
                                extra_env={"DATABASE_URL": through_pooler.url})
    processor.wait_for_log("event=listen.off")
    processor.wait_for_log("event=worker.started", count=4)
    ids = record_all(f"drain-{n}" for n in range(60))
    assert len(set(ids)) == 60
    wait_until(lambda: states(db) == {"succeeded": 60}, timeout=30, message=lambda: f"60 tasks run: {states(db)}")
    assert execution_count(db) == 60  # each exactly once
    clients, servers = through_pooler.sessions(dbname(through_pooler.url))
    assert servers <= POOL_SIZE < 4 + 1 <= clients  # 4 workers and the supervisor share 2 sessions
    assert processor.stop() == 0
    log = processor.log()
    assert "database_error" not in log and "pooler_detected" not in log, log


@pytest.mark.timeout(90)
def test_recurring_tasks_run_through_the_pooler(db, bouncer, start_processor):
    processor = start_processor("--numthreads", "2", "--import", "sample_recurring", "--sleepintervalms", "200",
                                extra_env={"DATABASE_URL": bouncer.url, "PROCQUEUE_POOLER": "transaction"})
    wait_until(lambda: execution_count(db, "every_second") >= 3, timeout=30, message="three one-second slots")
    assert processor.stop() == 0
    with db.cursor() as cur:
        cur.execute("SELECT recurring_slot, count(*) FROM procqueue.tasks WHERE task_name = 'sample.every_second' "
                    "AND state = 'succeeded' GROUP BY recurring_slot HAVING count(*) > 1")
        assert cur.fetchall() == []  # no slot ran twice
    assert "event=listen.off" in processor.log()


@pytest.mark.timeout(90)
def test_without_the_setting_tasks_are_found_by_polling_and_a_warning_names_the_setting(db, bouncer,
                                                                                       start_processor):
    """What LISTEN does through a transaction-mode pooler: it takes hold in whichever server
    session ran it, which then serves other clients; a NOTIFY reaches whoever holds that
    session at the time, rarely the worker. Nothing fails: the idle look every
    --sleepintervalms finds the work, so tasks run, later than with LISTEN. A pooler cannot
    be asked its mode, but it can be seen in front (the server answering is not the one
    connected to): the processor warns, naming --pooler."""
    procqueue.configure(database_url=bouncer.url, schema=SCHEMA, pooler="none")
    try:
        processor = start_processor("--numthreads", "3", "--sleepintervalms", "300",
                                    extra_env={"DATABASE_URL": bouncer.url})
        processor.wait_for_log("event=database.pooler_detected")
        processor.wait_for_log("event=worker.started", count=3)
        assert "--pooler transaction" in processor.log()
        record_all(f"polled-{n}" for n in range(20))
        wait_until(lambda: states(db) == {"succeeded": 20}, timeout=30, message=lambda: f"tasks run: {states(db)}")
        assert processor.stop() == 0
        assert "database_error" not in processor.log()
    finally:
        client.close_connection()


def test_no_warning_when_connected_directly(db, start_processor):
    processor = start_processor("--numthreads", "1")
    processor.wait_for_log("event=worker.started")
    assert processor.stop() == 0
    assert "pooler_detected" not in processor.log() and "listen.off" not in processor.log()


@pytest.mark.timeout(60)
def test_a_processor_keeps_numthreads_plus_one_connections(db, start_processor):
    """The README's connection budget, counted directly (through a pooler the server
    sessions are shared): a worker per --numthreads and the supervisor, also after the
    clean-up task (due at start) has run in one of the workers. Only sessions begun
    since this test began: PgBouncer's idle server sessions bear its clients' names."""
    with db.cursor() as cur:
        cur.execute("SELECT clock_timestamp()")
        began = cur.fetchone()[0]
    processor = start_processor("--numthreads", "3")
    wait_until(lambda: states(db, "procqueue.clean_up_old_tasks") == {"succeeded": 1}, timeout=30,
               message="the clean-up task's first run")

    def connections():
        with db.cursor() as cur:
            cur.execute("SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
                        "AND backend_start >= %s AND application_name LIKE 'procqueue-%%' ORDER BY 1", (began,))
            return [name for (name,) in cur.fetchall()]

    expected = ["procqueue-supervisor", "procqueue-worker-0", "procqueue-worker-1", "procqueue-worker-2"]
    wait_until(lambda: connections() == expected, timeout=10, message=lambda: f"{expected}, not {connections()}")
    assert processor.stop() == 0


# -- .delay() through the pooler ---------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pooler", ["transaction", "none"])
def test_delay_through_the_pooler_works_call_after_call_from_many_threads(db, bouncer, pooler):
    """With the setting, `.delay()` prepares nothing. Without it, its statement is prepared
    in one server session and executed in whichever the pooler picks next: a session
    without it answers 26000, and the fallback prepares again or goes plain. Four threads
    (four client connections, two server sessions) make the pooler switch sessions."""
    in_every_server_session(bouncer, "DEALLOCATE ALL")
    procqueue.configure(database_url=bouncer.url, schema=SCHEMA, pooler=pooler)
    results, errors = {}, []

    def enqueue(thread: int) -> None:
        try:
            for n in range(25):
                key = f"{thread}-{n}"
                results[key] = sample_tasks.record_task.delay(args=(key,))
        except Exception as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
        finally:
            client.close_connection()

    threads = [threading.Thread(target=enqueue, args=(thread,)) for thread in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(results) == 100
    with db.cursor() as cur:
        cur.execute("SELECT id, args->>0 FROM procqueue.tasks WHERE task_name = 'sample.record'")
        stored = dict(cur.fetchall())
    assert {stored[task_id]: task_id for task_id in stored} == results  # each call, once, with its arguments
    prepared = in_every_server_session(bouncer, "SELECT count(*) FROM pg_prepared_statements "
                                                "WHERE name LIKE 'procqueue_enqueue_one_%'")
    assert (sum(prepared) == 0) == (pooler == "transaction"), prepared


def in_every_server_session(bouncer, statement: str) -> list:
    """`statement`'s single value in each of the pool's server sessions: as many clients
    as there are sessions, each in a transaction, hold one each."""
    holders = [psycopg2.connect(bouncer.url) for _ in range(POOL_SIZE)]
    try:
        results = []
        for holder in holders:
            with holder.cursor() as cur:
                cur.execute(statement)
                results.append(cur.fetchone()[0] if cur.description else None)
        return results
    finally:
        for holder in holders:
            holder.close()


def test_delay_prepares_again_in_a_server_session_that_never_saw_its_prepare(db, bouncer):
    """Each round, another client holds one of the two server sessions in a transaction and
    the other forgets every prepared statement (DEALLOCATE ALL), so `.delay()` is sure to
    EXECUTE where its statement is not: every call must still insert its task, once."""
    procqueue.configure(database_url=bouncer.url, schema=SCHEMA, pooler="none")
    holder, forgetter = psycopg2.connect(bouncer.url), psycopg2.connect(bouncer.url)
    forgetter.autocommit = True
    ids = {}
    try:
        for n in range(10):
            with holder.cursor() as cur:
                cur.execute("SELECT 1")  # a transaction, open until the rollback: one session is held
            with forgetter.cursor() as cur:
                cur.execute("DEALLOCATE ALL")  # in the one session left, which .delay() must use next
            ids[sample_tasks.record_task.delay(args=(f"round-{n}",))] = f"round-{n}"
            holder.rollback()
    finally:
        holder.close()
        forgetter.close()
        client.close_connection()
    with db.cursor() as cur:
        cur.execute("SELECT id, args->>0 FROM procqueue.tasks WHERE task_name = 'sample.record'")
        assert dict(cur.fetchall()) == ids


# -- migrating through the pooler ---------------------------------------------------------


def migrate(url: str, schema: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "procqueue", "migrate", "--schema", schema],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=dict(os.environ, DATABASE_URL=url, PYTHONPATH=str(REPO)))


@pytest.mark.timeout(120)
def test_migrate_through_the_pooler_serialises_concurrent_runs(db, bouncer):
    """The migration lock is a transaction's (pg_advisory_xact_lock) and its search_path a
    SET LOCAL: nothing outlives the one transaction a pooler keeps on one session."""
    schema = "procqueue_pooled_migration"
    try:
        runs = [subprocess.Popen([sys.executable, "-m", "procqueue", "migrate", "--schema", schema],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                 env=dict(os.environ, DATABASE_URL=bouncer.url, PYTHONPATH=str(REPO)))
                for _ in range(3)]
        outputs = [run.communicate(timeout=60) for run in runs]
        assert [run.returncode for run in runs] == [0, 0, 0], outputs
        said = sorted("applied" if ": applied" in out else "up to date" for out, _ in outputs)
        assert said == ["applied", "up to date", "up to date"], outputs
        with db.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {schema}.schema_version")
            assert cur.fetchone()[0] >= 1
    finally:
        with db.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_a_url_setting_the_pooler_refuses_fails_at_once_with_what_to_do(bouncer):
    result = migrate(f"{bouncer.url}?options=-csearch_path%3Dpublic", SCHEMA)
    assert result.returncode == 3
    [line] = result.stderr.strip().splitlines()
    assert "unsupported startup parameter: options" in line and "ignore_startup_parameters" in line, line
