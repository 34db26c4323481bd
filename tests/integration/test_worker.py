"""Enqueue, run and follow jobs: results, progress, retries, timeouts, cancellation,
dependencies, shutdown — on every local store."""

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import anyio
import pytest
from fastapi import FastAPI

from backlane import (
    Backlane,
    InvalidArguments,
    Job,
    JobFailed,
    JobHandle,
    JobState,
    ResultTimeout,
)
from backlane.testing import drain
from backlane.worker import Worker
from tests.integration import jobs_tasks as t

pytestmark = pytest.mark.anyio


@pytest.fixture
async def lane(lane_url: str) -> AsyncIterator[Backlane]:
    lane = Backlane(lane_url, backoff=0.01, lease_seconds=1, sweep_interval=0.2, shutdown_grace=1)
    t.STATE.update(opened=[], closed=[], calls=[])
    t.FLAKY.clear()
    async with lane:
        yield lane


async def test_enqueue_and_result(lane: Backlane) -> None:
    add = lane.task(t.add)
    handle = await add.enqueue(2, b=3)
    assert await handle.status() is JobState.QUEUED
    assert await drain(lane) == 1
    assert await handle.result(timeout=1) == 5
    assert (await lane.job(handle.id)).id == handle.id


async def test_bad_arguments_store_nothing(lane: Backlane) -> None:
    add = lane.task(t.add)
    with pytest.raises(InvalidArguments, match="task 'tests.integration.jobs_tasks:add'.*'a'"):
        await add.enqueue("two", 3)
    assert await lane.store.counts() == {}


async def test_progress_and_context(lane: Backlane) -> None:
    task = lane.task(t.with_progress)
    sync = lane.task(t.sync_progress)
    handle = await task.enqueue(4)
    other = await sync.enqueue()
    await drain(lane)
    job = await handle.info()
    assert (job.progress, job.message) == (1.0, "step 4 of 4")
    assert await handle.result() == f"{handle.id}:1"
    assert ((await other.info()).progress, (await other.info()).message) == (0.25, "a quarter")


async def test_retries_with_backoff_then_success(lane: Backlane) -> None:
    flaky = lane.task(retries=3, backoff=0.01)(t.flaky)
    handle = await flaky.enqueue("k", fail_times=2)
    worker = lane.worker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        assert await handle.result(timeout=10) == 3
        worker.stop()
    job = await handle.info()
    assert job.attempts == 3 and job.state is JobState.SUCCEEDED
    history = job.attempt_history  # the two retried attempts; the third is the job's own
    assert [(r["attempt"], r["outcome"]) for r in history] == [(1, "retried"), (2, "retried")]
    assert history[1]["error"] == {"type": "ConnectionError", "message": "attempt 2 failed"}
    assert history[0]["started_at"] <= history[0]["ended_at"] <= history[1]["started_at"]
    assert history[1]["ended_at"] <= job.started_at


async def test_retries_exhausted_keep_the_error(lane: Backlane) -> None:
    flaky = lane.task(retries=1, backoff=0.01, retry_on=ConnectionError)(t.flaky)
    handle = await flaky.enqueue("k2", fail_times=5)
    worker = lane.worker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with pytest.raises(JobFailed, match="ConnectionError: attempt 2 failed"):
            await handle.result(timeout=10)
        worker.stop()
    job = await handle.info()
    assert job.state is JobState.FAILED and job.attempts == 2
    assert job.error is not None and "Traceback" in job.error["traceback"]
    assert await lane.retry(handle.id)  # retried by hand
    assert await handle.status() is JobState.QUEUED
    kept = (await handle.info()).attempt_history  # every attempt that did not succeed
    assert [(r["attempt"], r["outcome"]) for r in kept] == [(1, "retried"), (2, "failed")]


async def test_retry_signal(lane: Backlane) -> None:
    task = lane.task(retries=1)(t.asks_to_retry)
    handle = await task.enqueue("r")
    await drain(lane)
    assert await handle.result() == "done"
    assert (await handle.info()).attempts == 2


