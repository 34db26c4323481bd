"""The drop-in: FastAPI's BackgroundTasks API, durable."""

from typing import Annotated

from fastapi import Depends, FastAPI

from backlane import Backlane
from backlane.fastapi import BackgroundTasks

lane = Backlane()
app = FastAPI()
lane.install(app, workers=1)

LOG: list[str] = []  # stands in for a file or a table


def write_log(message: str) -> None:
    LOG.append(message)


@lane.task(retries=5, backoff=2.0)
async def send_welcome(email: str) -> None:
    LOG.append(f"welcome {email}")


def get_query(background_tasks: BackgroundTasks, q: str | None = None) -> str | None:
    if q:
        background_tasks.add_task(write_log, f"found query: {q}")  # runs first
    return q


@app.post("/send-notification/{email}")
async def send_notification(
    email: str, background_tasks: BackgroundTasks, q: Annotated[str | None, Depends(get_query)]
) -> dict[str, str]:
    job = background_tasks.add_task(write_log, f"message to {email}")  # then this
    background_tasks.add_task(send_welcome.options(delay=0, priority=10), email)  # then this
    return {"message": "Message sent", "job_id": job.id}
