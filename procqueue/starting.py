"""Stop signals while a command starts.

Before a processor's supervisor takes signals over, a stop signal (Kubernetes deleting a
pod that is still importing a large application, a rolling deploy rolled back at once)
must end it cleanly: nothing runs yet, so there is nothing to drain. `arm()` is the
first thing the entry points do, before their heavy imports; from then on a stop signal
raises StoppedWhileStarting. A processor (`run-task-processor`, `procqueue run` or
`demo`) then stops with exit 0; any other command exits 128 + the signal's number, as
the signal itself would have. A supervisor disarms it
(`over()`) once its own handlers, which only set flags its loop acts on, are in.

Standard library only: it runs before anything else is imported.
"""

from __future__ import annotations

import signal
import sys
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)


class StoppedWhileStarting(BaseException):
    """A stop signal came before a supervisor could take signals over."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StartingSignals:
    def __init__(self) -> None:
        self.armed = True

    def handle(self, signum, frame) -> None:
        # Once over, a signal that still reaches this handler (a supervisor gives it back
        # when it is done) changes nothing: the command is on its way out.
        if self.armed:
            raise StoppedWhileStarting(signum)

    def over(self) -> None:
        self.armed = False


_starting: Optional[StartingSignals] = None


def arm() -> StartingSignals:
    """Install the handlers (once per process); returns them, to be disarmed."""
    global _starting
    if _starting is None:
        _starting = StartingSignals()
        for signum in STOP_SIGNALS:
            signal.signal(signum, _starting.handle)
    return _starting


PROCESSOR_COMMANDS = ("run", "demo")  # of `procqueue`


def run_task_processor_main() -> None:
    """Console entry point of `run-task-processor`."""
    guarded(lambda: __import__("procqueue.cli", fromlist=["cli"]).run_task_processor_main(), processor=True)


def procqueue_main() -> None:
    """Console entry point of `procqueue`."""
    processor = len(sys.argv) > 1 and sys.argv[1] in PROCESSOR_COMMANDS
    guarded(lambda: __import__("procqueue.cli", fromlist=["cli"]).procqueue_main(), processor=processor)


def guarded(main: Callable[[], None], *, processor: bool) -> None:
    arm()
    try:
        main()
    except StoppedWhileStarting as stop:
        sys.exit(0 if processor else 128 + stop.signum)
