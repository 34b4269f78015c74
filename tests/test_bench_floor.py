"""The per-step floor of a replicated write: the measurement's shape and the sums (never speeds)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from pairvol import bench_floor


def test_every_step_measures_a_positive_finite_cpu_time(tmp_path: Path) -> None:
    steps = bench_floor.measure_steps(tmp_path, iterations=2, repeats=2)
    assert list(steps) == list(bench_floor.STEPS)
    for name, s in steps.items():
        for key in ("us", "min_us", "max_us"):
            assert math.isfinite(s[key]) and s[key] > 0, (name, s)
        assert s["min_us"] <= s["us"] <= s["max_us"], (name, s)
        assert (s["iterations"], s["repeats"]) == (2, 2)
    assert list(tmp_path.iterdir()) == []  # the pwritev steps' temp file is gone


def steps_of(us: dict[str, float]) -> dict[str, dict[str, Any]]:
    return {name: {"us": us.get(name, 0.0)} for name in bench_floor.STEPS}


def test_sync_floor_adds_each_nodes_steps_and_the_local_write() -> None:
    us = {"encode_write_4k": 8, "tcp_4k_a": 9, "decode_ack": 6, "encode_ack": 2}
    us |= {"tcp_4k_b": 8, "decode_write_4k": 10, "pwritev_4k": 4, "crc32c_1m": 1000}
    floor = bench_floor.sync_floor(
        steps_of(us), {"4k": 77.0, "1m": None}, {"4k": 50.0}, {"4k": 10000.0}, cores=2
    )
    small = floor["4k"]
    assert (small["a_us"], small["b_us"], small["local_us"]) == (100.0, 24.0, 77.0)
    assert small["a_steps"] == ["encode_write_4k", "tcp_4k_a", "decode_ack"]
    c = small["ceilings"]
    # 2 cores / (100 + 24 + 50 µs); two hosts: 1 / 100 µs, and 2 / (100 + 50 µs) on a
    assert c["rate"]["this_machine"] == pytest.approx(11494.3)
    assert (c["rate"]["two_hosts_gil"], c["busier"], c["client_included"]) == (10000.0, "a", True)
    assert c["rate"]["two_hosts_all_cores"] == pytest.approx(13333.3)
    assert c["ratio"]["two_hosts_gil"] == 1.0
    large = floor["1m"]  # no local write, no client, no baseline: left out, no ratios
    assert (large["local_us"], large["client_us"]) == (None, None)
    assert not large["ceilings"]["client_included"] and "ratio" not in large["ceilings"]


def test_ceilings_without_any_cpu_are_unknown_not_infinite() -> None:
    c = bench_floor.ceilings(0.0, 0.0, None, 2, 100.0)
    assert c["rate"] == {"this_machine": None, "two_hosts_gil": None, "two_hosts_all_cores": None}
    assert c["ratio"] == c["rate"]


def test_the_step_table_lists_every_measured_step() -> None:
    s = {"us": 1.25, "min_us": 1.0, "max_us": 2.0, "iterations": 5, "repeats": 3}
    lines = bench_floor.format_steps({"crc32c_1m": s})
    assert lines[0] == ["step", "µs", "min-max µs", "iterations"]
    assert lines[1][0].startswith("crc32c_1m: ") and lines[1][1:] == ["1.2", "1.0-2.0", "5x3"]
