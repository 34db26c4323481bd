"""Where the SQLite store's statements run: on the awaiting event loop when that costs no
waiting, on the store's thread otherwise.

A short write (storing a request's jobs, releasing them, a claim, a finish) runs on the
event loop that awaits it, in a ``BEGIN IMMEDIATE`` transaction on a connection kept for
that, but only if it can start at once: that connection is taken with a non-blocking
try-lock (another thread or loop may be using it), and its ``busy_timeout`` is 0, so a
write lock held elsewhere (by the store's thread, or another process) fails at once. The
work then goes to the store's thread, whose connection waits for the lock as long as
``busy_timeout`` allows, as does every read but the point lookup and every transaction of
unbounded size. Either way the transaction is the same; the loop merely saves the thread
hop, which under load costs more than the transaction (the GIL changes hands twice).

Writes that need not start at once (a request's release, after its response) wait for the
loop's next turn and share one transaction with the other writes asked for meanwhile on
that loop: under load, a commit then carries many requests' work. A write that must start
at once still joins such a batch when one is waiting, rather than commit alone before it.

Checkpoints never run on a loop: automatic checkpoints are off, and after every
``CHECKPOINT_EVERY`` commits a connection on a thread of its own copies the WAL back into
the database; once the WAL is long, the store's thread finishes the copy while this
process's writes wait a moment, so that the WAL starts afresh (see ``_restart_wal``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio

from ..exceptions import StoreError
from .sqlite_schema import migrate

T = TypeVar("T")

log = logging.getLogger("backlane")

BUSY_TIMEOUT_MS: Final = 5000
"""How long the store's thread waits for a write lock another connection holds."""
CHECKPOINT_EVERY: Final = 100
"""Commits between two checkpoints (storing and releasing one job write about 9 WAL pages)."""
RESTART_FRAMES: Final = 4000
"""WAL length, in pages, from which a checkpoint makes sure the WAL starts afresh."""
RESTART_WAIT_MS: Final = 50
"""How long such a checkpoint waits for other processes' writers and readers before it
tries again later (this process's are held back meanwhile)."""
_BUSY_POLL_MAX = 0.0005
"""Longest pause, in seconds, between two tries at the write lock (``_begin``)."""
_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED (primary result codes)


class _NotHere:
    """What ``_write_here`` and ``_read_here`` return when the work did not run."""


_BUSY: Final = _NotHere()
"""Another thread or loop, or another connection, holds what the work needs."""
_HELD: Final = _NotHere()
"""A checkpoint holds this process's writers back for a moment."""


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _to_the_end(write: Awaitable[T]) -> T:
    """What ``write`` returns or raises, even if the caller is cancelled meanwhile (the
    cancellation then takes effect at the caller's next checkpoint)."""
    with anyio.CancelScope(shield=True):
        return await write
    raise AssertionError("unreachable: a shielded scope is never cancelled")


def _settle_batch(batch: list[_Pending], outcomes: list[tuple[bool, Any]]) -> None:
    for pending, (ok, value) in zip(batch, outcomes, strict=True):
        if pending.future.done():  # its caller was cancelled; the write was done all the same
            continue
        if ok:
            pending.future.set_result(value)
        else:
            pending.future.set_exception(value)


def _settle_all(batch: list[_Pending], exc: BaseException) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(exc)


class _Gate:
    """Open, or shut while a checkpoint holds this process's writers back. Threads and
    event loops of any thread may wait for it to open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    def is_open(self) -> bool:
        return self._open.is_set()

    def shut(self) -> None:
        self._open.clear()

    def reopen(self) -> None:
        with self._lock:
            self._open.set()
            waiters, self._waiters = self._waiters, set()
        for loop, fut in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, fut)

    def wait(self, timeout: float) -> None:
        """Block this thread until the gate is open, or ``timeout`` seconds."""
        self._open.wait(timeout)

    async def opened(self, timeout: float) -> None:
        """Return once the gate is open, or after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (loop, fut)
        with self._lock:
            if self._open.is_set():
                return
            self._waiters.add(entry)
        try:
            await asyncio.wait([fut], timeout=timeout)
        finally:
            with self._lock:
                self._waiters.discard(entry)
            fut.cancel()


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in _BUSY_CODES
    return "locked" in str(exc) or "busy" in str(exc)


