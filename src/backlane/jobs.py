"""Jobs: the stored record, its states, and the handle a caller keeps."""

from __future__ import annotations

import copy
import enum
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .exceptions import JobFailed, JobNotFound, ResultTimeout

if TYPE_CHECKING:
    from .app import Backlane


class JobState(str, enum.Enum):
    """Where a job is in its life (DESIGN §3)."""

    DEFERRED = "deferred"
    """Stored with its request; waits for the response to be sent."""
    QUEUED = "queued"
    """Waits for a worker (possibly until ``run_at``, or until the job before it ends)."""
    RUNNING = "running"
    """Held by a worker under a lease."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DISCARDED = "discarded"
    """Its request failed, so it never ran."""

    @property
    def terminal(self) -> bool:
        """True for the states a job never leaves on its own."""
        return self in TERMINAL_STATES

    def __str__(self) -> str:
        return self.value


TERMINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.DISCARDED}
)
ACTIVE_STATES = frozenset({JobState.DEFERRED, JobState.QUEUED, JobState.RUNNING})


def new_job_id() -> str:
    """A fresh job id: 32 hex digits, sortable by creation time to the millisecond."""
    millis = int(time.time() * 1000)
    return f"{millis:012x}{os.urandom(10).hex()}"


@dataclass
class Job:
    """One stored job. Times are POSIX seconds (UTC); ``payload`` and ``result`` are JSON."""

    task: str
    payload: str
    id: str = field(default_factory=new_job_id)
    queue: str = "default"
    priority: int = 0
    state: JobState = JobState.QUEUED
    key: str | None = None
    attempts: int = 0
    run_at: float = 0.0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    lease_until: float | None = None
    worker_id: str | None = None
    progress: float | None = None
    message: str | None = None
    result: str | None = None
    error: dict[str, Any] | None = None
    after: str | None = None
    """Id of the job that must end first (the previous task of the same request)."""
    cancel_requested: bool = False
    release_at: float | None = None
    """For a deferred job: when it may run even if its release never came (crash recovery)."""
    keep_until: float | None = None
    """For a terminal job: when it may be purged."""
    meta: dict[str, Any] = field(default_factory=dict)
    attempt_history: list[dict[str, Any]] = field(default_factory=list)
    """Records of the attempts that ended without succeeding (see ``attempt_record``),
    oldest first. Opaque to stores: each appends the record an ``Outcome`` carries."""

    def copy(self, **changes: Any) -> Job:
        """A copy with ``changes`` applied (``error``, ``meta`` and ``attempt_history`` are
        shared unless changed). Raises ``TypeError`` for a name that is not a field."""
        if not _FIELD_NAMES.issuperset(changes):
            unknown = ", ".join(sorted(set(changes) - _FIELD_NAMES))
            raise TypeError(f"Job has no field(s) {unknown}")
        twin = object.__new__(Job)  # dataclasses.replace, minus its generic machinery
        twin.__dict__.update(self.__dict__, **changes)
        return twin

    def detached(self, **changes: Any) -> Job:
        """A copy with ``changes`` applied that shares nothing mutable with this job."""
        twin = self.copy(**changes)
        if twin.error is not None:
            twin.error = _copy_json(twin.error)
        twin.meta = _copy_json(twin.meta) if twin.meta else {}
        twin.attempt_history = _copy_json(twin.attempt_history) if twin.attempt_history else []
        return twin

    def to_public(self) -> dict[str, Any]:
        """The job as the status API shows it (JSON-ready)."""
        return {
            "id": self.id,
            "task": self.task,
            "queue": self.queue,
            "state": self.state.value,
            "attempts": self.attempts,
            "progress": self.progress,
            "message": self.message,
            "result": _result_shown(self.result),
            "error": self.error,
            "created_at": iso_utc(self.created_at),
            "started_at": iso_utc(self.started_at),
            "finished_at": iso_utc(self.finished_at),
            "run_at": iso_utc(self.run_at),
        }


def _result_shown(text: str | None) -> Any:
    """A stored result as the status API shows it: the JSON value, or, for text that
    does not read as JSON (written by another program: ``NaN`` included), the text
    itself."""
    if text is None:
        return None
    try:
        return json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except (ValueError, RecursionError):
        return text


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: JSON, but no JSON number Python can write back
        raise ValueError(f"{text} is out of range")
    return value


_FIELD_NAMES = frozenset(f.name for f in fields(Job))

ATTEMPT_RETRIED = "retried"
"""The outcome of an attempt that failed and was queued again (``Outcome`` state queued)."""
RECORDED_MESSAGE_CHARS = 2_000
"""An error message longer than this is cut in an attempt's record (``error`` keeps it)."""


