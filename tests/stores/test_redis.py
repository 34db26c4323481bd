"""What the Redis store promises beyond the contract: its URLs, its key prefix, its
scripts, calls sent twice after a lost reply, reconnection after a restart, waking waiting
workers within milliseconds, use from several event loops, and Redis Cluster refused.

The machine's Redis (``BACKLANE_TEST_REDIS``) serves the tests that only need a server;
tests that kill, restart or reconfigure Redis start a private ``redis-server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio as aioredis

from backlane.exceptions import ConfigurationError, StoreError
from backlane.jobs import Job, JobState
from backlane.stores import store_from_url
from backlane.stores.base import Outcome, WorkerRecord
from backlane.stores.memory import MemoryStore
from backlane.stores.redis import RedisStore
from backlane.stores.redis_codec import decode_job
from backlane.stores.redis_link import call, command, library, load_scripts
from tests.acceptance._procs import free_port
from tests.acceptance.redis_lab import PrivateRedis
from tests.services import REDIS_URL, require_service, store_url
from tests.stores.test_contract import LEASE, NOW, make_job

pytestmark = pytest.mark.anyio

S = JobState
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    """A fresh prefix on the machine's Redis."""
    with store_url("redis", tmp_path) as fresh:
        yield fresh


@pytest.fixture
async def store(url: str) -> AsyncIterator[RedisStore]:
    opened = RedisStore(url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def private(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A ``redis-server`` of this test's own, with an append-only file."""
    if not PrivateRedis.available():
        require_service("redis-server", "no redis-server binary on PATH")
    with PrivateRedis(tmp_path / "redis") as server:
        yield server


def raw_keys(server: PrivateRedis) -> list[str]:
    client = redis.Redis(port=server.port, password=server.password, decode_responses=True)
    try:
        return sorted(client.keys("*"))
    finally:
        client.close()


# -- URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "where", "db", "prefix"),
    [
        ("redis://127.0.0.1:6379/0", "127.0.0.1:6379", 0, "backlane:"),
        ("redis://cache.internal/3?prefix=shop:", "cache.internal:6379", 3, "shop:"),
        ("redis://:secret@h:6380/1?prefix={shop}:", "h:6380", 1, "{shop}:"),
        ("rediss://user:pw@h:6390/2?ssl_cert_reqs=none", "h:6390", 2, "backlane:"),
        ("unix:///run/redis.sock?db=5&prefix=a:", "/run/redis.sock", 5, "a:"),
    ],
)
def test_url_forms(given: str, where: str, db: int, prefix: str) -> None:
    store = RedisStore(given)
    endpoint = store._links.url.endpoint
    assert store.url == given
    assert store.prefix == prefix
    assert endpoint.describe() == f"{where} db {db}"
    assert endpoint.tls is given.startswith("rediss:")
    assert "secret" not in repr(store) and "pw@" not in repr(store)


def test_store_from_url_picks_the_redis_store() -> None:
    for scheme in ("redis://h/0", "rediss://h/0", "unix:///tmp/r.sock"):
        assert isinstance(store_from_url(scheme), RedisStore)


@pytest.mark.parametrize(
    ("given", "complaint"),
    [
        ("redis://h/0?prefix=", "empty prefix"),
        ("redis://h/abc", "database 'abc' is not a number"),
        ("redis://h/0/1", "database '0/1'"),
        ("redis://h/-1", "database '-1'"),
        ("redis://h/0?prefix=a:&prefix=b:", "prefix twice"),
        ("redis://h/0?max_connections=5", "unsupported option"),
        ("redis://h/0?socket_timeout=soon", "socket_timeout"),
        ("redis://h/0?socket_timeout=0", "socket_timeout must be a number of seconds above 0"),
        ("redis://h/0?socket_timeout=-1", "socket_timeout must be a number of seconds above 0"),
        ("redis://h/0?socket_timeout=nan", "socket_timeout must be a number of seconds above 0"),
        ("redis://h/0?socket_connect_timeout=0", "socket_connect_timeout must be a number"),
        ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        ("http://h/0", "not a Redis URL"),
    ],
)
def test_a_bad_url_is_refused_with_the_reason(given: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        RedisStore(given)


async def test_a_password_never_shows_in_errors(tmp_path: Path) -> None:
    if not PrivateRedis.available():
        require_service("redis-server", "no redis-server binary on PATH")
    with PrivateRedis(tmp_path / "redis", password="s3cret") as server:
        wrong = RedisStore(f"redis://:wrong-pw@127.0.0.1:{server.port}/0")
        with pytest.raises(StoreError) as caught:
            await wrong.open()
        assert "wrong-pw" not in str(caught.value) and "***" in str(caught.value)
        right = RedisStore(server.url)
        await right.open()
        (job,) = await right.enqueue([make_job()])
        assert await right.get(job.id) == job
        await right.close()


async def test_unix_socket_with_a_password_and_a_database(tmp_path: Path) -> None:
    if not PrivateRedis.available():
        require_service("redis-server", "no redis-server binary on PATH")
    with PrivateRedis(tmp_path / "r", password="pw", unix_socket=True) as server:
        store = RedisStore(f"unix://:pw@{server.socket}?db=2&prefix=u:")
        await store.open()
        (job,) = await store.enqueue([make_job()])
        assert [j.id for j in await store.claim(**claim_args())] == [job.id]
        await store.close()
        client = redis.Redis(unix_socket_path=str(server.socket), password="pw", db=2)
        assert client.exists(f"u:job:{job.id}") == 1
        client.close()


async def test_tls_with_a_trusted_certificate_and_not_without(tmp_path: Path) -> None:
    if not PrivateRedis.available(tls=True):
        require_service("redis-server with openssl", "no redis-server or openssl on PATH")
    with PrivateRedis(tmp_path / "tls", tls=True) as server:
        trusted = RedisStore(f"{server.url}?ssl_ca_certs={server.cert}&prefix=t:")
        await trusted.open()
        (job,) = await trusted.enqueue([make_job()])
        assert await trusted.get(job.id) == job
        await trusted.close()
        unchecked = RedisStore(f"{server.url}?ssl_cert_reqs=none&prefix=t:")
        await unchecked.open()
        assert await unchecked.get(job.id) == job
        await unchecked.close()
        untrusted = RedisStore(f"{server.url}?prefix=t:")
        started = time.monotonic()
        with pytest.raises(StoreError, match="TLS"):
            await untrusted.open()
        assert time.monotonic() - started < 1, "a refused certificate is not tried again"
        plain = RedisStore(f"redis://127.0.0.1:{server.port}/0?socket_timeout=1")
        with pytest.raises(StoreError):
            await plain.open()


def test_open_refuses_a_server_that_does_not_answer() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=1")
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect"):
        anyio.run(store.open)
    assert time.monotonic() - started < 10


# -- keys and prefixes ---------------------------------------------------------------------


def claim_args(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "worker_id": "w1",
        "queues": None,
        "limit": 100,
        "now": NOW,
        "lease_until": NOW + LEASE,
    }
    values.update(changes)
    return values


async def _lifecycle(store: RedisStore) -> None:
    """Touch every kind of key a lane writes."""
    first, then, deferred = make_job(key="k"), make_job(), make_job(state=S.DEFERRED)
    then.after = first.id
    deferred.release_at = NOW + 5
    await store.enqueue([first, then, deferred, make_job(run_at=NOW + 99, queue="later")])
    (claimed,) = await store.claim(**claim_args(limit=1))
    await store.finish(
        [Outcome(claimed.id, "w1", S.SUCCEEDED, NOW + 1, result="1", keep_until=NOW + 9)]
    )
    await store.claim(**claim_args(worker_id="w2"))
    await store.claim(**claim_args(worker_id="w3"))  # finds nothing: marks the lane idle
    await store.requeue_expired(NOW + 1000)
    await store.pause_queue("later", True)
    await store.claim_slot("nightly", NOW, make_job())
    await store.pause_schedule("weekly", True)
    await store.beat(WorkerRecord(id="w1", started_at=NOW, seen_at=NOW, concurrency=1))


async def test_every_key_starts_with_the_prefix_and_lanes_never_meet(
    private: PrivateRedis,
) -> None:
    a = RedisStore(f"{private.url}?prefix=app-a:")
    b = RedisStore(f"{private.url}?prefix={{app-b}}:")
    await a.open()
    await b.open()
    try:
        await _lifecycle(a)
        await _lifecycle(b)
        keys = raw_keys(private)
        assert keys and all(k.startswith(("app-a:", "{app-b}:")) for k in keys), keys

        def kinds(prefix: str) -> set[str]:
            return {k.removeprefix(prefix).split(":")[0] for k in keys if k.startswith(prefix)}

        assert kinds("app-a:") == kinds("{app-b}:")
        a_ids = {job.id for job in await a.list_jobs(limit=100)}
        b_ids = {job.id for job in await b.list_jobs(limit=100)}
        assert a_ids and b_ids and not a_ids & b_ids
        assert await a.counts() == await b.counts()
        assert await a.paused_queues() == {"later"}
        await b.pause_queue("later", False)
        assert await a.paused_queues() == {"later"}
        assert await b.paused_queues() == set()
        await a.purge(before=math.inf, states=list(S))
        assert await a.counts() != {}  # active jobs are not purged
        assert await b.get(next(iter(b_ids))) is not None
    finally:
        await a.close()
        await b.close()


async def test_a_lane_removes_its_last_job_and_leaves_only_bookkeeping(
    private: PrivateRedis,
) -> None:
    """After every job is gone, what remains is the lane's own bookkeeping (counter,
    queue names, schedules, workers, each worker's last claim), not job data; nothing
    grows with the number of calls."""
    store = RedisStore(f"{private.url}?prefix=p:")
    await store.open()
    await _lifecycle(store)
    ids = [job.id for job in await store.list_jobs(limit=100)]
    assert await store.delete(ids) == len(ids)
    await store.close()
    left = {k for k in raw_keys(private) if not k.startswith("p:claim:")}
    assert left <= {
        "p:seq",
        "p:queues",
        "p:paused",
        "p:sched",
        "p:sched:paused",
        "p:workers",
        "p:workers:seen",
        "p:idle",
        "p:prio:later",
        "p:prio:default",
    }, left


# -- scripts and replays -----------------------------------------------------------------


async def test_scripts_are_sent_again_when_the_server_forgot_them(url: str) -> None:
    store = RedisStore(url)
    store.use_functions = False
    await store.open()
    (job,) = await store.enqueue([make_job()])
    link = await store._links.get()
    assert link.functions is False
    assert await command(link, "SCRIPT", "FLUSH") == "OK"
    assert [j.id for j in await store.claim(**claim_args())] == [job.id]
    scripts = load_scripts()
    exists = await command(link, "SCRIPT", "EXISTS", scripts["claim"].sha)
    assert exists == [1]
    await store.close()


async def test_the_library_is_loaded_again_when_the_server_forgot_it(store: RedisStore) -> None:
    (job,) = await store.enqueue([make_job()])
    link = await store._links.get()
    assert link.functions is True  # Redis 7: the verbs run as functions
    name = library().name
    assert await command(link, "FUNCTION", "DELETE", name) == "OK"  # as after a restart
    assert [j.id for j in await store.claim(**claim_args())] == [job.id]
    (loaded,) = await command(link, "FUNCTION", "LIST", "LIBRARYNAME", name)
    assert loaded[1] == name


def test_the_library_holds_every_verb_as_a_function() -> None:
    scripts, text = load_scripts(), library().text
    assert text.startswith(f"#!lua name={library().name}\n")
    for script in scripts.values():
        assert f"redis.register_function{{function_name = '{script.function}'," in text
        body = script.text.partition("\nbegin(KEYS[1])\n")[2]
        assert body and f"begin(KEYS[1])\n{body}\nend}}" in text


@pytest.mark.parametrize("functions", [True, False], ids=["functions", "scripts"])
async def test_out_of_memory_refuses_new_work_but_purging_and_reading_go_on(
    private: PrivateRedis, functions: bool
) -> None:
    store = RedisStore(private.url)
    store.use_functions = functions
    await store.open()
    (old,) = await store.enqueue([make_job()])
    (held,) = await store.claim(**claim_args())
    await store.finish([Outcome(held.id, "w1", S.SUCCEEDED, NOW, keep_until=NOW + 1)])
    client = redis.Redis(port=private.port, password=private.password)
    client.config_set("maxmemory", 1)  # every write that needs memory is refused now
    try:
        with pytest.raises(StoreError, match="maxmemory"):
            await store.enqueue([make_job()])
        assert [job.id for job in await store.list_jobs()] == [old.id]
        assert await store.purge(before=NOW + 2) == 1  # removing is how room is made
        assert await store.list_jobs() == []
    finally:
        client.config_set("maxmemory", 0)
        client.close()
        await store.close()


async def test_an_enqueue_sent_twice_after_a_lost_reply_stores_once(store: RedisStore) -> None:
    from backlane.stores.redis_codec import jobs_json

    link = await store._links.get()
    script = load_scripts()["enqueue"]
    holder = make_job(key="k")
    batch = [make_job(), make_job(key="k")]
    await store.enqueue([holder])
    first = await call(link, script, "token-1", jobs_json(batch))
    again = await call(link, script, "token-1", jobs_json(batch))
    assert again == first
    assert await store.counts() == {"default": {S.QUEUED: 2}}
    with pytest.raises(StoreError, match="already stored"):
        await call(link, script, "token-2", jobs_json(batch))


async def test_a_slot_claim_sent_twice_after_a_lost_reply_is_taken_once(
    store: RedisStore,
) -> None:
    from backlane.stores.redis_codec import job_fields

    link = await store._links.get()
    script = load_scripts()["claim_slot"]
    job = make_job()
    fields = json.dumps(job_fields(job))
    assert await call(link, script, "nightly", str(NOW), fields) == 1
    assert await call(link, script, "nightly", str(NOW), fields) == 1
    assert await store.claim_slot("nightly", NOW, make_job()) is False
    assert await store.counts() == {"default": {S.QUEUED: 1}}


async def test_a_claim_sent_twice_after_a_lost_reply_claims_once(store: RedisStore) -> None:
    await store.enqueue([make_job() for _ in range(3)])
    link = await store._links.get()
    script = load_scripts()["claim"]
    args = ("w1", str(NOW), str(NOW + LEASE), 2, "", 1000)
    first = await call(link, script, "token-c", *args)
    again = await call(link, script, "token-c", *args)
    assert [decode_job(f).id for f in again[2:]] == [decode_job(f).id for f in first[2:]]
    assert all(decode_job(f).attempts == 0 for f in again[2:])  # as before the claim
    jobs = await store.list_jobs(state=S.RUNNING)
    assert len(jobs) == 2 and all(job.attempts == 1 for job in jobs)
    assert len(await store.claim(**claim_args())) == 1


async def test_finish_and_claim_records_outcomes_then_claims_in_one_call(
    store: RedisStore,
) -> None:
    jobs = [make_job() for _ in range(3)]
    await store.enqueue(jobs)
    held = await store.claim(**claim_args(limit=2))
    outcomes = [Outcome(job.id, "w1", S.SUCCEEDED, NOW + 1, result="1") for job in held]
    outcomes.append(Outcome(jobs[2].id, "w1", S.SUCCEEDED, NOW + 1))  # not held: ignored
    applied, claimed = await store.finish_and_claim(outcomes, **claim_args(limit=5))
    assert applied == [job.id for job in held]
    assert [job.id for job in claimed] == [jobs[2].id]
    assert claimed[0].state is S.RUNNING and claimed[0].attempts == 1
    assert await store.counts() == {"default": {S.SUCCEEDED: 2, S.RUNNING: 1}}
    assert await store.finish_and_claim([], **claim_args()) == ([], [])


async def test_a_finish_and_claim_sent_twice_after_a_lost_reply_acts_once(
    store: RedisStore,
) -> None:
    from backlane.stores.redis_codec import outcomes_json

    jobs = [make_job() for _ in range(3)]
    await store.enqueue(jobs)
    (held,) = await store.claim(**claim_args(limit=1))
    link = await store._links.get()
    script = load_scripts()["finish_claim"]
    text = outcomes_json([Outcome(held.id, "w1", S.QUEUED, NOW, run_at=NOW + 50)])
    args = (text, "token-f", "w1", str(NOW), str(NOW + LEASE), 1, "", 1000)
    first = await call(link, script, *args)
    again = await call(link, script, *args)
    assert first[0] == [held.id] and again[0] == []
    assert [decode_job(f).id for f in again[3:]] == [decode_job(f).id for f in first[3:]]
    assert (await store.get(held.id)).attempts == 1  # type: ignore[union-attr]
    assert await store.counts() == {"default": {S.QUEUED: 2, S.RUNNING: 1}}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("meta", "{not json"),
        ("history", "[oops"),
        ("task", None),
        ("created_at", "x"),
    ],
)
@pytest.mark.parametrize("verb", ["claim", "finish_and_claim"])
async def test_a_job_whose_hash_cannot_be_read_ends_failed_and_the_claim_goes_on(
    store: RedisStore, verb: str, field: str, value: str | None
) -> None:
    # fields only Python reads; those the scripts decide on: test_redis_corrupt.py
    bad, good = await store.enqueue([make_job(), make_job()])
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    key = f"{store.prefix}job:{bad.id}"
    original = client.hget(key, field)
    if value is None:
        client.hdel(key, field)
    else:
        client.hset(key, field, value)
    try:
        if verb == "claim":
            claimed = await store.claim(**claim_args())
        else:
            claimed = (await store.finish_and_claim([], **claim_args()))[1]
        assert [job.id for job in claimed] == [good.id]
        assert await store.claim(**claim_args(worker_id="w2")) == []  # never claimed again
        assert await store.counts() == {"default": {S.RUNNING: 1, S.FAILED: 1}}
        with pytest.raises(StoreError, match=f"job {bad.id}: .*field '{field}'"):
            await store.get(bad.id)
        (listed,) = [job for job in await store.list_jobs() if job.id == bad.id]
        assert listed.error is not None and f"field '{field}'" in listed.error["message"]
        if original is None:  # the field mended by hand: the job reads again
            client.hdel(key, field)
        else:
            client.hset(key, field, original)
    finally:
        client.close()
    failed = await store.get(bad.id)
    assert failed is not None and failed.state is S.FAILED and failed.worker_id == "w1"
    assert failed.error is not None and f"field '{field}'" in failed.error["message"]


