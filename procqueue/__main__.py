"""`python -m procqueue ...`: the same as the `procqueue` command."""

from .cli import procqueue_main

procqueue_main()
