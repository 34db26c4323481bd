"""The lane the schedule acceptance tests run in real ``backlane scheduler`` and
``backlane worker`` processes: a 1-second interval, and a task that notes when it ran."""

from __future__ import annotations

import os
import time

from backlane import Backlane, TaskContext

lane = Backlane(os.environ.get("BACKLANE_URL", "memory://"), lease_seconds=2.0, sweep_interval=0.5)


def _note(line: str) -> None:
    fd = os.open(os.environ["SCHEDULE_APP_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@lane.every(1, name="every-second", retries=0)
def every_second(ctx: TaskContext) -> None:
    """One line per run: the job id."""
    _note(ctx.job_id)


@lane.task(retries=0)
def at_time(label: str) -> None:
    """One line: the label and when it ran."""
    _note(f"{label} {time.time():.3f}")