async def test_times_and_text_come_back_exactly(store: RedisStore) -> None:
    rng = random.Random(7)
    jobs = []
    for _ in range(50):
        t = rng.uniform(-1e10, 1e10)
        jobs.append(
            make_job(
                run_at=t,
                created_at=rng.random() * 2e9,
                started_at=math.nextafter(t, math.inf),
                progress=rng.random(),
                message='\u00e9t\u00e9 \U0001f600 \x00 nul "quoted" \\ back',
                payload=json.dumps({"args": ["\U0001f680", "\n\t", 1e-300]}),
                key=f"k\x00{rng.random()}",
                meta={"big": 2**62, "tiny": 5e-324, "list": [None, True, "\u2603"]},
                error={"message": "\u00fc", "n": float("1e308")},
            )
        )
    stored = await store.enqueue(jobs)
    assert stored == jobs
    for job in jobs:
        assert await store.get(job.id) == job


# -- connections: loops, closing, restarts ---------------------------------------------------


def test_one_store_serves_several_event_loops_and_closes_cleanly(url: str) -> None:
    store = RedisStore(url)
    anyio.run(store.open)  # opened on a loop that ends at once
    (job,) = anyio.run(store.enqueue, [make_job()])
    found: list[Job | None] = []

    def elsewhere() -> None:
        found.append(asyncio.run(store.get(job.id)))

    threads = [threading.Thread(target=elsewhere) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == [job] * 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        anyio.run(store.close)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert store._links._links == {}
    with pytest.raises(StoreError, match="not open"):
        anyio.run(store.get, job.id)


async def test_a_loop_running_on_another_thread_is_closed_on_that_loop(url: str) -> None:
    store = RedisStore(url)
    await store.open()
    ready, leave = threading.Event(), threading.Event()

    def serve() -> None:
        async def main() -> None:
            await store.get("x")
            ready.set()
            while not leave.is_set():
                await asyncio.sleep(0.01)

        asyncio.run(main())

    thread = threading.Thread(target=serve)
    thread.start()
    ready.wait(10)
    assert len(store._links._links) == 2
    await store.close()
    assert store._links._links == {}
    leave.set()
    thread.join(10)


async def test_a_restart_costs_errors_meanwhile_then_work_goes_on(private: PrivateRedis) -> None:
    store = RedisStore(private.url + "?socket_connect_timeout=0.5")
    await store.open()
    (kept,) = await store.enqueue([make_job()])
    await asyncio.sleep(1.2)  # appendfsync everysec; a clean stop would flush anyway
    private.kill()
    started = time.monotonic()
    with pytest.raises(StoreError):
        await store.enqueue([make_job()])
    assert time.monotonic() - started < 10
    private.start()
    assert await store.get(kept.id) == kept  # reconnected by itself, data from the AOF
    (claimed,) = await store.claim(**claim_args())
    assert claimed.id == kept.id
    await store.close()


async def test_a_call_during_a_short_outage_waits_and_succeeds(private: PrivateRedis) -> None:
    store = RedisStore(private.url)
    await store.open()
    private.stop()
    restart = threading.Timer(0.5, private.start)
    restart.start()
    (job,) = await store.enqueue([make_job()])  # retried with backoff until Redis is back
    restart.join()
    assert await store.get(job.id) == job
    await store.close()


async def test_a_reply_later_than_socket_timeout_breaks_the_connection_and_is_asked_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if not PrivateRedis.available():
        require_service("redis-server", "no redis-server binary on PATH")
    with PrivateRedis(tmp_path / "d", extra=("--enable-debug-command", "yes")) as server:
        store = RedisStore(server.url + "?socket_timeout=0.5")
        await store.open()
        (job,) = await store.enqueue([make_job()])
        client = redis.Redis(port=server.port, password=server.password)
        stall = threading.Thread(target=lambda: client.execute_command("DEBUG", "SLEEP", 2))
        stall.start()
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with caplog.at_level("DEBUG", logger="backlane.stores.redis"):
            assert await store.get(job.id) == job
        assert time.monotonic() - started > 1.0
        assert "no reply from Redis" in caplog.text
        stall.join()
        client.close()
        await store.close()


async def test_redis_cluster_is_refused_with_the_reason(tmp_path: Path) -> None:
    if not PrivateRedis.available():
        require_service("redis-server", "no redis-server binary on PATH")
    with PrivateRedis(tmp_path / "c", extra=("--cluster-enabled", "yes")) as server:
        store = RedisStore(server.url)
        with pytest.raises(ConfigurationError, match="Cluster"):
            await store.open()


# -- waking waiting workers ----------------------------------------------------------------


async def _idle_worker(store: RedisStore) -> None:
    """Claim nothing (the lane is marked idle), subscribed, as an idle worker is."""
    assert await store.claim(**claim_args(now=time.time())) == []
    link = await store._links.get()
    if link.wakes is None or not link.wakes.connected:
        await store.wait_for_work(5.0)  # the first wait returns once subscribed
        assert await store.claim(**claim_args(now=time.time())) == []


async def _handed_one(store: RedisStore, other: RedisStore) -> Job:
    """Store a job through ``other`` while ``store``'s worker w1 waits for work, idle: the
    job is handed to w1, and the wait returns."""
    await _idle_worker(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.wait_for_work, 10.0)
        await anyio.sleep(0.05)
        (job,) = await other.enqueue([make_job(run_at=time.time())])
    return job


_ENQUEUER = """
import asyncio, sys, time
from backlane.jobs import Job
from backlane.stores.redis import RedisStore

async def main():
    store = RedisStore(sys.argv[1])
    await store.open()
    for line in sys.stdin:
        await store.enqueue([Job(task="t", payload="[]", created_at=time.time())])
        print(repr(time.time()), flush=True)
    await store.close()

asyncio.run(main())
"""


async def test_a_waiting_worker_wakes_within_milliseconds_of_an_enqueue_elsewhere(
    store: RedisStore, url: str
) -> None:
    proc = await anyio.to_thread.run_sync(
        lambda: subprocess.Popen(
            [sys.executable, "-c", _ENQUEUER, url],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
    )
    assert proc.stdin is not None and proc.stdout is not None
    delays = []
    try:
        for _ in range(20):
            await _idle_worker(store)
            woken: list[float] = []

            async def wait(woken: list[float] = woken) -> None:
                await store.wait_for_work(10.0)
                woken.append(time.time())

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.sleep(0.01)
                proc.stdin.write("go\n")
                proc.stdin.flush()
                stored_at = float(await anyio.to_thread.run_sync(proc.stdout.readline))
            delays.append(woken[0] - stored_at)
            await store.claim(**claim_args(now=time.time()))
    finally:
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()
    delays.sort()
    print(
        f"\nwake after an enqueue in another process: p50 {delays[10] * 1000:.2f} ms, "
        f"max {delays[-1] * 1000:.2f} ms"
    )
    assert delays[10] < 0.01
    assert delays[-1] < 0.5  # a loaded machine may stall any process now and then


async def test_wait_for_work_returns_when_the_next_delayed_job_is_due(store: RedisStore) -> None:
    await _idle_worker(store)
    await store.enqueue([make_job(run_at=time.time() + 0.3)])
    with anyio.fail_after(1):
        await store.wait_for_work(5.0)  # woken, to learn when the new job is due
    assert await store.claim(**claim_args(now=time.time())) == []
    started = time.monotonic()
    await store.wait_for_work(5.0)
    assert 0.25 < time.monotonic() - started < 1.0


async def test_wait_for_work_without_news_waits_its_timeout(store: RedisStore) -> None:
    await _idle_worker(store)
    started = time.monotonic()
    await store.wait_for_work(0.3)
    assert 0.28 < time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "event", ["release", "finish-retry", "unblock", "resume", "requeue", "retry", "hand_back"]
)
async def test_every_way_work_becomes_claimable_wakes_a_waiting_worker(
    store: RedisStore, event: str
) -> None:
    now = time.time()
    other = RedisStore(store.url)  # another process, as far as Redis can tell
    await other.open()
    deferred = make_job(state=S.DEFERRED)
    first, then, solo = make_job(queue="first"), make_job(queue="then"), make_job(queue="solo")
    then.after = first.id
    paused = make_job(queue="paused")
    await other.pause_queue("paused", True)
    await other.enqueue([deferred, first, then, paused, solo])
    claimed = await other.claim(
        **claim_args(queues=["first", "solo"], now=now, lease_until=now + 1)
    )
    assert [job.id for job in claimed] == [first.id, solo.id]
    held = claimed[1]
    await _idle_worker(store)
    wait = anyio.Event()

    async def waiter() -> None:
        await store.wait_for_work(10.0)
        wait.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.05)
        assert not wait.is_set()
        started = time.monotonic()
        if event == "release":
            await other.release([deferred.id])
        elif event == "finish-retry":
            await other.finish([Outcome(held.id, "w1", S.QUEUED, now, run_at=now)])
        elif event == "unblock":
            await other.finish([Outcome(first.id, "w1", S.SUCCEEDED, now)])
        elif event == "resume":
            await other.pause_queue("paused", False)
        elif event == "requeue":
            assert await other.requeue_expired(now + 2) == 2
        elif event == "retry":
            await other.finish([Outcome(held.id, "w1", S.FAILED, now)])
            await anyio.sleep(0.05)
            assert not wait.is_set()  # a failed job is nothing to claim
            started = time.monotonic()
            assert await other.retry(held.id, now)
        else:
            await other.hand_back(worker_id="w1", ids=[held.id])
        with anyio.fail_after(1):
            await wait.wait()
    assert time.monotonic() - started < 0.5
    await other.close()


