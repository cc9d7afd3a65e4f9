"""The status file: replaced whole, so a reader never sees half a document."""

from __future__ import annotations

import contextlib
import json
import os
import time

import pytest

from procqueue.errors import ConfigError
from procqueue.heartbeat import SlotWriter, WorkerState, allocate_slots, stuck_reason
from procqueue.status import StatusFile, SupervisorFacts, render_text, worker_entry

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


def test_a_worker_between_tasks_is_never_judged_stuck_while_it_writes_its_slot():
    # A worker (forked, as for real) starts and ends tasks as fast as it can while the
    # supervisor's rule reads the same shared slot. No task here runs past its deadline,
    # so no verdict may say stuck, whatever instant the reads land on.
    slots = allocate_slots(1)
    pid = os.fork()
    if pid == 0:
        try:
            board = SlotWriter(slots[0], os.getpid())
            n, until = 0, time.monotonic() + 1.5
            while time.monotonic() < until:
                n += 1
                board.task_started(n, 60.0, "sample.noop")
                board.task_finished(failed=False)
        finally:
            os._exit(0)
    verdicts = 0
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            verdict = stuck_reason(slots[0], time.monotonic(), 20.0)
            assert verdict is None, verdict
            verdicts += 1
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert verdicts > 1000
