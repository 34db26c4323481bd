"""The PostgreSQL store's link to the server: connections on each event loop that uses
the store, a listening connection on an event loop of its own, and the signal that wakes
waiting workers.

A psycopg connection belongs to the event loop it was opened on, while a store may be used
from several loops at once (FastAPI's TestClient runs the app on a portal thread; tests
call ``asyncio.run`` on threads). So each loop gets a ``Site``: a small pool of its own,
with no background task (``psycopg_pool``'s maintenance tasks, cancelled when
``asyncio.run`` ends a loop, would leave it hanging). A verb runs on its caller's loop,
with no hop to another thread: a hop costs a GIL hand-over each way, which on a busy
machine was most of a verb's time. A site is closed by ``close``, or, when its loop ends
first, by the loop's own shutdown (``asyncio.run`` closes async generators before it
closes the loop, and each site parks one there for the purpose).

A verb runs as a task of its own that its caller awaits shielded: once started, it runs to
its end even if its caller stops waiting, and ``close`` lets verbs in flight finish. Only
the end of the verb's own loop cuts it off: its transaction is then rolled back and its
connection closed. The listener (LISTEN) lives on a daemon thread's loop for the store's
whole life, whichever loops come and go; it announces work through a ``WorkSignal``,
with the time it becomes due when the notification gives one (work queued to run later).

A verb rides out a short outage (a restart, a failover, its session ended by
``pg_terminate_backend``) as the Redis store's do: when the server cannot be reached, it
tries again on a new connection after a backoff, for 2 to 4 s in all (``RETRIES``, and
no new try after ``RETRY_FOR`` seconds), then raises ``StoreError``. A connect waits at
most ``connect_timeout`` seconds (the URL's, or 10). A server that answers with a refusal
(no such database or role, a password refused) is not tried again; ``connect`` tells one
from an outage by the server's SQLSTATE, whatever the language of its messages. A verb
whose connection broke after it was sent may have taken effect: only a verb that gives the
same effect and the same answer when sent twice (``run_repeatable``) is sent again; any
other raises ``StoreError`` at once, saying so.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import logging
import math
import os
import random
import re
import select
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql as pg_sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..exceptions import StoreError
from .postgres_schema import PostgresSettings, check_version, latest_version, migrate

log = logging.getLogger("backlane.postgres")

T = TypeVar("T")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

_DEADLOCK_ATTEMPTS = 3
RETRIES = 8
"""Tries after the first for a verb that could not reach the server: with the backoff
below (0.04 s doubling up to 1 s, each wait jittered between half and all of that) a verb
gives up after 2 to 4 s, as the Redis store's commands do."""
RETRY_FOR = 5.0
"""Seconds after a verb's first try past which it is not tried again: the bound that
matters when tries are slow (each connect waiting its ``connect_timeout``), where
``RETRIES`` bounds quick ones. A verb thus gives up within ``RETRY_FOR`` plus one
connect's timeout."""
_BACKOFF_BASE = 0.02
_BACKOFF_CAP = 1.0
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03"})
"""SQLSTATEs of a session the server ended or would not start yet: administrator command
(``pg_terminate_backend``, a fast shutdown), crash, and "the database system is starting
up" (or shutting down)."""
_PING_TIMEOUT = 2
"""Seconds the ping after a failed connect may take (libpq's least ``connect_timeout``):
the server has just answered; one that does not answer it in time counts as away."""
_SEVERAL_TRIED = "Multiple connection attempts failed"
"""What psycopg's error says when a connect tried several servers or addresses."""
_SERVER_ERROR = re.compile(r"\S:  ")
"""How libpq writes an error the server sent (``"%s:  "``: its severity, in the server's
language, a colon and two spaces), in whatever language; its own messages have no such
double space."""
_LISTEN_RETRY_MAX = 5.0
_CLOSE_GRACE = 10.0
"""Seconds ``close`` waits for verbs in flight before closing their connections."""


