"""Preparing and starting a side's copies: which chunks a copy takes (its bitmap, durable
before the difference bitmap may forget), the peer's bitmaps it needs, and the engine."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from replicator import faults, wire
from replicator import pair_state as ps
from replicator.bitmap import Bitmap
from replicator.errors import ProtocolError
from replicator.header import Role
from replicator.pair.copy_engine import CopyEngine
from replicator.pair.pull import PullEngine

if TYPE_CHECKING:
    from replicator.pair.side import Side

ENGINE_JOIN = 20.0


class CopyControl:
    """One side's copies."""

    def __init__(self, side: Side) -> None:
        self.side = side

    def fetch_bitmap(self, which: ps.BitmapRef) -> None:
        side = self.side
        kind = "pending" if which is ps.BitmapRef.PEER_PENDING else "diff"
        reply = side.request(wire.BitmapRequest(side.id, kind))
        if not isinstance(reply, wire.Bitmap) or not reply.last or reply.offset:
            raise ProtocolError(f"pair {side.id}: the peer answered a bitmap request oddly")
        if (reply.data_size, reply.chunk_size) != (side.data_size, side.chunk_size):
            raise ProtocolError(f"pair {side.id}: the peer's bitmap has another geometry")
        side.fetched = Bitmap.from_bytes(side.data_size, side.chunk_size, bytes(reply.bits))

    def prepare(self, a: ps.StartCopy) -> None:
        side = self.side
        r = side.record
        with side.bitmap_lock:
            if a.kind is ps.CopyKind.FULL:
                side.copy_map.set_range(0, side.copy_map.nchunks)
            elif a.kind is ps.CopyKind.DIFFERENTIAL:
                side.copy_map |= side.diff_map
                if ps.BitmapRef.PEER_DIFF in a.bitmaps and side.fetched is not None:
                    side.copy_map |= side.fetched
                side.fetched = None
            elif a.kind is ps.CopyKind.PULL:
                self._prepare_pull()
                return
            # Copy bitmap durable first, then the difference bitmap may forget.
            faults.step("copy bitmap")
            side.store.save_all(r.copy_slot, side.copy_map)
            side.copy_map.take_dirty_pages()
            if a.kind is ps.CopyKind.DIFFERENTIAL:
                side.diff_map = Bitmap(side.data_size, side.chunk_size)
                side.store.clear(r.diff_slot)
        side.copy_kind = a.kind

    def fetch_pending(self) -> Bitmap:
        """What this side lacks of the old primary's image, asked of it once it is fenced
        (SPEC 4): its copy bitmap (never copied here) and its difference bitmap (changed
        since; an async primary has folded its journal into it, the entries this side never
        applied).  Nothing here changes: a failure leaves this side as it was."""
        self.fetch_bitmap(ps.BitmapRef.PEER_PENDING)
        side = self.side
        pending, side.fetched = side.fetched, None
        assert pending is not None
        self.fetch_bitmap(ps.BitmapRef.PEER_DIFF)
        changed, side.fetched = side.fetched, None
        assert changed is not None
        pending |= changed
        return pending

    def take_pending(self, pending: Bitmap) -> int:
        """``pending`` goes into our copy bitmap, and our difference bitmap starts again (from
        now on it means *written since the takeover*, which the pull never overwrites), both
        durably and before the record that reveals this side.  The count of chunks pending."""
        side = self.side
        with side.bitmap_lock:
            side.copy_map |= pending
            faults.step("copy bitmap")
            side.store.save_all(side.record.copy_slot, side.copy_map)
            side.copy_map.take_dirty_pages()
            faults.step("diff bitmap")
            side.diff_map = Bitmap(side.data_size, side.chunk_size)
            side.store.clear(side.record.diff_slot)
            return side.copy_map.count()

    def _prepare_pull(self) -> None:
        """The pull (replicator/pair/pull.py) fetches the pending chunks (taken by
        :meth:`take_pending`); a client's read or write of one fetches it first, and fails
        with EIO only while the old primary cannot be reached: a half-built image never
        serves what this side never received."""
        side = self.side
        side.copy_kind = ps.CopyKind.PULL
        side.log(
            f"pair {side.id}: {side.copy_map.count()} chunks never copied here are pulled "
            "from the old primary (on demand first, when a client reads or writes one)"
        )

    def start_engine(self) -> None:
        """The copy engine of a primary in COPY, or the pull of a side taken over before its
        copy was complete (SSWS, ``copy_incomplete``)."""
        side = self.side
        r = side.record
        pulling = r.pulling and r.state is ps.State.SSWS  # PSUE: suspended until the link is back
        if not pulling and (r.role is not Role.PRIMARY or r.state is not ps.State.COPY):
            return
        if side.engine is not None and side.engine.thread.is_alive():
            side.engine.stop()
            side.engine.thread.join(timeout=ENGINE_JOIN)
        side.engine = PullEngine(side) if pulling else CopyEngine(side)
        side.copy_started = time.time()
        side.engine.start()
