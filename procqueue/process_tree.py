"""Stopping a worker and everything it started, in two steps.

A stuck task may have started processes of its own (a subprocess, a pool) and those may
have left the worker's process group, so the tree is taken from psutil as well as from
the group. First step: SIGUSR1 to the worker (its faulthandler writes every thread's
Python stack to the log, showing where it hung) and SIGTERM to the processes it started,
so they may clean up. The worker itself gets no SIGTERM: it would only ask a stuck loop
to stop gracefully. Second step, a moment later (time for the dump to be written):
SIGKILL to whatever is still alive.
"""

from __future__ import annotations

import os
import signal
from typing import List

import psutil

# Also registered by the worker process for faulthandler.
STACK_DUMP_SIGNAL = signal.SIGUSR1


def begin_kill(pid: int) -> List[psutil.Process]:
    """Dump the worker's stack, SIGTERM its descendants; returns the processes to finish off."""
    _send(pid, STACK_DUMP_SIGNAL)
    tree = process_tree(pid)
    for proc in tree[1:]:
        _terminate(proc)
    return tree


def finish_kill(pid: int, tree: List[psutil.Process]) -> None:
    """SIGKILL whatever of the tree (and of the worker's process group) is still alive."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in tree + process_tree(pid):
        try:
            proc.kill()
        except psutil.Error:
            pass


def process_tree(pid: int) -> List[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def _terminate(proc: psutil.Process) -> None:
    try:
        proc.terminate()
    except psutil.Error:
        pass


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
