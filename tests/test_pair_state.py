"""The pair state machine (replicator/pair_state.py): tables, scenarios, heartbeat, invariants.

Pure tests: no I/O, no sleeping; time is a number the test hands in.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.machinery
import itertools
import json
import types
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from replicator.errors import HeaderCorrupt, IllegalState, ProtocolError, UsageError
from replicator.header import Role
from replicator.pair_state import (
    FACTS,
    HIDDEN_STATES,
    JOURNAL_FACTS,
    PULLING_TRANSITIONS,
    REPLICATING,
    ROLES,
    TRANSITIONS,
    WRITE_POLICY,
    Action,
    AdoptPrimaryPvid,
    AssignNewPvid,
    BitmapRef,
    Cause,
    CopyDone,
    CopyKind,
    CopyProgress,
    Create,
    Delete,
    DiscardReceived,
    DiskError,
    Drained,
    EmitEvent,
    Event,
    Fence,
    FetchPeerBitmap,
    FieldValue,
    FoldJournal,
    JournalFull,
    JournalHigh,
    JournalLow,
    Kind,
    LinkLost,
    LinkRestored,
    Mode,
    PairMachine,
    PairRecord,
    PeerError,
    PeerTookOver,
    PersistState,
    Ping,
    Pong,
    ReadDecision,
    Resync,
    SendPairState,
    SendPing,
    SendPong,
    SetHidden,
    Split,
    StartCopy,
    StartDrain,
    State,
    StopCopy,
    SwapRoles,
    TableEvent,
    Takeover,
    WriteDecision,
    read_decision,
    states_of,
    write_decision,
)

ROOT = Path(__file__).resolve().parent.parent
P, S = Role.PRIMARY, Role.SECONDARY


def rec(role: Role, state: State = State.SMPL, mode: Mode = Mode.SYNC, **kw: Any) -> PairRecord:
    kw.setdefault("fence", Fence.NEVER)
    peer = "a:vol1" if role is S else "b:vol1"
    return PairRecord("g1", "p1", role, mode, peer=peer, state=state, **kw)


def in_state(m: PairMachine) -> State:
    return m.state  # a call, so mypy does not narrow the state between two handle()s


def kinds(actions: list[Action]) -> list[type]:
    return [type(a) for a in actions]


def events(actions: list[Action], name: str) -> list[dict[str, FieldValue]]:
    return [a.as_dict() for a in actions if isinstance(a, EmitEvent) and a.name == name]


def sample_event(kind: Kind, record: PairRecord) -> TableEvent:
    samples: dict[Kind, TableEvent] = {
        Kind.CREATE: Create(),
        Kind.SPLIT: Split(),
        Kind.DRAINED: Drained(),
        Kind.RESYNC: Resync(),
        Kind.RESYNC_SWAP: Resync(swap=True, peer_epoch=record.epoch),
        Kind.TAKEOVER: Takeover(),
        Kind.TAKEOVER_FORCE: Takeover(force=True),
        Kind.DELETE: Delete(),
        Kind.COPY_PROGRESS: CopyProgress(3, 10),
        Kind.COPY_DONE: CopyDone(),
        Kind.JOURNAL_HIGH: JournalHigh(),
        Kind.JOURNAL_LOW: JournalLow(),
        Kind.JOURNAL_FULL: JournalFull(),
        Kind.LINK_LOST: LinkLost("cut"),
        Kind.LINK_RESTORED: LinkRestored(),
        Kind.PEER_ERROR: PeerError("peer disk"),
        Kind.DISK_ERROR: DiskError("EIO"),
        Kind.PEER_TOOK_OVER: PeerTookOver(record.epoch + 1),
    }
    return samples[kind]


# --------------------------------------------------------------------------------------------
# The table against an independent statement of the rules

# modes (s=sync, a=async), role, event kind, states... -> target ("=": stays)
EXPECTED_COMMANDS = """
sa P Create SMPL -> COPY
sa S Create SMPL -> COPY
s  P Split PAIR -> PSUS
a  P Split PAIR PFUL -> =
sa P Split PSUE -> PSUS
a  S Split PAIR PFUL -> PSUS
s  S Split PAIR -> PSUS
a  P Drained PAIR PFUL -> PSUS
s  P Resync PSUS PSUE -> COPY
a  P Resync PSUS PSUE PFUS -> COPY
s  S Resync PSUS PSUE -> COPY
a  S Resync PSUS PSUE PFUS -> COPY
sa P Resync(swap) PSUS PSUE -> COPY
sa S Resync(swap) PSUS PSUE SSWS -> COPY
s  S Takeover COPY PAIR PSUS PSUE -> SSWS
a  S Takeover COPY PAIR PFUL PSUS PSUE PFUS -> SSWS
s  S Takeover(force) COPY PAIR PSUS PSUE -> SSWS
a  S Takeover(force) COPY PAIR PFUL PSUS PSUE PFUS -> SSWS
s  P Delete COPY PAIR PSUS PSUE -> SMPL
a  P Delete COPY PAIR PFUL PSUS PSUE PFUS -> SMPL
s  S Delete COPY PAIR PSUS PSUE SSWS -> SMPL
a  S Delete COPY PAIR PFUL PSUS PSUE PFUS SSWS -> SMPL
sa P CopyProgress COPY -> =
sa S CopyProgress COPY -> =
sa P CopyDone COPY -> PAIR
sa S CopyDone COPY -> PAIR
s  P PeerTookOver COPY PAIR PSUS PSUE -> PSUE
a  P PeerTookOver COPY PAIR PFUL PSUS PSUE PFUS -> PSUE
"""


def expected_table(mode: Mode) -> dict[tuple[Role, State, Kind], State]:
    out = parse_expected(EXPECTED_COMMANDS, mode)
    # Facts, by rule: every state accepts them; replicating states suspend.
    for role in ROLES:
        for state in states_of(mode, role):
            for kind in (Kind.LINK_LOST, Kind.PEER_ERROR, Kind.DISK_ERROR):
                out[role, state, kind] = State.PSUE if state in REPLICATING else state
            out[role, state, Kind.LINK_RESTORED] = state
            if mode is Mode.ASYNC:
                paired = state in (State.PAIR, State.PFUL)
                out[role, state, Kind.JOURNAL_HIGH] = State.PFUL if paired else state
                out[role, state, Kind.JOURNAL_LOW] = State.PAIR if paired else state
                out[role, state, Kind.JOURNAL_FULL] = State.PFUS if state in REPLICATING else state
    return out


# A secondary taken over before its copy was complete (record.pulling), its own table.
EXPECTED_PULLING = """
sa S Delete SSWS PSUE -> SMPL
sa S CopyProgress SSWS PSUE -> =
sa S CopyDone SSWS -> =
sa S CopyDone PSUE -> SSWS
sa S LinkLost SSWS -> PSUE
sa S LinkLost PSUE -> =
sa S LinkRestored SSWS -> =
sa S LinkRestored PSUE -> SSWS
sa S PeerError SSWS PSUE -> =
sa S DiskError SSWS PSUE -> =
a  S JournalHigh SSWS PSUE -> =
a  S JournalLow SSWS PSUE -> =
a  S JournalFull SSWS PSUE -> =
"""


def parse_expected(text: str, mode: Mode) -> dict[tuple[Role, State, Kind], State]:
    code = "s" if mode is Mode.SYNC else "a"
    out: dict[tuple[Role, State, Kind], State] = {}
    for line in text.strip().splitlines():
        left, target = line.split("->")
        modes, side, kind, *states = left.split()
        if code not in modes:
            continue
        for state in states:
            key = (P if side == "P" else S, State(state), Kind(kind))
            assert key not in out, key
            out[key] = key[1] if target.strip() == "=" else State(target.strip())
    return out


def test_the_pulling_table_matches_its_rules() -> None:
    """Only the old primary's return (or the pull's end) takes a pulling side out of PSUE;
    every command but a forced delete waits for the pull (the swap back follows it)."""
    for mode in Mode:
        actual = {key: t.target for key, t in PULLING_TRANSITIONS[mode].items()}
        assert actual == parse_expected(EXPECTED_PULLING, mode), mode
        for key, t in PULLING_TRANSITIONS[mode].items():
            assert [g.label for g in t.guards] == (["forced"] if key[2] is Kind.DELETE else [])


def test_a_pulling_side_goes_psue_when_its_old_primary_is_lost_and_serves_on() -> None:
    """Issue 11, item 4: the old primary's node gone during the pull suspends the pair
    (PSUE, cause link) while the takeover stands: writes stay local and recorded, reads
    still go through the fetch path (refused there while it is gone), the volume is not
    hidden; the old primary's return resumes the pull in SSWS."""
    r = rec(S, State.SSWS, copy_incomplete=True, epoch=4)
    m = PairMachine(r, 0.0, link_up=True)
    acts = m.handle(LinkLost("heartbeat timeout"), 1.0)
    assert m.state is State.PSUE and m.record.cause is Cause.LINK and m.record.pulling
    assert kinds(acts)[:2] == [PersistState, StopCopy]
    assert [e["state"] for e in events(acts, "pair.state")] == ["PSUE"]
    assert m.write_decision() is WriteDecision.LOCAL_RECORD and not m.hidden
    assert m.read_decision() is ReadDecision.LOCAL_OR_FETCH
    assert not any(isinstance(a, SetHidden) for a in acts)
    for refused in (Resync(swap=True, peer_epoch=4), Takeover(), Split(), Delete()):
        with pytest.raises(IllegalState):
            m.handle(refused, 1.5)
    acts = m.handle(LinkRestored(), 2.0)
    assert m.state is State.SSWS and m.record.cause is Cause.NONE and m.record.pulling
    pulls = [a for a in acts if isinstance(a, StartCopy)]
    assert [p.kind for p in pulls] == [CopyKind.PULL]
    m.handle(CopyDone(), 3.0)
    assert m.state is State.SSWS and not m.record.pulling and m.record.svol_consistent


