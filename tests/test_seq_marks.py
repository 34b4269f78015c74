"""Sequence marks per leg (replicator.seq_marks): written across out-of-order local writes,
release at the slowest attached leg, what to ship next, the SPEC 5 delta-resync question, the
group incarnation, and a hypothesis state machine against a naive model."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from replicator.errors import IllegalState, ProtocolError
from replicator.seq_marks import (
    GroupMarks,
    LegMarks,
    LegStatus,
    format_incarnation,
    incarnation_from_bytes,
)

INC = 0x00C5247772D2F36B


def marks(first: int = 1, last: int = 0, **kw: int) -> GroupMarks:
    return GroupMarks(first, last, incarnation=INC, group="g", **kw)


def append(m: GroupMarks, n: int, *, written: bool = True) -> None:
    for _ in range(n):
        m.appended(m.last + 1)
        if written:
            m.on_written(m.last)


# -- examples --------------------------------------------------------------------------------


def test_written_is_the_contiguous_prefix_of_out_of_order_writes() -> None:
    m = marks()
    append(m, 5, written=False)
    for seq, expected in [(2, 0), (3, 0), (1, 3), (5, 3), (5, 3), (4, 5), (2, 5)]:
        m.on_written(seq)
        assert m.written == expected
    with pytest.raises(IllegalState, match="newest appended is 5"):
        m.on_written(6)


def test_a_new_group_and_a_restarted_one() -> None:
    m = marks()
    assert (m.first_retained, m.last, m.written, m.release_upto()) == (1, 0, 0, 0)
    # After a restart the retained entries are redone first: all of them count as written.
    r = marks(101, 150)
    assert (r.first_retained, r.last, r.written) == (101, 150, 150)
    for bad in [
        lambda: marks(0, 5),
        lambda: marks(7, 5),
        lambda: marks(1, -1),
        lambda: marks(1, 5, written=6),
        lambda: GroupMarks(1, 0, incarnation=0),
        lambda: GroupMarks(1, 0, incarnation=1 << 64),
    ]:
        with pytest.raises(IllegalState):
            bad()


def test_release_waits_for_the_slowest_attached_leg() -> None:
    m = marks()
    append(m, 12)
    m.add_leg("S", applied=0)
    m.add_leg("R", applied=0)
    m.on_ack("S", 12, 10, incarnation=INC)
    m.on_ack("R", 6, 4, incarnation=INC)
    assert m.release_upto() == 4
    m.on_released(4)
    assert m.first_retained == 5
    with pytest.raises(IllegalState, match="hold every seq after 4"):
        m.on_released(5)
    # R's journal overflowed: entries up to 8 are in its bitmaps now.
    m.folded_at("R", 8)
    assert m.release_upto() == 8
    with pytest.raises(IllegalState, match=r"needs seqs 9\.\.12"):
        m.detach("R")
    m.folded_at("R", 12)
    m.detach("R")
    assert m.release_upto() == 10  # S's applied
    append(m, 3)  # a detached leg holds no later entry either
    m.on_ack("S", 15, 15, incarnation=INC)
    assert m.release_upto() == 15
    m.on_released(15)
    assert m.next_to_ship("R") is None
    with pytest.raises(IllegalState, match="needs seq 13 but the journal retains seqs from 16"):
        m.attach("R")
    m.folded_at("R", 15)  # a resync from its bitmap covers everything up to now
    m.attach("R")
    assert m.release_upto() == 15


def test_with_no_attached_leg_everything_written_may_go() -> None:
    m = marks()
    append(m, 4)
    m.appended(5)  # not written locally yet
    assert m.release_upto() == 4


def test_release_never_passes_the_local_written_mark() -> None:
    m = marks()
    append(m, 3)
    append(m, 3, written=False)
    m.add_leg("R", applied=0)
    # A peer that says it applied what is not on our volume yet (it cannot have come from
    # us in this incarnation): its entries stay in the journal until they are written here.
    m.on_ack("R", 6, 6, incarnation=INC)
    assert m.release_upto() == 3
    m.on_written(4)
    assert m.release_upto() == 4
    # Folded entries are in the bitmaps: those may go unwritten.
    m.folded_at("R", 6)
    assert m.release_upto() == 6


def test_next_to_ship_starts_after_what_the_peer_holds_and_stops_at_written() -> None:
    m = marks(101, 150)
    m.add_leg("R", applied=120)
    assert m.next_to_ship("R") == 121
    m.on_shipped("R", 130)
    assert m.next_to_ship("R") == 131
    m.on_ack("R", 140, 125, incarnation=INC)  # the peer already held more than we sent
    assert m.next_to_ship("R") == 141
    m.on_shipped("R", 150)
    assert m.next_to_ship("R") is None  # everything written is sent
    m.appended(151)
    assert m.next_to_ship("R") is None  # not on the local volume yet
    with pytest.raises(IllegalState, match="only seqs up to 150 are written"):
        m.on_shipped("R", 151)
    m.on_written(151)
    assert m.next_to_ship("R") == 151
    with pytest.raises(IllegalState, match="shipped cannot go from 150 to 149"):
        m.on_shipped("R", 149)


def test_a_broken_link_ships_again_from_what_the_peer_holds() -> None:
    m = marks(1, 20)
    m.add_leg("R", applied=0)
    m.on_shipped("R", 20)
    m.on_ack("R", 12, 9, incarnation=INC)
    assert m.next_to_ship("R") is None
    m.on_link_lost("R")
    assert m.leg("R") == LegMarks("R", 12, 12, 9, 0, True)
    assert m.next_to_ship("R") == 13


def test_spec5_delta_resync_after_s_takes_over() -> None:
    """S took over from P.  Its delta journal retains 101..150; R reports its last applied."""
    s = marks(101, 150)
    assert s.delta_range(120) == range(121, 151)
    assert s.delta_range(100) == range(101, 151)  # the journal reaches back just far enough
    assert s.delta_range(150) == range(151, 151)  # R is up to date: nothing to send
    assert s.delta_range(99) is None  # 100 was released: bitmap differential or full copy
    assert s.delta_range(151) is None  # R holds entries S never had: not a delta
    assert s.can_delta_resync(120) and not s.can_delta_resync(3)
    s.add_leg("R", applied=120)
    assert s.next_to_ship("R") == 121 and s.lag_entries("R") == 30
    with pytest.raises(ProtocolError) as e:
        s.delta_range(-1)
    assert e.value.remote


def test_a_leg_the_journal_no_longer_reaches_is_added_after_a_bitmap_copy() -> None:
    s = marks(101, 150)
    assert s.delta_range(90) is None
    with pytest.raises(IllegalState, match="needs seq 91 but the journal retains seqs from 101"):
        s.add_leg("R", applied=90)
    assert "R" not in s.legs
    s.add_leg("R", applied=90, folded=150)  # the differential copy brought it up to 150
    assert s.next_to_ship("R") is None
    assert s.status("R") == LegStatus(INC, 150, 151)
    append(s, 2)
    assert s.next_to_ship("R") == 151
    assert s.lag_entries("R") == 62  # its image is still at 90 until the copy is done


def test_status_tells_a_folded_leg_where_to_continue() -> None:
    m = marks(1, 10)
    m.add_leg("S", applied=2)
    m.add_leg("R", applied=2)
    assert m.status("R") == LegStatus(INC, 10, 1)
    m.on_released(2)
    assert m.status("R").base == 3
    m.folded_at("R", 7)  # S still holds 3..: the journal does, but R will never get them
    assert m.status("R") == LegStatus(INC, 10, 8)
    assert m.status("S") == LegStatus(INC, 10, 3)


def test_fold_all_is_groups_fold() -> None:
    m = marks()
    append(m, 4)
    append(m, 2, written=False)  # 5 and 6 are still being written locally
    m.add_leg("R", applied=0)
    m.on_ack("R", 3, 2, incarnation=INC)
    assert m.fold_all() == 6
    assert m.leg("R").folded == 6 and m.written == 6 and m.release_upto() == 6
    m.on_released(6)
    m.on_written(5)  # late: harmless
    append(m, 1)
    assert m.written == 7 and m.next_to_ship("R") == 7
    assert m.status("R") == LegStatus(INC, 7, 7)


def test_an_ack_from_another_incarnation_is_refused_naming_both_ids() -> None:
    m = marks(1, 5)
    m.add_leg("R", applied=0)
    other = 0xDEADBEEF
    with pytest.raises(ProtocolError) as e:
        m.on_ack("R", 5, 5, incarnation=other)
    assert e.value.remote
    assert "00000000deadbeef" in str(e.value) and "00c5247772d2f36b" in str(e.value)
    assert m.leg("R").applied == 0
    m.check_incarnation(INC)
    with pytest.raises(ProtocolError, match="carries incarnation 0000000000000000"):
        m.check_incarnation(0, "a status reply")


@pytest.mark.parametrize(
    ("received", "applied", "match"),
    [
        (4, 5, "applied seq 5 is past received 4"),
        (11, 3, "received seq 11 but the newest entry is 10"),
        (11, 11, "received seq 11 but the newest entry is 10"),
        (5, 1, "went back: received 6 -> 5, applied 3 -> 1"),
        (6, 2, "went back: received 6 -> 6, applied 3 -> 2"),
        (5, 3, "went back: received 6 -> 5, applied 3 -> 3"),
        (-1, 0, "out of range"),
        (1 << 64, 0, "out of range"),
    ],
)
def test_impossible_peer_marks_are_remote_protocol_errors(
    received: int, applied: int, match: str
) -> None:
    m = marks(1, 10)
    m.add_leg("R", applied=0)
    m.on_ack("R", 6, 3, incarnation=INC)
    before = m.leg("R")
    with pytest.raises(ProtocolError, match=re.escape(match)) as e:
        m.on_ack("R", received, applied, incarnation=INC)
    assert e.value.remote
    assert m.leg("R") == before


def test_acknowledgements_overtaken_in_flight_count_for_nothing() -> None:
    """The replies to a window of requests come back in the order they were sent, each read
    off the peer's marks when it answered: an older one may arrive after a newer one."""
    m = marks(1, 10)
    m.add_leg("R", applied=0)
    m.on_ack("R", 7, 5, incarnation=INC, in_order=False)
    m.on_ack("R", 6, 6, incarnation=INC, in_order=False)  # received older, applied newer
    assert m.leg("R") == LegMarks("R", 0, 7, 6, 0, True)
    m.on_ack("R", 3, 1, incarnation=INC, in_order=False)  # entirely overtaken
    assert m.leg("R") == LegMarks("R", 0, 7, 6, 0, True)
    # Everything else is still refused, and changes nothing.
    for received, applied, inc, match in [
        (9, 10, INC, "applied seq 10 is past received 9"),
        (11, 7, INC, "received seq 11 but the newest entry is 10"),
        (8, 8, INC ^ 1, "carries incarnation"),
        (-1, 0, INC, "out of range"),
    ]:
        with pytest.raises(ProtocolError, match=re.escape(match)) as e:
            m.on_ack("R", received, applied, incarnation=inc, in_order=False)
        assert e.value.remote
        assert m.leg("R") == LegMarks("R", 0, 7, 6, 0, True)
    with pytest.raises(ProtocolError, match="went back"):
        m.on_ack("R", 3, 1, incarnation=INC)  # in order, the same marks are impossible


