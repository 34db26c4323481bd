"""Periodic work: cron and interval schedules that fire exactly once per slot.

A schedule cuts time into slots (each cron fire time, or each multiple of an interval since
the epoch). Any number of schedulers may run, embedded in web processes or as
``backlane scheduler``: each slot becomes one job, because the store takes a slot and
stores its job in one atomic step (``Store.claim_slot``) — there is no leader to elect.

After downtime a schedule follows its ``missed`` policy: ``"run_once"`` enqueues one
catch-up job for the latest missed slot, ``"skip"`` none; either way it carries on with the
next slot.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from .exceptions import ConfigurationError
from .tasks import EnqueueOptions, Task

if TYPE_CHECKING:
    from .app import Backlane

log = logging.getLogger("backlane.scheduler")

Missed = Literal["run_once", "skip"]


@dataclass(frozen=True)
class Schedule:
    """When a task runs by itself: a cron expression in a time zone, or a fixed interval.

    Building one checks it: a cron expression of exactly five fields that cronsim accepts,
    a known time zone, an interval of at least one second; otherwise ``ConfigurationError``.
    """

    name: str
    task: Task[Any, Any]
    cron: str | None = None
    every: float | None = None
    tz: str = "UTC"
    missed: Missed = "run_once"
    on_time: float = 5.0
    """A slot fired at most this late counts as on time; later, it is a missed slot."""
    declared_at: float = field(default_factory=time.time, compare=False)
    """When this schedule was declared (POSIX seconds). While the store holds no slot of
    it, a schedule is new, and a new schedule fires no slot from before this instant."""

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ConfigurationError(
                f"schedule {self.name!r}: give a cron expression or an interval"
            )
        if self.cron is not None and not isinstance(self.cron, str):
            raise ConfigurationError(
                f"schedule {self.name!r}: a cron expression is a string such as "
                f"'0 3 * * *', not {self.cron!r}"
            )
        if not isinstance(self.tz, str):
            raise ConfigurationError(
                f"schedule {self.name!r}: a time zone is a name such as 'Europe/Berlin', "
                f"not {self.tz!r}"
            )
        if self.missed not in ("run_once", "skip"):
            raise ConfigurationError(
                f"schedule {self.name!r}: missed must be 'run_once' or 'skip', not {self.missed!r}"
            )
        if self.every is not None and not (math.isfinite(self.every) and self.every >= 1):
            raise ConfigurationError(
                f"schedule {self.name!r}: the interval must be a finite number of seconds, "
                f"at least 1, got {self.every}"
            )
        try:
            zone = ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigurationError(
                f"schedule {self.name!r}: unknown time zone {self.tz!r}"
            ) from exc
        if self.cron is not None:
            fields = len(self.cron.split())
            if fields != 5:
                raise ConfigurationError(
                    f"schedule {self.name!r}: bad cron expression {self.cron!r}: a cron "
                    f"expression has five fields (minute hour day-of-month month "
                    f"day-of-week), got {fields}; seconds are not supported"
                )
            try:
                CronSim(self.cron, datetime.now(zone))
            except CronSimError as exc:
                raise ConfigurationError(
                    f"schedule {self.name!r}: bad cron expression {self.cron!r}: {exc}"
                ) from exc

    @property
    def expression(self) -> str:
        """The schedule as people write it; an interval longer than ``timedelta`` holds
        (some 2.7 million years) in seconds."""
        if self.cron is not None:
            return f"{self.cron} ({self.tz})"
        seconds = self.every or 0.0
        try:
            return f"every {timedelta(seconds=seconds)}"
        except OverflowError:
            return f"every {seconds:g} seconds"

    def latest_slot(self, now: float) -> float | None:
        """The latest slot at or before ``now`` (POSIX seconds): the one ``next_slot``
        gives for some instant before it. None if there is none within the calendar."""
        if self.every is not None:
            return math.floor(now / self.every) * self.every
        assert self.cron is not None
        zone = ZoneInfo(self.tz)
        best: float | None = None
        try:
            # Wall times (naive, local) after ``now``'s own can still be slots at or before
            # it only in a repeated hour: start as far ahead as the clocks go back nearby.
            wall = _wall(now + _shift_near(now, zone) + 1, zone)
            for match in CronSim(self.cron, wall, reverse=True):
                for instant in self._instants(match, zone):
                    if instant <= now and (best is None or instant > best):
                        best = instant
                if best is not None and match < _wall(best, zone) - timedelta(
                    seconds=_shift_near(best, zone)
                ):
                    break
        except (StopIteration, OverflowError, ValueError):
            pass
        return best

    def next_slot(self, after: float) -> float | None:
        """The first slot strictly after ``after`` (POSIX seconds); None if there is none
        within the calendar.

        A cron schedule reads its expression on the wall clock of its time zone, as
        Debian's cron does, whatever the size of a DST change (an hour in Berlin, half an
        hour on Lord Howe Island). A time of day the clocks skip: an expression with a
        fixed minute and hour fires once, at the change; one with ``*`` in the minute or
        hour (``*/30 * * * *``) does not fire for it. A time the clocks show twice: the
        first fires once, at the first pass; the second in both passes.
        """
        if self.every is not None:
            return (math.floor(after / self.every) + 1) * self.every
        assert self.cron is not None
        zone = ZoneInfo(self.tz)
        best: float | None = None
        try:
            # Wall times before ``after``'s own can still be slots after it only in a
            # repeated hour: start as far back as the clocks go back nearby.
            wall = _wall(after - _shift_near(after, zone) - 1, zone)
            for match in CronSim(self.cron, wall):
                for instant in self._instants(match, zone):
                    if instant > after and (best is None or instant < best):
                        best = instant
                if best is not None and match > _wall(best, zone) + timedelta(
                    seconds=_shift_near(best, zone)
                ):
                    break
        except (StopIteration, OverflowError, ValueError):
            pass
        return best

    def _instants(self, wall: datetime, zone: ZoneInfo) -> list[float]:
        """When the cron expression's match ``wall`` (a naive local time) fires: never,
        once, or (a frequent expression in a repeated hour) twice; POSIX seconds."""
        shown: list[float] = []
        for fold in (0, 1):
            instant = wall.replace(tzinfo=zone, fold=fold).timestamp()
            if _wall(instant, zone) == wall and instant not in shown:
                shown.append(instant)
        assert self.cron is not None
        fields = self.cron.split()
        fixed = not fields[0].startswith("*") and not fields[1].startswith("*")
        if not fixed:
            return shown
        if shown:
            return shown[:1]
        return [_change_at(wall, zone)]

    def tolerance(self) -> float:
        """How late a slot may fire and still be on time (at most half an interval)."""
        if self.every is not None:
            return min(self.on_time, self.every / 2)
        return self.on_time


class Scheduler:
    """Turns a lane's due schedule slots into jobs until ``stop()``."""

    def __init__(self, lane: Backlane, *, tick: float = 1.0) -> None:
        self.lane = lane
        self.tick = tick
        self._tried: dict[str, float] = {}
        self._stopping = False
        self.fired = 0

    def stop(self) -> None:
        """Ask the scheduler to stop after its current step. Safe from any thread."""
        self._stopping = True
        self.lane.notifier.notify()

    async def run(self) -> None:
        """Fire due slots until ``stop()``; sleeps until the next slot in between."""
        await self.lane.open()
        names = ", ".join(self.lane.schedules) or "none"
        log.info("scheduler started (schedules: %s)", names)
        while not self._stopping:
            try:
                await self.step(time.time())
            except Exception:
                log.exception("scheduler step failed; trying again")
            wait = self._until_next(time.time())
            if wait > 0:
                await self.lane.notifier.wait(wait)
        log.info("scheduler stopped after firing %d slots", self.fired)

    async def step(self, now: float) -> int:
        """Fire what is due at ``now``: the on-time slot of each schedule, or, after
        downtime, one catch-up job where the policy says ``run_once``. A new schedule (no
        slot taken yet) starts with its first slot at or after ``declared_at``: nothing
        from before it existed, on time or not. Returns how many jobs this scheduler
        stored (other schedulers may have taken the rest)."""
        schedules = self.lane.schedules
        if not schedules:
            return 0
        records = await self.lane.store.schedules()
        fired = 0
        for schedule in schedules.values():
            record = records.get(schedule.name)
            if record is not None and record.paused:
                continue
            slot = schedule.latest_slot(now)
            if slot is None or self._tried.get(schedule.name, -math.inf) >= slot:
                continue
            last = record.last_slot if record is not None else None
            if last is not None and last >= slot:
                self._tried[schedule.name] = slot
                continue
            if last is None and slot < schedule.declared_at:
                self._tried[schedule.name] = slot  # from before a new schedule existed
                continue
            late = now - slot > schedule.tolerance()
            if late and (schedule.missed == "skip" or last is None):
                self._tried[schedule.name] = slot  # a missed slot, not to be caught up
                continue
            job = schedule.task.build_job((), {}, EnqueueOptions(), now=now)
            job.run_at = slot
            job.meta = {"schedule": schedule.name, "slot": slot, "catch_up": late}
            if await self.lane.store.claim_slot(schedule.name, slot, job):
                fired += 1
                self.lane.notifier.notify()
                log.info(
                    "schedule %s: %s slot %s",
                    schedule.name,
                    "caught up" if late else "fired",
                    datetime.fromtimestamp(slot, timezone.utc).isoformat(),
                )
            self._tried[schedule.name] = slot
        self.fired += fired
        return fired

    def _until_next(self, now: float) -> float:
        upcoming = [s.next_slot(now) for s in self.lane.schedules.values()]
        soonest = min((t for t in upcoming if t is not None), default=now + self.tick)
        return max(0.0, min(self.tick, soonest - now))


