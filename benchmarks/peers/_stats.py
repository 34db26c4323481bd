"""The arithmetic of the comparison: percentiles, medians, rates and ratios (pure helpers)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie, by linear interpolation between
    the closest ranks (numpy's default): p50 of an even count is the mean of the middle two.
    Raises ``ValueError`` on no values or a fraction outside [0, 1]."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1], got {fraction}")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float | None:
    """The median, or None when there is nothing to take it of."""
    return float(statistics.median(values)) if values else None


def drain_rate(jobs: int, first_finish: float, last_finish: float) -> float:
    """Jobs per second of a drain timed from its first finished job to its last: the jobs
    after the first finished in that span. Raises ``ValueError`` if the span is empty."""
    if jobs < 2 or last_finish <= first_finish:
        raise ValueError(f"no span to time: {jobs} jobs, {first_finish}..{last_finish}")
    return (jobs - 1) / (last_finish - first_finish)


def advantage(
    backlane: float | None, peer: float | None, *, higher_is_better: bool
) -> float | None:
    """How many times better backlane's figure is than the peer's (below 1: behind); None
    when either figure is missing or zero."""
    if not backlane or not peer:
        return None
    return backlane / peer if higher_is_better else peer / backlane


def sized(rate: float, seconds: float, smallest: int, largest: int) -> int:
    """How many jobs keep a worker draining at ``rate`` busy for ``seconds``, within bounds,
    rounded to a hundred."""
    wanted = rate * seconds
    return int(min(largest, max(smallest, round(wanted, -2))))
