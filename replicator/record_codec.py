"""Two-slot records: one slot's framing, the choice between two slots, the order to rewrite
them in (pure, no I/O; docs/format.md, "Two-slot records", documents every byte).

Theory of operation.  A durable record (the volume header, the journal header, a pair
document, an agent's status flags) is kept twice, in two fixed-size *slots* A and B.  Each
slot image is::

    magic (8) | version u16 | minor u16 | length u32 | generation u64 | payload | CRC32C u32

then zeros up to the slot size.  ``length`` counts the bytes from the magic to the CRC, the
CRC included; the CRC covers everything before it; the padding is not covered and readers
ignore it.  A codec has either a fixed payload size (the headers: every byte has its place)
or a variable one (a JSON document of up to ``slot_size - 28`` bytes).

* :meth:`SlotCodec.decode` takes any bytes and returns a :class:`Slot` or a
  :class:`SlotProblem` that says why the slot is damaged; it raises nothing for bad input.
* :func:`choose` takes the two decoded slots: the valid one with the higher generation wins
  (slot A on a tie), and the other is :attr:`Status.OK` (the same record),
  :attr:`Status.STALE` (an older generation: an update was interrupted),
  :attr:`Status.DAMAGED` or :attr:`Status.CONFLICT` (valid, same generation, different
  content: a bug or tampering).  Neither slot valid is a :class:`NoValidSlot` value.
* :func:`next_write` says how to write the next generation: both slots, one after the other,
  each followed by a sync, the slot that is *not* the good one first.  A write torn by a crash
  then damages only the slot being written, and the other one still holds the newest
  generation that was there before (written first, the good slot could be torn while the
  other one holds something older: the record would go back in time).

Only misuse raises, and only :class:`RecordCodecError`: a magic that is not 8 bytes, a
generation out of range, a payload of the wrong size.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import crc32c

from replicator.errors import UsageError

# magic, version (major), minor, length (prefix + payload + CRC), generation
_PREFIX = struct.Struct("<8sHHIQ")
_CRC = struct.Struct("<I")
PREFIX_SIZE = _PREFIX.size
#: Bytes of framing around the payload: the prefix and the CRC.
OVERHEAD = _PREFIX.size + _CRC.size
assert (PREFIX_SIZE, OVERHEAD) == (24, 28)
MAGIC_SIZE = 8
_U16 = 1 << 16
_U64 = 1 << 64

T = TypeVar("T")
U = TypeVar("U")


class RecordCodecError(UsageError):
    """A two-slot codec was misused (a programming error); bad slot bytes never raise."""


class Damage(enum.Enum):
    """Why a slot is not valid, in the order :meth:`SlotCodec.decode` checks."""

    TRUNCATED = "truncated"  # fewer bytes than the record needs
    BLANK = "blank"  # all zero where the record should be (never written)
    BAD_MAGIC = "bad magic"
    BAD_VERSION = "bad version"  # another major version
    BAD_LENGTH = "bad length"
    BAD_CRC = "bad CRC32C"
    REJECTED = "rejected"  # framing intact, but the caller's payload decoder refused it


@dataclass(frozen=True, slots=True)
class SlotProblem:
    """A damaged slot.  ``found`` and ``expected`` depend on ``kind``: bytes given and needed
    (TRUNCATED), the version found and ours (BAD_VERSION), the length found and the one
    required, or the slot size when the payload size varies (BAD_LENGTH), the stored and the
    computed CRC (BAD_CRC).  ``detail`` is one line saying all that."""

    kind: Damage
    detail: str
    found: int = 0
    expected: int = 0

    @classmethod
    def rejected(cls, reason: str) -> SlotProblem:
        """The caller's payload decoder refused an intact slot for ``reason``."""
        return cls(Damage.REJECTED, reason)

    def describe(self, texts: Mapping[Damage, str] | None = None) -> str:
        """``detail``, or the caller's own wording: ``texts[kind]`` formatted with ``found``,
        ``expected`` and ``detail`` (a caller whose messages predate this module keeps them)."""
        if texts is None or self.kind not in texts:
            return self.detail
        return texts[self.kind].format(found=self.found, expected=self.expected, detail=self.detail)


@dataclass(frozen=True, slots=True)
class Slot(Generic[T]):
    """A valid slot: its generation and its value (the payload bytes, as decoded here; a
    caller may replace it by what it decodes from them with :meth:`with_value`)."""

    generation: int
    value: T
    minor: int = 0

    def with_value(self, value: U) -> Slot[U]:
        return Slot(self.generation, value, self.minor)


#: What decoding one slot gives.
Decoded = Slot[T] | SlotProblem


