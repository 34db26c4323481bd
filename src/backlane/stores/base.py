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
  state); ``finish``, ``cancel``, ``discard`` and ``purge`` clear ``after`` on the jobs
  that waited for the ones they end.
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
    """Where jobs live. One instance per ``Backlane``; safe to share between tasks of one
    event loop."""

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
    async def discard(self, ids: Sequence[str], now: float) -> None:
        """Move deferred jobs to discarded (their request failed)."""

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
        """Extend the leases ``worker_id`` still holds among ``ids``. Returns the ids whose
        cancellation was requested."""

    @abc.abstractmethod
    async def finish(self, outcomes: Sequence[Outcome]) -> list[str]:
        """Record the outcomes of attempts (see ``Outcome``). Returns the ids applied: an
        outcome for a job its worker no longer holds is ignored."""

    @abc.abstractmethod
    async def hand_back(self, *, worker_id: str, ids: Sequence[str]) -> None:
        """Return running jobs to the queue unstarted (graceful shutdown): state queued, the
        attempt not counted."""

    @abc.abstractmethod
    async def requeue_expired(self, now: float) -> int:
        """Queue again the running jobs whose lease ended before ``now`` (their attempt stays
        counted) and the deferred jobs whose ``release_at`` passed. Returns how many."""

    @abc.abstractmethod
    async def cancel(self, job_id: str, now: float) -> JobState | None:
        """Cancel a job: deferred or queued becomes cancelled; running gets
        ``cancel_requested``. Returns the state after, or None for an unknown id."""

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
