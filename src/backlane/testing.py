"""Helpers for users' own tests.

``await drain(lane)`` runs every job that can run now to completion (chains and retries due
now included) and returns how many ran; ``drain_sync(lane)`` does the same from plain sync
tests, e.g. beside ``TestClient``. Use ``Backlane("memory://")`` or ``eager=True`` in tests.
"""

from __future__ import annotations

import anyio

from .app import Backlane

__all__ = ["drain", "drain_sync"]


async def drain(lane: Backlane, *, timeout: float = 30.0, queues: list[str] | None = None) -> int:
    """Run jobs until none is left that could run now, inside the lane's lifespan (see
    ``Backlane.lifespan_context``). Every task a finished request added counts as one
    that could run now. Raises ``TimeoutError`` after ``timeout`` seconds."""
    worker = lane.worker(queues=queues)
    with anyio.fail_after(timeout):
        await lane.open()
        await lane.flush_releases(every_loop=True)
        async with lane.lifespan_context():
            return await worker.run_until_idle()


def drain_sync(lane: Backlane, *, timeout: float = 30.0, queues: list[str] | None = None) -> int:
    """``drain`` for synchronous tests."""

    async def run() -> int:
        return await drain(lane, timeout=timeout, queues=queues)

    return anyio.run(run)
