-- The job table of the SQLite background worker: the only place it is defined.
--
-- The worker applies this file at start (and Queue at its first use, `worker
-- migrate` on demand).  Each "-- version N" section runs once, in order, inside
-- one transaction, and the table worker_schema records the last section
-- applied (PRAGMA user_version is the app's: the worker never reads or writes
-- it).  Sections add tables, columns, indexes and triggers, or drop an index
-- the worker no longer reads; never a column, so a database written by an older
-- worker keeps working.  Never edit a released section.  A table, index or
-- trigger dropped by hand is re-created when a worker starts (apply_schema).
--
-- One row per invocation of a job.  A retry or the next run of a cron job is a
-- NEW row whose rescheduled_from_job points back, so every attempt keeps its
-- own result or error.  All times are integer Unix epoch milliseconds (UTC),
-- durations are integer milliseconds.  Every column but `type` has a default
-- that works on SQLite 3.37+, so another program can insert just (type, data).
--
-- status and its transitions:
--   pending   -> running    claimed by a worker (owner, lease_until set)
--   running   -> succeeded  the job returned; its return value is in `result`
--   running   -> failed     it raised, timed out, or its worker's lease expired;
--                           message and traceback in `error`; a retry row may follow
--   running   -> pending    given back by a worker shutting down before it finished
--   pending   -> cancelled  cancelled, or replaced by a newer job with the same tag
--   running   -> cancelled  asked to cancel while it ran (`worker cancel ID`, since version
--                           8: cancel_requested, _by); or it snoozed (raised worker.Snooze):
--                           a new pending row of its chain follows it

-- version 1
CREATE TABLE IF NOT EXISTS worker_jobs (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after pruning
    type                 TEXT    NOT NULL,                   -- name of a registered job
    data                 TEXT    NOT NULL DEFAULT '{}'       -- JSON object: the job's keyword arguments
                         CHECK (json_valid(data) AND json_type(data) = 'object'),
    status               TEXT    NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    queue                TEXT    NOT NULL DEFAULT 'default',
    priority             INTEGER NOT NULL DEFAULT 0,         -- higher runs first among due jobs
    due                  INTEGER NOT NULL                    -- not run before this time
                         DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    tag                  TEXT,                               -- at most one pending row per tag
    attempt              INTEGER NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    cron_schedule        TEXT,                               -- set on rows of a recurring job
    rescheduled_from_job INTEGER,                            -- the row this retry / cron run came from
    started              INTEGER,
    finished             INTEGER,
    result               TEXT CHECK (result IS NULL OR json_valid(result)),
    error                TEXT,                               -- message and traceback of a failure

    -- Engine bookkeeping; free to grow in later versions.
    created_at           INTEGER NOT NULL
                         DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    worker               TEXT,                               -- "host:pid" of the worker that ran it
    owner                TEXT,                               -- claim token: fences every write that ends the job
    lease_until          INTEGER,                            -- a running row past this is rescued
    deaths               INTEGER NOT NULL DEFAULT 0,         -- worker deaths so far in this chain
    cron_timezone        TEXT,                               -- of cron_schedule; NULL means UTC
    cron_slot            INTEGER,                            -- the cron slot this run (and its retries) is for
    max_attempts         INTEGER CHECK (max_attempts IS NULL OR max_attempts >= 1),
    retry_delay_ms       INTEGER CHECK (retry_delay_ms IS NULL OR retry_delay_ms >= 0),
    backoff              REAL    CHECK (backoff IS NULL OR backoff >= 1),
    timeout_ms           INTEGER CHECK (timeout_ms IS NULL OR timeout_ms > 0),
    keep_ms              INTEGER CHECK (keep_ms IS NULL OR keep_ms >= 0),  -- retention after it ends
    remove_at            INTEGER,                            -- a finished row may be deleted after this
    persistent           INTEGER NOT NULL DEFAULT 0 CHECK (persistent IN (0, 1))  -- never removed
) STRICT;

-- Shaped like the claim: due pending rows, highest priority first, oldest first.
-- Partial, so its size follows the backlog, not the history.
CREATE INDEX IF NOT EXISTS worker_jobs_claim
    ON worker_jobs (priority DESC, due) WHERE status = 'pending';

-- Pending rows whose earlier attempt died with its worker: an idle worker runs
-- such a job alone, so a job that kills its process takes no other job with it.
CREATE INDEX IF NOT EXISTS worker_jobs_suspect
    ON worker_jobs (priority DESC, due) WHERE status = 'pending' AND deaths > 0;

