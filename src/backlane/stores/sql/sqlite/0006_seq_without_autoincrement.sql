-- backlane SQLite schema, version 6: storing a job writes two pages fewer, ending one a
-- page fewer.
--
-- seq without AUTOINCREMENT: storing a job no longer rewrites sqlite_sequence's page. A new
-- job still gets a seq above every stored job's (the largest plus one), so enqueue order
-- holds; a seq may only come back after the newest job was removed. SQLite cannot drop
-- AUTOINCREMENT in place: the table is built anew, its rows copied, its indexes made again.
--
-- jobs_queue_state leaves running jobs out too: a job that ends no longer moves an entry
-- to the far end of its queue's section. counts reads the running jobs, few (no more than
-- the workers' concurrency), through jobs_state_created, as it does the deferred ones.

ALTER TABLE jobs RENAME TO jobs_before_6;

CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY,
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
    meta             TEXT    NOT NULL DEFAULT '{}',
    attempt_history  TEXT
);

INSERT INTO jobs (seq, id, task, payload, queue, priority, state, "key", attempts, run_at,
                  created_at, started_at, finished_at, lease_until, worker_id, progress,
                  message, result, error, "after", cancel_requested, release_at,
                  keep_until, meta, attempt_history)
SELECT seq, id, task, payload, queue, priority, state, "key", attempts, run_at,
       created_at, started_at, finished_at, lease_until, worker_id, progress,
       message, result, error, "after", cancel_requested, release_at,
       keep_until, meta, attempt_history
FROM jobs_before_6;

DROP TABLE jobs_before_6;

-- The indexes of version 5, but for jobs_queue_state.
CREATE UNIQUE INDEX jobs_id ON jobs (id);
CREATE INDEX jobs_claimable ON jobs (queue, priority DESC, run_at, seq)
    WHERE state = 'queued' AND "after" IS NULL;
CREATE INDEX jobs_claimable_any ON jobs (priority DESC, run_at, seq)
    WHERE state = 'queued' AND "after" IS NULL;
CREATE INDEX jobs_after ON jobs ("after") WHERE "after" IS NOT NULL;
CREATE UNIQUE INDEX jobs_active_key ON jobs ("key")
    WHERE "key" IS NOT NULL AND state IN ('deferred', 'queued', 'running');
CREATE INDEX jobs_keep_until ON jobs (keep_until) WHERE keep_until IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (state, finished_at, started_at, run_at)
    WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_state_created ON jobs (state, created_at DESC, seq DESC);
CREATE INDEX jobs_queue_state ON jobs (queue, state) WHERE state NOT IN ('deferred', 'running');
