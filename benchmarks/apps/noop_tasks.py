"""No-op tasks for the worker benchmark; the lane's store is ``BACKLANE_URL``."""

from backlane import Backlane

lane = Backlane()


@lane.task
async def noop(n: int) -> None:
    """An ``async def`` task that does nothing: runs on the worker's event loop."""


@lane.task
def noop_sync(n: int) -> None:
    """A ``def`` task that does nothing: runs in the worker's thread pool."""
