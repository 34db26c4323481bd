"""The comparison's report: Markdown tables (machine, versions, medians, ratios, targets) for
``docs/benchmarks.md``, and the chart. Used by ``compare.py`` only, in the peers' main
environment (matplotlib is imported when the chart is drawn)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from ._stats import advantage, median

BEGIN = "<!-- compare.py: begin -->"
END = "<!-- compare.py: end -->"
SAME_STORE = {
    "Redis": "backlane-redis",
    "SQLite": "backlane-sqlite",
    "PostgreSQL": "backlane-postgres",
}
MB = 2**20


def machine(**extra: Any) -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30),
        "kernel": platform.release(),
        "load_end": os.getloadavg(),
        **extra,
    }


# -- formatting -----------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _med(system: dict[str, Any], key: str, sub: str | None = None) -> float | None:
    values = system.get(key)
    if sub is not None and isinstance(values, dict):
        values = values.get(sub)
    return median(values or [])


def _rss(pair: Any) -> float | None:
    return None if not pair else pair[0] / MB


# -- the tables -----------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    systems: dict[str, dict[str, Any]] = results["systems"]
    exercise: dict[str, dict[str, Any]] = results["exercise"]
    out: list[str] = []
    runs = meta["runs"]
    load = ", ".join(f"{v:.2f}" for v in meta.get("load_start", ())) or "-"
    load_end = ", ".join(f"{v:.2f}" for v in meta["load_end"])
    out.append(
        f"Measured {meta['date']} on {meta['cpu']}, {meta['cores']} cores, "
        f"{meta['memory_gib']} GiB, Linux {meta['kernel']}; Python {meta.get('python', '?')}, "
        f"Redis {meta.get('redis', '?')}, PostgreSQL {meta.get('postgres', '?')}. "
        f"{'Quick run' if meta['quick'] else 'Full run'}: median of {runs} run"
        f"{'s' if runs != 1 else ''} per figure, {meta['took'] / 60:.1f} min in all; "
        f"load average (1, 5, 15 min) {load} at the start, {load_end} at the end."
    )
    if "redis_ping_ms" in meta:
        out.append("")
        out.append(
            f"One round trip here: a Redis PING {meta['redis_ping_ms']:.3f} ms, a one-row "
            f"PostgreSQL commit {meta['pg_commit_ms']:.3f} ms (medians)."
        )
    if exercise:
        out += ["", "#### The guide's exercise: 100 concurrent requests, each adding one task", ""]
        out.append(
            "| set-up | durable | sleep: reply p50 ms | p99 ms | all done s "
            "| CPU: reply p50 ms | p99 ms | all done s |"
        )
        out.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, row in exercise.items():
            if row.get("error"):
                out.append(f"| {name} | | failed: {row['error']} | | | | | |")
                continue
            cells = []
            for path in ("sleep", "cpu"):
                runs_ = row[path]
                cells += [
                    _ms(median(runs_.get("p50", []))),
                    _ms(median(runs_.get("p99", []))),
                    _num(median(runs_.get("done", [])), 2),
                ]
            durable = "yes" if row.get("durable", True) else "no"
            out.append(f"| {name} | {durable} | " + " | ".join(cells) + " |")
    if systems:
        out += ["", "#### No-op jobs (each does one Redis INCR)", ""]
        out.append(
            "| system | version | store | drain, 1 process (jobs/s) | drain, 2 processes "
            "| enqueue, one call per job (/s) | enqueue, batched (/s) "
            "| start latency p50 ms | p99 ms | RSS idle MB (processes) | RSS after jobs MB "
            "| worker CPU per job, us |"
        )
        out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, s in systems.items():
            info = s.get("info") or {}
            if s.get("error"):
                version = info.get("version", "")
                out.append(f"| {name} | {version} | {info.get('store', '')} | failed: "
                           f"{s['error']} | | | | | | | | |")  # fmt: skip
                continue
            idle = s.get("rss_idle")
            after = s.get("rss_after")
            idle_cell = "-" if not idle else f"{idle[0] / MB:.0f} ({idle[1]})"
            after_cell = "-" if not after else f"{after[0] / MB:.0f} after {s['soaked']:,}"
            rate = s.get("latency_rate") or 0
            slower = f" (at {rate:.0f}/s)" if rate and rate < meta["plan"]["rate"] else ""
            out.append(
                f"| {name} | {info.get('version', '')} | {info.get('store', '')} "
                f"| {_num(_med(s, 'drain', '1'))} | {_num(_med(s, 'drain', '2'))} "
                f"| {_num(_med(s, 'enqueue'))} | {_num(_med(s, 'enqueue_batch'))} "
                f"| {_ms(_med(s, 'p50_ms'))}{slower} | {_ms(_med(s, 'p99_ms'))} "
                f"| {idle_cell} | {after_cell} | {_num(_med(s, 'cpu_us', '1'))} |"
            )
        out += ratios(systems)
        out += settings(systems)
    out += targets(results)
    for name, why in (results.get("skipped") or {}).items():
        out.append(f"\n*{name} not measured: {why}.*")
    return "\n".join(out) + "\n"


def ratios(systems: dict[str, dict[str, Any]]) -> list[str]:
    out = ["", "#### backlane against each peer, on the same kind of store", ""]
    out.append(
        "How many times better backlane's figure is than the peer's (higher throughput, lower "
        "latency or memory); below 1x backlane is behind."
    )
    out.append("")
    out.append(
        "| peer | against | drain, 1 process | drain, 2 processes | enqueue | batched "
        "| start p50 | start p99 | RSS idle |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in systems.items():
        info = s.get("info") or {}
        ours = SAME_STORE.get(info.get("store", ""))
        if name.startswith("backlane") or s.get("error") or ours not in systems:
            continue
        b = systems[ours]
        if b.get("error"):
            continue
        cells = [
            advantage(_med(b, "drain", "1"), _med(s, "drain", "1"), higher_is_better=True),
            advantage(_med(b, "drain", "2"), _med(s, "drain", "2"), higher_is_better=True),
            advantage(_med(b, "enqueue"), _med(s, "enqueue"), higher_is_better=True),
            advantage(_med(b, "enqueue_batch"), _med(s, "enqueue_batch"), higher_is_better=True),
            advantage(_med(b, "p50_ms"), _med(s, "p50_ms"), higher_is_better=False),
            advantage(_med(b, "p99_ms"), _med(s, "p99_ms"), higher_is_better=False),
            advantage(_rss(b.get("rss_idle")), _rss(s.get("rss_idle")), higher_is_better=False),
        ]
        out.append(f"| {name} | {ours} | " + " | ".join(_x(c) for c in cells) + " |")
    return out


def settings(systems: dict[str, dict[str, Any]]) -> list[str]:
    out = ["", "#### Set-ups", ""]
    out.append(
        "| system | how its workers run | batch enqueue | jobs per drain (1 / 2 processes) "
        "| load average when its turn began |"
    )
    out.append("|---|---|---|---|---:|")
    for name, s in systems.items():
        info = s.get("info") or {}
        jobs = s.get("drain_jobs") or {}
        out.append(
            f"| {name} | {info.get('settings', '')} | {info.get('batch') or '-'} "
            f"| {_num(jobs.get('1'))} / {_num(jobs.get('2'))} | {s.get('load', 0):.1f} |"
        )
    return out


# -- the targets --------------------------------------------------------------------


def _partly(oks: list[bool]) -> bool | str:
    """True when every backlane set-up meets a target, False when none does."""
    if all(oks):
        return True
    return "partly" if any(oks) else False


def targets(results: dict[str, Any]) -> list[str]:
    systems: dict[str, dict[str, Any]] = results["systems"]
    exercise: dict[str, dict[str, Any]] = results["exercise"]
    rows: list[tuple[str, str, bool | str | None]] = []

    def ok(s: str) -> dict[str, Any] | None:
        found = systems.get(s)
        return None if not found or found.get("error") else found

    redis = ok("backlane-redis")
    if redis:
        peers2 = {
            n: _med(s, "drain", "2")
            for n, s in systems.items()
            if not n.startswith("backlane") and not s.get("error")
        }
        best_name, best = max(peers2.items(), key=lambda kv: kv[1] or 0, default=("-", None))
        ours = _med(redis, "drain", "2")
        ratio = advantage(ours, best, higher_is_better=True)
        rows.append(
            (
                "Redis: no-op drain, 2 processes ≥ 1.5x the best peer and ≥ 9,000/s",
                f"{_num(ours)}/s = {_x(ratio)} {best_name} ({_num(best)}/s)",
                None if ratio is None or ours is None else ratio >= 1.5 and ours >= 9000,
            )
        )
        p50, p99 = _med(redis, "p50_ms"), _med(redis, "p99_ms")
        others = [_med(s, "p50_ms") for n, s in systems.items() if n != "backlane-redis"
                  and not s.get("error")]  # fmt: skip
        lowest = min((v for v in others if v is not None), default=None)
        rows.append((
            "Redis: enqueue-to-start p50/p99 ≤ 0.5/1.0 ms, the lowest of all",
            f"{_ms(p50)} / {_ms(p99)} ms (lowest other p50 {_ms(lowest)} ms)",
            None if p50 is None or p99 is None else
            p50 <= 0.5 and p99 <= 1.0 and (lowest is None or p50 <= lowest),
        ))  # fmt: skip
        one, batch = _med(redis, "enqueue"), _med(redis, "enqueue_batch")
        rows.append(
            (
                "Redis: single-client enqueue ≥ 15,000/s, batched ≥ 100,000/s",
                f"{_num(one)}/s, batched {_num(batch)}/s",
                None if one is None or batch is None else one >= 15000 and batch >= 100000,
            )
        )
    sqlite, huey = ok("backlane-sqlite"), ok("huey-sqlite")
    if sqlite and huey:
        cells = []
        met = True
        for n in ("1", "2"):
            r = advantage(_med(sqlite, "drain", n), _med(huey, "drain", n), higher_is_better=True)
            cells.append(f"{n} process{'es' if n == '2' else ''}: {_x(r)}")
            met = met and r is not None and r >= 2
        rows.append(("SQLite: ≥ 2x Huey's SQLite throughput", "; ".join(cells), met))
    pg, proc = ok("backlane-postgres"), ok("procrastinate")
    if pg and proc:
        r = advantage(_med(pg, "drain", "2"), _med(proc, "drain", "2"), higher_is_better=True)
        p99 = _med(pg, "p99_ms")
        rows.append(
            (
                "PostgreSQL: ≥ 3x Procrastinate's throughput, p99 ≤ 3 ms",
                f"{_x(r)} (2 processes); p99 {_ms(p99)} ms",
                None if r is None or p99 is None else r >= 3 and p99 <= 3,
            )
        )
    base = exercise.get("BackgroundTasks")
    celery = exercise.get("Celery")
    ours_apps = {
        n: e for n, e in exercise.items() if n.startswith("backlane") and not e.get("error")
    }
    if ours_apps and base and not base.get("error"):
        b50 = median(base["sleep"].get("p50", []))
        cells, oks = [], []
        for n, e in ours_apps.items():
            p50 = median(e["sleep"].get("p50", []))
            r = None if p50 is None or not b50 else p50 / b50
            cells.append(f"{n} {_x(r)}")
            oks.append(r is not None and r <= 1.3)
        met = _partly(oks)
        rows.append((f"Exercise: drop-in reply p50 within 1.3x of BackgroundTasks' ({_ms(b50)} ms)",
                     "; ".join(cells), met))  # fmt: skip
        cells, oks = [], []
        for n, e in ours_apps.items():
            done = median(e["sleep"].get("done", []))
            cells.append(f"{n} {_num(done, 2)} s")
            oks.append(done is not None and done <= 0.5)
        met = _partly(oks)
        rows.append(("Exercise: all 100 sleep tasks done within 0.5 s", "; ".join(cells), met))
    if ours_apps and celery and not celery.get("error"):
        c50 = median(celery["cpu"].get("p50", []))
        cells, oks = [], []
        for n, e in ours_apps.items():
            p50 = median(e["cpu"].get("p50", []))
            done = median(e["cpu"].get("done", []))
            cells.append(f"{n} p50 {_ms(p50)} ms, done {_num(done, 2)} s")
            oks.append(
                p50 is not None and c50 is not None and p50 <= c50
                and done is not None and done <= 1.3
            )  # fmt: skip
        rows.append(
            (
                f"Exercise, CPU task: replies no slower than Celery's (p50 {_ms(c50)} ms), "
                "all done within 1.3 s",
                "; ".join(cells),
                _partly(oks),
            )
        )
    idle = {n: _rss(s.get("rss_idle")) for n, s in systems.items()
            if n.startswith("backlane") and not s.get("error")}  # fmt: skip
    if idle:
        rows.append(
            (
                "Idle worker memory ≤ 40 MB RSS",
                "; ".join(f"{n} {_num(v)} MB" for n, v in idle.items()),
                _partly([v is not None and v <= 40 for v in idle.values()]),
            )
        )
    if not rows:
        return []
    out = ["", "#### The issue's targets, as measured in this run", ""]
    out.append("| target | measured | met |")
    out.append("|---|---|---|")
    for target, measured, met in rows:
        mark = {None: "-", True: "yes", False: "**no**"}.get(met, met)
        out.append(f"| {target} | {measured} | {mark} |")
    return out


# -- writing --------------------------------------------------------------------------------


def write_doc(path: Path, text: str) -> None:
    """Put ``text`` between the markers of ``path`` (appending the markers if missing)."""
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        updated = head + block + tail
    else:
        updated = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(updated)


def chart(results: dict[str, Any], path: Path) -> None:
    """Six panels: drain, enqueue, start latency, memory, and the exercise's two tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = {n: s for n, s in results["systems"].items() if not s.get("error")}
    exercise = {n: e for n, e in results["exercise"].items() if not e.get("error")}
    fig, axes = plt.subplots(3, 2, figsize=(13, 14))
    ours, theirs = "#1f6feb", "#9aa4ae"

    def panel(ax: Any, title: str, names: list[str], series: list[tuple[str, list[Any]]],
              log: bool = False, unit: str = "") -> None:  # fmt: skip
        import numpy as np

        y = np.arange(len(names))
        height = 0.8 / max(1, len(series))
        for i, (label, values) in enumerate(series):
            vals = [v if v is not None else 0 for v in values]
            colors = [ours if n.startswith("backlane") else theirs for n in names]
            alpha = 1.0 if i == 0 else 0.55
            bars = ax.barh(y + i * height, vals, height, color=colors, alpha=alpha, label=label)
            for bar, v in zip(bars, values, strict=True):
                if v:
                    text = f"{v:,.0f}" if v >= 10 else f"{v:.2f}"
                    ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {text}",
                            va="center", fontsize=7)  # fmt: skip
        ax.set_yticks(y + height * (len(series) - 1) / 2)
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(unit, fontsize=8)
        from matplotlib.patches import Patch

        shades = [Patch(color="#555555", alpha=1.0 if i == 0 else 0.55, label=label)
                  for i, (label, _) in enumerate(series)]  # fmt: skip
        ax.legend(handles=shades, fontsize=7, loc="best")
        ax.margins(x=0.18)

    names = list(systems)
    panel(axes[0][0], "No-op drain (higher is better)", names, [
        ("1 process", [_med(systems[n], "drain", "1") for n in names]),
        ("2 processes", [_med(systems[n], "drain", "2") for n in names]),
    ], unit="jobs/s")  # fmt: skip
    panel(axes[0][1], "Enqueue from one client (higher is better)", names, [
        ("one call per job", [_med(systems[n], "enqueue") for n in names]),
        ("batched", [_med(systems[n], "enqueue_batch") for n in names]),
    ], log=True, unit="jobs/s, log scale")  # fmt: skip
    panel(axes[1][0], "Enqueue-to-start at 200 jobs/s, 2 processes (lower is better)", names, [
        ("p50", [_med(systems[n], "p50_ms") for n in names]),
        ("p99", [_med(systems[n], "p99_ms") for n in names]),
    ], log=True, unit="ms, log scale")  # fmt: skip
    panel(axes[1][1], "Worker memory, 1 process set-up (lower is better)", names, [
        ("idle", [_rss(systems[n].get("rss_idle")) for n in names]),
        ("after the soak", [_rss(systems[n].get("rss_after")) for n in names]),
    ], unit="MB RSS, all processes")  # fmt: skip
    apps = list(exercise)
    for col, path_ in enumerate(("sleep", "cpu")):
        task = "100 ms async sleep" if path_ == "sleep" else "~20 ms CPU"
        panel(axes[2][col], f"Guide's exercise, {task}: 100 concurrent requests", apps, [
            ("reply p50 (ms)", [median(exercise[a][path_].get("p50", [])) for a in apps]),
            ("all done (ms)",
             [(median(exercise[a][path_].get("done", [])) or 0) * 1000 for a in apps]),
        ], log=True, unit="ms, log scale")  # fmt: skip
    meta = results["meta"]
    fig.suptitle(
        f"backlane (blue) and its peers - {meta['cpu']}, {meta['cores']} cores, {meta['date']}"
        f" (median of {meta['runs']})",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
