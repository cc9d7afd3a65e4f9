"""Stopping processes and everything they started: a stuck worker (from the supervisor),
and what a task left behind when it ended abnormally (from the worker).

A stuck task may have started processes of its own (a subprocess, a pool) and those may
have left the worker's process group, so the tree is taken from psutil as well as from
the group; and each worker is the subreaper of its descendants (`adopt_orphans`), so a
grandchild whose parent exited (a daemon's double fork) stays in its tree instead of
going to init. Killing a stuck worker is two steps. First: SIGUSR1 to the worker (its
faulthandler writes every thread's Python stack to the log, showing where it hung) and
SIGTERM to the processes it started, so they may clean up. The worker itself gets no
SIGTERM: it would only ask a stuck loop to stop gracefully. Second, a moment later (time
for the dump to be written): SIGKILL to whatever is still alive.

A worker has no processes of its own: its descendants belong to the tasks it ran, and a
task's are those started since the task began. When a task ends abnormally (its
timeout, its supervisor's death), the worker stops those the same two-step way
(`stop_descendants`), leaving alone what earlier tasks left running on purpose; and
between tasks it reaps the children that exited (`reap_exited_children`), so none is
left a zombie.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import List, Optional

import psutil

# Also registered by the worker process for faulthandler.
STACK_DUMP_SIGNAL = signal.SIGUSR1
# Between SIGTERM to processes being stopped and SIGKILL.
KILL_GRACE_SECONDS = 0.5
_PR_SET_CHILD_SUBREAPER = 36
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of a process's start time in /proc


def begin_kill(pid: int) -> List[psutil.Process]:
    """Dump the worker's stack, SIGTERM its descendants; returns the processes to finish off."""
    _send(pid, STACK_DUMP_SIGNAL)
    tree = process_tree(pid)
    for proc in tree[1:]:
        _terminate(proc)
    return tree


def finish_kill(pid: int, tree: List[psutil.Process]) -> None:
    """SIGKILL whatever of the tree (and of the worker's process group) is still alive. The
    tree is read again before anything dies: once the worker is dead its children belong
    to init, and are no longer found under it."""
    everything = tree + [proc for proc in process_tree(pid) if proc not in tree]
    for proc in everything[::-1]:  # descendants first, so the worker cannot start more
        _kill(proc)
    kill_group(pid)


def kill_now(pid: int) -> None:
    """SIGKILL a worker and everything it started, at once (a drain that ran out of time)."""
    finish_kill(pid, [])


def kill_group(pgid: int) -> None:
    """SIGKILL the process group `pgid`: a worker's, whose members are its tasks' processes
    (the worker may be dead already: a group lives on while it has members)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def process_tree(pid: int) -> List[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


# -- inside a worker ---------------------------------------------------------------------


def adopt_orphans() -> None:
    """Make this process the subreaper of its descendants (Linux): a process whose parent
    exits is then reparented here rather than to init, and stays in this process's tree,
    where stop_descendants finds it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def boot_clock() -> float:
    """Now, in seconds since boot: the clock process start times are kept on (/proc)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def stop_descendants(started_since: float, grace_seconds: float = KILL_GRACE_SECONDS) -> int:
    """SIGTERM the processes a task started: this process's children started since
    `started_since` (boot_clock), and everything under them; SIGKILL what is left after
    `grace_seconds`, reap them; returns how many there were. (An older child, left by an
    earlier task, is not the task's, nor are the processes it starts meanwhile.)"""
    descendants = _descendants_started_since(started_since)
    for proc in descendants:
        _terminate(proc)
    _, alive = psutil.wait_procs(descendants, timeout=grace_seconds) if descendants else ([], [])
    # Anything forked meanwhile, by a process that ignored SIGTERM, goes too.
    stragglers = alive + [proc for proc in _descendants_started_since(started_since) if proc not in descendants]
    for proc in stragglers:
        _kill(proc)
    psutil.wait_procs(stragglers, timeout=grace_seconds)
    reap_exited_children()
    return len(descendants)


def _descendants_started_since(since: float) -> List[psutil.Process]:
    slack = 1 / _CLOCK_TICKS  # start times are whole ticks, rounded down
    found: List[psutil.Process] = []
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return []
    for child in children:
        if (_started(child.pid) or 0.0) < since - slack:
            continue
        found.append(child)
        try:
            found += child.children(recursive=True)
        except psutil.Error:
            pass
    return found


def _started(pid: int) -> Optional[float]:
    """When process `pid` started, on boot_clock; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    # Field 22 (starttime), counted after the command name, which may hold spaces and ')'.
    return int(data[data.rindex(b")") + 2:].split()[19]) / _CLOCK_TICKS


def reap_exited_children() -> int:
    """Collect every child that has exited (without waiting for live ones); returns how many."""
    reaped = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped += 1


def _terminate(proc: psutil.Process) -> None:
    try:
        proc.terminate()
    except psutil.Error:
        pass


def _kill(proc: psutil.Process) -> None:
    try:
        proc.kill()
    except psutil.Error:
        pass


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
