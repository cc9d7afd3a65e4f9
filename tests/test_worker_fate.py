"""The rules of a worker's life (procqueue.worker_fate), driven in-process with made-up
times: no process started, no database, no sleep (one test runs a real Worker's task
step in this process). One test per rule, and one per past bug in these rules, named
for what went wrong. The subprocess tests (test_supervision.py) prove the supervisor
carries the decisions out on real processes.
"""

from __future__ import annotations

import contextlib
import signal
import pytest

from helpers import claimed_task
from procqueue.config import DatabaseConfig, ProcessorConfig
from procqueue.heartbeat import SlotView, WorkerSlot, WorkerState, read_slot
from procqueue.records import RunOutcome
from procqueue.registry import register_task_handler
from procqueue.worker import Worker
from procqueue.worker_fate import (FAILED_STARTS_LIMIT, HARD_TIMEOUT_MARGIN_SECONDS, RESPAWN_BACKOFF_SECONDS,
                                   WORKER_BOOT_ERROR, WORKER_OUTPUT_LOST, WORKER_RECYCLED, Departure, Exit,
                                   ExitVerdict, Kill, Slot, Watch, cancelled_in_hand, filled, got_going,
                                   has_reached_loop, judge_exit, judge_view, kill_begun, left_on_purpose, may_refill, reaped, sigkill_sent,
                                   slots_for, spared, vacated, watch, workers_cannot_start)

pytestmark = pytest.mark.timeout(5)

GRACE = 20.0
PID = 4242


def view(state=WorkerState.IDLE, *, heartbeat=100.0, task_id=0, started=0.0, deadline=0.0, pid=PID,
         tasks_done=0, whole=True) -> SlotView:
    return SlotView(pid, int(state), heartbeat, task_id, started, deadline, f"task-{task_id}" if task_id else "",
                    tasks_done, whole)


def busy(task_id=7, *, started=100.0, timeout=10.0, heartbeat=None) -> SlotView:
    return view(WorkerState.BUSY, heartbeat=started if heartbeat is None else heartbeat, task_id=task_id,
                started=started, deadline=started + timeout)


def running_slot(index=0, *, reached_loop=True) -> Slot:
    slot = Slot(index)
    filled(slot, PID, tasks_done=0)
    if reached_loop:
        got_going(slot)
    return slot


def exits(slot: Slot, seen: SlotView, exit: Exit, *, stopping: bool = False, now: float = 0.0) -> ExitVerdict:
    """What the supervisor does with a reaped worker: judge its exit, vacate its slot."""
    verdict = judge_exit(slot, seen, exit, stopping=stopping)
    assert reaped(slot) == PID and not slot.occupied
    vacated(slot, verdict, exit, now)
    return verdict


def under_kill(slot: Slot, seen: SlotView, *, at: float) -> Slot:
    """The slot after the supervisor judged its worker stuck in `seen` at `at`."""
    verdict = watch(slot, seen, at, GRACE)
    assert verdict.action is Watch.BEGIN_KILL, verdict
    kill_begun(slot, verdict, seen, sigkill_at=at + 0.5, tree=[])
    return slot


# -- the stuck rule --------------------------------------------------------------------------

def test_a_busy_worker_is_judged_by_its_tasks_deadline_plus_the_margin_not_by_its_silence():
    task = busy(started=100.0, timeout=10.0)
    assert judge_view(task, 110.0 + HARD_TIMEOUT_MARGIN_SECONDS, GRACE) is None  # its own timeout acts first
    assert judge_view(task, 105.0 + GRACE * 10, GRACE) is not None
    outcome, reason = judge_view(task, 111.5, GRACE)
    assert outcome is RunOutcome.TIMED_OUT and reason == "task 7 ran 1.5s past its timeout; worker killed"
    long_task = busy(started=100.0, timeout=3600.0)
    assert judge_view(long_task, 100.0 + GRACE * 10, GRACE) is None  # silent, but within its timeout


@pytest.mark.parametrize("state", [WorkerState.STARTING, WorkerState.IDLE, WorkerState.STOPPING])
def test_a_worker_not_running_a_task_is_judged_by_its_heartbeat_and_its_run_is_lost(state):
    assert judge_view(view(state, heartbeat=100.0), 100.0 + GRACE, GRACE) is None
    outcome, reason = judge_view(view(state, heartbeat=100.0), 100.0 + GRACE + 0.1, GRACE)
    assert outcome is RunOutcome.LOST and reason.startswith("no heartbeat for 20.1s (grace period 20s)")


