# FastAPI's background-tasks tutorial (docs_src/background_tasks/tutorial002_an), with one
# line changed: BackgroundTasks comes from backlane.fastapi.
from typing import Annotated

from fastapi import Depends, FastAPI

from backlane.fastapi import BackgroundTasks

app = FastAPI()


def write_log(message: str):
    with open("log.txt", mode="a") as log:
        log.write(message)


def get_query(background_tasks: BackgroundTasks, q: str | None = None):
    if q:
        message = f"found query: {q}\n"
        background_tasks.add_task(write_log, message)
    return q


@app.post("/send-notification/{email}")
async def send_notification(
    email: str, background_tasks: BackgroundTasks, q: Annotated[str, Depends(get_query)]
):
    message = f"message to {email}\n"
    background_tasks.add_task(write_log, message)
    return {"message": "Message sent"}