class SlotCodec:
    """The framing of one kind of record: its magic, its version, its slot size and,
    for a fixed layout, its payload size.  Immutable; share one per record kind."""

    __slots__ = ("magic", "minor", "name", "payload_size", "slot_size", "version")

    def __init__(
        self,
        magic: bytes,
        version: int,
        slot_size: int,
        *,
        minor: int = 0,
        payload_size: int | None = None,
        name: str = "record",
    ) -> None:
        if not isinstance(magic, bytes) or len(magic) != MAGIC_SIZE or not magic.strip(b"\0"):
            raise RecordCodecError(f"a record magic is {MAGIC_SIZE} bytes, not all zero")
        if not 0 <= version < _U16 or not 0 <= minor < _U16:
            raise RecordCodecError(f"record version {version}.{minor} is not two u16")
        if slot_size < OVERHEAD or slot_size >= 1 << 32:
            raise RecordCodecError(f"slot size {slot_size} cannot hold a record")
        if payload_size is not None and not 0 <= payload_size <= slot_size - OVERHEAD:
            raise RecordCodecError(
                f"payload size {payload_size} does not fit a {slot_size}-byte slot"
            )
        self.magic = magic
        self.version = version
        self.minor = minor
        self.slot_size = slot_size
        self.payload_size = payload_size
        self.name = name

    @property
    def max_payload(self) -> int:
        """The largest payload a slot holds (the only size, for a fixed layout)."""
        return self.slot_size - OVERHEAD if self.payload_size is None else self.payload_size

    def __repr__(self) -> str:
        return (
            f"SlotCodec({self.magic!r}, {self.version}, {self.slot_size}, minor={self.minor}, "
            f"payload_size={self.payload_size}, name={self.name!r})"
        )

    def encode(self, generation: int, payload: bytes) -> bytes:
        """One slot image of exactly ``slot_size`` bytes."""
        if type(generation) is not int or not 0 <= generation < _U64:
            raise RecordCodecError(f"generation {generation!r} is not a u64")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise RecordCodecError(f"a payload is bytes, not {type(payload).__name__}")
        n = len(payload)
        if self.payload_size is not None and n != self.payload_size:
            raise RecordCodecError(f"{self.name} payload is {n} bytes, not {self.payload_size}")
        if n > self.max_payload:
            raise RecordCodecError(
                f"{self.name} payload of {n} bytes does not fit a {self.slot_size}-byte slot "
                f"(at most {self.max_payload})"
            )
        head = _PREFIX.pack(self.magic, self.version, self.minor, OVERHEAD + n, generation)
        body = head + bytes(payload)
        return (body + _CRC.pack(crc32c.crc32c(body))).ljust(self.slot_size, b"\0")

    def decode(self, slot: bytes | bytearray | memoryview) -> Slot[bytes] | SlotProblem:
        """The slot at the start of ``slot`` (bytes past its length are ignored), or why not."""
        if not isinstance(slot, bytes | bytearray | memoryview):
            raise RecordCodecError(f"a slot is bytes, not {type(slot).__name__}")
        raw = bytes(slot)
        fixed = None if self.payload_size is None else OVERHEAD + self.payload_size
        need = OVERHEAD if fixed is None else fixed
        if len(raw) < need:
            return SlotProblem(
                Damage.TRUNCATED,
                f"{self.name} slot is truncated ({len(raw)} of {need} bytes)",
                len(raw),
                need,
            )
        if raw[:MAGIC_SIZE] != self.magic:
            if not raw[: self.slot_size if fixed is None else fixed].strip(b"\0"):
                return SlotProblem(Damage.BLANK, f"{self.name} slot is blank (all zero)")
            return SlotProblem(Damage.BAD_MAGIC, f"bad magic: not a {self.name} slot")
        _magic, version, minor, length, generation = _PREFIX.unpack_from(raw)
        if version != self.version:
            return SlotProblem(
                Damage.BAD_VERSION,
                f"unsupported {self.name} format version {version} (this is {self.version})",
                version,
                self.version,
            )
        if fixed is not None and length != fixed:
            return SlotProblem(
                Damage.BAD_LENGTH, f"{self.name} length {length} is not {fixed}", length, fixed
            )
        if not OVERHEAD <= length <= self.slot_size:
            return SlotProblem(
                Damage.BAD_LENGTH,
                f"{self.name} length {length} is not from {OVERHEAD} to {self.slot_size}",
                length,
                self.slot_size,
            )
        if length > len(raw):
            return SlotProblem(
                Damage.TRUNCATED,
                f"{self.name} slot is truncated ({len(raw)} of {length} bytes)",
                len(raw),
                length,
            )
        end = length - _CRC.size
        (stored,) = _CRC.unpack_from(raw, end)
        actual = crc32c.crc32c(raw[:end])
        if stored != actual:
            return SlotProblem(
                Damage.BAD_CRC,
                f"bad CRC32C (stored {stored:08x}, computed {actual:08x})",
                stored,
                actual,
            )
        return Slot(generation, raw[PREFIX_SIZE:end], minor)