def test_a_restarted_pulling_side_whose_old_primary_stays_away_goes_psue() -> None:
    """Restored from disk in SSWS with its pull not done and the link down: the heartbeat
    deadline suspends it (PSUE) if the old primary does not answer in time."""
    m = PairMachine(rec(S, State.SSWS, copy_incomplete=True), 0.0, heartbeat_timeout=5.0)
    assert m.get_timer() == 5.0
    m.handle_timer(5.0)
    assert m.state is State.PSUE and m.record.cause is Cause.LINK
    assert m.get_timer() is None


def test_a_pulling_side_is_deleted_only_by_force() -> None:
    for state in (State.SSWS, State.PSUE):
        cause = Cause.LINK if state is State.PSUE else Cause.NONE
        m = PairMachine(rec(S, state, copy_incomplete=True, cause=cause), 0.0)
        with pytest.raises(IllegalState, match="delete --force"):
            m.handle(Delete(), 1.0)
        m.handle(Delete(force=True), 1.0)
        assert m.state is State.SMPL and not m.record.pulling


@pytest.mark.parametrize("mode", list(Mode))
def test_table_matches_the_rules(mode: Mode) -> None:
    actual = {key: t.target for key, t in TRANSITIONS[mode].items()}
    expected = expected_table(mode)
    assert sorted(set(actual) - set(expected)) == [], "rows nobody asked for"
    assert sorted(set(expected) - set(actual)) == [], "rules missing from the table"
    assert actual == expected


def test_facts_are_accepted_in_every_state() -> None:
    for mode in Mode:
        facts = FACTS if mode is Mode.ASYNC else FACTS - JOURNAL_FACTS
        for role in ROLES:
            for state in states_of(mode, role):
                for kind in facts:
                    assert (role, state, kind) in TRANSITIONS[mode], (mode, role, state, kind)
                    assert not TRANSITIONS[mode][role, state, kind].guards
        for state in (State.SSWS, State.PSUE):
            for kind in facts:
                assert not PULLING_TRANSITIONS[mode][S, state, kind].guards


