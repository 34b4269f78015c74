"""The refresh driver (cluster/refresh_driver.py): two agents' drivers on a scripted clock.

The world: host ``a`` (active) and host ``b`` (standby) share resource r1, whose group g1 has
pairs g1/p1 (volume vol1) and g1/p2 (vol2), primaries on a's node, secondaries on b's.  One
FakeCoord holds both hosts' leases and the S-VOL locks; each host has a real status file and
a real PVID cache in a directory of its own.  The fake nodes answer ``pair.display`` and carry
out ``pair.split`` / ``pair.resync`` on a fake storage that mints a new S-VOL PVID per split
and gives the S-VOL the P-VOL's PVID on a resync.  Notices go through an in-memory network
(which a test may make lossy), heartbeats every 0.2 s, spawned jobs run when the world
drains them, the clock moves 0.1 s a tick.  A host is killed by dropping its driver in the
middle of whatever it was doing (an ``emit`` that raises), and restarted by building a new
driver on the same directories, with a new lease.

a's devices: pv0 and pv1 (its own P-VOLs) and sv0, b's vol1 (the S-VOL of g1/p1, for the
active's own cache).  b's: pv0 and pv1, its S-VOLs.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.config import Device, Resource
from cluster.coord import FakeCoord, Keys, Lease, lock_holder
from cluster.flags_file import FlagsFile
from cluster.pvid_cache import Attachment, CacheEntry, CacheFile
from cluster.refresh import Flag, HostRole, Op, PeerFlags
from cluster.refresh_driver import (
    FLAGS_FILE,
    RefreshDriver,
    decode_heartbeat_flags,
    encode_heartbeat_flags,
)
from replicator.errors import (
    ConnectionFailed,
    IllegalState,
    NotFound,
    PairvolError,
    ProtocolError,
    UsageError,
)
from replicator.export_info import VolInfo
from replicator.pvid import format_pvid

ACTIVE, STANDBY = HostRole.ACTIVE, HostRole.STANDBY
SPLIT, CONSTRUCTION = Op.SPLIT, Op.CONSTRUCTION
A_NODE, B_NODE = "nbd://10.0.0.1:10809/", "nbd://10.0.0.2:10809/"
PAIRS = {"g1/p1": "vol1", "g1/p2": "vol2"}
P1, P2 = "g1/p1", "g1/p2"
DT = 0.1


def resource(groups: tuple[str, ...] = ("g1",), hosts: tuple[str, ...] = ("a", "b")) -> Resource:
    devices = (
        Device("a", "pv0", A_NODE + "vol1"),
        Device("a", "pv1", A_NODE + "vol2"),
        Device("a", "sv0", B_NODE + "vol1"),
        Device("b", "pv0", B_NODE + "vol1"),
        Device("b", "pv1", B_NODE + "vol2"),
    )
    return Resource("r1", hosts, groups, devices)


# -- the storage and the nodes ---------------------------------------------------------------


@dataclass
class PairOnStorage:
    volume: str
    pvol: int
    svol: int
    state: str = "PAIR"


class Storage:
    """Both nodes' volumes.  ``reads``: (host, uri, S-VOL lock holder at the time)."""

    def __init__(self, world: World, split: bool) -> None:
        self.world = world
        self.pairs = {
            pid: PairOnStorage(vol, 0x1100 + i, 0x1100 + i)
            for i, (pid, vol) in enumerate(sorted(PAIRS.items()))
        }
        self.minted = 0x2000
        self.reads: list[tuple[str, str, str | None]] = []
        self.fail_reads: dict[str, int] = {}
        if split:
            for pid in self.pairs:
                self.split(pid)

    def split(self, pid: str) -> None:
        p = self.pairs[pid]
        self.minted += 1
        p.svol, p.state = self.minted, "PSUS"

    def resync(self, pid: str) -> None:
        p = self.pairs[pid]
        p.svol, p.state = p.pvol, "COPY"

    def pid_of(self, volume: str) -> str:
        return next(pid for pid, p in self.pairs.items() if p.volume == volume)

    def identity(self, uri: str, export: str) -> VolInfo:
        pid = self.pid_of(export)
        p = self.pairs[pid]
        primary = uri.startswith(A_NODE)
        n = p.pvol if primary else p.svol
        return VolInfo(
            name=export,
            pvid=format_pvid(n),
            uuid=str(uuid.UUID(int=n)),
            size=1 << 20,
            block_size=4096,
            generation=1,
            role="primary" if primary else "secondary",
            pair=pid,
            created_ns=1,
        )

    def reader(self, host: str) -> Callable[[str, str], VolInfo]:
        def read(uri: str, export: str) -> VolInfo:
            if self.fail_reads.get(host):
                self.fail_reads[host] -= 1
                raise ConnectionFailed(f"cannot reach NBD server {uri}")
            holder = lock_holder(self.world.coord, self.world.keys, self.pid_of(export))
            self.reads.append((host, uri, holder))
            return self.identity(uri, export)

        return read

    def current(self, uri: str) -> str:
        return self.identity(uri, uri.rsplit("/", 1)[1]).pvid


