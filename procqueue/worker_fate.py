"""Every rule about a worker's life, as plain decisions: when it counts as stuck, when a
kill under way is called off, what its exit means for the task it held, and when its
slot is filled again.

Nothing here forks, signals, sleeps or reads a clock. The supervisor reads the shared
board and the time, asks these functions, and carries out the answers; a test drives
them with made-up times in milliseconds (tests/test_worker_fate.py). The health probe
imports the stuck rule from here too, so the probe and the supervisor never disagree
about a worker: this module imports only the standard library, `heartbeat` and `records`
(with `errors`), none of which imports more (tests/test_health.py checks the probe's).
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Set, Tuple

from .heartbeat import SlotView, WorkerState
from .records import RunOutcome

# A worker's own exit codes, besides 0 (stopped when asked):
# it could not get going (cannot connect, for instance): retried with backoff;
WORKER_BOOT_ERROR = 3
# it left to be replaced (--max-tasks-per-worker, --max-memory-per-worker);
WORKER_RECYCLED = 4
# a task closed or replaced its stdout or stderr: replaced like a recycled one.
WORKER_OUTPUT_LOST = 5

# The worker's own timeout fires at the task's deadline; only if it could not act on it
# (frozen in C code, signal blocked) is it stuck, this much later.
HARD_TIMEOUT_MARGIN_SECONDS = 1.0
# Waits before refilling a slot whose workers keep dying before reaching their loop.
RESPAWN_BACKOFF_SECONDS = (0.5, 1, 2, 4, 8, 16, 30)
# A slot whose workers died this many times in a row before reaching their loop (with
# backoff in between) will not heal by itself: a broken task module, a fork that
# deadlocks. The health verdict fails; if no worker ever ran, the processor gives up.
FAILED_STARTS_LIMIT = 5


# -- the stuck rule ------------------------------------------------------------------------

def stuck_reason(
    *, busy: bool, silent_seconds: float, overdue_seconds: float, task_id: Optional[int], grace_seconds: float
) -> Optional[str]:
    """Why a worker counts as stuck, or None. A busy worker does not beat while its task
    runs, so it is judged by the task's deadline; any other by its heartbeat."""
    if busy:
        if overdue_seconds > HARD_TIMEOUT_MARGIN_SECONDS:
            return f"task {task_id} ran {overdue_seconds:.1f}s past its timeout"
        return None
    if silent_seconds > grace_seconds:
        return f"no heartbeat for {silent_seconds:.1f}s (grace period {grace_seconds:g}s)"
    return None


def judge_view(view: SlotView, now: float, grace_seconds: float) -> Optional[Tuple[RunOutcome, str]]:
    """The stuck rule applied to one reading of a slot: why its worker counts as stuck and
    what its task's run is then recorded as, or None. Judged from one view only: read
    field by field, a deadline read as set and then as the 0.0 of a task that just ended
    made a worker look its whole uptime overdue."""
    if view.pid == 0 or view.state == WorkerState.EMPTY or not view.whole:
        return None
    busy = view.state == WorkerState.BUSY
    reason = stuck_reason(
        busy=busy,
        silent_seconds=now - view.heartbeat if view.heartbeat else 0.0,
        overdue_seconds=now - view.task_deadline if busy and view.task_deadline else 0.0,
        task_id=view.task_id,
        grace_seconds=grace_seconds,
    )
    if reason is None:
        return None
    return (RunOutcome.TIMED_OUT if busy else RunOutcome.LOST), f"{reason}; worker killed"


# -- what the supervisor knows about a slot --------------------------------------------------

@dataclass
class Kill:
    """A kill of a stuck worker under way: stack dump and SIGTERM to its tree first, SIGKILL
    once `sigkill_at` comes, unless the worker beats again before (then it is spared)."""

    reason: str
    outcome: RunOutcome
    task_id: int  # the task it was judged on; 0: judged while idle
    heartbeat: float  # the slot's heartbeat at the verdict: a later one is progress
    sigkill_at: float
    tree: Any = None  # the processes to SIGKILL (process_tree.begin_kill's list)
    sigkill_sent: bool = False


