"""Stores: where jobs live. A URL picks one; drivers are imported only when used."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..exceptions import ConfigurationError
from .base import Outcome, ScheduleRecord, StatsBucket, Store, WorkerRecord

__all__ = ["Outcome", "ScheduleRecord", "StatsBucket", "Store", "WorkerRecord", "store_from_url"]


def store_from_url(url: str) -> Store:
    """The store for ``url``: ``memory://``, ``sqlite:///path.db`` (and later ``redis://``,
    ``postgresql://``). Raises ``ConfigurationError`` naming what is wrong."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore(url)
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(url)
    raise ConfigurationError(f"unsupported store URL {url!r}: use memory://, sqlite:///path/to.db")
