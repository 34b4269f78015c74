"""Journal recovery: follow the chain, then tell a torn tail from corruption (no I/O).

docs/format.md ("Recovery", "Torn tail or corruption") states the rules this module applies;
the module docstring of :mod:`replicator.journal` says why they are safe.  Recovery reads
the ring only through a ``read(ring_offset, n)`` callback, so tests can hand it any bytes.

The chain is the journal as before: from the header's tail, every record valid, exactly the
next seq, epochs never decreasing.  Where it breaks, a scan of the rest of the ring looks for
*later records* of the same chain and the *vouch marks* they carry.  Only when one exists and
the broken seq is vouched for (by the header or by them) is the journal corrupt; then the
same scan yields the salvage: every entry still located, and each damaged region between.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import crc32c

from replicator.journal_codec import (
    REC_HEADER_LEN,
    REC_MAGIC,
    RECORD_ALIGN,
    RING_OFFSET,
    BadRecord,
    Entry,
    EntryKind,
    JournalHeader,
    RecordHead,
    decode_record_head,
)

#: ``read(ring_offset, n)``: ``n`` bytes of the ring from ``ring_offset`` (never past its end)
RingRead = Callable[[int, int], bytes]
_SCAN_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class DamagedRegion:
    """A stretch of the ring where records that may have been acknowledged are unreadable."""

    first_seq: int  # the seqs it may hold: first_seq..last_seq (never empty)
    last_seq: int
    ring_offset: int  # where it starts, in bytes from the start of the ring
    nbytes: int  # how far it extends (it may wrap past the ring's end; 0: no bytes at all)
    #: The damaged record's own header, when that header is intact (it has its own CRC) and
    #: only the data is bad: its stream, kind, offset and length (``data`` empty).  None: the
    #: extent of whatever the region held is unknown.
    extent: Entry | None = None

    @property
    def extent_known(self) -> bool:
        return self.extent is not None


@dataclass(frozen=True, slots=True)
class JournalSalvage:
    """What could still be read from a corrupt journal (see :class:`JournalCorrupt`)."""

    path: str
    group: str
    journal_id: int
    first_seq: int  # the header's tail seq: everything before it was released
    applied_seq: int  # the header's applied mark (receive journals)
    first_bad_seq: int  # the seq the chain expected where it broke
    first_bad_offset: int  # byte offset in the file where it broke
    vouched_seq: int  # every seq up to this one is known to have been complete on disk
    max_seq: int  # the highest seq any record of this journal in the file, or its header, names
    entries: tuple[Entry, ...]  # every entry located in the retained range (no data), seq order
    damaged: tuple[DamagedRegion, ...]

    @property
    def following(self) -> int:
        """Valid records located after the break."""
        return sum(1 for e in self.entries if e.seq >= self.first_bad_seq)

    @property
    def extent_unknown(self) -> bool:
        """Some damaged region may have held writes anywhere: fold whole volumes."""
        return any(not d.extent_known for d in self.damaged)

    @property
    def next_seq(self) -> int:
        """The smallest seq :meth:`Journal.reset` accepts for the next entry."""
        return self.max_seq + 1


class Located(NamedTuple):
    """A record whose header is valid for this journal, where recovery found it."""

    pos: int  # virtual position of the record
    head: RecordHead
    intact: bool  # the data's CRC matches too

    @property
    def end(self) -> int:
        return self.pos + self.head.size


class _Ring:
    """Reads records out of the ring of one journal (``read`` is the only I/O)."""

    def __init__(self, read: RingRead, capacity: int, journal_id: int) -> None:
        self.read = read
        self.capacity = capacity
        self.journal_id = journal_id
        self._chunk_pos = -1  # virtual position of the cached chunk (scan only)
        self._chunk = b""

    def head_at(self, pos: int) -> RecordHead | None:
        """The valid header of this journal at virtual ``pos`` whose record fits the ring."""
        ring = pos % self.capacity
        try:
            rh = decode_record_head(self.read(ring, REC_HEADER_LEN))
        except BadRecord:
            return None
        if rh.journal_id != self.journal_id or ring + rh.size > self.capacity:
            return None
        if rh.is_wrap and ring == 0:
            return None
        return rh

    def intact(self, pos: int, rh: RecordHead) -> bool:
        if not rh.data_len:
            return True  # the header CRC covers data_crc, which decode checked is empty
        data = self.read(pos % self.capacity + REC_HEADER_LEN, rh.data_len)
        return len(data) == rh.data_len and crc32c.crc32c(data) == rh.data_crc

    def next_magic(self, pos: int, limit: int) -> int | None:
        """The first aligned virtual position in [pos, limit) holding a record magic."""
        cap = self.capacity
        while pos < limit:
            if not self._chunk_pos <= pos < self._chunk_pos + len(self._chunk):
                ring = pos % cap
                self._chunk = self.read(ring, min(_SCAN_CHUNK, cap - ring))
                self._chunk_pos = pos
            base = self._chunk_pos
            i = self._chunk.find(REC_MAGIC, pos - base)
            while i != -1 and (base + i) % RECORD_ALIGN:
                i = self._chunk.find(REC_MAGIC, i + 1)
            if i != -1:
                return base + i if base + i < limit else None
            pos = base + len(self._chunk)
        return None


class IndexSlot(NamedTuple):
    """One retained (or reserved) record in a journal's in-memory index."""

    start: int  # virtual position where its space starts (its wrap marker, if any)
    pos: int  # virtual position of the record itself
    end: int  # virtual position just past it
    stream: int
    kind: EntryKind
    offset: int
    length: int
    fua: bool
    stamp_ns: int
    epoch: int