@dataclass
class Slot:
    """The supervisor's record of one worker slot, across the workers that fill it."""

    index: int
    pid: int = 0  # the worker in it; 0 while empty
    done_at_fork: int = 0  # the board's tasks_done counter (kept across workers) at fork
    reached_loop: bool = False  # its worker got as far as its loop: a later death is no failed start
    kill: Optional[Kill] = None
    respawn_at: float = 0.0  # not refilled before
    quick_deaths: int = 0  # its workers that died in a row before getting going (backoff)
    failed_starts: int = 0  # the same, counting only those that could connect (health)
    vacant_since: Optional[float] = None  # when its last worker exited, until refilled
    restarts: int = 0

    @property
    def occupied(self) -> bool:
        return self.pid != 0


def slots_for(count: int) -> List[Slot]:
    return [Slot(index) for index in range(count)]


def filled(slot: Slot, pid: int, tasks_done: int) -> None:
    """A worker was forked into the slot."""
    slot.pid, slot.done_at_fork, slot.reached_loop, slot.kill = pid, tasks_done, False, None
    slot.vacant_since = None


def got_going(slot: Slot) -> None:
    """Its worker reached its loop: a later death is no failed start, and the slot's run
    of failed starts is over."""
    slot.reached_loop = True
    slot.failed_starts = 0


def may_refill(slot: Slot, now: float, *, holding_release: bool) -> bool:
    """Whether an empty slot gets a new worker now. Never while its last worker's tasks
    are still to be put back: the new worker's leases would look the same, and the late
    release would take them."""
    return not slot.occupied and now >= slot.respawn_at and not holding_release


def has_reached_loop(slot: Slot, view: SlotView) -> bool:
    """Its worker got going: it is idle or busy, or finished a task since its fork."""
    return view.state in (WorkerState.IDLE, WorkerState.BUSY) or view.tasks_done > slot.done_at_fork


# -- while a worker runs ---------------------------------------------------------------------

class Watch(enum.Enum):
    FINE = "fine"  # nothing to do
    BEGIN_KILL = "begin_kill"  # stuck: dump its stack, SIGTERM its tree, SIGKILL later
    FINISH_KILL = "finish_kill"  # still stuck when SIGKILL is due
    SPARE = "spare"  # it beat again before SIGKILL: not stuck any more
    WAIT = "wait"  # a kill under way, SIGKILL not due yet (or sent: reaping will follow)


@dataclass(frozen=True)
class WatchVerdict:
    action: Watch
    outcome: RunOutcome = RunOutcome.LOST  # BEGIN_KILL: what its task's run is recorded as
    reason: str = ""


def watch(slot: Slot, view: SlotView, now: float, grace_seconds: float,
          cancelled: Mapping[int, int] = {}) -> WatchVerdict:
    """What to do about a running worker, seen in one reading of its slot. `cancelled`:
    the tasks an operator cancelled while this processor's workers held them (task id ->
    the slot that held it); a worker running one is killed as an overrunning one would be."""
    kill = slot.kill
    if kill is None and is_running_cancelled(slot, view, cancelled):
        return WatchVerdict(Watch.BEGIN_KILL, RunOutcome.CANCELLED,
                            f"task {view.task_id} was cancelled while it ran; worker killed")
    if kill is None:
        stuck = judge_view(view, now, grace_seconds)
        return WatchVerdict(Watch.FINE) if stuck is None else WatchVerdict(Watch.BEGIN_KILL, *stuck)
    if kill.sigkill_sent or now < kill.sigkill_at:
        return WatchVerdict(Watch.WAIT)
    # A beat since the verdict: its overdue task ended (the stack dump's signal can cut a
    # C call short), or the statement it was silent in returned. Killed now, it would
    # take a task that did nothing wrong with it. (A busy worker beats only as a task ends.)
    if view.heartbeat != kill.heartbeat:
        return WatchVerdict(Watch.SPARE)
    return WatchVerdict(Watch.FINISH_KILL)


