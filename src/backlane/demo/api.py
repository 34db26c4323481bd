"""The guide's examples as endpoints, on the guide's paths, each doing its work in the
background through the durable ``BackgroundTasks`` and answering at once with the job id and
a link to follow it (``/backlane/jobs/{id}``).

What the guide left open is closed here: uploads are stored under names the server chooses,
cleanup never leaves the service's temporary folder, mail headers cannot be injected, SMTP
settings come from the environment, every input has a size limit.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, File, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import BaseModel, EmailStr, Field, SecretStr, StringConstraints

from ..app import Backlane
from ..fastapi import BackgroundTasks
from ..jobs import JobHandle, JobState
from . import db, tasks
from .safety import confined, display_name, one_line
from .settings import DemoSettings

_NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
Subject = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=_NO_CONTROL)
]
"""One line of text: a mail subject cannot carry a second header."""
Body = Annotated[str, StringConstraints(max_length=10_000)]
Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=_NO_CONTROL)
]
COMPUTE_MAX = 10_000_000_000
_COPY_CHUNK = 256 * 1024


# -- request and reply bodies -----------------------------------------------------------


class EmailRequest(BaseModel):
    """A mail to send."""

    email: EmailStr
    subject: Subject
    body: Body


class UserCreate(BaseModel):
    """A registration. The password is stored hashed and never handed to a task."""

    email: EmailStr
    name: Name
    password: Annotated[SecretStr, Field(min_length=8, max_length=128)]


class Notification(BaseModel):
    """A notification, sent with the SMTP server the environment configures."""

    email: EmailStr
    title: Subject
    content: Body


class ComputeRequest(BaseModel):
    """How far to count primes."""

    limit: int = Field(default=1_000_000_000, ge=2, le=COMPUTE_MAX)


class JobLink(BaseModel):
    """One background job of a reply, and where to follow it."""

    id: str
    task: str
    url: str


class Accepted(BaseModel):
    """A reply: the work was stored and will run after it. ``job_id`` and ``url`` name the
    endpoint's main job; ``jobs`` lists every job the request added, in the order they run."""

    message: str
    job_id: str
    url: str
    jobs: list[JobLink]


class EmailAccepted(Accepted):
    email: str


class UserAccepted(Accepted):
    user_id: int


class UploadAccepted(Accepted):
    upload_id: str
    filename: str
    """The client's file name, as text only: it never names a file on the server."""
    size: int
    status_url: str
    download_url: str


class ItemAccepted(Accepted):
    item_id: int
    query: str | None


class ExportAccepted(Accepted):
    export_id: str
    status_url: str
    download_url: str


class CleanupAccepted(Accepted):
    directory: str
    days: int


class ComputeAccepted(Accepted):
    limit: int


class WorkStatus(BaseModel):
    """Where an upload's processing or an export is."""

    id: str
    job_id: str
    state: str
    progress: float | None
    message: str | None
    result: Any = None
    error: dict[str, Any] | None = None
    url: str
    download_url: str | None = None
    """Set once the result can be downloaded."""


def job_url(job_id: str) -> str:
    """Where the status API shows a job."""
    return f"/backlane/jobs/{job_id}"


def _links(handles: list[JobHandle]) -> list[JobLink]:
    return [JobLink(id=h.id, task=h.task, url=job_url(h.id)) for h in handles]


# -- dependencies of the endpoints ---------------------------------------------------------


def log_query(
    background_tasks: BackgroundTasks,
    q: Annotated[str | None, Query(max_length=200)] = None,
) -> str | None:
    """A dependency that logs the query, in the background, before the endpoint's own
    tasks (FastAPI's order: dependencies' tasks first)."""
    if q:
        background_tasks.add_task(tasks.write_log, f"query: {q}")
    return q


def _not_a_folder(directory: str, why: str) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", "directory"), "msg": why, "input": directory}]
    )


# -- the router ---------------------------------------------------------------------------


def guide_router(lane: Backlane, settings: DemoSettings, database: db.Database) -> APIRouter:
    """Every example of the guide, as routes working on ``settings.data_dir``."""
    router = APIRouter(tags=["the guide's examples"])

    async def status_of(item_id: str, job_id: str, download_url: str) -> WorkStatus:
        job = await lane.store.get(job_id)
        if job is None:
            raise HTTPException(404, detail=f"the job of {item_id} is gone (purged)")
        done = job.state is JobState.SUCCEEDED
        return WorkStatus(
            id=item_id,
            job_id=job.id,
            state=job.state.value,
            progress=job.progress,
            message=job.message,
            result=job.to_public()["result"],
            error=job.error,
            url=job_url(job.id),
            download_url=download_url if done else None,
        )

    async def finished(job_id: str) -> None:
        job = await lane.store.get(job_id)
        if job is None or job.state is not JobState.SUCCEEDED:
            state = "gone" if job is None else job.state.value
            raise HTTPException(409, detail=f"not ready: its job is {state}")

    @router.post("/send-notification/{email}", response_model=EmailAccepted)
    async def send_notification(email: EmailStr, background_tasks: BackgroundTasks) -> Any:
        """Mail a notification to ``email`` in the background."""
        job = background_tasks.add_task(
            tasks.send_email,
            email,
            subject="A notification from the backlane demo",
            body="You asked for a notification; a background job sent it.\n",
        )
        return EmailAccepted(
            message="the notification will be sent in the background",
            job_id=job.id,
            url=job_url(job.id),
            jobs=_links([job]),
            email=email,
        )

    @router.post("/send-email", response_model=EmailAccepted)
    async def send_email(request: EmailRequest, background_tasks: BackgroundTasks) -> Any:
        """Send the mail described in the body, in the background."""
        job = background_tasks.add_task(
            tasks.send_email, request.email, subject=request.subject, body=request.body
        )
        return EmailAccepted(
            message="the mail is being sent",
            job_id=job.id,
            url=job_url(job.id),
            jobs=_links([job]),
            email=request.email,
        )

    @router.post("/register", response_model=UserAccepted)
    async def register(user: UserCreate, background_tasks: BackgroundTasks) -> Any:
        """Register a user, then, in this order: a welcome mail, the user's folder, a
        notice to the admin. 409 if the address is already registered."""
        password = user.password.get_secret_value()
        try:
            user_id = await database.run(db.add_user, user.email, user.name, password)
        except db.EmailTaken:
            raise HTTPException(409, detail="this email address is already registered") from None
        welcome = background_tasks.add_task(
            tasks.send_welcome_email, email=user.email, name=user.name
        )
        background_tasks.add_task(tasks.create_user_folder, user_id=user_id)
        background_tasks.add_task(
            tasks.notify_admin, message=f"New user registered: {user.email} (id {user_id})"
        )
        return UserAccepted(
            message="registered; welcome mail, folder and admin notice follow in order",
            job_id=welcome.id,
            url=job_url(welcome.id),
            jobs=_links(background_tasks.jobs),
            user_id=user_id,
        )

    @router.post("/upload", response_model=UploadAccepted)
    async def upload_file(
        background_tasks: BackgroundTasks, file: Annotated[UploadFile, File()]
    ) -> Any:
        """Store the file under a name the server chooses, then compress it in the
        background (the result beside it, the original removed). 413 above the size
        limit. The client's file name is kept as text only."""
        upload_id = uuid.uuid4().hex
        original, _ = tasks.upload_paths(settings, upload_id)
        partial = settings.tmp / f"{upload_id}.part"
        size = 0
        try:
            async with await anyio.open_file(partial, "xb") as out:
                while chunk := await file.read(_COPY_CHUNK):
                    size += len(chunk)
                    if size > settings.max_upload_bytes:
                        raise HTTPException(
                            413, detail=f"file larger than {settings.max_upload_bytes} bytes"
                        )
                    await out.write(chunk)
            await anyio.Path(partial).replace(original)
        finally:
            with contextlib.suppress(FileNotFoundError):
                await anyio.Path(partial).unlink()
        name = display_name(file.filename)
        kind = one_line(file.content_type or "application/octet-stream", limit=100)
        job = background_tasks.add_task(tasks.process_upload, upload_id)
        await database.run(
            db.add_upload,
            upload_id,
            original_name=name,
            content_type=kind,
            size=size,
            job_id=job.id,
        )
        return UploadAccepted(
            message="uploaded; it is processed in the background",
            job_id=job.id,
            url=job_url(job.id),
            jobs=_links([job]),
            upload_id=upload_id,
            filename=name,
            size=size,
            status_url=f"/upload/{upload_id}",
            download_url=f"/upload/{upload_id}/download",
        )

    @router.get("/upload/{upload_id}", response_model=WorkStatus)
    async def upload_status(upload_id: uuid.UUID) -> Any:
        """Where the processing of an upload is."""
        found = await database.run(db.get_upload, upload_id.hex)
        if found is None:
            raise HTTPException(404, detail="no such upload")
        download = f"/upload/{upload_id.hex}/download"
        return await status_of(upload_id.hex, found["job_id"], download)

    @router.get("/upload/{upload_id}/download", response_class=FileResponse)
    async def upload_download(upload_id: uuid.UUID) -> Any:
        """The processed (gzip-compressed) file, once its job has succeeded."""
        found = await database.run(db.get_upload, upload_id.hex)
        if found is None:
            raise HTTPException(404, detail="no such upload")
        await finished(found["job_id"])
        _, result = tasks.upload_paths(settings, upload_id.hex)
        return FileResponse(
            result, media_type="application/gzip", filename=f"{found['original_name']}.gz"
        )

    @router.post("/process/{item_id}", response_model=ItemAccepted)
    async def process_item(
        item_id: int,
        background_tasks: BackgroundTasks,
        q: Annotated[str | None, Depends(log_query)] = None,
    ) -> Any:
        """Log the item in the background; the dependency's log of ``q`` runs first."""
        job = background_tasks.add_task(tasks.write_log, f"processing item {item_id}")
        return ItemAccepted(
            message="processing",
            job_id=job.id,
            url=job_url(job.id),
            jobs=_links(background_tasks.jobs),
            item_id=item_id,
            query=q,
        )

    @router.post("/log", response_model=Accepted)
    async def log_message(
        message: Annotated[str, Query(min_length=1, max_length=1000)],
        background_tasks: BackgroundTasks,
    ) -> Any:
        """Append ``message`` to the service log, from an ``async def`` task."""
        job = background_tasks.add_task(tasks.append_log, message)
        return Accepted(
            message="the message will be logged",
            job_id=job.id,
            url=job_url(job.id),
            jobs=_links([job]),
        )

    @router.post("/notify", response_model=EmailAccepted)
    async def notify(notification: Notification, background_tasks: BackgroundTasks) -> Any:
        """Send a notification through the SMTP server named by ``BACKLANE_SMTP_*``;
        retried with backoff while the server fails, then failed with its error."""
        job = background_tasks.add_task(
            tasks.send_notification,
            notification.email,
            title=notification.title,
            content=notification.content,
        )
        return EmailAccepted(
            message="the notification is being sent",
            job_id=job.id,
            url=job_url(job.id),
            jobs=_links([job]),
            email=notification.email,
        )

    @router.post("/export", response_model=ExportAccepted)
    async def export_data(
        background_tasks: BackgroundTasks,
        export_format: Annotated[Literal["csv"], Query(alias="format")] = "csv",
        dataset: db.Dataset = "users",
    ) -> Any:
        """Export a table of the service's own data (its users, or its request log) as
        CSV in the background; follow it at ``/export/{export_id}``."""
        export_id = uuid.uuid4().hex
        job = background_tasks.add_task(tasks.export_csv, export_id, dataset)
        await database.run(
            db.add_export, export_id, dataset=dataset, format=export_format, job_id=job.id
        )
        return ExportAccepted(
            message="the export has started",
            job_id=job.id,
            url=job_url(job.id),
            jobs=_links([job]),
            export_id=export_id,
            status_url=f"/export/{export_id}",
            download_url=f"/export/{export_id}/download",
        )

    @router.get("/export/{export_id}", response_model=WorkStatus)
    async def export_status(export_id: uuid.UUID) -> Any:
        """An export's state and progress."""
        found = await database.run(db.get_export, export_id.hex)
        if found is None:
            raise HTTPException(404, detail="no such export")
        return await status_of(export_id.hex, found["job_id"], f"/export/{export_id.hex}/download")

    @router.get("/export/{export_id}/download", response_class=FileResponse)
    async def export_download(export_id: uuid.UUID) -> Any:
        """The CSV, once the export has finished (409 before)."""
        found = await database.run(db.get_export, export_id.hex)
        if found is None:
            raise HTTPException(404, detail="no such export")
        await finished(found["job_id"])
        path = settings.exports / f"{export_id.hex}.csv"
        filename = f"{found['dataset']}-{export_id.hex[:8]}.csv"
        return FileResponse(path, media_type="text/csv", filename=filename)

    @router.post("/cleanup", response_model=CleanupAccepted)
    async def trigger_cleanup(
        background_tasks: BackgroundTasks,
        days: Annotated[int, Query(ge=0, le=36_500)] = 7,
        directory: Annotated[str, Query(max_length=255)] = ".",
    ) -> Any:
        """Remove files older than ``days`` days from the service's temporary folder (or
        a folder inside it). Any ``directory`` outside it, through a symbolic link or not,
        is a 422 and nothing is removed."""
        folder = confined(settings.tmp, directory)
        if folder is None:
            raise _not_a_folder(directory, "must be the temporary folder or a folder inside it")
        if not await anyio.Path(folder).is_dir():
            raise _not_a_folder(directory, "no such folder inside the temporary folder")
        relative = str(folder.relative_to(settings.tmp.resolve()))
        job = background_tasks.add_task(tasks.cleanup_temp, days, relative)
        return CleanupAccepted(
            message=f"files older than {days} days will be removed",
            job_id=job.id,
            url=job_url(job.id),
            jobs=_links([job]),
            directory=relative,
            days=days,
        )

    @router.post("/compute", response_model=ComputeAccepted)
    async def compute(request: ComputeRequest, background_tasks: BackgroundTasks) -> Any:
        """Count the primes below ``limit``: a long CPU-bound job with progress, run in
        worker processes so that this server keeps answering."""
        job = background_tasks.add_task(tasks.count_primes_below, request.limit)
        return ComputeAccepted(
            message="computing in the background",
            job_id=job.id,
            url=job_url(job.id),
            jobs=_links([job]),
            limit=request.limit,
        )

    return router
