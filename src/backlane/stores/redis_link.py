"""The Redis store's plumbing: its URL, its scripts, one redis-py client per event loop,
and the listener that wakes waiting workers.

Connections are redis-py's (``redis.asyncio``, replies parsed by hiredis when it is
installed): TCP, TLS (``rediss://``) and unix sockets, AUTH and database selection. A
connection belongs to the event loop that opened it, while a store may be used from
several loops at once (FastAPI's TestClient runs the app on a thread of its own; tests
call ``asyncio.run`` on threads). So each loop gets a ``Link``: its own client and
connection pool, closed by ``RedisStore.close`` or, when the loop ends first, by the loop's
own shutdown (``asyncio.run`` closes async generators before it closes the loop, and each
link parks one there for the purpose).

Driver errors never leave this module: ``call`` and ``command`` map them to
``StoreError``. A command that meets a broken connection is sent again on a new one after
a backoff (redis-py's ``EqualJitterBackoff``), for 2 to 4 s in all (``RETRIES``), so a
Redis restart costs a caller a delay, or a ``StoreError`` if it lasts longer. A refused
password or TLS certificate is not tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import ssl
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.connection import Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    DataError,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError,
)

from ..exceptions import ConfigurationError, StoreError

_pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:  # a command packed in C: a few microseconds less of the caller's CPU per call
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - hiredis comes with the redis extra
    _pack_command = None

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - redis-py depends on async-timeout before 3.11.3
    from async_timeout import timeout as _timeout  # type: ignore[import-not-found,no-redef,unused-ignore]

log = logging.getLogger("backlane.stores.redis")

DEFAULT_PREFIX = "backlane:"
RETRIES = 8
"""Tries after the first for a command that met a broken connection: with the backoff
below (0.04 s doubling up to 1 s, each wait jittered between half and all of that) a
command gives up after 2 to 4 s."""
_BACKOFF_BASE = 0.02
_BACKOFF_CAP = 1.0
_PING_EVERY = 15.0
"""Seconds between the wake listener's pings; two periods of silence break its connection."""
_OPTIONS = frozenset(
    {
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "client_name",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
    }
)
"""Query parameters a store URL may carry besides ``prefix``."""
_CERT_REQS = ("none", "optional", "required")


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect, from a ``redis://``, ``rediss://`` or ``unix://`` URL."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ssl_cert_reqs: str = "required"
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    socket_timeout: float | None = 30.0
    socket_connect_timeout: float = 5.0
    client_name: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """The endpoint of ``url`` (without ``prefix``). Raises ``ValueError`` naming what
        is wrong."""
        options: dict[str, Any] = dict(parse_url(url))
        unknown = sorted(
            set(options)
            - _OPTIONS
            - {"host", "port", "path", "username", "password", "connection_class"}
        )
        if unknown:
            raise ValueError(
                f"unsupported option(s) {', '.join(unknown)}; a Redis store URL takes "
                f"prefix and {', '.join(sorted(_OPTIONS))}"
            )
        options.pop("connection_class", None)
        tls = urlsplit(url).scheme == "rediss"
        cert_reqs = options.get("ssl_cert_reqs", "required")
        if cert_reqs not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be none, optional or required, not {cert_reqs!r}")
        check = options.get("ssl_check_hostname", True)
        if isinstance(check, str):
            raise ValueError(f"ssl_check_hostname must be true or false, not {check!r}")
        for name in ("socket_timeout", "socket_connect_timeout"):
            seconds = options.get(name)  # 0 or less: every reply overdue, a watchdog spinning
            if seconds is not None and not 0 < seconds < math.inf:
                raise ValueError(f"{name} must be a number of seconds above 0, not {seconds!r}")
        return cls(tls=tls, **options)

    def describe(self) -> str:
        """Where this endpoint points, for messages."""
        where = self.path if self.path else f"{self.host}:{self.port}"
        return f"{where} db {self.db}"

    def client(self) -> Redis:
        """A redis-py client of this endpoint for the running loop: replies as text, raw
        (no redis-py reply callbacks), no retries and no read timeout of its own
        (``Link.execute`` applies both; redis-py's per-command timeout costs a task per
        call)."""
        options: dict[str, Any] = {
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_timeout": None,
            "socket_connect_timeout": self.socket_connect_timeout,
            "client_name": self.client_name,
            "decode_responses": True,
            "protocol": 2,
            "retry": Retry(NoBackoff(), 0),
        }
        if self.path:
            client = Redis(unix_socket_path=self.path, **options)
        else:
            tls: dict[str, Any] = {}
            if self.tls:
                tls = {
                    "ssl": True,
                    "ssl_cert_reqs": self.ssl_cert_reqs,
                    "ssl_ca_certs": self.ssl_ca_certs,
                    "ssl_certfile": self.ssl_certfile,
                    "ssl_keyfile": self.ssl_keyfile,
                    "ssl_check_hostname": self.ssl_check_hostname and self.ssl_cert_reqs != "none",
                }
            client = Redis(host=self.host, port=self.port, socket_keepalive=True, **tls, **options)
        client.response_callbacks.clear()
        return client