def _waited(connect_timeout: int) -> str:
    """How long libpq waits for one connect given ``connect_timeout``: 2 s at the least,
    and 0 means no limit of its own (psycopg's, 130 s)."""
    return f"{max(connect_timeout, 2)} s" if connect_timeout > 0 else "0: psycopg's 130 s"


def store_error(settings: PostgresSettings, exc: psycopg.Error) -> StoreError:
    """The ``StoreError`` for a driver error, saying what to check when it can."""
    if isinstance(exc, pg_errors.ConnectionTimeout):
        return StoreError(
            f"PostgreSQL store (schema {settings.schema}): cannot connect to PostgreSQL: "
            f"no answer within connect_timeout ({_waited(settings.connect_timeout)}); is the "
            "host right, is the server up, and may this machine reach its port?"
        )
    if isinstance(exc, pg_errors.UndefinedTable):
        return StoreError(
            f"PostgreSQL store: {exc}; is the connection to the store's database, and "
            f"was the schema {settings.schema!r} migrated?"
        )
    if isinstance(exc, pg_errors.ProgramLimitExceeded):  # an index entry over its limit
        return StoreError(
            f"PostgreSQL store (schema {settings.schema}): {exc}; an idempotency key or a "
            "queue name that long cannot be indexed: keep each under 2,000 bytes (a key "
            "can be a hash of a longer one)"
        )
    return StoreError(f"PostgreSQL store (schema {settings.schema}): {exc}")


class Site:
    """One event loop's connections: a small pool with no task of its own (a pool that ran
    maintenance tasks would be cancelled, then left hanging, when ``asyncio.run`` ends its
    loop), and the verbs in flight on it.

    A connection is made when a verb needs one and none is idle, at most ``size`` at once;
    it goes back to the idle ones after the verb unless it is closed, broken, or left in a
    transaction (a verb cut off halfway), in which case it is closed. An idle one the
    server ended meanwhile (a restart, ``pg_terminate_backend``, ``idle_session_timeout``)
    is closed, not handed to a verb."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: PostgresSettings) -> None:
        self.loop = loop
        self.settings = settings
        self.idle: collections.deque[psycopg.AsyncConnection[Any]] = collections.deque()
        self.slots = asyncio.Semaphore(settings.pool_size)
        self.in_flight: set[asyncio.Task[Any]] = set()
        self.watch: AsyncGenerator[None, None] | None = None
        self.closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of this loop, for one verb."""
        async with self.slots:
            conn = None
            while self.idle and conn is None:
                conn = self.idle.pop()
                if _ended_by_server(conn):
                    await _close_quietly(conn)
                    conn = None
            if conn is None:
                conn = await connect(self.settings)
            try:
                yield conn
            finally:
                status = conn.info.transaction_status
                if self.closed or conn.closed or status != psycopg.pq.TransactionStatus.IDLE:
                    await _close_quietly(conn)
                else:
                    self.idle.append(conn)

    async def aclose(self) -> None:
        """Let verbs in flight end their transactions, then close the idle connections.
        Idempotent."""
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=_CLOSE_GRACE)
        self.closed = True
        while self.idle:
            await _close_quietly(self.idle.pop())

    def drop(self) -> None:
        """Close the idle connections from outside the loop (which is not running: idle
        between two runs, or closed) without awaiting anything."""
        self.closed = True
        while self.idle:
            with contextlib.suppress(Exception):
                self.idle.pop().pgconn.finish()