def variants(mode: Mode, role: Role, state: State) -> Iterator[tuple[PairRecord, bool]]:
    """Every valid record for (mode, role, state) over the flags that guards look at."""
    causes = {
        State.PSUE: [Cause.LINK, Cause.PEER, Cause.DISK, Cause.TAKEOVER],
        State.PFUS: [Cause.JOURNAL],
    }.get(state, [Cause.NONE])
    fences = [Fence.NEVER, Fence.DATA] if mode is Mode.SYNC else [Fence.NEVER]
    for cause, fence, draining, consistent, incomplete, auto, link_up in itertools.product(
        causes, fences, *[(False, True)] * 5
    ):
        try:
            r = rec(
                role,
                state,
                mode,
                fence=fence,
                cause=cause,
                draining=draining,
                svol_consistent=consistent,
                copy_incomplete=incomplete,
                auto_resync=auto,
                epoch=3,
            )
        except UsageError:
            continue
        yield r, bool(link_up)


def test_every_event_in_every_state_follows_the_table_or_raises_illegal_state() -> None:
    checked = refused = 0
    for mode in Mode:
        for role in ROLES:
            for state in states_of(mode, role):
                for record, link_up in variants(mode, role, state):
                    for kind in Kind:
                        m = PairMachine(record, 0.0, link_up=link_up)
                        timer = m.get_timer()
                        event = sample_event(kind, record)
                        table = PULLING_TRANSITIONS if record.pulling else TRANSITIONS
                        t = table[mode].get((role, state, kind))
                        try:
                            m.handle(event, 1.0)
                        except IllegalState as e:
                            refused += 1
                            msg = str(e)
                            assert msg.startswith("pair g1/p1: cannot ") and "\n" not in msg
                            assert f"in state {state} (" in msg
                            assert m.record == record and m.link_up == link_up
                            assert m.get_timer() == timer
                            if t is not None:  # in the table: one of its guards said no
                                assert any(f"({g.reason})" in msg for g in t.guards), msg
                            continue
                        checked += 1
                        assert t is not None, (mode, role, state, kind)
                        chained = (
                            kind is Kind.LINK_RESTORED
                            and role is P
                            and record.auto_resync
                            and record.cause is Cause.LINK
                            and not link_up
                        )
                        assert m.state is (State.COPY if chained else t.target)
    assert checked > 1000 and refused > 1000


# --------------------------------------------------------------------------------------------
# Scenarios


class Pair:
    """Two sides driven in lockstep, the way the node adapters will drive them."""

    def __init__(self, mode: Mode = Mode.SYNC, fence: Fence = Fence.NEVER, **kw: Any):
        self.now = 0.0
        self.p = PairMachine(rec(P, mode=mode, fence=fence, **kw), 0.0, link_up=True)
        self.s = PairMachine(rec(S, mode=mode, fence=fence, **kw), 0.0, link_up=True)

    def both(self, event: Event) -> tuple[list[Action], list[Action]]:
        self.now += 0.5
        return self.p.handle(event, self.now), self.s.handle(event, self.now)

    def paired(self) -> None:
        self.both(Create())
        self.both(CopyDone())


def test_create_copy_pair_split_resync_pair() -> None:
    pair = Pair()
    pa, sa = pair.both(Create())
    assert (pair.p.state, pair.s.state) == (State.COPY, State.COPY)
    assert StartCopy(CopyKind.FULL) in pa
    assert kinds(sa)[:3] == [PersistState, SetHidden, AdoptPrimaryPvid]
    assert sa[1] == SetHidden(True)
    assert pair.s.write_decision() is WriteDecision.REFUSE_HIDDEN
    assert pair.s.read_decision() is ReadDecision.REFUSE_HIDDEN
    assert pair.p.write_decision() is WriteDecision.MIRROR

    pair.p.handle(CopyProgress(5, 10), 1.0)
    assert (pair.p.record.copied_chunks, pair.p.record.total_chunks) == (5, 10)
    pair.both(CopyDone())
    assert (pair.p.state, pair.s.state) == (State.PAIR, State.PAIR)
    assert pair.s.record.svol_consistent
    assert pair.s.hidden

    pa, sa = pair.both(Split())
    assert (pair.p.state, pair.s.state) == (State.PSUS, State.PSUS)
    # The S-VOL gets its new PVID before it becomes visible.
    assert kinds(sa)[:3] == [AssignNewPvid, PersistState, SetHidden]
    assert sa[2] == SetHidden(False)
    assert pair.p.write_decision() is WriteDecision.LOCAL_RECORD
    assert pair.s.write_decision() is WriteDecision.LOCAL_RECORD
    assert events(pa, "pair.state")[0]["state"] == "PSUS"

    pa, sa = pair.both(Resync())
    assert (pair.p.state, pair.s.state) == (State.COPY, State.COPY)
    union = (BitmapRef.LOCAL_DIFF, BitmapRef.PEER_DIFF)
    i = pa.index(FetchPeerBitmap(BitmapRef.PEER_DIFF))
    assert pa[i + 1] == StartCopy(CopyKind.DIFFERENTIAL, union)
    assert kinds(sa)[:3] == [PersistState, SetHidden, AdoptPrimaryPvid]
    pair.both(CopyDone())
    assert (pair.p.state, pair.s.state) == (State.PAIR, State.PAIR)
    assert pair.p.record.epoch == pair.s.record.epoch == 0


def test_split_from_copy_is_refused_with_a_clear_message() -> None:
    pair = Pair()
    pair.both(Create())
    with pytest.raises(IllegalState) as exc:
        pair.p.handle(Split(), 1.0)
    assert str(exc.value) == (
        "pair g1/p1: cannot split in state COPY (the secondary is not consistent until PAIR)"
    )
    assert exc.value.errno == errno.EBUSY


