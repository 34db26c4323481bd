"""taskiq with taskiq-redis's ``RedisStreamBroker`` (the one with acknowledgements, which its
README recommends where durability matters): ``taskiq worker --workers N`` with taskiq's
defaults (up to 100 tasks in flight per process), logging at WARNING. No batch enqueue."""

from __future__ import annotations

from taskiq_redis import RedisStreamBroker

from . import _common
from ._base import Peer

broker = RedisStreamBroker(url=_common.REDIS_URL)


@broker.task(task_name="noop")
async def noop(total: int) -> None:
    await _common.noop_async(total)


@broker.task(task_name="probe")
async def probe(sent: float) -> None:
    await _common.probe_async(sent)


class TaskiqPeer(Peer):
    name = "taskiq"
    library = "taskiq"
    settings = "`RedisStreamBroker` (acks); `--workers` N; defaults: 100 in flight per process"

    def version(self) -> str:
        return f"{super().version()} + taskiq-redis {_version('taskiq-redis')}"

    def worker_commands(self, processes: int) -> list[list[str]]:
        return [
            self.python(
                "-m", "taskiq", "worker", "peers.with_taskiq:broker",
                "--workers", str(processes), "--log-level", "WARNING",
            )
        ]  # fmt: skip

    async def open(self) -> None:
        await broker.startup()

    async def close(self) -> None:
        await broker.shutdown()

    async def enqueue(self, total: int) -> None:
        await noop.kiq(total)

    async def probe(self, sent: float) -> None:
        await probe.kiq(sent)


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


PEER = TaskiqPeer()