class FakeNode:
    """One host's storage node: ``side`` is the role of its sides of every pair."""

    def __init__(self, storage: Storage, side: str) -> None:
        self.storage = storage
        self.side = side
        self.calls: list[tuple[str, str]] = []
        self.hidden: set[str] = set()  # pairs this node does not show
        self.peer_volume = True  # False: its sides do not know their peer's volume name
        self.down = False

    def rows(self, target: str) -> list[dict[str, Any]]:
        group = target.split("/")[0]
        out = []
        for pid, p in sorted(self.storage.pairs.items()):
            if pid in self.hidden or pid.split("/")[0] != group:
                continue
            if "/" in target and pid != target:
                continue
            n = p.pvol if self.side == "primary" else p.svol
            out.append({
                "id": pid, "group": group, "pair": pid.split("/")[1], "role": self.side,
                "volume": p.volume, "peer_volume": p.volume if self.peer_volume else "",
                "pvid": format_pvid(n),
                "state": p.state,
                "taken_over": self.side == "secondary" and p.state == "SSWS",
            })  # fmt: skip
        if not out:
            raise NotFound(f"group {group} has no pairs on node {self.side}")
        return out

    def call(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        target = str(args["target"])
        if self.down:
            raise ConnectionFailed("the node's control socket does not answer")
        if op != "pair.display":
            self.calls.append((op, target))
        if op == "pair.display":
            return {"node": self.side, "pairs": self.rows(target), "corrupt": []}
        rows = self.rows(target)
        if self.side != "primary":
            raise IllegalState(f"pair {rows[0]['id']}: run {op} on the primary's node")
        want = "PAIR" if op == "pair.split" else "PSUS"
        for r in rows:
            if r["state"] != want:
                raise IllegalState(f"pair {r['id']} is {r['state']}, not {want}")
        for r in rows:
            (self.storage.split if op == "pair.split" else self.storage.resync)(r["id"])
        return {"pairs": self.rows(target)}


# -- the world -------------------------------------------------------------------------------


class OffTheLoop:
    """The drivers' view of the FakeCoord: a request made on the loop, not in a spawned job,
    fails the test (an etcd that does not answer would hold up the agent's loop, and with it
    its heartbeats and lease renewals, for the request's timeout)."""

    def __init__(self, world: World) -> None:
        self._world = world

    def __getattr__(self, name: str) -> Any:
        if not self._world.in_job:
            raise AssertionError(f"etcd request {name} made on the agent's loop")
        return getattr(self._world.coord, name)


class Killed(Exception):
    """The host died in the middle of what it was doing."""


@dataclass
class Job:
    host: str
    driver: RefreshDriver
    work: Callable[[], Any]
    done: Callable[[Any], None]
    what: str  # whom it waits on: "etcd" or "node"

    def held(self, world: World) -> bool:
        return self.host in world.hold and self.what == "node"


@dataclass
class Host:
    name: str
    role: HostRole
    dir: Path
    node: FakeNode
    driver: RefreshDriver | None = None
    lease: Lease | None = None
    starts: int = 0

    @property
    def d(self) -> RefreshDriver:
        assert self.driver is not None, f"{self.name} is dead"
        return self.driver

    @property
    def cache(self) -> CacheFile:
        return CacheFile(str(self.dir / "cache.json"))

    @property
    def flags(self) -> FlagsFile:
        return FlagsFile(str(self.dir / FLAGS_FILE), self.name)


KillWhen = Callable[[str, str, dict[str, Any]], bool]
Drop = Callable[[str, str, dict[str, Any]], bool]


def _notice(frm: str, body: dict[str, Any], now: float, d: RefreshDriver) -> None:
    d.notice(frm, body, now)


def _peer_flags(frm: str, flags: Any, now: float, d: RefreshDriver) -> None:
    d.peer_flags(frm, flags, now)


def _done(job: Job, result: Any, _d: RefreshDriver) -> None:
    job.done(result)


class World:
    def __init__(self, tmp: Path, *, split: bool = False, res: Resource | None = None) -> None:
        self.t = 100.0
        self.ticks = 0
        self.coord = FakeCoord(lambda: self.t)
        self.keys = Keys("t1")
        self.storage = Storage(self, split)
        self.resource = res or resource()
        self.hosts = {
            "a": Host("a", ACTIVE, tmp / "a", FakeNode(self.storage, "primary")),
            "b": Host("b", STANDBY, tmp / "b", FakeNode(self.storage, "secondary")),
        }
        self.net: list[tuple[str, str, dict[str, Any]]] = []  # (to, from, body)
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.drop: Drop | None = None
        self.cut = False  # no heartbeats either
        self.jobs: list[Job] = []
        self.in_job = False  # a spawned job's work runs (OffTheLoop)
        self.hold: set[str] = set()  # hosts whose node's jobs wait (a slow replica or read)
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.kill_when: KillWhen | None = None
        self.killed: list[tuple[str, str, dict[str, Any]]] = []
        self.heard: list[tuple[str, str, str, int]] = []  # (receiver, pair, flag, serial)
        for h in self.hosts.values():
            h.dir.mkdir(parents=True)
            self.seed_cache(h)
        for name in self.hosts:
            self.start(name)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def seed_cache(self, h: Host) -> None:
        """Both caches start true to the volumes (scanned before the agents started)."""
        with h.cache.update() as c:
            for dev, uri in self.resource.devices_on(h.name).items():
                export = uri.rsplit("/", 1)[1]
                vol = self.storage.identity(uri, export)
                c.record_scan(dev, CacheEntry(uri=uri, export=export, vol=vol, scanned_ns=1))

    def peer_of(self, name: str) -> str:
        return "b" if name == "a" else "a"

    def make_driver(self, h: Host) -> RefreshDriver:
        def emit(name: str, **fields: Any) -> None:
            json.dumps(fields)  # every event is JSON-able
            self.events.append((h.name, name, fields))
            if self.kill_when is not None and self.kill_when(h.name, name, fields):
                self.kill_when = None
                self.killed.append((h.name, name, fields))
                raise Killed(h.name)

        def send(peer: str, body: dict[str, Any]) -> None:
            json.dumps(body)
            self.sent.append((peer, h.name, body))
            self.net.append((peer, h.name, body))

        d: RefreshDriver | None = None

        def spawn(work: Callable[[], Any], done: Callable[[Any], None], what: str) -> None:
            assert d is not None and what in ("etcd", "node")
            self.jobs.append(Job(h.name, d, work, done, what))

        d = RefreshDriver(
            host=h.name, state_dir=str(h.dir), coord=OffTheLoop(self), keys=self.keys,
            node=h.node,
            cache=h.cache, send_notice=send, emit=emit, spawn=spawn, lease=lambda: h.lease,
            read_identity=self.storage.reader(h.name), retry_interval=1.0, peer_timeout=1.0,
            wall_ns=lambda: int(self.t * 1e9),
        )  # fmt: skip
        return d

    def start(self, name: str, role: HostRole | None = None) -> None:
        h = self.hosts[name]
        if role is not None:
            h.role = role
        h.lease = self.coord.grant_lease(2)
        h.driver = self.make_driver(h)
        h.starts += 1
        self.call(name, lambda d: d.track(self.resource, h.role, self.peer_of(name), self.t))

    def kill(self, name: str) -> None:
        """Drop the driver (its lease is no longer renewed: it expires after its TTL)."""
        h = self.hosts[name]
        h.driver = None
        h.lease = None
        self.net = [m for m in self.net if m[0] != name]

    def call(self, name: str, fn: Callable[[RefreshDriver], Any]) -> Any:
        h = self.hosts[name]
        if h.driver is None:
            return None
        try:
            return fn(h.driver)
        except Killed:
            self.kill(name)
            return None

    def live(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.driver is not None]

    # -- time --

    def tick(self) -> None:
        self.t = round(self.t + DT, 6)
        self.ticks += 1
        for h in self.live():
            assert h.lease is not None
            self.coord.keepalive(h.lease)
        msgs, self.net = self.net, []
        for to, frm, body in msgs:
            if self.drop is not None and self.drop(to, frm, body):
                continue
            self.call(to, functools.partial(_notice, frm, body, self.t))
        jobs = [j for j in self.jobs if not j.held(self)]
        self.jobs = [j for j in self.jobs if j.held(self)]
        for job in jobs:
            self.in_job = True
            try:
                result = job.work()  # the node carries it out, its host dead or not
            finally:
                self.in_job = False
            if self.hosts[job.host].driver is job.driver:
                self.call(job.host, functools.partial(_done, job, result))
        if self.ticks % 2 == 0 and not self.cut:
            self.heartbeats()
        for h in self.live():
            due = h.d.get_timer()
            if due is not None and due <= self.t:
                self.call(h.name, lambda d: d.handle_timer(self.t))

    def heartbeats(self) -> None:
        for h in self.live():
            peer = self.hosts[self.peer_of(h.name)]
            if peer.driver is None:
                continue
            flags = json.loads(json.dumps(h.d.heartbeat_flags()))  # it goes as JSON
            lines = h.flags.read().pairs
            for pid, (flag, serial, op) in flags.items():
                # What is saved, never a flag a list waiting for a spawned job asked for.
                line = lines.get(pid)
                sent = PeerFlags(Flag(flag), serial, None if op is None else Op(op))
                assert sent == (PeerFlags(Flag.ZERO, 0, sent.op) if line is None
                                else line.on_heartbeat()), (h.name, pid, sent, line)  # fmt: skip
            self.call(peer.name, functools.partial(_peer_flags, h.name, flags, self.t))
            if peer.driver is not None:
                seen = peer.d.status()
                for pid, (flag, serial, _op) in flags.items():
                    if pid in seen and not seen[pid]["busy"]:
                        assert (seen[pid]["peer"], seen[pid]["peer_serial"]) == (flag, serial)
                        self.heard.append((peer.name, pid, flag, serial))

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / DT)):
            self.tick()

    def quiet(self) -> bool:
        if len(self.live()) != 2 or self.net or self.jobs:
            return False
        for h in self.hosts.values():
            for row in h.d.status().values():
                if row["own"] != "0" or row["peer"] != "0" or row["phase"] != "idle":
                    return False
        return all(h.d.ready("r1") for h in self.hosts.values())

    def settle(self, seconds: float = 60.0) -> None:
        for _ in range(round(seconds / DT)):
            if self.quiet():
                return
            self.tick()
        raise AssertionError(f"did not settle: {self.describe()}")

    def describe(self) -> str:
        return "; ".join(
            f"{h.name}: " + (json.dumps(h.d.status()) if h.driver else "dead")
            for h in self.hosts.values()
        )

    # -- looking --

    def names(self, host: str) -> list[str]:
        return [n for h, n, _ in self.events if h == host]

    def flag_saves(self, host: str, pid: str) -> list[str]:
        return [
            f["own"]
            for h, n, f in self.events
            if h == host and n == "refresh.flags" and f["pair"] == pid
        ]

    def entries(self, host: str) -> dict[str, str]:
        """Device → cached PVID."""
        return {n: e.pvid for n, e in self.hosts[host].cache.read().entries.items()}

    def check_consistent(self) -> None:
        """Every flag 0 (in the drivers and in the files), every cache entry true to its
        volume, the S-VOL entries present after a split, the lock where the protocol puts
        it (the active's after a split: the op it saved), one state per consistency group,
        both hosts ready."""
        states = {p.state for p in self.storage.pairs.values()}
        assert len(states) == 1, f"group g1 is half split: {self.storage.pairs}"
        active = next(h for h in self.hosts.values() if h.role is ACTIVE)
        ops = {pid: row["op"] for pid, row in active.d.status().items()}
        for h in self.hosts.values():
            for pid, row in h.d.status().items():
                assert (row["own"], row["peer"], row["phase"]) == ("0", "0", "idle"), (pid, row)
            for pid, f in h.flags.read().pairs.items():
                assert (f.own, f.peer) == (Flag.ZERO, Flag.ZERO), (h.name, pid, f)
            cached = h.cache.read().entries
            for dev, uri in self.resource.devices_on(h.name).items():
                if dev in cached:
                    assert cached[dev].pvid == self.storage.current(uri), (h.name, dev)
                elif (
                    uri.startswith(A_NODE)
                    or ops[self.storage.pid_of(uri.rsplit("/")[-1])] == "split"
                ):
                    # (after a failed replica the op is the one tried: a construction's
                    # erase may have left a split S-VOL without an entry, never a wrong one)
                    raise AssertionError(f"{h.name}: no cache entry for {dev} ({uri})")
            assert h.d.ready("r1"), (h.name, h.d.status())
        for pid, row in active.d.status().items():
            holder = active.name if row["op"] == "split" else None
            assert lock_holder(self.coord, self.keys, pid) == holder, (pid, row)


