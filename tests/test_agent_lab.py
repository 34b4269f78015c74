"""Failover of a cluster resource in a lab: real etcd, real agents, real nodes in namespaces.

The scenario: a sync pair with fence=data, owned by resource r1 on hosts a (preferred) and b;
a stamped writer on a; SIGKILL of everything on a; b takes over, runs the start command, and
holds every write a acknowledged; the old active's epoch is refused by b's node.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labenv import LabEnv, lab_of, nbd

from cluster.etcd_server import EtcdCluster
from pairvol import lab as labmod
from replicator.errors import Timeout
from replicator.events import read_events, wait_event

pytestmark = pytest.mark.timeout(300)

BLOCK = 4096
NBLOCKS = 256


def stamp(n: int) -> bytes:
    return n.to_bytes(8, "little") * (BLOCK // 8)


class Agents(LabEnv):
    def agent_events(self, host: str) -> str:
        return os.path.join(labmod.agent_dir(self.host(host)), "events.jsonl")

    def wait_agent(
        self, host: str, event: str, timeout: float = 30, after: int = 0, **fields: Any
    ) -> Any:
        try:
            return wait_event(
                self.agent_events(host), event,
                lambda e: all(e.get(k) == v for k, v in fields.items()), timeout=timeout,
                after=after,
            )  # fmt: skip
        except Timeout:
            tail = [
                e for e in read_events(self.agent_events(host)) if e["event"] != "cluster.peer.up"
            ]
            pytest.fail(f"no {event} on {host}; its last events: {tail[-8:]}")

    def agent_forbid(self, host: str, event: str, after: int = 0) -> None:
        seen = [e for e in read_events(self.agent_events(host))[after:] if e["event"] == event]
        assert not seen, f"forbidden {event} on {host}: {seen[0]}"

    def cluster(self, host: str, *args: str, ok: bool = True) -> Any:
        """``pairvol cluster ARGS`` on ``host``, with no option saying where the cluster is."""
        return self.pv(None, "lab", "exec", self.name, host, "--", "pairvol", "cluster", *args,
                       ok=ok)  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    yield from lab_of(tmp_path_factory, "tg", Agents, cluster=True)


class Writer(threading.Thread):
    """Stamps 1, 2, 3, ... one write at a time to random blocks of one volume on one host;
    ``acked`` is the highest stamp whose write was acknowledged."""

    def __init__(self, env: LabEnv, host: str, volume: str, seed: int, base: int = 0) -> None:
        super().__init__(daemon=True)
        self.env, self.host, self.volume = env, host, volume
        self.base = base  # stamps are base+1, base+2, ...: writers of one volume stay apart
        self.rng = random.Random(seed)
        self.log: list[int] = []  # index n-1: the block of stamp n
        self.acked = 0
        self.acked_at = 0.0  # wall time of the last acknowledgement (one clock in a lab)
        self.cond = threading.Condition()
        self.ended = False

    def run(self) -> None:
        h = self.env.connect(self.host, self.volume)
        try:
            while True:
                n = len(self.log) + 1
                block = self.rng.randrange(NBLOCKS)
                self.log.append(block)
                h.pwrite(stamp(self.base + n), block * BLOCK)
                with self.cond:
                    self.acked, self.acked_at = n, time.time()
                    self.cond.notify_all()
        except nbd.Error:
            pass  # the host was killed under it
        finally:
            with self.cond:
                self.ended = True
                self.cond.notify_all()
            with contextlib.suppress(Exception):
                h.shutdown()

    def wait_acked(self, n: int, timeout: float = 30) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.acked >= n or self.ended, timeout)
            assert self.acked >= n, f"only {self.acked} writes acknowledged"

    def wait_ended(self, timeout: float = 30) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.ended, timeout), "the writer never stopped"


@pytest.fixture(scope="module")
def r1(env: Agents) -> dict[str, Any]:
    """Resource r1 on a (preferred) and b, owning g1/p1, sync with fence=data; a active."""
    env.volume("a", "v1")
    env.volume("b", "v1")
    env.pv("a", "pair", "create", "g1/p1", "--primary", "a:v1", "--secondary", "b:v1",
           "--fence", "data")  # fmt: skip
    env.wait("a", "g1/p1", "PAIR")
    marker = "started-$PAIRVOL_HOST-$PAIRVOL_EPOCH"
    env.cluster("a", "resource", "create", "r1", "--group", "g1", "--hosts", "a,b",
                "--start", f"touch $PAIRVOL_NODE_DIR/{marker}")  # fmt: skip
    active: dict[str, Any] = env.wait_agent("a", "cluster.active", resource="r1")
    assert Path(env.host("a").dir, f"started-a-{active['epoch']}").exists()
    return active


def etcd_pids(env: Agents) -> list[int]:
    assert env.lab.cluster is not None
    c = EtcdCluster.open(env.lab.cluster["etcd_dir"])
    pids = [c.pid(i) for i in range(len(c.members))]
    assert all(p is not None for p in pids)
    return [p for p in pids if p is not None]


def test_etcd_down_with_the_agents_in_touch_fails_nothing_over(
    env: Agents, r1: dict[str, Any]
) -> None:
    marks = {h: len(read_events(env.agent_events(h))) for h in ("a", "b")}
    pids = etcd_pids(env)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # etcd stops answering: every request times out
    try:
        env.wait_agent("a", "cluster.failsafe", resource="r1", after=marks["a"])
        env.wait_agent("b", "cluster.etcd.unreachable", after=marks["b"])
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    env.wait_agent("a", "cluster.etcd.reachable", after=marks["a"])
    env.wait_agent("b", "cluster.etcd.reachable", after=marks["b"])
    for host, event in (("a", "cluster.fenced"), ("b", "cluster.promoting")):
        seen = [e for e in read_events(env.agent_events(host))[marks[host]:]
                if e["event"] == event]  # fmt: skip
        assert not seen, f"{host}: {seen[0]}"
    (res,) = json.loads(env.cluster("b", "status", "--json").stdout)["resources"]
    assert res["active"] == "a"


def test_deleting_an_active_runtime_resource_stops_it_first(
    env: Agents, r1: dict[str, Any]
) -> None:
    for host in ("a", "b"):
        env.volume(host, "v2")
    env.pv("a", "pair", "create", "g2/p1", "--primary", "a:v2", "--secondary", "b:v2")
    env.wait("a", "g2/p1", "PAIR")
    marks = {h: len(read_events(env.agent_events(h))) for h in ("a", "b")}
    env.cluster("a", "resource", "create", "r2", "--group", "g2", "--hosts", "a,b",
                "--start", "touch $PAIRVOL_NODE_DIR/r2-started",
                "--stop", "touch $PAIRVOL_NODE_DIR/r2-stopped")  # fmt: skip
    try:
        env.wait_agent("a", "cluster.active", resource="r2", after=marks["a"])
        assert Path(env.host("a").dir, "r2-started").exists()
        stopped = Path(env.host("a").dir, "r2-stopped")
        stopped.unlink(missing_ok=True)  # the stop every agent makes when it tracks one
        env.cluster("b", "resource", "delete", "r2")
        for host in ("a", "b"):
            env.wait_agent(host, "cluster.resource.dropped", resource="r2", after=marks[host])
        assert stopped.exists()  # stopped on the active before it let go
    finally:
        env.cluster("a", "resource", "delete", "r2", ok=False)  # the next tests see r1 alone
        env.pv("a", "pair", "delete", "g2")
    status = json.loads(env.cluster("b", "status", "--json").stdout)["resources"]
    assert [r["name"] for r in status] == ["r1"] and status[0]["active"] == "a"


def check_stamps(env: Agents, host: str, writer: Writer) -> None:
    """Every acknowledged stamp is on ``host``'s volume: each block holds its last
    acknowledged stamp, or a later one written to that very block (in flight at the end)."""
    last = [0] * NBLOCKS
    for n, block in enumerate(writer.log[: writer.acked], start=1):
        last[block] = n
    h = env.connect(host, "v1")
    try:
        for block in range(NBLOCKS):
            got = int.from_bytes(h.pread(8, block * BLOCK), "little") - writer.base
            if not 0 < got <= len(writer.log):  # never written by this writer, or by another
                assert last[block] == 0, f"block {block}: acknowledged {last[block]}, lost"
                continue
            assert got >= last[block], f"block {block}: stamp {got}, acknowledged {last[block]}"
            assert writer.log[got - 1] == block, f"block {block}: stamp {got} of another block"
    finally:
        h.shutdown()


def switch_over(env: Agents, on: str, to: str | None, expect: str) -> dict[str, Any]:
    """``cluster switchover`` run on host ``on``; the new active's cluster.active event."""
    after = len(read_events(env.agent_events(expect)))
    args = ["switchover", "r1"] + ([] if to is None else ["--to", to])
    out = env.cluster(on, *args).stdout
    assert f"-> {expect} in " in out, out
    active: dict[str, Any] = env.wait_agent(expect, "cluster.active", resource="r1", after=after)
    assert active["takeover"] == {"g1": "swap"}  # the old primary answered: pairs swapped
    done = env.wait_agent(expect, "cluster.switchover.done", resource="r1", after=after)
    assert done["epoch"] == active["epoch"]
    env.agent_forbid(expect, "cluster.failover.done", after=after)
    return active


