"""The agent's loop on FakeCoord, a fake link and fake nodes, driven by a scripted clock.

Two agents, a (preferred) and b, share one resource ``r1`` owning group ``g1``.  Nothing
sleeps: each test moves the clock in steps of 50 ms and runs one turn of each agent's loop.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from cluster.agent import Agent
from cluster.agent_link import Datagram, Endpoint
from cluster.config import Resource, parse_config
from cluster.coord import (
    FakeCoord,
    Keys,
    delete_resource,
    put_resource,
    read_epoch,
    read_leader,
)
from cluster.etcd_server import free_ports
from cluster.pvid_cache import CacheFile
from replicator.errors import ConnectionFailed, IllegalState
from replicator.events import read_events

CONFIG = """
[cluster]
name = "t1"
secret_file = "secret"
[etcd]
endpoints = ["http://127.0.0.1:2379"]
[hosts.a]
agent = "127.0.0.1:20001"
node = "/nonexistent/a.sock"
[hosts.b]
agent = "127.0.0.1:20002"
node = "/nonexistent/b.sock"
[resources.r1]
hosts = ["a", "b"]
groups = ["g1"]
start = "start"
stop = "stop"
monitor = "monitor"
"""

STEP = 0.05


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Etcd:
    """A FakeCoord that one agent can lose (every call: ConnectionFailed)."""

    def __init__(self, fake: FakeCoord) -> None:
        self.fake = fake
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.fake, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise ConnectionFailed("etcd at http://127.0.0.1:2379 is unreachable (test)")
            return attr(*args, **kwargs)

        return call


class Node:
    """A storage node's control ops, as far as the agent uses them; every call recorded."""

    def __init__(self, role: str, clock: Clock) -> None:
        self.role = role
        self.clock = clock
        self.calls: list[tuple[float, str, dict[str, Any]]] = []
        self.cluster_epoch = 0
        self.state = "PAIR"
        self.pulling = False  # taken over, its pull suspended (PSUE, not SSWS)
        self.summary: dict[str, Any] | None = None  # pair.takeover's per-pair "takeover"

    def call(self, op: str, args: dict[str, Any], timeout: float = 10.0) -> Any:
        self.calls.append((self.clock.t, op, dict(args)))
        if op in ("pair.fence", "pair.unfence"):
            if args["epoch"] < self.cluster_epoch:
                raise IllegalState(f"epoch {args['epoch']} < {self.cluster_epoch}")
            self.cluster_epoch = args["epoch"]
        if op == "pair.takeover":
            if self.state == "SSWS" or self.pulling:  # as the real node says it
                raise IllegalState(
                    f"pair g1/p1: cannot take over in state {self.state} (taken over)"
                )
            self.role = "primary"
            if self.summary is not None:
                taken = {"role": self.role, "state": "SSWS", "takeover": dict(self.summary)}
                return {"pairs": [taken]}
        taken = self.role == "secondary" and (self.state == "SSWS" or self.pulling)
        pair = {"role": self.role, "state": self.state, "epoch": 0,
                "cluster_epoch": self.cluster_epoch, "taken_over": taken}  # fmt: skip
        return {"pairs": [pair]}

    def ops(self, op: str, since: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        return [(t, a) for t, o, a in self.calls if o == op and t >= since]


class Link:
    """The agents' datagrams, delivered at once unless the link is cut."""

    def __init__(self) -> None:
        self.inbox: dict[str, list[Datagram]] = {"a": [], "b": []}
        self.cut = False
        self.seq = 0

    def endpoint(self, me: str) -> Any:
        link = self

        class End:
            peers: Mapping[str, tuple[str, int]] = {h: ("x", 1) for h in link.inbox if h != me}

            def send(self, host: str, kind: str, body: Mapping[str, Any], now: float) -> None:
                if not link.cut:
                    link.seq += 1
                    link.inbox[host].append(Datagram(me, 7, link.seq, now, kind, body))

            def receive(self, now: float) -> tuple[Datagram | None, str | None]:
                box = link.inbox[me]
                return (box.pop(0) if box else None), None

            def close(self) -> None:
                pass

        return End()


class World:
    def __init__(self, tmp: Path) -> None:
        self.clock = Clock()
        self.fake = FakeCoord(self.clock)
        self.link = Link()
        self.config = parse_config(CONFIG, str(tmp / "agent.toml"))
        self.etcd = {h: Etcd(self.fake) for h in ("a", "b")}
        self.nodes = {"a": Node("primary", self.clock), "b": Node("secondary", self.clock)}
        self.ran: list[tuple[str, str, float]] = []
        self.sick: set[str] = set()  # hosts whose monitor command fails
        self.agents = {h: self._agent(h, tmp) for h in ("a", "b")}
        self.alive = {"a": True, "b": True}
        self.t0 = 0.0

    def _agent(self, host: str, tmp: Path) -> Agent:
        def runner(cmd: str, timeout: float, env: Mapping[str, str]) -> tuple[int, str]:
            self.ran.append((host, cmd, self.clock.t))
            return (1, "not running") if cmd == "monitor" and host in self.sick else (0, "")

        return Agent(
            self.config, host, str(tmp / host), self.etcd[host], self.nodes[host],  # type: ignore[arg-type]
            endpoint=self.link.endpoint(host), clock=self.clock, wall=self.clock,
            runner=runner, threaded=False, cache=CacheFile(str(tmp / f"{host}-cache.json")),
        )  # fmt: skip

    def run(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        end = self.clock.t + seconds
        while self.clock.t < end:
            self.clock.t = round(self.clock.t + STEP, 6)
            for h, agent in self.agents.items():
                if self.alive[h]:
                    agent.step(self.clock.t)
            if until is not None and until():
                return

    def events(self, host: str, name: str) -> list[dict[str, Any]]:
        return [e for e in read_events(str(self.agents[host].events.path)) if e["event"] == name]

    def role(self, host: str) -> str:
        return self.agents[host].resources["r1"].role


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.run(5.0, until=lambda: w.role("a") == "active")
    assert w.role("a") == "active" and w.role("b") == "standby"
    w.t0 = w.clock.t + STEP / 2  # node calls from here on are the test's
    return w


def test_preferred_host_starts_the_resource(world: World) -> None:
    a = world.nodes["a"]
    assert a.ops("pair.takeover") == []  # a's side is the primary already: "nop"
    assert [args["epoch"] for _, args in a.ops("pair.unfence")] == [1]
    # Every agent stops the application and fences its node when it starts (it cannot know
    # whether it was the active before); then the preferred host starts it.
    assert [(h, cmd) for h, cmd, _ in world.ran if cmd != "monitor"] == [
        ("a", "stop"), ("b", "stop"), ("a", "start")
    ]  # fmt: skip
    assert [args["epoch"] for _, args in world.nodes["b"].ops("pair.fence")] == [0]
    assert world.events("a", "cluster.active")[-1]["takeover"] == {"g1": "nop"}
    leader = read_leader(world.fake, Keys("t1"), "r1")
    assert leader is not None and (leader.holder, leader.epoch) == ("a", 1)
    world.run(5.0)
    b_calls = [c for c in world.nodes["b"].calls if c[0] >= world.t0]
    assert world.role("b") == "standby" and b_calls == []  # b did nothing, seconds long


def test_a_deleted_runtime_resource_is_stopped_released_and_dropped(world: World) -> None:
    keys = Keys("t1")
    put_resource(world.fake, keys, Resource("r2", ("a", "b"), ("g2",), stop="stop r2"))
    world.run(5.0, until=lambda: "r2" in world.agents["a"].resources
              and world.agents["a"].resources["r2"].role == "active")  # fmt: skip
    assert world.agents["a"].resources["r2"].role == "active"
    assert delete_resource(world.fake, keys, "r2")
    gone = world.clock.t
    world.run(5.0, until=lambda: all("r2" not in ag.resources for ag in world.agents.values()))
    assert all("r2" not in ag.resources for ag in world.agents.values())
    assert [h for h, cmd, t in world.ran if cmd == "stop r2" and t >= gone] == ["a"]
    assert read_leader(world.fake, keys, "r2") is None  # released, not left to expire
    for host in ("a", "b"):
        assert world.events(host, "cluster.resource.dropped")[-1]["resource"] == "r2"
    world.run(3.0)  # nobody takes it again, and r1 goes on where it ran
    assert read_leader(world.fake, keys, "r2") is None
    assert world.role("a") == "active" and world.role("b") == "standby"


def test_a_resource_created_again_while_its_deletion_stops_it_runs_again(world: World) -> None:
    keys = Keys("t1")
    r2 = Resource("r2", ("a", "b"), ("g2",), stop="stop r2")
    put_resource(world.fake, keys, r2)
    a = world.agents["a"]
    world.run(5.0, until=lambda: "r2" in a.resources and a.resources["r2"].role == "active")
    assert delete_resource(world.fake, keys, "r2")
    world.run(3.0, until=lambda: a.resources["r2"].core.retired)
    assert a.resources["r2"].core.retired
    put_resource(world.fake, keys, r2)  # before the agents dropped it
    world.run(10.0, until=lambda: "r2" in a.resources and not a.resources["r2"].core.retired
              and a.resources["r2"].role == "active")  # fmt: skip
    assert a.resources["r2"].role == "active" and not a.resources["r2"].core.retired


def test_standby_takes_over_when_the_active_dies(world: World) -> None:
    world.alive["a"] = False  # SIGKILL: no renewal, no heartbeat, no fence
    killed = world.clock.t
    world.run(10.0, until=lambda: world.role("b") == "active")
    assert world.role("b") == "active"
    b = world.nodes["b"]
    ((took_at, _),) = b.ops("pair.takeover")
    assert took_at >= killed + 1.0  # the lease had to expire first (TTL 2 s, renewal 1 s)
    assert [args["epoch"] for _, args in b.ops("pair.unfence")] == [2]
    assert [h for h, cmd, _ in world.ran if cmd == "start"] == ["a", "b"]
    (done,) = world.events("b", "cluster.failover.done")
    assert done["from"] == "a" and done["epoch"] == 2 and done["seconds"] > 0
    assert done["takeover"]["g1"].startswith("SVOL-takeover")
    assert read_epoch(world.fake, Keys("t1"), "r1") == 2


def test_a_takeover_whose_old_primary_answered_is_reported_with_zero_loss(
    world: World,
) -> None:
    """The node fenced the old primary and pulls what b lacked (SPEC 4): the result keeps
    horctakeover's name, and the report beside it says no data was lost and how much is
    pulled, in cluster.active, the failover record and the status."""
    b = world.nodes["b"]
    b.summary = {"previous": "PAIR", "fenced_old_primary": True, "pulled_chunks": 37,
                 "zero_loss": True}  # fmt: skip
    world.alive["a"] = False
    world.run(10.0, until=lambda: world.role("b") == "active")
    (active,) = world.events("b", "cluster.active")
    assert active["takeover"] == {"g1": "SVOL-takeover"}  # the name, as before
    assert active["zero_loss"] is True
    assert active["takeover_report"] == {
        "g1": {"pairs": 1, "zero_loss": True, "pulled_chunks": 37, "fenced_old_primary": True}
    }
    (done,) = world.events("b", "cluster.failover.done")
    assert done["takeover"] == {"g1": "SVOL-takeover"} and done["zero_loss"] is True
    (res,) = world.agents["b"].status(world.clock.t)["resources"]
    assert res["zero_loss"] is True and res["takeover_report"]["g1"]["pulled_chunks"] == 37
    assert res["last_failover"]["zero_loss"] is True
    assert res["last_failover"]["pulled_chunks"] == 37


def test_a_takeover_at_the_last_consistent_point_is_not_reported_as_zero_loss(
    world: World,
) -> None:
    """The old primary's node did not answer (an async pair: what had not arrived is lost)."""
    b = world.nodes["b"]
    b.summary = {"previous": "PAIR", "fenced_old_primary": False, "pulled_chunks": 0,
                 "zero_loss": False}  # fmt: skip
    world.alive["a"] = False
    world.run(10.0, until=lambda: world.role("b") == "active")
    (active,) = world.events("b", "cluster.active")
    assert active["takeover"] == {"g1": "SVOL-takeover"} and active["zero_loss"] is False
    assert active["takeover_report"]["g1"]["fenced_old_primary"] is False


def test_a_node_that_says_nothing_of_loss_leaves_it_unknown(world: World) -> None:
    world.alive["a"] = False
    world.run(10.0, until=lambda: world.role("b") == "active")
    (active,) = world.events("b", "cluster.active")
    assert active["takeover"] == {"g1": "SVOL-takeover"} and active["zero_loss"] is None
    assert active["takeover_report"]["g1"]["zero_loss"] is None


@pytest.mark.parametrize("state", ["SSWS", "PSUE"])
def test_a_standby_whose_side_already_took_over_promotes_with_nop(world: World, state: str) -> None:
    # Regression (the lab's crash tests): an earlier life of b took its S-VOLs over (SSWS)
    # and lost the resource before it started; promoted again, its takeover was refused
    # ("already taken over"), it fenced, and the old primary's host came back as the active
    # on a side that refuses writes at the newer epoch.  PSUE: taken over, its pull
    # suspended because the old primary's node is gone too (the node says taken_over).
    b = world.nodes["b"]
    b.state = state
    b.pulling = state == "PSUE"
    world.alive["a"] = False
    world.run(10.0, until=lambda: world.role("b") == "active")
    assert world.role("b") == "active"
    assert b.ops("pair.takeover") == []
    assert [args["epoch"] for _, args in b.ops("pair.unfence")] == [2]
    (done,) = world.events("b", "cluster.failover.done")
    assert done["takeover"] == {"g1": "nop"}
    assert done["zero_loss"] is None  # no storage takeover: nothing to say of loss
    assert world.events("b", "cluster.takeover.failed") == []


def test_etcd_lost_but_peers_in_touch_nothing_fails_over(world: World) -> None:
    world.etcd["a"].down = True
    world.etcd["b"].down = True
    world.run(10.0)
    assert world.role("a") == "active" and world.role("b") == "standby"
    assert world.nodes["a"].ops("pair.fence", world.t0) == []
    assert world.events("a", "cluster.failsafe")
    world.etcd["a"].down = world.etcd["b"].down = False  # the lease has expired meanwhile
    world.run(5.0)
    assert world.role("a") == "active" and world.role("b") == "standby"
    assert world.nodes["b"].ops("pair.takeover") == []
    leader = read_leader(world.fake, Keys("t1"), "r1")
    assert leader is not None and leader.holder == "a" and leader.epoch == 2


def test_isolated_active_fences_before_its_lease_expires(world: World) -> None:
    a = world.agents["a"]
    world.etcd["a"].down = True
    world.link.cut = True
    left = a.resources["r1"].core.lease_remaining(world.clock.t)
    assert left is not None
    deadline = world.clock.t + left  # the last confirmed renewal's send time + TTL - margin
    world.run(10.0, until=lambda: world.role("b") == "active")
    ((fenced_at, fence),) = world.nodes["a"].ops("pair.fence", world.t0)
    assert fence["epoch"] == 1
    assert fenced_at <= deadline + STEP  # before the lease could have expired (margin 0.25 s)
    ((took_at, _),) = world.nodes["b"].ops("pair.takeover")
    assert fenced_at < took_at
    assert world.role("b") == "active"
    assert ("a", "stop") in [(h, c) for h, c, _ in world.ran]
    assert "deadline passed" in world.events("a", "cluster.fenced")[0]["reason"]
    # the old active's stale epoch is refused by the new active's node
    with pytest.raises(IllegalState):
        world.nodes["b"].call("pair.unfence", {"target": "g1", "epoch": 1})


def test_etcd_unreachable_alone_fences_nothing_while_peer_heard(world: World) -> None:
    world.etcd["a"].down = True  # b still reaches etcd and sees the leader key expire
    world.run(8.0)
    assert world.role("a") == "active" and world.role("b") == "standby"
    assert world.nodes["b"].ops("pair.takeover") == []


def test_a_failed_monitor_moves_the_resource(world: World) -> None:
    world.run(5.0)
    assert {h for h, cmd, _ in world.ran if cmd == "monitor"} == {"a"}  # the active only
    world.sick.add("a")
    world.run(10.0, until=lambda: world.role("b") == "active")
    assert world.role("b") == "active"
    (failed,) = world.events("a", "cluster.monitor.failed")
    assert failed["output"] == "not running"
    ((fenced_at, fence),) = world.nodes["a"].ops("pair.fence", world.t0)
    ((took_at, _),) = world.nodes["b"].ops("pair.takeover")
    assert fenced_at <= took_at and fence["epoch"] == 1
    assert ("a", "stop") in [(h, c) for h, c, _ in world.ran]
    world.run(5.0)
    assert world.role("a") == "standby"  # and it does not take the resource back


def test_failsafe_active_cut_off_from_its_peer_too_fences_before_the_standby_promotes(
    world: World,
) -> None:
    world.etcd["a"].down = True
    world.run(5.0)  # a's lease has expired in etcd; b sees no key but hears a: failsafe
    assert world.events("a", "cluster.failsafe") and world.role("b") == "standby"
    world.link.cut = True
    world.run(10.0, until=lambda: world.role("b") == "active")
    ((fenced_at, _),) = world.nodes["a"].ops("pair.fence", world.t0)
    ((took_at, _),) = world.nodes["b"].ops("pair.takeover")
    assert fenced_at < took_at and world.role("b") == "active"
    # b held off about a heartbeat timeout longer than a needed to notice it was alone
    assert took_at - fenced_at > world.agents["b"].timing.heartbeat_timeout / 2


def test_a_heartbeat_with_a_wrong_secret_is_refused_and_logged_once(tmp_path: Path) -> None:
    pa, pb = free_ports(2)
    text = CONFIG.replace("127.0.0.1:20001", f"127.0.0.1:{pa}").replace(
        "127.0.0.1:20002", f"127.0.0.1:{pb}"
    )
    config = parse_config(text, str(tmp_path / "agent.toml"))
    good, bad = b"k" * 32, b"x" * 32
    a_end = Endpoint("a", ("127.0.0.1", pa), {"b": ("127.0.0.1", pb)}, "t1", good)
    agent = Agent(
        config, "a", str(tmp_path / "a"), FakeCoord(time.monotonic), Node("primary", Clock()),
        endpoint=a_end, threaded=False,
    )  # fmt: skip
    try:
        for secret in (bad, good):
            sender = Endpoint("b", ("127.0.0.1", pb), {"a": ("127.0.0.1", pa)}, "t1", secret)
            try:
                for _ in range(5):
                    sender.send("a", "heartbeat", {"resources": {}}, time.time())
                for _ in range(50):  # bounded: each turn waits for a datagram
                    if not select.select([a_end], [], [], 1.0)[0]:
                        break
                    agent.step(time.monotonic())
            finally:
                sender.close()
            if secret is bad:
                assert "b" not in agent.peers
        assert "b" in agent.peers  # the right secret is heard
        refused = [e for e in read_events(agent.events.path) if e["event"] == "cluster.refused"]
        assert len(refused) == 1 and "bad MAC" in refused[0]["reason"]
    finally:
        a_end.close()
