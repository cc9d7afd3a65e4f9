-- Every statement procqueue runs, by name. `{schema}` is the queue's Postgres schema,
-- composed as a quoted identifier (never formatted in as text); values are always
-- parameters. Each task-state change is one statement guarded by the state it expects.

-- name: claim
-- queued -> running for up to %(limit)s tasks, in claim order. SKIP LOCKED lets any number
-- of workers on any number of hosts claim at once without waiting on each other. A
-- claimed task has not started: started_at stays NULL until its run does (start_run,
-- complete), so a rescue puts back untouched what a dead worker only held. A task past
-- its expires_at is never claimed (miss_expired_tasks ends it).
WITH picked AS (
    SELECT id
    FROM {schema}.tasks
    WHERE state = 'queued'
      AND run_at <= now()
      AND (expires_at IS NULL OR expires_at > now())
      AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
    ORDER BY priority, run_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.tasks AS t
SET state = 'running',
    attempts = t.attempts + 1,
    locked_by = %(processor)s,
    locked_worker = %(worker)s,
    locked_at = now(),
    started_at = NULL
FROM picked
WHERE t.id = picked.id
RETURNING t.id, t.task_name, t.args, t.kwargs, t.queue, t.priority, t.run_at, t.attempts,
          t.max_attempts, t.timeout_seconds, t.recurring_slot, t.locked_at, t.rescues;

-- name: start_run
-- Tell the database a claimed task's run has started (still under the claim that holds
-- it), so that should its whole processor die, the rescue knows this task had started.
-- A recurring run is started this way before its function is called (%(started_at)s
-- NULL: the database's now()), and never starts again; it is refused (no row) once its
-- slot has passed (expires_at), and the unique index tasks_one_recurring_run_at_once
-- refuses it (unique violation) while another run of the same task is under way. Any
-- other task is marked by the worker's flush thread once it has run a moment.
UPDATE {schema}.tasks
SET started_at = coalesce(%(started_at)s::timestamptz, now())
WHERE id = %(id)s
  AND state = 'running'
  AND locked_by = %(processor)s
  AND locked_worker = %(worker)s
  AND locked_at = %(leased_at)s
  AND started_at IS NULL
  AND (expires_at IS NULL OR expires_at > now())
RETURNING started_at;

-- name: put_back
-- running -> queued for one claimed task this worker will not start now: untouched (its
-- attempt refunded, no run record), due again in %(delay)s seconds.
UPDATE {schema}.tasks
SET state = 'queued',
    attempts = attempts - 1,
    run_at = now() + %(delay)s * interval '1 second',
    started_at = NULL,
    locked_by = NULL,
    locked_worker = NULL,
    locked_at = NULL
WHERE id = %(id)s
  AND state = 'running'
  AND locked_by = %(processor)s
  AND locked_worker = %(worker)s
  AND locked_at = %(leased_at)s
RETURNING id;

-- name: put_back_unstarted
-- running -> queued for the tasks a worker claimed behind one that turned out slow:
-- untouched (attempt refunded, no run record), still due, so they keep their place in
-- claim order. Only those still under the claim that took them, and not started. The
-- NOTIFY (sent once per transaction, however many rows) wakes idle workers to take them.
WITH back AS (
    UPDATE {schema}.tasks AS t
    SET state = 'queued',
        attempts = t.attempts - 1,
        locked_by = NULL,
        locked_worker = NULL,
        locked_at = NULL
    FROM unnest(%(ids)s::bigint[], %(leases)s::timestamptz[]) AS l(id, leased_at)
    WHERE t.id = l.id
      AND t.state = 'running'
      AND t.locked_by = %(processor)s
      AND t.locked_worker = %(worker)s
      AND t.locked_at = l.leased_at
      AND t.started_at IS NULL
    RETURNING t.id
)
SELECT id, pg_notify(%(channel)s, '') FROM back;

-- name: complete
-- running -> succeeded / failed / queued (retry) / missed (a recurring run cut short by
-- its supervisor's death) for a batch of finished tasks, writing
-- each one's run record in the same statement. Only tasks still leased to this worker,
-- by the very claim that ran them, move: the claim's locked_at is its fencing token, so
-- a task rescued and claimed again since (even by this same worker slot) keeps its new
-- state, and an outcome of an older claim can never land on a newer one.
-- A recurring run's outcome also counts on its schedule, in this same statement, so no
-- crash can record the one without the other: a failed or timed_out run adds one to
-- consecutive_failures, a succeeded run resets it (other outcomes leave it, and so does a
-- run failed only because this processor does not know its name, task_unknown: an older
-- release's processor during a rolling deploy claimed a new schedule's run; that says
-- nothing about the task, and four such would otherwise disable a healthy schedule); at
-- %(max_failures)s the schedule is disabled (disabled_at), and the statement returns its
-- name once, to the worker that disabled it, which logs it. Disabling also ends the
-- schedule's runs still queued (`ended`; a run longer than the interval leaves the next
-- slot enqueued, which would otherwise run on the disabled schedule) as `missed`, without
-- a run record (nothing ran), as miss_expired_tasks ends a run that could not start; one
-- a worker already holds is left to it. A schedule already disabled is not counted on
-- at all (a run held or under way when it was disabled ends as it may): its count keeps
-- saying why it was disabled until an operator enables it, which resets it. No update is
-- lost between processors: runs of one schedule never overlap (tasks_one_recurring_run_at_once: the
-- next run cannot start until this statement's transaction has moved this one out of
-- 'running'), and whatever else writes the row (schedule_recurring, an operator's
-- enable) is serialised by the row lock taken in `counted`, whose FOR UPDATE reads the
-- latest committed version, not this statement's snapshot. A batch holds one run per
-- schedule (a recurring outcome is recorded the moment it ends), but `tally` counts
-- right for several too: the failures after the last success, or after the old count.
WITH outcome AS (
    SELECT *
    FROM unnest(%(ids)s::bigint[], %(states)s::text[], %(outcomes)s::text[],
                %(retry_in)s::float8[], %(retry_at)s::timestamptz[], %(errors)s::text[],
                %(started)s::timestamptz[], %(finished)s::timestamptz[], %(refunds)s::int[],
                %(leases)s::timestamptz[], %(unknown)s::bool[])
         AS o(id, state, outcome, retry_in, retry_at, error, started_at, finished_at, refund, leased_at,
              task_unknown)
), moved AS (
    UPDATE {schema}.tasks AS t
    SET state = o.state,
        attempts = t.attempts - o.refund,
        run_at = CASE WHEN o.state = 'queued'
                      THEN coalesce(o.retry_at, now() + o.retry_in * interval '1 second')
                      ELSE t.run_at END,
        last_error = o.error,
        started_at = o.started_at,
        locked_by = NULL,
        locked_worker = NULL,
        locked_at = NULL,
        finished_at = CASE WHEN o.state IN ('succeeded', 'failed', 'missed') THEN o.finished_at END
    FROM outcome AS o
    WHERE t.id = o.id
      AND t.state = 'running'
      AND t.locked_by = %(processor)s
      AND t.locked_worker = %(worker)s
      AND t.locked_at = o.leased_at
    RETURNING t.id, t.task_name, t.attempts + o.refund AS attempt, t.recurring_slot IS NOT NULL AS recurring
), recorded AS (
    INSERT INTO {schema}.task_runs
        (task_id, task_name, attempt, started_at, finished_at, outcome, error, processor, worker)
    SELECT m.id, m.task_name, m.attempt, o.started_at, o.finished_at, o.outcome, o.error,
           %(processor)s, %(worker)s
    FROM moved AS m
    JOIN outcome AS o ON o.id = m.id
    RETURNING task_id
), results AS (
    SELECT m.task_name, o.outcome = 'succeeded' AS succeeded, o.finished_at,
           max(o.finished_at) FILTER (WHERE o.outcome = 'succeeded') OVER (PARTITION BY m.task_name) AS last_success
    FROM moved AS m
    JOIN outcome AS o ON o.id = m.id
    WHERE m.recurring AND o.outcome IN ('succeeded', 'failed', 'timed_out') AND NOT o.task_unknown
), tally AS (
    SELECT task_name, bool_or(succeeded) AS reset,
           count(*) FILTER (WHERE NOT succeeded AND (last_success IS NULL OR finished_at > last_success)) AS failures
    FROM results
    GROUP BY task_name
), counted AS (
    SELECT r.task_name,
           CASE WHEN t.reset THEN 0 ELSE r.consecutive_failures END + t.failures AS failures,
           CASE WHEN t.reset THEN 0 ELSE r.consecutive_failures END + t.failures >= %(max_failures)s AS disables
    FROM {schema}.recurring_tasks AS r
    JOIN tally AS t ON t.task_name = r.task_name
    WHERE r.disabled_at IS NULL  -- rechecked on the latest version once the row lock is had
    FOR UPDATE OF r
), {count_schedule_failures}
SELECT task_id, NULL, NULL FROM recorded
UNION ALL
SELECT NULL, task_name, failures FROM schedules WHERE disables;

-- fragment: count_schedule_failures
-- The CTEs `complete` and `release_worker_tasks` share, after their own `counted` (one
-- row per recurring schedule whose runs they record: task_name, the new count of
-- failures in a row, whether it disables the schedule, its row locked): the schedule's
-- count written, and, when it is disabled, its runs still waiting ended `missed` (a run
-- queued before the disable would otherwise start, and reset the count of a schedule
-- that stays disabled).
schedules AS (
    UPDATE {schema}.recurring_tasks AS r
    SET consecutive_failures = c.failures,
        disabled_at = CASE WHEN c.disables THEN now() ELSE r.disabled_at END
    FROM counted AS c
    WHERE r.task_name = c.task_name
    RETURNING r.task_name, c.disables, c.failures
), ended AS (
    UPDATE {schema}.tasks AS t
    SET state = 'missed', finished_at = now(),
        last_error = 'not started: its recurring schedule was disabled (' || s.failures
                     || ' failures in a row) before it could start; no slot runs until an operator enables it'
    FROM schedules AS s
    WHERE s.disables AND t.task_name = s.task_name AND t.recurring_slot IS NOT NULL AND t.state = 'queued'
)

-- name: release_worker_tasks
-- running -> queued / failed / missed for every task a dead or stopped worker still held.
-- The task it was running (%(in_flight)s, started at %(in_flight_started)s) gets a run
-- with the cause (outcome 'lost', or 'timed_out' when it was killed for overrunning) and,
-- when %(charge)s, is charged the attempt (not when the processor killed it only to shut
-- down). A recurring run that had started (the one in flight, or one that had ended
-- but whose outcome was not yet written: its start is in the database) is never run
-- again: in flight and charged, it fails; else it is missed. Tasks it had claimed but
-- not started go back untouched: attempt refunded, no run record. A recurring run killed
-- past its timeout counts as a failure on its schedule, as in complete (which see: a
-- lost run does not count, a disabled schedule is not counted on, and disabling ends its
-- queued runs missed). Returns the tasks whose run it recorded, and for one whose
-- failure disabled its schedule, the schedule's count of failures.
WITH held AS (
    SELECT t.id,
           coalesce(t.id = %(in_flight)s, false) AS in_flight,
           coalesce(t.id = %(in_flight)s AND %(charge)s, false) AS charged,
           t.recurring_slot IS NOT NULL AND (coalesce(t.id = %(in_flight)s, false) OR t.started_at IS NOT NULL)
               AS recurring_run
    FROM {schema}.tasks AS t
    WHERE t.state = 'running'
      AND t.locked_by = %(processor)s
      AND t.locked_worker = %(worker)s
    FOR UPDATE
), released AS (
    UPDATE {schema}.tasks AS t
    SET state = CASE WHEN h.charged AND (h.recurring_run OR t.attempts >= t.max_attempts) THEN 'failed'
                     WHEN h.recurring_run THEN 'missed'
                     ELSE 'queued' END,
        attempts = CASE WHEN h.charged OR h.recurring_run THEN t.attempts ELSE t.attempts - 1 END,
        run_at = now(),
        last_error = CASE WHEN h.in_flight THEN %(error)s
                          WHEN h.recurring_run
                          THEN %(error)s || ' (after the run ended, before its outcome was recorded)'
                          ELSE t.last_error END,
        started_at = CASE WHEN h.in_flight OR h.recurring_run THEN coalesce(t.started_at, %(in_flight_started)s) END,
        locked_by = NULL,
        locked_worker = NULL,
        locked_at = NULL,
        finished_at = CASE WHEN h.recurring_run OR (h.charged AND t.attempts >= t.max_attempts) THEN now() END
    FROM held AS h
    WHERE t.id = h.id
    RETURNING t.id, t.task_name, t.attempts, t.started_at, t.state, t.recurring_slot, t.last_error, h.in_flight,
              h.in_flight OR h.recurring_run AS recorded, h.charged OR h.recurring_run AS counted,
              h.charged AND h.recurring_run AND %(outcome)s = 'timed_out' AS recurring_failure
), counted AS (
    SELECT s.task_name, s.consecutive_failures + 1 AS failures,
           s.consecutive_failures + 1 >= %(max_failures)s AS disables
    FROM {schema}.recurring_tasks AS s
    JOIN released AS r ON r.task_name = s.task_name
    WHERE r.recurring_failure AND s.disabled_at IS NULL
    FOR UPDATE OF s
), {count_schedule_failures}, recorded AS (
    INSERT INTO {schema}.task_runs
        (task_id, task_name, attempt, started_at, finished_at, outcome, error, processor, worker)
    SELECT r.id, r.task_name, r.attempts + CASE WHEN r.counted THEN 0 ELSE 1 END,
           r.started_at, now(), CASE WHEN r.in_flight THEN %(outcome)s ELSE 'lost' END, r.last_error,
           %(processor)s, %(worker)s
    FROM released AS r
    WHERE r.recorded
    RETURNING task_id
)
SELECT r.id, r.task_name, r.recurring_slot IS NOT NULL, r.state, true,
       CASE WHEN r.in_flight THEN %(outcome)s ELSE 'lost' END,
       CASE WHEN r.recurring_failure AND s.disables THEN s.failures END
FROM released AS r JOIN recorded ON recorded.task_id = r.id
LEFT JOIN schedules AS s ON s.task_name = r.task_name;

-- name: enqueue
-- Insert a batch of tasks in one round trip. A row whose task already has queue_size
-- tasks waiting is skipped (Flagsmith's queue_size). The count of waiting tasks cannot
-- see rows this same statement inserts, so each row is also numbered within its task
-- name in the batch (nth): the first queue_size - waiting of them are admitted, in call
-- order. The statement trigger NOTIFYs.
WITH batch AS (
    SELECT n.*, row_number() OVER (PARTITION BY n.task_name ORDER BY n.position) AS nth
    FROM unnest(%(names)s::text[], %(args)s::text[], %(kwargs)s::text[], %(queues)s::text[],
                %(priorities)s::smallint[], %(run_ats)s::timestamptz[], %(max_attempts)s::int[],
                %(timeouts)s::float8[], %(queue_sizes)s::int[])
         WITH ORDINALITY
         AS n(task_name, args, kwargs, queue, priority, run_at, max_attempts, timeout_seconds,
              queue_size, position)
)
INSERT INTO {schema}.tasks
    (task_name, args, kwargs, queue, priority, run_at, max_attempts, timeout_seconds)
SELECT b.task_name, b.args::jsonb, b.kwargs::jsonb, b.queue, b.priority,
       coalesce(b.run_at, now()), b.max_attempts, b.timeout_seconds
FROM batch AS b
WHERE b.queue_size IS NULL
   OR b.nth <= b.queue_size
              - (SELECT count(*)
                 FROM (SELECT 1 FROM {schema}.tasks AS w
                       WHERE w.task_name = b.task_name AND w.state = 'queued'
                       LIMIT b.queue_size) AS waiting)
ORDER BY b.position
RETURNING id, task_name;

-- name: enqueue_one
-- One task with no queue_size: `.delay()`'s common case. A plain INSERT, which Postgres
-- plans in a fraction of the batch statement's time (unnest, a window, a subquery: about
-- 0.7 ms to plan on every call, more than the insert and its commit together). The
-- statement trigger NOTIFYs, as for a batch.
INSERT INTO {schema}.tasks
    (task_name, args, kwargs, queue, priority, run_at, max_attempts, timeout_seconds)
VALUES (%(name)s, %(args)s::jsonb, %(kwargs)s::jsonb, %(queue)s, %(priority)s,
        coalesce(%(run_at)s, now()), %(max_attempts)s, %(timeout)s)
RETURNING id, task_name;

-- name: register_recurring
-- Upsert one recurring schedule. The next slot is the first one at or after now, counted
-- from the anchor; it is only recomputed when the schedule itself changed, so processors
-- starting one after another never reset or double a slot. A disabled schedule stays
-- disabled, with its count of failures (Flagsmith's update_or_create keeps is_disabled
-- too): a deploy is no fix; an operator enables it.
INSERT INTO {schema}.recurring_tasks
    (task_name, args, kwargs, run_every, first_run_at, timeout_seconds, next_run_at)
SELECT %(name)s, %(args)s::jsonb, %(kwargs)s::jsonb, %(run_every)s, anchor, %(timeout)s,
       anchor + %(run_every)s * greatest(0, ceil(extract(epoch FROM now() - anchor)
                                               / extract(epoch FROM %(run_every)s::interval)))
FROM (SELECT coalesce(%(first_run_at)s::timestamptz, now()) AS anchor) AS a
ON CONFLICT (task_name) DO UPDATE
SET next_run_at = CASE
        WHEN recurring_tasks.run_every = EXCLUDED.run_every
         AND (%(first_run_at)s::timestamptz IS NULL
              OR recurring_tasks.first_run_at = EXCLUDED.first_run_at)
        THEN recurring_tasks.next_run_at
        ELSE EXCLUDED.next_run_at END,
    first_run_at = CASE WHEN %(first_run_at)s::timestamptz IS NULL
                        THEN recurring_tasks.first_run_at ELSE EXCLUDED.first_run_at END,
    run_every = EXCLUDED.run_every,
    args = EXCLUDED.args,
    kwargs = EXCLUDED.kwargs,
    timeout_seconds = EXCLUDED.timeout_seconds,
    registered_at = now();

-- name: schedule_recurring
-- Enqueue the run of each due recurring schedule's current slot (the latest slot at or
-- before now) and advance the schedule to the slot after it. Slots that passed while no
-- processor ran are skipped, not run late (counted in the result); the run expires when
-- the next slot is due, so runs never bunch up after an outage. The row lock (SKIP
-- LOCKED) makes one processor win each slot; the unique index on (task_name,
-- recurring_slot) backs that up. A disabled schedule (it failed too often in a row, see
-- complete) enqueues nothing until an operator enables it again.
WITH due AS (
    SELECT task_name, run_every,
           floor(extract(epoch FROM now() - next_run_at) / extract(epoch FROM run_every))::bigint AS skipped
    FROM {schema}.recurring_tasks
    WHERE next_run_at <= now() AND task_name = ANY(%(names)s::text[]) AND disabled_at IS NULL
    FOR UPDATE SKIP LOCKED
), advanced AS (
    UPDATE {schema}.recurring_tasks AS r
    SET next_run_at = r.next_run_at + r.run_every * (due.skipped + 1),
        last_enqueued_at = now()
    FROM due
    WHERE r.task_name = due.task_name
    RETURNING r.task_name, r.args, r.kwargs, r.next_run_at - r.run_every AS slot, r.next_run_at AS next_slot,
              r.timeout_seconds, due.skipped
), inserted AS (
    INSERT INTO {schema}.tasks
        (task_name, args, kwargs, max_attempts, timeout_seconds, recurring_slot, expires_at)
    SELECT task_name, args, kwargs, 1, timeout_seconds, slot, next_slot FROM advanced
    ON CONFLICT (task_name, recurring_slot) WHERE recurring_slot IS NOT NULL DO NOTHING
    RETURNING id, task_name
)
SELECT i.id, a.task_name, a.slot, a.skipped
FROM advanced AS a LEFT JOIN inserted AS i ON i.task_name = a.task_name;