-- When is the next pending row due (how long an idle worker may sleep).
CREATE INDEX IF NOT EXISTS worker_jobs_next_due
    ON worker_jobs (due) WHERE status = 'pending';

-- Rescue of running rows whose worker stopped renewing the lease.
CREATE INDEX IF NOT EXISTS worker_jobs_lease
    ON worker_jobs (lease_until) WHERE status = 'running';

-- At most one pending row per tag, enforced for every writer.
CREATE UNIQUE INDEX IF NOT EXISTS worker_jobs_pending_tag
    ON worker_jobs (tag) WHERE status = 'pending' AND tag IS NOT NULL;

-- The last slot a recurring schedule (its tag) was given, so a new pending row
-- never repeats a slot, even with the clock stepped back.
CREATE INDEX IF NOT EXISTS worker_jobs_tag_slot
    ON worker_jobs (tag, cron_slot) WHERE tag IS NOT NULL;

-- Retention: finished rows whose time is up.
CREATE INDEX IF NOT EXISTS worker_jobs_remove_at
    ON worker_jobs (remove_at) WHERE remove_at IS NOT NULL;

-- Finished in the last hour, for `worker status` without a full scan.
CREATE INDEX IF NOT EXISTS worker_jobs_finished
    ON worker_jobs (finished) WHERE finished IS NOT NULL;

-- Following a chain of retries / cron runs forward.
CREATE INDEX IF NOT EXISTS worker_jobs_chain
    ON worker_jobs (rescheduled_from_job) WHERE rescheduled_from_job IS NOT NULL;

-- One row per live worker process: written at start, refreshed by its
-- heartbeat, deleted on a clean exit.  A row whose last_seen is older than the
-- lease belongs to a process that died; `worker status` shows it as stale.
CREATE TABLE IF NOT EXISTS worker_processes (
    id          TEXT    PRIMARY KEY,   -- the worker's owner token (worker_jobs.owner)
    host        TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    started     INTEGER NOT NULL,      -- epoch ms
    last_seen   INTEGER NOT NULL,      -- epoch ms of its last heartbeat
    lease_ms    INTEGER NOT NULL,      -- its lease: last_seen older than this is stale
    concurrency INTEGER NOT NULL,
    running     INTEGER NOT NULL DEFAULT 0,
    queues      TEXT,                  -- comma-separated, NULL for all
    version     TEXT    NOT NULL
) STRICT;

-- version 2

-- The worker finds the earliest due time of the pending rows with one seek per
-- priority level down worker_jobs_claim (see NEXT_DUE_SQL in worker.py), so
-- this second index of every pending row was only a cost: one more B-tree
-- entry for each enqueue to insert and each claim to delete.  Measured:
-- 13-24 % more jobs/s at concurrency 1 without it.
DROP INDEX IF EXISTS worker_jobs_next_due;

-- version 3

-- How many jobs finished in each minute, by queue and outcome: `worker status`
-- and the dashboard sum the last hour's 60 minutes here instead of counting
-- every row that hour finished (at 1,000 jobs/s, 3.6 million index entries a
-- look).  Written in the same transaction as the rows it counts, by workers
-- (succeeded, failed, rescued) and Queue.cancel (cancelled); rows that other
-- programs finish themselves are not counted.  Kept for a day.
CREATE TABLE IF NOT EXISTS worker_finished_per_minute (
    minute  INTEGER NOT NULL,  -- epoch ms of the minute's start (UTC)
    queue   TEXT    NOT NULL,
    status  TEXT    NOT NULL CHECK (status IN ('succeeded', 'failed', 'cancelled')),
    count   INTEGER NOT NULL,
    PRIMARY KEY (minute, queue, status)
) STRICT, WITHOUT ROWID;

-- The rows finished before this version, so the last hour's counts stay whole.
INSERT INTO worker_finished_per_minute (minute, queue, status, count)
SELECT finished - finished % 60000, queue, status, count(*) FROM worker_jobs
 WHERE finished IS NOT NULL AND status IN ('succeeded', 'failed', 'cancelled')
 GROUP BY 1, 2, 3;

-- version 4

-- The worker's own schema version, one row.  Up to version 3 it was kept in
-- PRAGMA user_version, which belongs to the app whose file this may be; a file
-- of those versions is recognised by its tables (worker.installed_schema_version).
CREATE TABLE IF NOT EXISTS worker_schema (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  INTEGER NOT NULL
) STRICT;

