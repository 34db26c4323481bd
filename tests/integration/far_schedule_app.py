"""A lane with a schedule whose next run is beyond the calendar, for ``backlane schedules``."""

from datetime import timedelta

from backlane import Backlane

lane = Backlane("memory://")


@lane.every(timedelta(days=3_000_000), name="every-few-millennia")
def rarely() -> None:
    """Nothing: only its schedule is looked at."""
