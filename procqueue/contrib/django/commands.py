"""What the management commands share: Django's own options taken off the command line,
and a settings mistake reported as one line, as every procqueue command reports one."""

from __future__ import annotations

import os
import sys
from typing import List, Sequence

from . import wiring

# Options every `manage.py` command takes, which ManagementUtility has acted on already
# (DJANGO_SETTINGS_MODULE, sys.path) before handing the command its argv.
DJANGO_OPTIONS_WITH_VALUE = ("--settings", "--pythonpath")


def own_arguments(argv: Sequence[str]) -> List[str]:
    """`manage.py COMMAND ...`'s arguments after the command, less Django's own options."""
    arguments: List[str] = []
    rest = list(argv[2:])
    while rest:
        argument = rest.pop(0)
        if argument in DJANGO_OPTIONS_WITH_VALUE:
            if rest:
                rest.pop(0)
        elif not argument.startswith(tuple(f"{option}=" for option in DJANGO_OPTIONS_WITH_VALUE)):
            arguments.append(argument)
    return arguments


def program_name(argv: Sequence[str]) -> str:
    return f"{os.path.basename(argv[0])} {argv[1]}"


def exit_on_settings_problem(prog: str) -> None:
    problem = wiring.problem()
    if problem is not None:
        sys.stderr.write(f"{prog}: error: {problem}\n")
        sys.exit(problem.exit_code)

