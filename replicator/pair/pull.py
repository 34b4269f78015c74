"""The pull after a forced takeover of an incomplete copy (SPEC section 4): the taken-over
side fetches, chunk by chunk, every chunk it never received from the old primary, whose
storage node still answers.

Every decision (fetch or not, skip or copy, what to make durable before what) is
:mod:`replicator.pair.hydration`'s, a pure core; this module carries out its plans
(:func:`carry_out`).  A client's read of a chunk not here yet fetches it first, on demand
(copy on read), ahead of the background pull, and so does a write into part of one, which
then merges (as dm-clone does); a write that covers a whole chunk fetches nothing.  A read
gets the fetched bytes at once; their store into the volume follows on a thread of the pull's,
which holds the chunk's lock until it is done.  While the
old primary cannot be reached, a read or write that needs a fetch fails with EIO (one log
line): a half-built image never serves wrong data (``client_io.ClientWrites``).

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

import collections
import errno
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from replicator import pair_state as ps
from replicator import wire
from replicator.direct_io import DirectWriter
from replicator.errors import PairvolError, ProtocolError, UsageError, VolumeError
from replicator.header import Role
from replicator.journal import EntryKind
from replicator.pair import hydration
from replicator.pair.copy_engine import Throttle, bitmap_runs
from replicator.pair.host import REQUEST_TIMEOUT
from replicator.pair.hydration import Step

if TYPE_CHECKING:
    from replicator.pair.side import Side

SYNC_EVERY = hydration.SYNC_EVERY  # chunks pulled between two syncs of data and pending bits
PULL_PIECE = 4 << 20  # bytes the background pull asks for in one request (whole chunks)
PULL_DEPTH = 8  # requests of the background pull in flight at once
#: Threads landing the answers (writing them to the volume) at once.  Writes of one file take
#: its inode lock in turn, and waiters spin on it: 4 threads pulled no faster than 2 (A B A B,
#: 1 GiB: 280-305 against 286-312 MiB/s) and doubled a fetch on demand's wait meanwhile.
PULL_WORKERS = 2
#: The most one pwrite of a landing writes.  A buffered write holds the file's inode lock
#: (ext4) for all of it: four landing threads writing 4 MiB each made a client's write, or a
#: fetch on demand's store, wait 15-50 ms for the lock.
STORE_SLICE = 256 << 10
ON_DEMAND_TIMEOUT = 10.0  # seconds a client's read or write waits for a chunk on demand
STORE_WORKERS = 2  # threads storing the chunks fetched for clients' reads


def serve_chunk(side: Side, msg: wire.ChunkRequest) -> wire.Chunk:
    """The old primary's answer to a ChunkRequest: the chunks' bytes, read from its volume
    (one read; the last chunk of the volume may be short)."""
    if side.record.role is not Role.PRIMARY:
        raise ProtocolError(f"pair {side.id}: only the old primary answers chunk requests")
    cs = side.chunk_size
    nchunks = side.copy_map.nchunks
    if msg.index >= nchunks or msg.count > nchunks - msg.index:
        last = msg.index + msg.count - 1
        raise UsageError(f"pair {side.id}: chunks {msg.index}..{last} are outside the volume")
    if msg.count * cs > wire.MAX_DATA:
        raise UsageError(f"pair {side.id}: {msg.count} chunks do not fit one Chunk answer")
    offset = msg.index * cs
    length = min(msg.count * cs, side.data_size - offset)
    data = os.pread(side.volume.fd, length, side.data_offset + offset)
    if len(data) != length:
        raise VolumeError(f"short read of chunk {msg.index} of {side.doc.volume}", errno.EIO)
    return wire.Chunk(side.id, msg.index, data)


class ReadLatency:
    """The latency of clients' reads while a pull runs, by kind: ``fetched`` (the read
    needed a chunk fetched on demand) or ``local`` (everything it read was here); the
    newest :data:`SAMPLES` of each, for the display's percentiles (issue 11, item 8)."""

    SAMPLES = 4096
    KINDS = ("fetched", "local")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, collections.deque[float]] = {
            k: collections.deque(maxlen=self.SAMPLES) for k in self.KINDS
        }
        self._counts = dict.fromkeys(self.KINDS, 0)

    def note(self, fetched: bool, seconds: float) -> None:
        kind = "fetched" if fetched else "local"
        with self._lock:
            self._seconds[kind].append(seconds)
            self._counts[kind] += 1

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """Per kind: how many reads, and the p50/p99 of the newest, in milliseconds."""
        out: dict[str, dict[str, float | int | None]] = {}
        with self._lock:
            for kind in self.KINDS:
                ms = sorted(1000 * t for t in self._seconds[kind])
                out[kind] = {
                    "count": self._counts[kind],
                    "p50_ms": _nearest_rank(ms, 0.50),
                    "p99_ms": _nearest_rank(ms, 0.99),
                }
        return out


