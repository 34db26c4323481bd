"""Dramatiq with its Redis broker: ``dramatiq --processes N`` with the default 8 threads per
process and default middleware (acknowledged after the job, retries). No batch enqueue."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from . import _common
from ._base import Peer

broker = RedisBroker(url=_common.REDIS_URL)
dramatiq.set_broker(broker)


@dramatiq.actor
def noop(total: int) -> None:
    _common.noop_sync(total)


@dramatiq.actor
def probe(sent: float) -> None:
    _common.probe_sync(sent)


class DramatiqPeer(Peer):
    name = "dramatiq"
    library = "dramatiq"
    settings = "`--processes` N, default 8 threads each; acks after the job; default middleware"

    def worker_commands(self, processes: int) -> list[list[str]]:
        return [self.python("-m", "dramatiq", "peers.with_dramatiq", "--processes", str(processes))]

    async def enqueue(self, total: int) -> None:
        noop.send(total)

    async def probe(self, sent: float) -> None:
        probe.send(sent)


PEER = DramatiqPeer()
