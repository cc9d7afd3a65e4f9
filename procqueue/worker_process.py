"""The body of a forked worker process: from just after fork() to its exit code.

Everything here undoes or replaces what the child inherited from the supervisor (signal
handlers, process group, pipes, connections) before the worker loop starts.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import multiprocessing
import os
import signal
import sys

import psycopg2

from . import client
from .db import first_line, unbound_waits
from .errors import DatabaseError
from .execution import soft_timeout
from .lifeline import watch
from .logs import log_event
from .process_tree import STACK_DUMP_SIGNAL, adopt_orphans
from .selfpipe import SelfPipe
from .worker import Worker
from .worker_fate import WORKER_BOOT_ERROR, WORKER_OUTPUT_LOST, WORKER_RECYCLED

logger = logging.getLogger("procqueue.worker")

_PR_SET_PDEATHSIG = 1
# Added to each worker's OOM score (-1000..1000): its supervisor goes last.
WORKER_OOM_SCORE_ADJ = 300


def run_worker_process(worker: Worker, *, lifeline_fd: int) -> int:
    """Set the process up, run the loop, return the exit code."""
    multiprocessing.current_process().name = f"worker-{worker.index}"  # the log's processName
    worker.bind_process()
    os.setpgid(0, 0)  # its own process group, so a kill takes any children it started
    adopt_orphans()  # and what their children leave behind stays in its tree
    _stop_when_supervisor_dies()
    _offer_self_to_the_oom_killer()
    _install_signal_handlers(worker)
    # When the supervisor finds this worker stuck, it asks for every thread's stack first:
    # written from a C-level handler, so it works even with the GIL held by C code.
    faulthandler.register(STACK_DUMP_SIGNAL, file=sys.stderr, all_threads=True)
    soft_timeout.install()
    watch(lifeline_fd, worker.lifeline_cut)  # after the handlers and timers it arms
    client.forget_inherited_connection()  # never use the supervisor's client connection
    unbound_waits()  # the supervisor's time limit is for its own loop; a task may take long
    try:
        worker.ensure_connected()
    except (DatabaseError, psycopg2.Error) as exc:  # connecting, or LISTEN on the new connection
        log_event(logger, logging.ERROR, "worker.boot_failed", worker=worker.index, error=first_line(exc))
        return WORKER_BOOT_ERROR
    worker.flush_during_tasks()
    worker.loop()
    if worker.output_lost:
        return WORKER_OUTPUT_LOST
    return WORKER_RECYCLED if worker.recycle_reason else 0


def _install_signal_handlers(worker: Worker) -> None:
    """Stop signals only set a flag (the loop acts on it) and wake the loop's select()."""
    worker.wakeup = SelfPipe()

    def on_stop(signum, frame) -> None:
        if os.getppid() != worker.parent_pid:  # the supervisor's death signal
            worker.orphaned()
        else:
            worker.request_stop()

    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
    for signum in stop_signals:
        signal.signal(signum, on_stop)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(worker.wakeup.write_fd)
    # The supervisor blocked these around fork(); a signal that arrived meanwhile is
    # delivered now, to the handlers above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals + (signal.SIGCHLD,))


def _offer_self_to_the_oom_killer() -> None:
    """Short of memory, the kernel kills the process it scores highest. Better a worker
    (its task is retried, the supervisor replaces it) than the supervisor (its workers
    must then stop, and peers wait --rescue-after to take over). Raising one's own score
    needs no privilege."""
    try:
        with open("/proc/self/oom_score_adj", "r+") as handle:
            inherited = int(handle.read().strip() or 0)
            handle.seek(0)
            handle.write(str(min(1000, inherited + WORKER_OOM_SCORE_ADJ)))
    except (OSError, ValueError):
        pass


def _stop_when_supervisor_dies() -> None:
    """Ask Linux to SIGTERM this worker if the supervisor dies (kill -9, OOM): a worker
    left alone would run on with no one to enforce timeouts or release its leases. The
    loop also checks its parent pid, for other kernels and for a death before this call."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass
