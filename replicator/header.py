"""The volume header: a pure codec, no file I/O (docs/format.md documents every byte).

Theory of operation.  A volume image starts with two 4 KiB header *slots* holding the same
:class:`Header`.  Each slot has a magic, a format version, a generation counter and a CRC32C.
An update writes slot A, syncs, then writes slot B, syncs.  A torn or interrupted update
therefore damages at most one slot, and :func:`choose` picks the valid slot with the highest
generation and says what is wrong with the other, so the caller can report and repair it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field, replace
from uuid import UUID

import crc32c

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

# magic, major, minor, header_len, generation, pvid, prev_pvid, uuid, data_offset, data_size,
# meta_offset, meta_size, block_size, role, flags, created_ns, name, pair, reserved
_BODY = struct.Struct("<8sHHIQQQ16sQQQQIHHq64s64s20s")
_CRC = struct.Struct("<I")
HEADER_LEN = _BODY.size + _CRC.size
assert HEADER_LEN == 256


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
    body = _BODY.pack(
        MAGIC,
        FORMAT_MAJOR,
        FORMAT_MINOR,
        HEADER_LEN,
        h.generation,
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
    crc = crc32c.crc32c(body)
    return (body + _CRC.pack(crc)).ljust(SLOT_SIZE, b"\x00")


def _cstr(raw: bytes, what: str) -> str:
    text, _, rest = raw.partition(b"\x00")
    if rest.strip(b"\x00"):
        raise HeaderCorrupt(f"{what} field has bytes after its terminator")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderCorrupt(f"{what} field is not UTF-8") from e


def decode(slot: bytes) -> Header:
    """Decode one slot or raise :class:`HeaderCorrupt` with the specific reason."""
    if len(slot) < HEADER_LEN:
        raise HeaderCorrupt(f"slot is truncated ({len(slot)} of {HEADER_LEN} bytes)")
    if slot[:8] != MAGIC:
        if not slot[:HEADER_LEN].strip(b"\x00"):
            raise HeaderCorrupt("slot is blank (all zero)")
        raise HeaderCorrupt("bad magic: not a pairvol volume header")
    fields = _BODY.unpack_from(slot)
    (
        _magic,
        major,
        _minor,
        header_len,
        generation,
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
    ) = fields
    if major != FORMAT_MAJOR:
        raise HeaderCorrupt(f"unsupported header format version {major} (this is {FORMAT_MAJOR})")
    if header_len != HEADER_LEN:
        raise HeaderCorrupt(f"header length {header_len} is not {HEADER_LEN}")
    (stored_crc,) = _CRC.unpack_from(slot, _BODY.size)
    actual_crc = crc32c.crc32c(slot[: _BODY.size])
    if stored_crc != actual_crc:
        raise HeaderCorrupt(f"bad CRC32C (stored {stored_crc:08x}, computed {actual_crc:08x})")
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
        generation=generation,
        role=role_v,
        pair=_cstr(pair_raw, "pair"),
        prev_pvid=prev_pvid,
        data_offset=data_offset,
        meta_offset=meta_offset,
        meta_size=meta_size,
    )


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

    @property
    def healthy(self) -> bool:
        return all(s.status == "ok" for s in self.slots)

    @property
    def bad_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.status != "ok"]

    def describe(self) -> str:
        if self.healthy:
            return "ok"
        parts = []
        for i in self.bad_slots:
            s = self.slots[i]
            parts.append(f"slot {'AB'[i]} {s.status}: {s.reason}")
        return "degraded (" + "; ".join(parts) + ")"


def choose(slot_a: bytes, slot_b: bytes) -> Choice:
    """Pick the newest valid slot; report the other as ok, stale or damaged."""
    decoded: list[Header | None] = []
    errors: list[str] = []
    for raw in (slot_a, slot_b):
        try:
            decoded.append(decode(raw))
            errors.append("")
        except HeaderCorrupt as e:
            decoded.append(None)
            errors.append(str(e))
    valid = [h for h in decoded if h is not None]
    if not valid:
        raise HeaderCorrupt(f"no valid header slot (slot A: {errors[0]}; slot B: {errors[1]})")
    best = max(valid, key=lambda h: h.generation)
    states = []
    for h, err in zip(decoded, errors, strict=True):
        if h is None:
            states.append(SlotState("damaged", err))
        elif h == best:
            states.append(SlotState("ok", generation=h.generation))
        elif h.generation < best.generation:
            states.append(
                SlotState(
                    "stale",
                    f"generation {h.generation} behind {best.generation} (interrupted update)",
                    h.generation,
                )
            )
        else:
            # Same generation, different content: only possible by tampering; trust slot A.
            states.append(SlotState("damaged", "differs from the other slot at equal generation"))
    return Choice(best, (states[0], states[1]))
