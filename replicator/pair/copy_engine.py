"""The copy engine: pushes the set chunks of a side's copy bitmap to the secondary.

Initial copy, resync and swap all copy the same way: the copy bitmap (durable first) lists
the chunks.  The engine walks the bitmap by runs (a few C scans per run, however long) and
cuts each run into *pieces* by the source's allocated extents (replicator/extents.py:
SEEK_DATA/SEEK_HOLE, aligned out to chunks): a piece of data chunks is at most
:data:`COPY_IO` bytes, a piece of hole chunks at most the :class:`ZeroSize` (up to
:data:`ZERO_MAX`), so an empty 1 TiB volume is a few hundred Zero requests, not 16 Mi/16.

Workers take the pieces, pipelined.  Each holds its piece's chunk locks, looks at the extents
again *under* them (the plan was made without locks: a client write may have put data into a
hole since), reads data chunks and sends them as Write, sends hole chunks as one
Zero(may_trim) per hole, and clears the piece's bits in one operation once every request of
the piece was acknowledged (a bit is never cleared before the peer has its chunk).  A client
write of the same chunks is therefore strictly before the piece (its data is read and sent
by the copy, and it was mirrored itself) or after it (its mirrored write reaches the secondary
after the Zero was acknowledged): a Zero never overtakes a client write.  A hole piece spans
more chunks than there are lock stripes, so it holds every stripe (and client writes wait) for
one Zero round trip: :class:`ZeroSize` keeps that round trip short.  Progress is flushed to
the bitmap every :data:`PROGRESS_EVERY` seconds (by pages: only the pages that changed), so a
copy resumes where it stopped.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from replicator import wire
from replicator.bitmap import Bitmap
from replicator.errors import PairvolError, VolumeError
from replicator.extents import data_chunk_runs, pieces, segments
from replicator.gate import ChunkLocks
from replicator.volume import Volume

COPY_IO = 1 << 20  # largest Write of a copy, and of a piece of data chunks
COPY_WORKERS = 4
PROGRESS_EVERY = 0.5
#: The bytes one Zero of a copy covers: from ZERO_MIN to ZERO_MAX, starting at ZERO_START
#: (the wire's largest bulk field: a Zero has none, its length is a u64, but the secondary
#: must carry it out well within the request timeout, and client writes wait meanwhile).
ZERO_MIN = COPY_IO
ZERO_START = wire.MAX_DATA
ZERO_MAX = 4 << 30
#: A Zero acknowledged faster than this doubles the size; slower than ZERO_SLOW halves it.
ZERO_FAST = 0.025
ZERO_SLOW = 0.1

# The name tests/test_pairs_unit.py knows the extents walk by.
_segments = segments


def bitmap_runs(
    lock: threading.Lock, bitmap: Bitmap, stop: threading.Event
) -> Iterator[tuple[int, int]]:
    """(first, count) runs of ``bitmap``'s set bits, ascending, read a run at a time under
    ``lock`` (bits cleared behind the walk are not seen again), until ``stop`` is set."""
    pos = 0
    while not stop.is_set():
        with lock:
            run = next(bitmap.runs(pos), None)
        if run is None:
            return
        yield run
        pos = run[0] + run[1]


class Throttle:
    """A bandwidth limit shared by a copy's workers: each takes its bytes from the budget
    before sending, and waits while the copy is ahead of ``rate()`` bytes per second.  The
    seconds are real ones, like the wait (the side's clock may be a test's script); a stop
    ends the wait at once."""

    def __init__(self, rate: Callable[[], int], stop: threading.Event) -> None:
        self._rate = rate
        self._stop = stop
        self._budget = 0
        self._lock = threading.Lock()
        self._t0 = time.monotonic()

    def would_wait(self, nbytes: int) -> bool:
        """Taking ``nbytes`` now would wait (a pipelined caller lands what it has in flight
        first, rather than sleep on it)."""
        rate = self._rate()
        if rate <= 0:
            return False
        with self._lock:
            return (self._budget + nbytes) / rate > time.monotonic() - self._t0

    def take(self, nbytes: int) -> None:
        rate = self._rate()
        if rate <= 0:
            return
        with self._lock:
            self._budget += nbytes
            ahead = self._budget / rate - (time.monotonic() - self._t0)
        if ahead > 0:
            self._stop.wait(ahead)


class ZeroSize:
    """How many bytes the next hole piece may span: doubled while full-size Zero requests are
    acknowledged within :data:`ZERO_FAST`, halved when one takes more than
    :data:`ZERO_SLOW`.  A secondary that punches holes (an image file) soon takes a gigabyte
    per request; one that writes zeros (a device without discard) stays at a size it zeroes
    quickly, so client writes, which wait for the Zero's chunk locks, never wait long."""

    def __init__(self) -> None:
        self.size = ZERO_START
        self._lock = threading.Lock()

    def took(self, length: int, seconds: float) -> None:
        with self._lock:
            if seconds > ZERO_SLOW:
                self.size = max(self.size // 2, ZERO_MIN)
            elif seconds < ZERO_FAST and length >= self.size:
                self.size = min(self.size * 2, ZERO_MAX)


class CopySource(Protocol):
    """What the engine needs of the side it copies from."""

    id: str
    chunk_size: int
    data_size: int
    data_offset: int
    bitmap_lock: threading.Lock
    copy_map: Bitmap
    chunk_locks: ChunkLocks
    volume: Volume
    log: Callable[[str], None]
    clock: Callable[[], float]

    @property
    def max_rate(self) -> int: ...

    def request(self, msg: wire.Message, timeout: float = ...) -> wire.Message: ...

    def flush_copy_map(self) -> None: ...

    def copy_progress(self, copied: int, total: int, sent: int, started: float) -> None: ...

    def copy_finished(self, copied: int, total: int, sent: int, started: float) -> None: ...

    def link_failed(self, reason: str) -> None: ...


class CopyEngine:
    """Pushes the set chunks of a side's copy bitmap to the secondary, pipelined."""

    def __init__(self, side: CopySource) -> None:
        self.side = side
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"copy {side.id}", daemon=True)
        self.sent_bytes = 0
        self.started = self.side.clock()
        self.total = 0
        self.copied = 0
        # Holes travel as Zero requests and cost nothing: only data bytes are counted.
        self.throttle = Throttle(lambda: side.max_rate, self.stop_flag)
        self.zero = ZeroSize()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_flag.set()

    def save_progress(self) -> None:
        """The bits of the pieces acknowledged so far are durable (a side closing)."""
        self.side.flush_copy_map()

    def _pieces(self) -> Iterator[tuple[int, int, int]]:
        """(first chunk, count, data bytes) pieces of the copy bitmap's runs, ascending, as
        the pool takes them.  The bitmap is read a run at a time (bits cleared behind the
        walk are not seen again) and each run is cut by the source's extents, lazily: a plan
        made without locks, which the worker checks under them.  A hole piece takes the
        Zero size of the moment, so the pieces grow as acknowledgements come back fast."""
        side = self.side
        cs = side.chunk_size
        for first, count in bitmap_runs(side.bitmap_lock, side.copy_map, self.stop_flag):
            pos = first + count
            fd, base = side.volume.fd, side.data_offset
            for f, n, is_data in data_chunk_runs(fd, base, side.data_size, cs, first, pos):
                if is_data:
                    for p, k in pieces(f, n, max(1, COPY_IO // cs)):
                        yield p, k, self._bytes(p, k)
                    continue
                end = f + n
                while f < end:
                    k = min(end - f, max(1, self.zero.size // cs))
                    yield f, k, 0
                    f += k

    def _bytes(self, first: int, count: int) -> int:
        """Bytes of the data area that chunks [first, first + count) cover."""
        cs = self.side.chunk_size
        return min((first + count) * cs, self.side.data_size) - first * cs

    def _copy_piece(self, first: int, count: int, data_bytes: int) -> int:
        """Copy one piece under its chunk locks; the data bytes sent."""
        side = self.side
        cs = side.chunk_size
        if data_bytes and side.max_rate > 0:  # the budget first, before holding any chunk
            self.throttle.take(data_bytes)
            if self.stop_flag.is_set():
                return 0  # woken by stop: the piece's bits stay set, a later copy takes them
        sent = 0
        fd, base = side.volume.fd, side.data_offset
        with side.chunk_locks.hold(first, first + count - 1):
            runs = list(data_chunk_runs(fd, base, side.data_size, cs, first, first + count))
            for f, n, is_data in runs:
                offset = f * cs
                length = self._bytes(f, n)
                if not is_data:
                    began = time.monotonic()
                    side.request(wire.Zero(side.id, offset, length, may_trim=True))
                    self.zero.took(length, time.monotonic() - began)
                    continue
                for pos in range(offset, offset + length, COPY_IO):
                    size = min(COPY_IO, offset + length - pos)
                    data = os.pread(fd, size, base + pos)
                    if len(data) != size:
                        raise VolumeError(f"short read at {pos} during copy", errno.EIO)
                    side.request(wire.Write(side.id, pos, data))
                    sent += size
            with side.bitmap_lock:
                side.copy_map.clear_range(first, count)
        return sent

    def _run(self) -> None:
        side = self.side
        try:
            with side.bitmap_lock:
                self.total = side.copy_map.count()
                last_report = self.side.clock()
            with ThreadPoolExecutor(COPY_WORKERS, thread_name_prefix=f"copy {side.id}") as pool:
                pending: list[tuple[Future[int], int]] = []
                for first, count, data_bytes in self._pieces():
                    if self.stop_flag.is_set():
                        break
                    piece = pool.submit(self._copy_piece, first, count, data_bytes)
                    pending.append((piece, count))
                    while len(pending) >= COPY_WORKERS * 2 or (pending and pending[0][0].done()):
                        fut, n = pending.pop(0)
                        self.sent_bytes += fut.result()
                        self.copied += n
                    if self.side.clock() - last_report > PROGRESS_EVERY:
                        last_report = self.side.clock()
                        side.copy_progress(self.copied, self.total, self.sent_bytes, self.started)
                for fut, n in pending:
                    self.sent_bytes += fut.result()
                    self.copied += n
            if self.stop_flag.is_set():
                side.flush_copy_map()
                return
            side.request(wire.Flush(side.id))
            side.copy_finished(self.copied, self.total, self.sent_bytes, self.started)
        except (PairvolError, OSError) as e:
            try:
                side.flush_copy_map()
            except (PairvolError, OSError) as flush_error:
                side.log(f"pair {side.id}: saving copy progress failed too: {flush_error}")
            if not self.stop_flag.is_set():
                side.link_failed(f"copy failed: {e}")
            else:
                side.log(f"pair {side.id}: the copy stopped ({e})")
        except Exception as e:  # pragma: no cover - a bug; never leave the pair hanging
            side.log(f"pair {side.id}: copy engine crashed: {e!r}")
            side.link_failed(f"copy engine crashed: {e!r}")
