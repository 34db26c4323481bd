"""Huey, on Redis (``BENCH_HUEY_STORE=redis``: ``RedisHuey``, blocking pops) or SQLite
(``sqlite``: ``SqliteHuey``, which polls): ``huey_consumer -k process -w N``, logging at
WARNING, other settings at Huey's defaults. Huey takes a job off the queue before running it
(no acknowledgement). No batch enqueue."""

from __future__ import annotations

import os

from huey import RedisHuey, SqliteHuey

from . import _common
from ._base import Peer

STORE = os.environ.get("BENCH_HUEY_STORE", "redis")
if STORE == "redis":
    huey = RedisHuey("bench", url=_common.REDIS_URL)
else:
    huey = SqliteHuey("bench", filename=os.path.join(_common.DIR, "huey.db"))
SQLITE_FILE = None if STORE == "redis" else os.path.join(_common.DIR, "huey.db")


@huey.task()
def noop(total: int) -> None:
    _common.noop_sync(total)


@huey.task()
def probe(sent: float) -> None:
    _common.probe_sync(sent)


class HueyPeer(Peer):
    name = "huey" if STORE == "redis" else "huey-sqlite"
    library = "huey"
    store = "Redis" if STORE == "redis" else "SQLite"
    sqlite_file = SQLITE_FILE
    settings = "`huey_consumer -k process -w` N; no ack (dequeued before it runs)"

    def worker_commands(self, processes: int) -> list[list[str]]:
        return [
            self.python(
                "-m", "huey.bin.huey_consumer", "peers.with_huey.huey",
                "-k", "process", "-w", str(processes), "--quiet",
            )
        ]  # fmt: skip

    async def enqueue(self, total: int) -> None:
        noop(total)

    async def probe(self, sent: float) -> None:
        probe(sent)


PEER = HueyPeer()
