"""Importable task functions for tests/integration/test_worker.py."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends

from backlane import Retry, TaskContext

STATE: dict[str, list[str]] = {"opened": [], "closed": [], "calls": []}
FLAKY: dict[str, int] = {}
GATE = threading.Event()


def add(a: int, b: int) -> int:
    return a + b


async def with_progress(ctx: TaskContext, steps: int) -> str:
    for i in range(steps):
        await ctx.progress((i + 1) / steps, f"step {i + 1} of {steps}")
    return f"{ctx.job_id}:{ctx.attempt}"


def sync_progress(ctx: TaskContext) -> None:
    ctx.progress_sync(0.25, "a quarter")


def flaky(key: str, fail_times: int) -> int:
    FLAKY[key] = FLAKY.get(key, 0) + 1
    if FLAKY[key] <= fail_times:
        raise ConnectionError(f"attempt {FLAKY[key]} failed")
    return FLAKY[key]


async def asks_to_retry(key: str) -> str:
    FLAKY[key] = FLAKY.get(key, 0) + 1
    if FLAKY[key] == 1:
        raise Retry("not yet", delay=0)
    return "done"


async def sleeps(seconds: float) -> str:
    await anyio.sleep(seconds)
    return "slept"


def blocks(seconds: float) -> str:
    time.sleep(seconds)
    return "blocked"


async def waits_for_cancel(ctx: TaskContext) -> None:
    await anyio.sleep(30)


async def session() -> AsyncIterator[str]:
    name = f"session-{len(STATE['opened'])}"
    STATE["opened"].append(name)
    try:
        yield name
    finally:
        STATE["closed"].append(name)


def settings() -> dict[str, str]:
    return {"dsn": "test"}


def uses_session(
    label: str,
    db: Annotated[str, Depends(session)],
    conf: dict[str, str] = Depends(settings),
) -> str:
    STATE["calls"].append(f"{label}:{db}:{conf['dsn']}")
    assert db not in STATE["closed"]  # still open while the task runs
    return db


def records(label: str) -> None:
    STATE["calls"].append(label)


def exits(code: int) -> None:
    """A script turned into a task, still ending with ``sys.exit``."""
    sys.exit(code)


async def exits_async(code: int) -> None:
    raise SystemExit(code)


async def leaks_cancellation(label: str) -> None:
    """Raises a CancelledError that no one asked for, as a library bug may."""
    raise asyncio.CancelledError(label)


async def times_out_on_its_own(seconds: float) -> None:
    """A TimeoutError of the task's own (its call to something slow), not backlane's."""
    await asyncio.wait_for(asyncio.sleep(seconds * 10), seconds)


async def swallows_cancel_then_raises() -> None:
    with contextlib.suppress(asyncio.CancelledError):  # a task that will not be cancelled...
        await asyncio.sleep(30)
    raise asyncio.CancelledError("its own")  # ...and ends with a cancellation of its own


def quick_or_stuck(i: int) -> int:
    """Returns at once, except every fourth call, which sleeps for a second."""
    if i % 4 == 3:
        time.sleep(1.0)
    return i


POLLS: list[float] = []


def polls_for_cancel() -> None:
    """Checks for its cancellation every 20 ms, for a second at most."""
    for _ in range(50):
        anyio.from_thread.check_cancelled()
        POLLS.append(time.monotonic())
        time.sleep(0.02)


async def cleans_up_shielded() -> None:
    """Waits to be cancelled, then takes half a second to clean up, shielded."""
    try:
        await anyio.sleep(30)
    finally:
        STATE["calls"].append("cleanup started")
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.5)
            STATE["calls"].append("cleanup done")


def polls_until_cancelled() -> str:
    """Checks for its cancellation every 10 ms, for three seconds at most."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            anyio.from_thread.check_cancelled()
        except BaseException:
            STATE["calls"].append("saw its cancellation")
            raise
        time.sleep(0.01)
    STATE["calls"].append("ran to the end")
    return "done"


async def stuck_in_setup() -> AsyncIterator[None]:
    """A dependency whose set-up never ends (a pool that never gives a connection)."""
    await anyio.sleep(3600)
    yield


async def stuck_in_teardown() -> AsyncIterator[None]:
    """A dependency whose teardown never ends."""
    yield
    await anyio.sleep(3600)


async def needs_stuck_setup(_: Annotated[None, Depends(stuck_in_setup)]) -> None:
    STATE["calls"].append("ran")


async def needs_stuck_teardown(_: Annotated[None, Depends(stuck_in_teardown)]) -> None:
    STATE["calls"].append("ran")
