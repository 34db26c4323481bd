"""Schedulers fire each slot once, follow the missed-slot policy, and can be paused."""

import math
import time
from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo

import anyio
import pytest

from backlane import Backlane, JobState
from backlane.testing import drain
from tests.integration import schedule_tasks

pytestmark = pytest.mark.anyio

# A whole minute far ahead (2100-01-01T00:00:00Z): the schedules of these tests, declared
# now, are not new at such a slot (a new schedule fires no slot from before it existed).
T0 = 4_102_444_800.0


async def jobs_of(lane: Backlane, name: str) -> list[float]:
    jobs = await lane.store.list_jobs(limit=1000)
    return sorted(j.meta["slot"] for j in jobs if j.meta.get("schedule") == name)


async def test_every_slot_once_however_many_schedulers(lane_url: str) -> None:
    lane = Backlane(lane_url)
    lane.every(60, name="minutely")(schedule_tasks.tick)
    async with lane:
        schedulers = [lane.scheduler() for _ in range(3)]
        for minute in range(5):
            now = T0 + minute * 60 + 0.2
            async with anyio.create_task_group() as tg:
                for s in schedulers:
                    tg.start_soon(s.step, now)
        assert await jobs_of(lane, "minutely") == [T0 + m * 60 for m in range(5)]
        assert sum(s.fired for s in schedulers) == 5


@pytest.mark.parametrize(("missed", "expected_catch_up"), [("run_once", 1), ("skip", 0)])
async def test_downtime_follows_the_missed_policy(
    lane_url: str, missed: str, expected_catch_up: int
) -> None:
    lane = Backlane(lane_url)
    lane.every(60, name="m", missed=missed)(schedule_tasks.tick)  # type: ignore[arg-type]
    async with lane:
        first = lane.scheduler()
        assert await first.step(T0 + 0.5) == 1  # slot T0, on time
        # down for ten slots; another scheduler comes up 30 s after the tenth
        later = lane.scheduler()
        assert await later.step(T0 + 600 + 30) == expected_catch_up
        assert await later.step(T0 + 600 + 40) == 0  # nothing more for the missed slots
        assert await later.step(T0 + 660 + 0.1) == 1  # then the schedule carries on
        slots = await jobs_of(lane, "m")
    caught_up = [T0 + 600] if expected_catch_up else []
    assert slots == [T0, *caught_up, T0 + 660]


async def test_a_quarter_hourly_cron_fires_in_both_repeated_hours(lane_url: str) -> None:
    """On the fall-back night in Berlin 02:00-02:59 happens twice: a schedule every quarter
    hour fires in both (docs/schedules.md). The second four were never fired."""
    berlin = ZoneInfo("Europe/Berlin")
    lane = Backlane(lane_url)
    lane.cron("*/15 * * * *", tz="Europe/Berlin", name="quarterly")(schedule_tasks.tick)
    start = datetime(2099, 10, 25, 1, 45, tzinfo=berlin).timestamp()  # after declaration
    async with lane:
        scheduler = lane.scheduler()
        for step in range(0, 3 * 3600, 300):  # 01:45 CEST to 03:45 CET, every 5 minutes
            await scheduler.step(start + step + 1)
        slots = await jobs_of(lane, "quarterly")
    assert [datetime.fromtimestamp(s, berlin).isoformat()[11:] for s in slots] == [
        "01:45:00+02:00",
        *(f"02:{m:02}:00+02:00" for m in (0, 15, 30, 45)),
        *(f"02:{m:02}:00+01:00" for m in (0, 15, 30, 45)),
        *(f"03:{m:02}:00+01:00" for m in (0, 15, 30)),
    ]


async def test_a_new_schedule_does_not_fire_old_slots(lane_url: str) -> None:
    lane = Backlane(lane_url)
    lane.cron("0 3 * * *", tz="Asia/Shanghai", name="nightly")(schedule_tasks.tick)
    async with lane:
        assert await lane.scheduler().step(T0) == 0  # 03:00 Shanghai was hours ago


async def wait_until(predicate: Callable[[float], bool]) -> None:
    """Sleep in small steps until ``predicate(time.time())`` holds."""
    with anyio.fail_after(10):
        while not predicate(time.time()):
            await anyio.sleep(0.01)


async def test_a_new_schedule_fires_no_slot_from_before_it_was_declared(lane_url: str) -> None:
    """Declared 0.2-0.6 s after a slot, a schedule every 2 s (on time up to 1 s late) fired
    that slot, a slot from before it existed. Its first slot is the one after."""
    lane = Backlane(lane_url)
    async with lane:
        await wait_until(lambda now: 0.2 <= now % 2 < 0.6)
        lane.every(2, name="new")(schedule_tasks.tick)
        now = time.time()
        before = math.floor(now / 2) * 2
        assert now - before <= 1  # the slot before the declaration is within the on-time limit
        assert await lane.scheduler().step(now) == 0
        assert await lane.scheduler().step(before + 2 + 0.1) == 1
        assert await jobs_of(lane, "new") == [before + 2]


async def test_a_known_schedule_declared_again_after_its_slot_fires_it(lane_url: str) -> None:
    """A restart: a schedule that has taken slots before is not new; declared again just
    after a slot (a process started 0.1-0.4 s late), that slot still fires on time."""
    if lane_url == "memory://":
        pytest.skip("a memory store does not outlive its lane")
    first = Backlane(lane_url)
    first.every(1, name="again")(schedule_tasks.tick)
    async with first:
        slot = math.ceil(time.time())
        assert await first.scheduler().step(slot + 0.1) == 1
    second = Backlane(lane_url)
    async with second:
        await wait_until(lambda now: now >= slot + 1 + 0.1)
        second.every(1, name="again")(schedule_tasks.tick)
        now = time.time()
        assert now - (slot + 1) <= 0.4  # on time (a slot may be at most 0.5 s late)
        assert await second.scheduler().step(now) == 1
        assert await jobs_of(second, "again") == [slot, slot + 1]


async def test_paused_schedule_fires_nothing_until_resumed(lane_url: str) -> None:
    lane = Backlane(lane_url)
    lane.every(60, name="p", missed="skip")(schedule_tasks.tick)
    async with lane:
        await lane.pause_schedule("p")
        assert await lane.scheduler().step(T0 + 1) == 0
        assert (await lane.store.schedules())["p"].paused
        await lane.pause_schedule("p", paused=False)
        assert await lane.scheduler().step(T0 + 61) == 1


async def test_scheduled_job_runs(lane_url: str) -> None:
    schedule_tasks.RUNS.clear()
    lane = Backlane(lane_url)
    task = lane.every(1, name="runs")(schedule_tasks.tick)
    slot = math.floor(time.time()) + 1  # the first slot after the declaration
    async with lane:
        await wait_until(lambda now: now >= slot + 0.05)  # it has come: its job may run now
        assert await lane.scheduler().step(slot + 0.05) == 1
        await drain(lane)
        (job,) = await lane.store.list_jobs(task=task.name)
        assert job.state is JobState.SUCCEEDED
    assert schedule_tasks.RUNS == ["tick"]