class Status(enum.Enum):
    OK = "ok"  # the winner, or the same generation and value as the winner
    STALE = "stale"  # valid, an older generation
    DAMAGED = "damaged"  # not valid: the slot's SlotProblem says why
    CONFLICT = "conflict"  # valid, the winner's generation, another value


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one slot is worth next to the winner."""

    status: Status
    generation: int | None = None  # None when damaged
    problem: SlotProblem | None = None  # DAMAGED only

    def reason(self, kept: int, texts: Mapping[Damage, str] | None = None) -> str:
        """Why the slot was not the one kept (empty when OK); ``kept``: the winner's
        generation."""
        if self.status is Status.DAMAGED:
            assert self.problem is not None
            return self.problem.describe(texts)
        if self.status is Status.STALE:
            return f"generation {self.generation} behind {kept}"
        if self.status is Status.CONFLICT:
            return "differs from the other slot at equal generation"
        return ""


@dataclass(frozen=True, slots=True)
class Choice(Generic[T]):
    """The slot that won, and what each of the two slots is worth."""

    winner: int  # 0 for slot A, 1 for slot B
    slot: Slot[T]  # the winning slot
    verdicts: tuple[Verdict, Verdict]

    @property
    def value(self) -> T:
        return self.slot.value

    @property
    def generation(self) -> int:
        return self.slot.generation

    @property
    def healthy(self) -> bool:
        return all(v.status is Status.OK for v in self.verdicts)

    @property
    def bad_slots(self) -> tuple[int, ...]:
        """The slots that do not hold the winner (to repair, or to write first)."""
        return tuple(i for i, v in enumerate(self.verdicts) if v.status is not Status.OK)

    def note(self, what: str = "record") -> str | None:
        """One line for a log, or None when both slots are OK: ``record slot B damaged
        (bad CRC32C (...)): kept slot A (generation 2)``."""
        if self.healthy:
            return None
        bad = "; ".join(
            f"slot {'AB'[i]} {self.verdicts[i].status.value} "
            f"({self.verdicts[i].reason(self.generation)})"
            for i in self.bad_slots
        )
        return f"{what} {bad}: kept slot {'AB'[self.winner]} (generation {self.generation})"


@dataclass(frozen=True, slots=True)
class NoValidSlot:
    """Neither slot is valid."""

    problems: tuple[SlotProblem, SlotProblem]

    def describe(self, texts: Mapping[Damage, str] | None = None) -> str:
        a, b = (p.describe(texts) for p in self.problems)
        return f"slot A: {a}; slot B: {b}"


def choose(a: Decoded[T], b: Decoded[T]) -> Choice[T] | NoValidSlot:
    """The valid slot with the higher generation (A on a tie), and a verdict on each."""
    slots = (a, b)
    for s in slots:
        if not isinstance(s, Slot | SlotProblem):
            raise RecordCodecError(f"choose takes decoded slots, not {type(s).__name__}")
    if isinstance(a, SlotProblem) and isinstance(b, SlotProblem):
        return NoValidSlot((a, b))
    if isinstance(a, Slot) and (not isinstance(b, Slot) or a.generation >= b.generation):
        winner, best = 0, a
    else:
        assert isinstance(b, Slot)
        winner, best = 1, b
    verdicts: list[Verdict] = []
    for s in slots:
        if isinstance(s, SlotProblem):
            verdicts.append(Verdict(Status.DAMAGED, problem=s))
        elif s is best or (s.generation == best.generation and s.value == best.value):
            verdicts.append(Verdict(Status.OK, s.generation))
        elif s.generation < best.generation:
            verdicts.append(Verdict(Status.STALE, s.generation))
        else:
            verdicts.append(Verdict(Status.CONFLICT, s.generation))
    return Choice(winner, best, (verdicts[0], verdicts[1]))


@dataclass(frozen=True, slots=True)
class WritePlan:
    """Write ``generation`` to ``order[0]``, sync, then to ``order[1]``, sync."""

    order: tuple[int, int]
    generation: int

    @property
    def first(self) -> int:
        return self.order[0]


def next_write(choice: Choice[T]) -> WritePlan:
    """How to write the next generation over ``choice``: the slot that does not hold the
    winner first (A first when both do), at the winner's generation + 1, which is above
    every valid slot."""
    if not isinstance(choice, Choice):
        raise RecordCodecError(f"next_write takes a Choice, not {type(choice).__name__}")
    other = 1 - choice.winner
    first = other if choice.verdicts[other].status is not Status.OK else 0
    generation = choice.generation + 1
    if generation >= _U64:
        raise RecordCodecError("the record's generation is at its maximum")
    return WritePlan((first, 1 - first), generation)


def read_pair(
    codec: SlotCodec, image: bytes | bytearray | memoryview
) -> Choice[bytes] | NoValidSlot:
    """Decode and choose between the two slots of a two-slot image (slot A at 0, slot B at
    ``slot_size``; a short image is padded with zeros)."""
    if not isinstance(image, bytes | bytearray | memoryview):
        raise RecordCodecError(f"an image is bytes, not {type(image).__name__}")
    raw = bytes(image).ljust(2 * codec.slot_size, b"\0")
    n = codec.slot_size
    return choose(codec.decode(raw[:n]), codec.decode(raw[n : 2 * n]))
