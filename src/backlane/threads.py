"""A worker's threads for ``def`` tasks: bounded, and cheap for quick calls.

Each ``def`` task runs on an AnyIO worker thread (``anyio.from_thread`` works inside it),
at most ``limiter.total_tokens`` at once, in the context of the job that called it. A call
of a task not known to be quick runs exactly as ``anyio.to_thread.run_sync`` runs it, from
the job's own task: the job's cancellation (a timeout, a cancel, a hand-back) reaches
``anyio.from_thread.check_cancelled()`` and what the call runs through
``anyio.from_thread.run``. Going to a thread and back costs more than a quick task itself
(two hand-overs of the GIL and a wake-up of the event loop), so calls made in the same turn
of the event loop by tasks whose last call was quick (under ``QUICK`` seconds) share one
trip: one thread runs them one after another. Such a shared call is abandoned, not
cancelled through AnyIO, when its job gives up. A trip that has run ``SHARE_AT_MOST``
seconds on its thread hands over what its calls returned, and the calls still waiting go
alone (a trip still waiting for a thread keeps them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio

QUICK = 0.001
"""Seconds under which a task's last call counts as quick: its next calls may share a
thread's trip with others."""
SHARE_AT_MOST = 0.002
"""Seconds a trip may run on its thread before the calls still waiting in it get threads of
their own."""


class _Call:
    __slots__ = ("context", "func", "future", "key", "outcome", "took", "trip")

    def __init__(self, key: str, func: Callable[[], Any], future: asyncio.Future[Any]) -> None:
        self.key = key
        self.func = func
        self.future = future
        self.context = contextvars.copy_context()
        self.outcome: tuple[bool, Any] = (False, None)
        self.took = 0.0
        self.trip: _Trip | None = None


class _Trip:
    """Calls that one thread runs one after another. ``lock`` guards which call runs and
    whether the trip goes on: the thread takes calls from the left of ``waiting``, and the
    event loop may take all the rest, or stop the trip after the call that runs."""

    __slots__ = ("began", "done", "lock", "on_start", "running", "stopped", "task", "waiting")

    def __init__(self, calls: list[_Call]) -> None:
        self.waiting = collections.deque(calls)
        self.done: list[_Call] = []
        self.running: _Call | None = None
        self.began: float | None = None
        """When the thread took the first call (``time.perf_counter()``)."""
        self.on_start: Callable[[], object] | None = None
        """Called by the thread as it starts, if the loop asked to be told."""
        self.stopped = False
        self.lock = threading.Lock()
        self.task: asyncio.Task[None] | None = None

    def take_waiting(self) -> list[_Call]:
        """The calls not started yet, which the thread will then not start."""
        with self.lock:
            calls = list(self.waiting)
            self.waiting.clear()
        return calls

    def take_done(self) -> list[_Call]:
        """The calls that ended since the last time this was asked."""
        with self.lock:
            done, self.done = self.done, []
        return done

    def stop_after(self, call: _Call) -> bool:
        """Stop the trip after ``call``, if it is the one running; whether it was."""
        with self.lock:
            if self.running is not call:
                return False
            self.stopped = True
            return True

    def started(self) -> float | None:
        """When the thread started the trip; if it has not yet, None, and ``on_start`` will
        be called when it does (set it first)."""
        with self.lock:
            return self.began

    def run(self) -> None:
        """On a worker thread: run the calls in turn until none is left or it stops."""
        with self.lock:
            self.began = time.perf_counter()
            on_start = self.on_start
        if on_start is not None:
            with contextlib.suppress(RuntimeError):  # the event loop closed meanwhile
                on_start()
        while True:
            with self.lock:
                if self.stopped or not self.waiting:
                    self.running = None
                    return
                call = self.running = self.waiting.popleft()
            if call.future.cancelled():
                continue
            start = time.perf_counter()
            try:
                call.outcome = (True, call.context.run(call.func))
            except StopIteration as exc:  # a future cannot carry it
                error = RuntimeError("a task raised StopIteration")
                error.__cause__ = exc
                call.outcome = (False, error)
            except BaseException as exc:  # the awaiting job sorts out what it means
                call.outcome = (False, exc)
            call.took = time.perf_counter() - start
            with self.lock:
                self.done.append(call)