async def test_async_timeout_cancels_and_sync_timeout_is_reported(lane: Backlane) -> None:
    slow = lane.task(timeout=0.1, retries=0)(t.sleeps)
    blocking = lane.task(timeout=0.1, retries=0)(t.blocks)
    a = await slow.enqueue(5)
    b = await blocking.enqueue(1)
    started = time.monotonic()
    await drain(lane)
    assert time.monotonic() - started < 1.0
    for handle in (a, b):
        job = await handle.info()
        assert job.state is JobState.FAILED
        assert job.error is not None and job.error["message"] == "timed out after 0.1s"


async def until_running(handle: JobHandle, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while await handle.status() is not JobState.RUNNING:
            await anyio.sleep(0.01)


async def test_an_empty_list_of_queues_is_refused(lane: Backlane) -> None:
    """``queues=[]`` names no queue: it ran every queue's jobs, as ``None`` does."""
    other = lane.task(t.add, queue="other")
    handle = await other.enqueue(1, b=2)
    with pytest.raises(ValueError, match="at least one queue"):
        lane.worker(queues=[])
    with pytest.raises(ValueError, match="at least one queue"):
        await drain(lane, queues=[])
    with pytest.raises(ValueError, match="at least one queue"):  # not at start-up, later
        lane.install(FastAPI(), queues=[])
    assert await handle.status() is JobState.QUEUED


async def test_cancel_queued_and_running(lane: Backlane) -> None:
    waiting = lane.task(t.waits_for_cancel)
    queued = await lane.task(t.add).options(delay=60).enqueue(1, 2)
    assert await queued.cancel() is JobState.CANCELLED
    running = await waiting.enqueue()
    worker = lane.worker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await until_running(running)
        assert await running.cancel() is JobState.RUNNING  # asked; the worker stops it
        with pytest.raises(JobFailed, match="cancelled"):
            await running.result(timeout=5)
        worker.stop()


async def test_options_delay_at_priority_queue_key(lane: Backlane) -> None:
    add = lane.task(t.add)
    later = await add.options(delay=timedelta(seconds=30)).enqueue(1, 1)
    at = datetime.now(timezone.utc) + timedelta(hours=1)
    scheduled = await add.options(at=at).enqueue(1, 2)
    assert abs((await scheduled.info()).run_at - at.timestamp()) < 0.001
    first = await add.options(key="once").enqueue(1, 3)
    again = await add.options(key="once").enqueue(1, 3)
    assert first.id == again.id
    other_queue = await add.options(queue="emails", priority=5).enqueue(2, 2)
    assert await drain(lane, queues=["default"]) == 1  # "once" only; the rest wait
    assert await later.status() is JobState.QUEUED
    assert await other_queue.status() is JobState.QUEUED
    assert await drain(lane, queues=["emails"]) == 1
    with pytest.raises(ValueError, match="timezone-aware"):
        add.options(at=datetime(2030, 1, 1))
    with pytest.raises(ResultTimeout):
        await later.result(timeout=0.05)
    with pytest.raises(ValueError, match="not NaN"):  # it waited for ever
        await later.result(timeout=float("nan"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"priority": "high"}, "priority= must be an int, got 'high'"),
        ({"priority": 2**31}, "priority= must be between -2147483648 and 2147483647"),
        ({"queue": ""}, "queue= must be a non-empty string"),
        ({"key": ""}, "key= must be a non-empty string"),
        ({"delay": float("nan")}, "delay= must be a finite number of seconds"),
        ({"delay": 1e300}, "delay= must be at most 3155760000 seconds (a century) either way"),
        ({"delay": -1e300}, "delay= must be at most 3155760000 seconds (a century) either way"),
        ({"delay": 10**400}, "delay= must be at most 3155760000 seconds (a century) either way"),
        ({"at": "tomorrow"}, "at= must be a datetime, got 'tomorrow'"),
    ],
)
async def test_options_that_no_store_could_keep_are_refused_before_anything_is_stored(
    lane: Backlane, options: dict[str, object], message: str
) -> None:
    add = lane.task(t.add)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        await add.options(**options).enqueue(1, 1)  # type: ignore[arg-type]
    assert await lane.store.counts() == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, "timeout= must be a number of seconds above 0 (or None for none)"),
        ({"queue": " "}, "queue= must be a non-empty string"),
        ({"priority": 1.5}, "priority= must be an int, got 1.5"),
    ],
)
def test_task_options_out_of_range_are_refused_naming_the_task(
    options: dict[str, object], message: str
) -> None:
    lane = Backlane("memory://")
    with pytest.raises(ValueError, match=r"task 'tests\.integration\.jobs_tasks:add': .*"):
        lane.task(**options)(t.add)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape(message)):
        lane.task(**options)(t.add)  # type: ignore[arg-type]


