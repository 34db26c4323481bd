"""The demo's background work: every function here runs in a worker, after the response.

They are plain module-level functions, durable by their import path, as the drop-in
``BackgroundTasks`` wants them. What they need besides their arguments (the settings, a
database connection, the SMTP server) comes from ``Depends(...)``, resolved in the worker
for each run: a fresh connection per job, closed after it, never the request's.
A task that may run twice (at-least-once delivery) does no harm the second time.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream
from fastapi import Depends
from pydantic import EmailStr

from ..context import TaskContext
from ..email import TRANSIENT_MAIL_ERRORS, SmtpSettings, send_mail
from . import db
from .safety import confined, csv_cell, one_line, open_folder
from .settings import DemoSettings

if TYPE_CHECKING:
    from ..app import Backlane

REQUEST_LOG_QUEUE = "requests"
"""The queue of the request-logging jobs, kept apart from the examples' jobs."""
COMPUTE_CHUNK = 10_000_000
"""Numbers ``/compute`` sieves between two progress reports (about 0.1 s of CPU)."""
_SERVER_ID = re.compile(r"^[0-9a-f]{32}$")
"""The ids the server chooses for uploads and exports (``uuid4().hex``)."""
_CHUNK = 64 * 1024
_REPORT_EVERY = 1024 * 1024


# -- what tasks depend on ---------------------------------------------------------------


# --8<-- [start:dependencies]
def demo_settings() -> DemoSettings:
    """The demo's settings, read from the environment when the job runs."""
    return DemoSettings()


def smtp_settings() -> SmtpSettings:
    """Where mail goes, read from ``BACKLANE_SMTP_*`` when the job runs."""
    return SmtpSettings()


def demo_database(
    settings: Annotated[DemoSettings, Depends(demo_settings)],
) -> Iterator[sqlite3.Connection]:
    """A connection of the job's own to the demo database, closed when the job ends."""
    conn = db.connect(settings.database)
    try:
        yield conn
    finally:
        conn.close()


Settings = Annotated[DemoSettings, Depends(demo_settings)]
Smtp = Annotated[SmtpSettings, Depends(smtp_settings)]
Database = Annotated[sqlite3.Connection, Depends(demo_database)]
# --8<-- [end:dependencies]


def register(lane: Backlane) -> None:
    """Give the mail tasks their retry filter on ``lane``: retried with backoff when the
    SMTP server is down or refuses for now; any other error fails the job at once."""
    for mail_task in (send_email, send_welcome_email, notify_admin, send_notification):
        lane.task(retry_on=TRANSIENT_MAIL_ERRORS)(mail_task)
    lane.cron("0 3 * * *", missed="run_once", name="daily-cleanup")(scheduled_cleanup)


# -- mail -------------------------------------------------------------------------------


# --8<-- [start:mail]
async def send_email(to: EmailStr, subject: str, body: str, smtp: Smtp) -> str:
    """Send one mail through SMTP; returns its Message-ID."""
    return await send_mail(smtp, to=to, subject=subject, body=body)


# --8<-- [end:mail]


async def send_welcome_email(email: EmailStr, name: str, smtp: Smtp) -> str:
    """Welcome a newly registered user by mail; returns the Message-ID."""
    body = (
        f"Hello {name},\n\nwelcome to the backlane demo. This mail was sent by a background "
        "job, after your registration had already been answered.\n"
    )
    return await send_mail(smtp, to=email, subject="Welcome to the backlane demo", body=body)


async def notify_admin(message: str, settings: Settings, smtp: Smtp) -> str:
    """Mail ``message`` to the demo's admin address; returns the Message-ID."""
    to = settings.admin_email
    return await send_mail(smtp, to=to, subject="backlane demo: admin notice", body=message)


async def send_notification(to: EmailStr, title: str, content: str, smtp: Smtp) -> str:
    """Send a notification with the SMTP server the environment names; returns the
    Message-ID."""
    return await send_mail(smtp, to=to, subject=title, body=content)


# -- files ------------------------------------------------------------------------------


