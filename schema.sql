-- procqueue schema, version 6.
--
-- The one source of truth for procqueue's tables. `procqueue migrate` applies it inside
-- one transaction with `search_path` set to the target Postgres schema (default
-- `procqueue`), so no name below is schema-qualified. Every statement is idempotent:
-- applying the file twice is harmless.
--
-- To apply it by hand:
--   psql "$DATABASE_URL" -c 'CREATE SCHEMA IF NOT EXISTS procqueue' \
--        -c 'SET search_path TO procqueue' -f schema.sql      (one session: use -1)

CREATE TABLE IF NOT EXISTS schema_version (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Each running processor (one supervisor and its workers) registers here and beats.
-- A task's lease names the processor that holds it, so a peer can tell a task held by a
-- dead host from one held by a slow but healthy worker.
CREATE TABLE IF NOT EXISTS processors (
    id           text PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS tasks (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_name       text NOT NULL,
    args            jsonb NOT NULL DEFAULT '[]'::jsonb,
    kwargs          jsonb NOT NULL DEFAULT '{}'::jsonb,
    queue           text NOT NULL DEFAULT 'default',
    priority        smallint NOT NULL DEFAULT 50,
    run_at          timestamptz NOT NULL DEFAULT now(),
    state           text NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'missed')),
    attempts        integer NOT NULL DEFAULT 0,
    max_attempts    integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    timeout_seconds double precision NOT NULL DEFAULT 60 CHECK (timeout_seconds > 0),
    -- The lease: which processor and worker slot hold the task, and since when.
    locked_by       text,
    locked_worker   integer,
    locked_at       timestamptz,
    last_error      text,
    -- Set for a run of a recurring task: the schedule slot it fills (see the index below).
    recurring_slot  timestamptz,
    -- A task not started by then never starts: it ends 'missed'. A recurring run's is the
    -- next slot, so runs never bunch up after an outage.
    expires_at      timestamptz,
    -- How often a rescue put it back from a dead processor.
    rescues         integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- When the current (or last) run started, as far as the database knows: written when
    -- its outcome is recorded, or while it runs (at once for a recurring run, after a
    -- moment for any other). NULL for a task that is only claimed, so a rescue can tell
    -- a task that had started from one that was merely waiting its turn in a batch.
    started_at      timestamptz,
    finished_at     timestamptz
);

-- Claiming walks this index in claim order and sees only claimable rows, so a claim
-- costs O(log n) however many finished rows the table holds.
CREATE INDEX IF NOT EXISTS tasks_claimable
    ON tasks (priority, run_at, id) WHERE state = 'queued';

-- queue_size checks count the waiting tasks of one name.
CREATE INDEX IF NOT EXISTS tasks_waiting_by_name
    ON tasks (task_name) WHERE state = 'queued';

-- Rescue finds the running tasks of a dead processor.
CREATE INDEX IF NOT EXISTS tasks_running_by_owner
    ON tasks (locked_by) WHERE state = 'running';

-- Retention clean-up deletes finished tasks oldest first.
CREATE INDEX IF NOT EXISTS tasks_finished
    ON tasks (finished_at) WHERE state IN ('succeeded', 'failed', 'cancelled', 'missed');

-- The last line of defence for "never twice for one slot": even if two processors
-- raced past the schedule's row lock, only one task row per recurring slot can exist.
CREATE UNIQUE INDEX IF NOT EXISTS tasks_one_per_recurring_slot
    ON tasks (task_name, recurring_slot) WHERE recurring_slot IS NOT NULL;

CREATE TABLE IF NOT EXISTS task_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id     bigint NOT NULL,
    task_name   text NOT NULL,
    attempt     integer NOT NULL,
    started_at  timestamptz,
    finished_at timestamptz NOT NULL DEFAULT now(),
    outcome     text NOT NULL
                CHECK (outcome IN ('succeeded', 'failed', 'timed_out', 'backoff', 'lost')),
    error       text,
    processor   text,
    worker      integer
);

CREATE INDEX IF NOT EXISTS task_runs_task_id ON task_runs (task_id);
CREATE INDEX IF NOT EXISTS task_runs_finished_at ON task_runs (finished_at);

CREATE TABLE IF NOT EXISTS recurring_tasks (
    task_name       text PRIMARY KEY,
    args            jsonb NOT NULL DEFAULT '[]'::jsonb,
    kwargs          jsonb NOT NULL DEFAULT '{}'::jsonb,
    run_every       interval NOT NULL CHECK (run_every > interval '0'),
    first_run_at    timestamptz NOT NULL,
    timeout_seconds double precision NOT NULL DEFAULT 1800 CHECK (timeout_seconds > 0),
    -- The next slot to fill. Whoever advances it (under its row lock) enqueues that slot.
    next_run_at     timestamptz NOT NULL,
    last_enqueued_at timestamptz,
    registered_at   timestamptz NOT NULL DEFAULT now(),
    -- Version 6 (added below for older databases): failed runs in a row, and when that
    -- disabled the schedule (NULL: enabled).
    consecutive_failures integer NOT NULL DEFAULT 0,
    disabled_at     timestamptz
);

