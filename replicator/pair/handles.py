"""Open client connections on a node, per volume: bound to the volume's legs (its pairs, if
any) and rebound whenever the volume's roles or PVID change under them."""

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
    from replicator.pair.volume_legs import VolumeLegs


class HandleRegistry:
    """Every open :class:`BoundHandle` of a node, by volume (real path)."""

    def __init__(self, manager: PairManager) -> None:
        self.m = manager
        self.handles: dict[str, set[BoundHandle]] = {}
        self.handles_lock = threading.Lock()

    def _refusal_for(self, real: str, legs: VolumeLegs | None) -> VolumeError | None:
        if real in self.m.quarantine.broken:
            return VolumeError(f"{self.m.quarantine.broken[real]}; not served", errno.EIO)
        for side in legs.sides() if legs is not None else ():
            if side.damaged is not None:
                return VolumeError(f"pair {side.id}: {side.damaged}; not served", errno.EIO)
        return None

    def wrap(self, handle: ExportHandle) -> ExportHandle:
        """A new client connection: bound to the volume's legs (if any), registered so that
        it follows every later change (pairvol never serves a stale binding)."""
        real = os.path.realpath(handle.volume.path)
        with self.m.lock:
            legs = self.m.legs_for_path(real)
            refusal = self._refusal_for(real, legs)
            if refusal is not None:
                handle.close()
                raise IllegalState(str(refusal))
            for side in legs.sides() if legs is not None else ():
                if not side.readable():
                    handle.close()
                    raise IllegalState(
                        f"volume {side.doc.volume} is the hidden secondary of pair {side.id} "
                        f"({side.record.state}); clients may not use it until split or takeover"
                    )
            bound = BoundHandle(handle)
            bound.bind(legs, handle.volume.header.pvid, None)
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

    def rebind(self, path: str) -> None:
        """Every open connection of the volume at ``path`` now follows the volume's legs as
        they are (none: plain) and its current PVID; returns once no plain request is left
        in flight on them."""
        real = os.path.realpath(path)
        with self.handles_lock:
            handles = list(self.handles.get(real, ()))
        if not handles:
            return
        legs = self.m.legs_for_path(real)
        refusal = self._refusal_for(real, legs)
        if legs is not None:
            pvid = legs.volume.header.pvid
        else:
            with Volume.open(real) as v:
                pvid = v.header.pvid
        for h in handles:
            h.bind(legs, pvid, refusal)
        quiesce(handles)
        self.m.events.emit(
            "pair.handles.rebound",
            path=real,
            handles=len(handles),
            pair=",".join(s.id for s in legs.sides()) if legs is not None else "",
        )
