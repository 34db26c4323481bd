"""The PostgreSQL store: jobs in the database an application already runs.

``postgresql://user:password@host:5432/db?schema=backlane``: every table lives in one
schema (created if missing), brought up to date at open unless ``auto_migrate=0`` (then
``backlane migrate`` does it, and open only checks the version). Claims take rows with
``FOR UPDATE SKIP LOCKED``, so any number of worker processes on any number of machines
share one queue without handing a job to two of them. A trigger announces claimable work
on a LISTEN/NOTIFY channel; ``wait_for_work`` returns when it does, so a waiting worker
starts a job within milliseconds instead of polling (polling stays the fallback). A job
queued to run later (a delay, a retry's backoff) is announced with the time it becomes
due, and a claim learns when the earliest of its queues' is: the wait after it returns
then, however long the worker meant to wait.

``enqueue(jobs, connection=...)`` writes the jobs inside a caller's own transaction (a
psycopg ``AsyncConnection``, or a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``): they
exist, and wake workers, only if it commits.

Each event loop that uses the store gets connections of its own, and the LISTEN
connection lives on a thread of the store's own (see ``postgres_link``), so one store
serves callers on any loop and thread. Driver errors become ``StoreError``; a statement
that lost a deadlock is tried again. A verb waits out a short outage (2 to 4 s): while the
server cannot be reached it is tried again, and once sent it is sent again after a broken
connection only if that is harmless — reads, and writes that set what they set already
(release, discard, renew_leases, hand_back, cancel, set_progress, pauses, beat,
forget_worker). Enqueue, claim, finish, retry, delete, purge, requeue_expired and
claim_slot raise ``StoreError`` instead: sent twice they would store a job twice, hold jobs
nobody runs, or answer wrongly. The SQL is in ``sql/postgres/`` (see ``postgres_schema``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

from ..exceptions import StoreError
from ..jobs import TERMINAL_STATES, Job, JobState
from .base import Outcome, ScheduleRecord, StatsBucket, Store, WorkerRecord, check_outcomes
from .postgres_jobs import (
    PsycopgSession,
    Row,
    caller_session,
    decode,
    enqueue_on,
    jsonb,
    needs_transaction,
    sort_claimed,
    storable,
)
from .postgres_link import Coalescer, PostgresLink, store_error
from .postgres_schema import parse_url, rendered_queries

_PURGE_BATCH = 1000
"""Most jobs removed per statement by ``purge``, so no lock is held for long."""


async def _rows(conn: Any, sql: str, params: dict[str, Any] | None = None) -> list[Row]:
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(sql, params or {})
        rows: list[Row] = await cursor.fetchall() if cursor.description else []
        return rows


async def _changed(conn: Any, sql: str, params: dict[str, Any]) -> int:
    async with conn.cursor() as cursor:
        await cursor.execute(sql, params)
        count: int = cursor.rowcount
        return count


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _unstorable(*texts: str | None) -> bool:
    """Whether one of ``texts`` holds the character NUL or a lone surrogate, which no
    PostgreSQL text can: such a text names no job and is found in none."""
    return any(text is not None and storable(text) != text for text in texts)


class PostgresStore(Store):
    """Jobs in PostgreSQL (``postgresql://user@host/db?schema=backlane``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.settings = parse_url(url)
        self._sql = rendered_queries(self.settings)
        self._link = PostgresLink(url, self.settings)
        self._run = self._link.run
        """For calls that may not be sent twice (see ``postgres_link``)."""
        self._run_repeatable = self._link.run_repeatable
        """For calls that have the same effect and answer when sent twice."""
        self._enqueues: Coalescer[Job, Job] = Coalescer(self._enqueue_now)
        self._releases: Coalescer[str, None] = Coalescer(self._release_now)

    def __repr__(self) -> str:
        return f"<PostgresStore schema={self.settings.schema}>"

    @property
    def listening(self) -> bool:
        """Whether announcements of work arrive now (else ``wait_for_work`` only waits)."""
        return self._link.listening

    async def open(self) -> None:
        """Connect, bring the schema up to date (or, with ``auto_migrate=0``, check that it
        is) and start listening for work. Idempotent, and safe to race from several
        threads: the schema is checked once, and every caller waits until it is. Each
        event loop connects when it first runs a verb."""
        await self._link.open()

    async def close(self) -> None:
        """Stop listening and close every loop's connections once the verbs in flight
        are done. Idempotent."""
        await self._link.close()

    async def migrate(self, *, check: bool = False) -> tuple[int, int]:
        """Bring the schema up to date now, whatever ``auto_migrate`` says, over a
        connection of its own (the store need not be open), creating the schema if it is
        missing. Returns (version before, version after; 0 for no schema). With
        ``check``, change nothing: raise ``StoreError`` unless it is up to date."""
        return await self._link.migrate(check=check)

    async def installed(self) -> bool:
        """Whether the schema holds backlane's tables (at any version), without creating
        or changing anything: a command that only looks asks this before ``open``, which
        would create them. The store need not be open."""
        return await self._link.installed()

    async def wait_for_work(self, timeout: float) -> None:
        """Return once work may have become claimable — a job queued, released, retried,
        handed back or freed, by any process using this schema — or after ``timeout``
        seconds. Work announced since the last ``claim`` began in the calling task (or in
        the task that started it) returns at once, so a claim that found nothing and this
        wait miss no job between them. A job queued to run later is claimable when it is
        due: this returns then at the latest, for the earliest one that claim saw or that
        was announced while waiting. While the store cannot listen (the connection broke;
        it reconnects), it only waits out the timeout (or until that claim's earliest job
        is due): callers keep polling as their fallback."""
        await self._link.signal.wait(timeout)

    # -- write side -------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[Job], *, connection: Any = None) -> list[Job]:
        """Store ``jobs`` in order in one transaction; a job whose active key is taken is
        not stored and the holder is returned in its place. A later job of the batch whose
        ``after`` names a job replaced that way waits for the holder instead, and an
        ``after`` naming no stored active job is dropped (nothing to wait for).

        With ``connection`` (psycopg ``AsyncConnection``, SQLAlchemy ``AsyncSession`` or
        ``AsyncConnection``, on this store's database) the jobs are written in the
        transaction open on it, or that the statement begins, and exist only once it
        commits; an error aborts that transaction, as any failed statement does. A psycopg
        connection in autocommit mode outside a transaction gets one of its own, committed
        at once."""
        batch = list(jobs)
        if connection is None:
            if any(job.key is not None for job in batch):
                return await self._run(self._enqueue, batch)
            return await self._enqueues.submit(batch)  # one statement with its loop turn's
        if not self._link.is_open:
            raise self._link.not_open()
        session, wrap = await caller_session(connection)
        try:
            if wrap is not None:
                async with wrap.transaction():
                    return await enqueue_on(session, self._sql, batch)
            return await enqueue_on(session, self._sql, batch)
        except psycopg.Error as exc:
            raise store_error(self.settings, exc) from exc
        except Exception as exc:
            if type(exc).__module__ == "sqlalchemy.exc":
                raise StoreError(f"PostgreSQL store, through your connection: {exc}") from exc
            raise

    async def release(self, ids: Sequence[str]) -> None:
        """Deferred jobs among ``ids`` become queued; others are left as they are. Waits
        for the loop's next turn, to share a statement with other releases."""
        await self._releases.submit(list(ids))

    async def _enqueue_now(self, jobs: list[Job]) -> list[Job]:
        return await self._run(self._enqueue, jobs)

    async def _release_now(self, ids: list[str]) -> list[None]:
        await self._run_repeatable(self._execute, "release", {"ids": ids})
        return [None] * len(ids)

    async def discard(
        self, ids: Sequence[str], now: float, keep_until: float | None = None
    ) -> None:
        """Deferred jobs among ``ids`` end discarded at ``now``, kept until ``keep_until``;
        their successors are freed."""
        params = {"ids": list(ids), "now": float(now), "keep_until": _float(keep_until)}
        await self._run_repeatable(self._execute, "discard", params)

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
        ``worker_id``, in claim order. Rows being claimed by others are skipped, never
        waited for. Remembers, for a ``wait_for_work`` in the calling task, when the
        earliest job of those queues queued to run later becomes due."""
        signal = self._link.signal
        signal.mark()
        if limit <= 0 or (queues is not None and not queues):
            return []
        params: dict[str, Any] = {
            "worker_id": worker_id,
            "limit": limit,
            "now": float(now),
            "lease_until": float(lease_until),
        }
        scope = "any"
        if queues is not None:
            scope, params["queues"] = "queues", list(dict.fromkeys(queues))
        rows, next_due = await self._run(self._claim, scope, params)
        signal.expect(next_due)
        return sort_claimed(rows)

    async def renew_leases(
        self, *, worker_id: str, ids: Sequence[str], lease_until: float
    ) -> set[str]:
        """Extend the leases ``worker_id`` holds among ``ids``; return those of them whose
        cancellation was requested."""
        params = {"worker_id": worker_id, "ids": list(ids), "lease_until": float(lease_until)}
        rows = await self._run_repeatable(self._fetch, "renew_leases", params)
        return {row["id"] for row in rows if row["cancel_requested"]}

    async def finish(self, outcomes: Sequence[Outcome]) -> list[str]:
        """Apply each outcome whose worker still holds its job (the first, when one job has
        several); return the ids applied, in the order given."""
        check_outcomes(outcomes)
        if not outcomes:
            return []
        params: dict[str, list[Any]] = {
            "id": [o.job_id for o in outcomes],
            "worker_id": [o.worker_id for o in outcomes],
            "state": [o.state.value for o in outcomes],
            "finished_at": [float(o.finished_at) for o in outcomes],
            "result": [o.result for o in outcomes],
            "error": [None if o.error is None else jsonb(o.error) for o in outcomes],
            "run_at": [_float(o.run_at) for o in outcomes],
            "keep_until": [_float(o.keep_until) for o in outcomes],
            "attempt": [None if o.attempt is None else jsonb(o.attempt) for o in outcomes],
        }
        rows = await self._run(self._fetch, "finish", params)
        return [row["id"] for row in rows]

    async def hand_back(self, *, worker_id: str, ids: Sequence[str]) -> None:
        """Jobs ``worker_id`` holds among ``ids`` are queued again, the attempt uncounted."""
        await self._run_repeatable(
            self._execute, "hand_back", {"worker_id": worker_id, "ids": list(ids)}
        )

    async def requeue_expired(self, now: float, keep_until: float | None = None) -> int:
        """Queue running jobs whose lease ended before ``now`` (those asked to stop end
        cancelled instead, kept until ``keep_until``) and deferred jobs whose
        ``release_at`` is not after ``now``; return how many changed. Rows another session
        is changing right now are left for the next sweep."""
        return await self._run(self._requeue_expired, float(now), _float(keep_until))

    async def cancel(
        self, job_id: str, now: float, keep_until: float | None = None
    ) -> JobState | None:
        """Deferred or queued: cancelled at ``now``, kept until ``keep_until``. Running:
        ``cancel_requested`` set. Returns the state after, or None when no job has this
        id."""
        if _unstorable(job_id):
            return None
        return await self._run_repeatable(self._cancel, job_id, float(now), _float(keep_until))

    async def retry(self, job_id: str, now: float) -> bool:
        """A failed or cancelled job is queued again to run at ``now``. False when the job
        is missing, in another state, or its key is held by another active job."""
        if _unstorable(job_id):
            return False
        return await self._run(self._retry, job_id, float(now))

    async def set_progress(
        self, job_id: str, *, worker_id: str, progress: float | None, message: str | None
    ) -> None:
        """Record progress and message of a job ``worker_id`` holds; otherwise nothing.
        A NUL or lone surrogate in the message is kept as U+FFFD (PostgreSQL text cannot
        hold one)."""
        params = {
            "id": job_id,
            "worker_id": worker_id,
            "progress": _float(progress),
            "message": None if message is None else storable(message),
        }
        await self._run_repeatable(self._execute, "set_progress", params)

    async def delete(self, ids: Sequence[str]) -> int:
        """Remove the jobs among ``ids`` whatever their state; successors are freed."""
        wanted = [job_id for job_id in dict.fromkeys(ids) if not _unstorable(job_id)]
        if not wanted:
            return 0
        rows = await self._run(self._fetch, "delete", {"ids": wanted})
        return int(rows[0]["n"])

    async def purge(self, *, before: float, states: Sequence[JobState] | None = None) -> int:
        """Remove ended jobs whose ``keep_until`` (or, with ``states``, ``finished_at``) is
        before ``before``; return how many. Works in statements of at most
        ``_PURGE_BATCH`` jobs, each its own short transaction that skips rows other
        sessions hold, so workers claiming meanwhile never wait for it."""
        params: dict[str, Any] = {"before": float(before), "limit": _PURGE_BATCH}
        query = "purge_kept"
        if states is not None:
            wanted = sorted(s.value for s in TERMINAL_STATES.intersection(states))
            if not wanted:
                return 0
            query, params["states"] = "purge_finished", wanted
        total = 0
        while True:
            rows = await self._run(self._fetch, query, params)
            removed = int(rows[0]["n"])
            total += removed
            if removed < _PURGE_BATCH:
                return total

    # -- read side --------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        if _unstorable(job_id):
            return None
        rows = await self._run_repeatable(self._fetch, "get_job", {"id": job_id})
        return decode(rows[0]) if rows else None

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
        skipping ``offset`` and returning at most ``limit``. ``text`` is looked for,
        literally and ignoring case, in the id, task, payload and error message (an ASCII
        text ignores the case of ASCII letters only, a faster comparison).

        With ``text``, ``task`` or ``queue``, the matches are found in one pass over the
        table, then the page is sorted out of them; a plan walking the newest first would
        fetch every row from the heap in index order when few match (a task no job has:
        every row). Otherwise a page past the first starts from the row at ``offset``,
        found in an index alone. A filter holding a NUL or a lone surrogate matches
        nothing: no PostgreSQL text can hold one."""
        if _unstorable(task, queue, text):
            return []
        filters = {"state": None if state is None else state.value, "task": task, "queue": queue}
        terms = [f"{name} = %({name})s" for name, value in filters.items() if value is not None]
        params: dict[str, Any] = {**filters, "limit": max(0, limit), "offset": max(0, offset)}
        jobs = f"{self.settings.quoted_schema}.jobs"
        newest = "ORDER BY created_at DESC, seq DESC"
        if text is not None or task is not None or queue is not None:
            if text is None:
                pass
            elif text.isascii():
                terms.append(self._sql["text_matches_ascii"])
                params["folded"] = text.lower()
            else:
                terms.append(self._sql["text_matches"])
                params["text"] = text
            query = (
                f"WITH matched AS MATERIALIZED (SELECT id, created_at, seq FROM {jobs} "
                f"WHERE {' AND '.join(terms)}), "
                f"page AS (SELECT id, created_at, seq FROM matched {newest} "
                "LIMIT %(limit)s OFFSET %(offset)s) "
                f"SELECT j.* FROM page JOIN {jobs} j USING (id) "
                "ORDER BY page.created_at DESC, page.seq DESC"
            )
        else:
            where = " AND ".join(terms) if terms else "true"
            start = ""
            if offset > 0:
                start = (
                    f"AND (created_at, seq) <= (SELECT created_at, seq FROM {jobs} "
                    f"WHERE {where} {newest} OFFSET %(offset)s LIMIT 1) "
                )
            query = f"SELECT * FROM {jobs} WHERE {where} {start}{newest} LIMIT %(limit)s"
        rows = await self._run_repeatable(self._fetch_sql, query, params)
        return [decode(row) for row in rows]

    async def counts(self) -> dict[str, dict[JobState, int]]:
        """Jobs per queue and state; states without jobs are left out."""
        result: dict[str, dict[JobState, int]] = {}
        for row in await self._run_repeatable(self._fetch, "counts", {}):
            result.setdefault(row["queue"], {})[JobState(row["state"])] = int(row["n"])
        return result

    async def stats(self, *, since: float, width: float) -> list[StatsBucket]:
        """Jobs that ended succeeded, failed or cancelled at or after ``since``, in buckets
        of ``width`` seconds starting at multiples of ``width``, oldest first; empty
        buckets are left out. Counted in SQL over the index of end times."""
        if not width > 0:
            raise StoreError(f"stats needs a bucket width above zero, got {width!r}")
        params = {"since": float(since), "width": float(width)}
        return [
            StatsBucket(
                start=int(row["bucket"]) * width,
                succeeded=int(row["succeeded"]),
                failed=int(row["failed"]),
                cancelled=int(row["cancelled"]),
                wait_total=float(row["wait_total"]),
                wait_count=int(row["wait_count"]),
            )
            for row in await self._run_repeatable(self._fetch, "stats", params)
        ]

    # -- schedules ----------------------------------------------------------------------

    async def claim_slot(self, schedule: str, slot: float, job: Job) -> bool:
        """Record ``slot`` as the latest of ``schedule`` and store ``job`` (as ``enqueue``
        does) in one transaction, unless that slot or a later one was taken; then store
        nothing, return False. Racing schedulers wait on the schedule's row, so each slot
        is taken once."""
        return await self._run(self._claim_slot, schedule, float(slot), job)

    async def schedules(self) -> dict[str, ScheduleRecord]:
        """Every schedule that took a slot or was paused, by name."""
        rows = await self._run_repeatable(self._fetch, "schedules", {})
        return {
            row["name"]: ScheduleRecord(
                name=row["name"], last_slot=row["last_slot"], paused=bool(row["paused"])
            )
            for row in rows
        }

    async def pause_schedule(self, name: str, paused: bool) -> None:
        """Pause or resume ``name``, recording it if it is not known yet."""
        await self._run_repeatable(
            self._execute, "pause_schedule", {"name": name, "paused": paused}
        )

    # -- queues and workers ---------------------------------------------------------------

    async def pause_queue(self, queue: str, paused: bool) -> None:
        """Pause ``queue`` (``claim`` skips it) or resume it."""
        query = "pause_queue" if paused else "resume_queue"
        await self._run_repeatable(self._execute, query, {"queue": queue})

    async def paused_queues(self) -> set[str]:
        """Names of the paused queues."""
        return {
            row["queue"] for row in await self._run_repeatable(self._fetch, "paused_queues", {})
        }

    async def beat(self, worker: WorkerRecord) -> None:
        """Record ``worker`` in place of its previous record."""
        params = dataclasses.asdict(worker)
        params["queues"] = None if worker.queues is None else list(worker.queues)
        params["jobs"] = list(worker.jobs)
        params["started_at"], params["seen_at"] = float(worker.started_at), float(worker.seen_at)
        await self._run_repeatable(self._execute, "beat", params)

    async def workers(self, *, seen_since: float) -> list[WorkerRecord]:
        """Workers seen at or after ``seen_since``, oldest started first (ties by id);
        records of the others are dropped."""
        rows = await self._run_repeatable(self._fetch, "workers", {"seen_since": float(seen_since)})
        return [
            WorkerRecord(
                id=row["id"],
                started_at=row["started_at"],
                seen_at=row["seen_at"],
                concurrency=row["concurrency"],
                queues=None if row["queues"] is None else tuple(row["queues"]),
                jobs=tuple(row["jobs"]),
                processed=int(row["processed"]),
            )
            for row in rows
        ]

    async def forget_worker(self, worker_id: str) -> None:
        """Remove the record of ``worker_id`` (nothing if there is none)."""
        await self._run_repeatable(self._execute, "forget_worker", {"id": worker_id})

    # -- plumbing ---------------------------------------------------------------------

    # -- the verbs' statements (on the store's loop) ---------------------------------------

    async def _fetch(self, conn: Any, name: str, params: dict[str, Any]) -> list[Row]:
        return await _rows(conn, self._sql[name], params)

    async def _fetch_sql(self, conn: Any, sql: str, params: dict[str, Any]) -> list[Row]:
        return await _rows(conn, sql, params)

    async def _execute(self, conn: Any, name: str, params: dict[str, Any]) -> int:
        return await _changed(conn, self._sql[name], params)

    async def _enqueue(self, conn: Any, jobs: list[Job]) -> list[Job]:
        if not jobs:
            return []
        if not needs_transaction(jobs):  # one statement: atomic on its own
            return await enqueue_on(PsycopgSession(conn), self._sql, jobs)
        async with conn.transaction():
            return await enqueue_on(PsycopgSession(conn), self._sql, jobs)

    async def _claim(
        self, conn: Any, scope: str, params: dict[str, Any]
    ) -> tuple[list[Row], float | None]:
        """The rows claimed, and, when they were fewer than the limit (else the worker
        claims again at once), when the earliest job left queued to run later is due."""
        rows = await self._fetch(conn, f"claim_{scope}", params)
        if len(rows) >= params["limit"]:
            return rows, None
        due = await self._fetch(conn, f"next_due_{scope}", params)
        return rows, _float(due[0]["next_due"])

    async def _requeue_expired(self, conn: Any, now: float, keep_until: float | None) -> int:
        params = {"now": now, "keep_until": keep_until}
        total = 0
        async with conn.transaction():
            for name in ("cancel_expired_leases", "requeue_expired_leases"):
                total += int((await self._fetch(conn, name, params))[0]["n"])
            total += int((await self._fetch(conn, "requeue_overdue_deferred", params))[0]["n"])
        return total

    async def _cancel(
        self, conn: Any, job_id: str, now: float, keep_until: float | None
    ) -> JobState | None:
        async with conn.transaction():
            rows = await self._fetch(conn, "lock_job", {"id": job_id})
            if not rows:
                return None
            state = JobState(rows[0]["state"])
            if state in (JobState.DEFERRED, JobState.QUEUED):
                params = {"id": job_id, "now": now, "keep_until": keep_until}
                await self._execute(conn, "cancel_waiting", params)
                return JobState.CANCELLED
            if state is JobState.RUNNING:
                await self._execute(conn, "request_cancel", {"id": job_id})
            return state

    async def _retry(self, conn: Any, job_id: str, now: float) -> bool:
        try:
            async with conn.transaction():
                return await self._execute(conn, "retry", {"id": job_id, "now": now}) > 0
        except pg_errors.UniqueViolation:  # another active job holds its key
            return False

    async def _claim_slot(self, conn: Any, schedule: str, slot: float, job: Job) -> bool:
        async with conn.transaction():
            if not await self._fetch(conn, "take_slot", {"name": schedule, "slot": slot}):
                return False
            await enqueue_on(PsycopgSession(conn), self._sql, [job])
            return True
