"""The Store contract (``backlane/stores/base.py``), pinned for every store.

Each test runs once per store in ``STORE_FACTORIES``. Times are explicit: the contract
passes ``now`` to every verb, so no test sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Any

import anyio
import pytest

from backlane.exceptions import StoreError
from backlane.jobs import Job, JobState
from backlane.stores.base import Outcome, Store
from backlane.tasks import PRIORITY_RANGE

pytestmark = pytest.mark.anyio

NOW = 1_700_000_000.0
LEASE = 60.0
S = JobState


def make_job(**changes: Any) -> Job:
    """A queued job, due now, with ``changes`` applied."""
    values: dict[str, Any] = {"task": "tests:noop", "payload": "{}", "created_at": NOW}
    values["run_at"] = NOW
    values.update(changes)
    return Job(**values)


async def add(store: Store, **changes: Any) -> Job:
    """Enqueue one job made by ``make_job``; return it as stored."""
    (stored,) = await store.enqueue([make_job(**changes)])
    return stored


async def take(
    store: Store,
    worker: str = "w1",
    *,
    queues: list[str] | None = None,
    limit: int = 100,
    now: float = NOW,
) -> list[str]:
    """Claim for ``worker``; return the ids claimed, in claim order."""
    jobs = await store.claim(
        worker_id=worker, queues=queues, limit=limit, now=now, lease_until=now + LEASE
    )
    return [job.id for job in jobs]


def outcome(job_id: str, state: JobState, worker: str = "w1", **more: Any) -> Outcome:
    return Outcome(job_id=job_id, worker_id=worker, state=state, finished_at=NOW + 1, **more)


async def state_of(store: Store, job_id: str) -> JobState:
    job = await store.get(job_id)
    assert job is not None
    return job.state


# -- enqueue and get ---------------------------------------------------------------------


async def test_enqueue_then_get_keeps_every_field(store: Store) -> None:
    before = await add(store)
    values: dict[str, Any] = {
        "task": "app.tasks:export",
        "payload": '{"args":[1,"two"],"kwargs":{"x":null}}',
        "id": "0123456789abcdef0123456789abcdef",
        "queue": "exports",
        "priority": -3,
        "state": S.DEFERRED,
        "key": "export-42",
        "attempts": 2,
        "run_at": NOW + 12.5,
        "created_at": NOW - 0.25,
        "started_at": NOW - 0.125,
        "finished_at": NOW + 99.0,
        "lease_until": NOW + 30.0,
        "worker_id": "host:123:abc",
        "progress": 0.5,
        "message": "half way, \u00e9t\u00e9 \u2713",
        "result": '"exports/data.csv"',
        "error": {"type": "ValueError", "message": "bad", "traceback": "...", "n": [1, 2.5]},
        "after": before.id,
        "cancel_requested": True,
        "release_at": NOW + 5.0,
        "keep_until": NOW + 86400.0,
        "meta": {"request": "r-1", "nested": {"a": [True, None]}},
        "attempt_history": [{"attempt": 1, "outcome": "retried", "error": {"type": "E"}}],
    }
    assert set(values) == {f.name for f in dataclasses.fields(Job)}, "test every Job field"
    job = Job(**values)

    (stored,) = await store.enqueue([job])

    fetched = await store.get(job.id)
    assert stored == job
    assert fetched == job


async def test_get_of_an_unknown_id_is_none(store: Store) -> None:
    assert await store.get("no-such-job") is None


async def test_stored_jobs_do_not_share_state_with_callers(store: Store) -> None:
    job = make_job(meta={"a": 1})
    (stored,) = await store.enqueue([job])
    job.meta["a"] = 2
    stored.meta["a"] = 3
    fetched = await store.get(job.id)
    assert fetched is not None
    fetched.meta["a"] = 4
    again = await store.get(job.id)
    assert again is not None and again.meta == {"a": 1}


async def test_enqueue_batch_keeps_order(store: Store) -> None:
    jobs = [make_job(task=f"t{i}") for i in range(5)]
    stored = await store.enqueue(jobs)
    assert [job.id for job in stored] == [job.id for job in jobs]
    assert await take(store) == [job.id for job in jobs]


async def test_enqueue_is_all_or_nothing(store: Store) -> None:
    existing = await add(store)
    fresh = make_job()
    with pytest.raises(StoreError):
        await store.enqueue([fresh, make_job(id=existing.id)])
    assert await store.get(fresh.id) is None


async def test_enqueue_of_nothing_stores_nothing(store: Store) -> None:
    assert await store.enqueue([]) == []
    assert await store.counts() == {}


# -- claim ---------------------------------------------------------------------------------


async def test_claim_orders_by_priority_then_run_at_then_enqueue_order(store: Store) -> None:
    a = make_job(priority=0, run_at=NOW - 10)
    b = make_job(priority=5, run_at=NOW - 1)
    c = make_job(priority=0, run_at=NOW - 20)
    d = make_job(priority=0, run_at=NOW - 10)
    e = make_job(priority=5, run_at=NOW - 1)
    f = make_job(priority=-1, run_at=NOW - 100)
    await store.enqueue([a, b, c, d, e, f])
    expected = [b.id, e.id, c.id, a.id, d.id, f.id]
    assert await take(store, limit=3) + await take(store, limit=3) == expected


@pytest.mark.parametrize("queues", [None, ["default"]], ids=["any queue", "given queues"])
async def test_the_lowest_and_highest_priorities_are_stored_and_claimed_in_order(
    store: Store, queues: list[str] | None
) -> None:
    low, high = PRIORITY_RANGE  # all that task options accept
    lowest = await add(store, priority=low)
    later = await add(store, priority=low, run_at=NOW + 60)
    highest = await add(store, priority=high)
    middle = await add(store, priority=0)
    assert await take(store, queues=queues) == [highest.id, middle.id, lowest.id]
    assert await take(store, queues=queues, now=NOW + 60) == [later.id]
    assert (await store.get(lowest.id)).priority == low  # type: ignore[union-attr]


async def test_claim_order_holds_across_queues(store: Store) -> None:
    low = make_job(queue="a", priority=0)
    high = make_job(queue="b", priority=9)
    mid = make_job(queue="c", priority=4)
    await store.enqueue([low, high, mid])
    assert await take(store) == [high.id, mid.id, low.id]


async def test_claim_marks_jobs_running_for_the_worker(store: Store) -> None:
    job = await add(store)
    (claimed,) = await store.claim(
        worker_id="w9", queues=None, limit=1, now=NOW + 3, lease_until=NOW + 33
    )
    assert claimed.id == job.id
    for seen in (claimed, await store.get(job.id)):
        assert seen is not None
        assert seen.state is S.RUNNING
        assert seen.attempts == 1
        assert seen.started_at == NOW + 3
        assert seen.lease_until == NOW + 33
        assert seen.worker_id == "w9"


async def test_a_job_due_later_is_not_claimable_until_due(store: Store) -> None:
    later = await add(store, run_at=NOW + 60)
    now = await add(store, priority=-5)
    assert await take(store) == [now.id]
    assert await take(store, now=NOW + 59.9) == []
    assert await take(store, now=NOW + 60) == [later.id]


async def test_a_higher_priority_job_due_later_does_not_block_others(store: Store) -> None:
    await add(store, priority=10, run_at=NOW + 60)
    due = await add(store, priority=0)
    assert await take(store) == [due.id]


async def test_claim_judges_due_by_the_now_it_is_given(store: Store) -> None:
    """Workers' clocks differ: a claim with an earlier ``now`` than the last one must not
    take a job that is due only by the later clock."""
    urgent = await add(store, priority=9)
    later = await add(store, run_at=NOW + 50)
    assert await take(store, "fast-clock", limit=1, now=NOW + 100) == [urgent.id]
    assert await take(store, "slow-clock", now=NOW) == []
    assert await take(store, "slow-clock", now=NOW + 50) == [later.id]


async def test_claim_takes_only_the_queues_asked_for(store: Store) -> None:
    a = await add(store, queue="a")
    b = await add(store, queue="b")
    c = await add(store, queue="c")
    assert await take(store, queues=["a", "c"]) == [a.id, c.id]
    assert await take(store, queues=["zzz"]) == []
    assert await take(store, queues=[]) == []
    assert await take(store, queues=None) == [b.id]


async def test_claim_takes_at_most_limit(store: Store) -> None:
    await store.enqueue([make_job() for _ in range(5)])
    assert len(await take(store, limit=2)) == 2
    assert len(await take(store, limit=2)) == 2
    assert len(await take(store, limit=2)) == 1
    assert await take(store, limit=0) == []


async def test_a_claimed_job_is_never_claimed_again(store: Store) -> None:
    ids = {job.id for job in await store.enqueue([make_job() for _ in range(10)])}
    first = await take(store, "w1", limit=4)
    second = await take(store, "w2")
    assert set(first) | set(second) == ids
    assert not set(first) & set(second)
    assert await take(store, "w3", now=NOW + 10_000) == []


async def test_concurrent_claims_from_several_threads_and_loops_share_out_jobs(
    store: Store,
) -> None:
    ids = {job.id for job in await store.enqueue([make_job() for _ in range(200)])}
    results: list[list[str]] = []

    def worker(name: str) -> None:
        async def run() -> list[str]:
            got: list[str] = []
            while batch := await take(store, name, limit=3):
                got.extend(batch)
            return got

        results.append(asyncio.run(run()))

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(anyio.to_thread.run_sync, worker, f"w{n}")
    claimed = [job_id for got in results for job_id in got]
    assert len(claimed) == len(set(claimed)) == len(ids)
    assert set(claimed) == ids


# -- after: a job waits for the one before it ------------------------------------------


async def _end_by_finish(store: Store, first: Job, state: JobState) -> None:
    assert await take(store) == [first.id]
    assert await store.finish([outcome(first.id, state)]) == [first.id]


@pytest.mark.parametrize(
    "ending", ["succeeded", "failed", "cancelled", "cancel", "discard", "delete"]
)
async def test_a_waiting_job_is_claimable_once_the_one_before_ends(
    store: Store, ending: str
) -> None:
    first = await add(store, state=S.DEFERRED if ending == "discard" else S.QUEUED)
    then = await add(store, after=first.id)
    assert await take(store) == ([] if ending == "discard" else [first.id])
    if ending in ("succeeded", "failed", "cancelled"):
        assert await store.finish([outcome(first.id, JobState(ending))]) == [first.id]
    elif ending == "cancel":
        assert await store.cancel(first.id, NOW) is S.RUNNING
        assert await take(store) == []  # asked to stop is not ended
        assert await store.finish([outcome(first.id, S.CANCELLED)]) == [first.id]
    elif ending == "discard":
        await store.discard([first.id], NOW)
    else:
        assert await store.delete([first.id]) == 1
    assert await take(store) == [then.id]
    stored = await store.get(then.id)
    assert stored is not None and stored.after is None


async def test_cancelling_a_queued_job_frees_the_one_waiting_for_it(store: Store) -> None:
    first = await add(store, run_at=NOW + 3600)
    then = await add(store, after=first.id)
    assert await store.cancel(first.id, NOW) is S.CANCELLED
    assert await take(store) == [then.id]


async def test_a_retry_of_the_job_before_keeps_the_next_one_waiting(store: Store) -> None:
    first = await add(store)
    then = await add(store, after=first.id)
    assert await take(store) == [first.id]
    await store.finish([outcome(first.id, S.QUEUED, run_at=NOW)])
    assert await take(store) == [first.id]
    assert then.id not in await take(store)


async def test_three_chained_jobs_run_one_after_another(store: Store) -> None:
    a = make_job()
    b = make_job(after=a.id)
    c = make_job(after=b.id)
    await store.enqueue([a, b, c])
    for current, state in ((a, S.SUCCEEDED), (b, S.FAILED), (c, S.SUCCEEDED)):
        assert await take(store, now=NOW + 10) == [current.id]
        assert await take(store, now=NOW + 10) == []
        assert await store.finish([outcome(current.id, state)]) == [current.id]
    assert await take(store, now=NOW + 10) == []


async def test_jobs_freed_by_a_finish_and_claim_are_claimable_after_it(store: Store) -> None:
    # a successor freed, and a retry due now, by the outcomes of the same call that claims:
    # that call may return them or not, but they must not be lost to later claims
    a, b = make_job(), make_job()
    successor = make_job(after=a.id)
    await store.enqueue([a, b, successor])
    assert await take(store, limit=2) == [a.id, b.id]
    outcomes = [outcome(a.id, S.SUCCEEDED), outcome(b.id, S.QUEUED, run_at=NOW)]
    applied, claimed = await store.finish_and_claim(
        outcomes, worker_id="w1", queues=None, limit=5, now=NOW + 1, lease_until=NOW + LEASE
    )
    assert sorted(applied) == sorted([a.id, b.id])
    later = await take(store, now=NOW + 2)
    assert sorted([job.id for job in claimed] + later) == sorted([b.id, successor.id])


async def test_after_naming_an_ended_or_unknown_job_waits_for_nothing(store: Store) -> None:
    ended = await add(store)
    await _end_by_finish(store, ended, S.SUCCEEDED)
    (one,) = await store.enqueue([make_job(after=ended.id)])
    (two,) = await store.enqueue([make_job(after="never-stored")])
    assert one.after is None and two.after is None
    assert await take(store) == [one.id, two.id]


async def test_after_naming_a_job_replaced_by_its_key_holder_waits_for_the_holder(
    store: Store,
) -> None:
    holder = await add(store, key="k")
    duplicate = make_job(key="k")
    then = make_job(after=duplicate.id)
    stored = await store.enqueue([duplicate, then])
    assert stored[0].id == holder.id
    assert stored[1].after == holder.id
    assert await take(store) == [holder.id]
    await store.finish([outcome(holder.id, S.SUCCEEDED)])
    assert await take(store) == [then.id]


# -- deferred jobs -----------------------------------------------------------------------


async def test_a_deferred_job_is_claimable_only_once_released(store: Store) -> None:
    job = await add(store, state=S.DEFERRED)
    assert await take(store) == []
    await store.release([job.id, "unknown"])
    assert await state_of(store, job.id) is S.QUEUED
    assert await take(store) == [job.id]


async def test_release_leaves_jobs_that_are_not_deferred_alone(store: Store) -> None:
    running = await add(store)
    await take(store)
    queued = await add(store, run_at=NOW + 60)
    await store.release([running.id, queued.id])
    assert await state_of(store, running.id) is S.RUNNING
    assert await state_of(store, queued.id) is S.QUEUED


async def _release_and_claim(
    store: Store, release: list[str], *, limit: int = 100, queues: list[str] | None = None
) -> list[str]:
    _, claimed = await store.finish_and_claim(
        [],
        worker_id="w1",
        queues=queues,
        limit=limit,
        now=NOW + 1,
        lease_until=NOW + LEASE,
        release=release,
    )
    return [job.id for job in claimed]


async def test_finish_and_claim_releases_then_claims_in_claim_order(store: Store) -> None:
    queued = await add(store, priority=0)
    low = await add(store, state=S.DEFERRED, priority=-1)
    high = await add(store, state=S.DEFERRED, priority=5)
    claimed = await _release_and_claim(store, [low.id, high.id, "unknown"])
    assert claimed == [high.id, queued.id, low.id]
    for job in (queued, low, high):
        stored = await store.get(job.id)
        assert stored is not None
        assert (stored.state, stored.worker_id, stored.attempts) == (S.RUNNING, "w1", 1)
        assert stored.started_at == NOW + 1 and stored.lease_until == NOW + LEASE


async def test_finish_and_claim_gives_a_full_claim_to_the_first_in_claim_order(
    store: Store,
) -> None:
    # released jobs compete with queued ones: a released job of higher priority is taken
    # before a queued one, and those that find no room are queued, not lost
    first, second = await add(store, priority=1), await add(store, priority=0)
    urgent = await add(store, state=S.DEFERRED, priority=9)
    later = await add(store, state=S.DEFERRED, priority=0)
    assert await _release_and_claim(store, [urgent.id, later.id], limit=2) == [urgent.id, first.id]
    assert await state_of(store, later.id) is S.QUEUED
    assert await take(store, now=NOW + 2) == [second.id, later.id]


async def test_finish_and_claim_queues_released_jobs_it_may_not_take(store: Store) -> None:
    waiting_for = await add(store, queue="other")
    chained = await add(store, state=S.DEFERRED, after=waiting_for.id)
    delayed = await add(store, state=S.DEFERRED, run_at=NOW + 60)
    elsewhere = await add(store, state=S.DEFERRED, queue="other")
    await store.pause_queue("paused", True)
    paused = await add(store, state=S.DEFERRED, queue="paused")
    more = [await add(store, state=S.DEFERRED) for _ in range(3)]
    released = [chained.id, delayed.id, elsewhere.id, paused.id, *(job.id for job in more)]
    claimed = await _release_and_claim(store, released, limit=2, queues=["default", "paused"])
    assert claimed == [more[0].id, more[1].id]
    for job in (chained, delayed, elsewhere, paused, more[2]):
        assert await state_of(store, job.id) is S.QUEUED
    assert await take(store, queues=["default"], now=NOW + 2) == [more[2].id]


async def test_finish_and_claim_returns_released_jobs_as_they_are_stored(store: Store) -> None:
    # what the claim hands the worker is the stored job, whatever changed since it was
    # stored: a predecessor ended (its successor freed), a sibling cancelled
    first = await add(store)
    chained = await add(
        store,
        state=S.DEFERRED,
        after=first.id,
        priority=3,
        payload='{"to":"ann@example.com"}',
        meta={"otel": {"traceparent": "00-1-2-01"}},
    )
    plain = await add(store, state=S.DEFERRED, key="welcome:ann")
    cancelled = await add(store, state=S.DEFERRED)
    assert await take(store) == [first.id]
    await store.finish([outcome(first.id, S.SUCCEEDED)])
    await store.cancel(cancelled.id, NOW + 1)
    _, claimed = await store.finish_and_claim(
        [],
        worker_id="w1",
        queues=None,
        limit=10,
        now=NOW + 2,
        lease_until=NOW + 2 + LEASE,
        release=[plain.id, chained.id, cancelled.id],
    )
    assert [job.id for job in claimed] == [chained.id, plain.id]
    for job in claimed:
        assert job == await store.get(job.id)
        assert (job.state, job.attempts, job.after, job.worker_id) == (S.RUNNING, 1, None, "w1")
    assert await state_of(store, cancelled.id) is S.CANCELLED


async def test_discard_ends_deferred_jobs_only(store: Store) -> None:
    deferred = await add(store, state=S.DEFERRED)
    queued = await add(store)
    await store.discard([deferred.id, queued.id, "unknown"], NOW + 2)
    gone = await store.get(deferred.id)
    assert gone is not None
    assert gone.state is S.DISCARDED and gone.finished_at == NOW + 2
    assert await state_of(store, queued.id) is S.QUEUED
    assert await take(store) == [queued.id]


async def test_a_deferred_job_past_release_at_is_queued_by_requeue_expired(
    store: Store,
) -> None:
    job = await add(store, state=S.DEFERRED, release_at=NOW + 30)
    never = await add(store, state=S.DEFERRED)
    assert await store.requeue_expired(NOW + 29) == 0
    assert await state_of(store, job.id) is S.DEFERRED
    assert await store.requeue_expired(NOW + 31) == 1
    assert await take(store, now=NOW + 31) == [job.id]
    assert await state_of(store, never.id) is S.DEFERRED


# -- idempotency keys --------------------------------------------------------------------


async def test_a_taken_key_returns_the_holder_and_stores_nothing(store: Store) -> None:
    first = await add(store, key="welcome:ann")
    second = make_job(key="welcome:ann", task="other")
    (returned,) = await store.enqueue([second])
    assert returned == await store.get(first.id)
    assert await store.get(second.id) is None
    assert await store.counts() == {"default": {S.QUEUED: 1}}


async def test_a_key_repeated_within_one_batch_is_stored_once(store: Store) -> None:
    a, b, c = make_job(key="k"), make_job(key="k"), make_job(key="other")
    stored = await store.enqueue([a, b, c])
    assert [job.id for job in stored] == [a.id, a.id, c.id]
    assert await store.get(b.id) is None


@pytest.mark.parametrize("holder_state", [S.DEFERRED, S.QUEUED, S.RUNNING])
async def test_every_active_state_holds_its_key(store: Store, holder_state: JobState) -> None:
    first = await add(store, key="k", state=S.DEFERRED if holder_state is S.DEFERRED else S.QUEUED)
    if holder_state is S.RUNNING:
        await take(store)
    (returned,) = await store.enqueue([make_job(key="k")])
    assert returned.id == first.id and returned.state is holder_state


@pytest.mark.parametrize("ending", ["finish", "cancel", "discard"])
async def test_a_key_is_free_again_once_its_job_ended(store: Store, ending: str) -> None:
    first = await add(store, key="k", state=S.DEFERRED if ending == "discard" else S.QUEUED)
    if ending == "finish":
        await _end_by_finish(store, first, S.SUCCEEDED)
    elif ending == "cancel":
        await store.cancel(first.id, NOW)
    else:
        await store.discard([first.id], NOW)
    later = make_job(key="k")
    (stored,) = await store.enqueue([later])
    assert stored.id == later.id
    (again,) = await store.enqueue([make_job(key="k")])
    assert again.id == later.id


async def test_jobs_without_a_key_never_collide(store: Store) -> None:
    stored = await store.enqueue([make_job(), make_job()])
    assert len({job.id for job in stored}) == 2


# -- leases ------------------------------------------------------------------------------


async def test_renew_extends_only_the_leases_the_worker_holds(store: Store) -> None:
    mine = await add(store)
    theirs = await add(store)
    assert await take(store, "w1", limit=1) == [mine.id]
    assert await take(store, "w2", limit=1) == [theirs.id]
    ids = [mine.id, theirs.id, "unknown"]
    assert await store.renew_leases(worker_id="w1", ids=ids, lease_until=NOW + 500) == set()
    renewed, untouched = await store.get(mine.id), await store.get(theirs.id)
    assert renewed is not None and renewed.lease_until == NOW + 500
    assert untouched is not None and untouched.lease_until == NOW + LEASE


async def test_requeue_expired_queues_running_jobs_whose_lease_ended(store: Store) -> None:
    lost = await add(store)
    kept = await add(store)
    await take(store, "w1", limit=1)
    await take(store, "w2", limit=1, now=NOW + 50)
    assert await store.requeue_expired(NOW + LEASE) == 0
    assert await store.requeue_expired(NOW + LEASE + 1) == 1
    job = await store.get(lost.id)
    assert job is not None
    assert job.state is S.QUEUED and job.attempts == 1 and job.worker_id is None
    assert await state_of(store, kept.id) is S.RUNNING
    (again,) = await store.claim(
        worker_id="w3", queues=None, limit=5, now=NOW + 61, lease_until=NOW + 200
    )
    assert again.id == lost.id and again.attempts == 2


async def test_a_worker_that_lost_its_lease_changes_nothing(store: Store) -> None:
    job = await add(store)
    await take(store, "w1")
    await store.requeue_expired(NOW + LEASE + 1)
    await take(store, "w2", now=NOW + LEASE + 2)
    lost_hold = await store.renew_leases(worker_id="w1", ids=[job.id], lease_until=NOW + 999)
    assert lost_hold == set()
    await store.set_progress(job.id, worker_id="w1", progress=0.9, message="stale")
    await store.hand_back(worker_id="w1", ids=[job.id])
    assert await store.finish([outcome(job.id, S.SUCCEEDED, "w1")]) == []
    now = await store.get(job.id)
    assert now is not None
    assert now.state is S.RUNNING and now.worker_id == "w2" and now.attempts == 2
    assert now.lease_until == NOW + LEASE + 2 + LEASE and now.progress is None


# -- finish ------------------------------------------------------------------------------


async def test_finish_succeeded_records_the_result(store: Store) -> None:
    job = await add(store)
    await take(store)
    done = outcome(job.id, S.SUCCEEDED, result='{"ok":true}', keep_until=NOW + 3600)
    assert await store.finish([done]) == [job.id]
    stored = await store.get(job.id)
    assert stored is not None
    assert stored.state is S.SUCCEEDED
    assert stored.result == '{"ok":true}'
    assert stored.finished_at == NOW + 1
    assert stored.keep_until == NOW + 3600
    assert stored.lease_until is None
    assert stored.attempts == 1


@pytest.mark.parametrize("state", [S.FAILED, S.CANCELLED])
async def test_finish_failed_or_cancelled_records_the_error(store: Store, state: JobState) -> None:
    job = await add(store)
    await take(store)
    error = {"type": "KeyError", "message": "'x'", "traceback": "Traceback ..."}
    assert await store.finish([outcome(job.id, state, error=error)]) == [job.id]
    stored = await store.get(job.id)
    assert stored is not None
    assert stored.state is state and stored.error == error and stored.finished_at == NOW + 1
    assert await take(store, now=NOW + 10_000) == []


async def test_finish_queued_runs_the_job_again_at_run_at(store: Store) -> None:
    job = await add(store)
    await take(store)
    error = {"type": "TimeoutError", "message": "slow"}
    retry = outcome(job.id, S.QUEUED, error=error, run_at=NOW + 30)
    assert await store.finish([retry]) == [job.id]
    stored = await store.get(job.id)
    assert stored is not None
    assert stored.state is S.QUEUED and stored.run_at == NOW + 30 and stored.error == error
    assert stored.worker_id is None and stored.lease_until is None and stored.attempts == 1
    assert await take(store, now=NOW + 29) == []
    (again,) = await store.claim(
        worker_id="w2", queues=None, limit=1, now=NOW + 30, lease_until=NOW + 90
    )
    assert again.id == job.id and again.attempts == 2


async def test_finish_applies_only_outcomes_of_jobs_the_worker_holds(store: Store) -> None:
    a, b, c = await store.enqueue([make_job(), make_job(), make_job()])
    await take(store, "w1", limit=2)
    outcomes = [
        outcome(a.id, S.SUCCEEDED, "w1"),
        outcome(b.id, S.SUCCEEDED, "w2"),
        outcome(c.id, S.SUCCEEDED, "w1"),
        outcome("unknown", S.SUCCEEDED, "w1"),
        outcome(a.id, S.FAILED, "w1"),
    ]
    assert await store.finish(outcomes) == [a.id]
    assert await state_of(store, a.id) is S.SUCCEEDED
    assert await state_of(store, b.id) is S.RUNNING
    assert await state_of(store, c.id) is S.QUEUED


def _as_stored(text: str) -> str:
    """``text`` as a store that cannot hold the character NUL or a lone surrogate
    (PostgreSQL) keeps it: each as U+FFFD, the replacement character."""
    return re.sub("[\x00\ud800-\udfff]", "\ufffd", text)


@pytest.mark.parametrize(
    "odd",
    [
        "\x00",  # int("12\x00")-like messages: a task that parses binary data raises them
        "\udcff",  # a file name decoded with surrogateescape (os.listdir on Linux)
    ],
    ids=["NUL", "lone surrogate"],
)
async def test_an_error_holding_a_character_utf8_cannot_carry_is_recorded_with_the_rest(
    store: Store, odd: str
) -> None:
    failing, passing = await store.enqueue([make_job(), make_job()])
    await take(store)
    message = f"bad {odd} name"
    error = {"type": "ValueError", "message": message, "traceback": f"ValueError: {message}"}
    record = {"attempt": 1, "outcome": "failed", "error": {"message": message}}
    outcomes = [
        outcome(failing.id, S.FAILED, error=error, attempt=record),
        outcome(passing.id, S.SUCCEEDED, result='"ok"'),
    ]
    assert await store.finish(outcomes) == [failing.id, passing.id]
    failed = await store.get(failing.id)
    assert failed is not None and failed.state is S.FAILED and failed.error is not None
    assert _as_stored(failed.error["message"]) == _as_stored(message)
    assert _as_stored(failed.attempt_history[0]["error"]["message"]) == _as_stored(message)
    assert await state_of(store, passing.id) is S.SUCCEEDED


async def test_finish_refuses_an_outcome_that_neither_ends_nor_retries(store: Store) -> None:
    job = await add(store)
    await take(store)
    with pytest.raises(StoreError):
        await store.finish([outcome(job.id, S.SUCCEEDED), outcome(job.id, S.RUNNING)])
    assert await state_of(store, job.id) is S.RUNNING


# -- hand back ---------------------------------------------------------------------------


async def test_hand_back_queues_the_job_without_counting_the_attempt(store: Store) -> None:
    job = await add(store)
    other = await add(store)
    await take(store, "w1", limit=1)
    await take(store, "w2", limit=1)
    await store.hand_back(worker_id="w1", ids=[job.id, other.id])
    stored = await store.get(job.id)
    assert stored is not None
    assert stored.state is S.QUEUED and stored.attempts == 0 and stored.worker_id is None
    assert await state_of(store, other.id) is S.RUNNING
    (again,) = await store.claim(
        worker_id="w3", queues=None, limit=1, now=NOW, lease_until=NOW + 60
    )
    assert again.id == job.id and again.attempts == 1


# -- cancel ------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [S.QUEUED, S.DEFERRED])
async def test_cancel_ends_a_waiting_job(store: Store, state: JobState) -> None:
    job = await add(store, state=state)
    assert await store.cancel(job.id, NOW + 4) is S.CANCELLED
    stored = await store.get(job.id)
    assert stored is not None and stored.state is S.CANCELLED and stored.finished_at == NOW + 4
    await store.release([job.id])
    assert await take(store) == []


async def test_cancel_asks_a_running_job_to_stop(store: Store) -> None:
    job = await add(store)
    other = await add(store)
    await take(store)
    ids = [job.id, other.id]
    assert await store.renew_leases(worker_id="w1", ids=ids, lease_until=NOW + 70) == set()
    assert await store.cancel(job.id, NOW) is S.RUNNING
    stored = await store.get(job.id)
    assert stored is not None and stored.state is S.RUNNING and stored.cancel_requested
    assert await store.renew_leases(worker_id="w1", ids=ids, lease_until=NOW + 80) == {job.id}
    assert await store.renew_leases(worker_id="w2", ids=ids, lease_until=NOW + 80) == set()


async def test_cancel_leaves_an_ended_job_as_it_is(store: Store) -> None:
    job = await add(store)
    await _end_by_finish(store, job, S.SUCCEEDED)
    assert await store.cancel(job.id, NOW) is S.SUCCEEDED
    assert await state_of(store, job.id) is S.SUCCEEDED


async def test_cancel_of_an_unknown_job_is_none(store: Store) -> None:
    assert await store.cancel("unknown", NOW) is None


# -- retry by hand -----------------------------------------------------------------------


@pytest.mark.parametrize("state", [S.FAILED, S.CANCELLED])
async def test_retry_queues_a_failed_or_cancelled_job_again(store: Store, state: JobState) -> None:
    job = await add(store)
    await _end_by_finish(store, job, state)
    assert await store.retry(job.id, NOW + 100) is True
    stored = await store.get(job.id)
    assert stored is not None
    assert stored.state is S.QUEUED and stored.run_at == NOW + 100
    assert stored.finished_at is None and not stored.cancel_requested
    assert await take(store, now=NOW + 99) == []
    assert await take(store, now=NOW + 100) == [job.id]


async def test_retry_refuses_jobs_in_other_states(store: Store) -> None:
    done = await add(store)
    await _end_by_finish(store, done, S.SUCCEEDED)
    running = await add(store)
    await take(store)
    queued = await add(store, run_at=NOW + 60)
    for job_id in (done.id, running.id, queued.id, "unknown"):
        assert await store.retry(job_id, NOW) is False
    assert await state_of(store, done.id) is S.SUCCEEDED


async def test_retry_refuses_a_job_whose_key_was_taken_since(store: Store) -> None:
    failed = await add(store, key="k")
    await _end_by_finish(store, failed, S.FAILED)
    await add(store, key="k")
    assert await store.retry(failed.id, NOW) is False
    assert await state_of(store, failed.id) is S.FAILED


# -- progress, delete, purge -------------------------------------------------------------


async def test_set_progress_records_progress_of_a_held_job(store: Store) -> None:
    job = await add(store)
    await take(store)
    await store.set_progress(job.id, worker_id="w1", progress=0.25, message="a quarter")
    await store.set_progress(job.id, worker_id="w2", progress=0.75, message="not mine")
    await store.set_progress("unknown", worker_id="w1", progress=0.5, message=None)
    stored = await store.get(job.id)
    assert stored is not None and (stored.progress, stored.message) == (0.25, "a quarter")


async def test_progress_whose_message_holds_a_nul_character_is_recorded(store: Store) -> None:
    job = await add(store)
    await take(store)
    await store.set_progress(job.id, worker_id="w1", progress=0.5, message="row \x00 read")
    stored = await store.get(job.id)
    assert stored is not None and stored.progress == 0.5
    assert _as_stored(stored.message or "") == _as_stored("row \x00 read")


async def test_delete_removes_jobs_in_any_state(store: Store) -> None:
    running = await add(store)
    await take(store)
    deferred = await add(store, state=S.DEFERRED, key="k")
    kept = await add(store)
    assert await store.delete([running.id, deferred.id, "unknown"]) == 2
    assert await store.get(running.id) is None and await store.get(deferred.id) is None
    assert await store.get(kept.id) is not None
    assert await store.delete([]) == 0
    (fresh,) = await store.enqueue([make_job(key="k")])
    assert await store.get(fresh.id) is not None


async def _ended(store: Store, state: JobState, *, at: float, keep: float | None) -> Job:
    job = await add(store)
    await take(store)
    ended = Outcome(job_id=job.id, worker_id="w1", state=state, finished_at=at, keep_until=keep)
    assert await store.finish([ended]) == [job.id]
    return job


async def test_purge_removes_ended_jobs_past_keep_until(store: Store) -> None:
    old = await _ended(store, S.SUCCEEDED, at=NOW, keep=NOW + 10)
    young = await _ended(store, S.FAILED, at=NOW, keep=NOW + 20)
    forever = await _ended(store, S.FAILED, at=NOW, keep=None)
    active = await add(store)
    assert await store.purge(before=NOW + 20) == 1
    assert await store.get(old.id) is None
    for job in (young, forever, active):
        assert await store.get(job.id) is not None


async def test_purge_by_state_removes_jobs_that_ended_before(store: Store) -> None:
    failed_early = await _ended(store, S.FAILED, at=NOW, keep=NOW + 10_000)
    failed_late = await _ended(store, S.FAILED, at=NOW + 50, keep=None)
    succeeded = await _ended(store, S.SUCCEEDED, at=NOW, keep=None)
    active = await add(store)
    assert await store.purge(before=NOW + 50, states=[S.FAILED, S.QUEUED]) == 1
    assert await store.get(failed_early.id) is None
    for job in (failed_late, succeeded, active):
        assert await store.get(job.id) is not None
    assert await store.purge(before=NOW + 51, states=[S.QUEUED]) == 0


async def test_purge_removes_any_number_of_jobs(store: Store) -> None:
    n = 2_345
    await store.enqueue([make_job() for _ in range(n)])
    claimed = await take(store, limit=n)
    outcomes = [outcome(job_id, S.SUCCEEDED, keep_until=NOW) for job_id in claimed]
    assert len(await store.finish(outcomes)) == n
    assert await store.purge(before=NOW + 1) == n
    assert await store.counts() == {}


# -- read side ---------------------------------------------------------------------------


async def test_list_jobs_filters_and_pages_newest_first(store: Store) -> None:
    jobs = [
        make_job(task="a", queue="q1", created_at=NOW + 1),
        make_job(task="b", queue="q1", created_at=NOW + 3),
        make_job(task="a", queue="q2", created_at=NOW + 2),
        make_job(task="a", queue="q1", created_at=NOW + 3),
        make_job(task="b", queue="q2", created_at=NOW + 0, state=S.DEFERRED),
    ]
    await store.enqueue(jobs)
    j = [job.id for job in jobs]

    async def ids(**filters: Any) -> list[str]:
        return [job.id for job in await store.list_jobs(**filters)]

    assert await ids() == [j[3], j[1], j[2], j[0], j[4]]
    assert await ids(limit=2) == [j[3], j[1]]
    assert await ids(limit=2, offset=2) == [j[2], j[0]]
    assert await ids(offset=4) == [j[4]]
    assert await ids(task="a") == [j[3], j[2], j[0]]
    assert await ids(queue="q2") == [j[2], j[4]]
    assert await ids(state=S.DEFERRED) == [j[4]]
    assert await ids(state=S.QUEUED, task="a", queue="q1") == [j[3], j[0]]
    assert await ids(task="none") == []
    listed = await store.list_jobs(limit=1)
    assert listed == [await store.get(j[3])]


async def test_list_jobs_pages_through_every_job_once(store: Store) -> None:
    jobs = [make_job(created_at=NOW + i // 3) for i in range(30)]  # ties: latest stored first
    await store.enqueue(jobs)
    pages = [await store.list_jobs(limit=7, offset=offset) for offset in range(0, 35, 7)]
    assert [job.id for page in pages for job in page] == [job.id for job in reversed(jobs)]


@pytest.mark.parametrize(
    "filters",
    [{}, {"state": S.QUEUED}, {"task": "y"}, {"queue": "q2", "state": S.DEFERRED},
     {"text": "y"}, {"text": "Y", "state": S.QUEUED}],
    ids=["none", "state", "task", "queue-state", "text", "text-state"],
)  # fmt: skip
async def test_list_jobs_pages_through_the_matching_jobs_once(
    store: Store, filters: dict[str, Any]
) -> None:
    jobs = [
        make_job(
            task="xy"[i % 2],  # not a hex digit: the text matches no id
            queue=f"q{i % 3}",
            state=S.DEFERRED if i % 4 == 0 else S.QUEUED,
            created_at=NOW + i // 5,  # ties: latest stored first
        )
        for i in range(40)
    ]
    await store.enqueue(jobs)

    def wanted(job: Job) -> bool:
        text = str(filters.get("text", "")).lower()
        return (
            all(getattr(job, name) == value for name, value in filters.items() if name != "text")
            and text in job.task
        )

    expected = [job.id for job in reversed(jobs) if wanted(job)]
    pages = [await store.list_jobs(limit=3, offset=offset, **filters) for offset in range(0, 42, 3)]
    assert [job.id for page in pages for job in page] == expected


async def test_counts_per_queue_and_state(store: Store) -> None:
    assert await store.counts() == {}
    await store.enqueue([make_job(queue="q1") for _ in range(3)])
    await store.enqueue([make_job(queue="q2", state=S.DEFERRED)])
    (running,) = await take(store, queues=["q1"], limit=1)
    await store.finish([outcome(running, S.FAILED)])
    assert await store.counts() == {
        "q1": {S.QUEUED: 2, S.FAILED: 1},
        "q2": {S.DEFERRED: 1},
    }
    await take(store, queues=["q1"], limit=1)
    assert await store.counts() == {
        "q1": {S.QUEUED: 1, S.RUNNING: 1, S.FAILED: 1},
        "q2": {S.DEFERRED: 1},
    }


async def test_open_and_close_are_idempotent(store: Store) -> None:
    await store.open()
    await store.open()
    job = await add(store)
    assert await store.get(job.id) is not None


async def test_a_progress_message_holding_a_lone_surrogate_is_kept_as_u_fffd(
    store: Store,
) -> None:
    # a file name decoded with surrogateescape, reported by ctx.progress(): the task must
    # not fail for it, and every store keeps the same text
    (job,) = await store.enqueue([make_job()])
    await take(store)
    await store.set_progress(job.id, worker_id="w1", progress=0.5, message="read \udcff.csv")
    stored = await store.get(job.id)
    assert stored is not None and stored.message == "read \ufffd.csv"