-- name: seconds_until_next_recurring
-- How long until the earliest schedule this processor runs is due (by the database's
-- clock, the one schedules are kept in): when a worker next needs to look.
SELECT extract(epoch FROM min(next_run_at) - now())::float8
FROM {schema}.recurring_tasks WHERE task_name = ANY(%(names)s::text[]) AND disabled_at IS NULL;

-- name: delete_finished_tasks
-- Retention: one batch of tasks finished before the cut-off, oldest first, failed ones
-- excepted: they are the record of what went wrong, kept until an operator purges them
-- (or TASK_DELETE_INCLUDE_FAILED_TASKS: delete_finished_and_failed_tasks; two statements,
-- so that each one's states are constants the planner sees). The outer WHERE repeats the
-- inner one: a row retried (or cancelled while held) by another transaction while this
-- one waited for its lock is re-checked there, and kept; the subquery alone would delete
-- it. A cancelled task still held is its processor's to let go.
DELETE FROM {schema}.tasks
WHERE id IN (SELECT id FROM {schema}.tasks
             WHERE state IN ('succeeded', 'cancelled', 'missed')
               AND finished_at < now() - %(days)s * interval '1 day'
               AND locked_by IS NULL
             ORDER BY finished_at
             LIMIT %(batch)s)
  AND state IN ('succeeded', 'cancelled', 'missed')
  AND finished_at < now() - %(days)s * interval '1 day'
  AND locked_by IS NULL;

-- name: delete_finished_and_failed_tasks
-- delete_finished_tasks with TASK_DELETE_INCLUDE_FAILED_TASKS: failed tasks too (the
-- index tasks_finished holds every finished state).
DELETE FROM {schema}.tasks
WHERE id IN (SELECT id FROM {schema}.tasks
             WHERE state IN ('succeeded', 'failed', 'cancelled', 'missed')
               AND finished_at < now() - %(days)s * interval '1 day'
               AND locked_by IS NULL
             ORDER BY finished_at
             LIMIT %(batch)s)
  AND state IN ('succeeded', 'failed', 'cancelled', 'missed')
  AND finished_at < now() - %(days)s * interval '1 day'
  AND locked_by IS NULL;

-- name: delete_old_runs
-- Retention: one batch of run records older than the cut-off, whatever their task (a
-- failed task kept keeps its last error and traceback in its own row). Filtering on the
-- task's state here would walk past every kept failed task's runs in every batch: they
-- sort first and only grow.
DELETE FROM {schema}.task_runs
WHERE id IN (SELECT id FROM {schema}.task_runs
             WHERE finished_at < now() - %(days)s * interval '1 day'
             ORDER BY finished_at
             LIMIT %(batch)s);

-- name: processor_heartbeat
-- Register, or prove this processor alive. An upsert, so a processor whose row a peer
-- removed (it was silent too long, say through a network partition) comes back.
INSERT INTO {schema}.processors (id, hostname, pid) VALUES (%(id)s, %(hostname)s, %(pid)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now();

-- name: rescue_dead_processors
-- Put back the tasks of processors silent for %(expiry)s seconds (their pod was deleted,
-- their node died), and of leases naming no processor at all. Rescue goes by the owner's
-- death, never by how long a task has run. The DELETE of a dead processor's row is the
-- claim on rescuing it: a second rescuer waits on that row, then finds it gone, so two
-- rescuers never both win; the task UPDATE re-checks that the task is still running
-- under that owner.
-- A task only claimed (started_at NULL: it was waiting its turn in a batch) goes back
-- untouched: attempt refunded, no run record, however often that happens; only counted
-- in `rescues`, so that its next run is marked started before it begins (a task that
-- takes its node down within moments of starting would otherwise never be seen to). A task that
-- had started gets a 'lost' run and goes back without losing an attempt (its host died,
-- not it), unless it was lost with its processor %(max_losses)s times: then it fails, as
-- it may be what kills them. A recurring run that had started never runs again: missed.
WITH dead AS (
    DELETE FROM {schema}.processors
    WHERE heartbeat_at < now() - %(expiry)s * interval '1 second'
    RETURNING id
), orphaned AS (
    SELECT t.id, t.locked_by,
           t.started_at IS NOT NULL AS started,
           t.started_at IS NOT NULL AND t.recurring_slot IS NOT NULL AS recurring_run,
           (SELECT count(*) FROM {schema}.task_runs AS r WHERE r.task_id = t.id AND r.outcome = 'lost')
               + CASE WHEN t.started_at IS NOT NULL THEN 1 ELSE 0 END AS losses
    FROM {schema}.tasks AS t
    WHERE t.state = 'running'
      AND (t.locked_by IN (SELECT id FROM dead)
           OR (t.locked_at < now() - %(expiry)s * interval '1 second'
               AND NOT EXISTS (SELECT 1 FROM {schema}.processors AS p WHERE p.id = t.locked_by)))
    FOR UPDATE SKIP LOCKED
), rescued AS (
    UPDATE {schema}.tasks AS t
    SET state = CASE WHEN o.recurring_run THEN 'missed'
                     WHEN o.started AND o.losses >= %(max_losses)s THEN 'failed'
                     ELSE 'queued' END,
        attempts = CASE WHEN o.recurring_run THEN t.attempts ELSE t.attempts - 1 END,
        rescues = t.rescues + 1,
        run_at = now(),
        last_error = CASE WHEN NOT o.started THEN t.last_error
                          ELSE 'processor ' || t.locked_by || ' stopped heartbeating; task rescued by '
                               || %(rescuer)s
                               || CASE WHEN o.recurring_run
                                       THEN ' (a recurring run is not run again: the next slot is its retry)'
                                       WHEN o.losses >= %(max_losses)s
                                       THEN ' (lost with its processor ' || o.losses || ' times: failed)'
                                       ELSE '' END
                     END,
        started_at = CASE WHEN o.started THEN t.started_at END,
        locked_by = NULL,
        locked_worker = NULL,
        locked_at = NULL,
        finished_at = CASE WHEN o.recurring_run OR (o.started AND o.losses >= %(max_losses)s) THEN now() END
    FROM orphaned AS o
    WHERE t.id = o.id AND t.state = 'running' AND t.locked_by = o.locked_by
    RETURNING t.id, t.task_name, t.attempts, t.started_at, t.last_error, o.locked_by, t.state,
              t.recurring_slot, o.started, o.recurring_run
), recorded AS (
    INSERT INTO {schema}.task_runs
        (task_id, task_name, attempt, started_at, finished_at, outcome, error, processor, worker)
    SELECT r.id, r.task_name, r.attempts + CASE WHEN r.recurring_run THEN 0 ELSE 1 END, r.started_at, now(),
           'lost', r.last_error, r.locked_by, NULL
    FROM rescued AS r
    WHERE r.started
    RETURNING task_id
)
SELECT r.id, r.task_name, r.recurring_slot IS NOT NULL, r.state, r.started
FROM rescued AS r;

-- name: miss_expired_tasks
-- queued -> missed for tasks whose expires_at has passed before they could start (a
-- recurring run whose next slot is due: the next slot runs instead, on time). No run
-- record: nothing ran.
UPDATE {schema}.tasks
SET state = 'missed',
    finished_at = now(),
    last_error = 'not started before ' || to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
                 || CASE WHEN recurring_slot IS NOT NULL
                         THEN ', when the next slot of its recurring schedule was due; that slot runs instead'
                         ELSE ', when it expired' END
WHERE state = 'queued' AND expires_at <= now()
RETURNING id, task_name, recurring_slot IS NOT NULL;

-- name: deregister_processor
DELETE FROM {schema}.processors WHERE id = %(id)s;

-- name: get_task
-- The arguments as text, parsed by procqueue (db.read_json): the same on every driver,
-- also on a Django connection, whose drivers are set to hand jsonb over as text.
SELECT id, task_name, args::text, kwargs::text, queue, priority, run_at, state, attempts, max_attempts,
       timeout_seconds, locked_by, locked_worker, locked_at, last_error, recurring_slot,
       created_at, started_at, finished_at, expires_at
FROM {schema}.tasks WHERE id = %(id)s;

-- name: get_runs
SELECT id, task_id, task_name, attempt, started_at, finished_at, outcome, error, processor, worker, actor
FROM {schema}.task_runs WHERE task_id = %(id)s ORDER BY id;

-- name: schema_version
SELECT coalesce(max(version), 0) FROM {schema}.schema_version;

-- name: schema_exists
SELECT to_regclass(%(table)s) IS NOT NULL;

-- name: lock_migrations
-- Serialises concurrent `migrate` runs on one schema (every replica migrates at start);
-- released when the migrating transaction ends.
SELECT pg_advisory_xact_lock(%(key)s);

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS {schema};

-- name: use_schema
-- schema.sql names no schema: it is applied with this search_path, in one transaction.
SET LOCAL search_path TO {schema};

-- name: announce
-- Wake the idle workers of every processor: a worker's unprompted look found more work
-- than one claim takes.
SELECT pg_notify(%(channel)s, '');

-- name: listen
-- The channel the tasks_enqueued trigger notifies: "procqueue_<schema>".
LISTEN {channel};

-- name: server_pid
-- The server process answering: a pooler in front answers from one the client was not
-- told of at connect time.
SELECT pg_backend_pid();

-- name: queue_stats
-- Queue depth by queue and state, and how long the oldest due task has waited: what
-- /metrics, /monitoring, the status file and `procqueue stats` report. Each branch
-- matches one partial index's predicate (claimable, running, failed), so the statement
-- never reads the finished rows that make up most of the table. The time limit keeps a
-- vast backlog from stalling the supervisor's loop, which also kills stuck workers: a
-- skipped refresh is better than a late kill. It is local to the transaction (and
-- outlives the savepoint the count runs in), so the count is the round's last statement.
SELECT set_config('statement_timeout', %(timeout_ms)s, true);
SELECT queue, 'queued' AS state,
       count(*) FILTER (WHERE run_at <= now()) AS due,
       count(*) FILTER (WHERE run_at > now()) AS later,
       extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now()))::float8 AS oldest_due_age
