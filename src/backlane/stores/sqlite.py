"""The embedded store: one SQLite file, shared safely by several processes.

Writes run in ``BEGIN IMMEDIATE`` transactions, so two processes claiming from one file
never hand the same job to two workers. Short ones run on the awaiting event loop when
they need not wait, others on the store's own thread (``sqlite_connections``); one instance
serves several threads and event loops at once. The schema and the SQL are in
``sqlite_schema`` and ``sql/sqlite/``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

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
from .sqlite_connections import Connections
from .sqlite_schema import path_from_url, queries

T = TypeVar("T")

log = logging.getLogger("backlane")

_FIELDS = tuple(field.name for field in dataclasses.fields(Job))
_STATES = {state.value: state for state in JobState}
_PURGE_BATCH = 1000
"""Most jobs removed per transaction by ``purge``, so no lock is held for long."""
_LIKE_SPECIAL = re.compile(r"([\\%_])")
_ORDERED_READ_SECONDS = 0.02
"""How long ``list_jobs`` reads a filtered list newest first from the index before it
gives up for one pass over the table (the filter matched few of the newest jobs)."""
_CHECK_EVERY = 10_000
"""SQLite virtual machine instructions between two looks at that time limit."""
_KNOWN_DEFERRED = 1_000
"""Most deferred jobs a store remembers having stored (see ``SQLiteStore._deferred``)."""


def _dump(value: Any) -> str | None:
    if value is None:
        return None
    if not value and isinstance(value, dict):
        return "{}"
    return json.dumps(value, separators=(",", ":"))


def _row(job: Job) -> tuple[Any, ...]:
    """``job`` as the parameters of ``insert_job``: its fields, in order."""
    return (
        job.task,
        job.payload,
        job.id,
        job.queue,
        job.priority,
        job.state.value,
        job.key,
        job.attempts,
        job.run_at,
        job.created_at,
        job.started_at,
        job.finished_at,
        job.lease_until,
        job.worker_id,
        job.progress,
        job.message,
        job.result,
        _dump(job.error),
        job.after,
        int(job.cancel_requested),
        job.release_at,
        job.keep_until,
        _dump(job.meta),
        _dump(job.attempt_history) if job.attempt_history else None,
    )


@functools.lru_cache(maxsize=8)
def _field_positions(columns: tuple[str, ...]) -> tuple[int, ...]:
    """Where each of Job's fields is among a row's columns."""
    return tuple(columns.index(name) for name in _FIELDS)


class UnreadableJob(StoreError):
    """A row of ``jobs`` that does not read as a job (changed by hand, or by another
    program); the message names the job and the column."""


def _decode(row: sqlite3.Row, positions: tuple[int, ...] | None = None) -> Job:
    """The job stored in ``row`` (a row of ``jobs``, every column); ``positions``, if
    given, are ``_field_positions`` of the row's columns. Raises ``UnreadableJob``."""
    if positions is None:
        positions = _field_positions(tuple(row.keys()))
    values = dict(zip(_FIELDS, map(row.__getitem__, positions), strict=True))
    try:
        values["state"] = _STATES[values["state"]]
        if values["error"] is not None:
            values["error"] = json.loads(values["error"])
        meta = values["meta"]
        values["meta"] = {} if meta == "{}" else json.loads(meta)
        history = values["attempt_history"]
        values["attempt_history"] = [] if history is None else json.loads(history)
    except (KeyError, TypeError, ValueError, RecursionError):
        raise UnreadableJob(_fault(values)) from None
    if not isinstance(values["priority"], int) or not isinstance(values["run_at"], float | int):
        raise UnreadableJob(_fault(values))
    values["cancel_requested"] = bool(values["cancel_requested"])
    job = object.__new__(Job)  # Job(**values), minus the checks of its generated __init__
    job.__dict__.update(values)
    return job


