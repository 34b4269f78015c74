"""The volume header: a pure codec, no file I/O (docs/format.md documents every byte).

Theory of operation.  A volume image starts with two 4 KiB header *slots* holding the same
:class:`Header`.  Each slot is a two-slot record of :mod:`replicator.record_codec` (magic,
format version, length, generation, the fixed 228-byte body, CRC32C): that module frames,
checks and chooses; this one lays out the body and says in its own words what is wrong.
An update writes slot A, syncs, then writes slot B, syncs, once a read-write open has
repaired a bad slot (:attr:`Choice.write_plan` is the order that is safe without a repair
too: the bad slot first).  A torn or interrupted update therefore damages at most one slot,
and :func:`choose` picks the valid slot with the highest generation and says what is wrong
with the other, so the caller can report and repair it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field, replace
from uuid import UUID

from replicator import record_codec as rc
from replicator.errors import HeaderCorrupt, UsageError
from replicator.pvid import NO_PVID, format_pvid

MAGIC = b"PAIRVOL\x00"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0
SLOT_SIZE = 4096
SLOT_OFFSETS = (0, SLOT_SIZE)
META_OFFSET = 2 * SLOT_SIZE
DATA_ALIGN = 1 << 20
#: Persistent-bitmap slots reserved in the metadata region, each sized for the smallest chunk.
BITMAP_SLOTS = 8
MIN_CHUNK = 4096
NAME_MAX = 63
PAIR_MAX = 63

# After record_codec's prefix (magic, major, minor, header_len, generation): pvid, prev_pvid,
# uuid, data_offset, data_size, meta_offset, meta_size, block_size, role, flags, created_ns,
# name, pair, reserved; then the CRC.
_FIELDS = struct.Struct("<QQ16sQQQQIHHq64s64s20s")
HEADER_LEN = rc.OVERHEAD + _FIELDS.size
assert HEADER_LEN == 256
_CODEC = rc.SlotCodec(
    MAGIC,
    FORMAT_MAJOR,
    SLOT_SIZE,
    minor=FORMAT_MINOR,
    payload_size=_FIELDS.size,
    name="volume header",
)
#: The wording of each damage, as the header has always said it (repair notes quote it).
_DAMAGE_TEXTS: dict[rc.Damage, str] = {
    rc.Damage.TRUNCATED: "slot is truncated ({found} of {expected} bytes)",
    rc.Damage.BLANK: "slot is blank (all zero)",
    rc.Damage.BAD_MAGIC: "bad magic: not a pairvol volume header",
    rc.Damage.BAD_VERSION: "unsupported header format version {found} (this is {expected})",
    rc.Damage.BAD_LENGTH: "header length {found} is not {expected}",
    rc.Damage.BAD_CRC: "bad CRC32C (stored {found:08x}, computed {expected:08x})",
    rc.Damage.REJECTED: "{detail}",
}


class Role(enum.IntEnum):
    SIMPLEX = 0
    PRIMARY = 1
    SECONDARY = 2

    @property
    def label(self) -> str:
        return self.name.lower()


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def bitmap_bytes(data_size: int, chunk: int = MIN_CHUNK) -> int:
    """Bytes of one bitmap covering ``data_size`` at ``chunk`` granularity, page-rounded."""
    chunks = (data_size + chunk - 1) // chunk
    return _align_up((chunks + 7) // 8, 4096)


def layout_for(data_size: int) -> tuple[int, int, int]:
    """(meta_offset, meta_size, data_offset) for a new volume of ``data_size`` bytes."""
    meta_size = BITMAP_SLOTS * bitmap_bytes(data_size)
    data_offset = _align_up(META_OFFSET + meta_size, DATA_ALIGN)
    return META_OFFSET, meta_size, data_offset


def check_name(name: str, *, what: str = "volume name") -> str:
    """Names are export names and file names too: printable, no '/', '@' or whitespace, not
    ``.`` or ``..`` (a path, not a name), at most 63 bytes."""
    raw = name.encode("utf-8", "surrogatepass")
    if not name:
        raise UsageError(f"{what} is empty")
    if name in (".", ".."):
        raise UsageError(f"{what} {name!r} is not allowed: '.' and '..' name directories")
    if len(raw) > NAME_MAX:
        raise UsageError(f"{what} {name!r} is longer than {NAME_MAX} bytes")
    bad = [c for c in name if c in "/@\\" or c.isspace() or not c.isprintable()]
    if bad:
        raise UsageError(f"{what} {name!r} contains {bad[0]!r}; use letters, digits, '-', '_', '.'")
    return name


@dataclass(frozen=True, slots=True)
class Header:
    """PVID and VOL information (SPEC section 1) plus the image layout."""

    pvid: int
    uuid: UUID
    name: str
    data_size: int
    block_size: int
    created_ns: int
    generation: int = 1
    role: Role = Role.SIMPLEX
    pair: str = ""
    prev_pvid: int = NO_PVID
    data_offset: int = field(default=0)
    meta_offset: int = field(default=META_OFFSET)
    meta_size: int = field(default=0)

    def __post_init__(self) -> None:
        if not 0 < self.pvid < 1 << 64:
            raise HeaderCorrupt(f"header PVID {self.pvid:#x} is out of range")
        if not 0 <= self.prev_pvid < 1 << 64:
            raise HeaderCorrupt(f"header previous PVID {self.prev_pvid:#x} is out of range")
        bs = self.block_size
        if bs < 512 or bs > 65536 or bs & (bs - 1):
            raise HeaderCorrupt(f"block size {bs} is not a power of two between 512 and 64K")
        if self.data_size <= 0 or self.data_size % bs:
            raise HeaderCorrupt(
                f"data size {self.data_size} is not a positive multiple of the block size {bs}"
            )
        if self.meta_offset < META_OFFSET or self.meta_offset % 4096:
            raise HeaderCorrupt(f"metadata offset {self.meta_offset} is invalid")
        if self.data_offset % DATA_ALIGN or self.data_offset < self.meta_offset + self.meta_size:
            raise HeaderCorrupt(f"data offset {self.data_offset} is invalid")
        if len(self.pair.encode()) > PAIR_MAX:
            raise HeaderCorrupt(f"pair id {self.pair!r} is too long")
        if self.generation <= 0:
            raise HeaderCorrupt(f"generation {self.generation} is invalid")

    @classmethod
    def new(
        cls,
        *,
        pvid: int,
        name: str,
        data_size: int,
        block_size: int,
        created_ns: int,
        vol_uuid: UUID,
    ) -> Header:
        if block_size < 512 or block_size > 65536 or block_size & (block_size - 1):
            raise UsageError(f"block size {block_size} is not a power of two from 512 to 64K")
        if data_size % block_size:
            raise UsageError(f"size {data_size} is not a multiple of the block size {block_size}")
        meta_offset, meta_size, data_offset = layout_for(data_size)
        return cls(
            pvid=pvid,
            uuid=vol_uuid,
            name=check_name(name),
            data_size=data_size,
            block_size=block_size,
            created_ns=created_ns,
            data_offset=data_offset,
            meta_offset=meta_offset,
            meta_size=meta_size,
        )

    @property
    def pvid_hex(self) -> str:
        return format_pvid(self.pvid)

    @property
    def image_size(self) -> int:
        return self.data_offset + self.data_size

    def next(self, **changes: object) -> Header:
        """The same header with ``changes`` applied and the generation bumped."""
        return replace(self, generation=self.generation + 1, **changes)  # type: ignore[arg-type]


def encode(h: Header) -> bytes:
    """One slot's bytes: the 256-byte header followed by zeros up to SLOT_SIZE."""
    body = _FIELDS.pack(
        h.pvid,
        h.prev_pvid,
        h.uuid.bytes,
        h.data_offset,
        h.data_size,
        h.meta_offset,
        h.meta_size,
        h.block_size,
        int(h.role),
        0,
        h.created_ns,
        h.name.encode(),
        h.pair.encode(),
        b"",
    )
    return _CODEC.encode(h.generation, body)


