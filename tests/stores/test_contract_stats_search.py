"""The Store contract for the dashboard's reads — ``list_jobs(text=...)`` and ``stats`` —
and for ``enqueue(connection=...)`` on stores that cannot join a caller's transaction.

Part of the conformance suite: each test runs once per store in ``STORE_FACTORIES``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from backlane.exceptions import ConfigurationError, StoreError
from backlane.jobs import Job, JobState
from backlane.stores.base import Outcome, StatsBucket, Store
from tests.stores.test_contract import LEASE, NOW, add, make_job, outcome, take

pytestmark = pytest.mark.anyio

S = JobState
TRANSACTIONAL_STORES = ("postgresql:", "postgres:")
"""URL schemes of the stores that can enqueue inside a caller's transaction."""


# -- enqueue(connection=...) ---------------------------------------------------------------


async def test_enqueue_with_a_connection_is_refused_where_it_cannot_be_honoured(
    store: Store,
) -> None:
    if store.url.startswith(TRANSACTIONAL_STORES):
        pytest.skip("this store enqueues inside the caller's transaction")
    job = make_job()
    with pytest.raises(ConfigurationError, match="PostgreSQL"):
        await store.enqueue([job], connection=object())
    assert await store.get(job.id) is None
    (stored,) = await store.enqueue([job], connection=None)
    assert stored == job


# -- list_jobs(text=...) -------------------------------------------------------------------


async def _search_fixtures(store: Store) -> dict[str, Job]:
    jobs = {
        "email": make_job(
            task="app.mail:send_email", payload='{"args":["Alice@Example.com"]}', created_at=NOW
        ),
        "export": make_job(
            task="app.exports:export_csv",
            payload='{"kwargs":{"rate":"50%"}}',
            queue="exports",
            created_at=NOW + 1,
        ),
        "failing": make_job(task="app.mail:send_sms", payload="{}", created_at=NOW + 2),
        "plain": make_job(
            task="app.misc:noop", payload='{"args":["a_b\\\\c"]}', created_at=NOW + 3
        ),
    }
    await store.enqueue(list(jobs.values()))
    assert await take(store, queues=["default"], limit=1) == [jobs["email"].id]
    error = {"type": "SMTPRecipientsRefused", "message": "Mailbox FULL for bob", "traceback": ""}
    await store.finish([outcome(jobs["email"].id, S.FAILED, error=error)])
    return jobs


async def test_text_matches_the_task_ignoring_case(store: Store) -> None:
    jobs = await _search_fixtures(store)
    found = await store.list_jobs(text="APP.MAIL:")
    assert [job.id for job in found] == [jobs["failing"].id, jobs["email"].id]


async def test_text_matches_the_arguments_ignoring_case(store: Store) -> None:
    jobs = await _search_fixtures(store)
    assert [job.id for job in await store.list_jobs(text="alice@example")] == [jobs["email"].id]


async def test_text_matches_the_error_message_ignoring_case(store: Store) -> None:
    jobs = await _search_fixtures(store)
    assert [job.id for job in await store.list_jobs(text="mailbox full")] == [jobs["email"].id]


async def test_text_matches_only_the_message_of_an_error_whatever_it_holds(
    store: Store,
) -> None:
    jobs = await _search_fixtures(store)
    other = make_job(created_at=NOW + 4)
    await store.enqueue([other])
    await take(store, queues=["default"], limit=5)
    message = 'r\u00e9sum\u00e9 "quoted" back\\slash a/b\ttab \u2713'
    error = {"type": "RuntimeError", "message": message, "traceback": "Traceback: deep/inside"}
    await store.finish([outcome(other.id, S.FAILED, error=error)])
    for text in ("r\u00e9sum\u00e9", '"quoted"', "back\\slash", "a/b", "\ttab", "\u2713"):
        assert [job.id for job in await store.list_jobs(text=text)] == [other.id], text
    assert await store.list_jobs(text="SMTPRecipients") == []  # the error's type
    assert await store.list_jobs(text="deep/inside") == []  # its traceback
    assert await store.list_jobs(text="Traceback") == []
    assert [job.id for job in await store.list_jobs(text="FULL FOR")] == [jobs["email"].id]


