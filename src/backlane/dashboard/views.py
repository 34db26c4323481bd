"""What each dashboard page shows, read from the lane: plain data for the templates."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..jobs import Job, JobState, iso_utc
from ..stores.base import ScheduleRecord, StatsBucket, Store, WorkerRecord
from . import charts

if TYPE_CHECKING:
    from ..app import Backlane

PAGE_SIZE = 50
MAX_PAGE = 100_000
"""The job list's last page number (five million jobs in); a higher ``page`` is refused."""
SHOWN_CHARS = 100_000
"""Arguments, results and tracebacks longer than this are cut (the API has them whole)."""
STATE_ORDER = [s.value for s in JobState]
WORKERS_SEEN_WITHIN = 60.0
"""Workers whose last heartbeat is older than this are not shown (seconds)."""


def iso(ts: float | None) -> str:
    """POSIX seconds as ISO 8601 UTC, to the second; empty for None, and for a time no date
    can show (see ``iso_utc``)."""
    return iso_utc(ts, "seconds") or ""


def pretty_json(text: str | None) -> str:
    """JSON text indented for reading (as is if it does not parse), cut past
    ``SHOWN_CHARS``."""
    if text is None:
        return ""
    try:
        shown = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python reads
        shown = text
    return cut(shown)


def cut(text: str) -> str:
    if len(text) <= SHOWN_CHARS:
        return text
    return text[:SHOWN_CHARS] + f"\n… ({len(text) - SHOWN_CHARS} more characters)"


@dataclass
class QueueRow:
    name: str
    counts: dict[str, int]
    paused: bool

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Overview:
    queues: list[QueueRow]
    totals: dict[str, int]
    throughput: Any
    wait: Any
    ended_last_hour: int
    workers: int
    schedules: int
    now: float


