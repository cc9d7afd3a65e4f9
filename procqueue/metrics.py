"""Prometheus metrics: what workers count, what the supervisor knows, and one registry.

Workers are processes that get killed and replaced, so what they count (tasks finished,
durations, pickup latency, tasks enqueued by tasks) goes through prometheus-client's
multiprocess mode: each process adds to its own memory-mapped file in a directory private
to this processor, and a scrape sums the files. An increment is in the file the moment it
is made, so a worker killed a microsecond later loses none. When the supervisor reaps a
worker it folds that worker's files into one archive file, so a scrape reads a bounded
number of files however many workers have come and gone (recycling can replace thousands
a day), and counters never go backwards.

What the supervisor knows (workers by state, heartbeat ages, queue depth, restarts) is
read at scrape time from its latest status document, the same one the status file and
/status show, so every door reports the same numbers.
"""

from __future__ import annotations

import glob
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from . import __version__
from .records import RunOutcome, TaskState

# Flagsmith's label names, so its dashboards and alerts port by renaming the metric.
TASK_LABELS = ("task_identifier", "task_type", "result")
# Tasks run from milliseconds to the 30 minutes a recurring task may take.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# An idle processor starts a task within milliseconds; a backlog can keep one waiting hours.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
RESULTS = ("succeeded", "retried", "failed", "timed_out", "lost", "backoff")
WORKER_STATES = ("starting", "idle", "busy", "stopping", "empty")
RESTART_REASONS = ("stuck", "crashed", "recycled")
QUEUE_STATES = ("waiting", "scheduled", "running", "failed")

# Application side (`.delay()`), registered in the default registry so an application's
# own /metrics shows it, as Flagsmith's does.
ENQUEUED = Counter("procqueue_enqueued_tasks", "Tasks enqueued, by task name.", ["task_identifier"])

# Processor side: not registered anywhere; the processor exports them from the
# multiprocess files. Only the processor's processes ever touch them.
FINISHED = Counter(
    "procqueue_tasks_finished", "Task runs finished, by task name, type (standard/recurring) and result "
    "(succeeded, retried, failed, timed_out, lost, backoff).", TASK_LABELS, registry=None,
)
DURATION = Histogram(
    "procqueue_task_duration_seconds", "How long task runs took, by task name, type and result.",
    TASK_LABELS, buckets=DURATION_BUCKETS, registry=None,
)
PICKUP_LATENCY = Histogram(
    "procqueue_task_pickup_latency_seconds", "From a task's run-at time (when it became due) to its start.",
    ("task_identifier", "queue"), buckets=LATENCY_BUCKETS, registry=None,
)

SLOTS_MISSED = Counter(
    "procqueue_recurring_slots_missed", "Slots of a recurring schedule that did not get a complete run through no "
    "fault of the task: not started before the next slot was due (processors down or busy), or cut short by "
    "its processor's death (a recurring slot runs at most once).", ("task_identifier",), registry=None,
)

# A counter, not a gauge, because the worker that records a schedule's last allowed
# failure is the one that knows; in multiprocess mode a counter is summed over the
# workers' files and survives a worker's death (folded into the archive), where a
# worker's gauge would vanish with it. Alert on its increase; `procqueue recurring list`
# shows which schedules are disabled now.
RECURRING_DISABLED = Counter(
    "procqueue_recurring_disabled", "Recurring schedules disabled because their runs failed "
    "MAX_CONSECUTIVE_FAILURES (4) times in a row; each stays disabled until an operator enables it.",
    ("task_identifier",), registry=None,
)

_ARCHIVED_TYPES = ("counter", "histogram", "summary")  # the types whose values add up
DIRECTORY_PREFIX = "procqueue-metrics-"  # then the supervisor's pid


def result_label(outcome: RunOutcome, state: TaskState) -> str:
    """The `result` label of a run, by its outcome and where it left its task: a failure
    that will be retried is `retried`, and a backoff on the last attempt, which ends the
    task, `failed`, so that `failed` counts exactly the tasks that failed for good."""
    if outcome is RunOutcome.FAILED and state is TaskState.QUEUED:
        return "retried"
    if outcome is RunOutcome.BACKOFF and state is TaskState.FAILED:
        return "failed"
    return outcome.value


def task_type(recurring: bool) -> str:
    return "recurring" if recurring else "standard"


