"""Charts of ``pairvol bench`` reports: ``tools/bench --plot DIR`` after a run, or
``--plot DIR --from REPORT...`` from saved reports (docs/benchmarks.md, "Charts").

Theory of operation.  A report (the JSON document a suite writes) is first read into plain
chart descriptions by pure functions (:func:`charts_of`), tested without matplotlib:

* a :class:`SpreadChart` is bars in groups along x: each bar (:class:`Spread`) is a median,
  drawn over every round's own value as points, with an optional goal tick; the ratios per
  workload (base suite: pairvol / file; replicated suites: sync and async / unrepl, and the
  full resync / nbdcopy), the failover times per mode, the takeover's time to ready and its
  pull / nbdcopy per backlog size;
* a :class:`LagChart` is the async suite's journal lag samples over time, one line per lag
  run (fio at half the pair's sustained rate).

A report without what a chart needs gives a note instead of that chart (for example a sync
report has no lag trace).  Then :func:`figure_of` draws each description with matplotlib's
object API (``Figure`` on an Agg canvas: no pyplot, no global state, no display) and
:func:`plot` writes the PNGs.  matplotlib is imported here only, and only when a figure is
drawn: the node, the plugin and every other command never load it.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairvol import bench, bench_failover, bench_takeover
from replicator.errors import ExternalCommandFailed, NotFound, UsageError
from replicator.sizes import format_size

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
SIZE = (8.0, 4.5)  # inches: 800 x 450 pixels at DPI
#: One colour per bar label, in the order labels first appear (matplotlib's default cycle).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
ROUNDS_GID = "rounds"  # the points of every round (tests find them by this gid)
GOAL_GID = "goal"
REFERENCE_STYLES = (":", "-.", "--")  # at most three reference lines per chart


# -- chart descriptions (pure) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spread:
    """One bar: ``median`` over ``rounds`` (each round's own value, drawn as points) in x
    group ``group``; ``label`` names its kind in the legend."""

    group: str
    label: str
    median: float
    rounds: tuple[float, ...] = ()
    goal: float | None = None  # drawn as a dashed tick across the bar


@dataclass(frozen=True, slots=True)
class Reference:
    """A horizontal line across the chart (the baseline's 1.0, a target)."""

    value: float
    label: str


@dataclass(frozen=True, slots=True)
class SpreadChart:
    name: str  # the PNG's file name without .png
    title: str
    ylabel: str
    bars: tuple[Spread, ...]
    references: tuple[Reference, ...] = ()
    source: str = ""  # what run made it, printed under the chart


@dataclass(frozen=True, slots=True)
class LagTrace:
    label: str
    t: tuple[float, ...]  # seconds since fio started
    lag_ms: tuple[float, ...]
    entries: tuple[int, ...]
    skip_s: float  # the ramp the report's percentiles leave out


@dataclass(frozen=True, slots=True)
class LagChart:
    name: str
    title: str
    traces: tuple[LagTrace, ...]
    source: str = ""


Chart = SpreadChart | LagChart


@dataclass
class Charts:
    """What a report gives: its charts, and a note for each chart it cannot give."""

    charts: list[Chart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def source_of(doc: Mapping[str, Any]) -> str:
    """One line: suite, commit, start time, rounds, and the machine's load before and after."""
    m = doc.get("machine") or {}
    cfg = doc.get("config") or {}
    parts = [f"suite {doc.get('suite')}", str(m.get("git_commit", "commit unknown"))]
    parts.append(str(doc.get("started", "?"))[:16].replace("T", " "))
    if "rounds" in cfg:
        parts.append(f"{cfg['rounds']} round(s)")
    if "kills" in cfg:
        parts.append(f"{cfg['kills']} kill(s), {cfg.get('switchovers', 0)} switchover(s)")
    load = [x for x in (m.get("loadavg"), m.get("loadavg_end")) if x]
    if load:
        parts.append("load " + " to ".join(f"{x[0]:.1f}" for x in load))
    if m.get("cpus_usable"):
        parts.append(f"{m['cpus_usable']} cores")
    return ", ".join(parts)


def _ratio_bars(part: Mapping[str, Any]) -> list[Spread]:
    """One bar per (workload, target) of a summary: the median ratio to the baseline."""
    baseline = part["baseline"]
    order = [t["name"] for t in part.get("targets") or []]
    bars = []
    for row in part["summary"]:
        ratios = row["ratio"]
        for target in sorted(ratios, key=lambda t: order.index(t) if t in order else len(order)):
            ratio = ratios[target]
            goal = (row.get("goals") or {}).get(target, row["goal"])
            rounds = tuple(float(x) for x in (row.get("round_ratios") or {}).get(target, []))
            # Since schema 3 the async figure is the end-to-end rate (applied on b), not fio's.
            what = f"{target} end to end" if target == "async" and "objectives" in part else target
            bars.append(Spread(row["workload"], f"{what} / {baseline}", ratio, rounds, goal))
    return bars


def fio_charts(doc: Mapping[str, Any]) -> Charts:
    """The base and replicated suites: ratios per workload, and the async lag trace."""
    out, source = Charts(), source_of(doc)
    if doc["summary"]:
        out.charts.append(
            SpreadChart(
                "ratios-base",
                "pairvol plugin / nbdkit file plugin, per workload",
                "ratio of medians (bar), per round (points)",
                tuple(_ratio_bars(doc)),
                (Reference(1.0, "= file plugin"),),
                source,
            )
        )
    rep = doc.get("replicated")
    if rep:
        bars = _ratio_bars(rep)
        copies = (rep.get("resync") or {}).get("summary") or {}
        if copies:
            rounds = tuple(float(x) for x in copies.get("round_ratios", []))
            bars.append(
                Spread("full resync", "resync / nbdcopy", copies["ratio"], rounds, copies["goal"])
            )
        out.charts.append(
            SpreadChart(
                "ratios-replicated",
                "replicated / unreplicated volume (same node), per workload",
                "ratio of medians (bar), per round (points)",
                tuple(bars),
                (Reference(1.0, "= unreplicated"),),
                source,
            )
        )
    traces = [lag_trace(r) for r in (rep or {}).get("lag") or [] if r.get("trace")]
    if traces:
        out.charts.append(
            LagChart(
                "async-lag",
                "async journal lag while fio writes at half the sustained rate",
                tuple(traces),
                source,
            )
        )
    else:
        out.notes.append("no async lag trace (only the async suite records one): no async-lag")
    return out


def lag_trace(r: Mapping[str, Any]) -> LagTrace:
    cols = list(r.get("trace_columns") or ["t", "lag_seconds", "lag_entries"])
    t, lag, entries = (cols.index(c) for c in ("t", "lag_seconds", "lag_entries"))
    unit = "IOPS" if r["metric"] == "iops" else "MiB/s"
    label = f"{r['workload']} at {r['rate']:.0f} {unit}"
    if "sustained" in r:
        label += f" (half of {r['sustained']['rate']:.0f} end to end)"
    rows = r["trace"]
    return LagTrace(
        label,
        tuple(float(s[t]) for s in rows),
        tuple(float(s[lag]) * 1000 for s in rows),
        tuple(int(s[entries]) for s in rows),
        float(r.get("skip_s", 0.0)),
    )


def _times(rounds: Sequence[Mapping[str, Any]], key: str) -> tuple[float, ...]:
    return tuple(float(r[key]) for r in rounds if r.get(key) is not None)


def failover_charts(doc: Mapping[str, Any]) -> Charts:
    """The failover suite: per mode, SIGKILL to the first write, and planned switchovers."""
    out, bars = Charts(), []
    modes = doc["modes"]
    order = [m for m in (doc.get("config") or {}).get("modes", []) if m in modes]
    for mode in [*order, *(m for m in modes if m not in order)]:
        m = modes[mode]
        kinds = [("SIGKILL of the active host", m["rounds"])]
        if m["switchover"]["available"]:
            kinds.append(("planned switchover", m["switchover"]["rounds"]))
        for label, rounds in kinds:
            times = _times(rounds, "write_s")
            if times:
                bars.append(Spread(mode, label, statistics.median(times), times))
            else:
                out.notes.append(f"{mode}: no {label} reached a write")
    if not bars:
        out.notes.append("no failover was timed: no failover chart")
        return out
    target = float(doc.get("target_median_s", bench_failover.TARGET_MEDIAN_S))
    refs = [Reference(target, f"target: median under {target:g} s")]
    expiry = (doc.get("settings") or {}).get("expected_lease_expiry") or {}
    if "median_s" in expiry:
        refs.append(Reference(float(expiry["median_s"]), "lease gone (expected median)"))
    out.charts.append(
        SpreadChart(
            "failover",
            "failover: until the first write is acknowledged on the new active",
            "seconds (median bar, every round a point)",
            tuple(bars),
            tuple(refs),
            source_of(doc),
        )
    )
    return out


def takeover_charts(doc: Mapping[str, Any]) -> Charts:
    """The takeover suite: time to ready per backlog, and the pull against nbdcopy."""
    out, source = Charts(), source_of(doc)
    ready = [
        Spread(
            f"{format_size(r['size'])} backlog",
            "time to ready",
            float(r["ready_s"]) * 1000,
            tuple(float(x) * 1000 for x in r.get("ready_per_round", [])),
        )
        for r in doc["ready"]["summary"]
        if r.get("n")
    ]
    if ready:
        target = bench_takeover.READY_TARGET_S * 1000
        out.charts.append(
            SpreadChart(
                "takeover-ready",
                "takeover of an async secondary: time to ready per backlog",
                "milliseconds (median bar, every round a point)",
                tuple(ready),
                (Reference(target, f"target: under {target:g} ms"),),
                source,
            )
        )
    else:
        out.notes.append("no takeover round succeeded: no takeover-ready")
    goal = bench_takeover.HYDRATION_GOAL
    pulls = [
        Spread(
            f"{format_size(h['size'])} backlog",
            "pull / nbdcopy",
            float(h["ratio"]),
            tuple(float(x) for x in h.get("round_ratios", [])),
            goal,
        )
        for h in doc["hydration"]["summary"]
        if h.get("n") and h.get("ratio") is not None
    ]
    if pulls:
        out.charts.append(
            SpreadChart(
                "takeover-hydration",
                "after a takeover: the background pull against nbdcopy, per backlog",
                "ratio of medians (bar), per round (points)",
                tuple(pulls),
                (Reference(1.0, "= nbdcopy"),),
                source,
            )
        )
    else:
        out.notes.append("no pull was timed against nbdcopy: no takeover-hydration")
    return out


def charts_of(doc: Mapping[str, Any], where: str = "report") -> Charts:
    """The charts of one report (any suite's); one :class:`UsageError` if it is not one."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("suite"), str):
        raise UsageError(f"{where}: not a pairvol bench report (no suite)")
    suite = doc["suite"]
    try:
        if suite == bench_failover.SUITE:
            found = failover_charts(doc)
        elif suite == bench_takeover.SUITE:
            found = takeover_charts(doc)
        elif suite in bench.SUITES:
            found = fio_charts(doc)
        else:
            raise UsageError(f"{where}: unknown suite {suite!r}")
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise UsageError(
            f"{where}: not a {suite} report as pairvol bench writes it: {what}"
        ) from None
    found.notes = [f"{where}: {n}" for n in found.notes]
    return found


def load_report(path: Path) -> dict[str, Any]:
    """A saved report; :class:`NotFound` or one :class:`UsageError` line if it is not one."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotFound(f"--from {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--from {path}: cannot read it: {e}") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--from {path}: not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"--from {path}: not a pairvol bench report (no suite)")
    return doc


# -- drawing (matplotlib, imported here only) ------------------------------------------------


def check_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ExternalCommandFailed("--plot needs matplotlib: install python3-matplotlib")


def check_output(directory: Path) -> None:
    """Before a run: matplotlib is there and ``directory`` is (or can become) a directory."""
    check_matplotlib()
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--plot {directory}: not a directory")
    parent = next((p for p in directory.absolute().parents if p.exists()), None)
    if not directory.exists() and parent is not None and not parent.is_dir():
        raise UsageError(f"--plot {directory}: {parent} is not a directory")


def _new_figure(rows: int = 1) -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(SIZE[0], SIZE[1] * (1.0 if rows == 1 else 1.4)), dpi=DPI)
    FigureCanvasAgg(fig)  # the non-interactive Agg canvas: PNG only, no display
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _finish(fig: Figure, title: str, source: str) -> None:
    fig.suptitle(title, fontsize=11)
    if source:
        fig.text(0.01, 0.01, source, fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))


def spread_figure(chart: SpreadChart) -> Figure:
    """Bars in groups, each over its rounds' points; references as horizontal lines."""
    fig, (ax,) = _new_figure()
    groups = list(dict.fromkeys(b.group for b in chart.bars))
    labels = list(dict.fromkeys(b.label for b in chart.bars))
    colour = {lab: COLOURS[i % len(COLOURS)] for i, lab in enumerate(labels)}
    width = 0.8 / max(sum(1 for b in chart.bars if b.group == g) for g in groups)
    shown: set[str] = set()
    top = 0.0
    for gx, g in enumerate(groups):
        mine = [b for b in chart.bars if b.group == g]
        for i, b in enumerate(mine):
            x = gx + (i - (len(mine) - 1) / 2) * width
            legend = b.label if b.label not in shown else "_nolegend_"
            shown.add(b.label)
            ax.bar(x, b.median, width * 0.9, color=colour[b.label], alpha=0.75, label=legend)
            ax.annotate(f"{b.median:.3g}", (x, 0), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 3), textcoords="offset points")  # fmt: skip
            if b.rounds:
                ax.scatter([x] * len(b.rounds), b.rounds, s=14, color="black", zorder=3,
                           gid=ROUNDS_GID)  # fmt: skip
            if b.goal is not None:
                ax.hlines(b.goal, x - width * 0.45, x + width * 0.45, colors="#d62728",
                          linestyles="dashed", gid=GOAL_GID)  # fmt: skip
            top = max(top, b.median, *b.rounds, b.goal or 0.0)
    highest = top
    for r, style in zip(chart.references, REFERENCE_STYLES, strict=False):
        if r.value <= 2.5 * top:  # a target far above every bar would flatten them
            ax.axhline(r.value, color="#555555", linewidth=0.9, linestyle=style, label=r.label)
            highest = max(highest, r.value)
        else:
            ax.plot([], [], " ", label=f"{r.label} (off the scale)")
    if any(b.goal is not None for b in chart.bars):
        ax.plot([], [], color="#d62728", linestyle="dashed", label="goal")
    ax.plot([], [], "o", color="black", markersize=4, label="one round")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(chart.ylabel, fontsize=9)
    ax.set_ylim(0, highest * 1.2 if highest > 0 else 1.0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _finish(fig, chart.title, chart.source)
    return fig


def lag_figure(chart: LagChart) -> Figure:
    """Lag in milliseconds (top) and unapplied entries (bottom) over time, a line per run."""
    fig, (top, bottom) = _new_figure(rows=2)
    skip = max(t.skip_s for t in chart.traces)
    for i, tr in enumerate(chart.traces):
        c = COLOURS[i % len(COLOURS)]
        top.plot(tr.t, tr.lag_ms, marker=".", color=c, label=tr.label)
        bottom.plot(tr.t, tr.entries, marker=".", color=c, label=tr.label)
    for ax in (top, bottom):
        ax.axvspan(0, skip, color="#cccccc", alpha=0.4, label="ramp (left out of p50/p99)")
        ax.grid(alpha=0.3)
    highest = max((x for tr in chart.traces for x in tr.lag_ms), default=0.0)
    top.set_ylim(0, highest * 1.5 if highest > 0 else 1.0)  # room for the legend
    bottom.set_ylim(bottom=0)
    top.set_ylabel("lag (ms)", fontsize=9)
    bottom.set_ylabel("entries unapplied", fontsize=9)
    bottom.set_xlabel("seconds since fio started", fontsize=9)
    top.legend(fontsize=8, loc="best", framealpha=0.8)
    _finish(fig, chart.title, chart.source)
    return fig


def figure_of(chart: Chart) -> Figure:
    return spread_figure(chart) if isinstance(chart, SpreadChart) else lag_figure(chart)


@dataclass
class Plotted:
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plot(reports: Sequence[tuple[str, Mapping[str, Any]]], directory: Path) -> Plotted:
    """Write the PNGs of every ``(where, report)`` into ``directory``; two reports that make
    the same chart are refused (plot them into two directories)."""
    check_output(directory)
    found: dict[str, tuple[str, Chart]] = {}
    out = Plotted()
    for where, doc in reports:
        got = charts_of(doc, where)
        out.notes += got.notes
        for c in got.charts:
            if c.name in found:
                raise UsageError(
                    f"{found[c.name][0]} and {where} both make {c.name}.png: plot them into "
                    "two directories"
                )
            found[c.name] = (where, c)
    if not found:
        raise UsageError("nothing to chart: " + "; ".join(out.notes))
    directory.mkdir(parents=True, exist_ok=True)
    for name, (_where, chart) in found.items():
        path = directory / f"{name}.png"
        tmp = directory / f".{name}.png.tmp"
        try:
            figure_of(chart).savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
            tmp.replace(path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ExternalCommandFailed(f"--plot: cannot write {path}: {e.strerror}") from None
        out.written.append(path)
    return out
