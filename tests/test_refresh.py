"""The standby PVID-refresh protocol (cluster/refresh.py): pure, a scripted clock, no sleeping.

1. The tables: every fact is legal everywhere, notices for the other role are refused, the
   recovery table covers every (role, flag).
2. h11's ConnectionPair: two machines (active "a", standby "b") over a fake link, with a fake
   S-VOL (its PVID and whether it is split), the S-VOL lock, each host's cache entry and
   status file.  Split and construction run end to end; either host is killed (its machine
   dropped, the rest of its action list lost) right after it saved each flag A1, A2, A3, B1,
   B2, B3, or while the replica runs, and restarted from its saved flags: quickly (the peer
   never noticed), after an outage (the peer got PeerLost), or after a failover (the standby
   promoted, the old active back as the standby).  Both caches end consistent with the
   volume and every flag ends 0.
3. Hypothesis: random commands, kills, cuts, failovers and action failures; a ready standby's
   cache is never wrong, and when things settle every flag is 0 and both caches agree with
   the volume.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cluster.refresh import (
    FACTS,
    NOTICE_KINDS,
    RECOVERY,
    ROLE_PHASES,
    ROWS,
    TRANSITIONS,
    Action,
    ActionFailed,
    Begin,
    Complete,
    EmitEvent,
    EraseCacheEntries,
    Flag,
    HostRole,
    Kind,
    Op,
    PairFlags,
    PairState,
    PeerFlags,
    PeerLost,
    Phase,
    ReadIdentityFromVolume,
    Reflected,
    Refresh,
    RefreshMachine,
    ReleaseLock,
    ReplicaDone,
    ReportUsable,
    RoleChanged,
    RunReplica,
    SaveFlags,
    SendNotice,
    Serial,
    Start,
    StartAck,
    StoreCacheEntry,
    TakeLock,
    decode_notice,
    encode_notice,
    flag_from_wire,
    render_tables,
)
from replicator.errors import IllegalState, ProtocolError, UsageError

ACTIVE, STANDBY = HostRole.ACTIVE, HostRole.STANDBY
PAIR = "g1/p1"
SPLIT, CONSTRUCTION = Op.SPLIT, Op.CONSTRUCTION


# --------------------------------------------------------------------------------------------
# 1. The tables


def test_facts_are_legal_in_every_phase_of_both_roles() -> None:
    for role, phases in ROLE_PHASES.items():
        for phase in phases:
            assert (role, phase, Kind.PEER_LOST, None, Serial.NA) in TRANSITIONS
            for flag in Flag:
                for serial in (Serial.OLDER, Serial.SAME, Serial.NEWER, Serial.ZERO):
                    assert (role, phase, Kind.PEER_FLAGS, flag, serial) in TRANSITIONS


def test_notices_reach_only_the_role_they_are_for() -> None:
    for (role, _phase, kind, _flag, _serial), move in TRANSITIONS.items():
        if kind in (Kind.START, Kind.COMPLETE):
            assert role is STANDBY, move.label
        if kind in (Kind.START_ACK, Kind.REFLECTED, Kind.BEGIN, Kind.REFRESH, Kind.REPLICA_DONE):
            assert role is ACTIVE, move.label
    m, _ = RefreshMachine.restart(PAIR, ACTIVE, PairFlags(), 0.0)
    with pytest.raises(IllegalState, match="active side cannot handle START"):
        m.handle(Start(PAIR, 1, SPLIT), 0.0)
    s, _ = RefreshMachine.restart(PAIR, STANDBY, PairFlags(), 0.0)
    with pytest.raises(IllegalState, match="standby side cannot handle Begin"):
        s.handle(Begin(SPLIT), 0.0)
    with pytest.raises(IllegalState, match="notice for pair g1/other"):
        s.handle(Start("g1/other", 1, SPLIT), 0.0)
    assert s.phase is Phase.IDLE and s.flags == PairFlags()


def test_every_row_decides_something_and_recovery_covers_every_flag() -> None:
    labels = {m.label for m in TRANSITIONS.values()}
    assert {r.label for r in ROWS} == labels, "a row is shadowed by earlier ones"
    assert set(RECOVERY) == {(r, f, b) for r in HostRole for f in Flag for b in (False, True)}
    for (role, _flag, _started), rec in RECOVERY.items():
        assert rec.phase in ROLE_PHASES[role]
    assert set(NOTICE_KINDS) | FACTS <= set(Kind)


def test_a_begin_while_busy_is_refused_and_changes_nothing() -> None:
    m, _ = RefreshMachine.restart(PAIR, ACTIVE, PairFlags(), 0.0)
    m.handle(Begin(SPLIT), 0.0)
    before = (m.phase, m.flags)
    with pytest.raises(IllegalState, match="cannot handle Begin in phase await-ack"):
        m.handle(Begin(CONSTRUCTION), 0.0)
    assert (m.phase, m.flags) == before


def test_notices_round_trip_and_anything_else_is_one_protocol_error() -> None:
    for n in (Start(PAIR, 3, SPLIT), StartAck(PAIR, 3), Complete(PAIR, 9, CONSTRUCTION),
              Reflected(PAIR, 1)):  # fmt: skip
        assert decode_notice(encode_notice(n)) == n
    assert encode_notice(Complete(PAIR, 2, SPLIT)) == {
        "notice": "COMPLETE",
        "pair": PAIR,
        "serial": 2,
        "op": "split",
    }
    for bad in (
        None,
        [],
        {"notice": "START", "pair": PAIR, "serial": 1},
        {"notice": "START", "pair": PAIR, "serial": 1, "op": "merge"},
        {"notice": "START_ACK", "pair": PAIR, "serial": 0},
        {"notice": "START_ACK", "pair": PAIR, "serial": True},
        {"notice": "REFLECTED", "pair": "", "serial": 1},
        {"notice": "HELLO", "pair": PAIR, "serial": 1},
        {"notice": "REFLECTED", "pair": PAIR, "serial": 1, "op": "split"},
    ):
        with pytest.raises(ProtocolError):
            decode_notice(bad)
    assert flag_from_wire("B2") is Flag.B2
    for bad_flag in ("B4", 0, None, "a1"):
        with pytest.raises(ProtocolError):
            flag_from_wire(bad_flag)


@given(
    st.one_of(
        st.dictionaries(
            st.sampled_from(["notice", "pair", "serial", "op", "x"]),
            st.one_of(
                st.sampled_from(["START", "START_ACK", "COMPLETE", "REFLECTED", "split"]),
                st.text(max_size=5),
                st.integers(-2, 1 << 64),
                st.none(),
                st.booleans(),
                st.floats(),
            ),
        ),
        st.lists(st.integers()),
        st.text(),
    )
)
def test_any_input_decodes_or_raises_one_protocol_error(doc: Any) -> None:
    try:
        n = decode_notice(doc)
    except ProtocolError:
        return
    assert decode_notice(encode_notice(n)) == n


def test_pair_flags_check_their_fields() -> None:
    with pytest.raises(UsageError, match="names no operation"):
        PairFlags(own=Flag.A1)
    with pytest.raises(UsageError, match="serial"):
        PairFlags(serial=-1)
    with pytest.raises(UsageError, match="status flag"):
        PairFlags(own="A1")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# 2. ConnectionPair: two machines, a fake link, a fake S-VOL, a scripted clock


class LockBusy(Exception):
    """TakeLock while the other host holds the lock (the loop reports it as ActionFailed)."""


class Killed(Exception):
    """The host died in the middle of its action list."""


KillAt = Callable[[Action], bool]


@dataclass
class Host:
    name: str
    role: HostRole
    machine: RefreshMachine | None = None
    saved: PairFlags = field(default_factory=PairFlags)  # the status file
    cache: int | None = None  # the cache entry's PVID for the S-VOL (None: no entry)
    read_buf: int | None = None
    usable: int = 0  # ReportUsable count
    kill_at: KillAt | None = None
    fail_at: Callable[[Action], bool] | None = None

    @property
    def m(self) -> RefreshMachine:
        assert self.machine is not None
        return self.machine

    @property
    def alive(self) -> bool:
        return self.machine is not None


@dataclass
class Volume:
    pvol: int = 0x1111
    svol: int = 0x1111  # paired: the S-VOL carries the P-VOL's PVID
    split: bool = False
    minted: int = 0x2000

    def run(self, op: Op, redo: bool) -> tuple[bool, str]:
        if op is SPLIT:
            if self.split:
                return (True, "already split") if redo else (False, "already split")
            self.minted += 1
            self.svol, self.split = self.minted, True
            return True, ""
        if not self.split:
            return (True, "already paired") if redo else (False, "already paired")
        self.svol, self.split = self.pvol, False
        return True, ""


class ConnectionPair:
    def __init__(self, *, split: bool = False, retry: float = 1.0) -> None:
        self.now = 0.0
        self.retry = retry
        self.volume = Volume()
        if split:
            self.volume.run(SPLIT, False)
        self.hosts = {"a": Host("a", ACTIVE), "b": Host("b", STANDBY)}
        for h in self.hosts.values():
            h.cache = self.volume.svol  # both start consistent
            # A pair with no line in the status file: the loop seeds the S-VOL's state.
            h.saved = PairFlags(op=SPLIT if split else CONSTRUCTION)
        self.lock: str | None = "a" if split else None
        self.link_up = True
        self.in_flight: list[tuple[str, Any]] = []
        self.replicas: list[tuple[str, RunReplica, RefreshMachine]] = []
        self.events: list[tuple[str, EmitEvent]] = []
        self.saves: list[tuple[str, Flag]] = []
        self.refused: list[tuple[str, Any]] = []
        for h in self.hosts.values():
            self.start(h.name)

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

    def other(self, name: str) -> Host:
        return self.hosts["b" if name == "a" else "a"]

    # -- the adapter: carry out a list of actions in order --

    def carry(self, name: str, actions: list[Action]) -> None:
        h = self.hosts[name]
        machine = h.machine
        for i, action in enumerate(actions):
            if h.machine is not machine:  # killed meanwhile
                return
            try:
                self._one(h, action)
            except LockBusy as e:
                self.carry(name, h.m.handle(ActionFailed(i, str(e)), self.now))
                return
            if h.kill_at is not None and h.kill_at(action):
                h.kill_at = None
                raise Killed(name)

    def _one(self, h: Host, a: Action) -> None:
        if h.fail_at is not None and h.fail_at(a):
            h.fail_at = None
            raise LockBusy(f"injected failure of {type(a).__name__}")
        if isinstance(a, SaveFlags):
            h.saved = a.flags
            self.saves.append((h.name, a.own))
        elif isinstance(a, SendNotice):
            peer = self.other(h.name)
            if self.link_up and peer.alive:
                self.in_flight.append((peer.name, a.notice))
        elif isinstance(a, RunReplica):
            self.replicas.append((h.name, a, h.m))
        elif isinstance(a, TakeLock):
            if self.lock not in (None, h.name):
                raise LockBusy(f"the S-VOL lock is held by {self.lock}")
            self.lock = h.name
        elif isinstance(a, ReleaseLock):
            if self.lock == h.name:
                self.lock = None
        elif isinstance(a, ReadIdentityFromVolume):
            assert self.lock == h.name, "read the S-VOL without its lock"
            h.read_buf = self.volume.svol
        elif isinstance(a, StoreCacheEntry):
            assert h.read_buf is not None
            h.cache, h.read_buf = h.read_buf, None
        elif isinstance(a, EraseCacheEntries):
            h.cache = None
        elif isinstance(a, ReportUsable):
            assert self.volume.split
            h.usable += 1
        elif isinstance(a, EmitEvent):
            self.events.append((h.name, a))
        else:  # pragma: no cover
            raise AssertionError(a)

    def feed(self, name: str, event: Any) -> None:
        h = self.hosts[name]
        if not h.alive:
            return
        try:
            actions = h.m.handle(event, self.now)
        except IllegalState:
            if not isinstance(event, Start | StartAck | Complete | Reflected):
                raise
            # The hosts disagree on their roles (a notice sent before a failover): the loop
            # logs the refusal and drops the notice.
            self.refused.append((name, event))
            return
        try:
            self.carry(name, actions)
        except Killed:
            self.kill_now(name)

    # -- the world --

    def start(self, name: str, role: HostRole | None = None) -> None:
        h = self.hosts[name]
        if role is not None:
            h.role = role
        peer_up = self.link_up and self.other(name).alive
        h.machine, actions = RefreshMachine.restart(
            PAIR, h.role, h.saved, self.now, retry_interval=self.retry, peer_up=peer_up
        )
        try:
            self.carry(name, actions)
        except Killed:
            self.kill_now(name)

    def kill_now(self, name: str) -> None:
        h = self.hosts[name]
        h.machine = None
        h.read_buf = None
        self.in_flight = [(to, n) for to, n in self.in_flight if to != name]

    def outage(self, name: str) -> None:
        """The host stays down long enough: its lock lease expires, the peer loses it."""
        self.kill_now(name)
        if self.lock == name:
            self.lock = None
        self.feed(self.other(name).name, PeerLost("heartbeat timeout"))

    def failover(self) -> None:
        """The active is gone for good: the standby is promoted, the old one comes back as
        standby."""
        old, new = (self.a, self.b) if self.a.role is ACTIVE else (self.b, self.a)
        if old.alive:
            self.outage(old.name)
        elif self.lock == old.name:
            self.lock = None  # its lease expired
        new.role = ACTIVE
        self.feed(new.name, RoleChanged(ACTIVE))
        self.settle_one_side(new.name)
        self.start(old.name, STANDBY)

    def settle_one_side(self, name: str) -> None:
        for _ in range(50):
            if not self.step():
                break

    def heartbeat(self) -> None:
        if not self.link_up:
            return
        for name in ("a", "b"):
            h, peer = self.hosts[name], self.other(name)
            if h.alive and peer.alive:
                self.feed(peer.name, h.m.heartbeat_flags())

    def step(self) -> bool:
        """One round: deliver the notices in flight, finish the replicas, heartbeats.
        Returns whether anything happened."""
        busy = False
        while self.in_flight:
            to, notice = self.in_flight.pop(0)
            self.feed(to, notice)
            busy = True
        while self.replicas:
            name, run, machine = self.replicas.pop(0)
            ok, detail = self.volume.run(run.op, run.redo)  # storage runs it, host dead or not
            h = self.hosts[name]
            if h.machine is machine:
                self.feed(name, ReplicaDone(ok, detail))
            busy = True
        return busy

    def timers(self) -> bool:
        deadlines = [h.m.get_timer() for h in self.hosts.values() if h.alive]
        due = [d for d in deadlines if d is not None]
        if not due:
            return False
        self.now = max(self.now, min(due))
        for h in self.hosts.values():
            if h.alive:
                t = h.m.get_timer()
                if t is not None and t <= self.now:
                    try:
                        self.carry(h.name, h.m.handle_timer(self.now))
                    except Killed:
                        self.kill_now(h.name)
        return True

    def settle(self, rounds: int = 200) -> None:
        for _ in range(rounds):
            busy = self.step()
            self.heartbeat()
            busy = self.step() or busy
            if not busy and self.quiet():
                return
            if not busy:
                self.timers()
        raise AssertionError(f"did not settle: {self.describe()}")

    def quiet(self) -> bool:
        hs = list(self.hosts.values())
        return (
            all(h.alive and h.m.phase is Phase.IDLE and h.m.own is Flag.ZERO for h in hs)
            and not self.in_flight
            and not self.replicas
            and any(h.alive and h.m.ready for h in hs)
            and all(h.m.flags.peer is Flag.ZERO for h in hs)
        )

    def describe(self) -> str:
        return "; ".join(
            f"{h.name}: {h.role} {h.m.phase if h.alive else 'dead'} {h.saved}"
            for h in self.hosts.values()
        )

    # -- checks --

    def check_consistent(self) -> None:
        for h in self.hosts.values():
            assert h.cache in (None, self.volume.svol), (h.name, hex(h.cache or 0), self.describe())
        for h in self.hosts.values():
            assert h.saved.own is Flag.ZERO and h.saved.peer is Flag.ZERO, self.describe()
        standby = next(h for h in self.hosts.values() if h.role is STANDBY)
        assert standby.m.ready
        if self.volume.split:
            for h in self.hosts.values():
                assert h.cache == self.volume.svol, (h.name, self.describe())
            active = next(h for h in self.hosts.values() if h.role is ACTIVE)
            assert self.lock == active.name

    def names(self, host: str) -> list[str]:
        return [e.name for n, e in self.events if n == host]


def test_a_split_runs_the_whole_exchange_in_order() -> None:
    w = ConnectionPair()
    w.settle()
    assert w.b.m.ready
    w.saves.clear()
    w.events.clear()
    old = w.volume.svol
    w.feed("a", Begin(SPLIT))
    w.settle()
    assert w.volume.split and w.volume.svol != old
    own_a = [f for n, f in w.saves if n == "a"]
    own_b = [f for n, f in w.saves if n == "b"]
    assert [f for f, _ in itertools.groupby(own_a)] == [Flag.A1, Flag.A2, Flag.A3, Flag.ZERO]
    assert [f for f, _ in itertools.groupby(own_b)] == [Flag.B1, Flag.B2, Flag.B3, Flag.ZERO]
    assert w.a.usable == 1
    w.check_consistent()
    assert "refresh.done" in w.names("a") and "refresh.ready" in w.names("b")


def test_the_active_reports_usable_only_after_the_reflection_and_the_lock() -> None:
    m, _ = RefreshMachine.restart(PAIR, ACTIVE, PairFlags(), 0.0)
    out = m.handle(Begin(SPLIT), 0.0)
    assert [type(a) for a in out if not isinstance(a, EmitEvent)] == [SaveFlags, SendNotice]
    assert out[0] == SaveFlags(PAIR, PairFlags(Flag.A1, serial=1, op=SPLIT))
    assert m.get_timer() == 1.0
    out = m.handle(StartAck(PAIR, 1), 0.5)
    assert [type(a) for a in out if not isinstance(a, EmitEvent)] == [
        SaveFlags,  # A1, replica started: a restart now redoes it
        TakeLock,
        RunReplica,
    ]
    assert m.flags.replica_started and m.flags.own is Flag.A1
    assert m.get_timer() is None
    out = m.handle(ReplicaDone(), 2.0)
    kinds = [type(a) for a in out if not isinstance(a, EmitEvent)]
    assert kinds == [
        SaveFlags,  # A2
        TakeLock,
        ReadIdentityFromVolume,
        StoreCacheEntry,
        ReleaseLock,
        SaveFlags,  # A3
        SendNotice,  # COMPLETE
    ]
    assert m.get_timer() == 3.0
    assert m.handle_timer(2.5) == []
    resent = m.handle_timer(3.0)
    assert SendNotice(Complete(PAIR, 1, SPLIT)) in resent
    assert m.get_timer() == 4.0
    out = m.handle(Reflected(PAIR, 1), 3.5)
    kinds = [type(a) for a in out if not isinstance(a, EmitEvent)]
    assert kinds == [TakeLock, ReportUsable, SaveFlags]
    assert m.flags.own is Flag.ZERO and m.get_timer() is None


def test_the_standby_saves_each_flag_before_the_step_it_guards() -> None:
    s, _ = RefreshMachine.restart(PAIR, STANDBY, PairFlags(), 0.0)
    out = s.handle(Start(PAIR, 1, SPLIT), 0.0)
    assert [type(a) for a in out if not isinstance(a, EmitEvent)] == [SaveFlags, SendNotice]
    out = s.handle(Complete(PAIR, 1, SPLIT), 1.0)
    assert [type(a) for a in out if not isinstance(a, EmitEvent)] == [
        SaveFlags,  # B2
        TakeLock,
        ReadIdentityFromVolume,
        StoreCacheEntry,
        ReleaseLock,
        SaveFlags,  # B3
        SendNotice,  # REFLECTED
    ]
    out = s.handle(Complete(PAIR, 2, CONSTRUCTION), 2.0)  # a newer exchange while at B3
    assert [type(a) for a in out if not isinstance(a, EmitEvent)] == [
        SaveFlags,
        EraseCacheEntries,
        SaveFlags,
        SendNotice,
    ]
    assert not s.ready
    s.handle(PeerFlags(Flag.ZERO, 2), 3.0)
    assert s.flags.own is Flag.ZERO and s.ready


def test_heartbeat_flags_stand_in_for_lost_acks() -> None:
    w = ConnectionPair()
    w.settle()
    w.link_up = False  # notices are lost, heartbeats still arrive (fed by hand below)
    w.feed("a", Begin(CONSTRUCTION))
    w.feed("b", Start(PAIR, w.a.m.flags.serial, CONSTRUCTION))
    w.link_up = True
    w.in_flight.clear()  # the START_ACK is lost
    w.heartbeat()  # b's B1 reaches a: acknowledged
    assert w.a.m.phase is Phase.REPLICA
    w.settle()
    w.check_consistent()


def test_a_new_standby_is_refreshed_before_it_is_ready() -> None:
    w = ConnectionPair(split=True)
    w.b.cache = 0xBAD  # whatever an old cache held
    w.b.saved = PairFlags()
    w.start("b")
    assert not w.b.m.ready
    w.settle()
    assert w.b.cache == w.volume.svol and w.b.m.ready
    assert "refresh.join" in w.names("a")
    w.check_consistent()


def test_no_replica_runs_while_the_standby_cannot_acknowledge_it() -> None:
    w = ConnectionPair()
    w.settle()
    w.outage("b")
    with pytest.raises(IllegalState, match="standby is unreachable"):
        w.a.m.handle(Begin(SPLIT), w.now)
    assert w.a.m.flags.own is Flag.ZERO
    w.start("b")
    w.settle()
    w.b.kill_at = lambda a: isinstance(a, SaveFlags)  # b dies before it saves B1
    w.feed("a", Begin(SPLIT))
    w.step()
    w.outage("b")
    assert w.a.m.phase is Phase.IDLE and not w.volume.split
    assert w.a.m.flags.op is CONSTRUCTION  # the S-VOL is still paired
    assert "refresh.aborted" in w.names("a")
    w.start("b")
    w.settle()
    w.check_consistent()


def test_a_failed_action_resumes_from_the_saved_flag_after_the_retry_interval() -> None:
    w = ConnectionPair(split=True)
    w.settle()
    w.b.fail_at = lambda a: isinstance(a, ReadIdentityFromVolume)
    w.feed("a", Begin(CONSTRUCTION))
    w.settle()  # no read on construction: the failure never fires
    w.b.fail_at = lambda a: isinstance(a, ReadIdentityFromVolume)
    w.feed("a", Begin(SPLIT))
    while w.step():
        pass
    assert w.b.m.phase is Phase.RETRY and w.b.saved.own is Flag.B2
    assert w.lock is None  # the standby let go of the lock it took
    assert "refresh.retry" in w.names("b")
    w.settle()
    w.check_consistent()


def test_a_replica_result_after_a_retry_is_absorbed_and_the_replica_not_run_twice() -> None:
    m, _ = RefreshMachine.restart(PAIR, ACTIVE, PairFlags(), 0.0)
    m.handle(Begin(SPLIT), 0.0)
    m.handle(StartAck(PAIR, 1), 0.0)
    out = m.handle(PeerFlags(Flag.B1, 1), 0.1)  # a peer-flag save ...
    assert isinstance(out[0], SaveFlags)
    m.handle(ActionFailed(0, "disk full"), 0.1)  # ... that failed
    assert m.phase is Phase.RETRY and m.get_timer() is None  # the replica still runs
    out = m.handle(ReplicaDone(), 2.0)
    assert [e.name for e in out if isinstance(e, EmitEvent)] == ["refresh.late_result"]
    assert m.get_timer() == 1.1
    out = m.handle_timer(2.0)
    assert RunReplica(PAIR, SPLIT, redo=True) in out  # redo from A1 (acknowledged)
    m.handle(ReplicaDone(), 3.0)  # the redo's result
    assert m.phase is Phase.AWAIT_REFLECTED
    with pytest.raises(IllegalState):
        m.handle(ReplicaDone(), 3.0)  # no replica outstanding now


# -- kills at every flag value --

KILL_FLAGS = {
    "a": (Flag.A1, Flag.A2, Flag.A3),
    "b": (Flag.B1, Flag.B2, Flag.B3),
}


def _after_save(flag: Flag) -> KillAt:
    return lambda a: isinstance(a, SaveFlags) and a.own is flag


def _during_replica(a: Action) -> bool:
    return isinstance(a, RunReplica)


KILL_POINTS = [
    (victim, str(flag), _after_save(flag)) for victim, flags in KILL_FLAGS.items() for flag in flags
] + [("a", "replica", _during_replica)]


@pytest.mark.parametrize("op", [SPLIT, CONSTRUCTION])
@pytest.mark.parametrize("how", ["quick", "outage", "failover"])
@pytest.mark.parametrize(("victim", "at", "kill_at"), KILL_POINTS, ids=[p[1] for p in KILL_POINTS])
def test_a_host_killed_at_every_flag_value_recovers(
    op: Op, how: str, victim: str, at: str, kill_at: KillAt
) -> None:
    w = ConnectionPair(split=op is CONSTRUCTION)
    w.settle()
    w.hosts[victim].kill_at = kill_at
    w.feed("a", Begin(op))
    for _ in range(20):
        if not w.hosts[victim].alive:
            break
        w.step()
        w.heartbeat()
    assert not w.hosts[victim].alive, f"{victim} was never at {at}"
    if how == "quick":
        w.start(victim)
    elif how == "outage":
        w.outage(victim)
        w.settle_one_side(w.other(victim).name)
        w.start(victim)
    elif victim == "a":
        w.failover()
    else:  # the standby died: fail over anyway once it is back (a switchover of roles)
        w.start(victim)
        w.settle()
        w.failover()
    w.settle()
    w.check_consistent()
    aborted = "refresh.aborted" in w.names("a")
    if not aborted and (how != "failover" or ("b", Flag.B1) in w.saves):
        # Redone by the survivor.  Lost: a standby lost before its acknowledgement arrived
        # (the active aborts), or a failover before the standby heard START.
        assert w.volume.split is (op is SPLIT)
    if aborted:
        assert w.volume.split is (op is CONSTRUCTION)


@pytest.mark.parametrize("op", [SPLIT, CONSTRUCTION])
@pytest.mark.parametrize("victim", ["a", "b"])
def test_both_hosts_killed_at_once_recover_from_their_files(op: Op, victim: str) -> None:
    for n in itertools.count():
        w = ConnectionPair(split=op is CONSTRUCTION)
        w.settle()
        count = 0

        def nth(a: Action, k: int = n) -> bool:
            nonlocal count
            count += 1
            return count == k + 1

        w.hosts[victim].kill_at = nth
        w.feed("a", Begin(op))
        w.settle_one_side(victim)
        if w.hosts[victim].alive:
            break  # the victim's last action was carried out: every point was tried
        w.kill_now(w.other(victim).name)
        w.start("a")
        w.start("b")
        w.settle()
        w.check_consistent()
    assert n > 3


# --------------------------------------------------------------------------------------------
# 3. Hypothesis: random runs against the model (the fake volume)


class Refreshing(RuleBasedStateMachine):
    @initialize(split=st.booleans())
    def setup(self, split: bool) -> None:
        self.w = ConnectionPair(split=split)

    def _active(self) -> Host:
        return next(h for h in self.w.hosts.values() if h.role is ACTIVE)

    @precondition(
        lambda self: (
            self._active().alive
            and self._active().m.phase is Phase.IDLE
            and self._active().m.peer_up
        )
    )
    @rule(op=st.sampled_from([SPLIT, CONSTRUCTION]))
    def command(self, op: Op) -> None:
        a = self._active()
        if (op is SPLIT) == self.w.volume.split:
            op = CONSTRUCTION if op is SPLIT else SPLIT
        self.w.feed(a.name, Begin(op))

    @precondition(lambda self: self._active().alive and self._active().m.phase is Phase.IDLE)
    @rule()
    def refresh(self) -> None:
        self.w.feed(self._active().name, Refresh())

    @rule()
    def step(self) -> None:
        self.w.step()

    @rule()
    def heartbeat(self) -> None:
        self.w.heartbeat()

    @rule()
    def tick(self) -> None:
        self.w.timers()

    @rule(name=st.sampled_from(["a", "b"]), after=st.integers(0, 12))
    def arm_kill(self, name: str, after: int) -> None:
        left = [after]

        def kill(_a: Action) -> bool:
            left[0] -= 1
            return left[0] < 0

        self.w.hosts[name].kill_at = kill

    @rule(
        name=st.sampled_from(["a", "b"]),
        kind=st.sampled_from([SaveFlags, TakeLock, ReadIdentityFromVolume, StoreCacheEntry]),
    )
    def arm_failure(self, name: str, kind: type) -> None:
        self.w.hosts[name].fail_at = lambda a: isinstance(a, kind)

    @rule(name=st.sampled_from(["a", "b"]), long=st.booleans())
    def kill(self, name: str, long: bool) -> None:
        if not self.w.hosts[name].alive:
            return
        if long:
            self.w.outage(name)
        else:
            self.w.kill_now(name)

    @rule(name=st.sampled_from(["a", "b"]))
    def restart(self, name: str) -> None:
        if not self.w.hosts[name].alive:
            self.w.start(name)

    @rule()
    def failover(self) -> None:
        self.w.failover()

    @rule()
    def cut_or_heal(self) -> None:
        self.w.link_up = not self.w.link_up
        if not self.w.link_up:
            self.w.in_flight.clear()
            for h in self.w.hosts.values():
                if h.alive and not self._other_lost_already(h):
                    self.w.feed(h.name, PeerLost("cut"))

    def _other_lost_already(self, h: Host) -> bool:
        return not h.m.peer_up

    @rule()
    def converge(self) -> None:
        self.w.link_up = True
        for h in self.w.hosts.values():
            h.kill_at = h.fail_at = None
            if not h.alive:
                self.w.start(h.name)
        self.w.settle()
        self.w.check_consistent()

    def teardown(self) -> None:
        if hasattr(self, "w"):
            self.converge()  # however a run ends, it settles with every flag at 0

    @invariant()
    def a_ready_standby_is_never_wrong(self) -> None:
        for h in self.w.hosts.values():
            if h.alive and h.m.ready:
                assert h.cache in (None, self.w.volume.svol), self.w.describe()


Refreshing.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_refresh_random_runs = Refreshing.TestCase


def test_state_machine_doc_has_the_refresh_tables() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "state-machines.md").read_text()
    assert "\n".join(render_tables()) in text, "run tools/gen-state-docs"


def test_at_rest_the_op_is_the_pairs_state_never_the_peers_line() -> None:
    # Regression (the lab's crash tests): a failover's takeover changed the pair's state with
    # no exchange, and the standby came back with a line of a newer serial from an exchange
    # it had aborted (its op a guess).  The new active adopted that op and refreshed its own
    # cache and the standby's as a split of a paired volume (a read of an S-VOL that cannot
    # be read, for ever) or as a construction of the volume it serves.
    flags = PairFlags(serial=3, peer_serial=3, op=SPLIT)
    m, _ = RefreshMachine.restart("g1/p1", HostRole.ACTIVE, flags, 0.0, peer_up=True)
    out = m.handle(PairState(CONSTRUCTION), 0.1)  # a swap takeover: the pair is PAIR again
    assert [type(a) for a in out] == [SaveFlags, EmitEvent]
    assert m.flags.op is CONSTRUCTION and m.flags.own is Flag.ZERO
    assert m.handle(PairState(CONSTRUCTION), 0.2) == []  # already so
    out = m.handle(PeerFlags(Flag.ZERO, 4, SPLIT), 0.3)  # the peer's aborted exchange
    assert m.flags.op is CONSTRUCTION
    assert EraseCacheEntries in [type(a) for a in out]  # a construction's own cache step
    assert not [a for a in out if isinstance(a, ReadIdentityFromVolume | TakeLock)]
    notices = [a for a in out if isinstance(a, SendNotice)]
    assert notices and all(a.notice.op is CONSTRUCTION for a in notices)
    # An exchange under way keeps its op.
    w = ConnectionPair()
    w.settle()
    w.feed("a", Begin(SPLIT))
    w.step()
    assert w.a.m.phase is not Phase.IDLE
    assert w.a.m.handle(PairState(CONSTRUCTION), w.now) == []
    assert w.a.m.flags.op is SPLIT
    with pytest.raises(UsageError, match="not split or construction"):
        w.a.m.handle(PairState("split"), w.now)  # type: ignore[arg-type]
    w.settle()
    w.check_consistent()
