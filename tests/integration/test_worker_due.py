"""Jobs stored to run later start when they are due, not when the worker next polls: on the
stores that tell a waiting worker of new work (Redis, PostgreSQL), a worker whose
``poll_max`` is long still starts a delayed job, or a retry after its backoff, on time."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from backlane import Backlane, JobHandle, JobState
from backlane.worker import Worker
from tests.integration import jobs_tasks as t
from tests.services import store_url

pytestmark = pytest.mark.anyio

POLL_MAX = 5.0
"""Far longer than any delay below: a job that waited for the next poll is seconds late."""
LATE = 0.5
"""How late a job may start after its ``run_at`` (a loaded CI machine included)."""


@pytest.fixture(params=["redis", "postgres"])
def told_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store of each kind that tells waiting workers of new work."""
    with store_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def lane(told_url: str) -> AsyncIterator[Backlane]:
    lane = Backlane(told_url, poll_max=POLL_MAX, lease_seconds=5)
    t.FLAKY.clear()
    async with lane:
        yield lane


async def started_late_by(handle: JobHandle) -> float:
    """Seconds between when the job was due and when its last attempt started, once it
    succeeded."""
    await handle.result(timeout=POLL_MAX * 2)
    job = await handle.info()
    assert job.state is JobState.SUCCEEDED and job.started_at is not None
    assert job.started_at >= job.run_at  # never early
    return job.started_at - job.run_at


async def waiting(lane: Backlane, worker: Worker, tg: anyio.abc.TaskGroup) -> None:
    """Run ``worker`` in ``tg``; return once it ran a job and settled into the long wait a
    worker makes after jobs (``poll_max``, as it counts on being told of new work)."""
    tg.start_soon(worker.run)
    await (await lane.task(t.add).enqueue(0, b=0)).result(timeout=5)
    await anyio.sleep(0.1)


@pytest.mark.parametrize("queues", [None, ["default", "other"]])
async def test_a_delayed_job_stored_before_the_workers_claim_runs_when_due(
    lane: Backlane, queues: list[str] | None
) -> None:
    add = lane.task(t.add)
    handle = await add.options(delay=0.3).enqueue(2, b=3)
    now = await add.enqueue(1, b=1)  # run first: then the worker waits long
    worker = lane.worker(queues=queues)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        assert await now.result(timeout=5) == 2
        assert await started_late_by(handle) < LATE
        worker.stop()


async def test_delayed_jobs_stored_while_the_worker_waits_run_when_due(lane: Backlane) -> None:
    add = lane.task(t.add)
    worker = lane.worker()
    async with anyio.create_task_group() as tg:
        await waiting(lane, worker, tg)
        soon = await add.options(delay=0.3).enqueue(1, b=1)
        later = await add.options(delay=1.5).enqueue(2, b=2)  # not due within a second
        assert await started_late_by(soon) < LATE
        assert await started_late_by(later) < LATE
        worker.stop()


async def test_a_retry_after_a_short_backoff_runs_when_due(lane: Backlane) -> None:
    flaky = lane.task(retries=2, backoff=0.4)(t.flaky)
    worker = lane.worker()
    async with anyio.create_task_group() as tg:
        await waiting(lane, worker, tg)
        handle = await flaky.enqueue("due", fail_times=2)
        assert await started_late_by(handle) < LATE
        worker.stop()
    job = await handle.info()
    assert job.attempts == 3
    gaps = [
        later["started_at"] - earlier["ended_at"]
        for earlier, later in zip(job.attempt_history, job.attempt_history[1:], strict=False)
    ]
    assert all(gap < 0.8 + LATE for gap in gaps), gaps  # backoff 0.4 then 0.8, at most
