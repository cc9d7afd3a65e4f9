"""Shared plumbing for the benchmarks: a throwaway database, a queue to fill, a real
processor to run, and figures to print.

Everything a benchmark creates (embedded server, temp dir, database, processor) is removed
on the way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Sequence

import psutil
import psycopg2

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO / "tests"))  # the throwaway databases and the processor are the tests'

from databases import deferred_interrupts, embedded_server, own_database  # noqa: E402
from helpers import start_run_task_processor  # noqa: E402
SCHEMA = "procqueue"
ENV_DATABASE_URL = "PROCQUEUE_BENCH_DATABASE_URL"


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=(
        f"Runs against a throwaway embedded PostgreSQL, or, with {ENV_DATABASE_URL}=URL set, a "
        "database it creates and drops on that server. Leaves nothing behind, Ctrl-C included."))
    parser.add_argument(
        "--fast-disk", action="store_true",
        help="Trade durability for speed: fsync=off and synchronous_commit=off on the embedded "
             "server (only synchronous_commit=off, for the bench database, on an external one). "
             "Default: Postgres defaults, fsync on.",
    )
    return parser


# -- the database --------------------------------------------------------------------


@contextlib.contextmanager
def bench_database(fast_disk: bool, *, preload: Sequence[str] = ()) -> Iterator[str]:
    """Yield the URL of a migrated database of our own; drop it (and stop the embedded
    server, and delete its directory) on exit, however the run ends. `preload`: shared
    libraries the embedded server loads (an external server has what it has)."""
    with contextlib.ExitStack() as stack:
        admin_url = os.environ.get(ENV_DATABASE_URL)
        where = f"external server (${ENV_DATABASE_URL})"
        if not admin_url:
            admin_url = stack.enter_context(embedded_server(durable=not fast_disk, prefix="procqueue-bench-pg-",
                                                            preload=preload))
            where = "embedded server"
        url = stack.enter_context(own_database(admin_url, schema=SCHEMA, prefix="procqueue_bench_",
                                               synchronous_commit=not fast_disk))
        print(f"database: {where}, {describe_durability(url, fast_disk)}", flush=True)
        yield url


def describe_durability(url: str, fast_disk: bool) -> str:
    conn = connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('server_version'), current_setting('fsync'), "
                    "current_setting('synchronous_commit')")
        version, fsync, sync_commit = cur.fetchone()
    conn.close()
    why = "--fast-disk" if fast_disk else "Postgres defaults; --fast-disk turns them off"
    return f"PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync_commit} ({why})"


def connect(url: str):
    conn = psycopg2.connect(url, application_name="procqueue-bench")
    conn.autocommit = True
    return conn


# -- the queue -----------------------------------------------------------------------


def reset_queue(conn) -> None:
    with conn.cursor() as cur:
        cur.execute(f"TRUNCATE {SCHEMA}.tasks, {SCHEMA}.task_runs, {SCHEMA}.recurring_tasks, "
                    f"{SCHEMA}.processors RESTART IDENTITY")


def enqueue_tasks(url: str, handler, count: int, chunk: int = 1000) -> None:
    """Enqueue `count` argument-less calls of `handler`, as an application would in bulk."""
    import procqueue

    procqueue.configure(database_url=url, schema=SCHEMA, task_run_method=procqueue.TaskRunMethod.TASK_PROCESSOR)
    for start in range(0, count, chunk):
        procqueue.enqueue_many([handler.call() for _ in range(min(chunk, count - start))])


def settle(conn) -> None:
    """Give every scenario the same start: fresh statistics and hint bits, and a checkpoint
    just taken so none falls due in the middle of a measurement."""
    with conn.cursor() as cur:
        cur.execute(f"VACUUM ANALYZE {SCHEMA}.tasks")
        try:
            cur.execute("CHECKPOINT")
        except psycopg2.errors.InsufficientPrivilege:
            pass  # an external server may not let us; its checkpoints then land where they may


def unfinished(conn) -> bool:
    """Any task queued or running? Two probes of the partial indexes, so polling this
    often costs the server next to nothing (a count(*) would scan the table)."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT EXISTS (SELECT 1 FROM {SCHEMA}.tasks WHERE state = 'queued') "
                    f"OR EXISTS (SELECT 1 FROM {SCHEMA}.tasks WHERE state = 'running')")
        return cur.fetchone()[0]


