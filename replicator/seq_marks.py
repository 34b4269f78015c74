"""Sequence marks per replication leg, over one consistency group's sequence space.

Theory of operation
-------------------
An async consistency group has one sequence space (SPEC 2).  Its journal retains the entries
``first_retained .. last``; everything older was released.  SPEC 5 mirrors the group into
several *legs* at once (sync to a near site S, async to a far site R) over that one space, so
each leg keeps its own marks:

``shipped``
    the newest seq sent to the leg.  The only mark that may move back, and only through
    :meth:`GroupMarks.on_link_lost`, to what the peer holds durably (a broken link sends
    again from there);
``received`` and ``applied``
    the newest seq the leg's peer holds durably and the newest it has applied to its
    volumes, as the peer reports them (``applied <= received <= last``);
``folded``
    every seq up to this one is recorded in the leg's difference bitmaps instead (an
    overflow, a suspension, or a copy that brought the leg up to that point), so the leg no
    longer needs it from the journal.

With them goes one group-wide local mark, ``written``: the newest seq that, with every seq
before it, is on the local volume.  Local writes finish out of order, so it is the
contiguous prefix of the seqs reported to :meth:`GroupMarks.on_written`.  Nothing unwritten is
shipped.  An entry shipped and applied before its local write, then released and lost in a
local crash, would leave the peer ahead of us for good, because released entries are not
redone.

A leg *holds* the journal up to ``max(min(applied, written), folded)``.  The journal may
release everything at or below the minimum over the *attached* legs
(:meth:`GroupMarks.release_upto`).  A leg that no longer needs any entry (folded up to the
newest, say a suspended leg that records in its bitmaps) can be :meth:`GroupMarks.detach` ed
so that it stops holding the space of later entries too.

What to send a leg next is ``max(shipped, received, applied, folded) + 1``, if that seq is
retained and written (:meth:`GroupMarks.next_to_ship`).  The SPEC 5 question ("R says it
applied n: can I send n+1 onward from what I retain?") is :meth:`GroupMarks.delta_range`.

Every group has an *incarnation*, a random 64-bit id chosen when its sequence space is
created.  Status messages and acknowledgements carry it.  An acknowledgement from another
incarnation (a peer that still remembers a journal that was since created afresh, whose
numbers mean something else) is refused, with both ids in the message.

Errors.  A value the peer reported that is impossible (a mark going backwards or beyond
``last``, applied above received, another incarnation) raises
:class:`~replicator.errors.ProtocolError` with ``remote=True``.  Going backwards is impossible
only for acknowledgements taken in order: the replies to a window of requests in flight can be
overtaken by newer ones, and their older marks then count for nothing
(``on_ack(..., in_order=False)``).  A misuse by the local caller (shipping what is unwritten,
releasing what a leg still needs, an unknown leg) raises
:class:`~replicator.errors.IllegalState`.  A refused call changes nothing.

The class is pure: no I/O, no clock, no lock.  Its owner serialises the calls (groups.py's
group lock).
"""

from __future__ import annotations

from dataclasses import dataclass

from replicator.errors import IllegalState, ProtocolError

#: Journal sequence numbers stay below this (replicator.journal refuses to start beyond it).
SEQ_LIMIT = 1 << 63
_U64 = 1 << 64


def incarnation_from_bytes(raw: bytes) -> int:
    """A group incarnation from 8 random bytes (the caller's ``os.urandom(8)``).  Never 0:
    0 means "no incarnation" (a peer that does not send one)."""
    if len(raw) != 8:
        raise IllegalState(f"an incarnation is made of 8 bytes, not {len(raw)}")
    return int.from_bytes(raw, "big") or 1


def format_incarnation(value: object) -> str:
    """``value`` as 16 hex digits if it is a 64-bit id, else its repr (for error messages)."""
    if type(value) is int and 0 <= value < _U64:
        return f"{value:016x}"
    return repr(value)


def _is_seq(value: object) -> bool:
    return type(value) is int and 0 <= value < SEQ_LIMIT


