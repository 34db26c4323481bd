"""Periodic work declared in code: no beat process to babysit."""

from datetime import timedelta

from backlane import Backlane, TaskContext

lane = Backlane()

REPORTS: list[str] = []


@lane.cron("0 3 * * *", tz="Asia/Shanghai", missed="run_once", retries=2)
async def nightly_report(ctx: TaskContext) -> None:
    """03:00 Shanghai time every day; after downtime, one catch-up run."""
    REPORTS.append(ctx.job_id)


@lane.every(timedelta(minutes=5), missed="skip")
def refresh_cache() -> None:
    """Every five minutes, on the clock (:00, :05, ...); missed slots are skipped."""
