"""A program that embeds the Supervisor and carries on after it: run() must give back the
signal handlers and file descriptors it took, and call on_stop once. Prints a JSON report.
Stopped from outside with SIGTERM once its status file says it runs."""

import json
import os
import signal

from procqueue.config import processor_config
from procqueue.supervisor import Supervisor

import sample_tasks  # noqa: F401 (registers the tasks)


def open_fds() -> dict:
    """Descriptor -> what it is, found without opening one (listing /proc/self/fd would)."""
    found = {}
    for fd in range(1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        target = os.readlink(f"/proc/self/fd/{fd}")
        # multiprocessing keeps the arena behind shared arrays as a process-wide cache,
        # reused by the next one: its heap's, not the supervisor's to close.
        if not target.startswith("/dev/shm/pym-"):
            found[fd] = target
    return found


def own_handler(signum, frame):
    pass


signal.signal(signal.SIGTERM, own_handler)
before = open_fds()
starts, stops = [], []
supervisor = Supervisor(processor_config(num_workers=1, metrics_port=0), on_start=lambda: starts.append(True),
                        on_stop=lambda: stops.append(True))
code = supervisor.run()
after = open_fds()
print(json.dumps({"exit_code": code, "on_start_calls": len(starts), "on_stop_calls": len(stops),
                  "handler_restored": signal.getsignal(signal.SIGTERM) is own_handler,
                  "left_open": {fd: what for fd, what in after.items() if fd not in before}}))
