"""The Store contract for schedules: a slot is taken once, with its job, in one atomic
step; schedules can be paused before or after they took a slot.

Part of the conformance suite: each test runs once per store in ``STORE_FACTORIES``.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest

from backlane.exceptions import StoreError
from backlane.jobs import JobState
from backlane.stores.base import ScheduleRecord, Store
from tests.stores.test_contract import NOW, add, make_job, take

pytestmark = pytest.mark.anyio

S = JobState
MINUTE = 60.0


async def test_claim_slot_stores_the_job_and_records_the_slot(store: Store) -> None:
    job = make_job(task="app:cleanup", queue="cron")
    assert await store.claim_slot("cleanup", NOW, job) is True
    assert await store.get(job.id) == job
    assert await store.schedules() == {"cleanup": ScheduleRecord(name="cleanup", last_slot=NOW)}
    assert await take(store, queues=["cron"]) == [job.id]


async def test_a_slot_taken_once_is_refused_and_nothing_is_stored(store: Store) -> None:
    first = make_job()
    again = make_job()
    assert await store.claim_slot("cleanup", NOW, first) is True
    assert await store.claim_slot("cleanup", NOW, again) is False
    assert await store.get(again.id) is None
    assert await store.counts() == {"default": {S.QUEUED: 1}}


async def test_a_slot_before_the_latest_taken_is_refused(store: Store) -> None:
    assert await store.claim_slot("cleanup", NOW + MINUTE, make_job()) is True
    late = make_job()
    assert await store.claim_slot("cleanup", NOW, late) is False
    assert await store.get(late.id) is None
    (record,) = (await store.schedules()).values()
    assert record.last_slot == NOW + MINUTE


async def test_later_slots_are_taken_in_turn(store: Store) -> None:
    jobs = [make_job() for _ in range(3)]
    for n, job in enumerate(jobs):
        assert await store.claim_slot("cleanup", NOW + n * MINUTE, job) is True
    assert (await store.schedules())["cleanup"].last_slot == NOW + 2 * MINUTE
    assert sorted(await take(store)) == sorted(job.id for job in jobs)


async def test_schedules_take_their_slots_independently(store: Store) -> None:
    assert await store.claim_slot("a", NOW + MINUTE, make_job()) is True
    assert await store.claim_slot("b", NOW, make_job()) is True
    assert await store.claim_slot("b", NOW + MINUTE, make_job()) is True
    assert await store.schedules() == {
        "a": ScheduleRecord(name="a", last_slot=NOW + MINUTE),
        "b": ScheduleRecord(name="b", last_slot=NOW + MINUTE),
    }


async def test_a_slot_whose_job_cannot_be_stored_is_not_taken(store: Store) -> None:
    existing = await add(store)
    with pytest.raises(StoreError):
        await store.claim_slot("cleanup", NOW, make_job(id=existing.id))
    assert await store.schedules() == {}
    fresh = make_job()
    assert await store.claim_slot("cleanup", NOW, fresh) is True
    assert await store.get(fresh.id) is not None


async def test_a_slot_job_whose_key_is_held_takes_the_slot_and_stores_nothing(
    store: Store,
) -> None:
    holder = await add(store, key="nightly")
    twin = make_job(key="nightly")
    assert await store.claim_slot("cleanup", NOW, twin) is True
    assert await store.get(twin.id) is None
    assert await store.get(holder.id) is not None
    assert (await store.schedules())["cleanup"].last_slot == NOW


async def test_threads_racing_for_the_same_slots_take_each_slot_once(store: Store) -> None:
    slots = [NOW + n * MINUTE for n in range(40)]
    won: list[list[float]] = []

    def scheduler() -> None:
        async def run() -> list[float]:
            return [s for s in slots if await store.claim_slot("tick", s, make_job(meta={"s": s}))]

        won.append(asyncio.run(run()))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(anyio.to_thread.run_sync, scheduler)
    taken = sorted(s for got in won for s in got)
    # Each scheduler tries the slots in order, so the first attempt at a slot always finds
    # no later slot taken: every slot is taken, and by one scheduler only.
    assert taken == slots
    jobs = await store.list_jobs(limit=1000)
    assert sorted(job.meta["s"] for job in jobs) == slots
    assert (await store.schedules())["tick"].last_slot == slots[-1]


async def test_no_schedule_is_known_at_first(store: Store) -> None:
    assert await store.schedules() == {}


async def test_pausing_an_unknown_schedule_records_it(store: Store) -> None:
    await store.pause_schedule("report", True)
    assert await store.schedules() == {"report": ScheduleRecord(name="report", paused=True)}
    await store.pause_schedule("report", False)
    assert await store.schedules() == {"report": ScheduleRecord(name="report", paused=False)}


async def test_pausing_keeps_the_last_slot_and_taking_a_slot_keeps_the_pause(
    store: Store,
) -> None:
    assert await store.claim_slot("report", NOW, make_job()) is True
    await store.pause_schedule("report", True)
    await store.pause_schedule("report", True)
    assert await store.schedules() == {
        "report": ScheduleRecord(name="report", last_slot=NOW, paused=True)
    }
    # claim_slot does not look at the pause (the scheduler does), nor does it lift it.
    assert await store.claim_slot("report", NOW + MINUTE, make_job()) is True
    assert await store.schedules() == {
        "report": ScheduleRecord(name="report", last_slot=NOW + MINUTE, paused=True)
    }
    await store.pause_schedule("report", False)
    assert await store.schedules() == {
        "report": ScheduleRecord(name="report", last_slot=NOW + MINUTE)
    }
