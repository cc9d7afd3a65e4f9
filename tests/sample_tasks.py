"""Tasks the test suite's processors import (`--import sample_tasks`).

Each records its execution in `public.executions` on the processor's own client
connection, so tests can count exactly how often each task ran.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

from procqueue import client, current_task, register_task_handler


def recorded_before(key: str) -> bool:
    """Whether an earlier run recorded `key`: for tasks that behave badly only once."""
    conn, _ = client.connection()
    with conn.cursor() as cur:
        cur.execute("SELECT EXISTS (SELECT 1 FROM public.executions WHERE key = %s)", (key,))
        return cur.fetchone()[0]


def record(key: str) -> None:
    conn, _ = client.connection()
    task = current_task()
    with conn.cursor() as cur:
        cur.execute("INSERT INTO public.executions (task_id, key, pid) VALUES (%s, %s, %s)",
                    (task.id if task else None, key, os.getpid()))


@register_task_handler(task_name="sample.record")
def record_task(key: str) -> None:
    record(key)


@register_task_handler(task_name="sample.noop")
def noop() -> None:
    pass


@register_task_handler(task_name="sample.sleep_then_record", timeout=timedelta(seconds=60))
def sleep_then_record(seconds: float, key: str) -> None:
    time.sleep(seconds)
    record(key)


@register_task_handler(task_name="sample.fail", max_attempts=2, retry_backoff=timedelta(0))
def fail(message: str) -> None:
    raise RuntimeError(message)


@register_task_handler(task_name="sample.wedged", timeout=timedelta(seconds=1), max_attempts=1)
def wedged() -> None:
    """Stands in for C code that never returns to the interpreter: the worker's own
    timeout signal cannot reach it, only the supervisor can."""
    import signal

    if os.environ.get("SAMPLE_WEDGED_MARK"):  # tell a test the moment it began
        open(os.environ["SAMPLE_WEDGED_MARK"], "w").close()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(120)


# A daemon, as `daemon(3)` makes one: fork, the parent exits, the child leaves the
# session and writes its pid. Its parent gone, it belongs to the nearest subreaper.
_DAEMON = """
import os, sys, time
if os.fork():
    os._exit(0)
os.setsid()
with open(sys.argv[1] + ".tmp", "w") as handle:
    handle.write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(300)
