"""The guide's exercise: 100 concurrent requests to a uvicorn app, each adding one task.

Used by ``compare.py``. Every request goes out at once, each on a connection opened
beforehand; a reply's latency runs from its request being written to its body being read.
The tasks push their finish time to Redis, so "all done" is measured from the moment the
requests went out to the last task's end, whichever process ran it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

from ._log import fmt, note, phases_text
from ._procs import Workers
from ._stats import percentile

WORKERS = {
    "celery": [
        "-m",
        "celery",
        "-A",
        "peers.with_celery",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "2",
        "--loglevel",
        "WARNING",
    ],
    "backlane": [
        "-m",
        "backlane",
        "worker",
        "peers.with_backlane:lane",
        "--processes",
        "2",
        "--log-level",
        "warning",
    ],
}
"""The worker processes beside an exercise app: two, as for every peer."""

HERE = Path(__file__).resolve().parent.parent


def exercise(bench: Any, app: Any) -> dict[str, Any]:
    """One set-up of the exercise: its app (and workers) started, warmed up, then 100
    concurrent POSTs per run to /sleep and to /cpu; reply latencies and the time from the
    first request until the last task finished."""
    bench.reset_stores("postgres" in app.name)
    env = {**bench.env, **app.env}
    log = bench.logs / f"web-{app.name.split()[0]}.log"
    python = bench.pythons[app.venv]
    commands = [[python, *WORKERS[app.workers]]] if app.workers else []
    port = _free_port()
    commands.append([python, "-m", "uvicorn", app.app, "--port", str(port), "--no-access-log",
                     "--log-level", "warning"])  # fmt: skip
    out: dict[str, Any] = {"sleep": {}, "cpu": {}, "error": None, "phases": {}}
    phases: dict[str, float] = out["phases"]
    start = time.monotonic()
    try:
        # Nothing uses its stores before they are emptied again: no need to wait for the
        # workers' last acknowledgements when they stop.
        procs = Workers(commands, cwd=HERE, env=env, log=log, reaper=bench.reaper, settle=False)
        with procs:
            _wait_http(port, procs)
            # Warm-up: three tasks of each kind, at once.
            bench.clear()
            asyncio.run(_warm_up(port))
            bench.wait_list(bench.keys.DONE, 6, timeout=60, workers=procs)
            phases["start"] = time.monotonic() - start
            for path in ("sleep", "cpu"):
                start = time.monotonic()
                runs: dict[str, list[float]] = {"p50": [], "p99": [], "done": []}
                for _ in range(bench.plan.exercise_runs):
                    bench.clear()
                    t0 = time.time()
                    replies = asyncio.run(_burst(port, path, 100))
                    finished = bench.wait_list(bench.keys.DONE, 100, timeout=120, workers=procs)
                    runs["p50"].append(percentile(replies, 0.5) * 1000)
                    runs["p99"].append(percentile(replies, 0.99) * 1000)
                    runs["done"].append(max(finished) - t0)
                out[path] = runs
                phases[path] = time.monotonic() - start
                note(
                    f"  {app.name} /{path}: reply p50 {fmt(runs['p50'], 1)} ms, p99 "
                    f"{fmt(runs['p99'], 1)} ms; all done in {fmt(runs['done'], 2)} s"
                )
            start = time.monotonic()
        phases["stop"] = time.monotonic() - start
        note(f"  ({phases_text(phases)} s)")
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        note(f"  {app.name} FAILED: {exc}")
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_http(port: int, procs: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        procs.check()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: bench\r\n\r\n")
                if sock.recv(12).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not answer")
        time.sleep(0.05)


async def _warm_up(port: int) -> None:
    await asyncio.gather(_burst(port, "sleep", 3), _burst(port, "cpu", 3))


async def _burst(port: int, path: str, count: int) -> list[float]:
    """``count`` POSTs sent at once, each on its own (already open) connection; returns each
    reply's latency in seconds, from its send to the end of its body."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    request = f"POST /{path} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n".encode()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
        start = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        took = time.perf_counter() - start
        if status != b"200":
            raise RuntimeError(f"POST /{path} answered {status.decode()}")
        return took

    try:
        return list(await asyncio.gather(*(one(r, w) for r, w in conns)))
    finally:
        for _, writer in conns:
            writer.close()


def calibrate_cpu(target_s: float = 0.020) -> int:
    """Loop iterations of the CPU task that take ``target_s`` of CPU here: the fastest of
    15 timed rounds, so that other load on the machine does not shrink the task."""
    from . import _common

    loops = 100_000
    _common.CPU_LOOPS = loops
    fastest = float("inf")
    for _ in range(15):
        start = time.process_time()
        _common.burn()
        fastest = min(fastest, time.process_time() - start)
    return int(loops * target_s / fastest)
