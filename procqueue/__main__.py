"""`python -m procqueue ...`: the same as the `procqueue` command."""

from .entry_points import procqueue_main

procqueue_main()