def test_an_empty_slot_or_a_reading_that_was_never_whole_is_never_judged():
    long_ago = 1e6
    assert judge_view(view(WorkerState.EMPTY, pid=0, heartbeat=1.0), long_ago, GRACE) is None
    assert judge_view(view(WorkerState.IDLE, pid=0, heartbeat=1.0), long_ago, GRACE) is None
    torn = SlotView(PID, int(WorkerState.BUSY), 1.0, 7, 1.0, 2.0, "", 0, whole=False)
    assert judge_view(torn, long_ago, GRACE) is None


def test_a_task_that_just_ended_is_not_judged_overdue_by_the_workers_whole_uptime():
    # Bug (b6c74d8): the rule read the slot field by field; a deadline read as set, then
    # as the 0.0 of a task that had just ended, made the worker look overdue by its uptime.
    # The rule now judges one reading; one whose deadline is already cleared is no overrun.
    uptime = 1e6
    just_ended = SlotView(PID, int(WorkerState.BUSY), 100.0, 7, 100.0, 0.0, "t", 0)
    assert judge_view(just_ended, uptime, GRACE) is None


def test_a_finished_task_shows_as_ended_before_the_worker_waits_for_its_flush():
    # Bug (327b553): the slot said the task ended only once the worker had its connection
    # back from the flush thread; a flush stalled on a lock left a finished task showing
    # as running to its deadline, and it was killed and charged a timeout it never had.
    seen_while_taking_back = []

    class StalledFlusher:
        @contextlib.contextmanager
        def connection_lent(self):
            yield
            seen_while_taking_back.append(read_slot(worker.slot_writer.slot))

    slot = WorkerSlot()
    worker = Worker(ProcessorConfig(database=DatabaseConfig(url=None, schema="unused")), processor_id="p", index=0,
                    slot=slot)
    worker.flusher = StalledFlusher()
    worker.run_one(claimed_task("test_worker_fate.quick", id=7, timeout_seconds=1.0))
    assert [v.state for v in seen_while_taking_back] == [WorkerState.IDLE]


# -- while a worker runs: kill, finish the kill, or spare ------------------------------------

def test_a_stuck_worker_gets_sigkill_once_the_kill_grace_passes_and_no_beat_came():
    slot = under_kill(running_slot(), seen := busy(started=100.0, timeout=10.0), at=112.0)
    assert watch(slot, seen, 112.4, GRACE).action is Watch.WAIT
    assert watch(slot, seen, 112.5, GRACE).action is Watch.FINISH_KILL
    slot.kill.tree = ["the worker's processes"]
    assert sigkill_sent(slot) == ["the worker's processes"]
    assert watch(slot, seen, 113.0, GRACE).action is Watch.WAIT  # reaping follows


def test_a_worker_whose_overdue_task_ended_before_sigkill_is_spared():
    # Bug (822a9a3, 57af106): the stack dump's signal can cut a C call short, so the task
    # ends; killed anyway, the worker took its next task down with it, recorded lost.
    slot = under_kill(running_slot(), busy(task_id=7, started=100.0, timeout=10.0), at=112.0)
    next_task = busy(task_id=8, started=112.2, timeout=10.0)
    assert watch(slot, next_task, 112.5, GRACE).action is Watch.SPARE


def test_a_worker_judged_silent_while_idle_is_spared_when_it_beats_again():
    # Bug (997fa35): only an overdue task could be spared; a worker silent in a slow
    # statement that then returned was killed all the same.
    slot = under_kill(running_slot(), silent := view(WorkerState.IDLE, heartbeat=100.0), at=121.0)
    assert watch(slot, silent, 121.5, GRACE).action is Watch.FINISH_KILL
    assert watch(slot, view(WorkerState.IDLE, heartbeat=121.3), 121.5, GRACE).action is Watch.SPARE


