"""Persistent difference bitmaps in a volume's metadata region.

Layout (docs/format.md).  The metadata region starts at the header's ``meta_offset`` and holds
``meta_size // bitmap_bytes(data_size, MIN_CHUNK)`` bitmap *slots* (8 for volumes created by
this version).  Slot ``k`` starts at ``meta_offset + k * bitmap_bytes(data_size, MIN_CHUNK)``;
a bitmap at chunk size ``C`` occupies the first ``bitmap_bytes(data_size, C)`` bytes of its
slot, in :meth:`Bitmap.to_bytes` form.  Which leg owns which slots is the *slot table* in the
last slot (:mod:`replicator.slot_table`, :meth:`BitmapStore.read_table`); the chunk size of
each bitmap is in its pair's state file, and a slot is cleared before it is reused.  Every
write is checked against the slot's bounds (never the header slots, never the data area) and
followed by ``fdatasync``.

Crash safety.  Bits are updated in place, one 4096-byte page at a time, so a crash can tear a
page write anywhere.  That is safe because of the order in which callers change bits:

* a bit is SET, and the page holding it made durable (:meth:`BitmapStore.flush`), before the
  data write it covers is issued, and so before it is acknowledged;
* a bit is CLEARED only after the copy of its chunk to the other side has been acknowledged.

A torn page leaves each byte, hence each bit, either old or new (the bits past the last chunk
are zero in both, so the map still decodes).  A set that had not reached the disk belongs to a
write that was never issued: nothing to copy.  A clear that had not reached the disk costs one
extra copy of a chunk that is already identical.  Every bit that was durable and not cleared
afterwards survives.  ``tests/test_bitmap_store.py`` SIGKILLs a process that marks, clears and
flushes at random moments and checks exactly that, plus that the header slots and the data
area are bit-for-bit unchanged.

The store does no locking; the caller serializes use of a slot.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from replicator import record_codec as rc
from replicator.bitmap import PAGE, Bitmap, check_chunk_size
from replicator.errors import HeaderCorrupt, IllegalState, VolumeError
from replicator.falloc import punch_hole
from replicator.header import META_OFFSET, MIN_CHUNK, Header, bitmap_bytes
from replicator.slot_table import MIN_SLOTS, TABLE_RECORD, SlotTable, table_slot

_ZERO_CHUNK = bytes(1 << 20)


def _io_error(e: OSError, doing: str) -> VolumeError:
    return VolumeError(f"bitmap {doing}: {e.strerror}", e.errno or errno.EIO)


class BitmapStore:
    """The bitmap slots of one open volume (``volume_fd`` is the image, opened read-write
    for the writing methods)."""

    def __init__(self, volume_fd: int, header: Header) -> None:
        self.fd = volume_fd
        self.header = header
        self.slot_size = bitmap_bytes(header.data_size, MIN_CHUNK)
        self.nslots = header.meta_size // self.slot_size
        # The region the store may ever write: inside the metadata region, which the header
        # already keeps clear of both header slots and of the data area.
        self._lo = max(header.meta_offset, META_OFFSET)
        self._hi = min(header.meta_offset + header.meta_size, header.data_offset)

    # -- geometry ---------------------------------------------------------------------------

    def slot_offset(self, slot: int) -> int:
        """Byte offset in the image of bitmap slot ``slot``."""
        if not 0 <= slot < self.nslots:
            raise IllegalState(f"bitmap slot {slot} does not exist (this volume has {self.nslots})")
        return self.header.meta_offset + slot * self.slot_size

    def _check_bitmap(self, bitmap: Bitmap) -> None:
        if bitmap.data_size != self.header.data_size:
            raise ValueError(
                f"bitmap covers {bitmap.data_size} bytes; the volume has {self.header.data_size}"
            )
        if bitmap.nbytes > self.slot_size:  # cannot happen for chunk >= MIN_CHUNK
            raise ValueError(f"bitmap of {bitmap.nbytes} bytes exceeds the slot")

    def _check_bounds(self, offset: int, length: int) -> None:
        # A real check, not ``assert``: it must survive ``python -O``.
        if not self._lo <= offset <= offset + length <= self._hi:
            raise AssertionError(
                f"bitmap I/O [{offset}, {offset + length}) outside the metadata region "
                f"[{self._lo}, {self._hi})"
            )

    # -- I/O --------------------------------------------------------------------------------

    def _pwrite(self, data: bytes, offset: int) -> None:
        self._check_bounds(offset, len(data))
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                if n <= 0:
                    raise VolumeError(f"bitmap write returned {n} at offset {offset}")
                view = view[n:]
                offset += n
        except OSError as e:
            raise _io_error(e, f"write at {offset}") from e

    def _sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise _io_error(e, "fdatasync") from e

    def load(self, slot: int, chunk_size: int) -> Bitmap:
        """Read the bitmap at ``chunk_size`` from ``slot``.  Bad content is HeaderCorrupt."""
        check_chunk_size(chunk_size)
        offset = self.slot_offset(slot)
        length = bitmap_bytes(self.header.data_size, chunk_size)
        self._check_bounds(offset, length)
        buf = bytearray()
        try:
            while len(buf) < length:
                part = os.pread(self.fd, length - len(buf), offset + len(buf))
                if not part:
                    raise VolumeError(
                        f"bitmap slot {slot} is cut short by the end of the image",
                        errno.EIO,
                    )
                buf += part
        except OSError as e:
            raise _io_error(e, f"read at {offset}") from e
        return Bitmap.from_bytes(self.header.data_size, chunk_size, buf)

    def save_pages(self, slot: int, bitmap: Bitmap, pages: Iterable[int]) -> int:
        """Write the given pages of ``bitmap`` into ``slot`` (consecutive pages in one
        ``pwrite``), then ``fdatasync``.  Returns the number of pages written."""
        self._check_bitmap(bitmap)
        base = self.slot_offset(slot)
        todo = sorted(set(pages))
        for page in todo:
            if not 0 <= page < bitmap.npages:
                raise IndexError(f"page {page} is outside 0..{bitmap.npages - 1}")
        if not todo:
            return 0
        raw = bitmap.to_bytes() if len(todo) > 8 else None
        i = 0
        while i < len(todo):
            j = i
            while j + 1 < len(todo) and todo[j + 1] == todo[j] + 1:
                j += 1
            first, last = todo[i], todo[j]
            if raw is not None:
                data = raw[first * PAGE : (last + 1) * PAGE]
            else:
                data = b"".join(bitmap.page(p) for p in range(first, last + 1))
            self._pwrite(data, base + first * PAGE)
            i = j + 1
        self._sync()
        return len(todo)

    def save_all(self, slot: int, bitmap: Bitmap) -> None:
        """Write the whole bitmap into ``slot``, then ``fdatasync``.  Leaves the bitmap's
        dirty pages alone."""
        self._check_bitmap(bitmap)
        self._pwrite(bitmap.to_bytes(), self.slot_offset(slot))
        self._sync()

    def flush(self, slot: int, bitmap: Bitmap) -> int:
        """Persist the pages changed since the last flush (:meth:`Bitmap.take_dirty_pages`).
        Returns how many pages were written; on failure the pages stay dirty."""
        pages = bitmap.take_dirty_pages()
        try:
            return self.save_pages(slot, bitmap, pages)
        except BaseException:
            bitmap.mark_pages_dirty(pages)
            raise

    def clear(self, slot: int) -> None:
        """Zero the whole slot (punching a hole where the filesystem can), then sync."""
        offset = self.slot_offset(slot)
        self._check_bounds(offset, self.slot_size)
        try:
            punch_hole(self.fd, offset, self.slot_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise _io_error(e, f"slot {slot} punch") from e
            end = offset + self.slot_size
            while offset < end:
                n = min(len(_ZERO_CHUNK), end - offset)
                self._pwrite(_ZERO_CHUNK[:n], offset)
                offset += n
        self._sync()

    # -- the slot table (replicator/slot_table.py) ------------------------------------------------

    def _table_image(self) -> tuple[int, bytes]:
        offset = self.slot_offset(table_slot(self.nslots))
        size = 2 * TABLE_RECORD.slot_size
        self._check_bounds(offset, size)
        try:
            return offset, os.pread(self.fd, size, offset)
        except OSError as e:
            raise _io_error(e, "table read") from e

    def read_table(self) -> SlotTable | None:
        """The volume's slot table; None if it never had one (a blank table slot)."""
        if self.nslots < MIN_SLOTS:
            return None
        _, image = self._table_image()
        picked = rc.read_pair(TABLE_RECORD, image)
        if isinstance(picked, rc.NoValidSlot):
            if all(p.kind is rc.Damage.BLANK for p in picked.problems):
                return None
            raise HeaderCorrupt(f"bitmap slot table: no valid slot ({picked.describe()})")
        return SlotTable.from_payload(picked.value, self.nslots)

    def write_table(self, table: SlotTable) -> None:
        """Make ``table`` the volume's slot table: the next generation, written to the slot
        that does not hold the current one first, each slot synced (a crash leaves the old
        table or the new one)."""
        if table.nslots != self.nslots:
            raise ValueError(f"a table for {table.nslots} slots; the volume has {self.nslots}")
        offset, image = self._table_image()
        picked = rc.read_pair(TABLE_RECORD, image)
        if isinstance(picked, rc.Choice):
            plan = rc.next_write(picked)
            order, generation = plan.order, plan.generation
        else:
            order, generation = (0, 1), 1
        slot = TABLE_RECORD.encode(generation, table.to_payload())
        for i in order:
            self._pwrite(slot, offset + i * TABLE_RECORD.slot_size)
            self._sync()