async def test_text_matches_part_of_the_id(store: Store) -> None:
    jobs = await _search_fixtures(store)
    target = jobs["export"].id
    assert [job.id for job in await store.list_jobs(text=target[-12:-2])] == [target]
    assert [job.id for job in await store.list_jobs(text=target.upper())] == [target]


async def test_text_takes_wildcard_characters_literally(store: Store) -> None:
    jobs = await _search_fixtures(store)
    await store.enqueue([make_job(payload='{"kwargs":{"rate":"500"}}', created_at=NOW - 1)])
    await store.enqueue([make_job(payload='{"args":["axbxc"]}', created_at=NOW - 2)])
    assert [job.id for job in await store.list_jobs(text="50%")] == [jobs["export"].id]
    assert [job.id for job in await store.list_jobs(text="a_b")] == [jobs["plain"].id]
    assert [job.id for job in await store.list_jobs(text="a_b\\\\c")] == [jobs["plain"].id]
    assert await store.list_jobs(text="%") == [await store.get(jobs["export"].id)]
    assert await store.list_jobs(text="no such thing") == []


async def test_text_combines_with_the_other_filters_newest_first_and_pages(
    store: Store,
) -> None:
    jobs = await _search_fixtures(store)

    async def ids(**filters: Any) -> list[str]:
        return [job.id for job in await store.list_jobs(**filters)]

    everything = [jobs[name].id for name in ("plain", "failing", "export", "email")]
    assert await ids(text="app.") == everything
    assert await ids(text="") == everything
    assert await ids(text="app.", limit=2) == everything[:2]
    assert await ids(text="app.", limit=2, offset=2) == everything[2:]
    assert await ids(text="app.", offset=4) == []
    assert await ids(text="app.mail", state=S.QUEUED) == [jobs["failing"].id]
    assert await ids(text="app.", queue="exports") == [jobs["export"].id]
    assert await ids(text="app.mail", task="app.mail:send_email") == [jobs["email"].id]
    assert await ids(text="exports", state=S.FAILED) == []


# -- stats ---------------------------------------------------------------------------------

WIDTH = 60.0
T0 = 1_700_000_040.0
"""A bucket boundary: a multiple of WIDTH (NOW is not one)."""


async def _run_and_end(
    store: Store, state: JobState, *, run_at: float, started: float, ended: float
) -> Job:
    """A job due at ``run_at``, claimed at ``started`` and ended ``state`` at ``ended``."""
    job = await add(store, run_at=run_at)
    jobs = await store.claim(
        worker_id="w1", queues=None, limit=1, now=started, lease_until=started + LEASE
    )
    assert [claimed.id for claimed in jobs] == [job.id]
    end = Outcome(job_id=job.id, worker_id="w1", state=state, finished_at=ended)
    assert await store.finish([end]) == [job.id]
    return job


async def test_stats_of_no_job_is_empty(store: Store) -> None:
    assert await store.stats(since=0.0, width=WIDTH) == []
    await add(store)
    assert await store.stats(since=0.0, width=WIDTH) == []


async def test_stats_counts_end_states_in_aligned_buckets_oldest_first(store: Store) -> None:
    ok = S.SUCCEEDED
    await _run_and_end(store, ok, run_at=T0 - 10, started=T0 - 4, ended=T0 + 1)
    await _run_and_end(store, ok, run_at=T0, started=T0 + 2, ended=T0 + 59.5)
    await _run_and_end(store, S.FAILED, run_at=T0, started=T0 + 1, ended=T0 + 30)
    await _run_and_end(store, S.CANCELLED, run_at=T0 + 100, started=T0 + 100, ended=T0 + 110)
    await _run_and_end(store, S.FAILED, run_at=T0 + 60, started=T0 + 63, ended=T0 + 70)
    await _run_and_end(store, ok, run_at=T0 + 200, started=T0 + 210, ended=T0 + 301)

    buckets = await store.stats(since=T0, width=WIDTH)

    assert buckets == [
        StatsBucket(start=T0, succeeded=2, failed=1, wait_total=9.0, wait_count=3),
        StatsBucket(start=T0 + 60, failed=1, cancelled=1, wait_total=3.0, wait_count=2),
        StatsBucket(start=T0 + 300, succeeded=1, wait_total=10.0, wait_count=1),
    ]


