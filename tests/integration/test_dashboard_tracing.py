"""OpenTelemetry (backlane.tracing): the trace context current at enqueue travels in the
job's ``meta``, and the attempt's span is a child of it. Needs opentelemetry-sdk for an
in-memory exporter; skipped without it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from backlane import Job, JobState
from backlane.stores.base import Outcome
from backlane.tracing import META_KEY, inject_context, job_span

sdk_trace = pytest.importorskip(
    "opentelemetry.sdk.trace", reason="opentelemetry-sdk is not installed"
)
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402


@pytest.fixture
def spans() -> Iterator[tuple[Any, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def a_job(meta: dict[str, Any]) -> Job:
    return Job(task="app.tasks:send", payload="{}", queue="mail", attempts=2, meta=meta)


def test_the_request_span_travels_with_the_job_and_parents_its_span(
    spans: tuple[Any, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    meta: dict[str, Any] = {}
    with tracer.start_as_current_span("POST /signup") as request_span:
        inject_context(meta)
    parent = request_span.get_span_context()
    assert meta[META_KEY]["traceparent"].split("-")[1] == format(parent.trace_id, "032x")

    job = a_job(meta)
    with job_span(job, worker_id="w-1", tracer_provider=provider) as span:
        inner = tracer.start_span("send email")  # opened by the task: nests under the job
        inner.end()
        span.ended(Outcome(job.id, "w-1", JobState.SUCCEEDED, finished_at=0.0))
    finished = {s.name: s for s in exporter.get_finished_spans()}
    job_s = finished["backlane.job app.tasks:send"]
    assert job_s.parent is not None and job_s.parent.span_id == parent.span_id
    assert job_s.context.trace_id == parent.trace_id
    assert job_s.kind is SpanKind.CONSUMER
    assert job_s.attributes["backlane.job.id"] == job.id
    assert job_s.attributes["backlane.job.attempt"] == 2
    assert job_s.attributes["messaging.destination.name"] == "mail"
    assert job_s.attributes["backlane.worker.id"] == "w-1"
    assert job_s.status.status_code is StatusCode.OK
    assert finished["send email"].parent.span_id == job_s.context.span_id


def test_a_failed_attempt_marks_its_span_as_an_error(
    spans: tuple[Any, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    job = a_job({})
    error = {"type": "ValueError", "message": "bad", "traceback": "Traceback ..."}
    with job_span(job, tracer_provider=provider) as span:
        span.ended(Outcome(job.id, "w", JobState.QUEUED, finished_at=0.0, error=error))
    (finished,) = exporter.get_finished_spans()
    assert finished.status.status_code is StatusCode.ERROR
    assert finished.attributes["backlane.job.outcome"] == "retry"
    assert finished.attributes["error.type"] == "ValueError"
    assert finished.events[0].attributes["exception.message"] == "bad"
    assert finished.parent is None  # no context was stored: a trace of its own


def test_without_a_current_span_nothing_is_stored() -> None:
    meta: dict[str, Any] = {}
    assert not trace.get_current_span().get_span_context().is_valid
    inject_context(meta)
    assert meta == {}


def test_without_a_recording_provider_no_span_is_opened() -> None:
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("a tracer provider was set globally in this process")
    job = a_job({"otel": {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}})
    with job_span(job, worker_id="w") as span:
        assert span.span is None
        assert not trace.get_current_span().get_span_context().is_valid
        span.ended(Outcome(job.id, "w", JobState.SUCCEEDED, finished_at=0.0))