FROM {schema}.tasks WHERE state = 'queued' GROUP BY queue
UNION ALL
SELECT queue, 'running', count(*), 0, NULL FROM {schema}.tasks WHERE state = 'running' GROUP BY queue
UNION ALL
SELECT queue, 'failed', count(*), 0, NULL FROM {schema}.tasks WHERE state = 'failed' GROUP BY queue;

-- Operations: what `procqueue tasks ...`, `procqueue purge`, `procqueue recurring ...`
-- and the dashboard do (procqueue/admin.py).

-- name: list_tasks
-- Tasks newest first, filtered. "When" is when the task finished, or for one that has not,
-- when it was enqueued: what an operator means by "failed since the deploy".
SELECT id, task_name, queue, state, attempts, max_attempts, run_at, created_at, finished_at, last_error
FROM {schema}.tasks
WHERE (%(states)s::text[] IS NULL OR state = ANY(%(states)s::text[]))
  AND (%(name)s::text IS NULL OR task_name = %(name)s::text)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(since)s::timestamptz IS NULL OR coalesce(finished_at, created_at) >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR coalesce(finished_at, created_at) < %(until)s::timestamptz)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: retry_tasks
-- failed / cancelled / missed -> queued, due now, with its attempts reset, for the tasks
-- named by id (%(ids)s) or, with %(ids)s NULL, every failed task matching the filters. A
-- recurring run is never retried (its slot ran or passed; the next slot runs on
-- schedule), nor a cancelled task its processor may still be stopping: that one holds
-- the lease until it has seen no worker run it (tasks_to_stop), unless it is gone from
-- `processors` (dead, and rescued). Each retry is a run record naming %(by)s, and the
-- NOTIFY wakes idle workers to take them.
WITH target AS (
    SELECT id, task_name, attempts
    FROM {schema}.tasks
    WHERE CASE WHEN %(ids)s::bigint[] IS NOT NULL
               THEN id = ANY(%(ids)s::bigint[]) AND state IN ('failed', 'cancelled', 'missed')
               ELSE state = 'failed'
                    AND (%(name)s::text IS NULL OR task_name = %(name)s::text)
                    AND (%(since)s::timestamptz IS NULL OR finished_at >= %(since)s::timestamptz) END
      AND recurring_slot IS NULL
      AND (locked_by IS NULL OR NOT EXISTS (SELECT 1 FROM {schema}.processors AS p WHERE p.id = locked_by))
    FOR UPDATE
), retried AS (
    UPDATE {schema}.tasks AS t
    SET state = 'queued', attempts = 0, run_at = now(), started_at = NULL, finished_at = NULL,
        expires_at = NULL, locked_by = NULL, locked_worker = NULL, locked_at = NULL
    FROM target
    WHERE t.id = target.id
    RETURNING t.id
), recorded AS (
    INSERT INTO {schema}.task_runs (task_id, task_name, attempt, finished_at, outcome, actor)
    SELECT id, task_name, attempts, now(), 'retried', %(by)s FROM target
)
SELECT id, pg_notify(%(channel)s, '') FROM retried;