class MinuteCache:
    """The last hour's per-minute stats, read from the store once per minute: a minute
    that ended more than ``SETTLED`` seconds ago is final (its jobs have been recorded),
    so each overview asks the store only for the minutes since. One per dashboard."""

    WIDTH = 60.0
    SETTLED = 120.0

    def __init__(self) -> None:
        self.final: dict[float, StatsBucket] = {}
        self.final_until = 0.0
        """Every bucket starting before this is in ``final`` (or had no job)."""

    async def last_hour(self, store: Store, now: float) -> list[StatsBucket]:
        window = (now // self.WIDTH) * self.WIDTH - 59 * self.WIDTH
        since = max(window, self.final_until)
        fresh = await store.stats(since=since, width=self.WIDTH)
        settled = ((now - self.SETTLED) // self.WIDTH) * self.WIDTH
        for bucket in fresh:
            if bucket.start < settled:
                self.final[bucket.start] = bucket
        self.final_until = max(settled, window)
        self.final = {start: b for start, b in self.final.items() if start >= window}
        recent = [b for b in fresh if b.start >= self.final_until]
        return sorted(self.final.values(), key=lambda b: b.start) + recent


async def overview(lane: Backlane, minutes: MinuteCache) -> Overview:
    """Queues with counts by state, the last hour's charts, and how many workers live."""
    store = lane.store
    now = time.time()
    counts = await store.counts()
    paused = await store.paused_queues()
    buckets = await minutes.last_hour(store, now)
    workers = await store.workers(seen_since=now - WORKERS_SEEN_WITHIN)
    names = set(counts) | paused | {task.queue for task in lane.tasks.values()}
    rows = []
    totals = dict.fromkeys(STATE_ORDER, 0)
    for name in sorted(names):
        by_state = {s.value: counts.get(name, {}).get(s, 0) for s in JobState}
        for key, value in by_state.items():
            totals[key] += value
        rows.append(QueueRow(name, by_state, name in paused))
    series = charts.minutes(buckets, now=now, width=60, count=60)
    return Overview(
        queues=rows,
        totals=totals,
        throughput=charts.throughput_chart(series),
        wait=charts.wait_chart(series),
        ended_last_hour=sum(m.ended for m in series),
        workers=len(workers),
        schedules=len(lane.schedules),
        now=now,
    )


@dataclass
class JobFilters:
    """The job list's filters, as given in the query string."""

    state: str = ""
    task: str = ""
    queue: str = ""
    text: str = ""
    page: int = 1

    @classmethod
    def parse(cls, query: dict[str, str]) -> JobFilters:
        """The filters of ``query``; an empty value filters nothing (an empty ``page`` is
        the first). Raises ``ValueError``, naming the parameter, its value and what it
        takes, for a ``state`` that is no job state or a ``page`` that is not a whole
        number from 1 to ``MAX_PAGE``."""
        state = query.get("state", "")
        if state and state not in STATE_ORDER:
            raise ValueError(
                f"Unknown state {state[:100]!r}: choose one of {', '.join(STATE_ORDER)}."
            )
        return cls(
            state=state,
            task=query.get("task", "").strip()[:200],
            queue=query.get("queue", "").strip()[:200],
            text=query.get("text", "").strip()[:200],
            page=_page_number(query.get("page", "")),
        )

    def query(self, **changes: Any) -> dict[str, str]:
        """The query string for these filters with ``changes`` (empty values left out)."""
        values = {
            "state": self.state,
            "task": self.task,
            "queue": self.queue,
            "text": self.text,
            "page": str(self.page) if self.page > 1 else "",
        }
        values.update({k: str(v) if v is not None else "" for k, v in changes.items()})
        if values.get("page") == "1":
            values["page"] = ""
        return {k: v for k, v in values.items() if v}


def _page_number(value: str) -> int:
    """``value`` as a page number (1 when empty). Raises ``ValueError`` for anything but
    the decimal digits of a number from 1 to ``MAX_PAGE``."""
    if not value:
        return 1
    number = int(value) if value.isascii() and value.isdigit() and len(value) < 10 else 0
    if not 1 <= number <= MAX_PAGE:
        raise ValueError(
            f"Invalid page {value[:100]!r}: page is a whole number from 1 to {MAX_PAGE}."
        )
    return number


@dataclass
class JobList:
    filters: JobFilters
    jobs: list[Job]
    has_next: bool
    tasks: list[str]
    queues: list[str]


async def job_list(lane: Backlane, filters: JobFilters) -> JobList:
    """One page of jobs, newest first, and whether another page follows."""
    found = await lane.store.list_jobs(
        state=JobState(filters.state) if filters.state else None,
        task=filters.task or None,
        queue=filters.queue or None,
        text=filters.text or None,
        limit=PAGE_SIZE + 1,
        offset=(filters.page - 1) * PAGE_SIZE,
    )
    queues = {task.queue for task in lane.tasks.values()}
    queues.update(await lane.store.counts())
    return JobList(
        filters=filters,
        jobs=found[:PAGE_SIZE],
        has_next=len(found) > PAGE_SIZE and filters.page < MAX_PAGE,  # none links past it
        tasks=sorted(lane.tasks),
        queues=sorted(queues),
    )


@dataclass
class Step:
    """One line of a job's timeline."""

    at: float
    what: str


@dataclass
class AttemptRow:
    """One attempt of a job, as its page lists it. ``outcome`` is ``retried``, ``failed``,
    ``cancelled``, ``succeeded``, ``running`` or ``lease expired`` (its worker stopped
    answering: the attempt left no record, only its count)."""

    number: int
    started_at: float | None
    ended_at: float | None
    outcome: str
    error_type: str = ""
    error_message: str = ""


LEASE_EXPIRED = "lease expired"


def attempt_rows(job: Job) -> list[AttemptRow]:
    """Every attempt of ``job``, first to last: those recorded in its history (each that
    did not succeed), the latest from the job's own fields, and the attempts counted but
    never recorded (lost with their worker) in between."""
    recorded: dict[int, dict[str, Any]] = {}
    for entry in job.attempt_history:
        if isinstance(entry, dict) and isinstance(entry.get("attempt"), int):
            recorded[entry["attempt"]] = entry
    rows = []
    for number in range(1, max([job.attempts, *recorded]) + 1):
        record = recorded.get(number)
        if record is not None:
            given = record.get("error")
            error: dict[str, Any] = given if isinstance(given, dict) else {}
            rows.append(
                AttemptRow(
                    number,
                    _time(record.get("started_at")),
                    _time(record.get("ended_at")),
                    str(record.get("outcome", "")),
                    str(error.get("type", "")),
                    cut(str(error.get("message", ""))),
                )
            )
        elif number == job.attempts:
            rows.append(_latest_attempt(job))
        else:
            rows.append(AttemptRow(number, None, None, LEASE_EXPIRED))
    return rows


def _latest_attempt(job: Job) -> AttemptRow:
    """The latest attempt of a job whose history does not record it."""
    number, started = job.attempts, job.started_at
    if job.state is JobState.RUNNING:
        return AttemptRow(number, started, None, "running")
    if job.state is JobState.SUCCEEDED:
        return AttemptRow(number, started, job.finished_at, "succeeded")
    if job.state in (JobState.FAILED, JobState.CANCELLED) and job.error:
        # ended by its worker before attempts were recorded (an older backlane)
        error = job.error
        message = cut(str(error.get("message", "")))
        return AttemptRow(
            number, started, job.finished_at, job.state.value, str(error.get("type", "")), message
        )
    if job.state is JobState.CANCELLED:  # its worker stopped answering after a cancel
        return AttemptRow(number, started, job.finished_at, f"{LEASE_EXPIRED}, cancelled")
    return AttemptRow(number, started, None, LEASE_EXPIRED)  # queued again by the sweep


def _time(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


@dataclass
class JobPage:
    job: Job
    arguments: str
    result: str
    error: dict[str, str] | None
    timeline: list[Step]
    held_by: str | None
    attempts: list[AttemptRow] = field(default_factory=list)
    public: dict[str, Any] = field(default_factory=dict)


def job_page(job: Job) -> JobPage:
    """A job as its page shows it: arguments, result, error and the steps of its life."""
    steps = [Step(job.created_at, "created")]
    if job.run_at and job.run_at > job.created_at + 0.5:
        steps.append(Step(job.run_at, "due (delayed or retried)"))
    if job.started_at is not None:
        steps.append(Step(job.started_at, f"attempt {job.attempts} started"))
    if job.finished_at is not None:
        steps.append(Step(job.finished_at, f"ended {job.state.value}"))
    steps.sort(key=lambda s: s.at)
    error = None
    if job.error:
        error = {
            "type": str(job.error.get("type", "")),
            "message": cut(str(job.error.get("message", ""))),
            "traceback": cut(str(job.error.get("traceback", ""))),
        }
    return JobPage(
        job=job,
        arguments=pretty_json(job.payload),
        result=pretty_json(job.result),
        error=error,
        timeline=steps,
        held_by=job.worker_id if job.state is JobState.RUNNING else None,
        attempts=attempt_rows(job),
        public=job.to_public(),
    )


@dataclass
class ScheduleRow:
    name: str
    task: str
    expression: str
    next_run: float | None
    last_run: float | None
    paused: bool
    missed: str
    declared: bool


async def schedule_rows(lane: Backlane) -> list[ScheduleRow]:
    """The lane's schedules with their next fire times, plus any the store knows that this
    lane does not declare."""
    records: dict[str, ScheduleRecord] = await lane.store.schedules()
    now = time.time()
    rows = []
    for schedule in lane.schedules.values():
        record = records.get(schedule.name)
        rows.append(
            ScheduleRow(
                name=schedule.name,
                task=schedule.task.name,
                expression=schedule.expression,
                next_run=schedule.next_slot(now),
                last_run=record.last_slot if record else None,
                paused=bool(record and record.paused),
                missed=schedule.missed,
                declared=True,
            )
        )
    for name, record in sorted(records.items()):
        if name not in lane.schedules:
            rows.append(
                ScheduleRow(name, "", "(not declared here)", None, record.last_slot,
                            record.paused, "", declared=False)
            )  # fmt: skip
    return rows


@dataclass
class WorkerRow:
    record: WorkerRecord
    age: float
    queues: str


async def worker_rows(lane: Backlane) -> list[WorkerRow]:
    """Workers heard from in the last minute, with the jobs they held at their last beat."""
    now = time.time()
    found = await lane.store.workers(seen_since=now - WORKERS_SEEN_WITHIN)
    return [
        WorkerRow(w, max(0.0, now - w.seen_at), ", ".join(w.queues) if w.queues else "all")
        for w in found
    ]
