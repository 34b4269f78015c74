"""The benchmark harness: its pure parts, and one tiny end-to-end run (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import require_programs

from pairvol import bench
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
