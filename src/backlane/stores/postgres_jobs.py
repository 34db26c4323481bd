"""Jobs to and from PostgreSQL rows, and ``enqueue`` on any connection that reaches them.

``enqueue`` runs either on the store's own pool or inside a caller's transaction, through
one small interface (``Session``) with three makers: a psycopg ``AsyncConnection`` (the
store's, or the caller's), and a SQLAlchemy ``AsyncConnection`` or ``AsyncSession``, whose
statements go through SQLAlchemy so that they join the transaction SQLAlchemy has open on
that connection (whatever its driver).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..exceptions import ConfigurationError, StoreError
from ..jobs import Job, JobState

_FIELDS = tuple(field.name for field in dataclasses.fields(Job))
_FLOATS = (
    "run_at",
    "created_at",
    "started_at",
    "finished_at",
    "lease_until",
    "progress",
    "release_at",
    "keep_until",
)
_CAST_PARAM = re.compile(r"%\((\w+)\)s::([\w\[\]]+)")
_PARAM = re.compile(r"%\((\w+)\)s")
_KEY_RACE_ATTEMPTS = 5

Row = Mapping[str, Any]


class Session(Protocol):
    """Somewhere statements run: one connection, inside whatever transaction it has."""

    async def fetch(self, sql: str, params: Mapping[str, Any]) -> list[Row]:
        """Run ``sql`` (psycopg ``%(name)s`` parameters) and return its rows, if any."""
        ...


class PsycopgSession:
    """Statements on a psycopg ``AsyncConnection``, rows as dicts."""

    def __init__(self, conn: Any) -> None:
        from psycopg.rows import dict_row

        self.conn = conn
        self._row_factory = dict_row

    async def fetch(self, sql: str, params: Mapping[str, Any]) -> list[Row]:
        async with self.conn.cursor(row_factory=self._row_factory) as cursor:
            await cursor.execute(sql, params)
            rows: list[Row] = await cursor.fetchall() if cursor.description else []
            return rows


class SQLAlchemySession:
    """Statements through a SQLAlchemy ``AsyncConnection``, as ``text()`` with bound
    parameters, so they run in SQLAlchemy's transaction on it, whatever the driver."""

    def __init__(self, conn: Any) -> None:
        from sqlalchemy import text

        self.conn = conn
        self._text = text

    async def fetch(self, sql: str, params: Mapping[str, Any]) -> list[Row]:
        statement = self._text(_bind_params(sql))
        result = await self.conn.execute(statement, dict(params))
        if not result.returns_rows:
            return []
        return [dict(row) for row in result.mappings()]


@functools.cache
def _bind_params(sql: str) -> str:
    """``sql`` with SQLAlchemy's ``:name`` parameters (``%(x)s::t`` as ``CAST(:x AS t)``,
    as ``:x::t`` would not be read as a parameter)."""
    return _PARAM.sub(r":\1", _CAST_PARAM.sub(r"CAST(:\1 AS \2)", sql))


async def caller_session(connection: Any) -> tuple[Session, Any]:
    """The session for a caller's ``connection``, and the psycopg connection to wrap in a
    transaction when the caller has none open (autocommit), else None. Raises
    ``ConfigurationError`` for anything else."""
    kind = type(connection)
    module = kind.__module__
    if module.startswith("psycopg"):
        import psycopg

        if isinstance(connection, psycopg.AsyncConnection):
            idle = connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            own = connection if idle and connection.autocommit else None
            return PsycopgSession(connection), own
    if module.startswith("sqlalchemy"):
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

        if isinstance(connection, AsyncSession):
            return SQLAlchemySession(await connection.connection()), None
        if isinstance(connection, AsyncConnection):
            return SQLAlchemySession(connection), None
    raise ConfigurationError(
        f"connection= takes a psycopg AsyncConnection or a SQLAlchemy AsyncSession or "
        f"AsyncConnection (on the store's database); got {kind.__module__}.{kind.__qualname__}"
    )


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def jsonb(value: Any) -> str:
    """``value`` as JSON for a jsonb column, which cannot hold the character NUL nor a lone
    surrogate (a file name decoded with surrogateescape): each of those in its strings (an
    exception's message may carry one) becomes U+FFFD, the replacement character."""
    text = json.dumps(value)
    if "\\u0000" in text or "\\ud" in text:  # \ud: a surrogate, lone or half of a pair
        return json.dumps(_storable(value))
    return text


def storable(text: str) -> str:
    """``text`` for a text column, which cannot hold the character NUL nor a lone
    surrogate: each of those becomes U+FFFD, the replacement character."""
    return _UNSTORABLE.sub("\ufffd", text)


