"""The Prometheus collectors against fake sources, the endpoint, the request counters, and the
``--metrics`` option's errors (replicator/metrics.py, cluster/metrics.py)."""

from __future__ import annotations

import importlib.util
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import PLUGIN
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from test_plugin_unit import StubNbdkit, configured, make

from cluster.metrics import AgentCollector, AgentSource
from pairvol.cli import main
from replicator import export
from replicator.errors import UsageError
from replicator.metrics import (
    PAIR_STATES,
    Address,
    NodeCollector,
    NodeSource,
    parse_address,
    serving,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(text: str) -> tuple[set[str], Samples]:
    """Family names (as the parser names them) and every sample by (name, labels)."""
    families = list(text_string_to_metric_families(text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {f.name for f in families}, samples


def collected(collector: Collector) -> tuple[set[str], Samples]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return scrape_text(generate_latest(registry).decode())


def lbl(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


PRIMARY_ASYNC: dict[str, Any] = {
    "group": "g1", "pair": "p1", "role": "primary", "state": "COPY", "epoch": 7,
    "dirty_bytes": 65536, "copy_bytes_sent": 1 << 20,
    "journal": {"group": "g1", "journal_bytes": 1 << 24, "journal_used": 4096,
                "lag_entries": 3, "lag_seconds": 0.25},
}  # fmt: skip
PRIMARY_ASYNC_2: dict[str, Any] = {**PRIMARY_ASYNC, "pair": "p2", "state": "PAIR"}
SECONDARY_SYNC: dict[str, Any] = {
    "group": "g2", "pair": "q", "role": "secondary", "state": "PSUE", "epoch": 2,
    "dirty_bytes": 0, "copy_bytes_sent": 0, "journal": None,
}  # fmt: skip
SECONDARY_ASYNC: dict[str, Any] = {
    "group": "g3", "pair": "s", "role": "secondary", "state": "PAIR", "epoch": 1,
    "dirty_bytes": 0, "copy_bytes_sent": 0,
    "journal": {"group": "g3", "journal_bytes": 1 << 20, "journal_used": 512,
                "received_seq": 10, "applied_seq": 8, "primary_newest_seq": 12},
}  # fmt: skip


def node_collector(pairs: list[dict[str, Any]], io: dict[str, tuple[int, int]]) -> NodeCollector:
    return NodeCollector(NodeSource("a", lambda: pairs, lambda: io, version="9.9"))


def test_the_node_collector_names_its_metrics_by_prometheus_rules() -> None:
    names, samples = collected(
        node_collector(
            [PRIMARY_ASYNC, PRIMARY_ASYNC_2, SECONDARY_SYNC, SECONDARY_ASYNC],
            {"read": (5, 20480), "write": (2, 8192), "flush": (1, 0)},
        )
    )
    for family in ("pairvol_node_info", "pairvol_io_requests", "pairvol_io_bytes",
                   "pairvol_pair_state", "pairvol_outofsync_bytes", "pairvol_copy_bytes",
                   "pairvol_epoch", "pairvol_journal_used_bytes", "pairvol_journal_lag_entries",
                   "pairvol_journal_lag_seconds"):  # fmt: skip
        assert family in names
    assert samples["pairvol_node_info", lbl(node="a", version="9.9")] == 1
    assert samples["pairvol_io_requests_total", lbl(op="read")] == 5
    assert samples["pairvol_io_bytes_total", lbl(op="write")] == 8192
    assert samples["pairvol_io_requests_total", lbl(op="trim")] == 0  # every op, counted or not
    assert ("pairvol_io_bytes_total", lbl(op="flush")) not in samples  # a flush has no bytes
    # A state set: one sample per state, 1 for the current one.
    pair = {"group": "g1", "pair": "p1", "role": "primary"}
    states = {s: samples["pairvol_pair_state", lbl(**pair, state=s)] for s in PAIR_STATES}
    assert states == {s: 1.0 if s == "COPY" else 0.0 for s in PAIR_STATES}
    assert samples["pairvol_pair_state", lbl(group="g2", pair="q", role="secondary",
                                             state="PSUE")] == 1  # fmt: skip
    assert samples["pairvol_outofsync_bytes", lbl(group="g1", pair="p1")] == 65536
    assert samples["pairvol_copy_bytes_total", lbl(group="g1", pair="p1")] == 1 << 20
    assert samples["pairvol_epoch", lbl(group="g1", pair="p1")] == 7
    # The group's journal once, though two pairs share it; the secondary's lag in entries.
    assert [k for k in samples if k[0] == "pairvol_journal_used_bytes"] == [
        ("pairvol_journal_used_bytes", lbl(group="g1")),
        ("pairvol_journal_used_bytes", lbl(group="g3")),
    ]
    assert samples["pairvol_journal_lag_entries", lbl(group="g1")] == 3
    assert samples["pairvol_journal_lag_seconds", lbl(group="g1")] == 0.25
    assert samples["pairvol_journal_lag_entries", lbl(group="g3")] == 4
    assert ("pairvol_journal_lag_seconds", lbl(group="g3")) not in samples
    assert ("pairvol_journal_used_bytes", lbl(group="g2")) not in samples  # sync: no journal


def test_a_scrape_reads_the_source_at_that_moment() -> None:
    pairs: list[dict[str, Any]] = []
    io = {"write": (0, 0)}
    collector = node_collector(pairs, io)
    _, before = collected(collector)
    assert not [k for k in before if k[0] == "pairvol_pair_state"]
    pairs.append(SECONDARY_SYNC)
    io["write"] = (3, 3 * 4096)
    _, after = collected(collector)
    assert after["pairvol_io_requests_total", lbl(op="write")] == 3
    assert after["pairvol_pair_state", lbl(group="g2", pair="q", role="secondary",
                                           state="PSUE")] == 1  # fmt: skip


AGENT_STATUS: dict[str, Any] = {
    "host": "a", "cluster": "c1", "etcd": "reachable",
    "resources": [
        {"name": "r1", "role": "active", "epoch": 4, "lease_remaining": 2.5, "failsafe": False},
        {"name": "r2", "role": "standby", "epoch": 1, "lease_remaining": None, "failsafe": True},
    ],
    "peers": {"b": {"alive": True}, "c": {"alive": False}},
}  # fmt: skip


def test_the_agent_collector_shows_leases_epochs_roles_and_failovers() -> None:
    source = AgentSource(
        lambda: AGENT_STATUS, lambda: {("r1", "SVOL-takeover"): 2, ("r1", "nop"): 1}, "9.9"
    )
    names, samples = collected(AgentCollector(source))
    assert {"pairvol_agent_info", "pairvol_lease_remaining_seconds", "pairvol_failovers",
            "pairvol_resource_epoch", "pairvol_resource_role"} <= names  # fmt: skip
    assert samples["pairvol_agent_info", lbl(host="a", cluster="c1", version="9.9")] == 1
    assert samples["pairvol_etcd_up", lbl()] == 1
    assert samples["pairvol_lease_remaining_seconds", lbl(resource="r1")] == 2.5
    assert ("pairvol_lease_remaining_seconds", lbl(resource="r2")) not in samples  # no lease
    assert samples["pairvol_resource_epoch", lbl(resource="r1")] == 4
    assert samples["pairvol_resource_role", lbl(resource="r1", role="active")] == 1
    assert samples["pairvol_resource_role", lbl(resource="r1", role="standby")] == 0
    assert samples["pairvol_resource_role", lbl(resource="r2", role="standby")] == 1
    assert samples["pairvol_resource_failsafe", lbl(resource="r2")] == 1
    assert samples["pairvol_failovers_total", lbl(resource="r1", result="SVOL-takeover")] == 2
    assert samples["pairvol_peer_up", lbl(peer="c")] == 0


def test_the_endpoint_serves_the_text_format_over_http() -> None:
    collector = node_collector([PRIMARY_ASYNC], {"read": (1, 512)})
    with serving(Address("127.0.0.1", 0), collector) as server:
        assert server.address.port > 0
        with urllib.request.urlopen(server.address.url, timeout=10) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            _, samples = scrape_text(r.read().decode())
    assert samples["pairvol_io_requests_total", lbl(op="read")] == 1


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:9810", "127.0.0.1", 9810),
        ("[::1]:9811", "::1", 9811),
        ("0.0.0.0:1", "0.0.0.0", 1),
    ],
)
def test_metrics_addresses_parse(text: str, host: str, port: int) -> None:
    a = parse_address(text)
    assert (a.host, a.port) == (host, port)
    assert str(a) == text


@pytest.mark.parametrize(
    "text",
    [
        "9810",
        "localhost:9810",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:http",
        ":9810",
        "::1:9810",
        "",
    ],
)
def test_bad_metrics_addresses_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="is not ADDR:PORT"):
        parse_address(text)


def test_node_start_with_a_bad_metrics_address_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["node", "start", "--name", "a", "--dir", str(tmp_path), "--listen",
                 "127.0.0.1", "--metrics", "nowhere"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--metrics 'nowhere' is not ADDR:PORT" in err


def test_agent_start_with_a_bad_metrics_address_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["agent", "start", "--host", "a", "--config", str(tmp_path / "none.toml"),
                 "--metrics", "127.0.0.1:99999"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "is not ADDR:PORT" in err


def test_io_counters_are_per_thread_and_lose_nothing() -> None:
    before = export.io_totals()["write"]

    def work() -> None:
        for _ in range(10000):
            row = export.IO_ROWS.get(export.get_ident()) or export.io_row()
            row[export.IO_WRITE] += 1
            row[export.IO_WRITE + 1] += 4096

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n, b = export.io_totals()["write"]
    assert (n - before[0], b - before[1]) == (80000, 80000 * 4096)


def test_the_plugin_counts_every_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nbdkit", StubNbdkit())
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("pairvol_plugin_metrics", PLUGIN)
    assert spec is not None and spec.loader is not None
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    vol = make(tmp_path / "v1.img", name="v1")
    configured(plugin, volume=vol.path)
    h = plugin.open(False)
    try:
        before = export.io_totals()
        plugin.pwrite(h, b"x" * 8192, 0, 0)
        plugin.pread(h, bytearray(4096), 0, 0)
        plugin.zero(h, 4096, 0, 0)
        plugin.trim(h, 4096, 4096, 0)
        plugin.flush(h, 0)
        with pytest.raises(Exception):  # noqa: B017 (outside the volume: counted all the same)
            plugin.pread(h, bytearray(4096), 1 << 40, 0)
        after = export.io_totals()
    finally:
        plugin.close(h)
    delta = {op: (after[op][0] - before[op][0], after[op][1] - before[op][1]) for op in after}
    assert delta == {"read": (2, 8192), "write": (1, 8192), "zero": (1, 4096),
                     "trim": (1, 4096), "flush": (1, 0), "cache": (0, 0)}  # fmt: skip
