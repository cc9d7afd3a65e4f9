"""`manage.py runprocessor`: `run-task-processor` with the project's settings.

The same flags (Flagsmith's --numthreads, --sleepintervalms, --graceperiodms,
--queuepopsize, and procqueue's), parsed by the same command; the settings it falls back
on are Django's over the environment's; the tasks are those the installed apps' `tasks`
modules registered when Django started.
"""

from __future__ import annotations

from typing import Any, List

from django.core.management.base import BaseCommand
from django.db import connections

from ... import commands


class Command(BaseCommand):
    help = "Run the procqueue task processor: run-task-processor's flags, the project's settings and tasks."
    requires_system_checks: List[str] = []

    def run_from_argv(self, argv: List[str]) -> None:
        # The processor's own parser reads the flags, so they are the same in both commands.
        self.run_processor(commands.own_arguments(argv), commands.program_name(argv))

    def handle(self, *args: Any, **options: Any) -> None:  # call_command("runprocessor")
        self.run_processor(list(args), "runprocessor")

    def print_help(self, prog_name: str, subcommand: str) -> None:  # manage.py help runprocessor
        self.run_processor(["--help"], f"{prog_name} {subcommand}")

    @staticmethod
    def run_processor(arguments: List[str], prog_name: str) -> None:
        from procqueue.cli import run_task_processor_cli
        from procqueue.entry_points import guarded

        from ...settings import environment

        commands.exit_on_settings_problem(prog_name)
        # The workers fork from this process: none may inherit a Django connection's
        # socket, which two processes would then talk over at once.
        connections.close_all()
        settings = environment()
        guarded(lambda: run_task_processor_cli(arguments, prog_name, settings), processor=True)
