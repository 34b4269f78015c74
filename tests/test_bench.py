"""The benchmark harness: its pure parts, and one tiny end-to-end run (no timing assertions)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import require_programs, require_root

from pairvol import bench, bench_floor
from pairvol.cli import build_parser, main
from pairvol.cli.bench import config_from_args
from replicator import server
from replicator.errors import ExternalCommandFailed, UsageError


def fio_job(direction: str, iops: float, bw_bytes: int, io_bytes: int, error: int = 0) -> Any:
    idle = {"io_bytes": 0, "iops": 0.0, "bw_bytes": 0, "lat_ns": {"mean": 0.0}, "clat_ns": {}}
    busy = {
        "io_bytes": io_bytes,
        "iops": iops,
        "bw_bytes": bw_bytes,
        "lat_ns": {"mean": 250_000.0},
        "clat_ns": {"percentile": {"99.000000": 1_000_000}},
    }
    job: dict[str, Any] = {"jobname": "j", "error": error, "read": idle, "write": idle}
    job[direction] = busy
    return job


def fio_output(*jobs: Any) -> str:
    # fio's nbd engine prints this line ahead of the JSON document, even with --output.
    return "fio: connected to NBD server\n" + json.dumps({"fio version": "fio-3.33", "jobs": jobs})


def test_parse_fio_json_sums_jobs_and_skips_the_engine_banner() -> None:
    text = fio_output(
        fio_job("read", 1000.0, 4 << 20, 40 << 20), fio_job("read", 500.0, 2 << 20, 20 << 20)
    )
    m = bench.parse_fio_json(text, "read")
    assert m.iops == 1500.0
    assert m.mib_s == 6.0
    assert m.io_bytes == 60 << 20
    assert m.lat_mean_us == 250.0
    assert m.lat_p99_us == 1000.0
    plain = json.dumps({"jobs": [fio_job("write", 10.0, 1 << 20, 1 << 20)]})
    assert bench.parse_fio_json(plain, "write").iops == 10.0


@pytest.mark.parametrize(
    "text",
    [
        "fio: nbd_connect_uri: connect: Connection refused\n",
        "",
        fio_output(fio_job("read", 1000.0, 4 << 20, 40 << 20, error=5)),
        fio_output(fio_job("write", 0.0, 0, 0)),
        fio_output(),
        "{not json",
    ],
)
def test_parse_fio_json_refuses_failed_or_empty_runs(text: str) -> None:
    with pytest.raises(ExternalCommandFailed):
        bench.parse_fio_json(text, "read" if "read" in text else "write")


def sample(rnd: int, workload: str, target: str, iops: float, mib_s: float) -> bench.Sample:
    return bench.Sample(rnd, workload, target, bench.Measurement(iops, mib_s, 1.0, 2.0, 1))


def test_summarize_takes_medians_and_ratios_to_the_last_target() -> None:
    rr, seq = bench.WORKLOADS[0], bench.WORKLOADS[2]
    samples = [
        sample(0, rr.name, "pairvol", 100, 0.4),
        sample(0, rr.name, "file", 200, 0.8),
        sample(1, rr.name, "file", 400, 1.6),
        sample(1, rr.name, "pairvol", 300, 1.2),
        sample(2, rr.name, "pairvol", 50, 0.2),
        sample(2, rr.name, "file", 300, 1.2),
        sample(0, seq.name, "pairvol", 9, 9.0),
        sample(0, seq.name, "file", 10, 10.0),
    ]
    rows = bench.summarize(samples, [rr, seq], ["pairvol", "file"])
    assert [r.workload for r in rows] == [rr.name, seq.name]
    r = rows[0]
    assert r.iops == {"pairvol": 100, "file": 300}
    assert r.mib_s == {"pairvol": 0.4, "file": 1.2}
    assert r.ratio == {"pairvol": pytest.approx(1 / 3)}
    assert r.round_ratios == {"pairvol": [0.5, 0.75, 0.1667]}
    assert rows[1].metric == "mib_s" and rows[1].ratio["pairvol"] == pytest.approx(0.9)


def test_summarize_skips_workloads_without_samples() -> None:
    rows = bench.summarize([sample(0, "randread-4k", "file", 1, 1)], bench.WORKLOADS, ["p", "file"])
    assert rows == []


def test_format_table_shows_every_target_ratio_and_goal() -> None:
    rows = [
        bench.Row("randread-4k", "iops", 0.5, {"pairvol": 60000.4, "file": 100000}, {"pairvol": 234.4, "file": 390.6}, {"pairvol": 0.6}, {}),  # noqa: E501
        bench.Row("write-1m", "mib_s", 0.9, {"pairvol": 800, "file": 1000}, {"pairvol": 800.0, "file": 1000.0}, {"pairvol": 0.8}, {}),  # noqa: E501
    ]  # fmt: skip
    lines = bench.format_table(rows, ["pairvol", "file"]).splitlines()
    assert lines[0].split() == [
        "workload", "pairvol", "IOPS", "pairvol", "MiB/s", "file", "IOPS", "file", "MiB/s",
        "pairvol/file", "goal",
    ]  # fmt: skip
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == [
        "randread-4k", "60000", "234.4", "100000", "390.6", "0.60", "(ok)", ">=", "0.5",
    ]  # fmt: skip
    assert "0.80 (below)" in lines[3]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns


def test_rounds_alternate_the_target_order() -> None:
    a, b = bench.FileTarget("a"), bench.FileTarget("b")
    assert [t.name for t in bench.order_for_round([a, b], 0)] == ["a", "b"]
    assert [t.name for t in bench.order_for_round([a, b], 1)] == ["b", "a"]
    assert [t.name for t in bench.order_for_round([a, b], 2)] == ["a", "b"]


def test_pairvol_target_is_launched_like_pairvol_launches_nbdkit(tmp_path: Path) -> None:
    t = bench.PairvolTarget()
    t.image = tmp_path / "v.img"
    sock = tmp_path / "s.sock"
    extra = ("--unix", str(sock), "--foreground", "--exit-with-parent")
    assert t.command(sock) == server.plugin_command(f"volume={t.image}", extra=extra)
    f = bench.FileTarget()
    f.image = tmp_path / "f.raw"
    assert f.command(sock) == ["nbdkit", *extra, "file", str(f.image)]  # stock: no options


def test_fill_region_is_the_same_data_at_any_offset(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(3 << 20))
    b.write_bytes(bytes(1 << 20))
    bench.fill_region(a, 1 << 20, 2 << 20)
    bench.fill_region(b, 0, 2 << 20)
    assert a.read_bytes()[1 << 20 :] == b.read_bytes()
    assert a.read_bytes()[: 1 << 20] == bytes(1 << 20)
    assert b.read_bytes().count(0) < (2 << 20) // 128  # data, not zeros


def parse(*argv: str) -> bench.BenchConfig:
    return config_from_args(build_parser().parse_args(["bench", *argv]))


def test_cli_defaults_quick_and_explicit_options() -> None:
    d = parse()
    assert (d.size, d.rounds, d.runtime, d.workloads) == (1 << 30, 3, 10.0, bench.WORKLOADS)
    q = parse("--quick")
    assert (q.size, q.rounds, q.runtime, q.ramp_time) == (64 << 20, 1, 1.0, 0.0)
    q2 = parse("--quick", "--runtime", "2", "--size", "16M", "--workloads", "read-1m")
    assert (q2.size, q2.rounds, q2.runtime) == (16 << 20, 1, 2.0)
    assert [w.name for w in q2.workloads] == ["read-1m"]


@pytest.mark.parametrize(
    "argv",
    [["--rounds", "0"], ["--runtime", "0"], ["--workloads", "nope"], ["--workloads", ","]],
)
def test_cli_refuses_bad_options(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(*argv)


def test_default_json_path_is_timestamped() -> None:
    import datetime as dt

    p = bench.default_json_path(dt.datetime(2024, 5, 6, 7, 8, 9))
    assert p == Path("bench-results/baseline-20240506-070809.json")
    p = bench.default_json_path(dt.datetime(2024, 5, 6, 7, 8, 9), suite="sync")
    assert p == Path("bench-results/sync-20240506-070809.json")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_programs("nbdkit", "fio")
    out = tmp_path / "result.json"
    argv = ["bench", "--quick", "--size", "16M", "--runtime", "1", "--json-out", str(out)]
    code = main([*argv, "--dir", str(tmp_path / "work")])
    stdout, _ = capsys.readouterr()
    assert code == 0, stdout
    doc = json.loads(out.read_text())
    assert doc["schema"] == bench.SCHEMA_VERSION
    assert doc["baseline"] == "file"
    assert [t["name"] for t in doc["targets"]] == ["pairvol", "file"]
    for key in ("nproc", "kernel", "nbdkit_version", "python_version", "fio_version"):
        assert doc["machine"][key], key
    assert [r["workload"] for r in doc["summary"]] == [w.name for w in bench.WORKLOADS]
    for row in doc["summary"]:
        for target in ("pairvol", "file"):
            assert row["iops"][target] > 0 and row["mib_s"][target] > 0
        assert row["ratio"]["pairvol"] > 0
    assert len(doc["samples"]) == len(bench.WORKLOADS) * 2
    assert all(s["server_cores"] is None or s["server_cores"] >= 0 for s in doc["samples"])
    for w in bench.WORKLOADS:
        assert w.name in stdout
    # Every server was stopped and its socket removed; the images stay in the named --dir.
    assert not list((tmp_path / "work").glob("*.sock"))
    assert not [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path) in cmdline(p)]


def cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_server_that_fails_at_start_up_is_reported_with_its_log(tmp_path: Path) -> None:
    argv = ["sh", "-c", "echo 'nbdkit: error: cannot open file' >&2; exit 1"]
    srv = bench.ServerProcess(argv, tmp_path / "s.sock", tmp_path / "s.log")
    with pytest.raises(ExternalCommandFailed, match="status 1 at start-up: nbdkit: error: cannot"):
        srv.start()


def test_machine_info_never_records_an_error_message_as_a_version(tmp_path: Path) -> None:
    assert bench._first_line(["sh", "-c", "echo fatal: not a git repository >&2; exit 128"]) == (
        "unknown (exit status 128)"
    )
    assert bench._first_line(["sh", "-c", "echo 'fio-3.33'; echo more"]) == "fio-3.33"


# -- the replicated suites -------------------------------------------------------------------


def test_suites_name_what_they_run() -> None:
    assert bench.suite_parts("base") == ("base",)
    assert bench.suite_parts("replicated") == ("sync", "async")
    assert bench.suite_parts("all") == ("base", "sync", "async")
    with pytest.raises(UsageError):
        bench.suite_parts("nope")
    assert [w.name for w in bench.replicated_workloads(bench.WORKLOADS)] == [
        "randwrite-4k",
        "write-1m",
    ]


def test_cli_suite_options() -> None:
    d = parse()
    assert (d.suite, d.lag_runtime, d.journal_size) == ("base", 20.0, 512 << 20)
    q = parse("--suite", "async", "--quick", "--journal-size", "64M")
    assert (q.suite, q.lag_runtime, q.journal_size, q.size) == ("async", 3.0, 64 << 20, 64 << 20)
    assert parse("--suite", "sync", "--lag-runtime", "7").lag_runtime == 7.0
    for argv in (
        ["--suite", "sync", "--workloads", "randread-4k,read-1m"],  # nothing replication changes
        ["--suite", "async", "--lag-runtime", "0"],
        ["--suite", "async", "--journal-size", "4K"],
    ):
        with pytest.raises(UsageError):
            parse(*argv)


def test_summarize_applies_per_target_goals_and_the_table_shows_them() -> None:
    w = bench.WORKLOADS[1]  # randwrite-4k, goal 0.5
    samples = [
        sample(0, w.name, "sync", 30, 0.1),
        sample(0, w.name, "async", 90, 0.3),
        sample(0, w.name, "unrepl", 100, 0.4),
    ]
    goals = {"sync": {"randwrite-4k": 0.5}, "async": {"randwrite-4k": 0.85}}
    (row,) = bench.summarize(samples, [w], ["sync", "async", "unrepl"], goals)
    assert row.goals == {"sync": 0.5, "async": 0.85}
    assert row.ratio == {"sync": pytest.approx(0.3), "async": pytest.approx(0.9)}
    lines = bench.format_table([row], ["sync", "async", "unrepl"]).splitlines()
    assert lines[2].split()[-8:] == ["0.30", "(below)", "0.90", "(ok)", ">=", "0.5", "/", "0.85"]
    # A report read back from JSON (Row(**...)) of schema 1, without goals, still tabulates.
    plain = {k: v for k, v in asdict_row(row).items() if k != "goals"}
    assert bench.Row(**plain).goals == {}


def asdict_row(row: bench.Row) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(row)


def test_left_pair_counts_rounds_that_stopped_replicating() -> None:
    def noted(target: str, workload: str, state: str | None) -> bench.Sample:
        s = sample(0, workload, target, 1, 1)
        return bench.Sample(
            0, workload, target, s.result, None, None if state is None else {"state_end": state}
        )

    samples = [
        noted("async", "write-1m", "PFUS"),
        noted("async", "write-1m", "PFUS"),
        noted("async", "randwrite-4k", "PFUL"),
        noted("sync", "write-1m", "PAIR"),
        noted("sync", "randwrite-4k", "PSUE"),
        noted("unrepl", "write-1m", None),
    ]
    assert bench.left_pair(samples) == {"async": {"write-1m": 2}, "sync": {"randwrite-4k": 1}}


def test_percentile_is_nearest_rank() -> None:
    xs = [float(x) for x in range(1, 101)]
    assert bench.percentile(xs, 50) == 50.0
    assert bench.percentile(xs, 99) == 99.0
    assert bench.percentile(xs, 100) == 100.0
    assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert bench.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_summarize_lag_skips_the_ramp() -> None:
    samples = [bench.LagSample(0.1, 9.0, 900, 50.0, "PFUL")] + [
        bench.LagSample(1.0 + i / 4, 0.01 * (i + 1), i, 1.0 + i, "PAIR", 30 * i, 20 * i)
        for i in range(100)
    ]
    lag = bench.summarize_lag(samples, skip_s=0.5)
    assert lag["samples"] == 100
    assert (lag["journaled_per_s"], lag["applied_per_s"]) == (120.0, 80.0)
    assert lag["p50_s"] == pytest.approx(0.50)
    assert lag["p99_s"] == pytest.approx(0.99)
    assert lag["max_s"] == pytest.approx(1.0)
    assert (lag["max_entries"], lag["max_journal_percent"], lag["states"]) == (99, 100.0, ["PAIR"])
    assert bench.summarize_lag(samples[:1], skip_s=0.5) == {"samples": 0}


def test_lag_sample_reads_the_primarys_journal() -> None:
    j = {"lag_seconds": 0.25, "lag_entries": 3, "journal_percent": 1.5, "newest_seq": 9}
    side = {"state": "PAIR", "journal": {**j, "secondary_applied": 6}}
    assert bench.lag_sample(side, 1.23456) == bench.LagSample(1.235, 0.25, 3, 1.5, "PAIR", 9, 6)
    # Everything applied: the node's age of the oldest retained entry is not a lag.
    idle = {"state": "PAIR", "journal": {**j, "lag_seconds": 9.3, "lag_entries": 0}}
    assert bench.lag_sample(idle, 0).lag_seconds == 0.0
    assert bench.lag_sample({"state": "PAIR", "journal": None}, 0) == bench.LagSample(
        0, 0.0, 0, 0.0, "PAIR"
    )


def test_summarize_copies_medians_and_round_ratios() -> None:
    mib = 1 << 20
    samples = [
        bench.CopySample(0, "resync", 100 * mib, 1.0),
        bench.CopySample(0, "nbdcopy", 100 * mib, 0.5),
        bench.CopySample(1, "nbdcopy", 100 * mib, 1.0),
        bench.CopySample(1, "resync", 100 * mib, 2.0),
        bench.CopySample(2, "resync", 100 * mib, 0.5),
        bench.CopySample(2, "nbdcopy", 100 * mib, 0.25),
    ]
    c = bench.summarize_copies(samples)
    assert c["mib_s"] == {"resync": 100.0, "nbdcopy": 200.0}
    assert c["ratio"] == 0.5 and c["goal"] == bench.RESYNC_GOAL
    assert c["round_ratios"] == [0.5, 0.5, 0.5]
    assert c["bytes"] == {"resync": 100 * mib, "nbdcopy": 100 * mib}
    assert bench.summarize_copies(samples[:1]) == {}
    table = bench.format_copy_table(c).splitlines()
    assert table[2].split() == [
        "full",
        "resync",
        "100M",
        "100.0",
        "200.0",
        "0.50",
        "(below)",
        ">=",
        "0.9",
    ]


def test_table_of_a_replicated_only_report() -> None:
    row = bench.Row(
        "write-1m",
        "mib_s",
        0.9,
        {"sync": 1, "unrepl": 9},
        {"sync": 100.0, "unrepl": 1000.0},
        {"sync": 0.1},
        {"sync": [0.1]},
        {"sync": 0.8},
    )
    lag = {
        "workload": "write-1m",
        "metric": "mib_s",
        "rate": 50.0,
        "achieved": 49.9,
        "p50_s": 0.01,
        "p99_s": 0.02,
        "max_s": 0.03,
        "max_journal_percent": 1.0,
        "states": ["PAIR"],
    }
    copies = bench.summarize_copies(
        [bench.CopySample(0, "resync", 1 << 20, 1.0), bench.CopySample(0, "nbdcopy", 1 << 20, 1.0)]
    )
    doc = {
        "summary": [],
        "targets": [],
        "replicated": {
            "targets": [{"name": "sync"}, {"name": "unrepl"}],
            "summary": [asdict_row(row)],
            "resync": {"summary": copies},
            "lag": [lag],
        },
    }  # fmt: skip
    doc["config"] = {"rounds": 3}
    doc["replicated"]["left_pair"] = {"async": {"write-1m": 2}}  # type: ignore[index]
    doc["replicated"]["lag"][0]["sustained"] = {"rate": 100.0}  # type: ignore[index]
    text = bench.table_of(doc)
    assert "sync/unrepl" in text and "0.10 (below)" in text and ">= 0.8" in text
    assert "note: async write-1m: the pair left PAIR (journal overflow) in 2 of 3" in text
    assert "100 MiB/s" in text  # the end-to-end rate the lag run's rate is half of
    assert "1.00 (ok)" in text  # resync/nbdcopy
    assert "50 MiB/s" in text and "0.020" in text
    assert "issue 10 target" not in text and "floor:" not in text  # a schema-2 report has none


# -- issue 10's targets: the async figure, CPU per request, floors ---------------------------

MIB = 1 << 20
REPL = bench.replicated_workloads(bench.WORKLOADS)


def noted_sample(
    workload: str, target: str, iops: float, bs: int, a: float, b: float, client: float | None
) -> bench.Sample:
    m = bench.Measurement(iops, iops * bs / MIB, 1.0, 2.0, 1, client)
    return bench.Sample(0, workload, target, m, None, {"cores_a": a, "cores_b": b})


def sustained(iops: float, bs: int, entries: int, cpu_a: float, cpu_b: float) -> dict[str, Any]:
    return {
        "iops": iops,
        "mib_s": iops * bs / MIB,
        "rate": iops if bs == 4096 else iops * bs / MIB,
        "entries": entries,
        "cpu_s_a": cpu_a,
        "cpu_s_b": cpu_b,
    }


def fake_steps() -> dict[str, dict[str, Any]]:
    return {
        name: {"us": 10.0, "min_us": 9.0, "max_us": 11.0, "iterations": 3, "repeats": 2}
        for name in bench_floor.STEPS
    }


def replicated_part(*, sync_4k: float = 2000.0, p99_4k: float = 0.02) -> dict[str, Any]:
    """A replicated part as measure_replicated builds it, from made-up figures: unrepl writes
    10000 4k IOPS and 1000 MiB/s; async takes 9000 IOPS and 800 MiB/s into its journal but
    sustains 1000 IOPS and 100 MiB/s end to end."""
    samples = [
        noted_sample("randwrite-4k", "sync", sync_4k, 4096, 0.66, 0.5, None),
        noted_sample("randwrite-4k", "async", 9000, 4096, 0.9, 0.3, None),
        noted_sample("randwrite-4k", "unrepl", 10000, 4096, 0.8, 0.0, 0.4),
        noted_sample("write-1m", "sync", 200, MIB, 0.4, 0.3, None),
        noted_sample("write-1m", "async", 800, MIB, 0.9, 0.2, None),
        noted_sample("write-1m", "unrepl", 1000, MIB, 0.9, 0.0, 0.1),
    ]
    names = ["sync", "async", "unrepl"]
    goals = {m: bench.MODE_GOALS[m] for m in ("sync", "async")}
    rows = bench.summarize(samples, REPL, names, goals)
    burst = {
        "randwrite-4k": sustained(1000, 4096, 5000, 1.5, 1.0),
        "write-1m": sustained(100, MIB, 100, 0.3, 0.2),
    }
    rows = bench.end_to_end_rows(rows, burst, "async", "unrepl")
    lag = [
        {"workload": w, "metric": m, "rate": r, "achieved": r, "p99_s": p99, "samples": 9,
         "notes": {"cores_a": 0.1, "cores_b": 0.05}, "sustained": burst[w]}
        for w, m, r, p99 in (
            ("randwrite-4k", "iops", 500.0, p99_4k), ("write-1m", "mib_s", 50.0, 0.2)
        )
    ]  # fmt: skip
    copies = [
        # The resync's CPU seconds span the command, more than cores x its copy seconds.
        bench.CopySample(0, "resync", 100 * MIB, 1.0, 0.5, 0.4, 0.8, 0.4),
        bench.CopySample(0, "nbdcopy", 100 * MIB, 0.5, 0.3, 0.3, 0.15, 0.15),
    ]
    rep: dict[str, Any] = {
        "baseline": "unrepl",
        "targets": [{"name": n} for n in names],
        "workloads": [dataclasses.asdict(w) for w in REPL],
        "samples": [bench.sample_json(s) for s in samples],
        "summary": [dataclasses.asdict(r) for r in rows],
        "lag": lag,
        "resync": {
            "samples": [dataclasses.asdict(c) for c in copies],
            "summary": bench.summarize_copies(copies),
        },
        "notes": {},
        "cores": 2,
    }
    rep["cpu"] = bench.cpu_costs(rep)
    rep["floor"] = bench.floor_of(rep, fake_steps(), 2, {"mib_s": 600.0, "writers": 4})
    rep["objectives"] = bench.objectives_of(rep, 2)
    return rep


def test_parse_fio_json_reads_fios_own_cpu() -> None:
    job = {**fio_job("write", 10.0, 1 << 20, 1 << 20), "usr_cpu": 30.0, "sys_cpu": 12.5}
    assert bench.parse_fio_json(fio_output(job, job), "write").client_cores == 0.85
    assert bench.parse_fio_json(fio_output(fio_job("write", 1, 1, 1)), "write").client_cores is None


def test_the_end_to_end_window_opens_at_fios_first_io_not_its_launch() -> None:
    """fio starts up for about 0.3 s before its first I/O; the async end-to-end rate counted
    that against the pair (a 0.8 s burst of 1M writes: a third of it), while the
    unreplicated baseline is fio's own rate.  The window opens at the report's time less the
    job's runtime."""
    doc = {"fio version": "fio-3.33", "timestamp_ms": 100_800, "jobs": [
        {"jobname": "a", "job_runtime": 400}, {"jobname": "b", "job_runtime": 500}]}  # fmt: skip
    assert bench.fio_io_start("fio: connected to NBD server\n" + json.dumps(doc)) == 100.3
    with pytest.raises(ExternalCommandFailed, match="timestamp_ms"):
        bench.fio_io_start(json.dumps({"jobs": [{"job_runtime": 1}]}))


