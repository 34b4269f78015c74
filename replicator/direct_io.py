"""Writes beneath the page cache (``O_DIRECT``) for bulk landings into holes: a takeover's
pull, and a new secondary's initial copy.

A buffered write of data the volume never had copies it into freshly allocated page-cache
pages and dirties them: on this machine a landing thread spent two thirds of its time in
that copy and a fifth spinning for the file's inode lock, and every client write of the
volume paid the dirty-page throttling meanwhile.  A direct write hands the pages of one
reused, aligned buffer to the device instead, as DRBD's secondary submits its bios below
any page cache (docs/benchmarks.md, "Session 12").

Direct writes need the buffer, the file offset and the length aligned (:data:`ALIGN`); a
write that is not, or a file system that refuses ``O_DIRECT`` (tmpfs before Linux 6.6), is
left to the caller's buffered write (:meth:`DirectWriter.write` returns False).  Durability
is the caller's, as with a buffered write: a direct write may sit in the device's cache and its
block allocation in the file system's journal until an ``fdatasync`` of the file.  The
kernel keeps the page cache coherent (it writes back and drops the range's pages around
a direct write); callers never write one range both ways at once (the chunk locks).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

from replicator.errors import VolumeError

#: Alignment of a direct write's buffer, offset and length: the page, which covers every
#: logical block size up to 4 KiB.
ALIGN = 4096
#: A writer's buffer per thread, and so the most one direct write writes: ext4 holds the
#: inode lock while it allocates and submits, so 1 MiB (about a millisecond here), not a
#: whole 4 MiB piece.  Direct writes of 256 KiB, 1 MiB and 4 MiB into a hole (1 GiB, 2
#: threads): 880-890, 1250-1260, 1210-1460 MiB/s.
BUFFER_SIZE = 1 << 20


class DirectWriter:
    """Direct writes into the file open at ``fd`` (opened again with ``O_DIRECT``), through
    one aligned buffer of ``buffer_size`` bytes per writing thread, reused."""

    def __init__(self, fd: int, buffer_size: int = BUFFER_SIZE) -> None:
        if buffer_size <= 0 or buffer_size % ALIGN:
            raise ValueError(f"buffer size {buffer_size} is not a multiple of {ALIGN}")
        self.buffer_size = buffer_size
        self._local = threading.local()
        self._refused = False  # a direct write was refused: buffered from then on
        try:
            self._fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            self._fd = -1  # the file system has no direct I/O: every write is buffered

    @property
    def usable(self) -> bool:
        return self._fd >= 0 and not self._refused

    def write(self, data: bytes | bytearray | memoryview, pos: int) -> bool:
        """Write ``data`` at ``pos`` directly, a buffer's worth at a time: True when written,
        False when it cannot be (not aligned, or direct I/O refused): then the caller writes
        all of it buffered (a refusal after some slices went direct rewrites them with the
        same bytes)."""
        n = len(data)
        fd = self._fd
        if fd < 0 or self._refused or not n or n % ALIGN or pos % ALIGN:
            return False
        buf = self._buffer()
        view = memoryview(data).cast("B")
        for lo in range(0, n, self.buffer_size):
            m = min(self.buffer_size, n - lo)
            buf[:m] = view[lo : lo + m]
            try:
                done = os.pwritev(fd, [buf[:m]], pos + lo)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._refused = True  # refused after all (a device with larger blocks)
                return False
            if done != m:
                raise VolumeError(
                    f"short direct write at {pos + lo}: {done} of {m} bytes", errno.ENOSPC
                )
        return True

    def _buffer(self) -> memoryview:
        buf: memoryview | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = memoryview(mmap.mmap(-1, self.buffer_size))  # page-aligned, this thread's
            self._local.buf = buf
        return buf

    def close(self) -> None:
        """Close the direct descriptor, once no thread writes through it any more (the
        buffers go with their threads)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
