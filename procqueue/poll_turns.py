"""When an idle worker claims without being told to: once per --sleepintervalms for the
whole processor, the workers taking turns.

Enqueueing sends a NOTIFY that wakes idle workers at once; the poll is for work nothing
announced (a task delayed until now, a retry whose backoff ran out, tasks a rescue put
back). One look per interval finds that as soon as a look per worker per interval
would, at a fraction of the transactions (a look that finds a full claim's worth wakes
the other workers with a NOTIFY of its own): an idle processor of 5
workers used to ask Postgres 2.5 times a second. The turns are slots of the interval on
the host's monotonic clock, which every worker process reads alike, so they stay spread
out however often NOTIFYs wake the workers in between. A worker busy when its turn comes
misses it; the next idle one looks an interval later.

Plain arithmetic: tests/test_poll_turns.py checks it.
"""

from __future__ import annotations

import math


def next_turn(now: float, *, interval: float, index: int, workers: int) -> float:
    """The start of worker `index`'s next turn after `now` (turns of `interval` seconds go
    round `workers` workers; with one worker, every interval)."""
    current = math.floor(now / interval)
    ahead = (index - current) % workers or workers  # our turn now: we have just looked
    return (current + ahead) * interval