def test_the_async_figure_is_the_end_to_end_rate_not_fios() -> None:
    rep = replicated_part()
    row = {r["workload"]: r for r in rep["summary"]}["randwrite-4k"]
    assert row["iops"]["async"] == 1000 and row["ratio"]["async"] == pytest.approx(0.1)
    assert row["round_ratios"]["async"] == [0.1]
    assert row["into_journal"]["async"]["iops"] == 9000
    assert row["into_journal"]["async"]["ratio"] == pytest.approx(0.9)
    assert row["iops"]["sync"] == 2000 and row["into_journal"].keys() == {"async"}
    lines = bench.format_table(
        [bench.Row(**r) for r in rep["summary"]], ["sync", "async", "unrepl"]
    )
    header, _, first, second, legend = lines.splitlines()
    assert "async e2e IOPS" in header and "async e2e/unrepl" in header
    assert header.split()[-3:] == ["async", "into", "journal"]
    assert "0.10 (below)" in first and first.endswith("9000 IOPS (0.90)")
    assert second.endswith("800.0 MiB/s (0.80)")
    assert legend.startswith("async e2e: end to end")
    async_obj = [o for o in rep["objectives"] if o["target"] == "async" and o["kind"] == "ratio"]
    assert [o["value"] for o in async_obj] == [0.1, 0.1]  # never fio's 0.9 and 0.8