-- version 5

-- The job types each worker process has registered, as a JSON array: a worker
-- claims only those, so during a rolling deploy a row of a type that only the
-- new code knows waits for a new worker, and `worker status` can name the
-- pending rows that no live worker runs.  NULL: a worker of schema 4 or older.
ALTER TABLE worker_processes ADD COLUMN types TEXT;

-- version 6

-- Values that no row can hold, refused for every writer when the row is
-- inserted (a CHECK cannot be added to an existing table without rebuilding it;
-- a trigger can).  Durations are at most 100 years (use persistent = 1 to keep
-- a row forever); attempts, max_attempts and deaths at most 2^31-1, so no sum
-- the worker makes with them leaves SQLite's 64-bit integers, which in this
-- STRICT table would be a REAL it refuses.  A running row needs a lease, or no
-- one could ever tell that its worker is gone.  The worker copes with such
-- values in rows written before this version (worker.py, MAX_DURATION_MS).
-- UPDATEs are not checked: a trigger on them would cost every claim and finish.
CREATE TRIGGER IF NOT EXISTS worker_jobs_refuse_invalid BEFORE INSERT ON worker_jobs
WHEN NEW.deaths NOT BETWEEN 0 AND 2147483647 OR NEW.attempt > 2147483647 OR NEW.max_attempts > 2147483647
  OR NEW.retry_delay_ms > 3155760000000 OR NEW.timeout_ms > 3155760000000 OR NEW.keep_ms > 3155760000000
  OR (NEW.status = 'running' AND NEW.lease_until IS NULL)
BEGIN
    SELECT RAISE(ABORT, 'worker_jobs: deaths must be between 0 and 2147483647')
     WHERE NEW.deaths NOT BETWEEN 0 AND 2147483647;
    SELECT RAISE(ABORT, 'worker_jobs: attempt and max_attempts must be at most 2147483647')
     WHERE NEW.attempt > 2147483647 OR NEW.max_attempts > 2147483647;
    SELECT RAISE(ABORT, 'worker_jobs: retry_delay_ms, timeout_ms and keep_ms must be at most 3155760000000 (100 years)')
     WHERE NEW.retry_delay_ms > 3155760000000 OR NEW.timeout_ms > 3155760000000 OR NEW.keep_ms > 3155760000000;
    SELECT RAISE(ABORT, 'worker_jobs: a running row needs a lease_until (only a worker claims rows)')
     WHERE NEW.status = 'running' AND NEW.lease_until IS NULL;
END;

-- version 7

-- What operators set on a queue (`worker pause`, `worker resume`, `worker
-- limit`), read by every claim inside its transaction, so that each holds for
-- every worker on every host at once.  A queue with no row has no controls;
-- the row is deleted when the last of its controls is cleared, and a claim
-- that finds the table empty takes its fast path (worker.py, CLAIM_SQL).
--   paused       no job of the queue is claimed (running ones finish)
--   max_running  at most this many of its rows are `running` at once, counting
--                the ones claimed ahead and not yet started
--   per_second   at most this many of its jobs start per second, spaced evenly:
--                next_start, the claims' own bookkeeping, is the epoch ms before
--                which no further job of the queue is claimed
CREATE TABLE IF NOT EXISTS worker_queues (
    queue        TEXT    PRIMARY KEY,
    paused       INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    max_running  INTEGER CHECK (max_running IS NULL OR max_running >= 1),
    per_second   REAL    CHECK (per_second IS NULL OR (per_second > 0 AND per_second <= 1000)),
    next_start   INTEGER,
    changed      INTEGER NOT NULL     -- epoch ms of the operator's last change
) STRICT;

-- version 8

-- How often this chain's job has snoozed (raised worker.Snooze: "not yet, in N
-- seconds"): each snooze ends the row `cancelled` and makes the next row of the
-- chain with the same attempt and snoozes + 1, so a snooze uses up no attempt,
-- and the worker stops a job snoozing past its cap.  Retries copy it on.
ALTER TABLE worker_jobs ADD COLUMN snoozes INTEGER NOT NULL DEFAULT 0 CHECK (snoozes >= 0);

-- Cancelling a running row is a request its worker sees within about a second
-- (`worker cancel ID`, Queue.cancel): when, and who asked.  Kept once the row ends.
ALTER TABLE worker_jobs ADD COLUMN cancel_requested INTEGER;
ALTER TABLE worker_jobs ADD COLUMN cancel_requested_by TEXT;