def create_user_folder(user_id: int, settings: Settings) -> str:
    """Create the user's own folder (named by id, never by anything the user typed) with a
    README; returns its path relative to the data folder."""
    folder = settings.users / str(user_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.txt").write_text(f"Files of user {user_id}.\n", encoding="utf-8")
    return str(folder.relative_to(settings.data_dir))


def write_log(message: str, settings: Settings) -> None:
    """Append one line to the service log (a ``def`` task: it runs in a worker thread)."""
    line = f"{db.now_iso()} {one_line(message)}\n"
    with open(settings.service_log, "a", encoding="utf-8") as log:
        log.write(line)


async def append_log(message: str, settings: Settings) -> None:
    """Append one line to the service log with AnyIO's async file API (an ``async def``
    task: it runs on the worker's event loop and must not block it)."""
    line = f"{db.now_iso()} {one_line(message)}\n"
    async with await anyio.open_file(settings.service_log, "a", encoding="utf-8") as log:
        await log.write(line)


def upload_paths(settings: DemoSettings, upload_id: str) -> tuple[Path, Path]:
    """Where an upload lives: the stored original and its processed result. Raises
    ``ValueError`` for an id the server could not have chosen."""
    if not _SERVER_ID.match(upload_id):
        raise ValueError(f"not an upload id: {upload_id!r}")
    return settings.uploads / f"{upload_id}.upload", settings.uploads / f"{upload_id}.gz"


def process_upload(ctx: TaskContext, upload_id: str, settings: Settings) -> dict[str, Any]:
    """Compress an uploaded file with gzip into a result beside it, then remove the
    original. Returns the sizes and the SHA-256 of the original. Run twice, it finds the
    result already there and describes it."""
    original, result = upload_paths(settings, upload_id)
    partial = settings.uploads / f"{upload_id}.gz.part"
    digest = hashlib.sha256()
    size = 0
    if original.exists():
        total = max(original.stat().st_size, 1)
        report_at = _REPORT_EVERY
        with open(original, "rb") as src, gzip.open(partial, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
                if size >= report_at:
                    ctx.progress_sync(min(size / total, 0.99), f"{size} bytes compressed")
                    report_at += _REPORT_EVERY
        os.replace(partial, result)
        os.unlink(original)
    else:  # a second run after the first one finished
        with gzip.open(result, "rb") as done:
            while chunk := done.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    ctx.progress_sync(1.0, "compressed")
    return {
        "upload_id": upload_id,
        "bytes": size,
        "compressed_bytes": result.stat().st_size,
        "sha256": digest.hexdigest(),
    }


def export_csv(
    ctx: TaskContext, export_id: str, dataset: db.Dataset, settings: Settings, conn: Database
) -> dict[str, Any]:
    """Write the rows of ``dataset`` from the demo database as CSV to the export's file,
    reporting progress; returns how many rows were written."""
    if not _SERVER_ID.match(export_id):
        raise ValueError(f"not an export id: {export_id!r}")
    target = settings.exports / f"{export_id}.csv"
    partial = settings.exports / f"{export_id}.csv.part"
    total = max(db.count_rows(conn, dataset), 1)
    written = 0
    with open(partial, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(db.EXPORT_COLUMNS[dataset])
        for row in db.export_rows(conn, dataset):
            writer.writerow([csv_cell(value) for value in row])
            written += 1
            if written % 500 == 0:
                ctx.progress_sync(min(written / total, 0.99), f"{written} rows")
    os.replace(partial, target)
    ctx.progress_sync(1.0, f"{written} rows")
    return {"export_id": export_id, "dataset": dataset, "rows": written}


def scheduled_cleanup(settings: Settings) -> dict[str, Any]:
    """The daily cleanup (03:00 UTC): files older than 7 days in the temporary folder."""
    return cleanup_temp(7, ".", settings)


def cleanup_temp(days: float, directory: str, settings: Settings) -> dict[str, Any]:
    """Remove the regular files older than ``days`` days from ``directory`` (relative to
    the demo's temporary folder, and only if it lies inside it; symbolic links are neither
    followed nor removed). Returns the names removed and how many files were kept."""
    folder = confined(settings.tmp, directory)
    if folder is None:
        raise ValueError(f"{directory!r} is not inside the temporary folder; nothing removed")
    cutoff = time.time() - days * 86400
    removed: list[str] = []
    kept = 0
    fd = open_folder(folder)  # the folder checked above, not whatever replaces it later
    try:
        for entry in os.scandir(fd):
            if not entry.is_file(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.name, dir_fd=fd)
                removed.append(entry.name)
            else:
                kept += 1
    finally:
        os.close(fd)
    where = folder.relative_to(settings.tmp.resolve())
    return {"directory": str(where), "removed": sorted(removed), "kept": kept}


# -- computing --------------------------------------------------------------------------


async def count_primes_below(ctx: TaskContext, limit: int) -> dict[str, int]:
    """Count the primes below ``limit`` in a process of its own (so that neither the
    event loop nor the GIL of this one is held), reporting progress after each slice of
    numbers. Cancelling the job, or stopping the worker, ends that process."""
    command = [sys.executable, "-m", "backlane.demo.compute", str(limit), str(COMPUTE_CHUNK)]
    found = 0
    other: list[str] = []
    async with await anyio.open_process(
        command, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT
    ) as process:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        while True:
            try:
                line = (await lines.receive_until(b"\n", 64 * 1024)).decode(errors="replace")
            except (anyio.EndOfStream, anyio.IncompleteRead):
                break
            stop, _, count = line.partition(" ")
            if stop.isdigit() and count.isdigit():
                found = int(count)
                await ctx.progress(int(stop) / limit, f"{found} primes below {stop}")
            else:
                other.append(line)
        code = await process.wait()
    if code != 0:
        said = "\n".join(other[-20:])
        raise RuntimeError(f"the computing process exited with code {code}: {said}")
    return {"limit": limit, "primes": found}


# -- the request log --------------------------------------------------------------------


def log_request(
    ctx: TaskContext,
    at: str,
    method: str,
    path: str,
    status: int,
    duration_ms: float,
    conn: Database,
) -> None:
    """Record one API request in the demo database (once, however often the job runs)."""
    db.log_request(
        conn,
        job_id=ctx.job_id,
        at=at,
        method=one_line(method, limit=16),
        path=one_line(path, limit=300),
        status=status,
        duration_ms=duration_ms,
    )
