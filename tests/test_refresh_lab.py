"""SPEC 3 in a lab: the standby PVID-refresh protocol with real etcd, agents and nodes.

Two resources on hosts a (preferred) and b, each owning one sync pair and one PVID-cache
device per host (the pair's volume there).  The negative control and the protocol run side
by side: g1 is split with a plain ``pair split`` (b's cache keeps the PVID of before the
split), g2 with ``cluster split`` (b reads the S-VOL's new PVID into its cache).  Then host
a is SIGKILLed: b takes r2 over and attaches its device; r1's attach fails with the access
error, and the resource is not started.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labenv import lab_of, poll_until
from test_agent_lab import Agents

from cluster import blockdev
from cluster.pvid_cache import CacheFile
from pairvol import lab as labmod
from replicator.events import read_events

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    yield from lab_of(tmp_path_factory, "tf", Agents, cluster=True, programs=("nbdfuse",))


def export(env: Agents, host: str, volume: str) -> str:
    return f"nbd+unix:///{volume}?socket={env.host(host).dir}/nbd.sock"


def cache(env: Agents, host: str) -> dict[str, Any]:
    entries = CacheFile(os.path.join(env.host(host).dir, "host-cache.json")).read().entries
    return {name: e for name, e in entries.items()}


def agent_status(env: Agents, host: str) -> dict[str, Any]:
    path = Path(labmod.agent_dir(env.host(host)), "agent.json")
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def ready(env: Agents, host: str, resource: str) -> bool:
    rows = [r for r in agent_status(env, host).get("resources", []) if r["name"] == resource]
    return bool(rows) and bool(rows[0].get("ready"))


def all_flags_zero(env: Agents, host: str) -> bool:
    flags = agent_status(env, host).get("flags", {})
    return bool(flags) and all(f["own"] == "0" and f["peer"] == "0" for f in flags.values())


def test_cluster_split_keeps_the_standby_cache_true_and_a_plain_split_does_not(
    env: Agents,
) -> None:
    for n in (1, 2):
        env.volume("a", f"v{n}")
        env.volume("b", f"v{n}")
        env.pv("a", "pair", "create", f"g{n}/p{n}", "--primary", f"a:v{n}", "--secondary",
               f"b:v{n}", "--fence", "data")  # fmt: skip
    for n in (1, 2):
        env.wait("a", f"g{n}/p{n}", "PAIR")
        env.cluster("a", "resource", "create", f"r{n}", "--group", f"g{n}", "--hosts", "a,b",
                    "--device", f"a:pv{n}={export(env, 'a', f'v{n}')}",
                    "--device", f"b:pv{n}={export(env, 'b', f'v{n}')}")  # fmt: skip
        env.wait_agent("a", "cluster.active", resource=f"r{n}")
    # A standby that joins is refreshed before it is ready: after a construction, it holds
    # no entry for an S-VOL (SPEC 3: erased; the S-VOL is not accessible in PAIR).
    for n in (1, 2):
        poll_until(lambda n=n: ready(env, "b", f"r{n}"), bool, what=f"b ready for r{n}")
    assert "pv1" not in cache(env, "b") and "pv2" not in cache(env, "b")
    assert cache(env, "a")["pv1"].attachment is not None  # the active attached its devices

    def svol_pvid(n: int) -> str:
        return str(env.side("b", f"g{n}/p{n}")["pvid_secondary"])

    # cluster split: b reads each S-VOL's new PVID from the volume, under the S-VOL lock.
    for n in (1, 2):
        out = env.cluster("a", "split", f"r{n}").stdout
        assert f"split of g{n}/p{n} done" in out, out
        assert cache(env, "b")[f"pv{n}"].pvid == svol_pvid(n)
    stale = cache(env, "b")["pv1"].pvid
    # The negative control: a plain resync and split of g1 (b is not told); the protocol's
    # cluster resync and split of g2 (b erases, then reads again).
    env.pv("a", "pair", "resync", "g1")
    out = env.cluster("a", "resync", "g2").stdout
    assert "resync of g2/p2 done" in out, out
    assert "pv2" not in cache(env, "b")
    for n in (1, 2):
        env.wait("a", f"g{n}/p{n}", "PAIR")
    env.pv("a", "pair", "split", "g1")
    env.cluster("a", "split", "g2")
    assert svol_pvid(1) != stale and cache(env, "b")["pv1"].pvid == stale  # b's is stale
    assert cache(env, "b")["pv2"].pvid == svol_pvid(2)  # b's is true
    for host in ("a", "b"):
        poll_until(lambda host=host: all_flags_zero(env, host), bool, what=f"{host} flags 0")

    # a's devices are nbdfuse + loop devices: killed with a, nbdfuse leaves each bound to a
    # dead file for good unless the lab detaches it (it does, and only those).
    a_loops = [blockdev.read_loop_record(e.attachment.state_dir)
               for e in cache(env, "a").values() if e.attachment is not None]  # fmt: skip
    mark = len(read_events(env.agent_events("b")))
    labmod.kill_host(env.name, "a")
    assert a_loops and all(b is not None and not b.in_place() for b in a_loops), a_loops
    active = env.wait_agent("b", "cluster.active", resource="r2", after=mark)
    assert active["takeover"] == {"g2": "SVOL-takeover"}
    assert cache(env, "b")["pv2"].attachment is not None  # attached, PVID-checked
    failed = env.wait_agent("b", "cluster.takeover.failed", resource="r1", after=mark)
    assert "access error" in failed["detail"] and stale in failed["detail"], failed
    env.wait_agent("b", "cluster.fenced", resource="r1", after=mark)
    r1_active = [e for e in read_events(env.agent_events("b"))[mark:]
                 if e["event"] == "cluster.active" and e["resource"] == "r1"]  # fmt: skip
    assert r1_active == []  # the negative control never started