async def test_depends_resolved_per_job_and_closed_after(lane: Backlane) -> None:
    task = lane.task(t.uses_session)
    first = await task.enqueue("one")
    second = await task.enqueue("two")
    await drain(lane)
    assert await first.result() != await second.result()  # a fresh session per job
    assert sorted(t.STATE["closed"]) == sorted(t.STATE["opened"]) and len(t.STATE["opened"]) == 2
    assert sorted(t.STATE["calls"]) == ["one:session-0:test", "two:session-1:test"] or sorted(
        t.STATE["calls"]
    ) == ["one:session-1:test", "two:session-0:test"]


async def test_corrupt_or_unknown_job_fails_without_crashing_the_worker(lane: Backlane) -> None:
    records = lane.task(t.records)
    bad_payload = Job(task=records.name, payload="{not json", created_at=time.time(), run_at=0)
    unknown = Job(task="nowhere.module:func", payload="{}", created_at=time.time(), run_at=0)
    good = await records.enqueue("still runs")
    await lane.enqueue_jobs([bad_payload, unknown])
    await drain(lane)
    assert (await lane.store.get(bad_payload.id)).state is JobState.FAILED  # type: ignore[union-attr]
    failed_unknown = await lane.store.get(unknown.id)
    assert failed_unknown is not None and failed_unknown.state is JobState.FAILED
    assert (
        failed_unknown.error is not None
        and failed_unknown.error["type"] == "backlane.exceptions.UnknownTask"
    )
    assert await good.status() is JobState.SUCCEEDED


async def test_a_task_that_calls_sys_exit_fails_and_the_worker_carries_on(lane: Backlane) -> None:
    exits = [await lane.task(t.exits).enqueue(3), await lane.task(t.exits_async).enqueue(4)]
    good = await lane.task(t.records).enqueue("after the exits")
    assert await drain(lane) == 3
    for handle, code in zip(exits, ("3", "4"), strict=True):
        job = await handle.info()
        assert job.state is JobState.FAILED and job.attempts == 1  # not retried: it meant it
        assert job.error is not None and job.error["type"] == "SystemExit"
        assert job.error["message"] == code
    assert await good.status() is JobState.SUCCEEDED


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10 cannot tell a task's own CancelledError"
)
async def test_a_tasks_own_cancelled_or_timeout_error_is_its_failure(lane: Backlane) -> None:
    leaked = await lane.task(retries=0)(t.leaks_cancellation).enqueue("from a library")
    own = await lane.task(timeout=5, retries=0)(t.times_out_on_its_own).enqueue(0.01)
    good = await lane.task(t.records).enqueue("after them")
    await drain(lane)
    job = await leaked.info()
    assert job.state is JobState.FAILED and job.error is not None
    assert job.error["type"] == "asyncio.exceptions.CancelledError"
    job = await own.info()
    assert job.state is JobState.FAILED and job.error is not None
    assert job.error["type"] == "TimeoutError" and "wait_for" in job.error["traceback"]
    assert job.error["message"] != "timed out after 5s"  # not the task's timeout: 5 s
    assert await good.status() is JobState.SUCCEEDED


