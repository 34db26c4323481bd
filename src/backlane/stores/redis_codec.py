"""How the Redis store writes jobs and workers as Redis strings, and reads them back.

A job is a hash of its fields, each a string; a field that is None is left out. Floats are
written with ``repr`` and read with ``float``, so every time comes back exactly as given;
``error`` and ``meta`` are JSON. The scripts never format a number they did not receive,
so nothing is rounded on the way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..exceptions import StoreError
from ..jobs import Job, JobState
from .base import Outcome, WorkerRecord

log = logging.getLogger("backlane.stores.redis")

_STATES = {state.value: state for state in JobState}


def json_text(value: Any) -> str:
    """``value`` as compact JSON that Redis can carry: non-ASCII characters as they are,
    unless a string holds a lone surrogate (a file name decoded with surrogateescape, in an
    exception's message), which no UTF-8 can: then every one as its escape, which reads
    back the same."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return json.dumps(value, separators=(",", ":"))
    return text


def number(value: float) -> str:
    """A float as a string that reads back as the same float (in Python and in Lua)."""
    return repr(float(value))


_TEXT = ("key", "worker_id", "message", "result", "after")
_TIMES = ("started_at", "finished_at", "lease_until", "progress", "release_at", "keep_until")


def job_fields(job: Job) -> dict[str, str]:
    """``job`` as the string fields of its hash (None fields left out)."""
    values = job.__dict__
    meta = job.meta
    fields = {
        "task": job.task,
        "payload": job.payload,
        "id": job.id,
        "queue": job.queue,
        "priority": str(int(job.priority)),
        "state": job.state.value,
        "attempts": str(int(job.attempts)),
        "run_at": repr(float(job.run_at)),
        "created_at": repr(float(job.created_at)),
        "meta": json_text(meta) if meta else "{}",
    }
    for name in _TEXT:
        text = values[name]
        if text is not None:
            fields[name] = text
    for name in _TIMES:
        value = values[name]
        if value is not None:
            fields[name] = repr(float(value))
    if job.error is not None:
        fields["error"] = json_text(job.error)
    if job.cancel_requested:
        fields["cancel_requested"] = "1"
    if job.attempt_history:
        fields["history"] = json_text(job.attempt_history)
    return fields


def job_pairs(job: Job) -> list[str]:
    """``job``'s fields as the ``enqueue`` script takes one job: name, value, name, value..."""
    return [text for pair in job_fields(job).items() for text in pair]


def jobs_json(jobs: Sequence[Job]) -> str:
    """A batch of jobs as the JSON array the ``enqueue`` script reads."""
    return json.dumps([job_fields(job) for job in jobs], ensure_ascii=False)


def _opt_float(value: str | None) -> float | None:
    return None if value is None else float(value)


class UnreadableJob(StoreError):
    """A job hash that does not read as a job (changed by hand, or written by something
    other than backlane). ``job_id`` is the id it holds, if any."""

    def __init__(self, job_id: str | None, problem: str) -> None:
        self.job_id = job_id
        super().__init__(
            f"job {job_id}: its hash in Redis cannot be read ({problem}); mend that field "
            "or delete the job"
        )


_REQUIRED = (
    "task",
    "payload",
    "id",
    "queue",
    "priority",
    "state",
    "attempts",
    "run_at",
    "created_at",
)
_READERS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("state", _STATES.__getitem__, "a job state"),
    ("priority", int, "an integer"),
    ("attempts", int, "an integer"),
    *((name, float, "a number") for name in ("run_at", "created_at", *_TIMES)),
    *((name, json.loads, "JSON") for name in ("error", "meta", "history")),
)


def _fault(h: dict[str, str]) -> str:
    """What makes the job hash ``h`` unreadable, naming the field."""
    for name in _REQUIRED:
        if name not in h:
            return f"field {name!r} is missing"
    for name, read, kind in _READERS:
        value = h.get(name)
        if value is not None:
            try:
                read(value)
            except (KeyError, ValueError):
                return f"field {name!r} holds {value[:80]!r}, not {kind}"
    return "its fields do not make a job"


def decode_jobs(rows: Iterable[Sequence[str]], unreadable: list[UnreadableJob]) -> list[Job]:
    """The jobs of the hashes ``rows`` (as ``decode_job`` takes them) that read as jobs;
    each that does not is added to ``unreadable`` instead."""
    jobs: list[Job] = []
    for flat in rows:
        try:
            jobs.append(decode_job(flat))
        except UnreadableJob as exc:
            unreadable.append(exc)
    return jobs


def decode_listed(flat: Sequence[str]) -> Job:
    """The job of hash ``flat`` (as ``decode_job`` takes it) for a listing: one that does
    not read is logged, and shown in its place as a stand-in (``unreadable_stand_in``),
    so that one bad hash neither fails a page nor shifts the pages after it."""
    try:
        return decode_job(flat)
    except UnreadableJob as problem:
        log.warning("%s (listed with an error saying so)", problem)
        return unreadable_stand_in(flat, problem)


