"""The PostgreSQL store: throughput, enqueue-to-start latency, and claim cost as ended jobs
pile up.

* throughput: ``--jobs`` no-op jobs stored in batches, then 1 or 2 ``backlane worker``
  processes (``apps/noop_tasks.py``, concurrency ``--concurrency``) drain them. Jobs/s
  counts from the first job started to the last one finished (read from the store), so
  process start-up is left out.
* latency: one worker process waits for work; one client enqueues one job at a time
  (``task.enqueue``) at a fixed arrival rate (``--rate`` per second) for ``--latency-jobs``
  jobs. Enqueue-to-start is ``started_at - created_at`` of each job: from the moment the
  client built it to the moment a worker claimed it, commit and wake-up included.
  The same again with ``synchronous_commit=off`` (libpq ``options``), the documented way
  to trade a server crash's last fraction of a second for latency.
* claim cost: one job at a time claimed and finished through the store, behind a backlog
  of 1,000 queued jobs, on a schema with no ended job and with 1,000,000 (inserted with
  ``generate_series``, then ``ANALYZE``, as autovacuum would).

Each figure is the median of ``--rounds`` runs, each on a fresh schema of the database
``BACKLANE_BENCH_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/test``),
dropped afterwards. Progress goes to stderr, the Markdown table to stdout.

    .venv/bin/python benchmarks/postgres_store.py [--jobs 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from backlane import Backlane, Task
from backlane.jobs import JobState
from backlane.stores.base import Outcome
from backlane.stores.postgres import PostgresStore
from backlane.stores.postgres_schema import parse_url

APPS = Path(__file__).resolve().parent / "apps"
sys.path.insert(0, str(APPS))
SERVER = os.environ.get("BACKLANE_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
ASYNC_COMMIT = "&options=-csynchronous_commit%3Doff"
"""The documented opt-out of waiting for the WAL flush at each commit (docs/postgres.md)."""
PROCRASTINATE_JOBS_PER_S = 1_008
"""Procrastinate's throughput on this machine's class of server (issue 8's baseline)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A store URL on a new schema, dropped afterwards."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        yield f"{SERVER}?schema={schema}"
    finally:
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def bench_lane(url: str) -> tuple[Backlane, Task[..., None]]:
    """A lane on ``url`` and, bound to it, ``noop_tasks.noop`` under its own name."""
    lane = Backlane(url)
    original: Task[..., None] = importlib.import_module("noop_tasks").noop
    return lane, lane.task(name=original.name)(original.func)


def start_workers(
    url: str, count: int, concurrency: int, folder: Path
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for n in range(count):
        with (folder / f"worker-{n}.log").open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "backlane",
                        "worker",
                        "noop_tasks:lane",
                        "--concurrency",
                        str(concurrency),
                    ],
                    cwd=APPS,
                    env={**os.environ, "BACKLANE_URL": url},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_started(folder: Path, count: int, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 30
    while sum("started" in (folder / f"worker-{n}.log").read_text() for n in range(count)) < count:
        if any(proc.poll() is not None for proc in procs) or time.monotonic() > deadline:
            logs = "\n".join((folder / f"worker-{n}.log").read_text() for n in range(count))
            raise RuntimeError(f"the workers did not start:\n{logs}")
        time.sleep(0.05)


# -- throughput ------------------------------------------------------------------------------


async def store_jobs(url: str, count: int, batch: int) -> None:
    lane, noop = bench_lane(url)
    async with lane:
        for first in range(0, count, batch):
            size = min(batch, count - first)
            await lane.enqueue_jobs([noop.build_job((n,), {}) for n in range(first, size + first)])


def throughput(count: int, workers: int, concurrency: int, batch: int) -> float:
    """Jobs/s of ``workers`` worker processes draining ``count`` stored no-op jobs."""
    with fresh_schema() as url, tempfile.TemporaryDirectory(prefix="backlane-pg-") as tmp:
        asyncio.run(store_jobs(url, count, batch))
        schema = parse_url(url).schema
        procs = start_workers(url, workers, concurrency, Path(tmp))
        try:
            with psycopg.connect(SERVER, autocommit=True) as conn:
                deadline = time.monotonic() + 300
                while True:
                    left = conn.execute(
                        f'SELECT count(*) FROM "{schema}".jobs '
                        "WHERE state IN ('queued', 'running')"
                    ).fetchone()
                    if left is not None and left[0] == 0:
                        break
                    if any(proc.poll() is not None for proc in procs):
                        raise RuntimeError("a worker exited")
                    if time.monotonic() > deadline:
                        raise RuntimeError("the workers did not drain the queue in 300 s")
                    time.sleep(0.02)
                first, last, done = conn.execute(
                    f'SELECT min(started_at), max(finished_at), count(*) FROM "{schema}".jobs '
                    "WHERE state = 'succeeded'"
                ).fetchone() or (0.0, 0.0, 0)
        finally:
            stop_workers(procs)
    if done != count:
        raise RuntimeError(f"{count - done} of {count} jobs did not succeed")
    return float(count / (last - first))


# -- latency ---------------------------------------------------------------------------------


async def arrive(url: str, count: int, rate: float) -> tuple[list[str], list[float]]:
    """Enqueue ``count`` jobs one at a time, ``rate`` per second; their ids and how long
    each ``enqueue`` call took."""
    lane, noop = bench_lane(url)
    ids: list[str] = []
    calls: list[float] = []
    async with lane:
        await noop.enqueue(-1)  # warm up the pool and the statements
        began = time.perf_counter()
        for n in range(count):
            await asyncio.sleep(max(0.0, began + n / rate - time.perf_counter()))
            start = time.perf_counter()
            handle = await noop.enqueue(n)
            calls.append(time.perf_counter() - start)
            ids.append(handle.id)
    return ids, calls


def latency(
    count: int, rate: float, concurrency: int, options: str = ""
) -> tuple[list[float], list[float]]:
    """Enqueue-to-start latencies of ``count`` jobs arriving at ``rate`` per second with
    one worker process waiting, and the durations of the enqueue calls. ``options`` is
    added to the URL of the client and the worker."""
    with fresh_schema() as url, tempfile.TemporaryDirectory(prefix="backlane-pg-") as tmp:
        url += options
        asyncio.run(PostgresStore(url).migrate())
        procs = start_workers(url, 1, concurrency, Path(tmp))
        try:
            wait_started(Path(tmp), 1, procs)
            time.sleep(0.5)  # the worker is idle, listening
            ids, calls = asyncio.run(arrive(url, count, rate))
            schema = parse_url(url).schema
            with psycopg.connect(SERVER, autocommit=True) as conn:
                deadline = time.monotonic() + 60
                while True:
                    rows = conn.execute(
                        f'SELECT started_at - created_at FROM "{schema}".jobs '
                        "WHERE id = ANY(%s) AND started_at IS NOT NULL",
                        (ids,),
                    ).fetchall()
                    if len(rows) == len(ids):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("jobs did not start within 60 s")
                    time.sleep(0.05)
        finally:
            stop_workers(procs)
    return [float(row[0]) for row in rows], calls


# -- claim cost ------------------------------------------------------------------------------


async def claim_cost(url: str, samples: int) -> tuple[list[float], list[float]]:
    """Claim-then-finish of one job at a time, ``samples`` times, behind 1,000 queued
    jobs: the claim durations and the finish durations."""
    store = PostgresStore(url)
    await store.open()
    _, noop = bench_lane(url)
    try:
        await store.enqueue([noop.build_job((n,), {}) for n in range(1_000 + samples)])
        claims: list[float] = []
        finishes: list[float] = []
        for _ in range(samples):
            now = time.time()
            start = time.perf_counter()
            (job,) = await store.claim(
                worker_id="bench", queues=None, limit=1, now=now, lease_until=now + 30
            )
            claims.append(time.perf_counter() - start)
            start = time.perf_counter()
            ended = Outcome(
                job_id=job.id,
                worker_id="bench",
                state=JobState.SUCCEEDED,
                finished_at=time.time(),
                keep_until=time.time() + 86_400,
            )
            await store.finish([ended])
            finishes.append(time.perf_counter() - start)
        return claims, finishes
    finally:
        await store.close()


def add_finished_rows(url: str, count: int) -> float:
    """Insert ``count`` succeeded jobs in one statement; the seconds it took."""
    schema = parse_url(url).schema
    start = time.perf_counter()
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".jobs (id, task, payload, queue, state, attempts, run_at, '
            "created_at, started_at, finished_at, worker_id, result, keep_until) "
            "SELECT 'done-' || g, 'noop_tasks:noop', '{\"args\":[1]}', 'default', "
            "'succeeded', 1, t - 2, t - 2, t - 1, t, 'old-worker', 'null', t + 86400 "
            "FROM generate_series(1, %s) AS g, "
            "LATERAL (SELECT extract(epoch FROM now()) - 86000 + g * 0.01 AS t) AS times",
            (count,),
        )
        took = time.perf_counter() - start
        conn.execute(f'ANALYZE "{schema}".jobs')
    return took


# -- the report ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs drained per run")
    parser.add_argument("--concurrency", type=int, default=50, help="per worker process")
    parser.add_argument("--batch", type=int, default=1_000, help="jobs per enqueue_jobs call")
    parser.add_argument("--rate", type=float, default=200.0, help="arrivals per second")
    parser.add_argument("--latency-jobs", type=int, default=2_000)
    parser.add_argument("--finished", type=int, default=1_000_000, help="ended rows added")
    parser.add_argument("--samples", type=int, default=1_000, help="claims timed per run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    rows: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)
        log(f"  {name}: {value:,.2f}")

    for round_no in range(args.rounds):
        log(f"round {round_no + 1}")
        for workers in (1, 2):
            rate = throughput(args.jobs, workers, args.concurrency, args.batch)
            note(
                f"throughput, {workers} worker process{'es' if workers > 1 else ''} (jobs/s)", rate
            )
        waits, calls = latency(args.latency_jobs, args.rate, args.concurrency)
        note("enqueue-to-start p50 (ms)", statistics.median(waits) * 1000)
        note("enqueue-to-start p99 (ms)", percentile(waits, 0.99) * 1000)
        note("enqueue call p50 (ms)", statistics.median(calls) * 1000)
        note("enqueue call p99 (ms)", percentile(calls, 0.99) * 1000)
        waits, calls = latency(args.latency_jobs, args.rate, args.concurrency, ASYNC_COMMIT)
        note("enqueue-to-start p50, synchronous_commit=off (ms)", statistics.median(waits) * 1000)
        note("enqueue-to-start p99, synchronous_commit=off (ms)", percentile(waits, 0.99) * 1000)
        with fresh_schema() as url:
            claims, finishes = asyncio.run(claim_cost(url, args.samples))
            note("claim, 0 ended rows: p50 (ms)", statistics.median(claims) * 1000)
            note("claim, 0 ended rows: p99 (ms)", percentile(claims, 0.99) * 1000)
            note("finish, 0 ended rows: p50 (ms)", statistics.median(finishes) * 1000)
            took = add_finished_rows(url, args.finished)
            note(f"insert {args.finished:,} ended rows (s)", took)
            claims, finishes = asyncio.run(claim_cost(url, args.samples))
            note(f"claim, {args.finished:,} ended rows: p50 (ms)", statistics.median(claims) * 1000)
            note(f"claim, {args.finished:,} ended rows: p99 (ms)", percentile(claims, 0.99) * 1000)
            note(
                f"finish, {args.finished:,} ended rows: p50 (ms)",
                statistics.median(finishes) * 1000,
            )

    print(
        f"\nPostgreSQL store, median of {args.rounds} rounds; {args.jobs:,} no-op jobs per "
        f"drain, concurrency {args.concurrency} per worker process; latency at "
        f"{args.rate:g} arrivals/s over {args.latency_jobs:,} jobs, one worker process\n"
    )
    print("| what | median |")
    print("|---|---:|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):,.2f} |")
    best = max(statistics.median(v) for k, v in rows.items() if k.startswith("throughput"))
    print(
        f"\nTarget (issue 8): >= 3 x Procrastinate's {PROCRASTINATE_JOBS_PER_S:,} jobs/s = "
        f"{3 * PROCRASTINATE_JOBS_PER_S:,} jobs/s (best here: {best:,.0f}); "
        "enqueue-to-start p99 <= 3 ms."
    )


if __name__ == "__main__":
    main()