async def test_a_task_that_swallows_its_cancel_then_raises_its_own_ends_cancelled(
    lane: Backlane,
) -> None:
    stubborn = await lane.task(t.swallows_cancel_then_raises).enqueue()
    worker = lane.worker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await until_running(stubborn)
        await stubborn.cancel()
        with anyio.fail_after(5):
            while not (await stubborn.status()).terminal:  # it stayed running: not held
                await anyio.sleep(0.01)
        worker.stop()
    assert await stubborn.status() is JobState.CANCELLED


async def test_graceful_shutdown_hands_back_unfinished_jobs(lane: Backlane) -> None:
    slow = lane.task(t.sleeps)
    quick = await slow.enqueue(0.05)
    long = await slow.enqueue(30)
    worker = lane.worker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await until_running(long)
        started = time.monotonic()
        worker.stop()
    assert time.monotonic() - started < 3  # grace is 1 s
    assert await quick.status() is JobState.SUCCEEDED
    job = await long.info()
    assert job.state is JobState.QUEUED and job.attempts == 0  # handed back, not counted


async def test_a_handed_back_jobs_shielded_clean_up_ends_before_the_worker_does(
    lane: Backlane,
) -> None:
    """Jobs run in tasks of their own, not a task group's: at a graceful stop whose grace
    runs out, a job handed back finishes its shielded clean-up before ``run`` returns
    (a plain cancel of its task once cut into it, where the store's hand-back waited)."""
    long = await lane.task(t.cleans_up_shielded).enqueue()
    worker = lane.worker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await until_running(long)
        worker.stop()
    assert t.STATE["calls"] == ["cleanup started", "cleanup done"]
    assert await long.status() is JobState.QUEUED


@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_worker_cancelled_from_outside_ends_with_its_jobs(
    lane: Backlane, cancels: int
) -> None:
    """Cancelled from outside (once, or again while it waits for its jobs), the worker
    cancels its jobs, lets their shielded clean-up finish, and leaves no task behind."""
    long = await lane.task(t.cleans_up_shielded).enqueue()
    worker = lane.worker()
    task = asyncio.ensure_future(worker.run())
    await until_running(long)
    with anyio.fail_after(5):  # the store may show it running before the worker starts it
        while not worker._job_tasks:
            await anyio.sleep(0.005)
    (job_task,) = worker._job_tasks
    for _ in range(cancels):
        task.cancel()
        await anyio.sleep(0.05)
    await asyncio.wait([task])
    assert task.cancelled() and job_task.done()
    assert t.STATE["calls"] == ["cleanup started", "cleanup done"]
    assert worker.held == []


@pytest.mark.parametrize("stuck", ["needs_stuck_setup", "needs_stuck_teardown"])
@pytest.mark.parametrize("how", ["stop", "cancel", "cancel twice"])
async def test_a_job_stuck_in_its_dependency_does_not_hold_the_worker_for_ever(
    lane: Backlane, stuck: str, how: str
) -> None:
    """A dependency whose set-up or teardown never ends (outside the task's call, which
    the job's own cancellation covers): stopped, the worker gives it the grace twice
    (once to finish, once to hand it back); cancelled from outside, none. It hung."""
    handle = await lane.task(getattr(t, stuck)).enqueue()
    worker = lane.worker()
    task = asyncio.ensure_future(worker.run())
    with anyio.fail_after(5):
        while not worker.held:
            await anyio.sleep(0.01)
    await anyio.sleep(0.1)
    started = time.monotonic()
    if how == "stop":
        worker.stop()
    else:
        for _ in range(2 if how == "cancel twice" else 1):
            task.cancel()
            await anyio.sleep(0.05)
    with anyio.fail_after(5):
        await asyncio.wait([task])
    took = time.monotonic() - started
    assert took < (3.0 if how == "stop" else 1.0)  # grace is 1 s
    assert worker.held == [] and not worker._job_tasks
    if stuck == "needs_stuck_teardown":
        assert t.STATE["calls"] == ["ran"]
    elif how == "stop":  # never ran: handed back for another worker
        assert await handle.status() is JobState.QUEUED


