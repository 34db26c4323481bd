"""Retry policy: how many attempts, how long between them, and for which errors."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import timedelta


class Retry(Exception):
    """Raise from a task to run it again later, counted as an attempt.

    ``delay`` overrides the policy's backoff for this retry.
    """

    def __init__(self, reason: str = "retry requested", *, delay: float | timedelta | None = None):
        super().__init__(reason)
        self.delay = delay.total_seconds() if isinstance(delay, timedelta) else delay


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` further attempts after the first, waiting ``backoff * 2**(n-1)`` seconds
    before retry ``n`` (capped at ``max_backoff``), the wait jittered between half and all of
    it. Only exceptions that are instances of ``retry_on`` are retried."""

    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 300.0
    retry_on: tuple[type[BaseException], ...] = field(default=(Exception,))

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, got {self.retries}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff and max_backoff must not be negative")

    def delay_after(self, attempt: int, exc: BaseException | None = None) -> float | None:
        """Seconds to wait before the next attempt after attempt number ``attempt`` (1-based)
        failed with ``exc``; None when the job should fail for good."""
        if attempt > self.retries:
            return None
        if isinstance(exc, Retry):
            if exc.delay is not None:
                return max(0.0, exc.delay)
        elif exc is not None and not isinstance(exc, self.retry_on):
            return None
        full = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return full / 2 + random.uniform(0, full / 2)