def test_cpu_per_request_and_per_mib_on_each_node() -> None:
    rows = {(r["target"], r["figure"], r["workload"]): r for r in replicated_part()["cpu"]["rows"]}
    assert set(rows) == {
        (t, f, w)
        for w in ("randwrite-4k", "write-1m")
        for t, f in (("sync", "fio"), ("async", "end to end"), ("async", "into journal"),
                     ("unrepl", "fio"))
    }  # fmt: skip
    sync = rows["sync", "fio", "randwrite-4k"]
    assert sync["a"] == {"us_per_request": 330.0, "ms_per_mib": 84.48}  # 0.66 cores / 2000 IOPS
    assert sync["b"]["us_per_request"] == 250.0 and sync["fio"] is None
    unrepl = rows["unrepl", "fio", "write-1m"]
    assert unrepl["a"]["ms_per_mib"] == 0.9 and unrepl["fio"]["ms_per_mib"] == 0.1
    e2e = rows["async", "end to end", "randwrite-4k"]  # 1.5 and 1.0 CPU s over 5000 entries
    assert (e2e["a"]["us_per_request"], e2e["b"]["us_per_request"]) == (300.0, 200.0)
    assert e2e["rate"]["iops"] == 1000
    assert rows["async", "end to end", "write-1m"]["a"]["ms_per_mib"] == 3.0


