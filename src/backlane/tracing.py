"""OpenTelemetry: a job carries the trace it was enqueued in, and runs in a child span.

Install the ``otel`` extra (``pip install 'backlane[otel]'``, which brings
``opentelemetry-api``) and configure a tracer provider as usual. Then:

* at enqueue, ``inject_context(job.meta)`` stores the current trace context (W3C
  ``traceparent``, ``tracestate`` and baggage, through the configured propagator) under
  ``job.meta["otel"]`` — for a task added during a request, the request's span;
* in the worker, ``with job_span(job) as span:`` runs the attempt inside a span named
  ``backlane.job <task>`` (kind ``CONSUMER``) whose parent is that stored context, and
  ``span.ended(outcome)`` records how the attempt ended (an error status with the
  exception's type and message for a failed attempt or a retry).

Without ``opentelemetry-api`` both do nothing and cost next to nothing; a job without
stored context gets a span with no remote parent (a new trace, or the current one).

A span nobody records is not opened: ``job_span`` opens one only when a tracer provider is
given, or a real one is set globally (``trace.set_tracer_provider``, or the
``OTEL_PYTHON_TRACER_PROVIDER`` variable). With only the API installed (FastAPI brings
it), a worker neither imports OpenTelemetry nor pays for a no-op span per job; the context
a job carries then does not pass on to the jobs its task enqueues.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .jobs import Job, JobState

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

    from .stores.base import Outcome

__all__ = ["META_KEY", "JobSpan", "inject_context", "job_span"]

META_KEY = "otel"
"""Where in ``Job.meta`` the trace context travels."""

_TRACER = "backlane"


@functools.cache
def _otel_available() -> bool:
    """Whether opentelemetry-api can be imported (asked once per process)."""
    try:
        import opentelemetry.propagate
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _provider_named_by_environment() -> bool:
    """Whether ``OTEL_PYTHON_TRACER_PROVIDER`` names a provider OpenTelemetry could load
    (asked once per process, as OpenTelemetry itself reads it once)."""
    return bool(os.environ.get("OTEL_PYTHON_TRACER_PROVIDER")) and _otel_available()


def _recording_provider_set() -> bool:
    """Whether a real tracer provider is set globally (not the API's proxy or no-op one).
    Imports nothing when OpenTelemetry was never imported and no variable names one."""
    if "opentelemetry.trace" not in sys.modules and not _provider_named_by_environment():
        return False
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def inject_context(meta: MutableMapping[str, Any], context: Any = None) -> None:
    """Store the trace context current now (or ``context``, an OpenTelemetry ``Context``)
    in a job's ``meta`` under ``"otel"``, as a dict of text headers. Stores nothing when
    there is no valid span context or OpenTelemetry is not installed (or was never
    imported: then no context can be current)."""
    if context is None and "opentelemetry.context" not in sys.modules:
        return
    if not _otel_available():
        return
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    if carrier:
        meta[META_KEY] = carrier


class JobSpan:
    """The span an attempt runs in; ``ended(outcome)`` records how the attempt ended."""

    def __init__(self, span: Span | None) -> None:
        self.span = span

    def ended(self, outcome: Outcome | None) -> None:
        """Record the attempt's outcome: state, and an error status with the exception's
        type and message for a failed attempt or a retry; None means handed back."""
        span = self.span
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        if outcome is None:
            span.set_attribute("backlane.job.outcome", "handed_back")
            return
        kind = "retry" if outcome.state is JobState.QUEUED else outcome.state.value
        span.set_attribute("backlane.job.outcome", kind)
        if outcome.state in (JobState.FAILED, JobState.QUEUED) and outcome.error:
            error_type = str(outcome.error.get("type", "Exception"))
            message = str(outcome.error.get("message", ""))
            span.set_attribute("error.type", error_type)
            span.add_event(
                "exception",
                {
                    "exception.type": error_type,
                    "exception.message": message,
                    "exception.stacktrace": str(outcome.error.get("traceback", "")),
                },
            )
            span.set_status(Status(StatusCode.ERROR, f"{error_type}: {message}"))
        elif outcome.state is JobState.SUCCEEDED:
            span.set_status(Status(StatusCode.OK))


@contextmanager
def job_span(
    job: Job, *, worker_id: str | None = None, tracer_provider: TracerProvider | None = None
) -> Iterator[JobSpan]:
    """Run the body inside a span for one attempt of ``job``, child of the context
    ``inject_context`` stored at enqueue. The span is current in the body, so spans the
    task opens (in async code, and in sync tasks run through AnyIO's thread pool) nest
    under it. ``tracer_provider`` defaults to the global one; without one that records
    (see the module docstring), no span is opened and ``JobSpan.span`` is None."""
    if tracer_provider is None and not _recording_provider_set():
        yield JobSpan(None)
        return
    from opentelemetry import propagate, trace

    carrier = job.meta.get(META_KEY) if isinstance(job.meta, dict) else None
    parent = propagate.extract(carrier) if isinstance(carrier, dict) and carrier else None
    tracer = trace.get_tracer(_TRACER, tracer_provider=tracer_provider)
    attributes: dict[str, str | int] = {
        "messaging.system": "backlane",
        "messaging.operation.type": "process",
        "messaging.destination.name": job.queue,
        "messaging.message.id": job.id,
        "backlane.job.id": job.id,
        "backlane.job.task": job.task,
        "backlane.job.queue": job.queue,
        "backlane.job.attempt": job.attempts,
    }
    if worker_id is not None:
        attributes["backlane.worker.id"] = worker_id
    with tracer.start_as_current_span(
        f"backlane.job {job.task}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=True,
        set_status_on_exception=True,
    ) as span:
        yield JobSpan(span)