async def test_stats_counts_jobs_ended_at_or_after_since_only(store: Store) -> None:
    await _run_and_end(store, S.SUCCEEDED, run_at=T0, started=T0, ended=T0 + 10)
    await _run_and_end(store, S.SUCCEEDED, run_at=T0, started=T0 + 1, ended=T0 + 20)
    await _run_and_end(store, S.FAILED, run_at=T0, started=T0 + 2, ended=T0 + 30)
    buckets = await store.stats(since=T0 + 20, width=WIDTH)
    assert buckets == [StatsBucket(start=T0, succeeded=1, failed=1, wait_total=3.0, wait_count=2)]
    assert await store.stats(since=T0 + 30.5, width=WIDTH) == []


async def test_stats_buckets_are_multiples_of_any_width(store: Store) -> None:
    width = 7.5
    ended = [T0 + 0.1, T0 + 7.4, T0 + 7.5, T0 + 29.9]
    for at in ended:
        await _run_and_end(store, S.SUCCEEDED, run_at=T0, started=T0, ended=at)
    buckets = await store.stats(since=T0 - 100, width=width)
    starts = sorted({math.floor(at / width) * width for at in ended})
    assert [bucket.start for bucket in buckets] == starts
    assert [bucket.succeeded for bucket in buckets] == [2, 1, 1]
    assert all(bucket.start % width == 0 for bucket in buckets)


async def test_stats_leaves_out_discarded_and_unended_jobs(store: Store) -> None:
    deferred = await add(store, state=S.DEFERRED)
    await store.discard([deferred.id], T0 + 1)
    await add(store, run_at=T0)
    await add(store, run_at=T0)
    await store.claim(worker_id="w1", queues=None, limit=1, now=T0 + 5, lease_until=T0 + 65)
    assert await store.stats(since=0.0, width=WIDTH) == []


async def test_stats_counts_no_wait_for_a_job_that_never_started(store: Store) -> None:
    never = await add(store, run_at=T0)
    await store.cancel(never.id, T0 + 5)
    # Ran once, was queued again for T0 + 50, and was cancelled before it started again:
    # its last attempt never started, so it has no wait.
    again = await add(store, run_at=T0)
    assert await take(store, now=T0 + 1) == [again.id]
    await store.finish([outcome(again.id, S.QUEUED, run_at=T0 + 50)])
    await store.cancel(again.id, T0 + 10)
    assert await store.stats(since=T0, width=WIDTH) == [StatsBucket(start=T0, cancelled=2)]


async def test_stats_needs_a_positive_width(store: Store) -> None:
    for width in (0.0, -60.0):
        with pytest.raises(StoreError, match="width"):
            await store.stats(since=0.0, width=width)


# -- stats of the last hours ---------------------------------------------------------------
#
# A store may count recent minutes ahead (Redis keeps per-minute tallies for two hours)
# rather than read every job: jobs that ended minutes ago must give the same answers as old
# ones, whatever verb ended, queued again or removed them.


def _expected(
    ends: list[tuple[JobState, float, float | None]], since: float, width: float
) -> list[StatsBucket]:
    """The buckets the contract gives for jobs that ended (state, when, wait or None)."""
    rows: dict[float, dict[str, Any]] = {}
    for state, at, wait in ends:
        if at < since:
            continue
        row = rows.setdefault(math.floor(at / width) * width, {})
        row[state.value] = row.get(state.value, 0) + 1
        if wait is not None:
            row["wait_total"] = row.get("wait_total", 0.0) + wait
            row["wait_count"] = row.get("wait_count", 0) + 1
    return [StatsBucket(start=start, **row) for start, row in sorted(rows.items())]