# --------------------------------------------------------------------------------------------
# The exchange, end to end


def test_a_split_runs_the_whole_exchange_and_the_standby_caches_the_new_pvid(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    w.settle()  # b joins (a construction: its hidden S-VOLs' entries are erased)
    assert set(w.entries("b")) == set()
    before = dict(w.entries("a"))
    w.events.clear()
    assert w.call("a", lambda d: d.begin("r1", SPLIT, w.t)) == [P1, P2]
    assert not w["a"].d.idle("r1")
    w.settle()
    assert w["a"].d.idle("r1")
    # One split of the whole consistency group, not one per pair.
    assert w["a"].node.calls == [("pair.split", "g1")]
    for pid in PAIRS:
        assert w.flag_saves("a", pid) == ["A1", "A1", "A2", "A3", "0"]
        assert w.flag_saves("b", pid) == ["B1", "B2", "B3", "0"]
    # b read each S-VOL from the volume, under its own lock; the active holds it after.
    b_reads = [(uri, holder) for host, uri, holder in w.storage.reads if host == "b"]
    assert b_reads == [(B_NODE + "vol1", "b"), (B_NODE + "vol2", "b")]
    new = {dev: w.storage.current(uri) for dev, uri in w.resource.devices_on("b").items()}
    assert w.entries("b") == new and set(new.values()).isdisjoint(before.values())
    # a's own S-VOL device followed; its P-VOL entries are untouched.
    assert w.entries("a")["sv0"] == new["pv0"]
    assert {k: w.entries("a")[k] for k in ("pv0", "pv1")} == {k: before[k] for k in ("pv0", "pv1")}
    assert sorted(f["pair"] for h, n, f in w.events if h == "a" and n == "refresh.usable") == [
        P1,
        P2,
    ]
    usable_at = w.events.index(next(e for e in w.events if e[1] == "refresh.usable"))
    reflected_at = max(
        i for i, (h, n, f) in enumerate(w.events) if h == "b" and f.get("own") == "B3"
    )
    assert usable_at > reflected_at
    for pid in PAIRS:
        assert w["a"].d.status()[pid]["last"]["event"] == "refresh.done"
    w.check_consistent()


def test_a_resync_erases_the_standby_entries_and_keeps_the_active_pvol_entries(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, split=True)
    w.settle()
    assert set(w.entries("b")) == {"pv0", "pv1"}
    for pid in PAIRS:
        assert lock_holder(w.coord, w.keys, pid) == "a"  # the active holds it at rest
    pvols = {k: w.entries("a")[k] for k in ("pv0", "pv1")}
    reads = len(w.storage.reads)
    w.call("a", lambda d: d.begin("g1", CONSTRUCTION, w.t))
    w.settle()
    assert w["a"].node.calls == [("pair.resync", "g1")]
    assert w.entries("b") == {}
    assert w.entries("a") == pvols  # sv0 erased, the P-VOLs kept
    assert len(w.storage.reads) == reads  # a construction reads no volume
    w.check_consistent()


def test_a_split_without_its_s_vol_device_on_the_active_still_refreshes_the_standby(
    tmp_path: Path,
) -> None:
    plain = resource()
    res = replace(plain, devices=tuple(d for d in plain.devices if d.name != "sv0"))
    w = World(tmp_path, res=res)
    w.settle()
    w.call("a", lambda d: d.begin("r1", SPLIT, w.t))
    w.settle()
    assert w.entries("b")["pv0"] == w.storage.current(B_NODE + "vol1")
    w.check_consistent()


# --------------------------------------------------------------------------------------------
# Heartbeat flags


def test_every_flag_round_trips_through_a_heartbeat() -> None:
    flags = {
        f"g1/p{i}": PeerFlags(flag, serial, op)
        for i, (flag, serial, op) in enumerate(
            (f, s, o) for f in Flag for s in (0, 1, (1 << 63) - 1) for o in (None, *Op)
        )
    }
    wire = json.loads(json.dumps(encode_heartbeat_flags(flags)))
    assert wire["g1/p0"] == ["0", 0, None]
    assert decode_heartbeat_flags(wire) == flags


def test_the_flags_a_peer_heard_are_the_flags_it_was_sent_at_every_step(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.settle()
    w.hold.add("a")  # a slow replica: both sit at A1 / B1 for a second
    w.drop = lambda to, frm, body: body["notice"] == "REFLECTED"  # a learns B3 by heartbeat
    w.call("a", lambda d: d.begin("r1", SPLIT, w.t))
    w.run(1.0)
    w.hold.clear()
    w.settle()
    heard = {(to, flag) for to, _pid, flag, _serial in w.heard}
    assert {("b", "A1"), ("b", "A3"), ("b", "0"), ("a", "B1"), ("a", "B3"), ("a", "0")} <= heard


@given(
    st.one_of(
        st.dictionaries(
            st.one_of(st.text(max_size=4), st.sampled_from([P1, ""])),
            st.one_of(
                st.lists(
                    st.one_of(
                        st.sampled_from(["A1", "B3", "0", "split", "construction", "X"]),
                        st.integers(-2, 1 << 64),
                        st.none(),
                        st.booleans(),
                        st.floats(),
                    ),
                    max_size=4,
                ),
                st.text(max_size=3),
                st.none(),
            ),
            max_size=3,
        ),
        st.lists(st.integers(), max_size=2),
        st.text(max_size=3),
        st.none(),
    )
)
def test_any_heartbeat_flags_decode_or_raise_one_protocol_error(doc: Any) -> None:
    try:
        flags = decode_heartbeat_flags(doc)
    except ProtocolError:
        return
    assert decode_heartbeat_flags(encode_heartbeat_flags(flags)) == flags


def test_lost_answers_are_replaced_by_the_heartbeat_flags(tmp_path: Path) -> None:
    w = World(tmp_path, split=True)
    w.settle()
    w.sent.clear()
    # Every START_ACK and REFLECTED is lost: the heartbeats showing B1 and B3 stand in.
    w.drop = lambda to, frm, body: body["notice"] in ("START_ACK", "REFLECTED")
    w.call("a", lambda d: d.begin("r1", CONSTRUCTION, w.t))
    w.settle()
    from_a = sorted((b["pair"], b["notice"]) for to, frm, b in w.sent if frm == "a")
    # Each sent once: the heartbeat (every 0.2 s) came before the resend (1 s).
    assert from_a == sorted([(p, n) for p in PAIRS for n in ("COMPLETE", "START")])
    w.check_consistent()


def test_a_lost_start_is_sent_again_after_the_retry_interval(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.settle()
    w.sent.clear()
    lost: list[str] = []

    def drop(to: str, frm: str, body: dict[str, Any]) -> bool:
        if body["notice"] == "START" and body["pair"] == P2 and not lost:
            lost.append(P2)
            return True
        return False

    w.drop = drop
    begun = w.t
    w.call("a", lambda d: d.begin("r1", SPLIT, w.t))
    w.settle()
    starts = [b for _to, frm, b in w.sent if frm == "a" and b["notice"] == "START"]
    assert [b["pair"] for b in starts] == [P1, P2, P2]
    # The group waited for p2's acknowledgement: still one split of g1.
    assert w["a"].node.calls == [("pair.split", "g1")]
    assert w.t - begun >= 1.0
    w.check_consistent()


# --------------------------------------------------------------------------------------------
# Kill and restart at every flag


KILL_POINTS = {
    # name: (host, flag saved, the flag before it)
    "A1": ("a", "A1", "0"),
    "A1-started": ("a", "A1", "A1"),
    "A2": ("a", "A2", "A1"),
    "A3": ("a", "A3", "A2"),
    "B1": ("b", "B1", "0"),
    "B2": ("b", "B2", "B1"),
    "B3": ("b", "B3", "B2"),
}


@pytest.mark.parametrize("down", [0.0, 3.0], ids=["restart", "outage"])
@pytest.mark.parametrize("op", [SPLIT, CONSTRUCTION])
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_a_host_killed_right_after_it_saved_each_flag_recovers(
    tmp_path: Path, point: str, op: Op, down: float
) -> None:
    w = World(tmp_path, split=op is CONSTRUCTION)
    w.settle()
    host, flag, previous = KILL_POINTS[point]
    at = (host, "refresh.flags", flag, previous, P1)
    w.kill_when = lambda h, name, f: (h, name, f.get("own"), f.get("previous"), f.get("pair")) == at
    w.call("a", lambda d: d.begin("r1", op, w.t))
    for _ in range(100):
        if w.killed:
            break
        w.tick()
    assert w.killed, f"{host} never saved {flag}"
    assert w.hosts[host].driver is None
    assert w.hosts[host].flags.get(P1).own is Flag(flag)  # it was saved before the kill
    w.run(down)
    w.start(host)
    w.settle()
    w.check_consistent()
    target = "PSUS" if op is SPLIT else "COPY"
    if w.storage.pairs[P1].state != target:
        # The exchange could not finish its replica (killed in the middle of begin, or the
        # standby lost before it acknowledged): nothing half done; the operator runs it again.
        assert point == "A1" or down, point
        w.call("a", lambda d: d.begin("r1", op, w.t))
        w.settle()
        w.check_consistent()
    assert all(p.state == target for p in w.storage.pairs.values())
    assert all(row["op"] == op for row in w["a"].d.status().values())
    if op is CONSTRUCTION:
        assert w.entries("b") == {}


def test_the_devices_a_promotion_must_read_afresh_are_those_of_an_exchange_under_way(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    w.settle()
    assert w["b"].d.unreflected("r1") == {}
    w.hold.add("b")  # b reflects a split: its read of the S-VOLs waits
    w.call("a", lambda d: d.begin("r1", SPLIT, w.t))
    seen: list[dict[str, str]] = []
    for _ in range(100):
        seen.append(w["b"].d.unreflected("r1"))
        if any(j.host == "b" and j.what == "node" for j in w.jobs):
            break
        w.tick()
    at_b1 = next(u for u in seen if u)  # from B1 on, before the reflection is done
    assert set(at_b1) == {"pv0", "pv1"} and "split of g1/p" in at_b1["pv0"]
    assert at_b1["pv0"].endswith(" at B1")
    assert set(seen[-1]) == {"pv0", "pv1"} and seen[-1]["pv0"].endswith(" at B2")
    assert w["a"].d.unreflected("r1") == {}  # the active's own cache step is its recovery's
    assert w["b"].d.unreflected("other") == {}
    w.hold.clear()
    w.settle()
    assert w["b"].d.unreflected("r1") == {}


def test_a_standby_reflects_the_pair_as_its_node_shows_it_not_as_it_was_listed(
    tmp_path: Path,
) -> None:
    # Regression (found by the lab's crash tests): b restarted while its side was the
    # primary of pairs a had taken over (PSUE; a side made as the secondary does not know
    # its peer's volume name), the pairs were swapped back by a plain pair resync --swap,
    # and b reflected the next split from the rows listed at its restart: no S-VOL device,
    # nothing stored, its cache stale until a failover failed with the access error.
    w = World(tmp_path)
    w.settle()
    b = w["b"]
    b.node.side, b.node.peer_volume = "primary", False
    w.kill("b")
    w.start("b")
    w.settle()
    b.node.side, b.node.peer_volume = "secondary", True  # swapped back, outside the protocol
    w.call("a", lambda d: d.begin("r1", SPLIT, w.t))
    w.settle()
    assert "refresh.no_device" not in w.names("b")
    for dev, uri in w.resource.devices_on("b").items():
        assert w.entries("b").get(dev) == w.storage.current(uri), dev
    w.check_consistent()


def test_a_standby_killed_while_it_reads_under_the_lock_recovers(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.settle()
    w.hold.add("b")
    w.call("a", lambda d: d.begin("r1", SPLIT, w.t))
    for _ in range(100):
        if any(j.host == "b" and j.what == "node" for j in w.jobs):  # b's read, under its lock
            break
        w.tick()
    assert lock_holder(w.coord, w.keys, P1) == "b"
    assert w["b"].d.status()[P1]["busy"]
    w.kill("b")
    w.hold.clear()
    w.start("b")  # a new lease: the old one holds the lock until it expires
    w.settle()
    assert "refresh.retry" in w.names("b")
    w.check_consistent()


def test_an_active_killed_while_its_replica_ran_does_not_run_it_twice(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.settle()
    w.hold.add("a")
    w.call("a", lambda d: d.begin("r1", SPLIT, w.t))
    for _ in range(100):
        if any(j.host == "a" and j.what == "node" for j in w.jobs):  # the group's split is spawned
            break
        w.tick()
    w.kill("a")
    w.hold.clear()
    w.tick()  # the node splits the group; nobody hears the result
    assert w.storage.pairs[P1].state == "PSUS"
    w.start("a")  # at A1 with the replica started: RunReplica(redo)
    w.settle()
    assert w["a"].node.calls == [("pair.split", "g1")]
    for pid in PAIRS:
        last = w["a"].d.status()[pid]["last"]
        assert last["event"] == "refresh.done" and last["ok"] is True
    assert sorted(f["pair"] for h, n, f in w.events if n == "refresh.usable") == [P1, P2]
    w.check_consistent()


def test_a_promoted_standby_takes_the_lock_and_the_old_active_is_refreshed_as_standby(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    w.settle()
    w.call("a", lambda d: d.begin("r1", SPLIT, w.t))
    w.settle()
    w.kill("a")
    w.run(3.0)  # a's lease expires with its lock
    w["b"].role = ACTIVE
    w.call("b", lambda d: d.track(w.resource, ACTIVE, "a", w.t))
    w.run(0.5)
    assert "refresh.role" in w.names("b")
    for pid in PAIRS:
        assert lock_holder(w.coord, w.keys, pid) == "b"
    w.start("a", STANDBY)
    w.settle()
    w.check_consistent()


def test_a_new_active_serving_its_s_vol_keeps_its_entry_when_it_adopts_a_construction(
    tmp_path: Path,
) -> None:
    # Regression (found by the lab's crash tests): a killed right after it saved A1 of a
    # split, b took over (SSWS) and attached its device; a came back as standby, aborted,
    # with a serial b never saw.  b adopted the peer's op (a construction) and its own-cache
    # step tried to erase the entry of the very device it serves: refused (attached), retried
    # for ever, every later cluster command refused.
    w = World(tmp_path)
    w.settle()
    w.kill_when = lambda host, name, f: host == "a" and name == "refresh.flags" and f["own"] == "A1"
    w.call("a", lambda d: d.begin("r1", SPLIT, w.t))
    assert w.killed and w["a"].driver is None
    w.run(3.0)  # a's lease expires
    for p in w.storage.pairs.values():
        p.state = "SSWS"  # b took its S-VOLs over
    uri = B_NODE + "vol1"
    with w["b"].cache.update() as c:  # the takeover attached it, PVID-checked
        vol = w.storage.identity(uri, "vol1")
        c.record_scan("pv0", CacheEntry(uri=uri, export="vol1", vol=vol, scanned_ns=2))
        c.set_attachment("pv0", Attachment("nbd-client", "/dev/nbd0", uri, 1))
    w["b"].role = ACTIVE
    w.call("b", lambda d: d.track(w.resource, ACTIVE, "a", w.t))
    w.start("a", STANDBY)
    w.run(3.0)
    assert [f for h, n, f in w.events if h == "b" and n == "refresh.retry"] == []
    entry = w["b"].cache.read().entries["pv0"]
    assert entry.attachment is not None and entry.pvid == w.storage.current(uri)
    assert all(row["own"] == "0" and row["phase"] == "idle" for row in w["b"].d.status().values())


# --------------------------------------------------------------------------------------------
# Failures: a read, the lock, the node


def test_a_failed_read_is_retried_and_the_standby_lets_go_of_the_lock(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.settle()
    w.storage.fail_reads["b"] = 1
    w.call("a", lambda d: d.begin("r1", SPLIT, w.t))
    for _ in range(30):
        w.tick()
        if "refresh.retry" in w.names("b"):
            break
    retry = next(f for h, n, f in w.events if h == "b" and n == "refresh.retry")
    assert retry["failed"] == "ReadIdentityFromVolume" and retry["saved"] == "B2"
    assert lock_holder(w.coord, w.keys, P1) in (None, "a")  # b let go
    w.settle()
    w.check_consistent()


def test_a_lock_held_by_the_other_host_fails_the_action_until_it_is_free(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.settle()
    # An old life of b holds g1/p1's lock under a lease nobody renews.
    from cluster.coord import acquire_lock

    stale = w.coord.grant_lease(2)
    assert acquire_lock(w.coord, w.keys, P1, "b", stale)
    w.call("a", lambda d: d.begin("r1", SPLIT, w.t))
    w.run(0.5)
    retry = next(f for h, n, f in w.events if h == "a" and n == "refresh.retry")
    assert retry["failed"] == "TakeLock" and "held by b" in retry["reason"]
    assert w["a"].node.calls == []  # no replica without the lock
    w.settle()
    w.check_consistent()


def test_a_node_that_does_not_answer_is_asked_again(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.kill("b")
    w["b"].node.down = True
    w.start("b")
    assert w["b"].d.status() == {} and not w["b"].d.ready("r1")
    assert "refresh.discovery_failed" in w.names("b")
    w.run(1.5)
    w["b"].node.down = False
    w.settle()
    assert sorted(w["b"].d.status()) == [P1, P2]
    w.check_consistent()


def test_a_silent_peer_is_lost_after_the_peer_timeout(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.settle()
    w.cut = True
    last = max(w.t - DT * (w.ticks % 2), w.t - 0.2)
    d = w["a"].d
    due = d.get_timer()
    assert due is not None and last <= due - 1.0 <= w.t
    d.handle_timer(due - 0.01)
    assert "refresh.peer_silent" not in w.names("a")
    d.handle_timer(due)
    assert "refresh.peer_silent" in w.names("a")
    assert all(not row["peer_up"] for row in d.status().values())
    with pytest.raises(IllegalState, match="standby b is not heard"):
        d.begin("r1", SPLIT, due)
    w.cut = False
    w.run(0.5)
    assert "refresh.peer_heard" in w.names("a")
    assert all(row["peer_up"] for row in d.status().values())
    w.settle()
    w.check_consistent()


# --------------------------------------------------------------------------------------------
# Trust and malformed input


def test_a_host_not_among_the_resource_hosts_is_refused_for_flags_and_notices(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    w.settle()
    before = w["b"].d.status()
    for _ in range(2):  # logged once per peer and reason
        w["b"].d.peer_flags("c", {P1: ["A3", 9, "split"]}, w.t)
        w["b"].d.notice("c", {"notice": "COMPLETE", "pair": P1, "serial": 9, "op": "split"}, w.t)
    w.run(0.5)
    assert w["b"].d.status() == before and w.entries("b") == {}
    refused = [f for h, n, f in w.events if h == "b" and n == "refresh.refused"]
    assert sorted(f["what"] for f in refused) == [f"flags for {P1}", f"notice for {P1}"]
    assert all(f["peer"] == "c" and "not a host of resource r1" in f["reason"] for f in refused)


def test_another_host_of_the_resource_is_not_heard_as_its_peer(tmp_path: Path) -> None:
    w = World(tmp_path, res=resource(hosts=("a", "b", "c")))
    w.settle()
    before = w["a"].d.status()
    w["a"].d.peer_flags("c", {P1: ["B3", 9, "split"]}, w.t)
    w["a"].d.notice("c", {"notice": "REFLECTED", "pair": P1, "serial": 9}, w.t)
    assert w["a"].d.status() == before
    refused = [f["reason"] for h, n, f in w.events if h == "a" and n == "refresh.refused"]
    assert len(refused) == 2 and all("not the peer of resource r1 (b)" in r for r in refused)


BAD_NOTICES: list[Any] = [
    None,
    [],
    "START",
    {"notice": "START"},
    {"notice": "HELLO", "pair": P1, "serial": 1},
    {"notice": "START", "pair": P1, "serial": 0, "op": "split"},
    {"notice": "START", "pair": P1, "serial": 1, "op": "merge"},
    {"notice": "COMPLETE", "pair": P1, "serial": True, "op": "split"},
    {"notice": "REFLECTED", "pair": "", "serial": 1},
]
BAD_FLAGS: list[Any] = [
    None,
    "flags",
    [P1],
    {P1: ["B9", 1, None]},
    {P1: ["B1", -1, None]},
    {P1: ["B1", 1, "merge"]},
    {P1: ["B1", 1]},
    {P1: "B1"},
    {"": ["0", 0, None]},
]


def test_malformed_notices_and_flags_are_logged_not_raised(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.settle()
    before = (w["a"].d.status(), w["b"].d.status())
    for body in BAD_NOTICES:
        w["b"].d.notice("a", body, w.t)
    for flags in BAD_FLAGS:
        w["b"].d.peer_flags("a", flags, w.t)
    w["b"].d.notice("a", {"notice": "START", "pair": "g1/p9", "serial": 7, "op": "split"}, w.t)
    w["b"].d.peer_flags("a", {"g1/p9": ["A1", 7, "split"]}, w.t)  # no news: not refused
    assert (w["a"].d.status(), w["b"].d.status()) == before
    refused = [f for h, n, f in w.events if h == "b" and n == "refresh.refused"]
    assert {f["what"] for f in refused} == {
        "malformed notice",
        "malformed flags",
        "notice for g1/p9",
    }
    # A notice for the other role (the hosts disagree on who is active) is dropped.
    w["b"].d.notice("a", {"notice": "REFLECTED", "pair": P1, "serial": 1}, w.t)
    dropped = [f for h, n, f in w.events if h == "b" and n == "refresh.dropped"]
    assert len(dropped) == 1 and "cannot handle REFLECTED" in dropped[0]["reason"]
    w.settle()
    w.check_consistent()


# --------------------------------------------------------------------------------------------
# begin() refusals


def test_begin_refuses_with_one_clear_line_and_starts_nothing(tmp_path: Path) -> None:
    w = World(tmp_path, split=True, res=resource(groups=("g1", "g9")))
    w.settle()
    a, b = w["a"].d, w["b"].d
    at_rest = a.status()

    def refused(error: type[PairvolError], match: str, fn: Callable[[], Any]) -> None:
        with pytest.raises(error, match=match) as e:
            fn()
        assert "\n" not in str(e.value)
        assert a.status() == at_rest and w["a"].node.calls == []

    refused(
        IllegalState,
        "b is its standby host; run it on the active",
        lambda: b.begin("r1", SPLIT, w.t),
    )
    refused(NotFound, "'r2' is no resource or group", lambda: a.begin("r2", SPLIT, w.t))
    refused(IllegalState, "g9: no pairs on a's node", lambda: a.begin("g9", SPLIT, w.t))
    not_an_op: Any = "split"
    refused(UsageError, "operation 'split' is not", lambda: a.begin("r1", not_an_op, w.t))
    # The S-VOL attached here: a resync would pull it from under its user.
    with w["a"].cache.update() as c:
        c.set_attachment("sv0", Attachment("nbd-client", "/dev/nbd3", B_NODE + "vol1", 1))
    refused(
        IllegalState, "attached here as sv0 .*detach it", lambda: a.begin("r1", CONSTRUCTION, w.t)
    )
    with w["a"].cache.update() as c:
        c.set_attachment("sv0", None)
    # The standby's node does not show p2 (its agent does not track it).
    w["b"].node.hidden.add(P2)
    w.kill("b")
    w.start("b")
    w.run(0.5)
    refused(IllegalState, "standby b does not report it", lambda: a.begin("r1", CONSTRUCTION, w.t))
    w["b"].node.hidden.clear()
    w.kill("b")
    w.start("b")
    w.run(0.5)
    w.settle()
    # An exchange already running.
    a.begin("r1", CONSTRUCTION, w.t)
    with pytest.raises(IllegalState, match="an exchange is already running"):
        a.begin("g1", SPLIT, w.t)
    w.settle()
    # The standby lost.
    w.kill("b")
    w.run(1.5)
    calls = list(w["a"].node.calls)
    with pytest.raises(IllegalState, match="standby b is not heard"):
        a.begin("r1", SPLIT, w.t)
    assert w["a"].node.calls == calls
    assert all(row["own"] == "0" for row in a.status().values())


def test_forget_stops_the_machines_and_releases_the_locks(tmp_path: Path) -> None:
    w = World(tmp_path, split=True)
    w.settle()
    assert lock_holder(w.coord, w.keys, P1) == "a"
    w["a"].d.forget("r1")
    assert w["a"].d.status() == {} and not w["a"].d.ready("r1")
    w.tick()  # the release runs in a spawned job
    assert lock_holder(w.coord, w.keys, P1) is None
    assert w["a"].d.heartbeat_flags() == {}
    with pytest.raises(NotFound):
        w["a"].d.begin("r1", SPLIT, w.t)
    assert w["a"].flags.read().pairs  # the status file keeps its lines
