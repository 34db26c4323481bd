"""The Store contract for jobs that end outside ``finish``: the retention of cancelled and
discarded jobs, and running jobs asked to stop whose worker stopped answering.

Part of the conformance suite: each test runs once per store in ``STORE_FACTORIES``.
"""

from __future__ import annotations

import pytest

from backlane.jobs import JobState
from backlane.stores.base import Store
from tests.stores.test_contract import LEASE, NOW, add, make_job, outcome, state_of, take

pytestmark = pytest.mark.anyio

S = JobState
KEEP = NOW + 3600


# -- retention of discarded and cancelled jobs -------------------------------------------


async def test_discard_keeps_the_jobs_until_keep_until_then_purge_removes_them(
    store: Store,
) -> None:
    kept = await add(store, state=S.DEFERRED)
    other = await add(store, state=S.DEFERRED)
    forever = await add(store, state=S.DEFERRED)
    await store.discard([kept.id], NOW + 2, keep_until=KEEP)
    await store.discard([other.id], NOW + 2, KEEP + 10)  # keep_until may be positional
    await store.discard([forever.id], NOW + 2)
    stored = await store.get(kept.id)
    assert stored is not None
    assert stored.state is S.DISCARDED and stored.finished_at == NOW + 2
    assert stored.keep_until == KEEP
    no_keep = await store.get(forever.id)
    assert no_keep is not None and no_keep.keep_until is None
    assert await store.purge(before=KEEP) == 0
    assert await store.purge(before=KEEP + 1) == 1
    assert await store.get(kept.id) is None
    assert await store.purge(before=KEEP + 11) == 1
    assert await store.get(other.id) is None
    assert await store.get(forever.id) is not None


async def test_discard_sets_keep_until_only_on_the_jobs_it_ends(store: Store) -> None:
    queued = await add(store)
    await store.discard([queued.id], NOW, keep_until=KEEP)
    stored = await store.get(queued.id)
    assert stored is not None and stored.state is S.QUEUED and stored.keep_until is None


@pytest.mark.parametrize("state", [S.QUEUED, S.DEFERRED])
async def test_cancel_keeps_a_waiting_job_until_keep_until_then_purge_removes_it(
    store: Store, state: JobState
) -> None:
    job = await add(store, state=state)
    forever = await add(store, state=state)
    assert await store.cancel(job.id, NOW + 4, keep_until=KEEP) is S.CANCELLED
    assert await store.cancel(forever.id, NOW + 4) is S.CANCELLED
    stored = await store.get(job.id)
    assert stored is not None
    assert stored.state is S.CANCELLED and stored.finished_at == NOW + 4
    assert stored.keep_until == KEEP
    no_keep = await store.get(forever.id)
    assert no_keep is not None and no_keep.keep_until is None
    assert await store.purge(before=KEEP) == 0
    assert await store.purge(before=KEEP + 1) == 1
    assert await store.get(job.id) is None
    assert await store.get(forever.id) is not None


async def test_cancel_takes_keep_until_positionally(store: Store) -> None:
    job = await add(store)
    assert await store.cancel(job.id, NOW, KEEP) is S.CANCELLED
    stored = await store.get(job.id)
    assert stored is not None and stored.keep_until == KEEP


async def test_cancel_of_a_running_or_ended_job_leaves_keep_until_alone(store: Store) -> None:
    running = await add(store)
    await take(store)
    assert await store.cancel(running.id, NOW, keep_until=KEEP) is S.RUNNING
    asked = await store.get(running.id)
    assert asked is not None and asked.cancel_requested and asked.keep_until is None
    ended_by = outcome(running.id, S.CANCELLED, keep_until=NOW + 5)
    assert await store.finish([ended_by]) == [running.id]
    assert await store.cancel(running.id, NOW + 9, keep_until=KEEP) is S.CANCELLED
    ended = await store.get(running.id)
    assert ended is not None and ended.keep_until == NOW + 5 and ended.finished_at == NOW + 1


async def test_a_retry_after_cancel_forgets_keep_until(store: Store) -> None:
    job = await add(store)
    await store.cancel(job.id, NOW, keep_until=KEEP)
    assert await store.retry(job.id, NOW + 1) is True
    stored = await store.get(job.id)
    assert stored is not None and stored.keep_until is None and stored.finished_at is None
    assert await store.purge(before=KEEP + 1) == 0


# -- requeue_expired: a job asked to stop is not run again --------------------------------


