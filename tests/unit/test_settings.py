"""Settings: arguments first, then ``BACKLANE_*`` environment variables, then defaults."""

import pytest
from pydantic import ValidationError

from backlane import Backlane, ConfigurationError, Settings


def test_environment_fills_what_arguments_leave_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKLANE_CONCURRENCY", "7")
    monkeypatch.setenv("backlane_eager", "true")  # any case, as pydantic-settings read them
    monkeypatch.setenv("BACKLANE_RETRIES", "9")
    monkeypatch.setenv("BACKLANE_NOT_A_SETTING", "x")
    settings = Settings(retries=2)
    assert (settings.concurrency, settings.eager, settings.retries) == (7, True, 2)
    assert settings.backoff == 1.0
    assert Backlane("memory://", retries=4).settings.retries == 4


def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKLANE_LEASE_SECONDS", "soon")
    with pytest.raises(ValidationError, match="lease_seconds"):
        Settings()
    with pytest.raises(ConfigurationError, match=r"BACKLANE_LEASE_SECONDS='soon' \(environment\)"):
        Backlane("memory://")
    monkeypatch.setenv("BACKLANE_CONCURRENCY", "0")
    with pytest.raises(ConfigurationError) as caught:
        Backlane("memory://", lease_seconds=5)  # the argument wins over the bad variable
    assert str(caught.value) == (
        "invalid setting: BACKLANE_CONCURRENCY='0' (environment): "
        "Input should be greater than or equal to 1"
    )


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKLANE_THREADS", "")  # as docker compose passes ${UNSET}
    monkeypatch.setenv("BACKLANE_URL", "")
    settings = Backlane().settings
    assert settings.threads is None
    assert settings.url == "sqlite:///./backlane.db"


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"concurrency": 0}, "concurrency=0: Input should be greater than or equal to 1"),
        ({"lease_seconds": -1}, "lease_seconds=-1: Input should be greater than 0"),
        ({"retries": -2}, "retries=-2: Input should be greater than or equal to 0"),
        (
            {"poll_min": 1, "poll_max": 0.5},
            "poll_max (0.5) must not be below poll_min (1.0) (from poll_min=1, poll_max=0.5)",
        ),
    ],
)
def test_a_setting_out_of_range_is_refused_by_name(given: dict[str, float], named: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Backlane("memory://", **given)
    assert str(caught.value) == f"invalid setting: {named}"


def test_the_pool_for_def_tasks_is_the_concurrency_unless_threads_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Backlane("memory://", concurrency=8).worker().threads == 8
    assert Backlane("memory://", concurrency=8).worker(threads=2).threads == 2
    assert Backlane("memory://", threads=3).worker(concurrency=5).threads == 3
    monkeypatch.setenv("BACKLANE_THREADS", "4")
    assert Backlane("memory://").worker().threads == 4


def test_raising_poll_min_alone_raises_poll_max_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Backlane("memory://", threads=0).worker(concurrency=7).threads == 7  # 0: default
    assert Backlane("memory://", poll_min=0.5).settings.poll_max == 0.5
    monkeypatch.setenv("BACKLANE_POLL_MIN", "0.4")
    assert Backlane("memory://").settings.poll_max == 0.4
    monkeypatch.setenv("BACKLANE_POLL_MAX", "0.3")
    with pytest.raises(ConfigurationError, match=r"BACKLANE_POLL_MIN='0\.4', BACKLANE_POLL_MAX"):
        Backlane("memory://")