def is_running_cancelled(slot: Slot, view: SlotView, cancelled: Mapping[int, int]) -> bool:
    return (view.whole and view.state == WorkerState.BUSY and view.task_id != 0
            and cancelled.get(view.task_id) == slot.index)


def cancelled_in_hand(slot: Slot, view: SlotView, cancelled: Mapping[int, int]) -> Set[int]:
    """Which cancelled tasks this slot's worker may still be running: the one it shows
    (read whole or not: a torn reading must not let a task go), and the one a kill under
    way was judged on. Their leases are kept until they are out of every worker's hands."""
    candidates = {view.task_id, slot.kill.task_id if slot.kill is not None else 0}
    return {task_id for task_id in candidates if task_id and task_id in cancelled}


def kill_begun(slot: Slot, verdict: WatchVerdict, view: SlotView, *, sigkill_at: float, tree: Any) -> Kill:
    slot.kill = Kill(verdict.reason, verdict.outcome, view.task_id, view.heartbeat, sigkill_at, tree)
    return slot.kill


def sigkill_sent(slot: Slot) -> Any:
    """SIGKILL goes out now (FINISH_KILL): the processes to send it to, once."""
    kill = slot.kill
    if kill is None:
        return []
    tree, kill.tree, kill.sigkill_sent = kill.tree or [], None, True
    return tree


def spared(slot: Slot) -> None:
    slot.kill = None


# -- when a worker has exited ----------------------------------------------------------------

@dataclass(frozen=True)
class Exit:
    """How a worker process ended: the code it exited with, or the signal that killed it."""

    code: Optional[int] = None
    signal: Optional[int] = None

    def describe(self, index: int) -> str:
        if self.signal is not None:
            return f"worker {index} killed by signal {self.signal} ({signal_name(self.signal)})"
        return f"worker {index} exited with code {self.code}"


def signal_name(number: int) -> str:
    """SIGKILL, or for a number Python has no name for (a real-time signal), the C library's."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return signal.strsignal(number) or "unknown signal"


def left_on_purpose(exit: Exit, slot_state: int) -> bool:
    """The worker ran its shutdown and exited with one of its own codes. The code alone
    does not tell: a task calling os._exit(4) leaves a busy slot, not a stopping one.
    A worker that did not leave on purpose has its process group killed before it is
    reaped: what its task started must not outlive it."""
    return exit.code in (0, WORKER_RECYCLED, WORKER_OUTPUT_LOST) and slot_state == WorkerState.STOPPING


class Departure(enum.Enum):
    STOPPED = "stopped"  # asked to stop while the processor stops, and did: nothing to report
    RECYCLED = "recycled"  # left to be replaced: refilled at once
    OUTPUT_LOST = "output_lost"  # left because a task took its stdout or stderr: refilled at once
    KILLED_STUCK = "stuck"  # the supervisor killed it
    KILLED_CANCELLED = "cancelled"  # the supervisor killed it to stop a task an operator cancelled
    CRASHED = "crashed"  # anything else: it died

    @property
    def restart_reason(self) -> Optional[str]:
        """Which of the processor's restart counters it adds to (None: no restart)."""
        return {Departure.STOPPED: None, Departure.OUTPUT_LOST: "recycled",
                Departure.KILLED_CANCELLED: "recycled"}.get(self, self.value)

    @property
    def is_failure(self) -> bool:
        """A death, which backs the slot off and may make the processor give up."""
        return self in (Departure.KILLED_STUCK, Departure.CRASHED)


@dataclass(frozen=True)
class ExitVerdict:
    departure: Departure
    in_flight: Optional[int]  # the task its slot showed running, to put back
    cause: str  # recorded on that task's run
    outcome: RunOutcome
    charge: bool  # whether that run costs the task an attempt


