"""The pull after a forced takeover of an incomplete copy (SPEC section 4): the taken-over
side fetches, chunk by chunk, every chunk it never received from the old primary, whose
storage node still answers.

A client's read or write of a chunk not here yet fetches it first, on demand (copy on read,
and a write smaller than a chunk merges into the fetched chunk, as dm-clone does), ahead of
the background pull: :meth:`PullEngine.hydrate`.  While the old primary cannot be reached,
such a read or write fails with EIO (one log line): a half-built image never serves wrong
data (``client_io.ClientWrites.pending``).

Ordering: a chunk's data is written and synced before its pending bit is cleared durably,
so a crash never leaves a cleared bit over missing data; a restart resumes from the
persisted bits (``RESUME_PULL``).  A chunk written here since the takeover (its bit in the
difference bitmap, which the takeover started again) is never fetched, and a client write
of a chunk pulled since the last sync makes it durable first.  The old primary is fenced
(stale) and writes nothing, so what it sends is the data of the takeover's point in time.
When the last chunk is in, the side is consistent (``CopyDone`` in SSWS) and ``resync
--swap`` can make it the primary.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import TYPE_CHECKING

from replicator import pair_state as ps
from replicator import wire
from replicator.errors import PairvolError, ProtocolError, UsageError, VolumeError
from replicator.header import Role
from replicator.journal import EntryKind
from replicator.pair.copy_engine import Throttle
from replicator.pair.host import REQUEST_TIMEOUT

if TYPE_CHECKING:
    from replicator.pair.side import Side

SYNC_EVERY = 64  # chunks pulled between two syncs of the data and of the pending bitmap
ON_DEMAND_TIMEOUT = 10.0  # seconds a client's read or write waits for a chunk on demand


def serve_chunk(side: Side, msg: wire.ChunkRequest) -> wire.Chunk:
    """The old primary's answer to a ChunkRequest: the chunk's bytes, read from its volume."""
    if side.record.role is not Role.PRIMARY:
        raise ProtocolError(f"pair {side.id}: only the old primary answers chunk requests")
    cs = side.chunk_size
    if msg.index >= side.copy_map.nchunks:
        raise UsageError(f"pair {side.id}: chunk {msg.index} is outside the volume")
    length = min(cs, side.data_size - msg.index * cs)
    data = os.pread(side.volume.fd, length, side.data_offset + msg.index * cs)
    if len(data) != length:
        raise VolumeError(f"short read of chunk {msg.index} of {side.doc.volume}", errno.EIO)
    return wire.Chunk(side.id, msg.index, data)


class PullEngine:
    """Pulls the set chunks of a taken-over side's copy bitmap from the old primary."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"pull {side.id}", daemon=True)
        self.started = side.clock()
        self.sent_bytes = 0  # bytes received (the display's rate counts them)
        self.copied = 0
        self.on_demand = 0  # chunks fetched for a client's read or write
        self.on_demand_seconds = 0.0
        self._unsynced: set[int] = set()  # pulled chunks whose data and bit are not durable
        self._sync_lock = threading.Lock()
        self.total = 0
        self.throttle = Throttle(lambda: side.max_rate, self.stop_flag)  # takeover --max-rate

    def start(self) -> None:
        self.thread.start()

    @property
    def fetch_ms_avg(self) -> float | None:
        """The mean time of a fetch on demand, in milliseconds (None before the first)."""
        if not self.on_demand:
            return None
        return round(1000 * self.on_demand_seconds / self.on_demand, 2)

    def stop(self) -> None:
        self.stop_flag.set()

    def _next(self) -> int | None:
        side = self.side
        with side.bitmap_lock:
            return next(side.copy_map.iter_set(), None)

    def _pull(self, chunk: int) -> None:
        side = self.side
        length = min(side.chunk_size, side.data_size - chunk * side.chunk_size)
        self.throttle.take(length)
        if self.fetch(chunk, REQUEST_TIMEOUT):
            self.sent_bytes += length
        self.copied += 1

    def fetch(self, chunk: int, timeout: float) -> bool:
        """Bring ``chunk`` here if it is still pending, under its lock: the pull's step, and
        a client's on demand (:meth:`hydrate`).  False if it was not pending any more, or
        was written here since the takeover (its bit is then cleared: the local data is
        newer; only a crash between a pull's clear and its sync leaves both bits)."""
        side = self.side
        cs = side.chunk_size
        length = min(cs, side.data_size - chunk * cs)
        with side.chunk_locks.hold(chunk, chunk):
            with side.bitmap_lock:
                if not side.copy_map.test(chunk):
                    return False  # fetched meanwhile (on demand, or by the pull)
                if side.diff_map.test(chunk):
                    side.copy_map.clear_chunk(chunk)
                    return False
            reply = side.request(wire.ChunkRequest(side.id, chunk), timeout)
            if not isinstance(reply, wire.Chunk) or reply.index != chunk:
                raise ProtocolError(f"pair {side.id}: the old primary answered oddly")
            if len(reply.data) != length:
                raise ProtocolError(f"pair {side.id}: chunk {chunk} came with the wrong size")
            with self._sync_lock:  # never between a sync's data and its bits
                # The chunk goes on to the volume's other legs too (they never had it either).
                side.apply_entry(EntryKind.WRITE, chunk * cs, length, reply.data, False)
                with side.bitmap_lock:
                    side.copy_map.clear_chunk(chunk)  # in memory; durable after the data's sync
                    self._unsynced.add(chunk)
        return True

    def hydrate(self, first: int, last: int) -> None:
        """A client reads or writes chunks ``first..last``: each still pending is fetched
        now (copy on read, SPEC 4), ahead of the background pull.  Raises what the request
        raises (the caller refuses the client's request)."""
        side = self.side
        for chunk in range(first, last + 1):
            with side.bitmap_lock:
                pending = side.copy_map.test(chunk)
            if pending:
                t0 = time.monotonic()
                if self.fetch(chunk, ON_DEMAND_TIMEOUT):
                    self.on_demand += 1
                    self.on_demand_seconds += time.monotonic() - t0

    def _sync(self) -> None:
        """The pulled data is durable, then the cleared bits are (the pull's thread, or a
        client's write of a chunk just pulled)."""
        with self._sync_lock:
            os.fdatasync(self.side.volume.fd)
            self.side.flush_copy_map()
            with self.side.bitmap_lock:
                self._unsynced.clear()

    def before_write(self, first: int, last: int) -> None:
        """A client is about to write chunks ``first..last`` (their difference bits go to
        disk first): any of them pulled since the last sync is made durable, data then
        bit, before.  Otherwise a crash could leave its pending bit set under the write's
        difference bit, over pulled data that never reached the disk."""
        with self.side.bitmap_lock:
            due = any(c in self._unsynced for c in range(first, last + 1))
        if due:
            self._sync()

    def _run(self) -> None:
        side = self.side
        with side.bitmap_lock:
            self.total = side.copy_map.count()
        try:
            while not self.stop_flag.is_set():
                chunk = self._next()
                if chunk is None:
                    break
                self._pull(chunk)
                if self.copied % SYNC_EVERY == 0:
                    self._sync()
                    side.try_fire(ps.CopyProgress(self.copied, max(self.total, self.copied)))
            self._sync()
            if self.stop_flag.is_set():
                return
            side.events.emit(
                "pair.pull.done",
                pair=side.id,
                chunks=self.copied,
                fetched_on_demand=self.on_demand,
                fetch_ms_avg=self.fetch_ms_avg or 0.0,
            )
            side.log(f"pair {side.id}: pulled the {self.copied} chunks it lacked; consistent")
            total = max(self.total, self.copied)
            if side.try_fire(ps.CopyProgress(total, total)):
                side.try_fire(ps.CopyDone())
        except (PairvolError, OSError) as e:
            try:
                self._sync()
            except (PairvolError, OSError) as sync_error:
                side.log(f"pair {side.id}: saving the pull's progress failed too: {sync_error}")
            if not self.stop_flag.is_set():
                side.link_failed(f"pull failed: {e}")
