"""Prometheus metrics of a cluster agent (``pairvol agent start --metrics ADDR:PORT``).

Like the node's (:mod:`replicator.metrics`), a scrape reads what the agent already keeps, at that
moment: its status (:meth:`cluster.agent.Agent.status`, what ``agent.json`` holds) and its count
of completed failovers (``Agent.failovers``).  The agent's loop does no work for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from cluster import failover as fo
from replicator.metrics import Address, MetricsServer, version

if TYPE_CHECKING:
    from cluster.agent import Agent

ROLES = (*(str(r) for r in fo.Role), "stopped")


@dataclass(frozen=True)
class AgentSource:
    """What an agent's scrape reads: its status document and (resource, result) -> failovers.
    Tests hand in fakes."""

    status: Callable[[], Mapping[str, Any]]
    failovers: Callable[[], Mapping[tuple[str, str], int]]
    version: str = ""


def agent_source(agent: Agent) -> AgentSource:
    def status() -> Mapping[str, Any]:
        # The loop may add a resource while a scrape reads them: read again then.
        for _ in range(3):
            try:
                return agent.status(agent.clock())
            except RuntimeError:
                continue
        return agent.status(agent.clock())

    return AgentSource(status, lambda: dict(agent.failovers))


class AgentCollector(Collector):
    def __init__(self, source: AgentSource) -> None:
        self.source = source
        self.version = source.version or version()

    def collect(self) -> Iterator[Any]:
        doc = self.source.status()
        info = InfoMetricFamily("pairvol_agent", "this host's cluster agent")
        info.add_metric(
            [],
            {
                "host": str(doc.get("host", "")),
                "cluster": str(doc.get("cluster", "")),
                "version": self.version,
            },
        )
        yield info
        etcd = GaugeMetricFamily("pairvol_etcd_up", "whether the agent reaches etcd (1) or not")
        etcd.add_metric([], 1.0 if doc.get("etcd") == "reachable" else 0.0)
        yield etcd
        rl = ["resource"]
        role = GaugeMetricFamily(
            "pairvol_resource_role", "this host's role for the resource (1 for the current one)",
            labels=[*rl, "role"],
        )  # fmt: skip
        epoch = GaugeMetricFamily(
            "pairvol_resource_epoch", "the resource's epoch as this agent knows it", labels=rl
        )
        lease = GaugeMetricFamily(
            "pairvol_lease_remaining_seconds",
            "what is left of this host's lease of the resource (only while it holds one)",
            labels=rl,
        )
        failsafe = GaugeMetricFamily(
            "pairvol_resource_failsafe", "whether the resource is in failsafe here", labels=rl
        )
        failovers = CounterMetricFamily(
            "pairvol_failovers",
            "failovers to this host that completed, by takeover result",
            labels=[*rl, "result"],
        )
        for r in doc.get("resources", []):
            name = str(r["name"])
            for ro in ROLES:
                role.add_metric([name, ro], 1.0 if ro == str(r.get("role")) else 0.0)
            epoch.add_metric([name], float(r.get("epoch") or 0))
            if r.get("lease_remaining") is not None:
                lease.add_metric([name], float(r["lease_remaining"]))
            failsafe.add_metric([name], 1.0 if r.get("failsafe") else 0.0)
        for (name, result), n in sorted(self.source.failovers().items()):
            failovers.add_metric([name, result], float(n))
        peers = GaugeMetricFamily(
            "pairvol_peer_up", "whether the peer agent's heartbeats arrive", labels=["peer"]
        )
        for peer, p in sorted(dict(doc.get("peers", {})).items()):
            peers.add_metric([str(peer)], 1.0 if p.get("alive") else 0.0)
        yield from (role, epoch, lease, failsafe, failovers, peers)


def serve_agent(address: Address, agent: Agent) -> MetricsServer:
    return MetricsServer(address, AgentCollector(agent_source(agent)))