-- name: cancel_tasks
-- queued / running -> cancelled, for those of %(states)s (the Python API's cancel takes
-- only queued tasks). A queued task never starts. A running one keeps its lease
-- (locked_by, locked_worker, locked_at): its processor finds it by that (tasks_to_stop)
-- and kills the worker running it, as it would one that overran its timeout; meanwhile
-- every outcome its worker might still write is refused, since those expect 'running'.
-- Each cancel is a run record naming %(by)s. Returns each cancelled task's former state.
WITH target AS (
    SELECT id, task_name, state AS was, attempts, started_at
    FROM {schema}.tasks
    WHERE id = ANY(%(ids)s::bigint[]) AND state IN ('queued', 'running') AND state = ANY(%(states)s::text[])
    FOR UPDATE
), cancelled AS (
    UPDATE {schema}.tasks AS t
    SET state = 'cancelled', finished_at = now()
    FROM target
    WHERE t.id = target.id
    RETURNING t.id
), recorded AS (
    INSERT INTO {schema}.task_runs (task_id, task_name, attempt, started_at, finished_at, outcome, actor)
    SELECT id, task_name, attempts, started_at, now(), 'cancelled', %(by)s FROM target
)
SELECT target.id, target.was FROM target JOIN cancelled ON cancelled.id = target.id;

