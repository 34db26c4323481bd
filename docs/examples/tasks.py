"""Tasks outside a request: options, results, progress, retries, Depends."""

from collections.abc import Iterator
from typing import Annotated

import httpx
from fastapi import Depends

from backlane import Backlane, Retry, TaskContext

lane = Backlane()


class Session:
    """Stands in for a database session."""

    def __init__(self) -> None:
        self.open = True

    def close(self) -> None:
        self.open = False


def get_session() -> Iterator[Session]:
    session = Session()
    try:
        yield session  # a fresh session for each job ...
    finally:
        session.close()  # ... closed when the job ends


@lane.task(retries=3, timeout=120)
async def export_rows(ctx: TaskContext, table: str, limit: int = 1000) -> dict[str, int]:
    for done in range(0, limit + 1, limit // 4):
        await ctx.progress(done / limit, f"{done} rows")
    return {"rows": limit}


@lane.task
def count_users(session: Annotated[Session, Depends(get_session)]) -> bool:
    return session.open


@lane.task(retries=2, retry_on=httpx.TransportError)
async def fetch(url: str) -> int:
    async with httpx.AsyncClient() as client:
        reply = await client.get(url)
    if reply.status_code == 503:
        raise Retry("server busy", delay=30)  # try again in 30 s, counted as an attempt
    return reply.status_code


async def main() -> None:
    job = await export_rows.options(priority=5, key="nightly-users").enqueue("users", limit=400)
    print(await job.status())  # queued
    print(await job.result(timeout=60))  # {'rows': 400} once a worker ran it
