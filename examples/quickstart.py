"""The quick-start service: FastAPI's BackgroundTasks, made durable by one import.

Run it with ``./scripts/serve`` (or ``uvicorn examples.quickstart:app``), then::

    curl -X POST http://127.0.0.1:8000/send-notification/ann@example.com
    curl http://127.0.0.1:8000/backlane/jobs/<job_id>
"""

import os
from pathlib import Path

import anyio
from fastapi import FastAPI
from pydantic import EmailStr

from backlane import Backlane, TaskContext
from backlane.fastapi import BackgroundTasks

lane = Backlane()  # BACKLANE_URL, else sqlite:///./backlane.db
app = FastAPI(title="backlane quick start")
lane.install(app, workers=1)  # opens the store, runs an embedded worker, serves /backlane/jobs

OUTBOX = Path(os.environ.get("QUICKSTART_OUTBOX", "outbox"))


def write_notification(email: str, message: str = "") -> None:
    """A plain function: durable by its import path, no decorator needed."""
    OUTBOX.mkdir(parents=True, exist_ok=True)
    with open(OUTBOX / "notifications.log", "a") as log:
        log.write(f"notification for {email}: {message}\n")


@lane.task(retries=5, timeout=60)
async def build_report(ctx: TaskContext, rows: int) -> dict[str, int]:
    """A task with options: retried up to 5 times, 60 s per attempt, progress reported."""
    total = 0
    for done in range(1, rows + 1):
        total += done
        if done % max(1, rows // 10) == 0:
            await ctx.progress(done / rows, f"{done} of {rows} rows")
            await anyio.sleep(0.01)
    return {"rows": rows, "total": total}


@app.post("/send-notification/{email}")
async def send_notification(email: EmailStr, background_tasks: BackgroundTasks) -> dict[str, str]:
    job = background_tasks.add_task(write_notification, email, message="some notification")
    return {
        "message": "Notification sent in the background",
        "job_id": job.id,
        "status": f"/backlane/jobs/{job.id}",
    }


@app.post("/reports")
async def start_report(rows: int = 1000) -> dict[str, str]:
    job = await build_report.enqueue(rows)
    return {"job_id": job.id, "status": f"/backlane/jobs/{job.id}"}