-- name: tasks_to_stop
-- The tasks this processor's workers held when they were cancelled: the supervisor kills
-- the worker it sees running one. Those it has found no worker running, for long enough
-- after the cancel that none can still start it (%(let_go)s), are let go: their lease
-- cleared, so they may be retried. Each with how long ago it was cancelled. (The SELECT
-- sees the rows as they were before the UPDATE, hence its own test of %(let_go)s.)
WITH let_go AS (
    UPDATE {schema}.tasks
    SET locked_by = NULL, locked_worker = NULL, locked_at = NULL
    WHERE state = 'cancelled' AND locked_by = %(processor)s AND id = ANY(%(let_go)s::bigint[])
)
SELECT id, locked_worker, extract(epoch FROM now() - finished_at)::float8
FROM {schema}.tasks
WHERE state = 'cancelled' AND locked_by = %(processor)s AND id <> ALL(%(let_go)s::bigint[]);

-- name: let_go_of_dead_holders
-- Cancelled tasks held by processors no longer registered (dead, and rescued): nobody
-- is left to stop them or let them go.
UPDATE {schema}.tasks
SET locked_by = NULL, locked_worker = NULL, locked_at = NULL
WHERE state = 'cancelled' AND locked_by IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM {schema}.processors AS p WHERE p.id = locked_by);

