"""What the Redis store's ``stats`` promises beyond the contract: the minutes of the last
two hours come from per-minute tallies, in one call whatever the number of jobs, which
expire on their own and leave nothing behind once their jobs are gone; the rest is
counted from the jobs, and the two never count a job twice."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from backlane.jobs import JobState
from backlane.stores.base import Outcome, StatsBucket
from backlane.stores.memory import MemoryStore
from backlane.stores.redis import RedisStore
from backlane.stores.redis_link import command
from tests.stores.conftest import redis_store
from tests.stores.test_contract import LEASE, make_job

pytestmark = pytest.mark.anyio

S = JobState
KEPT = 7200.0
"""How long the tallies of a minute are kept after it starts (``ENDS_KEPT``)."""


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RedisStore]:
    async with redis_store(tmp_path) as opened:
        assert isinstance(opened, RedisStore)
        yield opened


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[float, float]]]:
    """The ``[since, until)`` spans ``stats`` counts from the jobs themselves."""
    seen: list[tuple[float, float]] = []
    scan = RedisStore._scan_stats

    async def recorded(
        self: RedisStore, buckets: Any, since: float, until: float, width: float
    ) -> None:
        seen.append((since, until))
        await scan(self, buckets, since, until, width)

    monkeypatch.setattr(RedisStore, "_scan_stats", recorded)
    yield seen


def _minute_ago(minutes: float) -> float:
    return math.floor(time.time() / 60) * 60 - minutes * 60


async def _end(
    stores: list[Any], n: int, *, ended: float, state: JobState = S.SUCCEEDED, wait: float = 0.5
) -> list[str]:
    """``n`` jobs due at ``ended - 1 - wait``, started ``wait`` later, ended at ``ended``,
    in each of ``stores``."""
    jobs = [make_job(run_at=ended - 1 - wait, created_at=ended - 2 - wait) for _ in range(n)]
    for target in stores:
        await target.enqueue([job.copy() for job in jobs])
        started = ended - 1
        claimed = await target.claim(
            worker_id="w1", queues=None, limit=n, now=started, lease_until=started + LEASE
        )
        outcomes = [Outcome(job.id, "w1", state, ended) for job in claimed]
        assert len(await target.finish(outcomes)) == n
    return [job.id for job in jobs]


async def _tally_keys(store: RedisStore) -> list[str]:
    link = await store._links.get()
    return sorted(await command(link, "KEYS", store.prefix + "ends*"))


async def test_the_last_hour_by_minutes_is_read_without_reading_a_job(
    store: RedisStore, scans: list[tuple[float, float]]
) -> None:
    memory = MemoryStore()
    for minutes in range(0, 60, 7):
        await _end([store, memory], 30, ended=_minute_ago(minutes) + 1.5 * minutes)
    await _end([store, memory], 5, ended=_minute_ago(3) + 7, state=S.FAILED, wait=2.0)
    since = _minute_ago(59)
    for width in (60.0, 300.0, 3600.0):
        got = await store.stats(since=since, width=width)
        assert got == await memory.stats(since=since, width=width)
    assert sum(b.succeeded for b in got) == 270 and sum(b.failed for b in got) == 5
    assert scans == []


async def test_a_since_inside_a_minute_reads_that_part_of_it_from_the_jobs(
    store: RedisStore, scans: list[tuple[float, float]]
) -> None:
    memory = MemoryStore()
    minute = _minute_ago(10)
    for at in (minute + 5, minute + 20, minute + 59.5, minute + 61):
        await _end([store, memory], 2, ended=at)
    since = minute + 20
    assert await store.stats(since=since, width=60.0) == await memory.stats(since=since, width=60.0)
    assert scans == [(since, minute + 60)]


async def test_minutes_older_than_the_tallies_are_counted_from_the_jobs_once(
    store: RedisStore, scans: list[tuple[float, float]]
) -> None:
    memory = MemoryStore()
    old, recent = _minute_ago(180), _minute_ago(5)
    await _end([store, memory], 3, ended=old + 10)
    await _end([store, memory], 4, ended=recent + 10)
    assert await _tally_keys(store) == [
        store.prefix + "ends",
        f"{store.prefix}ends:{recent:.0f}",
    ]
    for since in (0.0, old, old + 30):
        got = await store.stats(since=since, width=60.0)
        assert got == await memory.stats(since=since, width=60.0)
    assert [b.succeeded for b in got] == [4]
    first_kept = scans[0][1]
    assert all(until == first_kept for _, until in scans)
    assert recent > first_kept > time.time() - KEPT


async def test_a_minutes_tallies_expire_two_hours_after_it_starts(store: RedisStore) -> None:
    minute = _minute_ago(30)
    await _end([store], 2, ended=minute + 1)
    link = await store._links.get()
    ttl = await command(link, "TTL", f"{store.prefix}ends:{minute:.0f}")
    assert abs(ttl - (minute + KEPT - time.time())) < 5


async def test_a_minute_whose_jobs_are_all_gone_leaves_no_tally(store: RedisStore) -> None:
    minute = _minute_ago(20)
    succeeded = await _end([store], 3, ended=minute + 1)
    failed = await _end([store], 2, ended=minute + 2, state=S.FAILED)
    cancelled = await _end([store], 2, ended=minute + 3, state=S.CANCELLED)
    assert len(await _tally_keys(store)) == 2
    assert await store.delete(succeeded[:2]) == 2
    assert await store.purge(before=minute + 1.5, states=[S.SUCCEEDED]) == 1
    assert await store.retry(failed[0], minute + 10)
    assert await store.delete(failed[1:]) == 1
    assert await store.stats(since=0.0, width=60.0) == [
        StatsBucket(start=minute, cancelled=2, wait_total=1.0, wait_count=2)
    ]
    for job_id in cancelled:
        assert await store.retry(job_id, minute + 10)
    assert await store.stats(since=0.0, width=60.0) == []
    assert await _tally_keys(store) == []


@pytest.mark.parametrize("wait", [62_135_596_800.0, 1e300], ids=["since year 1", "1e300 s"])
async def test_jobs_due_ages_before_they_ran_end_and_go_like_any_other(
    store: RedisStore, wait: float
) -> None:
    # at=datetime(1, 1, 1, tzinfo=utc), or delay=-1e300: both legal, and each job's wait
    # is more microseconds than a tally can add exactly
    minute = _minute_ago(10)
    ids = await _end([store], 2, ended=minute + 1, wait=wait)
    assert await store.counts() == {"default": {S.SUCCEEDED: 2}}
    assert [b.succeeded for b in await store.stats(since=minute, width=60.0)] == [2]
    assert await store.delete(ids) == 2
    assert await store.stats(since=minute, width=60.0) == []
    assert await _tally_keys(store) == []
