"""The multiprocess metrics store, with real forked processes counting into real files."""

from __future__ import annotations

import os
import tempfile
import threading
import uuid

import pytest

from procqueue.metrics import MultiprocessMetrics, TaskMetrics


def count_in_child(store: MultiprocessMetrics, task_name: str, runs: int) -> int:
    """Fork a process that records `runs` runs and dies without any clean-up, as a killed
    worker would; returns its pid once it is gone."""
    pid = os.fork()
    if pid == 0:
        try:
            store.enable()
            metrics = TaskMetrics()
            for _ in range(runs):
                metrics.run_finished(task_name, False, "succeeded", 0.02)
                metrics.run_started(task_name, "default", 0.001)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return pid


def totals(store: MultiprocessMetrics, task_name: str) -> dict:
    found = {}
    for family in store.collect():
        for sample in family.samples:
            if sample.labels.get("task_identifier") == task_name and "le" not in sample.labels:
                found[sample.name] = sample.value
    return found


def test_counts_of_dead_workers_survive_and_their_files_are_folded(tmp_path):
    store = MultiprocessMetrics(tmp_path)
    name = f"store.{uuid.uuid4().hex[:8]}"
    for runs in range(1, 31):  # 30 workers, 465 runs, each worker gone after its runs
        store.archive_process(count_in_child(store, name, runs))
    assert totals(store, name) == {
        "procqueue_tasks_finished_total": 465.0,
        "procqueue_task_duration_seconds_count": 465.0,
        "procqueue_task_duration_seconds_sum": pytest.approx(465 * 0.02),
        "procqueue_task_pickup_latency_seconds_count": 465.0,
        "procqueue_task_pickup_latency_seconds_sum": pytest.approx(465 * 0.001),
    }
    # However many workers came and went, a scrape reads one archive file per type.
    assert sorted(os.listdir(tmp_path)) == ["counter_archive.db", "histogram_archive.db"]


def test_histogram_buckets_add_up_across_the_archive_and_live_files(tmp_path):
    store = MultiprocessMetrics(tmp_path)
    name = f"store.{uuid.uuid4().hex[:8]}"
    store.archive_process(count_in_child(store, name, 3))
    count_in_child(store, name, 2)  # not archived: still a file of its own
    buckets = {}
    for family in store.collect():
        for sample in family.samples:
            if sample.name == "procqueue_task_duration_seconds_bucket" and sample.labels["task_identifier"] == name:
                buckets[float(sample.labels["le"])] = sample.value
    assert buckets[0.01] == 0 and buckets[0.025] == 5 and buckets[float("inf")] == 5


def test_a_scrape_during_archiving_never_sees_a_counter_go_back(tmp_path):
    store = MultiprocessMetrics(tmp_path)
    name = f"store.{uuid.uuid4().hex[:8]}"
    seen = []
    done = threading.Event()

    def scrape_in_a_loop():
        while not done.is_set():
            seen.append(totals(store, name).get("procqueue_tasks_finished_total", 0.0))

    scraper = threading.Thread(target=scrape_in_a_loop)
    scraper.start()
    try:
        for _ in range(40):
            store.archive_process(count_in_child(store, name, 5))
    finally:
        done.set()
        scraper.join()
    assert len(seen) > 40
    assert all(later >= earlier for earlier, later in zip(seen, seen[1:])), "a counter went backwards"
    assert totals(store, name)["procqueue_tasks_finished_total"] == 200


def test_remove_leaves_nothing_behind(tmp_path):
    store = MultiprocessMetrics(tmp_path / "metrics")
    store.directory.mkdir()
    count_in_child(store, "store.gone", 1)
    store.remove()
    assert not store.directory.exists()


def test_a_worker_that_died_while_creating_its_file_is_archived_without_error(tmp_path):
    store = MultiprocessMetrics(tmp_path)
    (tmp_path / "counter_999999.db").write_bytes(b"")  # opened, not yet sized, when it died
    store.archive_process(999999)
    assert os.listdir(tmp_path) == []
    assert list(store.collect()) == []


def test_directories_of_dead_supervisors_are_swept_at_start(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # tempfile caches the directory it chose
    try:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        abandoned = tmp_path / f"procqueue-metrics-{gone.pid}-abcd1234"
        alive = tmp_path / f"procqueue-metrics-{os.getppid()}-efgh5678"  # its supervisor still runs
        for directory in (abandoned, alive):
            directory.mkdir()
            (directory / "counter_1.db").write_bytes(b"")
        store = MultiprocessMetrics.create()
        assert not abandoned.exists() and alive.exists()
        assert store.directory.parent == tmp_path
        store.remove()
    finally:
        tempfile.tempdir = None