def _storable(value: Any) -> Any:
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {_storable(name): _storable(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable(item) for item in value]
    return value


def encode(job: Job) -> dict[str, Any]:
    """``job`` as the parameters of ``insert_job``."""
    values = {name: getattr(job, name) for name in _FIELDS}
    values["state"] = job.state.value
    values["error"] = None if job.error is None else jsonb(job.error)
    values["meta"] = jsonb(job.meta)
    history = job.attempt_history
    values["attempt_history"] = jsonb(history) if history else None
    for name in _FLOATS:
        if values[name] is not None:
            values[name] = float(values[name])
    return values


def decode(row: Row) -> Job:
    """The job stored in ``row``. A jsonb column holding a JSON string (written by hand
    or by another program) reads as that string, never as an error: the job still runs."""
    values = {name: row[name] for name in _FIELDS}
    values["state"] = JobState(values["state"])
    for name in ("error", "meta", "attempt_history"):
        if isinstance(values[name], str):  # drivers that leave jsonb as text (not psycopg)
            with contextlib.suppress(ValueError):
                values[name] = json.loads(values[name])
    if values["attempt_history"] is None:
        values["attempt_history"] = []
    return Job(**values)


def sort_claimed(rows: Sequence[Row]) -> list[Job]:
    """Claimed rows as jobs, in claim order."""
    ordered = sorted(rows, key=lambda row: (-row["priority"], row["run_at"], row["seq"]))
    return [decode(row) for row in ordered]


async def enqueue_on(session: Session, sql: Mapping[str, str], jobs: Sequence[Job]) -> list[Job]:
    """Store ``jobs`` in order through ``session``, which must run them in one transaction
    when ``needs_transaction(jobs)``.

    A job whose key an active job holds is not stored: the holder is returned in its
    place, and a later job of the batch whose ``after`` named it waits for the holder
    instead. An ``after`` naming no active job is dropped. A repeated id is refused with
    ``StoreError`` before anything is sent; an id already stored fails the statement."""
    ids = [job.id for job in jobs]
    if len(set(ids)) != len(ids):
        raise StoreError("enqueue refused: a job id is repeated in the batch")
    if not jobs:
        return []
    if len(jobs) == 1 or any(job.key is not None for job in jobs):
        return await _enqueue_one_by_one(session, sql, jobs)
    return await _enqueue_batch(session, sql, jobs)


def needs_transaction(jobs: Sequence[Job]) -> bool:
    """Whether ``enqueue_on`` sends more than one writing statement for ``jobs`` (else its
    one statement is atomic on its own)."""
    return len(jobs) > 1 and any(job.key is not None for job in jobs)


async def _enqueue_batch(
    session: Session, sql: Mapping[str, str], jobs: Sequence[Job]
) -> list[Job]:
    params: dict[str, list[Any]] = {name: [] for name in _FIELDS if name != "key"}
    params["after_in_batch"] = []
    earlier: set[str] = set()
    for job in jobs:
        for name, value in encode(job).items():
            if name != "key":
                params[name].append(value)
        params["after_in_batch"].append(job.after in earlier)
        earlier.add(job.id)
    rows = await session.fetch(sql["insert_jobs"], params)
    after = {row["id"]: row["after"] for row in rows}
    return [_stored_copy(job, after[job.id]) for job in jobs]


async def _enqueue_one_by_one(
    session: Session, sql: Mapping[str, str], jobs: Sequence[Job]
) -> list[Job]:
    stored: list[Job] = []
    replaced: dict[str, str] = {}
    for job in jobs:
        params = encode(job)
        if job.after is not None:
            params["after"] = replaced.get(job.after, job.after)
        for _ in range(_KEY_RACE_ATTEMPTS):
            rows = await session.fetch(sql["insert_job"], params)
            if rows:
                stored.append(_stored_copy(job, rows[0]["after"]))
                break
            holders = await session.fetch(sql["key_holder"], {"key": job.key})
            if holders:  # else the holder ended in between: try storing again
                holder = decode(holders[0])
                replaced[job.id] = holder.id
                stored.append(holder)
                break
        else:  # pragma: no cover - needs a holder ending between two statements, 5 times
            raise StoreError(f"enqueue: the key {job.key!r} changed hands too often; try again")
    return stored


def _stored_copy(job: Job, after: str | None) -> Job:
    return job.copy(
        after=after,
        error=None if job.error is None else json.loads(json.dumps(job.error)),
        meta=json.loads(json.dumps(job.meta)),
        attempt_history=json.loads(json.dumps(job.attempt_history)),
    )