def _reads_as_json(text: Any) -> bool:
    """Whether the column value ``text`` is NULL or JSON that Python reads."""
    if text is None:
        return True
    try:
        json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _fault(values: dict[str, Any]) -> str:
    """What makes the row whose columns are ``values`` unreadable, naming the column."""
    problem = "its columns do not make a job"
    for name, kind in (("priority", "an integer"), ("run_at", "a number")):
        if not isinstance(values[name], float | int) or (
            name == "priority" and not isinstance(values[name], int)
        ):
            problem = f"column {name!r} holds {values[name]!r:.80}, not {kind}"
    for name in ("error", "meta", "attempt_history"):
        text = values[name]
        if isinstance(text, str) and not _reads_as_json(text):
            problem = f"column {name!r} holds {text!r:.80}, not JSON"
    if values["state"] not in _STATES and not isinstance(values["state"], JobState):
        problem = f"column 'state' holds {values['state']!r:.80}, not a job state"
    return (
        f"job {values['id']!r}: its row in the SQLite store cannot be read ({problem}); "
        "mend that column or delete the job"
    )


def _has_surrogate(text: str | None) -> bool:
    """Whether ``text`` holds a lone surrogate, which UTF-8 (and so no stored job) cannot."""
    return text is not None and utf8_text(text) != text


def _ids(ids: Sequence[str]) -> str:
    """A list of ids as the JSON array the queries read with ``json_each``."""
    return json.dumps(list(ids))


def _like_pattern(text: str) -> str:
    """A ``LIKE ... ESCAPE '\\'`` pattern matching any value that contains ``text``."""
    escaped = _LIKE_SPECIAL.sub(r"\\\1", text)
    return f"%{escaped}%"


def _verbatim_in_json(text: str) -> bool:
    """Whether any JSON text holding a string that contains ``text`` holds ``text`` as is
    (printable ASCII but for the quote, backslash and slash, which JSON may escape)."""
    return all(" " <= char <= "~" and char not in '"\\/' for char in text)


def _newest_first(terms: list[str], *, columns: str = "*") -> str:
    """The jobs matching all ``terms`` (one names the state), newest first, read in that
    order from jobs_state_created."""
    where = " AND ".join(terms)
    return (
        f"SELECT {columns} FROM jobs INDEXED BY jobs_state_created WHERE {where} "
        "ORDER BY created_at DESC, seq DESC"
    )


def _rows_of(page: str) -> str:
    """The whole rows of the jobs whose ``seq`` the query ``page`` selects, newest first."""
    return f"SELECT * FROM jobs WHERE seq IN ({page}) ORDER BY created_at DESC, seq DESC"


def _state_is(state: JobState) -> str:
    return f"state = '{state.value}'"


def _decode_worker(row: sqlite3.Row) -> WorkerRecord:
    queues = row["queues"]
    return WorkerRecord(
        id=row["id"],
        started_at=row["started_at"],
        seen_at=row["seen_at"],
        concurrency=row["concurrency"],
        queues=None if queues is None else tuple(json.loads(queues)),
        jobs=tuple(json.loads(row["jobs"])),
        processed=row["processed"],
    )


def _claim_args(
    worker_id: str, queues: Sequence[str] | None, limit: int, now: float, lease_until: float
) -> tuple[list[str] | None, dict[str, Any]]:
    """A claim's queue names (None: any queue) and query parameters."""
    params: dict[str, Any] = {
        "worker_id": worker_id,
        "limit": limit,
        "now": now,
        "lease_until": lease_until,
    }
    return (None if queues is None else list(dict.fromkeys(queues))), params


