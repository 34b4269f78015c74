"""Asynchronous consistency groups: the journal on each side, shipping and applying.

Theory of operation
-------------------
An async consistency group has one sequence space: the primary node's group journal
(:class:`~replicator.journal.Journal`).  A client write to any volume of the group is appended
to the journal (sequence number assigned, made durable, group-committed), then written to the
local volume, then acknowledged.  The journal entry comes first so that, after a crash, the
node *redoes* the unreleased entries onto its volumes (idempotent, in order) and the journal
and the volumes agree again.

The shipper (one thread per group on the primary) reads entries in sequence order and sends
them as Write/Zero requests carrying ``seq``, up to :data:`SHIP_WINDOW` in flight: it sends
each at once and collects the acks oldest first (no thread per request), reading the next batch
from the journal while the last one's acks are still coming. A round starts with a status (what
the secondary holds) and ships until it has caught up or for :data:`SHIP_ROUND_S`; the
primary's journal releases run on their own thread. The secondary never sends its marks
unasked: while it holds entries it has not applied, the shipper asks again (a status) within
:data:`APPLIED_POLL_S` of each answer that showed progress. The secondary appends each to its
*receive journal* with the same sequence number, strictly in order (an early arrival waits for
its predecessor), and answers with a JournalAck: received and applied. Its applier thread
writes entries to the volumes in order, makes them durable, then records the applied mark and
releases them. A secondary that restarts replays its receive journal from the applied mark, so
its volumes are always a write-order-consistent prefix of the primary's: never a mixture, never
a hole. The primary releases entries once the secondary has *applied* them.

Marks.  The primary keeps its sequence marks in :class:`~replicator.seq_marks.GroupMarks`:
*written* (the contiguous prefix of the local writes, which finish in any order) and, per
replication leg, *shipped*, *received*, *applied* and *folded*.  It ships a leg what
:meth:`~replicator.seq_marks.GroupMarks.next_to_ship` says, releases the journal up to
:meth:`~replicator.seq_marks.GroupMarks.release_upto` (the slowest attached leg), and after a
broken link ships again from what the peer holds durably.  Statuses and acknowledgements carry
the group's incarnation (the journal's id); an acknowledgement of another one is refused.  A
group has one leg today (its peer node); SPEC 5's second leg is a second set of marks in the
same sequence space.

Overflow.  At the high watermark the group's pairs report PFUL; when an append does not fit,
the group goes to PFUS: the retained entries are folded into the pairs' difference bitmaps
(:meth:`GroupPrimary.fold`) and later writes are recorded there until a resync.  A client
write never waits for journal space.

Split.  A split cuts the journal at its newest sequence number (client I/O of the group held
for that instant), records later writes in the bitmaps, ships up to the cut and, once the
secondary has applied it, finishes: every secondary volume holds the same point in time.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from replicator import wire
from replicator.errors import (
    ConnectionFailed,
    IllegalState,
    NotFound,
    PairvolError,
    ProtocolError,
    Timeout,
)
from replicator.gate import Gate
from replicator.journal import Entry, EntryKind, Journal, JournalFull
from replicator.journal_codec import record_size
from replicator.peer_link import PeerRefused
from replicator.rate_limit import RateLimit
from replicator.seq_marks import GroupMarks
from replicator.volume import Volume


class Side(Protocol):
    """What a group needs of each of its pairs' sides (the member interface; the pair
    runtime's :class:`~replicator.pair.side.Side` provides it)."""

    id: str

    @property
    def stream(self) -> int: ...

    @property
    def volume(self) -> Volume: ...

    def request(self, msg: wire.Message, timeout: float = ...) -> wire.Message: ...

    def send(self, msg: wire.Message) -> Callable[[], wire.Message]:
        """Send a request now; the call returned collects its answer (or raises)."""
        ...

    def takes_entries(self) -> bool:
        """Whether its peer takes Entries frames (many entries in one request)."""
        ...

    def apply_entry(
        self, kind: EntryKind, offset: int, length: int, data: bytes | memoryview, fua: bool
    ) -> None: ...

    def mark_dirty(self, offset: int, length: int) -> None: ...

    def mark_dirty_all(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Mark every range, then make the bitmap durable once."""
        ...

    def ships(self) -> bool: ...

    @property
    def max_rate(self) -> int:
        """Bytes per second its traffic may take (0: no limit)."""
        ...

    def journals(self) -> bool: ...

    def journal_level(self, high: bool) -> None: ...

    def journal_full(self) -> None: ...

    def link_failed(self, reason: str) -> None: ...

    def peer_failed(self, reason: str) -> None: ...


JOURNALS_DIR = os.path.join(".pairvol", "journals")
DEFAULT_JOURNAL_SIZE = 256 << 20
DEFAULT_HIGH_WATERMARK = 0.8
#: Entries in flight.  One thread sends them in sequence order on the group's connection
#: and collects their acks oldest first, so each arrives after the one it follows: any
#: window is safe from the receiver's wait for a predecessor (ORDER_WAIT).
SHIP_WINDOW = 32
#: What one read of the journal returns at most; a round reads batch after batch.
SHIP_BATCH_BYTES = 8 << 20
#: The most data one Entries frame carries (at least one entry, whatever its size); it holds
#: at most wire.MAX_ENTRIES entries.
SHIP_FRAME_BYTES = 1 << 20
#: A round ships until it has caught up or this long has passed (then a status, so that the
#: secondary hears the newest seq at least this often, and quiesce() waits at most this long).
SHIP_ROUND_S = 1.0
#: The shipper's wait between rounds while the peer has applied all it was sent: a status
#: (a round that finds nothing to ship) at least this often.
IDLE_WAIT_S = 0.2
#: While the peer holds entries it has not applied, the shipper asks again (a status, whose
#: answer carries the applied mark) this soon, and twice as long after each answer that shows
#: no progress, up to IDLE_WAIT_S.  The peer never pushes its applied mark: without this the
#: primary learnt it up to IDLE_WAIT_S late, which its lag, its journal's releases, a split's
#: drain and every waiter on ``wait_applied`` paid.
APPLIED_POLL_S = 0.005
APPLY_BATCH = 256
ORDER_WAIT = 10.0  # how long an early entry waits for its predecessor on the secondary
#: The primary's one replication leg today (SPEC 5 adds a second: sync near, async far).
PEER_LEG = "peer"

Log = Callable[[str], None]


def journal_path(directory: str, group: str, receive: bool) -> str:
    return os.path.join(directory, JOURNALS_DIR, f"{group}.{'rjournal' if receive else 'journal'}")


def _kind_of(msg: wire.Write | wire.Zero) -> tuple[EntryKind, int, bytes | memoryview]:
    if isinstance(msg, wire.Write):
        return EntryKind.WRITE, len(msg.data), msg.data
    return (EntryKind.TRIM if msg.may_trim else EntryKind.ZERO), msg.length, b""


_WIRE_KIND = {
    EntryKind.WRITE: wire.ENTRY_WRITE,
    EntryKind.ZERO: wire.ENTRY_ZERO,
    EntryKind.TRIM: wire.ENTRY_TRIM,
}
_JOURNAL_KIND = {code: kind for kind, code in _WIRE_KIND.items()}


def _entry_message(pair_id: str, entry: Entry) -> wire.Write | wire.Zero:
    """One journal entry as its own request (a peer that does not take Entries)."""
    if entry.kind is EntryKind.WRITE:
        return wire.Write(pair_id, entry.offset, entry.data, entry.fua, entry.seq)
    trim = entry.kind is EntryKind.TRIM
    return wire.Zero(pair_id, entry.offset, entry.length, entry.fua, trim, entry.seq)


def _entries_message(pair_id: str, run: list[Entry]) -> wire.Entries:
    """Consecutive journal entries of one pair as one Entries request."""
    heads = [(e.seq, e.offset, e.length, _WIRE_KIND[e.kind], e.fua) for e in run]
    return wire.pack_entries(pair_id, heads, [e.data for e in run if e.kind is EntryKind.WRITE])


def open_journal(path: str, group: str, capacity: int) -> Journal:
    """A group journal in write-back mode: an append returns once written (a crash of the
    node loses nothing acknowledged); a client flush or FUA write syncs it (docs/decisions.md,
    "Journal durability")."""
    if os.path.exists(path):
        j = Journal.open(path)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        j = Journal.create(path, capacity, group)
    j.sync_appends = False
    return j


class AppliedPoll:
    """When the shipper's next status is due, from the leg's marks after each round (pure:
    no clock, no I/O).  Nothing unapplied at the peer: :data:`IDLE_WAIT_S`.  Otherwise
    :data:`APPLIED_POLL_S` after the round that first saw it or saw the applied mark move,
    doubling, up to :data:`IDLE_WAIT_S`, while it stands still (a secondary slow to apply is
    asked ever less often, not 200 times a second)."""

    def __init__(self) -> None:
        self.wait = IDLE_WAIT_S
        self._done: int | None = None  # the applied mark last seen with entries unapplied

    def after_round(self, done: int, shipped: int) -> float:
        """The wait after a round that left the peer at ``done`` (applied or folded) with
        everything up to ``shipped`` sent to it."""
        if done >= shipped:
            self.wait, self._done = IDLE_WAIT_S, None
        elif self._done is None or done > self._done:
            self.wait, self._done = APPLIED_POLL_S, done
        else:
            self.wait = min(IDLE_WAIT_S, self.wait * 2)
        return self.wait

    def reset(self) -> float:
        """After a failed round: the next one ships from what the peer holds, afresh."""
        self.wait, self._done = IDLE_WAIT_S, None
        return self.wait


class _GroupWorker:
    """A group side's journal and its one background thread (shipper or applier)."""

    def __init__(self, name: str, journal: Journal, target: Callable[[], None], what: str):
        self.name = name
        self.journal = journal
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=target, name=f"{what} {name}", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.journal.close()


class GroupPrimary(_GroupWorker):
    """The primary side of one async group on this node.

    Its sequence marks (written, and per leg shipped, received, applied, folded) live in
    :attr:`marks`, a :class:`~replicator.seq_marks.GroupMarks` over the journal's one
    sequence space, guarded by :attr:`lock`.  Today a group has one leg, :data:`PEER_LEG`:
    every pair of the group replicates to the one peer node.  The journal's newest seq is
    pulled into the marks whenever the lock is taken (:meth:`record` takes no group lock).
    """

    def __init__(
        self, name: str, path: str, capacity: int, high_watermark: float, log: Log
    ) -> None:
        super().__init__(name, open_journal(path, name, capacity), self._ship_loop, "ship")
        self.log = log
        self.high_watermark = high_watermark
        self.sides: dict[int, Side] = {}  # stream -> side
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        j = self.journal
        # Entries are shipped only once written to the local volume too: an entry shipped
        # and applied before its local write, then lost in a crash, would leave the
        # secondary ahead of the primary forever (released entries are not redone).  After a
        # restart the retained entries are redone before anything ships: all count as written.
        # (A journal id is random; 0, one chance in 2**64, is no incarnation to the marks.)
        self.marks = GroupMarks(j.first_seq, j.last_seq, incarnation=j.journal_id or 1, group=name)
        # What the peer applied is learnt from its first acknowledgement; what was released
        # before is applied there or folded into the bitmaps.
        self.marks.add_leg(PEER_LEG, applied=0, folded=j.first_seq - 1)
        self.cut: int | None = None
        self.full = False
        # Held by the shipper for a whole round (status, read, send, collect): quiesce() waits
        # for a round that read entries before a fold to finish before a resync starts.
        self._ship_lock = threading.Lock()
        #: ``--max-rate`` on shipping: the lowest limit of the group's pairs (0: none).
        self.ship_rate = RateLimit(self._rate, self._stop)
        # Appends share it, a fold closes it: a write whose pair was journaling when it asked
        # is either in the journal before the fold (and folded into the bitmap with it) or
        # sees the fold's state and is recorded in the bitmap, never journaled after a fold.
        self._fold_gate = Gate()
        self._release_lock = threading.Lock()  # one journal release at a time
        # The releaser: the shipper's acknowledgements hand it the newest releasable seq
        # (under cond) and go on shipping; it commits the journal's header (two fdatasyncs,
        # which also make every page-cached append durable) off the shipper's thread, one
        # release for however many acknowledgements came meanwhile.
        self._release_to = 0
        self._release_wake = threading.Event()
        self._releaser = threading.Thread(
            target=self._release_loop, name=f"release {name}", daemon=True
        )

    # -- the marks (read without the lock: for display and the old attribute names) ----------

    @property
    def written(self) -> int:
        """Every entry up to this one is on the local volume."""
        return self.marks.written

    @property
    def applied(self) -> int:
        """Every entry up to this one is applied on the peer or folded into the bitmaps."""
        return self.marks.leg(PEER_LEG).done

    @property
    def received(self) -> int:
        """The newest entry the peer holds durably, or that it no longer needs (folded)."""
        g = self.marks.leg(PEER_LEG)
        return max(g.received, g.folded)

    @property
    def shipped(self) -> int:
        g = self.marks.leg(PEER_LEG)
        return max(g.shipped, g.folded)

    def _pull_newest(self) -> None:
        """With the lock: the marks learn the journal's newest durable seq."""
        newest = self.journal.last_seq
        if newest > self.marks.last:
            self.marks.appended(newest)

    # -- membership ---------------------------------------------------------------------------

    def add(self, stream: int, side: Side) -> None:
        self.sides[stream] = side

    def _leg_of(self, side: Side) -> str:
        return PEER_LEG  # one leg today: every pair of the group goes to the one peer node

    def redo(self) -> int:
        """After a restart: write every retained entry to its volume again, in order."""
        n = 0
        for entry in self.journal.entries(self.journal.first_seq):
            side = self.sides.get(entry.stream)
            if side is not None:
                side.apply_entry(entry.kind, entry.offset, entry.length, entry.data, False)
                n += 1
        for side in self.sides.values():
            os.fdatasync(side.volume.fd)
        return n

    # -- the write path -----------------------------------------------------------------------

    def record(self, side: Side, msg: wire.Write | wire.Zero) -> int | None:
        """Append a client write; its seq once durable, or None when it must be recorded in
        the pair's bitmap instead (the journal is full and the group has gone to PFUS, or a
        fold or a split drain happened since the write's policy was looked up)."""
        kind, length, data = _kind_of(msg)
        with self._fold_gate.shared():
            if not side.journals():
                return None
            try:
                seq = self.journal.append(
                    side.stream, kind, msg.offset, data, length=length, fua=msg.fua
                )
                if msg.fua:
                    self.journal.sync()
            except JournalFull:
                full = True
            else:
                full = False
        if full:
            self._overflow()  # outside the gate: the fold it leads to closes it
            return None
        self._watermark()
        return seq

    def written_locally(self, seq: int) -> None:
        """The client write of entry ``seq`` is on the local volume: it may ship."""
        m = self.marks
        with self.lock:
            if seq > m.last:
                m.appended(self.journal.last_seq)  # _pull_newest, inlined: once per write
            m.on_written(seq)
        self._wake.set()

    def _watermark(self) -> None:
        high = self.journal.usage() >= self.high_watermark
        for side in list(self.sides.values()):
            side.journal_level(high)

    def _overflow(self) -> None:
        with self.lock:
            if self.full:
                return
            self.full = True
        self.log(f"group {self.name}: journal full ({self.journal.capacity} bytes): PFUS")
        for side in list(self.sides.values()):
            side.journal_full()

    def fold(self) -> int:
        """Fold every retained entry into its pair's difference bitmap, then drop them (after
        the appends in flight: see ``_fold_gate``)."""
        with self._fold_gate.closed(), self.lock:
            entries = self._drop_all(self._mark_all)
            self.full = False
        if entries:
            self.log(f"group {self.name}: folded {len(entries)} journal entries into bitmaps")
        return len(entries)

    def drop(self) -> None:
        """Drop every retained entry without recording it anywhere."""
        with self._fold_gate.closed(), self.lock:
            self._drop_all()

    def _mark_all(self, entries: list[Entry]) -> None:
        """A fold's entries go into their pairs' difference bitmaps, durably, before the
        journal lets them go (the marks came after the drop: a kill between lost the
        changes from both, and a later resync left the secondary without them)."""
        ranges: dict[int, list[tuple[int, int]]] = {}
        for entry in entries:
            ranges.setdefault(entry.stream, []).append((entry.offset, max(entry.length, 1)))
        for stream, marks in ranges.items():  # each pair's bitmap made durable once
            side = self.sides.get(stream)
            if side is not None:
                side.mark_dirty_all(marks)

    def _drop_all(self, record: Callable[[list[Entry]], None] | None = None) -> list[Entry]:
        """With the fold gate closed and the lock: release every entry; every leg has them in
        its bitmaps now (``record`` put them there), or no longer needs them."""
        entries = self.journal.drop_all(record)
        m = self.marks
        self._pull_newest()  # no append in flight: the journal dropped up to exactly this
        m.on_released(m.fold_all())
        self.cond.notify_all()  # wait_applied: folded counts as applied
        return entries

    # -- split --------------------------------------------------------------------------------

    def start_drain(self) -> int:
        with self.lock:
            if self.cut is None:
                self.cut = self.journal.last_seq
        for side in self.sides.values():
            os.fdatasync(side.volume.fd)
        self._wake.set()
        return self.cut

    def wait_applied(self, seq: int, timeout: float, leg: str = PEER_LEG) -> bool:
        """Until every entry up to ``seq`` is applied on ``leg``'s peer (or folded into the
        bitmaps); False after ``timeout`` seconds or once the group stops."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.marks.leg(leg).done < seq:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._wake.set()
                self.cond.wait(min(left, 0.5))
        return True

    def delta_range(self, peer_applied: int) -> range | None:
        """SPEC 5: the entries to send a peer that applied up to ``peer_applied``, or None if
        the journal no longer holds them all (see :meth:`GroupMarks.delta_range`)."""
        with self.lock:
            self._pull_newest()
            return self.marks.delta_range(peer_applied)

    # -- shipping ------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._releaser.is_alive():  # first: the shipper's first ack hands over to it
            self._releaser.start()
        super().start()

    def stop(self) -> None:
        self._stop.set()
        self._release_wake.set()
        if self._releaser.is_alive():
            self._releaser.join(timeout=10)
        super().stop()

    def on_ack(self, ack: wire.JournalAck, leg: str = PEER_LEG, *, later: bool = False) -> None:
        """Count the peer's marks and release what every leg has applied: at once, or with
        ``later`` (the shipper) by the releaser thread when it runs.  An acknowledgement of
        another incarnation is refused (ProtocolError): marks of another sequence space (the
        group before a reset, or re-created) would release entries the peer never applied."""
        with self.cond:
            m = self.marks
            self._pull_newest()
            done, bound = m.leg(leg).done, m.release_upto()
            m.on_ack(
                leg,
                ack.received,
                ack.applied,
                # 0: a peer that has not learnt the incarnation yet (no status since it started)
                incarnation=ack.incarnation or m.incarnation,
                in_order=False,  # the replies to the requests in flight: any order
            )
            if m.leg(leg).done > done:
                self.cond.notify_all()
            upto = m.release_upto()
            if not (upto > bound and upto >= m.first_retained):
                return
            if later and self._releaser.is_alive():
                self._release_to = max(self._release_to, upto)
                self._release_wake.set()
                return
        self._release(upto)

    def _release_loop(self) -> None:
        while not self._stop.is_set():
            self._release_wake.wait()
            self._release_wake.clear()
            with self.cond:
                upto = self._release_to
            if upto and not self._stop.is_set():
                self._release(upto)

    def _release(self, upto: int) -> None:
        # The release rewrites the journal's header (two fdatasyncs): not under the group's
        # lock, which every client write takes (written_locally) and the other replies too.
        # Releases are serialized; one that lost the race to a later one is a no-op.
        with self._release_lock:
            try:
                self.journal.release(upto)
            except (PairvolError, OSError) as e:
                # The entries stay retained (the journal fills up sooner); say so.
                self.log(f"group {self.name}: releasing the journal up to {upto} failed: {e}")
                return
            with self.cond:
                self.marks.on_released(upto)
                self.cond.notify_all()  # for whoever waits for the journal to shrink
        self._watermark()  # below the high watermark again: PFUL -> PAIR

    def _shipping_side(self) -> Side | None:
        for side in self.sides.values():
            if side.ships():
                return side
        return None

    def _ship_loop(self) -> None:
        poll = AppliedPoll()
        wait = poll.wait
        while not self._stop.is_set():
            self._wake.wait(wait)
            self._wake.clear()
            if not self.ship_round():
                wait = poll.reset()
                self._stop.wait(0.5)  # retry, not spin, while the link is down
                continue
            with self.lock:
                g = self.marks.leg(PEER_LEG)
            wait = poll.after_round(g.done, g.shipped)

    def ship_round(self, leg: str = PEER_LEG) -> bool:
        """One round of the shipper: the status to ``leg``'s peer (learn what it holds), then
        the entries after that, batch after batch with at most :data:`SHIP_WINDOW` in flight
        throughout, until it has caught up (the last acknowledgement collected) or
        :data:`SHIP_ROUND_S` has passed.  False if the round
        failed; the pairs that ship were told (``peer_failed`` or ``link_failed``) and the
        leg ships again from what its peer holds durably."""
        side = self._shipping_side()
        if side is None:
            return True
        try:
            with self._ship_lock:
                self.status(side)
                self._ship_some(leg)
        except (PeerRefused, ProtocolError) as e:
            # The secondary answered and refused, or answered about another sequence space:
            # not link trouble to ride out, an error that suspends the pair (and folds the
            # journal into the bitmaps).
            self._link_lost(leg)
            for s in list(self.sides.values()):
                if s.ships():
                    s.peer_failed(f"the secondary refused a journal entry: {e}")
            return False
        except (ConnectionFailed, Timeout, PairvolError, OSError) as e:
            self._link_lost(leg)
            for s in list(self.sides.values()):
                if s.ships():
                    s.link_failed(f"shipping the journal failed: {e}")
            return False
        return True

    def _link_lost(self, leg: str) -> None:
        with self.lock:
            self.marks.on_link_lost(leg)

    def quiesce(self, timeout: float = 60.0) -> None:
        """Wait until no shipping round is in flight (a round that started now finds nothing
        old: a folded journal holds no entry from before the fold)."""
        if not self._ship_lock.acquire(timeout=timeout):
            raise Timeout(f"group {self.name}: the shipper did not finish its round")
        self._ship_lock.release()

    def status(self, side: Side) -> None:
        """Tell the secondary our newest sequence number; learn its marks."""
        leg = self._leg_of(side)
        with self.lock:
            self._pull_newest()
            st = self.marks.status(leg)  # base: everything older was applied there, or folded
        stamp = self.journal.newest_stamp_ns or 0
        reply = side.request(wire.JournalStatus(side.id, st.newest, stamp, st.base, st.incarnation))
        if isinstance(reply, wire.JournalAck):
            self.on_ack(reply, leg, later=True)

    def _rate(self) -> int:
        rates = [s.max_rate for s in list(self.sides.values()) if s.max_rate > 0]
        return min(rates, default=0)

    def _ship_some(self, leg: str) -> None:
        # From what the secondary holds durably on: it never needs an entry twice.  The next
        # batch is read and sent while the last one's acknowledgements are still coming: the
        # window stays full across batches (a batch is eight entries at 1 MiB).
        pending: collections.deque[Callable[[], wire.Message]] = collections.deque()
        rate = self._rate()
        # Throttled, a round is one batch of about a second's worth.
        most = min(SHIP_BATCH_BYTES, max(rate, 64 << 10)) if rate else SHIP_BATCH_BYTES
        until = time.monotonic() + SHIP_ROUND_S
        after = 0  # the newest seq this round looked at (shipped, or of no member)
        side = self._shipping_side()
        framed = side is not None and side.takes_entries()
        try:
            # Until the round's time is up (throttled: one batch), then the answers in flight.
            while not self._stop.is_set() and time.monotonic() < until and not (rate and after):
                with self.lock:
                    start = self.marks.next_to_ship(leg)
                    upto = self.marks.written
                first = None if start is None else max(start, after + 1)
                if first is None or first > upto:
                    if not pending:
                        break  # caught up, every answer in
                    self._collect(pending.popleft()(), leg)  # newer entries may come meanwhile
                    continue
                try:
                    batch = list(self.journal.entries(first, max_bytes=most))
                except NotFound:
                    break  # released meanwhile (the secondary applied it): the next round
                if not batch:
                    break
                after, sent = self._send_batch(batch, upto, pending, leg, framed)
                if sent:
                    with self.lock:
                        self.marks.on_shipped(leg, sent)
            while pending:
                self._collect(pending.popleft()(), leg)
        finally:
            for answer in pending:  # a failure: the rest are collected (and dropped) too
                with contextlib.suppress(PairvolError, OSError):
                    answer()
        with self.lock:
            more = self.marks.next_to_ship(leg) is not None
        if more:
            self._wake.set()

    def _send_batch(
        self,
        batch: list[Entry],
        upto: int,
        pending: collections.deque[Callable[[], wire.Message]],
        leg: str,
        framed: bool,
    ) -> tuple[int, int]:
        """Send the entries of ``batch`` up to ``upto``, collecting the oldest answers to keep
        at most :data:`SHIP_WINDOW` requests in flight; the newest seq looked at and the newest
        sent (0: none; an entry of no member is looked at, not sent).  ``framed``: runs of
        consecutive entries of one pair go as one Entries request each (at most
        :data:`~replicator.wire.MAX_ENTRIES` entries and :data:`SHIP_FRAME_BYTES` of data);
        otherwise each entry is its own Write or Zero."""
        seen = sent = 0
        run: list[Entry] = []  # consecutive entries of run_side, not sent yet
        run_side: Side | None = None
        run_bytes = 0
        for entry in batch:
            if entry.seq > upto:
                break
            seen = entry.seq
            side = self.sides.get(entry.stream)
            if side is None:
                continue
            self.ship_rate.take(max(len(entry.data), 512))
            if not framed:
                pending.append(side.send(_entry_message(side.id, entry)))
                sent = entry.seq
                self._keep_window(pending, leg)
                continue
            if run_side is not None and (
                side is not run_side
                or entry.seq != run[-1].seq + 1
                or len(run) >= wire.MAX_ENTRIES
                or run_bytes + len(entry.data) > SHIP_FRAME_BYTES
            ):
                pending.append(run_side.send(_entries_message(run_side.id, run)))
                sent = run[-1].seq
                run, run_bytes = [], 0
                self._keep_window(pending, leg)
            run.append(entry)
            run_side = side
            run_bytes += len(entry.data)
        if run_side is not None and run:
            pending.append(run_side.send(_entries_message(run_side.id, run)))
            sent = run[-1].seq
            self._keep_window(pending, leg)
        return seen, sent

    def _keep_window(
        self, pending: collections.deque[Callable[[], wire.Message]], leg: str
    ) -> None:
        while len(pending) >= SHIP_WINDOW:
            self._collect(pending.popleft()(), leg)

    def _collect(self, reply: wire.Message, leg: str) -> None:
        if isinstance(reply, wire.JournalAck):
            self.on_ack(reply, leg, later=True)

    # -- display -------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        j = self.journal
        with self.lock:
            g = self.marks.leg(PEER_LEG)
        applied, received = g.done, max(g.received, g.folded)
        # The age of the oldest entry the secondary has not applied: entries it applied may
        # still be retained (released later, in batches), and they are not lag.
        oldest = j.stamp_ns(max(applied + 1, j.first_seq)) if j.last_seq > applied else None
        lag_s = round(max(0.0, time.time() - oldest / 1e9), 3) if oldest else 0.0
        return {
            "group": self.name,
            "journal_bytes": j.capacity,
            "journal_used": j.used_bytes,
            "journal_percent": round(100.0 * j.usage(), 1),
            "high_watermark_percent": round(100.0 * self.high_watermark, 1),
            "newest_seq": j.last_seq,
            "secondary_received": received,
            "secondary_applied": applied,
            "lag_entries": max(0, j.last_seq - applied),
            # Not shipped yet (the backlog a slow or throttled link builds):
            "backlog_entries": max(0, j.last_seq - g.shipped),
            "backlog_bytes": j.bytes_from(g.shipped + 1),
            "ship_rate_limit": self._rate(),
            "lag_seconds": lag_s,
            "draining_to": self.cut,
        }


class GroupSecondary(_GroupWorker):
    """The secondary side of one async group: the receive journal and its applier."""

    def __init__(self, name: str, path: str, capacity: int, log: Log) -> None:
        super().__init__(name, open_journal(path, name, capacity), self._apply_loop, "apply")
        self.log = log
        self.sides: dict[str, Side] = {}  # pair id -> side
        self.cond = threading.Condition()
        self.primary_newest = 0
        self.primary_newest_ns = 0
        self.heard_at = 0.0
        self._apply_lock = threading.Lock()  # one applier at a time (thread or discard)
        #: The primary's incarnation, learnt from its JournalStatus (0: not yet).
        self.incarnation = 0

    @property
    def received(self) -> int:
        return self.journal.last_seq

    @property
    def applied(self) -> int:
        return self.journal.applied_seq

    def add(self, side: Side) -> None:
        self.sides[side.id] = side

    def ack(self, pair_id: str) -> wire.JournalAck:
        return wire.JournalAck(pair_id, self.received, self.applied, self.incarnation)

    def takes_now(self, msg: wire.Write | wire.Zero | wire.Entries) -> bool:
        """Whether :meth:`receive` (or :meth:`receive_entries`) would take ``msg`` without
        waiting: its first entry is the next one (or held already) and the journal has room
        for them all (with room for a wrap marker).  Only the receiver appends, and only the
        applier frees, so the answer holds until the entries are received."""
        j = self.journal
        if isinstance(msg, wire.Entries):
            first = msg.first
            sizes = [record_size(len(d)) for *_, d in msg.items()]
        else:
            first = msg.seq
            sizes = [record_size(len(msg.data) if isinstance(msg, wire.Write) else 0)]
        # A wrap wastes at most the ring's end, less than the record that did not fit there.
        return first <= j.last_seq + 1 and j.free_bytes >= sum(sizes) + max(sizes)

    def receive(self, side: Side, msg: wire.Write | wire.Zero) -> wire.JournalAck:
        """Append a shipped entry in sequence order (duplicates are acknowledged again)."""
        kind, length, data = _kind_of(msg)
        self._receive_run(side, msg.seq, [(msg.seq, kind, msg.offset, length, msg.fua, data)])
        return self.ack(msg.pair_id)

    def receive_entries(self, side: Side, msg: wire.Entries) -> wire.JournalAck:
        """Append the consecutive entries of one Entries frame in sequence order (those held
        already are skipped, and acknowledged again)."""
        run = [
            (seq, _JOURNAL_KIND[code], offset, length, fua, data)
            for seq, code, offset, length, fua, data in msg.items()
        ]
        self._receive_run(side, msg.first, run)
        return self.ack(msg.pair_id)

    def _receive_run(
        self,
        side: Side,
        first: int,
        run: list[tuple[int, EntryKind, int, int, bool, bytes | memoryview]],
    ) -> None:
        """Wait (up to :data:`ORDER_WAIT`) until the entry before ``first`` is held, then
        append the entries of ``run`` (consecutive from ``first``) not held yet."""
        deadline = time.monotonic() + ORDER_WAIT
        with self.cond:
            while first > self.journal.last_seq + 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    expected = self.journal.last_seq + 1
                    raise IllegalState(
                        f"group {self.name}: entry {first} arrived but {expected} never did"
                    )
                self.cond.wait(left)
            for seq, kind, offset, length, fua, data in run:
                if seq != self.journal.last_seq + 1:
                    continue  # held already (sent again after a broken link)
                while True:
                    try:
                        self.journal.append(
                            side.stream, kind, offset, data, length=length, fua=fua, seq=seq
                        )
                        break
                    except JournalFull:
                        # The applier frees space as it goes: wait for it, do not refuse.
                        if time.monotonic() > deadline + ORDER_WAIT:
                            raise
                        self._wake.set()
                        self.cond.wait(0.2)
            self.cond.notify_all()
        self._wake.set()

    def _rebase(self, next_seq: int) -> None:
        """Start the receive journal over so that its next entry is ``next_seq``."""
        path, capacity = self.journal.path, self.journal.capacity
        self.log(
            f"group {self.name}: sequences {self.journal.last_seq + 1}..{next_seq - 1} were "
            "folded into bitmaps by the primary; the receive journal continues at "
            f"{next_seq}"
        )
        self.journal.close()
        os.unlink(path)
        self.journal = Journal.create(path, capacity, self.name, first_seq=next_seq)
        self.journal.sync_appends = False
        if next_seq > 1:
            self.journal.set_applied(next_seq - 1)

    def note_status(self, msg: wire.JournalStatus) -> wire.JournalAck:
        if msg.incarnation and self.incarnation and msg.incarnation != self.incarnation:
            # The primary's sequence space started over: what we hold of the old one is
            # superseded (the primary folded it into its bitmaps); continue at its base.
            with self._apply_lock, self.cond:
                self.log(
                    f"group {self.name}: the primary's incarnation changed "
                    f"({self.incarnation:016x} -> {msg.incarnation:016x}); the receive "
                    f"journal's unapplied entries are dropped, it continues at {msg.base}"
                )
                self._rebase(max(msg.base, 1))
        if msg.incarnation:
            self.incarnation = msg.incarnation
        if msg.base > self.journal.last_seq + 1:
            # The primary folded entries we never got into its bitmaps (a resync copies those
            # chunks instead): they will never come.  Continue from its base.
            self.drain()
            with self.cond:
                if msg.base > self.journal.last_seq + 1:
                    self._rebase(msg.base)
        self.primary_newest = max(self.primary_newest, msg.newest)
        self.primary_newest_ns = msg.newest_ns or self.primary_newest_ns
        self.heard_at = time.time()
        return self.ack(msg.pair_id)

    def _apply_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            try:
                self.apply_pending()
            except (PairvolError, OSError) as e:
                self.log(f"group {self.name}: applying the journal failed: {e}")
                time.sleep(1)

    def apply_pending(self) -> int:
        """Apply every received entry not applied yet, in order; returns how many."""
        done = 0
        while True:
            with self._apply_lock:
                n, _ = self._apply_batch(self.journal.last_seq, None, APPLY_BATCH)
            if not n:
                return done
            done += n

    def discard_unapplied(self, side: Side) -> int:
        """``side`` enters a copy: skip its received, unapplied entries (the copy brings those
        chunks; applied after it they would put older data over newer), apply the other
        pairs' entries in order, and make the skip durable before the copy can begin."""
        skipped = 0
        with self._apply_lock:
            upto = self.journal.last_seq
            while self.journal.applied_seq < upto:
                n, s = self._apply_batch(upto, side.stream, APPLY_BATCH)
                skipped += s
                if not n:
                    break
        if skipped:
            self.log(
                f"group {self.name}: pair {side.id} resyncs: {skipped} received journal "
                "entries it had not applied are superseded by the copy and were skipped"
            )
        return skipped

    def _apply_batch(self, upto: int, skip: int | None, limit: int) -> tuple[int, int]:
        """With the apply lock: apply entries after the applied mark up to ``upto`` (at most
        ``limit``), skipping stream ``skip``; then mark them applied.  (done, skipped)."""
        start = self.journal.applied_seq + 1
        if start > min(upto, self.journal.last_seq):
            return 0, 0
        by_stream = {s.stream: s for s in self.sides.values()}
        last, skipped = start - 1, 0
        touched: set[int] = set()
        for entry in self.journal.entries(start):
            if entry.seq > upto:
                break
            if entry.stream == skip:
                skipped += 1
            else:
                side = by_stream.get(entry.stream)
                if side is None:
                    raise NotFound(f"group {self.name}: entry {entry.seq} is for unknown stream")
                side.apply_entry(entry.kind, entry.offset, entry.length, entry.data, False)
                touched.add(entry.stream)
            last = entry.seq
            if last - start + 1 >= limit:
                break
        if last < start:
            return 0, 0
        for stream in touched:
            os.fdatasync(by_stream[stream].volume.fd)
        # One header commit for both marks (two fdatasyncs, not four), atomic across a crash.
        self.journal.set_applied_and_release(last)
        with self.cond:
            self.cond.notify_all()
        return last - start + 1, skipped

    def drain(self, timeout: float = 60.0) -> None:
        """Apply everything received (before a takeover or a split on this side)."""
        deadline = time.monotonic() + timeout
        while self.applied < self.received:
            self._wake.set()
            if time.monotonic() > deadline:
                raise Timeout(f"group {self.name}: the journal did not drain in {timeout:.0f}s")
            time.sleep(0.02)

    def describe(self) -> dict[str, Any]:
        return {
            "group": self.name,
            "received_seq": self.received,
            "applied_seq": self.applied,
            "journal_bytes": self.journal.capacity,
            "journal_used": self.journal.used_bytes,
            "primary_newest_seq": self.primary_newest,
            "primary_newest_age_s": round(time.time() - self.primary_newest_ns / 1e9, 3)
            if self.primary_newest_ns
            else None,
        }