@pytest.mark.parametrize(
    ("fence", "decision"),
    [(Fence.NEVER, WriteDecision.LOCAL_RECORD), (Fence.DATA, WriteDecision.REFUSE_FENCED)],
)
def test_link_lost_then_resync(fence: Fence, decision: WriteDecision) -> None:
    pair = Pair(fence=fence)
    pair.paired()
    # Between the failed send and LinkLost the adapter's own view of the link decides.
    r = pair.p.record
    assert write_decision(r.state, r.role, r.mode, r.fence, False) is decision

    pa, _ = pair.both(LinkLost("cable cut"))
    assert (pair.p.state, pair.s.state) == (State.PSUE, State.PSUE)
    assert pair.p.record.cause is Cause.LINK
    assert pair.p.write_decision() is decision
    assert pair.s.write_decision() is WriteDecision.REFUSE_HIDDEN
    assert events(pa, "pair.link") == [
        {"group": "g1", "pair": "p1", "up": False, "reason": "cable cut"}
    ]
    (writes,) = events(pa, "pair.writes")
    assert writes["decision"] == decision.value
    assert writes["errno"] == (errno.EIO if fence is Fence.DATA else 0)

    with pytest.raises(IllegalState, match="peer is unreachable"):
        pair.p.handle(Resync(), pair.now)
    pair.both(LinkRestored())
    assert in_state(pair.p) is State.PSUE  # no auto_resync: stays until resync
    assert pair.p.write_decision() is decision
    pair.both(Resync())
    assert pair.p.write_decision() is WriteDecision.MIRROR
    pair.both(CopyDone())
    assert (pair.p.state, pair.s.state) == (State.PAIR, State.PAIR)


def test_auto_resync_on_link_restored() -> None:
    pair = Pair(auto_resync=True)
    pair.paired()
    pair.both(LinkLost())
    pa, _ = pair.both(LinkRestored())
    assert in_state(pair.p) is State.COPY
    assert [e["state"] for e in events(pa, "pair.state")] == ["COPY"]
    assert pa[0] == PersistState(pair.p.record)
    assert StartCopy(CopyKind.DIFFERENTIAL, (BitmapRef.LOCAL_DIFF, BitmapRef.PEER_DIFF)) in pa


def test_auto_resync_not_after_a_disk_error() -> None:
    pair = Pair(auto_resync=True)
    pair.paired()
    pair.p.handle(DiskError("EIO"), 1.0)
    pair.p.handle(LinkLost(), 1.0)
    pair.p.handle(LinkRestored(), 2.0)
    assert in_state(pair.p) is State.PSUE
    assert pair.p.record.cause is Cause.DISK


def test_fence_data_escape_hatch_split_from_psue() -> None:
    pair = Pair(fence=Fence.DATA)
    pair.paired()
    pair.both(LinkLost())
    pair.p.handle(Split(), 9.0)
    assert in_state(pair.p) is State.PSUS
    assert pair.p.write_decision() is WriteDecision.LOCAL_RECORD
    with pytest.raises(IllegalState, match="take over to use the secondary"):
        pair.s.handle(Split(), 9.0)


def test_takeover_then_resync_swap_reverses_roles_and_bumps_epoch() -> None:
    pair = Pair()
    pair.paired()
    with pytest.raises(IllegalState, match="takeover runs on the secondary"):
        pair.p.handle(Takeover(), 1.0)
    sa = pair.s.handle(Takeover(), 1.0)
    assert in_state(pair.s) is State.SSWS
    assert pair.s.record.epoch == 1
    assert pair.s.write_decision() is WriteDecision.LOCAL_RECORD
    assert SetHidden(False) in sa
    assert not any(isinstance(a, AssignNewPvid | AdoptPrimaryPvid) for a in sa)
    assert SendPairState(State.SSWS, S, 1) in sa
    assert events(sa, "pair.takeover")[0]["epoch"] == 1

    # The old primary hears of it and fences itself.
    with pytest.raises(IllegalState, match="not newer"):
        pair.p.handle(PeerTookOver(0), 2.0)
    pair.p.handle(PeerTookOver(1), 2.0)
    assert in_state(pair.p) is State.PSUE and pair.p.record.stale
    assert pair.p.write_decision() is WriteDecision.REFUSE_STALE
    assert pair.p.read_decision() is ReadDecision.LOCAL
    with pytest.raises(IllegalState, match="only resync --swap"):
        pair.p.handle(Resync(), 3.0)
    with pytest.raises(IllegalState, match="only resync --swap"):
        pair.p.handle(Split(), 3.0)

    sa = pair.s.handle(Resync(swap=True, peer_epoch=pair.p.record.epoch), 4.0)
    pa = pair.p.handle(Resync(swap=True, peer_epoch=1), 4.0)
    assert (pair.p.role, pair.s.role) == (S, P)
    assert pair.p.record.epoch == pair.s.record.epoch == 2
    assert SwapRoles(P) in sa and SwapRoles(S) in pa
    assert StartCopy(CopyKind.DIFFERENTIAL, (BitmapRef.LOCAL_DIFF, BitmapRef.PEER_DIFF)) in sa
    assert kinds(pa)[:4] == [PersistState, SetHidden, SwapRoles, AdoptPrimaryPvid]
    assert pair.p.hidden and not pair.s.hidden
    assert not pair.p.record.stale
    pair.both(CopyDone())
    assert (pair.p.state, pair.s.state) == (State.PAIR, State.PAIR)
    assert pair.s.write_decision() is WriteDecision.MIRROR  # the new primary
    assert pair.p.write_decision() is WriteDecision.REFUSE_HIDDEN


