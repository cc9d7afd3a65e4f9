"""Stop signals while a processor starts.

Before a processor's supervisor takes signals over, a stop signal (Kubernetes deleting a
pod that is still importing a large application, a rolling deploy rolled back at once)
must end it cleanly: nothing runs yet, so there is nothing to drain, and it exits 0.
The processor's entry points (entry_points.py) arm this first thing, before their heavy
imports: from then on a stop signal raises StoppedWhileStarting. The supervisor disarms
it once its own handlers, which only set flags its loop acts on, are in; `run_processor`
gives the handlers that were there before back when it is done. Other commands are not armed: a
signal ends them as it always did.

Standard library only: it runs before anything else is imported.
"""

from __future__ import annotations

import signal
from typing import Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)


class StoppedWhileStarting(BaseException):
    """A stop signal came before a supervisor could take signals over."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StartingSignals:
    """The handlers of a starting processor, and what they replaced."""

    def __init__(self) -> None:
        self.armed = False
        self.received: Optional[int] = None  # the stop signal that came, if one did
        self.previous: Dict[int, object] = {}

    def handle(self, signum, frame) -> None:
        # Disarmed first: a second signal while the first one's exception unwinds (or once
        # a supervisor gave this handler back, the command on its way out) changes nothing.
        if self.armed:
            self.armed = False
            self.received = signum
            raise StoppedWhileStarting(signum)

    def arm(self) -> None:
        """Idempotent; a signal already received stays received (arm is called again
        along the way: the script, the entry point, run_processor)."""
        if self.received is not None:
            return
        self.armed = True
        for signum in STOP_SIGNALS:
            current = signal.getsignal(signum)
            # A signal ignored on purpose (nohup, a background job) stays ignored.
            if current is signal.SIG_IGN or current == self.handle:
                continue
            self.previous[signum] = current
            signal.signal(signum, self.handle)

    def over(self) -> None:
        """The supervisor's handlers are in. A signal whose exception never arrived (C code
        can swallow one raised while it runs: psycopg2's import does) stops it now."""
        self.armed = False
        if self.received is not None:
            raise StoppedWhileStarting(self.received)

    def restore(self) -> None:
        """Give back the handlers it replaced."""
        self.armed, self.received = False, None
        while self.previous:
            signum, handler = self.previous.popitem()
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


_starting = StartingSignals()


def arm() -> StartingSignals:
    """Arm (again, if need be) the process's starting handlers; returns them."""
    _starting.arm()
    return _starting


def stopped_while_starting(exc: BaseException) -> bool:
    """Whether `exc` ended the start because a stop signal came. Not always our own
    exception: raised inside an import, Python may wrap it (a class body's __set_name__
    makes it a RuntimeError) or a half-made module may fail a lookup on the way out
    (AttributeError). Once a stop signal has come while starting, whatever ends the start
    ends it for that reason."""
    return isinstance(exc, StoppedWhileStarting) or _starting.received is not None
