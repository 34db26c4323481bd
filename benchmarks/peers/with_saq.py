"""SAQ, on Redis (``BENCH_SAQ_STORE=redis``) or on its PostgreSQL queue (``postgres``):
``saq --workers N`` with SAQ's defaults (concurrency 10 per process). No batch enqueue."""

from __future__ import annotations

import os
from typing import Any

from saq import Queue

from . import _common
from ._base import Peer

STORE = os.environ.get("BENCH_SAQ_STORE", "redis")
URL = _common.REDIS_URL if STORE == "redis" else _common.PG_URL


async def noop(ctx: dict[str, Any], *, total: int) -> None:
    await _common.noop_async(total)


async def probe(ctx: dict[str, Any], *, sent: float) -> None:
    await _common.probe_async(sent)


queue = Queue.from_url(URL)
settings = {"queue": queue, "functions": [noop, probe]}


class SaqPeer(Peer):
    name = "saq" if STORE == "redis" else "saq-pg"
    library = "saq"
    store = "Redis" if STORE == "redis" else "PostgreSQL"
    settings = "`saq --workers` N; defaults: concurrency 10 per process"

    def worker_commands(self, processes: int) -> list[list[str]]:
        return [self.python("-m", "saq", "peers.with_saq.settings", "--workers", str(processes))]

    async def setup(self) -> None:
        await queue.connect()  # creates the PostgreSQL tables
        await queue.disconnect()

    async def open(self) -> None:
        self.queue = Queue.from_url(URL)
        await self.queue.connect()

    async def close(self) -> None:
        await self.queue.disconnect()

    async def enqueue(self, total: int) -> None:
        await self.queue.enqueue("noop", total=total)

    async def probe(self, sent: float) -> None:
        await self.queue.enqueue("probe", sent=sent)


PEER = SaqPeer()