def attempt_record(
    job: Job, outcome: str, ended_at: float, error: dict[str, Any] | None
) -> dict[str, Any]:
    """What the history keeps of the running attempt of ``job`` that ended at ``ended_at``:
    its number, start and end, ``outcome`` (``"retried"``, ``"failed"`` or
    ``"cancelled"``) and, when it raised, the error's type and message (no traceback).

    ``{"attempt": 2, "started_at": 1700000000.0, "ended_at": 1700000001.5,
    "outcome": "retried", "error": {"type": "ValueError", "message": "bad row"}}``"""
    record: dict[str, Any] = {
        "attempt": job.attempts,
        "started_at": job.started_at,
        "ended_at": ended_at,
        "outcome": outcome,
    }
    if error is not None:
        message = str(error.get("message", ""))
        if len(message) > RECORDED_MESSAGE_CHARS:
            message = message[:RECORDED_MESSAGE_CHARS] + "…"
        record["error"] = {"type": str(error.get("type", "")), "message": message}
    return record


def _copy_json(value: Any) -> Any:
    """A deep copy of a JSON-like value (dicts, lists and immutable leaves)."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy_json(v) for v in value]
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return copy.deepcopy(value)


def iso_utc(ts: float | None, timespec: str = "auto") -> str | None:
    """POSIX seconds ``ts`` as ISO 8601 in UTC; None for none, and for a time no date can
    show (beyond the calendar: stored by another program, or before delays were bounded).
    The one way the status API, the CLI and the dashboard show a job's times."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec=timespec)
    except (OverflowError, OSError, ValueError, TypeError):
        return None


class JobHandle:
    """What ``enqueue`` and ``add_task`` return: a job's id and ways to follow it."""

    __slots__ = ("_lane", "id", "task")

    def __init__(self, lane: Backlane, job_id: str, task: str) -> None:
        self._lane = lane
        self.id = job_id
        self.task = task

    def __repr__(self) -> str:
        return f"<JobHandle {self.task} id={self.id}>"

    async def info(self) -> Job:
        """The job as stored now (opening the lane if it is not open, as ``cancel`` does).
        Raises ``JobNotFound`` if it is gone (purged or discarded)."""
        await self._lane.open()
        return await self._stored()

    async def _stored(self) -> Job:
        job = await self._lane.store.get(self.id)
        if job is None:
            raise JobNotFound(f"no job with id {self.id!r}")
        return job

    async def status(self) -> JobState:
        """The job's current state."""
        return (await self.info()).state

    async def result(self, timeout: float | None = None, *, poll: float = 0.05) -> Any:
        """Wait for the job to end and return its decoded result.

        Raises ``JobFailed`` if it failed, was cancelled or discarded, and ``ResultTimeout``
        if it has not ended within ``timeout`` seconds. It looks at the store at least every
        ``poll`` seconds (a job that ends in this process wakes it at once), and never waits
        past ``timeout`` to do so.
        """
        if timeout is not None and math.isnan(timeout):
            raise ValueError("timeout must be a number of seconds or None, not NaN")
        if not poll > 0:  # NaN too
            raise ValueError(f"poll must be a positive number of seconds, not {poll!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(poll, 0.01)
        await self._lane.open()  # once: a lane closed meanwhile is not opened again
        while True:
            job = await self._stored()
            if job.state is JobState.SUCCEEDED:
                return self._lane.decode_result(job)
            if job.state.terminal:
                raise JobFailed(job.id, job.state.value, job.error)
            wait = delay
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResultTimeout(f"job {self.id} still {job.state.value} after {timeout}s")
                wait = min(wait, left)
            await self._lane.wait_for_change(wait)
            delay = min(delay * 2, poll)

    async def cancel(self) -> JobState:
        """Cancel the job: a waiting job ends ``cancelled`` at once, a running one is asked
        to stop (its task sees ``ctx.cancelled``). Returns the state after the request."""
        return await self._lane.cancel(self.id)
