"""The Redis store: jobs in one Redis server, shared by web processes and workers on many
hosts.

Every verb that changes jobs is one Lua script (``stores/lua/``), so it is atomic on the
server; scripts are sent once and then called by their SHA1 (sent again after a server
restart). A job is a hash; sorted sets index what the verbs look up (claimable jobs per
queue and priority, leases, retention, listing order); ``common.lua`` lists every key.
All keys of a lane start with its prefix (``?prefix=``, default ``backlane:``), so several
lanes share one Redis.

Waiting for work costs Redis nothing but an open connection: a claim that takes all there
was marks the lane idle for a few seconds, and while it is, a script that makes work
claimable publishes on the lane's wake channel; ``wait_for_work`` returns on that
message, or when the next delayed job the last claim saw becomes due.

A call whose connection broke is sent again (``redis_link``); none acts twice: an
enqueue and a claim carry a token by which a second run recognises the first run's work
(see ``common.lua``), a schedule slot is recognised by its job. ``docs/redis.md`` says
what each Redis persistence setting guarantees.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError, ResponseError

from ..exceptions import ConfigurationError, StoreError
from ..jobs import TERMINAL_STATES, Job, JobState
from .base import (
    Outcome,
    ScheduleRecord,
    StatsBucket,
    Store,
    WorkerRecord,
    check_outcomes,
    utf8_text,
)
from .redis_codec import (
    UnreadableJob,
    decode_job,
    decode_jobs,
    decode_listed,
    decode_worker,
    job_fields,
    job_pairs,
    jobs_json,
    number,
    outcomes_json,
    worker_json,
)
from .redis_link import (
    Link,
    Links,
    call,
    command,
    load_library,
    load_scripts,
    log,
    parse_redis_url,
)

_STATS_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
_MINUTE = 60.0
"""The span of the per-minute tallies ``stats`` reads (``P ends:<minute>``, common.lua)."""
_BATCH = 1000
"""Most jobs one script call of ``purge``, ``requeue_expired`` or ``stats`` handles, so
that no call holds the server for long."""
_SCAN = 2000
"""Index entries one call of a filtered ``list_jobs`` walks."""
SEARCH_DEPTH = 20_000
"""Index entries a filtered ``list_jobs`` walks in all: the newest jobs (of the state
asked for) that a search by task, queue or text looks through. Redis keeps no index on
those, so a search reads each job it looks at; 20,000 take about 150 ms."""
_IDLE_MS = 10_000
"""How long a claim that took all there was keeps the lane marked idle (wake-ups
published)."""
_LONGEST_WAIT = _IDLE_MS / 1000 / 2
"""``wait_for_work`` returns at the latest this long after the task's last claim, so
that the claim that follows renews the idle mark before it lapses."""
HAND_OFFS = True
"""Whether a waiting worker offers its free slots, to be handed jobs in one step (see
``wait_for_work``). A job handed over holds only a short lease (``_HANDED_LEASE``) until the
worker takes it, so a job handed to a worker that died comes back within seconds, its
attempt uncounted. Off: waiting workers are only woken, and claim."""
_OFFER = 0.25
"""Seconds a waiting worker's offer to take work lasts before it renews it (as often as an
idle worker claims anyway): a worker killed while waiting is handed jobs for at most this
long, and a tenth of a second more."""
_HANDED_LEASE = 2.0
"""Seconds a job handed to a waiting worker is held for it before the worker takes it (and
gives it its full lease). Not taken by then, the job is queued again, uncounted, by the
next offer or claim of any worker (or a sweep of expired leases)."""
_TAKE_LATEST = 0.05
"""Seconds after a worker starts jobs handed to it within which it takes them (gives them
its full lease) in a call of its own, if no offer to take work carried them first."""
_SEEN_FOR = 120.0
"""Seconds a worker remembers a hand-off it received, to know it again when its next claim
returns it too."""
_TAKE_WITHIN = _HANDED_LEASE / 2
"""A handed job whose short lease has less than this left (by this host's clock) is not
started on the strength of the hand-off alone: the worker's next claim asks Redis whether
it still holds it."""


@dataclass(frozen=True)
class _ClaimMark:
    """What a task's last claim saw: the wake generation when it started, the earliest
    delayed job left, and when it ran (monotonic); and what a wait after it may offer to
    take: for which worker, how many jobs, from which queues (JSON, '' for every queue)."""

    link: Link
    generation: int | None
    next_due: float | None
    at: float
    worker_id: str = ""
    capacity: int = 0
    queues: str = ""
    offered: float = 0.0
    """Until when (monotonic) the claim's own offer to take work lasts: the wait after it
    makes none before then."""


def _token() -> str:
    return os.urandom(8).hex()


def _opt(value: float | None) -> str:
    return "" if value is None else number(value)


class RedisStore(Store):
    """Jobs in Redis (``redis://[:password@]host:6379/0``, ``rediss://`` for TLS,
    ``unix:///path/redis.sock?db=0``), under the key prefix ``?prefix=`` (default
    ``backlane:``). The query parameters redis-py takes that the store knows
    (``socket_timeout=5``, ``db``, ... see ``redis_link._OPTIONS``) go to redis-py; any other
    is refused with ``ConfigurationError``."""

    use_functions = True
    """Whether to run the verbs as a library of Redis functions where Redis has them (7.0
    and later): ``common.lua`` then runs once, not at each call (about 20 us of Redis time
    saved per call). False: as scripts, as on Redis 6.2."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = parse_redis_url(url)
        self.prefix = parsed.prefix
        self._links = Links(parsed)
        self._scripts = load_scripts()
        self._mark: contextvars.ContextVar[_ClaimMark | None] = contextvars.ContextVar(
            f"backlane_redis_claim_{id(self)}", default=None
        )
        self._handed: dict[str, list[Job]] = {}
        """Jobs handed to a waiting worker, by worker id, that its next claim returns."""
        self._ending: dict[str, asyncio.Future[None]] = {}
        """What each worker's ``wait_for_work`` awaits, for its pop to settle."""
        self._seen: dict[str, OrderedDict[tuple[str, int, float | None], float]] = {}
        """Hand-offs each worker received (id, attempt and start, monotonic time): a job
        comes both by the worker's pop and by its next claim when the two cross."""

    def __repr__(self) -> str:
        return f"<RedisStore {self._links.url.safe} prefix={self.prefix!r}>"

    async def open(self) -> None:
        """Connect (checking that Redis answers) and send the scripts. Idempotent; raises
        ``StoreError`` when Redis cannot be reached, ``ConfigurationError`` when it is a
        Redis Cluster node."""
        if self._links.open:
            return
        self._links.open = True
        try:
            link = await self._links.get()
            info = await command(link, "INFO", "cluster")
            if "cluster_enabled:1" in info:
                raise ConfigurationError(
                    f"{self._links.url.safe} is a Redis Cluster node: the Redis store does "
                    "not support Redis Cluster yet; point it at a standalone Redis"
                )
            self._links.functions = link.functions = await self._load_functions(link)
            if not link.functions:
                await asyncio.gather(
                    *(
                        command(link, "SCRIPT", "LOAD", script.text)
                        for script in self._scripts.values()
                    )
                )
        except BaseException:
            await self._links.close()
            raise

    async def _load_functions(self, link: Link) -> bool:
        """Load the library of functions; False when this Redis has none (before 7.0) or
        refuses them (ACL): the verbs then run as scripts."""
        if not self.use_functions:
            return False
        try:
            await load_library(link)
        except ResponseError as exc:
            log.info(
                "Redis at %s runs backlane's scripts, not functions: %s", self._links.url.safe, exc
            )
            return False
        except RedisError as exc:
            raise StoreError(f"Redis store {self._links.url.safe}: {exc}") from exc
        return True

    async def close(self) -> None:
        """Close the connections of every event loop. Idempotent."""
        await self._links.close()

    async def _call(self, name: str, *args: str | int) -> Any:
        return await call(await self._links.get(), self._scripts[name], *args)

    # -- write side -------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[Job], *, connection: Any = None) -> list[Job]:
        """Store ``jobs`` in order in one script; a job whose active key is taken is not
        stored and the holder is returned in its place. A later job of the batch whose
        ``after`` names a job replaced that way waits for the holder instead, and an
        ``after`` naming no stored active job is dropped. A ``connection`` is refused with
        ``ConfigurationError``: Redis has no transaction of the caller's to join."""
        if connection is not None:
            raise ConfigurationError(
                "transactional enqueue needs the PostgreSQL store: the Redis store cannot "
                "write inside the transaction of your connection; leave connection unset"
            )
        if not jobs:
            return []
        if len(jobs) == 1:  # one job as name, value, name, value... (no JSON either side)
            replies = await self._call("enqueue", _token(), *job_pairs(jobs[0]))
        else:
            replies = await self._call("enqueue", _token(), jobs_json(jobs))
        stored: list[Job] = []
        for job, reply in zip(jobs, replies, strict=True):
            if isinstance(reply, list):
                stored.append(decode_job(reply))
            else:
                stored.append(_stored_copy(job, reply or None))
        return stored

    async def release(self, ids: Sequence[str]) -> None:
        """Deferred jobs among ``ids`` become queued; others are left as they are."""
        if ids:
            await self._call("release", *ids)

    async def discard(
        self, ids: Sequence[str], now: float, keep_until: float | None = None
    ) -> None:
        """Deferred jobs among ``ids`` end discarded at ``now``, kept until ``keep_until``;
        their successors are freed."""
        if ids:
            await self._call("discard", number(now), _opt(keep_until), *ids)

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
        ``worker_id``, in claim order. Remembers, for ``wait_for_work`` in the same task,
        what the claim saw."""
        if limit <= 0 or (queues is not None and not queues):
            return []
        link = await self._links.get()
        generation = None if link.wakes is None else link.wakes.generation
        handed = self._take_handed(link, generation, worker_id, queues, limit)
        if handed:
            self._took(link, worker_id, handed, lease_until)
            return handed
        args = self._claim_args(link, worker_id, queues, limit, now, lease_until)
        reply = await call(link, self._scripts["claim"], *args)
        return await self._claimed(link, generation, reply, args, now, lease_until)

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
        """``finish(outcomes)`` then ``claim(...)`` in one script: one round trip for a
        worker's loop turn (``release``, if any, is one call before)."""
        check_outcomes(outcomes)
        if release:
            await self.release(release)
        if limit <= 0 or (queues is not None and not queues):
            return await self.finish(outcomes), []
        link = await self._links.get()
        generation = None if link.wakes is None else link.wakes.generation
        handed = self._take_handed(link, generation, worker_id, queues, limit)
        if handed:
            try:
                applied = await self.finish(outcomes) if outcomes else []
            except BaseException:
                self._handed[worker_id] = handed + self._handed.get(worker_id, [])
                raise
            self._took(link, worker_id, handed, lease_until)
            return applied, handed
        args = self._claim_args(link, worker_id, queues, limit, now, lease_until)
        text = outcomes_json(outcomes) if outcomes else "[]"
        reply = await call(link, self._scripts["finish_claim"], text, *args)
        applied = list(reply[0])
        claimed = await self._claimed(link, generation, reply[1:], args, now, lease_until)
        return applied, claimed

    @staticmethod
    def _claim_args(
        link: Link,
        worker_id: str,
        queues: Sequence[str] | None,
        limit: int,
        now: float,
        lease_until: float,
    ) -> tuple[str | int, ...]:
        names = _names(queues)
        # A worker whose pop of handed jobs is under way waits again after a claim that
        # leaves it room: the claim makes its offer to take work, the wait then needs none.
        pop = link.handoffs.get(worker_id)
        offer = HAND_OFFS and pop is not None and not pop.done()
        lease, period = (number(_HANDED_LEASE), number(_OFFER)) if offer else ("", "")
        args = (_token(), worker_id, number(now), number(lease_until), limit, names, _IDLE_MS)
        return (*args, lease, period)

    async def _claimed(
        self,
        link: Link,
        generation: int | None,
        reply: list[Any],
        args: tuple[str | int, ...],
        now: float,
        lease_until: float,
    ) -> list[Job]:
        """The jobs a claim script returned: those handed to the worker while it waited
        (not seen before; the script gave them their full lease), then those it claimed.
        A job whose hash cannot be read ends failed instead (``_fail_unreadable``).
        Remembers what the claim saw."""
        _, worker_id, _, _, limit, queues, _, _, period = args
        worker_id = str(worker_id)
        next_due = float(reply[0]) if reply[0] else None
        unreadable: list[UnreadableJob] = []
        handed = decode_jobs(reply[1], unreadable)
        claimed = self._fresh(worker_id, handed)
        if len(claimed) < len(handed) and worker_id in self._handed:
            # crossed with the pop: the copies it kept for the next claim are returned now
            # (the script took them): a worker that stops when a claim finds nothing, or
            # stops at all, must not leave them behind
            now_held = {job.id: job for job in handed}
            kept = self._handed.pop(worker_id)
            claimed.extend(now_held[job.id] for job in kept if job.id in now_held)
            rest = [job for job in kept if job.id not in now_held]
            if rest:
                self._handed[worker_id] = rest
        for job in decode_jobs(reply[2:], unreadable):
            job.state = JobState.RUNNING
            job.attempts += 1
            job.started_at = now
            job.lease_until = lease_until
            job.worker_id = worker_id
            claimed.append(job)
        capacity = int(limit) - len(claimed)
        at = time.monotonic()
        offered = at + _OFFER if period and capacity > 0 else 0.0
        mark = _ClaimMark(
            link, generation, next_due, at, worker_id, capacity, str(queues), offered
        )  # fmt: skip
        self._mark.set(mark)
        if unreadable:
            await self._fail_unreadable(worker_id, unreadable, now)
        return claimed

    async def _fail_unreadable(
        self, worker_id: str, unreadable: list[UnreadableJob], now: float
    ) -> None:
        """End failed, at ``now``, the jobs ``worker_id`` just claimed whose hash cannot be
        read: they cannot run, and must not come back to every claim. Their error says
        which field is wrong; they are kept until removed by hand (no ``keep_until``), for
        someone to look at. Should Redis refuse that too, the jobs are left to their lease
        and the claim's other jobs go on."""
        outcomes = []
        for problem in unreadable:
            log.error("%s (it cannot run: it ends failed)", problem)
            if problem.job_id is not None:
                kind = type(problem)
                error = {
                    "type": f"{kind.__module__}.{kind.__qualname__}",
                    "message": str(problem),
                    "traceback": "",
                }
                outcomes.append(
                    Outcome(problem.job_id, worker_id, JobState.FAILED, now, error=error)
                )
        try:
            await self.finish(outcomes)
        except StoreError as exc:
            log.error("could not record %d unreadable jobs as failed: %s", len(outcomes), exc)

    def _take_handed(
        self,
        link: Link,
        generation: int | None,
        worker_id: str,
        queues: Sequence[str] | None,
        limit: int,
    ) -> list[Job]:
        """Up to ``limit`` jobs handed to the worker while it waited, not yet returned, and
        with most of their short lease left: they run for it already, so they start without
        a round trip (``_took`` then gives them the full lease). The others are left to the
        worker's claim script, which returns those it still holds, or gives them back."""
        waiting = self._handed.pop(worker_id, None)
        if not waiting:
            return []
        fresh_until = time.time() + _TAKE_WITHIN
        taken: list[Job] = []
        seen = self._seen.get(worker_id, OrderedDict())
        for job in waiting:
            if len(taken) < limit and (job.lease_until or 0.0) > fresh_until:
                taken.append(job)
            else:
                seen.pop(_seen_key(job), None)
        if taken:
            mark = _ClaimMark(
                link, generation, None, time.monotonic(), worker_id, limit - len(taken),
                _names(queues),
            )  # fmt: skip
            self._mark.set(mark)
        return taken

    def _took(self, link: Link, worker_id: str, jobs: list[Job], lease_until: float) -> None:
        """``jobs`` handed to ``worker_id`` start now: give them ``lease_until`` in Redis,
        not waited for (their short lease leaves it time): with the worker's next offer to
        take work, which follows at once when it waits, or in a call of its own within
        ``_TAKE_LATEST``."""
        for job in jobs:
            job.lease_until = lease_until
        ids = [job.id for job in jobs]
        pending = link.taking.get(worker_id)
        if pending is not None and pending[0] == lease_until:
            pending[1].extend(ids)
            return
        if pending is not None:  # another lease: that one goes now
            self._send_take(link, worker_id)
        link.taking[worker_id] = (lease_until, ids)
        link.loop.call_later(_TAKE_LATEST, self._send_take, link, worker_id, ids)

    def _send_take(self, link: Link, worker_id: str, ids: list[str] | None = None) -> None:
        """Send the take ``_took`` keeps for ``worker_id`` in a call of its own (if ``ids``,
        only if that is still the one kept)."""
        pending = link.taking.get(worker_id)
        if pending is None or (ids is not None and pending[1] is not ids):
            return
        del link.taking[worker_id]
        task = link.loop.create_task(self._take(link, worker_id, *pending))
        link.takes.add(task)
        task.add_done_callback(link.takes.discard)

    async def _take(self, link: Link, worker_id: str, lease_until: float, ids: list[str]) -> None:
        try:
            lost = await call(link, self._scripts["take"], worker_id, number(lease_until), *ids)
        except StoreError as exc:
            log.warning("worker %s could not take %d handed jobs: %s", worker_id, len(ids), exc)
            return
        _lost(worker_id, lost)

    def _fresh(self, worker_id: str, jobs: list[Job]) -> list[Job]:
        """``jobs`` handed to ``worker_id`` less those it already received."""
        if not jobs:
            return jobs
        seen = self._seen.setdefault(worker_id, OrderedDict())
        now = time.monotonic()
        while seen and now - next(iter(seen.values())) > _SEEN_FOR:  # oldest first
            seen.popitem(last=False)
        fresh = []
        for job in jobs:
            key = _seen_key(job)
            if key not in seen:
                seen[key] = now
                fresh.append(job)
        return fresh

    async def renew_leases(
        self, *, worker_id: str, ids: Sequence[str], lease_until: float
    ) -> set[str]:
        """Extend the leases ``worker_id`` holds among ``ids``; return those of them whose
        cancellation was requested."""
        if not ids:
            return set()
        return set(await self._call("renew", worker_id, number(lease_until), *ids))

    async def finish(self, outcomes: Sequence[Outcome]) -> list[str]:
        """Apply each outcome whose worker still holds its job; return the ids applied."""
        check_outcomes(outcomes)
        if not outcomes:
            return []
        return list(await self._call("finish", outcomes_json(outcomes)))

    async def hand_back(self, *, worker_id: str, ids: Sequence[str]) -> None:
        """Jobs ``worker_id`` holds among ``ids`` are queued again, the attempt uncounted."""
        if ids:
            await self._call("hand_back", worker_id, *ids)

    async def requeue_expired(self, now: float, keep_until: float | None = None) -> int:
        """Queue running jobs whose lease ended before ``now`` (those asked to stop end
        cancelled instead, kept until ``keep_until``) and deferred jobs whose
        ``release_at`` is not after ``now``; return how many changed. Works in steps of
        at most ``_BATCH`` jobs of each kind."""
        total = 0
        while True:
            changed, more = await self._call(
                "requeue_expired", number(now), _opt(keep_until), _BATCH
            )
            total += int(changed)
            if not more:
                return total

    async def cancel(
        self, job_id: str, now: float, keep_until: float | None = None
    ) -> JobState | None:
        """Deferred or queued: cancelled at ``now``, kept until ``keep_until``. Running:
        ``cancel_requested`` set. Returns the state after, or None when no job has this
        id."""
        state = await self._call("cancel", job_id, number(now), _opt(keep_until))
        return None if state is None else JobState(state)

    async def retry(self, job_id: str, now: float) -> bool:
        """A failed or cancelled job is queued again to run at ``now``. False when the job
        is missing, in another state, or its key is held by another active job."""
        return bool(await self._call("retry", job_id, number(now)))

    async def set_progress(
        self, job_id: str, *, worker_id: str, progress: float | None, message: str | None
    ) -> None:
        """Record progress and message of a job ``worker_id`` holds; otherwise nothing.
        A lone surrogate in the message is kept as U+FFFD (Redis takes UTF-8 only)."""
        has_message = "0" if message is None else "1"
        text = "" if message is None else utf8_text(message)
        await self._call("progress", job_id, worker_id, _opt(progress), has_message, text)

    async def delete(self, ids: Sequence[str]) -> int:
        """Remove the jobs among ``ids`` whatever their state; successors are freed."""
        if not ids:
            return 0
        return int(await self._call("delete", *ids))

    async def purge(self, *, before: float, states: Sequence[JobState] | None = None) -> int:
        """Remove ended jobs whose ``keep_until`` (or, with ``states``, ``finished_at``) is
        before ``before``; return how many. Works in steps of at most ``_BATCH`` jobs,
        letting other work in between."""
        names: list[str] = []
        if states is not None:
            names = sorted(state.value for state in TERMINAL_STATES.intersection(states))
            if not names:
                return 0
        total = 0
        while True:
            removed, more = await self._call("purge", number(before), _BATCH, *names)
            total += int(removed)
            if not more:
                return total

    # -- read side --------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        fields = await command(await self._links.get(), "HGETALL", self.prefix + "job:" + job_id)
        return decode_job(fields) if fields else None

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
        """The matching jobs, newest ``created_at`` first (ties: latest stored first),
        skipping ``offset`` and returning at most ``limit``. ``text`` is looked for in the
        id, task, arguments and error message, ignoring the case of ASCII letters only.

        With ``task``, ``queue`` or ``text``, only the newest ``SEARCH_DEPTH`` jobs of the
        index (of one state, or of all jobs) are looked through: Redis keeps no index on
        those, and a search must not read every job of a large store. The index is read
        in steps of ``_SCAN`` entries: each step is atomic, the whole read is not, so jobs
        stored or removed meanwhile may shift a long page. A job whose hash cannot be read
        is logged and listed in its place as a stand-in whose ``error`` says what is wrong
        (``redis_codec.unreadable_stand_in``): one bad hash never fails the page."""
        active = state is not None and state not in TERMINAL_STATES
        index = "all" if state is None else "live" if active else f"state:{state.value}"
        limit, offset = max(0, limit), max(0, offset)
        if limit == 0:
            return []
        found: list[Job] = []
        if task is None and queue is None and text is None and not active:
            while len(found) < limit:
                size = min(_SCAN, limit - len(found))
                rows = await self._call("page", index, offset + len(found), size)
                found.extend(decode_listed(fields) for fields in rows)
                if len(rows) < size:
                    break
            return found
        start, skip = 0, offset
        while 0 <= start < SEARCH_DEPTH and len(found) < limit:
            reply = await self._call(
                "scan",
                index,
                start,
                _SCAN,
                skip,
                limit - len(found),
                task or "",
                queue or "",
                "0" if text is None else "1",
                text or "",
                state.value if active and state is not None else "",
            )
            start, skip = int(reply[0]), skip - int(reply[1])
            found.extend(decode_listed(fields) for fields in reply[2:])
        return found

    async def counts(self) -> dict[str, dict[JobState, int]]:
        """Jobs per queue and state; states without jobs are left out."""
        flat = await command(await self._links.get(), "HGETALL", self.prefix + "counts")
        result: dict[str, dict[JobState, int]] = {}
        for field, n in zip(flat[::2], flat[1::2], strict=True):
            state, _, queue = field.partition(":")
            if int(n) > 0:
                result.setdefault(queue, {})[JobState(state)] = int(n)
        return result

    async def stats(self, *, since: float, width: float) -> list[StatsBucket]:
        """Jobs that ended succeeded, failed or cancelled at or after ``since``, in buckets
        of ``width`` seconds starting at multiples of ``width``, oldest first; empty
        buckets are left out.

        When ``width`` is a whole number of minutes, the whole minutes of the last
        ``ENDS_KEPT`` seconds (two hours: see ``common.lua``) are read from per-minute
        tallies that the scripts ending and removing jobs keep, in one call whatever the
        number of jobs; their waits are counted to the microsecond. What is left (the
        part of a minute before ``since``'s next minute, older minutes, any other
        ``width``) is counted on the server from the jobs themselves, ``_BATCH`` jobs per
        call."""
        if not width > 0 or not math.isfinite(width):
            raise StoreError(f"stats needs a bucket width above zero, got {width!r}")
        buckets: dict[int, _Bucket] = {}
        counted_from = math.inf
        if width % _MINUTE == 0 and math.isfinite(since):
            reply = await self._call("stats_minutes", number(math.ceil(since / _MINUTE) * _MINUTE))
            counted_from = float(reply[0])
            for i in range(1, len(reply), 6):
                bucket = buckets.setdefault(math.floor(float(reply[i]) / width), _Bucket())
                for state, n in zip(_STATS_STATES, reply[i + 1 : i + 4], strict=True):
                    bucket.ended[state] += int(n)
                bucket.wait_us += int(reply[i + 4])
                bucket.wait_count += int(reply[i + 5])
        if since < counted_from:
            await self._scan_stats(buckets, since, counted_from, width)
        return [
            bucket.record(index * width)
            for index, bucket in sorted(buckets.items())
            if any(bucket.ended.values())
        ]

    async def _scan_stats(
        self, buckets: dict[int, _Bucket], since: float, until: float, width: float
    ) -> None:
        """Add to ``buckets`` the jobs that ended in ``[since, until)``, read one by one."""
        to = "+inf" if until == math.inf else "(" + number(until)
        for state in _STATS_STATES:
            start, skip = number(since), 0
            while True:
                reply = await self._call(
                    "stats", state.value, start, skip, number(width), _BATCH, to
                )
                walked, start, skip = int(reply[0]), reply[1], int(reply[2])
                for i in range(3, len(reply), 4):
                    bucket = buckets.setdefault(int(float(reply[i])), _Bucket())
                    bucket.ended[state] += int(reply[i + 1])
                    bucket.wait_total += float(reply[i + 2])
                    bucket.wait_count += int(reply[i + 3])
                if walked < _BATCH:
                    break

    # -- schedules ----------------------------------------------------------------------

    async def claim_slot(self, schedule: str, slot: float, job: Job) -> bool:
        """Record ``slot`` as the latest of ``schedule`` and store ``job`` (as ``enqueue``
        does) in one script, unless that slot or a later one was taken; then store
        nothing, return False."""
        fields = _json_object(job_fields(job))
        return bool(await self._call("claim_slot", schedule, number(slot), fields))

    async def schedules(self) -> dict[str, ScheduleRecord]:
        """Every schedule that took a slot or was paused, by name."""
        flat, paused = await self._call("schedules")
        slots = dict(zip(flat[::2], flat[1::2], strict=True))
        return {
            name: ScheduleRecord(
                name=name, last_slot=float(slot) if slot else None, paused=name in paused
            )
            for name, slot in sorted(slots.items())
        }

    async def pause_schedule(self, name: str, paused: bool) -> None:
        """Pause or resume ``name``, recording it if it is not known yet."""
        await self._call("pause_schedule", name, "1" if paused else "0")

    # -- queues and workers ---------------------------------------------------------------

    async def pause_queue(self, queue: str, paused: bool) -> None:
        """Pause ``queue`` (``claim`` skips it) or resume it (waking waiting workers)."""
        await self._call("pause_queue", queue, "1" if paused else "0")

    async def paused_queues(self) -> set[str]:
        """Names of the paused queues."""
        return set(await command(await self._links.get(), "SMEMBERS", self.prefix + "paused"))

    async def beat(self, worker: WorkerRecord) -> None:
        """Record ``worker`` in place of its previous record."""
        await self._call("beat", worker.id, number(worker.seen_at), worker_json(worker))

    async def workers(self, *, seen_since: float) -> list[WorkerRecord]:
        """Workers seen at or after ``seen_since``, oldest started first (ties by id);
        records of the others are dropped."""
        records = [decode_worker(text) for text in await self._call("workers", number(seen_since))]
        return sorted(records, key=lambda w: (w.started_at, w.id))

    async def forget_worker(self, worker_id: str) -> None:
        """Remove the record of ``worker_id`` (nothing if there is none)."""
        await self._call("forget_worker", worker_id)

    # -- waiting for work -----------------------------------------------------------------

    async def wait_for_work(self, timeout: float) -> None:
        """Wait until there may be work to claim, at most ``timeout`` seconds.

        Returns within milliseconds of any process making work claimable after this
        task's last ``claim`` began (enqueue, release, a retry or a requeued lease, a job
        freed by the one before it, a queue resumed; a job stored to run later counts
        too, so that the next claim learns when it is due), when the earliest delayed job
        that claim saw becomes due, or after ``timeout`` — and never later than a few seconds
        after that claim, so that waiting workers keep the lane marked idle. The first
        call in an event loop subscribes to the lane's wake channel and returns once
        subscribed. While Redis cannot be reached it simply waits ``timeout``.

        While it waits (``HAND_OFFS``), the worker of that claim offers to take as many
        jobs as the claim left room for: a job of its queues made claimable meanwhile is
        handed to it, already running for it under a short lease (``_HANDED_LEASE``), and
        comes with the wake-up; its next ``claim`` returns it without waiting for Redis and
        gives it the full lease (sent with the worker's next offer). A job handed and never
        taken is queued again, uncounted. A worker whose pop is under way made its offer with
        its last claim already: the wait sends none until that offer is due for renewal."""
        link = await self._links.get()
        wakes = link.wakes_started()
        mark = self._mark.get()
        if mark is None or mark.link is not link or mark.generation is None:
            generation = wakes.generation
        else:
            generation = mark.generation
            timeout = min(timeout, mark.at + _LONGEST_WAIT - time.monotonic())
            if mark.next_due is not None:
                timeout = min(timeout, mark.next_due - time.time())
        if timeout <= 0 or wakes.generation != generation:
            return
        if not HAND_OFFS or mark is None or mark.link is not link or mark.capacity <= 0:
            await wakes.wait(generation, timeout)
            return
        worker_id = mark.worker_id
        loop = link.loop
        until = loop.time() + timeout
        offered = mark.offered - loop.time()  # the claim's own offer (same clock)
        while not self._handed.get(worker_id):
            left = until - loop.time()
            if left <= 0:
                return
            # the pop first: a claim sent while the offer below is on its way (a job of the
            # worker ended) sees it under way, and makes the next offer itself
            pop = link.handoffs.get(worker_id)
            if pop is None or pop.done():
                link.handoffs[worker_id] = loop.create_task(self._pop_handed(link, worker_id))
            if offered > _OFFER / 10 and worker_id not in link.taking:
                offer, offered = min(left, offered), 0.0  # made by the claim: none to send
            else:
                offered = 0.0
                offer = min(left, _OFFER)
                taking = link.taking.pop(worker_id, None)  # the jobs it started go with it
                sent = loop.create_task(self._offer(link, mark, offer, taking))
                link.takes.add(sent)
                sent.add_done_callback(link.takes.discard)
                try:  # a worker that stops waiting leaves the call to end on its own
                    await asyncio.shield(sent)
                except StoreError:  # Redis away: wait for the listener, which waits for Redis
                    await wakes.wait(generation, left)
                    return
            # One future ends this offer: settled by the pop when it keeps a batch (one
            # turn of the loop from the reply to this task), by a wake-up, or at the end
            # of the offer (a pop that failed waits for that too).
            ends = loop.create_future()
            if self._handed.get(worker_id) or not wakes.add(generation, ends):
                return
            self._ending[worker_id] = ends
            timer = loop.call_later(offer, _settle, ends)
            try:
                await ends
            finally:
                timer.cancel()
                wakes.discard(ends)
                if self._ending.get(worker_id) is ends:
                    del self._ending[worker_id]
            if wakes.generation != generation:
                return

    async def _offer(
        self, link: Link, mark: _ClaimMark, offer: float, taking: tuple[float, list[str]] | None
    ) -> None:
        """Send the offer of ``mark``'s worker to take work for ``offer`` seconds, with the
        take of the jobs it started, if any. Runs apart from the wait that sends it: a call
        cancelled before its reply is read costs its connection, and a waiting worker stops
        waiting whenever one of its jobs ends."""
        worker_id = mark.worker_id
        take = () if taking is None else (number(taking[0]), *taking[1])
        try:
            lost = await self._call(
                "wait", worker_id, mark.capacity, number(_HANDED_LEASE), number(offer),
                mark.queues, *take,
            )  # fmt: skip
        except StoreError:
            if taking is not None:  # the take goes on trying in a call of its own
                task = link.loop.create_task(self._take(link, worker_id, *taking))
                link.takes.add(task)
                task.add_done_callback(link.takes.discard)
            raise
        _lost(worker_id, lost)

    async def _pop_handed(self, link: Link, worker_id: str) -> None:
        """Wait (in Redis) for a batch of jobs handed to ``worker_id``, and keep it for
        its next claim. Never cancelled by a waiter: a batch popped is never lost (it
        also stays in Redis until that claim)."""
        hand, took = f"{self.prefix}hand:{worker_id}", f"{self.prefix}took:{worker_id}"
        try:
            text = await link.blocking(
                worker_id, "BLMOVE", hand, took, "LEFT", "RIGHT", _LONGEST_WAIT + 1
            )
        except (RedisError, OSError) as exc:
            log.debug("waiting for jobs handed to %s failed: %s", worker_id, exc)
            return
        if text:
            # a job that cannot be read is left to the claim that returns it again
            jobs = self._fresh(worker_id, decode_jobs(json.loads(text), []))
            if jobs:
                self._handed.setdefault(worker_id, []).extend(jobs)
                ends = self._ending.pop(worker_id, None)
                if ends is not None:
                    _settle(ends)


class _Bucket:
    """A ``StatsBucket`` being counted: jobs by end state, waits from tallies in
    microseconds and waits of jobs read one by one in seconds."""

    def __init__(self) -> None:
        self.ended = dict.fromkeys(_STATS_STATES, 0)
        self.wait_us = 0
        self.wait_total = 0.0
        self.wait_count = 0

    def record(self, start: float) -> StatsBucket:
        return StatsBucket(
            start=start,
            succeeded=self.ended[JobState.SUCCEEDED],
            failed=self.ended[JobState.FAILED],
            cancelled=self.ended[JobState.CANCELLED],
            wait_total=self.wait_us / 1e6 + self.wait_total,
            wait_count=self.wait_count,
        )


def _lost(worker_id: str, ids: list[str]) -> None:
    """Warn of jobs ``worker_id`` started that were given back before it took them."""
    for job_id in ids:
        log.warning("job %s was given back before %s took it: it may run twice", job_id, worker_id)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _seen_key(job: Job) -> tuple[str, int, float | None]:
    """What tells one hand-off of a job from another (an attempt given back is uncounted, so
    the attempt alone does not)."""
    return (job.id, job.attempts, job.started_at)


def _stored_copy(job: Job, after: str | None) -> Job:
    """A copy of ``job`` sharing nothing mutable with it, with ``after`` as stored."""
    return job.detached(after=after)


def _names(queues: Sequence[str] | None) -> str:
    """Queue names as the scripts take them: a JSON array, '' for every queue."""
    return "" if queues is None else _json_list(dict.fromkeys(queues))


def _json_list(items: Any) -> str:
    return json.dumps(list(items), ensure_ascii=False)


def _json_object(fields: dict[str, str]) -> str:
    return json.dumps(fields, ensure_ascii=False)