-- name: count_purgeable
SELECT count(*)
FROM {schema}.tasks
WHERE state = ANY(%(states)s::text[]) AND finished_at < %(before)s::timestamptz AND locked_by IS NULL;

-- name: purge_tasks
-- One batch of finished tasks (of %(states)s) that finished before %(before)s, oldest
-- first, with their run records. Batches keep each transaction short: the rows locked
-- and the WAL written at once stay bounded whatever the backlog. The outer WHERE repeats
-- the inner one (see delete_finished_tasks): a task retried meanwhile is kept. A task
-- cancelled while it ran is kept until its processor lets it go.
WITH gone AS (
    DELETE FROM {schema}.tasks
    WHERE id IN (SELECT id FROM {schema}.tasks
                 WHERE state = ANY(%(states)s::text[]) AND finished_at < %(before)s::timestamptz
                   AND locked_by IS NULL
                 ORDER BY finished_at
                 LIMIT %(batch)s)
      AND state = ANY(%(states)s::text[]) AND finished_at < %(before)s::timestamptz AND locked_by IS NULL
    RETURNING id
), runs AS (
    DELETE FROM {schema}.task_runs WHERE task_id IN (SELECT id FROM gone)
)
SELECT count(*) FROM gone;

-- name: recurring_schedules
-- Each schedule with its latest run (by slot; the unique index on (task_name,
-- recurring_slot) finds it), and whether it is disabled.
SELECT r.task_name, r.run_every, r.next_run_at, r.timeout_seconds,
       last.id, last.state, last.started_at, last.finished_at, r.consecutive_failures, r.disabled_at