def test_a_spared_worker_is_judged_afresh_and_a_new_fork_starts_with_no_kill():
    slot = under_kill(running_slot(), view(WorkerState.IDLE, heartbeat=100.0), at=121.0)
    spared(slot)
    assert watch(slot, view(WorkerState.IDLE, heartbeat=121.3), 121.5, GRACE).action is Watch.FINE
    assert watch(slot, view(WorkerState.IDLE, heartbeat=121.3), 141.4, GRACE).action is Watch.BEGIN_KILL
    slot.kill = Kill("old", RunOutcome.LOST, 0, 1.0, 2.0)
    filled(slot, PID + 1, tasks_done=0)
    assert (slot.kill, slot.reached_loop) == (None, False)
    assert sigkill_sent(slot) == []  # no kill under way: nothing to send it to


# -- when a worker has exited: what its task's run is recorded as, and its charge ------------

def test_a_worker_killed_stuck_on_its_task_records_the_timeout_and_charges_it():
    slot = under_kill(running_slot(), seen := busy(task_id=7, started=100.0, timeout=10.0), at=112.0)
    verdict = judge_exit(slot, seen, Exit(signal=signal.SIGKILL), stopping=False)
    assert (verdict.departure, verdict.in_flight, verdict.outcome, verdict.charge) == \
        (Departure.KILLED_STUCK, 7, RunOutcome.TIMED_OUT, True)
    assert verdict.cause == "task 7 ran 2.0s past its timeout; worker killed"


@pytest.mark.parametrize("judged_on", [busy(task_id=7, started=100.0, timeout=10.0),
                                       view(WorkerState.IDLE, heartbeat=90.0)])
def test_a_task_started_between_the_verdict_and_sigkill_goes_back_uncharged(judged_on):
    # Bug (997fa35): an idle-silence kill charged the task a returning claim had just started.
    slot = under_kill(running_slot(), judged_on, at=112.0)
    verdict = judge_exit(slot, busy(task_id=9, started=112.1), Exit(signal=signal.SIGKILL), stopping=False)
    assert (verdict.in_flight, verdict.outcome, verdict.charge) == (9, RunOutcome.LOST, False)
    judged = "on task 7" if judged_on.task_id else "while idle"
    assert verdict.cause == f"worker 0 killed as stuck {judged} as this one started"


def test_a_worker_killed_stuck_while_idle_records_its_reason_with_no_task_to_charge():
    slot = under_kill(running_slot(), idle := view(WorkerState.IDLE, heartbeat=100.0), at=121.0)
    verdict = judge_exit(slot, idle, Exit(signal=signal.SIGKILL), stopping=False)
    assert (verdict.departure, verdict.in_flight, verdict.outcome) == (Departure.KILLED_STUCK, None, RunOutcome.LOST)
    assert verdict.cause.startswith("no heartbeat for 21.0s") and verdict.departure.restart_reason == "stuck"


def test_a_stuck_worker_that_stopped_cleanly_as_the_processor_stopped_is_no_restart_but_keeps_its_verdict():
    slot = under_kill(running_slot(), seen := busy(task_id=7, started=100.0, timeout=10.0), at=112.0)
    verdict = exits(slot, seen, Exit(code=0), stopping=True, now=113.0)
    assert (verdict.departure, slot.restarts) == (Departure.STOPPED, 0)
    assert (verdict.outcome, verdict.charge) == (RunOutcome.TIMED_OUT, True)  # judged before the stop


def test_a_task_killed_because_the_processor_stops_goes_back_uncharged():
    verdict = judge_exit(running_slot(), busy(task_id=7), Exit(signal=signal.SIGKILL), stopping=True)
    assert (verdict.in_flight, verdict.outcome, verdict.charge) == (7, RunOutcome.LOST, False)
    assert verdict.cause == "killed at shutdown: still running after --shutdown-timeout " \
                            "(worker 0 killed by signal 9 (SIGKILL))"


def test_a_worker_exiting_with_an_error_during_the_stop_costs_its_task_nothing():
    verdict = judge_exit(running_slot(), busy(task_id=7), Exit(code=1), stopping=True)
    assert (verdict.departure, verdict.charge, verdict.cause) == (Departure.CRASHED, False, "worker 0 exited with code 1")


