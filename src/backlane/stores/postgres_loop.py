"""Plumbing of the PostgreSQL store: an event loop on a thread of its own, and the signal
that tells waiting workers that work was announced.

A psycopg connection, and a ``psycopg_pool`` pool, belong to the event loop they were
opened on. The store serves callers on any loop and thread (FastAPI's TestClient runs the
app on a portal thread; tests call the store from ``anyio.run``), so its pool and its
LISTEN connection live on one loop the store owns, on a daemon thread; every verb hands
its work to that loop and awaits the result from the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopClosed(RuntimeError):
    """The loop was stopped: nothing more runs on it."""


class LoopThread:
    """An event loop running on a daemon thread until ``stop``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            leftovers = asyncio.all_tasks(self.loop)
            for task in leftovers:  # nothing should be left; if something is, unwind it
                task.cancel()
            if leftovers:
                gathered = asyncio.gather(*leftovers, return_exceptions=True)
                self.loop.run_until_complete(gathered)
        finally:
            self.loop.close()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this loop and return its result. A caller cancelled meanwhile
        stops waiting at once, but ``coro`` runs to its end: a statement interrupted
        halfway would leave its connection busy, or a transaction open, on the server.
        Raises ``LoopClosed`` once the loop was stopped."""
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError as exc:  # stopped and closed by a racing stop()
            coro.close()
            raise LoopClosed(str(exc)) from exc
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            if future.cancelled():  # not the caller: the loop stopped before it ran
                raise LoopClosed("the loop stopped before the call ran") from None
            raise

    def stop(self) -> None:
        """Stop the loop once what it is running now yields, and wait for its thread.
        Call it from any thread but the loop's own."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # closed in between
            return
        self._thread.join(timeout=5.0)


class WorkSignal:
    """The announcements of claimable work a store has seen, and the tasks waiting for one.

    ``announce`` (from any thread) counts one more and wakes every waiter. ``mark``, before
    a claim, notes the count in the current context, which tasks started from it inherit:
    ``wait`` there returns at once if work was announced since, so that a job enqueued
    while an empty claim ran is not missed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        self._mark: contextvars.ContextVar[int | None] = contextvars.ContextVar(
            f"backlane_work_mark_{id(self)}", default=None
        )

    def announce(self) -> None:
        """Work was announced: wake every waiter. Safe from any thread."""
        with self._lock:
            self._count += 1
            waiters = list(self._waiters)
        for loop, fut in waiters:
            if not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop closed in between
                    loop.call_soon_threadsafe(_settle, fut)

    def mark(self) -> None:
        """Note, in the current context, the announcements seen so far."""
        with self._lock:
            self._mark.set(self._count)

    async def wait(self, timeout: float) -> None:
        """Return at the next announcement, at once if one came since the ``mark`` this
        context holds, or after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (loop, fut)
        with self._lock:
            mark = self._mark.get()
            if mark is not None and mark < self._count:
                return
            self._waiters.add(entry)
        try:
            await asyncio.wait([fut], timeout=max(0.0, timeout))
        finally:
            with self._lock:
                self._waiters.discard(entry)
            fut.cancel()


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