FROM {schema}.recurring_tasks AS r
LEFT JOIN LATERAL (
    SELECT t.id, t.state, t.started_at, t.finished_at
    FROM {schema}.tasks AS t
    WHERE t.task_name = r.task_name AND t.recurring_slot IS NOT NULL
    ORDER BY t.recurring_slot DESC
    LIMIT 1
) AS last ON true
ORDER BY r.task_name;

-- name: remove_recurring
-- Delete a schedule and cancel its runs still waiting, each cancel a run record naming
-- %(by)s. Returns how many were cancelled, or no row when there is no such schedule.
WITH schedule AS (
    DELETE FROM {schema}.recurring_tasks WHERE task_name = %(name)s RETURNING task_name
), waiting AS (
    UPDATE {schema}.tasks AS t
    SET state = 'cancelled', finished_at = now()
    FROM schedule
    WHERE t.task_name = schedule.task_name AND t.recurring_slot IS NOT NULL AND t.state = 'queued'
    RETURNING t.id, t.task_name, t.attempts
), recorded AS (
    INSERT INTO {schema}.task_runs (task_id, task_name, attempt, finished_at, outcome, actor)
    SELECT id, task_name, attempts, now(), 'cancelled', %(by)s FROM waiting
)
SELECT (SELECT count(*) FROM waiting) FROM schedule;

