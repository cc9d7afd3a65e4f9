"""All SQL procqueue runs, as named statements loaded from `queries.sql`.

`Queries(schema)` binds the statements to one Postgres schema; each method runs one
statement on the connection it is given and returns records, never raw rows.
"""

from __future__ import annotations

import functools
import re
import weakref
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import psycopg2.errors

from .db import read_json
from .records import (
    ClaimedTask, ExpiredTask, HeldTask, ProcessorRecord, QueueDepth, QueueStats, RecordedOutcomes, ReleasedTask,
    RunOutcome, RunRecord, ScheduledRun, TaskOutcome, TaskRecord, TaskState,
)

# A recurring schedule whose runs fail (raise, or time out) this many times in a row is
# disabled until an operator enables it again (Flagsmith's RecurringTask.MAX_CONSECUTIVE_
# FAILURES); `complete` and `release_worker_tasks` count them.
MAX_CONSECUTIVE_FAILURES = 4

# `-- name: X` starts a statement; `-- fragment: Y` a piece of one that several
# statements write as `{Y}` (composed in before the schema is).
_BLOCK_START = re.compile(r"^-- (name|fragment): (\w+)\s*$", re.MULTILINE)
_PARAMETER = re.compile(r"%\((\w+)\)s")
# The statements prepared on each connection (server-side PREPARE lives as long as the
# session): connection -> names. A new connection (a reconnect) prepares afresh.
_prepared: "weakref.WeakKeyDictionary[object, Set[str]]" = weakref.WeakKeyDictionary()
_unpreparable: "weakref.WeakSet[object]" = weakref.WeakSet()


@functools.lru_cache(maxsize=None)
def _statement_templates() -> Dict[str, str]:
    text = resources.files("procqueue").joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _BLOCK_START.split(text)[1:]  # kind, name, body, kind, name, body, ...
    blocks = [(kind, name, _strip_comments(body)) for kind, name, body in zip(parts[::3], parts[1::3], parts[2::3])]
    fragments = {f"{{{name}}}": body for kind, name, body in blocks if kind == "fragment"}
    statements = {}
    for kind, name, body in blocks:
        if kind == "name":
            for placeholder, fragment in fragments.items():
                body = body.replace(placeholder, fragment)
            statements[name] = body
    return statements


def _strip_comments(body: str) -> str:
    lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
    return "\n".join(lines).strip().rstrip(";")


def quote_identifier(name: str) -> str:
    """`name` as Postgres's quote_ident() quotes it: in double quotes, a double quote inside
    doubled. Always quoted, so case and any character survive (psycopg2's
    sql.Identifier writes the same)."""
    return '"' + name.replace('"', '""') + '"'


def schema_sql() -> str:
    """The text of schema.sql as shipped inside the package."""
    return resources.files("procqueue").joinpath("schema.sql").read_text(encoding="utf-8")


