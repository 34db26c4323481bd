"""arq: one ``arq`` process per worker process, each with arq's defaults (``max_jobs`` 10,
queue polled every 0.5 s, results kept an hour), logging at WARNING. No batch enqueue."""

from __future__ import annotations

import logging
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings

from . import _common
from ._base import Peer


async def noop(ctx: dict[str, Any], total: int) -> None:
    await _common.noop_async(total)


async def probe(ctx: dict[str, Any], sent: float) -> None:
    await _common.probe_async(sent)


async def quiet(ctx: dict[str, Any]) -> None:
    """Log at WARNING, as every peer here does (arq's CLI has no switch for it)."""
    logging.getLogger("arq").setLevel(logging.WARNING)


class WorkerSettings:
    functions = [noop, probe]  # noqa: RUF012 - arq reads class attributes
    redis_settings = RedisSettings.from_dsn(_common.REDIS_URL)
    on_startup = quiet


class ArqPeer(Peer):
    name = "arq"
    library = "arq"
    settings = "one `arq` process each; defaults: `max_jobs` 10, poll every 0.5 s, results kept"

    def worker_commands(self, processes: int) -> list[list[str]]:
        command = self.python("-m", "arq", "peers.with_arq.WorkerSettings")
        return [command] * processes

    async def open(self) -> None:
        self.pool = await create_pool(RedisSettings.from_dsn(_common.REDIS_URL))

    async def close(self) -> None:
        await self.pool.aclose()

    async def enqueue(self, total: int) -> None:
        await self.pool.enqueue_job("noop", total)

    async def probe(self, sent: float) -> None:
        await self.pool.enqueue_job("probe", sent)


PEER = ArqPeer()