"""


def start_processes(pid_dir: str) -> None:
    """Start a child in its own session (out of the worker's process group) and a daemon
    (double fork: no longer anyone's child), and write their pids to `pid_dir`."""
    import subprocess
    import sys
    from pathlib import Path

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    Path(pid_dir, "child.pid").write_text(str(child.pid))
    daemon_pid_file = Path(pid_dir, "daemon.pid")
    subprocess.run([sys.executable, "-c", _DAEMON, str(daemon_pid_file)], check=True)
    while not daemon_pid_file.exists():
        time.sleep(0.01)


@register_task_handler(task_name="sample.spawn_hanging_child", timeout=timedelta(seconds=1), max_attempts=1)
def spawn_hanging_child(pid_dir: str) -> None:
    """Starts processes (see start_processes) which hang as the task does, in a way the
    worker's timeout cannot interrupt: the whole tree must go when the worker is killed."""
    import signal

    start_processes(pid_dir)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(120)


@register_task_handler(task_name="sample.spawn_and_overrun", timeout=timedelta(seconds=1), max_attempts=1)
def spawn_and_overrun(pid_dir: str) -> None:
    """Starts processes, then overruns its timeout in pure Python, which the worker's own
    timeout interrupts: the processes must end with it, and the worker carry on."""
    start_processes(pid_dir)
    while True:
        time.sleep(0.05)


@register_task_handler(task_name="sample.spawn_and_wait", timeout=timedelta(seconds=60))
def spawn_and_wait(pid_dir: str, seconds: float) -> None:
    """Starts processes, then works for a while (pure Python, interruptible)."""
    start_processes(pid_dir)
    record("spawned")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


@register_task_handler(task_name="sample.spawn_then_sql_sleep", timeout=timedelta(seconds=120), max_attempts=1)
def spawn_then_sql_sleep(pid_dir: str, seconds: float) -> None:
    """Starts processes, then waits inside libpq, where no Python signal handler runs."""
    start_processes(pid_dir)
    conn, _ = client.connection()
    with conn.cursor() as cur:
        cur.execute("SELECT pg_sleep(%s)", (seconds,))


@register_task_handler(task_name="sample.child_in_group_then_wait", timeout=timedelta(seconds=60))
def child_in_group_then_wait(pid_dir: str) -> None:
    """Starts a plain child (it stays in the worker's process group), then waits to be
    killed with its worker."""
    import subprocess
    import sys
    from pathlib import Path

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    Path(pid_dir, "child.pid").write_text(str(child.pid))
    time.sleep(60)


@register_task_handler(task_name="sample.fork_and_return")
def fork_and_return(count: int) -> None:
    """Forks children that exit at once and are never waited for (as a careless library
    would): left alone, each would stay a zombie under the worker."""
    import os

    for _ in range(count):
        if os.fork() == 0:
            os._exit(0)


@register_task_handler(task_name="sample.fork_tree_and_return")
def fork_tree_and_return(count: int) -> None:
    """Forks children that each fork a grandchild and exit at once; the grandchildren,
    orphaned, exit a moment later. Nobody waits for any of them."""
    import os
    import time

    for _ in range(count):
        if os.fork() == 0:
            if os.fork() == 0:
                time.sleep(0.2)
            os._exit(0)


@register_task_handler(task_name="sample.child_then_exit", max_attempts=1)
def child_then_exit(pid_dir: str, code: int) -> None:
    """Starts a child in the worker's process group, then ends the worker with `code`, one
    of the codes a worker leaving on purpose uses."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    Path(pid_dir, "child.pid").write_text(str(child.pid))
    os._exit(code)


@register_task_handler(task_name="sample.close_output")
def close_output(how: str) -> None:
    """Cuts the worker off from its log: closes fds 1 and 2, or the sys.stderr object."""
    import os
    import sys

    if how == "descriptors":
        os.close(1)
        os.close(2)
    elif how == "stream":
        sys.stderr.close()
    else:  # a path: its file opened under stderr's number, and kept open, as a careless task would
        os.close(2)
        _kept.append(os.open(how, os.O_WRONLY | os.O_CREAT, 0o600))


_kept: list = []


@register_task_handler(task_name="sample.busy_loop", timeout=timedelta(seconds=1), max_attempts=1)
def busy_loop() -> None:
    """Pure Python spinning: the worker's own timeout interrupts it."""
    while True:
        pass


@register_task_handler(task_name="sample.grow", max_attempts=1)
def grow(megabytes: int, key: str) -> None:
    """Keeps memory (as a leaky task would) in the worker process."""
    _hoard.append(bytearray(megabytes * 1024 * 1024))
    record(key)


_hoard: list = []


@register_task_handler(task_name="sample.sleep")
def sleep(seconds: float) -> None:
    """Touches no database: its outcome depends only on the processor's own bookkeeping."""
    time.sleep(seconds)


@register_task_handler(task_name="sample.c_call_holding_gil", timeout=timedelta(seconds=1), max_attempts=1)
def c_call_holding_gil() -> None:
    """libc sleep() called through ctypes.PyDLL, which keeps the GIL for the call, with the
    worker's timeout signal blocked as a C library may do: no Python code runs in this
    process until it returns (the regex engine and big-int arithmetic, the usual
    suspects, do poll for signals, so they are not stand-ins)."""
    import ctypes
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    libc = ctypes.PyDLL(None)
    while True:  # sleep() returns early when a signal (the stack dump) arrives
        libc.sleep(120)


@register_task_handler(task_name="sample.fail_elsewhere", queue="elsewhere", max_attempts=1)
def fail_elsewhere() -> None:
    """On a queue of its own, for processors told to run only that queue."""
    raise RuntimeError("failed elsewhere")


@register_task_handler(task_name="sample.record_once", max_attempts=1)
def record_once(key: str) -> None:
    """One attempt only, as every recurring run has: losing it unrun would lose it."""
    record(key)


@register_task_handler(task_name="sample.freeze_first_time")
def freeze_first_time(key: str) -> None:
    """On its first run, stops its whole worker process (SIGSTOP) the moment it starts:
    the worker holds its claim frozen, before anything could tell the database the run
    had started or put the tasks claimed behind it back (as a host that dies does)."""
    import signal

    first_run = not recorded_before(key)
    record(key)
    if first_run:
        os.kill(os.getpid(), signal.SIGSTOP)


@register_task_handler(task_name="sample.wedged_once", timeout=timedelta(seconds=1), max_attempts=2)
def wedged_once(key: str) -> None:
    """Wedges beyond its worker's reach on the first attempt only, then succeeds."""
    import signal

    first_attempt = not recorded_before(key)
    record(key)
    if first_attempt:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(120)


@register_task_handler(task_name="sample.sql_sleep", timeout=timedelta(seconds=120), max_attempts=1)
def sql_sleep(seconds: float, key: str) -> None:
    """Waits inside libpq (pg_sleep on the server): C code that released the GIL and
    retries its poll() on EINTR, so no Python signal handler runs until it returns."""
    record(f"{key}:start")
    conn, _ = client.connection()
    with conn.cursor() as cur:
        cur.execute("SELECT pg_sleep(%s)", (seconds,))
    record(f"{key}:end")


@register_task_handler(task_name="sample.long", timeout=timedelta(seconds=60))
def long(seconds: float, key: str) -> None:
    """Records its start, then works for a while (pure Python, interruptible)."""
    record(f"{key}:start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    record(f"{key}:end")


@register_task_handler(task_name="sample.overrun_until_dumped", timeout=timedelta(seconds=1), max_attempts=1)
def overrun_until_dumped() -> None:
    """Overruns its timeout with the worker's alarm blocked, and returns the moment the
    supervisor's stack-dump signal arrives: a C call cut short by a signal looks like this."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGUSR1})
    signal.sigtimedwait({signal.SIGUSR1}, 60)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGALRM})


@register_task_handler(task_name="sample.sleep_within_4s", timeout=timedelta(seconds=4))
def sleep_within_4s(seconds: float) -> None:
    time.sleep(seconds)


@register_task_handler(task_name="sample.cut_worker_connection_then_wedge", timeout=timedelta(seconds=1),
                       max_attempts=1)
def cut_worker_connection_then_wedge() -> None:
    """Terminates its worker's own database connection (as a restart or an operator's
    pg_terminate_backend would), then wedges beyond the worker's reach: the batch's
    finished outcomes must be recorded on a new connection before the supervisor kills it."""
    import signal

    conn, _ = client.connection()
    with conn.cursor() as cur:
        # What the test is about: outcomes of the batch still waiting to be written.
        cur.execute("SELECT count(*) FROM procqueue.tasks WHERE state = 'running' AND task_name = 'sample.record'")
        record(f"unwritten before the cut: {cur.fetchone()[0]}")
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'procqueue-worker-%%' AND pid <> pg_backend_pid()")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(120)


@register_task_handler(task_name="sample.fail_until_retried", max_attempts=1)
def fail_until_retried(key: str) -> None:
    """Fails its one attempt the first time; run again (a retry), it succeeds."""
    first_run = not recorded_before(key)
    record(key)
    if first_run:
        raise RuntimeError(f"first run of {key} fails on purpose")


@register_task_handler(task_name="sample.fail_until_fixed", max_attempts=1)
def fail_until_fixed(key: str) -> None:
    """Fails until the test records `<key>:fixed` (the operator's fix), then records a run."""
    if not recorded_before(f"{key}:fixed"):
        raise RuntimeError(f"{key} is broken")
    record(key)


@register_task_handler(task_name="sample.wait_for_release", timeout=timedelta(seconds=60))
def wait_for_release(key: str) -> None:
    """Records its start, then waits until the test records `<key>:release`."""
    record(f"{key}:start")
    while not recorded_before(f"{key}:release"):
        time.sleep(0.05)
    record(f"{key}:end")
