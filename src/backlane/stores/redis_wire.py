"""The Redis store's connection: RESP over one asyncio transport, parsed by hiredis.

Why not redis-py's asyncio client: on the machine backlane is benchmarked on, one round
trip through ``redis.asyncio.Redis`` costs about 120 µs of Python, against 20 µs for this
module, and a worker makes a round trip or two per batch of jobs. redis-py still parses the URL
and supplies the exception classes and the backoff; hiredis parses replies.

A ``Wire`` is one connection, used by every task of one event loop at once: commands are
written as they come and replies matched to them in order (pipelining), so concurrent
callers never wait for a connection. ``Wire`` reconnects by itself: a command that meets
a broken connection is sent again on a new one after a backoff
(redis-py's ``EqualJitterBackoff``: exponential, with jitter), up to ``RETRIES`` times.
A command that gets no reply within ``socket_timeout`` breaks the connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis
from redis.asyncio.connection import parse_url
from redis.backoff import EqualJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ConnectionError,
    DataError,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError,
)

RETRIES = 8
"""Tries after the first for a command that met a broken connection: with the backoff
below (0.04 s doubling up to 1 s, each wait jittered between half and all of that) a
command gives up after 2 to 4 s."""
_BACKOFF_BASE = 0.02
_BACKOFF_CAP = 1.0
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
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


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
        return cls(tls=tls, **options)

    def describe(self) -> str:
        """Where this endpoint points, for messages."""
        where = self.path if self.path else f"{self.host}:{self.port}"
        return f"{where} db {self.db}"


class TLSRefused(ConnectionError):
    """The TLS handshake failed (a certificate not trusted, a name that does not match):
    trying again would not help."""


def _ssl_context(endpoint: Endpoint) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=endpoint.ssl_ca_certs)
    context.check_hostname = endpoint.ssl_check_hostname and endpoint.ssl_cert_reqs != "none"
    context.verify_mode = _CERT_REQS[endpoint.ssl_cert_reqs]
    if endpoint.ssl_certfile:
        context.load_cert_chain(endpoint.ssl_certfile, endpoint.ssl_keyfile)
    return context


def _error(reply: hiredis.ReplyError) -> RedisError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith("LOADING"):
        return BusyLoadingError(message)
    if message.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return AuthenticationError(message)
    return ResponseError(message)


class _Protocol(asyncio.Protocol):
    """One connection: replies go to the waiting futures in order, or, once ``push`` is
    set (subscribed), each batch of replies to ``push``."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.push: Callable[[list[Any]], None] | None = None
        self.received = time.monotonic()
        """When data last came (monotonic)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but behave as one
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        if self.push is not None:
            self.received = time.monotonic()
        pushed: list[Any] = []
        try:
            while (reply := reader.gets()) is not False:
                if self.push is not None:
                    pushed.append(reply)
                    continue
                fut = self.waiting.popleft()[0]
                if fut.done():
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    fut.set_exception(_error(reply))
                else:
                    fut.set_result(reply)
        except (hiredis.ProtocolError, UnicodeDecodeError, IndexError) as exc:
            self.abort(ConnectionError(f"unreadable reply from Redis: {exc}"))
            return
        if pushed and self.push is not None:
            self.push(pushed)

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionError(f"connection to Redis lost{f': {exc}' if exc else ''}")
        self._fail(error)

    def abort(self, error: Exception) -> None:
        """Break the connection, failing every command waiting on it with ``error``."""
        self._fail(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: Exception) -> None:
        while self.waiting:
            fut = self.waiting.popleft()[0]
            if not fut.done():
                fut.set_exception(error)
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        transport = self.transport
        if transport is None or transport.is_closing() or self.lost.done():
            raise ConnectionError("connection to Redis is closed")
        try:
            data = hiredis.pack_command(args)
        except (UnicodeEncodeError, TypeError) as exc:  # before any reply is expected
            raise DataError(f"cannot send this to Redis: {exc}") from exc
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append((fut, time.monotonic()))
        transport.write(data)
        return fut

    def oldest(self) -> float | None:
        """When the longest-waiting command was sent (monotonic), or None."""
        return self.waiting[0][1] if self.waiting else None


async def _open(endpoint: Endpoint) -> _Protocol:
    """A new, authenticated connection on the current loop."""
    loop = asyncio.get_running_loop()
    try:
        if endpoint.path:
            connecting = loop.create_unix_connection(_Protocol, endpoint.path)
        else:
            tls = _ssl_context(endpoint) if endpoint.tls else None
            connecting = loop.create_connection(_Protocol, endpoint.host, endpoint.port, ssl=tls)
        _, protocol = await asyncio.wait_for(connecting, endpoint.socket_connect_timeout)
    except asyncio.TimeoutError as exc:
        raise TimeoutError(f"no connection to Redis at {endpoint.describe()} in time") from exc
    except ssl.SSLError as exc:
        raise TLSRefused(f"TLS with Redis at {endpoint.describe()} failed: {exc}") from exc
    except OSError as exc:
        raise ConnectionError(f"cannot connect to Redis at {endpoint.describe()}: {exc}") from exc
    try:
        setup: list[asyncio.Future[Any]] = []
        if endpoint.password is not None:
            auth = (
                (endpoint.username, endpoint.password)
                if endpoint.username
                else (endpoint.password,)
            )
            setup.append(protocol.send(("AUTH", *auth)))
        if endpoint.db:
            setup.append(protocol.send(("SELECT", endpoint.db)))
        if endpoint.client_name:
            setup.append(protocol.send(("CLIENT", "SETNAME", endpoint.client_name)))
        for step in setup:
            await asyncio.wait_for(step, endpoint.socket_connect_timeout)
    except BaseException:
        protocol.abort(ConnectionError("connection set-up failed"))
        raise
    return protocol


_FATAL = (AuthenticationError, TLSRefused)
"""Connection errors that another try would only repeat."""


class Wire:
    """A self-healing connection shared by the tasks of one event loop (see the module's
    docstring). ``execute`` raises redis-py's exceptions: ``ConnectionError`` or
    ``TimeoutError`` once the retries are spent, ``ResponseError`` (``NoScriptError``,
    ...) for an error reply."""

    def __init__(self, endpoint: Endpoint, *, retries: int = RETRIES) -> None:
        self.endpoint = endpoint
        self.retries = retries
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply, retrying on a broken connection."""
        protocol = self._protocol
        if protocol is not None:
            try:
                return await protocol.send(args)
            except _FATAL:
                raise
            except (ConnectionError, TimeoutError) as exc:
                error: Exception = exc
            failures = 1
        else:
            failures = 0
        backoff = EqualJitterBackoff(base=_BACKOFF_BASE, cap=_BACKOFF_CAP)
        while True:
            if failures:
                if failures > self.retries:
                    raise ConnectionError(
                        f"Redis at {self.endpoint.describe()} did not answer "
                        f"({failures} tries): {error}"
                    ) from error
                await asyncio.sleep(backoff.compute(failures))
            try:
                protocol = await self.connected()
                return await protocol.send(args)
            except _FATAL:
                raise
            except (ConnectionError, TimeoutError) as exc:
                error = exc
                failures += 1

    async def connected(self) -> _Protocol:
        """The live connection, opened (once, whoever asks) if there is none."""
        protocol = self._protocol
        if protocol is not None and not protocol.lost.done():
            return protocol
        if self._closed:
            raise ConnectionError("this connection was closed")
        connecting = self._connecting
        if connecting is None:
            connecting = asyncio.get_running_loop().create_future()
            self._connecting = connecting
            try:
                protocol = await _open(self.endpoint)
            except BaseException as exc:
                self._connecting = None
                connecting.set_exception(exc)
                connecting.exception()  # retrieved: no "never retrieved" warning
                raise
            self._connecting = None
            if self._closed:
                protocol.abort(ConnectionError("this connection was closed"))
                connecting.set_exception(ConnectionError("this connection was closed"))
                connecting.exception()
                raise ConnectionError("this connection was closed")
            self._protocol = protocol
            self._arm_watchdog()
            connecting.set_result(protocol)
            return protocol
        return await asyncio.shield(connecting)

    def _arm_watchdog(self) -> None:
        limit = self.endpoint.socket_timeout
        if limit is None or self._watchdog is not None:
            return
        loop = asyncio.get_running_loop()

        def check() -> None:
            self._watchdog = None
            protocol = self._protocol
            if self._closed or protocol is None:
                return
            sent = protocol.oldest()
            if sent is not None and time.monotonic() - sent > limit:
                protocol.abort(TimeoutError(f"no reply from Redis within {limit}s"))
            self._watchdog = loop.call_later(min(1.0, limit / 2), check)

        self._watchdog = loop.call_later(min(1.0, limit / 2), check)

    async def close(self) -> None:
        """Close the connection; commands waiting on it fail. Idempotent."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(protocol.lost), 1.0)


async def subscribe(
    endpoint: Endpoint, channel: str, on_messages: Callable[[list[Any]], None]
) -> _Protocol:
    """A new connection subscribed to ``channel``; every batch of replies that arrives
    after (the subscription's confirmation included) goes to ``on_messages``."""
    protocol = await _open(endpoint)
    protocol.push = on_messages
    command: tuple[Any, ...] = ("SUBSCRIBE", channel)
    assert protocol.transport is not None
    protocol.transport.write(hiredis.pack_command(command))
    return protocol
