-- backlane SQLite schema, version 2: schedules, paused queues and workers' heartbeats.

-- The latest slot each schedule took (claim_slot) and whether it is paused.
CREATE TABLE schedules (
    name      TEXT    PRIMARY KEY,
    last_slot REAL,
    paused    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Queues claim takes nothing from.
CREATE TABLE paused_queues (
    queue TEXT PRIMARY KEY
) WITHOUT ROWID;

-- Each worker as its last heartbeat described it; queues and jobs are JSON arrays
-- (queues NULL: every queue).
CREATE TABLE workers (
    id          TEXT    PRIMARY KEY,
    started_at  REAL    NOT NULL,
    seen_at     REAL    NOT NULL,
    concurrency INTEGER NOT NULL,
    queues      TEXT,
    jobs        TEXT    NOT NULL DEFAULT '[]',
    processed   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
