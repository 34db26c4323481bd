"""RQ: one ``rq worker`` process per worker process, RQ's default ``Worker`` (a fresh forked
"work horse" per job; results kept 500 s), logging at WARNING. Batch: ``enqueue_many``."""

from __future__ import annotations

from redis import Redis
from rq import Queue

from . import _common
from ._base import Peer


def noop(total: int) -> None:
    _common.noop_sync(total)


def probe(sent: float) -> None:
    _common.probe_sync(sent)


class RQPeer(Peer):
    name = "rq"
    library = "rq"
    settings = "one `rq worker` each; default `Worker`: forks a work horse per job; results kept"
    batch = "Queue.enqueue_many"

    def worker_commands(self, processes: int) -> list[list[str]]:
        command = self.python(
            "-m", "rq.cli", "worker", "--url", _common.REDIS_URL, "--logging_level", "WARNING"
        )  # fmt: skip
        return [command] * processes

    async def open(self) -> None:
        self.queue = Queue(connection=Redis.from_url(_common.REDIS_URL))

    async def close(self) -> None:
        self.queue.connection.close()

    async def enqueue(self, total: int) -> None:
        self.queue.enqueue(noop, total)

    async def enqueue_batch(self, total: int, count: int) -> None:
        data = [Queue.prepare_data(noop, (total,)) for _ in range(count)]
        self.queue.enqueue_many(data)

    async def probe(self, sent: float) -> None:
        self.queue.enqueue(probe, sent)


PEER = RQPeer()
