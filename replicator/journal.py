"""The write-ahead journal of async replication: one file per consistency group per node.

docs/format.md ("Journal file") documents every byte; this docstring says why it is safe.

Theory of operation.  The file is two 4 KiB header slots followed by a *ring* of ``capacity``
bytes.  Entries are records (a 64-byte header, the data, zero padding to 512 bytes) appended at
the ring's *head*; the oldest retained record is at the *tail*.  Positions are *virtual*: they
only grow, and ``pos % capacity`` is the place in the ring, so ``head - tail`` is the space in
use.  A record never straddles the end of the ring: when one does not fit, a 512-byte *wrap
marker* carrying the next seq is written where it would have gone, and the record goes to
ring offset 0.

On the primary, ``append`` gives each client write the group's next sequence number; on the
secondary the shipped entries are appended with the primary's numbers (``seq=``, exactly
``last_seq + 1``).  ``append`` returns only once an ``fdatasync`` covering the record AND every
record reserved before it has completed, so an acknowledged entry never depends on one that
could still be torn.  Concurrent appenders are group-committed: whichever waiter finds no flush
in progress does one ``fdatasync`` for everything written so far, and the others wait for it.

Recovery (:meth:`Journal.open`) reads the header (the valid slot with the highest generation;
the other one is rewritten), then follows the chain from the tail: each record must have a
valid CRC32C, this journal's id, exactly the next seq, and an *epoch* no older than the
record before it.  The first record that fails ends the chain.  Three kinds of leftovers
sit after the end, and each is rejected:

* a torn append (never acknowledged, because its fdatasync had not returned): bad CRC;
* a record from an earlier lap of the ring: valid CRC, but its seq is too small;
* a record that was complete but sat *after* a torn one when the process died (concurrent
  appenders finish their pwrites out of order): valid CRC and possibly the right seq once the
  journal has grown back to it, but written in an older epoch.  Every ``open`` bumps the epoch
  in the header, durably, before the first append; records carry the epoch they were written
  in, and epochs never decrease along the chain, starting from the header's *tail epoch* (the
  epoch of the record at the tail, or the current one when the tail is the head).  Without
  this, an unacknowledged write discarded by one recovery could come back after the next crash
  once the journal has grown back over its seq.

Torn tail or corruption.  A damaged record followed by the journal's later records is not the
end of the journal: it is corruption (:class:`JournalCorrupt`), and open refuses to go on.
Telling the two apart needs proof that the damaged record was once complete, because a
torn append can legitimately sit before complete, unacknowledged records (the third case
above).  Every record carries that proof for the records before it: ``written_seq`` (every
seq up to it had been completely written when this record was reserved) and ``synced_seq``
(covered by a completed fdatasync); the header carries ``synced_seq`` too.  So recovery scans
the rest of the ring for later records of the same chain (this journal's id, seq >= the bad
one, epoch within the chain's range) and calls it corruption only when one exists AND the bad
seq is vouched for: by the header, by a later record's ``synced_seq``, or by a later record's
``written_seq`` when that record was written in the header's epoch during this same boot (the
page cache could not have lost a completed write).  docs/format.md states the rule exactly.

``release`` writes the new tail into the header (slot A, sync, slot B, sync) BEFORE the freed
space can be handed to an append: if records could overwrite the space while the durable tail
still pointed into it, recovery would start from the old tail, meet a newer record with the
wrong seq and lose the whole journal.

An I/O error in append (pwrite or fdatasync) breaks the journal: a reserved seq that never
reached the disk would be a hole in front of every later record, so every later call raises
:class:`~replicator.errors.VolumeError` until the file is reopened, and recovery decides.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import secrets
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import crc32c

from replicator.atomic_file import fsync_dir
from replicator.errors import (
    AlreadyExists,
    Closed,
    HeaderCorrupt,
    IllegalState,
    NotFound,
    UsageError,
    VolumeError,
)
from replicator.header import check_name

MAGIC = b"PVJRNL\x00\x00"
FORMAT_MAJOR = 2  # 2: records have their own header CRC and the vouch marks
FORMAT_MINOR = 0
SLOT_SIZE = 4096
SLOT_OFFSETS = (0, SLOT_SIZE)
RING_OFFSET = 2 * SLOT_SIZE
MIN_CAPACITY = 1 << 20
CAPACITY_ALIGN = 4096
#: Every record starts on a multiple of this in the ring and is zero-padded to it.
RECORD_ALIGN = 512

# magic, major, minor, header_len, generation, journal_id, capacity, ring_offset,
# record_align, epoch, tail_pos, tail_seq, applied_seq, created_ns, tail_epoch, group,
# synced_seq, boot_id, reserved
_HDR = struct.Struct("<8sHHIQQQQIIQQQqI64sQ16s72s")
_CRC = struct.Struct("<I")
HEADER_LEN = _HDR.size + _CRC.size
assert HEADER_LEN == 256

REC_MAGIC = b"PVJE"
# magic, kind, flags, header_len, seq, journal_id, offset, length, stamp_ns, stream, epoch,
# data_len, data_crc, written_seq, synced_seq, reserved (then the CRC32C of these 92 bytes)
_REC = struct.Struct("<4sBBHQQQQqIIIIQQ12s")
REC_HEADER_LEN = _REC.size + _CRC.size
assert REC_HEADER_LEN == 96
_EMPTY_CRC = crc32c.crc32c(b"")

FLAG_FUA = 0x01
_KIND_WRAP = 0xFF
_U32 = 1 << 32
_U64 = 1 << 64


class EntryKind(enum.IntEnum):
    WRITE = 1
    ZERO = 2  # zero the range; the volume must not punch holes (may_trim false)
    TRIM = 3  # zero the range; holes may be punched


class JournalFull(IllegalState):
    """The entry does not fit in the journal's free space (SPEC section 2, "Journal overflow").
    Raised at once, never after waiting; the journal is unchanged."""


class JournalCorrupt(HeaderCorrupt):
    """A damaged record is followed by later records of the journal that vouch for it: not a
    torn tail, so entries that were acknowledged are unreadable.  ``salvage`` says what could
    still be located; the file is left as it was (:meth:`Journal.reset` continues)."""

    def __init__(self, salvage: JournalSalvage) -> None:
        s = salvage
        unknown = ", extent unknown" if s.extent_unknown else ""
        super().__init__(
            f"journal {s.path} is corrupt: the record of seq {s.first_bad_seq} at byte "
            f"{s.first_bad_offset} is damaged and {s.following} valid later record(s) follow "
            f"({len(s.damaged)} damaged region(s){unknown}, {len(s.entries)} entries located)"
        )
        self.path = s.path
        self.salvage = s


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    stream: int
    kind: EntryKind
    offset: int
    length: int
    data: bytes  # empty for ZERO/TRIM, and for WRITE in drop_all's result
    fua: bool = False
    stamp_ns: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.seq < _U64:
            raise UsageError(f"journal seq {self.seq} is out of range")
        if not 0 <= self.stream < _U32:
            raise UsageError(f"journal stream {self.stream} is not a u32")
        if not 0 <= self.offset < _U64 or not 0 <= self.length < _U64:
            raise UsageError(f"journal range ({self.offset}, {self.length}) is out of range")


# -- codecs (pure, no I/O) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JournalHeader:
    journal_id: int
    capacity: int
    group: str
    created_ns: int
    generation: int = 1
    epoch: int = 1
    tail_pos: int = 0  # virtual position of the oldest retained record (or of the head)
    tail_seq: int = 1  # seq expected at tail_pos: last released seq + 1
    applied_seq: int = 0
    tail_epoch: int = 0  # the record at tail_pos was written in this epoch or a later one
    synced_seq: int = 0  # every record up to this seq was durable when this header was written
    boot_id: bytes = bytes(16)  # the kernel's boot id when this epoch was opened (0: unknown)


def encode_header(h: JournalHeader) -> bytes:
    """One slot: the 256-byte header, zero-padded to SLOT_SIZE."""
    body = _HDR.pack(
        MAGIC,
        FORMAT_MAJOR,
        FORMAT_MINOR,
        HEADER_LEN,
        h.generation,
        h.journal_id,
        h.capacity,
        RING_OFFSET,
        RECORD_ALIGN,
        h.epoch,
        h.tail_pos,
        h.tail_seq,
        h.applied_seq,
        h.created_ns,
        h.tail_epoch,
        h.group.encode(),
        h.synced_seq,
        h.boot_id,
        b"",
    )
    return (body + _CRC.pack(crc32c.crc32c(body))).ljust(SLOT_SIZE, b"\x00")


def decode_header(slot: bytes) -> JournalHeader:
    """Decode one slot or raise :class:`HeaderCorrupt` saying why."""
    if len(slot) < HEADER_LEN:
        raise HeaderCorrupt(f"journal header slot is truncated ({len(slot)} bytes)")
    if slot[:8] != MAGIC:
        if not slot[:HEADER_LEN].strip(b"\x00"):
            raise HeaderCorrupt("journal header slot is blank (all zero)")
        raise HeaderCorrupt("bad magic: not a pairvol journal header")
    (
        _magic,
        major,
        _minor,
        header_len,
        generation,
        journal_id,
        capacity,
        ring_offset,
        record_align,
        epoch,
        tail_pos,
        tail_seq,
        applied_seq,
        created_ns,
        tail_epoch,
        group_raw,
        synced_seq,
        boot_id,
        _reserved,
    ) = _HDR.unpack_from(slot)
    if major != FORMAT_MAJOR:
        raise HeaderCorrupt(f"unsupported journal format version {major} (this is {FORMAT_MAJOR})")
    if header_len != HEADER_LEN:
        raise HeaderCorrupt(f"journal header length {header_len} is not {HEADER_LEN}")
    (stored,) = _CRC.unpack_from(slot, _HDR.size)
    actual = crc32c.crc32c(slot[: _HDR.size])
    if stored != actual:
        raise HeaderCorrupt(f"bad CRC32C (stored {stored:08x}, computed {actual:08x})")
    if ring_offset != RING_OFFSET or record_align != RECORD_ALIGN:
        raise HeaderCorrupt(f"unsupported ring layout ({ring_offset}, {record_align})")
    if capacity < MIN_CAPACITY or capacity % CAPACITY_ALIGN:
        raise HeaderCorrupt(f"journal capacity {capacity} is invalid")
    if tail_pos % RECORD_ALIGN or tail_seq < 1 or applied_seq >= _U64 or generation < 1:
        raise HeaderCorrupt("journal header positions are invalid")
    text, _, rest = group_raw.partition(b"\x00")
    if rest.strip(b"\x00"):
        raise HeaderCorrupt("journal group field has bytes after its terminator")
    try:
        group = text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderCorrupt("journal group field is not UTF-8") from e
    return JournalHeader(
        journal_id=journal_id,
        capacity=capacity,
        group=group,
        created_ns=created_ns,
        generation=generation,
        epoch=epoch,
        tail_pos=tail_pos,
        tail_seq=tail_seq,
        applied_seq=applied_seq,
        tail_epoch=tail_epoch,
        synced_seq=synced_seq,
        boot_id=boot_id,
    )


def choose_header(slot_a: bytes, slot_b: bytes) -> tuple[JournalHeader, list[str]]:
    """The valid slot with the highest generation, and a note per slot that is not equal to
    it (damaged or stale).  Both slots invalid is :class:`HeaderCorrupt`."""
    decoded: list[JournalHeader | None] = []
    reasons: list[str] = []
    for raw in (slot_a, slot_b):
        try:
            decoded.append(decode_header(raw))
            reasons.append("")
        except HeaderCorrupt as e:
            decoded.append(None)
            reasons.append(str(e))
    valid = [h for h in decoded if h is not None]
    if not valid:
        raise HeaderCorrupt(
            f"no valid journal header slot (slot A: {reasons[0]}; slot B: {reasons[1]})"
        )
    best = max(valid, key=lambda h: h.generation)
    notes = []
    for name, h, why in zip("AB", decoded, reasons, strict=True):
        if h is None:
            notes.append(f"slot {name} damaged: {why}")
        elif h != best:
            notes.append(f"slot {name} stale (generation {h.generation} < {best.generation})")
    return best, notes


def record_size(data_len: int) -> int:
    """Bytes a record with ``data_len`` bytes of data occupies in the ring."""
    return -(-(REC_HEADER_LEN + data_len) // RECORD_ALIGN) * RECORD_ALIGN


def encode_record(
    *,
    journal_id: int,
    epoch: int,
    seq: int,
    kind: int,
    stream: int = 0,
    offset: int = 0,
    length: int | None = None,
    data: bytes | memoryview = b"",
    fua: bool = False,
    stamp_ns: int = 0,
    data_crc: int | None = None,
    written_seq: int = 0,
    synced_seq: int = 0,
) -> bytes:
    """A whole record, padded.  ``length`` defaults to ``len(data)``; ``data_crc``
    (``crc32c(data)``) may be precomputed.  ``written_seq`` and ``synced_seq`` vouch for the
    records before this one (module docstring); 0 vouches for nothing."""
    if length is None:
        length = len(data)
    if data_crc is None:
        data_crc = crc32c.crc32c(data)
    head = _REC.pack(
        REC_MAGIC,
        kind,
        FLAG_FUA if fua else 0,
        REC_HEADER_LEN,
        seq,
        journal_id,
        offset,
        length,
        stamp_ns,
        stream,
        epoch,
        len(data),
        data_crc,
        written_seq,
        synced_seq,
        b"",
    )
    pad = record_size(len(data)) - REC_HEADER_LEN - len(data)
    return b"".join((head, _CRC.pack(crc32c.crc32c(head)), data, bytes(pad)))


class BadRecord(HeaderCorrupt):
    """The bytes are not a valid record header (the one error :func:`decode_record_head`
    raises); recovery takes it as damage or as the end of the chain, never lets it out."""


class RecordHead(NamedTuple):
    """A decoded record header, its own CRC checked (the data's CRC is ``data_crc``)."""

    kind: int
    fua: bool
    seq: int
    journal_id: int
    offset: int
    length: int
    stamp_ns: int
    stream: int
    epoch: int
    data_len: int
    data_crc: int
    written_seq: int
    synced_seq: int

    @property
    def size(self) -> int:
        return record_size(self.data_len)

    @property
    def is_wrap(self) -> bool:
        return self.kind == _KIND_WRAP


def decode_record_head(raw: bytes) -> RecordHead:
    """Decode the header at the start of ``raw`` or raise :class:`BadRecord` saying why."""
    if len(raw) < REC_HEADER_LEN:
        raise BadRecord(f"record header is truncated ({len(raw)} bytes)")
    if raw[:4] != REC_MAGIC:
        raise BadRecord("bad record magic")
    (
        _m,
        kind,
        flags,
        hlen,
        seq,
        jid,
        offset,
        length,
        stamp,
        stream,
        epoch,
        dlen,
        dcrc,
        ws,
        ss,
        _r,
    ) = _REC.unpack_from(raw)
    if hlen != REC_HEADER_LEN:
        raise BadRecord(f"record header length {hlen} is not {REC_HEADER_LEN}")
    (stored,) = _CRC.unpack_from(raw, _REC.size)
    if crc32c.crc32c(raw[: _REC.size]) != stored:
        raise BadRecord("bad record header CRC32C")
    if kind == _KIND_WRAP:
        if dlen or length or dcrc != _EMPTY_CRC:
            raise BadRecord("a wrap marker carries no data")
    elif kind in (EntryKind.ZERO, EntryKind.TRIM):
        if dlen or dcrc != _EMPTY_CRC:
            raise BadRecord(f"a {EntryKind(kind).name} record carries no data")
    elif kind != EntryKind.WRITE:
        raise BadRecord(f"unknown record kind {kind}")
    elif dlen != length:
        raise BadRecord(f"WRITE record data length {dlen} is not its length {length}")
    # A record vouches only for records before it, and nothing is synced before it is written.
    if not 1 <= seq < _U64 or not ss <= ws < seq or offset + length >= _U64:
        raise BadRecord("record seq, marks or range are invalid")
    return RecordHead(
        kind,
        bool(flags & FLAG_FUA),
        seq,
        jid,
        offset,
        length,
        stamp,
        stream,
        epoch,
        dlen,
        dcrc,
        ws,
        ss,
    )


# -- recovery (no I/O of its own: it reads the ring through a callback) --------------------

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


class _Probe(NamedTuple):
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


class Recovery(NamedTuple):
    """What :func:`recover` found: the chain, and a salvage when the journal is corrupt."""

    chain: list[tuple[int, _Probe]]  # (start of its space, record) for tail_seq, tail_seq+1...
    head: int  # virtual position just past the chain
    salvage: JournalSalvage | None


def recover(read: RingRead, h: JournalHeader, *, same_boot: bool, path: str = "") -> Recovery:
    """Follow the chain from the tail (docs/format.md, "Recovery"), then scan the rest of the
    ring to tell a torn tail from corruption.  ``same_boot``: the machine has not rebooted
    since the header's epoch was opened (its page cache is the one that epoch wrote to)."""
    cap = h.capacity
    ring = _Ring(read, cap, h.journal_id)
    limit = h.tail_pos + cap  # the retained range cannot reach past this
    chain: list[tuple[int, _Probe]] = []

    def valid(pos: int, seq: int, min_epoch: int) -> _Probe | None:
        rh = ring.head_at(pos)
        if rh is None or rh.seq != seq or not min_epoch <= rh.epoch <= h.epoch:
            return None
        return _Probe(pos, rh, True) if ring.intact(pos, rh) else None

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
    head = chain[-1][1].end if chain else h.tail_pos

    # The chain broke at ``pos`` expecting ``seq``.  Scan the rest of the window for records
    # of the same chain: this journal's id, a seq from the break on, an epoch the chain could
    # still have (not older than the last good record's, not newer than the header's).
    bad_seq, bad_pos, min_epoch = seq, pos, epoch
    vouched = h.synced_seq
    later = False
    lineage: list[_Probe] = []  # the later records, greedily chained in seq order
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
        found = _Probe(q, rh, ring.intact(q, rh))
        lineage.append(found)
        want, want_epoch = (rh.seq if rh.is_wrap else rh.seq + 1), rh.epoch
        # Nothing newer starts inside a record whose header is intact (its bytes are there).
        q = q + cap - q % cap if rh.is_wrap else found.end
    # The record the chain broke on is not a later one, unless only its wrap marker was bad.
    later = later or any(p.intact and not p.head.is_wrap and p.pos != bad_pos for p in lineage)
    if not (later and bad_seq <= vouched):
        return Recovery(chain, head, None)  # a torn tail: the chain is the journal

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
    return Recovery(chain, head, salvage)


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


# -- the journal ----------------------------------------------------------------------------


class _Slot(NamedTuple):
    """One retained (or reserved) record in the in-memory index."""

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


def _io_error(e: OSError, doing: str) -> VolumeError:
    return VolumeError(f"journal {doing}: {e.strerror}", e.errno or errno.EIO)


class Journal:
    """One group's journal file, open read-write.  Thread-safe."""

    def __init__(self, path: str, fd: int, header: JournalHeader) -> None:
        self.path = path
        self.fd = fd
        self.group = header.group
        self.capacity = header.capacity
        self.journal_id = header.journal_id
        self._hdr = header
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._meta_lock = threading.Lock()  # serializes header rewrites
        self._index: dict[int, _Slot] = {}
        self._tail = header.tail_pos
        self._first_seq = header.tail_seq
        self._head = header.tail_pos
        self._next_seq = header.tail_seq
        self._durable = header.tail_seq - 1
        self._synced = header.tail_seq - 1
        self._applied = header.applied_seq
        self._inflight: set[int] = set()
        self._flushing = False
        self._failed: VolumeError | None = None
        self._closed = False
        #: False: append returns once the entry and every earlier one are *written* (in the
        #: page cache: they survive a crash of the process, kill -9 included), and
        #: :meth:`sync` makes them durable against power loss, which is the contract of a
        #: block device's write cache (data is durable after a flush).  True: every append
        #: waits for an fdatasync (group-committed).
        self.sync_appends = True
        #: fdatasync calls made for appends (group commit shares them); header syncs excluded.
        self.data_syncs = 0
        self.appends = 0
        #: what open() found wrong with the header slots (and repaired)
        self.repaired: list[str] = []
        #: which slot to write first: the damaged or stale one, so that a torn write can
        #: never leave only an older header behind
        self._slot_order = (0, 1)

    # -- creating and opening ---------------------------------------------------------------

    @classmethod
    def create(cls, path: str, capacity: int, group: str, *, first_seq: int = 1) -> Journal:
        """Create a new journal file (sparse) and open it.  ``first_seq`` is the seq the first
        append will get (a receive journal that starts after an existing prefix)."""
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise UsageError(f"journal capacity {capacity!r} is not an integer")
        if capacity < MIN_CAPACITY or capacity % CAPACITY_ALIGN:
            raise UsageError(
                f"journal capacity {capacity} must be at least {MIN_CAPACITY} bytes "
                f"and a multiple of {CAPACITY_ALIGN}"
            )
        if not 1 <= first_seq < _U64 // 2:
            raise UsageError(f"first seq {first_seq} is out of range")
        check_name(group, what="group name")
        if os.path.lexists(path):
            raise AlreadyExists(f"journal {path} already exists")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise NotFound(f"directory {directory} does not exist")
        header = JournalHeader(
            journal_id=secrets.randbits(64),
            capacity=capacity,
            group=group,
            created_ns=time.time_ns(),
            epoch=1,
            tail_pos=0,
            tail_seq=first_seq,
        )
        # Build under a temporary name and link() it in: a crash leaves no journal or a
        # complete one, and link() refuses to replace a file that appeared meanwhile.
        tmp = os.path.join(directory, f".{os.path.basename(path)}.creating-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise _io_error(e, f"create {tmp}") from e
        try:
            os.ftruncate(fd, RING_OFFSET + capacity)
            slot = encode_header(header)
            for off in SLOT_OFFSETS:
                _pwrite_all(fd, slot, off)
            os.fsync(fd)
            try:
                os.link(tmp, path)
            except FileExistsError as e:
                raise AlreadyExists(f"journal {path} already exists") from e
        except OSError as e:
            raise _io_error(e, f"create {path}") from e
        finally:
            os.close(fd)
            os.unlink(tmp)
        fsync_dir(directory)
        return cls.open(path)

    @classmethod
    def open(cls, path: str) -> Journal:
        """Open and recover: choose the header, rebuild the index by following the chain from
        the tail, bump the epoch (durably, repairing a bad slot).

        :class:`JournalCorrupt` (the file left untouched) when a damaged record is followed
        by later records it is vouched for; :class:`HeaderCorrupt` naming the file when
        neither header slot is valid."""
        fd = _open_locked(path)
        try:
            slots = [os.pread(fd, SLOT_SIZE, off) for off in SLOT_OFFSETS]
            header, notes, order = _read_header(path, fd, slots)
            j = cls(path, fd, header)
            j._slot_order = order
            rec = recover(
                lambda off, n: os.pread(fd, n, RING_OFFSET + off),
                header,
                same_boot=_same_boot(header),
                path=path,
            )
            if rec.salvage is not None:
                raise JournalCorrupt(rec.salvage)
            j._load(rec)
            # One sync makes what recovery saw durable (page cache left by a killed process),
            # then the new epoch goes to both slots before anything can be appended.
            os.fdatasync(fd)
            j._synced = j._durable
            epoch = header.epoch + 1
            tail_epoch = j._index[j._first_seq].epoch if j._index else epoch
            j._commit_header(
                replace(header, epoch=epoch, tail_epoch=tail_epoch, boot_id=_boot_id())
            )
            j.repaired = notes
            return j
        except OSError as e:
            os.close(fd)
            raise _io_error(e, f"open {path}") from e
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def reset(cls, path: str, next_seq: int | None = None) -> int:
        """Rewrite the (closed) journal at ``path`` empty, so that its next entry gets
        ``next_seq``; return that seq.  Every entry in it is dropped: fold the salvage of
        :class:`JournalCorrupt` first.

        ``next_seq`` defaults to one past the highest seq the file names anywhere (header or
        any record of it), and may not be lower than that: one group's sequence space never
        goes backwards.  A caller that knows of higher seqs (a peer that received some)
        passes a higher one.  The new header gets a new journal id and epoch, so no old
        record can ever be read as one of the new journal's; it goes to both slots in turn
        (damaged or stale slot first, each synced), so a crash at any point leaves either
        the old journal or the empty one.  The applied mark becomes ``next_seq - 1``."""
        fd = _open_locked(path)
        try:
            slots = [os.pread(fd, SLOT_SIZE, off) for off in SLOT_OFFSETS]
            header, _notes, order = _read_header(path, fd, slots)
            floor = highest_seq(lambda off, n: os.pread(fd, n, RING_OFFSET + off), header) + 1
            if next_seq is None:
                next_seq = floor
            if not floor <= next_seq < _U64 // 2:
                raise IllegalState(
                    f"journal {path}: cannot continue at seq {next_seq}; seqs up to "
                    f"{floor - 1} were used already"
                )
            jid = secrets.randbits(64)
            while jid == header.journal_id:
                jid = secrets.randbits(64)
            epoch = header.epoch + 1
            new = replace(
                header,
                journal_id=jid,
                generation=header.generation + 1,
                epoch=epoch,
                tail_pos=0,
                tail_seq=next_seq,
                applied_seq=next_seq - 1,
                tail_epoch=epoch,
                synced_seq=next_seq - 1,
                boot_id=_boot_id(),
            )
            slot = encode_header(new)
            for i in order:
                _pwrite_all(fd, slot, SLOT_OFFSETS[i])
                os.fdatasync(fd)
            return next_seq
        except OSError as e:
            raise _io_error(e, f"reset {path}") from e
        finally:
            os.close(fd)

    def _load(self, rec: Recovery) -> None:
        """Build the index from the recovered chain."""
        h = self._hdr
        seq = h.tail_seq
        for start, p in rec.chain:
            rh = p.head
            self._index[seq] = _Slot(
                start,
                p.pos,
                p.end,
                rh.stream,
                EntryKind(rh.kind),
                rh.offset,
                rh.length,
                rh.fua,
                rh.stamp_ns,
                rh.epoch,
            )
            seq += 1
        self._head = max(rec.head, h.tail_pos)
        self._next_seq = seq
        self._durable = seq - 1

    # -- header -----------------------------------------------------------------------------

    def _write_header(self) -> None:
        """One slot, sync, the other, sync (caller holds _meta_lock or is single-threaded).
        The first sync also makes every record written before it durable: later records and
        headers vouch for them (``synced_seq``)."""
        slot = encode_header(self._hdr)
        with self._lock:
            written = self._written_upto()
        try:
            for n, i in enumerate(self._slot_order):
                _pwrite_all(self.fd, slot, SLOT_OFFSETS[i])
                os.fdatasync(self.fd)
                if n == 0:
                    with self._cond:
                        self._synced = max(self._synced, written)
                        self._cond.notify_all()
        except OSError as e:
            raise _io_error(e, "header write") from e
        self._slot_order = (0, 1)

    def _commit_header(self, new: JournalHeader) -> None:
        """Make ``new`` (generation bumped here, and the synced mark) the durable header."""
        with self._lock:
            synced = self._synced
        self._hdr = replace(new, generation=self._hdr.generation + 1, synced_seq=synced)
        self._write_header()

    # -- writing ----------------------------------------------------------------------------

    @property
    def max_entry_bytes(self) -> int:
        """The largest data an entry can carry: its record must fit in half the ring, so an
        empty journal accepts it wherever the head happens to be."""
        return (self.capacity // 2) // RECORD_ALIGN * RECORD_ALIGN - REC_HEADER_LEN

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"journal {self.path} is closed")
        if self._failed is not None:
            raise VolumeError(
                f"journal {self.path} is broken by an earlier I/O error ({self._failed}); "
                "reopen it",
                self._failed.errno,
            )

    def append(
        self,
        stream: int,
        kind: EntryKind,
        offset: int,
        data: bytes | memoryview = b"",
        *,
        length: int | None = None,
        fua: bool = False,
        stamp_ns: int | None = None,
        seq: int | None = None,
    ) -> int:
        """Append one entry; return its seq once it (and every earlier entry) is durable.

        ``seq=None`` takes the next seq; an explicit ``seq`` must be exactly the next one.
        :class:`JournalFull` if it does not fit (raised at once; nothing changed)."""
        try:
            kind = EntryKind(kind)
        except ValueError as e:
            raise UsageError(f"journal entry kind {kind!r} is unknown") from e
        if kind is EntryKind.WRITE:
            if length is not None and length != len(data):
                raise UsageError(f"WRITE length {length} is not len(data) {len(data)}")
            length = len(data)
        else:
            if len(data):
                raise UsageError(f"{kind.name} entries carry no data")
            if length is None:
                raise UsageError(f"{kind.name} entries need a length")
        if not 0 <= stream < _U32:
            raise UsageError(f"stream {stream} is not a u32")
        if not 0 <= offset < _U64 or not 0 <= length < _U64 - offset:
            raise UsageError(f"range ({offset}, {length}) is out of range")
        if stamp_ns is None:
            stamp_ns = time.time_ns()
        dlen = len(data)
        size = record_size(dlen)
        data_crc = crc32c.crc32c(data)  # outside the lock: the data is the big part
        cap = self.capacity
        with self._lock:
            self._check_open()
            if seq is not None and seq != self._next_seq:
                raise IllegalState(
                    f"journal {self.group}: seq {seq} is not the next one ({self._next_seq})"
                )
            if dlen > self.max_entry_bytes:
                raise JournalFull(
                    f"journal {self.group}: an entry of {dlen} bytes exceeds the largest this "
                    f"journal holds ({self.max_entry_bytes})"
                )
            start = self._head
            ring = start % cap
            pos = start if ring + size <= cap else start + (cap - ring)
            end = pos + size
            if end - self._tail > cap:
                raise JournalFull(
                    f"journal {self.group} is full: {size} bytes needed, "
                    f"{cap - (self._head - self._tail)} of {cap} free"
                )
            written = self._written_upto()  # vouched for by this record (module docstring)
            synced = self._synced
            my_seq = self._next_seq
            self._next_seq += 1
            self._head = end
            self._inflight.add(my_seq)
            epoch = self._hdr.epoch
            self._index[my_seq] = _Slot(
                start, pos, end, stream, kind, offset, length, fua, stamp_ns, epoch
            )
        jid = self.journal_id
        try:
            if pos != start:
                marker = encode_record(
                    journal_id=jid,
                    epoch=epoch,
                    seq=my_seq,
                    kind=_KIND_WRAP,
                    written_seq=written,
                    synced_seq=synced,
                )
                _pwrite_all(self.fd, marker, RING_OFFSET + ring)
            rec = encode_record(
                journal_id=jid,
                epoch=epoch,
                seq=my_seq,
                kind=kind,
                stream=stream,
                offset=offset,
                length=length,
                data=data,
                fua=fua,
                stamp_ns=stamp_ns,
                data_crc=data_crc,
                written_seq=written,
                synced_seq=synced,
            )
            _pwrite_all(self.fd, rec, RING_OFFSET + pos % cap)
        except OSError as e:
            err = _io_error(e, f"write of seq {my_seq}")
            with self._cond:
                # The seq stays in flight for ever: nothing after it may become durable.
                self._failed = err
                self._cond.notify_all()
            raise err from e
        with self._cond:
            self._inflight.discard(my_seq)
            self._cond.notify_all()
            self._wait_durable(my_seq)
            self.appends += 1
        return my_seq

    def _written_upto(self) -> int:
        return min(self._inflight) - 1 if self._inflight else self._next_seq - 1

    def sync(self) -> None:
        """Make every entry appended so far durable (one fdatasync, shared)."""
        with self._cond:
            self._check_open()
            target = self._written_upto()
            self._synced_wait(target)

    def _flush(self) -> None:
        """With _cond held and no flush running: one fdatasync covering every record written
        so far, the lock released meanwhile (group commit: the others wait on _cond)."""
        target = self._written_upto()
        self._flushing = True
        self._cond.release()
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            err = _io_error(e, "fdatasync")
            self._cond.acquire()
            self._failed = err
            self._flushing = False
            self._cond.notify_all()
            raise err from e
        self._cond.acquire()
        self.data_syncs += 1
        self._durable = max(self._durable, target)
        self._synced = max(self._synced, target)
        self._flushing = False
        self._cond.notify_all()

    def _synced_wait(self, seq: int) -> None:
        """With _cond held: an fdatasync covering ``seq`` has completed."""
        while self._synced < seq:
            if self._failed is not None:
                self._check_open()
            if not self._flushing:
                self._flush()
            else:
                self._cond.wait()

    def _wait_durable(self, seq: int) -> None:
        """With _cond held: become the flusher or wait for one, until ``seq`` is durable."""
        if not self.sync_appends:
            while self._written_upto() < seq:  # never ahead of an earlier, torn, record
                if self._failed is not None:
                    self._check_open()
                self._cond.wait()
            self._durable = max(self._durable, self._written_upto())
            return
        while self._durable < seq:
            if self._failed is not None:
                self._check_open()
            if not self._flushing and self._written_upto() > self._durable:
                self._flush()
            else:
                self._cond.wait()

    def release(self, upto_seq: int) -> None:
        """Drop the entries <= ``upto_seq``; the new tail is durable before their space is
        free.  Releasing what is already released is a no-op."""
        with self._meta_lock:
            self._release(upto_seq)

    def _release(self, upto_seq: int) -> None:
        with self._lock:
            self._check_open()
            if upto_seq > self._durable:
                raise IllegalState(
                    f"journal {self.group}: cannot release up to {upto_seq}; "
                    f"the newest durable entry is {self._durable}"
                )
            if upto_seq < self._first_seq:
                return
            nxt = self._index.get(upto_seq + 1)
            tail = nxt.start if nxt is not None else self._head
            # A record found at the new tail later must be the one the index holds, or one
            # appended from now on: never one a recovery discarded (module docstring).
            tail_epoch = nxt.epoch if nxt is not None else self._hdr.epoch
        self._commit_header(
            replace(self._hdr, tail_pos=tail, tail_seq=upto_seq + 1, tail_epoch=tail_epoch)
        )
        with self._lock:
            for s in range(self._first_seq, upto_seq + 1):
                del self._index[s]
            self._first_seq = upto_seq + 1
            self._tail = tail

    def set_applied(self, seq: int) -> None:
        """Durably record that the entries <= ``seq`` are applied (never decreases)."""
        with self._meta_lock:
            with self._lock:
                self._check_open()
                if seq > self._durable:
                    raise IllegalState(
                        f"journal {self.group}: applied seq {seq} is past the newest entry "
                        f"{self._durable}"
                    )
                if seq < self._applied:
                    raise IllegalState(
                        f"journal {self.group}: applied seq {seq} is behind {self._applied}"
                    )
                if seq == self._applied:
                    return
            self._commit_header(replace(self._hdr, applied_seq=seq))
            with self._lock:
                self._applied = seq

    def drop_all(self) -> list[Entry]:
        """Release every durable entry and return them (WRITE entries without their data: the
        caller folds stream/offset/length into its bitmap).  Durable before it returns."""
        with self._meta_lock:
            with self._lock:
                self._check_open()
                dropped = [
                    self._entry(s, self._index[s], b"")
                    for s in range(self._first_seq, self._durable + 1)
                ]
                upto = self._durable
            if dropped:
                self._release(upto)
        return dropped

    # -- reading ----------------------------------------------------------------------------

    @staticmethod
    def _entry(seq: int, slot: _Slot, data: bytes) -> Entry:
        return Entry(
            seq, slot.stream, slot.kind, slot.offset, slot.length, data, slot.fua, slot.stamp_ns
        )

    def entries(self, from_seq: int, max_bytes: int | None = None) -> Iterator[Entry]:
        """The retained entries from ``from_seq`` up to the newest durable one at the time of
        the call, in order.  :class:`NotFound` if ``from_seq`` is already released.  With
        ``max_bytes``, stops before the data would exceed it (but yields at least one)."""
        with self._lock:
            self._check_open()
            if from_seq < self._first_seq:
                raise NotFound(
                    f"journal {self.group}: seq {from_seq} is released "
                    f"(oldest retained is {self._first_seq})"
                )
            last = self._durable
        return self._iter(from_seq, last, max_bytes)

    def _iter(self, first: int, last: int, max_bytes: int | None) -> Iterator[Entry]:
        total = 0
        for seq in range(first, last + 1):
            with self._lock:
                self._check_open()
                slot = self._index.get(seq)
            if slot is None:
                raise NotFound(f"journal {self.group}: seq {seq} was released while reading")
            if slot.kind is EntryKind.WRITE:
                if max_bytes is not None and seq > first and total + slot.length > max_bytes:
                    return
                total += slot.length
                data = self._read_data(seq, slot)
            else:
                data = b""
            yield self._entry(seq, slot, data)

    def _read_data(self, seq: int, slot: _Slot) -> bytes:
        ring = slot.pos % self.capacity
        n = REC_HEADER_LEN + slot.length
        try:
            raw = os.pread(self.fd, n, RING_OFFSET + ring)
        except OSError as e:
            raise _io_error(e, f"read of seq {seq}") from e
        data = raw[REC_HEADER_LEN:]
        try:
            rh: RecordHead | None = decode_record_head(raw)
        except BadRecord:
            rh = None
        if (
            rh is not None
            and rh.seq == seq
            and len(data) == slot.length
            and crc32c.crc32c(data) == rh.data_crc
        ):
            return data
        with self._lock:
            if seq < self._first_seq:
                raise NotFound(f"journal {self.group}: seq {seq} was released while reading")
        raise VolumeError(f"journal {self.group}: record of seq {seq} is damaged on disk")

    # -- state ------------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        return self._first_seq

    @property
    def last_seq(self) -> int:
        """The newest durable seq (0 if nothing was ever appended); survives release."""
        return self._durable

    @property
    def next_seq(self) -> int:
        """The seq the next append gets (an explicit ``seq=`` must equal it)."""
        return self._next_seq

    @property
    def applied_seq(self) -> int:
        return self._applied

    @property
    def epoch(self) -> int:
        return self._hdr.epoch

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._head - self._tail

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    @property
    def count(self) -> int:
        """Retained durable entries."""
        return self._durable - self._first_seq + 1

    def usage(self) -> float:
        return self.used_bytes / self.capacity

    @property
    def oldest_stamp_ns(self) -> int | None:
        with self._lock:
            s = self._index.get(self._first_seq)
            return s.stamp_ns if s is not None and self._first_seq <= self._durable else None

    @property
    def newest_stamp_ns(self) -> int | None:
        with self._lock:
            if self._durable < self._first_seq:
                return None
            return self._index[self._durable].stamp_ns

    def close(self) -> None:
        """Wait for appends in progress, then close.  Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            # Every reserved entry must finish (its appender flushes it) before the fd goes.
            while self._durable < self._next_seq - 1 and self._failed is None:
                self._cond.wait()
            while self._flushing:
                self._cond.wait()
            self._cond.notify_all()
            os.close(self.fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_locked(path: str) -> int:
    """Open a journal file read-write with its exclusive lock (released by closing)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise NotFound(f"journal {path} does not exist") from e
    except IsADirectoryError as e:
        raise UsageError(f"journal path {path} is a directory") from e
    except OSError as e:
        raise _io_error(e, f"open {path}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise IllegalState(f"journal {path} is open elsewhere") from e
    except OSError as e:
        os.close(fd)
        raise _io_error(e, f"lock {path}") from e
    return fd


def _read_header(
    path: str, fd: int, slots: list[bytes]
) -> tuple[JournalHeader, list[str], tuple[int, int]]:
    """The header, what is wrong with the slots, and the order to rewrite them in (the bad
    slot first).  :class:`HeaderCorrupt` naming the file if no slot is valid."""
    try:
        header, notes = choose_header(slots[0], slots[1])
    except HeaderCorrupt as e:
        raise HeaderCorrupt(f"journal {path}: {e}") from e
    size = os.fstat(fd).st_size
    if size < RING_OFFSET + header.capacity:
        raise HeaderCorrupt(
            f"journal {path} is {size} bytes; its header needs {RING_OFFSET + header.capacity}"
        )
    return header, notes, ((1, 0) if notes and notes[0].startswith("slot B") else (0, 1))


def _boot_id() -> bytes:
    """This boot's id (Linux), or zeros when unknown (then no boot counts as the same)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)


def _same_boot(h: JournalHeader) -> bool:
    return h.boot_id != bytes(16) and h.boot_id == _boot_id()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite returned {n}")
        view = view[n:]
        offset += n
