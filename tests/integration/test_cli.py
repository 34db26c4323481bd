"""The ``backlane`` command, in-process, on a SQLite file: listing, showing, retrying,
cancelling, purging and counting jobs, and the errors it gives for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from backlane import Backlane, Job, JobState
from backlane.cli import cli, parse_duration
from tests.services import postgres_schema_exists, store_url

runner = CliRunner()
MODULE = __name__


def double(n: int) -> int:
    return n * 2


def needs_flag(flag: str) -> str:
    """Fails until the file ``flag`` exists."""
    if not Path(flag).exists():
        raise RuntimeError(f"flag {flag} is missing")
    return "flag found"


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/jobs.db"


@pytest.fixture
def lane(url: str) -> Iterator[Backlane]:
    lane = Backlane(url, retries=0)
    yield lane
    anyio.run(lane.close)


def invoke(*args: str) -> Any:
    return runner.invoke(cli, list(args))


def enqueue(lane: Backlane, func: Any, *args: Any, queue: str | None = None) -> str:
    async def go() -> str:
        handle = await lane.task_for(func).options(queue=queue).enqueue(*args)
        return handle.id

    return anyio.run(go)


def drain(lane: Backlane) -> int:
    return anyio.run(lambda: lane.worker().run_until_idle())


def stored(lane: Backlane, job_id: str) -> Job | None:
    return anyio.run(lane.store.get, job_id)


def listed(*args: str) -> list[dict[str, Any]]:
    result = invoke("jobs", "--json", *args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, list)
    return data


@pytest.fixture
def mixed(lane: Backlane, tmp_path: Path) -> dict[str, Any]:
    """Six jobs: three ``double`` (default queue), two ``double`` in ``mail``, one
    ``needs_flag`` that failed, listed newest first in ``ids``."""
    ids = [enqueue(lane, double, n) for n in (1, 2, 3)]
    ids += [enqueue(lane, double, n, queue="mail") for n in (4, 5)]
    failing = enqueue(lane, needs_flag, str(tmp_path / "flag"))
    ids.append(failing)
    assert drain(lane) == 6
    return {"ids": ids[::-1], "failing": failing, "flag": tmp_path / "flag"}


def test_jobs_lists_newest_first_with_filters(url: str, mixed: dict[str, Any]) -> None:
    everything = listed("--url", url)
    assert [job["id"] for job in everything] == mixed["ids"]
    first = everything[0]
    assert first["task"] == f"{MODULE}:needs_flag"
    assert first["state"] == "failed"
    assert first["error"]["type"] == "RuntimeError"
    assert everything[1]["result"] == 10

    failed = listed("--url", url, "--state", "failed")
    assert [job["id"] for job in failed] == [mixed["failing"]]
    assert {job["id"] for job in listed("--url", url, "--queue", "mail")} == set(mixed["ids"][1:3])
    by_task = listed("--url", url, "--task", f"{MODULE}:double", "--state", "succeeded")
    assert [job["id"] for job in by_task] == mixed["ids"][1:]
    page = listed("--url", url, "--limit", "2", "--offset", "1")
    assert [job["id"] for job in page] == mixed["ids"][1:3]
    assert listed("--url", url, "--queue", "nowhere") == []


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
def test_jobs_limit_and_offset_are_bounded(kind: str, tmp_path: Path) -> None:
    """A --limit or --offset past what a store can count ended in an OverflowError
    traceback (SQLite) or a store error (Redis): the largest accepted one works on every
    store, a larger one is a usage error naming the option."""
    with store_url(kind, tmp_path) as url:
        lane = Backlane(url)
        try:
            job_id = enqueue(lane, double, 1)
        finally:
            anyio.run(lane.close)
        most = "1000000000"
        assert [job["id"] for job in listed("--url", url, "--limit", most)] == [job_id]
        assert listed("--url", url, "--offset", most, "--limit", most) == []
        for option in ("--limit", "--offset"):
            result = invoke("jobs", option, "99999999999999999999", "--url", url)
            assert result.exit_code == 2, result.output
            assert f"Invalid value for '{option}'" in result.stderr
            assert "Traceback" not in result.output


def test_jobs_table_for_people(url: str, mixed: dict[str, Any]) -> None:
    result = invoke("jobs", "--url", url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "ID", "TASK", "QUEUE", "STATE", "ATT", "PROGRESS", "CREATED", "FINISHED", "ERROR"
    ]  # fmt: skip
    failing_row = next(line for line in lines if mixed["failing"] in line)
    assert "failed" in failing_row
    assert failing_row.rstrip().endswith("RuntimeError")
    assert sum(1 for line in lines if "succeeded" in line) == 5

    paged = invoke("jobs", "--url", url, "--limit", "2")
    assert "--offset 2 for more" in paged.stdout
    assert invoke("jobs", "--url", url, "--state", "running").stdout.strip() == "No jobs match."


def test_stored_text_is_shown_as_it_is_not_as_markup(url: str, lane: Backlane) -> None:
    """A queue name, arguments or an error message with square brackets or emoji codes in
    them ended ``jobs``, ``show`` and ``counts`` in a rich ``MarkupError`` traceback
    (``[/b]``), or were shown changed (``[bold]`` swallowed, ``:x:`` drawn as an emoji)."""
    odd = "[/b] [bold]loud[/bold] :x:"
    job_id = enqueue(lane, needs_flag, odd, queue="q[/i]:x:")
    assert drain(lane) == 1
    for args in (("jobs",), ("show", job_id), ("counts",)):
        result = invoke(*args, "--url", url)
        assert result.exit_code == 0, result.output
        assert "q[/i]:x:" in result.stdout
    shown = invoke("show", job_id, "--url", url).stdout
    assert json.dumps(odd) in shown  # the arguments
    assert f"RuntimeError: flag {odd} is missing" in shown  # the error


def test_show_gives_the_whole_job_with_its_traceback(url: str, mixed: dict[str, Any]) -> None:
    job_id = mixed["failing"]
    result = invoke("show", job_id, "--url", url)
    assert result.exit_code == 0, result.output
    assert job_id in result.stdout
    assert "Traceback (most recent call last)" in result.stdout
    assert f"RuntimeError: flag {mixed['flag']} is missing" in result.stdout
    assert json.dumps({"flag": str(mixed["flag"])}, separators=(",", ":")) in result.stdout

    data = json.loads(invoke("show", job_id, "--url", url, "--json").stdout)
    assert data["id"] == job_id
    assert data["state"] == "failed"
    assert data["arguments"] == {"flag": str(mixed["flag"])}
    assert data["worker_id"]
    assert "needs_flag" in data["error"]["traceback"]


def test_show_json_of_a_failed_job_kept_forever(url: str, tmp_path: Path) -> None:
    forever = Backlane(url, retries=0, keep_failed=float("inf"))  # "keep failed jobs forever"
    try:
        job_id = enqueue(forever, needs_flag, str(tmp_path / "flag"))
        assert drain(forever) == 1
    finally:
        anyio.run(forever.close)
    result = invoke("show", job_id, "--url", url, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["state"] == "failed" and data["keep_until"] is None


def test_show_json_of_a_job_whose_arguments_are_not_json(url: str, lane: Backlane) -> None:
    # stored by another program, or mended by hand: the worker fails it, and show must
    # still show it, arguments as stored
    job = Job(task=f"{MODULE}:double", payload="{n: 1", created_at=time.time())
    job.run_at = job.created_at
    anyio.run(lane.enqueue_jobs, [job])
    assert drain(lane) == 1
    result = invoke("show", job.id, "--url", url, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["state"] == "failed"
    assert data["arguments"] == "{n: 1"


def test_retry_queues_a_failed_job_again_and_a_worker_runs_it(
    url: str, lane: Backlane, mixed: dict[str, Any]
) -> None:
    job_id = mixed["failing"]
    result = invoke("retry", job_id, "--url", url)
    assert result.exit_code == 0, result.output
    assert f"Job {job_id} queued again." in result.stdout
    job = stored(lane, job_id)
    assert job is not None and job.state is JobState.QUEUED

    mixed["flag"].touch()
    assert drain(lane) == 1
    job = stored(lane, job_id)
    assert job is not None and job.state is JobState.SUCCEEDED
    assert job.attempts == 2
    assert json.loads(job.result or "null") == "flag found"

    again = invoke("retry", job_id, "--url", url)
    assert again.exit_code == 3
    assert f"job {job_id} succeeded; only failed or cancelled jobs can be retried" in again.stderr


def test_cancel_a_queued_job_then_refuse_to_cancel_it_again(url: str, lane: Backlane) -> None:
    job_id = enqueue(lane, double, 7)
    result = invoke("cancel", job_id, "--url", url)
    assert result.exit_code == 0, result.output
    assert f"Job {job_id} cancelled." in result.stdout
    job = stored(lane, job_id)
    assert job is not None and job.state is JobState.CANCELLED

    again = invoke("cancel", job_id, "--url", url)
    assert again.exit_code == 1
    assert "already ended cancelled" in again.stderr
    assert invoke("retry", job_id, "--url", url).exit_code == 0  # cancelled jobs retry


@pytest.mark.parametrize("command", ["show", "retry", "cancel"])
def test_unknown_id_is_an_error(url: str, lane: Backlane, command: str) -> None:
    enqueue(lane, double, 1)
    result = invoke(command, "0123456789abcdef", "--url", url)
    assert result.exit_code == 1
    assert "no job with id '0123456789abcdef'" in result.stderr


def test_purge_removes_only_jobs_that_ended_long_enough_ago(url: str, lane: Backlane) -> None:
    now = time.time()
    day = 86400.0

    def job(name: str, state: JobState, *, created: float, finished: float | None) -> Job:
        return Job(
            task=f"{MODULE}:double", payload='{"n":1}', id=name, state=state,
            created_at=created, run_at=created, finished_at=finished,
            started_at=finished, keep_until=None if finished is None else finished + 30 * day,
        )  # fmt: skip

    jobs = [
        job("old-succeeded", JobState.SUCCEEDED, created=now - 11 * day, finished=now - 10 * day),
        job("old-failed", JobState.FAILED, created=now - 11 * day, finished=now - 10 * day),
        job("old-cancelled", JobState.CANCELLED, created=now - 9 * day, finished=now - 8 * day),
        job("hour-old", JobState.SUCCEEDED, created=now - 7200, finished=now - 3600),
        job("old-queued", JobState.QUEUED, created=now - 20 * day, finished=None),
        job("old-running", JobState.RUNNING, created=now - 20 * day, finished=None),
    ]
    anyio.run(lane.enqueue_jobs, jobs)

    def remaining() -> set[str]:
        return {j["id"] for j in listed("--url", url, "--limit", "100")}

    result = invoke("purge", "--older-than", "7d", "--state", "failed", "--url", url)
    assert result.exit_code == 0, result.output
    assert "Removed 1 jobs (failed)" in result.stdout
    assert remaining() == {
        "old-succeeded", "old-cancelled", "hour-old", "old-queued", "old-running"
    }  # fmt: skip

    result = invoke("purge", "--older-than", "7d", "--url", url)
    assert result.exit_code == 0, result.output
    assert "Removed 2 jobs" in result.stdout
    assert remaining() == {"hour-old", "old-queued", "old-running"}

    assert invoke("purge", "--older-than", "2h", "--url", url).stdout.startswith("Removed 0")
    assert invoke("purge", "--older-than", "30m", "--url", url).stdout.startswith("Removed 1")
    assert remaining() == {"old-queued", "old-running"}


@pytest.mark.parametrize("age", ["1000000d", "99999999999999999999d", "9" * 400 + "s"])
def test_purge_older_than_the_calendar_goes_back_removes_nothing(
    url: str, lane: Backlane, age: str
) -> None:
    job_id = enqueue(lane, double, 1)
    assert drain(lane) == 1
    result = invoke("purge", "--older-than", age, "--url", url)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Removed 0 jobs")
    assert stored(lane, job_id) is not None


def test_show_a_job_due_later_than_the_calendar_goes(url: str, lane: Backlane) -> None:
    # delay= is bounded to a century; such a job comes from another program, or from before
    job = Job(task=lane.task_for(double).name, payload='{"x":1}', run_at=1e300)

    async def go() -> str:
        await lane.open()
        try:
            (stored,) = await lane.store.enqueue([job])
        finally:
            await lane.close()
        return stored.id

    job_id = anyio.run(go)
    result = invoke("show", job_id, "--url", url)
    assert result.exit_code == 0, result.output
    assert "1e+300" in result.stdout


@pytest.mark.parametrize("age", ["7", "7x", "-1d", "d", "1.d", "7 days", ""])
def test_purge_refuses_a_bad_duration(url: str, age: str) -> None:
    result = invoke("purge", "--older-than", age, "--url", url)
    assert result.exit_code == 2
    assert "is not a duration" in result.stderr
    assert "30s, 15m, 12h or 7d" in result.stderr


def test_purge_refuses_states_that_have_not_ended(url: str) -> None:
    result = invoke("purge", "--older-than", "1d", "--state", "running", "--url", url)
    assert result.exit_code == 2
    assert "'running' is not one of" in result.stderr


def test_parse_duration() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("15m") == 900
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration(" 7D ") == 7 * 86400
    assert parse_duration("1.5h") == 5400


def test_counts_per_queue_and_state(url: str, mixed: dict[str, Any]) -> None:
    result = invoke("counts", "--url", url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "default": {"succeeded": 3, "failed": 1},
        "mail": {"succeeded": 2},
    }
    table = invoke("counts", "--url", url).stdout.splitlines()
    assert table[0].split()[:4] == ["QUEUE", "DEFERRED", "QUEUED", "RUNNING"]
    assert table[1].split() == ["default", "0", "0", "0", "3", "1", "0", "0", "4"]
    assert table[2].split() == ["mail", "0", "0", "0", "2", "0", "0", "0", "2"]


def test_store_from_environment_or_app(
    url: str, lane: Backlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = enqueue(lane, double, 3)
    monkeypatch.setenv("BACKLANE_URL", url)
    assert [job["id"] for job in listed()] == [job_id]
    monkeypatch.delenv("BACKLANE_URL")

    module = sys.modules[MODULE]
    monkeypatch.setattr(module, "cli_lane", lane, raising=False)
    assert [job["id"] for job in listed("--app", f"{MODULE}:cli_lane")] == [job_id]
    app = FastAPI()
    lane.install(app, workers=0)
    monkeypatch.setattr(module, "cli_app", app, raising=False)
    assert [job["id"] for job in listed("--app", f"{MODULE}:cli_app")] == [job_id]

    both = invoke("jobs", "--url", url, "--app", f"{MODULE}:cli_lane")
    assert both.exit_code == 2
    assert "give --url or --app, not both" in both.stderr
    bad_url = invoke("jobs", "--url", "mysql://localhost/db")
    assert bad_url.exit_code == 2
    assert "unsupported store URL" in bad_url.stderr


def test_looking_at_a_missing_sqlite_file_does_not_create_it(tmp_path: Path) -> None:
    absent = tmp_path / "absent.db"
    result = invoke("jobs", "--url", f"sqlite:///{absent}")
    assert result.exit_code == 1
    assert f"no SQLite database at {absent}" in result.stderr
    assert not absent.exists()


not_a_lane = 42
bare_app = FastAPI()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_colon", "write it as MODULE:ATTR"),
        ("no_such_module_for_backlane:lane", "no module named 'no_such_module_for_backlane'"),
        (f"{MODULE}:missing", f"module '{MODULE}' has no attribute 'missing'"),
        (f"{MODULE}:not_a_lane", "not_a_lane is of type int, not a Backlane"),
        (f"{MODULE}:bare_app", "bare_app is an app without a lane installed"),
    ],
)
def test_worker_says_what_is_wrong_with_its_target(target: str, message: str) -> None:
    result = invoke("worker", target)
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.replace("│", " ").split())


def test_python_m_backlane_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "backlane", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for command in ("worker", "jobs", "show", "retry", "cancel", "purge", "counts"):
        assert command in result.stdout
    assert "Usage: backlane" in result.stdout


@pytest.mark.parametrize(
    "command", [["jobs"], ["jobs", "--json"], ["counts"], ["show", "someid"], ["retry", "x"]]
)
def test_looking_at_a_postgres_database_without_backlane_creates_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    with store_url("postgres", tmp_path) as pg_url:
        schema = pg_url.rpartition("schema=")[2]
        result = invoke(*command, "--url", pg_url)
        assert result.exit_code == 1, result.output
        assert f"no backlane schema {schema!r} in the PostgreSQL database" in result.stderr
        assert "backlane migrate" in result.stderr
        assert not postgres_schema_exists(schema)


def test_a_postgres_store_with_backlane_is_listed(tmp_path: Path) -> None:
    with store_url("postgres", tmp_path) as pg_url:
        assert invoke("migrate", "--url", pg_url).exit_code == 0
        result = invoke("jobs", "--url", pg_url)
        assert result.exit_code == 0, result.output
        assert "No jobs match." in result.stdout


def test_retry_says_what_happened_with_an_exit_code_for_each_case(
    url: str, lane: Backlane, mixed: dict[str, Any]
) -> None:
    job_id = mixed["failing"]
    first = invoke("retry", job_id, "--url", url)
    assert first.exit_code == 0, first.output
    assert f"Job {job_id} queued again." in first.stdout

    again = invoke("retry", job_id, "--url", url)  # re-sent already: it waits for a worker
    assert again.exit_code == 3, again.output
    assert f"job {job_id} is queued already, waiting for a worker" in again.stderr
    assert "only failed or cancelled" not in again.stderr

    succeeded = mixed["ids"][1]
    done = invoke("retry", succeeded, "--url", url)
    assert done.exit_code == 3, done.output
    assert f"job {succeeded} succeeded; only failed or cancelled jobs can be retried" in done.stderr

    unknown = invoke("retry", "0123456789abcdef", "--url", url)
    assert unknown.exit_code == 1
    assert "no job with id '0123456789abcdef'" in unknown.stderr


def test_retry_of_a_job_whose_key_another_job_holds_says_which(url: str, lane: Backlane) -> None:
    async def go() -> tuple[str, str]:
        task = lane.task_for(double)
        first = await task.options(key="k").enqueue(1)
        await lane.cancel(first.id)
        second = await task.options(key="k").enqueue(2)
        return first.id, second.id

    first, _ = anyio.run(go)
    held = invoke("retry", first, "--url", url)
    assert held.exit_code == 4, held.output
    assert f"job {first} was not queued again: another active job holds its key 'k'" in (
        held.stderr
    )
