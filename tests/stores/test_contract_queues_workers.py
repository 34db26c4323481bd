"""The Store contract for paused queues (``claim`` takes nothing from them) and workers'
heartbeats.

Part of the conformance suite: each test runs once per store in ``STORE_FACTORIES``.
"""

from __future__ import annotations

import dataclasses

import pytest

from backlane.jobs import JobState
from backlane.stores.base import Store, WorkerRecord
from tests.stores.test_contract import NOW, add, make_job, outcome, state_of, take

pytestmark = pytest.mark.anyio

S = JobState


# -- paused queues -------------------------------------------------------------------------


async def test_no_queue_is_paused_at_first(store: Store) -> None:
    assert await store.paused_queues() == set()


async def test_pause_and_resume_are_idempotent_and_need_no_jobs(store: Store) -> None:
    await store.pause_queue("emails", True)
    await store.pause_queue("emails", True)
    await store.pause_queue("exports", True)
    assert await store.paused_queues() == {"emails", "exports"}
    await store.pause_queue("exports", False)
    await store.pause_queue("exports", False)
    await store.pause_queue("never-paused", False)
    assert await store.paused_queues() == {"emails"}


@pytest.mark.parametrize(
    "queues",
    [None, ["emails"], ["emails", "exports"], ["exports", "emails", "emails"]],
    ids=["any-queue", "the-paused-queue", "several-queues", "repeated-names"],
)
async def test_claim_takes_nothing_from_a_paused_queue(
    store: Store, queues: list[str] | None
) -> None:
    paused = await add(store, queue="emails", priority=10)
    await store.pause_queue("emails", True)
    other = await add(store, queue="exports")
    assert await take(store, queues=queues) == ([] if queues == ["emails"] else [other.id])
    assert await take(store, queues=queues) == []
    assert await state_of(store, paused.id) is S.QUEUED


async def test_a_paused_backlog_does_not_use_up_the_claim_limit(store: Store) -> None:
    await store.enqueue([make_job(queue="emails", priority=5) for _ in range(20)])
    others = await store.enqueue([make_job(queue="exports") for _ in range(3)])
    await store.pause_queue("emails", True)
    assert await take(store, limit=2) == [others[0].id, others[1].id]
    assert await take(store, queues=["emails", "exports"], limit=2) == [others[2].id]


async def test_jobs_enqueued_into_a_paused_queue_wait_for_it_to_resume(store: Store) -> None:
    await store.pause_queue("emails", True)
    low = await add(store, queue="emails", run_at=NOW - 5)
    high = await add(store, queue="emails", priority=3)
    other = await add(store, queue="exports", run_at=NOW - 1)
    assert await take(store, "w1", limit=1) == [other.id]
    assert await take(store, "w1") == []
    await store.pause_queue("emails", False)
    assert await take(store, "w2") == [high.id, low.id]


async def test_pausing_leaves_running_jobs_alone(store: Store) -> None:
    job = await add(store, queue="emails")
    assert await take(store) == [job.id]
    await store.pause_queue("emails", True)
    assert await store.finish([outcome(job.id, S.SUCCEEDED)]) == [job.id]
    assert await state_of(store, job.id) is S.SUCCEEDED
    assert await store.counts() == {"emails": {S.SUCCEEDED: 1}}


async def test_a_waiting_job_freed_while_its_queue_is_paused_stays_unclaimed(
    store: Store,
) -> None:
    first = await add(store, queue="exports")
    second = await add(store, queue="emails", after=first.id)
    await store.pause_queue("emails", True)
    assert await take(store) == [first.id]
    await store.finish([outcome(first.id, S.SUCCEEDED)])
    assert await take(store) == []
    await store.pause_queue("emails", False)
    assert await take(store) == [second.id]


# -- workers -------------------------------------------------------------------------------


def worker(worker_id: str, **changes: object) -> WorkerRecord:
    record = WorkerRecord(id=worker_id, started_at=NOW, seen_at=NOW, concurrency=4)
    return dataclasses.replace(record, **changes)


async def test_no_worker_is_known_at_first(store: Store) -> None:
    assert await store.workers(seen_since=0.0) == []


async def test_beat_records_the_worker_as_described(store: Store) -> None:
    full = worker(
        "host:1:a",
        started_at=NOW - 30,
        seen_at=NOW,
        concurrency=8,
        queues=("emails", "exports"),
        jobs=("j1", "j2"),
        processed=17,
    )
    every_queue = worker("host:2:b", queues=None, jobs=())
    await store.beat(full)
    await store.beat(every_queue)
    assert await store.workers(seen_since=NOW) == [full, every_queue]


async def test_a_later_beat_replaces_the_record(store: Store) -> None:
    await store.beat(worker("w1", jobs=("j1",), processed=1))
    latest = worker("w1", seen_at=NOW + 5, jobs=(), processed=2, queues=("emails",))
    await store.beat(latest)
    assert await store.workers(seen_since=NOW) == [latest]


async def test_workers_come_oldest_started_first(store: Store) -> None:
    young = worker("a-young", started_at=NOW)
    old = worker("z-old", started_at=NOW - 100)
    middle = worker("m-middle", started_at=NOW - 50)
    for record in (young, old, middle):
        await store.beat(record)
    assert await store.workers(seen_since=NOW) == [old, middle, young]


async def test_workers_not_seen_since_are_left_out(store: Store) -> None:
    stale = worker("stale", seen_at=NOW - 61)
    edge = worker("edge", started_at=NOW + 1, seen_at=NOW - 60)
    fresh = worker("fresh", started_at=NOW + 2, seen_at=NOW)
    for record in (stale, edge, fresh):
        await store.beat(record)
    assert await store.workers(seen_since=NOW - 60) == [edge, fresh]
    assert await store.workers(seen_since=NOW - 30) == [fresh]
    back = worker("stale", started_at=NOW + 3, seen_at=NOW + 1)
    await store.beat(back)
    assert await store.workers(seen_since=NOW - 30) == [fresh, back]


async def test_forget_worker_removes_its_record(store: Store) -> None:
    await store.beat(worker("w1"))
    await store.beat(worker("w2", started_at=NOW + 1))
    await store.forget_worker("w1")
    await store.forget_worker("w1")
    await store.forget_worker("unknown")
    assert [w.id for w in await store.workers(seen_since=0.0)] == ["w2"]