def judge_exit(slot: Slot, view: SlotView, exit: Exit, *, stopping: bool) -> ExitVerdict:
    """What a worker's exit means: why it went, what its running task's run is recorded
    as, and whether that costs the task an attempt."""
    in_flight = view.task_id or None
    kill = slot.kill
    departure = departure_of(slot, view, exit, stopping=stopping)
    if kill is not None and in_flight not in (None, kill.task_id):
        # A task the worker started in the instant between the verdict and SIGKILL did
        # nothing wrong: it goes back uncharged.
        judged = f"on task {kill.task_id}" if kill.task_id else "while idle"
        return ExitVerdict(departure, in_flight, f"worker {slot.index} killed as stuck {judged} as this one started",
                           RunOutcome.LOST, charge=False)
    if kill is not None:
        return ExitVerdict(departure, in_flight, kill.reason, kill.outcome, charge=True)
    cause = exit.describe(slot.index)
    if stopping and exit.signal is not None:
        cause = f"killed at shutdown: still running after --shutdown-timeout ({cause})"
    # A task killed only because the processor is shutting down did nothing wrong: it
    # goes back without losing an attempt.
    return ExitVerdict(departure, in_flight, cause, RunOutcome.LOST, charge=not stopping)


def departure_of(slot: Slot, view: SlotView, exit: Exit, *, stopping: bool) -> Departure:
    if stopping and exit.code == 0:
        return Departure.STOPPED
    if left_on_purpose(exit, view.state):
        if exit.code == WORKER_RECYCLED:
            return Departure.RECYCLED
        if exit.code == WORKER_OUTPUT_LOST:
            return Departure.OUTPUT_LOST
    if slot.kill is not None:
        return Departure.KILLED_CANCELLED if slot.kill.outcome is RunOutcome.CANCELLED else Departure.KILLED_STUCK
    return Departure.CRASHED


def reaped(slot: Slot) -> int:
    """The slot's worker is reaped: its pid is free for the system to reuse, so the slot
    forgets it at once (nothing may signal it any more). Returns it."""
    pid, slot.pid = slot.pid, 0
    return pid


def vacated(slot: Slot, verdict: ExitVerdict, exit: Exit, now: float) -> None:
    """Record a worker's exit in its slot and plan the slot's refill: at once for a worker
    that got going (a task crashed it, or it was stuck: its task's attempts bound that)
    or that left to be replaced; with backoff, per slot, for one that keeps dying before
    it gets going. A worker that could not connect (WORKER_BOOT_ERROR) has the database's
    trouble, which a restart would not cure: backed off, but no failed start."""
    slot.kill, slot.vacant_since = None, now
    if verdict.departure is Departure.STOPPED:
        return
    slot.restarts += 1
    if not verdict.departure.is_failure:
        slot.respawn_at = now
        return
    cannot_connect = exit.code == WORKER_BOOT_ERROR
    quick = cannot_connect or not slot.reached_loop
    slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
    slot.failed_starts = slot.failed_starts + 1 if quick and not cannot_connect else 0
    slot.respawn_at = now + respawn_delay(slot.quick_deaths)


def respawn_delay(quick_deaths: int) -> float:
    if not quick_deaths:
        return 0.0
    return float(RESPAWN_BACKOFF_SECONDS[min(quick_deaths, len(RESPAWN_BACKOFF_SECONDS)) - 1])


def workers_cannot_start(slots: Sequence[Slot], *, any_worker_ran: bool) -> bool:
    """Every slot failed to start FAILED_STARTS_LIMIT times in a row (with backoff in
    between) and no worker has ever run: the task modules break forked workers, and the
    processor gives up. Once one has run, the supervisor keeps trying, and the health
    verdict fails instead."""
    return not any_worker_ran and all(slot.failed_starts >= FAILED_STARTS_LIMIT for slot in slots)