def _with_legs() -> GroupMarks:
    m = marks(1, 10)
    m.add_leg("R", applied=4)
    return m


LOCAL_MISUSE: list[tuple[Callable[[GroupMarks], object], str]] = [
    (lambda m: m.appended(9), "newest seq cannot go from 10 to 9"),
    (lambda m: m.on_written(0), "seq 0 was written"),
    (lambda m: m.add_leg("R", applied=0), "exists already"),
    (lambda m: m.add_leg("", applied=0), "not a non-empty string"),
    (lambda m: m.add_leg("T", applied=11), "applied seq 11 is not in 0..10"),
    (lambda m: m.add_leg("T", applied=0, folded=11), "folded seq 11 is not in 0..10"),
    (lambda m: m.remove_leg("T"), "no leg 'T'"),
    (lambda m: m.next_to_ship("T"), "no leg 'T'"),
    (lambda m: m.on_ack("T", 1, 1, incarnation=INC), "no leg 'T'"),
    (lambda m: m.on_shipped("R", 3), "shipped cannot go from 4 to 3"),
    (lambda m: m.folded_at("R", 11), "fold point cannot go from 0 to 11"),
    (lambda m: m.on_released(5), "legs hold every seq after 4"),
    (lambda m: m.detach("R"), "still needs seqs 5..10"),
]


