"""What every peer's tasks and clients share: where to report, and the work each task does.

Imported in three kinds of process (the orchestrator, a peer's client, a peer's worker), in
whichever virtual environment the peer lives; it needs only the standard library and
redis-py. Everything comes from ``BENCH_*`` environment variables that ``compare.py`` sets:

* ``BENCH_REDIS_URL``: the Redis database the benchmark owns (peers' queues and the tallies);
* ``BENCH_KEY``: prefix of the tally keys below;
* ``BENCH_PG_URL``: the PostgreSQL database the benchmark owns (created and dropped by it);
* ``BENCH_DIR``: a scratch folder for SQLite files;
* ``BENCH_CPU_LOOPS``: iterations of the CPU task's loop (calibrated to ~20 ms here).

The tasks report with one Redis call each, so every peer pays the same:

* ``noop(total)``: ``INCR {key}:count``; a job that makes it 1, or ``total`` or more, also
  pushes ``"<count> <time>"`` onto ``{key}:marks`` (the first and last finish of a drain;
  a stray job, such as one a peer runs again, only moves the count);
* ``probe(sent)``: pushes ``start - sent`` (enqueue-to-start, seconds) onto ``{key}:lat``;
* ``sleep`` / ``cpu`` (the guide's exercise): 100 ms of sleep or ~20 ms of CPU, then push the
  finish time onto ``{key}:done``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
KEY = os.environ.get("BENCH_KEY", "bench:m")
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/backlane_bench")
DIR = os.environ.get("BENCH_DIR", "/tmp/backlane-bench")
CPU_LOOPS = int(os.environ.get("BENCH_CPU_LOOPS", "400000"))

COUNT = f"{KEY}:count"
MARKS = f"{KEY}:marks"
LAT = f"{KEY}:lat"
DONE = f"{KEY}:done"
SLEEP_S = 0.1

_sync: Any = None
_async: dict[int, Any] = {}


def sync_redis() -> Any:
    """This process's Redis client (created on first use, so after any fork)."""
    global _sync
    if _sync is None or _sync.connection_pool.pid != os.getpid():
        import redis

        _sync = redis.Redis.from_url(REDIS_URL)
    return _sync


def async_redis() -> Any:
    """The running event loop's asyncio Redis client. Its pool makes a task wait for a free
    connection rather than fail (redis-py 8 otherwise refuses a 101st at once)."""
    loop = asyncio.get_running_loop()
    client = _async.get(id(loop))
    if client is None:
        import redis.asyncio

        pool = redis.asyncio.BlockingConnectionPool.from_url(REDIS_URL, max_connections=100)
        client = _async[id(loop)] = redis.asyncio.Redis(connection_pool=pool)
    return client


def burn() -> int:
    """The CPU task's work: a fixed number of loop iterations (~20 ms on this machine)."""
    acc = 0
    for i in range(CPU_LOOPS):
        acc += i * i % 7
    return acc


# -- the task bodies, sync and async -------------------------------------------------------


def noop_sync(total: int) -> None:
    client = sync_redis()
    count = client.incr(COUNT)
    if count == 1 or count >= total:
        client.rpush(MARKS, f"{count} {time.time()}")


async def noop_async(total: int) -> None:
    client = async_redis()
    count = await client.incr(COUNT)
    if count == 1 or count >= total:
        await client.rpush(MARKS, f"{count} {time.time()}")


def probe_sync(sent: float) -> None:
    started = time.time()
    sync_redis().rpush(LAT, started - sent)


async def probe_async(sent: float) -> None:
    started = time.time()
    await async_redis().rpush(LAT, started - sent)


def sleep_sync() -> None:
    time.sleep(SLEEP_S)
    sync_redis().rpush(DONE, time.time())


async def sleep_async() -> None:
    await asyncio.sleep(SLEEP_S)
    await async_redis().rpush(DONE, time.time())


def cpu_sync() -> None:
    burn()
    sync_redis().rpush(DONE, time.time())