def unreadable_stand_in(flat: Sequence[str], problem: UnreadableJob) -> Job:
    """A job made of the fields of hash ``flat`` that read (defaults for the others; a
    state that does not read shows as failed), its ``error`` saying what is wrong."""
    it = iter(flat)
    h = dict(zip(it, it, strict=False))

    def read(name: str, reader: Callable[[str], Any], default: Any) -> Any:
        try:
            return reader(h[name])
        except (KeyError, ValueError, TypeError):
            return default

    kind = type(problem)
    return Job(
        task=h.get("task", "?"),
        payload=h.get("payload", ""),
        id=problem.job_id or "?",
        queue=h.get("queue", "?"),
        priority=read("priority", int, 0),
        state=read("state", _STATES.__getitem__, JobState.FAILED),
        key=h.get("key"),
        attempts=read("attempts", int, 0),
        run_at=read("run_at", float, 0.0),
        created_at=read("created_at", float, 0.0),
        worker_id=h.get("worker_id"),
        error={
            "type": f"{kind.__module__}.{kind.__qualname__}",
            "message": str(problem),
            "traceback": "",
        },
    )


def decode_job(flat: Sequence[str]) -> Job:
    """The job whose hash ``HGETALL`` returned as ``flat`` (name, value, name, value...).
    Raises ``UnreadableJob`` naming the field that does not read."""
    it = iter(flat)
    h = dict(zip(it, it, strict=False))
    try:
        return _job(h)
    except (KeyError, ValueError, TypeError):
        raise UnreadableJob(h.get("id"), _fault(h)) from None


def _job(h: dict[str, str]) -> Job:
    error = h.get("error")
    meta = h.get("meta")
    history = h.get("history")
    return Job(
        task=h["task"],
        payload=h["payload"],
        id=h["id"],
        queue=h["queue"],
        priority=int(h["priority"]),
        state=_STATES[h["state"]],
        key=h.get("key"),
        attempts=int(h["attempts"]),
        run_at=float(h["run_at"]),
        created_at=float(h["created_at"]),
        started_at=_opt_float(h.get("started_at")),
        finished_at=_opt_float(h.get("finished_at")),
        lease_until=_opt_float(h.get("lease_until")),
        worker_id=h.get("worker_id"),
        progress=_opt_float(h.get("progress")),
        message=h.get("message"),
        result=h.get("result"),
        error=None if error is None else json.loads(error),
        after=h.get("after"),
        cancel_requested=h.get("cancel_requested") == "1",
        release_at=_opt_float(h.get("release_at")),
        keep_until=_opt_float(h.get("keep_until")),
        meta={} if meta is None or meta == "{}" else json.loads(meta),
        attempt_history=[] if history is None else json.loads(history),
    )


def outcomes_json(outcomes: Sequence[Outcome]) -> str:
    """Outcomes as the JSON array the ``finish`` script reads."""
    rows: list[dict[str, str]] = []
    for o in outcomes:
        row = {
            "id": o.job_id,
            "worker_id": o.worker_id,
            "state": o.state.value,
            "finished_at": number(o.finished_at),
        }
        if o.result is not None:
            row["result"] = o.result
        if o.error is not None:
            row["error"] = json_text(o.error)
        if o.run_at is not None:
            row["run_at"] = number(o.run_at)
        if o.keep_until is not None:
            row["keep_until"] = number(o.keep_until)
        if o.attempt is not None:  # appended to the job's history as this very text
            row["attempt"] = json_text(o.attempt)
        rows.append(row)
    return json.dumps(rows, ensure_ascii=False)


def worker_json(worker: WorkerRecord) -> str:
    """A worker's record as JSON (floats as JSON numbers, which read back exactly)."""
    return json.dumps(
        {
            "id": worker.id,
            "started_at": worker.started_at,
            "seen_at": worker.seen_at,
            "concurrency": worker.concurrency,
            "queues": None if worker.queues is None else list(worker.queues),
            "jobs": list(worker.jobs),
            "processed": worker.processed,
        },
        ensure_ascii=False,
    )


def decode_worker(text: str) -> WorkerRecord:
    """The worker record ``worker_json`` wrote."""
    data: dict[str, Any] = json.loads(text)
    queues = data["queues"]
    return WorkerRecord(
        id=data["id"],
        started_at=float(data["started_at"]),
        seen_at=float(data["seen_at"]),
        concurrency=int(data["concurrency"]),
        queues=None if queues is None else tuple(queues),
        jobs=tuple(data["jobs"]),
        processed=int(data["processed"]),
    )
