"""The Store contract: the few verbs every store meets.

The core (``Backlane``, the worker) decides every state change, timestamp and retry; a
store only stores, atomically. Each verb is batch-first where the hot path needs it.
Every store passes the conformance suite in ``tests/stores/``.

Rules every store keeps:

* ``claim`` hands a job to one worker only, even with many processes claiming at once.
  Claimable means: ``state == queued``, ``run_at <= now``, ``after`` is empty, queue in
  ``queues`` (or any queue when ``queues`` is None), and the queue not paused
  (``pause_queue``). Order: higher ``priority`` first, then earlier ``run_at``, then
  enqueue order.
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
* ``enqueue`` stores a job's ``attempt_history`` as given; only ``finish`` adds to it,
  and no other verb changes it (``retry`` keeps it, ``hand_back`` and
  ``requeue_expired`` add nothing: an attempt lost to an expired lease has no record).
* A schedule slot is taken once: ``claim_slot`` stores the slot's job only if no slot at or
  after it was taken for that schedule, in the same atomic step.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from ..exceptions import StoreError
from ..jobs import Job, JobState

OUTCOME_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
)
"""The states an ``Outcome`` may carry; ``finish`` refuses any other."""


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as the worker decided it.

    ``state`` is ``succeeded``, ``failed`` or ``cancelled`` to end the job, or ``queued`` to
    run it again at ``run_at`` (a retry). ``keep_until`` is when an ended job may be purged.
    ``attempt``, when set, is this attempt's record (``jobs.attempt_record``, JSON-ready):
    the store appends it, as is, to the job's ``attempt_history`` in the same step. The
    worker sets it for every attempt that does not succeed, so that the history plus the
    job's own fields tell every attempt, and a job succeeding first time pays nothing.
    """

    job_id: str
    worker_id: str
    state: JobState
    finished_at: float
    result: str | None = None
    error: dict[str, Any] | None = None
    run_at: float | None = None
    keep_until: float | None = None
    attempt: dict[str, Any] | None = None


