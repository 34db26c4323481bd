"""Stores: where jobs live. A URL picks one; drivers are imported only when used."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..exceptions import ConfigurationError, DriverMissing
from .base import Outcome, ScheduleRecord, StatsBucket, Store, WorkerRecord

__all__ = ["Outcome", "ScheduleRecord", "StatsBucket", "Store", "WorkerRecord", "store_from_url"]


def store_from_url(url: str) -> Store:
    """The store for ``url``: ``memory://``, ``sqlite:///path.db``, ``redis://``,
    ``rediss://``, ``unix://`` or ``postgresql://``. Raises ``ConfigurationError`` naming
    what is wrong, and ``DriverMissing`` naming the extra to install."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore(url)
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(url)
    if scheme in ("redis", "rediss", "unix"):
        try:
            from .redis import RedisStore
        except ImportError as exc:
            raise _missing(exc, "redis", "redis") from exc
        return RedisStore(url)
    if scheme in ("postgresql", "postgres"):
        try:
            from .postgres import PostgresStore
        except ImportError as exc:
            raise _missing(exc, "psycopg", "postgres") from exc
        return PostgresStore(url)
    raise ConfigurationError(
        f"unsupported store URL {url!r}: use memory://, sqlite:///path/to.db, "
        "redis://host:6379/0 or postgresql://user@host/db"
    )


def _missing(exc: ImportError, driver: str, extra: str) -> Exception:
    if (exc.name or "").partition(".")[0] in (driver, "hiredis"):
        return DriverMissing(
            f"the {extra} store needs its driver: pip install 'backlane[{extra}]' ({exc})"
        )
    return exc
