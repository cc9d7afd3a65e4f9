"""When an idle worker claims unasked (procqueue.poll_turns): plain arithmetic."""

from __future__ import annotations

import pytest

from procqueue.poll_turns import next_turn


def test_one_worker_looks_every_interval():
    assert next_turn(10.3, interval=2.0, index=0, workers=1) == 12.0
    assert next_turn(12.0, interval=2.0, index=0, workers=1) == 14.0


def test_workers_take_turns_so_the_processor_looks_once_per_interval():
    # Interval 2 s, 3 workers: worker 0 owns [0, 2), [6, 8)...; worker 1 [2, 4); worker 2 [4, 6).
    now = 0.5
    turns = sorted(next_turn(now, interval=2.0, index=i, workers=3) for i in range(3))
    assert turns == [2.0, 4.0, 6.0]


def test_woken_in_between_a_worker_keeps_its_turn():
    # A NOTIFY woke worker 1 at 5.1 s: its next turn is still the one it owned, at 8 s.
    assert next_turn(5.1, interval=2.0, index=1, workers=3) == 8.0
    # ... and worker 2, whose turn is under way, waits for its next one.
    assert next_turn(5.1, interval=2.0, index=2, workers=3) == 10.0


@pytest.mark.parametrize("now", [0.0, 1.999, 7.25, 1e6 + 0.3])
def test_every_turn_is_in_the_future_and_within_one_round(now):
    for index in range(5):
        turn = next_turn(now, interval=0.5, index=index, workers=5)
        assert now < turn <= now + 0.5 * 5
