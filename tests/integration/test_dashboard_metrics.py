"""Prometheus metrics (backlane.metrics): the metrics page parses with prometheus-client's
own parser and its job counts are the store's; attempts observed by this process's workers
fill the histograms and counters; each lane has its own registry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from backlane import Backlane, Job, JobState
from backlane.fastapi import install
from backlane.metrics import exposition, metrics_for, observe_attempt
from backlane.stores.base import Outcome

prometheus = pytest.importorskip(
    "prometheus_client", reason="prometheus-client is not installed (the dashboard extra)"
)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

LOCAL = "http://127.0.0.1:8000"
NOW = time.time()


def job_in(state: JobState, queue: str = "default", **changes: Any) -> Job:
    job = Job(task="m:t", payload="{}", state=state, queue=queue, created_at=NOW, run_at=NOW)
    if state.terminal:
        job = job.copy(attempts=1, started_at=NOW, finished_at=NOW, keep_until=NOW + 60)
    return job.copy(**changes)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


@pytest.fixture
def client(lane_url: str) -> Iterator[TestClient]:
    lane = Backlane(lane_url)
    app = FastAPI()
    install(lane, app, workers=0, metrics=True)
    with TestClient(app, base_url=LOCAL) as client:
        yield client


def test_job_counts_are_the_stores(client: TestClient) -> None:
    lane: Backlane = client.app.state.backlane  # type: ignore[attr-defined]
    jobs = [job_in(JobState.QUEUED) for _ in range(3)]
    jobs += [job_in(JobState.SUCCEEDED, "mail") for _ in range(2)]
    jobs += [job_in(JobState.FAILED, "mail"), job_in(JobState.CANCELLED)]
    client.portal.call(lane.store.enqueue, jobs)  # type: ignore[union-attr]
    client.portal.call(lane.store.pause_queue, "mail", True)  # type: ignore[union-attr]

    reply = client.get("/backlane/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    counts = client.portal.call(lane.store.counts)  # type: ignore[union-attr]
    shown = samples(reply.text, "backlane_jobs")
    expected = {
        (("queue", queue), ("state", state.value)): float(by_state.get(state, 0))
        for queue, by_state in counts.items()
        for state in JobState
    }
    assert shown == expected
    assert shown[(("queue", "mail"), ("state", "succeeded"))] == 2.0
    assert sum(shown.values()) == len(jobs)
    assert samples(reply.text, "backlane_queue_paused") == {
        (("queue", "default"),): 0.0,
        (("queue", "mail"),): 1.0,
    }
    assert samples(reply.text, "backlane_workers") == {(): 0.0}
    assert client.get("/backlane/", headers={"accept": "text/html"}).status_code == 404  # no pages


def test_attempts_observed_here_fill_histograms_and_counters() -> None:
    lane = Backlane("memory://")
    metrics = metrics_for(lane)
    job = job_in(JobState.RUNNING, started_at=NOW + 2.0, attempts=1)
    for state, error in [
        (JobState.SUCCEEDED, None),
        (JobState.QUEUED, {"type": "E", "message": "m"}),
        (JobState.FAILED, {"type": "E", "message": "m"}),
    ]:
        outcome = Outcome(job.id, "w", state, finished_at=NOW + 3.5, error=error)
        observe_attempt(lane, job, outcome)
    observe_attempt(lane, job, None)  # handed back: not an attempt that ended
    text = anyio.run(exposition, lane).decode()
    labels = (("queue", "default"), ("task", "m:t"))
    assert samples(text, "backlane_job_wait_seconds_count") == {labels: 3.0}
    assert samples(text, "backlane_job_wait_seconds_sum") == {labels: pytest.approx(6.0)}
    durations = samples(text, "backlane_job_duration_seconds_sum")
    assert durations[(("outcome", "succeeded"), *labels)] == pytest.approx(1.5)
    assert samples(text, "backlane_job_retries_total") == {labels: 1.0}
    assert samples(text, "backlane_job_failures_total") == {labels: 1.0}
    attempts = samples(text, "backlane_job_attempts_total")
    assert attempts[(("outcome", "retry"), *labels)] == 1.0
    assert metrics_for(lane) is metrics


def test_each_lane_has_its_own_registry() -> None:
    first, second = Backlane("memory://"), Backlane("memory://")
    observe_attempt(first, job_in(JobState.RUNNING), None)  # never asked for: nothing made
    assert "_backlane_metrics" not in vars(first)
    assert metrics_for(first).registry is not metrics_for(second).registry
    job = job_in(JobState.RUNNING, started_at=NOW)
    observe_attempt(first, job, Outcome(job.id, "w", JobState.SUCCEEDED, finished_at=NOW))
    assert "backlane_job_attempts_total{" in anyio.run(exposition, first).decode()
    assert "backlane_job_attempts_total{" not in anyio.run(exposition, second).decode()
    assert not [
        name for name in prometheus.REGISTRY._names_to_collectors if name.startswith("backlane")
    ]