_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_text(text: str) -> str:
    """``text`` with each lone surrogate (a file name decoded with ``surrogateescape``),
    which no UTF-8 can carry, as U+FFFD, the replacement character: how every store keeps
    a progress message."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def check_outcomes(outcomes: Sequence[Outcome]) -> None:
    """Raise ``StoreError`` naming the first outcome whose state an outcome cannot have
    (it ends a job succeeded, failed or cancelled, or queues it again)."""
    for outcome in outcomes:
        if outcome.state not in OUTCOME_STATES:
            raise StoreError(
                f"an outcome ends a job succeeded, failed or cancelled, or queues it "
                f"again; got {outcome.state.value!r} for job {outcome.job_id}"
            )


@dataclass(frozen=True)
class ScheduleRecord:
    """What a store keeps of a schedule: the latest slot taken (POSIX seconds) and whether
    it is paused."""

    name: str
    last_slot: float | None = None
    paused: bool = False


@dataclass(frozen=True)
class WorkerRecord:
    """A worker as its last heartbeat described it."""

    id: str
    started_at: float
    seen_at: float
    concurrency: int
    queues: tuple[str, ...] | None = None
    jobs: tuple[str, ...] = ()
    """Ids of the jobs it held at its last heartbeat."""
    processed: int = 0


@dataclass(frozen=True)
class StatsBucket:
    """Jobs that ended within ``[start, start + width)``: how many by end state, and the
    total and count of their waits (``started_at - run_at`` of the last attempt, seconds).
    A job whose last attempt never started (cancelled while queued, or queued again and
    ended before it started again: ``started_at`` missing or before ``run_at``) counts in
    its state but has no wait. A store may count each wait to the microsecond (Redis does
    for the minutes it keeps tallies of)."""

    start: float
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    wait_total: float = 0.0
    wait_count: int = 0


class Store(abc.ABC):
    """Where jobs live. One instance per ``Backlane``.

    Every store shipped with backlane may be shared by tasks of several event loops on
    several threads at once (FastAPI's TestClient, for one, runs the app on a thread of its
    own): every verb is one atomic step whatever loop awaits it, and ``open`` and ``close``
    may race each other and the verbs (each connection is opened, and closed, once).
    ``MemoryStore`` guards its state with one ``threading.Lock`` it never holds across an
    ``await``; ``SQLiteStore`` runs a short write on the awaiting loop when the file's write
    lock is free at once and everything else on a thread of its own, and several processes
    may share its file; the Redis store keeps a connection per event loop, the PostgreSQL
    store a pool on an event loop of its own that every verb is handed to. A verb called
    before ``open`` or after ``close`` raises ``StoreError``, save on ``MemoryStore``,
    which has nothing to open.
    Jobs returned are copies: changing one changes nothing stored."""

    url: str
    enqueue_returns_once_begun: bool = False
    """Whether ``enqueue`` cancelled after it may have stored anything still returns what
    it stored (the cancellation then takes effect at the caller's next checkpoint): true
    where it writes without waiting (memory, and SQLite when the file's write lock is free)
    or shields its own waits (SQLite otherwise). Where false, a caller that must know what
    was stored shields the call, which costs a request a few microseconds."""
    gather_releases: bool = False
    """Whether the web side should gather the releases of several requests into one call
    (a short delay before their jobs may start): true where workers of other processes
    poll the store instead of being woken by it (SQLite), so the delay costs them
    nothing while the web process saves a transaction per request."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and make sure the schema exists. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent."""

    async def wait_for_work(self, timeout: float) -> None:
        """Return when jobs may have become claimable (enqueued, released, retried or
        freed by another process), or after ``timeout`` seconds. Idle workers call it
        between claims; a store with a way to be told (Redis pub/sub or blocking pop,
        PostgreSQL LISTEN/NOTIFY) returns within milliseconds of the change. The default
        just sleeps: the worker then polls with a growing interval."""
        await anyio.sleep(timeout)

    # -- write side -------------------------------------------------------------------

    @abc.abstractmethod
    async def enqueue(self, jobs: Sequence[Job], *, connection: Any = None) -> list[Job]:
        """Store ``jobs`` in one atomic step, in order. With ``connection`` (a caller's
        database connection or session, PostgreSQL only), the jobs are written inside the
        caller's open transaction and exist only if it commits; a store that cannot do that
        raises ``ConfigurationError``. Returns, for each job, the job as
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
        """Record the outcomes of attempts (see ``Outcome``), appending each outcome's
        ``attempt`` record, if any, to its job's ``attempt_history``. Returns the ids
        applied: an outcome for a job its worker no longer holds is ignored (its record
        too)."""

    async def finish_and_claim(
        self,
        outcomes: Sequence[Outcome],
        *,
        worker_id: str,
        queues: Sequence[str] | None,
        limit: int,
        now: float,
        lease_until: float,
        release: Sequence[str] = (),
    ) -> tuple[list[str], list[Job]]:
        """``release(release)`` (if any), ``finish(outcomes)``, then ``claim(...)``;
        returns what finish and claim return. A worker calls it once per turn of its loop
        (an embedded worker passes the jobs its web process's requests handed over).
        The steps need not be one atomic step together (each is atomic); a store that can
        send them at once (Redis: one script; SQLite: one transaction) saves round trips.
        This default just calls the verbs."""
        if release:
            await self.release(release)
        applied = await self.finish(outcomes) if outcomes else []
        claimed = await self.claim(
            worker_id=worker_id, queues=queues, limit=limit, now=now, lease_until=lease_until
        )
        return applied, claimed

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
        text: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Job]:
        """Jobs matching the filters, newest first. ``text`` matches, case-insensitively, a
        substring of the id, the task name, the arguments (``payload``, as stored) or the
        error message (``error["message"]``); every character of ``text`` is literal (no
        wildcards). SQLite folds the case of ASCII letters only, and so does PostgreSQL
        for a text of ASCII characters only (a Kelvin sign, say, does not match "k")."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, dict[JobState, int]]:
        """Number of jobs per queue and state (states with no job may be left out)."""

    @abc.abstractmethod
    async def stats(self, *, since: float, width: float) -> list[StatsBucket]:
        """Jobs that ended succeeded, failed or cancelled (not discarded) at or after
        ``since``, in buckets of ``width`` seconds aligned on multiples of ``width`` (a job
        that ended at ``t`` is in the bucket starting at ``floor(t / width) * width``), oldest
        first; buckets with no job may be left out. ``width`` must be above zero
        (``StoreError`` otherwise)."""

    # -- schedules ----------------------------------------------------------------------

    @abc.abstractmethod
    async def claim_slot(self, schedule: str, slot: float, job: Job) -> bool:
        """Take ``slot`` of ``schedule`` and store ``job`` in one atomic step. False, and
        nothing stored, when that slot or a later one was already taken. The job is stored
        as ``enqueue`` stores it (if an active job holds its ``key``, the slot is taken and
        nothing else stored); a job that cannot be stored raises ``StoreError`` and leaves
        the slot free. Whether the schedule is paused is the caller's business: this
        neither looks at the pause nor changes it."""

    @abc.abstractmethod
    async def schedules(self) -> dict[str, ScheduleRecord]:
        """Every schedule the store knows (one has taken a slot or been paused)."""

    @abc.abstractmethod
    async def pause_schedule(self, name: str, paused: bool) -> None:
        """Pause or resume a schedule (known or not yet); its ``last_slot`` is kept."""

    # -- queues and workers ---------------------------------------------------------------

    @abc.abstractmethod
    async def pause_queue(self, queue: str, paused: bool) -> None:
        """Pause a queue (``claim`` takes nothing from it, whatever ``queues`` it is
        given) or resume it. Idempotent; the queue need hold no job."""

    @abc.abstractmethod
    async def paused_queues(self) -> set[str]:
        """Names of the paused queues."""

    @abc.abstractmethod
    async def beat(self, worker: WorkerRecord) -> None:
        """Record a worker's heartbeat (replacing its previous record)."""

    @abc.abstractmethod
    async def workers(self, *, seen_since: float) -> list[WorkerRecord]:
        """Workers whose last heartbeat is at or after ``seen_since``, oldest started first.
        Records older than that may be dropped."""

    @abc.abstractmethod
    async def forget_worker(self, worker_id: str) -> None:
        """Remove a worker's record (it stopped)."""
