"""The job page's attempts, read from a job's history and its own fields (no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from backlane.dashboard.views import AttemptRow, attempt_rows
from backlane.jobs import Job, JobState, attempt_record

S = JobState
T = 1_700_000_000.0


def job(state: JobState, attempts: int, history: list[dict[str, Any]], **more: Any) -> Job:
    return Job(
        task="t:f",
        payload="{}",
        state=state,
        attempts=attempts,
        started_at=T + 50,
        attempt_history=history,
        **more,
    )


def retried(n: int) -> dict[str, Any]:
    running = Job(task="t:f", payload="{}", attempts=n, started_at=T + n)
    error = {"type": "ValueError", "message": f"bad {n}", "traceback": "Traceback ..."}
    return attempt_record(running, "retried", T + n + 0.5, error)


def test_a_record_keeps_type_and_message_but_not_the_traceback() -> None:
    assert retried(2) == {
        "attempt": 2,
        "started_at": T + 2,
        "ended_at": T + 2.5,
        "outcome": "retried",
        "error": {"type": "ValueError", "message": "bad 2"},
    }
    running = Job(task="t:f", payload="{}", attempts=1, started_at=T)
    long = attempt_record(running, "failed", T, {"type": "E", "message": "x" * 5000})
    assert len(long["error"]["message"]) == 2001
    assert "error" not in attempt_record(running, "cancelled", T, None)


def test_a_job_that_succeeded_first_time_has_one_attempt_from_its_own_fields() -> None:
    rows = attempt_rows(job(S.SUCCEEDED, 1, [], finished_at=T + 51))
    assert rows == [AttemptRow(1, T + 50, T + 51, "succeeded")]


def test_retried_attempts_then_the_running_one() -> None:
    rows = attempt_rows(job(S.RUNNING, 3, [retried(1), retried(2)]))
    assert [(r.number, r.outcome, r.error_message) for r in rows] == [
        (1, "retried", "bad 1"),
        (2, "retried", "bad 2"),
        (3, "running", ""),
    ]
    assert rows[0].started_at == T + 1 and rows[0].ended_at == T + 1.5


def test_attempts_counted_but_never_recorded_were_lost_to_an_expired_lease() -> None:
    rows = attempt_rows(job(S.QUEUED, 4, [retried(1), retried(3)]))
    assert [(r.number, r.outcome) for r in rows] == [
        (1, "retried"),
        (2, "lease expired"),
        (3, "retried"),
        (4, "lease expired"),
    ]
    assert rows[3].started_at == T + 50  # the job still carries the lost attempt's start


@pytest.mark.parametrize(
    ("state", "error", "outcome"),
    [
        (S.CANCELLED, None, "lease expired, cancelled"),
        (S.FAILED, {"type": "E", "message": "old"}, "failed"),  # ended by an older backlane
    ],
)
def test_an_unrecorded_last_attempt_of_an_ended_job(
    state: JobState, error: dict[str, Any] | None, outcome: str
) -> None:
    (row,) = attempt_rows(job(state, 1, [], finished_at=T + 60, error=error))
    assert (row.outcome, row.ended_at) == (outcome, T + 60)


def test_a_job_that_never_started_has_no_attempt_and_odd_records_are_skipped() -> None:
    assert attempt_rows(job(S.CANCELLED, 0, [])) == []
    rows = attempt_rows(job(S.FAILED, 1, [{"attempt": "one"}, "junk", {"attempt": 1}]))
    assert [(r.number, r.outcome, r.started_at) for r in rows] == [(1, "", None)]
