"""The in-process store: jobs in dicts, for tests, eager mode and single-process use.

State is guarded by one ``threading.Lock`` and no method awaits while holding it, so one
instance may be used from several threads and event loops at once (FastAPI's TestClient
runs the app on a portal thread). Claimable jobs sit in per-queue heaps, so a claim costs
``O(log n)`` whatever the number of stored jobs.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import itertools
import math
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from ..exceptions import ConfigurationError, StoreError
from ..jobs import ACTIVE_STATES, TERMINAL_STATES, Job, JobState
from .base import (
    Outcome,
    ScheduleRecord,
    StatsBucket,
    Store,
    WorkerRecord,
    check_outcomes,
    utf8_text,
)

_STATS_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# A due entry orders claimable jobs: (-priority, run_at, seq, job id, token).
_Due = tuple[int, float, int, str, int]
# A scheduled entry waits for its run_at: (run_at, seq, job id, token).
_Scheduled = tuple[float, int, str, int]


def _copy_json(value: Any) -> Any:
    """A deep copy of a JSON-like value (dicts, lists and immutable leaves)."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy_json(v) for v in value]
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return copy.deepcopy(value)


def _matches_text(job: Job, needle: str) -> bool:
    """Whether ``needle`` (lower case) is in the id, task, payload or error message."""
    message = job.error.get("message") if job.error else None
    fields = (job.id, job.task, job.payload, None if message is None else str(message))
    return any(needle in field.lower() for field in fields if field is not None)


def _clone(job: Job) -> Job:
    """A copy sharing nothing mutable with ``job``."""
    twin = object.__new__(Job)
    twin.__dict__.update(job.__dict__)  # copy.copy, minus its generic machinery
    if job.error is not None:
        twin.error = _copy_json(job.error)
    twin.meta = _copy_json(job.meta) if job.meta else {}
    twin.attempt_history = _copy_json(job.attempt_history) if job.attempt_history else []
    return twin


class _QueueHeaps:
    """The claimable jobs of one queue: ``due`` in claim order, ``scheduled`` by run_at.

    Entries are never removed in place; an entry whose token is no longer the job's
    current token is stale and skipped when it reaches the top.
    """

    __slots__ = ("due", "scheduled")

    def __init__(self) -> None:
        self.due: list[_Due] = []
        self.scheduled: list[_Scheduled] = []