@pytest.mark.parametrize(("call", "match"), LOCAL_MISUSE)
def test_local_misuse_is_illegal_state(call: Callable[[GroupMarks], object], match: str) -> None:
    m = _with_legs()
    with pytest.raises(IllegalState, match=re.escape(match)):
        call(m)
    assert (m.legs, m.leg("R"), m.first_retained, m.last) == (
        ("R",),
        LegMarks("R", 4, 4, 4, 0, True),
        1,
        10,
    )


def test_nothing_is_shipped_to_a_detached_leg() -> None:
    m = marks(1, 10)
    m.add_leg("R", applied=0, folded=10)
    m.detach("R")
    with pytest.raises(IllegalState, match="detached"):
        m.on_shipped("R", 10)
    m.on_ack("R", 3, 3, incarnation=INC)  # late acknowledgements still count
    assert m.leg("R").applied == 3


def test_the_groups_primary_mapping_with_one_leg() -> None:
    """The GroupPrimary flow of groups.py, on one leg: ship what is written, release on
    applied, fold on overflow, and a peer whose receive journal continues at the base."""
    m = marks(1, 0)
    m.add_leg("sec", applied=0)  # GroupPrimary.applied = journal.first_seq - 1
    append(m, 3, written=False)
    m.on_written(2)
    assert m.next_to_ship("sec") is None  # 1 is not on the local volume yet
    m.on_written(1)
    assert m.next_to_ship("sec") == 1
    m.on_shipped("sec", 2)  # the shipper sent 1 and 2
    m.on_ack("sec", 2, 1, incarnation=INC)
    assert m.release_upto() == 1  # on_ack: journal.release(applied)
    m.on_released(1)
    assert m.lag_entries("sec") == 1  # describe(): lag_entries
    m.fold_all()  # PFUS: journal.drop_all()
    m.on_released(m.release_upto())
    assert (m.first_retained, m.status("sec").base) == (4, 4)
    append(m, 1)
    assert m.next_to_ship("sec") == 4


