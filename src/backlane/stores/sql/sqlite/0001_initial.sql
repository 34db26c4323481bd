-- backlane SQLite schema, version 1: one table of jobs and the indexes its verbs need.
-- Times are REAL POSIX seconds (UTC); error and meta are JSON text; seq gives enqueue order.

CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL,
    task             TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    state            TEXT    NOT NULL,
    "key"            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    run_at           REAL    NOT NULL,
    created_at       REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    lease_until      REAL,
    worker_id        TEXT,
    progress         REAL,
    message          TEXT,
    result           TEXT,
    error            TEXT,
    "after"          TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    release_at       REAL,
    keep_until       REAL,
    meta             TEXT    NOT NULL DEFAULT '{}'
);

CREATE UNIQUE INDEX jobs_id ON jobs (id);

-- claim, one queue or several: only claimable rows, already in claim order.
CREATE INDEX jobs_claimable ON jobs (queue, priority DESC, run_at, seq)
    WHERE state = 'queued' AND "after" IS NULL;

-- claim from any queue.
CREATE INDEX jobs_claimable_any ON jobs (priority DESC, run_at, seq)
    WHERE state = 'queued' AND "after" IS NULL;

-- freeing the successors of a job that ends.
CREATE INDEX jobs_after ON jobs ("after") WHERE "after" IS NOT NULL;

-- an idempotency key is held by one active job at most.
CREATE UNIQUE INDEX jobs_active_key ON jobs ("key")
    WHERE "key" IS NOT NULL AND state IN ('deferred', 'queued', 'running');

-- requeue_expired: leases of running jobs, release deadlines of deferred ones.
CREATE INDEX jobs_lease ON jobs (lease_until) WHERE state = 'running';
CREATE INDEX jobs_release ON jobs (release_at)
    WHERE state = 'deferred' AND release_at IS NOT NULL;

-- purge by retention, and by end state and end time.
CREATE INDEX jobs_keep_until ON jobs (keep_until) WHERE keep_until IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (state, finished_at) WHERE finished_at IS NOT NULL;

-- list_jobs, newest first, unfiltered or by state; counts per queue and state.
CREATE INDEX jobs_created ON jobs (created_at DESC, seq DESC);
CREATE INDEX jobs_state_created ON jobs (state, created_at DESC, seq DESC);
CREATE INDEX jobs_queue_state ON jobs (queue, state);