@contextlib.contextmanager
def scripts_sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the scripts the store runs inside the block, in order."""
    sent: list[str] = []

    async def recorded(link: Any, script: Any, *args: Any) -> Any:
        sent.append(script.name)
        return await call(link, script, *args)

    with monkeypatch.context() as patched:
        patched.setattr("backlane.stores.redis.call", recorded)
        yield sent


async def test_a_waiting_worker_is_handed_the_job_and_takes_it_without_a_round_trip(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = RedisStore(store.url)
    await other.open()
    job = await _handed_one(store, other)
    assert [j.id for j in await other.claim(**claim_args(worker_id="w2", now=time.time()))] == []
    held = await store.get(job.id)
    assert held is not None and held.state is S.RUNNING and held.worker_id == "w1"
    assert held.attempts == 1 and held.lease_until is not None
    assert held.lease_until < time.time() + 2.5  # a short lease until the worker takes it
    now = time.time()
    with scripts_sent(monkeypatch) as sent:
        (taken,) = await store.claim(**claim_args(now=now, lease_until=now + LEASE))
        assert sent == []  # returned without waiting for Redis
        await anyio.sleep(0.1)
    assert sent == ["take"]  # then gave it the full lease, in the background
    assert taken == held.copy(lease_until=now + LEASE)
    assert await store.get(job.id) == taken
    assert await store.claim(**claim_args(now=time.time())) == []  # not twice
    await other.close()


async def test_a_worker_that_waits_again_takes_the_jobs_it_started_with_its_offer(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = RedisStore(store.url)
    await other.open()
    job = await _handed_one(store, other)
    now = time.time()
    with scripts_sent(monkeypatch) as sent:
        (taken,) = await store.claim(**claim_args(now=now, lease_until=now + LEASE, limit=2))
        await store.wait_for_work(0.01)  # offers its free slot, and takes the job with it
        await anyio.sleep(0.1)
    assert sent == ["wait"]
    assert await store.get(job.id) == taken.copy(lease_until=now + LEASE)
    # given the full lease: the job is no longer one to give back when its short one ends
    survivor = RedisStore(store.url)
    await survivor.open()
    assert await survivor.requeue_expired(time.time() + 3) == 0
    await survivor.close()
    await other.close()


async def test_a_wait_cancelled_before_its_offer_is_answered_keeps_its_connection(
    store: RedisStore,
) -> None:
    # a worker stops waiting whenever one of its jobs ends: its offer still lands, and the
    # connection it went on stays open (a call cut off before its reply costs it)
    await _idle_worker(store)
    link = await store._links.get()
    own = link._own
    assert own is not None and own.is_connected
    waiting = asyncio.ensure_future(store.wait_for_work(10.0))
    with anyio.fail_after(2):
        while not link._busy:  # the offer is on its way
            await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await anyio.sleep(0.05)
    assert link._own is own and own.is_connected
    assert await command(link, "HKEYS", store.prefix + "waiting") == ["w1"]


async def test_jobs_a_worker_started_are_taken_when_its_store_closes_first(
    store: RedisStore,
) -> None:
    other = RedisStore(store.url)
    await other.open()
    job = await _handed_one(store, other)
    now = time.time()
    (taken,) = await store.claim(**claim_args(now=now, lease_until=now + LEASE))
    await store.close()  # before the take went
    assert await other.get(job.id) == taken.copy(lease_until=now + LEASE)
    await other.close()


async def test_a_claim_that_leaves_a_waiting_worker_room_offers_it_to_take_work(
    store: RedisStore,
) -> None:
    other = RedisStore(store.url)
    await other.open()
    await _idle_worker(store)
    await store.wait_for_work(0.01)  # waited: its pop of handed jobs is under way
    assert await store.claim(**claim_args(now=time.time())) == []
    (job,) = await other.enqueue([make_job(run_at=time.time())])  # no wait sent meanwhile
    handed = await other.get(job.id)
    assert handed is not None and handed.state is S.RUNNING and handed.worker_id == "w1"
    with anyio.fail_after(2):
        await store.wait_for_work(10.0)
    (taken,) = await store.claim(**claim_args(now=time.time()))
    assert taken.id == job.id and taken.attempts == 1
    await other.close()


async def test_a_claim_by_a_worker_that_never_waited_offers_nothing(store: RedisStore) -> None:
    other = RedisStore(store.url)
    await other.open()
    assert await store.claim(**claim_args(now=time.time())) == []
    (job,) = await other.enqueue([make_job(run_at=time.time())])
    queued = await other.get(job.id)
    assert queued is not None and queued.state is S.QUEUED
    await other.close()


async def test_a_job_handed_to_a_worker_that_stops_is_given_back(store: RedisStore) -> None:
    other = RedisStore(store.url)
    await other.open()
    job = await _handed_one(store, other)
    await store.forget_worker("w1")
    back = await other.get(job.id)
    assert back is not None and back.state is S.QUEUED and back.attempts == 0
    now = time.time()
    assert [j.id for j in await other.claim(**claim_args(worker_id="w2", now=now))] == [job.id]
    await other.close()


async def _handed_to_a_dead_worker(store: RedisStore, other: RedisStore) -> Job:
    """Hand a job to ``store``'s worker w1, which waited, then stopped without a word (as if
    killed): it never takes the job (its pop may still receive it)."""
    await _idle_worker(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.wait_for_work, 10.0)
        await anyio.sleep(0.05)
        (job,) = await other.enqueue([make_job(run_at=time.time())])
        tg.cancel_scope.cancel()
    handed = await other.get(job.id)
    assert handed is not None and handed.state is S.RUNNING and handed.worker_id == "w1"
    return handed


async def test_a_job_handed_to_a_worker_that_never_takes_it_runs_elsewhere_within_seconds(
    store: RedisStore,
) -> None:
    other, survivor = RedisStore(store.url), RedisStore(store.url)
    await other.open()
    await survivor.open()
    handed = await _handed_to_a_dead_worker(store, other)
    started = time.monotonic()
    claimed: list[Job] = []
    with anyio.fail_after(5):
        while not claimed:  # an idle worker: claim, wait (offering), claim
            claimed = await survivor.claim(**claim_args(worker_id="w2", now=time.time()))
            if not claimed:
                await survivor.wait_for_work(0.25)
    waited = time.monotonic() - started
    assert [job.id for job in claimed] == [handed.id]
    assert 1.5 < waited < 3.0  # its short lease (2 s), then at most an offer period
    assert claimed[0].worker_id == "w2"
    assert claimed[0].attempts == 1  # the dead worker's hand-off was never started: uncounted
    # the first worker, alive after all, claims late: it does not get the job a second time
    assert await store.claim(**claim_args(now=time.time())) == []
    assert await other.get(handed.id) == claimed[0]
    await other.close()
    await survivor.close()


async def test_a_sweep_gives_back_a_job_handed_and_never_taken_uncounted(
    store: RedisStore,
) -> None:
    other = RedisStore(store.url)
    await other.open()
    handed = await _handed_to_a_dead_worker(store, other)
    assert handed.lease_until is not None
    assert await other.requeue_expired(handed.lease_until - 0.01) == 0
    assert await other.requeue_expired(handed.lease_until + 0.01) == 1
    back = await other.get(handed.id)
    assert back is not None and back.state is S.QUEUED and back.attempts == 0
    await other.close()


async def test_a_job_taken_lives_on_its_full_lease(store: RedisStore) -> None:
    other = RedisStore(store.url)
    await other.open()
    job = await _handed_one(store, other)
    now = time.time()
    (taken,) = await store.claim(**claim_args(now=now, lease_until=now + LEASE))
    await anyio.sleep(0.1)  # its lease is extended in the background
    assert await other.requeue_expired(now + 5) == 0
    assert await other.get(job.id) == taken and taken.lease_until == now + LEASE
    await other.close()


async def test_a_hand_off_that_crossed_a_claim_is_returned_by_that_claim(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = RedisStore(store.url)
    await other.open()
    job = await _handed_one(store, other)
    assert [j.id for j in store._handed["w1"]] == [job.id]  # the pop brought it
    now = time.time()
    with monkeypatch.context() as patched:  # a claim sent before the pop's reply came,
        patched.setattr(store, "_take_handed", lambda *args: [])  # which returns it too
        (taken,) = await store.claim(**claim_args(now=now, lease_until=now + LEASE))
    assert taken.id == job.id and taken.lease_until == now + LEASE
    # nothing left for a later claim: a worker that stops when a claim finds nothing
    # (run_until_idle) or stops at all leaves nothing behind
    assert "w1" not in store._handed
    assert await store.claim(**claim_args(now=time.time(), lease_until=now + LEASE)) == []
    await anyio.sleep(2.2)
    held = await other.get(job.id)  # never given back: the claim had taken it
    assert held is not None and held.worker_id == "w1" and held.lease_until == now + LEASE
    await other.close()


async def test_a_claim_sent_twice_returns_the_jobs_handed_to_it_again(store: RedisStore) -> None:
    other = RedisStore(store.url)
    await other.open()
    handed = await _handed_to_a_dead_worker(store, other)
    link = await store._links.get()
    script = load_scripts()["claim"]
    now = time.time()
    args = ("w1", str(now), str(now + LEASE), 5, "", 1000)
    first = await call(link, script, "token-h", *args)
    again = await call(link, script, "token-h", *args)
    assert [decode_job(f).id for f in first[1]] == [handed.id]
    assert again[1] == first[1]  # not lost to the lease: the reply said the same
    held = await other.get(handed.id)
    assert held is not None and held.lease_until == now + LEASE  # taken: the full lease
    await other.close()


async def test_a_worker_that_stopped_waiting_without_a_word_is_soon_handed_nothing(
    store: RedisStore,
) -> None:
    other = RedisStore(store.url)
    await other.open()
    await _idle_worker(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.wait_for_work, 10.0)
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()  # as if killed: its offer stays until it lapses
    await anyio.sleep(0.5)
    (job,) = await other.enqueue([make_job(run_at=time.time())])
    now = time.time()
    assert [j.id for j in await other.claim(**claim_args(worker_id="w2", now=now))] == [job.id]
    await other.close()


async def test_a_hand_off_never_passes_a_job_due_before_it(store: RedisStore) -> None:
    other = RedisStore(store.url)
    await other.open()
    await _idle_worker(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.wait_for_work, 10.0)
        await anyio.sleep(0.05)
        await other.pause_queue("default", True)
        (paused,) = await other.enqueue([make_job(run_at=time.time())])
        await other.pause_queue("default", False)  # wakes the waiting worker
    (first,) = await other.enqueue([make_job(run_at=time.time())])
    held = await other.get(first.id)
    assert held is not None and held.state is S.QUEUED  # no one waits now
    claimed = await store.claim(**claim_args(now=time.time()))
    assert [j.id for j in claimed] == [paused.id, first.id]
    await other.close()


async def test_wait_for_work_while_redis_is_away_waits_and_raises_nothing(
    private: PrivateRedis,
) -> None:
    store = RedisStore(private.url + "?socket_connect_timeout=0.5")
    await store.open()
    await _idle_worker(store)
    private.stop()
    started = time.monotonic()
    await store.wait_for_work(0.3)  # its offer to take work cannot be sent: it just waits
    assert time.monotonic() - started < 8
    private.start()
    await store.close()


async def test_no_message_is_published_while_no_worker_is_idle(store: RedisStore) -> None:
    listener = aioredis.Redis.from_url(REDIS_URL)
    pubsub = listener.pubsub()
    await pubsub.subscribe(store.prefix + "wake")
    assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"
    await store.enqueue([make_job(), make_job()])  # nobody claimed yet: no one to wake
    assert await pubsub.get_message(timeout=0.2) is None
    assert len(await store.claim(**claim_args(limit=2))) == 2  # busy: took its fill
    await store.enqueue([make_job()])
    assert await pubsub.get_message(timeout=0.2) is None
    assert len(await store.claim(**claim_args(limit=5))) == 1  # took all there was
    await store.enqueue([make_job()])
    message = await pubsub.get_message(timeout=1)
    assert message is not None and message["type"] == "message"
    await pubsub.aclose()
    await listener.aclose()


async def test_the_wake_listener_comes_back_after_a_restart(private: PrivateRedis) -> None:
    store = RedisStore(private.url)
    other = RedisStore(private.url)
    await store.open()
    await _idle_worker(store)
    private.stop()
    private.start()
    await other.open()
    with anyio.fail_after(5):  # resubscribed: the generation moved on
        await store.wait_for_work(10.0)
    await _idle_worker(store)
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.wait_for_work, 10.0)
        await anyio.sleep(0.05)
        await other.enqueue([make_job()])
    assert time.monotonic() - started < 0.5
    await store.close()
    await other.close()


# -- the same answers as the memory store ------------------------------------------------


class _Twin:
    """Runs each operation on a memory store and on the Redis store and compares."""

    def __init__(self, redis_store: RedisStore, rng: random.Random, start: float) -> None:
        self.memory = MemoryStore()
        self.redis = redis_store
        self.rng = rng
        self.ids: list[str] = []
        self.workers = ["w1", "w2", "w3"]
        self.start = start
        self.now = start

    async def both(self, name: str, *args: Any, **kwargs: Any) -> Any:
        expected = await getattr(self.memory, name)(*args, **kwargs)
        got = await getattr(self.redis, name)(*args, **kwargs)
        if name == "claim" or name == "enqueue" or name == "list_jobs":
            assert got == expected, (name, args, kwargs)
        elif name == "finish":
            assert sorted(got) == sorted(expected), (name, args, kwargs)
        else:
            assert got == expected, (name, args, kwargs)
        return expected

    def job(self) -> Job:
        rng = self.rng
        job = make_job(
            queue=rng.choice(["a", "b", "c"]),
            priority=rng.choice([0, 0, 1, 5, -2]),
            run_at=self.now + rng.choice([-5.0, 0.0, 0.0, 3.0, 20.0]),
            created_at=self.now + rng.choice([0.0, 1.0, 2.0]),
            key=rng.choice([None, None, None, "k1", "k2"]),
            state=rng.choice([S.QUEUED, S.QUEUED, S.QUEUED, S.DEFERRED]),
        )
        if job.state is S.DEFERRED and rng.random() < 0.5:
            job.release_at = self.now + rng.choice([1.0, 10.0])
        if self.ids and rng.random() < 0.3:
            job.after = rng.choice(self.ids)
        return job

    async def step(self) -> None:
        rng = self.rng
        kind = rng.choice(
            ["enqueue"] * 4
            + ["claim"] * 4
            + ["finish"] * 4
            + [
                "cancel",
                "retry",
                "requeue",
                "hand_back",
                "release",
                "discard",
                "delete",
                "purge",
                "pause",
                "renew",
                "tick",
            ]
        )
        ids = self.ids
        pick = [rng.choice(ids) for _ in range(rng.randint(1, 3))] if ids else ["none"]
        if kind == "enqueue":
            jobs = [self.job() for _ in range(rng.randint(1, 4))]
            self.ids.extend(job.id for job in jobs)
            await self.both("enqueue", jobs)
        elif kind == "claim":
            queues = rng.choice([None, ["a"], ["b", "c"], ["c", "a", "a"]])
            await self.both(
                "claim",
                worker_id=rng.choice(self.workers),
                queues=queues,
                limit=rng.randint(1, 4),
                now=self.now,
                lease_until=self.now + 10,
            )
        elif kind == "finish":
            running = [j for j in await self.memory.list_jobs(state=S.RUNNING, limit=100)]
            outcomes = []
            for job in running[: rng.randint(1, 3)]:
                state = rng.choice([S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED])
                worker = job.worker_id if rng.random() < 0.9 else "stranger"
                assert worker is not None
                outcomes.append(
                    Outcome(
                        job.id,
                        worker,
                        state,
                        self.now,
                        result=rng.choice([None, '"r"']),
                        error=rng.choice([None, {"message": "boom"}]),
                        run_at=self.now + 2 if state is S.QUEUED else None,
                        keep_until=self.now + rng.choice([5.0, 50.0]),
                    )
                )
            await self.both("finish", outcomes)
        elif kind == "cancel":
            await self.both("cancel", pick[0], self.now, self.now + 30)
        elif kind == "retry":
            await self.both("retry", pick[0], self.now)
        elif kind == "requeue":
            await self.both("requeue_expired", self.now, self.now + 40)
        elif kind == "hand_back":
            await self.both("hand_back", worker_id=rng.choice(self.workers), ids=pick)
        elif kind == "release":
            await self.both("release", pick)
        elif kind == "discard":
            await self.both("discard", pick, self.now, self.now + 20)
        elif kind == "delete":
            await self.both("delete", pick[:1])
        elif kind == "purge":
            states = rng.choice([None, [S.FAILED], [S.SUCCEEDED, S.CANCELLED]])
            await self.both("purge", before=self.now, states=states)
        elif kind == "pause":
            await self.both("pause_queue", rng.choice(["a", "b"]), rng.random() < 0.5)
        elif kind == "renew":
            await self.both(
                "renew_leases",
                worker_id=rng.choice(self.workers),
                ids=pick,
                lease_until=self.now + 10,
            )
        else:
            self.now += rng.choice([1.0, 4.0, 11.0])

    async def compare_all(self) -> None:
        everything = await self.both("list_jobs", limit=10_000)
        for job in everything:
            assert await self.redis.get(job.id) == job
        assert await self.redis.counts() == await self.memory.counts()
        for state in S:
            await self.both("list_jobs", state=state, limit=7, offset=1)
        await self.both("list_jobs", queue="b", text="tests:", limit=5)
        assert await self.redis.paused_queues() == await self.memory.paused_queues()
        for since, width in [(0, 7.0), (self.start, 60.0), (self.start + 30, 120.0)]:
            got = await self.redis.stats(since=since, width=width)
            assert got == await self.memory.stats(since=since, width=width), (since, width)


@pytest.mark.parametrize("seed", range(int(os.environ.get("BACKLANE_TWIN_SEEDS", "12"))))
async def test_random_operations_give_the_memory_stores_answers(
    store: RedisStore, seed: int
) -> None:
    """150 random operations per seed (``BACKLANE_TWIN_SEEDS``, default 12, for more).
    Odd seeds play in the last hour, where ``stats`` reads per-minute tallies."""
    start = NOW if seed % 2 == 0 else math.floor(time.time() / 60) * 60 - 3600
    twin = _Twin(store, random.Random(seed), start)
    for n in range(150):
        await twin.step()
        if n % 50 == 49:
            await twin.compare_all()
    await twin.compare_all()


def test_every_script_is_a_lua_file_with_the_shared_helpers() -> None:
    scripts = load_scripts()
    folder = REPO_ROOT / "src" / "backlane" / "stores" / "lua"
    assert set(scripts) == {p.stem for p in folder.glob("*.lua")} - {"common"}
    common = (folder / "common.lua").read_text()
    assert all(script.text.startswith(common) for script in scripts.values())
    assert len({script.sha for script in scripts.values()}) == len(scripts)


def test_the_store_runs_on_uvloop(url: str) -> None:
    """uvicorn runs apps on uvloop when it is installed: its transports are not
    asyncio's."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        store = RedisStore(url)
        await store.open()
        (job,) = await store.enqueue([make_job()])
        assert [j.id for j in await store.claim(**claim_args())] == [job.id]
        await store.close()

    uvloop.run(main())


