"""The baseline: FastAPI's own ``BackgroundTasks`` with a no-op task."""

from fastapi import BackgroundTasks, FastAPI

app = FastAPI()


def noop(n: int) -> None:
    """The task: nothing to do, so the figures are the machinery's alone."""


@app.post("/task/{n}")
async def add_task(n: int, background_tasks: BackgroundTasks) -> dict[str, int]:
    background_tasks.add_task(noop, n)
    return {"n": n}