def _ended_by_server(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether the server ended idle connection ``conn``: it has something to read (the
    server's farewell, or the end of the stream), where an idle connection of a pool that
    listens for nothing is sent nothing. Costs no round trip."""
    if conn.closed:
        return True
    try:
        fd = conn.fileno()
        if hasattr(select, "poll"):  # any descriptor, where select() stops at FD_SETSIZE
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


class Refused(psycopg.OperationalError):
    """A connect the server answered with a refusal of this client (no such database or
    role, a password refused, no room for another session): trying again will not help.
    Its message is the driver's."""


async def connect(
    settings: PostgresSettings, application_name: str | None = None
) -> psycopg.AsyncConnection[Any]:
    """A new connection to the store's database, in autocommit mode, waiting at most
    ``connect_timeout`` seconds. Raises ``Refused`` when the server answered with a
    refusal, any other ``psycopg.OperationalError`` when it could not be reached for now
    (refused, reset, timed out, starting up or shutting down): only the second is worth
    another try.

    libpq reports neither the SQLSTATE nor, in words that do not depend on the
    language, whether the server answered. So after a connect the server answered with
    an error, a ping (``PQping``) asks it again: libpq then tells "starting up or
    shutting down" (SQLSTATE 57P03) and "no answer" apart from "answers" by the SQLSTATE
    it received. A server that answers is asked for a connection once more (it may have
    just come back); a failure then, if the server answered it too, is a refusal. What a
    ping cannot see counts as an outage, tried again for up to ``RETRY_FOR`` seconds
    before its ``StoreError``: a refusal libpq itself makes after the server answered,
    with no error from the server and no password asked (``require_auth`` or
    ``channel_binding`` not met), and any failed connect to a URL naming several servers
    (a failover list, where one may refuse while another starts up). The ping runs only
    for a URL naming one server that has just answered: psycopg's C build holds the GIL
    while it runs (up to ``_PING_TIMEOUT`` seconds, if the server went silent meanwhile)."""
    name = settings.application_name if application_name is None else application_name
    try:
        return await _connect_once(settings, name)
    except psycopg.OperationalError as exc:
        if not (_maybe_refused(settings, exc) and await _server_answers(settings, name)):
            raise
    try:  # the server answers the ping: it may have just come back
        return await _connect_once(settings, name)
    except psycopg.OperationalError as exc:
        if not _maybe_refused(settings, exc):
            raise
        raise Refused(str(exc), pgconn=exc.pgconn) from exc


async def _connect_once(settings: PostgresSettings, name: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        settings.conninfo, autocommit=True, application_name=name
    )


def _maybe_refused(settings: PostgresSettings, exc: psycopg.OperationalError) -> bool:
    """Whether the failed connect that raised ``exc`` may have been a refusal: one server
    tried, and it answered (a connect that timed out heard nothing)."""
    return (
        not isinstance(exc, pg_errors.ConnectionTimeout)
        and _one_server(settings, exc)
        and _server_answered(exc)
    )


def _one_server(settings: PostgresSettings, exc: psycopg.OperationalError) -> bool:
    """Whether the connect that raised ``exc`` tried one server. With several (a failover
    list in the URL or in ``PGHOST``, a name with several addresses, a service file that
    may list any), one may refuse while another starts up or shuts down, and a ping that
    one answers tells nothing of the others: a failed connect then always counts as an
    outage."""
    if _SEVERAL_TRIED in str(exc):  # psycopg's own words, whatever the server's language
        return False
    params = conninfo_to_dict(settings.conninfo)
    if params.get("service") or os.environ.get("PGSERVICE"):
        return False
    return not any(
        "," in str(params.get(key) or os.environ.get(variable) or "")
        for key, variable in (("host", "PGHOST"), ("hostaddr", "PGHOSTADDR"), ("port", "PGPORT"))
    )


def _server_answered(exc: psycopg.OperationalError) -> bool:
    """Whether the failed connect that raised ``exc`` may have heard from the server: an
    error it sent, or a password it asked for. (A connect refused, reset or timed out did
    not: asking again then would only wait, holding the GIL in psycopg's C build.)"""
    pgconn = exc.pgconn
    asked = pgconn is not None and (pgconn.needs_password or pgconn.used_password)
    return asked or _SERVER_ERROR.search(str(exc)) is not None


async def _server_answers(settings: PostgresSettings, application_name: str) -> bool:
    """Whether the server answers a connect now, with a session or with an error other
    than "starting up or shutting down" (libpq's ``PQping``, which reads the SQLSTATE)."""
    conninfo = make_conninfo(
        settings.conninfo, application_name=application_name, connect_timeout=_PING_TIMEOUT
    )
    ping = await asyncio.to_thread(psycopg.pq.PGconn.ping, conninfo.encode())
    return bool(ping == psycopg.pq.Ping.OK)


def _unreachable(exc: psycopg.Error) -> bool:
    """Whether ``exc``, raised by ``connect``, says the server cannot be reached for now,
    not that it refused this client: only the first is worth another try."""
    return isinstance(exc, psycopg.OperationalError) and not isinstance(exc, Refused)


def _connection_lost(exc: psycopg.Error) -> bool:
    """Whether ``exc``, raised by a statement, says its connection broke or the server
    ended its session (not that the statement failed, or was cancelled)."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in _SESSION_ENDED


def _give_up(failures: int, started: float) -> bool:
    """Whether a verb begun at ``started`` (``time.monotonic()``) that could not reach the
    server ``failures`` times is past its last try."""
    return failures > RETRIES or time.monotonic() - started > RETRY_FOR


def _gave_up(settings: PostgresSettings, exc: psycopg.Error, failures: int) -> StoreError:
    """The ``StoreError`` of a verb that could not reach the server in ``failures``
    tries, the last one failing with ``exc``."""
    if isinstance(exc, pg_errors.ConnectionTimeout):
        return StoreError(f"{store_error(settings, exc)} ({failures} tries)")
    return StoreError(
        f"PostgreSQL store (schema {settings.schema}): cannot connect to PostgreSQL, or "
        f"lost the connection ({failures} tries): {exc}"
    )


def _backoff(failures: int) -> float:
    """Seconds to wait before try ``failures + 1``: half of an exponential growth (capped),
    plus a random part up to the other half (equal jitter, as redis-py's)."""
    ceiling = min(_BACKOFF_CAP, _BACKOFF_BASE * 2.0**failures)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


async def _close_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


class PostgresLink:
    """The pools (one per event loop) and the listener of one store."""

    def __init__(self, url: str, settings: PostgresSettings) -> None:
        self.url = url
        self.settings = settings
        self._lock = threading.Lock()
        """Guards ``_runner``, ``_opening`` and ``_sites``: open, close and first uses
        may race from any thread."""
        self._runner: LoopThread | None = None
        """Runs the schema check at open, and the listener."""
        self._opening: concurrent.futures.Future[None] | None = None
        self._sites: dict[asyncio.AbstractEventLoop, Site] = {}
        self._listener: asyncio.Task[None] | None = None
        """Used on the runner's loop only."""
        self.listening = False
        """Whether announcements of work arrive now."""
        self.signal = WorkSignal()

    @property
    def is_open(self) -> bool:
        return self._runner is not None

    async def open(self) -> None:
        """Connect, bring the schema up to date (or, with ``auto_migrate=0``, check that it
        is) and start listening for work. Idempotent, and safe to race from several
        threads: the schema is checked once, and every caller waits until it is. Each
        event loop opens its own pool when it first runs a verb."""
        with self._lock:
            runner, opening = self._runner, self._opening
            if runner is None or opening is None:
                runner = LoopThread(f"backlane-postgres-{self.settings.schema}")
                opening = asyncio.run_coroutine_threadsafe(self._start(), runner.loop)
                self._runner, self._opening = runner, opening
        try:
            await asyncio.shield(asyncio.wrap_future(opening))
        except BaseException:
            if opening.done() and not opening.cancelled() and opening.exception() is not None:
                with self._lock:
                    if self._opening is opening:
                        self._runner = self._opening = None
                runner.stop()
            raise

    async def close(self) -> None:
        """Close every loop's pool once the work already asked for there is done (this
        loop's here, a running loop's on that loop; a closed loop's was closed with it),
        and stop listening. Idempotent."""
        with self._lock:
            runner, opening = self._runner, self._opening
            self._runner = self._opening = None
            sites = list(self._sites.values())
            self._sites.clear()
        if runner is None:
            return
        try:
            here = asyncio.get_running_loop()
            for site in sites:
                if site.loop is here:
                    if site.watch is not None:
                        await site.watch.aclose()
                elif site.loop.is_running() and site.watch is not None:
                    await self._close_elsewhere(site, site.watch)
                else:  # idle between runs, or closed without closing its generators
                    site.drop()
        finally:
            try:
                await runner.run(self._stop(opening))
            finally:
                runner.stop()

    async def _close_elsewhere(self, site: Site, watch: AsyncGenerator[None, None]) -> None:
        """Close ``site`` on its own running loop, waiting a while for it. That loop may be
        shutting down meanwhile (then its own shutdown closes the site): its cancellation
        is not this caller's."""
        try:
            done = asyncio.run_coroutine_threadsafe(watch.aclose(), site.loop)
        except RuntimeError:  # closed in between
            site.drop()
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), _CLOSE_GRACE + 5.0)
        except asyncio.CancelledError:
            cancelling = getattr(asyncio.current_task(), "cancelling", None)
            if cancelling is None or cancelling():  # ours (Python 3.10 cannot tell)
                raise
        except Exception:
            site.drop()

    async def migrate(self, *, check: bool = False) -> tuple[int, int]:
        """Bring the schema up to date now, whatever ``auto_migrate`` says, over a
        connection of its own (the store need not be open), creating the schema if it is
        missing. Returns (version before, version after; 0 for no schema). With
        ``check``, change nothing: raise ``StoreError`` unless it is up to date."""
        settings = self.settings
        try:
            async with await connect(settings) as conn:
                if check:
                    await check_version(conn, settings)
                    latest = latest_version()
                    return (latest, latest)
                return await migrate(conn, settings)
        except psycopg.Error as exc:
            raise store_error(self.settings, exc) from exc

    async def installed(self) -> bool:
        """Whether the schema holds backlane's tables (at any version), looked up over a
        connection of its own without creating or changing anything (the store need not
        be open)."""
        settings = self.settings
        try:
            async with await connect(settings) as conn:
                cursor = await conn.execute(
                    "SELECT to_regclass(%s) IS NOT NULL", (f"{settings.quoted_schema}.migrations",)
                )
                row = await cursor.fetchone()
                return bool(row and row[0])
        except psycopg.Error as exc:
            raise store_error(self.settings, exc) from exc

    def not_open(self) -> StoreError:
        return StoreError(f"the store {self.url} is not open; await store.open() first")

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``fn(connection, *args)`` with a connection of this loop's pool; driver errors
        as ``StoreError``. Runs to its end even if the caller stops waiting. A statement
        that lost a deadlock is tried again, and so is the whole call while the server
        cannot be reached (2 to 4 s at most); a call whose connection broke once it was
        sent is not (it may have taken effect): ``StoreError`` says so."""
        return await self._run(fn, args, repeatable=False)

    async def run_repeatable(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """As ``run``, for a call that has the same effect and the same answer when it
        runs twice (a read, or a write that sets what is already set): a call whose
        connection broke once it was sent is sent again too, within the same bounds."""
        return await self._run(fn, args, repeatable=True)

    async def _run(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], *, repeatable: bool
    ) -> T:
        if self._runner is None:
            raise self.not_open()
        loop = asyncio.get_running_loop()
        site = self._sites.get(loop)
        if site is None:
            site = await self._site_here(loop)
        task = loop.create_task(self._on_site(site, fn, *args, repeatable=repeatable))
        site.in_flight.add(task)
        task.add_done_callback(_forget(site.in_flight))
        return await asyncio.shield(task)

    async def _site_here(self, loop: asyncio.AbstractEventLoop) -> Site:
        """This loop's site, made on first use, once the schema was checked."""
        opening = self._opening
        if opening is None:
            raise self.not_open()
        if not opening.done():
            await asyncio.shield(asyncio.wrap_future(opening))
        with self._lock:
            if self._runner is None:
                raise self.not_open()
            for stale in [other for other in self._sites if other.is_closed()]:
                self._sites.pop(stale).drop()
            site = self._sites.get(loop)
            created = site is None
            if site is None:
                site = self._sites[loop] = Site(loop, self.settings)
                site.watch = self._watch(site)
        if created:
            assert site.watch is not None
            await site.watch.asend(None)
        return site

    async def _watch(self, site: Site) -> AsyncGenerator[None, None]:
        """Parked until the loop shuts down (or the store closes): then closes ``site``."""
        try:
            yield
        finally:
            with self._lock:
                if self._sites.get(site.loop) is site:
                    del self._sites[site.loop]
            await site.aclose()

    async def _on_site(
        self,
        site: Site,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        repeatable: bool,
    ) -> T:
        deadlocks = failures = 0
        started = time.monotonic()
        while True:
            sent = False
            try:
                async with site.connection() as conn:
                    sent = True
                    return await fn(conn, *args)
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                deadlocks += 1
                if deadlocks == _DEADLOCK_ATTEMPTS:
                    raise store_error(self.settings, exc) from exc
                log.debug("retrying a statement that lost a deadlock: %s", exc)
                continue
            except psycopg.Error as exc:
                if not (_connection_lost(exc) if sent else _unreachable(exc)):
                    raise store_error(self.settings, exc) from exc
                if sent and not repeatable:
                    raise StoreError(
                        f"PostgreSQL store (schema {self.settings.schema}): the connection "
                        f"was lost while this call ran, so it may have taken effect or not; "
                        f"it was not sent again (check, then try again): {exc}"
                    ) from exc
                failures += 1
                if _give_up(failures, started) or site.closed:
                    raise _gave_up(self.settings, exc, failures) from exc
                log.debug("PostgreSQL unreachable (%s); trying again", exc)
            except UnicodeEncodeError as exc:  # a lone surrogate: raised before sending
                raise StoreError(
                    f"PostgreSQL store (schema {self.settings.schema}): cannot send this to "
                    f"PostgreSQL: {exc}"
                ) from exc
            await asyncio.sleep(_backoff(failures))

    async def _start(self) -> None:
        # Runs on the runner's loop: the schema, then the listener. A server that cannot
        # be reached is waited for as the verbs wait (a migration runs in one transaction,
        # and again from where the schema is: it may be tried again).
        settings = self.settings
        failures = 0
        started = time.monotonic()
        while True:
            connected = False
            try:
                async with await connect(settings) as conn:
                    connected = True
                    if settings.auto_migrate:
                        await migrate(conn, settings)
                    else:
                        await check_version(conn, settings)
                break
            except psycopg.Error as exc:
                failures += 1
                away = _connection_lost(exc) if connected else _unreachable(exc)
                if not away:
                    raise store_error(self.settings, exc) from exc
                if _give_up(failures, started):
                    raise _gave_up(self.settings, exc, failures) from exc
                log.debug("PostgreSQL unreachable at start (%s); trying again", exc)
            await asyncio.sleep(_backoff(failures))
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _stop(self, opening: concurrent.futures.Future[None] | None) -> None:
        # Runs on the runner's loop.
        if opening is not None and not opening.done():
            with contextlib.suppress(Exception):  # its caller heard of it
                await asyncio.wrap_future(opening)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self) -> None:
        # Runs on the store's loop until cancelled: LISTEN, and announce each notification;
        # reconnect with growing pauses when the connection breaks.
        listen = pg_sql.SQL("LISTEN {}").format(pg_sql.Identifier(self.settings.channel))
        pause = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.settings.conninfo,
                    autocommit=True,
                    application_name=f"{self.settings.application_name} listen",
                ) as conn:
                    await conn.execute(listen)
                    self.listening = True
                    pause = 0.1
                    self.signal.announce()  # work may have come while we were not listening
                    async for notice in conn.notifies():
                        self.signal.announce(_due(notice.payload))
            except psycopg.Error as exc:
                log.warning(
                    "PostgreSQL store: listening for work failed (%s); polling until it "
                    "reconnects in %.1fs",
                    exc,
                    pause,
                )
            self.listening = False
            await asyncio.sleep(pause)
            pause = min(pause * 2, _LISTEN_RETRY_MAX)