def test_a_worker_that_dies_under_its_task_charges_that_task_a_lost_run():
    verdict = judge_exit(running_slot(2), busy(task_id=7), Exit(signal=signal.SIGSEGV), stopping=False)
    assert (verdict.departure, verdict.outcome, verdict.charge) == (Departure.CRASHED, RunOutcome.LOST, True)
    assert verdict.cause == "worker 2 killed by signal 11 (SIGSEGV)"
    assert judge_exit(running_slot(), view(), Exit(code=1), stopping=False).cause == "worker 0 exited with code 1"
    realtime = judge_exit(running_slot(), view(), Exit(signal=signal.SIGRTMIN + 3), stopping=False).cause
    assert realtime.startswith(f"worker 0 killed by signal {signal.SIGRTMIN + 3} (") and "unknown" not in realtime


@pytest.mark.parametrize("code, departure", [(WORKER_RECYCLED, Departure.RECYCLED),
                                              (WORKER_OUTPUT_LOST, Departure.OUTPUT_LOST)])
def test_a_workers_own_exit_code_counts_only_from_a_stopping_slot(code, departure):
    # Bug (c2a5d5c): a task calling os._exit(4) looked like a worker recycling itself:
    # its processes were not killed and its death was not counted as a crash.
    stopping = view(WorkerState.STOPPING)
    assert left_on_purpose(Exit(code=code), stopping.state)
    assert judge_exit(running_slot(), stopping, Exit(code=code), stopping=False).departure is departure
    mid_task = busy(task_id=7)
    assert not left_on_purpose(Exit(code=code), mid_task.state)  # its process group is killed first
    verdict = judge_exit(running_slot(), mid_task, Exit(code=code), stopping=False)
    assert (verdict.departure, verdict.in_flight, verdict.charge) == (Departure.CRASHED, 7, True)


def test_a_worker_that_stops_when_asked_is_no_restart():
    slot = running_slot()
    verdict = exits(slot, view(WorkerState.STOPPING), Exit(code=0), stopping=True, now=50.0)
    assert verdict.departure is Departure.STOPPED and verdict.departure.restart_reason is None
    assert (verdict.in_flight, slot.restarts, slot.vacant_since) == (None, 0, 50.0)


# -- refilling the slot ------------------------------------------------------------------------

def test_a_worker_that_got_going_is_replaced_at_once_however_often_it_dies():
    slot = running_slot()
    slot.quick_deaths, slot.failed_starts = 3, 2  # its earlier workers died starting
    for death in range(10):
        verdict = exits(slot, busy(), Exit(signal=signal.SIGKILL), now=float(death))
        assert verdict.departure.restart_reason == "crashed"
        assert (slot.respawn_at, slot.quick_deaths, slot.failed_starts) == (float(death), 0, 0)
        filled(slot, PID, 0)
        got_going(slot)
    assert slot.restarts == 10


def test_a_slot_whose_workers_die_while_starting_backs_off_and_counts_failed_starts():
    slot, now = Slot(0), 0.0
    for death, delay in enumerate(RESPAWN_BACKOFF_SECONDS + (30, 30), start=1):
        assert may_refill(slot, now, holding_release=False)
        filled(slot, PID, 0)
        exits(slot, view(WorkerState.STARTING), Exit(code=1), now=now)
        assert (slot.respawn_at - now, slot.failed_starts) == (delay, death)
        assert not may_refill(slot, now + delay - 0.01, holding_release=False)
        now += delay
    got_going(slot)
    assert slot.failed_starts == 0


def test_a_worker_that_cannot_connect_backs_off_but_ends_the_run_of_failed_starts():
    slot = Slot(0, quick_deaths=1, failed_starts=2)
    filled(slot, PID, 0)
    exits(slot, view(WorkerState.STARTING), Exit(code=WORKER_BOOT_ERROR), now=10.0)
    assert (slot.respawn_at, slot.quick_deaths, slot.failed_starts) == (11.0, 2, 0)


@pytest.mark.parametrize("code", [WORKER_RECYCLED, WORKER_OUTPUT_LOST])
def test_a_worker_that_left_to_be_replaced_is_replaced_at_once_without_backoff(code):
    slot = Slot(0, quick_deaths=3)
    filled(slot, PID, 0)
    verdict = exits(slot, view(WorkerState.STOPPING), Exit(code=code), now=10.0)
    assert (slot.respawn_at, slot.restarts, slot.quick_deaths) == (10.0, 1, 3)
    assert verdict.departure.restart_reason == "recycled" and not verdict.departure.is_failure


