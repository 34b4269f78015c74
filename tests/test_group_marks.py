"""The primary group's sequence marks (GroupPrimary over replicator.seq_marks.GroupMarks) under
what the runtime does: ship and acknowledge, local writes finishing out of order, a fold, a
link lost and resumed from what the peer holds, an acknowledgement of another incarnation, a
journal release that fails.  A fake member side and a scripted peer; a real journal."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator import groups, wire
from replicator.errors import ConnectionFailed, PairvolError, ProtocolError, VolumeError
from replicator.groups import PEER_LEG, SHIP_WINDOW, GroupPrimary
from replicator.journal import EntryKind
from replicator.seq_marks import LegMarks, format_incarnation

MIB = 1 << 20
BLOCK = 4096
SECOND = 1_000_000_000  # ns
WAIT = 10.0  # a bound, never a sleep: the waits return as soon as the state is there


class FakePeer:
    """The secondary node as the shipper sees it: a receive journal that takes entries in
    sequence order, an applier that keeps up (or is held back), and a link that can break."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.received = 0
        self.applied = 0
        self.incarnation = 0  # learnt from the first status
        self.auto_apply = True
        self.got: list[int] = []  # seqs appended, in order
        self.statuses: list[wire.JournalStatus] = []
        self.ack_incarnation: int | None = None  # answer with this instead of what we learnt
        self.lose_reply_at: int | None = None  # append this seq, then the link breaks
        self.down = False
        self.entries = False  # it takes Entries frames (its Hello offered them)
        self.frames: list[wire.Entries] = []

    def ack(self, pair_id: str) -> wire.JournalAck:
        inc = self.incarnation if self.ack_incarnation is None else self.ack_incarnation
        return wire.JournalAck(pair_id, self.received, self.applied, inc)

    def request(self, msg: wire.Message) -> wire.Message:
        with self.cond:
            if self.down:
                raise ConnectionFailed("the link is down")
            if isinstance(msg, wire.JournalStatus):
                self.statuses.append(msg)
                self.incarnation = msg.incarnation
                if msg.base > self.received + 1:  # folded by the primary: continue at its base
                    self.received = self.applied = msg.base - 1
                return self.ack(msg.pair_id)
            if isinstance(msg, wire.Entries):
                assert self.entries, "Entries sent to a peer that did not offer them"
                self.frames.append(msg)
                seqs = [seq for seq, *_ in msg.items()]
            else:
                assert isinstance(msg, wire.Write | wire.Zero)
                seqs = [msg.seq]
            ok = self.cond.wait_for(lambda: self.down or seqs[0] <= self.received + 1, WAIT)
            if self.down or not ok:
                raise ConnectionFailed(f"entry {seqs[0]}: the link is down")
            for seq in seqs:
                if seq == self.received + 1:
                    self.got.append(seq)
                    self.received = seq
                    if self.auto_apply:
                        self.applied = seq
                    self.cond.notify_all()
                if seq == self.lose_reply_at:
                    self.lose_reply_at = None
                    self.down = True  # it holds the entries; their acknowledgement is lost
                    self.cond.notify_all()
                    raise ConnectionFailed(f"entry {seq}: the reply was lost")
            return self.ack(msg.pair_id)

    def heal(self) -> None:
        with self.cond:
            self.down = False


class FakeVolume:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


