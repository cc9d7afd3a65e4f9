"""`python -m procqueue ...`: the same as the `procqueue` command."""

from .starting import procqueue_main

procqueue_main()
