"""The PostgreSQL store through a short outage: verbs wait for the server to come back
(2 to 4 s at most, as the Redis store does), a verb whose connection was cut mid-way is
sent again only when sending it twice does no harm, and a longer outage is a
``StoreError`` — on the real server, reached through a TCP relay the test can cut."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import psycopg
import pytest

from backlane.exceptions import StoreError
from backlane.jobs import JobState
from backlane.stores.postgres import PostgresStore
from tests.services import POSTGRES_URL, store_url
from tests.stores.test_contract import LEASE, NOW, make_job

pytestmark = pytest.mark.anyio

S = JobState


class Relay:
    """Forwards TCP connections from a loopback port to PostgreSQL. ``cut`` closes every
    connection and refuses new ones (the server is away); ``resume`` accepts them again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.resume()

    def resume(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    @property
    def accepting(self) -> bool:
        return self._listener is not None

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._sockets |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def relay() -> Iterator[Relay]:
    parts = urlsplit(POSTGRES_URL)
    relay = Relay((parts.hostname or "127.0.0.1", parts.port or 5432))
    try:
        yield relay
    finally:
        relay.cut()


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    with store_url("postgres", tmp_path) as url:
        yield url


def through(url: str, relay: Relay) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")
    user = netloc[0] + "@" if netloc[1] else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{relay.port}"))


@pytest.fixture
async def relayed(pg_url: str, relay: Relay) -> AsyncIterator[PostgresStore]:
    """A store whose connections go through ``relay``."""
    store = PostgresStore(through(pg_url, relay))
    await store.open()
    try:
        yield store
    finally:
        if not relay.accepting:
            relay.resume()
        await store.close()


async def test_verbs_during_a_short_outage_wait_and_succeed(
    relayed: PostgresStore, relay: Relay
) -> None:
    (job,) = await relayed.enqueue([make_job()])
    for verb in (
        lambda: relayed.get(job.id),
        lambda: relayed.enqueue([make_job()]),  # not sent before the server was back
        lambda: relayed.claim(worker_id="w", queues=None, limit=1, now=NOW, lease_until=NOW + 1),
    ):
        relay.cut()
        back = threading.Timer(0.5, relay.resume)
        back.start()
        started = time.monotonic()
        assert await verb()
        assert time.monotonic() - started >= 0.4
        back.join()
    assert await relayed.counts() == {"default": {S.QUEUED: 1, S.RUNNING: 1}}


async def test_a_longer_outage_is_a_store_error_within_a_few_seconds(
    relayed: PostgresStore, relay: Relay
) -> None:
    (job,) = await relayed.enqueue([make_job()])
    relay.cut()
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL"):
        await relayed.get(job.id)
    assert 1.5 < time.monotonic() - started < 6.0
    relay.resume()
    assert await relayed.get(job.id) == job  # reconnects by itself


async def test_a_store_opened_during_a_short_outage_waits_for_the_server(
    pg_url: str, relay: Relay
) -> None:
    """An app or worker starting while PostgreSQL restarts: ``open`` (the schema, the
    listener) waits for it as the verbs do, instead of failing at once."""
    relay.cut()
    back = threading.Timer(0.5, relay.resume)
    back.start()
    store = PostgresStore(through(pg_url, relay))
    started = time.monotonic()
    try:
        await store.open()
        assert time.monotonic() - started >= 0.4
        (job,) = await store.enqueue([make_job()])
        assert await store.get(job.id) == job
    finally:
        back.join()
        await store.close()


async def test_a_store_opened_during_a_longer_outage_fails_within_a_few_seconds(
    pg_url: str, relay: Relay
) -> None:
    relay.cut()
    store = PostgresStore(through(pg_url, relay))
    started = time.monotonic()
    with pytest.raises(StoreError):
        await store.open()
    assert 1.5 < time.monotonic() - started < 6.0


async def test_a_store_the_server_refuses_fails_to_open_at_once() -> None:
    """A refusal (no such database) is no outage: nothing to wait for."""
    parts = urlsplit(POSTGRES_URL)
    store = PostgresStore(urlunsplit(parts._replace(path="/no_such_database_backlane")))
    started = time.monotonic()
    with pytest.raises(StoreError, match="does not exist"):
        await store.open()
    assert time.monotonic() - started < 1.0


async def admin() -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True)


async def cut_mid_verb(store: PostgresStore, name: str, job_id: str, verb: Any) -> Any:
    """Run ``verb`` while another session holds ``job_id``'s row, so it waits on the
    server; then end the verb's server session (``pg_terminate_backend``) and let the row
    go. Returns what ``verb`` returned, or the exception it raised."""
    jobs = f"{store.settings.quoted_schema}.jobs"
    async with await admin() as holder, await admin() as killer:
        await holder.execute("BEGIN")
        await holder.execute(f"SELECT 1 FROM {jobs} WHERE id = %s FOR UPDATE", (job_id,))
        outcome: list[Any] = []

        async def call() -> None:
            try:
                outcome.append(await verb())
            except Exception as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            waiting = (
                "SELECT array_agg(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND wait_event_type = 'Lock'"
            )
            pids = None
            with anyio.fail_after(10):
                while not pids:
                    row = await (await killer.execute(waiting, (name,))).fetchone()
                    pids = row[0] if row else None
                    await anyio.sleep(0.01)
            await killer.execute(
                "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (pids,)
            )
            await anyio.sleep(0.1)
            await holder.execute("ROLLBACK")
        return outcome[0]


@pytest.fixture
async def named(pg_url: str) -> AsyncIterator[tuple[PostgresStore, str]]:
    name = f"bl-{uuid.uuid4().hex[:8]}"
    store = PostgresStore(f"{pg_url}&application_name={name}")
    await store.open()
    try:
        yield store, name
    finally:
        await store.close()


async def test_a_verb_safe_to_repeat_is_sent_again_when_its_session_is_ended(
    named: tuple[PostgresStore, str],
) -> None:
    store, name = named
    (job,) = await store.enqueue([make_job()])
    await store.claim(worker_id="w", queues=None, limit=1, now=NOW, lease_until=NOW + LEASE)
    renew = lambda: store.renew_leases(worker_id="w", ids=[job.id], lease_until=NOW + 2 * LEASE)  # noqa: E731
    assert await cut_mid_verb(store, name, job.id, renew) == set()
    held = await store.get(job.id)
    assert held is not None and held.lease_until == NOW + 2 * LEASE


async def test_a_verb_that_may_have_committed_is_not_sent_again(
    named: tuple[PostgresStore, str],
) -> None:
    store, name = named
    (job,) = await store.enqueue([make_job()])
    assert await store.cancel(job.id, NOW) is S.CANCELLED
    failed = await cut_mid_verb(store, name, job.id, lambda: store.retry(job.id, NOW + 1))
    assert isinstance(failed, StoreError)
    assert "may have" in str(failed)
    assert await store.retry(job.id, NOW + 2) is True  # the store itself goes on