def test_a_reached_target_has_no_floor_and_a_missed_one_has_its_floor_lines() -> None:
    rep = replicated_part(sync_4k=5000.0, p99_4k=0.02)
    objectives = {o["name"]: o for o in rep["objectives"]}
    assert list(objectives) == [
        "sync randwrite-4k / unrepl",
        "async end to end randwrite-4k / unrepl",
        "sync write-1m / unrepl",
        "async end to end write-1m / unrepl",
        "async lag p99 at half the end-to-end rate, randwrite-4k",
        "async lag p99 at half the end-to-end rate, write-1m",
        "full resync / nbdcopy",
    ]
    reached = objectives["sync randwrite-4k / unrepl"]
    assert (reached["value"], reached["goal"], reached["reached"]) == (0.5, 0.4, True)
    assert (
        "floor" not in reached
        and "floor" not in objectives["async lag p99 at half the end-to-end rate, randwrite-4k"]
    )
    missed = objectives["sync write-1m / unrepl"]
    assert (missed["value"], missed["goal"], missed["reached"]) == (0.2, 0.6, False)
    f = missed["floor"]
    assert f["cpu"]["a"]["ms_per_mib"] == 2.0 and f["cpu"]["b"]["ms_per_mib"] == 1.5
    # 2 cores / (2.0 + 1.5 + 0.1 ms per MiB) = 555.6 MiB/s against unrepl's 1000
    assert f["ceilings"]["rate"]["this_machine"] == pytest.approx(555.6)
    assert f["ceilings"]["ratio"] == {
        "this_machine": 0.556, "two_hosts_gil": 0.5, "two_hosts_all_cores": pytest.approx(0.952)
    }  # fmt: skip
    lag = objectives["async lag p99 at half the end-to-end rate, write-1m"]["floor"]
    assert lag["busy"] == 0.075 and lag["cpu"]["a"] == {"ms_per_mib": 2.0}  # 0.1 cores, 50 MiB/s
    resync = objectives["full resync / nbdcopy"]["floor"]
    assert (resync["cpu"]["a"], resync["cpu"]["b"]) == ({"ms_per_mib": 8.0}, {"ms_per_mib": 4.0})
    assert resync["nbdcopy_nodes"]["a"] == {"ms_per_mib": 1.5}
    # 2 cores / (8 + 4 ms per MiB) = 166.7 MiB/s against nbdcopy's 200
    assert resync["ceilings"]["ratio"]["this_machine"] == pytest.approx(0.833)

    text = bench.table_of(
        {"summary": [], "targets": [], "config": {"rounds": 1}, "replicated": rep}
    )
    table = text[text.index("issue 10 target") :]
    assert "sync randwrite-4k / unrepl" in table and "floor: sync randwrite-4k" not in table
    assert "floor: async lag p99 at half the end-to-end rate, randwrite-4k" not in table
    floor = table[table.index("floor: sync write-1m / unrepl = 0.20, goal >= 0.6: not reached") :]
    lines = floor.splitlines()[1:5]
    assert lines[0] == (
        "  measured, CPU per MiB: a 2.00 ms/MiB, b 1.50 ms/MiB, fio 0.10 ms/MiB (unreplicated run)"
    )
    assert "ceiling on this machine (2 cores" in lines[1] and "555.6 MiB/s = 0.56x" in lines[1]
    assert "GIL-serialized 1/cpu_node 500.0 MiB/s = 0.50x" in lines[2]
    assert lines[3].startswith("  estimate, per-step floor: a ")
    assert "floor: async lag p99 at half the end-to-end rate, write-1m = 0.200 s" in table
    assert "floor: full resync / nbdcopy = 0.50, goal >= 0.9: not reached" in table
    assert "per-step floor of a sync mirrored write (measured in this run" in table
    assert "4k per request: node b = tcp_4k_b + decode_write_4k + pwritev_4k + encode_ack" in table
    # async 1M's floor journals on both nodes: warm, and a new journal's first lap
    floor = table[table.index("floor: async end to end write-1m / unrepl = 0.10") :]
    lines = floor.splitlines()[1:7]
    assert lines[3].startswith("  estimate, per-step floor of an async entry, warm journals: a ")
    assert lines[4].startswith("  estimate, per-step floor of an async entry, first lap: a ")
    assert lines[5] == (
        "  measured, durable journal appends here: 600 MiB/s (4 writers of 1 MiB, fdatasync "
        "each); estimate, disk-bound: each MiB made durable 3 times on this disk (a's journal, "
        "b's journal, b's volume) <= 200 MiB/s = 0.20x; two hosts (2 on b's) <= 300 MiB/s = "
        "0.30x (the unreplicated run writes to the page cache only)"
    )
    assert "async 1m per MiB: node a = journal_append_1m + journal_read_1m + " in table
    assert "async 1m first lap (each journal's pwritev into pages never cached" in table
    # async 4k has no journalled step floor: the sync one, marked as a lower bound
    floor = table[table.index("floor: async end to end randwrite-4k / unrepl = 0.10") :]
    assert "per-step floor (a sync write's steps; async also journals: a lower bound)" in floor
    assert "CPU per request / per MiB" in text and "132 µs/req" in text  # 0.66 / 5000


