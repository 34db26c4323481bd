"""Where the SQLite store's statements run: a short write on the awaiting loop when nothing
holds the write lock, on the store's thread (waiting for the lock) when something does, and
checkpoints on neither."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import anyio
import pytest

from backlane.exceptions import StoreError
from backlane.jobs import Job, JobState
from backlane.stores import sqlite_connections
from backlane.stores.sqlite import SQLiteStore
from backlane.stores.sqlite_connections import CHECKPOINT_EVERY, RESTART_FRAMES, Connections

pytestmark = pytest.mark.anyio

NOW = 1_700_000_000.0


def _thread_of(conn: sqlite3.Connection) -> int:
    conn.execute("INSERT INTO paused_queues (queue) VALUES ('q') ON CONFLICT DO NOTHING")
    return threading.get_ident()


async def test_a_short_write_runs_on_the_loop_when_nothing_holds_the_lock(tmp_path: Path) -> None:
    db = Connections(str(tmp_path / "jobs.db"), "sqlite:///jobs.db")
    await db.open()
    try:
        assert await db.write(_thread_of) == threading.get_ident()
    finally:
        await db.close()


async def test_a_write_waits_on_the_thread_while_another_process_holds_the_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    db = Connections(str(path), "sqlite:///jobs.db")
    await db.open()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.2, other.execute, ("COMMIT",)).start()
        started = time.perf_counter()
        ran_on = await db.write(_thread_of)
        waited = time.perf_counter() - started
        assert ran_on != threading.get_ident()
        assert 0.15 < waited < 2.0
        assert await db.write(_thread_of) == threading.get_ident()  # free again: the loop
    finally:
        other.close()
        await db.close()


async def test_a_write_cancelled_while_it_waits_on_the_thread_still_returns_what_it_stored(
    tmp_path: Path,
) -> None:
    # A request whose client goes while its jobs are being stored must still learn that
    # they were stored (the drop-in does not shield this store's enqueue itself).
    path = tmp_path / "jobs.db"
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    job = Job(task="t", payload="{}", state=JobState.DEFERRED, run_at=NOW, created_at=NOW)
    stored: list[Job] = []
    try:
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, other.execute, ("COMMIT",)).start()
        with anyio.move_on_after(0.05) as scope:
            stored = await store.enqueue([job])
            await anyio.sleep(1)  # the cancellation comes at the next checkpoint
        assert scope.cancelled_caught
        assert [j.id for j in stored] == [job.id]
        kept = await store.get(job.id)
        assert kept is not None and kept.state is JobState.DEFERRED
    finally:
        other.close()
        await store.close()


async def test_a_write_gives_up_with_a_store_error_when_the_lock_never_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_connections, "BUSY_TIMEOUT_MS", 100)
    path = tmp_path / "jobs.db"
    db = Connections(str(path), "sqlite:///jobs.db")
    await db.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked"):
            await db.write(_thread_of)
        other.execute("ROLLBACK")
        assert await db.write(_thread_of) == threading.get_ident()
    finally:
        other.close()
        await db.close()


async def test_a_failed_write_on_the_loop_leaves_nothing_behind(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    await store.open()
    job = Job(task="t", payload="[]", created_at=NOW, run_at=NOW)

    def store_then_fail(conn: sqlite3.Connection) -> None:
        store._enqueue(conn, [job])
        raise RuntimeError("on purpose")

    try:
        with pytest.raises(RuntimeError, match="on purpose"):
            await store._db.write(store_then_fail)
        assert await store.get(job.id) is None
        await store.enqueue([job])
        assert await store.get(job.id) == job
    finally:
        await store.close()


async def test_the_wal_is_checkpointed_off_the_loop_and_stays_small(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    on_loop = threading.get_ident()
    checkpointed_on: list[int] = []
    original = store._db._checkpoint

    def spy() -> None:
        checkpointed_on.append(threading.get_ident())
        original()

    store._db._checkpoint = spy  # type: ignore[method-assign]
    try:
        for n in range(CHECKPOINT_EVERY * 20):
            job = Job(task="t", payload=f'{{"n":{n}}}', created_at=NOW, run_at=NOW)
            await store.enqueue([job])
            await store.release([job.id])
        for _ in range(1000):  # the last checkpoint asked for may still be running
            if not store._db._checkpoint_asked:
                break
            await asyncio.sleep(0.01)
        wal = path.with_name(path.name + "-wal").stat().st_size
    finally:
        await store.close()
    # one every CHECKPOINT_EVERY commits, unless one asked for earlier is still running
    # (then that one serves both): on a busy machine, fewer than 40
    assert len(checkpointed_on) >= 5
    assert on_loop not in checkpointed_on
    # 4,000 jobs stored and released write about 150 MiB of WAL: it was started afresh
    assert wal < 2 * RESTART_FRAMES * 4096, wal
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == CHECKPOINT_EVERY * 20
    finally:
        conn.close()


def test_an_in_memory_database_is_one_database(tmp_path: Path) -> None:
    """``sqlite:///:memory:`` is private to a connection: all its work runs on the thread."""

    async def use() -> list[Job]:
        store = SQLiteStore("sqlite:///:memory:")
        await store.open()
        try:
            await store.enqueue([Job(task="t", payload="[]", created_at=NOW, run_at=NOW)])
            return await store.claim(
                worker_id="w", queues=None, limit=5, now=NOW, lease_until=NOW + 60
            )
        finally:
            await store.close()

    assert len(asyncio.run(use())) == 1