async def test_an_expired_job_asked_to_stop_ends_cancelled_instead_of_queued(
    store: Store,
) -> None:
    job = await add(store, key="k")
    then = await add(store, after=job.id)
    assert await take(store, "w1") == [job.id]
    assert await store.cancel(job.id, NOW) is S.RUNNING
    expired = NOW + LEASE + 1
    assert await store.requeue_expired(expired, keep_until=KEEP) == 1
    stored = await store.get(job.id)
    assert stored is not None
    assert stored.state is S.CANCELLED
    assert stored.finished_at == expired and stored.keep_until == KEEP
    assert stored.lease_until is None and stored.attempts == 1
    assert await take(store, "w2", now=expired) == [then.id]  # the successor is freed
    (fresh,) = await store.enqueue([make_job(key="k")])  # the key is free again
    assert fresh.id != job.id
    assert await store.requeue_expired(expired + 1, keep_until=KEEP) == 0
    assert await state_of(store, job.id) is S.CANCELLED


async def test_requeue_expired_sorts_expired_jobs_by_cancel_requested(store: Store) -> None:
    asked, lost, alive = await store.enqueue([make_job(), make_job(), make_job()])
    assert await take(store, "w1", limit=2) == [asked.id, lost.id]
    assert await take(store, "w2", now=NOW + 50) == [alive.id]
    for job in (asked, alive):
        assert await store.cancel(job.id, NOW) is S.RUNNING
    assert await store.requeue_expired(NOW + LEASE + 1, KEEP) == 2  # positional keep_until
    assert await state_of(store, asked.id) is S.CANCELLED
    requeued = await store.get(lost.id)
    assert requeued is not None
    assert requeued.state is S.QUEUED and requeued.keep_until is None
    assert requeued.finished_at is None and requeued.worker_id is None
    still = await store.get(alive.id)
    assert still is not None and still.state is S.RUNNING and still.cancel_requested
    renewed = await store.renew_leases(worker_id="w2", ids=[alive.id], lease_until=NOW + 500)
    assert renewed == {alive.id}
    assert await take(store, "w3", now=NOW + LEASE + 1) == [lost.id]


async def test_requeue_expired_without_keep_until_keeps_the_cancelled_job(store: Store) -> None:
    job = await add(store)
    await take(store)
    await store.cancel(job.id, NOW)
    assert await store.requeue_expired(NOW + LEASE + 1) == 1
    stored = await store.get(job.id)
    assert stored is not None and stored.state is S.CANCELLED and stored.keep_until is None
    assert await store.purge(before=NOW + 10**9) == 0
    assert await store.purge(before=NOW + LEASE + 2, states=[S.CANCELLED]) == 1


async def test_purge_removes_a_job_cancelled_by_requeue_expired_after_keep_until(
    store: Store,
) -> None:
    job = await add(store)
    await take(store)
    await store.cancel(job.id, NOW)
    await store.requeue_expired(NOW + LEASE + 1, keep_until=KEEP)
    assert await store.purge(before=KEEP) == 0
    assert await store.purge(before=KEEP + 1) == 1
    assert await store.get(job.id) is None


async def test_the_worker_of_a_job_cancelled_by_requeue_expired_changes_nothing(
    store: Store,
) -> None:
    job = await add(store)
    await take(store, "w1")
    await store.cancel(job.id, NOW)
    await store.requeue_expired(NOW + LEASE + 1, keep_until=KEEP)
    assert await store.renew_leases(worker_id="w1", ids=[job.id], lease_until=NOW + 999) == set()
    assert await store.finish([outcome(job.id, S.SUCCEEDED, "w1")]) == []
    await store.hand_back(worker_id="w1", ids=[job.id])
    stored = await store.get(job.id)
    assert stored is not None
    assert stored.state is S.CANCELLED and stored.lease_until is None
    assert stored.keep_until == KEEP and stored.result is None


# -- renew_leases reports cancellation as before -----------------------------------------


async def test_renew_reports_a_cancel_request_while_the_worker_still_holds_the_job(
    store: Store,
) -> None:
    """A late heartbeat, after the lease ended but before any sweep, still holds the job:
    it is renewed and the cancel request is reported."""
    job = await add(store)
    await take(store, "w1")
    await store.cancel(job.id, NOW)
    late = NOW + LEASE + 5
    assert await store.renew_leases(worker_id="w1", ids=[job.id], lease_until=late + 60) == {job.id}
    assert await store.requeue_expired(late) == 0
    stored = await store.get(job.id)
    assert stored is not None and stored.state is S.RUNNING and stored.lease_until == late + 60
