"""How fast is backlane on Redis? Drain, enqueue rate, and enqueue-to-start latency.

* drain: ``--jobs`` no-op jobs stored in batches, then 1 or 2 ``backlane worker``
  processes run them all; jobs/s counts from the first job started to the last finished
  (read from the store), so process start-up is left out;
* enqueue, one by one: sequential ``await noop.enqueue(n)`` from one client (argument
  validation and encoding included), and the store alone (``store.enqueue([job])``);
* enqueue, in batches: ``lane.enqueue_jobs`` with ``--batch`` jobs per call (jobs built
  inside the timing), and the store alone;
* latency: one worker process, idle, while one client enqueues ``--rate`` jobs/s for
  ``--seconds``; each job's task returns ``time.time()`` minus the time taken just before
  its ``enqueue`` call, so the figure covers the enqueue round trip, the wake-up or poll
  that notices the job, the claim, and the start of the task. Measured twice: with the
  worker as shipped (it waits on ``RedisStore.wait_for_work``, the store's wake-up), and
  with that wake-up switched off in the worker process, so that the worker polls the store
  (5 ms growing to 250 ms while idle), to show what the wake-up is worth;
* the store's own share of that: from just before ``store.enqueue([job])`` to the job
  claimed by a process that waits on ``wait_for_work`` between claims, as a worker does.

With each throughput figure goes what it cost: the time Redis spent in backlane's scripts
per job (``INFO commandstats``; exact on a Redis of one's own, ``--redis`` pointing at a
``redis-server --port 6390 --save '' --appendonly no``, inflated by others' scripts on a
shared one), and, for drains, the worker processes' CPU per job.

Every figure is the median of ``--rounds`` rounds, each on a fresh key prefix, removed
afterwards. Progress goes to stderr, the Markdown table to stdout.

    .venv/bin/python benchmarks/redis_store.py [--redis redis://127.0.0.1:6379/0] [--rounds 3]

This module is also the worker processes' lane: ``backlane worker redis_store:lane``, with
``BACKLANE_URL`` naming the store, and ``REDIS_BENCH_POLL=1`` to switch the wake-up off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from backlane import Backlane, Job, JobState
from backlane.stores.base import Store

HERE = Path(__file__).resolve().parent
lane = Backlane(os.environ.get("BACKLANE_URL", "memory://"))


@lane.task(name="redis_store:noop", retries=0)
async def noop(n: int) -> None:
    """Does nothing."""


@lane.task(name="redis_store:stamp", retries=0)
async def stamp(sent: float) -> float:
    """Seconds from ``sent`` (taken just before the enqueue call) to this start."""
    return time.time() - sent


if os.environ.get("REDIS_BENCH_POLL") == "1":  # the worker polls: no store wake-ups
    type(lane.store).wait_for_work = Store.wait_for_work  # type: ignore[method-assign]


# -- helpers ---------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def fresh_url(base: str) -> Iterator[str]:
    """``base`` with a key prefix of its own; the prefix's keys are removed afterwards."""
    import redis

    prefix = f"bench:{uuid.uuid4().hex[:10]}:"
    try:
        yield f"{base}?prefix={prefix}"
    finally:
        client = redis.Redis.from_url(base)
        keys = list(client.scan_iter(match=f"{prefix}*", count=5000))
        for start in range(0, len(keys), 5000):
            client.delete(*keys[start : start + 5000])
        client.close()


def bound(url: str) -> Backlane:
    """A lane on ``url`` knowing this module's tasks under their names."""
    other = Backlane(url)
    for task in (noop, stamp):
        other.task(name=task.name, retries=0)(task.func)
    return other


