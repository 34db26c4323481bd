"""The floor of durability: FastAPI's own ``BackgroundTasks``, plus one SQLite transaction
before the reply that inserts a row like a stored job's (WAL, ``synchronous = NORMAL``, the
two indexes a deferred job's row enters). No worker, nothing else of backlane's: what any
"stored before the reply" costs on this machine, however it is built.

The file is ``FLOOR_DB`` (``dropin_overhead.py`` gives each server a file of its own).
"""

import json
import os
import sqlite3
import time
import uuid

from fastapi import BackgroundTasks, FastAPI

app = FastAPI()

db = sqlite3.connect(os.environ["FLOOR_DB"], isolation_level=None, check_same_thread=False)
db.execute("PRAGMA journal_mode = WAL")
db.execute("PRAGMA synchronous = NORMAL")
db.execute(
    "CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, "
    "task TEXT NOT NULL, payload TEXT NOT NULL, queue TEXT NOT NULL, priority INTEGER, "
    "state TEXT NOT NULL, run_at REAL, created_at REAL, release_at REAL, meta TEXT)"
)
db.execute("CREATE UNIQUE INDEX IF NOT EXISTS jobs_id ON jobs (id)")
db.execute(
    "CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created_at DESC, seq DESC)"
)
INSERT = (
    "INSERT INTO jobs (id, task, payload, queue, priority, state, run_at, created_at, "
    "release_at, meta) VALUES (?, ?, ?, 'default', 0, 'deferred', ?, ?, ?, '{}')"
)


def noop(n: int) -> None:
    """The task: nothing to do, so the figures are the machinery's alone."""


@app.post("/task/{n}")
async def add_task(n: int, background_tasks: BackgroundTasks) -> dict[str, int]:
    background_tasks.add_task(noop, n)
    now = time.time()
    db.execute("BEGIN IMMEDIATE")
    db.execute(INSERT, (uuid.uuid4().hex, "apps:noop", json.dumps({"n": n}), now, now, now + 5))
    db.execute("COMMIT")
    return {"n": n}
