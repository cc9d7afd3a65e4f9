"""The status file: replaced whole, so a reader never sees half a document."""

from __future__ import annotations

import json
import os
import time

import pytest

from procqueue.errors import ConfigError
from procqueue.health import worker_problem
from procqueue.heartbeat import SlotWriter, WorkerState, allocate_slots, read_slot
from procqueue.worker_fate import judge_view
from procqueue.status import StatusFile, SupervisorFacts, worker_entry
from procqueue.status_text import render_text

WRITES = 20000


def test_a_reader_sees_a_whole_document_at_every_read_while_it_is_rewritten(tmp_path):
    path = tmp_path / "status.json"
    status = StatusFile(path)
    status.prepare()
    filler = "x" * 6000  # larger than a page: a torn write would show
    pid = os.fork()
    if pid == 0:
        try:
            for n in range(WRITES):
                status.write({"version": 1, "n": n, "filler": filler})
        finally:
            os._exit(0)
    reads, last = 0, -1
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0) or reads == 0:
            document = json.loads(path.read_text())  # raises on a torn document
            if "n" in document:
                assert document["n"] >= last and document["filler"] == filler
                last = document["n"]
            reads += 1
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert reads > 1000 and json.loads(path.read_text())["n"] == WRITES - 1
    assert sorted(os.listdir(tmp_path)) == ["status.json"]  # no temporary file left


def test_an_unwritable_location_is_a_start_up_error_naming_the_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"cannot write --status-file {blocker}/status.json"):
        StatusFile(blocker / "status.json").prepare()


def test_prepare_creates_a_private_directory(tmp_path):
    path = tmp_path / "new" / "status.json"
    StatusFile(path).prepare()
    assert json.loads(path.read_text())["state"] == "starting"
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert time.time() - path.stat().st_mtime < 60


def test_a_directory_removed_while_running_is_made_again(tmp_path):
    # A tmp cleaner, or an operator, removes it: the probe's only evidence must come back.
    path = tmp_path / "status" / "status.json"
    status = StatusFile(path)
    status.prepare()
    import shutil

    shutil.rmtree(path.parent)
    status.write({"version": 1, "state": "running"})
    assert json.loads(path.read_text())["state"] == "running"


def test_a_file_another_live_processor_writes_is_refused(tmp_path):
    import socket

    path = tmp_path / "status.json"
    path.write_text(json.dumps({"version": 1, "state": "running", "pid": os.getppid(),
                                "hostname": socket.gethostname(), "updated_at_unix": time.time()}))
    with pytest.raises(ConfigError, match=f"being written by another processor \\(pid {os.getppid()}\\)"):
        StatusFile(path).prepare()
    # Stale, stopped, or a pid gone: the file is free to take.
    path.write_text(json.dumps({"version": 1, "state": "stopped", "pid": os.getppid(),
                                "hostname": socket.gethostname(), "updated_at_unix": time.time()}))
    StatusFile(path).prepare()
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_slot_is_shown_starting_from_the_fork_and_empty_with_its_vacancy_since_the_exit():
    slots = allocate_slots(3)
    slots[0].pid, slots[0].state, slots[0].heartbeat = 501, int(WorkerState.IDLE), 99.5
    slots[2].heartbeat = 40.0  # a stale beat of the slot's last tenant, not a vacancy
    facts = SupervisorFacts(state="running", database_up=True, queue_stats=None, restarts={},
                            restarts_by_slot={2: 6}, pids_by_slot={0: 501, 1: 502},
                            vacant_since_by_slot={2: 97.0}, failed_starts_by_slot={2: 5})
    entries = [worker_entry(index, slot, facts, now=100.0, grace=20.0) for index, slot in enumerate(slots)]
    picked = [(e["pid"], e["state"], e["heartbeat_age_seconds"], e["vacant_seconds"], e["failed_starts"],
               e["restarts"]) for e in entries]
    assert picked == [(501, "idle", 0.5, None, 0, 0),
                      (502, "starting", None, None, 0, 0),  # forked, not yet in its slot
                      (None, "empty", None, 3.0, 5, 6)]
    shown = render_text({"version": 1, "state": "running", "workers": entries}, now=100.0)
    assert "FAILING slot 2: 5 workers in a row died while starting" in shown.splitlines()


def test_a_worker_between_tasks_is_seen_whole_and_never_judged_stuck_while_it_writes_its_slot():
    # A worker (forked, as for real) starts and ends tasks as fast as it can while the
    # supervisor reads the same shared slot. No task runs past its deadline, so no verdict
    # may say stuck, and the status document must never show a busy worker without its
    # task, nor one task's id with another's name or timeout, whatever instant the reads
    # land on.
    slots = allocate_slots(1)
    pid = os.fork()
    if pid == 0:
        try:
            board = SlotWriter(slots[0])
            board.claim(os.getpid())
            n, until = 0, time.monotonic() + 1.5
            while time.monotonic() < until:
                n += 1
                board.task_started(n, 60.0 + n % 7, f"task-{n}")
                board.task_finished(failed=False)
        finally:
            os._exit(0)
    facts = SupervisorFacts(state="running", database_up=True, queue_stats=None, restarts={}, restarts_by_slot={})
    reads = busy_seen = 0
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            now = time.monotonic()
            assert judge_view(read_slot(slots[0]), now, 20.0) is None
            entry = worker_entry(0, slots[0], facts, now=now, grace=20.0)
            assert entry["stuck"] is None and worker_problem(entry, 0.0, 20.0) is None, entry
            task = entry["task"]
            if task is not None:
                assert entry["state"] == "busy" and task["name"] == f"task-{task['id']}", entry
                assert task["timeout_seconds"] == pytest.approx(60.0 + task["id"] % 7, abs=0.01), entry
                busy_seen += 1
            reads += 1
        pid = 0  # reaped by the loop: never signal a number the system may have reused
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert reads > 1000 and busy_seen > 0