def test_takeover_from_copy_needs_force_and_pulls_the_rest() -> None:
    pair = Pair()
    pair.both(Create())
    with pytest.raises(IllegalState, match="use force"):
        pair.s.handle(Takeover(), 1.0)
    sa = pair.s.handle(Takeover(force=True), 1.0)
    pull = StartCopy(CopyKind.PULL, (BitmapRef.PEER_PENDING,))
    # The command took the pending bitmap, durably, before this move: the move only pulls.
    assert not any(isinstance(a, FetchPeerBitmap) for a in sa)
    assert sa.index(SetHidden(False)) > sa.index(pull) > sa.index(PersistState(pair.s.record))
    assert pair.s.read_decision() is ReadDecision.LOCAL_OR_FETCH
    with pytest.raises(IllegalState, match="still running"):
        pair.s.handle(Resync(swap=True), 2.0)
    assert StopCopy() in pair.s.handle(LinkLost(), 2.0)
    assert pull in pair.s.handle(LinkRestored(), 3.0)
    pair.s.handle(CopyDone(), 4.0)
    assert pair.s.read_decision() is ReadDecision.LOCAL
    sa = pair.s.handle(Resync(swap=True), 5.0)
    assert StartCopy(CopyKind.DIFFERENTIAL, (BitmapRef.LOCAL_DIFF, BitmapRef.PEER_DIFF)) in sa


def test_a_swap_back_after_the_peers_image_was_pulled_copies_our_differences_only() -> None:
    """The old primary, fenced since, has nothing the pull did not bring: its difference
    bitmap is not fetched, the copy back is of what was written here (Resync.peer_pulled,
    which the command gives only when the pull ended at this epoch and the peer is still
    the old primary fenced at it)."""
    pair = Pair()
    pair.both(Create())
    pair.both(CopyDone())
    pair.s.handle(Takeover(pull=True), 1.0)
    pair.s.handle(CopyDone(), 2.0)
    sa = pair.s.handle(Resync(swap=True, peer_pulled=True), 3.0)
    assert StartCopy(CopyKind.DIFFERENTIAL, (BitmapRef.LOCAL_DIFF,)) in sa
    assert not any(isinstance(a, FetchPeerBitmap) for a in sa)
    with pytest.raises(ProtocolError, match="belongs to a swap"):
        Resync(peer_pulled=True)


def test_takeover_from_copy_without_force_only_as_a_pull_of_what_was_taken() -> None:
    pair = Pair()
    pair.both(Create())
    with pytest.raises(IllegalState, match="pending bitmap was not taken"):
        pair.s.handle(Takeover(), 1.0)
    sa = pair.s.handle(Takeover(pull=True), 1.0)
    assert StartCopy(CopyKind.PULL, (BitmapRef.PEER_PENDING,)) in sa
    assert pair.s.state is State.SSWS
    assert pair.s.record.copy_incomplete and not pair.s.record.svol_consistent
    assert pair.s.read_decision() is ReadDecision.LOCAL_OR_FETCH
    pair.s.handle(CopyDone(), 2.0)
    assert pair.s.record.svol_consistent and not pair.s.record.copy_incomplete


def test_forced_takeover_without_the_old_primary_swaps_back_with_a_full_copy() -> None:
    pair = Pair()
    pair.both(Create())
    pair.both(LinkLost())
    with pytest.raises(IllegalState, match="use force"):
        pair.s.handle(Takeover(), 1.0)
    sa = pair.s.handle(Takeover(force=True), 1.0)
    assert not any(isinstance(a, StartCopy) for a in sa)
    assert pair.s.read_decision() is ReadDecision.LOCAL
    pair.s.handle(LinkRestored(), 2.0)
    assert StartCopy(CopyKind.FULL) in pair.s.handle(Resync(swap=True), 3.0)


def test_inconsistent_secondary_cannot_become_primary() -> None:
    pair = Pair()
    pair.both(Create())
    pair.both(LinkLost())
    pair.both(LinkRestored())
    with pytest.raises(IllegalState, match="cannot become the primary"):
        pair.s.handle(Resync(swap=True), 1.0)
    pair.both(Resync())  # the forward direction is fine
    assert in_state(pair.s) is State.COPY


def test_delete_pvid_rules() -> None:
    pair = Pair()
    pair.paired()
    pa, sa = pair.both(Delete())
    assert (pair.p.state, pair.s.state) == (State.SMPL, State.SMPL)
    assert AssignNewPvid() in sa and sa.index(AssignNewPvid()) < sa.index(SetHidden(False))
    assert AssignNewPvid() not in pa
    with pytest.raises(IllegalState, match="not paired"):
        pair.p.handle(Delete(), 9.0)
    # Split S-VOL keeps the PVID it got at the split.
    pair = Pair()
    pair.paired()
    pair.both(Split())
    _, sa = pair.both(Delete())
    assert AssignNewPvid() not in sa


def test_async_split_drains_first() -> None:
    pair = Pair(mode=Mode.ASYNC)
    pair.paired()
    assert pair.p.write_decision() is WriteDecision.JOURNAL
    pa = pair.p.handle(Split(), 1.0)
    assert StartDrain() in pa and in_state(pair.p) is State.PAIR and pair.p.record.draining
    assert pair.p.write_decision() is WriteDecision.LOCAL_RECORD  # after the cut
    assert not any(isinstance(a, SendPairState) for a in pa)
    with pytest.raises(IllegalState, match="already draining"):
        pair.p.handle(Split(), 1.5)
    with pytest.raises(IllegalState, match="no split drain"):
        pair.s.handle(Drained(), 1.5)
    pair.p.handle(JournalHigh(), 1.7)
    assert in_state(pair.p) is State.PFUL and pair.p.record.draining
    pa = pair.p.handle(Drained(), 2.0)
    assert in_state(pair.p) is State.PSUS and SendPairState(State.PSUS, P, 0) in pa
    pair.s.handle(Split(), 2.0)
    assert in_state(pair.s) is State.PSUS