def test_every_target_reached_prints_no_floor_analysis() -> None:
    objectives = [
        {"name": "sync randwrite-4k / unrepl", "kind": "ratio", "value": 0.5, "goal": 0.4,
         "op": ">=", "reached": True},
    ]  # fmt: skip
    assert bench.format_floors(objectives) == ""
    assert bench.format_objectives(objectives).splitlines()[2].split()[-3:] == [">=", "0.4", "ok"]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_quick_replicated_run_end_to_end(tmp_path: Path) -> None:
    """One quick sync+async run in a real lab, its metrics scraped: structure only, never
    speeds."""
    require_root()
    require_programs("nbdkit", "fio", "ip", "nbdcopy")
    out = tmp_path / "result.json"
    argv = ["bench", "--suite", "replicated", "--quick", "--size", "16M", "--lag-runtime", "1"]
    argv += ["--scrape", "0.2"]
    code = main([*argv, "--json-out", str(out), "--dir", str(tmp_path / "work")])
    assert code == 0
    doc = json.loads(out.read_text())
    assert (doc["suite"], doc["baseline"], doc["summary"]) == ("replicated", None, [])
    rep = doc["replicated"]
    assert rep["baseline"] == "unrepl"
    assert [t["name"] for t in rep["targets"]] == ["sync", "async", "unrepl"]
    assert [r["workload"] for r in rep["summary"]] == ["randwrite-4k", "write-1m"]
    for row in rep["summary"]:
        assert set(row["ratio"]) == {"sync", "async"} and set(row["goals"]) == {"sync", "async"}
    assert len(rep["samples"]) == 2 * 3
    for s in rep["samples"]:
        if s["target"] != "unrepl":
            assert s["notes"]["state_end"] in ("PAIR", "PFUL", "PFUS"), s
    assert {s["method"] for s in rep["resync"]["samples"]} == {"resync", "nbdcopy"}
    assert rep["resync"]["summary"]["ratio"] > 0
    assert [x["workload"] for x in rep["lag"]] == ["randwrite-4k", "write-1m"]
    assert all("p99_s" in x or x["samples"] == 0 for x in rep["lag"])
    scrape = rep["notes"]["scrape"]
    assert (doc["config"]["scrape_s"], scrape["interval_s"], sorted(scrape["hosts"])) == (
        0.2, 0.2, ["a", "b"],
    )  # fmt: skip
    assert all(h["scrapes"] > 0 for h in scrape["hosts"].values()), scrape
    # The lab is gone: no namespace, no node process, no registry left behind.
    lab = rep["lab"]["name"]
    assert not [ns for ns in Path("/run/netns").glob(f"{lab}-*")]
    assert not [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path) in cmdline(p)]
    assert not (tmp_path / "work" / "labs" / lab).exists()
    addresses = [h["address"] for h in rep["lab"]["hosts"].values()]
    assert not [
        p
        for p in Path("/proc").glob("[0-9]*")
        if "pairvol.bench_scrape" in cmdline(p) and any(a in cmdline(p) for a in addresses)
    ]  # no scraper left