def test_a_worker_that_drained_when_signalled_by_someone_else_counts_as_a_crash_not_a_stop():
    # Exit 0 from a stopping slot while the processor runs on: someone sent the worker a
    # SIGTERM. Its processes are its own business (it left on purpose), but it is a restart.
    slot = running_slot()
    assert left_on_purpose(Exit(code=0), WorkerState.STOPPING)
    verdict = exits(slot, view(WorkerState.STOPPING), Exit(code=0), now=5.0)
    assert (verdict.departure, verdict.in_flight, slot.respawn_at, slot.restarts) == (Departure.CRASHED, None, 5.0, 1)


def test_a_slot_is_not_refilled_while_its_last_workers_tasks_wait_to_be_put_back():
    assert not may_refill(Slot(0), 100.0, holding_release=True)
    assert may_refill(Slot(0), 100.0, holding_release=False)
    assert not may_refill(running_slot(), 100.0, holding_release=False)


def test_a_worker_that_finished_a_task_got_going_even_if_it_died_before_its_state_said_so():
    slot = Slot(0)
    filled(slot, PID, tasks_done=12)
    assert not has_reached_loop(slot, view(WorkerState.STARTING, tasks_done=12))
    assert has_reached_loop(slot, view(WorkerState.STARTING, tasks_done=13))
    assert has_reached_loop(slot, view(WorkerState.IDLE, tasks_done=12))


def test_the_processor_gives_up_only_when_every_slot_keeps_failing_and_no_worker_ever_ran():
    slots = slots_for(3)
    for slot in slots:
        slot.failed_starts = FAILED_STARTS_LIMIT
    assert workers_cannot_start(slots, any_worker_ran=False)
    assert not workers_cannot_start(slots, any_worker_ran=True)
    slots[1].failed_starts = FAILED_STARTS_LIMIT - 1
    assert not workers_cannot_start(slots, any_worker_ran=False)


# -- helpers -------------------------------------------------------------------------------------

@register_task_handler(task_name="test_worker_fate.quick")
def _quick() -> None:
    pass



# -- a task an operator cancelled while it ran -------------------------------------------------

def test_a_worker_running_a_cancelled_task_is_killed_and_refilled_at_once_as_no_failure():
    slot = running_slot(index=1)
    seen = busy(task_id=7, started=100.0, timeout=60.0)
    verdict = watch(slot, seen, 101.0, GRACE, {7: 1})
    assert (verdict.action, verdict.outcome) == (Watch.BEGIN_KILL, RunOutcome.CANCELLED)
    kill_begun(slot, verdict, seen, sigkill_at=101.5, tree=[])
    ended = exits(slot, seen, Exit(signal=signal.SIGKILL), now=102.0)
    assert (ended.departure, ended.in_flight, ended.outcome) == (Departure.KILLED_CANCELLED, 7, RunOutcome.CANCELLED)
    assert not ended.departure.is_failure and ended.departure.restart_reason == "recycled"
    assert slot.respawn_at == 102.0 and slot.quick_deaths == 0


@pytest.mark.parametrize("cancelled, seen", [
    ({7: 0}, busy(task_id=7)),  # held by another slot: a task id is only ever in one worker
    ({8: 1}, busy(task_id=7)),  # this worker runs another task (the cancelled one waits in its batch, or ended)
    ({7: 1}, view(WorkerState.IDLE, task_id=0)),
    ({7: 1}, view(WorkerState.BUSY, task_id=7, whole=False)),
])
def test_a_cancel_kills_only_the_worker_seen_running_that_very_task(cancelled, seen):
    assert watch(running_slot(index=1), seen, 101.0, GRACE, cancelled).action is Watch.FINE


def test_a_cancelled_task_is_in_a_workers_hand_while_shown_or_judged_on_even_in_a_torn_reading():
    slot = running_slot(index=1)
    assert cancelled_in_hand(slot, view(WorkerState.BUSY, task_id=7, whole=False), {7: 1}) == {7}
    assert cancelled_in_hand(slot, busy(task_id=8), {7: 1}) == set()
    slot.kill = Kill("cancelled", RunOutcome.CANCELLED, 7, 100.0, 101.5)
    assert cancelled_in_hand(slot, view(WorkerState.IDLE), {7: 1}) == {7}  # killed, not reaped yet