async def test_a_def_job_sees_its_worker_cancelled_from_outside(lane: Backlane) -> None:
    """A ``def`` job polling ``anyio.from_thread.check_cancelled()`` learns that its
    worker was cancelled, as it learns of its own cancellation."""
    polling = await lane.task(t.polls_until_cancelled).enqueue()
    worker = lane.worker()
    with anyio.move_on_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await until_running(polling)
            await anyio.sleep(0.1)
            started = time.monotonic()
            tg.cancel_scope.cancel()
    for _ in range(100):  # the thread sees it at its next check
        if t.STATE["calls"]:
            break
        await anyio.sleep(0.01)
    assert t.STATE["calls"] == ["saw its cancellation"]
    assert time.monotonic() - started < 1


async def _deferred_job(lane: Backlane) -> Job:
    """A job stored as a request stores it before its reply: waiting for its release."""
    job = lane.task(t.add).build_job((2,), {"b": 3}, None, state=JobState.DEFERRED)
    job.release_at = time.time() + 60
    (stored,) = await lane.enqueue_jobs([job])
    return stored


async def _started(lane: Backlane, worker: Worker, tg: anyio.abc.TaskGroup) -> None:
    """Run ``worker`` in ``tg`` and return once requests on this loop may hand it jobs."""
    tg.start_soon(worker.run)
    with anyio.fail_after(5):
        while lane.worker_with_room() is not worker:
            await anyio.sleep(0.01)


async def test_jobs_handed_over_by_a_request_run_on_the_embedded_worker(lane: Backlane) -> None:
    job = await _deferred_job(lane)
    worker = lane.worker()
    async with anyio.create_task_group() as tg:
        await _started(lane, worker, tg)
        worker.hand_over([job.id])
        with anyio.fail_after(5):
            while (await lane.store.get(job.id)).state is not JobState.SUCCEEDED:  # type: ignore[union-attr]
                await anyio.sleep(0.01)
        worker.stop()
    assert (await lane.job(job.id)).id == job.id
    assert await (await lane.job(job.id)).result(timeout=1) == 5


async def test_jobs_handed_over_to_a_stopping_worker_are_released_not_stranded(
    lane: Backlane,
) -> None:
    job = await _deferred_job(lane)
    worker = lane.worker()
    async with anyio.create_task_group() as tg:
        await _started(lane, worker, tg)
        worker.hand_over([job.id])
        worker.stop()  # before its claim loop saw the hand-over
    assert lane.worker_with_room() is None
    stored = await lane.store.get(job.id)
    assert stored is not None
    # released for any worker to run now, not left for the release grace; or run already
    assert stored.state in (JobState.QUEUED, JobState.SUCCEEDED)


async def test_sync_tasks_use_the_workers_own_threads(lane: Backlane) -> None:
    """Many blocking tasks at once do not take AnyIO's default thread limiter, which a
    FastAPI app's sync endpoints need."""
    blocking = lane.task(t.blocks)
    for _ in range(8):
        await blocking.enqueue(0.3)
    worker = lane.worker(concurrency=8)
    default = anyio.to_thread.current_default_thread_limiter()
    seen: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await anyio.sleep(0.15)
        seen.append(default.borrowed_tokens)
        await anyio.sleep(0.5)
        worker.stop()
    assert seen == [0]
    assert (await lane.store.counts())["default"][JobState.SUCCEEDED] == 8


