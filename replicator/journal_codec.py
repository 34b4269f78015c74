"""The journal's on-disk encoding: header slots and records (pure, no I/O).

docs/format.md ("Journal file") documents every byte.  Each decoder takes any bytes and either
returns a value or raises its one error: :class:`~replicator.errors.HeaderCorrupt` for a
header slot, :class:`BadRecord` for a record header (tests/test_journal_codec.py fuzzes both).
Whether a valid record is the *right* one (its seq, epoch and position in the ring) is
recovery's business (:mod:`replicator.journal_recovery`).

The header slots are two-slot records of :mod:`replicator.record_codec` (docs/format.md,
"Two-slot records"): it frames, checks and chooses them; this module lays out the header's
fields and keeps its own wording of what is wrong.  :func:`choose_header_slots` returns the
codec's choice, whose ``rc.next_write`` is the order to rewrite the slots in.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, ParamSpec

import crc32c

from replicator import record_codec as rc
from replicator.errors import HeaderCorrupt, UsageError

_P = ParamSpec("_P")  # the arguments of encode_record_parts, for encode_record

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

# After record_codec's prefix (magic, major, minor, header_len, generation): journal_id,
# capacity, ring_offset, record_align, epoch, tail_pos, tail_seq, applied_seq, created_ns,
# tail_epoch, group, synced_seq, boot_id, reserved; then the CRC.
_HDR = struct.Struct("<QQQIIQQQqI64sQ16s72s")
_CRC = struct.Struct("<I")
HEADER_LEN = rc.OVERHEAD + _HDR.size
assert HEADER_LEN == 256
_HEADER_CODEC = rc.SlotCodec(
    MAGIC,
    FORMAT_MAJOR,
    SLOT_SIZE,
    minor=FORMAT_MINOR,
    payload_size=_HDR.size,
    name="journal header",
)
#: The wording of each damage, as the journal has always said it.
_DAMAGE_TEXTS: dict[rc.Damage, str] = {
    rc.Damage.TRUNCATED: "journal header slot is truncated ({found} bytes)",
    rc.Damage.BLANK: "journal header slot is blank (all zero)",
    rc.Damage.BAD_MAGIC: "bad magic: not a pairvol journal header",
    rc.Damage.BAD_VERSION: "unsupported journal format version {found} (this is {expected})",
    rc.Damage.BAD_LENGTH: "journal header length {found} is not {expected}",
    rc.Damage.BAD_CRC: "bad CRC32C (stored {found:08x}, computed {expected:08x})",
    rc.Damage.REJECTED: "{detail}",
}

REC_MAGIC = b"PVJE"
# magic, kind, flags, header_len, seq, journal_id, offset, length, stamp_ns, stream, epoch,
# data_len, data_crc, written_seq, synced_seq, reserved (then the CRC32C of these 92 bytes)
_REC = struct.Struct("<4sBBHQQQQqIIIIQQ12s")
REC_HEADER_LEN = _REC.size + _CRC.size
assert REC_HEADER_LEN == 96
_EMPTY_CRC = crc32c.crc32c(b"")

FLAG_FUA = 0x01
KIND_WRAP = 0xFF  # the kind of a wrap marker
_U32 = 1 << 32
_U64 = 1 << 64


class EntryKind(enum.IntEnum):
    WRITE = 1
    ZERO = 2  # zero the range; the volume must not punch holes (may_trim false)
    TRIM = 3  # zero the range; holes may be punched


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    stream: int
    kind: EntryKind
    offset: int
    length: int
    data: bytes | memoryview  # empty for ZERO/TRIM, and for WRITE in drop_all's result
    fua: bool = False
    stamp_ns: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.seq < _U64:
            raise UsageError(f"journal seq {self.seq} is out of range")
        if not 0 <= self.stream < _U32:
            raise UsageError(f"journal stream {self.stream} is not a u32")
        if not 0 <= self.offset < _U64 or not 0 <= self.length < _U64:
            raise UsageError(f"journal range ({self.offset}, {self.length}) is out of range")


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
    return _HEADER_CODEC.encode(h.generation, body)


def _journal_header(slot: rc.Slot[bytes]) -> JournalHeader:
    """The header in an intact slot, or :class:`HeaderCorrupt` for a field that is wrong."""
    generation = slot.generation
    (
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
    ) = _HDR.unpack(slot.value)
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


def decode_header(slot: bytes) -> JournalHeader:
    """Decode one slot or raise :class:`HeaderCorrupt` saying why."""
    got = _HEADER_CODEC.decode(slot)
    if isinstance(got, rc.SlotProblem):
        raise HeaderCorrupt(got.describe(_DAMAGE_TEXTS))
    return _journal_header(got)


def _decode_header_slot(slot: bytes) -> rc.Decoded[JournalHeader]:
    got = _HEADER_CODEC.decode(slot)
    if isinstance(got, rc.SlotProblem):
        return got
    try:
        return got.with_value(_journal_header(got))
    except HeaderCorrupt as e:
        return rc.SlotProblem.rejected(str(e))


def choose_header_slots(slot_a: bytes, slot_b: bytes) -> rc.Choice[JournalHeader]:
    """record_codec's choice between the two header slots (``rc.next_write`` of it is the
    order to rewrite them in); :class:`HeaderCorrupt` when neither is valid."""
    picked = rc.choose(_decode_header_slot(slot_a), _decode_header_slot(slot_b))
    if isinstance(picked, rc.NoValidSlot):
        raise HeaderCorrupt(f"no valid journal header slot ({picked.describe(_DAMAGE_TEXTS)})")
    return picked


def header_notes(choice: rc.Choice[JournalHeader]) -> list[str]:
    """A note per slot that is not equal to the chosen header (damaged or stale)."""
    best = choice.generation
    notes = []
    for name, v in zip("AB", choice.verdicts, strict=True):
        if v.status is rc.Status.DAMAGED:
            notes.append(f"slot {name} damaged: {v.reason(best, _DAMAGE_TEXTS)}")
        elif v.status is not rc.Status.OK:
            # STALE, and CONFLICT too (equal generation, other content), as it always was
            notes.append(f"slot {name} stale (generation {v.generation} < {best})")
    return notes


def choose_header(slot_a: bytes, slot_b: bytes) -> tuple[JournalHeader, list[str]]:
    """The valid slot with the highest generation, and a note per slot that is not equal to
    it (damaged or stale).  Both slots invalid is :class:`HeaderCorrupt`."""
    choice = choose_header_slots(slot_a, slot_b)
    return choice.value, header_notes(choice)


def record_size(data_len: int) -> int:
    """Bytes a record with ``data_len`` bytes of data occupies in the ring."""
    return -(-(REC_HEADER_LEN + data_len) // RECORD_ALIGN) * RECORD_ALIGN


def encode_record_parts(
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
) -> tuple[bytes, bytes | memoryview, bytes]:
    """A whole record, padded, as its header, its data (``data`` itself, not a copy) and its
    padding, for one ``pwritev``.  ``length`` defaults to ``len(data)``; ``data_crc``
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
    return head + _CRC.pack(crc32c.crc32c(head)), data, bytes(pad)


