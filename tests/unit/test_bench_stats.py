"""The comparison benchmark's arithmetic (``benchmarks/peers/_stats.py``): pure helpers."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "peers" / "_stats.py"
_spec = importlib.util.spec_from_file_location("bench_stats", _PATH)
assert _spec is not None and _spec.loader is not None
stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stats)


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert stats.percentile(values, 0.5) == pytest.approx(50.5)
    assert stats.percentile(values, 0.99) == pytest.approx(99.01)
    assert stats.percentile(values, 0.0) == 1.0
    assert stats.percentile(values, 1.0) == 100.0
    assert stats.percentile([3.0, 1.0, 2.0], 0.5) == 2.0  # order does not matter
    assert stats.percentile([7.0], 0.99) == 7.0


def test_percentile_refuses_nothing_and_bad_fractions() -> None:
    with pytest.raises(ValueError, match="no values"):
        stats.percentile([], 0.5)
    with pytest.raises(ValueError, match="fraction"):
        stats.percentile([1.0], 99)


def test_median_of_runs() -> None:
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([1.0, 2.0]) == 1.5
    assert stats.median([]) is None


def test_drain_rate_counts_the_jobs_after_the_first_finish() -> None:
    assert stats.drain_rate(1001, 10.0, 11.0) == pytest.approx(1000.0)
    with pytest.raises(ValueError):
        stats.drain_rate(1, 10.0, 11.0)
    with pytest.raises(ValueError):
        stats.drain_rate(100, 11.0, 11.0)


def test_advantage_is_above_one_when_backlane_is_better() -> None:
    assert stats.advantage(3000.0, 1000.0, higher_is_better=True) == 3.0
    assert stats.advantage(0.5, 2.0, higher_is_better=False) == 4.0  # latency: lower wins
    assert stats.advantage(40.0, 20.0, higher_is_better=False) == 0.5  # memory: behind
    assert stats.advantage(None, 1.0, higher_is_better=True) is None
    assert stats.advantage(1.0, 0.0, higher_is_better=True) is None


def test_drains_are_sized_to_their_rate_within_bounds() -> None:
    assert stats.sized(4000.0, 1.5, 100, 30_000) == 6000
    assert stats.sized(27.0, 1.5, 100, 30_000) == 100
    assert stats.sized(1e6, 1.5, 100, 30_000) == 30_000
    assert stats.sized(1234.0, 1.0, 100, 30_000) == 1200
