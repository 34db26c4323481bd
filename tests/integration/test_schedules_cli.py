"""``backlane schedules``: list, pause, resume."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backlane.cli import cli
from tests.services import postgres_schema_exists, store_url

APP = "tests.acceptance.schedule_app:lane"
runner = CliRunner()


def listed() -> dict[str, dict[str, object]]:
    result = runner.invoke(cli, ["schedules", "--app", APP, "--json"])
    assert result.exit_code == 0, result.output
    return {row["name"]: row for row in json.loads(result.output)}


def test_list_pause_resume() -> None:
    rows = listed()
    row = rows["every-second"]
    assert row["expression"] == "every 0:00:01" and row["paused"] is False
    assert row["next_run"] is not None and row["missed"] == "run_once"
    table = runner.invoke(cli, ["schedules", "--app", APP])
    assert "every-second" in table.output and "next run" in table.output

    paused = runner.invoke(cli, ["schedules", "pause", "every-second", "--app", APP])
    assert paused.exit_code == 0 and "paused" in paused.output
    assert listed()["every-second"]["paused"] is True
    assert runner.invoke(cli, ["schedules", "resume", "every-second", "--app", APP]).exit_code == 0
    assert listed()["every-second"]["paused"] is False


def test_app_given_before_pause_or_resume() -> None:
    """``schedules --app X pause NAME`` (the listing's form, then a command) said "Missing
    option '--app'": the lane given before the command counts, as after it."""
    paused = runner.invoke(cli, ["schedules", "--app", APP, "pause", "every-second"])
    assert paused.exit_code == 0, paused.output
    assert "paused" in paused.output and listed()["every-second"]["paused"] is True
    resumed = runner.invoke(cli, ["schedules", "--app", APP, "resume", "every-second"])
    assert resumed.exit_code == 0, resumed.output
    assert listed()["every-second"]["paused"] is False
    missing = runner.invoke(cli, ["schedules", "resume", "every-second"])
    assert missing.exit_code == 2 and "name the lane that declares" in missing.output


def test_unknown_schedule_and_missing_app() -> None:
    unknown = runner.invoke(cli, ["schedules", "pause", "nope", "--app", APP])
    assert unknown.exit_code == 2 and "no schedule named 'nope'" in unknown.output
    assert runner.invoke(cli, ["schedules"]).exit_code == 2
    no_schedules = runner.invoke(cli, ["scheduler", "tests.acceptance.worker_app:lane"])
    assert no_schedules.exit_code == 2 and "declares no schedules" in no_schedules.output


def test_a_schedule_due_beyond_the_calendar_is_listed() -> None:
    app = "tests.integration.far_schedule_app:lane"
    result = runner.invoke(cli, ["schedules", "--app", app, "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["name"] == "every-few-millennia" and row["next_run"] is None
    table = runner.invoke(cli, ["schedules", "--app", app])
    assert table.exit_code == 0 and "every-few-millennia" in table.output


def test_an_interval_longer_than_a_timedelta_is_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``@lane.every(1e300)`` is accepted; listing it ended in an OverflowError traceback
    (its expression went through ``timedelta``)."""
    (tmp_path / "googol_app.py").write_text(
        "from backlane import Backlane\n"
        "lane = Backlane('memory://')\n"
        "lane.every(1e300, name='hardly-ever')(print)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(cli, ["schedules", "--app", "googol_app:lane", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["expression"] == "every 1e+300 seconds" and row["next_run"] is None
    table = runner.invoke(cli, ["schedules", "--app", "googol_app:lane"])
    assert table.exit_code == 0 and "hardly-ever" in table.output


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_listing_schedules_of_a_store_where_nothing_ran_creates_nothing(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``backlane schedules`` only looks: on a SQLite file that does not exist yet, or a
    PostgreSQL database without backlane's schema, it lists the app's schedules, never
    run, and creates neither (it created both)."""
    with store_url(kind, tmp_path) as url:
        if kind == "sqlite":
            url = f"sqlite:///{tmp_path / 'not-yet.db'}"
        module = tmp_path / "lookonly_app.py"
        module.write_text(
            "from backlane import Backlane\n"
            f"lane = Backlane({url!r})\n"
            "@lane.every(60, name='minutely')\n"
            "def minutely() -> None: ...\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        result = runner.invoke(cli, ["schedules", "--app", "lookonly_app:lane", "--json"])
        assert result.exit_code == 0, result.output
        (row,) = json.loads(result.output)
        assert row["name"] == "minutely" and row["last_run"] is None and not row["paused"]
        if kind == "sqlite":
            assert not (tmp_path / "not-yet.db").exists()
        else:
            schema = url.rpartition("schema=")[2]
            assert not postgres_schema_exists(schema)
