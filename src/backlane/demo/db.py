"""The demo service's own SQLite database: users, the request log, uploads and exports.

Plain ``sqlite3``, one short-lived connection per use: a request opens one in a thread
(``Database.run``), a task receives a fresh one from a dependency and closes it after.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio

T = TypeVar("T")

Dataset = Literal["users", "requests"]
"""What ``/export`` can export."""

EXPORT_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("id", "email", "name", "created_at"),
    "requests": ("id", "at", "method", "path", "status", "duration_ms"),
}
"""The columns of each export; a password hash is never one of them."""

_SCHEMA = resources.files(__package__).joinpath("schema.sql").read_text(encoding="utf-8")


class EmailTaken(Exception):
    """A user with this email address is already registered."""


def now_iso() -> str:
    """The current time, ISO 8601 in UTC, to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def connect(path: Path) -> sqlite3.Connection:
    """A new connection to the demo database at ``path``, its schema in place. Usable from
    one thread at a time, whichever it is."""
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA)
    return conn


class Database:
    """The demo database as the web app uses it: each call runs in a worker thread on a
    connection of its own."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def run(self, action: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``action(connection, *args, **kwargs)`` in a thread, on a fresh connection
        closed after."""
        call = functools.partial(self._run, action, *args, **kwargs)
        return await anyio.to_thread.run_sync(call)

    def _run(self, action: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        conn = connect(self.path)
        try:
            return action(conn, *args, **kwargs)
        finally:
            conn.close()


# -- users ------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """A salted scrypt hash of ``password``, as ``scrypt$n$r$p$salt$hash``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt$16384$8$1${salt.hex()}${digest.hex()}"


def add_user(conn: sqlite3.Connection, email: str, name: str, password: str) -> int:
    """Register a user; returns the new id. Raises ``EmailTaken``."""
    try:
        cursor = conn.execute(
            "INSERT INTO users (email, name, password_hash, created_at) VALUES (?, ?, ?, ?)",
            (email, name, hash_password(password), now_iso()),
        )
    except sqlite3.IntegrityError:
        raise EmailTaken(email) from None
    assert cursor.lastrowid is not None
    return cursor.lastrowid


# -- the request log ----------------------------------------------------------------------


def log_request(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    at: str,
    method: str,
    path: str,
    status: int,
    duration_ms: float,
) -> None:
    """Record one API request (once per ``job_id``)."""
    conn.execute(
        "INSERT OR IGNORE INTO requests (at, method, path, status, duration_ms, job_id)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (at, method, path, status, duration_ms, job_id),
    )


# -- uploads and exports ------------------------------------------------------------------


def add_upload(
    conn: sqlite3.Connection,
    upload_id: str,
    *,
    original_name: str,
    content_type: str,
    size: int,
    job_id: str,
) -> None:
    """Remember an upload: its client-side name and type are kept as text only."""
    conn.execute(
        "INSERT INTO uploads (id, original_name, content_type, size, job_id, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (upload_id, original_name, content_type, size, job_id, now_iso()),
    )


def get_upload(conn: sqlite3.Connection, upload_id: str) -> dict[str, Any] | None:
    """The upload with this id, or None."""
    row = conn.execute("SELECT * FROM uploads WHERE id = ?", (upload_id,)).fetchone()
    return dict(row) if row is not None else None


def add_export(
    conn: sqlite3.Connection, export_id: str, *, dataset: str, format: str, job_id: str
) -> None:
    """Remember an export and the job that writes it."""
    conn.execute(
        "INSERT INTO exports (id, dataset, format, job_id, created_at) VALUES (?, ?, ?, ?, ?)",
        (export_id, dataset, format, job_id, now_iso()),
    )


def get_export(conn: sqlite3.Connection, export_id: str) -> dict[str, Any] | None:
    """The export with this id, or None."""
    row = conn.execute("SELECT * FROM exports WHERE id = ?", (export_id,)).fetchone()
    return dict(row) if row is not None else None


def count_rows(conn: sqlite3.Connection, dataset: Dataset) -> int:
    """How many rows an export of ``dataset`` has now."""
    table = _table(dataset)
    (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(count)


def export_rows(conn: sqlite3.Connection, dataset: Dataset) -> Iterator[tuple[Any, ...]]:
    """The rows of ``dataset`` in id order, as tuples in ``EXPORT_COLUMNS`` order."""
    table = _table(dataset)
    columns = ", ".join(EXPORT_COLUMNS[dataset])
    for row in conn.execute(f"SELECT {columns} FROM {table} ORDER BY id"):
        yield tuple(row)


def _table(dataset: str) -> str:
    if dataset not in EXPORT_COLUMNS:  # the name goes into SQL: only known ones
        raise ValueError(f"unknown dataset {dataset!r}")
    return dataset