-- name: enable_recurring
-- Enable a schedule again (disabled when its runs failed too often in a row; see
-- complete), its count of failures back to 0. A disabled schedule's next slot has
-- usually passed: it moves to the latest slot that has begun, so the schedule runs now,
-- as Flagsmith's re-enabled task does, and then on its grid, rather than counting every
-- slot of its disabled time as missed. Returns whether it was disabled; no row when
-- there is no such schedule. The row lock orders it with any run being recorded.
WITH schedule AS (
    SELECT task_name, disabled_at IS NOT NULL AS was_disabled
    FROM {schema}.recurring_tasks WHERE task_name = %(name)s
    FOR UPDATE
)
UPDATE {schema}.recurring_tasks AS r
SET consecutive_failures = 0,
    disabled_at = NULL,
    next_run_at = CASE WHEN s.was_disabled AND r.next_run_at < now()
                       THEN r.next_run_at + r.run_every
                            * floor(extract(epoch FROM now() - r.next_run_at) / extract(epoch FROM r.run_every))::bigint
                       ELSE r.next_run_at END
FROM schedule AS s
WHERE r.task_name = s.task_name
RETURNING s.was_disabled;

-- name: procqueue_schemas
-- The schemas of this database that hold a procqueue queue (for "did you mean"). From
-- the catalog, which every role may read (to_regclass on a schema it may not use, such
-- as pg_toast, raises an error instead).
SELECT n.nspname
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relname IN ('schema_version', 'tasks', 'task_runs') AND c.relkind IN ('r', 'p')
GROUP BY n.nspname
HAVING count(DISTINCT c.relname) = 3
ORDER BY 1;

-- dashboard: what the web dashboard reads besides procqueue.admin's statements.

-- name: dashboard_session
-- The dashboard's connection: no page may wait on the database longer than this.
SELECT set_config('statement_timeout', %(timeout_ms)s, false);


-- name: dashboard_processors
SELECT id, hostname, pid, started_at, heartbeat_at FROM {schema}.processors ORDER BY hostname, started_at, id;

-- name: dashboard_running
-- What every processor's workers hold, on every host (tasks_running_by_owner).
SELECT id, task_name, queue, locked_by, locked_worker, locked_at, started_at
FROM {schema}.tasks WHERE state = 'running'
ORDER BY locked_by, locked_worker, id
LIMIT %(limit)s;

-- name: delete_canary
-- The health check's own task row and its runs, once it has its answer: a queued one not
-- yet claimed, or one finished. One that a worker holds is left to finish; retention
-- takes it later.
WITH gone AS (
    DELETE FROM {schema}.tasks
    WHERE id = %(id)s AND task_name = %(name)s AND locked_by IS NULL AND state <> 'running'
    RETURNING id
), runs AS (
    DELETE FROM {schema}.task_runs WHERE task_id IN (SELECT id FROM gone)
)
SELECT count(*) FROM gone;
