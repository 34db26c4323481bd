"""A worker process for the multi-process SQLite test: claims and finishes jobs from one
file until none is left, then prints the ids it claimed as JSON.

Usage: python sqlite_claimer.py URL WORKER_ID START_AT
(waits until the wall-clock time START_AT so that every process starts claiming at once).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

from backlane.jobs import JobState
from backlane.stores.base import Outcome
from backlane.stores.sqlite import SQLiteStore

NOW = 1_700_000_000.0


async def main(url: str, worker_id: str, start_at: float) -> None:
    store = SQLiteStore(url)
    await store.open()
    claimed: list[str] = []
    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        while True:
            jobs = await store.claim(
                worker_id=worker_id,
                queues=None,
                limit=random.randint(1, 3),
                now=NOW,
                lease_until=NOW + 3600,
            )
            if not jobs:
                break
            claimed.extend(job.id for job in jobs)
            outcomes = [
                Outcome(
                    job_id=job.id, worker_id=worker_id, state=JobState.SUCCEEDED, finished_at=NOW
                )
                for job in jobs
            ]
            await store.finish(outcomes)
    finally:
        await store.close()
    print(json.dumps(claimed))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
