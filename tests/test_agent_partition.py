"""Partition acceptance test of the cluster agent: the active host isolated under a writer.

The scenario, once per round and five rounds per fence policy, on a sync pair owned by a
resource of two hosts (fence=never: resource rn, pair gn/p1 on a and b; fence=data: rd, gd/p1
on c and d; one lab for both):

1. a writer on the active host X stamps blocks through X's NBD export and logs the wall-clock
   time of every acknowledgement (it carries on through refusals, reconnecting, until the
   round ends: an acknowledgement at any later time counts);
2. a probe on the standby Y tries one write at a time and logs when the first was accepted
   (refused while Y's side is the secondary);
3. ``lab isolate X``: X is cut from Y and from etcd;
4. Y announces ``cluster.active`` at a newer epoch and X ``cluster.fenced``;
5. ``lab rejoin X``; X is back as a standby (``cluster.standby``), Y's node resyncs the pair
   reversed (``pair resync --swap``) and ``pair verify`` finds no difference;
6. the writer stops.  No write may have been acknowledged by X at or after the time Y's first
   write was sent.  Every lab namespace shares the machine's clock, so the two logs compare.
   Nor may X acknowledge one after its lease could have expired (lease_ttl after the
   isolation): "an active host that cannot renew its lease stops writing before the lease
   can expire" (SPEC.md, 4) is what keeps the first rule true whatever the timing.

With fence=data, Y must also hold every write X acknowledged.  The next round starts from Y
active: the roles alternate.  Only the CLI, the lab's functions and the agents' events
``cluster.active``, ``cluster.fenced`` and ``cluster.standby`` are used (the agent's insides
are being rewritten).
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from labenv import lab_of, nbd
from test_agent_lab import BLOCK, NBLOCKS, Agents, Writer, stamp

from pairvol import lab as labmod
from replicator.events import read_events

pytestmark = [pytest.mark.timeout(150), pytest.mark.privileged, pytest.mark.slow]

ROUNDS = 5
VOLUME = "v1"
REGION = NBLOCKS * BLOCK  # each round's writer has a region of its own, never written before
SIZE = (ROUNDS + 2) * REGION  # ... and the probes' blocks are in the last region
RETRY = 0.005  # between a refused attempt and the next (a probe's period, not a wait)
NOISE = ("cluster.peer.up", "cluster.candidate")  # left out of a failure's timeline


class AckedWriter(Writer):
    """test_agent_lab's Writer, in region ``region``, with the time of each acknowledgement;
    it does not stop at a refused write but reconnects and carries on until ``halt()``."""

    def __init__(self, env: Agents, host: str, region: int, seed: int) -> None:
        super().__init__(env, host, VOLUME, seed)
        self.base = region * REGION
        self.acks: list[tuple[float, int]] = []  # (time.time() once acknowledged, stamp)
        self.refused = 0
        self.halted = threading.Event()

    def run(self) -> None:
        h = None
        try:
            while not self.halted.is_set():
                if h is None:
                    try:
                        h = self.env.connect(self.host, self.volume)
                    except nbd.Error:
                        self.refused += 1
                        self.halted.wait(RETRY)
                        continue
                n = len(self.log) + 1
                block = self.rng.randrange(NBLOCKS)
                self.log.append(block)
                try:
                    h.pwrite(stamp(n), self.base + block * BLOCK)
                except nbd.Error:
                    self.refused += 1
                    with contextlib.suppress(nbd.Error):
                        h.shutdown()
                    h = None
                    self.halted.wait(RETRY)
                    continue
                acked_at = time.time()
                with self.cond:
                    self.acks.append((acked_at, n))
                    self.acked = n
                    self.cond.notify_all()
        finally:
            with self.cond:
                self.ended = True
                self.cond.notify_all()
            if h is not None:
                with contextlib.suppress(nbd.Error):
                    h.shutdown()

    def halt(self) -> None:
        self.halted.set()
        self.join(timeout=30)
        assert not self.is_alive(), f"the writer on {self.host} did not stop"


class FirstWrite(threading.Thread):
    """Connects to ``host``'s export and writes one block, again and again, until a write is
    acknowledged; ``sent`` is the time.time() at which that write was sent."""

    def __init__(self, env: Agents, host: str, block: int) -> None:
        super().__init__(daemon=True)
        self.env, self.host, self.offset = env, host, block * BLOCK
        self.data = stamp(10**9 + block)
        self.sent: float | None = None
        self.done = threading.Event()
        self.halted = threading.Event()

    def run(self) -> None:
        try:
            while not self.halted.is_set():
                try:
                    h = self.env.connect(self.host, VOLUME)
                except nbd.Error:
                    self.halted.wait(RETRY)
                    continue
                try:
                    sent = time.time()
                    h.pwrite(self.data, self.offset)
                    self.sent = sent
                    return
                except nbd.Error:
                    self.halted.wait(RETRY)
                finally:
                    with contextlib.suppress(nbd.Error):
                        h.shutdown()
        finally:
            self.done.set()

    def wait(self, timeout: float) -> float:
        assert self.done.wait(timeout), f"no write accepted by {self.host} within {timeout:g}s"
        assert self.sent is not None
        return self.sent

    def halt(self) -> None:
        self.halted.set()
        self.join(timeout=30)
        assert not self.is_alive(), f"the probe on {self.host} did not stop"


@dataclass
class Round:
    fence: str
    number: int
    old: str
    new: str
    epochs: tuple[int, int]
    acked_before: int  # acknowledgements before the isolation began
    acked_after: int  # ... and after (all before the new active's first write)
    refused: int  # writes and connections the old active refused
    margin: float  # the new active's first write - the old active's last acknowledgement
    takeover: float  # isolation -> the new active's first write
    laps: dict[str, float]  # seconds in each phase of the round

    def __str__(self) -> str:
        laps = ", ".join(f"{k} {v:.1f}" for k, v in self.laps.items())
        return (
            f"fence={self.fence} round {self.number}: {self.old}->{self.new} epoch "
            f"{self.epochs[0]}->{self.epochs[1]}, {self.acked_before}+{self.acked_after} acks "
            f"({self.refused} refused), first write {self.takeover:.2f}s after the isolation "
            f"and {self.margin:.3f}s after the last ack; {sum(self.laps.values()):.1f}s ({laps})"
        )


@dataclass
class Owned:
    """The pair of one fence policy and the resource that owns it, on two hosts of the lab."""

    env: Agents
    fence: str
    hosts: tuple[str, str]
    resource: str
    group: str

    @property
    def target(self) -> str:
        return f"{self.group}/p1"

    @property
    def lease_ttl(self) -> float:
        """The agents' lease TTL, from the lab's cluster config."""
        assert self.env.lab.cluster is not None
        with open(self.env.lab.cluster["config"], "rb") as f:
            return float(tomllib.load(f)["timing"]["lease_ttl"])

    def agent_mark(self, host: str) -> int:
        return len(read_events(self.env.agent_events(host)))

    def wait_agent(self, host: str, event: str, after: int) -> Any:
        return self.env.wait_agent(host, event, resource=self.resource, after=after)

    def forbid(self, host: str, event: str, after: int) -> None:
        seen = [
            e
            for e in read_events(self.env.agent_events(host))[after:]
            if e["event"] == event and e.get("resource") == self.resource
        ]
        assert not seen, f"forbidden {event} on {host}: {seen[0]}"

    def active_host(self, host: str) -> tuple[str, int]:
        """The resource's active host and epoch, as ``cluster status`` on ``host`` says."""
        doc = json.loads(self.env.cluster(host, "status", "--json").stdout)
        (res,) = [r for r in doc["resources"] if r["name"] == self.resource]
        return res["active"], res["epoch"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    """Hosts a, b, c and d with etcd and an agent each."""
    yield from lab_of(tmp_path_factory, "tq", Agents, hosts=("a", "b", "c", "d"), cluster=True)


@pytest.fixture(params=["never", "data"], ids=lambda f: f"fence={f}")
def owned(request: pytest.FixtureRequest, lab: Agents) -> tuple[Owned, int]:
    """Pair gn/p1 or gd/p1 (X:v1 -> Y:v1, sync, the parameter's fence policy) in PAIR, owned
    by resource rn or rd of X and Y, active on X; and its epoch."""
    fence: str = request.param
    x, y = ("a", "b") if fence == "never" else ("c", "d")
    o = Owned(lab, fence, (x, y), resource=f"r{fence[0]}", group=f"g{fence[0]}")
    for h in (x, y):
        lab.volume(h, VOLUME, SIZE)
    lab.pv(x, "pair", "create", o.target, "--primary", f"{x}:{VOLUME}", "--secondary",
           f"{y}:{VOLUME}", "--mode", "sync", "--fence", fence)  # fmt: skip
    lab.wait(x, o.target, "PAIR")
    mark = o.agent_mark(x)
    lab.cluster(x, "resource", "create", o.resource, "--group", o.group, "--hosts", f"{x},{y}")
    active = o.wait_agent(x, "cluster.active", after=mark)
    return o, int(active["epoch"])


def partition_round(o: Owned, number: int, old: str, new: str, epoch: int) -> Round:
    """One round with ``old`` active at ``epoch`` (see the module docstring)."""
    env, fence = o.env, o.fence
    began = time.monotonic()
    laps: dict[str, float] = {}

    def lap(what: str) -> None:
        laps[what] = time.monotonic() - began - sum(laps.values())

    def no_late_acknowledgement() -> list[tuple[float, int]]:
        """The writer's acknowledgements, none of them late (the module docstring, 6)."""
        with writer.cond:
            acks = list(writer.acks)

        def report(late: list[tuple[float, int]], after: str, since: float) -> str:
            return (
                f"fence={fence} round {number}: {old} acknowledged {len(late)} write(s) "
                f"after {after}: stamps {[n for _, n in late[:10]]}, the first "
                f"{(late[0][0] - since) * 1000:.1f} ms after. Seconds after the isolation: "
                f"{timeline(env, old, new, acks, first, isolated_at)}"
            )

        late = [(t, n) for t, n in acks if t >= first]
        assert not late, report(late, f"{new} accepted its first write", first)
        expiry = cut_off + o.lease_ttl
        late = [(t, n) for t, n in acks if t > expiry]
        assert not late, report(late, f"its lease expired (lease_ttl {o.lease_ttl:g}s)", expiry)
        return acks

    marks = {h: o.agent_mark(h) for h in (old, new)}
    node_mark = env.mark(new)
    writer = AckedWriter(env, old, region=number, seed=random.randrange(1 << 32))
    probe = FirstWrite(env, new, block=(ROUNDS + 1) * NBLOCKS + number)
    writer.start()
    try:
        writer.wait_acked(20)
        probe.start()
        with writer.cond:
            acked_before = len(writer.acks)
        lap("start")
        isolated_at = time.time()
        labmod.isolate(env.name, old)
        cut_off = time.time()  # from now on, no renewal of old's lease can reach etcd
        try:
            active = o.wait_agent(new, "cluster.active", after=marks[new])
            fenced = o.wait_agent(old, "cluster.fenced", after=marks[old])
            first = probe.wait(timeout=15)
        finally:
            probe.halt()
            labmod.rejoin(env.name, old)
        lap("failover")

        no_late_acknowledgement()  # so far; again once the writer has stopped
        assert active["epoch"] > epoch, (active, epoch)
        assert fenced["epoch"] == epoch, (fenced, epoch)
        if fence == "data":
            every_acknowledged_write_is_on(env, new, writer)
        back_in_sync(o, old, new, marks[old], node_mark)
        lap("resync")
    finally:
        writer.halt()
    acks = no_late_acknowledgement()
    o.forbid(old, "cluster.active", marks[old])
    o.forbid(new, "cluster.fenced", marks[new])
    return Round(
        fence, number, old, new, (epoch, active["epoch"]), acked_before,
        len(acks) - acked_before, writer.refused, first - acks[-1][0], first - isolated_at, laps,
    )  # fmt: skip


def every_acknowledged_write_is_on(env: Agents, host: str, writer: AckedWriter) -> None:
    """Each block of the writer's region on ``host`` holds its last acknowledged stamp, or a
    later one written to that very block (in flight at the isolation)."""
    with writer.cond:
        log, acked = list(writer.log), writer.acked
    last = [0] * NBLOCKS
    for n, block in enumerate(log[:acked], start=1):
        last[block] = n
    h = env.connect(host, VOLUME)
    try:
        for block in range(NBLOCKS):
            got = int.from_bytes(h.pread(8, writer.base + block * BLOCK), "little")
            assert got >= last[block], (
                f"block {block} on {host}: stamp {got}, {writer.host} acknowledged {last[block]}"
            )
            assert got == 0 or log[got - 1] == block, f"block {block} on {host}: stamp {got}"
    finally:
        h.shutdown()


def back_in_sync(o: Owned, old: str, new: str, agent_after: int, node_after: int) -> None:
    """The old active is a standby again; the new one resyncs the pair reversed, and both
    sides are identical."""
    o.wait_agent(old, "cluster.standby", after=agent_after)
    o.env.wait_event(new, "pair.link", after=node_after, group=o.group, up=True)
    o.env.pv(new, "pair", "resync", o.group, "--swap")
    o.env.wait(new, o.target, "PAIR")
    verify = o.env.pv(new, "pair", "verify", o.target, "--json", ok=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["pairs"][0]["mismatch_count"] == 0


def timeline(
    env: Agents, old: str, new: str, acks: list[tuple[float, int]], first: float, t0: float
) -> dict[str, Any]:
    """What a failure report needs: the last acknowledgements, the new active's first write
    and both hosts' node and agent events, in seconds after ``t0`` (the isolation)."""
    end = max(acks[-1][0], first) + 0.5
    doc: dict[str, Any] = {
        f"{old}'s last acks (stamp, s)": [(n, round(t - t0, 3)) for t, n in acks[-5:]],
        f"{new}'s first write": round(first - t0, 3),
    }
    for h in (old, new):
        for what, path in (("node", env.events_path(h)), ("agent", env.agent_events(h))):
            doc[f"{h}'s {what}"] = [
                (round(e["ts"] - t0, 3), e["event"],
                 {k: v for k, v in e.items() if k not in ("ts", "event")})
                for e in read_events(path)
                if t0 <= e["ts"] <= end and e["event"] not in NOISE
            ][:25]  # fmt: skip
    return doc


def test_isolating_the_active_never_leaves_two_writable_primaries(
    owned: tuple[Owned, int], capsys: pytest.CaptureFixture[str]
) -> None:
    o, epoch = owned
    for number in range(ROUNDS):  # the roles alternate
        old, new = o.hosts[number % 2], o.hosts[(number + 1) % 2]
        done = partition_round(o, number, old, new, epoch)
        epoch = done.epochs[1]
        with capsys.disabled():
            print(f"\n{done}", end="")
    # etcd, asked from the host that was isolated last, agrees with the agents' events.
    assert o.active_host(old) == (new, epoch)