class SQLiteStore(Store):
    """Jobs in a SQLite file (``sqlite:///relative/path.db``, ``sqlite:////abs/path.db``)."""

    gather_releases = True
    enqueue_returns_once_begun = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = path_from_url(url)
        self._db = Connections(self.path, url)
        self._sql = queries()
        self._deferred: dict[str, Job] = {}
        """Deferred jobs this store stored, as stored, by id, until released, claimed or
        discarded here (the newest ``_KNOWN_DEFERRED``): an embedded worker claims the
        jobs its own requests handed over without reading their rows back. Nothing but
        ``"after"`` (covered by the claim's condition) changes in a deferred job's row.
        Kept outside the transactions: one rolled back leaves at worst an entry whose row
        the claim's condition then does not find, or a forgotten one, read back instead."""

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path}>"

    async def open(self) -> None:
        """Open the file (creating it and its folder if missing), tune it, and bring the
        schema to the latest version. Idempotent, and safe to race from several threads:
        one set of connections is opened, and every caller waits until it is."""
        await self._db.open()

    async def close(self) -> None:
        """Close the connections once the work already asked for is done. Idempotent."""
        await self._db.close()

    # -- write side -------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[Job], *, connection: Any = None) -> list[Job]:
        """Store ``jobs`` in order in one transaction; a job whose active key is taken is
        not stored and the holder is returned in its place. A later job of the batch whose
        ``after`` names a job replaced that way waits for the holder instead, and an
        ``after`` naming no stored active job is dropped (nothing to wait for). A
        ``connection`` is refused with ``ConfigurationError``: the jobs live in the store's
        own file, outside any transaction of the caller's."""
        if connection is not None:
            raise ConfigurationError(
                "transactional enqueue needs the PostgreSQL store: the SQLite store cannot "
                "write inside the transaction of your connection; leave connection unset"
            )
        return await self._write(self._enqueue, list(jobs))

    async def release(self, ids: Sequence[str]) -> None:
        """Deferred jobs among ``ids`` become queued; others are left as they are. Waits
        for the loop's next turn, to share a transaction with other releases."""
        await self._db.write_soon(self._release, list(ids))

    async def discard(
        self, ids: Sequence[str], now: float, keep_until: float | None = None
    ) -> None:
        """Deferred jobs among ``ids`` end discarded at ``now``, kept until ``keep_until``;
        their successors are freed."""
        await self._write(self._discard, list(ids), now, keep_until)

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
        if limit <= 0 or (queues is not None and not queues):
            return []
        names, params = _claim_args(worker_id, queues, limit, now, lease_until)
        return await self._write(self._claim, names, params)

    async def renew_leases(
        self, *, worker_id: str, ids: Sequence[str], lease_until: float
    ) -> set[str]:
        """Extend the leases ``worker_id`` holds among ``ids``; return those of them whose
        cancellation was requested."""
        params = {"worker_id": worker_id, "ids": _ids(ids), "lease_until": lease_until}
        rows = await self._write(self._fetch_named, "renew_leases", params)
        return {row["id"] for row in rows if row["cancel_requested"]}

    async def finish(self, outcomes: Sequence[Outcome]) -> list[str]:
        """Apply each outcome whose worker still holds its job; return the ids applied.
        Waits for the loop's next turn, to share a transaction with the worker's next
        claim."""
        check_outcomes(outcomes)
        return await self._db.write_soon(self._finish, list(outcomes))

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
        """``release(release)``, ``finish(outcomes)`` then ``claim(...)`` in one
        transaction (with outcomes or releases: at the loop's next turn, with whatever else
        this loop writes until then)."""
        if not (outcomes or release) or limit <= 0 or (queues is not None and not queues):
            return await super().finish_and_claim(
                outcomes,
                worker_id=worker_id,
                queues=queues,
                limit=limit,
                now=now,
                lease_until=lease_until,
                release=release,
            )
        check_outcomes(outcomes)
        names, params = _claim_args(worker_id, queues, limit, now, lease_until)
        return await self._db.write_soon(
            self._finish_and_claim, list(release), list(outcomes), names, params
        )

    async def hand_back(self, *, worker_id: str, ids: Sequence[str]) -> None:
        """Jobs ``worker_id`` holds among ``ids`` are queued again, the attempt uncounted."""
        await self._write(self._execute, "hand_back", {"worker_id": worker_id, "ids": _ids(ids)})

    async def requeue_expired(self, now: float, keep_until: float | None = None) -> int:
        """Queue running jobs whose lease ended before ``now`` (those asked to stop end
        cancelled instead, kept until ``keep_until``) and deferred jobs whose
        ``release_at`` is not after ``now``; return how many changed."""
        return await self._db.write_on_thread(self._requeue_expired, now, keep_until)

    async def cancel(
        self, job_id: str, now: float, keep_until: float | None = None
    ) -> JobState | None:
        """Deferred or queued: cancelled at ``now``, kept until ``keep_until``. Running:
        ``cancel_requested`` set. Returns the state after, or None when no job has this
        id."""
        if _has_surrogate(job_id):
            return None
        return await self._write(self._cancel, job_id, now, keep_until)

    async def retry(self, job_id: str, now: float) -> bool:
        """A failed or cancelled job is queued again to run at ``now``. False when the job
        is missing, in another state, or its key is held by another active job."""
        if _has_surrogate(job_id):
            return False
        return await self._write(self._retry, job_id, now)

    async def set_progress(
        self, job_id: str, *, worker_id: str, progress: float | None, message: str | None
    ) -> None:
        """Record progress and message of a job ``worker_id`` holds; otherwise nothing.
        A lone surrogate in the message (which UTF-8 cannot carry) is kept as U+FFFD."""
        if message is not None:
            message = utf8_text(message)
        params = {"id": job_id, "worker_id": worker_id, "progress": progress, "message": message}
        await self._write(self._execute, "set_progress", params)

    async def delete(self, ids: Sequence[str]) -> int:
        """Remove the jobs among ``ids`` whatever their state; successors are freed."""
        wanted = [job_id for job_id in ids if not _has_surrogate(job_id)]
        return await self._db.write_on_thread(self._delete, _ids(wanted))

    async def purge(self, *, before: float, states: Sequence[JobState] | None = None) -> int:
        """Remove ended jobs whose ``keep_until`` (or, with ``states``, ``finished_at``) is
        before ``before``; return how many. Works in short transactions of at most
        ``_PURGE_BATCH`` jobs, letting other work in between."""
        params: dict[str, Any] = {"before": before, "limit": _PURGE_BATCH}
        query = "purge_kept"
        if states is not None:
            wanted = sorted(s.value for s in TERMINAL_STATES.intersection(states))
            if not wanted:
                return 0
            query, params["states"] = "purge_finished", json.dumps(wanted)
        total = 0
        while True:
            removed = await self._db.write_on_thread(self._purge_batch, query, params)
            total += removed
            if removed < _PURGE_BATCH:
                return total

    # -- read side --------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        if _has_surrogate(job_id):
            return None
        rows = await self._db.read(self._fetch, self._sql["get_job"], {"id": job_id})
        return _decode(rows[0]) if rows else None

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
        id, task, payload and error message with ``LIKE``, which ignores the case of ASCII
        letters only; a text holding the character NUL matches nothing (``LIKE`` would
        stop at it and match everything).

        The page is chosen first, by ``seq`` alone, and only its rows are read whole:
        without ``text``, in order from ``jobs_state_created`` (the newest of each state,
        merged, when no state is given), so a deep page reads the index, not the rows
        skipped; with ``text``, in one pass over the table, which reads each row once,
        in storage order, whatever the other filters. A ``task`` or ``queue`` is read the
        first way for ``_ORDERED_READ_SECONDS`` at most, then the second (few of the
        newest jobs match it)."""
        filters = {"task": task, "queue": queue}
        terms = [f"{name} = :{name}" for name, value in filters.items() if value is not None]
        params: dict[str, Any] = {**filters, "limit": limit, "offset": offset}
        if state is not None:
            params["state"] = state.value
        if any(_has_surrogate(value) for value in (task, queue, text)):
            return []  # no job holds text UTF-8 cannot carry
        if text is not None:
            if "\x00" in text:
                return []
            matches = "text_matches_verbatim" if _verbatim_in_json(text) else "text_matches"
            terms.append(f"(\n{self._sql[matches]}\n)")
            params["pattern"] = _like_pattern(text)
            if state is not None:
                terms.append("state = :state")
            where = f"WHERE {' AND '.join(terms)}"
            page = f"SELECT seq FROM jobs NOT INDEXED {where} ORDER BY created_at DESC, seq DESC"
        elif state is not None:
            page = _newest_first(["state = :state", *terms], columns="seq")
        else:  # the newest of each state, merged: jobs_state_created keeps them in order
            params["window"] = -1 if limit < 0 else limit + offset
            branches = " UNION ALL ".join(
                f"SELECT * FROM ("
                f"{_newest_first([_state_is(s), *terms], columns='created_at, seq')} "
                f"LIMIT :window)"
                for s in JobState
            )
            page = f"SELECT seq FROM ({branches}) ORDER BY created_at DESC, seq DESC"
        query = _rows_of(f"{page} LIMIT :limit OFFSET :offset")
        if text is None and terms:  # a task or queue: many of the newest jobs, or few?
            scan = " AND ".join(["state = :state", *terms] if state is not None else terms)
            full_pass = _rows_of(
                f"SELECT seq FROM jobs NOT INDEXED WHERE {scan} "
                "ORDER BY created_at DESC, seq DESC LIMIT :limit OFFSET :offset"
            )
            rows = await self._db.on_thread(self._fetch_ordered_or_scan, query, full_pass, params)
        else:
            rows = await self._db.on_thread(self._fetch, query, params)
        return [_decode(row) for row in rows]

    async def counts(self) -> dict[str, dict[JobState, int]]:
        """Jobs per queue and state; states without jobs are left out."""
        result: dict[str, dict[JobState, int]] = {}
        for row in await self._db.on_thread(self._fetch, self._sql["counts"], {}):
            result.setdefault(row["queue"], {})[JobState(row["state"])] = row["n"]
        return result

    async def stats(self, *, since: float, width: float) -> list[StatsBucket]:
        """Jobs that ended succeeded, failed or cancelled at or after ``since``, in buckets
        of ``width`` seconds starting at multiples of ``width``, oldest first; empty
        buckets are left out. Counted in SQL over the index of end times."""
        if not width > 0:
            raise StoreError(f"stats needs a bucket width above zero, got {width!r}")
        params = {"since": since, "width": width}
        return [
            StatsBucket(
                start=row["bucket"] * width,
                succeeded=row["succeeded"],
                failed=row["failed"],
                cancelled=row["cancelled"],
                wait_total=row["wait_total"],
                wait_count=row["wait_count"],
            )
            for row in await self._db.on_thread(self._fetch, self._sql["stats"], params)
        ]

    # -- schedules ----------------------------------------------------------------------

    async def claim_slot(self, schedule: str, slot: float, job: Job) -> bool:
        """Record ``slot`` as the latest of ``schedule`` and store ``job`` (as ``enqueue``
        does) in one transaction, unless that slot or a later one was taken; then store
        nothing, return False."""
        return await self._write(self._claim_slot, schedule, slot, job)

    async def schedules(self) -> dict[str, ScheduleRecord]:
        """Every schedule that took a slot or was paused, by name."""
        rows = await self._db.on_thread(self._fetch, self._sql["schedules"], {})
        return {
            row["name"]: ScheduleRecord(
                name=row["name"], last_slot=row["last_slot"], paused=bool(row["paused"])
            )
            for row in rows
        }

    async def pause_schedule(self, name: str, paused: bool) -> None:
        """Pause or resume ``name``, recording it if it is not known yet."""
        params = {"name": name, "paused": int(paused)}
        await self._write(self._execute, "pause_schedule", params)

    # -- queues and workers ---------------------------------------------------------------

    async def pause_queue(self, queue: str, paused: bool) -> None:
        """Pause ``queue`` (``claim`` skips it) or resume it."""
        query = "pause_queue" if paused else "resume_queue"
        await self._write(self._execute, query, {"queue": queue})

    async def paused_queues(self) -> set[str]:
        """Names of the paused queues."""
        rows = await self._db.on_thread(self._fetch, self._sql["paused_queues"], {})
        return {row["queue"] for row in rows}

    async def beat(self, worker: WorkerRecord) -> None:
        """Record ``worker`` in place of its previous record."""
        params = dataclasses.asdict(worker)
        params["queues"] = None if worker.queues is None else _ids(worker.queues)
        params["jobs"] = _ids(worker.jobs)
        await self._write(self._execute, "beat", params)

    async def workers(self, *, seen_since: float) -> list[WorkerRecord]:
        """Workers seen at or after ``seen_since``, oldest started first (ties by id);
        records of the others are dropped."""
        rows = await self._db.write_on_thread(self._workers, seen_since)
        return [_decode_worker(row) for row in rows]

    async def forget_worker(self, worker_id: str) -> None:
        """Remove the record of ``worker_id`` (nothing if there is none)."""
        await self._write(self._execute, "forget_worker", {"id": worker_id})

    # -- plumbing ---------------------------------------------------------------------

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` in one short ``BEGIN IMMEDIATE`` transaction."""
        return await self._db.write(fn, *args)

    def _fetch(
        self, conn: sqlite3.Connection, query: str, params: dict[str, Any]
    ) -> list[sqlite3.Row]:
        """Rows of a read (``query`` is SQL text) outside any explicit transaction."""
        return conn.execute(query, params).fetchall()

    def _fetch_ordered_or_scan(
        self, conn: sqlite3.Connection, ordered: str, full_pass: str, params: dict[str, Any]
    ) -> list[sqlite3.Row]:
        """Rows of ``ordered`` (a read of the newest jobs first, fast when the filter
        matches many of them), or, when it has not ended within ``_ORDERED_READ_SECONDS``,
        of ``full_pass`` (the same rows, from one pass over the table: bounded by its
        size when the filter matches few)."""
        deadline = time.perf_counter() + _ORDERED_READ_SECONDS
        conn.set_progress_handler(lambda: time.perf_counter() > deadline, _CHECK_EVERY)
        try:
            return conn.execute(ordered, params).fetchall()
        except sqlite3.OperationalError as exc:
            if time.perf_counter() <= deadline or "interrupt" not in str(exc):
                raise
        finally:
            conn.set_progress_handler(None, 0)
        return conn.execute(full_pass, params).fetchall()

    def _execute(self, conn: sqlite3.Connection, name: str, params: dict[str, Any]) -> int:
        return conn.execute(self._sql[name], params).rowcount

    def _fetch_named(
        self, conn: sqlite3.Connection, name: str, params: dict[str, Any]
    ) -> list[sqlite3.Row]:
        return conn.execute(self._sql[name], params).fetchall()

    # -- the verbs' transactions -----------------------------------------------------

    def _unblock(self, conn: sqlite3.Connection, ids: Sequence[str]) -> None:
        """Free the jobs that waited for any of ``ids``."""
        if len(ids) == 1:
            conn.execute(self._sql["unblock_one"], {"id": ids[0]})
        elif ids:
            conn.execute(self._sql["unblock"], {"ids": _ids(ids)})

    def _active(self, conn: sqlite3.Connection, job_id: str) -> bool:
        row = conn.execute(self._sql["get_job"], {"id": job_id}).fetchone()
        return row is not None and JobState(row["state"]) in ACTIVE_STATES

    def _enqueue(self, conn: sqlite3.Connection, jobs: list[Job]) -> list[Job]:
        stored: list[Job] = []
        replaced: dict[str, str] = {}
        for job in jobs:
            after = replaced.get(job.after, job.after) if job.after is not None else None
            if after is not None and not self._active(conn, after):
                after = None
            job = job.detached(after=after)
            if conn.execute(self._sql["insert_job"], _row(job)).rowcount:
                stored.append(job)
                if job.state is JobState.DEFERRED:
                    self._remember_deferred(job)
                continue
            holder = _decode(conn.execute(self._sql["get_key_holder"], {"key": job.key}).fetchone())
            replaced[job.id] = holder.id
            stored.append(holder)
        return stored

    def _discard(
        self, conn: sqlite3.Connection, ids: list[str], now: float, keep_until: float | None
    ) -> None:
        for job_id in ids:
            self._deferred.pop(job_id, None)
        params = {"ids": _ids(ids), "now": now, "keep_until": keep_until}
        rows = self._fetch_named(conn, "discard", params)
        self._unblock(conn, [row["id"] for row in rows])

    def _claim(
        self,
        conn: sqlite3.Connection,
        queues: list[str] | None,
        params: dict[str, Any],
        release: Sequence[str] = (),
    ) -> list[Job]:
        """Release ``release`` then claim, as two steps would; where every queued
        claimable job fits in the claim, the released jobs it would take go straight from
        deferred to running."""
        names: list[str] | None = None
        query, found = "claimable_any", params
        if queues is not None:
            paused = {row["queue"] for row in self._fetch_named(conn, "paused_queues", {})}
            names = [name for name in queues if name not in paused]
            if not names:
                self._release(conn, release)
                return []
            if len(names) == 1:
                query, found = "claimable_queue", {**params, "queue": names[0]}
            else:
                query, found = "claimable_queues", {**params, "queues": _ids(names)}
        seqs = [row[0] for row in self._fetch_named(conn, query, found)]
        handed: list[tuple[tuple[int, float, int], Job]] = []
        if release:
            room = params["limit"] - len(seqs)
            if room > 0:
                handed = self._claim_handed(conn, names, params, release, room)
            if len(handed) < len(release):
                self._release(conn, release)  # those claimed are no longer deferred
                if room <= 0:  # the claim is full: released jobs compete for it
                    seqs = [row[0] for row in self._fetch_named(conn, query, found)]
        if not seqs and not handed:
            return []
        if len(seqs) == 1:
            rows = self._fetch_named(conn, "claim_one", {**params, "seq": seqs[0]})
        elif seqs:
            claiming = {**params, "seqs": json.dumps(seqs), "was": "queued"}
            rows = self._fetch_named(conn, "claim_seqs", claiming)
        else:
            rows = []
        claimed = self._in_claim_order(conn, rows, params) + handed
        if len(claimed) > 1:
            claimed.sort(key=lambda pair: pair[0])
        return [job for _, job in claimed]

    def _claim_handed(
        self,
        conn: sqlite3.Connection,
        names: list[str] | None,
        params: dict[str, Any],
        release: Sequence[str],
        room: int,
    ) -> list[tuple[tuple[int, float, int], Job]]:
        """Claim up to ``room`` of the deferred jobs ``release``, each with its place in
        claim order."""
        known = self._deferred
        if room >= len(release) and all(job_id in known for job_id in release):
            found = {**params, "ids": _ids(release)}
            query = "claim_handed_any"
            if names is not None:
                query, found["queues"] = "claim_handed_queues", _ids(names)
            handed: list[tuple[tuple[int, float, int], Job]] = []
            for seq, job_id, attempts in conn.execute(self._sql[query], found):
                job = known.pop(job_id).detached(
                    state=JobState.RUNNING,
                    attempts=attempts,
                    started_at=params["now"],
                    lease_until=params["lease_until"],
                    worker_id=params["worker_id"],
                    after=None,
                )
                handed.append(((-job.priority, job.run_at, seq), job))
            return handed
        found = {**params, "ids": _ids(release), "limit": room}
        query = "handed_claimable_any"
        if names is not None:
            query, found["queues"] = "handed_claimable_queues", _ids(names)
        seqs = [row[0] for row in self._fetch_named(conn, query, found)]
        if not seqs:
            return []
        for job_id in release:
            known.pop(job_id, None)
        found = {**params, "seqs": json.dumps(seqs), "was": "deferred"}
        return self._in_claim_order(conn, self._fetch_named(conn, "claim_seqs", found), params)

    def _in_claim_order(
        self, conn: sqlite3.Connection, rows: list[sqlite3.Row], params: dict[str, Any]
    ) -> list[tuple[tuple[int, float, int], Job]]:
        """The jobs of the rows a claim just took, each with its place in claim order
        (higher priority first, then earlier ``run_at``, then stored first). A row that
        does not read as a job ends failed instead: it cannot run, and must not come back
        to every claim."""
        if not rows:
            return []
        positions = _field_positions(tuple(rows[0].keys()))
        claimed: list[tuple[tuple[int, float, int], Job]] = []
        for row in rows:
            try:
                job = _decode(row, positions)
            except UnreadableJob as exc:
                self._fail_unreadable(conn, row, exc, params["now"])
                continue
            claimed.append(((-job.priority, job.run_at, row["seq"]), job))
        return claimed

    def _fail_unreadable(
        self, conn: sqlite3.Connection, row: sqlite3.Row, exc: UnreadableJob, now: float
    ) -> None:
        """End failed the job just claimed at ``seq``, whose row does not read, kept until
        removed by hand; its error says what is wrong, and columns that are not JSON where
        JSON belongs are emptied so that the job can be read, shown, retried or deleted."""
        log.error("%s (it cannot run: it ends failed)", exc)
        kind = type(exc)
        error = {"type": f"{kind.__module__}.{kind.__qualname__}", "message": str(exc)}
        error["traceback"] = ""
        params = {
            "seq": row["seq"],
            "now": now,
            "error": _dump(error),
            "meta_reads": _reads_as_json(row["meta"]),
            "history_reads": _reads_as_json(row["attempt_history"]),
        }
        conn.execute(self._sql["fail_unreadable"], params)
        self._unblock(conn, [row["id"]])

    def _remember_deferred(self, job: Job) -> None:
        known = self._deferred
        known[job.id] = job
        if len(known) > _KNOWN_DEFERRED:  # releases lost to errors: forget the oldest
            del known[next(iter(known))]

    def _release(self, conn: sqlite3.Connection, ids: Sequence[str]) -> None:
        """The ``release`` verb, inside a transaction."""
        for job_id in ids:
            self._deferred.pop(job_id, None)
        if len(ids) == 1:
            self._execute(conn, "release_one", {"id": ids[0]})
        elif ids:
            self._execute(conn, "release", {"ids": _ids(ids)})

    def _finish_and_claim(
        self,
        conn: sqlite3.Connection,
        release: list[str],
        outcomes: list[Outcome],
        queues: list[str] | None,
        params: dict[str, Any],
    ) -> tuple[list[str], list[Job]]:
        applied = self._finish(conn, outcomes) if outcomes else []
        return applied, self._claim(conn, queues, params, release)

    def _finish(self, conn: sqlite3.Connection, outcomes: list[Outcome]) -> list[str]:
        applied: list[str] = []
        ended: list[str] = []
        for o in outcomes:
            params: dict[str, Any] = {"id": o.job_id, "worker_id": o.worker_id}
            params.update(result=o.result, error=_dump(o.error))
            if o.state is JobState.QUEUED:
                changed = self._execute(conn, "finish_retry", {**params, "run_at": o.run_at})
            else:
                params.update(state=o.state.value, finished_at=o.finished_at)
                params.update(keep_until=o.keep_until)
                changed = self._execute(conn, "finish_end", params)
                if changed:
                    ended.append(o.job_id)
            if changed:
                applied.append(o.job_id)
                if o.attempt is not None:
                    params = {"id": o.job_id, "attempt": _dump(o.attempt)}
                    self._execute(conn, "append_attempt", params)
        self._unblock(conn, ended)
        return applied

    def _requeue_expired(
        self, conn: sqlite3.Connection, now: float, keep_until: float | None
    ) -> int:
        params = {"now": now, "keep_until": keep_until}
        cancelled = [row["id"] for row in self._fetch_named(conn, "cancel_expired_leases", params)]
        self._unblock(conn, cancelled)
        expired = self._execute(conn, "requeue_expired_leases", {"now": now})
        overdue = self._execute(conn, "requeue_overdue_deferred", {"now": now})
        return len(cancelled) + expired + overdue

    def _cancel(
        self, conn: sqlite3.Connection, job_id: str, now: float, keep_until: float | None
    ) -> JobState | None:
        row = conn.execute(self._sql["get_job"], {"id": job_id}).fetchone()
        if row is None:
            return None
        state = JobState(row["state"])
        if state in (JobState.DEFERRED, JobState.QUEUED):
            params = {"id": job_id, "now": now, "keep_until": keep_until}
            self._execute(conn, "cancel_waiting", params)
            self._unblock(conn, [job_id])
            return JobState.CANCELLED
        if state is JobState.RUNNING:
            self._execute(conn, "request_cancel", {"id": job_id})
        return state

    def _retry(self, conn: sqlite3.Connection, job_id: str, now: float) -> bool:
        row = conn.execute(self._sql["get_job"], {"id": job_id}).fetchone()
        if row is None or row["state"] not in (JobState.FAILED.value, JobState.CANCELLED.value):
            return False
        key, after = row["key"], row["after"]
        if key is not None and conn.execute(self._sql["get_key_holder"], {"key": key}).fetchone():
            return False
        if after is not None and not self._active(conn, after):
            after = None
        self._execute(conn, "retry", {"id": job_id, "now": now, "after": after})
        return True

    def _claim_slot(self, conn: sqlite3.Connection, schedule: str, slot: float, job: Job) -> bool:
        taken = self._fetch_named(conn, "take_slot", {"name": schedule, "slot": slot})
        if not taken:
            return False
        self._enqueue(conn, [job])
        return True

    def _workers(self, conn: sqlite3.Connection, seen_since: float) -> list[sqlite3.Row]:
        self._execute(conn, "drop_stale_workers", {"seen_since": seen_since})
        return self._fetch_named(conn, "workers", {})

    def _delete(self, conn: sqlite3.Connection, ids: str) -> int:
        removed = self._execute(conn, "delete", {"ids": ids})
        conn.execute(self._sql["unblock"], {"ids": ids})
        return removed

    def _purge_batch(self, conn: sqlite3.Connection, query: str, params: dict[str, Any]) -> int:
        rows = self._fetch_named(conn, query, params)
        if rows:
            seqs = json.dumps([row["seq"] for row in rows])
            conn.execute(self._sql["delete_seqs"], {"seqs": seqs})
            self._unblock(conn, [row["id"] for row in rows])
        return len(rows)