async def test_text_redis_cannot_carry_is_refused_and_the_connection_stays_usable(
    store: RedisStore,
) -> None:
    bad = make_job(payload='{"args":["\ud800"]}')  # a lone surrogate: not UTF-8
    with pytest.raises(StoreError, match="cannot send"):
        await store.enqueue([bad])
    (good,) = await store.enqueue([make_job()])
    assert await store.get(good.id) == good
    assert await store.get(bad.id) is None


async def test_long_reads_walk_past_their_steps_with_ties(store: RedisStore) -> None:
    """More jobs than one step of ``stats``, ``purge`` (1,000) and ``list_jobs`` (2,000),
    many ending at the same instant."""
    memory = MemoryStore()
    jobs = [make_job() for _ in range(2_345)]
    for target in (memory, store):
        await target.enqueue([job.copy() for job in jobs])
        claimed = await target.claim(**claim_args(limit=len(jobs)))
        outcomes = [
            Outcome(job.id, "w1", S.SUCCEEDED, NOW + (n // 700) * 0.5, keep_until=NOW)
            for n, job in enumerate(claimed)
        ]
        assert len(await target.finish(outcomes)) == len(jobs)
    assert await store.stats(since=NOW, width=1.0) == await memory.stats(since=NOW, width=1.0)
    assert sum(b.succeeded for b in await store.stats(since=NOW + 0.5, width=60.0)) == 1_645
    listed = await store.list_jobs(limit=5_000)  # read in steps of 2,000
    assert listed == await memory.list_jobs(limit=5_000) and len(listed) == len(jobs)
    assert await store.purge(before=NOW + 1) == len(jobs)


async def test_a_search_looks_through_the_newest_jobs_only(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import backlane.stores.redis as redis_store

    oldest = make_job(task="rare", created_at=NOW - 10)
    newer = [make_job(task="common", created_at=NOW + n) for n in range(4)]
    await store.enqueue([oldest, *newer])
    assert [j.id for j in await store.list_jobs(task="rare")] == [oldest.id]
    monkeypatch.setattr(redis_store, "_SCAN", 2)
    monkeypatch.setattr(redis_store, "SEARCH_DEPTH", 4)  # the four newer jobs only
    assert await store.list_jobs(task="rare") == []
    assert await store.list_jobs(text="rare") == []
    assert len(await store.list_jobs(task="common")) == 4
    assert [j.id for j in await store.list_jobs()][-1] == oldest.id  # unfiltered: all


async def test_a_job_whose_attempts_were_changed_by_hand_does_not_stop_claims(
    store: RedisStore,
) -> None:
    # the claim script counts the attempt itself: a count that is not a number must not
    # fail it (every later claim would fail the same way)
    bad, good = await store.enqueue([make_job(), make_job()])
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.hset(f"{store.prefix}job:{bad.id}", "attempts", "x")
    finally:
        client.close()
    claimed = await store.claim(**claim_args())
    assert [job.id for job in claimed] == [good.id]
    assert await store.counts() == {"default": {S.RUNNING: 1, S.FAILED: 1}}
