"""One HTTP client for every task of a worker process: the lane's lifespan."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import Depends

from backlane import Backlane, TaskContext

HOOKS_URL = os.environ.get("HOOKS_URL", "http://127.0.0.1:8000")


@asynccontextmanager
async def lifespan(lane: Backlane) -> AsyncIterator[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=HOOKS_URL, timeout=10) as client:
        yield {"http": client}  # opened before the first job, closed after the last


lane = Backlane(lifespan=lifespan)


def http_client(ctx: TaskContext) -> httpx.AsyncClient:
    client: httpx.AsyncClient = ctx.state["http"]
    return client


@lane.task(retries=5)
async def post_event(event: str, client: Annotated[httpx.AsyncClient, Depends(http_client)]) -> int:
    reply = await client.post("/hooks", json={"event": event})
    reply.raise_for_status()
    return reply.status_code
