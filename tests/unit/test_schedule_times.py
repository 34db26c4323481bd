"""Slot arithmetic of schedules: cron in a time zone across DST changes, and intervals."""

import itertools
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


LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
"""+10:30 in winter, +11:00 in summer: its clocks move by half an hour. In 2026 they go
forward at 02:00 on 4 October (to 02:30) and back at 02:00 on 5 April (to 01:30)."""


def lord_howe(ts: float | None) -> str:
    assert ts is not None
    return datetime.fromtimestamp(ts, LORD_HOWE).isoformat()


def lord_howe_times(cron: str, start: datetime, count: int) -> list[str]:
    s = schedule(cron=cron, tz="Australia/Lord_Howe")
    out, t = [], start.timestamp()
    for _ in range(count):
        nxt = s.next_slot(t)
        assert nxt is not None and nxt > t
        out.append(lord_howe(nxt))
        t = nxt
    return out


@pytest.mark.parametrize(
    ("cron", "start", "expected"),
    [
        (  # 02:00 does not exist: the daily job runs right after the change, as in Berlin
            "0 2 * * *",
            datetime(2026, 10, 2, 12, tzinfo=LORD_HOWE),
            ["2026-10-03T02:00:00+10:30", "2026-10-04T02:30:00+11:00", "2026-10-05T02:00:00+11:00"],
        ),
        (  # a frequent job skips the times that do not exist (Berlin: 02:00 and 02:30)
            "*/30 * * * *",
            datetime(2026, 10, 4, 1, 10, tzinfo=LORD_HOWE),
            ["2026-10-04T01:30:00+10:30", "2026-10-04T02:30:00+11:00", "2026-10-04T03:00:00+11:00"],
        ),
        (
            "*/20 2 * * *",
            datetime(2026, 10, 4, 1, 0, tzinfo=LORD_HOWE),
            ["2026-10-04T02:40:00+11:00", "2026-10-05T02:00:00+11:00", "2026-10-05T02:20:00+11:00"],
        ),
    ],
)
def test_lord_howe_spring_forward(cron: str, start: datetime, expected: list[str]) -> None:
    assert lord_howe_times(cron, start, len(expected)) == expected


@pytest.mark.parametrize(
    ("cron", "start", "expected"),
    [
        (  # 02:00 comes once (the clocks go back from 02:00 to 01:30): the job runs once
            "0 2 * * *",
            datetime(2026, 4, 3, 12, tzinfo=LORD_HOWE),
            ["2026-04-04T02:00:00+11:00", "2026-04-05T02:00:00+10:30", "2026-04-06T02:00:00+10:30"],
        ),
        (  # 01:30 comes twice: a frequent job runs in both, as in Berlin's repeated hour
            "*/30 * * * *",
            datetime(2026, 4, 5, 0, 50, tzinfo=LORD_HOWE),
            [
                "2026-04-05T01:00:00+11:00",
                "2026-04-05T01:30:00+11:00",
                "2026-04-05T01:30:00+10:30",
                "2026-04-05T02:00:00+10:30",
                "2026-04-05T02:30:00+10:30",
            ],
        ),
        (  # 01:45 comes twice: a daily job runs once, the first time
            "45 1 * * *",
            datetime(2026, 4, 4, 12, tzinfo=LORD_HOWE),
            ["2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"],
        ),
        (  # stepping an hour at a time from 01:00 landed on 02:30 and skipped 02:00, 02:20
            "*/20 2 * * *",
            datetime(2026, 4, 5, 1, 0, tzinfo=LORD_HOWE),
            ["2026-04-05T02:00:00+10:30", "2026-04-05T02:20:00+10:30", "2026-04-05T02:40:00+10:30"],
        ),
    ],
)
def test_lord_howe_fall_back(cron: str, start: datetime, expected: list[str]) -> None:
    assert lord_howe_times(cron, start, len(expected)) == expected


def test_lord_howe_next_slot_from_the_repeated_half_hour() -> None:
    """At 01:40 of the second pass the daily 01:45 has already run (at 01:45 +11:00, half
    an hour earlier): the next run is tomorrow's, not one in the past."""
    s = schedule(cron="45 1 * * *", tz="Australia/Lord_Howe")
    second_pass = datetime(2026, 4, 5, 1, 40, tzinfo=LORD_HOWE, fold=1).timestamp()
    assert lord_howe(s.next_slot(second_pass)) == "2026-04-06T01:45:00+10:30"
    assert lord_howe(s.latest_slot(second_pass)) == "2026-04-05T01:45:00+11:00"
    frequent = schedule(cron="*/20 2 * * *", tz="Australia/Lord_Howe")
    at = datetime(2026, 4, 5, 2, 10, tzinfo=LORD_HOWE).timestamp()
    assert lord_howe(frequent.latest_slot(at)) == "2026-04-05T02:00:00+10:30"


def test_next_slot_from_berlins_repeated_hour_is_not_in_the_past() -> None:
    s = schedule(cron="30 2 * * *", tz="Europe/Berlin")
    second_pass = datetime(2026, 10, 25, 2, 20, tzinfo=BERLIN, fold=1).timestamp()
    assert local(s.next_slot(second_pass)) == "2026-10-26T02:30:00+01:00"


@pytest.mark.parametrize("tz", ["Australia/Lord_Howe", "Europe/Berlin", "America/New_York"])
@pytest.mark.parametrize(
    "cron", ["0 2 * * *", "45 1 * * *", "30 2 * * *", "*/30 * * * *", "*/20 2 * * *", "0 * * * *"]
)
def test_slots_are_ordered_around_every_dst_change(tz: str, cron: str) -> None:
    """Every 7 minutes through both 2026 DST nights: the next slot is after the instant, the
    latest at or before it, and no slot lies between the latest and the next."""
    s, zone = schedule(cron=cron, tz=tz), ZoneInfo(tz)
    firsts = [datetime(2026, month, 1, tzinfo=zone) for month in range(1, 13)]
    changes = [a for a, b in itertools.pairwise(firsts) if a.utcoffset() != b.utcoffset()]
    assert len(changes) == 2  # the first of the month in which the clocks change
    for month_start in changes:
        day = month_start
        while (day + timedelta(days=1)).utcoffset() == month_start.utcoffset():
            day += timedelta(days=1)
        start = day.timestamp()
        for t in range(int(start), int(start) + 2 * 86400, 7 * 60):
            nxt, latest = s.next_slot(t), s.latest_slot(t)
            assert nxt is not None and latest is not None
            assert latest <= t < nxt, (cron, tz, t)
            assert s.next_slot(latest) == nxt, (cron, tz, t)


def test_latest_slot_near_a_chatham_dst_change_returns() -> None:
    """Chatham Islands (+12:45 / +13:45) change at 03:45: looking back from 03:00 on the
    fall-back night, cronsim's reverse search never returned (a scheduler stuck for good)."""
    s = schedule(cron="*/20 2 * * *", tz="Pacific/Chatham")
    chatham = ZoneInfo("Pacific/Chatham")
    at = datetime(2026, 4, 5, 3, 0, tzinfo=chatham).timestamp()
    latest = s.latest_slot(at)
    assert latest is not None
    assert datetime.fromtimestamp(latest, chatham).isoformat() == "2026-04-05T02:40:00+13:45"
