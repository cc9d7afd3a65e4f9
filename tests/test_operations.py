"""The operator's bad day, from the terminal: find the failed tasks and their errors,
retry them, cancel (a running task too), purge, and the recurring schedules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import psutil
import psycopg2
import pytest

import procqueue
from procqueue import admin
from procqueue.queries import Queries
from procqueue.records import RunOutcome, TaskState

import sample_tasks
from helpers import REPO, TESTS, execution_count, wait_until

SCHEMA = "procqueue"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cli(database_url):
    env = dict(os.environ, DATABASE_URL=database_url, PROCQUEUE_SCHEMA=SCHEMA,
               PYTHONPATH=f"{TESTS}{os.pathsep}{REPO}")
    env.pop("PROCQUEUE_IMPORTS", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "procqueue", *args], env=env, capture_output=True, text=True,
                              timeout=60)
    return run


def insert(db, name: str, state: str = "queued", *, error=None, finished_ago=None, queue="default",
           recurring=False) -> int:
    finished = None if finished_ago is None else datetime.now(timezone.utc) - finished_ago
    with db.cursor() as cur:
        cur.execute(
            f"INSERT INTO {SCHEMA}.tasks (task_name, state, attempts, last_error, finished_at, queue, recurring_slot)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (name, state, 0 if state == "queued" else 3, error, finished, queue,
             datetime.now(timezone.utc) if recurring else None))
        return cur.fetchone()[0]


TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\nValueError: card 4242 declined\n'


def test_list_filters_and_shows_each_failure_by_its_exception_line(db, cli):
    old = insert(db, "billing.charge", "failed", error=TRACEBACK, finished_ago=timedelta(days=2))
    recent = insert(db, "billing.charge", "failed", error=TRACEBACK, finished_ago=timedelta(minutes=5))
    insert(db, "mail.send", "failed", error="boom", finished_ago=timedelta(minutes=5), queue="mail")
    insert(db, "billing.charge", "succeeded", finished_ago=timedelta(minutes=1))
    waiting = insert(db, "billing.charge")

    listed = cli("tasks", "list", "--state", "failed", "--name", "billing.charge", "--since", "1h")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATE", "ATTEMPTS"] and len(lines) == 2
    assert lines[1].split()[0] == str(recent) and lines[1].endswith("ValueError: card 4242 declined")

    as_json = json.loads(cli("tasks", "list", "--json", "--limit", "10").stdout)
    assert [task["id"] for task in as_json] == sorted([old, recent, waiting, old + 2, old + 3], reverse=True)
    assert as_json[-1]["error"] == "ValueError: card 4242 declined" and as_json[-1]["state"] == "failed"
    assert [t["task_name"] for t in json.loads(cli("tasks", "list", "--queue", "mail", "--json").stdout)] == [
        "mail.send"]
    until = json.loads(cli("tasks", "list", "--state", "failed", "--until", "1d", "--json").stdout)
    assert [task["id"] for task in until] == [old]


@pytest.mark.parametrize("args, expected", [
    (["tasks", "list", "--since", "yesterday"],
     "invalid value for --since: 'yesterday' is neither a time (2026-12-05T14:00) nor an age (30m, 2h, 7d)"),
    (["tasks", "list", "--state", "done"], "invalid value for --state: 'done' is not one of"),
    (["tasks", "retry"], "give task ids or --failed (not both)"),
    (["tasks", "retry", "1", "--failed"], "give task ids or --failed (not both)"),
    (["tasks", "retry", "1", "--name", "x"], "--name and --since narrow --failed; with task ids, leave them out"),
    (["purge", "--older-than", "7x"], "invalid value for --older-than: '7x' is not an age"),
    (["purge", "--older-than", "7d", "--state", "queued"], "invalid value for --state: 'queued' is not one of"),
    (["purge", "--older-than", "9999999999999d"], "invalid value for --older-than: '9999999999999d' is too long ago"),
    (["tasks", "list", "--since", "3000000d"], "invalid value for --since: '3000000d' is too long ago"),
    (["tasks", "cancel", "99999999999999999999"], "99999999999999999999 is not in the range 1<=x<="),
    (["tasks", "show", "0"], "0 is not in the range 1<=x<="),
])
def test_bad_operator_input_gets_one_line(db, cli, args, expected):
    result = cli(*args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_retry_by_id_resets_the_task_and_records_who_did_it(db, cli):
    failed = insert(db, "billing.charge", "failed", error=TRACEBACK, finished_ago=timedelta(minutes=1))
    done = insert(db, "billing.charge", "succeeded", finished_ago=timedelta(minutes=1))
    recurring_run = insert(db, "reports.daily", "failed", finished_ago=timedelta(minutes=1), recurring=True)

    result = cli("tasks", "retry", str(failed), str(done), str(recurring_run), "999999")
    assert result.returncode == 4
    assert result.stdout.splitlines() == [f"retried {failed}"]
    assert result.stderr.splitlines() == [
        f"procqueue: error: cannot retry task {done}: it has already succeeded",
        f"procqueue: error: cannot retry task {recurring_run}: it is a run of a recurring schedule "
        "(its next slot runs on schedule)",
        "procqueue: error: cannot retry task 999999: it does not exist"]
    task = procqueue.get_task(failed)
    assert (task.state, task.attempts, task.finished_at) == (TaskState.QUEUED, 0, None)
    [run] = procqueue.get_task_runs(failed)
    assert run.outcome is RunOutcome.RETRIED and "via procqueue tasks retry" in run.actor


def test_retry_failed_takes_only_failed_tasks_of_the_name_since_when_asked(db, cli):
    old = insert(db, "billing.charge", "failed", finished_ago=timedelta(days=1))
    new = insert(db, "billing.charge", "failed", finished_ago=timedelta(minutes=1))
    other = insert(db, "mail.send", "failed", finished_ago=timedelta(minutes=1))
    cancelled = insert(db, "billing.charge", "cancelled", finished_ago=timedelta(minutes=1))

    result = cli("tasks", "retry", "--failed", "--name", "billing.charge", "--since", "2h")
    assert (result.returncode, result.stdout.strip()) == (0, f"retried 1 failed task: {new}")
    states = {i: procqueue.get_task(i).state for i in (old, new, other, cancelled)}
    assert states == {old: TaskState.FAILED, new: TaskState.QUEUED, other: TaskState.FAILED,
                      cancelled: TaskState.CANCELLED}
    assert cli("tasks", "retry", "--failed").stdout.strip() == f"retried 2 failed tasks: {old}, {other}"


def test_failed_task_fixed_and_retried_runs_again_and_succeeds(db, cli, start_processor):
    """The story end to end: a task fails, the operator finds it, fixes the cause, retries."""
    processor = start_processor("--numthreads", "1", "--sleepintervalms", "100")
    enqueued = cli("enqueue", "sample.fail_until_fixed", "--args", '["order-7"]', "-i", "sample_tasks")
    task_id = int(enqueued.stdout)
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.FAILED, 30, message="the task to fail")
    failures = cli("tasks", "list", "--state", "failed")
    assert str(task_id) in failures.stdout and "RuntimeError: order-7 is broken" in failures.stdout

    with db.cursor() as cur:
        cur.execute("INSERT INTO public.executions (key) VALUES ('order-7:fixed')")
    assert cli("tasks", "retry", str(task_id)).stdout.strip() == f"retried {task_id}"
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, 30, message="the retry to run")
    assert execution_count(db, "order-7") == 1
    outcomes = [run.outcome for run in procqueue.get_task_runs(task_id)]
    assert outcomes == [RunOutcome.FAILED, RunOutcome.RETRIED, RunOutcome.SUCCEEDED]
    assert processor.proc.poll() is None


def test_cancelling_a_running_task_stops_it_for_real_and_spares_the_rest(db, cli, start_processor):
    processor = start_processor("--numthreads", "1", "--sleepintervalms", "100", "--rescue-after", "2")
    task_id = sample_tasks.wait_for_release.delay(args=["long"])
    first_pid = processor.wait_until_started(task_id, timeout=30)
    wait_until(lambda: execution_count(db, "long:start") == 1, 10)
    behind = sample_tasks.record_task.delay(args=["behind"])

    result = cli("tasks", "cancel", str(task_id))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cancelled {task_id}: it was running; its processor stops it within seconds"
    # While its processor may still be stopping it, it cannot be retried.
    refused = cli("tasks", "retry", str(task_id))
    assert refused.returncode == 4 and "is still being stopped by the processor that ran it" in refused.stderr
    wait_until(lambda: not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == "zombie", 20,
               message="the worker running the cancelled task to be killed")
    wait_until(lambda: procqueue.get_task(behind).state is TaskState.SUCCEEDED, 20, message="the next task to run")
    processor.wait_for_log("worker.replaced")

    task = procqueue.get_task(task_id)
    assert task.state is TaskState.CANCELLED and execution_count(db, "long:end") == 0
    [run] = procqueue.get_task_runs(task_id)
    assert run.outcome is RunOutcome.CANCELLED and "via procqueue tasks cancel" in run.actor
    assert "worker.stuck" not in processor.log()
    document = processor.wait_for_status(lambda d: d["totals"]["restarts"]["recycled"] == 1)
    assert document["totals"]["restarts"]["stuck"] == 0 and document["totals"]["restarts"]["crashed"] == 0

    # Once its processor has seen no worker run it, it is let go, and a retry runs it in
    # full: the same worker slot takes it, and must not be killed again for the old cancel.
    retried = wait_until(lambda: cli("tasks", "retry", str(task_id)).returncode == 0, 30,
                         message="the cancelled task to be let go")
    assert retried
    wait_until(lambda: execution_count(db, "long:start") == 2, 20, message="the retried run to start")
    with db.cursor() as cur:
        cur.execute("INSERT INTO public.executions (key) VALUES ('long:release')")
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, 20, message="the retried run")
    outcomes = [run.outcome for run in procqueue.get_task_runs(task_id)]
    assert outcomes == [RunOutcome.CANCELLED, RunOutcome.RETRIED, RunOutcome.SUCCEEDED]


def test_cancel_of_a_waiting_task_and_the_old_name_still_works(db, cli):
    waiting = sample_tasks.record_task.delay(args=["never"], delay_until=None)
    done = insert(db, "x.y", "succeeded", finished_ago=timedelta(seconds=1))
    result = cli("cancel", str(waiting), str(done))
    assert result.returncode == 4
    assert result.stdout.strip() == f"cancelled {waiting}"
    assert result.stderr.strip() == f"procqueue: error: cannot cancel task {done}: it has already succeeded"
    assert procqueue.get_task(waiting).state is TaskState.CANCELLED
    shown = json.loads(cli("show", str(waiting)).stdout)
    assert shown["runs"][0]["outcome"] == "cancelled" and shown["task"]["state"] == "cancelled"
    assert "show" not in cli("--help").stdout.split("Commands:")[1].split()  # hidden alias, listed once


def test_purge_deletes_old_finished_tasks_and_their_runs_only(db, cli):
    old = [insert(db, "a.b", state, finished_ago=timedelta(days=8)) for state in ("succeeded", "failed", "cancelled")]
    young = insert(db, "a.b", "succeeded", finished_ago=timedelta(days=1))
    waiting = insert(db, "a.b")
    with db.cursor() as cur:
        cur.execute(f"INSERT INTO {SCHEMA}.task_runs (task_id, task_name, attempt, outcome) "
                    "SELECT id, task_name, 1, 'failed' FROM procqueue.tasks")

    dry = cli("purge", "--older-than", "7d", "--state", "failed", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("would delete 1 failed tasks that finished before")
    assert cli("purge", "--older-than", "1w").stdout.startswith(
        "deleted 3 succeeded/failed/cancelled/missed tasks")
    with db.cursor() as cur:
        cur.execute(f"SELECT id FROM {SCHEMA}.tasks ORDER BY id")
        assert [row[0] for row in cur.fetchall()] == [young, waiting]
        cur.execute(f"SELECT task_id FROM {SCHEMA}.task_runs ORDER BY task_id")
        assert [row[0] for row in cur.fetchall()] == [young, waiting]
    assert all(procqueue.get_task(i) is None for i in old)


def test_purge_keeps_a_task_retried_while_it_waited_for_the_row(db, database_url):
    """A retry that commits while the purge waits on its row lock wins: the purge
    re-checks the row it got, and a task now queued is not deleted."""
    old = insert(db, "a.b", "failed", finished_ago=timedelta(days=8))
    retrying, purging_conn = psycopg2.connect(database_url), psycopg2.connect(database_url)
    purging_conn.autocommit = True
    purged = []
    purging = threading.Thread(target=lambda: purged.append(admin.purge(
        purging_conn, Queries(SCHEMA), before=datetime.now(timezone.utc) - timedelta(days=7))))
    try:
        with retrying.cursor() as cur:  # a retry, not committed yet
            cur.execute(f"UPDATE {SCHEMA}.tasks SET state = 'queued', finished_at = NULL WHERE id = %s", (old,))
        purging.start()
        wait_until(lambda: _waiting_for_a_lock(db), 10, message="the purge to wait for the row")
        retrying.commit()
        purging.join(10)
    finally:
        retrying.close()  # ends the transaction the purge waits on, whatever happened
        if purging.is_alive():
            purging.join(10)
        purging_conn.close()
    assert purged == [0] and procqueue.get_task(old).state is TaskState.QUEUED


def _waiting_for_a_lock(db) -> bool:
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")
        return cur.fetchone()[0] > 0


def test_purge_never_deletes_a_cancelled_task_its_processor_still_holds(db, cli):
    held = insert(db, "a.b", "cancelled", finished_ago=timedelta(days=8))
    with db.cursor() as cur:
        cur.execute(f"UPDATE {SCHEMA}.tasks SET locked_by = 'a-live-processor', locked_worker = 0, locked_at = now() "
                    "WHERE id = %s", (held,))
    assert cli("purge", "--older-than", "1d", "--dry-run").stdout.startswith("would delete 0 ")
    assert cli("purge", "--older-than", "1d").stdout.startswith("deleted 0 ")
    assert procqueue.get_task(held) is not None


def test_recurring_list_and_remove(db, cli):
    with db.cursor() as cur:
        cur.execute(f"INSERT INTO {SCHEMA}.recurring_tasks (task_name, run_every, first_run_at, next_run_at) "
                    "VALUES ('reports.daily', '1 day', now(), now() + interval '1 day'), "
                    "('cache.warm', '15 minutes', now(), now() + interval '15 minutes')")
    ran = insert(db, "reports.daily", "succeeded", finished_ago=timedelta(minutes=1), recurring=True)
    waiting = insert(db, "cache.warm", recurring=True)

    listed = cli("recurring", "list")
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "EVERY"]
    assert lines[1].split()[:2] == ["cache.warm", "15m"] and lines[1].endswith(f"queued (task {waiting})")
    assert lines[2].split()[:2] == ["reports.daily", "1d"] and lines[2].endswith(f"succeeded (task {ran})")
    as_json = json.loads(cli("recurring", "list", "--json").stdout)
    assert [(s["task_name"], s["run_every_seconds"]) for s in as_json] == [("cache.warm", 900), ("reports.daily", 86400)]

    removed = cli("recurring", "remove", "cache.warm")
    assert removed.stdout.strip() == "removed cache.warm; cancelled 1 waiting run"
    assert procqueue.get_task(waiting).state is TaskState.CANCELLED
    [run] = procqueue.get_task_runs(waiting)
    assert run.outcome is RunOutcome.CANCELLED and "via procqueue recurring remove" in run.actor
    missing = cli("recurring", "remove", "cache.warm")
    assert missing.returncode == 4
    assert missing.stderr.strip() == ("procqueue: error: no recurring schedule named 'cache.warm' "
                                      "(schedules: reports.daily)")


def test_recurring_enable_and_the_list_showing_a_disabled_schedule(db, cli):
    with db.cursor() as cur:  # reports.daily failed four times in a row an hour ago
        cur.execute(f"INSERT INTO {SCHEMA}.recurring_tasks (task_name, run_every, first_run_at, next_run_at, "
                    "consecutive_failures, disabled_at) VALUES "
                    "('reports.daily', '1 minute', now() - interval '1 day', now() - interval '59 minutes 30 seconds', "
                    "4, now() - interval '1 hour'), "
                    "('cache.warm', '15 minutes', now(), now() + interval '15 minutes', 2, NULL)")
    lines = cli("recurring", "list").stdout.splitlines()
    assert lines[0].split()[:5] == ["NAME", "EVERY", "NEXT", "RUN", "(UTC)"] and "FAILED IN A ROW" in lines[0]
    assert lines[1].split()[:2] == ["cache.warm", "15m"] and " enabled " in lines[1] and " 2 " in lines[1]
    assert lines[2].split()[:4] == ["reports.daily", "1m", "-", "disabled"] and " 4 " in lines[2]
    as_json = {s["task_name"]: s for s in json.loads(cli("recurring", "list", "--json").stdout)}
    assert (as_json["reports.daily"]["disabled"], as_json["reports.daily"]["consecutive_failures"]) == (True, 4)
    assert as_json["reports.daily"]["disabled_at"] is not None
    assert (as_json["cache.warm"]["disabled"], as_json["cache.warm"]["disabled_at"]) == (False, None)

    enabled = cli("recurring", "enable", "reports.daily")
    assert (enabled.returncode, enabled.stdout.strip()) == (0, "enabled reports.daily"), enabled.stderr
    with db.cursor() as cur:
        cur.execute(f"SELECT consecutive_failures, disabled_at, next_run_at <= now(), next_run_at > now() - "
                    f"interval '1 minute' FROM {SCHEMA}.recurring_tasks WHERE task_name = 'reports.daily'")
        # Due now, at the latest slot that has begun: not an hour of minute slots late.
        assert cur.fetchone() == (0, None, True, True)
    again = cli("recurring", "enable", "cache.warm")
    assert (again.returncode, again.stdout.strip()) == (0, "cache.warm was not disabled; its count of failures is reset")
    missing = cli("recurring", "enable", "no.such")
    assert missing.returncode == 4
    assert missing.stderr.strip() == ("procqueue: error: no recurring schedule named 'no.such' "
                                      "(schedules: cache.warm, reports.daily)")


def test_a_schema_without_a_queue_names_the_schemas_with_one(db, cli):
    result = cli("stats", "--schema", "not_here")
    assert result.returncode == 3
    assert result.stderr.startswith(
        "procqueue: error: schema 'not_here' of this database holds no procqueue queue (--schema, "
        "PROCQUEUE_SCHEMA); `procqueue migrate` creates one. Queues in this database: ")
    assert f" {SCHEMA}" in result.stderr and "(pass --schema " in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_misspelled_task_name_with_its_module_given_is_not_told_to_pass_the_module(db, cli):
    result = cli("enqueue", "sample.recrod", "-i", "sample_tasks")
    assert result.returncode == 4
    assert "pass its module" not in result.stderr
    assert "sample_tasks registered" in result.stderr and "did you mean 'sample.record'?" in result.stderr
    without = cli("enqueue", "sample.record")
    assert without.returncode == 4 and "pass its module with --import" in without.stderr


def test_psql_opens_on_the_queues_schema_without_the_password_in_its_arguments(db, cli):
    insert(db, "a.b")
    result = cli("psql", "--", "-Atc", "SELECT count(*) FROM tasks")
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr


def test_a_recurring_run_cancelled_while_it_runs_keeps_the_next_slot_waiting_until_let_go(db):
    """Cancelled, the run stays in the one-run-at-a-time index while its processor holds
    it (its worker may still be running it), so the next slot's run cannot start beside it."""
    with db.cursor() as cur:
        cur.execute(
            f"INSERT INTO {SCHEMA}.tasks (task_name, state, recurring_slot, expires_at, started_at, locked_by,"
            " locked_worker, locked_at) VALUES ('reports.hourly', 'running', now() - interval '1 hour', now(), now(),"
            " 'a-live-processor', 0, now()), ('reports.hourly', 'queued', now(), now() + interval '1 hour', NULL,"
            " NULL, NULL, NULL) RETURNING id")
        running, next_run = (row[0] for row in cur.fetchall())
    assert admin.cancel(db, Queries(SCHEMA), [running], by="test") == {running: "cancelling"}
    start_next = (f"UPDATE {SCHEMA}.tasks SET state = 'running', started_at = now() WHERE id = %s", (next_run,))
    with pytest.raises(psycopg2.errors.UniqueViolation), db.cursor() as cur:
        cur.execute(*start_next)
    with db.cursor() as cur:
        cur.execute(f"UPDATE {SCHEMA}.tasks SET locked_by = NULL WHERE id = %s", (running,))  # let go
        cur.execute(*start_next)
    assert procqueue.get_task(next_run).state is TaskState.RUNNING