def test_incarnations() -> None:
    assert incarnation_from_bytes(bytes(8)) == 1  # never 0, which means "none"
    assert incarnation_from_bytes(bytes.fromhex("00c5247772d2f36b")) == INC
    with pytest.raises(IllegalState):
        incarnation_from_bytes(b"short")
    assert format_incarnation(INC) == "00c5247772d2f36b"
    assert format_incarnation("x") == "'x'"


# -- hypothesis: against a naive model ---------------------------------------------------------

NAMES = ["S", "R", "T"]
FLAGS = ("shipped", "received", "applied", "folded")


class SeqMarksMachine(RuleBasedStateMachine):
    """GroupMarks against a model that keeps, per leg, a dict of seq -> the set of things
    that happened to it, and answers every question by scanning seqs one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.m = marks()
        self.inc = INC
        self.last = 0
        self.retained: set[int] = set()
        self.written_seqs: set[int] = set()
        self.legs: dict[str, dict[int, set[str]]] = {}
        self.attached: dict[str, bool] = {}
        self.prev: dict[str, LegMarks] = {}
        self.prev_group = (1, 0, 0)
        self.rewound: str | None = None

    @initialize(
        last=st.integers(0, 8),
        data=st.data(),
        inc=st.integers(1, (1 << 64) - 1),
    )
    def setup(self, last: int, data: st.DataObject, inc: int) -> None:
        first = data.draw(st.integers(1, last + 1), label="first")
        written = data.draw(st.integers(0, last), label="written")
        self.inc = inc
        self.m = GroupMarks(first, last, incarnation=inc, written=written, group="g")
        self.last = last
        self.retained = set(range(first, last + 1))
        self.written_seqs = set(range(1, written + 1))
        self.prev_group = (first, last, written)

    # -- the model's answers ----------------------------------------------------------------

    def model_written(self) -> int:
        w = 0
        while w + 1 in self.written_seqs:
            w += 1
        return w

    def model_first(self) -> int:
        return min(self.retained) if self.retained else self.last + 1

    def mark(self, leg: str, flag: str) -> int:
        return max((s for s, f in self.legs[leg].items() if flag in f), default=0)

    def flag_upto(self, leg: str, flag: str, seq: int) -> None:
        for s in range(1, seq + 1):
            self.legs[leg].setdefault(s, set()).add(flag)

    def done(self, leg: str, seq: int) -> bool:
        """The leg no longer needs seq from the journal."""
        f = self.legs[leg].get(seq, set())
        return "folded" in f or ("applied" in f and seq <= self.model_written())

    def model_release(self) -> int:
        attached = [n for n in self.legs if self.attached[n]]
        if not attached:
            return self.model_written()
        r = 0
        while r < self.last and all(self.done(n, r + 1) for n in attached):
            r += 1
        return r

    def model_next(self, leg: str) -> int | None:
        if not self.attached[leg]:
            return None
        n = 1
        while self.legs[leg].get(n):
            n += 1
        return n if n in self.retained and n <= self.model_written() else None

    def model_delta(self, p: int) -> list[int] | None:
        if p > self.last or any(s not in self.retained for s in range(p + 1, self.last + 1)):
            return None
        return [s for s in sorted(self.retained) if p < s <= self.model_written()]

    def model_servable(self, applied: int, folded: int) -> bool:
        need = max(applied, folded) + 1
        return need > self.last or need in self.retained

    def model_base(self, leg: str) -> int:
        return next(
            s
            for s in range(1, self.last + 2)
            if (s in self.retained or s > self.last)
            and "folded" not in self.legs[leg].get(s, set())
        )

    def pick(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.legs)), label="leg")

    # -- rules: the local side ----------------------------------------------------------------

    @precondition(lambda self: self.last < 40)
    @rule(n=st.integers(0, 4))
    def append(self, n: int) -> None:
        self.m.appended(self.last + n)
        self.retained |= set(range(self.last + 1, self.last + n + 1))
        self.last += n

    @precondition(lambda self: self.last > 0)
    @rule(back=st.integers(1, 3))
    def append_backwards(self, back: int) -> None:
        with pytest.raises(IllegalState):
            self.m.appended(max(0, self.last - back) if self.last >= back else -1)

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(-1, self.last + 2), label="seq")
        if 1 <= seq <= self.last:
            self.m.on_written(seq)
            self.written_seqs.add(seq)
        else:
            with pytest.raises(IllegalState):
                self.m.on_written(seq)

    # -- rules: membership -------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), data=st.data())
    def add_leg(self, name: str, data: st.DataObject) -> None:
        applied = data.draw(st.integers(0, self.last + 1), label="applied")
        folded = data.draw(st.sampled_from([0, 0, applied, self.last]), label="folded")
        ok = (
            name not in self.legs
            and applied <= self.last
            and folded <= self.last
            and self.model_servable(applied, folded)
        )
        # The SPEC 5 question comes first and agrees with the answer.
        if name not in self.legs and applied <= self.last and folded == 0:
            assert self.m.can_delta_resync(applied) == ok
        if not ok:
            with pytest.raises(IllegalState):
                self.m.add_leg(name, applied=applied, folded=folded)
            return
        self.m.add_leg(name, applied=applied, folded=folded)
        self.legs[name] = {}
        self.attached[name] = True
        for flag in ("shipped", "received", "applied"):
            self.flag_upto(name, flag, applied)
        self.flag_upto(name, "folded", folded)

    @precondition(lambda self: self.legs)
    @rule(data=st.data())
    def remove_leg(self, data: st.DataObject) -> None:
        name = self.pick(data)
        self.m.remove_leg(name)
        del self.legs[name], self.attached[name]
        self.prev.pop(name, None)

    @precondition(lambda self: self.legs)
    @rule(data=st.data())
    def detach(self, data: st.DataObject) -> None:
        name = self.pick(data)
        if all(self.done_or_applied(name, s) for s in range(1, self.last + 1)):
            self.m.detach(name)
            self.attached[name] = False
        else:
            with pytest.raises(IllegalState):
                self.m.detach(name)

    def done_or_applied(self, leg: str, seq: int) -> bool:
        return bool(self.legs[leg].get(seq, set()) & {"applied", "folded"})

    @precondition(lambda self: self.legs)
    @rule(data=st.data())
    def attach(self, data: st.DataObject) -> None:
        name = self.pick(data)
        if self.attached[name] or self.model_servable(
            self.mark(name, "applied"), self.mark(name, "folded")
        ):
            self.m.attach(name)
            self.attached[name] = True
        else:
            with pytest.raises(IllegalState):
                self.m.attach(name)

    # -- rules: shipping, acknowledgements, folding --------------------------------------------

    @precondition(lambda self: self.legs)
    @rule(data=st.data())
    def ship(self, data: st.DataObject) -> None:
        name = self.pick(data)
        nxt = self.m.next_to_ship(name)
        w = self.model_written()
        shipped = self.mark(name, "shipped")
        if nxt is not None and data.draw(st.booleans(), label="valid"):
            seq = data.draw(st.integers(nxt, w), label="seq")
        else:
            seq = data.draw(st.integers(max(0, shipped - 2), self.last + 2), label="seq")
        if self.attached[name] and shipped <= seq <= w:
            self.m.on_shipped(name, seq)
            self.flag_upto(name, "shipped", seq)
        else:
            with pytest.raises(IllegalState):
                self.m.on_shipped(name, seq)

    @precondition(lambda self: self.legs)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        name = self.pick(data)
        r0, a0 = self.mark(name, "received"), self.mark(name, "applied")
        top = max(r0, self.mark(name, "shipped"))
        if r0 <= self.last and data.draw(st.booleans(), label="realistic"):
            received = data.draw(st.integers(r0, top), label="received")  # what we sent
        else:
            received = data.draw(st.integers(r0, self.last), label="received")
        # Often the applier lags what is received: that is where the two marks differ.
        applied = data.draw(
            st.sampled_from([a0, max(a0, received - 1)]) | st.integers(a0, received),
            label="applied",
        )
        self.m.on_ack(name, received, applied, incarnation=self.inc)
        self.flag_upto(name, "received", received)
        self.flag_upto(name, "applied", applied)

    @precondition(lambda self: self.legs)
    @rule(data=st.data())
    def ack_any_order(self, data: st.DataObject) -> None:
        """A reply overtaken in flight: any marks up to what was sent, older ones too."""
        name = self.pick(data)
        top = max(self.mark(name, "received"), self.mark(name, "shipped"))
        received = data.draw(st.integers(0, min(top, self.last)), label="received")
        applied = data.draw(st.integers(0, received), label="applied")
        self.m.on_ack(name, received, applied, incarnation=self.inc, in_order=False)
        self.flag_upto(name, "received", received)
        self.flag_upto(name, "applied", applied)

    @precondition(lambda self: self.legs)
    @rule(
        data=st.data(),
        kind=st.sampled_from(
            ["incarnation", "received back", "applied back", "past received", "past last", "neg"]
        ),
    )
    def bad_ack(self, data: st.DataObject, kind: str) -> None:
        name = self.pick(data)
        r0, a0 = self.mark(name, "received"), self.mark(name, "applied")
        inc = self.inc
        received, applied = r0, a0
        if kind == "incarnation":
            inc = data.draw(st.integers(0, (1 << 64) - 1).filter(lambda i: i != self.inc))
        elif kind == "received back":
            if r0 == a0:
                return  # applied would go back too: "applied back" covers that
            received = r0 - 1
        elif kind == "applied back":
            if a0 == 0:
                return
            applied = a0 - 1
        elif kind == "past received":
            if r0 >= self.last:
                return
            applied = r0 + 1
        elif kind == "past last":
            received = self.last + data.draw(st.integers(1, 3))
        else:
            applied = -1
        in_order = data.draw(st.booleans(), label="in_order")
        if not in_order and kind in ("received back", "applied back"):
            before = self.m.leg(name)
            self.m.on_ack(name, received, applied, incarnation=inc, in_order=False)
            assert self.m.leg(name) == before  # overtaken: counts for nothing
            return
        with pytest.raises(ProtocolError) as e:
            self.m.on_ack(name, received, applied, incarnation=inc, in_order=in_order)
        assert e.value.remote
        if kind == "incarnation":
            assert format_incarnation(inc) in str(e.value)
            assert format_incarnation(self.inc) in str(e.value)

    @precondition(lambda self: self.legs)
    @rule(data=st.data())
    def link_lost(self, data: st.DataObject) -> None:
        name = self.pick(data)
        self.m.on_link_lost(name)
        received = self.mark(name, "received")
        for s, f in self.legs[name].items():
            if s > received:
                f.discard("shipped")
        self.flag_upto(name, "shipped", received)
        self.rewound = name

    @precondition(lambda self: self.legs)
    @rule(data=st.data())
    def fold(self, data: st.DataObject) -> None:
        name = self.pick(data)
        folded = self.mark(name, "folded")
        seq = data.draw(st.integers(max(0, folded - 2), self.last + 1), label="seq")
        if folded <= seq <= self.last:
            self.m.folded_at(name, seq)
            self.flag_upto(name, "folded", seq)
        else:
            with pytest.raises(IllegalState):
                self.m.folded_at(name, seq)

    @rule()
    def fold_all(self) -> None:
        assert self.m.fold_all() == self.last
        for name in self.legs:
            self.flag_upto(name, "folded", self.last)
        self.written_seqs |= set(range(1, self.last + 1))

    # -- rules: release and questions -----------------------------------------------------------

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        bound = self.model_release()
        upto = data.draw(st.integers(max(0, bound - 3), bound + 2), label="upto")
        if upto <= bound:
            self.m.on_released(upto)
            self.retained = {s for s in self.retained if s > upto}
        else:
            with pytest.raises(IllegalState):
                self.m.on_released(upto)

    @rule(data=st.data())
    def delta_question(self, data: st.DataObject) -> None:
        p = data.draw(st.integers(-1, self.last + 3), label="peer_applied")
        if p < 0:
            with pytest.raises(ProtocolError):
                self.m.delta_range(p)
            return
        got = self.m.delta_range(p)
        want = self.model_delta(p)
        assert (None if got is None else list(got)) == want
        assert self.m.can_delta_resync(p) == (want is not None)

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def marks_agree_with_the_model(self) -> None:
        m = self.m
        assert (m.first_retained, m.last, m.written) == (
            self.model_first(),
            self.last,
            self.model_written(),
        )
        assert set(m.legs) == set(self.legs)
        for name in self.legs:
            got = m.leg(name)
            assert got == LegMarks(
                name,
                *(self.mark(name, f) for f in FLAGS),
                self.attached[name],
            )
            assert m.lag_entries(name) == max(0, self.model_written() - got.applied)
            assert m.status(name) == LegStatus(self.inc, self.last, self.model_base(name))

    @invariant()
    def release_never_passes_what_an_attached_leg_needs(self) -> None:
        r = self.m.release_upto()
        assert r == self.model_release()
        for name in self.legs:
            g = self.m.leg(name)
            if g.attached:
                assert r <= max(min(g.applied, self.m.written), g.folded) <= g.done
                assert g.done >= self.m.first_retained - 1  # what it needs is retained
                assert self.m.status(name).base <= g.done + 1

    @invariant()
    def next_to_ship_is_retained_and_written(self) -> None:
        for name in self.legs:
            n = self.m.next_to_ship(name)
            assert n == self.model_next(name)
            if n is not None:
                assert self.m.first_retained <= n <= self.m.written
                assert n > self.m.leg(name).done

    @invariant()
    def marks_never_go_backwards(self) -> None:
        group = (self.m.first_retained, self.m.last, self.m.written)
        assert all(now >= before for now, before in zip(group, self.prev_group, strict=True))
        self.prev_group = group
        for name in self.legs:
            now, before = self.m.leg(name), self.prev.get(name)
            if before is not None:
                assert now.received >= before.received
                assert now.applied >= before.applied
                assert now.folded >= before.folded
                if self.rewound == name:
                    assert now.shipped == now.received
                else:
                    assert now.shipped >= before.shipped
            assert now.applied <= now.received <= self.m.last
            self.prev[name] = now
        self.rewound = None


SeqMarksMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSeqMarksMachine = SeqMarksMachine.TestCase
