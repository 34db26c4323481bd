"""Slot arithmetic of schedules: cron in a time zone across DST changes, and intervals."""

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from backlane import Backlane, ConfigurationError
from backlane.scheduler import Schedule
from tests.integration import schedule_tasks

BERLIN = ZoneInfo("Europe/Berlin")


def schedule(**how: object) -> Schedule:
    lane = Backlane("memory://")
    return Schedule(name="s", task=lane.task(schedule_tasks.tick), **how)  # type: ignore[arg-type]


def local(ts: float | None) -> str:
    assert ts is not None
    return datetime.fromtimestamp(ts, BERLIN).isoformat()


def fire_times(s: Schedule, start: datetime, count: int) -> list[str]:
    out, t = [], start.timestamp()
    for _ in range(count):
        nxt = s.next_slot(t)
        out.append(local(nxt))
        t = nxt  # type: ignore[assignment]
    return out


def test_daily_cron_across_spring_forward() -> None:
    """02:30 does not exist on 2026-03-29 in Berlin: the job runs at 03:00 CEST, once."""
    s = schedule(cron="30 2 * * *", tz="Europe/Berlin")
    assert fire_times(s, datetime(2026, 3, 27, 12, tzinfo=BERLIN), 4) == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_daily_cron_across_fall_back() -> None:
    """02:30 happens twice on 2026-10-25 in Berlin: a daily job runs once, the first time."""
    s = schedule(cron="30 2 * * *", tz="Europe/Berlin")
    times = fire_times(s, datetime(2026, 10, 23, 12, tzinfo=BERLIN), 3)
    assert times == [
        "2026-10-24T02:30:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]


def test_frequent_cron_runs_in_both_repeated_hours() -> None:
    s = schedule(cron="*/30 * * * *", tz="Europe/Berlin")
    times = fire_times(s, datetime(2026, 10, 25, 1, 50, tzinfo=BERLIN), 5)
    assert times == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]


def test_latest_slot_is_at_or_before_now() -> None:
    s = schedule(cron="0 3 * * *", tz="Asia/Shanghai")
    shanghai = ZoneInfo("Asia/Shanghai")
    at_three = datetime(2026, 5, 1, 3, 0, tzinfo=shanghai).timestamp()
    assert s.latest_slot(at_three) == at_three
    assert s.latest_slot(at_three - 1) == at_three - 86400
    assert s.next_slot(at_three) == at_three + 86400


def test_interval_slots_are_aligned() -> None:
    s = schedule(every=60.0)
    assert s.latest_slot(125.5) == 120 and s.next_slot(120) == 180
    assert s.tolerance() == 5.0 and schedule(every=1.0).tolerance() == 0.5


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ({"cron": "61 * * * *"}, "bad cron expression"),
        ({"cron": "* * * * *", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"every": 0.5}, "at least 1, got 0.5"),
        ({"every": float("nan")}, "at least 1, got nan"),  # it was accepted
        ({"every": float("inf")}, "a finite number of seconds"),
        ({}, "give a cron expression or an interval"),
        ({"every": 5.0, "missed": "sometimes"}, "run_once"),
        ({"cron": 5}, "a cron expression is a string"),  # AttributeError from cronsim
        ({"cron": b"* * * * *"}, "a cron expression is a string"),
        ({"cron": "* * * * *", "tz": None}, "a time zone is a name"),  # TypeError
    ],
)
def test_bad_schedules_are_refused(how: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        schedule(**how)


def test_an_interval_that_is_not_a_number_is_refused_by_every() -> None:
    with pytest.raises(ConfigurationError, match="not '5m'"):
        Backlane("memory://").every("5m")  # type: ignore[arg-type]


def test_an_interval_too_big_for_a_float_is_refused_by_every() -> None:
    with pytest.raises(ConfigurationError, match="a finite number of seconds"):  # OverflowError
        Backlane("memory://").every(10**400)(schedule_tasks.tick)


def test_scheduled_task_must_take_no_arguments() -> None:
    lane = Backlane("memory://")
    with pytest.raises(ConfigurationError, match="without arguments"):
        lane.every(timedelta(seconds=5))(schedule_tasks.needs_argument)


def test_latest_slot_in_the_repeated_hour_is_the_second_pass() -> None:
    """At 02:20 CET (the second 02:20 of the fall-back night) the latest slot of a
    quarter-hourly schedule is 02:15 CET, not 02:15 CEST an hour earlier: the scheduler
    fired nothing in the repeated hour."""
    s = schedule(cron="*/15 * * * *", tz="Europe/Berlin")
    second_pass = datetime(2026, 10, 25, 2, 20, tzinfo=BERLIN, fold=1).timestamp()
    assert local(s.latest_slot(second_pass)) == "2026-10-25T02:15:00+01:00"
    assert local(s.latest_slot(second_pass - 3600)) == "2026-10-25T02:15:00+02:00"
    hourly = schedule(cron="0 * * * *", tz="America/New_York")
    new_york = ZoneInfo("America/New_York")
    repeated_one = datetime(2026, 11, 1, 1, 0, tzinfo=new_york, fold=1).timestamp()
    assert hourly.latest_slot(repeated_one) == repeated_one


def test_latest_slot_agrees_with_next_slot_in_the_repeated_hour() -> None:
    """A daily 02:30 fires in the first 02:30 of the fall-back night only; during the
    second 02:xx hour its latest slot is that one, not yesterday's (a catch-up after
    downtime waited up to an hour)."""
    s = schedule(cron="30 2 * * *", tz="Europe/Berlin")
    second_pass = datetime(2026, 10, 25, 2, 20, tzinfo=BERLIN, fold=1).timestamp()
    assert local(s.latest_slot(second_pass)) == "2026-10-25T02:30:00+02:00"


@pytest.mark.parametrize(
    "expression", ["0 0 * * * *", "*/10 * * * * *", "* * * *", "0 0 1 1 * 2027"]
)
def test_a_cron_expression_has_five_fields(expression: str) -> None:
    """cronsim reads six fields as seconds first, so "0 0 * * * *" (meant as Quartz's
    "every midnight", or as a year field) fired every hour: refused at definition."""
    with pytest.raises(ConfigurationError) as caught:
        Backlane("memory://").cron(expression)(schedule_tasks.tick)
    message = str(caught.value)
    assert repr(expression) in message
    assert "five fields" in message
    assert f"got {len(expression.split())}" in message
