"""Celery with its Redis broker, prefork pool: ``celery worker --concurrency N``.

Celery's defaults otherwise: early acknowledgement (a message is acknowledged when a
worker process receives it, so a job whose process is killed is lost), prefetch multiplier
4, no result backend (``BENCH_CELERY_RESULTS=1`` adds the Redis one, as the guide's example
configures it; the exercise uses it).
"""

from __future__ import annotations

import os

from celery import Celery

from . import _common
from ._base import Peer

results = _common.REDIS_URL if os.environ.get("BENCH_CELERY_RESULTS") == "1" else None
app = Celery("bench", broker=_common.REDIS_URL, backend=results)
app.conf.broker_connection_retry_on_startup = True


@app.task(name="noop")
def noop(total: int) -> None:
    _common.noop_sync(total)


@app.task(name="probe")
def probe(sent: float) -> None:
    _common.probe_sync(sent)


@app.task(name="sleep")
def sleep() -> None:
    _common.sleep_sync()


@app.task(name="cpu")
def cpu() -> None:
    _common.cpu_sync()


class CeleryPeer(Peer):
    name = "celery"
    library = "celery"
    settings = (
        "prefork pool, `--concurrency` = processes; Redis broker; defaults: early ack, "
        "prefetch x4, no result backend"
    )

    def worker_commands(self, processes: int) -> list[list[str]]:
        return [
            self.python(
                "-m", "celery", "-A", "peers.with_celery", "worker", "--pool", "prefork",
                "--concurrency", str(processes), "--loglevel", "WARNING",
            )
        ]  # fmt: skip

    async def enqueue(self, total: int) -> None:
        noop.delay(total)

    async def probe(self, sent: float) -> None:
        probe.delay(sent)


PEER = CeleryPeer()
