"""Prometheus metrics of a live cluster lab: every node and agent scraped on its host's own
address, from inside the host's namespace, parsed with prometheus_client's parser.

The scenario: an async pair g1/p1 from a to b, owned by resource r1 (a active); a write on a
moves a's request counters; each side shows its state and the group's journal; a's agent shows
its lease and epoch.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from labenv import LabEnv, lab_of, poll_until
from prometheus_client.parser import text_string_to_metric_families

from pairvol import lab as labmod
from replicator.events import wait_event

pytestmark = [pytest.mark.privileged, pytest.mark.slow, pytest.mark.timeout(300)]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def lbl(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


class Metrics(LabEnv):
    def scrape(self, host: str, url: str) -> Samples:
        """GET ``url`` from inside ``host``'s namespace; every sample by (name, labels)."""
        get = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"  # noqa: E501
        r = subprocess.run(
            ["ip", "netns", "exec", self.host(host).netns, "python3", "-c", get, url],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert r.returncode == 0, f"scrape {url} on {host}: {r.stderr}"
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(r.stdout)
            for s in f.samples
        }

    def urls(self, host: str) -> dict[str, Any]:
        doc = json.loads(self.pv(None, "lab", "status", self.name, "--json").stdout)
        (entry,) = [h for h in doc["hosts"] if h["host"] == host]
        return dict(entry)

    def cluster_name(self) -> str:
        return str(json.loads(self.pv("a", "lab", "exec", self.name, "a", "--", "pairvol", "agent",
                                      "status", "--json").stdout)["cluster"])  # fmt: skip

    def node(self, host: str) -> Samples:
        return self.scrape(host, self.urls(host)["node_metrics"])

    def agent(self, host: str) -> Samples:
        return self.scrape(host, self.urls(host)["agent_metrics"])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metrics]:
    yield from lab_of(tmp_path_factory, "mx", Metrics, cluster=True)


@pytest.fixture(scope="module")
def g1(env: Metrics) -> None:
    env.volume("a", "v1")
    env.volume("b", "v1")
    env.pv("a", "pair", "create", "g1/p1", "--primary", "a:v1", "--secondary", "b:v1",
           "--mode", "async", "--journal-size", "16M")  # fmt: skip
    env.wait("a", "g1/p1", "PAIR")
    env.wait("b", "g1/p1", "PAIR")


def test_lab_status_shows_each_hosts_metrics_endpoints(env: Metrics) -> None:
    a = env.urls("a")
    assert a["node_metrics"] == f"http://{a['address']}:{labmod.NODE_METRICS_PORT}/metrics"
    assert a["agent_metrics"] == f"http://{a['address']}:{labmod.AGENT_METRICS_PORT}/metrics"
    out = env.pv(None, "lab", "status", env.name).stdout
    assert a["node_metrics"] in out and a["agent_metrics"] in out


def test_a_nodes_metrics_show_its_pairs_and_a_write_moves_its_counters(
    env: Metrics, g1: None
) -> None:
    before = env.node("a")
    assert before["pairvol_node_info", lbl(node="a", version="0.1.0")] == 1
    (side_a,) = env.control("a", "pair.display", target="g1/p1")["pairs"]
    (side_b,) = env.control("b", "pair.display", target="g1/p1")["pairs"]
    role_a, role_b = side_a["role"], side_b["role"]
    assert before["pairvol_pair_state", lbl(group="g1", pair="p1", role=role_a, state="PAIR")] == 1
    assert before["pairvol_pair_state", lbl(group="g1", pair="p1", role=role_a, state="COPY")] == 0
    assert before["pairvol_epoch", lbl(group="g1", pair="p1")] >= 0
    assert ("pairvol_journal_capacity_bytes", lbl(group="g1")) in before
    for name in ("pairvol_outofsync_bytes", "pairvol_copy_bytes_total"):
        assert (name, lbl(group="g1", pair="p1")) in before
    for name in ("pairvol_journal_used_bytes", "pairvol_journal_lag_entries",
                 "pairvol_journal_lag_seconds"):  # fmt: skip
        assert (name, lbl(group="g1")) in before

    data = b"m" * (256 << 10)
    env.write("a", "v1", 0, data)
    after = env.node("a")
    writes = ("pairvol_io_requests_total", lbl(op="write"))
    wbytes = ("pairvol_io_bytes_total", lbl(op="write"))
    assert after[writes] >= before[writes] + 1
    assert after[wbytes] >= before[wbytes] + len(data)
    assert after["pairvol_io_requests_total", lbl(op="flush")] >= 1

    # The secondary shows its side, and its journal once the write has arrived.
    b = poll_until(
        lambda: env.node("b"),
        lambda s: s.get(("pairvol_journal_lag_entries", lbl(group="g1"))) == 0,
        what="b's journal applied",
    )
    assert b["pairvol_node_info", lbl(node="b", version="0.1.0")] == 1
    assert b["pairvol_pair_state", lbl(group="g1", pair="p1", role=role_b, state="PAIR")] == 1


def test_an_agents_metrics_show_its_lease_role_and_epoch(env: Metrics, g1: None) -> None:
    env.pv(None, "lab", "exec", env.name, "a", "--", "pairvol", "cluster", "resource", "create",
           "r1", "--group", "g1", "--hosts", "a,b")  # fmt: skip
    events = f"{labmod.agent_dir(env.host('a'))}/events.jsonl"
    active = wait_event(events, "cluster.active", lambda e: e.get("resource") == "r1", timeout=60)
    a = poll_until(
        lambda: env.agent("a"),
        lambda s: s.get(("pairvol_resource_role", lbl(resource="r1", role="active"))) == 1,
        what="r1 active in a's metrics",
    )
    assert [dict(k[1]) | {"v": v} for k, v in a.items() if k[0] == "pairvol_agent_info"] == [
        {"host": "a", "cluster": env.cluster_name(), "version": "0.1.0", "v": 1}
    ]
    assert a["pairvol_etcd_up", lbl()] == 1
    assert a["pairvol_resource_epoch", lbl(resource="r1")] == active["epoch"]
    assert a["pairvol_lease_remaining_seconds", lbl(resource="r1")] > 0
    assert a["pairvol_peer_up", lbl(peer="b")] == 1
    b = poll_until(
        lambda: env.agent("b"),
        lambda s: s.get(("pairvol_resource_role", lbl(resource="r1", role="standby"))) == 1,
        what="r1 standby in b's metrics",
    )
    assert [dict(k[1]) | {"v": v} for k, v in b.items() if k[0] == "pairvol_agent_info"] == [
        {"host": "b", "cluster": env.cluster_name(), "version": "0.1.0", "v": 1}
    ]