def test_async_drain_aborted_by_link_loss_folds_the_journal() -> None:
    pair = Pair(mode=Mode.ASYNC)
    pair.paired()
    pair.p.handle(Split(), 1.0)
    pa = pair.p.handle(LinkLost(), 2.0)
    assert in_state(pair.p) is State.PSUE and not pair.p.record.draining
    assert FoldJournal() in pa
    assert events(pa, "pair.split.aborted") == [{"group": "g1", "pair": "p1", "state": "PSUE"}]
    with pytest.raises(IllegalState, match="no split drain"):
        pair.p.handle(Drained(), 3.0)


def test_async_journal_overflow() -> None:
    pair = Pair(mode=Mode.ASYNC)
    pair.paired()
    pair.both(JournalHigh())
    assert in_state(pair.p) is State.PFUL and pair.p.write_decision() is WriteDecision.JOURNAL
    pair.both(JournalLow())
    assert in_state(pair.p) is State.PAIR
    pair.both(JournalHigh())
    pa, sa = pair.both(JournalFull())
    assert (pair.p.state, pair.s.state) == (State.PFUS, State.PFUS)
    assert FoldJournal() in pa and FoldJournal() not in sa
    assert pair.p.write_decision() is WriteDecision.LOCAL_RECORD
    assert pair.s.hidden
    pair.both(JournalLow())  # a late level report changes nothing
    assert in_state(pair.p) is State.PFUS
    pair.both(Resync())
    pair.both(CopyDone())
    assert in_state(pair.p) is State.PAIR


def test_sync_pairs_have_no_journal() -> None:
    pair = Pair()
    pair.paired()
    with pytest.raises(IllegalState, match="a sync pair has no journal"):
        pair.p.handle(JournalFull(), 1.0)


# --------------------------------------------------------------------------------------------
# Heartbeat, on a scripted clock


def test_heartbeat_pings_and_times_out() -> None:
    m = PairMachine(rec(P), 0.0, link_up=True, heartbeat_interval=1.0, heartbeat_timeout=3.0)
    assert m.get_timer() is None  # SMPL: no heartbeat
    m.handle(Create(), 10.0)
    assert m.get_timer() == 11.0
    assert m.handle_timer(10.5) == []  # early wake-up
    assert m.handle_timer(11.0) == [SendPing()]
    assert m.get_timer() == 12.0
    assert m.handle(Pong(), 11.2) == []
    assert m.handle_timer(12.0) == [SendPing()]
    assert m.handle(Ping(), 12.5) == [SendPong()]
    assert m.handle_timer(13.0) == [SendPing()]
    assert m.handle_timer(14.0) == [SendPing()]
    assert m.get_timer() == 15.0  # ping at 15, deadline 12.5 + 3 = 15.5
    assert m.handle_timer(15.0) == [SendPing()]
    assert m.get_timer() == 15.5
    actions = m.handle_timer(15.5)
    assert m.state is State.PSUE and not m.link_up
    assert actions[0] == PersistState(m.record)
    assert "heartbeat timeout" in str(events(actions, "pair.link")[0]["reason"])
    assert m.get_timer() is None


def test_restored_machine_waits_one_timeout_for_the_peer() -> None:
    paired = rec(P, State.PAIR)
    m = PairMachine(PairRecord.from_json(paired.to_json()), 100.0, heartbeat_timeout=5.0)
    assert not m.link_up and m.get_timer() == 105.0
    assert m.write_decision() is WriteDecision.LOCAL_RECORD
    assert m.handle_timer(104.0) == []
    m.handle_timer(105.0)
    assert m.state is State.PSUE

    copying = PairMachine(rec(P, State.COPY), 0.0)
    actions = copying.handle(LinkRestored(), 1.0)
    assert StartCopy(CopyKind.RESUME) in actions and actions[0] == PersistState(copying.record)
    assert copying.get_timer() == 2.0
    assert StartCopy(CopyKind.RESUME) not in copying.handle(LinkRestored(), 1.5)


def test_heartbeat_parameters_are_checked() -> None:
    with pytest.raises(UsageError):
        PairMachine(rec(P), 0.0, heartbeat_interval=5.0, heartbeat_timeout=5.0)
    with pytest.raises(UsageError):
        PairMachine(rec(P), 0.0, heartbeat_interval=0.0)


# --------------------------------------------------------------------------------------------
# Write and read policy


def test_write_policy_covers_every_possible_side() -> None:
    for mode in Mode:
        for role in ROLES:
            for state in states_of(mode, role):
                for fence in Fence if mode is Mode.SYNC else [Fence.NEVER]:
                    for link_up in (True, False):
                        d = write_decision(state, role, mode, fence, link_up)
                        assert (role, state, mode, fence, link_up) in WRITE_POLICY
                        if role is S and state in HIDDEN_STATES:
                            assert d is WriteDecision.REFUSE_HIDDEN and d.errno == errno.EPERM
                        if fence is Fence.DATA and state in (State.PAIR, State.COPY):
                            assert (d is WriteDecision.MIRROR) == link_up or role is S
    with pytest.raises(UsageError):
        write_decision(State.SSWS, P, Mode.SYNC, Fence.NEVER, True)
    with pytest.raises(UsageError):
        write_decision(State.PAIR, P, Mode.ASYNC, Fence.DATA, True)
    with pytest.raises(UsageError):
        read_decision(State.SSWS, P)
    assert read_decision(State.PAIR, S) is ReadDecision.REFUSE_HIDDEN
    assert read_decision(State.SSWS, S, copy_incomplete=True) is ReadDecision.LOCAL_OR_FETCH


# --------------------------------------------------------------------------------------------
# The persisted record


def test_record_round_trips() -> None:
    r = rec(S, State.SSWS, Mode.ASYNC, epoch=7, copy_incomplete=True, chunk_size=1 << 20)
    assert PairRecord.from_json(r.to_json()) == r
    assert PairRecord.from_json(r.to_json().encode()) == r
    assert json.loads(r.to_json())["role"] == "secondary"


