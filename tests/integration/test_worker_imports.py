"""A worker process loads only what running jobs needs (issue 8: idle worker memory).

Each check runs in a fresh interpreter, since this test process has long imported
everything: the ``backlane`` command and a worker that has run jobs must not have imported
FastAPI, Starlette, OpenTelemetry, rich, prometheus-client or Jinja2. The tracing check
shows the other side: with a real tracer provider set globally, the worker does open the
job's span, as a child of the span current at enqueue.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest

WORKER_RUN = """
import asyncio, json, sys

import backlane.cli  # the command and all its groups, as `backlane worker` loads them
from backlane import Backlane, TaskContext

lane = Backlane("memory://")


@lane.task
async def add(a: int, b: int) -> int:
    return a + b


@lane.task
def progress(ctx: TaskContext, n: int) -> int:
    ctx.progress_sync(0.5, "half")
    return n


async def main() -> None:
    async with lane:
        first = await add.enqueue(1, 2)
        second = await progress.enqueue(3)
        await lane.worker().run_until_idle()
        assert await first.result(timeout=1) == 3
        assert await second.result(timeout=1) == 3


asyncio.run(main())
print(json.dumps(sorted(sys.modules)))
"""

NOT_IN_A_WORKER = ("fastapi", "starlette", "opentelemetry", "rich", "prometheus_client", "jinja2")


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_worker_that_ran_jobs_has_not_imported_the_web_side() -> None:
    modules = json.loads(run(WORKER_RUN).splitlines()[-1])
    loaded = sorted({name.split(".")[0] for name in modules} & set(NOT_IN_A_WORKER))
    assert loaded == []
    assert "backlane.worker" in modules and "backlane.cli.worker" in modules


@pytest.mark.skipif(find_spec("opentelemetry.sdk") is None, reason="needs opentelemetry-sdk")
def test_a_global_tracer_provider_gets_the_job_span_in_the_worker() -> None:
    out = run(
        """
        import asyncio, json

        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        from backlane import Backlane

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        lane = Backlane("memory://")


        @lane.task
        async def send(to: str) -> None:
            with trace.get_tracer("app").start_as_current_span("smtp"):
                pass


        async def main() -> None:
            async with lane:
                with trace.get_tracer("web").start_as_current_span("POST /signup"):
                    await send.enqueue("ann@example.com")
                await lane.worker().run_until_idle()


        asyncio.run(main())
        spans = {s.name: s for s in exporter.get_finished_spans()}
        print(json.dumps({
            name: [s.context.span_id, s.parent.span_id if s.parent else None]
            for name, s in spans.items()
        }))
        """
    )
    spans = json.loads(out.splitlines()[-1])
    job_id, job_parent = spans["backlane.job __main__:send"]
    assert job_parent == spans["POST /signup"][0]
    assert spans["smtp"][1] == job_id
