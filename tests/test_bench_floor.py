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


def test_async_floor_journals_on_both_nodes_and_charges_the_first_lap() -> None:
    us = {"journal_append_1m": 250, "journal_read_1m": 120, "encode_write_1m": 40}
    us |= {"tcp_1m_a": 100, "decode_ack": 5, "tcp_1m_b": 50, "decode_write_1m": 100}
    us |= {"pwritev_1m": 30, "pwritev_1m_fresh": 230, "crc32c_1m": 1000, "pwritev_4k": 7}
    floor = bench_floor.async_floor(
        steps_of(us), {"1m": 300.0}, {"1m": 100.0}, {"1m": 2000.0}, cores=2, disk_mib_s=900.0
    )
    assert list(floor) == ["1m"]
    # 900 MiB/s of durable appends: each MiB is made durable 3 times on this machine's one
    # disk (a's journal, b's journal, b's volume), twice on b's disk of two hosts
    disk = floor["1m"]["disk"]
    assert disk["rate"] == {"this_machine": 300.0, "two_hosts": 450.0}
    assert disk["ratio"] == {"this_machine": 0.15, "two_hosts": 0.225}
    warm, lap = floor["1m"]["warm"], floor["1m"]["first_lap"]
    # a: the unreplicated write, its journal append, reading it back, the frame, the socket
    assert (warm["a_us"], warm["local_us"]) == (815.0, 300.0)
    # b: the socket, the frame, its own journal append and read back, the volume's pwritev
    assert warm["b_us"] == 550.0
    assert warm["b_steps"] == [
        "tcp_1m_b", "decode_write_1m", "journal_append_1m", "journal_read_1m", "pwritev_1m"
    ]  # fmt: skip
    # the first lap: each node's journal pwritev lands in new pages, 230 - 30 µs more
    assert (lap["a_us"], lap["b_us"], lap["extra_per_journal_us"]) == (1015.0, 750.0, 200.0)
    # 2 cores / (815 + 550 + 100 µs) and 2 / (1015 + 750 + 100 µs), against 2000 MiB/s
    assert warm["ceilings"]["rate"]["this_machine"] == pytest.approx(1365.2)
    assert lap["ceilings"]["rate"]["this_machine"] == pytest.approx(1072.4)
    assert lap["ceilings"]["ratio"]["two_hosts_gil"] == pytest.approx(0.493)  # 1 / 1015 µs


def test_the_disk_steps_stay_within_their_iteration_caps(tmp_path: Path) -> None:
    steps = bench_floor.measure_steps(tmp_path, iterations=500, repeats=1)
    for name, cap in bench_floor.DISK_ITERATIONS.items():
        assert steps[name]["iterations"] == cap, name  # a journal never fills, the disk is spared
    assert steps["crc32c_1m"]["iterations"] == 500
    assert list(tmp_path.iterdir()) == []


def test_the_disk_measurement_times_durable_appends_and_leaves_nothing(tmp_path: Path) -> None:
    disk = bench_floor.measure_disk(tmp_path, writers=2, appends=2, rounds=2)
    assert (disk["writers"], disk["appends"], len(disk["rounds_mib_s"])) == (2, 2, 2)
    assert all(math.isfinite(r) and r > 0 for r in disk["rounds_mib_s"])
    assert min(disk["rounds_mib_s"]) <= disk["mib_s"] <= max(disk["rounds_mib_s"])
    assert list(tmp_path.iterdir()) == []
    no_disk = bench_floor.async_floor(steps_of({}), {}, {}, {}, cores=2)
    assert "disk" not in no_disk["1m"]