def test_switchover_and_failback_lose_nothing_and_copy_only_differences(
    env: Agents, r1: dict[str, Any]
) -> None:
    seed = int(os.environ.get("PAIRVOL_TEST_SEED", "1")) + 7
    writer = Writer(env, "a", "v1", seed=seed, base=10**6)
    writer.start()
    writer.wait_acked(100)
    b_active = switch_over(env, "b", "b", expect="b")
    writer.wait_ended()  # a's node refuses its writes from the fence on
    assert Path(env.host("b").dir, f"started-b-{b_active['epoch']}").exists()
    env.wait("b", "g1/p1", "PAIR")
    side = env.side("b", "g1/p1")
    assert side["primary"] == "b:v1" and side["sides"]["primary"]["copied_chunks"] == 0
    check_stamps(env, "b", writer)
    stale = env.pv("b", "pair", "fence", "g1", "--epoch", str(r1["epoch"]), ok=False)
    assert stale.returncode == 5 and "refused" in stale.stderr  # the old epoch is stale on b

    bad = env.cluster("a", "switchover", "r1", "--to", "z", ok=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a host" in bad.stderr
    same = env.cluster("a", "switchover", "r1", "--to", "b", ok=False)
    assert same.returncode == 2 and "already active on b" in same.stderr

    a_active = switch_over(env, "a", None, expect="a")  # failback: the next live host
    assert a_active["epoch"] > b_active["epoch"]
    env.wait("a", "g1/p1", "PAIR")
    assert env.side("a", "g1/p1")["primary"] == "a:v1"
    check_stamps(env, "a", writer)
    r = env.pv("a", "pair", "verify", "g1/p1", "--json", ok=False)
    assert r.returncode == 0, r.stdout + r.stderr
    (res,) = json.loads(env.cluster("b", "status", "--json").stdout)["resources"]
    assert res["active"] == "a" and res["epoch"] == a_active["epoch"]


def test_sigkill_of_the_active_host_fails_over_with_every_acknowledged_write(
    env: Agents, r1: dict[str, Any]
) -> None:
    old_epoch = max(r1["epoch"], *(e["epoch"] for e in read_events(env.agent_events("a"))
                                   if e["event"] == "cluster.active"))  # fmt: skip

    mark = len(read_events(env.agent_events("b")))
    writer = Writer(env, "a", "v1", seed=int(os.environ.get("PAIRVOL_TEST_SEED", "1")))
    writer.start()
    writer.wait_acked(200)
    labmod.kill_host(env.name, "a")  # node, agent and all: SIGKILL
    writer.wait_ended()

    done = env.wait_agent("b", "cluster.failover.done", resource="r1", after=mark)
    assert done["from"] == "a" and done["epoch"] > old_epoch
    assert done["takeover"]["g1"].startswith("SVOL-takeover")
    assert Path(env.host("b").dir, f"started-b-{done['epoch']}").exists()
    env.agent_forbid("b", "cluster.fenced", after=mark)

    check_stamps(env, "b", writer)
    h = env.connect("b", "v1")
    try:
        h.pwrite(stamp(10**9), 0)  # the new active accepts writes
    finally:
        h.shutdown()

    # The old active's epoch is refused by the new active's node, to unfence or to fence.
    stale = env.pv("b", "pair", "unfence", "g1", "--epoch", str(old_epoch), ok=False)
    assert stale.returncode == 5 and "refused" in stale.stderr
    stale = env.pv("b", "pair", "fence", "g1", "--epoch", str(old_epoch), "--reason", "stale",
                   ok=False)  # fmt: skip
    assert stale.returncode == 5 and "refused" in stale.stderr

    (res,) = json.loads(env.cluster("b", "status", "--json").stdout)["resources"]
    assert res["active"] == "b" and res["epoch"] == done["epoch"]
    assert res["last_failover"]["from"] == "a" and res["last_failover"]["to"] == "b"
    (pair,) = res["pairs"]  # b's side, as b's node says
    assert pair["state"] == "SSWS" and pair["cluster_epoch"] == done["epoch"]
    assert pair["fenced"] is None


def test_an_agent_killed_alone_leaves_no_writable_primary_behind_its_lease(
    env: Agents, r1: dict[str, Any]
) -> None:
    """SIGKILL of the active's agent only: its node and a client writing to it live on.  The
    node's watchdog (armed by the agent at every renewal) stops the writes by the agent's
    own fencing deadline, before the standby can promote: no write is acknowledged by the
    old node once the new active can take writes, and none acknowledged is lost."""
    # After the previous test b is active and a is dead: bring a back as b's secondary.
    mark_a = len(read_events(env.agent_events("a")))
    labmod.start_host(env.name, "a")
    env.wait_agent("a", "cluster.standby", resource="r1", after=mark_a)
    env.pv("b", "pair", "resync", "g1", "--swap")
    env.wait("b", "g1/p1", "PAIR")
    assert env.side("b", "g1/p1")["sides"]["primary"]["watchdog"] is not None  # armed

    writer = Writer(env, "b", "v1", seed=5, base=2 * 10**6)
    writer.start()
    writer.wait_acked(50)
    mark_a = len(read_events(env.agent_events("a")))
    labmod.kill_host(env.name, "b", only="agent")
    writer.wait_ended()  # b's node refused the writes on its own
    promoting = env.wait_agent("a", "cluster.promoting", resource="r1", after=mark_a)
    env.wait_agent("a", "cluster.active", resource="r1", after=mark_a)
    assert writer.acked_at < promoting["ts"], (writer.acked_at, promoting["ts"])
    log = Path(env.host("b").dir, "node.log").read_text()
    assert "watchdog" in log and "expired" in log
    check_stamps(env, "a", writer)  # fence=data, sync: every acknowledged stamp on a

    mark_b = len(read_events(env.agent_events("b")))
    labmod.start_host(env.name, "b")
    env.wait_agent("b", "cluster.standby", resource="r1", after=mark_b)
    env.pv("a", "pair", "resync", "g1", "--swap")
    env.wait("a", "g1/p1", "PAIR")
    r = env.pv("a", "pair", "verify", "g1/p1", "--json", ok=False)
    assert r.returncode == 0, r.stdout + r.stderr
