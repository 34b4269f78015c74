"""``tools/bench --plot DIR`` and ``--plot DIR --from REPORT``: charts of bench reports.

Small synthetic reports, made by the suites' own summary functions, are drawn; the tests
count what matplotlib drew (bars, points, lines) on the figures and check the PNGs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import require_programs

from pairvol import bench, bench_plot, bench_takeover
from pairvol.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MACHINE = {"git_commit": "abc1234", "loadavg": [0.5, 0.4, 0.3], "loadavg_end": [1.5, 1.0, 1.0],
           "cpus_usable": 2}  # fmt: skip
MODES = ("sync", "async")
ROUNDS = 3


def sample(rnd: int, workload: str, target: str, iops: float) -> bench.Sample:
    return bench.Sample(rnd, workload, target, bench.Measurement(iops, iops / 256, 1.0, 2.0, 1))


def lag_run(workload: str, samples: int) -> dict[str, Any]:
    return {
        "workload": workload,
        "metric": "iops" if workload.endswith("4k") else "mib_s",
        "rate": 500.0,
        "skip_s": 0.5,
        "sustained": {"rate": 1000.0},
        "trace_columns": ["t", "lag_seconds", "lag_entries", "newest_seq", "applied_seq"],
        "trace": [[i * 0.25, 0.001 * i, i, 10 + i, 10] for i in range(samples)],
    }


def replicated_report(modes: tuple[str, ...] = MODES, *, lag: bool = True) -> dict[str, Any]:
    """A replicated-suite report as :func:`pairvol.bench.report` writes it."""
    workloads = bench.replicated_workloads(bench.WORKLOADS)
    names = [*modes, bench.UNREPLICATED]
    samples = [
        sample(rnd, w.name, t, 1000.0 if t == bench.UNREPLICATED else 300.0 + 100 * rnd)
        for rnd in range(ROUNDS)
        for w in workloads
        for t in names
    ]
    rows = bench.summarize(samples, workloads, names, {m: bench.MODE_GOALS[m] for m in modes})
    copies = [
        bench.CopySample(rnd, method, 1 << 20, 1.0 + (rnd if method == "resync" else 0))
        for rnd in range(ROUNDS)
        for method in bench.COPY_METHODS
    ]
    rep = {
        "baseline": bench.UNREPLICATED,
        "targets": [{"name": n} for n in names],
        "samples": [bench.sample_json(s) for s in samples],
        "summary": [dataclasses.asdict(r) for r in rows],
        "resync": {"summary": bench.summarize_copies(copies)} if "sync" in modes else None,
        "lag": [lag_run(w.name, 12) for w in workloads] if lag and "async" in modes else None,
    }
    cfg = bench.BenchConfig(rounds=ROUNDS, suite="replicated" if len(modes) > 1 else modes[0])
    started = dt.datetime(2026, 12, 2, 21, 44, tzinfo=dt.UTC)
    return bench.report(cfg, [], [], MACHINE, started, 60.0, rep)


def failover_report() -> dict[str, Any]:
    def kill(rnd: int, write_s: float | None) -> dict[str, Any]:
        return {"round": rnd, "write_s": write_s, "error": None if write_s else "no write"}

    modes = {
        "sync": {
            "rounds": [kill(0, 1.5), kill(1, 2.5), kill(2, 1.7)],
            "switchover": {"available": True, "rounds": [kill(0, 1.2)]},
        },
        "async": {
            "rounds": [kill(0, 2.0), kill(1, None)],  # one round never wrote: no point
            "switchover": {"available": False, "why": "no such command", "rounds": []},
        },
    }
    return {
        "suite": "failover",
        "started": "2026-12-02T21:45:00+00:00",
        "machine": MACHINE,
        "config": {"modes": ["sync", "async"], "kills": 3, "switchovers": 1},
        "settings": {"expected_lease_expiry": {"median_s": 2.0}},
        "target_median_s": 2.0,
        "modes": modes,
    }


def takeover_report() -> dict[str, Any]:
    sizes = (8 << 20, 16 << 20)

    def ready(rnd: int, size: int) -> bench_takeover.ReadySample:
        return bench_takeover.ReadySample(
            rnd, size, f"r{rnd}", size, 8, "PAIR", size // bench_takeover.CHUNK,
            0.01 * (rnd + 1), 0.005, 0.002, True, pull_s=0.1,
        )  # fmt: skip

    samples = [ready(rnd, s) for rnd in range(2) for s in sizes]
    copies = [bench.CopySample(rnd, "nbdcopy", s, 0.05) for rnd in range(2) for s in sizes]
    return {
        "suite": "takeover",
        "started": "2026-12-02T21:47:00+00:00",
        "machine": MACHINE,
        "config": {"rounds": 2, "sizes": list(sizes)},
        "ready": {"summary": bench_takeover.summarize_ready(samples, sizes)},
        "hydration": {"summary": bench_takeover.summarize_hydration(samples, copies, sizes)},
    }


def rounds_points(ax: Any) -> int:
    return sum(len(c.get_offsets()) for c in ax.collections if c.get_gid() == "rounds")


def goal_ticks(ax: Any) -> int:
    return sum(len(c.get_segments()) for c in ax.collections if c.get_gid() == "goal")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_replicated_ratios_draw_a_bar_per_median_a_point_per_round_and_the_goals() -> None:
    found = bench_plot.charts_of(replicated_report(), "r.json")
    assert [c.name for c in found.charts] == ["ratios-replicated", "async-lag"]
    assert found.notes == []
    chart = found.charts[0]
    assert isinstance(chart, bench_plot.SpreadChart)
    # 2 workloads x (sync, async), then the full resync against nbdcopy
    assert [(b.group, b.label) for b in chart.bars] == [
        ("randwrite-4k", "sync / unrepl"), ("randwrite-4k", "async / unrepl"),
        ("write-1m", "sync / unrepl"), ("write-1m", "async / unrepl"),
        ("full resync", "resync / nbdcopy"),
    ]  # fmt: skip
    first = chart.bars[0]
    assert first.median == pytest.approx(0.4) and first.rounds == (0.3, 0.4, 0.5)
    assert first.goal == bench.MODE_GOALS["sync"]["randwrite-4k"]
    assert chart.bars[-1].rounds == (1.0, 0.5, pytest.approx(0.3333))
    assert "abc1234" in chart.source and "3 round(s)" in chart.source
    fig = bench_plot.figure_of(chart)
    (ax,) = fig.axes
    assert len(ax.patches) == 5  # the bars, and nothing else drawn as a patch
    assert sorted(p.get_height() for p in ax.patches) == sorted(b.median for b in chart.bars)
    assert rounds_points(ax) == 5 * ROUNDS
    assert goal_ticks(ax) == 5
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "randwrite-4k", "write-1m", "full resync",
    ]  # fmt: skip
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"sync / unrepl", "async / unrepl", "resync / nbdcopy", "one round"} <= set(legend)


def test_the_lag_chart_keeps_every_sample_of_each_lag_run() -> None:
    chart = bench_plot.charts_of(replicated_report(), "r.json").charts[1]
    assert isinstance(chart, bench_plot.LagChart)
    assert [len(t.t) for t in chart.traces] == [12, 12]
    assert chart.traces[0].label == "randwrite-4k at 500 IOPS (half of 1000 end to end)"
    assert chart.traces[0].lag_ms[3] == pytest.approx(3.0)  # seconds in the report, ms drawn
    fig = bench_plot.figure_of(chart)
    lag, entries = fig.axes
    for ax in (lag, entries):
        drawn = [line for line in ax.lines if len(line.get_xdata())]
        assert len(drawn) == 2
        xs, ys = drawn[0].get_xdata(), drawn[0].get_ydata()
        assert list(xs) == [i * 0.25 for i in range(12)]
        want = [float(i) for i in range(12)]  # 1 ms and 1 entry more every sample
        assert list(ys) == pytest.approx(want)
        assert len(ax.patches) == 1  # the ramp the percentiles leave out


def test_failover_chart_has_a_bar_per_mode_and_kind_and_a_point_per_timed_round() -> None:
    found = bench_plot.charts_of(failover_report(), "f.json")
    (chart,) = found.charts
    assert isinstance(chart, bench_plot.SpreadChart) and chart.name == "failover"
    assert [(b.group, b.label, b.median) for b in chart.bars] == [
        ("sync", "SIGKILL of the active host", 1.7),
        ("sync", "planned switchover", 1.2),
        ("async", "SIGKILL of the active host", 2.0),
    ]
    assert "3 kill(s), 1 switchover(s)" in chart.source
    (ax,) = bench_plot.figure_of(chart).axes
    assert len(ax.patches) == 3
    assert rounds_points(ax) == 3 + 1 + 1  # the round that never wrote has no point
    assert goal_ticks(ax) == 0
    assert [r.value for r in chart.references] == [2.0, 2.0]


def test_takeover_charts_time_to_ready_and_the_pull_per_backlog() -> None:
    found = bench_plot.charts_of(takeover_report(), "t.json")
    assert [c.name for c in found.charts] == ["takeover-ready", "takeover-hydration"]
    ready, pull = found.charts
    assert isinstance(ready, bench_plot.SpreadChart) and isinstance(pull, bench_plot.SpreadChart)
    assert [b.group for b in ready.bars] == ["8M backlog", "16M backlog"]
    assert ready.bars[0].rounds == pytest.approx((17.0, 27.0))  # milliseconds
    assert ready.bars[0].median == pytest.approx(22.0)
    (ax,) = bench_plot.figure_of(ready).axes
    assert (len(ax.patches), rounds_points(ax)) == (2, 4)
    # the 1 s target is far above 27 ms: named in the legend, not drawn
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "target: under 1000 ms (off the scale)" in legend
    assert [b.goal for b in pull.bars] == [bench_takeover.HYDRATION_GOAL] * 2
    (ax,) = bench_plot.figure_of(pull).axes
    assert (len(ax.patches), rounds_points(ax), goal_ticks(ax)) == (2, 4, 2)


def write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def test_plot_from_saved_reports_writes_valid_pngs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = [
        write(tmp_path / "replicated.json", replicated_report()),
        write(tmp_path / "failover.json", failover_report()),
        write(tmp_path / "takeover.json", takeover_report()),
    ]
    out = tmp_path / "plots" / "new"  # made, parents too
    code = main(["bench", "--plot", str(out), "--json", "--from", *map(str, reports)])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    names = ["ratios-replicated", "async-lag", "failover", "takeover-ready", "takeover-hydration"]
    assert doc == {"charts": [str(out / f"{n}.png") for n in names], "notes": []}
    for n in names:
        path = out / f"{n}.png"
        assert path.stat().st_size > 0
        width, height = png_size(path)
        assert width == 800 and height in (450, 630)  # the lag chart has two rows
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in names)


def test_a_report_without_a_lag_trace_skips_that_chart_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sync_only = write(tmp_path / "sync.json", replicated_report(("sync",)))
    no_trace = replicated_report(lag=False)
    assert bench_plot.charts_of(no_trace).notes == [
        "report: no async lag trace (only the async suite records one): no async-lag"
    ]
    out = tmp_path / "plots"
    assert main(["bench", "--plot", str(out), "--from", str(sync_only)]) == 0
    stdout = capsys.readouterr().out
    assert f"note: {sync_only}: no async lag trace" in stdout
    assert f"charts: {out / 'ratios-replicated.png'}" in stdout
    assert [p.name for p in out.iterdir()] == ["ratios-replicated.png"]


@pytest.mark.parametrize(
    ("content", "argv", "code", "message"),
    [
        (None, [], 3, "no such file"),
        ("{not json", [], 2, "not JSON"),
        ([1, 2], [], 2, "not a pairvol bench report"),
        ({"schema": 2}, [], 2, "not a pairvol bench report (no suite)"),
        ({"suite": "nope"}, [], 2, "unknown suite 'nope'"),
        ({"suite": "failover", "modes": {"sync": {}}}, [], 2, "missing 'rounds'"),
        ({"suite": "base", "summary": []}, [], 2, "nothing to chart"),
        (failover_report(), ["--quick"], 2, "--from runs no suite: --quick"),
        (failover_report(), ["--suite", "failover"], 2, "--suite does not apply"),
        (failover_report(), ["--rounds", "3"], 2, "--rounds does not apply"),
    ],
)
def test_bad_reports_and_options_are_refused_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: Any,
    argv: list[str],
    code: int,
    message: str,
) -> None:
    report = tmp_path / "r.json"
    if content is not None:
        write(report, content)
    out = tmp_path / "plots"
    assert main(["bench", "--plot", str(out), *argv, "--from", str(report)]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pairvol: error: ") and message in err, err
    assert not out.exists() or not list(out.iterdir())


def test_bad_plot_options_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = write(tmp_path / "f.json", failover_report())
    assert main(["bench", "--from", str(report)]) == 2
    assert "--from needs --plot DIR" in capsys.readouterr().err
    a_file = write(tmp_path / "file", "x")
    assert main(["bench", "--plot", str(a_file), "--from", str(report)]) == 2
    assert "not a directory" in capsys.readouterr().err
    # refused before a run, not after it
    assert main(["bench", "--plot", str(a_file / "sub"), "--quick"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["bench", "--plot", str(tmp_path), "--from", str(report), str(report)]) == 2
    assert "both make failover.png" in capsys.readouterr().err


def test_missing_matplotlib_is_one_line_naming_the_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = bench_plot.importlib.util.find_spec
    monkeypatch.setattr(
        bench_plot.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    report = write(tmp_path / "f.json", failover_report())
    for argv in (["--from", str(report)], ["--quick"]):  # the run is refused before it starts
        assert main(["bench", "--plot", str(tmp_path / "p"), *argv]) == 9
        err = capsys.readouterr().err
        assert err == "pairvol: error: --plot needs matplotlib: install python3-matplotlib\n"


def test_nothing_but_plotting_imports_matplotlib() -> None:
    code = (
        "import sys, pairvol.cli, pairvol.bench_plot, replicator.node, cluster.agent;"
        "from pairvol.cli import build_parser; build_parser();"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_run_with_plot_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The base suite (no root, ~15 s): the run's own report is charted after it."""
    require_programs("nbdkit", "fio")
    report, out = tmp_path / "result.json", tmp_path / "plots"
    argv = ["bench", "--quick", "--size", "16M", "--workloads", "randread-4k,write-1m"]
    argv += ["--json-out", str(report), "--dir", str(tmp_path / "work"), "--plot", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "no async lag trace" in stdout and f"charts: {out / 'ratios-base.png'}" in stdout
    assert png_size(out / "ratios-base.png") == (800, 450)
    # and the same chart again from the saved report, without running anything
    again = tmp_path / "again"
    assert main(["bench", "--plot", str(again), "--from", str(report)]) == 0
    assert png_size(again / "ratios-base.png") == (800, 450)
    (chart,) = bench_plot.charts_of(json.loads(report.read_text())).charts
    assert isinstance(chart, bench_plot.SpreadChart)
    assert [b.group for b in chart.bars] == ["randread-4k", "write-1m"]
    assert all(len(b.rounds) == 1 for b in chart.bars)


def test_the_async_bar_says_end_to_end_once_the_report_measures_it_so() -> None:
    doc = replicated_report()
    old = {b.label for b in bench_plot.charts_of(doc, "r.json").charts[0].bars}  # type: ignore[attr-defined]
    doc["replicated"]["objectives"] = []  # schema 3: the async figure is the end-to-end rate
    new = {b.label for b in bench_plot.charts_of(doc, "r.json").charts[0].bars}  # type: ignore[attr-defined]
    assert "async / unrepl" in old and "async end to end / unrepl" not in old
    assert "async end to end / unrepl" in new and "async / unrepl" not in new
    assert "sync / unrepl" in new