CREATE INDEX IF NOT EXISTS recurring_tasks_next_run_at ON recurring_tasks (next_run_at);

-- Version 2: recurring tasks take arguments (Flagsmith's register_recurring_task(args=,
-- kwargs=)). A version-1 database gets the columns here; a new one has them already.
ALTER TABLE recurring_tasks ADD COLUMN IF NOT EXISTS args jsonb NOT NULL DEFAULT '[]'::jsonb;
ALTER TABLE recurring_tasks ADD COLUMN IF NOT EXISTS kwargs jsonb NOT NULL DEFAULT '{}'::jsonb;

-- Wake idle workers the moment work is enqueued. One notification per statement, not per
-- row, so a bulk enqueue of 10,000 tasks costs one NOTIFY; and none for a statement that
-- inserted nothing (the recurring scheduler's INSERT ... SELECT runs every second in
-- every worker and usually inserts nothing: notifying then would wake every worker of
-- every processor every second). The channel carries the schema name so processors on
-- different schemas of one database do not wake each other.
CREATE OR REPLACE FUNCTION notify_tasks_enqueued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted_tasks) THEN
        PERFORM pg_notify('procqueue_' || TG_TABLE_SCHEMA, '');
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS tasks_enqueued ON tasks;
CREATE TRIGGER tasks_enqueued
    AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS inserted_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION notify_tasks_enqueued();

-- Version 3: queue statistics (metrics, status, `procqueue stats`) count failed tasks by
-- queue every few seconds; without this index that would read every finished row.
CREATE INDEX IF NOT EXISTS tasks_failed_by_queue
    ON tasks (queue) WHERE state = 'failed';

-- Version 4: expiring tasks (a recurring run not started before the next slot is missed,
-- never run late), the 'missed' state, started_at written only once a run started, and
-- a count of rescues.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS expires_at timestamptz;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS rescues integer NOT NULL DEFAULT 0;
ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_state_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_state_check
    CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'missed'));
DROP INDEX IF EXISTS tasks_finished_at;  -- replaced by tasks_finished, which counts 'missed'

-- Queued tasks whose time ran out are found here (see miss_expired_tasks).
CREATE INDEX IF NOT EXISTS tasks_expiring
    ON tasks (expires_at) WHERE state = 'queued' AND expires_at IS NOT NULL;

-- (Version 4 made tasks_one_recurring_run_at_a_time here; version 5 replaces it below.)

-- Version 5: operators retry and cancel tasks (`procqueue tasks retry/cancel`, the
-- dashboard). Each such act is a run record naming who did it; a running task cancelled
-- keeps its lease until the processor holding it has stopped it, and that processor
-- finds it through this index.
ALTER TABLE task_runs ADD COLUMN IF NOT EXISTS actor text;
-- NOT VALID: the new check only widens the old one, so every existing row passes it, and
-- validating would scan the whole run history under a lock that stops every worker from
-- recording outcomes meanwhile.
ALTER TABLE task_runs DROP CONSTRAINT IF EXISTS task_runs_outcome_check;
ALTER TABLE task_runs ADD CONSTRAINT task_runs_outcome_check
    CHECK (outcome IN ('succeeded', 'failed', 'timed_out', 'backoff', 'lost', 'cancelled', 'retried')) NOT VALID;
CREATE INDEX IF NOT EXISTS tasks_cancelled_while_held
    ON tasks (locked_by) WHERE state = 'cancelled' AND locked_by IS NOT NULL;

-- Two runs of one recurring task never run at once, across every processor: a run is
-- marked started (started_at) before its function is called, and this index refuses a
-- second started run while the first is running, or was cancelled while running and is
-- still held (its worker may be running it until its processor has killed it).
-- (expires_at is set on every run the scheduler enqueues; it keeps runs enqueued before
-- version 4 out of the index.)
CREATE UNIQUE INDEX IF NOT EXISTS tasks_one_recurring_run_at_once
    ON tasks (task_name)
    WHERE recurring_slot IS NOT NULL AND expires_at IS NOT NULL AND started_at IS NOT NULL
      AND (state = 'running' OR (state = 'cancelled' AND locked_by IS NOT NULL));
DROP INDEX IF EXISTS tasks_one_recurring_run_at_a_time;

-- Version 6: a recurring schedule whose runs fail (raise or time out) four times in a row
-- is disabled, as Flagsmith's is: no slot is enqueued until an operator enables it again
-- (`procqueue recurring enable`, the dashboard); a run that succeeds resets the count.
-- Counted by the statement that records each run's outcome (queries.sql: complete).
-- Both columns have a constant default, so adding them rewrites nothing.
ALTER TABLE recurring_tasks ADD COLUMN IF NOT EXISTS consecutive_failures integer NOT NULL DEFAULT 0;
ALTER TABLE recurring_tasks ADD COLUMN IF NOT EXISTS disabled_at timestamptz;

INSERT INTO schema_version (version) VALUES (1), (2), (3), (4), (5), (6) ON CONFLICT (version) DO NOTHING;
