"""Supervision: how fast procqueue recovers from a task stuck past its timeout in C code,
a worker killed with kill -9, and a dead host, each next to the interval that bounds it.

    .venv/bin/python bench/supervision.py [--repeats N] [--rescue-after S [S ...]] [--fast-disk]
"""

from __future__ import annotations

import random
import re
import select
import signal
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import psutil

import bench_tasks
import common
import procqueue
from procqueue.config import DEFAULT_RESCUE_AFTER_SECONDS
from procqueue.supervisor import KILL_GRACE_SECONDS, LOOP_TICK_SECONDS

try:  # where the rule for "stuck" lives (procqueue.health, then heartbeat, in older trees)
    from procqueue.worker_fate import HARD_TIMEOUT_MARGIN_SECONDS
except ImportError:
    try:
        from procqueue.health import HARD_TIMEOUT_MARGIN_SECONDS
    except ImportError:
        from procqueue.heartbeat import HARD_TIMEOUT_MARGIN_SECONDS

COMMON_ARGS = ["--log-level", "info", "--import", "bench_tasks",
               # A task that is to be killed may still hold a worker when we stop the
               # processor (Ctrl-C): do not wait the default 25 s for it.
               "--shutdown-timeout", "2"]
WAIT_SECONDS = 30.0  # for any one event: far beyond any plausible figure, short of a hang
POLL_SECONDS = 0.02  # how often database state is checked while waiting for it
TASKS_PER_DEAD_HOST = 2  # tasks the processor that dies holds, one per worker
# The longest a processor that is to die may take from launch to its tasks running
# (interpreter start, imports, forks) before it is killed; its life must end before any
# earlier dead processor's silence reaches --rescue-after (see measure_rescue).
START_ALLOWANCE_SECONDS = 3.0
RESCUE_MARGIN_SECONDS = 1.0


# -- plumbing ------------------------------------------------------------------------


class Marks:
    """The start marks tasks leave (bench_tasks.mark): pid and monotonic time, announced
    by NOTIFY, so the benchmark waits on a socket rather than polling a table."""

    def __init__(self, url: str) -> None:
        self.conn = common.connect(url)
        with self.conn.cursor() as cur:
            cur.execute(f"CREATE TABLE IF NOT EXISTS {bench_tasks.MARKS_TABLE} "
                        "(label text PRIMARY KEY, pid int NOT NULL, started float8 NOT NULL)")
            cur.execute(f"LISTEN {bench_tasks.MARKS_CHANNEL}")
        self.arrived: set = set()

    def wait(self, label: str, timeout: float = WAIT_SECONDS) -> Tuple[int, float]:
        """(pid of the worker, monotonic time) of the task labelled `label`, once it started."""
        deadline = time.monotonic() + timeout
        while label not in self.arrived:
            self.arrived.update(notify.payload for notify in self.conn.notifies)
            self.conn.notifies.clear()
            if label in self.arrived:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"task {label!r} did not start within {timeout:g} s")
            if select.select([self.conn], [], [], remaining)[0]:
                self.conn.poll()
        with self.conn.cursor() as cur:
            cur.execute(f"SELECT pid, started FROM {bench_tasks.MARKS_TABLE} WHERE label = %s", (label,))
            return cur.fetchone()

    def close(self) -> None:
        self.conn.close()


def start_processor(url: str, args: Sequence[str], workers: int) -> Tuple[common.Processor, str]:
    """A watched processor, once it has registered and every worker is in its loop.
    Returns it and its processor id."""
    processor = common.Processor(url, [*args, "--numthreads", str(workers), *COMMON_ARGS], watch_log=True)
    try:
        started = processor.wait_for_event("processor.started", timeout=WAIT_SECONDS)
        for index in range(workers):
            processor.wait_for_event("worker.started", after=started.index, worker=index, timeout=WAIT_SECONDS)
        return processor, started.fields()["processor"]
    except BaseException:
        processor.stop()
        raise


def wait_until_idle(conn, processor: common.Processor) -> None:
    """Nothing queued or running on the default queue, and the retention task a processor
    enqueues at first start already run: nothing of the processor's own is under way."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        processor.check_alive()
        with conn.cursor() as cur:
            cur.execute(f"SELECT EXISTS (SELECT 1 FROM {common.SCHEMA}.recurring_tasks WHERE last_enqueued_at IS NULL) "
                        f"OR EXISTS (SELECT 1 FROM {common.SCHEMA}.tasks "
                        "WHERE state IN ('queued', 'running') AND queue = 'default')")
            if not cur.fetchone()[0]:
                return
        time.sleep(POLL_SECONDS)
    raise RuntimeError(f"the processor did not become idle within {WAIT_SECONDS:g} s")


def worker_of(processor: common.Processor, pid: int) -> psutil.Process:
    """The worker process `pid`, checked to be one of this processor's: never a stranger."""
    process = psutil.Process(pid)
    if process.ppid() != processor.pid:
        raise RuntimeError(f"pid {pid} is not a worker of processor {processor.pid}")
    return process


