"""Procrastinate on PostgreSQL: one ``procrastinate worker`` process per worker process with
its defaults (concurrency 1, LISTEN/NOTIFY wake-ups, jobs kept in the table), logging at
WARNING. Batch: ``batch_defer_async``."""

from __future__ import annotations

import procrastinate

from . import _common
from ._base import Peer

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=_common.PG_URL))


@app.task(name="noop")
async def noop(total: int) -> None:
    await _common.noop_async(total)


@app.task(name="probe")
async def probe(sent: float) -> None:
    await _common.probe_async(sent)


class ProcrastinatePeer(Peer):
    name = "procrastinate"
    library = "procrastinate"
    store = "PostgreSQL"
    settings = "one `procrastinate worker` each; defaults: concurrency 1, LISTEN/NOTIFY"
    batch = "Task.batch_defer_async"

    def worker_commands(self, processes: int) -> list[list[str]]:
        command = self.python(
            "-m", "procrastinate", "--app", "peers.with_procrastinate.app",
            "--log-level", "warning", "worker",
        )  # fmt: skip
        return [command] * processes

    async def setup(self) -> None:
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    async def open(self) -> None:
        await app.open_async()

    async def close(self) -> None:
        await app.close_async()

    async def enqueue(self, total: int) -> None:
        await noop.defer_async(total=total)

    async def enqueue_batch(self, total: int, count: int) -> None:
        await noop.batch_defer_async(*({"total": total} for _ in range(count)))

    async def probe(self, sent: float) -> None:
        await probe.defer_async(sent=sent)


PEER = ProcrastinatePeer()