class FakeSide:
    """A pair's side as the group sees it (groups.Side)."""

    def __init__(
        self, peer: FakePeer, volume: FakeVolume, pid: str = "g/p", stream: int = 1
    ) -> None:
        self.id = pid
        self._stream = stream
        self.peer = peer
        self._volume = volume
        self.dirty: list[tuple[int, int]] = []
        self.dirty_calls = 0
        self.link_failures: list[str] = []
        self.peer_failures: list[str] = []
        self.full = 0
        self.rate = 0

    @property
    def stream(self) -> int:
        return self._stream

    @property
    def volume(self) -> Any:
        return self._volume

    def request(self, msg: wire.Message, timeout: float = 30.0) -> wire.Message:
        return self.peer.request(msg)

    def send(self, msg: wire.Message) -> Callable[[], wire.Message]:
        try:
            reply = self.peer.request(msg)
        except PairvolError as e:
            error = e

            def fail() -> wire.Message:
                raise error

            return fail
        return lambda: reply

    def takes_entries(self) -> bool:
        return self.peer.entries

    def apply_entry(
        self, kind: EntryKind, offset: int, length: int, data: bytes | memoryview, fua: bool
    ) -> None:
        pass

    def mark_dirty(self, offset: int, length: int) -> None:
        self.dirty.append((offset, length))

    def mark_dirty_all(self, ranges: Iterable[tuple[int, int]]) -> None:
        self.dirty_calls += 1
        self.dirty.extend(ranges)

    def ships(self) -> bool:
        return True

    @property
    def max_rate(self) -> int:
        return self.rate

    def journals(self) -> bool:
        return True

    def journal_level(self, high: bool) -> None:
        pass

    def journal_full(self) -> None:
        self.full += 1

    def link_failed(self, reason: str) -> None:
        self.link_failures.append(reason)

    def peer_failed(self, reason: str) -> None:
        self.peer_failures.append(reason)


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "g.journal")
        self.lines: list[str] = []
        self.peer = FakePeer()
        self.side = FakeSide(self.peer, FakeVolume(tmp_path / "vol"))
        self.g = self.open()

    def open(self) -> GroupPrimary:
        g = GroupPrimary("g", self.path, 4 * MIB, 0.8, self.lines.append)
        g.add(1, self.side)
        return g

    def restart(self) -> GroupPrimary:
        self.g.stop()
        self.g = self.open()
        return self.g

    def write(self, n: int = 1, *, local: bool = True, side: FakeSide | None = None) -> list[int]:
        """``n`` client writes: journaled, then (``local``) on the local volume."""
        side = side or self.side
        seqs = []
        for _ in range(n):
            seq = self.g.record(side, wire.Write(side.id, len(seqs) * BLOCK, b"w" * BLOCK))
            assert seq is not None
            if local:
                self.g.written_locally(seq)
            seqs.append(seq)
        return seqs

    def ship(self) -> bool:
        return self.g.ship_round()

    def leg(self) -> LegMarks:
        return self.g.marks.leg(PEER_LEG)

    def close(self) -> None:
        self.peer.heal()
        self.g.stop()
        os.close(self.side.volume.fd)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def in_sync(g: GroupPrimary) -> None:
    """The marks and the journal agree on what is retained."""
    assert (g.marks.first_retained, g.marks.last) == (g.journal.first_seq, g.journal.last_seq)


# -- ship and acknowledge ----------------------------------------------------------------------


def test_shipped_entries_are_released_once_the_peer_applied_them(rig: Rig) -> None:
    g = rig.g
    assert g.marks.legs == (PEER_LEG,)
    rig.peer.auto_apply = False
    rig.write(3)
    assert rig.ship()
    assert rig.peer.got == [1, 2, 3]
    assert rig.leg() == LegMarks(PEER_LEG, 3, 3, 0, 0, True)
    assert g.journal.first_seq == 1  # received is not applied: nothing goes yet
    assert not g.wait_applied(1, 0.01)
    rig.peer.applied = 3  # its applier caught up; the next status says so
    assert rig.ship()
    assert rig.peer.got == [1, 2, 3]  # nothing twice
    assert g.wait_applied(3, WAIT)
    assert g.journal.first_seq == 4
    in_sync(g)
    d = g.describe()
    assert (d["secondary_received"], d["secondary_applied"], d["lag_entries"]) == (3, 3, 0)
    assert (g.written, g.applied, g.received) == (3, 3, 3)
    # The status told the peer who we are and what it can still get from us.
    assert rig.peer.statuses[-1].incarnation == g.journal.journal_id == g.marks.incarnation
    assert (rig.peer.statuses[-1].newest, rig.peer.statuses[-1].base) == (3, 1)


def spy_sends(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[tuple[int, str, int]], list[int]]:
    """Record each entry sent (seq, thread, how many answers were collected before it) and
    each answer collected (seq)."""
    sent: list[tuple[int, str, int]] = []
    collected: list[int] = []
    real = rig.side.send

    def send(msg: wire.Message) -> Callable[[], wire.Message]:
        assert isinstance(msg, wire.Write)
        sent.append((msg.seq, threading.current_thread().name, len(collected)))
        answer = real(msg)

        def collect() -> wire.Message:
            collected.append(msg.seq)
            return answer()

        return collect

    monkeypatch.setattr(rig.side, "send", send)
    return sent, collected