def require_runs(conn, task_id: int, outcomes: Sequence[str], state: str) -> None:
    """A benchmark whose scenario went wrong must not print a figure."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT state FROM {common.SCHEMA}.tasks WHERE id = %s", (task_id,))
        found_state = cur.fetchone()[0]
        cur.execute(f"SELECT outcome FROM {common.SCHEMA}.task_runs WHERE task_id = %s ORDER BY id", (task_id,))
        found = [row[0] for row in cur.fetchall()]
    if found != list(outcomes) or found_state != state:
        raise RuntimeError(f"task {task_id}: expected runs {list(outcomes)} and state {state!r}, "
                           f"found runs {found} and state {found_state!r}")


@dataclass
class Figures:
    """Seconds per row, in the order rows were first added, each with its baseline."""

    rows: Dict[str, List[float]] = field(default_factory=dict)
    baselines: Dict[str, str] = field(default_factory=dict)

    def add(self, label: str, seconds: float, baseline: str = "") -> None:
        self.rows.setdefault(label, []).append(seconds)
        self.baselines[label] = baseline

    def print(self, title: str) -> None:
        print()
        print(title)
        common.print_table(["seconds", "min", "median", "max", "compare with"], [
            [label, f"{min(values):.3f}", f"{common.percentile(values, 50):.3f}", f"{max(values):.3f}",
             self.baselines[label]]
            for label, values in self.rows.items()
        ])


# -- 1 and 2: one processor, one worker ----------------------------------------------


def measure_stuck(processor: common.Processor, marks: Marks, conn, repeats: int, rng: random.Random) -> Figures:
    """A task that blocks SIGALRM and sleeps: the worker cannot interrupt it, so the
    supervisor kills the worker a margin after the timeout and forks a replacement. A probe
    task enqueued as the kill begins is the replacement's first claim: when it starts, the
    slot is working again.

    Each task is enqueued after a random pause of up to one supervisor tick: the previous
    repeat ended with a worker the supervisor forked on a tick, so without it every task
    would start at the same point of the supervisor's cycle, and the stuck check would
    come at the same (worst) moment every time."""
    timeout = bench_tasks.WEDGED_TIMEOUT_SECONDS
    margin = HARD_TIMEOUT_MARGIN_SECONDS
    figures = Figures()
    for n in range(repeats):
        time.sleep(rng.uniform(0, LOOP_TICK_SECONDS))  # a random phase, not a wait for anything
        after = processor.last_line()
        task_id = bench_tasks.wedged.delay(args=(f"wedged-{n}",))
        pid, task_started = marks.wait(f"wedged-{n}")
        expired = task_started + timeout
        stuck = processor.wait_for_event("worker.stuck", after=after, pid=pid, timeout=WAIT_SECONDS)
        bench_tasks.mark_task.delay(args=(f"probe-wedged-{n}",))
        died = processor.wait_for_event("worker.died", after=after, pid=pid, timeout=WAIT_SECONDS)
        replaced = processor.wait_for_line(lambda line: _is_replacement(line, pid), after=after, timeout=WAIT_SECONDS)
        probe_pid, probe_started = marks.wait(f"probe-wedged-{n}")
        _require_same_worker(replaced, probe_pid)
        require_runs(conn, task_id, ["timed_out"], "failed")

        figures.add("task starts -> replacement runs a new task", probe_started - task_started,
                    f"{timeout + margin:.2f} (timeout {timeout:g} s + hard-kill margin {margin:g} s)")
        figures.add("timeout expires -> replacement runs a new task", probe_started - expired,
                    f"{margin:.2f} (hard-kill margin)")
        figures.add("  timeout expires -> worker.stuck logged", stuck.at - expired,
                    f"{margin:.2f} (hard-kill margin; checked every {LOOP_TICK_SECONDS:g} s)")
        figures.add("  worker.stuck -> worker.died logged", died.at - stuck.at,
                    f"{KILL_GRACE_SECONDS:.2f} (SIGTERM -> SIGKILL grace)")
        figures.add("  worker.stuck -> replacement logs worker.started", replaced.at - stuck.at,
                    f"{KILL_GRACE_SECONDS:.2f} (SIGTERM -> SIGKILL grace)")
        figures.add("  replacement's worker.started -> it runs a new task", probe_started - replaced.at)
    return figures


def measure_killed(processor: common.Processor, marks: Marks, conn, repeats: int, rng: random.Random) -> Figures:
    """kill -9 of a worker in the middle of a task: the supervisor notices (SIGCHLD),
    records the task's run as lost, and forks a replacement, which claims a probe task
    enqueued right after the kill. The kill comes at a random point of the supervisor's
    tick, as in measure_stuck."""
    figures = Figures()
    tick = f"{LOOP_TICK_SECONDS:.2f} (supervisor loop tick)"
    for n in range(repeats):
        after = processor.last_line()
        task_id = bench_tasks.hold.delay(args=(f"hold-{n}",))
        pid, _ = marks.wait(f"hold-{n}")
        worker = worker_of(processor, pid)
        time.sleep(rng.uniform(0, LOOP_TICK_SECONDS))  # a random phase, not a wait for anything
        killed = time.monotonic()
        worker.send_signal(signal.SIGKILL)
        bench_tasks.mark_task.delay(args=(f"probe-hold-{n}",))
        lost = processor.wait_for_event("task.lost", after=after, task_id=task_id, timeout=WAIT_SECONDS)
        died = processor.wait_for_event("worker.died", after=after, pid=pid, timeout=WAIT_SECONDS)
        replaced = processor.wait_for_line(lambda line: _is_replacement(line, pid), after=after, timeout=WAIT_SECONDS)
        probe_pid, probe_started = marks.wait(f"probe-hold-{n}")
        _require_same_worker(replaced, probe_pid)
        require_runs(conn, task_id, ["lost"], "failed")

        figures.add("kill -9 -> lost run recorded (task.lost logged)", lost.at - killed, tick)
        figures.add("kill -9 -> worker.died logged", died.at - killed, tick)
        figures.add("kill -9 -> replacement logs worker.started", replaced.at - killed, tick)
        figures.add("kill -9 -> replacement runs a new task", probe_started - killed, tick)
    return figures


def _is_replacement(line: common.LogLine, old_pid: int) -> bool:
    if "event=worker.started" not in line.text:
        return False
    fields = line.fields()
    return fields.get("event") == "worker.started" and fields.get("worker") == "0" and fields.get("pid") != str(old_pid)


def _require_same_worker(replaced: common.LogLine, probe_pid: int) -> None:
    if replaced.fields()["pid"] != str(probe_pid):
        raise RuntimeError(f"the probe ran in pid {probe_pid}, not in the replacement worker "
                           f"(pid {replaced.fields()['pid']})")


# -- 3: a dead host --------------------------------------------------------------------


@dataclass
class DeadHost:
    """A processor killed whole while its tasks ran, waiting to be rescued."""

    processor_id: str
    task_ids: List[int]
    killed: float  # monotonic
    heartbeat_age: float  # seconds since its last heartbeat, at the kill
    expires: float  # monotonic: when its silence reaches --rescue-after
    after: int  # the live processor's last log line before the kill


def measure_rescue(url: str, conn, marks: Marks, rescue_after: float, repeats: int, rng: random.Random) -> Figures:
    """Two processors with the same --rescue-after: a live one (default queue) and one that
    dies. Each dying processor gets a queue of its own and as many tasks as it has workers;
    once they run it is killed whole (supervisor and workers, none warned), and the figure
    is how long until the live processor has put those tasks back in the queue.

    The result depends on two phases: where in the dead processor's heartbeat cycle it died
    (it beats every R/4), and where in the live processor's rescue cycle (every R/4) its
    silence reached R. Both are made random: a kill at a random moment of the dead
    processor's life, and a random pause before a processor is started if the benchmark
    has just seen a rescue (and so is in step with the rescuer's cycle).

    Waiting out each rescue before the next kill would take repeats x R. Instead the next
    processor is started while earlier dead ones still wait, provided it will be dead before
    any of them could be rescued: at every rescue the live processor is the only one alive.

    A processor rescues only once it has been in touch with the database for a whole
    --rescue-after (procqueue.supervisor_database.may_judge_peers). Every dying processor is started,
    and so beats, after the live one started, so its silence reaches --rescue-after after
    that wait is over: the wait never shows in the figure.
    """
    quarter = rescue_after / 4
    flags = ["--rescue-after", f"{rescue_after:g}"]
    figures = Figures()
    live, live_id = start_processor(url, ["--queue", "default", *flags], workers=1)
    doomed: List[common.Processor] = []
    pending: List[DeadHost] = []
    try:
        wait_until_idle(conn, live)
        in_step = True  # the live processor just started: its cycle began now
        for n in range(repeats):
            # Drawn before deciding whether to wait for rescues first, and kept either way,
            # so the decision does not bias it.
            running_for = rng.uniform(0, quarter)  # a random moment of its heartbeat cycle
            while True:
                pause = rng.uniform(0, quarter) if in_step else 0.0
                dead_by = time.monotonic() + pause + START_ALLOWANCE_SECONDS + running_for
                if not pending or min(host.expires for host in pending) - RESCUE_MARGIN_SECONDS > dead_by:
                    break
                earliest = min(pending, key=lambda host: host.expires)
                record_rescue(conn, live, live_id, earliest, rescue_after, figures)
                pending.remove(earliest)
                in_step = True
            time.sleep(pause)  # a random phase, not a wait for anything
            host = kill_a_host(url, conn, marks, live, rescue_after, n, running_for, doomed)
            if pending and min(h.expires for h in pending) - RESCUE_MARGIN_SECONDS <= host.killed:
                raise RuntimeError("a processor that was to die outlived an earlier one's expiry "
                                   f"(it took over {START_ALLOWANCE_SECONDS:g} s to start): the machine is too busy")
            pending.append(host)
            in_step = False
        for host in sorted(pending, key=lambda host: host.expires):
            record_rescue(conn, live, live_id, host, rescue_after, figures)
    finally:
        for processor in doomed:
            processor.stop()
        live.stop()
    return figures


def kill_a_host(url: str, conn, marks: Marks, live: common.Processor, rescue_after: float, n: int,
                running_for: float, doomed: List[common.Processor]) -> DeadHost:
    """Start a processor that is to die, and kill it whole `running_for` seconds after its
    tasks are running."""
    queue = f"bench-doomed-r{rescue_after:g}-{n}"
    labels = [f"{queue}-{k}" for k in range(TASKS_PER_DEAD_HOST)]
    task_ids = enqueue_on_queue(conn, bench_tasks.hold_doomed, queue, labels)
    processor, processor_id = start_processor(url, ["--queue", queue, "--queuepopsize", "1",
                                                    "--rescue-after", f"{rescue_after:g}"],
                                              workers=TASKS_PER_DEAD_HOST)
    doomed.append(processor)
    for label in labels:
        worker_of(processor, marks.wait(label)[0])
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {common.SCHEMA}.tasks WHERE id = ANY(%s) AND state = 'running' "
                    "AND locked_by = %s", (task_ids, processor_id))
        if cur.fetchone()[0] != len(task_ids):
            raise RuntimeError(f"the tasks of processor {processor_id} are not all running under it")
    time.sleep(running_for)  # a random moment of its heartbeat cycle, not a wait for anything
    after = live.last_line()
    killed = time.monotonic()
    processor.kill()
    with conn.cursor() as cur:
        asked = time.monotonic()
        cur.execute(f"SELECT extract(epoch FROM now() - heartbeat_at)::float8 FROM {common.SCHEMA}.processors "
                    "WHERE id = %s", (processor_id,))
        age = cur.fetchone()[0] - (asked - killed)
    processor.stop()  # reaps it; nothing of it is left to stop
    return DeadHost(processor_id, task_ids, killed, age, killed + rescue_after - age, after)


def enqueue_on_queue(conn, handler, queue: str, labels: Sequence[str]) -> List[int]:
    """What `.delay(args=(label,))` inserts, but on `queue`: a queue of the dying
    processor's own, so no processor claims another's tasks, rescued or not."""
    ids = []
    with conn.cursor() as cur:
        for label in labels:
            cur.execute(f"INSERT INTO {common.SCHEMA}.tasks (task_name, args, queue, priority, max_attempts, "
                        "timeout_seconds) VALUES (%s, jsonb_build_array(%s::text), %s, %s, %s, %s) RETURNING id",
                        (handler.task_name, label, queue, handler.priority, handler.max_attempts,
                         handler.timeout_seconds))
            ids.append(cur.fetchone()[0])
    return ids


def record_rescue(conn, live: common.Processor, live_id: str, host: DeadHost, rescue_after: float,
                  figures: Figures) -> None:
    """Wait for the live processor's tasks.rescued line(s) naming all of `host`'s tasks;
    check the database agrees (queued again, rescued by the live processor)."""
    missing = set(host.task_ids)
    after = host.after
    while missing:
        line = live.wait_for_event("tasks.rescued", after=after, timeout=rescue_after + WAIT_SECONDS)
        missing -= {int(task_id) for task_id in re.findall(r"\d+", line.fields().get("task_ids", ""))}
        after = line.index
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {common.SCHEMA}.tasks WHERE id = ANY(%s) AND state = 'queued' "
                    "AND locked_by IS NULL AND last_error LIKE %s", (host.task_ids, f"%rescued by {live_id}"))
        if cur.fetchone()[0] != len(host.task_ids):
            raise RuntimeError(f"the tasks of processor {host.processor_id} were not all put back by {live_id}")
    quarter = rescue_after / 4
    rescued = line.at - host.killed
    figures.add("kill -9 of a processor -> its tasks queued again", rescued,
                f"{rescue_after:.2f} (--rescue-after)")
    figures.add("  its last heartbeat's age at the kill", host.heartbeat_age,
                f"0-{quarter + LOOP_TICK_SECONDS:.2f} (it beats every --rescue-after/4, on a "
                f"{LOOP_TICK_SECONDS:g} s tick)")
    figures.add("  its silence reaches --rescue-after -> rescued", rescued - (rescue_after - host.heartbeat_age),
                f"0-{quarter + LOOP_TICK_SECONDS:.2f} (rescue checked every --rescue-after/4, on a "
                f"{LOOP_TICK_SECONDS:g} s tick)")


# -- the run -------------------------------------------------------------------------------


def main() -> None:
    parser = common.argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="measurements of each figure (default 5)")
    parser.add_argument("--rescue-after", type=float, nargs="+", metavar="S",
                        default=[DEFAULT_RESCUE_AFTER_SECONDS, 4.0],
                        help=f"--rescue-after values to measure a dead host's rescue at "
                             f"(default {DEFAULT_RESCUE_AFTER_SECONDS:g} 4; each at least 2)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if any(not 2 <= seconds < 3600 for seconds in args.rescue_after):
        parser.error("--rescue-after values must be between 2 and 3600 s")
    print(f"procqueue supervision: {args.repeats} repeats per figure; {common.machine()}")
    rng = random.Random()
    begun = time.monotonic()
    with common.bench_database(args.fast_disk) as url:
        procqueue.configure(database_url=url, schema=common.SCHEMA,
                            task_run_method=procqueue.TaskRunMethod.TASK_PROCESSOR)
        conn = common.connect(url)
        marks = Marks(url)
        try:
            common.progress(f"1 worker: {args.repeats} tasks stuck past their timeout, {args.repeats} workers killed")
            processor, _ = start_processor(url, ["--queuepopsize", "1"], workers=1)
            try:
                wait_until_idle(conn, processor)
                stuck = measure_stuck(processor, marks, conn, args.repeats, rng)
                killed = measure_killed(processor, marks, conn, args.repeats, rng)
            finally:
                processor.stop()
            rescues = []
            for rescue_after in args.rescue_after:
                common.progress(f"dead host, --rescue-after {rescue_after:g}: {args.repeats} processors killed")
                rescues.append((rescue_after, measure_rescue(url, conn, marks, rescue_after, args.repeats, rng)))
        finally:
            marks.close()
            conn.close()
    print_results(args.repeats, stuck, killed, rescues, time.monotonic() - begun)


def print_results(repeats: int, stuck: Figures, killed: Figures, rescues: List[Tuple[float, Figures]],
                  seconds: float) -> None:
    print()
    print(f"{repeats} repeats each; min / median (nearest rank) / max. Times are this machine's monotonic "
          "clock, read by the task itself as its first statement or by the benchmark as each log line "
          "arrives through a pipe.")
    stuck.print(f"1. task stuck in C code (SIGALRM blocked) past its {bench_tasks.WEDGED_TIMEOUT_SECONDS} s "
                "timeout: killed by the supervisor, worker replaced (1 worker)")
    killed.print("2. worker killed with kill -9 in the middle of a task (1 worker)")
    for rescue_after, figures in rescues:
        figures.print(f"3. dead host: a processor (supervisor and {TASKS_PER_DEAD_HOST} workers, each running a "
                      f"task) killed whole; a live one rescues, --rescue-after {rescue_after:g}")
    print()
    print(f"whole run: {seconds:.0f} s")


if __name__ == "__main__":
    common.run_main(main)
