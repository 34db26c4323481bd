"""The demo service: ``create_app()`` builds it from the environment (``BACKLANE_URL``,
``BACKLANE_DEMO_*``, ``BACKLANE_SMTP_*``), as ``backlane demo`` sets it.

Besides the guide's endpoints (``api.py``) it serves the home page (each example in a
sentence, a form to try it, the latest jobs with their live state), the mailbox of the
local SMTP sink, and the jobs feed the home page polls. Templates are rendered by Jinja2
with autoescaping on; scripts and styles are served from the package.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..app import Backlane
from ..email import SmtpSettings, read_mailbox
from ..jobs import Job
from . import db, tasks
from .api import guide_router, job_url
from .middleware import BodyLimitMiddleware, BrowserGuardMiddleware, RequestLogMiddleware
from .settings import DemoSettings

HERE = Path(__file__).parent
LATEST_JOBS = 15
"""How many jobs the home page lists."""
MULTIPART_ALLOWANCE = 64 * 1024
"""Bytes an upload's body may have beyond the file itself (multipart boundaries, headers)."""
NOT_LOGGED = ("/static/", "/backlane/", "/demo/jobs")
"""Paths the request log leaves out: assets and the status polling (which would log itself)."""


def create_app(lane: Backlane | None = None) -> FastAPI:
    """The demo service, on ``lane`` (default: a lane on ``BACKLANE_URL``, else on
    ``jobs.db`` in the data folder) with one embedded worker."""
    settings = DemoSettings()
    if lane is None:
        lane = Backlane(None if os.environ.get("BACKLANE_URL") else settings.jobs_url)
    database = db.Database(settings.database)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.make_dirs()
        await database.run(lambda conn: None)  # the schema is made on connecting
        yield

    app = FastAPI(
        title="backlane demo",
        version=__version__,
        description="The background-tasks guide's examples, durable.",
        docs_url=None,  # Swagger UI and ReDoc load from a CDN; this service loads nothing
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.demo = settings
    tasks.register(lane)
    app.include_router(guide_router(lane, settings, database))
    app.include_router(pages_router(lane, settings))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    lane.install(app, workers=1, dashboard=True)

    def body_limit(path: str) -> int:
        if path == "/upload":
            return settings.max_upload_bytes + MULTIPART_ALLOWANCE
        return settings.max_body_bytes

    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit)
    app.add_middleware(BrowserGuardMiddleware)
    app.add_middleware(RequestLogMiddleware, lane=lane, skip=NOT_LOGGED)
    return app


def templates() -> jinja2.Environment:
    """The demo's templates, every value escaped for HTML unless marked safe."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def pages_router(lane: Backlane, settings: DemoSettings) -> APIRouter:
    """The home page, the mailbox, and the jobs feed."""
    router = APIRouter(include_in_schema=False)
    env = templates()

    def render(name: str, **context: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**context))

    @router.get("/")
    async def home() -> HTMLResponse:
        smtp = SmtpSettings()
        return render(
            "home.html",
            title="backlane demo",
            store=redacted(lane.url),
            data_dir=str(settings.data_dir),
            smtp=smtp.describe(),
            local_smtp=settings.local_smtp,
            admin_email=settings.admin_email,
            max_upload=size_text(settings.max_upload_bytes),
        )

    @router.get("/demo/jobs")
    async def latest_jobs() -> dict[str, list[dict[str, Any]]]:
        found = await lane.store.list_jobs(queue="default", limit=LATEST_JOBS)
        return {"jobs": [job_summary(job) for job in found]}

    @router.get("/demo/mailbox")
    async def mailbox(request: Request) -> Response:
        mails = await anyio.to_thread.run_sync(read_mailbox, settings.mailbox)
        headers = {"Vary": "Accept"}
        if prefers_json(request.headers.get("accept", "")):
            fields = ("to", "subject", "body", "received_at")
            found = [{k: v for k, v in asdict(m).items() if k in fields} for m in mails]
            return JSONResponse(found, headers=headers)
        page = render(
            "mailbox.html",
            title="Mailbox",
            mails=list(reversed(mails)),
            local_smtp=settings.local_smtp,
            smtp=SmtpSettings().describe(),
        )
        page.headers.update(headers)
        return page

    return router


def job_summary(job: Job) -> dict[str, Any]:
    """A job as the home page lists it."""
    error = None
    if job.error:
        error = f"{job.error.get('type')}: {job.error.get('message')}"
    return {
        "id": job.id,
        "task": job.task.rpartition(":")[2],
        "state": job.state.value,
        "progress": job.progress,
        "message": job.message,
        "attempts": job.attempts,
        "error": error,
        "created_at": job.to_public()["created_at"],
        "url": job_url(job.id),
    }


def prefers_json(accept: str) -> bool:
    """Whether an ``Accept`` header ranks JSON above HTML (an absent one does not)."""
    rank = {"application/json": 0.0, "text/html": 0.0}
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if media.lower() not in rank:
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        rank[media.lower()] = max(rank[media.lower()], quality)
    return rank["application/json"] > rank["text/html"]


def size_text(size: int) -> str:
    """A size in bytes for people: ``10 MiB``, ``256 KiB``, ``100 bytes``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def redacted(url: str) -> str:
    """``url`` without its password, fit to show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