def test_the_shipper_keeps_a_window_in_flight_from_one_thread(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One thread sends the entries in sequence order and collects their acks oldest first,
    with SHIP_WINDOW sent before the first is collected (it was a pool of four threads, each
    waiting for its own answer: a hand-off per entry, and four in flight)."""
    sent, collected = spy_sends(rig, monkeypatch)
    n = SHIP_WINDOW + 8
    rig.write(n)
    assert rig.ship()
    assert [seq for seq, _, _ in sent] == list(range(1, n + 1)) == collected
    assert len({thread for _, thread, _ in sent}) == 1
    assert sent[SHIP_WINDOW - 1][2] == 0 and sent[SHIP_WINDOW][2] == 1
    assert rig.leg().shipped == n


def test_a_round_keeps_the_window_full_across_batches_with_one_status(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal read returns a batch (SHIP_BATCH_BYTES, eight entries at 1 MiB); the round
    reads the next one while the last one's answers are still in flight, and ships all that
    is written after one status (it was a status, one batch, and every answer collected)."""
    monkeypatch.setattr(groups, "SHIP_BATCH_BYTES", 2 * BLOCK)  # two entries per read
    sent, collected = spy_sends(rig, monkeypatch)
    n = SHIP_WINDOW + 8
    rig.write(n)
    assert rig.ship()
    assert rig.peer.got == list(range(1, n + 1)) == collected and len(rig.peer.statuses) == 1
    in_flight = [i + 1 - before for i, (_, _, before) in enumerate(sent)]  # at each send
    assert max(in_flight) == SHIP_WINDOW
    assert rig.leg().shipped == n and rig.g.wait_applied(n, WAIT)
    in_sync(rig.g)


def test_max_rate_limits_shipping_and_shows_the_backlog(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--max-rate`` on an async pair limits its shipping too (bytes per second, like HUR's
    path bandwidth limit): every entry's bytes are taken from the limit before it is sent,
    and a round ships about a second's worth.  The display shows what waits."""
    taken: list[int] = []
    monkeypatch.setattr(rig.g.ship_rate, "take", taken.append)
    rig.side.rate = 64 << 10  # 16 entries of 4 KiB a second
    rig.write(40)
    shown = rig.g.describe()
    assert shown["backlog_entries"] == 40 and shown["ship_rate_limit"] == 64 << 10
    assert shown["backlog_bytes"] >= 40 * BLOCK
    assert rig.ship()
    assert rig.leg().shipped == 16 and taken == [BLOCK] * 16
    assert rig.g.describe()["backlog_entries"] == 24
    while rig.leg().shipped < 40:
        assert rig.ship()
    assert sum(taken) == 40 * BLOCK and rig.g.describe()["backlog_bytes"] == 0


def test_the_shipper_thread_ships_what_is_written(rig: Rig) -> None:
    g = rig.g
    g.start()
    seqs = rig.write(5)
    assert g.wait_applied(seqs[-1], WAIT)
    assert rig.peer.got == seqs
    with g.cond:  # released in the same acknowledgement that made it applied
        assert g.cond.wait_for(lambda: g.marks.first_retained == 6, WAIT)
    assert g.journal.count == 0


def test_the_applied_poll_asks_soon_while_the_peer_applies_and_backs_off_when_it_stalls() -> None:
    poll = groups.AppliedPoll()
    idle, soon = groups.IDLE_WAIT_S, groups.APPLIED_POLL_S
    assert poll.after_round(done=10, shipped=10) == idle  # nothing unapplied: idle
    assert poll.after_round(done=10, shipped=40) == soon  # first seen unapplied
    assert poll.after_round(done=10, shipped=40) == 2 * soon  # no progress: back off
    assert poll.after_round(done=10, shipped=40) == 4 * soon
    assert poll.after_round(done=25, shipped=40) == soon  # progress: soon again
    waits = [poll.after_round(done=25, shipped=40) for _ in range(12)]
    assert waits == sorted(waits) and waits[-1] == idle  # a stalled peer: at most idle
    assert poll.after_round(done=40, shipped=40) == idle  # all applied
    assert poll.after_round(done=40, shipped=41) == soon  # a new batch: soon again
    assert poll.reset() == idle
    assert poll.after_round(done=40, shipped=41) == soon  # after a failed round: afresh


def test_the_shipper_learns_the_peers_applied_mark_without_a_new_write(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer applies after it acknowledged the entries' receipt, and never pushes its
    applied mark: the shipper asks for it (a status) while entries are unapplied there, not
    only at its idle interval (set to an hour here; it once was the only way, 0.2 s late)."""
    monkeypatch.setattr(groups, "IDLE_WAIT_S", 3600.0)
    g = rig.g
    rig.peer.auto_apply = False
    g.start()
    seqs = rig.write(4)
    with rig.peer.cond:
        assert rig.peer.cond.wait_for(lambda: rig.peer.received == seqs[-1], WAIT)
        statuses = len(rig.peer.statuses)
        rig.peer.applied = seqs[-1]  # applied later, with no new client write
    with g.cond:
        assert g.cond.wait_for(lambda: g.applied == seqs[-1], WAIT)
    assert len(rig.peer.statuses) > statuses  # learnt from a status, not a write
    assert g.describe()["lag_entries"] == 0


def test_nothing_ships_before_it_is_on_the_local_volume(rig: Rig) -> None:
    g = rig.g
    s1, s2, s3 = rig.write(3, local=False)
    g.written_locally(s2)
    g.written_locally(s3)
    assert g.written == 0 and g.marks.next_to_ship(PEER_LEG) is None
    assert rig.ship()
    assert rig.peer.got == []
    assert rig.peer.statuses[-1].newest == 3  # the status knows the newest all the same
    g.written_locally(s1)  # the early ones it held back go with it
    assert g.written == 3
    assert rig.ship()
    assert rig.peer.got == [1, 2, 3]
    g.written_locally(s2)  # late and twice: harmless
    assert g.written == 3


def test_acknowledgements_overtaken_in_flight_are_not_refused(rig: Rig) -> None:
    g = rig.g
    rig.write(6)
    inc = g.journal.journal_id
    g.on_ack(wire.JournalAck("g/p", 5, 4, inc))
    g.on_ack(wire.JournalAck("g/p", 3, 2, inc))  # read off the peer earlier, arrived later
    assert (rig.leg().received, rig.leg().applied) == (5, 4)
    assert g.journal.first_seq == 5
    in_sync(g)
    g.on_ack(wire.JournalAck("g/p", 6, 6, 0))  # a peer that has not learnt the id yet
    assert g.applied == 6 and g.journal.first_seq == 7
    with pytest.raises(ProtocolError, match="newest entry is 6"):
        g.on_ack(wire.JournalAck("g/p", 9, 9, inc))  # entries we never had


# -- fold -----------------------------------------------------------------------------------------


def test_a_fold_puts_the_retained_entries_in_the_bitmap_and_the_peer_continues_after(
    rig: Rig,
) -> None:
    g = rig.g
    rig.write(2)
    assert rig.ship()
    rig.write(2)  # 3 and 4: journaled, not shipped yet
    assert g.fold() == 2
    assert rig.side.dirty == [(0, BLOCK), (BLOCK, BLOCK)]
    assert g.journal.count == 0 and g.journal.first_seq == 5
    in_sync(g)
    assert rig.leg().folded == 4
    assert g.wait_applied(4, 0.01)  # folded counts as applied: a split drain is done
    assert g.describe()["lag_entries"] == 0
    assert g.delta_range(2) is None  # 3 and 4 are in the bitmap now, not in the journal
    rig.write(1)
    assert g.delta_range(4) == range(5, 6)
    assert rig.ship()
    assert rig.peer.statuses[-1].base == 5  # the peer's receive journal continues there
    assert rig.peer.got == [1, 2, 5]
    assert g.wait_applied(5, WAIT) and g.journal.first_seq == 6
    in_sync(g)


def test_a_fold_records_the_entries_before_the_journal_lets_them_go(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill in the middle of a fold (here: the bitmap write fails) leaves the entries in
    the journal or in the bitmap, never in neither.  The journal dropped them first: a kill
    before the marks lost the changes from both, and the resync that followed left the
    secondary without them while the pair said PAIR."""
    rig.write(3)

    def dies(ranges: Iterable[tuple[int, int]]) -> None:
        raise OSError("killed")

    monkeypatch.setattr(rig.side, "mark_dirty_all", dies)
    with pytest.raises(OSError):
        rig.g.fold()
    g = rig.restart()
    assert [e.seq for e in g.journal.entries(g.journal.first_seq)] == [1, 2, 3]
    monkeypatch.undo()
    assert g.fold() == 3 and len(rig.side.dirty) == 3
    assert rig.side.dirty_calls == 1  # the pair's bitmap made durable once, not per entry


def test_a_group_restarted_after_a_release_tells_the_peer_where_to_continue(
    rig: Rig,
) -> None:
    rig.write(3)
    assert rig.ship()
    rig.write(2)  # 4 and 5 stay retained
    g = rig.restart()
    assert (g.marks.first_retained, g.marks.last, g.written) == (4, 5, 5)
    assert rig.leg() == LegMarks(PEER_LEG, 0, 0, 0, 3, True)  # released: applied or folded
    assert g.applied == 3 and g.describe()["lag_entries"] == 2
    assert rig.ship()
    assert rig.peer.statuses[-1].base == 4
    assert rig.peer.got == [1, 2, 3, 4, 5]
    assert g.journal.first_seq == 6


# -- the link -----------------------------------------------------------------------------------


def test_a_lost_link_ships_again_from_what_the_peer_holds(rig: Rig) -> None:
    g = rig.g
    rig.peer.lose_reply_at = 3  # the peer appends 3, its acknowledgement never arrives
    rig.write(5)
    assert not rig.ship()
    assert len(rig.side.link_failures) == 1
    assert "shipping the journal failed" in rig.side.link_failures[0]
    assert rig.side.peer_failures == []
    leg = rig.leg()
    assert leg.shipped == leg.received == 2  # what was sent and not acknowledged may be lost
    assert g.journal.first_seq == 3
    assert not rig.ship()  # still down: told again, nothing moves
    assert rig.leg() == leg
    rig.peer.heal()
    assert rig.ship()  # its status says it holds 3: shipping resumes at 4
    assert rig.peer.got == [1, 2, 3, 4, 5]
    assert rig.leg() == LegMarks(PEER_LEG, 5, 5, 5, 0, True)
    assert g.journal.first_seq == 6
    in_sync(g)


def test_an_acknowledgement_of_another_incarnation_is_refused_and_reported(rig: Rig) -> None:
    g = rig.g
    ours = g.journal.journal_id
    other = ours ^ 0x5A5A
    rig.write(3)
    rig.peer.ack_incarnation = other  # it remembers another sequence space
    assert not rig.ship()
    assert rig.peer.got == []  # refused at the status: nothing shipped on those marks
    assert len(rig.side.peer_failures) == 1
    reason = rig.side.peer_failures[0]
    assert "refused a journal entry" in reason
    assert format_incarnation(ours) in reason and format_incarnation(other) in reason
    assert rig.side.link_failures == []
    assert rig.leg() == LegMarks(PEER_LEG, 0, 0, 0, 0, True)
    assert g.journal.first_seq == 1  # nothing released
    with pytest.raises(ProtocolError, match="incarnation") as e:
        g.on_ack(wire.JournalAck("g/p", 3, 3, other))
    assert e.value.remote
    assert g.applied == 0
    rig.peer.ack_incarnation = None
    assert rig.ship()
    assert rig.peer.got == [1, 2, 3] and g.journal.first_seq == 4


# -- release failures ----------------------------------------------------------------------------


def test_a_failed_release_is_reported_and_the_entries_stay(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = rig.g
    real = g.journal.release
    calls: list[int] = []

    def failing(upto: int) -> None:
        calls.append(upto)
        raise VolumeError("journal header write failed: EIO")

    monkeypatch.setattr(g.journal, "release", failing)
    rig.write(3)
    assert rig.ship()  # the shipping went fine: only the space stays taken
    # Each acknowledgement that moved the bound tried (the replies in flight may have read
    # the peer's marks later than their own entry: fewer tries, never a repeated bound).
    assert calls and calls[-1] == 3 and calls == sorted(set(calls))
    assert any("releasing the journal up to 3 failed" in x and "EIO" in x for x in rig.lines)
    assert g.applied == 3 and g.wait_applied(3, 0.01)
    assert g.journal.first_seq == 1
    in_sync(g)  # the marks did not release what the journal kept
    assert g.delta_range(0) == range(1, 4)  # and the journal still reaches back to 1
    monkeypatch.setattr(g.journal, "release", real)
    rig.write(1)
    assert rig.ship()
    assert g.journal.first_seq == 5
    in_sync(g)


def test_lag_seconds_is_the_age_of_the_oldest_entry_not_applied(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries the peer applied may stay retained until a release: they are no lag.  (Once,
    the lag was the age of the oldest retained entry: a 20 s trace showed 62 s.)"""
    g = rig.g
    monkeypatch.setattr(g.journal, "release", lambda upto: None)  # the releaser has not run
    rig.peer.auto_apply = False
    now = time.time_ns()
    data = b"w" * BLOCK
    for stamp in (now - 600 * SECOND, now - 500 * SECOND, now - 30 * SECOND):
        seq = g.journal.append(rig.side.stream, EntryKind.WRITE, 0, data, stamp_ns=stamp)
        g.written_locally(seq)
    assert g.describe()["lag_seconds"] >= 600  # none applied: the oldest is the lag
    assert rig.ship() and rig.peer.got == [1, 2, 3]  # received, none applied
    assert g.describe()["lag_seconds"] >= 600
    rig.peer.applied = 2  # the peer applied the first two; the third is received only
    assert rig.ship()
    assert g.applied == 2 and g.journal.first_seq == 1  # applied, and still retained
    d = g.describe()
    assert d["lag_entries"] == 1
    assert 30 <= d["lag_seconds"] < 400, d
    rig.peer.applied = 3
    assert rig.ship() and g.wait_applied(3, WAIT)
    assert g.journal.first_seq == 1 and g.describe()["lag_seconds"] == 0.0


def test_client_writes_go_on_while_a_release_rewrites_the_journal_header(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release (a header rewrite: two fdatasyncs) runs outside the group's lock, which
    every client write takes when it is on the local volume: a write recorded meanwhile
    completes, and the release then lands with the marks in step."""
    g = rig.g
    real = g.journal.release
    entered, go = threading.Event(), threading.Event()

    def held(upto: int) -> None:
        entered.set()
        assert go.wait(WAIT)
        real(upto)

    monkeypatch.setattr(g.journal, "release", held)
    rig.write(2)
    shipper = threading.Thread(target=rig.ship)
    shipper.start()
    assert entered.wait(WAIT)  # the acknowledgement of 1 or 2 is releasing, held
    writer = threading.Thread(target=rig.write, args=(1,))
    writer.start()
    writer.join(WAIT)
    finished = not writer.is_alive()
    go.set()
    shipper.join(WAIT)
    assert finished  # not stuck behind the release
    assert not shipper.is_alive()
    monkeypatch.setattr(g.journal, "release", real)
    assert g.written == 3
    assert rig.ship()
    assert g.wait_applied(3, WAIT)
    assert g.journal.first_seq == 4
    in_sync(g)


def test_the_shipper_goes_on_shipping_while_the_releaser_rewrites_the_journal_header(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running, the group releases on its own thread: the shipper hands the releasable seq
    over and ships the next entries while a release (two fdatasyncs, which also flush every
    page-cached append) is under way; releases that piled up meanwhile land as one."""
    g = rig.g
    real = g.journal.release
    entered, go = threading.Event(), threading.Event()
    calls: list[int] = []

    def held(upto: int) -> None:
        calls.append(upto)
        entered.set()
        assert go.wait(WAIT)
        real(upto)

    monkeypatch.setattr(g.journal, "release", held)
    rig.write(2)
    g.start()
    assert entered.wait(WAIT)  # the releaser holds a release of 1 or 2
    rig.write(3)
    with rig.peer.cond:  # shipped meanwhile, not stuck behind the release
        assert rig.peer.cond.wait_for(lambda: rig.peer.got == [1, 2, 3, 4, 5], WAIT)
    go.set()
    with g.cond:
        assert g.cond.wait_for(lambda: g.marks.first_retained == 6, WAIT)
    assert calls[-1] == 5 and len(calls) <= 3  # one release for the acknowledgements held back
    assert g.applied == 5
    in_sync(g)
    g.stop()
    assert not any(t.name == "release g" for t in threading.enumerate())


# -- Entries: many entries in one request ------------------------------------------------------


def test_runs_of_entries_go_as_one_entries_request_each(rig: Rig) -> None:
    """A peer that offered Entries gets the consecutive entries of a pair in frames of at
    most MAX_ENTRIES (one request and one acknowledgement each, not one per entry)."""
    rig.peer.entries = True
    n = 2 * wire.MAX_ENTRIES + 44
    rig.write(n)
    rig.g.record(rig.side, wire.Zero("g/p", 0, BLOCK, may_trim=True))
    rig.g.written_locally(n + 1)
    assert rig.ship()
    assert rig.peer.got == list(range(1, n + 2))
    assert [(f.first, f.last) for f in rig.peer.frames] == [
        (1, wire.MAX_ENTRIES),
        (wire.MAX_ENTRIES + 1, 2 * wire.MAX_ENTRIES),
        (2 * wire.MAX_ENTRIES + 1, n + 1),
    ]
    *_, (seq, kind, offset, length, fua, data) = rig.peer.frames[-1].items()
    assert (seq, kind, offset, length, fua, data) == (n + 1, wire.ENTRY_TRIM, 0, BLOCK, False, b"")
    first = next(rig.peer.frames[0].items())
    assert first[:5] == (1, wire.ENTRY_WRITE, 0, BLOCK, False) and bytes(first[5]) == b"w" * BLOCK
    assert rig.leg().shipped == n + 1 and rig.g.wait_applied(n + 1, WAIT)
    in_sync(rig.g)


def test_an_entries_frame_holds_at_most_ship_frame_bytes(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(groups, "SHIP_FRAME_BYTES", 3 * BLOCK)
    rig.peer.entries = True
    rig.write(7)
    assert rig.ship()
    assert [(f.first, f.last) for f in rig.peer.frames] == [(1, 3), (4, 6), (7, 7)]
    assert rig.peer.got == list(range(1, 8))


def test_a_frame_holds_one_pairs_entries_and_a_new_pair_starts_a_new_one(
    rig: Rig, tmp_path: Path
) -> None:
    """The secondary checks the frame's pair against the peer that sent it (a peer is
    trusted only for its own pairs): entries of two pairs never share a frame."""
    rig.peer.entries = True
    other = FakeSide(rig.peer, rig.side.volume, "g/q", stream=2)
    rig.g.add(2, other)
    rig.write(2)
    rig.write(3, side=other)
    rig.write(1)
    assert rig.ship()
    assert [(f.pair_id, f.first, f.last) for f in rig.peer.frames] == [
        ("g/p", 1, 2),
        ("g/q", 3, 5),
        ("g/p", 6, 6),
    ]
    assert rig.peer.got == list(range(1, 7))


def test_a_link_lost_inside_a_frame_ships_again_from_what_the_peer_holds(rig: Rig) -> None:
    rig.peer.entries = True
    rig.peer.lose_reply_at = 3  # the peer appends 1..3 of the frame, the answer is lost
    rig.write(5)
    assert not rig.ship()
    assert rig.leg().received == 0 and len(rig.side.link_failures) == 1
    rig.peer.heal()
    assert rig.ship()  # its status says it holds 3: the next frame starts at 4
    assert [(f.first, f.last) for f in rig.peer.frames] == [(1, 5), (4, 5)]
    assert rig.peer.got == [1, 2, 3, 4, 5]
    assert rig.leg() == LegMarks(PEER_LEG, 5, 5, 5, 0, True)
    in_sync(rig.g)