class TaskMetrics:
    """A worker's (or the supervisor's) handle for recording task runs. Label lookups are
    cached: at thousands of tasks a second they would cost more than the increments."""

    def __init__(self) -> None:
        self._finished: Dict[Tuple[str, str, str], tuple] = {}
        self._pickup: Dict[Tuple[str, str], object] = {}

    def run_finished(self, task_name: str, recurring: bool, result: str, duration: Optional[float]) -> None:
        key = (task_name, task_type(recurring), result)
        children = self._finished.get(key)
        if children is None:
            children = self._finished[key] = (FINISHED.labels(*key), DURATION.labels(*key))
        children[0].inc()
        if duration is not None:
            children[1].observe(max(duration, 0.0))

    def slots_missed(self, task_name: str, count: int = 1) -> None:
        SLOTS_MISSED.labels(task_name).inc(count)

    def recurring_disabled(self, task_name: str) -> None:
        RECURRING_DISABLED.labels(task_name).inc()

    def run_started(self, task_name: str, queue: str, latency: float) -> None:
        child = self._pickup.get((task_name, queue))
        if child is None:
            child = self._pickup[(task_name, queue)] = PICKUP_LATENCY.labels(task_name, queue)
        # Clocks of different hosts disagree a little; a task never starts before it is due.
        child.observe(max(latency, 0.0))


def initialise_series(task_names: Iterable[str], recurring_names: Iterable[str]) -> None:
    """Export zeros for every registered task and result, so the first failure of a task
    shows as an increase rather than as a series appearing (which `rate()` misses)."""
    recurring = set(recurring_names)
    for name in task_names:
        for result in RESULTS:
            FINISHED.labels(name, task_type(name in recurring), result)
    for name in recurring:
        SLOTS_MISSED.labels(name)
        RECURRING_DISABLED.labels(name)


class MultiprocessMetrics:
    """The directory where every process of one processor keeps its metric files."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        # A scrape (HTTP thread) must never see a dead worker's values both in its own file
        # and in the archive, nor in neither: archiving and collecting take turns.
        self.lock = threading.Lock()

    @classmethod
    def create(cls) -> "MultiprocessMetrics":
        remove_abandoned_directories()
        return cls(Path(tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{os.getpid()}-")))

    def enable(self) -> None:
        """Make every metric created from now on in this process, and in processes forked
        from it, write to this directory. prometheus-client chooses its value class when
        it is first imported, from PROMETHEUS_MULTIPROC_DIR; a task module may have
        imported it before us, so the class is set here as well as the variable (which it
        reads to find the directory)."""
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.directory)
        values.ValueClass = values.MultiProcessValue()

    def archive_process(self, pid: int) -> None:
        """Fold a dead process's counters and histograms into the archive files, drop its
        files, and its live gauges."""
        with self.lock:
            for kind in _ARCHIVED_TYPES:
                dead = self.directory / f"{kind}_{pid}.db"
                if not dead.exists():
                    continue
                if dead.stat().st_size >= 8:  # else it died creating it: nothing counted yet
                    _add_file_into(dead, self.directory / f"{kind}_archive.db")
                dead.unlink()
            mark_process_dead(pid, str(self.directory))

    def collect(self) -> Iterable:
        with self.lock:
            return list(MultiProcessCollector.merge(self.readable_files(), accumulate=True))

    def readable_files(self) -> List[str]:
        """The metric files, less any a process is creating at this instant: it opens the
        file, then sizes it, and the library cannot read it in between (a scrape would
        fail). Files only grow, so one seen sized stays readable."""
        files = []
        for path in glob.glob(os.path.join(self.directory, "*.db")):
            try:
                if os.path.getsize(path) >= 8:
                    files.append(path)
            except OSError:  # a live gauge file removed meanwhile
                continue
        return files

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def remove_abandoned_directories() -> None:
    """Remove the metrics directories of supervisors that died without cleaning up (kill
    -9, the OOM killer): the directory names the supervisor's pid. Only this user's, and
    only those whose supervisor is gone from this machine; never a link (another user's,
    pointing at what we would then delete)."""
    for path in Path(tempfile.gettempdir()).glob(f"{DIRECTORY_PREFIX}*-*"):
        try:
            pid = int(path.name[len(DIRECTORY_PREFIX):].split("-", 1)[0])
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or pid == os.getpid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, OSError):
            continue


def _add_file_into(source: Path, archive: Path) -> None:
    # Files hold raw values (a histogram's buckets are not yet cumulative), so adding
    # key by key is exact.
    target = MmapedDict(str(archive))
    try:
        for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(source)):
            current, _ = target.read_value(key)
            target.write_value(key, current + value, timestamp)
    finally:
        target.close()


class _FilesCollector:
    """The workers' metrics, with every cumulative sample held at no less than it was at
    the previous scrape. They only ever rise, but float sums depend on the order they are
    added in, and archiving a dead worker changes that order: a histogram's _sum could
    come out 1e-18 lower, which Prometheus would read as a counter reset."""

    _CUMULATIVE_TYPES = ("counter", "histogram", "summary")

    def __init__(self, store: MultiprocessMetrics) -> None:
        self.store = store
        self.exported: Dict[tuple, float] = {}
        self.lock = threading.Lock()  # two scrapes at once must not interleave their updates

    def collect(self) -> Iterable:
        families = self.store.collect()
        with self.lock:
            for family in families:
                if family.type in self._CUMULATIVE_TYPES:
                    family.samples = [self.never_lower(sample) for sample in family.samples]
        return families

    def never_lower(self, sample):
        key = (sample.name, tuple(sorted(sample.labels.items())))
        value = max(sample.value, self.exported.get(key, sample.value))
        self.exported[key] = value
        return sample._replace(value=value)


class ProcessorCollector:
    """The supervisor's series, read from its latest status document at scrape time."""

    def __init__(self, status_source: Callable[[], Optional[dict]]) -> None:
        self.status_source = status_source

    def collect(self) -> Iterable:
        document = self.status_source()
        info = InfoMetricFamily("procqueue_build", "procqueue version and Python version.")
        info.add_metric([], {"version": __version__, "python": _python_version()})
        yield info
        if document is None:
            return
        yield from supervisor_families(document)
        yield from worker_families(document.get("workers", []))
        yield from queue_families(document.get("queue"))