def _insert(conn: sqlite3.Connection, queue: str) -> str:
    conn.execute("INSERT INTO paused_queues (queue) VALUES (?)", (queue,))
    return queue


def _fail(conn: sqlite3.Connection, queue: str) -> None:
    conn.execute("INSERT INTO paused_queues (queue) VALUES (?)", (queue,))
    raise ValueError("on purpose")


async def _queues(db: Connections) -> set[str]:
    rows = await db.on_thread(lambda conn: conn.execute("SELECT queue FROM paused_queues"))
    return {row["queue"] for row in rows}


async def test_writes_asked_for_in_one_turn_share_one_transaction(tmp_path: Path) -> None:
    db = Connections(str(tmp_path / "jobs.db"), "sqlite:///jobs.db")
    await db.open()
    transactions: list[int] = []
    original = db._run_batch

    def spy(conn: sqlite3.Connection, batch: list[object]) -> list[tuple[bool, object]]:
        transactions.append(len(batch))
        return original(conn, batch)  # type: ignore[arg-type]

    db._run_batch = spy  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(
            db.write_soon(_insert, "a"),
            db.write_soon(_fail, "b"),
            db.write(_insert, "c"),  # a batch is waiting: it joins it
            db.write_soon(_insert, "d"),
            return_exceptions=True,
        )
        assert results[0] == "a" and results[2] == "c" and results[3] == "d"
        assert isinstance(results[1], ValueError)
        assert transactions == [4]
        assert await _queues(db) == {"a", "c", "d"}  # the failed one undone alone
        assert await db.write(_insert, "e") == "e"  # no batch waits: at once
        assert transactions == [4]
    finally:
        await db.close()


async def test_a_batch_that_cannot_run_at_its_turn_runs_on_the_thread(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    db = Connections(str(path), "sqlite:///jobs.db")
    await db.open()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.1, other.execute, ("COMMIT",)).start()
        results = await asyncio.gather(db.write_soon(_insert, "a"), db.write_soon(_insert, "b"))
        assert results == ["a", "b"]
        assert await _queues(db) == {"a", "b"}
    finally:
        other.close()
        await db.close()


async def test_a_released_job_is_claimable_once_release_returns(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    await store.open()
    jobs = [
        Job(task="t", payload="[]", created_at=NOW, run_at=NOW, state=JobState.DEFERRED)
        for _ in range(3)
    ]
    try:
        await store.enqueue(jobs)
        await asyncio.gather(store.release([jobs[0].id]), store.release([j.id for j in jobs[1:]]))
        claimed = await store.claim(
            worker_id="w", queues=None, limit=5, now=NOW, lease_until=NOW + 60
        )
        assert {job.id for job in claimed} == {job.id for job in jobs}
    finally:
        await store.close()
