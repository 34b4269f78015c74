"""The activity log of a primary: coarse extents with mirrored writes in flight.

After a crash of the primary, a write may be on the primary and not on the secondary although
no difference bit says so.  The log (one per volume, shared by all its legs: the slot table's
activity-log slot, :data:`AL_EXTENT` per bit)
covers every extent with writes in flight: a write into an extent not yet in the log costs one
``fdatasync`` of the log first (DRBD's answer to "a bit per write doubles the cost").  Extents
idle for :data:`AL_IDLE` seconds are cleared.  A side that starts with a non-empty log folds it
into its difference bitmap (:meth:`ActivityLog.take`) and suspends, so a resync copies exactly
those extents.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from replicator.bitmap import Bitmap
from replicator.bitmap_store import BitmapStore
from replicator.slot_table import AL_SLOT

__all__ = ["AL_EXTENT", "AL_IDLE", "AL_SLOT", "ActivityLog"]
AL_EXTENT = 4 << 20
AL_IDLE = 5.0


class ActivityLog:
    """A volume's activity log, persisted in bitmap slot ``slot`` (:data:`AL_SLOT` unless the
    slot table says otherwise)."""

    def __init__(
        self,
        store: BitmapStore,
        data_size: int,
        clock: Callable[[], float],
        *,
        slot: int | None = None,
    ) -> None:
        self.slot = AL_SLOT if slot is None else slot
        self._store = store
        self._data_size = data_size
        self._clock = clock
        self._bits = store.load(self.slot, AL_EXTENT)
        self._inflight: dict[int, int] = {}
        self._used: dict[int, float] = {}
        self._lock = threading.Lock()

    def enter(self, offset: int, length: int) -> range:
        """A mirrored write to ``[offset, offset + length)`` begins: its extents are in the
        log, durably, when this returns."""
        extents = range(offset // AL_EXTENT, (offset + max(length, 1) - 1) // AL_EXTENT + 1)
        with self._lock:
            fresh = False
            for e in extents:
                self._inflight[e] = self._inflight.get(e, 0) + 1
                if self._bits.set_chunk(e):
                    fresh = True
            if fresh:
                self._store.flush(self.slot, self._bits)
        return extents

    def leave(self, extents: range) -> None:
        now = self._clock()
        with self._lock:
            for e in extents:
                self._inflight[e] -= 1
                self._used[e] = now

    def expire(self, idle: float = AL_IDLE) -> None:
        """Clear the extents idle for ``idle`` seconds (0: every extent without a write)."""
        now = self._clock()
        with self._lock:
            gone = [
                e
                for e, used in self._used.items()
                if not self._inflight.get(e) and now - used >= idle
            ]
            for e in gone:
                self._bits.clear_chunk(e)
                del self._used[e]
                self._inflight.pop(e, None)
            if gone:
                self._store.flush(self.slot, self._bits)

    def expire_all(self) -> None:
        """Nothing is in flight (the gate is closed, or the side closes): empty the log."""
        self.expire(0.0)

    def take(self) -> list[int]:
        """At start-up: the extents that may differ between the sides; the log is then empty
        (the caller has made them durable in its difference bitmap first)."""
        with self._lock:
            return list(self._bits.iter_set())

    def clear(self) -> None:
        with self._lock:
            self._bits = Bitmap(self._data_size, AL_EXTENT)
            self._store.clear(self.slot)
            self._inflight.clear()
            self._used.clear()
