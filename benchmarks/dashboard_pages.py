"""How fast does the dashboard answer with 100,000 jobs in the store?

Fills a store with ``--rows`` jobs (default 100,000) spread over three queues,
five tasks and every state, most ended within the last hour so the charts have work to
do; starts the standalone dashboard (``python -m backlane dashboard``) on 127.0.0.1 as a
real process; then asks each page ``--requests`` times, one request at a time, over one
keep-alive connection, after a warm-up (the overview's very first answer, which reads
the whole hour's per-minute stats, is shown on its own line). Prints a Markdown table of
the median, 95th percentile and slowest answer per page, in milliseconds, measured by
the client.

The store is a fresh SQLite file, or the PostgreSQL database or Redis server ``--url``
names: the jobs go to a schema of their own (``?schema=`` of the URL, default
``bench_dashboard``) or under a key prefix of their own (``?prefix=``, default
``bench-dashboard:``), removed before and after the run.

    python benchmarks/dashboard_pages.py [--rows 100000] [--requests 30]
    python benchmarks/dashboard_pages.py --url postgresql://postgres@127.0.0.1:5432/test
    python benchmarks/dashboard_pages.py --url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from backlane.jobs import Job, JobState
from backlane.stores import store_from_url
from backlane.stores.base import WorkerRecord

BATCH = 5_000
TASKS = ["bench:send_email", "bench:export_csv", "bench:resize", "bench:cleanup", "bench:report"]
QUEUES = ["default", "mail", "media"]
MIX = [
    (JobState.SUCCEEDED, 0.70),
    (JobState.FAILED, 0.08),
    (JobState.CANCELLED, 0.02),
    (JobState.QUEUED, 0.17),
    (JobState.RUNNING, 0.03),
]
LANE_MODULE = """\
import os
from backlane import Backlane
lane = Backlane(os.environ["BACKLANE_URL"])
"""


def _job(n: int, now: float, rng: random.Random) -> Job:
    state = rng.choices([s for s, _ in MIX], [w for _, w in MIX])[0]
    created = now - rng.uniform(0, 7200)
    job = Job(
        task=rng.choice(TASKS),
        payload=json.dumps({"n": n, "email": f"user{n}@example.com", "note": "x" * 40}),
        queue=rng.choice(QUEUES),
        state=state,
        created_at=created,
        run_at=created,
    )
    if state is JobState.RUNNING:
        return job.copy(attempts=1, started_at=now - 5, lease_until=now + 30, worker_id="w")
    if state.terminal:
        ended = now - rng.uniform(0, 3600)
        job = job.copy(
            created_at=min(created, ended - 1),
            run_at=min(created, ended - 1),
            attempts=1,
            started_at=ended - rng.uniform(0.01, 2),
            finished_at=ended,
            keep_until=ended + 7 * 86400,
        )
    if state is JobState.SUCCEEDED:
        job = job.copy(result='"ok"')
    if state is JobState.FAILED:
        job = job.copy(
            error={"type": "ValueError", "message": f"bad row {n}", "traceback": "Traceback\n"}
        )
    return job


async def fill(url: str, rows: int) -> str:
    """Store ``rows`` jobs and a worker's heartbeat; returns the id of a failed job."""
    store = store_from_url(url)
    await store.open()
    rng = random.Random(7)
    now = time.time()
    failed = ""
    try:
        for start in range(0, rows, BATCH):
            jobs = [_job(n, now, rng) for n in range(start, min(rows, start + BATCH))]
            stored = await store.enqueue(jobs)
            failed = failed or next((j.id for j in stored if j.state is JobState.FAILED), "")
        held = tuple(j.id for j in await store.list_jobs(state=JobState.RUNNING, limit=20))
        await store.beat(WorkerRecord("host:1:bench", now - 600, now, 20, None, held, 1234))
    finally:
        await store.close()
    return failed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def measure(base: str, paths: list[str], requests: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {}
    with httpx.Client(base_url=base, headers={"accept": "text/html"}, timeout=30) as client:
        started = time.perf_counter()  # the overview reads the whole hour's stats once
        assert client.get("/").status_code == 200
        timings["/ (first request: the hour's stats read)"] = [
            (time.perf_counter() - started) * 1000
        ]
        for path in paths:
            for _ in range(3):  # warm-up
                assert client.get(path).status_code == 200, path
            samples = []
            for _ in range(requests):
                started = time.perf_counter()
                reply = client.get(path)
                samples.append((time.perf_counter() - started) * 1000)
                assert reply.status_code == 200, (path, reply.status_code)
            timings[path] = samples
    return timings


def postgres_url(url: str) -> str:
    """``url`` with its ``schema`` (default ``bench_dashboard``), that schema dropped."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("schema", "bench_dashboard")
    drop_schema(urlunsplit(parts._replace(query="")), query["schema"])
    return urlunsplit(parts._replace(query=urlencode(query)))


def drop_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def redis_url(url: str) -> str:
    """``url`` with a ``prefix`` of its own (``bench-dashboard:`` unless given), emptied."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("prefix", "bench-dashboard:")
    drop_prefix(urlunsplit(parts._replace(query="")), query["prefix"])
    return urlunsplit(parts._replace(query=urlencode(query)))


def drop_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=10_000))
        for start in range(0, len(keys), 10_000):
            client.delete(*keys[start : start + 10_000])
    finally:
        client.close()


