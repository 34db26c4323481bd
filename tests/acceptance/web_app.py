"""The app the acceptance tests serve with a real uvicorn: the drop-in, on the store named by
``BACKLANE_URL``, with one embedded worker.

Each task appends ``f"{n}\\n"`` to the file named by ``WEB_APP_RECORD`` (one ``write`` on an
``O_APPEND`` descriptor, so lines from concurrent tasks never interleave).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from backlane import Backlane
from backlane.fastapi import BackgroundTasks
from tests.acceptance._procs import RECORD_ENV, SLOW_ENV

lane = Backlane()
app = FastAPI()
lane.install(app, workers=1)


def _record(n: int) -> None:
    fd = os.open(os.environ[RECORD_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{n}\n".encode())
    finally:
        os.close(fd)


async def record_sleep(n: int) -> None:
    await asyncio.sleep(0.5)
    _record(n)


async def record_slow(n: int) -> None:
    await asyncio.sleep(float(os.environ.get(SLOW_ENV, "2")))
    _record(n)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


@app.post("/work/{n}")
async def work(n: int, background_tasks: BackgroundTasks) -> dict[str, str]:
    job = background_tasks.add_task(record_sleep, n)
    return {"id": job.id}


@app.post("/slow/{n}")
async def slow(n: int, background_tasks: BackgroundTasks) -> dict[str, str]:
    job = background_tasks.add_task(record_slow, n)
    return {"id": job.id}


@app.post("/unfinished/{n}")
async def unfinished(n: int, background_tasks: BackgroundTasks) -> StreamingResponse:
    """A 200 whose body never ends: the task is stored when the status line leaves, but
    the response is never completely sent, so it is never released."""
    job = background_tasks.add_task(record_slow, n)

    async def body() -> AsyncIterator[bytes]:
        yield f"{job.id}\n".encode()
        await asyncio.sleep(3600)

    return StreamingResponse(body(), media_type="text/plain")