class ThreadRunner:
    """Runs ``def`` calls on worker threads, at most as many at once as ``limiter`` lets."""

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self.limiter = limiter
        self._pending: list[_Call] = []
        self._last_took: dict[str, float] = {}
        self._trips: set[asyncio.Task[None]] = set()

    async def run(self, key: str, func: Callable[[], Any]) -> Any:
        """Call ``func()`` on a worker thread, in the caller's context, and return what it
        returns (or raise what it raises). ``key`` names the task: how long its last call
        took decides whether the next may share a thread's trip. Cancelled, the caller
        returns at once: a call already running goes on in its thread, a call not started
        never starts."""
        if self._last_took.get(key, QUICK) >= QUICK:
            return await self._alone(key, func)
        loop = asyncio.get_running_loop()
        call = _Call(key, func, loop.create_future())
        if not self._pending:
            loop.call_soon(self._dispatch)
        self._pending.append(call)
        try:
            result = await call.future
        except asyncio.CancelledError:
            trip = call.trip
            if trip is not None and trip.task is not None and trip.stop_after(call):
                self._last_took[key] = math.inf  # never known to end: not quick
                trip.task.cancel()  # the thread finishes the call on its own
            raise
        if result is _ALONE:  # not shared after all
            return await self._alone(key, func)
        return result

    async def _alone(self, key: str, func: Callable[[], Any]) -> Any:
        """``func()`` on a thread of its own, from the caller's task (so that AnyIO's
        cancellation of the caller reaches the thread), its time noted under ``key``."""
        last_took = self._last_took

        def timed() -> Any:
            start = time.perf_counter()
            try:
                return func()
            finally:
                last_took[key] = time.perf_counter() - start

        return await anyio.to_thread.run_sync(timed, limiter=self.limiter, abandon_on_cancel=True)

    def _dispatch(self) -> None:
        calls, self._pending = self._pending, []
        if len(calls) == 1:
            _go_alone(calls[0])
            return
        self._split_after(SHARE_AT_MOST, self._start(calls))

    def _split_after(self, delay: float, trip: _Trip) -> None:
        handle = asyncio.get_running_loop().call_later(delay, self._split, trip)
        assert trip.task is not None
        trip.task.add_done_callback(lambda _: handle.cancel())

    def _start(self, calls: list[_Call]) -> _Trip:
        trip = _Trip(calls)
        for call in calls:
            call.trip = trip
        trip.task = task = asyncio.ensure_future(self._travel(trip))
        self._trips.add(task)
        task.add_done_callback(self._trips.discard)
        return trip

    async def _travel(self, trip: _Trip) -> None:
        try:
            await anyio.to_thread.run_sync(trip.run, limiter=self.limiter, abandon_on_cancel=True)
        except asyncio.CancelledError:
            pass  # abandoned by its running call's job: the rest go on their own below
        finally:
            self._deliver(trip)
            self._spread(trip)

    def _split(self, trip: _Trip) -> None:
        """Hand over what the trip's calls returned so far; once it has run
        ``SHARE_AT_MOST`` on its thread, give each call still waiting a thread of its own.
        A trip still waiting for a thread (none free, or the GIL held by a busy event
        loop) has no slow call: it keeps its calls."""
        self._deliver(trip)
        loop = asyncio.get_running_loop()
        trip.on_start = lambda: loop.call_soon_threadsafe(self._split_after, SHARE_AT_MOST, trip)
        began = trip.started()
        if began is None:  # the thread looks again when it starts: no polling meanwhile
            return
        trip.on_start = None
        ran = time.perf_counter() - began
        if ran < SHARE_AT_MOST:
            self._split_after(SHARE_AT_MOST - ran, trip)
            return
        running = trip.running
        if running is not None:  # slow this time: not shared next time
            self._last_took[running.key] = max(self._last_took.get(running.key, 0), QUICK)
        self._spread(trip)

    def _deliver(self, trip: _Trip) -> None:
        for call in trip.take_done():
            self._last_took[call.key] = call.took
            if not call.future.done():
                ok, value = call.outcome
                if ok:
                    call.future.set_result(value)
                else:
                    call.future.set_exception(value)

    def _spread(self, trip: _Trip) -> None:
        """Send each call still waiting in ``trip`` to a thread of its own."""
        for call in trip.take_waiting():
            _go_alone(call)


_ALONE = object()
"""What a shared call's future holds when its caller is to make the trip alone."""


def _go_alone(call: _Call) -> None:
    if not call.future.done():
        call.future.set_result(_ALONE)
