"""What a side serving I/O while it pulls the chunks it lacks does with each request: pure code,
no threads, no sockets, no files.

Theory of operation
-------------------
After a forced takeover of an incomplete copy (SPEC section 4) the taken-over side serves
reads and writes while a background pull copies, chunk by chunk, what it never received from
the old primary.  The old primary is fenced and writes nothing more, so its image is fixed at
the takeover.  Three facts about each chunk drive every decision (:class:`Bits`):

* *pending*: its bit in the copy bitmap; the chunk was never received here;
* *written*: its bit in the difference bitmap, which started again at the takeover; a
  client wrote the chunk here since;
* *unsynced*: the pull (or a fetch on demand) brought it since the last bitmap sync; neither
  its data nor its cleared pending bit is durable yet.

A chunk both pending and written holds the newer data, and its pending bit is *stale*: every
plan drops such a bit first (``DROP``) and treats the chunk as here.  On disk that pair of bits
means "the local data is newer" (a crash between a whole-chunk write's bit and the clearing of
its pending bit leaves it, and so did a crash before a pull's sync before the sync on write).

Every request is one lookup per chunk in :data:`TABLE`, keyed by the operation (:class:`Op`:
a read, a write that covers part of the chunk, a write that covers all of it, a step of the
background pull) and whether the chunk is pending; the answer is a :class:`Do`.  The plan
builders (:func:`read`, :func:`write`, :func:`copy_step`, :func:`sync`) turn the answers into
a :class:`Plan`: ordered :class:`Action` steps that the adapter (``replicator/pair/pull.py``)
carries out in order, each finishing before the next starts, or a refusal (a fetch is needed
and the old primary cannot be reached: EIO, and nothing was done).  The steps:

``DROP``
    clear the pending bits of chunks whose local data is newer (in memory; durable with the
    next ``SYNC``, which is safe: their written bits and their data are durable already).
``FETCH``
    bring each chunk here for a client: under the chunk's lock, its :func:`copy_step` is
    decided again (the pull may have brought it meanwhile) and carried out.
``COPY``
    the transfer: the old primary's chunk is written here (not durable), its pending bit
    cleared in memory, and the chunk is unsynced.
``SYNC``
    the bitmap sync: the data is made durable, then the pending bitmap, then no chunk is
    unsynced.
``RECORD``
    set the chunks' written bits, durably.
``WRITE`` / ``READ``
    the client's own data, written (not durable) or read.
``SYNC_DATA``
    make the data durable (``fdatasync``), bitmaps untouched.

The rules the plans keep, so that a crash at any point leaves every chunk either the old
primary's (fetched again) or the client's (tests/test_hydration_model.py checks them against
a dict-of-blocks model through every crash point):

1. A chunk's data is durable before its pending bit is cleared durably (``COPY`` then
   ``SYNC``; nothing else persists the pending bitmap).
2. A write's written bits are durable before it is acknowledged and, for a chunk that is
   here, before its data: a resync after the pull copies chunks by that bit.
3. A write into a chunk pulled since the last sync syncs first (``SYNC`` before ``RECORD``):
   otherwise a crash could leave the chunk pending and written on disk over pulled data that
   never reached it, and serve that as newer.
4. A write that covers a whole pending chunk fetches nothing (it overwrites all of it; only a
   write into part of one fetches it and merges, as dm-clone does).  Its written bit must not
   be durable before its data (pending and written means "the local data is newer"): the
   data is written and synced, then the bit, then the pending bit is dropped.  Until the bit
   is durable the chunk's pending bit, still set on disk, covers it: a crash fetches the old
   image again, so an unacknowledged write is lost for that chunk, never served over data
   this side never received.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from replicator.errors import UsageError

#: Chunks the pull copies between two bitmap syncs (a crash costs at most this many again).
SYNC_EVERY: Final = 256


@dataclass(frozen=True, slots=True)
class Geometry:
    """The volume's data size and chunk size (the last chunk may be short)."""

    chunk_size: int
    data_size: int

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.data_size < 1:
            raise UsageError(f"bad geometry: {self.data_size} bytes in {self.chunk_size}")

    @property
    def nchunks(self) -> int:
        return -(-self.data_size // self.chunk_size)

    def span(self, offset: int, length: int) -> range:
        """The chunks that bytes ``[offset, offset + length)`` touch (length 0: the chunk at
        ``offset``, as a zero-length request still names one)."""
        if offset < 0 or length < 0 or offset + length > self.data_size:
            raise UsageError(f"bytes {offset}+{length} are outside the volume ({self.data_size})")
        first = offset // self.chunk_size
        last = (offset + max(length, 1) - 1) // self.chunk_size
        return range(first, min(last, self.nchunks - 1) + 1)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """The chunk's byte offset and length."""
        start = chunk * self.chunk_size
        return start, min(self.chunk_size, self.data_size - start)

    def covers(self, offset: int, length: int, chunk: int) -> bool:
        """Bytes ``[offset, offset + length)`` cover all of ``chunk``."""
        start, size = self.chunk_range(chunk)
        return offset <= start and start + size <= offset + length


@dataclass(frozen=True, slots=True)
class Bits:
    """The three facts about one chunk (the theory of operation above)."""

    pending: bool = False
    written: bool = False
    unsynced: bool = False

    @property
    def stale(self) -> bool:
        """Pending, but written here since the takeover: the local data is newer."""
        return self.pending and self.written

    @property
    def lacking(self) -> bool:
        """Not here, and nothing newer is: only the old primary has this chunk."""
        return self.pending and not self.written


class Op(enum.Enum):
    READ = "read"
    WRITE_PART = "write part of the chunk"
    WRITE_WHOLE = "write all of the chunk"
    COPY_STEP = "the pull's step"


class Do(enum.Enum):
    SERVE = "serve locally"
    FETCH_THEN_SERVE = "fetch, then serve"
    WRITE = "write locally"
    FETCH_THEN_MERGE = "fetch, then merge the write"
    WRITE_WITHOUT_FETCH = "write the whole chunk without fetching"
    SKIP = "skip the copy step"
    COPY = "copy it"


#: (operation, the chunk lacks: pending and not written) → what to do with the chunk.
TABLE: Final[Mapping[tuple[Op, bool], Do]] = {
    (Op.READ, False): Do.SERVE,
    (Op.READ, True): Do.FETCH_THEN_SERVE,
    (Op.WRITE_PART, False): Do.WRITE,
    (Op.WRITE_PART, True): Do.FETCH_THEN_MERGE,
    (Op.WRITE_WHOLE, False): Do.WRITE,
    (Op.WRITE_WHOLE, True): Do.WRITE_WITHOUT_FETCH,
    (Op.COPY_STEP, False): Do.SKIP,
    (Op.COPY_STEP, True): Do.COPY,
}

#: The decisions that need the old primary.
NEEDS_OLD_PRIMARY: Final = frozenset({Do.FETCH_THEN_SERVE, Do.FETCH_THEN_MERGE, Do.COPY})


def decide(op: Op, bits: Bits) -> Do:
    return TABLE[op, bits.lacking]


class Step(enum.Enum):
    DROP = "drop stale pending bits"
    FETCH = "fetch for a client"
    COPY = "copy from the old primary"
    SYNC = "sync the data, then the pending bitmap"
    RECORD = "set the written bits durably"
    WRITE = "write the client's data"
    SYNC_DATA = "sync the data"
    READ = "read the client's data"


@dataclass(frozen=True, slots=True)
class Action:
    step: Step
    chunks: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do, in order; or ``refused``: the first chunk that needs the old primary while
    it cannot be reached (EIO; nothing is done)."""

    actions: tuple[Action, ...] = ()
    decisions: tuple[tuple[int, Do], ...] = ()
    refused: int | None = None

    def steps(self) -> tuple[Step, ...]:
        return tuple(a.step for a in self.actions)

    def chunks(self, step: Step) -> tuple[int, ...]:
        """Every chunk of the plan's ``step`` actions."""
        return tuple(c for a in self.actions if a.step is step for c in a.chunks)

    def split(self, step: Step) -> tuple[tuple[Action, ...], tuple[Action, ...]]:
        """The actions before the (first) ``step`` action, and those after it."""
        for i, a in enumerate(self.actions):
            if a.step is step:
                return self.actions[:i], self.actions[i + 1 :]
        return self.actions, ()


#: Steps that stand without chunks (the others are left out of a plan when they name none).
_BARE: Final = frozenset({Step.SYNC, Step.WRITE, Step.READ})


def _plan(actions: list[Action], decisions: list[tuple[int, Do]]) -> Plan:
    return Plan(tuple(a for a in actions if a.chunks or a.step in _BARE), tuple(decisions))


def _refusal(decisions: list[tuple[int, Do]], reachable: bool) -> Plan | None:
    if reachable:
        return None
    for chunk, do in decisions:
        if do in NEEDS_OLD_PRIMARY:
            return Plan(decisions=tuple(decisions), refused=chunk)
    return None


def read(
    geometry: Geometry, offset: int, length: int, bits: Mapping[int, Bits], reachable: bool
) -> Plan:
    """A client reads ``[offset, offset + length)``: every chunk it lacks is fetched first
    (copy on read; stored here, it jumps the pull's queue), then the read is served locally."""
    span = geometry.span(offset, length)
    decisions = [(c, decide(Op.READ, bits[c])) for c in span]
    refused = _refusal(decisions, reachable)
    if refused is not None:
        return refused
    stale = tuple(c for c in span if bits[c].stale)
    fetch = tuple(c for c, do in decisions if do is Do.FETCH_THEN_SERVE)
    return _plan(
        [Action(Step.DROP, stale), Action(Step.FETCH, fetch), Action(Step.READ)], decisions
    )


def write(
    geometry: Geometry, offset: int, length: int, bits: Mapping[int, Bits], reachable: bool
) -> Plan:
    """A client writes, zeroes or trims ``[offset, offset + length)`` (rules 2 to 4)."""
    span = geometry.span(offset, length)
    whole_op = {True: Op.WRITE_WHOLE, False: Op.WRITE_PART}
    decisions = [(c, decide(whole_op[geometry.covers(offset, length, c)], bits[c])) for c in span]
    refused = _refusal(decisions, reachable)
    if refused is not None:
        return refused
    stale = tuple(c for c in span if bits[c].stale)
    fetch = tuple(c for c, do in decisions if do is Do.FETCH_THEN_MERGE)
    whole = tuple(c for c, do in decisions if do is Do.WRITE_WITHOUT_FETCH)
    here = tuple(c for c in span if c not in whole)
    sync_first = bool(fetch) or any(bits[c].unsynced for c in span)
    actions = [Action(Step.DROP, stale), Action(Step.FETCH, fetch)]
    if sync_first:
        actions.append(Action(Step.SYNC))
    actions += [Action(Step.RECORD, here), Action(Step.WRITE)]
    if whole:
        actions += [
            Action(Step.SYNC_DATA, whole),
            Action(Step.RECORD, whole),
            Action(Step.DROP, whole),
        ]
    return _plan(actions, decisions)


def copy_step(chunk: int, bits: Bits) -> Plan:
    """The pull's step for ``chunk`` (and a client's fetch, decided again under the chunk's
    lock): copy it if it still lacks; drop a stale pending bit; else nothing."""
    do = decide(Op.COPY_STEP, bits)
    actions = [Action(Step.DROP, (chunk,) if bits.stale else ())]
    if do is Do.COPY:
        actions.append(Action(Step.COPY, (chunk,)))
    return _plan(actions, [(chunk, do)])


def sync() -> Plan:
    """The bitmap sync (the pull's, every :data:`SYNC_EVERY` chunks and at its end)."""
    return Plan((Action(Step.SYNC),))


def sync_due(before: int, after: int) -> bool:
    """The pull went from ``before`` to ``after`` chunks copied (a piece at a time): time
    for a bitmap sync when that passed a multiple of :data:`SYNC_EVERY`."""
    return after // SYNC_EVERY > before // SYNC_EVERY


def after_crash(durable: Bits) -> Bits:
    """A chunk's facts after a crash or a restart: the durable bits; nothing is unsynced."""
    return Bits(durable.pending, durable.written, False)
