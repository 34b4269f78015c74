"""Difference bitmaps: one bit per chunk of a volume, a pure class with no I/O.

Theory of operation.  While a pair is not in PAIR, each side records which chunks it changed
(SPEC section 2, "Difference bitmaps"); resync copies the union of both sides' bitmaps.  A
:class:`Bitmap` covers ``data_size`` bytes at ``chunk_size`` bytes per bit; the last chunk may
be partial.  Its serialized form (:meth:`Bitmap.to_bytes`) is exactly what sits in a bitmap
slot of the volume's metadata region (docs/format.md): chunk ``i`` is bit ``i % 8`` of byte
``i // 8``, padded with zero bytes to a multiple of 4096, and every bit past the last chunk
is zero.

The map remembers which 4096-byte *pages* of that serialized form changed since the last
:meth:`Bitmap.take_dirty_pages`, so :mod:`replicator.bitmap_store` rewrites only those pages.
The baseline is the image the map started from: all zero for a new map (a cleared slot), the
loaded bytes for :meth:`Bitmap.from_bytes`; :meth:`Bitmap.copy` and ``|`` keep the left
operand's pending pages.

Speed.  A 1 TiB volume at 64 KiB chunks has 16 Mi bits (2 MiB); at 4 KiB chunks, 256 Mi bits.
Short ranges are updated with big-int arithmetic on byte slices, long ones a page of whole
bytes at a time (a slice assignment; only the partial bytes at either end take bit
arithmetic); :meth:`Bitmap.count` is kept incrementally.  Scans skip all-zero bytes and take
all-one runs whole: :meth:`Bitmap.next_set` and :meth:`Bitmap.next_clear` compare 64 KiB,
then 2 KiB, then 64-byte blocks against a constant block (a memcmp) before a regular
expression finds the byte, so no operation loops in Python over every bit (or every byte) of
a range, and :meth:`Bitmap.runs` costs a few C calls per run whatever its length.

Threads.  The class does no locking: callers that share one map between threads serialize
every call (including each step of an iteration) with their own lock.  Iterators read the
live map as they go (:meth:`Bitmap.iter_set` a page at a time, :meth:`Bitmap.runs` a run at a
time), so bits changed during iteration are seen only where the iterator has not been yet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from itertools import dropwhile
from typing import Self

from replicator.errors import HeaderCorrupt, UsageError
from replicator.header import MIN_CHUNK, bitmap_bytes

PAGE = 4096
DEFAULT_CHUNK = 64 * 1024
MAX_CHUNK = 16 * 1024 * 1024

_ZERO_PAGE = bytes(PAGE)
_ONES_PAGE = b"\xff" * PAGE
# Longer than this, a range update goes a page of whole bytes at a time (see _fill).
_BIG_RANGE = 256
# Block sizes a scan compares whole (a memcmp each) before a regex looks at single bytes.
_SKIP_STEPS = (65536, 2048, 64)
_FILL_BLOCK = {0: memoryview(bytes(_SKIP_STEPS[0])), 0xFF: memoryview(b"\xff" * _SKIP_STEPS[0])}
_NOT_FILL = {0: re.compile(rb"[^\x00]"), 0xFF: re.compile(rb"[^\xff]")}
# Per byte value: its lowest set bit (8 for zero).
_LOW_BIT: tuple[int, ...] = tuple(((v & -v).bit_length() - 1) if v else 8 for v in range(256))
# A run of all-ones bytes (taken whole) or a single byte with some bits set.
_TOKENS = re.compile(rb"\xff+|[^\x00]")
# Per byte value: the bit positions that are set.
_BITS: tuple[tuple[int, ...], ...] = tuple(
    tuple(i for i in range(8) if v >> i & 1) for v in range(256)
)


def check_chunk_size(chunk_size: int) -> int:
    """A chunk size is a power of two from 4 KiB to 16 MiB; anything else is a UsageError."""
    if (
        not isinstance(chunk_size, int)
        or chunk_size < MIN_CHUNK
        or chunk_size > MAX_CHUNK
        or chunk_size & (chunk_size - 1)
    ):
        raise UsageError(
            f"chunk size {chunk_size!r} is not a power of two from {MIN_CHUNK} to {MAX_CHUNK}"
        )
    return chunk_size


def chunks_for(offset: int, length: int, chunk_size: int) -> range:
    """The chunks that the byte range [offset, offset + length) touches (empty if length 0)."""
    if offset < 0 or length < 0:
        raise ValueError(f"bad byte range: offset {offset}, length {length}")
    first = offset // chunk_size
    if length == 0:
        return range(first, first)
    return range(first, (offset + length + chunk_size - 1) // chunk_size)


def _scan(buf: bytes, base: int) -> Iterator[int]:
    """Set bit numbers of ``buf`` (little-endian bit order), offset by ``base``, ascending."""
    for m in _TOKENS.finditer(buf):
        start, end = m.span()
        if end - start > 1 or buf[start] == 0xFF:
            yield from range(base + 8 * start, base + 8 * end)
        else:
            bit0 = base + 8 * start
            for i in _BITS[buf[start]]:
                yield bit0 + i


def _first_not(buf: bytearray, fill: int, lo: int, hi: int) -> int:
    """Index of the first byte of ``buf[lo:hi]`` that is not ``fill`` (0 or 0xFF), else hi.
    Whole blocks are compared in C (largest first), then a regex finds the byte in the last
    block of at most 64 bytes, so the Python loop runs a few times per 64 KiB skipped."""
    same = _FILL_BLOCK[fill]
    pos = lo
    for step in _SKIP_STEPS:
        block = same[:step]
        while pos + step <= hi and buf[pos : pos + step] == block:
            pos += step
    m = _NOT_FILL[fill].search(buf, pos, hi)
    return hi if m is None else m.start()


def _int_bits(value: int, base: int) -> list[int]:
    """Set bit numbers of a non-negative int, offset by ``base``, ascending."""
    if value.bit_length() <= 1024:
        out = []
        while value:
            low = value & -value
            out.append(base + low.bit_length() - 1)
            value ^= low
        return out
    return list(_scan(value.to_bytes((value.bit_length() + 7) // 8, "little"), base))


class Bitmap:
    """One bit per ``chunk_size`` bytes of a ``data_size``-byte volume.  Not thread-safe."""

    __slots__ = ("_buf", "_count", "_dirty", "chunk_size", "data_size", "nbytes", "nchunks")

    def __init__(self, data_size: int, chunk_size: int = DEFAULT_CHUNK) -> None:
        check_chunk_size(chunk_size)
        if not isinstance(data_size, int) or data_size <= 0:
            raise ValueError(f"data size {data_size!r} is not a positive integer")
        self.data_size = data_size
        self.chunk_size = chunk_size
        self.nchunks = (data_size + chunk_size - 1) // chunk_size
        #: Length of the serialized form: whole pages, as :func:`header.bitmap_bytes` says.
        self.nbytes = bitmap_bytes(data_size, chunk_size)
        self._buf = bytearray(self.nbytes)
        self._count = 0
        self._dirty: set[int] = set()

    # -- geometry ---------------------------------------------------------------------------

    @property
    def npages(self) -> int:
        return self.nbytes // PAGE

    def same_geometry(self, other: Bitmap) -> bool:
        return self.data_size == other.data_size and self.chunk_size == other.chunk_size

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """(offset, length) in bytes of ``chunk``; the last chunk may be shorter."""
        self._check_chunk(chunk)
        offset = chunk * self.chunk_size
        return offset, min(self.chunk_size, self.data_size - offset)

    def _check_chunk(self, chunk: int) -> None:
        if not 0 <= chunk < self.nchunks:
            raise IndexError(f"chunk {chunk} is outside 0..{self.nchunks - 1}")

    def _check_run(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.nchunks:
            raise IndexError(f"chunks {first}+{count} are outside 0..{self.nchunks - 1}")

    # -- updates ----------------------------------------------------------------------------

    def _apply(self, first: int, count: int, value: bool) -> tuple[int, int]:
        """Set (or clear) bits [first, first + count).  Returns ``(base, changed)``: the int
        of flipped bits, where bit ``k`` stands for chunk ``base + k``."""
        if count == 0:
            return 0, 0
        lo = first >> 3
        hi = ((first + count - 1) >> 3) + 1
        old = int.from_bytes(self._buf[lo:hi], "little")
        mask = ((1 << count) - 1) << (first - 8 * lo)
        new = old | mask if value else old & ~mask
        changed = old ^ new
        if changed:
            self._buf[lo:hi] = new.to_bytes(hi - lo, "little")
            self._count += changed.bit_count() if value else -changed.bit_count()
            self._note_changed(lo, hi, changed)
        return 8 * lo, changed

    def _note_changed(self, lo: int, hi: int, changed: int) -> None:
        """Record the pages holding the changed bytes (``changed`` is relative to byte lo)."""
        first_byte = lo + ((changed & -changed).bit_length() - 1) // 8
        last_byte = lo + (changed.bit_length() - 1) // 8
        first_page, last_page = first_byte // PAGE, last_byte // PAGE
        if first_page == last_page:
            self._dirty.add(first_page)
            return
        diff = changed.to_bytes(hi - lo, "little")
        for page in range(first_page, last_page + 1):
            s = max(page * PAGE, lo) - lo
            e = min((page + 1) * PAGE, hi) - lo
            if diff[s:e] != _ZERO_PAGE[: e - s]:
                self._dirty.add(page)

    def mark(self, offset: int, length: int) -> list[int]:
        """Set the bit of every chunk that bytes [offset, offset + length) touch.

        Returns the chunks whose bit went from 0 to 1 (empty: nothing new to persist)."""
        r = chunks_for(offset, length, self.chunk_size)
        if offset + length > self.data_size:
            raise IndexError(
                f"bytes {offset}+{length} reach past the end of the volume ({self.data_size})"
            )
        base, changed = self._apply(r.start, len(r), True)
        return _int_bits(changed, base)

    def set_chunk(self, chunk: int) -> bool:
        """Set one bit; True if it was clear."""
        self._check_chunk(chunk)
        return self._apply(chunk, 1, True)[1] != 0

    def clear_chunk(self, chunk: int) -> bool:
        """Clear one bit; True if it was set."""
        self._check_chunk(chunk)
        return self._apply(chunk, 1, False)[1] != 0

    def set_range(self, first: int, count: int) -> int:
        """Set ``count`` bits from ``first``; returns how many were clear."""
        self._check_run(first, count)
        return self._fill(first, count, True)

    def clear_range(self, first: int, count: int) -> int:
        """Clear ``count`` bits from ``first``; returns how many were set."""
        self._check_run(first, count)
        return self._fill(first, count, False)

    def _fill(self, first: int, count: int, value: bool) -> int:
        """Set (or clear) bits [first, first + count); returns how many changed.  The partial
        bytes at either end take :meth:`_apply`; the whole bytes between go a page at a
        time: a page that already holds the value is only compared, any other is assigned
        whole (its old bits counted in C) and marked dirty."""
        lo, hi = (first + 7) >> 3, (first + count) >> 3  # whole bytes [lo, hi)
        if count <= _BIG_RANGE or hi <= lo:
            return self._apply(first, count, value)[1].bit_count()
        head = self._apply(first, 8 * lo - first, value)[1].bit_count()
        tail = self._apply(8 * hi, first + count - 8 * hi, value)[1].bit_count()
        fill = _ONES_PAGE if value else _ZERO_PAGE
        buf = self._buf
        changed = 0
        for page in range(lo // PAGE, (hi - 1) // PAGE + 1):
            s, e = max(lo, page * PAGE), min(hi, (page + 1) * PAGE)
            old = buf[s:e]
            if old == fill[: e - s]:
                continue
            ones = int.from_bytes(old, "little").bit_count()
            buf[s:e] = fill[: e - s]
            changed += 8 * (e - s) - ones if value else ones
            self._dirty.add(page)
        self._count += changed if value else -changed
        return head + tail + changed

    def union_update(self, other: Bitmap) -> None:
        """Set every bit that is set in ``other`` (same geometry, else ValueError)."""
        if not self.same_geometry(other):
            raise ValueError(
                f"bitmap geometry differs: {self.data_size}/{self.chunk_size} vs "
                f"{other.data_size}/{other.chunk_size}"
            )
        for page in range(self.npages):
            s = page * PAGE
            theirs = other._buf[s : s + PAGE]
            if theirs == _ZERO_PAGE:
                continue
            mine = int.from_bytes(self._buf[s : s + PAGE], "little")
            new = mine | int.from_bytes(theirs, "little")
            if new != mine:
                self._buf[s : s + PAGE] = new.to_bytes(PAGE, "little")
                self._count += new.bit_count() - mine.bit_count()
                self._dirty.add(page)

    def __ior__(self, other: Bitmap) -> Self:
        self.union_update(other)
        return self

    def __or__(self, other: Bitmap) -> Bitmap:
        result = self.copy()
        result.union_update(other)
        return result

    def copy(self) -> Bitmap:
        """An independent map with the same bits and the same pending dirty pages."""
        new = Bitmap.__new__(Bitmap)
        new.data_size = self.data_size
        new.chunk_size = self.chunk_size
        new.nchunks = self.nchunks
        new.nbytes = self.nbytes
        new._buf = bytearray(self._buf)
        new._count = self._count
        new._dirty = set(self._dirty)
        return new

    # -- queries ----------------------------------------------------------------------------

    def test(self, chunk: int) -> bool:
        self._check_chunk(chunk)
        return bool(self._buf[chunk >> 3] >> (chunk & 7) & 1)

    def count(self) -> int:
        """Number of set bits (dirty chunks)."""
        return self._count

    def dirty_bytes(self) -> int:
        """Bytes of the volume that set bits cover (the last chunk may be partial)."""
        total = self._count * self.chunk_size
        last = self.nchunks - 1
        if self._buf[last >> 3] >> (last & 7) & 1:
            total -= self.nchunks * self.chunk_size - self.data_size
        return total

    def iter_set(self, start: int = 0) -> Iterator[int]:
        """Set chunk numbers from ``start`` on, ascending."""
        if start < 0:
            raise ValueError(f"start chunk {start} is negative")
        return self._iter_from(start)

    def _iter_from(self, start: int) -> Iterator[int]:
        if start >= self.nchunks:
            return
        first_byte = start >> 3
        first_page = first_byte // PAGE
        for page in range(first_page, self.npages):
            lo = first_byte if page == first_page else page * PAGE
            data = bytes(self._buf[lo : (page + 1) * PAGE])
            if data == _ZERO_PAGE[: len(data)]:
                continue
            if page == first_page:
                # Only the first byte can hold bits before ``start``; dropwhile then runs in C.
                yield from dropwhile(lambda c: c < start, _scan(data, 8 * lo))
            else:
                yield from _scan(data, 8 * lo)

    def next_set(self, start: int, end: int | None = None) -> int | None:
        """The first set chunk in [start, end) (end: the last chunk), or None."""
        end = self._clip(start, end)
        if start >= end:
            return None
        buf = self._buf
        byte = start >> 3
        v = buf[byte] >> (start & 7)
        if v:
            found = start + _LOW_BIT[v]
        else:
            i = _first_not(buf, 0, byte + 1, (end + 7) >> 3)
            if i >= (end + 7) >> 3:
                return None
            found = 8 * i + _LOW_BIT[buf[i]]
        return found if found < end else None

    def next_clear(self, start: int, end: int | None = None) -> int:
        """The first clear chunk in [start, end) (end: the last chunk), else ``end``."""
        end = self._clip(start, end)
        if start >= end:
            return end
        buf = self._buf
        byte = start >> 3
        v = (~buf[byte] & 0xFF) >> (start & 7)
        if v:
            found = start + _LOW_BIT[v]
        else:
            i = _first_not(buf, 0xFF, byte + 1, (end + 7) >> 3)
            found = end if i >= (end + 7) >> 3 else 8 * i + _LOW_BIT[~buf[i] & 0xFF]
        return min(found, end)

    def _clip(self, start: int, end: int | None) -> int:
        if start < 0:
            raise ValueError(f"start chunk {start} is negative")
        return self.nchunks if end is None else min(end, self.nchunks)

    def runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """(first chunk, count) of each maximal run of set bits, ascending, clipped to
        [start, end) (end: the last chunk).  Each step reads the live map from where the
        last run ended (two scans of whole bytes: :meth:`next_set`, :meth:`next_clear`)."""
        stop = self._clip(start, end)
        return self._runs_from(start, stop)

    def _runs_from(self, pos: int, stop: int) -> Iterator[tuple[int, int]]:
        while pos < stop:
            first = self.next_set(pos, stop)
            if first is None:
                return
            pos = self.next_clear(first, stop)
            yield first, pos - first

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self.same_geometry(other) and self._buf == other._buf

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"Bitmap(data_size={self.data_size}, chunk_size={self.chunk_size}, "
            f"set={self._count}/{self.nchunks})"
        )

    # -- persistence ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The serialized form: :attr:`nbytes` bytes, whole pages."""
        return bytes(self._buf)

    def page(self, index: int) -> bytes:
        """Bytes of serialized page ``index``."""
        if not 0 <= index < self.npages:
            raise IndexError(f"page {index} is outside 0..{self.npages - 1}")
        return bytes(self._buf[index * PAGE : (index + 1) * PAGE])

    @classmethod
    def from_bytes(
        cls, data_size: int, chunk_size: int, raw: bytes | bytearray | memoryview
    ) -> Bitmap:
        """Decode a serialized map; bad length or bits past the end are HeaderCorrupt."""
        bm = cls(data_size, chunk_size)
        if len(raw) != bm.nbytes:
            raise HeaderCorrupt(f"bitmap is {len(raw)} bytes; expected {bm.nbytes}")
        buf = bytearray(raw)
        used, spare = divmod(bm.nchunks, 8)
        tail_ok = not buf[used + (spare > 0) :].strip(b"\x00")
        if not tail_ok or (spare and buf[used] >> spare):
            raise HeaderCorrupt(f"bitmap has bits set past its last chunk ({bm.nchunks - 1})")
        bm._buf = buf
        bm._count = int.from_bytes(buf, "little").bit_count()
        return bm

    def take_dirty_pages(self) -> list[int]:
        """Pages of :meth:`to_bytes` changed since the last call (or the baseline), ascending;
        the set is emptied."""
        pages = sorted(self._dirty)
        self._dirty.clear()
        return pages

    def mark_pages_dirty(self, pages: Iterable[int]) -> None:
        """Put pages back, e.g. after a failed write of the pages just taken."""
        for page in pages:
            if not 0 <= page < self.npages:
                raise IndexError(f"page {page} is outside 0..{self.npages - 1}")
            self._dirty.add(page)