def _doc(**changes: object) -> str:
    doc = json.loads(rec(P, State.PAIR).to_json())
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not _DROP})


_DROP = object()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{",
        b"\xff\xfe",
        _doc(version=2),
        _doc(format="something"),
        _doc(epoch=_DROP),
        _doc(extra=1),
        _doc(epoch=-1),
        _doc(epoch=True),
        _doc(epoch=1.5),
        _doc(draining=1),
        _doc(role="simplex"),
        _doc(role=1),
        _doc(state="BROKEN"),
        _doc(mode="async", fence="data"),
        _doc(state="SSWS"),
        _doc(chunk_size=3000),
        _doc(diff_slot=1, copy_slot=1),
        _doc(copy_slot=8),
        _doc(copied_chunks=5, total_chunks=4),
        _doc(group="a/b"),
        _doc(peer=""),
        _doc(peer=None),
        _doc(state="PSUE"),  # PSUE without a cause
        _doc(cause="journal"),  # a cause in PAIR
        _doc(svol_consistent=True),  # on a primary
        _doc(draining=True),  # sync
        _doc(state="PFUL"),  # sync
    ],
)
def test_garbage_records_are_refused(text: str | bytes) -> None:
    with pytest.raises(HeaderCorrupt):
        PairRecord.from_json(text)


def _json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # A named function, not a lambda: hypothesis checks that ``extend`` uses its argument by
    # reading its source, which for a lambda inside a call fails now and then (a spurious
    # HypothesisDeprecationWarning, an error under filterwarnings=error).
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    _json_containers,
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from(sorted(json.loads(rec(P).to_json()))), _json))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_from_json_either_parses_or_raises_header_corrupt(patch: dict[str, object]) -> None:
    doc = json.loads(rec(P, State.PAIR).to_json())
    doc.update(patch)
    try:
        r = PairRecord.from_json(json.dumps(doc))
    except HeaderCorrupt:
        return
    assert PairRecord.from_json(r.to_json()) == r


@given(st.binary(max_size=64) | st.text(max_size=64))
def test_from_json_on_random_input(data: bytes | str) -> None:
    with contextlib.suppress(HeaderCorrupt):
        PairRecord.from_json(data)


