"""`manage.py checktaskprocessorthreadhealth`: exit 0 if this host's processor is healthy,
1 if not (Flagsmith's command), read from the status file its supervisor rewrites every
second: `procqueue-health` with the project's settings (PROCQUEUE_STATUS_FILE)."""

from __future__ import annotations

import sys
from typing import Any, List

from django.core.management.base import BaseCommand

from ... import commands


class Command(BaseCommand):
    help = "Exit 0 if the task processor on this host is healthy, 1 if not (procqueue-health's options)."
    requires_system_checks: List[str] = []

    def run_from_argv(self, argv: List[str]) -> None:
        sys.exit(self.check_health(commands.own_arguments(argv), commands.program_name(argv)))

    def handle(self, *args: Any, **options: Any) -> None:  # call_command(...)
        code = self.check_health(list(args), "checktaskprocessorthreadhealth")
        if code:
            sys.exit(code)

    def print_help(self, prog_name: str, subcommand: str) -> None:
        self.check_health(["--help"], f"{prog_name} {subcommand}")

    @staticmethod
    def check_health(arguments: List[str], prog_name: str) -> int:
        from procqueue.health_probe import run

        from ...settings import environment

        commands.exit_on_settings_problem(prog_name)
        return run(arguments, prog_name, environment())
