"""What the management commands share: the command line handed, whole, to procqueue's own
parser (so `manage.py runprocessor --help` is `run-task-processor --help`), Django's own
options taken off it, and a settings mistake reported as one line."""

from __future__ import annotations

import os
import sys
from typing import Any, List, Sequence

from django.core.management.base import BaseCommand

from . import wiring

# Options every `manage.py` command takes (Flagsmith's commands took them too): the first
# two ManagementUtility has acted on before handing the command its argv; the rest mean
# nothing to procqueue's commands, which log and fail in one way whatever the verbosity.
DJANGO_OPTIONS_WITH_VALUE = ("--settings", "--pythonpath", "--verbosity", "-v")
DJANGO_FLAGS = ("--traceback", "--no-color", "--force-color", "--skip-checks")


class PassThroughCommand(BaseCommand):
    """A command whose arguments procqueue's own parser reads: `run(arguments, prog)`
    returns the exit code. From `manage.py` and from `call_command(name, "--flag", ...)`."""

    requires_system_checks: List[str] = []

    def run(self, arguments: List[str], prog: str) -> int:
        raise NotImplementedError

    def run_from_argv(self, argv: List[str]) -> None:
        prog = f"{os.path.basename(argv[0])} {argv[1]}"
        exit_on_settings_problem(prog)
        sys.exit(self.run(own_arguments(argv), prog))

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any):
        # call_command parses with this parser first: what Django does not know is the
        # command's own, and goes to handle() as positional arguments, in order.
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parse_known_args = parser.parse_known_args

        def parse_args(args: Any = None, namespace: Any = None) -> Any:
            options, rest = parse_known_args(args, namespace)
            options.args = [*getattr(options, "args", ()), *rest]
            return options

        parser.parse_args = parse_args  # type: ignore[method-assign]
        return parser

    def handle(self, *args: Any, **options: Any) -> None:
        prog = f"manage.py {self.__module__.rsplit('.', 1)[-1]}"
        exit_on_settings_problem(prog)
        code = self.run([str(arg) for arg in args], prog)
        if code:
            sys.exit(code)

    def print_help(self, prog_name: str, subcommand: str) -> None:  # manage.py help COMMAND
        prog = f"{prog_name} {subcommand}"
        exit_on_settings_problem(prog)  # the help is made with the settings, as the command runs with them
        self.run(["--help"], prog)


def own_arguments(argv: Sequence[str]) -> List[str]:
    """`manage.py COMMAND ...`'s arguments after the command, less Django's own options
    (only before a `--`, after which everything is the command's)."""
    arguments: List[str] = []
    rest = list(argv[2:])
    while rest:
        argument = rest.pop(0)
        if argument == "--":
            arguments += [argument, *rest]
            break
        if argument in DJANGO_OPTIONS_WITH_VALUE:
            if rest:
                rest.pop(0)
        elif argument in DJANGO_FLAGS or (argument.startswith("-v") and argument[2:].isdigit()):
            continue  # -v2 as well as -v 2
        elif not argument.startswith(tuple(f"{option}=" for option in DJANGO_OPTIONS_WITH_VALUE)):
            arguments.append(argument)
    return arguments


def exit_on_settings_problem(prog: str) -> None:
    problem = wiring.problem()
    if problem is not None:
        sys.stderr.write(f"{prog}: error: {problem}\n")
        sys.exit(problem.exit_code)
