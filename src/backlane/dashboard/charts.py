"""The overview's two charts, drawn server-side as inline SVG from ``Store.stats`` buckets:
jobs ended per minute (stacked by end state) and the mean wait per minute."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from markupsafe import Markup, escape

from ..stores.base import StatsBucket

WIDTH = 720
HEIGHT = 160
TOP = 12
BOTTOM = 22
LEFT = 44
RIGHT = 8


@dataclass(frozen=True)
class Minute:
    """One bucket of the window, empty buckets included."""

    start: float
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    wait: float | None = None
    """Mean wait (seconds) of the jobs that ended in it, None when none had one."""

    @property
    def ended(self) -> int:
        return self.succeeded + self.failed + self.cancelled


def minutes(
    buckets: Sequence[StatsBucket], *, now: float, width: float, count: int
) -> list[Minute]:
    """``count`` buckets of ``width`` seconds ending with the one holding ``now``, oldest
    first, filled from ``buckets`` (which may leave empty ones out)."""
    last = (now // width) * width
    by_start = {b.start: b for b in buckets}
    out: list[Minute] = []
    for i in range(count - 1, -1, -1):
        start = last - i * width
        b = by_start.get(start)
        if b is None:
            out.append(Minute(start))
            continue
        wait = b.wait_total / b.wait_count if b.wait_count else None
        out.append(Minute(start, b.succeeded, b.failed, b.cancelled, wait))
    return out


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%H:%M")


def seconds_label(value: float) -> str:
    """A duration for people: 850 ms, 4.2 s, 3.5 min, 1.2 h."""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _frame(title: str, top_label: str, series: Sequence[Minute], body: list[str]) -> Markup:
    plot_w = WIDTH - LEFT - RIGHT
    base = HEIGHT - BOTTOM
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<line class="axis" x1="{LEFT}" y1="{base}" x2="{LEFT + plot_w}" y2="{base}"/>',
        f'<line class="grid" x1="{LEFT}" y1="{TOP}" x2="{LEFT + plot_w}" y2="{TOP}"/>',
        f'<text class="label" x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">'
        f"{escape(top_label)}</text>",
        f'<text class="label" x="{LEFT - 4}" y="{base}" text-anchor="end">0</text>',
    ]
    if series:
        ticks = [(0, series[0].start), (len(series) // 2, series[len(series) // 2].start)]
        ticks.append((len(series) - 1, series[-1].start))
        step = plot_w / len(series)
        for index, start in ticks:
            x = LEFT + index * step + step / 2
            parts.append(
                f'<text class="label" x="{x:.1f}" y="{HEIGHT - 6}" text-anchor="middle">'
                f"{_clock(start)}</text>"
            )
    parts.extend(body)
    parts.append("</svg>")
    return Markup("".join(parts))


def throughput_chart(series: Sequence[Minute]) -> Markup:
    """Stacked bars: jobs that ended succeeded, failed and cancelled in each minute (UTC)."""
    peak = max((m.ended for m in series), default=0)
    scale_top = max(peak, 1)
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    base = HEIGHT - BOTTOM
    step = plot_w / max(len(series), 1)
    body: list[str] = []
    for i, m in enumerate(series):
        if not m.ended:
            continue
        x = LEFT + i * step + 0.5
        w = max(step - 1, 1)
        y = float(base)
        tip = (
            f"{_clock(m.start)} UTC: {m.succeeded} succeeded, {m.failed} failed, "
            f"{m.cancelled} cancelled"
        )
        body.append(f"<g><title>{escape(tip)}</title>")
        for kind, value in (
            ("succeeded", m.succeeded),
            ("failed", m.failed),
            ("cancelled", m.cancelled),
        ):
            if not value:
                continue
            h = value / scale_top * plot_h
            y -= h
            body.append(
                f'<rect class="bar {kind}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" '
                f'height="{h:.1f}"/>'
            )
        body.append("</g>")
    title = f"Jobs ended per minute, last {len(series)} minutes (peak {peak})"
    return _frame(title, str(peak), series, body)


def wait_chart(series: Sequence[Minute]) -> Markup:
    """Bars: the mean wait (run_at to start) of the jobs that ended in each minute."""
    peak = max((m.wait for m in series if m.wait is not None), default=0.0)
    scale_top = peak if peak > 0 else 1.0
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    base = HEIGHT - BOTTOM
    step = plot_w / max(len(series), 1)
    body: list[str] = []
    for i, m in enumerate(series):
        if m.wait is None:
            continue
        x = LEFT + i * step + 0.5
        w = max(step - 1, 1)
        h = max(m.wait / scale_top * plot_h, 1.0)
        tip = f"{_clock(m.start)} UTC: mean wait {seconds_label(m.wait)}"
        body.append(
            f'<rect class="bar wait" x="{x:.1f}" y="{base - h:.1f}" width="{w:.1f}" '
            f'height="{h:.1f}"><title>{escape(tip)}</title></rect>'
        )
    title = f"Mean wait per minute, last {len(series)} minutes (peak {seconds_label(peak)})"
    return _frame(title, seconds_label(peak) if peak else "0", series, body)
