"""Transactional enqueue on the PostgreSQL store (issue 4): a job enqueued through a
caller's connection exists only if the caller's transaction commits — with psycopg, with
SQLAlchemy (``AsyncSession`` and ``AsyncConnection``), directly and through the drop-in.

Rollback: the job is never stored, so no worker ever runs it. Commit: it runs.
"""

import importlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any
from urllib.parse import quote

import anyio
import psycopg
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from backlane import Backlane, ConfigurationError, JobState, StoreError
from backlane.fastapi import BackgroundTasks
from backlane.testing import drain
from tests.integration import recorder
from tests.integration.recorder import RECORD
from tests.services import POSTGRES_URL, store_url

pytestmark = pytest.mark.anyio


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A PostgreSQL store URL with a schema of its own, dropped afterwards."""
    with store_url("postgres", tmp_path) as url:
        yield url


def schema_of(url: str) -> str:
    return url.rpartition("schema=")[2]


@pytest.fixture
async def lane(pg_url: str) -> AsyncIterator[Backlane]:
    lane = Backlane(pg_url)
    async with lane:
        yield lane


def sqlalchemy_engine(pg_url: str) -> AsyncEngine:
    """An engine on the test database whose tables go to the test's schema. No pool: a
    pooled connection would belong to the event loop that opened it."""
    options = quote(f"-csearch_path={schema_of(pg_url)}")
    url = POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    return create_async_engine(f"{url}?options={options}", poolclass=NullPool)


async def ran(lane: Backlane) -> list[str]:
    """Run what can run now; the labels recorded."""
    await drain(lane)
    return RECORD.labels()


# -- psycopg ---------------------------------------------------------------------------


async def test_psycopg_rollback_stores_nothing_and_commit_runs_the_job(lane: Backlane) -> None:
    note = lane.task(recorder.note)
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn:
        rolled = await note.options(connection=conn).enqueue("rolled back")
        assert await lane.store.get(rolled.id) is None  # not visible outside the transaction
        assert await ran(lane) == []  # a worker sees nothing to run
        await conn.rollback()
        committed = await note.options(connection=conn).enqueue("committed")
        assert await lane.store.get(committed.id) is None
        await conn.commit()
    assert await lane.store.get(rolled.id) is None
    assert await committed.status() is JobState.QUEUED
    assert await ran(lane) == ["committed"]
    assert await committed.status() is JobState.SUCCEEDED


async def test_psycopg_transaction_block_and_autocommit(lane: Backlane) -> None:
    note = lane.task(recorder.note)
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as conn:
        with pytest.raises(RuntimeError, match="changed my mind"):
            async with conn.transaction():
                gone = await note.options(connection=conn).enqueue("inside, rolled back")
                raise RuntimeError("changed my mind")
        async with conn.transaction():
            kept = await note.options(connection=conn).enqueue("inside, committed")
        alone = await note.options(connection=conn).enqueue("autocommit: at once")
    assert await lane.store.get(gone.id) is None
    assert await kept.status() is JobState.QUEUED
    assert await alone.status() is JobState.QUEUED
    assert sorted(await ran(lane)) == ["autocommit: at once", "inside, committed"]


async def test_a_failed_enqueue_aborts_the_callers_transaction(lane: Backlane) -> None:
    note = lane.task(recorder.note)
    existing = await note.enqueue("already there")
    job = note.build_job(("clash",), {})
    job.id = existing.id
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn:
        await conn.execute("SELECT 1")
        with pytest.raises(StoreError, match="duplicate key"):
            await lane.enqueue_jobs([job], connection=conn)
        assert conn.info.transaction_status is psycopg.pq.TransactionStatus.INERROR
        await conn.rollback()


async def test_the_batch_and_its_keys_commit_with_the_caller(lane: Backlane) -> None:
    note = lane.task(recorder.note)
    holder = await note.options(key="report").enqueue("the holder")
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn:
        twin = await note.options(key="report", connection=conn).enqueue("same key")
        fresh = await note.options(key="other", connection=conn).enqueue("fresh key")
        assert twin.id == holder.id  # the holder is committed: seen from the transaction
        await conn.rollback()
    assert await lane.store.get(fresh.id) is None
    assert await ran(lane) == ["the holder"]


async def test_connections_it_cannot_join_are_refused(lane: Backlane) -> None:
    note = lane.task(recorder.note)
    with (
        psycopg.connect(POSTGRES_URL) as sync_conn,
        pytest.raises(ConfigurationError, match="AsyncConnection"),
    ):
        await note.options(connection=sync_conn).enqueue("sync")
    with pytest.raises(ConfigurationError, match="AsyncSession"):
        await note.options(connection=object()).enqueue("what is this")
    assert await lane.store.counts() == {}


async def test_a_connection_to_another_database_says_so(lane: Backlane) -> None:
    note = lane.task(recorder.note)
    elsewhere = POSTGRES_URL.rpartition("/")[0] + "/postgres"  # a database without the schema
    async with await psycopg.AsyncConnection.connect(elsewhere) as conn:
        with pytest.raises(StoreError, match="is the connection to the store's database"):
            await note.options(connection=conn).enqueue("lost")


# -- SQLAlchemy --------------------------------------------------------------------------


async def test_sqlalchemy_session_rollback_and_commit(lane: Backlane, pg_url: str) -> None:
    note = lane.task(recorder.note)
    engine = sqlalchemy_engine(pg_url)
    try:
        async with AsyncSession(engine) as session:
            rolled = await note.options(connection=session).enqueue("session rolled back")
            assert session.in_transaction()
            await session.rollback()
            async with session.begin():
                committed = await note.options(connection=session).enqueue("session committed")
                assert await lane.store.get(committed.id) is None
    finally:
        await engine.dispose()
    assert await lane.store.get(rolled.id) is None
    assert await ran(lane) == ["session committed"]


async def test_sqlalchemy_connection_rollback_and_commit(lane: Backlane, pg_url: str) -> None:
    note = lane.task(recorder.note)
    engine = sqlalchemy_engine(pg_url)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("CREATE TABLE notes (body text)"))
            await conn.execute(text("INSERT INTO notes VALUES ('rolled back')"))
            rolled = await note.options(connection=conn).enqueue("connection rolled back")
            await conn.rollback()
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE notes (body text)"))
            await note.options(connection=conn).enqueue("connection committed")
    finally:
        await engine.dispose()
    assert await lane.store.get(rolled.id) is None
    assert await ran(lane) == ["connection committed"]


# -- through the drop-in -----------------------------------------------------------------


def dropin_app(lane: Backlane, pg_url: str, seen: dict[str, Any]) -> FastAPI:
    """An app whose endpoints add tasks inside the request's own transaction: psycopg or
    SQLAlchemy, committed by the dependency after the response (``?keep=0`` rolls back)."""
    app = FastAPI()
    lane.install(app, workers=1, concurrency=4)
    engine = sqlalchemy_engine(pg_url)

    async def visible(ids: list[str]) -> list[str | None]:
        """The state of each job as others see it (None: not stored, or not committed)."""
        jobs = [await lane.store.get(job_id) for job_id in ids]
        return [None if job is None else job.state.value for job in jobs]

    async def psycopg_conn(keep: bool = True) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn:
            seen["ids"] = []
            yield conn
            seen["visible_before_commit"] = await visible(seen["ids"])
            if not keep:
                await conn.rollback()

    async def sqlalchemy_session(keep: bool = True) -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine) as session:
            seen["ids"] = []
            try:
                yield session
            except Exception:
                await session.rollback()
                raise
            seen["visible_before_commit"] = await visible(seen["ids"])
            await (session.commit() if keep else session.rollback())

    @app.post("/psycopg")
    async def with_psycopg(
        conn: Annotated[psycopg.AsyncConnection[Any], Depends(psycopg_conn)],
        background_tasks: BackgroundTasks,
    ) -> dict[str, list[str]]:
        note = lane.task_for(recorder.note)
        first = background_tasks.add_task(note.options(connection=conn), "psycopg 1")
        second = background_tasks.add_task(recorder.note, "psycopg 2")  # joins it too
        seen["ids"] += [first.id, second.id]
        return {"ids": seen["ids"]}

    @app.post("/sqlalchemy")
    async def with_sqlalchemy(
        session: Annotated[AsyncSession, Depends(sqlalchemy_session)],
        background_tasks: BackgroundTasks,
        fail: bool = False,
    ) -> dict[str, list[str]]:
        before = background_tasks.add_task(recorder.slow_async, "plain, before", 0.2)
        note = lane.task_for(recorder.note)
        joined = background_tasks.add_task(note.options(connection=session), "sqlalchemy")
        seen["ids"] += [before.id, joined.id]
        if fail:
            raise HTTPException(status_code=409, detail="conflict")
        return {"ids": seen["ids"]}

    app.state.engine = engine
    return app


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def states(lane: Backlane, ids: list[str]) -> list[JobState | None]:
    async def look() -> list[JobState | None]:
        jobs = [await lane.store.get(job_id) for job_id in ids]
        return [None if job is None else job.state for job in jobs]

    return anyio.run(look)


def test_dropin_jobs_commit_with_the_request_transaction(pg_url: str) -> None:
    lane, seen = Backlane(pg_url), {}  # type: ignore[var-annotated]
    app = dropin_app(lane, pg_url, seen)
    with TestClient(app) as client:
        ids = client.post("/psycopg").json()["ids"]
        wait_until(lambda: len(RECORD.labels()) == 2)
        assert seen["visible_before_commit"] == [None, None]
        assert RECORD.labels() == ["psycopg 1", "psycopg 2"]
        wait_until(lambda: states(lane, ids) == [JobState.SUCCEEDED] * 2)

        ids = client.post("/sqlalchemy").json()["ids"]
        wait_until(lambda: len(RECORD.labels()) == 4)
        plain, joined = seen["visible_before_commit"]
        # stored before the response; the embedded worker releases it with its next claim
        assert plain in ("deferred", "queued", "running", "succeeded")
        assert joined is None  # not before the commit, which comes after the response
        assert RECORD.labels()[2:] == ["plain, before", "sqlalchemy"]  # in order
    anyio.run(app.state.engine.dispose)


def test_dropin_jobs_vanish_when_the_request_transaction_rolls_back(pg_url: str) -> None:
    lane, seen = Backlane(pg_url), {}  # type: ignore[var-annotated]
    app = dropin_app(lane, pg_url, seen)
    with TestClient(app) as client:
        reply = client.post("/psycopg", params={"keep": "false"})
        assert reply.status_code == 200  # the client heard "done"; the transaction then failed
        rolled = reply.json()["ids"]

        reply = client.post("/sqlalchemy", params={"keep": "false"})
        plain, joined = reply.json()["ids"]
        wait_until(lambda: RECORD.labels() == ["plain, before"])

        reply = client.post("/sqlalchemy", params={"fail": "true"})
        assert reply.status_code == 409
        failed = seen["ids"]

        time.sleep(0.5)  # time enough for the worker to run anything it could see
        assert states(lane, [*rolled, joined, *failed]) == [None] * 5
        assert states(lane, [plain]) == [JobState.SUCCEEDED]
    assert RECORD.labels() == ["plain, before"]
    anyio.run(app.state.engine.dispose)


# -- the documented example ----------------------------------------------------------------


def load_example(monkeypatch: pytest.MonkeyPatch, pg_url: str) -> ModuleType:
    options = quote(f"-csearch_path={schema_of(pg_url)}")
    url = POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    monkeypatch.setenv("DATABASE_URL", f"{url}?options={options}")
    monkeypatch.setenv("BACKLANE_URL", pg_url)
    mod = importlib.reload(importlib.import_module("docs.examples.sqlalchemy_enqueue"))
    mod.RECEIPTS.clear()
    return mod


def test_documented_sqlalchemy_example(monkeypatch: pytest.MonkeyPatch, pg_url: str) -> None:
    mod = load_example(monkeypatch, pg_url)

    async def outside_a_request() -> None:
        async with mod.lane:  # opening the store creates the test's schema
            async with mod.engine.begin() as conn:
                await conn.run_sync(mod.Base.metadata.create_all)
            order_id = await mod.place_order("ann@example.com")
            await drain(mod.lane)
        await mod.engine.dispose()
        receipt = f"receipt for order {order_id} to ann@example.com"
        assert list(mod.RECEIPTS) == [receipt]

    anyio.run(outside_a_request)

    with TestClient(mod.app) as client:
        reply = client.post("/orders", params={"email": "bob@example.com"})
        assert reply.status_code == 200
        wait_until(lambda: len(mod.RECEIPTS) == 2)
        assert mod.RECEIPTS[1] == f"receipt for order {reply.json()['order']} to bob@example.com"
        assert client.post("/orders", params={"email": "eve@invalid"}).status_code == 422
        time.sleep(0.3)
    anyio.run(mod.engine.dispose)

    async def orders() -> list[str]:
        async with mod.engine.connect() as conn:
            rows = await conn.execute(text("SELECT email FROM orders ORDER BY id"))
            emails = [row[0] for row in rows]
        await mod.engine.dispose()
        return emails

    assert anyio.run(orders) == ["ann@example.com", "bob@example.com"]
    assert len(mod.RECEIPTS) == 2