_SHIFT_MARGIN = timedelta(hours=3)
"""Wider than any DST change, and shorter than the time between two changes."""


def _wall(instant: float, zone: ZoneInfo) -> datetime:
    """The local wall-clock time (naive) in ``zone`` at ``instant``."""
    return datetime.fromtimestamp(instant, zone).replace(tzinfo=None)


def _shift_near(instant: float, zone: ZoneInfo) -> float:
    """How far (seconds) the clocks of ``zone`` change within a few hours of ``instant``:
    0 away from DST changes."""
    margin = _SHIFT_MARGIN.total_seconds()
    offsets = [
        datetime.fromtimestamp(instant + d, zone).utcoffset() or timedelta()
        for d in (-margin, 0.0, margin)
    ]
    return (max(offsets) - min(offsets)).total_seconds()


def _change_at(wall: datetime, zone: ZoneInfo) -> float:
    """The instant the clocks of ``zone`` skip over ``wall`` (a time that does not exist)."""
    before = wall.replace(tzinfo=zone, fold=1).timestamp()  # read with the later offset
    after = wall.replace(tzinfo=zone, fold=0).timestamp()
    low, high = math.floor(min(before, after)), math.ceil(max(before, after))
    offset = datetime.fromtimestamp(low, zone).utcoffset()
    while high - low > 1:
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, zone).utcoffset() == offset:
            low = mid
        else:
            high = mid
    return float(high)
