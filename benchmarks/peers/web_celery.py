"""The guide's exercise with Celery, as the guide writes it: an ``async def`` endpoint calls
``task.delay()``; Redis broker and result backend; ``celery worker`` processes run the tasks
(``time.sleep``: Celery tasks are synchronous)."""

from __future__ import annotations

from fastapi import FastAPI

from .with_celery import cpu, sleep

app = FastAPI()


@app.post("/sleep")
async def add_sleep() -> dict[str, str]:
    return {"task_id": sleep.delay().id}


@app.post("/cpu")
async def add_cpu() -> dict[str, str]:
    return {"task_id": cpu.delay().id}
