"""Does the SQLite store slow down as jobs pile up?

Measures the latency of the worker's hot path (claim one job, then finish it) and of
enqueueing one job, on three files: an empty one, one holding many ended jobs (history
waiting to be purged), and one holding a backlog of many queued jobs. Prints the median
and 99th percentile of each.

    python benchmarks/store_growth.py [--rows 100000] [--ops 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from backlane.jobs import Job, JobState
from backlane.stores.base import Outcome
from backlane.stores.sqlite import SQLiteStore

NOW = 1_700_000_000.0
BATCH = 5_000


def _job(state: JobState = JobState.QUEUED, **changes: object) -> Job:
    job = Job(task="bench:noop", payload='{"n":1}', created_at=NOW, run_at=NOW, state=state)
    return job.copy(**changes)


async def _fill(store: SQLiteStore, rows: int, kind: str) -> None:
    """Store ``rows`` jobs of ``kind``: ``ended`` (succeeded, kept a week) or ``backlog``
    (queued at a lower priority, so they stay claimable behind the jobs measured)."""
    for start in range(0, rows, BATCH):
        n = min(BATCH, rows - start)
        if kind == "ended":
            jobs = [
                _job(JobState.SUCCEEDED, attempts=1, started_at=NOW, finished_at=NOW,
                     result='"ok"', keep_until=NOW + 7 * 86400, key=f"old-{start + i}")
                for i in range(n)
            ]  # fmt: skip
        else:
            jobs = [_job(priority=-1) for _ in range(n)]
        await store.enqueue(jobs)


def _summary(samples: list[float]) -> tuple[float, float]:
    """Median and 99th percentile, in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


async def _measure(path: Path, rows: int, kind: str, ops: int) -> dict[str, tuple[float, float]]:
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    try:
        if rows:
            await _fill(store, rows, kind)
        enqueue: list[float] = []
        for i in range(ops):
            job = _job(priority=1, key=f"new-{i}")
            start = time.perf_counter()
            await store.enqueue([job])
            enqueue.append(time.perf_counter() - start)
        claim_finish: list[float] = []
        for _ in range(ops):
            start = time.perf_counter()
            (claimed,) = await store.claim(
                worker_id="w", queues=["default"], limit=1, now=NOW, lease_until=NOW + 60
            )
            done = Outcome(
                job_id=claimed.id, worker_id="w", state=JobState.SUCCEEDED,
                finished_at=NOW, result='"ok"', keep_until=NOW + 86400,
            )  # fmt: skip
            await store.finish([done])
            claim_finish.append(time.perf_counter() - start)
        return {"enqueue 1": _summary(enqueue), "claim+finish": _summary(claim_finish)}
    finally:
        await store.close()


async def main(rows: int, ops: int) -> None:
    scenarios = [("empty", 0, "ended"), (f"{rows:,} ended", rows, "ended")]
    scenarios.append((f"{rows:,} queued", rows, "backlog"))
    results: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for n, (name, count, kind) in enumerate(scenarios):
            started = time.perf_counter()
            results[name] = await _measure(Path(folder) / f"bench{n}.db", count, kind, ops)
            print(f"  {name}: done in {time.perf_counter() - started:.1f}s")
    operations = list(next(iter(results.values())))
    print(f"\nSQLite store, {ops:,} operations each; latency in ms (median / p99)\n")
    print(f"{'table holds':<18}" + "".join(f"{op:>22}" for op in operations))
    for name, figures in results.items():
        cells = "".join(f"{figures[op][0]:>12.3f} / {figures[op][1]:<7.3f}" for op in operations)
        print(f"{name:<18}{cells}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="jobs already stored")
    parser.add_argument("--ops", type=int, default=2_000, help="operations measured")
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.ops))
