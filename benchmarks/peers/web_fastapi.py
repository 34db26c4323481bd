"""The guide's exercise with FastAPI's own ``BackgroundTasks``: tasks run in the web process
after the reply (not durable). ``/sleep`` adds an async 100 ms sleep, ``/cpu`` a ~20 ms CPU
task (a ``def``, so Starlette runs it in its thread pool)."""

from __future__ import annotations

from fastapi import BackgroundTasks, FastAPI

from . import _common

app = FastAPI()


@app.post("/sleep")
async def add_sleep(background_tasks: BackgroundTasks) -> dict[str, bool]:
    background_tasks.add_task(_common.sleep_async)
    return {"queued": True}


@app.post("/cpu")
async def add_cpu(background_tasks: BackgroundTasks) -> dict[str, bool]:
    background_tasks.add_task(_common.cpu_sync)
    return {"queued": True}
