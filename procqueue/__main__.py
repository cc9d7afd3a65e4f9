"""`python -m procqueue ...`: the same as the `procqueue` command."""

from .cli import main

main(prog_name="procqueue")
