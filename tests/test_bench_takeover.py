"""The takeover benchmark: its pure parts, and one small real run (no timing assertions)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import require_programs, require_root

from pairvol import bench
from pairvol import bench_takeover as bt
from pairvol.cli import build_parser, main
from pairvol.cli.bench import takeover_config_from_args
from replicator.errors import UsageError

M = 1 << 20

# -- the configuration and its options -------------------------------------------------------


def test_defaults_three_backlogs_on_volumes_of_one_size() -> None:
    cfg = bt.TakeoverConfig()
    assert cfg.sizes == (64 * M, 256 * M, 1024 * M) and cfg.rounds == 2 and cfg.reads == 200
    assert cfg.volume_size == 1024 * M + cfg.tail  # the same at every backlog size
    assert cfg.pending_size % bt.WRITE == 0
    assert cfg.pending_size // bt.CHUNK >= cfg.reads + cfg.reads // 4  # a margin for the pull


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sizes": ()}, "--sizes"),
        ({"sizes": (512 << 10,)}, "--sizes"),
        ({"sizes": (M + 4096,)}, "--sizes"),
        ({"sizes": (8 * M, 8 * M)}, "twice"),
        ({"rounds": 0}, "--rounds"),
        ({"rounds": True}, "--rounds"),
        ({"reads": 5}, "--reads"),
        ({"tail": 0}, "tail"),
        ({"local_size": 4096}, "local"),
        ({"ship_rate": 100}, "limits"),
        ({"pull_rate": 0}, "limits"),
    ],
)
def test_a_bad_configuration_is_one_usage_error(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        bt.TakeoverConfig(**changes)


def test_the_journal_holds_the_backlog_below_the_high_watermark() -> None:
    for size in (8 * M, 64 * M, 1024 * M):
        assert size < 0.8 * bt.journal_size(size)


def takeover_args(*argv: str) -> bt.TakeoverConfig:
    return takeover_config_from_args(
        build_parser().parse_args(["bench", "--suite", "takeover", *argv])
    )


def test_options_quick_and_explicit_values() -> None:
    assert takeover_args() == bt.TakeoverConfig()
    quick = takeover_args("--quick")
    assert quick.sizes == (8 * M, 16 * M, 32 * M) and (quick.rounds, quick.reads) == (1, 50)
    assert quick.volume_size == 32 * M + quick.tail
    cfg = takeover_args("--quick", "--sizes", "4M, 12M", "--rounds", "3", "--reads", "20",
                        "--dir", "/tmp/x")  # fmt: skip
    assert (cfg.sizes, cfg.rounds, cfg.reads) == ((4 * M, 12 * M), 3, 20)
    assert cfg.workdir == Path("/tmp/x") and cfg.tail == quick.tail
    assert bt.parse_sizes("64M,1G") == (64 * M, 1024 * M)


@pytest.mark.parametrize(
    "argv",
    [
        ["--suite", "takeover", "--sizes", "8M,8M"],
        ["--suite", "takeover", "--sizes", "100K"],
        ["--suite", "takeover", "--reads", "3"],
        ["--suite", "takeover", "--runtime", "5"],  # the other suites' options: refused
        ["--suite", "takeover", "--size", "8M"],
        ["--suite", "takeover", "--journal-size", "8M"],
        ["--suite", "takeover", "--lag-runtime", "1"],
        ["--suite", "takeover", "--workloads", "randread-4k"],
        ["--suite", "takeover", "--kills", "2"],
        ["--suite", "takeover", "--modes", "sync"],
        ["--suite", "takeover", "--tls"],
        ["--sizes", "8M"],  # its own options with another suite: refused
        ["--suite", "async", "--reads", "20"],
        ["--suite", "failover", "--sizes", "8M"],
    ],
)
def test_bad_options_exit_2_before_anything_runs(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", *argv, "--dir", str(tmp_path / "w"), "--json-out", str(tmp_path / "o")])
    assert code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_takeover_is_a_suite_of_the_command() -> None:
    assert build_parser().parse_args(["bench", "--suite", "takeover"]).suite == "takeover"
    assert bench.default_json_path(suite="takeover").name.startswith("takeover-")


# -- statistics and targets ------------------------------------------------------------------


def sample(rnd: int, size: int, call: float, read: float = 0.002, **kw: Any) -> bt.ReadySample:
    fields: dict[str, Any] = {
        "round": rnd, "size": size, "group": f"r{rnd}", "backlog_bytes": size - M,
        "backlog_entries": size // M - 1, "state_before": "PAIR",
        "pending_chunks": size // bt.CHUNK, "takeover_s": call, "connect_s": 0.001,
        "read_s": read, "fetched": True, "pull_s": 1.0, "reverse_s": 0.5,
        "reverse_copy_bytes": size, "reverse_overwrote_chunks": size // bt.CHUNK, "mismatches": 0,
    }  # fmt: skip
    return bt.ReadySample(**{**fields, **kw})


def test_a_sample_adds_up_the_time_to_ready_and_the_pull_rate() -> None:
    s = sample(0, 64 * M, 0.1, 0.004, pull_s=2.0)
    assert s.first_read_s == pytest.approx(0.005) and s.ready_s == pytest.approx(0.105)
    assert s.pulled_bytes == 64 * M and s.pull_mib_s == pytest.approx(32.0)
    assert sample(0, 8 * M, 0.1, pull_s=None).pull_mib_s is None
    d = bt.ready_json(s)
    assert d["ready_s"] == pytest.approx(0.105) and d["pull_mib_s"] == 32.0


def test_summarize_ready_medians_spread_and_failures_per_size() -> None:
    samples = [
        sample(0, 8 * M, 0.10), sample(1, 8 * M, 0.30), sample(2, 8 * M, 0.20),
        sample(0, 64 * M, 0.50, fetched=False), sample(1, 64 * M, 9.0, error="wrong data"),
    ]  # fmt: skip
    small, large, missing = bt.summarize_ready(samples, [8 * M, 64 * M, 1024 * M])
    assert (small["n"], small["failed"]) == (3, 0)
    assert small["takeover_s"] == 0.2 and small["ready_s"] == pytest.approx(0.203)
    assert small["ready_per_round"] == [0.103, 0.303, 0.203]
    assert (small["ready_min_s"], small["ready_max_s"]) == (0.103, 0.303)
    assert small["backlog_bytes"] == 7 * M and small["pending_chunks"] == 128
    assert (large["n"], large["failed"], large["fetched"]) == (1, 1, 0)
    assert missing == {"size": 1024 * M, "n": 0, "failed": 0}


def test_fetched_reads_during_the_full_speed_pull_are_summed_up_per_size() -> None:
    samples = [
        sample(0, 64 * M, 0.1, busy_fetched_s=(0.001, 0.003)),
        sample(1, 64 * M, 0.1, busy_fetched_s=(0.002,)),
        sample(0, 8 * M, 0.1),  # the pull was over before the second read
    ]
    small, large = bt.summarize_ready(samples, [8 * M, 64 * M])
    assert small["busy_fetched"] == {"n": 0}
    assert (large["busy_fetched"]["n"], large["busy_fetched"]["p50_ms"]) == (3, 2.0)
    text = bt.format_ready_table({"ready": {"summary": [small, large]}})
    assert "fetched reads during the full-speed pull (ms)" in text
    assert [line.split()[:3] for line in text.splitlines() if line.startswith("64M")][-1] == [
        "64M",
        "written",
        "3",
    ]


def test_latency_stats_in_milliseconds_nearest_rank() -> None:
    s = bt.latency_stats([i / 1000 for i in range(1, 101)])  # 1 ms .. 100 ms
    assert (s["n"], s["p50_ms"], s["p99_ms"], s["max_ms"]) == (100, 50.0, 99.0, 100.0)
    assert s["mean_ms"] == 50.5
    assert bt.latency_stats([]) == {"n": 0}


def copy(rnd: int, size: int, seconds: float) -> bench.CopySample:
    return bench.CopySample(rnd, "nbdcopy", size, seconds)


def test_summarize_hydration_ratio_of_medians_and_per_round() -> None:
    samples = [sample(0, 64 * M, 0.1, pull_s=1.0), sample(1, 64 * M, 0.1, pull_s=2.0),
               sample(0, 8 * M, 0.1, pull_s=None)]  # fmt: skip
    copies = [copy(0, 64 * M, 0.5), copy(1, 64 * M, 1.0), copy(0, 8 * M, 0.1)]
    big, small = bt.summarize_hydration(samples, copies, [64 * M, 8 * M])
    assert big["pull_mib_s"] == 48.0 and big["nbdcopy_mib_s"] == 96.0  # medians of 64, 32
    assert big["ratio"] == 0.5 and big["round_ratios"] == [0.5, 0.5]
    assert big["pulled_bytes"] == 64 * M and big["pull_s"] == 1.5
    assert big["reverse_s"] == 0.5 and big["reverse_copy_bytes"] == 64 * M  # all of it, again
    assert small == {"size": 8 * M, "n": 0}  # no pull rate: no row


def test_targets_reached_not_reached_and_not_measured() -> None:
    ready = [{"size": 8 * M, "n": 2, "ready_s": 0.2}, {"size": 64 * M, "n": 2, "ready_s": 0.9}]
    hydration = [{"size": 8 * M, "n": 1, "ratio": 0.5}, {"size": 64 * M, "n": 1, "ratio": 0.85}]
    latency = {"fetched": {"p50_ms": 0.5}, "round_trip": {"p50_ms": 0.2}}
    t = bt.targets(ready, latency, hydration)
    assert t["ready"]["reached"] is True and t["ready"]["value"] == 0.9
    assert t["hydration"]["reached"] is True and t["hydration"]["size"] == 64 * M  # the largest
    assert t["fetched_read"]["value"] == 2.5 and t["fetched_read"]["reached"] is False
    ready[1]["ready_s"] = 1.0
    assert bt.targets(ready, latency, hydration)["ready"]["reached"] is False
    ready[1] = {"size": 64 * M, "n": 0, "failed": 2}  # a size never measured: not "reached"
    assert bt.targets(ready, latency, hydration)["ready"]["reached"] is None
    none = bt.targets([], None, [])
    assert {k: v["reached"] for k, v in none.items()} == {
        "ready": None, "hydration": None, "fetched_read": None}  # fmt: skip


# -- the report and its tables ---------------------------------------------------------------


def fake_doc() -> dict[str, Any]:
    cfg = bt.TakeoverConfig(sizes=(8 * M, 64 * M), rounds=2, reads=10)
    latency = {
        "pull_rate": M, "node_fetch_ms_avg": 0.6, "node_fetched_on_demand": 10,
        "summary": {
            "fetched": bt.latency_stats([0.0009] * 10),
            "local": bt.latency_stats([0.0002] * 10),
            "round_trip": bt.latency_stats([0.0004] * 10),
            "round_trip_chunk": bt.latency_stats([0.0005] * 10),
            "pending_not_fetched": bt.latency_stats([]),
        },
    }  # fmt: skip
    runner = SimpleNamespace(
        ready=[sample(0, 8 * M, 0.02), sample(1, 8 * M, 0.04), sample(0, 64 * M, 1.5),
               sample(1, 64 * M, 1.7, mismatches=3)],
        copies=[copy(0, 8 * M, 0.1), copy(1, 8 * M, 0.1), copy(0, 64 * M, 0.5),
                copy(1, 64 * M, 0.5)],
        latency=latency,
        verify=[{"scenario": "ready 64M round 2", "group": "r4", "mismatches": 3,
                 "pair_errors": [{"host": "b", "reason": "the secondary refused"}]}],
        errors=["ready 64M round 2: pair verify: 3 chunks differ"],
    )  # fmt: skip
    started = dt.datetime(2025, 6, 11, 12, 0, tzinfo=dt.UTC)
    return bt.report(cfg, runner, {"name": "pvt1"}, {"nproc": 2}, started, 42.0)  # type: ignore[arg-type]


def test_the_report_is_json_with_its_schema() -> None:
    doc = json.loads(json.dumps(fake_doc()))
    assert (doc["schema"], doc["suite"], doc["duration_s"]) == (1, "takeover", 42.0)
    assert doc["config"]["sizes"] == [8 * M, 64 * M] and doc["config"]["volume_size"] > 64 * M
    assert [r["size"] for r in doc["ready"]["summary"]] == [8 * M, 64 * M]
    assert len(doc["ready"]["samples"]) == 4 and "ready_s" in doc["ready"]["samples"][0]
    assert [h["size"] for h in doc["hydration"]["summary"]] == [8 * M, 64 * M]
    assert doc["hydration"]["nbdcopy_samples"][0]["mib_s"] == 80.0
    assert doc["targets"]["ready"]["reached"] is False  # 64M: 1.6 s
    assert doc["targets"]["fetched_read"]["value"] == 2.25
    assert doc["errors"] and doc["verify"][0]["mismatches"] == 3


def test_the_table_shows_every_part_and_each_target() -> None:
    text = bt.table_of(fake_doc())
    small = next(line for line in text.splitlines() if line.startswith("8M written"))
    assert "0.033" in small and "0.023,0.043" in small and "ok" in small
    assert any(line.startswith("64M written") and "over" in line for line in text.splitlines())
    assert "pending, fetched (4K)" in text and "round trip b->a (64K)" in text
    assert "pulled before the read" not in text  # none: no row
    assert "timed its 10 fetches on demand at 0.600 ms" in text
    assert "ready under 1 s at every size: NOT reached, worst median 1.603 s" in text
    assert "(at 64M 48.6x the time at 8M)" in text
    assert "hydration >= 0.8x nbdcopy: NOT reached, 0.50x at 64M" in text
    assert "NOT reached, 2.25 round trips (0.900 ms against 0.400 ms)" in text
    assert "ERROR: ready 64M round 2: pair verify found 3 chunks differ" in text
    assert "note: ready 64M round 2: pair.error on b: the secondary refused" in text
    row = [line for line in text.splitlines() if line.startswith("64M written")][-1]  # hydration
    assert row.split()[-2:] == ["0.50", "64.0M"]  # the swap back: its seconds, what it copied


def test_a_report_without_latency_says_so() -> None:
    doc = fake_doc()
    doc["latency"] = {"error": "latency: Timeout: no pull"}
    assert "read latency: not measured (latency: Timeout: no pull)" in bt.table_of(doc)


# -- one small real run ----------------------------------------------------------------------


@pytest.mark.privileged
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_quick_run_in_a_real_lab(tmp_path: Path) -> None:
    """Structure only, never speeds: the smallest quick size, few reads."""
    require_root()
    require_programs("ip", "nbdkit", "nbdcopy")
    pytest.importorskip("nbd")
    out = tmp_path / "takeover.json"
    argv = ["bench", "--suite", "takeover", "--quick", "--sizes", "8M", "--reads", "20"]
    code = main([*argv, "--json-out", str(out), "--dir", str(tmp_path / "work")])
    doc = json.loads(out.read_text())
    assert code == 0, doc["errors"]
    assert doc["suite"] == "takeover" and doc["errors"] == []
    (s,) = doc["ready"]["samples"]
    assert s["error"] is None and s["mismatches"] == 0 and s["pending_chunks"] > 0
    assert s["takeover_s"] > 0 and s["pull_s"] is not None and s["backlog_bytes"] > 0
    (h,) = doc["hydration"]["summary"]
    assert h["n"] == 1 and h["ratio"] > 0
    lat = doc["latency"]["summary"]
    assert lat["fetched"]["n"] + lat["pending_not_fetched"]["n"] == 20
    assert lat["local"]["n"] == lat["round_trip"]["n"] == lat["round_trip_chunk"]["n"] == 20
    assert doc["latency"]["mismatches"] == 0 and doc["latency"]["wrong_data"] == 0
    assert [v["mismatches"] for v in doc["verify"]] == [0, 0]
    assert set(doc["targets"]) == {"ready", "hydration", "fetched_read"}
    # The lab is gone: no namespace and no registry left behind.
    lab = doc["lab"]["name"]
    assert not list(Path("/run/netns").glob(f"{lab}-*"))
    assert not (tmp_path / "work" / "labs" / lab).exists()
