"""The copy engine: pushes the set chunks of a side's copy bitmap to the secondary.

Initial copy, resync and swap all copy the same way: the copy bitmap (durable first) lists
the chunks; workers take runs of at most :data:`COPY_IO` bytes, hold the runs' chunk locks (so
a client write to the same chunks is strictly before or after), read allocated ranges and
send them as Write, send holes as Zero(may_trim), and clear the bits.  Progress is flushed
to the bitmap every :data:`PROGRESS_EVERY` seconds, so a copy resumes where it stopped.
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
from replicator.gate import ChunkLocks
from replicator.volume import Volume

COPY_IO = 1 << 20  # largest single copy request
COPY_WORKERS = 4
PROGRESS_EVERY = 0.5


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

    def take(self, nbytes: int) -> None:
        rate = self._rate()
        if rate <= 0:
            return
        with self._lock:
            self._budget += nbytes
            ahead = self._budget / rate - (time.monotonic() - self._t0)
        if ahead > 0:
            self._stop.wait(ahead)


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


def _segments(fd: int, pos: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(start, length, is_data) runs of the file between pos and end (SEEK_DATA/SEEK_HOLE)."""
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = end
        if data > pos:
            stop = min(data, end)
            yield pos, stop - pos, False
            pos = stop
        else:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            yield pos, hole - pos, True
            pos = hole


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

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_flag.set()

    def _runs(self) -> Iterator[tuple[int, int]]:
        """(first chunk, count) pieces of at most COPY_IO bytes, from the copy bitmap."""
        side = self.side
        per = max(1, COPY_IO // side.chunk_size)
        with side.bitmap_lock:
            runs = list(side.copy_map.runs())
        for first, count in runs:
            while count > 0:
                n = min(count, per)
                yield first, n
                first += n
                count -= n

    def _copy_run(self, first: int, count: int) -> int:
        side = self.side
        cs = side.chunk_size
        start = first * cs
        end = min((first + count) * cs, side.data_size)
        sent = 0
        if side.max_rate > 0:  # wait for the bandwidth budget before holding any chunk
            fd, base = side.volume.fd, side.data_offset
            data_bytes = sum(n for _, n, d in _segments(fd, base + start, base + end) if d)
            self.throttle.take(data_bytes)
            if self.stop_flag.is_set():
                return 0  # woken by stop: the run's bits stay set, a later copy takes them
        with side.chunk_locks.hold(first, first + count - 1):
            fd, base = side.volume.fd, side.data_offset
            for pos, length, is_data in list(_segments(fd, base + start, base + end)):
                offset = pos - base
                if is_data:
                    data = os.pread(fd, length, pos)
                    if len(data) != length:
                        raise VolumeError(f"short read at {offset} during copy", errno.EIO)
                    side.request(wire.Write(side.id, offset, data))
                    sent += length
                else:
                    side.request(wire.Zero(side.id, offset, length, may_trim=True))
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
                for first, count in self._runs():
                    if self.stop_flag.is_set():
                        break
                    pending.append((pool.submit(self._copy_run, first, count), count))
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