class Recovery(NamedTuple):
    """What :func:`recover` found: the chain, and a salvage when the journal is corrupt."""

    slots: dict[int, IndexSlot]  # the chain: tail_seq, tail_seq + 1, ...
    head: int  # virtual position just past the chain (the tail position if it is empty)
    last_seq: int  # the newest seq in it (tail_seq - 1 if none)
    salvage: JournalSalvage | None


def recover(read: RingRead, h: JournalHeader, *, same_boot: bool, path: str = "") -> Recovery:
    """Follow the chain from the tail (docs/format.md, "Recovery"), then scan the rest of the
    ring to tell a torn tail from corruption.  ``same_boot``: the machine has not rebooted
    since the header's epoch was opened (its page cache is the one that epoch wrote to)."""
    cap = h.capacity
    ring = _Ring(read, cap, h.journal_id)
    limit = h.tail_pos + cap  # the retained range cannot reach past this
    chain: list[tuple[int, Located]] = []

    def valid(pos: int, seq: int, min_epoch: int) -> Located | None:
        rh = ring.head_at(pos)
        if rh is None or rh.seq != seq or not min_epoch <= rh.epoch <= h.epoch:
            return None
        return Located(pos, rh, True) if ring.intact(pos, rh) else None

    pos, seq, epoch = h.tail_pos, h.tail_seq, h.tail_epoch
    while True:
        start = pos
        found = valid(pos, seq, epoch)
        if found is None:
            break
        if found.head.is_wrap:
            pos += cap - pos % cap
            epoch = found.head.epoch
            found = valid(pos, seq, epoch)
            if found is None or found.head.is_wrap:
                break
        if found.end > limit:  # cannot happen with a consistent header; stay bounded
            break
        chain.append((start, found))
        epoch = found.head.epoch
        pos = found.end
        seq += 1
    head = max(chain[-1][1].end, h.tail_pos) if chain else h.tail_pos
    index = {
        h.tail_seq + i: IndexSlot(
            start,
            p.pos,
            p.end,
            p.head.stream,
            EntryKind(p.head.kind),
            p.head.offset,
            p.head.length,
            p.head.fua,
            p.head.stamp_ns,
            p.head.epoch,
        )
        for i, (start, p) in enumerate(chain)
    }

    # The chain broke at ``pos`` expecting ``seq``.  Scan the rest of the window for records
    # of the same chain: this journal's id, a seq from the break on, an epoch the chain could
    # still have (not older than the last good record's, not newer than the header's).
    bad_seq, bad_pos, min_epoch = seq, pos, epoch
    vouched = h.synced_seq
    later = False
    lineage: list[Located] = []  # the later records, greedily chained in seq order
    want, want_epoch = bad_seq, min_epoch
    q: int | None = bad_pos
    while q is not None and q < limit:
        q = ring.next_magic(q, limit)
        if q is None:
            break
        rh = ring.head_at(q)
        if rh is None:
            q += RECORD_ALIGN
            continue
        if rh.seq < bad_seq or not min_epoch <= rh.epoch <= h.epoch or q + rh.size > limit:
            q += RECORD_ALIGN
            continue
        later = later or rh.seq > bad_seq
        vouched = max(vouched, rh.synced_seq)
        if same_boot and rh.epoch == h.epoch:
            vouched = max(vouched, rh.written_seq)
        if rh.seq < want or rh.epoch < want_epoch:
            q += RECORD_ALIGN
            continue
        found = Located(q, rh, ring.intact(q, rh))
        lineage.append(found)
        want, want_epoch = (rh.seq if rh.is_wrap else rh.seq + 1), rh.epoch
        # Nothing newer starts inside a record whose header is intact (its bytes are there).
        q = q + cap - q % cap if rh.is_wrap else found.end
    # The record the chain broke on is not a later one, unless only its wrap marker was bad.
    later = later or any(p.intact and not p.head.is_wrap and p.pos != bad_pos for p in lineage)
    if not (later and bad_seq <= vouched):
        return Recovery(index, head, seq - 1, None)  # a torn tail: the chain is the journal

    entries = [_entry_of(p.head) for _, p in chain]
    regions: list[DamagedRegion] = []

    def gap(first: int, last: int, frm: int, to: int, extent: Entry | None = None) -> None:
        if first <= last and first <= vouched:  # beyond what is vouched for: the torn tail
            regions.append(DamagedRegion(first, last, frm % cap, max(0, to - frm), extent))

    prev_seq, prev_end = bad_seq - 1, bad_pos
    for p in lineage:
        s = p.head.seq
        if p.head.is_wrap:
            gap(prev_seq + 1, s - 1, prev_end, p.pos)
            prev_seq, prev_end = s - 1, p.pos + cap - p.pos % cap
            continue
        gap(prev_seq + 1, s - 1, prev_end, p.pos)
        if p.intact:
            entries.append(_entry_of(p.head))
        else:
            gap(s, s, p.pos, p.end, _entry_of(p.head))
        prev_seq, prev_end = s, p.end
    gap(prev_seq + 1, vouched, prev_end, limit)
    salvage = JournalSalvage(
        path=path,
        group=h.group,
        journal_id=h.journal_id,
        first_seq=h.tail_seq,
        applied_seq=h.applied_seq,
        first_bad_seq=bad_seq,
        first_bad_offset=RING_OFFSET + bad_pos % cap,
        vouched_seq=vouched,
        max_seq=max(highest_seq(read, h), vouched),  # the same floor reset() computes
        entries=tuple(entries),
        damaged=tuple(regions),
    )
    return Recovery(index, head, seq - 1, salvage)


def highest_seq(read: RingRead, h: JournalHeader) -> int:
    """The highest seq the header or any record of this journal in the ring names."""
    ring = _Ring(read, h.capacity, h.journal_id)
    best = max(h.tail_seq - 1, h.applied_seq, h.synced_seq)
    q: int | None = 0
    while q is not None:
        q = ring.next_magic(q, h.capacity)
        if q is None:
            break
        rh = ring.head_at(q)
        if rh is not None:
            best = max(best, rh.seq)
        q += RECORD_ALIGN
    return best


def _entry_of(rh: RecordHead) -> Entry:
    return Entry(
        rh.seq, rh.stream, EntryKind(rh.kind), rh.offset, rh.length, b"", rh.fua, rh.stamp_ns
    )
