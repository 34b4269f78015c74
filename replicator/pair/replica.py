"""What the peer sends a secondary: replicated writes, journal entries, bitmap and digest
requests.  Everything here writes this side's own volume; a volume that is also the primary
of other legs (the middle of a cascade) carries each change on to them
(:meth:`~replicator.pair.client_io.ClientWrites.forward_write`)."""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING

import xxhash

from replicator import extents, falloc, wire
from replicator import pair_state as ps
from replicator.direct_io import DirectWriter
from replicator.errors import IllegalState, UsageError, VolumeError
from replicator.header import Role
from replicator.journal import EntryKind

if TYPE_CHECKING:
    from replicator.pair.side import Side

#: A Write received in COPY this long or longer, into a hole, is written directly.
DIRECT_MIN = 256 << 10


def _message(
    pid: str, kind: EntryKind, offset: int, length: int, data: bytes | memoryview, fua: bool
) -> wire.Message:
    """The change as the request that carries it to another leg's secondary."""
    if kind is EntryKind.WRITE:
        return wire.Write(pid, offset, data, fua)
    return wire.Zero(pid, offset, length, fua, kind is EntryKind.TRIM)


class Replica:
    """The secondary's data path of one side."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self._direct: DirectWriter | None = None  # opened at the first copied Write into a hole
        self._direct_lock = threading.Lock()

    def _copy_writer(self, offset: int, length: int) -> DirectWriter | None:
        """The direct writer for a Write received in COPY of at least :data:`DIRECT_MIN`
        bytes into a range that holds no data here (a new secondary's initial copy), else
        None (buffered).  Written beneath the page cache, such a Write costs no fresh
        page-cache pages (docs/benchmarks.md, session 12: 1 GiB copied in 2.5-3.0 s, was
        4.6-5.5); a differential resync overwrites blocks that are here, likely cached, and
        stays buffered (direct, it measured slower)."""
        side = self.side
        if side.record.state is not ps.State.COPY or length < DIRECT_MIN:
            return None
        if not extents.is_hole(side.volume.fd, side.data_offset + offset, length):
            return None
        with self._direct_lock:
            if self._direct is None:
                self._direct = DirectWriter(side.volume.fd)
            return self._direct

    def close(self) -> None:
        with self._direct_lock:
            direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()

    def check_journal_marks(self, *, split: bool = False) -> None:
        """This secondary may take journal entries and acknowledge its marks: it is async
        (a sync pair has no receive journal, and gets none from a stray entry), it replicates,
        or the link only blipped (PSUE by the link; it rejoins without a copy), or, for a
        status only, a split is being finished.  Suspended by its disk or its peer (a
        salvaged journal), its marks are not to be trusted: an acknowledgement would let the
        primary release entries nobody applied, so the primary is refused and folds them."""
        side = self.side
        r = side.record
        ok = (
            side.is_async
            and r.role is Role.SECONDARY
            and (
                r.state in ps.REPLICATING
                or (r.state is ps.State.PSUE and r.cause is ps.Cause.LINK and not r.pulling)
                or (split and r.state is ps.State.PSUS)
            )
        )
        if not ok:
            raise IllegalState(
                f"pair {side.id}: this side takes no journal entries ({r.mode.value}, "
                f"{r.role.label}, {r.state}, cause {r.cause})"
            )

    def _check_takes_writes(self) -> None:
        side = self.side
        r = side.record
        # A secondary the link suspended still takes writes (it rejoins without a copy);
        # suspended by its disk or its peer it does not: the primary must not believe it is
        # in PAIR (refused, it suspends itself and its fence policy applies).  Nor does a
        # side taken over whose pull the link suspended: it is the primary's successor.
        if r.role is not Role.SECONDARY or not (
            r.state in ps.REPLICATING
            or (r.state is ps.State.PSUE and r.cause is ps.Cause.LINK and not r.pulling)
        ):
            why = f"{r.state}, suspended by {r.cause}" if r.state in ps.SUSPENDED else r.state
            raise IllegalState(f"pair {side.id}: not a replicating secondary here ({why})")

    def apply_entries(self, msg: wire.Entries) -> wire.JournalAck:
        """Journal entries of this pair shipped in one frame: an async Write's checks for
        each, then its group's receive journal takes them in order."""
        side = self.side
        self._check_takes_writes()
        for seq, _kind, offset, length, _fua, _data in msg.items():
            if offset + length > side.data_size:
                raise UsageError(
                    f"pair {side.id}: entry {seq} writes past the end of {side.doc.volume}"
                )
        if not side.check_image():
            raise VolumeError(f"pair {side.id}: {side.damaged}", errno.EIO)
        self.check_journal_marks()
        return side.host.secondary_group(side).receive_entries(side, msg)

    def apply_write(self, msg: wire.Write | wire.Zero | wire.Flush) -> wire.Message:
        side = self.side
        self._check_takes_writes()
        if isinstance(msg, wire.Flush):
            fd = side.volume.fd
            side.legs.writes.forward_flush(side, lambda: os.fdatasync(fd))
            return wire.Ack()
        length = len(msg.data) if isinstance(msg, wire.Write) else msg.length
        if msg.offset + length > side.data_size:
            raise UsageError(f"pair {side.id}: write past the end of {side.doc.volume}")
        if not side.check_image():
            raise VolumeError(f"pair {side.id}: {side.damaged}", errno.EIO)
        if msg.seq:
            self.check_journal_marks()
            return side.host.secondary_group(side).receive(side, msg)
        if isinstance(msg, wire.Write):
            direct = self._copy_writer(msg.offset, length)
            self.apply_entry(EntryKind.WRITE, msg.offset, length, msg.data, msg.fua, direct)
        else:
            kind = EntryKind.TRIM if msg.may_trim else EntryKind.ZERO
            self.apply_entry(kind, msg.offset, length, b"", msg.fua)
        return wire.Ack()

    def apply_entry(
        self,
        kind: EntryKind,
        offset: int,
        length: int,
        data: bytes | memoryview,
        fua: bool,
        direct: DirectWriter | None = None,
    ) -> None:
        """Write one change to the local volume (shipped, copied, pulled, or redone from a
        journal); on a receiving leg, carried on to the volume's other legs.  ``direct``:
        a write goes beneath the page cache through it when it can (the pull's landings)."""
        side = self.side
        if side.record.role is Role.SECONDARY and len(side.legs.legs) > 1:
            side.legs.writes.forward_write(
                side,
                offset,
                max(length, 1),
                lambda: self._write_local(kind, offset, length, data, fua, direct),
                lambda pid: _message(pid, kind, offset, length, data, fua),
            )
            return
        self._write_local(kind, offset, length, data, fua, direct)

    def _write_local(
        self,
        kind: EntryKind,
        offset: int,
        length: int,
        data: bytes | memoryview,
        fua: bool,
        direct: DirectWriter | None = None,
    ) -> None:
        side = self.side
        fd, base = side.volume.fd, side.data_offset
        if kind is EntryKind.WRITE:
            if direct is not None and not fua and direct.write(data, base + offset):
                return
            done = os.pwritev(fd, [data], base + offset, os.RWF_DSYNC if fua else 0)
            if done != len(data):
                raise VolumeError(f"short write on {side.doc.volume}", errno.ENOSPC)
            return
        punched = False
        if kind is EntryKind.TRIM:
            try:
                falloc.punch_hole(fd, base + offset, length)
                punched = True
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
        if not punched:
            falloc.zero_range(fd, base + offset, length)
        if fua:
            os.fdatasync(fd)

    def digests(self, first: int, count: int) -> bytes:
        """XXH3-64 of chunks ``first .. first+count-1`` (the last chunk may be short)."""
        side = self.side
        cs = side.chunk_size
        if count < 1 or first + count > side.diff_map.nchunks:
            raise UsageError(f"pair {side.id}: chunks {first}+{count} are outside the volume")
        out = bytearray()
        fd, base = side.volume.fd, side.data_offset
        for c in range(first, first + count):
            length = min(cs, side.data_size - c * cs)
            data = os.pread(fd, length, base + c * cs)
            if len(data) != length:
                raise VolumeError(f"short read of chunk {c} of {side.doc.volume}", errno.EIO)
            out += xxhash.xxh3_64_digest(data)[::-1]  # little-endian
        return bytes(out)

    def bitmap_for_peer(self, which: str) -> wire.Bitmap:
        side = self.side
        with side.bitmap_lock:
            bm = side.copy_map if which == "pending" else side.diff_map
            bits = bm.to_bytes()
        return wire.Bitmap(side.id, which, side.chunk_size, side.data_size, 0, bits)