def _cstr(raw: bytes, what: str) -> str:
    text, _, rest = raw.partition(b"\x00")
    if rest.strip(b"\x00"):
        raise HeaderCorrupt(f"{what} field has bytes after its terminator")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderCorrupt(f"{what} field is not UTF-8") from e


def _header(slot: rc.Slot[bytes]) -> Header:
    """The header in an intact slot, or :class:`HeaderCorrupt` for a field that is wrong."""
    (
        pvid,
        prev_pvid,
        uuid_bytes,
        data_offset,
        data_size,
        meta_offset,
        meta_size,
        block_size,
        role,
        _flags,
        created_ns,
        name_raw,
        pair_raw,
        _reserved,
    ) = _FIELDS.unpack(slot.value)
    try:
        role_v = Role(role)
    except ValueError as e:
        raise HeaderCorrupt(f"unknown role {role}") from e
    return Header(
        pvid=pvid,
        uuid=UUID(bytes=uuid_bytes),
        name=_cstr(name_raw, "name"),
        data_size=data_size,
        block_size=block_size,
        created_ns=created_ns,
        generation=slot.generation,
        role=role_v,
        pair=_cstr(pair_raw, "pair"),
        prev_pvid=prev_pvid,
        data_offset=data_offset,
        meta_offset=meta_offset,
        meta_size=meta_size,
    )


