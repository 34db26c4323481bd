"""The Store contract for a job's attempt history: ``finish`` appends the record an
``Outcome`` carries, as given, and nothing else adds to it.

Part of the conformance suite: each test runs once per store in ``STORE_FACTORIES``.
"""

from __future__ import annotations

from typing import Any

import pytest

from backlane.jobs import JobState
from backlane.stores.base import Store
from tests.stores.test_contract import LEASE, NOW, add, outcome, take

pytestmark = pytest.mark.anyio

S = JobState


def record(attempt: int, outcome: str, **more: Any) -> dict[str, Any]:
    """An attempt's record as the worker builds one (``jobs.attempt_record``)."""
    return {
        "attempt": attempt,
        "started_at": NOW + attempt,
        "ended_at": NOW + attempt + 0.5,
        "outcome": outcome,
        "error": {"type": "ValueError", "message": f'bad row {attempt}, \u00e9t\u00e9 "\\\n'},
        **more,
    }


async def history(store: Store, job_id: str) -> list[dict[str, Any]]:
    job = await store.get(job_id)
    assert job is not None
    return job.attempt_history


async def test_a_new_job_has_no_history(store: Store) -> None:
    job = await add(store)
    assert job.attempt_history == []
    assert await history(store, job.id) == []


async def test_finish_appends_each_outcomes_record_in_order(store: Store) -> None:
    job = await add(store)
    first, second, third = record(1, "retried"), record(2, "retried"), record(3, "failed")
    for n, (state, given) in enumerate(
        [(S.QUEUED, first), (S.QUEUED, second), (S.FAILED, third)], start=1
    ):
        assert await take(store, now=NOW + n) == [job.id]
        applied = await store.finish([outcome(job.id, state, attempt=given, run_at=NOW)])
        assert applied == [job.id]
    stored = await store.get(job.id)
    assert stored is not None and stored.state is S.FAILED and stored.attempts == 3
    assert stored.attempt_history == [first, second, third]


async def test_an_outcome_without_a_record_leaves_the_history_alone(store: Store) -> None:
    job = await add(store)
    await take(store)
    await store.finish([outcome(job.id, S.QUEUED, attempt=record(1, "retried"), run_at=NOW)])
    await take(store, now=NOW + 1)
    assert await store.finish([outcome(job.id, S.SUCCEEDED, result='"ok"')]) == [job.id]
    assert await history(store, job.id) == [record(1, "retried")]


async def test_a_batch_appends_only_the_records_of_the_outcomes_applied(store: Store) -> None:
    jobs = [await add(store) for _ in range(4)]
    await take(store)
    stale = await add(store)
    await take(store, "w2")
    applied = await store.finish(
        [
            outcome(jobs[0].id, S.QUEUED, attempt=record(1, "retried"), run_at=NOW + 9),
            outcome(jobs[1].id, S.SUCCEEDED),
            outcome(jobs[2].id, S.CANCELLED, attempt=record(1, "cancelled")),
            outcome(jobs[3].id, S.FAILED, attempt=record(1, "failed")),
            outcome(stale.id, S.FAILED, attempt=record(1, "failed")),  # held by w2, not w1
        ]
    )
    assert applied == [job.id for job in jobs]
    assert [await history(store, job.id) for job in jobs] == [
        [record(1, "retried")],
        [],
        [record(1, "cancelled")],
        [record(1, "failed")],
    ]
    assert await history(store, stale.id) == []


async def test_retry_hand_back_and_expired_leases_keep_the_history_as_it_is(
    store: Store,
) -> None:
    job = await add(store)
    await take(store)
    await store.finish([outcome(job.id, S.FAILED, attempt=record(1, "failed"))])
    assert await store.retry(job.id, NOW + 2)
    assert await take(store, now=NOW + 2) == [job.id]
    await store.hand_back(worker_id="w1", ids=[job.id])  # attempt 2, uncounted
    assert await take(store, now=NOW + 3) == [job.id]
    assert await store.requeue_expired(NOW + 3 + LEASE + 1) == 1  # attempt 2, lost
    stored = await store.get(job.id)
    assert stored is not None and stored.state is S.QUEUED and stored.attempts == 2
    assert stored.attempt_history == [record(1, "failed")]


async def test_enqueue_stores_a_history_as_given_and_returned_jobs_share_none_of_it(
    store: Store,
) -> None:
    given = [record(1, "retried"), record(2, "lost", error=None)]
    job = await add(store, attempts=2, attempt_history=given)
    assert job.attempt_history == given
    job.attempt_history.append({"attempt": 9})
    fetched = await store.get(job.id)
    assert fetched is not None and fetched.attempt_history == given
    fetched.attempt_history[0]["outcome"] = "changed"
    assert await history(store, job.id) == given
