"""The shape of a peer: how its workers start, and how one client enqueues.

A peer module (``with_<library>.py``) defines its library's app and tasks at module level (its
worker processes import the module) and a ``Peer`` subclass describing the rest. Client calls
are ``async``; a library whose client is synchronous simply blocks inside them, which costs
the same for every call, and nothing else runs on that loop.
"""

from __future__ import annotations

import sys
from importlib import metadata


class Peer:
    name = ""
    """Short name used by ``--only`` and in the tables."""
    library = ""
    """The PyPI distribution whose version is reported."""
    store = "Redis"
    """Where the jobs live: Redis, SQLite or PostgreSQL."""
    settings = ""
    """The set-up, in words, for the doc: pool, concurrency, acknowledgements, results."""
    batch = ""
    """The batch-enqueue call, if the library has one (empty: none)."""
    sqlite_file: str | None = None
    """The SQLite file its workers write, if any (a worker is never paused holding its lock)."""

    def version(self) -> str:
        return metadata.version(self.library)

    def worker_commands(self, processes: int) -> list[list[str]]:
        """Commands starting ``processes`` worker processes, each run in its own session."""
        raise NotImplementedError

    @staticmethod
    def python(*args: str) -> list[str]:
        return [sys.executable, *args]

    async def setup(self) -> None:
        """Prepare the store (schema, tables) before any worker starts."""

    async def teardown(self) -> None:
        """Release what ``setup`` made that outlives the run (beyond what compare.py drops)."""

    async def open(self) -> None:
        """Connect this client."""

    async def close(self) -> None:
        """Disconnect this client."""

    async def enqueue(self, total: int) -> None:
        """Enqueue one ``noop(total)``."""
        raise NotImplementedError

    async def enqueue_batch(self, total: int, count: int) -> None:
        """Enqueue ``count`` ``noop(total)`` jobs in one call (only when ``batch`` is set)."""
        raise NotImplementedError

    async def probe(self, sent: float) -> None:
        """Enqueue one ``probe(sent)``."""
        raise NotImplementedError
