"""How many tasks a worker claims at once: as many as it will get through quickly.

Each claim and each batch of outcomes costs a round trip and a commit, whatever the
batch holds, so a flood of tiny tasks drains several times faster in claims of 100 than
of 10. But tasks a worker has claimed wait for it: claimed in bulk behind a slow one,
they would sit while other workers idle. So a worker starts at `--queuepopsize` and
sizes each next claim by what the last one cost: as many tasks as took CLAIM_BUDGET_SECONDS
to run, doubling at most per claim, never past GROWTH_LIMIT x `--queuepopsize`; and back
to `--queuepopsize` as soon as a claim gets fewer than it asked for (a shallow queue is
shared out among workers, not taken by one). Tasks slower than the last batch's cannot
hold their batch-mates hostage: once a batch has run FLUSH_AFTER_SECONDS, what is left
of it goes back to the queue (worker.Worker.release_waiting).

Plain arithmetic: no clock, no database; tests/test_claim_size.py checks each rule.
"""

from __future__ import annotations

from typing import Optional

# What a claim's tasks should take to run, together: what a task claimed in bulk waits
# at most behind its batch-mates when they are all about as quick as the last batch's.
CLAIM_BUDGET_SECONDS = 0.05
# Claims grow up to this multiple of --queuepopsize (10 -> 100: past 100, a claim saves
# little more; measured with bench/throughput.py).
GROWTH_LIMIT = 10


def next_claim_size(*, current: int, pop_size: int, claimed: int, ran: int, seconds: float) -> int:
    """The size of the next claim, after one that asked for `current` tasks, got
    `claimed`, and ran `ran` of them in `seconds` (before it, `pop_size`)."""
    if claimed < current:
        return pop_size  # a shallow queue: shared out, not taken by whoever asks first
    if ran == 0:
        return current  # nothing learnt about how long tasks take
    size = min(current * 2, pop_size * GROWTH_LIMIT)
    if seconds > 0:
        size = min(size, int(CLAIM_BUDGET_SECONDS * ran / seconds))
    return max(size, pop_size)


def cap_for_recycling(size: int, tasks_left: Optional[int]) -> int:
    """A worker that leaves after `tasks_left` more tasks (--max-tasks-per-worker)
    claims no more than it will run."""
    return size if tasks_left is None else max(1, min(size, tasks_left))