@dataclass(frozen=True, slots=True)
class LegMarks:
    """A snapshot of one leg's marks."""

    name: str
    shipped: int
    received: int
    applied: int
    folded: int
    attached: bool

    @property
    def done(self) -> int:
        """Every seq up to this one is applied on the leg's peer or in its bitmaps."""
        return max(self.applied, self.folded)


@dataclass(frozen=True, slots=True)
class LegStatus:
    """What a status message to a leg says: the group's incarnation, the newest seq of the
    journal, and ``base``, the oldest seq the leg can still get from it.  Everything below
    ``base`` was applied there or folded into its bitmaps, so a peer whose receive journal
    ends before ``base - 1`` continues at ``base``."""

    incarnation: int
    newest: int
    base: int


@dataclass(slots=True)
class _Leg:
    shipped: int
    received: int
    applied: int
    folded: int
    attached: bool = True


class GroupMarks:
    """The written mark and every leg's marks of one group.  See the module docstring."""

    def __init__(
        self,
        first_retained: int,
        last: int,
        *,
        incarnation: int,
        written: int | None = None,
        group: str = "",
    ) -> None:
        self._group = group or "?"
        if not _is_seq(last):
            raise self._local(f"newest seq {last!r} is out of range")
        if not (type(first_retained) is int and 1 <= first_retained <= last + 1):
            raise self._local(f"first retained seq {first_retained!r} is not in 1..{last + 1}")
        if not (type(incarnation) is int and 0 < incarnation < _U64):
            raise self._local(f"incarnation {incarnation!r} is not a non-zero 64-bit id")
        if written is None:
            written = last  # at start-up the journal's retained entries are redone first
        if not (type(written) is int and 0 <= written <= last):
            raise self._local(f"written seq {written!r} is not in 0..{last}")
        self._incarnation = incarnation
        self._first = first_retained
        self._last = last
        self._written = written
        self._done: set[int] = set()  # written locally, above the contiguous prefix
        self._legs: dict[str, _Leg] = {}

    # -- state ------------------------------------------------------------------------------

    @property
    def group(self) -> str:
        return self._group

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def first_retained(self) -> int:
        """The oldest seq the journal still holds (``last + 1`` when it holds none)."""
        return self._first

    @property
    def last(self) -> int:
        """The newest seq appended to the journal (0 before the first)."""
        return self._last

    @property
    def written(self) -> int:
        """Every seq up to this one is on the local volume (or was folded away unwritten)."""
        return self._written

    @property
    def legs(self) -> tuple[str, ...]:
        return tuple(self._legs)

    def leg(self, name: str) -> LegMarks:
        g = self._get(name)
        return LegMarks(name, g.shipped, g.received, g.applied, g.folded, g.attached)

    # -- the local side -----------------------------------------------------------------------

    def appended(self, seq: int) -> None:
        """The journal's newest seq is now ``seq`` (a group commit may cover several)."""
        if not (type(seq) is int and self._last <= seq < SEQ_LIMIT):
            raise self._local(f"the newest seq cannot go from {self._last} to {seq!r}")
        self._last = seq

    def on_written(self, seq: int) -> None:
        """Entry ``seq`` is on the local volume.  Any order; reporting a seq twice, or one
        already below the written mark (a fold moved it), is harmless."""
        # Once per client write.  The usual case first: the next seq, nothing early to add.
        w = self._written
        if seq == w + 1 and type(seq) is int and seq <= self._last:
            done = self._done
            if done:  # the early ones it was holding back
                done.discard(seq)
                while seq + 1 in done:
                    seq += 1
                    done.discard(seq)
            self._written = seq
            return
        if not (type(seq) is int and 1 <= seq <= self._last):
            raise self._local(f"seq {seq!r} was written but the newest appended is {self._last}")
        if seq > w:
            self._done.add(seq)

    # -- membership ---------------------------------------------------------------------------

    def add_leg(self, name: str, *, applied: int, folded: int = 0) -> None:
        """A leg whose peer has applied up to ``applied``.  Its peer must be servable from the
        journal: ``max(applied, folded) + 1 >= first_retained``.  Ask :meth:`delta_range`
        first; when it says None, copy from a bitmap (or in full) and pass the point that copy
        covers as ``folded``."""
        if not (isinstance(name, str) and name):
            raise self._local(f"leg name {name!r} is not a non-empty string")
        if name in self._legs:
            raise self._local(f"leg {name} exists already")
        for what, value in (("applied", applied), ("folded", folded)):
            if not (_is_seq(value) and value <= self._last):
                raise self._local(
                    f"leg {name}: {what} seq {value!r} is not in 0..{self._last} (the newest)"
                )
        self._servable(name, max(applied, folded))
        self._legs[name] = _Leg(applied, applied, applied, folded)

    def remove_leg(self, name: str) -> None:
        self._get(name)
        del self._legs[name]

    def detach(self, name: str) -> None:
        """Stop ``name`` from holding journal space, now and for later entries.  It must need
        nothing retained: fold it up to the newest first."""
        g = self._get(name)
        if max(g.applied, g.folded) < self._last:
            raise self._local(
                f"leg {name} still needs seqs {max(g.applied, g.folded) + 1}..{self._last}; "
                "fold them into its bitmaps before detaching it"
            )
        g.attached = False

    def attach(self, name: str) -> None:
        """Let a detached leg hold journal space again; what it needs must still be retained
        (fold it up to the point its bitmap covers first)."""
        g = self._get(name)
        if not g.attached:
            self._servable(name, max(g.applied, g.folded))
            g.attached = True

    # -- shipping and acknowledgements --------------------------------------------------------

    def next_to_ship(self, name: str) -> int | None:
        """The first seq to send ``name``, or None when there is nothing to send: the leg is
        detached, or that seq is not both retained and written."""
        g = self._get(name)
        if not g.attached:
            return None
        n = max(g.shipped, g.received, g.applied, g.folded) + 1
        if n < self._first or n > self._written:
            return None
        return n

    def on_shipped(self, name: str, seq: int) -> None:
        """Every entry up to ``seq`` has been sent to ``name`` (from :meth:`next_to_ship`)."""
        g = self._get(name)
        if not g.attached:
            raise self._local(f"leg {name} is detached: nothing is shipped to it")
        if not _is_seq(seq) or seq < g.shipped:
            raise self._local(f"leg {name}: shipped cannot go from {g.shipped} to {seq!r}")
        if seq > self._written:
            raise self._local(
                f"leg {name}: seq {seq} shipped but only seqs up to {self._written} are "
                "written locally"
            )
        g.shipped = seq

    def on_link_lost(self, name: str) -> None:
        """The link to ``name`` broke, or the peer refused an entry: what was sent and not
        acknowledged may be lost, so ship again from what the peer holds durably."""
        g = self._get(name)
        g.shipped = g.received

    def on_ack(
        self, name: str, received: int, applied: int, *, incarnation: int, in_order: bool = True
    ) -> None:
        """The peer of ``name`` holds up to ``received`` durably and applied up to
        ``applied``; ``incarnation`` is the group incarnation its acknowledgement carries.

        ``in_order=False`` for acknowledgements that may arrive overtaken: the replies to
        several requests in flight, each read off the peer's marks when it answered, come back
        in the order they were sent, not the order they were read.  A mark below the one
        already counted then counts for nothing instead of being refused; everything else
        (the incarnation, a mark beyond ``last``, applied above received within the one
        acknowledgement) is still checked."""
        self.check_incarnation(incarnation, f"leg {name}: an acknowledgement")
        g = self._get(name)
        for what, value in (("received", received), ("applied", applied)):
            if not _is_seq(value):
                raise self._remote(f"leg {name}: {what} seq {value!r} is out of range")
            if value > self._last:
                raise self._remote(
                    f"leg {name}: the peer reports {what} seq {value} but the newest entry "
                    f"is {self._last}"
                )
        if applied > received:
            raise self._remote(f"leg {name}: applied seq {applied} is past received {received}")
        if not in_order:
            g.received = max(g.received, received)
            g.applied = max(g.applied, applied)
            return
        if received < g.received or applied < g.applied:
            raise self._remote(
                f"leg {name}: the peer's marks went back: received {g.received} -> {received}, "
                f"applied {g.applied} -> {applied}"
            )
        g.received = received
        g.applied = applied

    def check_incarnation(self, incarnation: object, what: str = "a message") -> None:
        """Refuse (ProtocolError, remote) ``what`` if it carries another incarnation."""
        if incarnation != self._incarnation or type(incarnation) is not int:
            raise self._remote(
                f"{what} carries incarnation {format_incarnation(incarnation)} but this group "
                f"is incarnation {format_incarnation(self._incarnation)} (sequence numbers "
                "of another journal)"
            )

    def status(self, name: str) -> LegStatus:
        """What to tell ``name`` in a status message."""
        g = self._get(name)
        return LegStatus(self._incarnation, self._last, max(self._first, g.folded + 1))

    # -- folding and release --------------------------------------------------------------------

    def folded_at(self, name: str, seq: int) -> None:
        """Every seq up to ``seq`` is in the difference bitmaps of ``name``: it no longer needs
        them from the journal (its needs start at ``seq + 1``)."""
        g = self._get(name)
        if not (_is_seq(seq) and g.folded <= seq <= self._last):
            raise self._local(
                f"leg {name}: the fold point cannot go from {g.folded} to {seq!r} "
                f"(the newest seq is {self._last})"
            )
        g.folded = seq

    def fold_all(self) -> int:
        """The whole journal was folded into every leg's bitmaps (the journal's ``drop_all``);
        returns the fold point, ``last``.  The written mark jumps to it too: an entry whose
        local write is still in flight is in the bitmaps, and the writes appended later must
        not wait for it to ship."""
        for g in self._legs.values():
            g.folded = max(g.folded, self._last)
        self._written = max(self._written, self._last)
        self._done = {s for s in self._done if s > self._written}
        return self._last

    def release_upto(self) -> int:
        """The journal may release every entry at or below this.  It is a bound: a node that
        keeps a delta journal for a leg to come (SPEC 5, S) may keep more."""
        held = [
            max(min(g.applied, self._written), g.folded) for g in self._legs.values() if g.attached
        ]
        return min(held) if held else self._written

    def on_released(self, upto: int) -> None:
        """The journal released every entry at or below ``upto``."""
        bound = self.release_upto()
        if not _is_seq(upto) or upto > bound:
            raise self._local(
                f"cannot release up to {upto!r}: the legs hold every seq after {bound}"
            )
        if upto >= self._first:
            self._first = upto + 1

    # -- questions ------------------------------------------------------------------------------

    def delta_range(self, peer_applied: int) -> range | None:
        """A peer that has applied up to ``peer_applied`` (SPEC 5: R, asked by S) lacks the seqs
        after it.  Their range up to ``written``, if the journal retains every one of them;
        None if it no longer reaches back to ``peer_applied + 1`` (a bitmap differential or a
        full copy instead) or the peer is ahead of the newest entry.  The range is empty when
        there is nothing to send yet."""
        if not _is_seq(peer_applied):
            raise self._remote(f"the peer's applied seq {peer_applied!r} is out of range")
        if peer_applied > self._last or peer_applied + 1 < self._first:
            return None
        return range(peer_applied + 1, max(peer_applied, self._written) + 1)

    def can_delta_resync(self, peer_applied: int) -> bool:
        return self.delta_range(peer_applied) is not None

    def lag_entries(self, name: str) -> int:
        """How many written seqs the peer of ``name`` has not applied (folded ones too: its
        image is still at ``applied``)."""
        return max(0, self._written - self._get(name).applied)

    # -- helpers ---------------------------------------------------------------------------------

    def _get(self, name: str) -> _Leg:
        g = self._legs.get(name)
        if g is None:
            raise self._local(f"no leg {name!r}")
        return g

    def _servable(self, name: str, done: int) -> None:
        if done + 1 < self._first:
            raise self._local(
                f"leg {name} needs seq {done + 1} but the journal retains seqs from "
                f"{self._first} on: copy from its bitmap and fold it at the copy's point first"
            )

    def _local(self, message: str) -> IllegalState:
        return IllegalState(f"group {self._group}: {message}")

    def _remote(self, message: str) -> ProtocolError:
        return ProtocolError(f"group {self._group}: {message}", remote=True)