@dataclass
class _Pending:
    """A write waiting for its loop's next turn, and the future its caller awaits."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]


class Connections:
    """The connections of one SQLite file, and the threads they run on. ``open`` and
    ``close`` may race each other from any thread; each work function gets a connection
    as its first argument and must not keep it."""

    def __init__(self, path: str, url: str) -> None:
        self.path = path
        self.url = url
        self._lock = threading.Lock()
        """Guards ``_executor``, ``_opening`` and ``_checkpointer``."""
        self._executor: ThreadPoolExecutor | None = None
        self._opening: Future[None] | None = None
        """The connect of the current opening, awaited by every ``open`` until it is done."""
        self._conn: sqlite3.Connection | None = None
        """The store thread's connection, used only there."""
        self._loop_conn: sqlite3.Connection | None = None
        """The connection for work on an event loop, used only under ``_loop_lock``."""
        self._loop_lock = threading.Lock()
        self._checkpointer: ThreadPoolExecutor | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None
        """Used on the checkpointer's thread, or on the store's in ``_restart_wal`` while
        the checkpointer waits for it."""
        self._commits = 0
        """Commits since the last checkpoint was asked for (a count races may blur)."""
        self._checkpoint_asked = False
        self._gate = _Gate()
        """Shut while a checkpoint holds this process's writers back."""
        self._batches: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        """The writes waiting for each loop's next turn (each loop touches its own)."""
        self._flushing: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Open the file (creating it and its folder if missing), tune it, and bring the
        schema to the latest version. Idempotent, and safe to race from several threads:
        one set of connections is opened, and every caller waits until it is."""
        with self._lock:
            executor, opening = self._executor, self._opening
            if executor is None or opening is None:
                executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backlane-sqlite")
                opening = executor.submit(self._guarded, self._connect)
                self._executor, self._opening = executor, opening
        try:
            await asyncio.shield(asyncio.wrap_future(opening))
        except BaseException:
            if opening.done() and opening.exception() is not None:  # not merely cancelled
                with self._lock:
                    if self._opening is opening:
                        self._executor = self._opening = None
                executor.shutdown(wait=False)
            raise

    async def close(self) -> None:
        """Close the connections once the work already asked for is done. Idempotent."""
        with self._lock:
            executor, checkpointer = self._executor, self._checkpointer
            self._executor = self._opening = self._checkpointer = None
        if checkpointer is not None:
            try:
                closing = checkpointer.submit(self._close_checkpoint_conn)
                await asyncio.shield(asyncio.wrap_future(closing))
            finally:
                checkpointer.shutdown(wait=False)
        if executor is None:
            return
        try:
            closing = executor.submit(self._guarded, self._disconnect)
            await asyncio.shield(asyncio.wrap_future(closing))
        finally:
            executor.shutdown(wait=False)

    async def on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` on the store's thread, outside any explicit
        transaction, with SQLite errors as ``StoreError``."""
        executor = self._executor
        if executor is None:
            raise StoreError(f"the store {self.url} is not open; await store.open() first")
        call: Callable[[], T] = functools.partial(self._guarded, self._on_connection, fn, *args)
        try:
            future = asyncio.get_running_loop().run_in_executor(executor, call)
        except RuntimeError as exc:  # shut down by a close() racing this call
            raise StoreError(f"the store {self.url} is closed") from exc
        return await future

    async def write_on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` in one ``BEGIN IMMEDIATE`` transaction on the store's
        thread: for transactions whose size the caller does not bound."""
        return await self.on_thread(self._transaction, fn, *args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` in one ``BEGIN IMMEDIATE`` transaction: here, on the
        running loop, when it can start at once, else on the store's thread; in the batch
        waiting for this loop's next turn, if there is one. ``fn`` must change nothing but
        the database (it may be rolled back and run again) and fail alone (an exception it
        raises undoes its own work only).

        A caller cancelled before the write may have begun stores nothing; once it may
        have, the caller waits for its outcome and gets it (the cancellation takes effect
        at its next checkpoint), so that it always knows what it stored."""
        if self._batches:  # some loop has a batch waiting: this one, perhaps
            loop = asyncio.get_running_loop()
            batch = self._batches.get(loop)
            if batch is not None:
                return await _to_the_end(self._join(loop, batch, fn, args))
        result = self._write_here(fn, args)  # no await: nothing can cancel it
        if result is _HELD:
            await self._gate.opened(BUSY_TIMEOUT_MS / 1000)
            result = self._write_here(fn, args)
        if isinstance(result, _NotHere):
            return await _to_the_end(self.write_on_thread(fn, *args))
        return result

    async def write_soon(self, fn: Callable[..., T], *args: Any) -> T:
        """As ``write``, at this loop's next turn, in one transaction with every other write
        asked for on this loop until then."""
        loop = asyncio.get_running_loop()
        batch = self._batches.get(loop)
        if batch is None:
            batch = self._batches[loop] = []
            loop.call_soon(self._flush, loop, batch)
        return await self._join(loop, batch, fn, args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` for a short read: here when the loop's connection is
        free, else on the store's thread."""
        result = self._read_here(fn, args)
        if isinstance(result, _NotHere):
            return await self.on_thread(fn, *args)
        return result

    # -- on the running loop --------------------------------------------------------------

    def _write_here(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T | _NotHere:
        if not self._gate.is_open():
            return _HELD
        if not self._loop_lock.acquire(blocking=False):
            return _BUSY
        try:
            conn = self._loop_conn
            if conn is None:  # opening, closing or closed: the thread's path says which
                return _BUSY
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn, *args)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                if _is_busy(exc):
                    return _BUSY
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc
            self._committed()
            return result
        finally:
            self._loop_lock.release()

    def _read_here(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T | _NotHere:
        if not self._loop_lock.acquire(blocking=False):
            return _BUSY
        try:
            conn = self._loop_conn
            if conn is None:
                return _BUSY
            try:
                return fn(conn, *args)
            except sqlite3.Error as exc:
                if _is_busy(exc):
                    return _BUSY
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc
        finally:
            self._loop_lock.release()

    def _committed(self) -> None:
        self._commits += 1
        if self._commits < CHECKPOINT_EVERY:
            return
        self._commits = 0
        with self._lock:
            if self._executor is None or self._checkpoint_asked:  # closing, or on its way
                return
            self._checkpoint_asked = True
            if self._checkpointer is None:
                self._checkpointer = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="backlane-sqlite-checkpoint"
                )
            checkpointer = self._checkpointer
            try:
                checkpointer.submit(self._checkpoint)
            except RuntimeError:  # shut down by a racing close()
                self._checkpoint_asked = False

    async def _join(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Pending],
        fn: Callable[..., T],
        args: tuple[Any, ...],
    ) -> T:
        future: asyncio.Future[T] = loop.create_future()
        batch.append(_Pending(fn, args, future))
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        if self._batches.get(loop) is batch:
            del self._batches[loop]
        try:
            outcomes = self._write_here(self._run_batch, (batch,))
        except BaseException as exc:
            _settle_all(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if isinstance(outcomes, _NotHere):
            task = loop.create_task(self._flush_elsewhere(batch, outcomes))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
            return
        _settle_batch(batch, outcomes)

    async def _flush_elsewhere(self, batch: list[_Pending], why: _NotHere) -> None:
        """A batch that could not run at its turn: after the checkpoint that held it, or
        on the store's thread."""
        try:
            outcomes: list[tuple[bool, Any]] | _NotHere = why
            if why is _HELD:
                await self._gate.opened(BUSY_TIMEOUT_MS / 1000)
                outcomes = self._write_here(self._run_batch, (batch,))
            if isinstance(outcomes, _NotHere):
                outcomes = await self.write_on_thread(self._run_batch, batch)
        except BaseException as exc:
            _settle_all(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        _settle_batch(batch, outcomes)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Pending]) -> list[tuple[bool, Any]]:
        """Each write of ``batch`` in turn; one that fails is undone alone. The writes run
        one after another under one savepoint; only if one fails is that undone and the
        batch run again with a savepoint around each write (two statements a write fewer
        when none fails, as is usual)."""
        if len(batch) == 1:  # its failure is the transaction's
            pending = batch[0]
            return [(True, pending.fn(conn, *pending.args))]
        conn.execute("SAVEPOINT backlane_batch")  # COMMIT releases it
        try:
            return [(True, pending.fn(conn, *pending.args)) for pending in batch]
        except Exception:
            conn.execute("ROLLBACK TO backlane_batch")
        return self._run_apart(conn, batch)

    def _run_apart(self, conn: sqlite3.Connection, batch: list[_Pending]) -> list[tuple[bool, Any]]:
        """Each write of ``batch`` in turn, each under a savepoint of its own."""
        outcomes: list[tuple[bool, Any]] = []
        for pending in batch:
            conn.execute("SAVEPOINT backlane_write")
            try:
                value = pending.fn(conn, *pending.args)
            except Exception as exc:
                conn.execute("ROLLBACK TO backlane_write")
                conn.execute("RELEASE backlane_write")
                if isinstance(exc, sqlite3.Error):
                    exc = StoreError(f"SQLite store {self.path}: {exc}")
                outcomes.append((False, exc))
                continue
            conn.execute("RELEASE backlane_write")
            outcomes.append((True, value))
        return outcomes

    # -- on the store's thread ------------------------------------------------------------

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {exc}") from exc

    def _on_connection(self, fn: Callable[..., T], *args: Any) -> T:
        if self._conn is None:
            raise StoreError(f"the store {self.url} is closed")
        return fn(self._conn, *args)

    def _transaction(self, conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
        self._begin(conn)
        try:
            result = fn(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._committed()
        return result

    def _begin(self, conn: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE``, trying again every few hundred microseconds while another
        connection holds the write lock, for up to ``BUSY_TIMEOUT_MS``. SQLite's own busy
        handler sleeps 1, 2, 5, ... then 100 ms between tries: too coarse to win the short
        gaps between the transactions of a busy process (its loop writes back to back)."""
        timeout = BUSY_TIMEOUT_MS / 1000
        deadline = time.monotonic() + timeout
        self._gate.wait(timeout)
        delay = 0.0001
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc) or time.monotonic() > deadline:
                        raise
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, _BUSY_POLL_MAX)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def _connect(self) -> None:
        in_memory = self.path == ":memory:"
        if not in_memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = self._new_connection(BUSY_TIMEOUT_MS)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            migrate(conn, self.path)
            # One in-memory database per connection: there, everything runs on the thread.
            loop_conn = None if in_memory else self._new_connection(0)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        with self._loop_lock:
            self._loop_conn = loop_conn

    def _new_connection(self, busy_timeout_ms: int) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        except BaseException:
            conn.close()
            raise
        return conn

    def _disconnect(self) -> None:
        with self._loop_lock:  # waits for a loop in the middle of a transaction
            loop_conn, self._loop_conn = self._loop_conn, None
        conn, self._conn = self._conn, None
        try:
            if loop_conn is not None:
                loop_conn.close()
        finally:
            if conn is not None:
                conn.close()

    # -- on the checkpointer's thread -----------------------------------------------------

    def _checkpoint(self) -> None:
        try:
            _, frames, _ = (
                self._checkpoint_conn_here().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            )
            if frames >= RESTART_FRAMES:
                with self._lock:
                    executor = self._executor
                if executor is not None:
                    executor.submit(self._restart_wal).result()
        except (sqlite3.Error, RuntimeError) as exc:  # RuntimeError: closed meanwhile
            log.warning("SQLite store %s: checkpoint failed (%s); will try again", self.path, exc)
        finally:
            self._checkpoint_asked = False

    def _restart_wal(self) -> None:
        """On the store's thread: copy the rest of the WAL while this process writes
        nothing, so that the next writer starts it afresh. A PASSIVE checkpoint copies what
        it can and blocks nobody, but while writers keep coming it never copies all, and
        only a writer that finds all copied starts the WAL over."""
        self._gate.shut()  # new writes wait; the thread's own are behind this task
        try:
            with self._loop_lock:  # a loop's write under way ends first
                self._checkpoint_conn_here().execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        finally:
            self._gate.reopen()

    def _checkpoint_conn_here(self) -> sqlite3.Connection:
        conn = self._checkpoint_conn
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=RESTART_WAIT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            self._checkpoint_conn = conn
        return conn

    def _close_checkpoint_conn(self) -> None:
        conn, self._checkpoint_conn = self._checkpoint_conn, None
        if conn is not None:
            conn.close()
