"""The SQLite store's file and schema: its URL, its SQL, and its migrations.

The SQL lives in ``sql/sqlite/``: numbered migrations (``0001_initial.sql``, ...) versioned
by ``PRAGMA user_version``, and the statements of the verbs in ``queries.sql`` (one per
``-- name:`` block).
"""

from __future__ import annotations

import functools
import re
import sqlite3
import sys
from collections.abc import Iterator
from importlib import resources
from urllib.parse import urlsplit

from ..exceptions import ConfigurationError, StoreError

if sys.version_info >= (3, 11):
    from importlib.resources.abc import Traversable
else:  # deprecated there from Python 3.12, removed in 3.14
    from importlib.abc import Traversable

_MIGRATION_NAME = re.compile(r"^(\d+)_\w+\.sql$")


def path_from_url(url: str) -> str:
    """The database path named by a ``sqlite:///relative.db`` or ``sqlite:////abs.db`` URL.
    Raises ``ConfigurationError`` saying what is wrong with any other URL."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not a SQLite URL: {url!r}; write sqlite:///path/to.db")
    if parts.netloc:
        raise ConfigurationError(
            f"SQLite URL {url!r} names a host ({parts.netloc!r}), but a SQLite file has "
            "none: write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"SQLite URL {url!r} takes no query string or fragment")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path or path.endswith("/"):
        raise ConfigurationError(
            f"SQLite URL {url!r} names no file: write sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    return path


def _sql_folder() -> Traversable:
    return resources.files("backlane.stores") / "sql" / "sqlite"


def migrations() -> list[tuple[int, str]]:
    """The schema migrations shipped with backlane, as (version, SQL script), in order."""
    found = []
    for entry in _sql_folder().iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    return sorted(found)


@functools.cache
def queries() -> dict[str, str]:
    """The statements of ``queries.sql`` by name."""
    text = (_sql_folder() / "queries.sql").read_text(encoding="utf-8")
    blocks = re.split(r"^-- name: *", text, flags=re.MULTILINE)[1:]
    return {name.strip(): body.strip() for name, _, body in (b.partition("\n") for b in blocks)}


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, one by one."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if any(ln.strip() and not ln.strip().startswith("--") for ln in buffer.splitlines()):
        raise StoreError(f"unterminated SQL statement in a migration: {buffer.strip()!r}")


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring the schema of the file open on ``conn`` to the latest version, in one
    transaction. Raises ``StoreError`` for a file newer than this backlane knows."""
    shipped = migrations()
    latest = shipped[-1][0]
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > latest:
        raise StoreError(
            f"{path} has schema version {current}, newer than this backlane "
            f"knows ({latest}); upgrade backlane"
        )
    if current == latest:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        for version, script in shipped:
            if version > current:
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {int(version)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