@dataclass(frozen=True)
class RedisURL:
    """A store URL taken apart: where to connect, and the lane's key prefix."""

    url: str
    endpoint: Endpoint
    prefix: str
    safe: str
    """The URL with any password hidden, for messages."""


def parse_redis_url(url: str) -> RedisURL:
    """Check a ``redis://``, ``rediss://`` or ``unix://`` URL and take out ``prefix``.

    Raises ``ConfigurationError`` saying what is wrong.
    """
    safe = hide_password(url)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"not a Redis URL: {safe!r}; write redis://host:6379/0, "
            "rediss://host:6380/0 or unix:///path/to/redis.sock?db=0"
        )
    database = "" if parts.scheme == "unix" else parts.path.strip("/")
    if database and not (database.isascii() and database.isdigit()):
        # redis-py would quietly take database 0
        raise ConfigurationError(
            f"Redis URL {safe!r}: the database {database!r} is not a number; write "
            "redis://host:6379/0"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [value for name, value in query if name == "prefix"]
    if len(prefixes) > 1:
        raise ConfigurationError(f"Redis URL {safe!r} names prefix twice")
    prefix = prefixes[0] if prefixes else DEFAULT_PREFIX
    if not prefix:
        raise ConfigurationError(
            f"Redis URL {safe!r} has an empty prefix: every key of the lane starts with "
            f"it, so give one (default {DEFAULT_PREFIX!r})"
        )
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    try:
        endpoint = Endpoint.from_url(urlunsplit(parts._replace(query=rest)))
    except ValueError as exc:
        raise ConfigurationError(f"Redis URL {safe!r}: {exc}") from exc
    return RedisURL(url=url, endpoint=endpoint, prefix=prefix, safe=safe)


def hide_password(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}"))


@dataclass(frozen=True)
class Script:
    """One verb in Lua: as a script (``text``, called by its ``sha``: the shared helpers of
    ``common.lua`` followed by the verb's file), and as the ``function`` of that name in
    the ``Library`` of every verb."""

    name: str
    text: str
    sha: str
    function: str


@dataclass(frozen=True)
class Library:
    """Every verb as one library of Redis functions (Redis 7): ``common.lua`` runs once,
    when Redis loads the library, not at each call as it does in a script. Its name (and
    its functions') carries a hash of its text, so processes running different versions
    of backlane on one Redis each call their own."""

    name: str
    text: str


_ALLOW_OOM = frozenset(
    {"purge", "delete", "page", "scan", "stats", "stats_minutes", "schedules", "workers"}
)
"""Verbs that only read or remove: as functions they run when Redis is out of memory
(``maxmemory``), as scripts do, so that purging can make room and the dashboard can look.
A function without this flag is refused whole then (a script would fail at its first
write that needs memory)."""


@functools.cache
def load_scripts() -> dict[str, Script]:
    """Every script in ``stores/lua/``, by file name without ``.lua``."""
    return _load()[0]


def library() -> Library:
    """The library of Redis functions holding every script."""
    return _load()[1]


@functools.cache
def _load() -> tuple[dict[str, Script], Library]:
    folder = resources.files("backlane.stores") / "lua"
    common = (folder / "common.lua").read_text(encoding="utf-8")
    verbs = {
        entry.name[:-4]: entry.read_text(encoding="utf-8")
        for entry in sorted(folder.iterdir(), key=lambda entry: entry.name)
        if entry.name.endswith(".lua") and entry.name != "common.lua"
    }
    digest = hashlib.sha1(common.encode("utf-8"))
    for name, body in verbs.items():
        digest.update(f"\n-- {name}\n{body}".encode())
    lib = "backlane_" + digest.hexdigest()[:16]
    parts = [f"#!lua name={lib}\n", common]
    scripts: dict[str, Script] = {}
    for name, body in verbs.items():
        text = f"{common}begin(KEYS[1])\n{body}"
        sha = hashlib.sha1(text.encode("utf-8")).hexdigest()  # Redis names scripts by SHA1
        function = f"{lib}_{name}"
        scripts[name] = Script(name, text, sha, function)
        flags = "{'allow-oom'}" if name in _ALLOW_OOM else "{}"
        parts.append(
            f"\nredis.register_function{{function_name = '{function}', flags = {flags},\n"
            f"callback = function(KEYS, ARGV)\nbegin(KEYS[1])\n{body}\nend}}\n"
        )
    return scripts, Library(lib, "".join(parts))


class Wakes:
    """Counts the wake-ups published on a lane's channel, for the tasks of one loop.

    ``generation`` grows by one at each message, and at each (re)subscription (messages
    may have been missed while not subscribed). A waiter remembers the generation it knew
    and returns as soon as it changes.
    """

    def __init__(self, url: RedisURL) -> None:
        self.generation = 0
        self.connected = False
        self._url = url
        self._channel = url.prefix + "wake"
        self._waiters: set[asyncio.Future[None]] = set()
        self._task = asyncio.get_running_loop().create_task(
            self._listen(), name=f"backlane redis wakes {url.safe}"
        )

    async def wait(self, generation: int, timeout: float) -> None:
        """Return once ``generation`` is not the current one, or after ``timeout``."""
        if self.generation != generation or timeout <= 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await asyncio.wait([fut], timeout=timeout)
        finally:
            self._waiters.discard(fut)
            fut.cancel()

    def add(self, generation: int, fut: asyncio.Future[None]) -> bool:
        """Settle ``fut`` at the next wake-up, unless ``generation`` is not the current one
        already: then False, and nothing is registered. ``discard`` undoes it."""
        if self.generation != generation:
            return False
        self._waiters.add(fut)
        return True

    def discard(self, fut: asyncio.Future[None]) -> None:
        """Forget ``fut`` (registered by ``add``)."""
        self._waiters.discard(fut)

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def _bump(self) -> None:
        self.generation += 1
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _listen(self) -> None:
        delay = 0.05
        while True:
            client = self._url.endpoint.client()
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                delay = 0.05
                heard = time.monotonic()
                while True:
                    message = await pubsub.get_message(timeout=_PING_EVERY)
                    now = time.monotonic()
                    if message is None:
                        if now - heard > 2 * _PING_EVERY:
                            raise ConnectionError("the wake listener heard nothing")
                        await pubsub.ping()
                        continue
                    heard = now
                    if message["type"] in ("message", "subscribe"):
                        self.connected = True
                        self._bump()
            except (RedisError, OSError) as exc:
                log.debug("wake listener on %s: %s; subscribing again", self._url.safe, exc)
            finally:
                self.connected = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class Link:
    """What one event loop uses to reach Redis: a client (with its pool of connections)
    and, once a task waited for work there, a wake listener."""

    def __init__(self, url: RedisURL, loop: asyncio.AbstractEventLoop) -> None:
        self.url = url
        self.loop = loop
        self.client = url.endpoint.client()
        self._own: Connection | None = None
        self._busy = False
        self._sent_at: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.wakes: Wakes | None = None
        self.functions = False
        """Whether verbs run as the library's functions (Redis 7), not as scripts."""
        self.handoffs: dict[str, asyncio.Task[None]] = {}
        """Each waiting worker's pop of the jobs handed to it (``RedisStore``)."""
        self._blocking: dict[str, Connection] = {}
        self.takes: set[asyncio.Task[None]] = set()
        """Calls under way that give handed jobs a worker took their full lease, or offer to
        take work (``RedisStore``)."""
        self.taking: dict[str, tuple[float, list[str]]] = {}
        """Jobs each worker took, with their full lease, that no call has carried yet
        (``RedisStore._took``)."""
        self.watch: AsyncGenerator[None, None] | None = None
        self._closed = False

    async def _take(self, worker_id: str, lease: float, ids: list[str]) -> None:
        with contextlib.suppress(StoreError):
            await call(self, load_scripts()["take"], worker_id, repr(lease), *ids)

    def wakes_started(self) -> Wakes:
        """The wake listener of this loop, started on first use."""
        if self.wakes is None:
            self.wakes = Wakes(self.url)
        return self.wakes

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its raw reply, sending it again on a new
        connection (after a backoff) when the connection broke or no reply came within
        ``socket_timeout``. Raises redis-py's exceptions."""
        backoff: EqualJitterBackoff | None = None
        failures = 0
        while True:
            try:
                return await self._once(args)
            except AuthenticationError:
                raise
            except UnicodeEncodeError as exc:  # raised before anything was sent
                raise DataError(f"cannot send this to Redis: {exc}") from exc
            except (ConnectionError, TimeoutError) as exc:
                if _tls_refused(exc):
                    raise ConnectionError(
                        f"TLS with Redis at {self.url.endpoint.describe()} failed: {exc}"
                    ) from exc
                failures += 1
                if failures > RETRIES or self._closed:
                    raise ConnectionError(
                        f"cannot connect to Redis at {self.url.endpoint.describe()}, or lost "
                        f"the connection ({failures} tries): {exc}"
                    ) from exc
                if backoff is None:
                    backoff = EqualJitterBackoff(base=_BACKOFF_BASE, cap=_BACKOFF_CAP)
                await asyncio.sleep(backoff.compute(failures))

    async def _once(self, args: tuple[Any, ...]) -> Any:
        """One command on the loop's own connection when it is free (a caller at a time:
        the cheapest way redis-py offers; ``_watch`` breaks it when a reply is overdue),
        else on one from the pool, under a timeout of its own."""
        limit = self.url.endpoint.socket_timeout
        if self._busy:
            try:
                if limit is None:
                    return await self.client.execute_command(*args)  # type: ignore[no-untyped-call]
                async with _timeout(limit):
                    return await self.client.execute_command(*args)  # type: ignore[no-untyped-call]
            except asyncio.TimeoutError as exc:  # the connection was closed on the way out
                raise TimeoutError(f"no reply from Redis within {limit}s") from exc
        self._busy = True
        try:
            own = self._own
            if own is None:
                own = self._own = self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
                if limit is not None:
                    self._watchdog = self.loop.call_later(min(1.0, limit / 2), self._watch)
            self._sent_at = time.monotonic()
            packed = own.pack_command(*args) if _pack_command is None else _pack_command(args)
            await own.send_packed_command(packed, check_health=False)
            return await own.read_response()  # closes the connection on any failure
        finally:
            self._sent_at = None
            self._busy = False

    async def blocking(self, owner: str, *args: Any) -> Any:
        """Send a blocking command (``BLMOVE``) on the connection of ``owner`` (one per
        waiting worker, made on first use), and return its reply, however long it takes:
        no read timeout, no retry, no pool (its checks cost a turn of the loop). Raises
        redis-py's exceptions; the connection is closed after a failure or cancellation,
        and opened again by the next call."""
        conn = self._blocking.get(owner)
        if conn is None:
            conn = self._blocking[owner] = self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            packed = conn.pack_command(*args) if _pack_command is None else _pack_command(args)
            await conn.send_packed_command(packed, check_health=False)
            return await conn.read_response()  # socket_timeout None: waits as Redis does
        except BaseException:
            await asyncio.shield(conn.disconnect(nowait=True))
            raise

    def _watch(self) -> None:
        """Break the own connection when a reply on it is overdue (``socket_timeout``);
        the call waiting for it fails with ``ConnectionError`` and is sent again."""
        limit = self.url.endpoint.socket_timeout
        if self._closed or limit is None:
            return
        sent, own = self._sent_at, self._own
        if sent is not None and own is not None and time.monotonic() - sent > limit:
            log.debug("no reply from Redis at %s within %ss", self.url.safe, limit)
            self._sent_at = None
            self.loop.create_task(own.disconnect(nowait=True))
        self._watchdog = self.loop.call_later(min(1.0, limit / 2), self._watch)

    async def aclose(self) -> None:
        """Stop the listener and close the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.wakes is not None:
            await self.wakes.stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
        taking, self.taking = self.taking, {}
        for worker_id, (lease, ids) in taking.items():  # not carried by an offer yet
            self.takes.add(self.loop.create_task(self._take(worker_id, lease, ids)))
        if self.takes:  # a few quick calls: let them land, if Redis answers
            await asyncio.wait(list(self.takes), timeout=2.0)
        for take in list(self.takes):
            take.cancel()
            with contextlib.suppress(BaseException):
                await take
        for pop in self.handoffs.values():
            pop.cancel()
            with contextlib.suppress(BaseException):
                await pop
        if self._own is not None:
            await self._own.disconnect()
        for conn in self._blocking.values():
            await conn.disconnect()
        await self.client.aclose()


def _tls_refused(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a failed TLS handshake, which another try would repeat."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Links:
    """The ``Link`` of each event loop using one store; none while the store is closed."""

    def __init__(self, url: RedisURL) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._links: dict[asyncio.AbstractEventLoop, Link] = {}
        self.open = False
        self.functions = False
        """Whether new links run verbs as the library's functions (``RedisStore.open``
        decides)."""

    async def get(self) -> Link:
        """The current loop's link, made on first use. Raises ``StoreError`` when the
        store is not open."""
        loop = asyncio.get_running_loop()
        link = self._links.get(loop)
        if link is not None:
            return link
        if not self.open:
            raise StoreError(f"the store {self.url.safe} is not open; await store.open() first")
        with self._lock:
            for stale in [other for other in self._links if other.is_closed()]:
                del self._links[stale]
            link = self._links.get(loop)
            created = link is None
            if link is None:
                link = self._links[loop] = Link(self.url, loop)
                link.functions = self.functions
                link.watch = self._watch(link)
        if created:
            assert link.watch is not None
            await link.watch.asend(None)
        return link

    async def _watch(self, link: Link) -> AsyncGenerator[None, None]:
        """Parked until the loop shuts down (or the store closes): then closes ``link``."""
        try:
            yield
        finally:
            with self._lock:
                if self._links.get(link.loop) is link:
                    del self._links[link.loop]
            await link.aclose()

    async def close(self) -> None:
        """Close every loop's link: this loop's here, a running loop's on that loop (a
        closed loop's was closed with it)."""
        with self._lock:
            self.open = False
            links = list(self._links.values())
            self._links.clear()
        here = asyncio.get_running_loop()
        for link in links:
            watch = link.watch
            if watch is None:
                continue
            if link.loop is here:
                await watch.aclose()
            elif link.loop.is_running():
                done = asyncio.run_coroutine_threadsafe(watch.aclose(), link.loop)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.wrap_future(done), timeout=5.0)


