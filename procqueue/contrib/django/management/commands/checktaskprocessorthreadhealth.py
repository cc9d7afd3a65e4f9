"""`manage.py checktaskprocessorthreadhealth`: exit 0 if this host's processor is healthy,
1 if not (Flagsmith's command), read from the status file its supervisor rewrites every
second: `procqueue-health` with the project's settings (PROCQUEUE_STATUS_FILE)."""

from __future__ import annotations

from typing import List

from ...commands import PassThroughCommand


class Command(PassThroughCommand):
    help = "Exit 0 if the task processor on this host is healthy, 1 if not (procqueue-health's options)."

    def run(self, arguments: List[str], prog: str) -> int:
        from procqueue.health_probe import run

        from ...settings import environment

        return run(arguments, prog, environment())
