"""The Redis store's plumbing: its URL, its scripts, one connection per event loop, and the
listener that wakes waiting workers.

A connection belongs to the event loop that opened it, while a store may be used from
several loops at once (FastAPI's TestClient runs the app on a thread of its own; tests
call ``asyncio.run`` on threads). So each loop gets a ``Link``: its own ``Wire``, closed by
``RedisStore.close`` or, when the loop ends first, by the loop's own shutdown
(``asyncio.run`` closes async generators before it closes the loop, and each link parks
one there for the purpose).

Driver errors never leave this module: ``call`` and ``command`` map them to
``StoreError``. A command that meets a broken connection is retried with backoff for
2 to 4 s (``redis_wire.RETRIES``), so a Redis restart costs a caller a delay, or a
``StoreError`` if it lasts longer; the next call reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import hiredis
from redis.exceptions import NoScriptError, RedisError

from ..exceptions import ConfigurationError, StoreError
from .redis_wire import Endpoint, Wire, subscribe

log = logging.getLogger("backlane.stores.redis")

DEFAULT_PREFIX = "backlane:"
_PING = hiredis.pack_command(("PING",))
_PING_EVERY = 15.0
"""Seconds between the wake listener's pings; two periods of silence break its connection."""


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
    """A Lua script: the shared helpers (``common.lua``) followed by one verb's file."""

    name: str
    text: str
    sha: str


@functools.cache
def load_scripts() -> dict[str, Script]:
    """Every script in ``stores/lua/``, by file name without ``.lua``."""
    folder = resources.files("backlane.stores") / "lua"
    common = (folder / "common.lua").read_text(encoding="utf-8")
    scripts: dict[str, Script] = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".lua") and entry.name != "common.lua":
            text = common + entry.read_text(encoding="utf-8")
            sha = hashlib.sha1(text.encode("utf-8")).hexdigest()  # Redis names scripts by SHA1
            scripts[entry.name[:-4]] = Script(entry.name[:-4], text, sha)
    return scripts


class Wakes:
    """Counts the wake-ups published on a lane's channel, for the tasks of one loop.

    ``generation`` grows by one at each batch of messages, and at each (re)subscription
    (messages may have been missed while not subscribed). A waiter remembers the
    generation it knew and returns as soon as it changes.
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

    def _on_messages(self, replies: list[Any]) -> None:
        for reply in replies:
            if isinstance(reply, list) and reply and reply[0] in ("message", "subscribe"):
                self._bump()
                return

    async def _listen(self) -> None:
        delay = 0.05
        while True:
            try:
                protocol = await subscribe(self._url.endpoint, self._channel, self._on_messages)
            except (RedisError, OSError) as exc:
                log.debug("wake listener cannot subscribe on %s: %s", self._url.safe, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            self.connected = True
            try:
                while not protocol.lost.done():
                    await asyncio.wait([protocol.lost], timeout=_PING_EVERY)
                    if protocol.lost.done():
                        break
                    if time.monotonic() - protocol.received > 2 * _PING_EVERY:
                        protocol.abort(ConnectionError("the wake listener heard nothing"))
                        break
                    assert protocol.transport is not None
                    protocol.transport.write(_PING)
            finally:
                self.connected = False
                if protocol.transport is not None:
                    protocol.transport.abort()
            log.debug("wake listener on %s lost its connection; subscribing again", self._url.safe)


class Link:
    """What one event loop uses to reach Redis: a connection and, once a task waited for
    work there, a wake listener."""

    def __init__(self, url: RedisURL, loop: asyncio.AbstractEventLoop) -> None:
        self.url = url
        self.loop = loop
        self.wire = Wire(url.endpoint)
        self.wakes: Wakes | None = None
        self.watch: AsyncGenerator[None, None] | None = None
        self._closed = False

    def wakes_started(self) -> Wakes:
        """The wake listener of this loop, started on first use."""
        if self.wakes is None:
            self.wakes = Wakes(self.url)
        return self.wakes

    async def aclose(self) -> None:
        """Stop the listener and close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.wakes is not None:
            await self.wakes.stop()
        await self.wire.close()


class Links:
    """The ``Link`` of each event loop using one store; none while the store is closed."""

    def __init__(self, url: RedisURL) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._links: dict[asyncio.AbstractEventLoop, Link] = {}
        self.open = False

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
    """Run ``script`` by its SHA1 (sending it first when the server does not know it, as
    after a restart), with the lane's prefix as its one key."""
    wire = link.wire
    prefix = link.url.prefix
    try:
        try:
            return await wire.execute("EVALSHA", script.sha, 1, prefix, *args)
        except NoScriptError:
            await wire.execute("SCRIPT", "LOAD", script.text)
            return await wire.execute("EVALSHA", script.sha, 1, prefix, *args)
    except RedisError as exc:
        raise StoreError(f"Redis store {link.url.safe}: {exc}") from exc


async def command(link: Link, *args: str | int) -> Any:
    """The reply to one Redis command."""
    try:
        return await link.wire.execute(*args)
    except RedisError as exc:
        raise StoreError(f"Redis store {link.url.safe}: {exc}") from exc