async def call(link: Link, script: Script, *args: str | int) -> Any:
    """Run ``script`` with the lane's prefix as its one key: as a function of the library
    when the link uses them (loading the library again when the server does not know it,
    as after a restart without persistence), else as a script by its SHA1 (sending it
    first when the server does not know it)."""
    prefix = link.url.prefix
    try:
        if link.functions:
            try:
                return await link.execute("FCALL", script.function, 1, prefix, *args)
            except ResponseError as exc:
                if "Function not found" in str(exc):
                    await load_library(link)
                    return await link.execute("FCALL", script.function, 1, prefix, *args)
                if not str(exc).startswith("unknown command"):
                    raise
                link.functions = False  # a Redis older than 7 now: scripts from here on
        try:
            return await link.execute("EVALSHA", script.sha, 1, prefix, *args)
        except NoScriptError:
            await link.execute("SCRIPT", "LOAD", script.text)
            return await link.execute("EVALSHA", script.sha, 1, prefix, *args)
    except RedisError as exc:
        raise StoreError(f"Redis store {link.url.safe}: {exc}") from exc


async def load_library(link: Link) -> None:
    """Load the library of functions (the same text again is harmless). Raises redis-py's
    exceptions: ``ResponseError`` when Redis has no functions (before 7.0) or refuses
    them (ACL)."""
    await link.execute("FUNCTION", "LOAD", "REPLACE", library().text)


async def command(link: Link, *args: str | int) -> Any:
    """The reply to one Redis command."""
    try:
        return await link.execute(*args)
    except RedisError as exc:
        raise StoreError(f"Redis store {link.url.safe}: {exc}") from exc