def decode(slot: bytes) -> Header:
    """Decode one slot or raise :class:`HeaderCorrupt` with the specific reason."""
    got = _CODEC.decode(slot)
    if isinstance(got, rc.SlotProblem):
        raise HeaderCorrupt(got.describe(_DAMAGE_TEXTS))
    return _header(got)


def _decode_slot(slot: bytes) -> rc.Decoded[Header]:
    got = _CODEC.decode(slot)
    if isinstance(got, rc.SlotProblem):
        return got
    try:
        return got.with_value(_header(got))
    except HeaderCorrupt as e:
        return rc.SlotProblem.rejected(str(e))


@dataclass(frozen=True, slots=True)
class SlotState:
    """What one slot holds: ``ok``, ``stale`` (valid, older generation) or ``damaged``."""

    status: str
    reason: str = ""
    generation: int = 0


@dataclass(frozen=True, slots=True)
class Choice:
    header: Header
    slots: tuple[SlotState, SlotState]
    #: record_codec's choice, which the two states above put in the header's words
    record: rc.Choice[Header] = field(repr=False, compare=False)

    @property
    def healthy(self) -> bool:
        return all(s.status == "ok" for s in self.slots)

    @property
    def bad_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.status != "ok"]

    @property
    def write_plan(self) -> rc.WritePlan:
        """The order in which to write the next generation: the bad slot first, so that a
        torn write never leaves only an older header behind."""
        return rc.next_write(self.record)

    def describe(self) -> str:
        if self.healthy:
            return "ok"
        parts = []
        for i in self.bad_slots:
            s = self.slots[i]
            parts.append(f"slot {'AB'[i]} {s.status}: {s.reason}")
        return "degraded (" + "; ".join(parts) + ")"


def _state(v: rc.Verdict, kept: int) -> SlotState:
    if v.status is rc.Status.OK:
        return SlotState("ok", generation=kept)
    if v.status is rc.Status.STALE:
        assert v.generation is not None
        return SlotState("stale", f"{v.reason(kept)} (interrupted update)", v.generation)
    # CONFLICT (same generation, different content) is only possible by tampering: the
    # header calls it damage, and trusts slot A.
    return SlotState("damaged", v.reason(kept, _DAMAGE_TEXTS))


def choose(slot_a: bytes, slot_b: bytes) -> Choice:
    """Pick the newest valid slot; report the other as ok, stale or damaged."""
    picked = rc.choose(_decode_slot(slot_a), _decode_slot(slot_b))
    if isinstance(picked, rc.NoValidSlot):
        raise HeaderCorrupt(f"no valid header slot ({picked.describe(_DAMAGE_TEXTS)})")
    kept = picked.generation
    return Choice(
        picked.value, (_state(picked.verdicts[0], kept), _state(picked.verdicts[1], kept)), picked
    )
