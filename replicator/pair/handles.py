"""Open client connections on a node, per volume: bound to the volume's pair side (if any)
and rebound whenever the volume's role or PVID changes under them."""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING

from replicator.errors import IllegalState, VolumeError
from replicator.export import ExportHandle, quiesce
from replicator.pair.client_io import BoundHandle
from replicator.volume import Volume

if TYPE_CHECKING:
    from replicator.pair.manager import PairManager
    from replicator.pair.side import Side


class HandleRegistry:
    """Every open :class:`BoundHandle` of a node, by volume (real path)."""

    def __init__(self, manager: PairManager) -> None:
        self.m = manager
        self.handles: dict[str, set[BoundHandle]] = {}
        self.handles_lock = threading.Lock()

    def _refusal_for(self, real: str, side: Side | None) -> VolumeError | None:
        if real in self.m.quarantine.broken:
            return VolumeError(f"{self.m.quarantine.broken[real]}; not served", errno.EIO)
        if side is not None and side.damaged is not None:
            return VolumeError(f"pair {side.id}: {side.damaged}; not served", errno.EIO)
        return None

    def wrap(self, handle: ExportHandle) -> ExportHandle:
        """A new client connection: bound to the volume's pair side (if any), registered so
        that it follows every later change (pairvol never serves a stale binding)."""
        real = os.path.realpath(handle.volume.path)
        with self.m.lock:
            side = self.m.side_for_path(real)
            refusal = self._refusal_for(real, side)
            if refusal is not None:
                handle.close()
                raise IllegalState(str(refusal))
            if side is not None and not side.readable():
                handle.close()
                raise IllegalState(
                    f"volume {side.doc.volume} is the hidden secondary of pair {side.id} "
                    f"({side.record.state}); clients may not use it until split or takeover"
                )
            bound = BoundHandle(handle)
            bound.bind(side, handle.volume.header.pvid, None)
            with self.handles_lock:
                self.handles.setdefault(real, set()).add(bound)
        bound.on_close = self._closed
        return bound

    def _closed(self, handle: BoundHandle) -> None:
        real = os.path.realpath(handle.volume.path)
        with self.handles_lock:
            group = self.handles.get(real)
            if group is not None:
                group.discard(handle)
                if not group:
                    del self.handles[real]

    def rebind(self, path: str, side: Side | None) -> None:
        """Every open connection of the volume at ``path`` now follows ``side`` (None: plain)
        and its current PVID; returns once no plain request is left in flight on them."""
        real = os.path.realpath(path)
        with self.handles_lock:
            handles = list(self.handles.get(real, ()))
        if not handles:
            return
        refusal = self._refusal_for(real, side)
        if side is not None and not side.deleted:
            pvid = side.volume.header.pvid
        else:
            with Volume.open(real) as v:
                pvid = v.header.pvid
        for h in handles:
            h.bind(side, pvid, refusal)
        quiesce(handles)
        self.m.events.emit(
            "pair.handles.rebound",
            path=real,
            handles=len(handles),
            pair=side.id if side is not None else "",
        )
