"""The failover benchmark: its pure parts, and one small real run (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import require_programs, require_root

from cluster.config import Timing
from pairvol import bench_failover as bf
from pairvol.cli import build_parser, main
from pairvol.cli.bench import failover_config_from_args
from replicator.errors import UsageError

# -- the configuration and its options -------------------------------------------------------


def test_defaults_measure_ten_kills_of_each_mode() -> None:
    cfg = bf.FailoverConfig()
    assert cfg.modes == ("sync", "async") and cfg.kills == 10 and cfg.switchovers >= 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kills": 0}, "--kills"),
        ({"kills": True}, "--kills"),
        ({"switchovers": -1}, "--switchovers"),
        ({"modes": ()}, "--modes"),
        ({"modes": ("sync", "semi")}, "semi"),
        ({"modes": ("sync", "sync")}, "twice"),
        ({"size": 4096}, "--size"),
        ({"size": (1 << 20) + 1}, "--size"),
        ({"journal_size": 1024}, "--journal-size"),
        ({"probe_interval": 0.0}, "probe"),
        ({"timeout": 0.0}, "timeout"),
    ],
)
def test_a_bad_configuration_is_one_usage_error(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        bf.FailoverConfig(**changes)


def failover_args(*argv: str) -> bf.FailoverConfig:
    return failover_config_from_args(
        build_parser().parse_args(["bench", "--suite", "failover", *argv])
    )


def test_options_quick_and_explicit_values() -> None:
    assert failover_args() == bf.FailoverConfig()
    quick = failover_args("--quick")
    assert (quick.kills, quick.switchovers, quick.size) == (3, 1, 16 << 20)
    cfg = failover_args("--quick", "--kills", "2", "--modes", "sync", "--size", "8M",
                        "--switchovers", "0", "--journal-size", "4M")  # fmt: skip
    assert (cfg.kills, cfg.modes, cfg.size, cfg.switchovers) == (2, ("sync",), 8 << 20, 0)
    assert cfg.journal_size == 4 << 20
    assert failover_args("--modes", "async, sync").modes == ("async", "sync")


@pytest.mark.parametrize(
    "argv",
    [
        ["--suite", "failover", "--kills", "0"],
        ["--suite", "failover", "--modes", "sync,nope"],
        ["--suite", "failover", "--rounds", "2"],  # fio options do not apply: refused
        ["--suite", "failover", "--runtime", "5"],
        ["--suite", "failover", "--workloads", "randread-4k"],
        ["--kills", "3"],  # failover options with another suite: refused
        ["--suite", "sync", "--modes", "sync"],
    ],
)
def test_bad_options_exit_2_before_anything_runs(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", *argv, "--dir", str(tmp_path / "w"), "--json-out", str(tmp_path / "o")])
    assert code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_failover_is_a_suite_of_the_command() -> None:
    assert build_parser().parse_args(["bench", "--suite", "failover"]).suite == "failover"


# -- statistics ------------------------------------------------------------------------------


def test_summarize_times_median_nearest_rank_p90_max() -> None:
    values = [1.9, 1.5, 2.4, 1.6, 1.7, 1.8, 2.0, 2.1, 2.2, 2.3]
    s = bf.summarize_times(values)
    assert s == {"n": 10, "missing": 0, "median": 1.95, "p90": 2.3, "min": 1.5, "max": 2.4}
    s = bf.summarize_times([3.0, None, 1.0, 2.0])
    assert (s["n"], s["missing"], s["median"], s["p90"], s["max"]) == (3, 1, 2.0, 3.0, 3.0)
    assert bf.summarize_times([]) == {"n": 0, "missing": 0}
    assert bf.summarize_times([None, None]) == {"n": 0, "missing": 2}


def test_expected_expiry_of_the_default_timing() -> None:
    # TTL 2 s renewed every second, the key gone 0.5 s after expiry: 1.5 to 2.5 s, median 2
    assert bf.expected_expiry(Timing()) == {"median_s": 2.0, "min_s": 1.5, "max_s": 2.5}
    # heard up to 0.2 s before the kill, confirmed until 1 s unheard, then 1 s + 0.25 s more
    assert bf.expected_hold(Timing(), 0.25) == {"min_s": 1.85, "max_s": 2.25}


# -- the audit of the agents' events ---------------------------------------------------------


def ev(event: str, resource: str | None = "r", **fields: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"ts": 100.0, "event": event, **fields}
    if resource is not None:
        e["resource"] = resource
    return e


def test_a_clean_kill_window_has_nothing_spurious() -> None:
    window = bf.Window("kill 1", expected="b", promotion=True, killed="a")
    events = {
        "a": [ev("cluster.started", None), ev("cluster.standby", epoch=0)],  # restarted
        "b": [ev("cluster.promoting", epoch=3), ev("cluster.active", epoch=3),
              ev("cluster.failover.done", epoch=3), ev("cluster.peer.up", None, peer="a")],
    }  # fmt: skip
    assert bf.audit(window, events) == ([], [])


def test_an_active_on_the_wrong_host_or_a_second_promotion_is_spurious() -> None:
    window = bf.Window("kill 2", expected="a", promotion=True, killed="b")
    events = {
        "a": [ev("cluster.active", epoch=4), ev("cluster.active", epoch=5)],
        "b": [ev("cluster.active", epoch=6)],
    }
    spurious, _ = bf.audit(window, events)
    assert [(s["host"], s["epoch"]) for s in spurious] == [("a", 5), ("b", 6)]
    assert spurious[0]["window"] == "kill 2" and "none was due" in spurious[0]["why"]
    assert "expected a" in spurious[1]["why"]


def test_the_live_active_fenced_is_spurious_the_killed_hosts_fence_is_not() -> None:
    window = bf.Window("kill 1", expected="b", promotion=True, killed="a")
    events = {
        "a": [ev("cluster.fenced", epoch=2, why="agent start")],
        "b": [ev("cluster.active", epoch=3), ev("cluster.fenced", epoch=3, why="lease")],
    }
    spurious, _ = bf.audit(window, events)
    assert [(s["host"], s["event"]) for s in spurious] == [("b", "cluster.fenced")]
    assert "lease" in spurious[0]["why"]


def test_no_promotion_due_an_again_announcement_and_other_resources() -> None:
    window = bf.Window("steady", expected="a", promotion=False)
    events = {
        "a": [ev("cluster.active", epoch=2, again=True)],  # back from the failsafe: no move
        "b": [ev("cluster.active", "other", epoch=9)],  # not this resource
    }
    assert bf.audit(window, events) == ([], [])
    spurious, _ = bf.audit(window, {"a": [ev("cluster.active", epoch=3)]})
    assert len(spurious) == 1


def test_warning_events_are_counted_not_flagged() -> None:
    window = bf.Window("setup", expected="a", promotion=True)
    events = {
        "a": [ev("cluster.active", epoch=1), ev("cluster.failsafe", epoch=1)],
        "b": [ev("cluster.etcd.unreachable", None, reason="x"), ev("cluster.lease.lost", None),
              ev("cluster.etcd.unreachable", None, reason="y")],
    }  # fmt: skip
    spurious, notable = bf.audit(window, events)
    assert spurious == []
    assert bf.count_events(notable) == {"cluster.etcd.unreachable": 2, "cluster.failsafe": 1,
                                        "cluster.lease.lost": 1}  # fmt: skip
    assert [(e["window"], e["host"]) for e in notable][:2] == [("setup", "a"), ("setup", "b")]
    assert notable[1]["reason"] == "x"


# -- tables ----------------------------------------------------------------------------------


def kill(rnd: int, write: float | None, error: str | None = None) -> dict[str, Any]:
    killed, new = ("a", "b") if rnd % 2 == 0 else ("b", "a")
    return {"mode": "sync", "round": rnd, "killed": killed, "new_active": new, "write_s": write,
            "active_s": write, "promoting_s": None if write is None else write - 0.01,
            "kill_s": 0.03, "agent_seconds": 0.2, "attempts": 300, "recover_s": 3.5,
            "error": error}  # fmt: skip


def mode_doc(rounds: list[dict[str, Any]], switch: dict[str, Any]) -> dict[str, Any]:
    keys = ("write_s", "active_s", "promoting_s")
    return {
        "rounds": rounds,
        "summary": {k: bf.summarize_times([r[k] for r in rounds]) for k in keys},
        "switchover": switch,
        "spurious": [],
        "warnings": {},
        "error": None,
    }


def fake_doc() -> dict[str, Any]:
    settings = {"lease_ttl": 2, "lease_renew_interval": 1.0, "heartbeat_interval": 0.2,
                "heartbeat_timeout": 1.0, "etcd_timeout": 0.5, "fence_margin": 0.25,
                "expected_lease_expiry": bf.expected_expiry(Timing()),
                "expected_confirmation_hold": bf.expected_hold(Timing(), 0.25)}  # fmt: skip
    unavailable = {"available": False, "why": "not available: no such command", "rounds": [],
                   "summary": {}}  # fmt: skip
    switch_round = {"mode": "async", "round": 0, "source": "a", "target": "b",
                    "command_s": 1.2, "write_s": 0.8, "active_s": 0.7, "accepted_s": 0.45,
                    "error": None}  # fmt: skip
    keys = ("write_s", "active_s", "command_s", "accepted_s")
    switched = {"available": True, "why": "", "rounds": [switch_round],
                "summary": {k: bf.summarize_times([switch_round[k]]) for k in keys}}  # fmt: skip
    sync = mode_doc([kill(0, 1.8), kill(1, 2.2)], unavailable)
    sync["spurious"] = [{"window": "kill 2", "host": "b", "event": "cluster.fenced",
                         "why": "the live active b was fenced: lease"}]  # fmt: skip
    sync["warnings"] = {"cluster.failsafe": 1}
    asyn = mode_doc([kill(0, 1.5), kill(1, None, "no write acknowledged")], switched)
    asyn["error"] = "Timeout: kill 2: no write acknowledged"
    return {"settings": settings, "anchors": dict(bf.ANCHORS), "target_median_s": 2.0,
            "modes": {"sync": sync, "async": asyn}}  # fmt: skip


def test_the_table_shows_medians_switchovers_settings_and_anchors() -> None:
    text = bf.table_of(fake_doc())
    assert "sync: first write" in text and "2.000" in text  # the median of 1.8 and 2.2
    assert "not available" in text  # sync has no switchover: no number
    assert "0.800" in text and "1.200" in text  # async's switchover and its command
    assert "0.450" in text  # when the active took the request
    assert "SPURIOUS in kill 2: cluster.fenced on b" in text
    assert "warning events: cluster.failsafe x1" in text
    assert "async: stopped early: Timeout" in text
    assert "lease_ttl 2 s, renewed every 1 s, heartbeat every 0.2 s" in text
    assert "median 2 s, 1.5 to 2.5 s" in text and "would end 1.85 to 2.25 s" in text
    assert "corosync token (default, alone) 3 s" in text and "Patroni ttl (default) 30 s" in text
    assert "Kubernetes lease (default) 15 s" in text
    assert "NOT reached" in text  # sync's median is 2.0, not under 2 s
    rows = [line for line in text.splitlines() if line.startswith(("sync kill", "async kill"))]
    assert len(rows) == 4 and "no write acknowledged" in rows[-1]
    (switch,) = [line for line in text.splitlines() if line.startswith("async switch 1")]
    assert switch.split()[3:5] == ["a", "b"]
    only_sync = {"modes": {"sync": fake_doc()["modes"]["sync"]}}
    assert "switchover" not in bf.format_rounds_table(only_sync)


def test_the_target_verdict() -> None:
    doc = fake_doc()
    doc["modes"]["sync"] = mode_doc(
        [kill(0, 1.8), kill(1, 1.9)], doc["modes"]["sync"]["switchover"]
    )
    assert "median failover under 2 s: reached" in bf.format_settings(doc)
    for m in doc["modes"].values():
        m["summary"]["write_s"] = {"n": 0, "missing": 1}
    assert "no measurement" in bf.format_settings(doc)


# -- one small real run ----------------------------------------------------------------------


@pytest.mark.privileged
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_kills_of_a_sync_resource_in_a_real_lab(tmp_path: Path) -> None:
    """Structure only, never speeds."""
    require_root()
    require_programs("ip", "nbdkit", "etcd")
    pytest.importorskip("nbd")
    out = tmp_path / "failover.json"
    argv = ["bench", "--suite", "failover", "--modes", "sync", "--kills", "2",
            "--switchovers", "1", "--size", "8M"]  # fmt: skip
    code = main([*argv, "--json-out", str(out), "--dir", str(tmp_path / "work")])
    doc = json.loads(out.read_text())
    assert code == 0, doc["errors"]
    assert doc["suite"] == "failover" and list(doc["modes"]) == ["sync"]
    m = doc["modes"]["sync"]
    assert [(r["killed"], r["new_active"]) for r in m["rounds"]] == [("a", "b"), ("b", "a")]
    for r in m["rounds"]:
        assert r["error"] is None
        assert r["write_s"] is not None and r["active_s"] is not None and r["attempts"] >= 1
        assert r["recover_s"] is not None
    assert m["summary"]["write_s"]["n"] == 2
    assert m["spurious"] == [], m["spurious"]
    so = m["switchover"]
    if so["available"]:
        assert len(so["rounds"]) == 1 and so["rounds"][0]["error"] is None
    else:
        assert so["rounds"] == [] and "not available" in so["why"]
    for key in ("lease_ttl", "lease_renew_interval", "heartbeat_interval", "heartbeat_timeout"):
        assert doc["settings"][key] > 0, key
    assert set(doc["anchors"]) == set(bf.ANCHORS)
    # The lab is gone: no namespace and no registry left behind.
    lab = m["lab"]["name"]
    assert not list(Path("/run/netns").glob(f"{lab}-*"))
    assert not (tmp_path / "work" / "labs" / lab).exists()
