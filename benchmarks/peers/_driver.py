"""One peer's client, in that peer's virtual environment, driven by ``compare.py``.

    python -m peers._driver with_<library>

reads one JSON request per line on stdin and answers one JSON line on stdout:

* ``{"op": "describe", "processes": [1, 2]}``: name, version, store, settings, batch call,
  and the worker commands for each process count;
* ``{"op": "setup"}`` / ``{"op": "teardown"}``: prepare or release the peer's store;
* ``{"op": "fill", "total": T, "count": N, "single_s": S, "batch": B}``: enqueue N
  ``noop(T)`` jobs, one call per job for the first S seconds (at least one job), the rest
  ``B`` per call where the peer has a batch call (else one by one); answers how many went
  each way and the seconds each took;
* ``{"op": "paced", "rate": R, "seconds": S}``: enqueue ``probe(sent)`` jobs at R per
  second for S seconds; answers how many, and how far behind its schedule the client fell.

Errors answer ``{"error": "..."}`` and the driver goes on.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
import traceback
from typing import Any

from ._base import Peer


async def fill(peer: Peer, total: int, count: int, single_s: float, batch: int) -> dict[str, Any]:
    single = 0
    start = time.perf_counter()
    deadline = start + single_s
    while single < count:
        await peer.enqueue(total)
        single += 1
        if time.perf_counter() >= deadline:
            break
    single_took = time.perf_counter() - start
    rest = count - single
    start = time.perf_counter()
    if peer.batch:
        for first in range(0, rest, batch):
            await peer.enqueue_batch(total, min(batch, rest - first))
    else:
        for _ in range(rest):
            await peer.enqueue(total)
    return {
        "single": single,
        "single_s": single_took,
        "rest": rest,
        "rest_s": time.perf_counter() - start,
        "rest_batched": bool(peer.batch),
    }


async def paced(peer: Peer, rate: float, seconds: float) -> dict[str, Any]:
    count = max(1, round(rate * seconds))
    behind = 0.0
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            behind = max(behind, -delay)
        await peer.probe(time.time())
    return {"count": count, "behind_s": behind, "took_s": time.perf_counter() - start}


async def handle(peer: Peer, request: dict[str, Any], opened: list[bool]) -> dict[str, Any]:
    op = request["op"]
    if op == "describe":
        return {
            "name": peer.name,
            "library": peer.library,
            "version": peer.version(),
            "store": peer.store,
            "settings": peer.settings,
            "batch": peer.batch,
            "sqlite_file": peer.sqlite_file,
            "python": sys.version.split()[0],
            "workers": {str(n): peer.worker_commands(n) for n in request["processes"]},
        }
    if op == "setup":
        await peer.setup()
        return {}
    if op == "teardown":
        if opened[0]:
            await peer.close()
            opened[0] = False
        await peer.teardown()
        return {}
    if not opened[0]:
        await peer.open()
        opened[0] = True
    if op == "fill":
        return await fill(
            peer, request["total"], request["count"], request["single_s"], request["batch"]
        )
    if op == "paced":
        return await paced(peer, request["rate"], request["seconds"])
    raise ValueError(f"unknown op {op!r}")


async def main(module: str) -> None:
    peer: Peer = importlib.import_module(f"peers.{module}").PEER
    opened = [False]
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            try:
                answer = await handle(peer, json.loads(line), opened)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        if opened[0]:
            await peer.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
