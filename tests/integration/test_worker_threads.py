"""``def`` tasks run in the worker's own pool, ``threads`` wide (default: the concurrency)."""

import threading
import time

import anyio
import pytest

from backlane import Backlane

pytestmark = pytest.mark.anyio

RUNNING: list[int] = []
PEAK: list[int] = []
LOCK = threading.Lock()


def busy(seconds: float) -> None:
    with LOCK:
        RUNNING.append(1)
        PEAK.append(len(RUNNING))
    time.sleep(seconds)
    with LOCK:
        RUNNING.pop()


@pytest.mark.parametrize(("threads", "peak"), [(None, 4), (1, 1), (2, 2)])
async def test_def_tasks_run_at_most_threads_at_once(threads: int | None, peak: int) -> None:
    PEAK.clear()
    lane = Backlane("memory://", concurrency=4)
    task = lane.task(busy)
    async with lane:
        for _ in range(4):
            await task.enqueue(0.05)
        with anyio.fail_after(10):
            await lane.worker(threads=threads).run_until_idle()
    assert max(PEAK) == peak
