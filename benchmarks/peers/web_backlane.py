"""The guide's exercise with backlane's drop-in: the same endpoints as ``web_fastapi.py``
with one import changed. ``BENCH_EMBEDDED=1`` runs the default ``install(app)`` (one
embedded worker in the web process); otherwise the app is web-only and ``backlane worker``
processes run the tasks."""

from __future__ import annotations

import os

from fastapi import FastAPI

from backlane.fastapi import BackgroundTasks

from . import _common
from .with_backlane import lane

app = FastAPI()
lane.install(app, workers=1 if os.environ.get("BENCH_EMBEDDED") == "1" else 0)


@app.post("/sleep")
async def add_sleep(background_tasks: BackgroundTasks) -> dict[str, str]:
    return {"task_id": background_tasks.add_task(_common.sleep_async).id}


@app.post("/cpu")
async def add_cpu(background_tasks: BackgroundTasks) -> dict[str, str]:
    return {"task_id": background_tasks.add_task(_common.cpu_sync).id}