_Call = tuple[list[ItemT], "asyncio.Future[list[ResultT]]"]
"""One caller's items, and the future it waits on."""


class Coalescer(Generic[ItemT, ResultT]):
    """Calls made on one event loop in one turn, run as one: ``submit(items)`` waits for
    the loop's next turn, then ``run`` gets every item submitted meanwhile, in order, and
    each caller gets the results of its own items. If the joint run fails, each caller's
    items are run again alone, so that one caller's bad item fails that caller only (a
    failure to reach the server fails them all at once). A caller that stopped waiting
    before its turn came has its items left out.

    Many requests storing their jobs at once thus share one statement and one commit
    (group commit), where each would otherwise wait for a pooled connection and a disk
    flush of its own."""

    def __init__(self, run: Callable[[list[ItemT]], Awaitable[list[ResultT]]]) -> None:
        self._run = run
        self._pending: dict[asyncio.AbstractEventLoop, list[_Call[ItemT, ResultT]]] = {}
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, items: list[ItemT]) -> list[ResultT]:
        loop = asyncio.get_running_loop()
        batch = self._pending.get(loop)
        if batch is None:
            batch = self._pending[loop] = []
            loop.call_soon(self._flush, loop, batch)
        future: asyncio.Future[list[ResultT]] = loop.create_future()
        batch.append((items, future))
        return await future

    def _flush(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Call[ItemT, ResultT]],
    ) -> None:
        if self._pending.get(loop) is batch:
            del self._pending[loop]
        task = loop.create_task(self._run_batch(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_batch(self, batch: list[_Call[ItemT, ResultT]]) -> None:
        batch = [call for call in batch if not call[1].cancelled()]  # callers gone: no work
        try:
            if len(batch) > 1:
                joint = [item for items, _ in batch for item in items]
                try:
                    results = await self._run(joint)
                except Exception as exc:
                    if isinstance(exc.__cause__, psycopg.OperationalError):
                        raise  # the server, not an item: running each alone would not help
                else:
                    start = 0
                    for items, future in batch:
                        if not future.done():
                            future.set_result(results[start : start + len(items)])
                        start += len(items)
                    return
            for items, future in batch:  # each caller's items again, alone
                if future.done():
                    continue
                try:
                    result = await self._run(items)
                except Exception as exc:
                    if not future.done():
                        future.set_exception(exc)
                else:
                    if not future.done():
                        future.set_result(result)
        except BaseException as exc:
            for _, future in batch:  # no caller waits for ever
                if not future.done():
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
            if not isinstance(exc, Exception):
                raise


class LoopClosed(RuntimeError):
    """The loop was stopped: nothing more runs on it."""


class LoopThread:
    """An event loop running on a daemon thread until ``stop``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            leftovers = asyncio.all_tasks(self.loop)
            for task in leftovers:  # nothing should be left; if something is, unwind it
                task.cancel()
            if leftovers:
                gathered = asyncio.gather(*leftovers, return_exceptions=True)
                self.loop.run_until_complete(gathered)
        finally:
            self.loop.close()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this loop and return its result. A caller cancelled meanwhile
        stops waiting at once, but ``coro`` runs to its end: a statement interrupted
        halfway would leave its connection busy, or a transaction open, on the server.
        Raises ``LoopClosed`` once the loop was stopped."""
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError as exc:  # stopped and closed by a racing stop()
            coro.close()
            raise LoopClosed(str(exc)) from exc
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            if future.cancelled():  # not the caller: the loop stopped before it ran
                raise LoopClosed("the loop stopped before the call ran") from None
            raise

    def stop(self) -> None:
        """Stop the loop once what it is running now yields, and wait for its thread.
        Call it from any thread but the loop's own."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # closed in between
            return
        self._thread.join(timeout=5.0)


@dataclasses.dataclass(frozen=True)
class _Mark:
    """What a claim noted in its context: the announcements seen before it, and when the
    earliest job it saw queued to run later becomes due (None: none, or not known yet)."""

    count: int
    due: float | None = None


class _Waiter:
    """One task waiting on a ``WorkSignal``: settled when work is announced, or, for work
    due later, told when (then it waits again, until then at the latest)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.woken = loop.create_future()
        self.now = False
        """Whether work claimable now was announced to it."""
        self.due: float | None = None
        """The earliest due time announced to it (POSIX seconds)."""

    def hear(self, due: float | None) -> None:
        """On the waiter's loop: work now (None), or work due at ``due``."""
        if due is None:
            self.now = True
        elif self.due is None or due < self.due:
            self.due = due
        _settle(self.woken)


class WorkSignal:
    """The announcements of claimable work a store has seen, and the tasks waiting for one.

    ``announce`` (from any thread) counts one more and tells every waiter: work now, or
    work due at a time. ``mark``, before a claim, notes the count in the current context,
    which tasks started from it inherit: ``wait`` there returns at once if work was
    announced since, so that a job enqueued while an empty claim ran is not missed;
    ``expect``, after the claim, notes when the earliest job it saw queued to run later is
    due, which ``wait`` there never waits past.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._waiters: set[_Waiter] = set()
        self._mark: contextvars.ContextVar[_Mark | None] = contextvars.ContextVar(
            f"backlane_work_mark_{id(self)}", default=None
        )

    def announce(self, due: float | None = None) -> None:
        """Work was announced, claimable now or (``due``, POSIX seconds) from then on:
        tell every waiter. Safe from any thread."""
        with self._lock:
            self._count += 1
            waiters = list(self._waiters)
        for waiter in waiters:
            if not waiter.loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop closed in between
                    waiter.loop.call_soon_threadsafe(waiter.hear, due)

    def mark(self) -> None:
        """Note, in the current context, the announcements seen so far."""
        with self._lock:
            self._mark.set(_Mark(self._count))

    def expect(self, due: float | None) -> None:
        """Note, in the current context, when the earliest job the claim after ``mark``
        saw queued to run later becomes due (None: there is none)."""
        mark = self._mark.get()
        if mark is not None:
            self._mark.set(dataclasses.replace(mark, due=due))

    async def wait(self, timeout: float) -> None:
        """Return at the next announcement of work claimable now, at once if work was
        announced since the ``mark`` this context holds, when work it expects or that
        was announced meanwhile becomes due, or after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop)
        with self._lock:
            mark = self._mark.get()
            if mark is not None and mark.count < self._count:
                return
            self._waiters.add(waiter)
        try:
            deadline = loop.time() + timeout
            if mark is not None and mark.due is not None:
                deadline = min(deadline, loop.time() + mark.due - time.time())
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    return
                await asyncio.wait([waiter.woken], timeout=left)
                if not waiter.woken.done():
                    return  # timed out
                if waiter.now or waiter.due is None:
                    return  # work now
                deadline = min(deadline, loop.time() + waiter.due - time.time())
                waiter.due = None
                waiter.woken = loop.create_future()
        finally:
            with self._lock:
                self._waiters.discard(waiter)
            waiter.woken.cancel()


def _forget(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    """A done-callback that drops a verb's task from ``tasks`` and marks its outcome seen
    (its caller may have stopped waiting for it)."""

    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()

    return done


def _due(payload: str) -> float | None:
    """When the work a notification announces becomes due: None for now (an empty
    payload, or one this version cannot read)."""
    try:
        due = float(payload) if payload else None
    except ValueError:
        return None
    return due if due is not None and math.isfinite(due) else None


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
