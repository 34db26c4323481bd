-- The demo service's own data (demo.db): what its endpoints store and its exports read.
-- Every statement is idempotent; it runs whenever a connection is opened.

CREATE TABLE IF NOT EXISTS users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    email         TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL
);

-- One row per API request, written by the request-logging task; job_id makes a second
-- run of the same job a no-op.
CREATE TABLE IF NOT EXISTS requests (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          TEXT NOT NULL,
    method      TEXT NOT NULL,
    path        TEXT NOT NULL,
    status      INTEGER NOT NULL,
    duration_ms REAL NOT NULL,
    job_id      TEXT NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS uploads (
    id            TEXT PRIMARY KEY,
    original_name TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    size          INTEGER NOT NULL,
    job_id        TEXT NOT NULL,
    created_at    TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS exports (
    id         TEXT PRIMARY KEY,
    dataset    TEXT NOT NULL,
    format     TEXT NOT NULL,
    job_id     TEXT NOT NULL,
    created_at TEXT NOT NULL
);
