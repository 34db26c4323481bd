"""A scheduler process for the multi-process SQLite test: tries to take every slot of one
schedule, in order, from one file, then prints the slots it took as JSON.

Usage: python sqlite_slot_taker.py URL NAME SLOTS START_AT
(slots 0 .. SLOTS-1; slot n is tried at the wall-clock time START_AT + n * PACE, so that
every process races for every slot).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from backlane.jobs import Job
from backlane.stores.sqlite import SQLiteStore

NOW = 1_700_000_000.0
PACE = 0.005


async def main(url: str, name: str, slots: int, start_at: float) -> None:
    store = SQLiteStore(url)
    await store.open()
    taken: list[float] = []
    try:
        for n in range(slots):
            await asyncio.sleep(max(0.0, start_at + n * PACE - time.time()))
            slot = NOW + 60.0 * n
            job = Job(task="t", payload="[]", created_at=NOW, run_at=slot, meta={"by": name})
            if await store.claim_slot("tick", slot, job):
                taken.append(slot)
    finally:
        await store.close()
    print(json.dumps(taken))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