async def test_quick_def_jobs_are_not_held_up_by_one_that_gets_stuck(lane: Backlane) -> None:
    """Quick ``def`` jobs started together share a thread; one of them that gets stuck
    (and times out) does not make those that ran beside it wait for it, or time out."""
    task = lane.task(t.quick_or_stuck, timeout=0.5, retries=0)
    worker = lane.worker(concurrency=20)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        assert await (await task.enqueue(0)).result(timeout=5) == 0  # now known as quick
        handles = await lane.enqueue_jobs([task.build_job((i,), {}) for i in range(40)])
        with anyio.fail_after(10):
            while (states := await _states(lane, handles)) and not all(
                state.terminal for state in states
            ):
                await anyio.sleep(0.05)
        worker.stop()
    for i, state in enumerate(states):
        assert state is (JobState.FAILED if i % 4 == 3 else JobState.SUCCEEDED), (i, state)


async def _states(lane: Backlane, jobs: list[Job]) -> list[JobState]:
    found = [await lane.store.get(job.id) for job in jobs]
    return [job.state for job in found if job is not None]


async def test_a_def_task_over_its_timeout_sees_its_cancellation(lane: Backlane) -> None:
    """A ``def`` task polling ``anyio.from_thread.check_cancelled()`` stops once its job
    timed out, as it would under ``anyio.to_thread.run_sync``."""
    task = lane.task(t.polls_for_cancel, timeout=0.2, retries=0)
    t.POLLS.clear()
    handle = await task.enqueue()
    await drain(lane)
    assert await handle.status() is JobState.FAILED
    await anyio.sleep(0.3)
    assert 1 <= len(t.POLLS) < 25  # 10 polls in 0.2 s; 50 had it not been told


async def test_dead_workers_jobs_come_back(lane: Backlane) -> None:
    """A claim whose worker never renews its lease is taken again, attempt counted."""
    add = lane.task(t.add)
    handle = await add.enqueue(1, 1)
    now = time.time()
    (held,) = await lane.store.claim(
        worker_id="ghost", queues=None, limit=1, now=now, lease_until=now + 0.3
    )
    assert held.id == handle.id
    worker = lane.worker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        assert await handle.result(timeout=5) == 2
        worker.stop()
    assert (await handle.info()).attempts == 2


async def test_succeeded_and_failed_jobs_kept_for_their_own_periods(lane_url: str) -> None:
    lane = Backlane(lane_url, keep_succeeded=0.2, keep_failed=3600, purge_interval=0.1, retries=0)
    async with lane:
        ok = await lane.task(t.add).enqueue(1, 2)
        bad = await lane.task(t.flaky).enqueue("never", fail_times=9)
        worker = lane.worker()
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(5):
                while await lane.store.get(ok.id) is not None:
                    await anyio.sleep(0.05)
            worker.stop()
        assert await bad.status() is JobState.FAILED  # still there, kept for an hour


def test_settings_come_from_arguments_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKLANE_URL", "memory://")
    monkeypatch.setenv("BACKLANE_LEASE_SECONDS", "7")
    monkeypatch.setenv("BACKLANE_EAGER", "1")
    lane = Backlane(lease_seconds=9)
    assert (lane.url, lane.settings.lease_seconds, lane.eager) == ("memory://", 9, True)
    with pytest.raises(TypeError, match="unknown setting.*lease\\b"):
        Backlane(lease=5)


async def test_running_workers_are_visible_with_the_jobs_they_hold(lane: Backlane) -> None:
    slow = lane.task(t.sleeps)
    handle = await slow.enqueue(0.5)
    worker = lane.worker(concurrency=3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with anyio.fail_after(5):
            while True:
                seen = await lane.store.workers(seen_since=time.time() - 60)
                if seen and seen[0].jobs:
                    break
                await anyio.sleep(0.05)
        assert seen[0].id == worker.id and seen[0].concurrency == 3
        assert seen[0].jobs == (handle.id,)
        worker.stop()
    assert await lane.store.workers(seen_since=0) == []  # gone when it stopped
