"""What the SQLite store promises for schema version 2 (schedules, paused queues, workers):
an older file is upgraded in place, the new statements search an index, stats stays quick
over many jobs, and processes sharing a file take each schedule slot once."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backlane.jobs import Job, JobState
from backlane.stores.base import ScheduleRecord, StatsBucket
from backlane.stores.sqlite import SQLiteStore
from backlane.stores.sqlite_schema import migrations, queries

pytestmark = pytest.mark.anyio

NOW = 1_700_000_000.0


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def _schema(path: Path) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
            "ORDER BY type, name"
        ).fetchall()
    finally:
        conn.close()
    return [(kind, name, " ".join(sql.split())) for kind, name, sql in rows]


async def _open_and_close(path: Path) -> None:
    store = SQLiteStore(url_of(path))
    await store.open()
    await store.close()


async def test_a_version_1_file_is_upgraded_in_place_and_keeps_its_jobs(tmp_path: Path) -> None:
    (version, first), *_ = migrations()
    assert version == 1
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.executescript(first)
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    job = Job(task="t", payload="[]", created_at=NOW, run_at=NOW, queue="emails")
    conn = sqlite3.connect(old)
    conn.execute(
        "INSERT INTO jobs (id, task, payload, queue, state, run_at, created_at) "
        "VALUES (?, 't', '[]', 'emails', 'queued', ?, ?)",
        (job.id, NOW, NOW),
    )
    conn.commit()
    conn.close()
    await _open_and_close(tmp_path / "fresh.db")

    store = SQLiteStore(url_of(old))
    await store.open()
    try:
        assert await store.get(job.id) == job
        await store.pause_queue("emails", True)
        assert (
            await store.claim(worker_id="w", queues=None, limit=1, now=NOW, lease_until=NOW + 60)
            == []
        )
        assert await store.claim_slot("s", NOW, Job(task="t", payload="[]")) is True
        assert await store.schedules() == {"s": ScheduleRecord(name="s", last_slot=NOW)}
    finally:
        await store.close()
    assert _schema(old) == _schema(tmp_path / "fresh.db")
    conn = sqlite3.connect(old)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations()[-1][0]
    finally:
        conn.close()


async def test_migrations_applied_one_by_one_build_the_schema_of_a_fresh_file(
    tmp_path: Path,
) -> None:
    await _open_and_close(tmp_path / "fresh.db")
    for version, _ in migrations():
        stepped = tmp_path / f"upto{version}.db"
        conn = sqlite3.connect(stepped)
        for _, script in [m for m in migrations() if m[0] <= version]:
            conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.close()
        await _open_and_close(stepped)
        assert _schema(stepped) == _schema(tmp_path / "fresh.db"), version


@pytest.mark.parametrize(
    ("query", "index"),
    [
        ("stats", "jobs_finished"),
        ("claimable_any", "jobs_claimable_any"),
    ],
)
async def test_the_new_statements_search_an_index(tmp_path: Path, query: str, index: str) -> None:
    await _open_and_close(tmp_path / "jobs.db")
    params = {"now": NOW, "lease_until": NOW, "worker_id": "w", "limit": 1, "since": NOW}
    params.update(width=60.0, name="s", slot=NOW)
    conn = sqlite3.connect(tmp_path / "jobs.db")
    try:
        plan = conn.execute("EXPLAIN QUERY PLAN " + queries()[query], params).fetchall()
    finally:
        conn.close()
    steps = [step[3] for step in plan]
    assert any(index in step for step in steps), steps
    assert not any(step.startswith("SCAN jobs") and "INDEX" not in step for step in steps)


async def test_stats_over_a_hundred_thousand_ended_jobs_is_exact_and_quick(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    await _open_and_close(path)
    rng = random.Random(7)
    rows = []
    for n in range(100_000):
        state = rng.choice(["succeeded", "failed", "cancelled", "discarded", "queued"])
        run_at = NOW + n * 0.05
        started = run_at + rng.choice([0.0, 0.5, 2.0]) if state != "discarded" else None
        ended = None if state == "queued" else run_at + 3.0
        rows.append((f"j{n}", state, run_at, started, ended))
    conn = sqlite3.connect(path)
    conn.executemany(
        "INSERT INTO jobs (id, task, payload, queue, state, run_at, created_at, started_at, "
        "finished_at) VALUES (?, 't', '[]', 'default', ?, ?, 0, ?, ?)",
        rows,
    )
    conn.commit()
    conn.close()
    since, width = NOW + 600.0, 60.0
    expected: dict[int, list[float]] = {}
    for _, state, run_at, started, ended in rows:
        if ended is None or ended < since or state not in ("succeeded", "failed", "cancelled"):
            continue
        bucket = expected.setdefault(math.floor(ended / width), [0, 0, 0, 0.0, 0])
        bucket[("succeeded", "failed", "cancelled").index(state)] += 1
        assert started is not None
        bucket[3] += started - run_at
        bucket[4] += 1

    store = SQLiteStore(url_of(path))
    await store.open()
    try:
        started_at = time.perf_counter()
        buckets = await store.stats(since=since, width=width)
        elapsed = time.perf_counter() - started_at
    finally:
        await store.close()
    assert buckets == [
        StatsBucket(
            start=key * width,
            succeeded=int(ok),
            failed=int(failed),
            cancelled=int(cancelled),
            wait_total=pytest.approx(wait),
            wait_count=int(waits),
        )
        for key, (ok, failed, cancelled, wait, waits) in sorted(expected.items())
    ]
    assert sum(b.succeeded + b.failed + b.cancelled for b in buckets) > 50_000
    assert elapsed < 1.0, f"stats took {elapsed:.3f}s"


async def test_claim_with_only_paused_queues_named_takes_nothing(tmp_path: Path) -> None:
    store = SQLiteStore(url_of(tmp_path / "jobs.db"))
    await store.open()
    try:
        await store.enqueue([Job(task="t", payload="[]", queue=q) for q in ("a", "b", "c")])
        await store.pause_queue("a", True)
        await store.pause_queue("b", True)
        for queues in (["a"], ["a", "b"], ["b", "a", "a"]):
            assert (
                await store.claim(
                    worker_id="w", queues=queues, limit=5, now=NOW, lease_until=NOW + 60
                )
                == []
            )
        claimed = await store.claim(
            worker_id="w", queues=["a", "c"], limit=5, now=NOW, lease_until=NOW + 60
        )
        assert [job.queue for job in claimed] == ["c"]
        assert (await store.counts())["a"] == {JobState.QUEUED: 1}
    finally:
        await store.close()


@pytest.mark.slow
def test_processes_sharing_a_file_take_each_schedule_slot_once(tmp_path: Path) -> None:
    url = url_of(tmp_path / "jobs.db")
    asyncio.run(_open_and_close(tmp_path / "jobs.db"))
    slots = 200  # tried 5 ms apart: about a second
    script = Path(__file__).with_name("sqlite_slot_taker.py")
    start_at = time.time() + 1.5
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), url, f"s{n}", str(slots), str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for n in range(3)
    ]
    taken_by: list[list[float]] = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        taken_by.append(json.loads(out))

    # Every scheduler tries the slots in order, so the first attempt at any slot finds no
    # later slot taken: each slot is taken exactly once, whichever process gets it.
    expected = [NOW + 60.0 * n for n in range(slots)]
    assert sorted(s for taken in taken_by for s in taken) == expected
    assert sum(1 for taken in taken_by if taken) >= 2, "the processes did not race"
    print("slots taken per process:", [len(taken) for taken in taken_by])

    async def stored() -> tuple[list[Job], dict[str, ScheduleRecord]]:
        store = SQLiteStore(url)
        await store.open()
        try:
            return await store.list_jobs(limit=10 * slots), await store.schedules()
        finally:
            await store.close()

    jobs, schedules = asyncio.run(stored())
    assert sorted(job.run_at for job in jobs) == expected
    by_process = {f"s{n}": sorted(taken) for n, taken in enumerate(taken_by)}
    for name, taken in by_process.items():
        assert sorted(job.run_at for job in jobs if job.meta["by"] == name) == taken
    assert schedules == {"tick": ScheduleRecord(name="tick", last_slot=expected[-1])}
