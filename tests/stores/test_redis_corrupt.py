"""The Redis store with job hashes changed by hand (``HSET``/``HDEL``): a field its scripts
read that no longer reads must fail that one job, never a claim or a verb, so every other
job is still claimed and run — on the real server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from backlane.jobs import JobState
from backlane.stores.base import Outcome
from backlane.stores.redis import RedisStore
from tests.services import REDIS_URL
from tests.stores.conftest import redis_scripts_store, redis_store
from tests.stores.test_contract import LEASE, NOW, make_job

pytestmark = pytest.mark.anyio

S = JobState

# every field a script reads, made unreadable (None: removed)
CORRUPT = [
    ("seq", "abc"),
    ("seq", None),
    ("queue", None),
    ("run_at", "abc"),
    ("run_at", None),
    ("priority", "high"),
    ("priority", "1.5"),
    ("priority", None),
    ("attempts", "x"),
    ("attempts", None),
    ("state", "bogus"),
    ("state", None),
    ("created_at", "x"),
    ("created_at", None),
    ("cancel_requested", "maybe"),
    ("waited", "x"),
    ("started_at", "x"),
    ("finished_at", "x"),
    ("lease_until", "x"),
    ("id", None),
]


@pytest.fixture(params=[redis_store, redis_scripts_store], ids=["functions", "scripts"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RedisStore]:
    async with request.param(tmp_path) as opened:
        assert isinstance(opened, RedisStore)
        yield opened


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield conn
    conn.close()


def spoil(client: redis.Redis, store: RedisStore, job_id: str, field: str, value: Any) -> None:
    key = f"{store.prefix}job:{job_id}"
    if value is None:
        client.hdel(key, field)
    else:
        client.hset(key, field, value)


def claim_args(worker: str = "w1", now: float = NOW) -> dict[str, Any]:
    return {
        "worker_id": worker,
        "queues": None,
        "limit": 10,
        "now": now,
        "lease_until": now + LEASE,
    }


async def run_all(store: RedisStore, worker: str, now: float = NOW) -> list[str]:
    """Claim and finish (succeeded) what there is, as a worker does; the ids run."""
    ran: list[str] = []
    for _ in range(5):
        claimed = await store.claim(**claim_args(worker, now))
        if not claimed:
            break
        outcomes = [Outcome(j.id, worker, S.SUCCEEDED, now + 1) for j in claimed]
        await store.finish(outcomes)
        ran += [j.id for j in claimed]
    return ran


@pytest.mark.parametrize(("field", "value"), CORRUPT)
async def test_a_queued_job_spoiled_by_hand_never_stops_the_others(
    store: RedisStore, client: redis.Redis, field: str, value: Any
) -> None:
    first, bad, last = await store.enqueue([make_job(), make_job(), make_job()])
    spoil(client, store, bad.id, field, value)
    ran = await run_all(store, "w1")
    assert {first.id, last.id} <= set(ran)
    if field in ("cancel_requested", "waited"):  # read as "not asked" / "no successors"
        assert ran.count(bad.id) == 1
    else:  # ends failed, saying which field is wrong; never claimed
        assert bad.id not in ran
        assert await store.counts() == {"default": {S.SUCCEEDED: 2, S.FAILED: 1}}
        raw = client.hget(f"{store.prefix}job:{bad.id}", "error")
        assert raw is not None and f"field '{field}'" in raw
    (later,) = await store.enqueue([make_job()])  # the claims after it go on too
    assert await run_all(store, "w2") == [later.id]
    counts = await store.counts()  # the verbs that look still answer
    assert sum(n for q in counts.values() for n in q.values()) >= 3
    await store.requeue_expired(NOW + 10 * LEASE)
    await store.stats(since=0, width=60)


@pytest.mark.parametrize(("field", "value"), CORRUPT)
async def test_a_running_job_spoiled_by_hand_never_stops_the_others(
    store: RedisStore, client: redis.Redis, field: str, value: Any
) -> None:
    bad, other = await store.enqueue([make_job(), make_job()])
    claimed = await store.claim(**claim_args())
    assert {j.id for j in claimed} == {bad.id, other.id}
    spoil(client, store, bad.id, field, value)
    await store.renew_leases(worker_id="w1", ids=[bad.id, other.id], lease_until=NOW + 2 * LEASE)
    await store.set_progress(bad.id, worker_id="w1", progress=0.5, message="half")
    await store.cancel(bad.id, NOW)
    applied = await store.finish(
        [Outcome(j, "w1", S.SUCCEEDED, NOW + 1) for j in (bad.id, other.id)]
    )
    assert other.id in applied
    await store.requeue_expired(NOW + 10 * LEASE)
    await store.retry(bad.id, NOW + 2)
    await store.hand_back(worker_id="w1", ids=[bad.id])
    (later,) = await store.enqueue([make_job()])
    assert later.id in await run_all(store, "w2", NOW + 20 * LEASE)
    await store.delete([bad.id])
    assert await store.get(bad.id) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("payload", None), ("created_at", "x"), ("state", "bogus"), ("meta", "{no")],
)
async def test_a_page_holding_an_unreadable_job_shows_it_as_unreadable(
    store: RedisStore, client: redis.Redis, field: str, value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = await store.enqueue([make_job(created_at=NOW + n, task="tests:t") for n in range(5)])
    bad = jobs[2]
    spoil(client, store, bad.id, field, value)
    newest_first = [job.id for job in reversed(jobs)]
    searches: list[dict[str, Any]] = [{}, {"task": "tests:t"}, {"text": "tests"}]
    if field != "state":  # a state changed by hand matches no state filter
        searches.append({"state": S.QUEUED})
    for search in searches:
        with caplog.at_level("WARNING", logger="backlane.stores.redis"):
            page = await store.list_jobs(**search)
        assert [job.id for job in page] == newest_first, search
        shown = page[2]
        assert shown.error is not None
        assert shown.error["type"].endswith("UnreadableJob")
        assert f"field '{field}'" in shown.error["message"]
        assert f"job {bad.id}" in caplog.text
    # pages after it are not shifted
    assert [j.id for j in await store.list_jobs(limit=2, offset=2)] == newest_first[2:4]