def test_psql_on_a_schema_with_no_queue_says_so_and_opens_nothing(db, cli):
    result = cli("psql", "--schema", "not_here", "--", "-c", "SELECT 1")
    assert result.returncode == 3 and len(result.stderr.splitlines()) == 1
    assert "schema 'not_here' of this database holds no procqueue queue" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("make", ["file", "directory with other files"])
def test_a_data_directory_that_is_not_one_is_refused_before_anything_touches_it(tmp_path, make):
    """Run as root, the embedded server's library hands its data directory to its own
    user: a mistyped PROCQUEUE_EMBEDDED_DIR must not give a file or a directory away."""
    target = tmp_path / "mine"
    if make == "file":
        target.write_text("precious\n")
        checked = target
    else:
        target.mkdir()
        (target / "notes.txt").write_text("precious\n")
        checked = target / "notes.txt"
    before = (target.stat().st_uid, target.stat().st_mode, checked.read_text())
    env = dict(os.environ, PROCQUEUE_EMBEDDED_DIR=str(target), PYTHONPATH=str(REPO))
    env.pop("DATABASE_URL", None)
    result = subprocess.run([sys.executable, "-m", "procqueue", "stats"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 3 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"cannot use {target} for the embedded PostgreSQL" in result.stderr
    assert (target.stat().st_uid, target.stat().st_mode, checked.read_text()) == before
