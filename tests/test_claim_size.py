"""How many tasks a worker claims at once (procqueue.claim_size): plain arithmetic, no database."""

from __future__ import annotations

from procqueue.claim_size import CLAIM_BUDGET_SECONDS, GROWTH_LIMIT, cap_for_recycling, next_claim_size


def test_quick_full_claims_double_up_to_the_growth_limit():
    sizes = [10]
    for _ in range(6):  # no-op tasks: 100 us each
        size = sizes[-1]
        sizes.append(next_claim_size(current=size, pop_size=10, claimed=size, ran=size, seconds=size * 0.0001))
    assert sizes == [10, 20, 40, 80, 100, 100, 100]
    assert sizes[-1] == 10 * GROWTH_LIMIT


def test_a_claim_holds_what_runs_within_the_budget():
    # 5 ms tasks: 10 of them fill the 50 ms budget, so a claim of 40 shrinks at once to 10.
    assert next_claim_size(current=40, pop_size=1, claimed=40, ran=40, seconds=40 * 0.005) == 10
    assert CLAIM_BUDGET_SECONDS == 0.05


def test_never_below_queuepopsize_however_slow():
    assert next_claim_size(current=10, pop_size=10, claimed=10, ran=10, seconds=30.0) == 10
    assert next_claim_size(current=1, pop_size=1, claimed=1, ran=1, seconds=5.0) == 1


def test_a_shallow_queue_sends_the_claim_back_to_queuepopsize():
    # Asked for 80, got 3: the queue is nearly empty; the next tasks are shared out.
    assert next_claim_size(current=80, pop_size=10, claimed=3, ran=3, seconds=0.0003) == 10
    assert next_claim_size(current=10, pop_size=10, claimed=3, ran=3, seconds=0.0003) == 10


def test_a_batch_cut_short_by_a_slow_task_shrinks_the_next_claim():
    # One task ran (for 0.3 s) before the rest went back to the queue.
    assert next_claim_size(current=80, pop_size=10, claimed=80, ran=1, seconds=0.3) == 10


def test_tasks_that_took_no_measurable_time_double_the_claim():
    assert next_claim_size(current=10, pop_size=10, claimed=10, ran=10, seconds=0.0) == 20


def test_nothing_ran_changes_nothing():
    assert next_claim_size(current=40, pop_size=10, claimed=40, ran=0, seconds=0.01) == 40


def test_a_worker_about_to_recycle_claims_no_more_than_it_will_run():
    assert cap_for_recycling(100, None) == 100
    assert cap_for_recycling(100, 3) == 3
    assert cap_for_recycling(100, 0) == 1