async def test_stats_of_recent_minutes_follow_every_verb_that_ends_or_removes_a_job(
    store: Store,
) -> None:
    m = math.floor(time.time() / WIDTH) * WIDTH - 1800  # a minute boundary half an hour ago
    ok, failed, cancelled = S.SUCCEEDED, S.FAILED, S.CANCELLED
    await _run_and_end(store, ok, run_at=m, started=m + 2.25, ended=m + 10)
    retried = await _run_and_end(store, failed, run_at=m, started=m + 1, ended=m + 20)
    deleted = await _run_and_end(store, failed, run_at=m, started=m + 0.5, ended=m + 30)
    kept_briefly = await add(store, run_at=m)
    assert await take(store, now=m + 1) == [kept_briefly.id]
    end = Outcome(kept_briefly.id, "w1", ok, finished_at=m + 40, keep_until=m + 50)
    assert await store.finish([end]) == [kept_briefly.id]
    await _run_and_end(store, failed, run_at=m, started=m + 4, ended=m + 45)
    # queued again by hand: it counts where it ends next, with its new wait
    assert await store.retry(retried.id, m + 70)
    assert await take(store, now=m + 70.5) == [retried.id]
    assert await store.finish([Outcome(retried.id, "w1", ok, finished_at=m + 130)])
    never_ran = await add(store, run_at=m + 60)
    assert await store.cancel(never_ran.id, m + 65) is S.CANCELLED
    abandoned = await add(store, run_at=m + 60)
    assert await take(store, now=m + 61) == [abandoned.id]
    assert await store.cancel(abandoned.id, m + 62) is S.RUNNING
    discarded = await add(store, state=S.DEFERRED)
    await store.discard([discarded.id], m + 190)
    assert await store.requeue_expired(m + 125) == 1  # its lease ended: cancelled
    ended_before = make_job(
        state=ok, run_at=m + 180, attempts=1, started_at=m + 180.75, finished_at=m + 185
    )
    await store.enqueue([ended_before])
    second_try = await add(store, run_at=m + 200)
    assert await take(store, now=m + 200) == [second_try.id]
    await store.finish([outcome(second_try.id, S.QUEUED, run_at=m + 230)])
    assert await take(store, now=m + 231) == [second_try.id]
    assert await store.finish([Outcome(second_try.id, "w1", failed, finished_at=m + 240)])

    ends: list[tuple[JobState, float, float | None]] = [
        (ok, m + 10, 2.25),
        (failed, m + 30, 0.5),  # deleted below
        (ok, m + 40, 1.0),  # purged by keep_until below
        (failed, m + 45, 4.0),  # purged by end state below
        (cancelled, m + 65, None),
        (cancelled, m + 125, 1.0),
        (ok, m + 130, 0.5),
        (ok, m + 185, 0.75),
        (failed, m + 240, 1.0),
    ]
    assert await store.stats(since=m, width=WIDTH) == _expected(ends, m, WIDTH)
    assert await store.delete([deleted.id]) == 1
    assert await store.purge(before=m + 51) == 1
    assert await store.purge(before=m + 46, states=[failed]) == 1
    del ends[1:4]
    for since, width in [
        (m, WIDTH),  # the dashboard's question
        (m - 600, WIDTH),
        (m + 65, WIDTH),  # part of a minute
        (m + 125.5, 300.0),
        (m, 120.0),
        (m - 3600, 3600.0),
        (m, 7.5),  # not whole minutes
        (0.0, WIDTH),
    ]:
        assert await store.stats(since=since, width=width) == _expected(ends, since, width), (
            since - m,
            width,
        )
