"""The same app with backlane's drop-in: the import differs, and the lane is installed.

The store is ``BACKLANE_URL``; ``BENCH_WORKERS`` embedded workers (default 1; 0 measures
the web side alone, as when workers run in their own processes).
"""

import os

from fastapi import FastAPI

from backlane import Backlane
from backlane.fastapi import BackgroundTasks

app = FastAPI()
Backlane().install(app, workers=int(os.environ.get("BENCH_WORKERS", "1")))


def noop(n: int) -> None:
    """The task: nothing to do, so the figures are the machinery's alone."""


@app.post("/task/{n}")
async def add_task(n: int, background_tasks: BackgroundTasks) -> dict[str, int]:
    background_tasks.add_task(noop, n)
    return {"n": n}
