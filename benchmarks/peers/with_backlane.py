"""backlane on SQLite, Redis or PostgreSQL (``BENCH_BACKLANE_STORE``): ``backlane worker
--processes N`` with backlane's defaults (concurrency 20 per process, leases renewed by
heartbeat, acknowledged when the outcome is stored, results kept a day), logging at WARNING.
Batch: ``Backlane.enqueue_jobs``."""

from __future__ import annotations

import os

from backlane import Backlane

from . import _common
from ._base import Peer

STORE = os.environ.get("BENCH_BACKLANE_STORE", "sqlite")
URLS = {
    "sqlite": f"sqlite:///{os.path.join(_common.DIR, 'backlane.db')}",
    "redis": f"{_common.REDIS_URL}?prefix=bench:backlane:",
    "postgres": f"{_common.PG_URL}?schema=backlane",
}
URL = URLS[STORE]
lane = Backlane(URL)


@lane.task
async def noop(total: int) -> None:
    await _common.noop_async(total)


@lane.task
async def probe(sent: float) -> None:
    await _common.probe_async(sent)


class BacklanePeer(Peer):
    name = f"backlane-{STORE}"
    library = "backlane"
    store = {"sqlite": "SQLite", "redis": "Redis", "postgres": "PostgreSQL"}[STORE]
    settings = "`backlane worker --processes` N; defaults: concurrency 20, leases, ack on outcome"
    batch = "Backlane.enqueue_jobs"
    sqlite_file = os.path.join(_common.DIR, "backlane.db") if STORE == "sqlite" else None

    def worker_commands(self, processes: int) -> list[list[str]]:
        return [
            self.python(
                "-m", "backlane", "worker", "peers.with_backlane:lane",
                "--processes", str(processes), "--log-level", "warning",
            )
        ]  # fmt: skip

    async def open(self) -> None:
        await lane.open()

    async def close(self) -> None:
        await lane.close()

    async def enqueue(self, total: int) -> None:
        await noop.enqueue(total)

    async def enqueue_batch(self, total: int, count: int) -> None:
        await lane.enqueue_jobs([noop.build_job((total,), {}) for _ in range(count)])

    async def probe(self, sent: float) -> None:
        await probe.enqueue(sent)


PEER = BacklanePeer()
