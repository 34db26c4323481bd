"""The Store contract: the few verbs every store meets.

The core (``Backlane``, the worker) decides every state change, timestamp and retry; a
store only stores, atomically. Each verb is batch-first where the hot path needs it.
Every store passes the conformance suite in ``tests/stores/``.

Rules every store keeps:

* ``claim`` hands a job to one worker only, even with many processes claiming at once.
  Claimable means: ``state == queued``, ``run_at <= now``, ``after`` is empty, queue in
  ``queues`` (or any queue when ``queues`` is None). Order: higher ``priority`` first, then
  earlier ``run_at``, then enqueue order.
* A job whose ``after`` names another job is held until that job ends (any terminal
  state); ``finish``, ``cancel``, ``discard`` and ``requeue_expired`` clear ``after`` on
  the jobs that waited for the ones they end, ``delete`` and ``purge`` on the jobs that
  waited for the ones they remove.
* Every verb that ends a job records its ``finished_at`` and ``keep_until`` (None: kept
  until removed by hand or by ``purge`` with ``states``).
* An idempotency ``key`` is unique among active jobs (deferred, queued, running):
  enqueueing a job whose key is taken stores nothing and returns the job holding the key.
* Verbs on a running job name the worker holding it; a worker that lost its lease changes
  nothing.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..jobs import Job, JobState


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as the worker decided it.

    ``state`` is ``succeeded``, ``failed`` or ``cancelled`` to end the job, or ``queued`` to
    run it again at ``run_at`` (a retry). ``keep_until`` is when an ended job may be purged.
    """

    job_id: str
    worker_id: str
    state: JobState
    finished_at: float
    result: str | None = None
    error: dict[str, Any] | None = None
    run_at: float | None = None
    keep_until: float | None = None


class Store(abc.ABC):
    """Where jobs live. One instance per ``Backlane``.

    Both stores shipped with backlane may be shared by tasks of several event loops on
    several threads at once (FastAPI's TestClient, for one, runs the app on a thread of its
    own): every verb is one atomic step whatever loop awaits it, and ``open`` and ``close``
    may race each other and the verbs (one connection is opened, and closed once).
    ``MemoryStore`` guards its state with one ``threading.Lock`` it never holds across an
    ``await``; ``SQLiteStore`` runs every statement on one thread owning the connection,
    and several processes may share its file. A verb called before ``open`` or after
    ``close`` raises ``StoreError``, save on ``MemoryStore``, which has nothing to open.
    Jobs returned are copies: changing one changes nothing stored."""

    url: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and make sure the schema exists. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent."""

    # -- write side -------------------------------------------------------------------

    @abc.abstractmethod
    async def enqueue(self, jobs: Sequence[Job]) -> list[Job]:
        """Store ``jobs`` in one atomic step, in order. Returns, for each job, the job as
        stored, or the active job already holding its ``key``."""

    @abc.abstractmethod
    async def release(self, ids: Sequence[str]) -> None:
        """Move deferred jobs to queued (their request's response has been sent)."""

    @abc.abstractmethod
    async def discard(
        self, ids: Sequence[str], now: float, keep_until: float | None = None
    ) -> None:
        """Move the deferred jobs among ``ids`` to discarded (their request failed), with
        ``finished_at = now`` and the given ``keep_until``; jobs in other states and
        unknown ids are left alone."""

    @abc.abstractmethod
    async def claim(
        self,
        *,
        worker_id: str,
        queues: Sequence[str] | None,
        limit: int,
        now: float,
        lease_until: float,
    ) -> list[Job]:
        """Take up to ``limit`` claimable jobs for ``worker_id``: each becomes running with
        ``attempts`` one higher, ``started_at = now`` and the given lease. Returned in claim
        order."""

    @abc.abstractmethod
    async def renew_leases(
        self, *, worker_id: str, ids: Sequence[str], lease_until: float
    ) -> set[str]:
        """Extend the leases ``worker_id`` still holds among ``ids`` (running for it, even
        if the lease ended but ``requeue_expired`` has not yet run). Returns those of them
        whose cancellation was requested."""

    @abc.abstractmethod
    async def finish(self, outcomes: Sequence[Outcome]) -> list[str]:
        """Record the outcomes of attempts (see ``Outcome``). Returns the ids applied: an
        outcome for a job its worker no longer holds is ignored."""

    @abc.abstractmethod
    async def hand_back(self, *, worker_id: str, ids: Sequence[str]) -> None:
        """Return running jobs to the queue unstarted (graceful shutdown): state queued, the
        attempt not counted."""

    @abc.abstractmethod
    async def requeue_expired(self, now: float, keep_until: float | None = None) -> int:
        """Sweep up after workers that stopped answering, and overdue deferred jobs.

        A running job whose lease ended before ``now`` is queued again (its attempt stays
        counted; ``worker_id`` and ``lease_until`` cleared), unless its cancellation was
        requested: then it ends ``cancelled`` with ``finished_at = now`` and the given
        ``keep_until``, freeing the jobs waiting for it. A deferred job whose
        ``release_at`` is not after ``now`` is queued. Returns how many jobs changed
        (queued or ended)."""

    @abc.abstractmethod
    async def cancel(
        self, job_id: str, now: float, keep_until: float | None = None
    ) -> JobState | None:
        """Cancel a job: deferred or queued ends cancelled with ``finished_at = now`` and
        the given ``keep_until``; running gets ``cancel_requested`` (nothing else changes:
        its worker ends it through ``finish``, or ``requeue_expired`` does once its lease
        ended); an ended job is left alone. Returns the state after, or None for an
        unknown id."""

    @abc.abstractmethod
    async def retry(self, job_id: str, now: float) -> bool:
        """Queue again, by hand, a job that failed or was cancelled. False if it is not in
        such a state."""

    @abc.abstractmethod
    async def set_progress(
        self, job_id: str, *, worker_id: str, progress: float | None, message: str | None
    ) -> None:
        """Record the progress of a running job."""

    @abc.abstractmethod
    async def delete(self, ids: Sequence[str]) -> int:
        """Remove jobs whatever their state. Returns how many were removed."""

    @abc.abstractmethod
    async def purge(self, *, before: float, states: Sequence[JobState] | None = None) -> int:
        """Remove ended jobs with ``keep_until`` (or, when ``states`` is given,
        ``finished_at``) before ``before``; ``states`` limits which end states. Returns how
        many."""

    # -- read side --------------------------------------------------------------------

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""

    @abc.abstractmethod
    async def list_jobs(
        self,
        *,
        state: JobState | None = None,
        task: str | None = None,
        queue: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Job]:
        """Jobs matching the filters, newest first."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, dict[JobState, int]]:
        """Number of jobs per queue and state (states with no job may be left out)."""
