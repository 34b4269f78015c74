"""A three-member etcd under the agents: losing one member (a follower, then the leader)
fails nothing over.  Real etcd members in namespaces of their own, real agents and nodes.

With two members of three the cluster keeps its quorum: renewals go on (after a leader
election when the leader died) and the active host keeps the resource.  While the election
runs, requests time out; the active may ride on the failsafe for that moment, as its peer
still hears it, but it never fences and the standby never promotes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from labenv import lab_of, poll_until
from test_agent_lab import Agents

from cluster.etcd_server import EtcdCluster
from replicator.events import read_events

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    yield from lab_of(
        tmp_path_factory, "t3", Agents, cluster=True, etcd_members=3, programs=("etcdctl",)
    )


def leader_index(c: EtcdCluster) -> int:
    """Which member leads, as the members themselves say (etcdctl in a member's namespace)."""
    for m in c.members:
        if not c.running(m.index):
            continue
        argv = ["etcdctl", "--endpoints", m.client_url, "endpoint", "status", "-w", "json"]
        if m.netns is not None:
            argv = ["ip", "netns", "exec", m.netns, *argv]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        if r.returncode != 0:
            continue
        (status,) = json.loads(r.stdout)
        leader = int(status["Status"]["leader"])
        for other in c.members:
            argv2 = argv[:]
            argv2[argv2.index(m.client_url)] = other.client_url
            r2 = subprocess.run(argv2, capture_output=True, text=True, timeout=10, check=False)
            if r2.returncode == 0:
                (s2,) = json.loads(r2.stdout)
                if int(s2["Status"]["header"]["member_id"]) == leader:
                    return other.index
    raise AssertionError("no etcd member says who leads")


def restart_member(env: Agents, i: int) -> None:
    """Start member ``i`` again from a process of its own, as the lab starts etcd: the
    member is nobody's child here and lives on until ``lab down``."""
    assert env.lab.cluster is not None
    code = ("import sys; from cluster.etcd_server import EtcdCluster; "
            "EtcdCluster.open(sys.argv[1]).restart_member(int(sys.argv[2]))")  # fmt: skip
    subprocess.run([sys.executable, "-c", code, env.lab.cluster["etcd_dir"], str(i)],
                   check=True, timeout=60)  # fmt: skip


def test_losing_one_etcd_member_of_three_fails_nothing_over(env: Agents) -> None:
    env.volume("a", "v1")
    env.volume("b", "v1")
    env.pv("a", "pair", "create", "g1/p1", "--primary", "a:v1", "--secondary", "b:v1",
           "--fence", "data")  # fmt: skip
    env.wait("a", "g1/p1", "PAIR")
    env.cluster("a", "resource", "create", "r1", "--group", "g1", "--hosts", "a,b")
    env.wait_agent("a", "cluster.active", resource="r1")
    assert env.lab.cluster is not None
    c = EtcdCluster.open(env.lab.cluster["etcd_dir"])
    ttl = 2.0
    for which in ("follower", "leader"):
        lead = leader_index(c)
        victim = lead if which == "leader" else next(i for i in range(3) if i != lead)
        marks = {h: len(read_events(env.agent_events(h))) for h in ("a", "b")}
        c.kill_member(victim)
        killed = time.monotonic()

        def still(which: str = which, marks: dict[str, int] = marks) -> dict[str, Any]:
            doc = json.loads(env.cluster("b", "status", "--json").stdout)["resources"][0]
            tail = [e for h in ("a", "b") for e in read_events(env.agent_events(h))[marks[h] :]]
            assert doc["active"] == "a", f"{which} lost: {doc}; agents since: {tail}"
            return dict(doc)

        # Three lease TTLs with one member gone: the resource stays on a, etcd still answers.
        poll_until(still, lambda _d, since=killed: time.monotonic() - since > 3 * ttl,
                   what=f"{which} lost for three TTLs", timeout=30)  # fmt: skip
        for host in ("a", "b"):  # a never fenced, b never became a candidate
            seen = [e for e in read_events(env.agent_events(host))[marks[host]:]
                    if e["event"] == "cluster.role" and e.get("resource") == "r1"]  # fmt: skip
            tail = [e for h in ("a", "b") for e in read_events(env.agent_events(h))[marks[h] :]]
            assert not seen, f"{which} lost: {host}: {seen[0]}; agents since: {tail}"
        restart_member(env, victim)
    env.write("a", "v1", 0, b"\xa5" * 4096)  # a still takes writes, mirrored to b
    r = env.pv("a", "pair", "verify", "g1/p1", "--json", ok=False)
    assert r.returncode == 0, r.stdout + r.stderr