def main(rows: int, requests: int, given_url: str | None) -> None:
    kind = "SQLite"
    with tempfile.TemporaryDirectory() as folder:
        if given_url is None:
            url = f"sqlite:///{folder}/jobs.db"
        elif given_url.startswith(("redis://", "rediss://", "unix://")):
            url, kind = redis_url(given_url), "Redis"
        else:
            url, kind = postgres_url(given_url), "PostgreSQL"
        try:
            timings, failed = run(url, folder, rows, requests)
        finally:
            parts = urlsplit(url)
            query = dict(parse_qsl(parts.query))
            if kind == "PostgreSQL":
                drop_schema(urlunsplit(parts._replace(query="")), query["schema"])
            elif kind == "Redis":
                drop_prefix(urlunsplit(parts._replace(query="")), query["prefix"])
    print(f"\nDashboard pages, {kind}, {rows:,} jobs; {requests} requests each; ms\n")
    print("| page | median | p95 | max |")
    print("|---|---:|---:|---:|")
    for path, samples in timings.items():
        ordered = sorted(samples)
        p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
        shown = path.replace(failed, "{id}").replace("|", "\\|")
        print(f"| `{shown}` | {statistics.median(ordered):.1f} | {p95:.1f} | {ordered[-1]:.1f} |")


def run(url: str, folder: str, rows: int, requests: int) -> tuple[dict[str, list[float]], str]:
    """Fill the store, serve the dashboard, measure; the timings and a failed job's id."""
    started = time.perf_counter()
    failed = asyncio.run(fill(url, rows))
    print(f"stored {rows:,} jobs in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    Path(folder, "bench_lane.py").write_text(LANE_MODULE)
    port = free_port()
    env = {**os.environ, "BACKLANE_URL": url}
    env.pop("BACKLANE_DASHBOARD_TOKEN", None)
    command = [sys.executable, "-m", "backlane", "dashboard", "bench_lane:lane"]
    command += ["--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/ui/static/dashboard.css", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the dashboard did not start") from None
                time.sleep(0.1)
        deep = rows // 50 // 2
        paths = [
            "/",
            "/ui/jobs",
            "/ui/jobs?state=failed",
            "/ui/jobs?queue=mail&state=succeeded",
            "/ui/jobs?task=bench%3Aexport_csv",
            "/ui/jobs?task=bench%3Anone",  # a task no job has
            "/ui/jobs?text=user4242%40",
            "/ui/jobs?text=no-such-text",
            f"/ui/jobs?page={deep}",
            f"/ui/jobs/{failed}",
            "/ui/schedules",
            "/ui/workers",
            "/metrics",
            f"/jobs/{failed}",
        ]
        timings = measure(base, paths, requests)
    finally:
        server.terminate()
        server.wait(timeout=10)
    return timings, failed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="jobs in the store")
    parser.add_argument("--requests", type=int, default=30, help="requests per page")
    parser.add_argument(
        "--url", help="a postgresql:// or redis:// URL (default: a fresh SQLite file)"
    )
    args = parser.parse_args()
    main(args.rows, args.requests, args.url)
