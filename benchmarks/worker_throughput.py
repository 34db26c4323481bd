"""How fast does one client enqueue, and one worker process drain, no-op jobs on SQLite?

* enqueue, one by one: sequential ``await noop.enqueue(n)`` calls from one client;
* enqueue, in batches: ``lane.enqueue_jobs`` with ``--batch`` jobs per call;
* drain: ``--jobs`` no-op jobs stored in batches, then one ``backlane worker`` process
  (``python -m backlane worker noop_tasks:lane``) runs them all. Jobs/s counts from the
  first job started to the last one finished (read from the store), so process start-up
  is left out; "wall" is from spawning the process to the store being empty. "CPU/job" is
  the worker process's CPU time (user + system, every thread; Linux /proc) from its first
  finished job to the last, per job run meanwhile: it moves far less than jobs/s on a
  shared machine.

Each figure is the median of ``--rounds`` runs, each on a fresh SQLite file.

    .venv/bin/python benchmarks/worker_throughput.py [--jobs 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from backlane import Backlane, Task

APPS = Path(__file__).resolve().parent / "apps"
sys.path.insert(0, str(APPS))


@dataclass
class Drain:
    jobs_per_s: float
    wall_s: float
    cpu_us_per_job: float | None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of every thread of process ``pid`` so far (Linux only)."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return None
    ticks = 0
    for task in tasks.iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that just ended
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def bench_lane(url: str, task: str) -> tuple[Backlane, Task[..., None]]:
    """A lane on ``url`` and, bound to it, the task ``noop_tasks.<task>`` (same name)."""
    lane = Backlane(url)
    original: Task[..., None] = getattr(importlib.import_module("noop_tasks"), task)
    return lane, lane.task(name=original.name)(original.func)


async def enqueue_one_by_one(url: str, count: int) -> float:
    """Jobs/s of ``count`` sequential ``noop.enqueue`` calls."""
    lane, noop = bench_lane(url, "noop")
    async with lane:
        await noop.enqueue(-1)  # migrate the file and warm up outside the timing
        start = time.perf_counter()
        for n in range(count):
            await noop.enqueue(n)
        return count / (time.perf_counter() - start)


async def enqueue_batches(url: str, count: int, batch: int, task: str = "noop") -> float:
    """Jobs/s of storing ``count`` jobs with ``enqueue_jobs``, ``batch`` per call (the
    arguments are validated and encoded inside the timing, as ``enqueue`` would)."""
    lane, chosen = bench_lane(url, task)
    async with lane:
        start = time.perf_counter()
        for first in range(0, count, batch):
            size = min(batch, count - first)
            jobs = [chosen.build_job((n,), {}) for n in range(first, first + size)]
            await lane.enqueue_jobs(jobs)
        return count / (time.perf_counter() - start)


def drain(folder: Path, count: int, batch: int, task: str, concurrency: int | None) -> Drain:
    """Store ``count`` jobs, then time one worker process running them all."""
    db = folder / "drain.db"
    url = f"sqlite:///{db}"
    asyncio.run(enqueue_batches(url, count, batch, task))
    command = [sys.executable, "-m", "backlane", "worker", "noop_tasks:lane"]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    log = folder / "worker.log"
    spawned = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=APPS,
            env={**os.environ, "BACKLANE_URL": url},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    cpu_start: tuple[int, float | None] | None = None  # (jobs done, CPU seconds) at the first
    cpu_end: float | None = None
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited:\n{log.read_text()}")
            if cpu_start is None:
                finished = "SELECT COUNT(*) FROM jobs WHERE state = 'succeeded'"
                done_now = conn.execute(finished).fetchone()[0]
                if done_now:
                    cpu_start = (done_now, cpu_seconds(proc.pid))
            query = "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')"
            if conn.execute(query).fetchone()[0] == 0:
                cpu_end = cpu_seconds(proc.pid)
                break
            if time.perf_counter() - spawned > 300:
                raise RuntimeError("the worker did not drain the queue in 300 s")
            time.sleep(0.01)
        wall = time.perf_counter() - spawned
        first, last, done = conn.execute(
            "SELECT MIN(started_at), MAX(finished_at), COUNT(*) FROM jobs WHERE state = 'succeeded'"
        ).fetchone()
    finally:
        conn.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if done != count:
        raise RuntimeError(f"{count - done} of {count} jobs did not succeed:\n{log.read_text()}")
    cpu_per_job = None
    if cpu_start is not None:
        done_then, cpu_then = cpu_start
        if cpu_then is not None and cpu_end is not None and count > done_then:
            cpu_per_job = (cpu_end - cpu_then) / (count - done_then) * 1e6
    return Drain(jobs_per_s=count / (last - first), wall_s=wall, cpu_us_per_job=cpu_per_job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs drained per run")
    parser.add_argument("--one-by-one", type=int, default=2_000, help="sequential enqueues")
    parser.add_argument("--batch", type=int, default=500, help="jobs per enqueue_jobs call")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    rows: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)
        print(f"  {name}: {value:,.0f}", file=sys.stderr, flush=True)

    drains = {
        "drain: async no-op, 1 worker process (concurrency 20)": ("noop", None),
        "drain: async no-op, 1 worker process (concurrency 100)": ("noop", 100),
        "drain: sync no-op, 1 worker process (concurrency 20)": ("noop_sync", None),
    }
    for round_no in range(args.rounds):
        print(f"round {round_no + 1}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="backlane-bench-") as tmp:
            folder = Path(tmp)
            rate = asyncio.run(enqueue_one_by_one(f"sqlite:///{folder}/one.db", args.one_by_one))
            note("enqueue: one by one (task.enqueue)", rate)
            url = f"sqlite:///{folder}/batch.db"
            rate = asyncio.run(enqueue_batches(url, args.jobs, args.batch))
            note(f"enqueue: batches of {args.batch} (enqueue_jobs)", rate)
            for name, (task, concurrency) in drains.items():
                (folder / "drain.db").unlink(missing_ok=True)
                result = drain(folder, args.jobs, args.batch, task, concurrency)
                note(name, result.jobs_per_s)
                walls.setdefault(name, []).append(result.wall_s)
                if result.cpu_us_per_job is not None:
                    cpus.setdefault(name, []).append(result.cpu_us_per_job)

    print(f"\nSQLite, median of {args.rounds} rounds; {args.jobs:,} jobs per drain\n")
    print("| what | jobs/s | wall s (incl. process start) | worker CPU us/job |")
    print("|---|---:|---:|---:|")
    for name, values in rows.items():
        wall = f"{statistics.median(walls[name]):.2f}" if name in walls else "-"
        cpu = f"{statistics.median(cpus[name]):.0f}" if name in cpus else "-"
        print(f"| {name} | {statistics.median(values):,.0f} | {wall} | {cpu} |")


if __name__ == "__main__":
    main()
