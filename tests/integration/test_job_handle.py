"""``JobHandle``: following a job from outside a worker, on every store."""

from __future__ import annotations

import time

import anyio
import pytest

from backlane import Backlane, JobHandle, JobState, ResultTimeout
from backlane.testing import drain
from tests.integration import jobs_tasks as t

pytestmark = pytest.mark.anyio


async def test_a_handle_opens_its_lane_as_cancel_does(lane_url: str) -> None:
    """``status()``, ``info()`` and ``result()`` of a handle whose lane is not open (closed
    after the job ran, as at the end of an app's lifespan, or never opened in this
    process) raised "the store is not open; await store.open() first" on SQLite and
    PostgreSQL, while ``cancel()`` and ``lane.job()`` opened it."""
    lane = Backlane(lane_url)
    add = lane.task(t.add)
    try:
        handle = await add.enqueue(2, b=3)
        assert await drain(lane) == 1
        await lane.close()
        assert await handle.status() is JobState.SUCCEEDED
        await lane.close()
        assert await handle.result(timeout=0) == 5
    finally:
        await lane.close()
    if lane_url == "memory://":
        return  # a memory store lives in its lane only
    other = Backlane(lane_url)  # another lane on the same store, never opened
    try:
        found = JobHandle(other, handle.id, handle.task)
        assert (await found.info()).state is JobState.SUCCEEDED
    finally:
        await other.close()


async def test_result_never_waits_past_its_timeout(lane_url: str) -> None:
    """``result(timeout=)`` doubles its wait between looks at the store up to ``poll``:
    with a large ``poll`` it waited past the timeout (``timeout=1.3, poll=60`` raised
    after 2.55 s), and a NaN ``poll`` waited for ever, whatever the timeout."""
    lane = Backlane(lane_url)
    add = lane.task(t.add)
    try:
        handle = await add.enqueue(2, b=3)  # no worker: it stays queued
        started = time.monotonic()
        with pytest.raises(ResultTimeout):
            await handle.result(timeout=1.3, poll=60)
        assert 1.3 <= time.monotonic() - started < 2.0
        for poll in (float("nan"), 0.0, -1.0):
            with anyio.fail_after(5), pytest.raises(ValueError, match="poll must be a positive"):
                await handle.result(timeout=0.5, poll=poll)
    finally:
        await lane.close()