def test_events_check_their_fields() -> None:
    with pytest.raises(ProtocolError):
        CopyProgress(5, 3)
    with pytest.raises(ProtocolError):
        PeerTookOver(-1)
    with pytest.raises(ProtocolError):
        Resync(peer_epoch=True)
    with pytest.raises(ProtocolError):
        LinkLost(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The generated document


def test_state_machine_doc_is_current() -> None:
    loader = importlib.machinery.SourceFileLoader(
        "gen_state_docs", str(ROOT / "tools" / "gen-state-docs")
    )
    module = types.ModuleType(loader.name)
    module.__file__ = loader.path
    loader.exec_module(module)
    current = (ROOT / "docs" / "state-machines.md").read_text()
    assert module.render_document(current) == current, "run tools/gen-state-docs"


# --------------------------------------------------------------------------------------------
# Random event sequences


_ANY_EVENT: st.SearchStrategy[Event] = st.sampled_from(
    [
        Create(),
        Split(),
        Drained(),
        Resync(),
        Takeover(),
        Takeover(force=True),
        Delete(),
        CopyDone(),
        CopyProgress(3, 10),
        JournalHigh(),
        JournalLow(),
        JournalFull(),
        LinkLost("x"),
        LinkRestored(),
        PeerError("x"),
        DiskError("x"),
        Ping(),
        Pong(),
        *[Resync(swap=True, peer_epoch=e) for e in (0, 1, 2, 5)],
        *[PeerTookOver(e) for e in (0, 1, 2, 3, 6)],
    ]
)

_PEER_ACTIONS = (SendPairState, StartCopy, FetchPeerBitmap, StartDrain)


class PairMachineModel(RuleBasedStateMachine):
    """Random events against one side, plus rules that steer it along the happy paths (so it
    spends its time in paired states, not in SMPL); invariants after every step.  The peer
    answers pings unless a rule has made it silent."""

    @initialize(
        role=st.sampled_from(ROLES),
        mode=st.sampled_from(list(Mode)),
        data_fence=st.booleans(),
        auto=st.booleans(),
        link=st.booleans(),
    )
    def start(self, role: Role, mode: Mode, data_fence: bool, auto: bool, link: bool) -> None:
        fence = Fence.DATA if data_fence and mode is Mode.SYNC else Fence.NEVER
        self.m = PairMachine(rec(role, mode=mode, fence=fence, auto_resync=auto), 0.0, link_up=link)
        self.now = 0.0
        self.epoch = 0
        self.hidden = False
        self.role = role
        self.peer_silent = False

    def _check_output(self, before: PairRecord, actions: list[Action]) -> None:
        after = self.m.record
        # A new PVID goes on the volume before the record that may reveal it, never after.
        pvids = [i for i, a in enumerate(actions) if isinstance(a, AssignNewPvid)]
        assert pvids in ([], [0]), f"AssignNewPvid not first in {actions}"
        rest = actions[len(pvids) :]
        if after != before:
            assert rest[:1] == [PersistState(after)], f"{before} -> {actions}"
        persisted = False
        for a in actions:
            if isinstance(a, PersistState):
                persisted = True
            elif isinstance(a, _PEER_ACTIONS):
                assert persisted, f"{a} before PersistState in {actions}"
            elif isinstance(a, SetHidden):
                assert a.hidden != self.hidden, "SetHidden that changes nothing"
                self.hidden = a.hidden
            elif isinstance(a, SwapRoles):
                self.role = a.role
        if any(isinstance(a, SendPairState) for a in actions):
            assert after != before or sum(isinstance(a, PersistState) for a in actions) > 1

    def _feed(self, event: Event) -> None:
        before, link, timer = self.m.record, self.m.link_up, self.m.get_timer()
        self.now += 0.05
        try:
            actions = self.m.handle(event, self.now)
        except IllegalState:
            assert (self.m.record, self.m.link_up, self.m.get_timer()) == (before, link, timer)
            return
        self._check_output(before, actions)

    def _timer(self) -> None:
        before = self.m.record
        actions = self.m.handle_timer(self.now)
        self._check_output(before, actions)
        if SendPing() in actions and not self.peer_silent:
            self._feed(Pong())

    @rule(event=_ANY_EVENT)
    def feed(self, event: Event) -> None:
        self._feed(event)

    @precondition(lambda self: self.m.state is State.SMPL)
    @rule()
    def create(self) -> None:
        if not self.m.link_up:
            self._feed(LinkRestored())
        self._feed(Create())

    @precondition(lambda self: self.m.state is State.COPY or self.m.record.copy_incomplete)
    @rule()
    def finish_copy(self) -> None:
        self._feed(CopyDone())

    @precondition(lambda self: self.m.state in (State.PSUS, State.PSUE, State.PFUS, State.SSWS))
    @rule(swap=st.booleans(), peer_epoch=st.integers(0, 6))
    def resync(self, swap: bool, peer_epoch: int) -> None:
        if not self.m.link_up:
            self._feed(LinkRestored())
        self._feed(Resync(swap=swap, peer_epoch=peer_epoch))

    @precondition(lambda self: not self.m.link_up)
    @rule()
    def reconnect(self) -> None:
        self.peer_silent = False
        self._feed(LinkRestored())

    @rule()
    def peer_falls_silent(self) -> None:
        self.peer_silent = True

    @rule(dt=st.floats(0.0, 8.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        deadline = self.m.get_timer()
        if deadline is not None and deadline <= self.now:
            self._timer()

    @precondition(lambda self: self.m.get_timer() is not None)
    @rule()
    def wake_at_timer(self) -> None:
        deadline = self.m.get_timer()
        assert deadline is not None
        self.now = max(self.now, deadline)
        self._timer()

    @invariant()
    def secondary_never_writable_while_paired(self) -> None:
        r = self.m.record
        if r.pulling:  # taken over: writable in SSWS and in PSUE (its pull suspended)
            assert not self.m.hidden and r.state in (State.SSWS, State.PSUE)
            assert self.m.write_decision() is WriteDecision.LOCAL_RECORD
            assert self.m.read_decision() is ReadDecision.LOCAL_OR_FETCH
        elif r.role is S and r.state in HIDDEN_STATES:
            assert self.m.hidden
            assert self.m.write_decision() is WriteDecision.REFUSE_HIDDEN
            assert self.m.read_decision() is ReadDecision.REFUSE_HIDDEN

    @invariant()
    def adapter_view_matches(self) -> None:
        assert self.hidden == self.m.hidden
        assert self.role is self.m.role

    @invariant()
    def epoch_never_decreases(self) -> None:
        assert self.m.record.epoch >= self.epoch
        self.epoch = self.m.record.epoch

    @invariant()
    def record_survives_a_restart(self) -> None:
        assert PairRecord.from_json(self.m.record.to_json()) == self.m.record

    @invariant()
    def timer_is_pending_or_none(self) -> None:
        t = self.m.get_timer()
        assert t is None or t > self.now - 8.0 - 1.0


PairMachineModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pair_machine_random_sequences = PairMachineModel.TestCase


def test_record_replace_validates() -> None:
    r = rec(P)
    with pytest.raises(UsageError):
        replace(r, state=State.SSWS)


# -- epochs (issue 7, item 9): agreed in swaps, outbid by takeovers ---------------------------


def test_a_takeover_outbids_the_highest_epoch_it_has_seen_of_the_peer() -> None:
    s = PairMachine(rec(S, State.PAIR, epoch=4), 0.0, link_up=True)
    s.handle(Takeover(peer_epoch=5), 1.0)  # the old primary is at 5 (an interrupted swap)
    assert s.record.epoch == 6
    peer = PairMachine(rec(P, State.PAIR, epoch=5), 0.0, link_up=True)
    peer.handle(PeerTookOver(s.record.epoch), 1.0)
    assert peer.record.stale and peer.write_decision() is WriteDecision.REFUSE_STALE
    # Without a known peer epoch it is ours + 1, as before.
    t = PairMachine(rec(S, State.PAIR, epoch=4), 0.0, link_up=True)
    t.handle(Takeover(), 1.0)
    assert t.record.epoch == 5


def test_the_side_that_follows_a_swap_adopts_the_announced_epoch() -> None:
    mover = PairMachine(rec(S, State.PSUS, epoch=3, svol_consistent=True), 0.0, link_up=True)
    follower = PairMachine(rec(P, State.PSUS, epoch=1), 0.0, link_up=True)
    mover.handle(Resync(swap=True, peer_epoch=follower.record.epoch), 1.0)
    assert mover.record.epoch == 4
    follower.handle(Resync(swap=True, epoch=mover.record.epoch), 1.0)
    assert follower.record.epoch == mover.record.epoch == 4
    assert (mover.role, follower.role) == (P, S)
    # An announced epoch never moves a side backwards.
    late = PairMachine(rec(P, State.PSUS, epoch=9), 0.0, link_up=True)
    late.handle(Resync(swap=True, epoch=4), 1.0)
    assert late.record.epoch == 10


def test_an_async_secondary_entering_a_copy_discards_what_it_had_not_applied() -> None:
    s = PairMachine(rec(S, State.PSUE, Mode.ASYNC, cause=Cause.LINK), 0.0, link_up=True)
    actions = s.handle(Resync(), 1.0)
    assert DiscardReceived() in actions
    assert actions.index(PersistState(s.record)) < actions.index(DiscardReceived())
    sync = PairMachine(rec(S, State.PSUE, cause=Cause.LINK), 0.0, link_up=True)
    assert DiscardReceived() not in sync.handle(Resync(), 1.0)
