"""Prometheus metrics of a lane: what the store holds, and what this process's workers saw.

Two kinds of figures, and the difference matters when reading a dashboard:

* **From the store, at scrape time** — ``backlane_jobs{queue,state}``,
  ``backlane_queue_paused{queue}`` and ``backlane_workers``. Read with the store's own
  ``counts``, ``paused_queues`` and ``workers`` verbs when Prometheus scrapes, so they
  match the store exactly and cover every process sharing it.
* **Observed by this process's workers** — the histograms
  ``backlane_job_duration_seconds`` and ``backlane_job_wait_seconds`` and the counters
  ``backlane_job_attempts_total``, ``backlane_job_retries_total`` and
  ``backlane_job_failures_total``. Each process counts only the attempts its own workers
  ran (the embedded workers of a web process); sum them across processes in PromQL.

Each lane has a registry of its own (never prometheus-client's global default), created
on first use by ``metrics_for(lane)``: two lanes in one process never mix their figures.
prometheus-client is imported only when metrics are asked for.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .jobs import Job, JobState

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from .app import Backlane
    from .stores.base import Outcome

__all__ = ["CONTENT_TYPE", "LaneMetrics", "exposition", "metrics_for", "observe_attempt"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The media type of ``exposition``'s text (Prometheus text format 0.0.4)."""

WORKERS_SEEN_WITHIN = 60.0
"""A worker counts in ``backlane_workers`` if its last heartbeat is this recent (seconds)."""

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)

_ATTRIBUTE = "_backlane_metrics"


def _missing() -> ImportError:
    return ImportError(
        "backlane's Prometheus metrics need prometheus-client: "
        "pip install 'backlane[dashboard]' (or prometheus-client)"
    )


class LaneMetrics:
    """One lane's Prometheus registry: the worker-observed histograms and counters, and a
    collector that reads the store's figures at scrape time (see the module docstring)."""

    def __init__(self, lane: Backlane) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError as exc:  # pragma: no cover - prometheus-client is a dev dependency
            raise _missing() from exc
        self.lane = lane
        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        labels = ("task", "queue")
        self.duration = Histogram(
            "backlane_job_duration_seconds",
            "How long attempts ran, by how they ended (observed by this process's workers).",
            (*labels, "outcome"),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.wait = Histogram(
            "backlane_job_wait_seconds",
            "Seconds from when a job could run (run_at) to when its attempt started "
            "(observed by this process's workers).",
            labels,
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.attempts = Counter(
            "backlane_job_attempts",
            "Attempts that ended, by outcome: succeeded, failed, cancelled, or retry "
            "(queued again after a failure) (observed by this process's workers).",
            (*labels, "outcome"),
            registry=self.registry,
        )
        self.retries = Counter(
            "backlane_job_retries",
            "Failed attempts queued again for a retry (observed by this process's workers).",
            labels,
            registry=self.registry,
        )
        self.failures = Counter(
            "backlane_job_failures",
            "Jobs that ended failed, retries exhausted (observed by this process's workers).",
            labels,
            registry=self.registry,
        )

    def attempt_ended(self, job: Job, outcome: Outcome) -> None:
        """Count one attempt of ``job`` (as claimed) that ended with ``outcome``."""
        labels = (job.task, job.queue)
        kind = "retry" if outcome.state is JobState.QUEUED else outcome.state.value
        self.attempts.labels(*labels, kind).inc()
        if job.started_at is not None:
            self.duration.labels(*labels, kind).observe(
                max(0.0, outcome.finished_at - job.started_at)
            )
            self.wait.labels(*labels).observe(max(0.0, job.started_at - job.run_at))
        if outcome.state is JobState.QUEUED:
            self.retries.labels(*labels).inc()
        elif outcome.state is JobState.FAILED:
            self.failures.labels(*labels).inc()

    async def snapshot(self) -> _Scrape:
        """Everything to expose now: the registry, plus the store's figures read now."""
        from prometheus_client.core import GaugeMetricFamily

        store = self.lane.store
        counts = await store.counts()
        paused = await store.paused_queues()
        workers = await store.workers(seen_since=time.time() - WORKERS_SEEN_WITHIN)
        jobs = GaugeMetricFamily(
            "backlane_jobs",
            "Jobs in the store by queue and state, read from the store at scrape time.",
            labels=("queue", "state"),
        )
        for queue in sorted(counts):
            for state in JobState:
                jobs.add_metric((queue, state.value), counts[queue].get(state, 0))
        paused_family = GaugeMetricFamily(
            "backlane_queue_paused",
            "1 for a paused queue, 0 for one that runs (read from the store at scrape time).",
            labels=("queue",),
        )
        for queue in sorted(set(counts) | paused):
            paused_family.add_metric((queue,), 1 if queue in paused else 0)
        live = GaugeMetricFamily(
            "backlane_workers",
            f"Workers whose last heartbeat is less than {WORKERS_SEEN_WITHIN:g} s old "
            "(read from the store at scrape time).",
            value=len(workers),
        )
        return _Scrape(self.registry, [jobs, paused_family, live])


class _Scrape:
    """A one-off collector: the lane's registry followed by figures read for this scrape."""

    def __init__(self, registry: CollectorRegistry, extra: list[Metric]) -> None:
        self.registry = registry
        self.extra = extra

    def collect(self) -> Iterable[Metric]:
        yield from self.registry.collect()
        yield from self.extra


def metrics_for(lane: Backlane) -> LaneMetrics:
    """The lane's metrics, created on first use. Raises ``ImportError`` naming the package
    to install when prometheus-client is missing."""
    found = vars(lane).get(_ATTRIBUTE)
    if isinstance(found, LaneMetrics):
        return found
    created = LaneMetrics(lane)
    vars(lane).setdefault(_ATTRIBUTE, created)
    result: LaneMetrics = vars(lane)[_ATTRIBUTE]
    return result


def observe_attempt(lane: Backlane, job: Job, outcome: Outcome | None) -> None:
    """Count an attempt a worker of this process ran. Does nothing when the lane's metrics
    were never asked for (no import of prometheus-client), or for ``outcome`` None (the job
    was handed back unfinished)."""
    found: Any = vars(lane).get(_ATTRIBUTE)
    if outcome is not None and isinstance(found, LaneMetrics):
        found.attempt_ended(job, outcome)


async def exposition(lane: Backlane) -> bytes:
    """The lane's metrics in the Prometheus text format (``CONTENT_TYPE``), the store's
    figures read now."""
    from prometheus_client import generate_latest

    scrape = await metrics_for(lane).snapshot()
    return generate_latest(scrape)