def _nearest_rank(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3)


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
        self.reads = ReadLatency()  # clients' reads meanwhile, fetched or local
        self._unsynced: set[int] = set()  # pulled chunks whose data and bit are not durable
        self._sync_lock = threading.Lock()  # one sync at a time
        self._count_lock = threading.Lock()
        self.total = 0
        self.throttle = Throttle(lambda: side.pull_rate, self.stop_flag)  # takeover --max-rate
        # Stores of chunks fetched for reads, after the read has its bytes (fetch_for_read).
        self._stores = ThreadPoolExecutor(STORE_WORKERS, thread_name_prefix=f"store {side.id}")
        self._direct: DirectWriter | None = None  # the landings' writer while _run runs

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

    def _pieces(self) -> Iterator[tuple[int, int]]:
        """(first chunk, count) pieces of the pending chunks, ascending, a run of the bitmap
        at a time, each at most :data:`PULL_PIECE` bytes and cut when it is asked for: a
        chunk fetched on demand or written here since is not asked for again (one that goes
        meanwhile, while its piece is in flight, is left alone when the piece lands)."""
        side = self.side
        for first, count in bitmap_runs(side.bitmap_lock, side.copy_map, self.stop_flag):
            pos = first + count
            at = first
            while at < pos:  # each piece cut from the bitmap as it is now
                limit = self._piece_chunks()
                with side.bitmap_lock:
                    while at < pos and not side.copy_map.test(at):
                        at += 1  # fetched on demand, or written here, since the walk began
                    n = 0
                    while n < min(limit, pos - at) and side.copy_map.test(at + n):
                        n += 1
                if n:
                    yield at, n
                at += n

    def _piece_chunks(self) -> int:
        """Chunks per request: :data:`PULL_PIECE`, or under a ``--max-rate`` at most a
        quarter second of it (a slow pull moves chunk by chunk, not in bursts)."""
        cs = self.side.chunk_size
        rate = self.side.pull_rate
        piece = PULL_PIECE if rate <= 0 else min(PULL_PIECE, rate // 4)
        return max(1, piece // cs)

    def _length(self, first: int, count: int = 1) -> int:
        cs = self.side.chunk_size
        return min(count * cs, self.side.data_size - first * cs)

    def _check(self, first: int, count: int, reply: wire.Message) -> bytes | memoryview:
        if not isinstance(reply, wire.Chunk) or reply.index != first:
            raise ProtocolError(f"pair {self.side.id}: the old primary answered oddly")
        if len(reply.data) != self._length(first, count):
            raise ProtocolError(f"pair {self.side.id}: chunk {first} came with the wrong size")
        return reply.data

    def _pass(self, pool: ThreadPoolExecutor) -> None:
        """One walk over the pending chunks, :data:`PULL_DEPTH` requests of a piece each in
        flight: a piece is asked for without its locks and landed under them by one of the
        pool's :data:`PULL_WORKERS` (writes into the volume while the next pieces come),
        each chunk's step decided again then (a chunk fetched on demand or written here since
        is left alone).  The old primary is fenced and its data does not change, so an answer
        that waited is still the takeover's point in time."""
        side = self.side
        flight: collections.deque[Future[None]] = collections.deque()

        def land_oldest() -> None:
            flight.popleft().result()  # raises what the landing raised

        for first, count in self._pieces():
            length = self._length(first, count)
            if self.throttle.would_wait(length):  # a --max-rate: land, then wait
                while flight:
                    land_oldest()
            self.throttle.take(length)
            if self.stop_flag.is_set():
                break
            request = wire.ChunkRequest(side.id, first, count)
            collect = side.send(request, REQUEST_TIMEOUT, bulk=True)  # fetches on demand jump it
            flight.append(pool.submit(self._land, first, count, collect))
            while len(flight) >= PULL_DEPTH or (flight and flight[0].done()):
                land_oldest()
        while flight:
            land_oldest()

    def _land(self, first: int, count: int, collect: Callable[[], wire.Message]) -> None:
        """Store a piece's answer: under the piece's chunk locks, each run of its chunks
        that still lacks goes to the volume in one write."""
        side = self.side
        data = memoryview(self._check(first, count, collect()))
        cs = side.chunk_size
        stored = 0
        with side.chunk_locks.hold(first, first + count - 1):
            copy = [c for c in range(first, first + count) if self._decide(c)]
            for at, n in _runs(copy):
                lo = (at - first) * cs
                piece = data[lo : lo + self._length(at, n)]
                self._store(at, n, piece, self._direct)
                stored += len(piece)
        with self._count_lock:
            before = self.copied
            self.copied += count
            self.sent_bytes += stored
            copied = self.copied
        if hydration.sync_due(before, copied):
            self._sync()
            side.try_fire(ps.CopyProgress(copied, max(self.total, copied)))

    def fetch(self, chunk: int, timeout: float) -> bool:
        """Bring ``chunk`` here if it is still pending, under its lock: a client's fetch on
        demand (:meth:`hydrate`).  False if it was not pending any more, or was written here
        since the takeover (its bit is then cleared: the local data is newer)."""
        with self.side.chunk_locks.hold(chunk, chunk):
            return self.fetch_held(chunk, timeout)

    def fetch_held(self, chunk: int, timeout: float) -> bool:
        """:meth:`fetch`, the caller holding the chunk's lock: the chunk's copy step is
        decided (again) under it, then carried out."""
        if not self._decide(chunk):
            return False  # fetched meanwhile (on demand, or by the pull), or written here
        reply = self.side.request(wire.ChunkRequest(self.side.id, chunk), timeout)
        self._store(chunk, 1, self._check(chunk, 1, reply))
        return True

    def _decide(self, chunk: int) -> bool:
        """The chunk's copy step, under its lock: True to copy it; a stale bit is dropped."""
        side = self.side
        with side.bitmap_lock:
            plan = hydration.copy_step(chunk, chunk_bits(side, (chunk,))[chunk])
            drop(side, plan.chunks(Step.DROP))
        return bool(plan.chunks(Step.COPY))

    def _store(
        self, first: int, count: int, data: bytes | memoryview, direct: DirectWriter | None = None
    ) -> None:
        """Chunks ``first..first+count-1`` go to the volume in writes of at most
        :data:`STORE_SLICE` (and to its other legs, which never had them either), or of
        its buffer's size through ``direct`` (the pull's landings: beneath the page cache,
        where they can be); then their pending bits are cleared in memory, durable with a
        later sync (:meth:`_sync`: its ``fdatasync`` covers direct writes too)."""
        side = self.side
        at = first * side.chunk_size
        view = memoryview(data)
        step = direct.buffer_size if direct is not None and direct.usable else STORE_SLICE
        for lo in range(0, len(view), step):
            piece = view[lo : lo + step]
            side.replica.apply_entry(EntryKind.WRITE, at + lo, len(piece), piece, False, direct)
        with side.bitmap_lock:
            side.copy_map.clear_range(first, count)
            self._unsynced.update(range(first, first + count))

    def fetch_for_client(self, chunk: int, *, held: bool = False) -> None:
        """A client's fetch on demand (a ``FETCH`` of its plan), counted for the display;
        ``held``: the caller holds the chunk's lock (a write holds its chunks')."""
        t0 = time.monotonic()
        fetch = self.fetch_held if held else self.fetch
        if fetch(chunk, ON_DEMAND_TIMEOUT):
            self.on_demand += 1
            self.on_demand_seconds += time.monotonic() - t0

    def fetch_for_read(self, chunk: int) -> bytes | memoryview | None:
        """A client's read of ``chunk`` (a ``FETCH`` of its plan): if still pending, fetched
        under its lock and returned at once (None: not pending any more, read it here).  Its
        store waits behind the pull's writes (the file's inode lock, its dirty pages: 5-50 ms
        while the pull runs at full speed), so it goes to the pull's store threads, which
        hold the chunk's lock until the data is in the volume and its bit is clear: a write
        of the chunk, or another read of it, waits for that; the pull skips it then."""
        side = self.side
        t0 = time.monotonic()
        release = side.chunk_locks.take(chunk, chunk)
        try:
            if not self._decide(chunk):
                release()
                return None  # fetched meanwhile (on demand, or by the pull), or written here
            reply = side.request(wire.ChunkRequest(side.id, chunk), ON_DEMAND_TIMEOUT)
            data = self._check(chunk, 1, reply)
        except BaseException:
            release()
            raise
        self.on_demand += 1
        self.on_demand_seconds += time.monotonic() - t0

        def store() -> None:
            try:
                self._store(chunk, 1, data)
            except (PairvolError, OSError) as e:  # still pending: fetched again later
                side.log(f"pair {side.id}: storing chunk {chunk} fetched for a read: {e}")
            finally:
                release()

        try:
            self._stores.submit(store)
        except RuntimeError:  # the pull is over (its stores were awaited): store it here
            store()
        return data

    def _await_stores(self) -> None:
        """Every store of a chunk fetched for a read is done (before the pull's last sync)."""
        self._stores.shutdown(wait=True)

    def hydrate(self, first: int, last: int) -> None:
        """A client reads chunks ``first..last``: each still pending is fetched now (copy
        on read, SPEC 4), ahead of the background pull.  Raises what the request raises
        (the caller refuses the client's request)."""
        side = self.side
        for chunk in range(first, last + 1):
            with side.bitmap_lock:
                pending = side.copy_map.test(chunk)
            if pending:
                self.fetch_for_client(chunk)  # decided again under the chunk's lock

    def _sync(self) -> None:
        """The pulled data is durable, then the cleared bits are (the pull's landing threads,
        or a client's write of a chunk just pulled).  The bitmap's image is taken first,
        under the bitmap lock, then the volume's ``fdatasync``, then the image's changed
        pages are written: a bit clear in the image was cleared after its data was written
        (:meth:`_store`), so before the ``fdatasync`` began.  Stores go on meanwhile; what
        they clear stays dirty for the next sync."""
        side = self.side
        with self._sync_lock:
            with side.bitmap_lock:
                image = side.copy_map.copy()
                pages = side.copy_map.take_dirty_pages()
                synced = set(self._unsynced)
            try:
                os.fdatasync(side.volume.fd)
                side.store.save_pages(side.record.copy_slot, image, pages)
            except BaseException:
                with side.bitmap_lock:
                    side.copy_map.mark_pages_dirty(pages)
                raise
            with side.bitmap_lock:
                self._unsynced -= synced

    def save_progress(self) -> None:
        """What the pull landed is durable, data then bits (a side closing)."""
        self._await_stores()
        self._sync()

    def before_write(self, first: int, last: int) -> None:
        """A client is about to write chunks ``first..last`` (their difference bits go to
        disk first): any of them pulled since the last sync is made durable, data then
        bit, before (rule 3 of :mod:`~replicator.pair.hydration`)."""
        with self.side.bitmap_lock:
            due = any(c in self._unsynced for c in range(first, last + 1))
        if due:
            self._sync()

    def _run(self) -> None:
        side = self.side
        with side.bitmap_lock:
            self.total = side.copy_map.count()
        try:
            # A pass lands every chunk it walked; a bit set behind it (none is, today) would
            # be taken by the next pass: done when a pass starts with nothing pending.
            self._direct = DirectWriter(side.volume.fd)
            try:
                with ThreadPoolExecutor(PULL_WORKERS, thread_name_prefix=f"pull {side.id}") as pool:
                    while not self.stop_flag.is_set():
                        with side.bitmap_lock:
                            if not side.copy_map.count():
                                break
                        self._pass(pool)
            finally:  # every landing is over (the pool is shut down)
                direct, self._direct = self._direct, None
                direct.close()
            self._await_stores()
            self._sync()
            if self.stop_flag.is_set():
                return
            side.events.emit(
                "pair.pull.done",
                pair=side.id,
                chunks=self.copied,
                fetched_on_demand=self.on_demand,
                fetch_ms_avg=self.fetch_ms_avg or 0.0,
                read_latency=self.reads.summary(),
            )
            side.log(f"pair {side.id}: pulled the {self.copied} chunks it lacked; consistent")
            # Durable before the move that ends the pull: at this epoch the old primary has
            # nothing this side lacks (a swap back copies only what was written here).
            with side.state_lock:
                side.doc.pulled_epoch = side.record.epoch
                side.doc.pull_rate = None  # the pair's own rate from now on
                side.save()
            total = max(self.total, self.copied)
            if side.try_fire(ps.CopyProgress(total, total)):
                side.try_fire(ps.CopyDone())
        except (PairvolError, OSError) as e:
            try:
                self._await_stores()
                self._sync()
            except (PairvolError, OSError) as sync_error:
                side.log(f"pair {side.id}: saving the pull's progress failed too: {sync_error}")
            if not self.stop_flag.is_set():
                side.link_failed(f"pull failed: {e}")


def _runs(chunks: list[int]) -> Iterator[tuple[int, int]]:
    """(first, count) runs of consecutive chunks in ascending ``chunks``."""
    i = 0
    while i < len(chunks):
        j = i + 1
        while j < len(chunks) and chunks[j] == chunks[j - 1] + 1:
            j += 1
        yield chunks[i], j - i
        i = j


# -- carrying out the core's plans (replicator/pair/hydration.py) -----------------------------


def chunk_bits(side: Side, chunks: Iterable[int]) -> dict[int, hydration.Bits]:
    """The three facts about each of ``chunks``; the caller holds ``side.bitmap_lock``."""
    engine = side.engine if isinstance(side.engine, PullEngine) else None
    unsynced = engine._unsynced if engine is not None else set()
    return {
        c: hydration.Bits(side.copy_map.test(c), side.diff_map.test(c), c in unsynced)
        for c in chunks
    }


def drop(side: Side, chunks: Iterable[int]) -> None:
    """Clear stale pending bits (in memory): only of chunks written here since the takeover,
    whose data is newer.  The caller holds ``side.bitmap_lock``."""
    for c in chunks:
        if side.diff_map.test(c):
            side.copy_map.clear_chunk(c)


def record(side: Side, chunks: Iterable[int]) -> None:
    """Set the chunks' written bits (the difference bitmap), durably."""
    with side.bitmap_lock:
        changed = [c for c in chunks if side.diff_map.set_chunk(c)]
        if changed:
            side.store.flush(side.record.diff_slot, side.diff_map)


def carry_out(side: Side, actions: Iterable[hydration.Action], *, held: bool = False) -> None:
    """Carry out a plan's actions in order, each finished before the next (the client's own
    ``READ`` or ``WRITE`` is the caller's: split the plan there).  ``held``: the caller holds
    the locks of the plan's chunks.  A ``FETCH`` or a ``SYNC`` raises what its request or
    its write raises."""
    engine = side.engine if isinstance(side.engine, PullEngine) else None
    for action in actions:
        step = action.step
        if step is Step.DROP:
            with side.bitmap_lock:
                drop(side, action.chunks)
        elif step is Step.FETCH:
            if engine is None:  # a plan fetches only while the pull's engine is there
                raise VolumeError(f"pair {side.id}: no pull to fetch chunks with", errno.EIO)
            for c in action.chunks:
                engine.fetch_for_client(c, held=held)
        elif step is Step.SYNC:
            if engine is not None:
                engine._sync()
            else:  # nothing was pulled since the engine went; the same order all the same
                os.fdatasync(side.volume.fd)
                side.flush_copy_map()
        elif step is Step.RECORD:
            record(side, action.chunks)
        elif step is Step.SYNC_DATA:
            os.fdatasync(side.volume.fd)
        else:  # COPY is the engine's own (fetch_held); READ and WRITE are the caller's
            raise ValueError(f"pair {side.id}: {step} is not carried out here")