def require_succeeded(conn, task_name: str, count: int) -> None:
    """A benchmark that drained the queue wrongly must not print a figure."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT state, count(*) FROM {SCHEMA}.tasks WHERE task_name = %s GROUP BY state",
                    (task_name,))
        states = dict(cur.fetchall())
    if states != {"succeeded": count}:
        raise RuntimeError(f"expected {count} {task_name} tasks succeeded, found {states}")


# -- a real processor ----------------------------------------------------------------


@dataclass(frozen=True)
class LogLine:
    """One line of a watched processor's log, and when it reached us."""

    index: int  # position in the log: wait for later lines with after=index
    at: float  # time.monotonic() when this process read it
    text: str

    def fields(self) -> dict:
        """The line's `key=value` fields (`event` included), quotes undone."""
        return {key: _unquote(value) for key, value in _FIELD.findall(self.text)}


_FIELD = re.compile(r'(\w[\w.]*)=("(?:[^"\\]|\\.)*"|\S+)')


def _unquote(value: str) -> str:
    if value.startswith('"'):
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


class Processor:
    """`bin/run-task-processor` as a user runs it, in a session of its own: Ctrl-C on the
    benchmark reaches only us, and `stop()` decides how it ends.

    With `watch_log=True` its output comes through a pipe that a thread of ours reads line
    by line, noting when each line arrived (the log's own timestamps are whole seconds), so
    `wait_for_line()` can wait for an event; the log is then shown at `stop()` only if the
    processor exited other than as expected."""

    def __init__(self, url: str, args: Sequence[str], *, watch_log: bool = False) -> None:
        # Its own status file and metrics files, never the shared defaults in /tmp.
        self.scratch = tempfile.TemporaryDirectory(prefix="procqueue-bench-processor-")
        self.log = tempfile.TemporaryFile()  # unlinked already: nothing to clean up
        self.watch_log = watch_log
        self.lines: List[LogLine] = []
        self.log_ended = False
        self.killed = False  # by kill(): exit by SIGKILL expected
        self.stopped = False
        self._arrived = threading.Condition()
        self.proc = start_run_task_processor(
            list(args), database_url=url, import_path=[BENCH_DIR], status_file=Path(self.scratch.name, "status.json"),
            stdout=subprocess.PIPE if watch_log else self.log,
            env={"PROCQUEUE_SCHEMA": SCHEMA, "TMPDIR": self.scratch.name})
        self.pid = self.proc.pid
        self.exit_code = None
        self._reader = None
        if watch_log:
            self._reader = threading.Thread(target=self._read_log, name=f"log-{self.pid}", daemon=True)
            self._reader.start()

    def _read_log(self) -> None:
        """The reader thread: every line, with its arrival time, until every writer (the
        supervisor and each worker) has closed the pipe."""
        for raw in iter(self.proc.stdout.readline, b""):
            at = time.monotonic()
            self.log.write(raw)
            with self._arrived:
                self.lines.append(LogLine(len(self.lines), at, raw.decode(errors="replace").rstrip("\n")))
                self._arrived.notify_all()
        with self._arrived:
            self.log_ended = True
            self._arrived.notify_all()

    def wait_for_line(self, match: Callable[[LogLine], bool], *, after: int = -1, timeout: float) -> LogLine:
        """The first line after line `after` for which `match` is true, as soon as it arrives."""
        deadline = time.monotonic() + timeout
        seen = after + 1
        with self._arrived:
            while True:
                for line in self.lines[seen:]:
                    if match(line):
                        return line
                seen = len(self.lines)
                if self.log_ended:
                    raise RuntimeError(f"the processor's log ended (exit code {self.proc.poll()}) "
                                       f"before the line awaited; its last lines:\n{self.tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the line awaited did not come within {timeout:g} s; "
                                       f"the processor's last lines:\n{self.tail()}")
                self._arrived.wait(remaining)

    def wait_for_event(self, event: str, *, after: int = -1, timeout: float, **fields: object) -> LogLine:
        """The first `event=NAME` line after line `after` whose fields include `fields`."""
        wanted = {key: str(value) for key, value in fields.items()}

        def match(line: LogLine) -> bool:
            if f"event={event} " not in line.text + " ":
                return False
            found = line.fields()
            return found.get("event") == event and all(found.get(k) == v for k, v in wanted.items())

        return self.wait_for_line(match, after=after, timeout=timeout)

    def last_line(self) -> int:
        """The index of the latest line so far (-1 before any): wait for what comes after it."""
        with self._arrived:
            return len(self.lines) - 1

    def tail(self, count: int = 15) -> str:
        return "\n".join(line.text for line in self.lines[-count:])

    def family(self) -> List[psutil.Process]:
        """The supervisor and every process under it (its workers, anything they started)."""
        return self._family()

    def kill(self) -> None:
        """What a node dying does: every process of the processor gone at once, none of them
        told. Each worker is in a process group of its own, so no one signal reaches them
        all: the whole family is stopped first (so no worker sees its supervisor die and
        starts shutting down cleanly), then killed."""
        self.killed = True
        family = self._family()
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.suspend()
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the processor exited early, with code {self.proc.returncode}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, as Kubernetes stops a pod; then kill whatever of it is left. Once."""
        if self.stopped:
            return
        self.stopped = True
        with deferred_interrupts():
            family = self._family()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            for process in family:  # psutil checks pid and start time: never a stranger
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            self.proc.wait()
            if self._reader is not None:
                self._reader.join(5.0)  # EOF once the last of its processes is gone
                self.proc.stdout.close()
            self.scratch.cleanup()
        self._report()

    def _report(self) -> None:
        """At --log-level warning a healthy run logs nothing: show whatever it did log. A
        watched log is expected to have lines: it is shown only after an unexpected exit."""
        text = self.log_text().strip()
        expected_exit = -signal.SIGKILL if self.killed else 0
        if self.exit_code != expected_exit or (text and not self.watch_log):
            print(f"processor exited with code {self.exit_code}; its log:\n{text[-3000:]}")
        self.log.close()

    def _family(self) -> List[psutil.Process]:
        try:
            supervisor = psutil.Process(self.pid)
            return [supervisor] + supervisor.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


# -- a benchmark-only virtualenv for peers ---------------------------------------------


def ensure_venv(venv: Path, requirements: Sequence[str], what: str) -> Path:
    """`venv` with `requirements` and procqueue (editable) installed; its python. Remade
    when the pinned requirements change. Never the project's .venv: a peer's dependencies
    stay out of it."""
    python, stamp, wanted = venv / "bin" / "python", venv / "requirements.txt", "\n".join(requirements) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    progress(f"installing {what} into {venv} (once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(REPO), *requirements],
                               capture_output=True, text=True)
    if installed.returncode != 0:
        raise SystemExit(f"pip could not install {', '.join(requirements)}:\n{installed.stderr[-2000:]}")
    stamp.write_text(wanted)
    return python


# -- signals -------------------------------------------------------------------------


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_main(main) -> None:
    """Run a benchmark's main(); Ctrl-C exits 130 once everything is cleaned up. SIGTERM
    and SIGHUP (`kill`, a cancelled CI job, a closed terminal) count as Ctrl-C: by default
    they would end Python without its `finally` blocks, leaving processors and a
    Postgres server behind."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_keyboard_interrupt)
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted; everything the benchmark started has been cleaned up", file=sys.stderr)
        sys.exit(130)


# -- figures -------------------------------------------------------------------------


def machine() -> str:
    model = platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), model)
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}"


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: always a value that was actually measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(headers)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        # The first column is text (left-aligned); the rest are figures (right-aligned).
        print("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def progress(message: str) -> None:
    print(f"  ... {message}", file=sys.stderr, flush=True)