def test_the_resyncs_nbdcopy_baseline_is_flushed_as_the_resync_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resync ends with a Flush (its copy is durable before PAIR); an nbdcopy without
    ``--flush`` leaves 1 GiB in b's page cache and once made the resync look 0.5x of it
    where, flushed, it is 0.75x."""
    flushed: list[bool] = []

    def nbdcopy(lab: Any, src: str, size: int, rnd: int, *, flush: bool = False) -> Any:
        flushed.append(flush)
        return bench.CopySample(rnd, "nbdcopy", size, 1.0)

    def resync(cfg: Any, t: Any, rnd: int, workdir: Path) -> Any:
        return bench.CopySample(rnd, "resync", t.size, 1.0)

    class Lab:
        def create_volume(self, host: str, name: str, size: int) -> tuple[Path, int]:
            return tmp_path / name, 0

    class Target:
        lab = Lab()
        name = "v"
        size = 1 << 20

    monkeypatch.setattr(bench, "timed_nbdcopy", nbdcopy)
    monkeypatch.setattr(bench, "timed_resync", resync)
    monkeypatch.setattr(bench, "fill_region", lambda *a, **k: None)
    cfg = bench.BenchConfig(rounds=2)
    samples = bench.measure_copies(cfg, Target(), Target(), tmp_path, lambda line: None)  # type: ignore[arg-type]
    assert sorted(s.method for s in samples) == ["nbdcopy", "nbdcopy", "resync", "resync"]
    assert flushed == [True, True]
