"""Progress lines on stderr, with the median of a figure's runs."""

from __future__ import annotations

import sys
import time

from ._stats import median


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt(values: list[float], digits: int = 0) -> str:
    """The median of ``values``, formatted, or '-' for none."""
    value = median(values)
    return "-" if value is None else f"{value:,.{digits}f}"


def phases_text(phases: dict[str, float]) -> str:
    """Each step's seconds, in the order they ran: ``"start 1.2, drains 0.8"``."""
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items())
