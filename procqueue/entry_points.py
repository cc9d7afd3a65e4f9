"""The console entry points `procqueue` and `run-task-processor` (setup.cfg): arm the
starting signals first thing, then import and run the CLI. Kept apart from `starting`,
which the CLI imports itself, so that neither module imports the other.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from .starting import arm, stopped_while_starting

PROCESSOR_COMMANDS = ("run", "demo")  # the `procqueue` commands that run a processor


def run_task_processor_main() -> None:
    """The `run-task-processor` command: armed, then the CLI."""
    guarded(lambda: importlib.import_module("procqueue.cli").run_task_processor_cli(), processor=True)


def procqueue_main() -> None:
    """The `procqueue` command: armed only for the commands that run a processor."""
    processor = len(sys.argv) > 1 and sys.argv[1] in PROCESSOR_COMMANDS
    guarded(lambda: importlib.import_module("procqueue.cli").procqueue_cli(), processor=processor)


def guarded(main: Callable[[], None], *, processor: bool) -> None:
    if not processor:
        main()
        return
    try:
        arm()  # inside: a signal may land before arm() returns, its handler already in
        main()
    except BaseException as exc:
        if stopped_while_starting(exc):
            sys.exit(0)
        raise