def _joined(parts: Callable[_P, tuple[bytes, bytes | memoryview, bytes]]) -> Callable[_P, bytes]:
    def joined(*args: _P.args, **kwargs: _P.kwargs) -> bytes:
        return b"".join(parts(*args, **kwargs))

    return joined


#: A whole record, padded, in one buffer: :func:`encode_record_parts` (same arguments) joined.
encode_record = _joined(encode_record_parts)


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
        return self.kind == KIND_WRAP


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
    if kind == KIND_WRAP:
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


def check_entry(
    stream: int, kind: int, offset: int, data_len: int, length: int | None
) -> tuple[EntryKind, int]:
    """The kind and length of an entry to append, or :class:`UsageError` saying what is
    wrong.  WRITE carries its data (``length`` defaults to it); ZERO and TRIM carry none and
    need a length."""
    try:
        kind = EntryKind(kind)
    except ValueError as e:
        raise UsageError(f"journal entry kind {kind!r} is unknown") from e
    if kind is EntryKind.WRITE:
        if length is not None and length != data_len:
            raise UsageError(f"WRITE length {length} is not len(data) {data_len}")
        length = data_len
    else:
        if data_len:
            raise UsageError(f"{kind.name} entries carry no data")
        if length is None:
            raise UsageError(f"{kind.name} entries need a length")
    if not 0 <= stream < _U32:
        raise UsageError(f"stream {stream} is not a u32")
    if not 0 <= offset < _U64 or not 0 <= length < _U64 - offset:
        raise UsageError(f"range ({offset}, {length}) is out of range")
    return kind, length


def max_entry_bytes(capacity: int) -> int:
    """The largest data an entry can carry: its record must fit in half the ring, so an
    empty journal accepts it wherever the head happens to be."""
    return (capacity // 2) // RECORD_ALIGN * RECORD_ALIGN - REC_HEADER_LEN


def place_record(head: int, size: int, capacity: int) -> int:
    """Where a record of ``size`` bytes goes when the head is at virtual ``head``: right
    there, or at the start of the next lap when it would straddle the ring's end (a wrap
    marker then fills the place at ``head``)."""
    ring = head % capacity
    return head if ring + size <= capacity else head + (capacity - ring)


def record_data(raw: bytes, seq: int, length: int) -> memoryview | None:
    """The data of the record at the start of ``raw`` (header and data, nothing more) if it
    is intact and is ``seq``'s; None otherwise.  A view of ``raw``: no copy of the data."""
    try:
        rh = decode_record_head(raw)
    except BadRecord:
        return None
    data = memoryview(raw)[REC_HEADER_LEN:]
    if rh.seq != seq or len(data) != length or crc32c.crc32c(data) != rh.data_crc:
        return None
    return data