def worker_processes(url: str, count: int, *, poll: bool = False) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "BACKLANE_URL": url, "PYTHONPATH": str(HERE)}
    if poll:
        env["REDIS_BENCH_POLL"] = "1"
    command = [sys.executable, "-m", "backlane", "worker", "redis_store:lane"]
    return [
        subprocess.Popen(
            command, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for _ in range(count)
    ]


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for proc in processes:
        proc.send_signal(signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def wait_until(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


def script_usec(url: str) -> float:
    """Microseconds Redis has spent in Lua scripts and functions (EVAL, EVALSHA, FCALL)
    since its stats were reset: every client's, not only this lane's."""
    import redis

    client = redis.Redis.from_url(url.partition("?")[0])
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    names = ("cmdstat_eval", "cmdstat_evalsha", "cmdstat_fcall")
    return float(sum(stats.get(name, {}).get("usec", 0) for name in names))


def cpu_seconds(pid: int) -> float:
    """User and system CPU a live process has used (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def noop_jobs(lane_: Backlane, first: int, count: int) -> list[Job]:
    task = lane_.tasks[noop.name]
    return [task.build_job((n,), {}) for n in range(first, first + count)]


# -- measurements ----------------------------------------------------------------------------


async def enqueue_one_by_one(url: str, count: int) -> tuple[float, float, float]:
    """Jobs/s of sequential ``noop.enqueue`` calls, and of ``store.enqueue([job])``; the
    script time per job of the latter (us)."""
    lane_ = bound(url)
    task = lane_.tasks[noop.name]
    async with lane_:
        await task.enqueue(-1)
        start = time.perf_counter()
        for n in range(count):
            await task.enqueue(n)
        api = count / (time.perf_counter() - start)
        jobs = noop_jobs(lane_, 0, count)
        used = script_usec(url)
        start = time.perf_counter()
        for job in jobs:
            await lane_.store.enqueue([job])
        store = count / (time.perf_counter() - start)
        used = (script_usec(url) - used) / count
    return api, store, used


async def enqueue_batches(url: str, count: int, batch: int) -> tuple[float, float, float]:
    """Jobs/s of ``enqueue_jobs`` in batches (jobs built inside the timing), and of
    ``store.enqueue`` with jobs built beforehand; the script time per job of the latter
    (us)."""
    lane_ = bound(url)
    async with lane_:
        start = time.perf_counter()
        for first in range(0, count, batch):
            await lane_.enqueue_jobs(noop_jobs(lane_, first, min(batch, count - first)))
        api = count / (time.perf_counter() - start)
        built = [
            noop_jobs(lane_, first, min(batch, count - first)) for first in range(0, count, batch)
        ]
        used = script_usec(url)
        start = time.perf_counter()
        for jobs in built:
            await lane_.store.enqueue(jobs)
        store = count / (time.perf_counter() - start)
        used = (script_usec(url) - used) / count
    return api, store, used


async def drain(url: str, count: int, processes: int) -> tuple[float, float, float]:
    """Jobs/s of ``processes`` worker processes running ``count`` stored no-op jobs; the
    script time per job (us) and the workers' CPU per job (us, start-up included)."""
    lane_ = bound(url)
    async with lane_:
        for first in range(0, count, 1000):
            await lane_.enqueue_jobs(noop_jobs(lane_, first, min(1000, count - first)))
        used = script_usec(url)
        workers = worker_processes(url, processes)
        try:

            async def all_done() -> bool:
                counts = await lane_.store.counts()
                return counts.get("default", {}).get(JobState.SUCCEEDED, 0) == count

            await wait_until(all_done, 300, f"{count} jobs drained")
            cpu = sum(cpu_seconds(proc.pid) for proc in workers) / count * 1e6
            used = (script_usec(url) - used) / count
        finally:
            stop(workers)
        jobs = await lane_.store.list_jobs(state=JobState.SUCCEEDED, limit=count)
        first = min(job.started_at or 0.0 for job in jobs)
        last = max(job.finished_at or 0.0 for job in jobs)
        return count / (last - first), used, cpu


async def latency(url: str, rate: float, seconds: float, *, poll: bool) -> tuple[float, float]:
    """p50 and p99 (ms) from just before ``enqueue`` to the task's start, with one idle
    worker process and one client enqueueing ``rate`` jobs/s."""
    lane_ = bound(url)
    task = lane_.tasks[stamp.name]
    count = int(rate * seconds)
    async with lane_:
        workers = worker_processes(url, 1, poll=poll)
        try:
            warmup = await task.enqueue(time.time())  # the worker is up once this one ran

            async def warmed() -> bool:
                counts = await lane_.store.counts()
                return counts.get("default", {}).get(JobState.SUCCEEDED, 0) == 1

            await wait_until(warmed, 30, "the worker started")
            await asyncio.sleep(0.5)  # let it go idle
            start = time.perf_counter()
            for n in range(count):
                pause = start + n / rate - time.perf_counter()
                if pause > 0:
                    await asyncio.sleep(pause)
                await task.enqueue(time.time())

            async def all_done() -> bool:
                counts = await lane_.store.counts()
                return counts.get("default", {}).get(JobState.SUCCEEDED, 0) == count + 1

            await wait_until(all_done, 60, "every stamped job ran")
        finally:
            stop(workers)
        jobs = await lane_.store.list_jobs(state=JobState.SUCCEEDED, limit=count + 1)
        delays = sorted(lane_.decode_result(job) for job in jobs if job.id != warmup.id)
        p50 = statistics.median(delays)
        p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
        return p50 * 1000, p99 * 1000


async def claimer(url: str, count: int) -> None:
    """The other end of ``store_latency``, in a process of its own: claim ``count`` jobs,
    waiting on the store between claims as an idle worker does, and print how long after
    its ``meta["sent"]`` each job was in hand (a JSON list of seconds)."""
    store = bound(url).store
    await store.open()
    now = time.time()
    await store.claim(worker_id="c", queues=None, limit=1, now=now, lease_until=now + 60)
    await store.wait_for_work(5.0)  # subscribed from here on
    print("ready", flush=True)
    delays: list[float] = []
    while len(delays) < count:
        now = time.time()
        jobs = await store.claim(
            worker_id="c", queues=None, limit=20, now=now, lease_until=now + 60
        )
        held = time.time()
        delays.extend(held - job.meta["sent"] for job in jobs)
        if not jobs:
            await store.wait_for_work(0.25)
    await store.close()
    print(json.dumps(delays), flush=True)


async def store_latency(url: str, rate: float, seconds: float) -> tuple[float, float]:
    """p50 and p99 (ms) from just before ``store.enqueue([job])`` to the job being in the
    hands of a claimer in another process that waits on ``wait_for_work``: the store's own
    share of enqueue-to-start, without the worker's and the task API's."""
    lane_ = bound(url)
    count = int(rate * seconds)
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, __file__, "--claimer", url, str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        async with lane_:
            ready = await asyncio.to_thread(proc.stdout.readline)
            if ready.strip() != "ready":
                raise RuntimeError("the claimer did not start")
            start = time.perf_counter()
            for n, job in enumerate(noop_jobs(lane_, 0, count)):
                pause = start + n / rate - time.perf_counter()
                if pause > 0:
                    await asyncio.sleep(pause)
                job.meta = {"sent": time.time()}
                await lane_.store.enqueue([job])
            delays = sorted(json.loads(await asyncio.to_thread(proc.stdout.readline)))
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    return statistics.median(delays) * 1000, p99 * 1000


# -- report ----------------------------------------------------------------------------------


def main() -> None:
    if sys.argv[1:2] == ["--claimer"]:
        asyncio.run(claimer(sys.argv[2], int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL, no prefix")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs drained per run")
    parser.add_argument("--one-by-one", type=int, default=5_000, help="sequential enqueues")
    parser.add_argument("--batch-jobs", type=int, default=50_000, help="jobs enqueued in batches")
    parser.add_argument("--batch", type=int, default=1_000, help="jobs per batch")
    parser.add_argument("--rate", type=float, default=200.0, help="arrivals/s for latency")
    parser.add_argument("--seconds", type=float, default=5.0, help="latency run length")
    args = parser.parse_args()

    rows: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)
        log(f"  {name}: {value:,.2f}")

    for round_no in range(args.rounds):
        log(f"round {round_no + 1} of {args.rounds}")
        with fresh_url(args.redis) as url:
            api, store, used = asyncio.run(enqueue_one_by_one(url, args.one_by_one))
        note("enqueue one by one: `await task.enqueue(n)` (jobs/s)", api)
        note("enqueue one by one: `store.enqueue([job])` (jobs/s)", store)
        note("enqueue one by one: Redis script time per job (us)", used)
        with fresh_url(args.redis) as url:
            api, store, used = asyncio.run(enqueue_batches(url, args.batch_jobs, args.batch))
        note(f"enqueue in batches of {args.batch}: `lane.enqueue_jobs` (jobs/s)", api)
        note(f"enqueue in batches of {args.batch}: `store.enqueue` (jobs/s)", store)
        note(f"enqueue in batches of {args.batch}: Redis script time per job (us)", used)
        for processes in (1, 2):
            with fresh_url(args.redis) as url:
                rate, used, cpu = asyncio.run(drain(url, args.jobs, processes))
            note(f"drain, async no-op, {processes} worker process(es) (jobs/s)", rate)
            note(f"drain, {processes} process(es): Redis script time per job (us)", used)
            note(f"drain, {processes} process(es): worker CPU per job (us)", cpu)
        with fresh_url(args.redis) as url:
            p50, p99 = asyncio.run(store_latency(url, args.rate, args.seconds))
        note(f"store alone, enqueue-to-claimed p50 at {args.rate:g}/s (ms)", p50)
        note(f"store alone, enqueue-to-claimed p99 at {args.rate:g}/s (ms)", p99)
        for poll, how in ((False, "store wake-up"), (True, "wake-up off, worker polls")):
            with fresh_url(args.redis) as url:
                p50, p99 = asyncio.run(latency(url, args.rate, args.seconds, poll=poll))
            note(f"enqueue-to-start p50 at {args.rate:g}/s, {how} (ms)", p50)
            note(f"enqueue-to-start p99 at {args.rate:g}/s, {how} (ms)", p99)

    print(
        f"\nRedis store, median of {args.rounds} rounds; drains of {args.jobs:,} jobs, "
        f"worker concurrency {lane.settings.concurrency}\n"
    )
    print("| what | median | runs |")
    print("|---|---:|---|")
    for name, values in rows.items():
        runs = ", ".join(f"{v:,.2f}" if v < 100 else f"{v:,.0f}" for v in values)
        median = statistics.median(values)
        shown = f"{median:,.2f}" if median < 100 else f"{median:,.0f}"
        print(f"| {name} | {shown} | {runs} |")


if __name__ == "__main__":
    main()