class Queries:
    """The named statements of one queue schema. `prepare=False`: never PREPARE (behind a
    transaction-mode pooler, where the next statement may reach another server session)."""

    def __init__(self, schema: str, *, prepare: bool = True) -> None:
        self.schema = schema
        self.prepare = prepare
        self.channel = f"procqueue_{schema}"  # what LISTEN listens on and the trigger notifies
        self._rendered: Dict[str, str] = {}
        self._prepared_names: Dict[str, str] = {}

    def text(self, name: str) -> str:
        """The statement `name` with the schema composed in as a quoted identifier. No
        connection needed: the same text runs on any driver's (`.delay(connection=)`)."""
        rendered = self._rendered.get(name)
        if rendered is None:
            template = _statement_templates()[name]
            rendered = template.format(schema=quote_identifier(self.schema), channel=quote_identifier(self.channel))
            self._rendered[name] = rendered
        return rendered

    def _execute(self, conn, name: str, params: Optional[dict] = None) -> list:
        with conn.cursor() as cur:
            cur.execute(self.text(name), params)
            return cur.fetchall() if cur.description else []

    def _execute_prepared(self, conn, name: str, params: dict) -> list:
        """Run statement `name` prepared on this connection: Postgres parses and plans it
        once per session instead of on every call, which for the claim is most of its cost
        (0.76 -> 0.26 ms with an idle queue, measured). For the few statements that run
        on every claim or `.delay()`; only on procqueue's own connections, never on one a
        caller lends (`.delay(connection=)`), whose session is not ours to leave state in.
        A session that forgot them (DISCARD ALL, DEALLOCATE) prepares again, once; one
        that keeps forgetting (a pooler handing each statement to another server session)
        gets plain statements from then on.

        The name carries a checksum of the text (schema included): behind a pooler that
        shares server sessions, the statement found under a name may have been prepared by
        another client, perhaps another procqueue version, and must be the same one."""
        if not self.prepare or conn in _unpreparable:
            return self._execute(conn, name, params)
        prepared_name = self._prepared_name(name, conn)
        names = _prepared.setdefault(conn, set())
        execute = f"EXECUTE {prepared_name}({', '.join(f'%({p})s' for p in self._parameter_order(name))})"
        for _ in range(2):  # once more after the session forgot it
            if prepared_name not in names:
                self._prepare(conn, name, prepared_name)
                names.add(prepared_name)
            try:
                with conn.cursor() as cur:
                    cur.execute(execute, params)
                    return cur.fetchall() if cur.description else []
            except psycopg2.errors.InvalidSqlStatementName:
                names.discard(prepared_name)
        _unpreparable.add(conn)
        return self._execute(conn, name, params)

    def _prepared_name(self, name: str, conn) -> str:
        prepared_name = self._prepared_names.get(name)
        if prepared_name is None:
            prepared_name = f"procqueue_{name}_{zlib.crc32(self.text(name).encode()):08x}"
            self._prepared_names[name] = prepared_name
        return prepared_name

    def _prepare(self, conn, name: str, prepared_name: str) -> None:
        order = self._parameter_order(name)
        body = _PARAMETER.sub(lambda m: f"${order.index(m.group(1)) + 1}", self.text(name))
        try:
            with conn.cursor() as cur:
                cur.execute(f"PREPARE {prepared_name} AS {body}")
        except psycopg2.errors.DuplicatePreparedStatement:
            pass  # prepared before we could note it (an exception landed in between): the same text

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _parameter_order(name: str) -> Tuple[str, ...]:
        return tuple(dict.fromkeys(_PARAMETER.findall(_statement_templates()[name])))

    # -- the worker's statements -------------------------------------------------------

    def claim(
        self, conn, *, processor: str, worker: int, limit: int, queues: Sequence[str] = ()
    ) -> List[ClaimedTask]:
        params = {"processor": processor, "worker": worker, "limit": limit, "queues": list(queues) or None}
        rows = self._execute_prepared(conn, "claim", params)
        tasks = [ClaimedTask(*row) for row in rows]
        # UPDATE ... RETURNING does not keep the SELECT's order.
        return sorted(tasks, key=lambda task: (task.priority, task.run_at, task.id))

    def complete(
        self, conn, *, processor: str, worker: int, outcomes: Sequence[TaskOutcome], leases: Mapping[int, datetime]
    ) -> RecordedOutcomes:
        """Record a batch of outcomes, each under the lease (`leased_at` of its claim) it ran
        under; returns the ids this worker still held by that claim (and moved), and the
        recurring schedules the batch disabled."""
        if not outcomes:
            return RecordedOutcomes(set())
        params = {
            "processor": processor,
            "worker": worker,
            "ids": [o.task_id for o in outcomes],
            "states": [o.state.value for o in outcomes],
            "outcomes": [o.outcome.value for o in outcomes],
            "retry_in": [o.retry_in_seconds for o in outcomes],
            "retry_at": [o.retry_at for o in outcomes],
            "errors": [o.error for o in outcomes],
            "started": [o.started_at for o in outcomes],
            "finished": [o.finished_at for o in outcomes],
            "refunds": [int(o.refund_attempt) for o in outcomes],
            "leases": [leases[o.task_id] for o in outcomes],
            "unknown": [o.task_unknown for o in outcomes],
            "max_failures": MAX_CONSECUTIVE_FAILURES,
        }
        rows = self._execute(conn, "complete", params)
        return RecordedOutcomes(moved={task_id for task_id, _, _ in rows if task_id is not None},
                                disabled={name: failures for task_id, name, failures in rows if task_id is None})

    def start_run(
        self, conn, *, processor: str, worker: int, task: ClaimedTask, started_at: Optional[datetime] = None
    ) -> Optional[datetime]:
        """Record that `task`'s run has started (at `started_at`, or the database's now);
        returns that time, or None when refused (its slot passed, or the lease is gone).
        A recurring run while another run of its task is under way: UniqueViolation."""
        params = {"processor": processor, "worker": worker, "id": task.id, "leased_at": task.leased_at,
                  "started_at": started_at}
        rows = self._execute(conn, "start_run", params)
        return rows[0][0] if rows else None

    def put_back(self, conn, *, processor: str, worker: int, task: ClaimedTask, delay_seconds: float = 0.0) -> bool:
        """Return a claimed task, unstarted and untouched, to the queue."""
        params = {"processor": processor, "worker": worker, "id": task.id, "leased_at": task.leased_at,
                  "delay": delay_seconds}
        return bool(self._execute(conn, "put_back", params))

    def put_back_unstarted(self, conn, *, processor: str, worker: int, tasks: Sequence[ClaimedTask]) -> List[int]:
        """Return claimed tasks not yet started to the queue; returns those this worker still held."""
        params = {"processor": processor, "worker": worker, "ids": [t.id for t in tasks],
                  "leases": [t.leased_at for t in tasks], "channel": self.channel}
        return [row[0] for row in self._execute(conn, "put_back_unstarted", params)]

    def release_worker_tasks(
        self, conn, *, processor: str, worker: int, in_flight: Optional[int], error: str,
        outcome: RunOutcome = RunOutcome.LOST, charge: bool = True, in_flight_started: Optional[datetime] = None,
    ) -> List[ReleasedTask]:
        """Put back what a worker held; returns the in-flight task, if its run was recorded."""
        params = {"processor": processor, "worker": worker, "in_flight": in_flight, "error": error,
                  "outcome": outcome.value, "charge": charge, "in_flight_started": in_flight_started,
                  "max_failures": MAX_CONSECUTIVE_FAILURES}
        return [_released(row) for row in self._execute(conn, "release_worker_tasks", params)]

    # -- the application's statements -------------------------------------------------

    def enqueue(self, conn, calls: Sequence["EnqueueRow"], *, own_connection: bool = False) -> List[Tuple[int, str]]:
        """Insert the rows (less those queue_size skips); returns (id, task name) of each.
        `own_connection`: procqueue's own, where a single row's statement is prepared."""
        if len(calls) == 1 and calls[0].queue_size is None:
            return self._enqueue_one(conn, calls[0], prepared=own_connection)
        # One Python type per array: psycopg 3 refuses to adapt a list mixing int and float
        # (or int and an IntEnum), where psycopg2 writes whatever it is given.
        params = {
            "names": [c.task_name for c in calls],
            "args": [c.args_json for c in calls],
            "kwargs": [c.kwargs_json for c in calls],
            "queues": [c.queue for c in calls],
            "priorities": [int(c.priority) for c in calls],
            "run_ats": [c.run_at for c in calls],
            "max_attempts": [int(c.max_attempts) for c in calls],
            "timeouts": [float(c.timeout_seconds) for c in calls],
            "queue_sizes": [None if c.queue_size is None else int(c.queue_size) for c in calls],
        }
        return [(row[0], row[1]) for row in self._execute(conn, "enqueue", params)]

    def _enqueue_one(self, conn, call: "EnqueueRow", *, prepared: bool) -> List[Tuple[int, str]]:
        params = {"name": call.task_name, "args": call.args_json, "kwargs": call.kwargs_json, "queue": call.queue,
                  "priority": call.priority, "run_at": call.run_at, "max_attempts": call.max_attempts,
                  "timeout": call.timeout_seconds}
        execute = self._execute_prepared if prepared else self._execute
        return [(row[0], row[1]) for row in execute(conn, "enqueue_one", params)]

    # -- recurring tasks ---------------------------------------------------------------

    def register_recurring(
        self, conn, *, name: str, run_every: timedelta, first_run_at: Optional[datetime], timeout_seconds: float,
        args_json: str = "[]", kwargs_json: str = "{}",
    ) -> None:
        params = {"name": name, "run_every": run_every, "first_run_at": first_run_at, "timeout": timeout_seconds,
                  "args": args_json, "kwargs": kwargs_json}
        self._execute(conn, "register_recurring", params)

    def schedule_recurring(self, conn, names: Iterable[str]) -> List[ScheduledRun]:
        return [ScheduledRun(*row) for row in self._execute(conn, "schedule_recurring", {"names": list(names)})]

    def miss_expired_tasks(self, conn) -> List[ExpiredTask]:
        """End as missed the queued tasks whose time ran out."""
        return [ExpiredTask(*row) for row in self._execute(conn, "miss_expired_tasks")]

    def seconds_until_next_recurring(self, conn, names: Iterable[str]) -> Optional[float]:
        return self._execute(conn, "seconds_until_next_recurring", {"names": list(names)})[0][0]

    # -- retention ---------------------------------------------------------------------

    def delete_finished_tasks(self, conn, *, days: int, batch: int, include_failed: bool) -> int:
        name = "delete_finished_and_failed_tasks" if include_failed else "delete_finished_tasks"
        return self._rowcount(conn, name, {"days": days, "batch": batch})

    def delete_old_runs(self, conn, *, days: int, batch: int) -> int:
        return self._rowcount(conn, "delete_old_runs", {"days": days, "batch": batch})

    def _rowcount(self, conn, name: str, params: dict) -> int:
        with conn.cursor() as cur:
            cur.execute(self.text(name), params)
            return cur.rowcount

    # -- processors --------------------------------------------------------------------

    def processor_heartbeat(self, conn, *, processor: str, hostname: str, pid: int) -> None:
        self._execute(conn, "processor_heartbeat", {"id": processor, "hostname": hostname, "pid": pid})

    def rescue_dead_processors(
        self, conn, *, expiry_seconds: float, rescuer: str, max_losses: int
    ) -> List[ReleasedTask]:
        params = {"expiry": expiry_seconds, "rescuer": rescuer, "max_losses": max_losses}
        return [_released(row) for row in self._execute(conn, "rescue_dead_processors", params)]

    def deregister_processor(self, conn, processor: str) -> None:
        self._execute(conn, "deregister_processor", {"id": processor})

    # -- schema and connection set-up ----------------------------------------------------

    def lock_migrations(self, conn, key: int) -> None:
        self._execute(conn, "lock_migrations", {"key": key})

    def create_schema(self, conn) -> None:
        self._execute(conn, "create_schema")

    def use_schema(self, conn) -> None:
        self._execute(conn, "use_schema")

    def announce(self, conn) -> None:
        self._execute(conn, "announce", {"channel": self.channel})

    def listen(self, conn) -> None:
        self._execute(conn, "listen")

    def behind_a_pooler(self, conn) -> bool:
        """True when the server process answering is not the one libpq was told of when it
        connected: something in front (PgBouncer, in any pool mode) speaks for the server."""
        return self._execute(conn, "server_pid")[0][0] != conn.info.backend_pid

    # -- reading -----------------------------------------------------------------------

    def get_task(self, conn, task_id: int) -> Optional[TaskRecord]:
        rows = self._execute(conn, "get_task", {"id": task_id})
        if not rows:
            return None
        row = list(rows[0])
        row[2], row[3], row[7] = read_json(row[2]), read_json(row[3]), TaskState(row[7])
        return TaskRecord(*row)

    def get_runs(self, conn, task_id: int) -> List[RunRecord]:
        rows = self._execute(conn, "get_runs", {"id": task_id})
        return [RunRecord(*row[:6], RunOutcome(row[6]), *row[7:]) for row in rows]

    def queue_stats(self, conn, *, timeout_seconds: float, now: float) -> QueueStats:
        """Depth of every queue, taken at Unix time `now`; QueryCanceled past the timeout."""
        rows = self._execute(conn, "queue_stats", {"timeout_ms": str(int(timeout_seconds * 1000))})
        counts: Dict[str, dict] = {}
        for queue, state, due, later, oldest_age in rows:
            depth = counts.setdefault(queue, {})
            if state == "queued":
                depth.update(waiting=due, scheduled=later, oldest_waiting_age_seconds=oldest_age)
            else:
                depth[state] = due
        return QueueStats(checked_at=now, queues={queue: QueueDepth(**depth) for queue, depth in sorted(counts.items())})

    # -- operations (procqueue/admin.py) -------------------------------------------------

    def list_tasks(self, conn, *, states: Optional[Sequence[str]], name: Optional[str], queue: Optional[str],
                   since: Optional[datetime], until: Optional[datetime], limit: int) -> List[tuple]:
        return self._execute(conn, "list_tasks", {"states": list(states) if states else None, "name": name,
                                                  "queue": queue, "since": since, "until": until, "limit": limit})

    def retry_tasks(self, conn, *, ids: Optional[Sequence[int]], name: Optional[str], since: Optional[datetime],
                    by: str) -> List[int]:
        params = {"ids": list(ids) if ids is not None else None, "name": name, "since": since, "by": by,
                  "channel": self.channel}
        return [row[0] for row in self._execute(conn, "retry_tasks", params)]

    def cancel_tasks(self, conn, *, ids: Sequence[int], by: str,
                     states: Sequence[str] = ("queued", "running")) -> Dict[int, TaskState]:
        rows = self._execute(conn, "cancel_tasks", {"ids": list(ids), "by": by, "states": list(states)})
        return {task_id: TaskState(was) for task_id, was in rows}

    def tasks_to_stop(self, conn, *, processor: str, let_go: Sequence[int]) -> Dict[int, Tuple[int, float]]:
        """This processor's cancelled tasks still held, after letting go of `let_go`: task
        id -> (the worker slot that held it, seconds since it was cancelled)."""
        rows = self._execute(conn, "tasks_to_stop", {"processor": processor, "let_go": list(let_go)})
        return {task_id: (worker, age) for task_id, worker, age in rows}

    def let_go_of_dead_holders(self, conn) -> int:
        return self._rowcount(conn, "let_go_of_dead_holders", {})

    def count_purgeable(self, conn, *, states: Sequence[str], before: datetime) -> int:
        return self._execute(conn, "count_purgeable", {"states": list(states), "before": before})[0][0]

    def purge_tasks(self, conn, *, states: Sequence[str], before: datetime, batch: int) -> int:
        return self._execute(conn, "purge_tasks", {"states": list(states), "before": before, "batch": batch})[0][0]

    def delete_canary(self, conn, *, task_id: int, task_name: str) -> int:
        return self._execute(conn, "delete_canary", {"id": task_id, "name": task_name})[0][0]

    def recurring_schedules(self, conn) -> List[tuple]:
        return self._execute(conn, "recurring_schedules")

    def remove_recurring(self, conn, name: str, *, by: str) -> Optional[int]:
        """How many waiting runs were cancelled with the schedule; None: no such schedule."""
        rows = self._execute(conn, "remove_recurring", {"name": name, "by": by})
        return rows[0][0] if rows else None

    def enable_recurring(self, conn, name: str) -> Optional[bool]:
        """Whether the schedule had been disabled; None: no such schedule."""
        rows = self._execute(conn, "enable_recurring", {"name": name})
        return rows[0][0] if rows else None

    def procqueue_schemas(self, conn) -> List[str]:
        return [row[0] for row in self._execute(conn, "procqueue_schemas")]

    def schema_version(self, conn) -> int:
        if not self._execute(conn, "schema_exists", {"table": f"{self.schema}.schema_version"})[0][0]:
            return 0
        return self._execute(conn, "schema_version")[0][0]

    # -- the dashboard -------------------------------------------------------------------

    def dashboard_session(self, conn, *, timeout_seconds: float) -> None:
        self._execute(conn, "dashboard_session", {"timeout_ms": str(int(timeout_seconds * 1000))})

    def dashboard_processors(self, conn) -> List[ProcessorRecord]:
        return [ProcessorRecord(*row) for row in self._execute(conn, "dashboard_processors")]

    def dashboard_running(self, conn, *, limit: int = 500) -> List[HeldTask]:
        return [HeldTask(*row) for row in self._execute(conn, "dashboard_running", {"limit": limit})]


def _released(row: tuple) -> ReleasedTask:
    task_id, task_name, recurring, state, started, *rest = row
    outcome, disabled_after = (rest + [None, None])[:2]
    return ReleasedTask(task_id, task_name, recurring, TaskState(state), started,
                        RunOutcome(outcome) if outcome else RunOutcome.LOST, disabled_after)


@dataclass(frozen=True)
class EnqueueRow:
    """One task to insert, already validated, its arguments already JSON text."""

    task_name: str
    args_json: str
    kwargs_json: str
    queue: str
    priority: int
    run_at: Optional[datetime]
    max_attempts: int
    timeout_seconds: float
    queue_size: Optional[int]