class MemoryStore(Store):
    """Jobs kept in this process's memory; gone when the process ends."""

    enqueue_returns_once_begun = True  # its enqueue never waits

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._seq: dict[str, int] = {}
        self._next_seq = 0
        self._latest_now = float("-inf")
        """The latest ``now`` a claim was given: jobs due by then skip the scheduled heap."""
        self._created_in_order = True
        """Whether ``created_at`` never decreased in store order (list_jobs can stop early)."""
        self._latest_created = float("-inf")
        self._keys: dict[str, str] = {}
        """Idempotency key -> id of the active job holding it."""
        self._waiters: dict[str, set[str]] = {}
        """Job id -> ids of the jobs whose ``after`` names it."""
        self._queues: dict[str, _QueueHeaps] = {}
        self._tokens: dict[str, int] = {}
        """Job id -> token of its live heap entry, for claimable jobs only."""
        self._next_token = 0
        self._running: set[str] = set()
        self._deferred: set[str] = set()
        self._counts: dict[str, Counter[JobState]] = {}
        self._schedules: dict[str, ScheduleRecord] = {}
        self._paused: set[str] = set()
        self._workers: dict[str, WorkerRecord] = {}

    def __repr__(self) -> str:
        return f"<MemoryStore {self.url} jobs={len(self._jobs)}>"

    async def open(self) -> None:
        """Nothing to connect to; jobs stored before survive a close and a new open."""

    async def close(self) -> None:
        """Nothing to release."""

    # -- write side -------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[Job], *, connection: Any = None) -> list[Job]:
        """Store ``jobs`` in order, all or none; a job whose active key is taken is not
        stored and the holder is returned in its place. A later job of the batch whose
        ``after`` names a job replaced that way waits for the holder instead, and an
        ``after`` naming no stored active job is dropped (nothing to wait for). A
        ``connection`` is refused with ``ConfigurationError``: there is no transaction of
        the caller's to join."""
        if connection is not None:
            raise ConfigurationError(
                "transactional enqueue needs the PostgreSQL store: the memory store cannot "
                "write inside the transaction of your connection; leave connection unset"
            )
        with self._lock:
            return self._enqueue(jobs)

    async def release(self, ids: Sequence[str]) -> None:
        """Deferred jobs among ``ids`` become queued; others are left as they are."""
        with self._lock:
            for job in self._existing(ids):
                if job.state is JobState.DEFERRED:
                    self._set_state(job, JobState.QUEUED)
                    self._make_claimable(job)

    async def discard(
        self, ids: Sequence[str], now: float, keep_until: float | None = None
    ) -> None:
        """Deferred jobs among ``ids`` end discarded at ``now``, kept until ``keep_until``;
        their successors are freed."""
        with self._lock:
            for job in self._existing(ids):
                if job.state is JobState.DEFERRED:
                    self._end(job, JobState.DISCARDED, now, keep_until)

    async def claim(
        self,
        *,
        worker_id: str,
        queues: Sequence[str] | None,
        limit: int,
        now: float,
        lease_until: float,
    ) -> list[Job]:
        """Up to ``limit`` claimable jobs of queues not paused, now running for
        ``worker_id``, in claim order."""
        with self._lock:
            names = list(self._queues) if queues is None else list(dict.fromkeys(queues))
            heaps = [
                self._queues[name]
                for name in names
                if name in self._queues and name not in self._paused
            ]
            self._latest_now = max(self._latest_now, now)
            for heap in heaps:
                self._promote(heap, now)
            claimed: list[Job] = []
            while len(claimed) < limit:
                best: _Due | None = None
                best_heap: _QueueHeaps | None = None
                for heap in heaps:
                    top = self._peek_due(heap, now)
                    if top is not None and (best is None or top < best):
                        best, best_heap = top, heap
                if best is None or best_heap is None:
                    break
                heapq.heappop(best_heap.due)
                job = self._jobs[best[3]]
                del self._tokens[job.id]
                self._set_state(job, JobState.RUNNING)
                job.attempts += 1
                job.started_at = now
                job.lease_until = lease_until
                job.worker_id = worker_id
                claimed.append(_clone(job))
            return claimed

    async def renew_leases(
        self, *, worker_id: str, ids: Sequence[str], lease_until: float
    ) -> set[str]:
        """Extend the leases ``worker_id`` holds among ``ids``; return those of them whose
        cancellation was requested."""
        with self._lock:
            cancelled: set[str] = set()
            for job in self._existing(ids):
                if self._holds(job, worker_id):
                    job.lease_until = lease_until
                    if job.cancel_requested:
                        cancelled.add(job.id)
            return cancelled

    async def finish(self, outcomes: Sequence[Outcome]) -> list[str]:
        """Apply each outcome whose worker still holds its job; return the ids applied."""
        with self._lock:
            check_outcomes(outcomes)
            applied: list[str] = []
            for outcome in outcomes:
                job = self._jobs.get(outcome.job_id)
                if job is None or not self._holds(job, outcome.worker_id):
                    continue
                job.lease_until = None
                job.result = outcome.result
                job.error = None if outcome.error is None else _copy_json(outcome.error)
                if outcome.attempt is not None:
                    job.attempt_history = [*job.attempt_history, _copy_json(outcome.attempt)]
                if outcome.state is JobState.QUEUED:
                    self._set_state(job, JobState.QUEUED)
                    job.worker_id = None
                    job.run_at = outcome.run_at if outcome.run_at is not None else job.run_at
                    self._make_claimable(job)
                else:
                    self._set_state(job, outcome.state)
                    job.finished_at = outcome.finished_at
                    job.keep_until = outcome.keep_until
                    self._unblock(job.id)
                applied.append(job.id)
            return applied

    async def hand_back(self, *, worker_id: str, ids: Sequence[str]) -> None:
        """Jobs ``worker_id`` holds among ``ids`` are queued again, the attempt uncounted."""
        with self._lock:
            for job in self._existing(ids):
                if self._holds(job, worker_id):
                    self._requeue(job)
                    job.attempts = max(0, job.attempts - 1)

    async def requeue_expired(self, now: float, keep_until: float | None = None) -> int:
        """Queue running jobs whose lease ended before ``now`` (those asked to stop end
        cancelled instead, kept until ``keep_until``) and deferred jobs whose
        ``release_at`` is not after ``now``; return how many changed."""
        with self._lock:
            count = 0
            for job_id in list(self._running):
                job = self._jobs[job_id]
                if job.lease_until is not None and job.lease_until < now:
                    if job.cancel_requested:
                        job.lease_until = None
                        self._end(job, JobState.CANCELLED, now, keep_until)
                    else:
                        self._requeue(job)
                    count += 1
            for job_id in list(self._deferred):
                job = self._jobs[job_id]
                if job.release_at is not None and job.release_at <= now:
                    self._set_state(job, JobState.QUEUED)
                    self._make_claimable(job)
                    count += 1
            return count

    async def cancel(
        self, job_id: str, now: float, keep_until: float | None = None
    ) -> JobState | None:
        """Deferred or queued: cancelled at ``now``, kept until ``keep_until``. Running:
        ``cancel_requested`` set. Returns the state after, or None when no job has this
        id."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.state in (JobState.DEFERRED, JobState.QUEUED):
                self._tokens.pop(job.id, None)
                self._end(job, JobState.CANCELLED, now, keep_until)
            elif job.state is JobState.RUNNING:
                job.cancel_requested = True
            return job.state

    async def retry(self, job_id: str, now: float) -> bool:
        """A failed or cancelled job is queued again to run at ``now``. False when the job
        is missing, in another state, or its key is held by another active job."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state not in (JobState.FAILED, JobState.CANCELLED):
                return False
            if job.key is not None and job.key in self._keys:
                return False
            if job.after is not None:
                before = self._jobs.get(job.after)
                if before is None or before.state.terminal:
                    self._forget_waiter(job)
                    job.after = None
            self._set_state(job, JobState.QUEUED)
            job.run_at = now
            job.finished_at = None
            job.keep_until = None
            job.lease_until = None
            job.worker_id = None
            job.result = None
            job.cancel_requested = False
            self._make_claimable(job)
            return True

    async def set_progress(
        self, job_id: str, *, worker_id: str, progress: float | None, message: str | None
    ) -> None:
        """Record progress and message of a job ``worker_id`` holds; otherwise nothing.
        A lone surrogate in the message is kept as U+FFFD, as every store keeps it."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and self._holds(job, worker_id):
                job.progress = progress
                job.message = None if message is None else utf8_text(message)

    async def delete(self, ids: Sequence[str]) -> int:
        """Remove the jobs among ``ids`` whatever their state; successors are freed."""
        with self._lock:
            return self._remove(list(self._existing(ids)))

    async def purge(self, *, before: float, states: Sequence[JobState] | None = None) -> int:
        """Remove ended jobs whose ``keep_until`` (or, with ``states``, ``finished_at``) is
        before ``before``; return how many."""
        with self._lock:
            doomed: list[Job] = []
            if states is None:
                for job in self._jobs.values():
                    kept = job.keep_until
                    if job.state.terminal and kept is not None and kept < before:
                        doomed.append(job)
            else:
                wanted = TERMINAL_STATES.intersection(states)
                for job in self._jobs.values():
                    ended = job.finished_at
                    if job.state in wanted and ended is not None and ended < before:
                        doomed.append(job)
            return self._remove(doomed)

    # -- read side --------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        """A copy of the job with this id, or None."""
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else _clone(job)

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
        """Copies of the matching jobs, newest ``created_at`` first (ties: latest stored
        first), skipping ``offset`` and returning at most ``limit``. ``text`` is looked
        for, ignoring case, in the id, task, payload and error message."""
        needle = None if text is None else text.lower()
        with self._lock:
            wanted = max(0, offset + limit)
            # Store order is oldest first; while created_at follows it, read it backwards.
            jobs = reversed(self._jobs.values()) if self._created_in_order else self._jobs.values()
            matching = (
                job
                for job in jobs
                if (state is None or job.state is state)
                and (task is None or job.task == task)
                and (queue is None or job.queue == queue)
                and (needle is None or _matches_text(job, needle))
            )
            if self._created_in_order:
                newest = list(itertools.islice(matching, wanted))
            else:
                newest = heapq.nlargest(
                    wanted, matching, key=lambda job: (job.created_at, self._seq[job.id])
                )
            return [_clone(job) for job in newest[offset:]]

    async def counts(self) -> dict[str, dict[JobState, int]]:
        """Jobs per queue and state; states without jobs are left out."""
        with self._lock:
            result: dict[str, dict[JobState, int]] = {}
            for name, counter in self._counts.items():
                present = {state: n for state, n in counter.items() if n > 0}
                if present:
                    result[name] = present
            return result

    async def stats(self, *, since: float, width: float) -> list[StatsBucket]:
        """Jobs that ended succeeded, failed or cancelled at or after ``since``, in buckets
        of ``width`` seconds starting at multiples of ``width``, oldest first; empty
        buckets are left out."""
        if not width > 0:
            raise StoreError(f"stats needs a bucket width above zero, got {width!r}")
        with self._lock:
            buckets: dict[int, list[Any]] = {}
            for job in self._jobs.values():
                ended = job.finished_at
                if job.state not in _STATS_STATES or ended is None or ended < since:
                    continue
                row = buckets.setdefault(math.floor(ended / width), [Counter(), 0.0, 0])
                row[0][job.state] += 1
                started = job.started_at
                if started is not None and started >= job.run_at:
                    row[1] += started - job.run_at
                    row[2] += 1
        return [
            StatsBucket(
                start=index * width,
                succeeded=counter[JobState.SUCCEEDED],
                failed=counter[JobState.FAILED],
                cancelled=counter[JobState.CANCELLED],
                wait_total=wait_total,
                wait_count=wait_count,
            )
            for index, (counter, wait_total, wait_count) in sorted(buckets.items())
        ]

    # -- schedules ----------------------------------------------------------------------

    async def claim_slot(self, schedule: str, slot: float, job: Job) -> bool:
        """Record ``slot`` as the latest of ``schedule`` and store ``job`` (as ``enqueue``
        does), unless that slot or a later one was taken; then store nothing, return
        False."""
        with self._lock:
            record = self._schedules.get(schedule) or ScheduleRecord(name=schedule)
            if record.last_slot is not None and record.last_slot >= slot:
                return False
            self._enqueue([job])
            self._schedules[schedule] = dataclasses.replace(record, last_slot=slot)
            return True

    async def schedules(self) -> dict[str, ScheduleRecord]:
        """Every schedule that took a slot or was paused, by name."""
        with self._lock:
            return dict(self._schedules)

    async def pause_schedule(self, name: str, paused: bool) -> None:
        """Pause or resume ``name``, recording it if it is not known yet."""
        with self._lock:
            record = self._schedules.get(name) or ScheduleRecord(name=name)
            self._schedules[name] = dataclasses.replace(record, paused=paused)

    # -- queues and workers ---------------------------------------------------------------

    async def pause_queue(self, queue: str, paused: bool) -> None:
        """Pause ``queue`` (``claim`` skips it) or resume it."""
        with self._lock:
            if paused:
                self._paused.add(queue)
            else:
                self._paused.discard(queue)

    async def paused_queues(self) -> set[str]:
        """Names of the paused queues."""
        with self._lock:
            return set(self._paused)

    async def beat(self, worker: WorkerRecord) -> None:
        """Record ``worker`` in place of its previous record."""
        with self._lock:
            self._workers[worker.id] = worker

    async def workers(self, *, seen_since: float) -> list[WorkerRecord]:
        """Workers seen at or after ``seen_since``, oldest started first (ties by id);
        records of the others are dropped."""
        with self._lock:
            for stale in [w.id for w in self._workers.values() if w.seen_at < seen_since]:
                del self._workers[stale]
            return sorted(self._workers.values(), key=lambda w: (w.started_at, w.id))

    async def forget_worker(self, worker_id: str) -> None:
        """Remove the record of ``worker_id`` (nothing if there is none)."""
        with self._lock:
            self._workers.pop(worker_id, None)

    # -- helpers (called with the lock held) -----------------------------------------------

    def _enqueue(self, jobs: Sequence[Job]) -> list[Job]:
        ids = [job.id for job in jobs]
        if len(set(ids)) != len(ids) or any(job_id in self._jobs for job_id in ids):
            raise StoreError("enqueue refused: a job id is already stored or repeated")
        stored: list[Job] = []
        replaced: dict[str, str] = {}
        for given in jobs:
            job = _clone(given)
            if job.after is not None:
                job.after = replaced.get(job.after, job.after)
            holder = self._keys.get(job.key) if job.key is not None else None
            if holder is not None and job.state in ACTIVE_STATES:
                replaced[job.id] = holder
                stored.append(_clone(self._jobs[holder]))
                continue
            if job.after is not None:
                before = self._jobs.get(job.after)
                if before is None or before.state.terminal:
                    job.after = None
            self._insert(job)
            stored.append(_clone(job))
        return stored

    def _existing(self, ids: Iterable[str]) -> Iterable[Job]:
        for job_id in dict.fromkeys(ids):
            job = self._jobs.get(job_id)
            if job is not None:
                yield job

    @staticmethod
    def _holds(job: Job, worker_id: str) -> bool:
        return job.state is JobState.RUNNING and job.worker_id == worker_id

    def _insert(self, job: Job) -> None:
        self._next_seq += 1
        if job.created_at < self._latest_created:
            self._created_in_order = False
        self._latest_created = max(self._latest_created, job.created_at)
        self._jobs[job.id] = job
        self._seq[job.id] = self._next_seq
        self._counts.setdefault(job.queue, Counter())[job.state] += 1
        if job.state is JobState.RUNNING:
            self._running.add(job.id)
        elif job.state is JobState.DEFERRED:
            self._deferred.add(job.id)
        if job.key is not None and job.state in ACTIVE_STATES:
            self._keys[job.key] = job.id
        if job.after is not None:
            self._waiters.setdefault(job.after, set()).add(job.id)
        self._make_claimable(job)

    def _set_state(self, job: Job, state: JobState) -> None:
        """Move ``job`` to ``state``, keeping counts, state sets and the key index true."""
        old = job.state
        if old is state:
            return
        counter = self._counts[job.queue]
        counter[old] -= 1
        counter[state] += 1
        for members, member_state in (
            (self._running, JobState.RUNNING),
            (self._deferred, JobState.DEFERRED),
        ):
            if old is member_state:
                members.discard(job.id)
            if state is member_state:
                members.add(job.id)
        if job.key is not None:
            if state.terminal and self._keys.get(job.key) == job.id:
                del self._keys[job.key]
            elif state in ACTIVE_STATES:
                self._keys.setdefault(job.key, job.id)
        job.state = state

    def _end(self, job: Job, state: JobState, now: float, keep_until: float | None) -> None:
        """End ``job`` at ``now``, kept until ``keep_until``, and free its successors."""
        self._set_state(job, state)
        job.finished_at = now
        job.keep_until = keep_until
        self._unblock(job.id)

    def _requeue(self, job: Job) -> None:
        """A running job goes back to the queue, claimable at its old ``run_at``."""
        self._set_state(job, JobState.QUEUED)
        job.lease_until = None
        job.worker_id = None
        self._make_claimable(job)

    def _make_claimable(self, job: Job) -> None:
        """Put a queued job with nothing to wait for into its queue's heaps."""
        if job.state is not JobState.QUEUED or job.after is not None:
            return
        self._next_token += 1
        token = self._next_token
        self._tokens[job.id] = token
        heaps = self._queues.get(job.queue)
        if heaps is None:
            heaps = self._queues[job.queue] = _QueueHeaps()
        seq = self._seq[job.id]
        if job.run_at <= self._latest_now:
            heapq.heappush(heaps.due, (-job.priority, job.run_at, seq, job.id, token))
        else:
            heapq.heappush(heaps.scheduled, (job.run_at, seq, job.id, token))

    def _promote(self, heaps: _QueueHeaps, now: float) -> None:
        """Move the scheduled entries that are due by ``now`` into the due heap."""
        scheduled = heaps.scheduled
        while scheduled and scheduled[0][0] <= now:
            run_at, seq, job_id, token = heapq.heappop(scheduled)
            if self._tokens.get(job_id) == token:
                priority = self._jobs[job_id].priority
                heapq.heappush(heaps.due, (-priority, run_at, seq, job_id, token))

    def _peek_due(self, heaps: _QueueHeaps, now: float) -> _Due | None:
        """The best live due entry, dropping stale ones; entries not due by ``now`` (a
        caller's clock earlier than before) go back to the scheduled heap."""
        due = heaps.due
        while due:
            top = due[0]
            _, run_at, seq, job_id, token = top
            if self._tokens.get(job_id) != token:
                heapq.heappop(due)
            elif run_at > now:
                heapq.heappop(due)
                heapq.heappush(heaps.scheduled, (run_at, seq, job_id, token))
            else:
                return top
        return None

    def _unblock(self, job_id: str) -> None:
        """Clear ``after`` on every job waiting for ``job_id``; queued ones become claimable."""
        for waiter_id in self._waiters.pop(job_id, ()):
            waiter = self._jobs.get(waiter_id)
            if waiter is not None and waiter.after == job_id:
                waiter.after = None
                self._make_claimable(waiter)

    def _forget_waiter(self, job: Job) -> None:
        if job.after is not None:
            waiting = self._waiters.get(job.after)
            if waiting is not None:
                waiting.discard(job.id)
                if not waiting:
                    del self._waiters[job.after]

    def _remove(self, doomed: list[Job]) -> int:
        for job in doomed:
            del self._jobs[job.id]
            del self._seq[job.id]
            self._counts[job.queue][job.state] -= 1
            self._running.discard(job.id)
            self._deferred.discard(job.id)
            self._tokens.pop(job.id, None)
            if job.key is not None and self._keys.get(job.key) == job.id:
                del self._keys[job.key]
            self._forget_waiter(job)
        for job in doomed:
            self._unblock(job.id)
        return len(doomed)
