"""The lane the worker acceptance tests run in real ``backlane worker`` processes.

Its store comes from ``BACKLANE_URL`` (``memory://`` when unset, so importing it is free).
Leases are short (2 s, expired ones swept every 0.5 s), so a killed worker's jobs come back
within seconds (``WORKER_APP_LEASE`` and ``WORKER_APP_SWEEP`` set other values). Every
task first appends ``<job id>\\n`` to the file named by ``WORKER_APP_LOG``, in one
``O_APPEND`` write: several processes record into one file without tearing lines, and
each line is one execution that started.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from backlane import Backlane, TaskContext


def _note_lifespan(event: str) -> None:
    """Append ``<event> <pid>`` to ``WORKER_APP_LIFESPAN_LOG``, if it names a file."""
    path = os.environ.get("WORKER_APP_LIFESPAN_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{event} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


@asynccontextmanager
async def lifespan(lane: Backlane) -> AsyncIterator[dict[str, int]]:
    """What a process's tasks share: here, the pid it was set up in."""
    _note_lifespan("enter")
    if os.environ.get("WORKER_APP_LIFESPAN_FAILS"):
        raise RuntimeError("the payments API cannot be reached")
    try:
        yield {"pid": os.getpid()}
    finally:
        _note_lifespan("exit")


lane = Backlane(
    os.environ.get("BACKLANE_URL", "memory://"),
    lease_seconds=float(os.environ.get("WORKER_APP_LEASE", "2.0")),
    sweep_interval=float(os.environ.get("WORKER_APP_SWEEP", "0.5")),
    lifespan=lifespan,
)


def _record_start(job_id: str) -> None:
    fd = os.open(os.environ["WORKER_APP_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{job_id}\n".encode())
    finally:
        os.close(fd)


def _is_open(gate: str) -> bool:
    return Path(gate).exists()


@lane.task(retries=0)
async def record(ctx: TaskContext, pause: float = 0.02) -> None:
    """Record this execution, then take ``pause`` seconds."""
    _record_start(ctx.job_id)
    await asyncio.sleep(pause)


@lane.task(retries=0)
async def hold(ctx: TaskContext, gate: str) -> str:
    """Record this execution, then run until the file ``gate`` exists."""
    _record_start(ctx.job_id)
    while not _is_open(gate):  # the test opens the gate from another process
        await asyncio.sleep(0.02)
    return "released"


@lane.task(retries=0)
async def lifespan_pid(ctx: TaskContext, pause: float = 0.05) -> int:
    """The pid the lane's lifespan recorded in this process's state, after ``pause``
    seconds."""
    _record_start(ctx.job_id)
    _note_lifespan(f"job {ctx.job_id}")
    await asyncio.sleep(pause)
    return int(ctx.state["pid"])
