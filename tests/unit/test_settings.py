"""Settings: arguments first, then ``BACKLANE_*`` environment variables, then defaults."""

import pytest
from pydantic import ValidationError

from backlane import Backlane, Settings


def test_environment_fills_what_arguments_leave_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKLANE_CONCURRENCY", "7")
    monkeypatch.setenv("backlane_eager", "true")  # any case, as pydantic-settings read them
    monkeypatch.setenv("BACKLANE_RETRIES", "9")
    monkeypatch.setenv("BACKLANE_NOT_A_SETTING", "x")
    settings = Settings(retries=2)
    assert (settings.concurrency, settings.eager, settings.retries) == (7, True, 2)
    assert settings.backoff == 1.0
    assert Backlane("memory://", retries=4).settings.retries == 4


def test_a_bad_environment_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKLANE_LEASE_SECONDS", "soon")
    with pytest.raises(ValidationError, match="lease_seconds"):
        Settings()


def test_the_pool_for_def_tasks_is_the_concurrency_unless_threads_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Backlane("memory://", concurrency=8).worker().threads == 8
    assert Backlane("memory://", concurrency=8).worker(threads=2).threads == 2
    assert Backlane("memory://", threads=3).worker(concurrency=5).threads == 3
    monkeypatch.setenv("BACKLANE_THREADS", "4")
    assert Backlane("memory://").worker().threads == 4
