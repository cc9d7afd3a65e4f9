"""`manage.py runprocessor`: `run-task-processor` with the project's settings.

The same flags (Flagsmith's --numthreads, --sleepintervalms, --graceperiodms,
--queuepopsize, and procqueue's), parsed by the same command; the settings it falls back
on are Django's over the environment's; the tasks are those the installed apps' `tasks`
modules registered when Django started.
"""

from __future__ import annotations

import os
import sys
from typing import List

from django.db import connections

from ...commands import PassThroughCommand


class Command(PassThroughCommand):
    help = "Run the procqueue task processor: run-task-processor's flags, the project's settings and tasks."

    def run(self, arguments: List[str], prog: str) -> int:
        from procqueue.cli import run_task_processor_cli
        from procqueue.entry_points import guarded

        from ...settings import environment

        if any(argument == "--database-url" or argument.startswith("--database-url=") for argument in arguments):
            # The processor must drain the database .delay() writes to: DATABASES'.
            sys.stderr.write(f"{prog}: error: --database-url is not taken here: the queue's database is "
                             "DATABASES' (PROCQUEUE_DATABASE names the alias; run-task-processor takes a URL)\n")
            return 2
        # Workers fork from this process, and task modules imported on the way may have
        # opened Django connections: none may be inherited, or two processes would talk
        # over one socket. Closed before every fork, not only now.
        os.register_at_fork(before=_close_django_connections)
        settings = environment()
        guarded(lambda: run_task_processor_cli(arguments, prog, settings), processor=True)
        return 0


def _close_django_connections() -> None:
    try:
        connections.close_all()
    except Exception:  # a connection already broken: nothing left to share
        pass