def supervisor_families(document: dict) -> Iterable:
    yield _gauge("procqueue_supervisor_start_time_seconds", "When the supervisor started, Unix time.",
                 document["started_at_unix"])
    yield _gauge("procqueue_status_updated_timestamp_seconds", "When the supervisor last refreshed its status "
                 "(once a second while its loop runs), Unix time.", document["updated_at_unix"])
    yield _gauge("procqueue_database_up", "1 if the supervisor's last database round trip succeeded.",
                 1 if document.get("database_up") else 0)
    yield _gauge("procqueue_workers_configured", "Worker processes the processor runs (--numthreads).",
                 document["config"]["numthreads"])
    totals = document.get("totals", {})
    restarts = CounterMetricFamily("procqueue_worker_restarts", "Workers replaced, by reason: stuck (killed "
                                   "by the supervisor), crashed (died), recycled (--max-tasks/--max-memory).",
                                   labels=["reason"])
    for reason in RESTART_REASONS:
        restarts.add_metric([reason], totals.get("restarts", {}).get(reason, 0))
    yield restarts
    rescued = CounterMetricFamily("procqueue_tasks_rescued", "Tasks of dead processors (other hosts) this "
                                  "processor put back in the queue.")
    rescued.add_metric([], totals.get("tasks_rescued", 0))
    yield rescued


def worker_families(workers: List[dict]) -> Iterable:
    by_state = GaugeMetricFamily("procqueue_workers", "Worker slots by state.", labels=["state"])
    for state in WORKER_STATES:
        by_state.add_metric([state], sum(1 for w in workers if w["state"] == state))
    yield by_state
    yield _gauge("procqueue_workers_stuck", "Workers the supervisor judges stuck (being killed).",
                 sum(1 for w in workers if w.get("stuck")))
    heartbeat = GaugeMetricFamily("procqueue_worker_heartbeat_age_seconds", "Seconds since each worker's last "
                                  "heartbeat (a worker running a task beats when it ends).", labels=["slot"])
    busy = GaugeMetricFamily("procqueue_worker_busy_seconds", "How long each worker's current task has run "
                             "(0 when idle).", labels=["slot"])
    memory = GaugeMetricFamily("procqueue_worker_resident_memory_bytes", "Resident set size of each worker.",
                               labels=["slot"])
    for worker in workers:
        if not worker.get("pid"):
            continue
        slot = [str(worker["slot"])]
        heartbeat.add_metric(slot, worker.get("heartbeat_age_seconds") or 0.0)
        busy.add_metric(slot, (worker.get("task") or {}).get("running_seconds", 0.0))
        if worker.get("rss_bytes") is not None:
            memory.add_metric(slot, worker["rss_bytes"])
    yield heartbeat
    yield busy
    yield memory


def queue_families(queue: Optional[dict]) -> Iterable:
    if not queue:
        return
    yield _gauge("procqueue_queue_stats_updated_timestamp_seconds", "When queue depth was last read from "
                 "the database, Unix time.", queue["checked_at_unix"])
    tasks = GaugeMetricFamily("procqueue_queue_tasks", "Tasks by queue and state: waiting (due), scheduled "
                              "(for later), running, failed (for good).", labels=["queue", "state"])
    oldest = GaugeMetricFamily("procqueue_queue_oldest_waiting_age_seconds", "How long the oldest due task of "
                               "each queue has waited (0 when none waits).", labels=["queue"])
    for name, depth in queue.get("by_queue", {}).items():
        for state in QUEUE_STATES:
            tasks.add_metric([name, state], depth[state])
        oldest.add_metric([name], depth["oldest_waiting_age_seconds"] or 0.0)
    yield tasks
    yield oldest


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _python_version() -> str:
    import platform

    return platform.python_version()


def processor_registry(store: MultiprocessMetrics, status_source: Callable[[], Optional[dict]]) -> CollectorRegistry:
    """Everything the processor's /metrics shows."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FilesCollector(store))
    registry.register(ProcessorCollector(status_source))
    return registry


def exposition(registry: CollectorRegistry, accept_header: str) -> Tuple[bytes, str]:
    """The registry in the format the scraper asked for (Prometheus text or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept_header)
    return encoder(registry), content_type
