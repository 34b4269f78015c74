"""One volume of this node and its replication *legs*: the pair sides that use it.

A volume can be in several pairs at once (SPEC 5 and 6): the primary of a sync leg to a near
site and of an async leg to a far one, or the secondary of one leg and the primary of the
next (the middle of a cascade).  Everything that belongs to the volume rather than to one
pair lives here, once:

* the open image (one :class:`~replicator.volume.Volume`, so one header in memory: a PVID
  change by one leg is seen by every other),
* the bitmap store and its slot table (:mod:`replicator.slot_table`: which leg owns which
  difference and copy bitmap slots),
* the activity log (a mirrored write is in flight for every sync leg at once),
* the client write path (:class:`~replicator.pair.client_io.ClientWrites`), which applies
  every leg's policy to one write.

Rules of the model, checked here and nowhere else:

* a volume *receives* from at most one leg (it is the secondary of at most one pair); two
  primaries writing into one volume would interleave two histories;
* a volume has at most one leg per consistency group;
* the volume's VOL information names the receiving leg if there is one (the volume is that
  pair's S-VOL), else the first primary leg, else it is simplex.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from replicator import faults
from replicator import pair_state as ps
from replicator.bitmap_store import BitmapStore
from replicator.errors import HeaderCorrupt, IllegalState
from replicator.header import PAIR_MAX, Role
from replicator.pair.activity_log import ActivityLog
from replicator.pair.client_io import ClientWrites
from replicator.slot_table import LEGACY_SLOTS, SlotTable
from replicator.volume import Volume

if TYPE_CHECKING:
    from replicator.pair.side import Side


class VolumeLegs:
    """An open volume with its legs (see the module docstring)."""

    def __init__(
        self,
        path: str,
        clock: Callable[[], float],
        log: Callable[[str], None],
        on_empty: Callable[[VolumeLegs], None],
    ) -> None:
        self.volume = Volume.open(path, writable=True)
        self.path = self.volume.path
        self.log = log
        self._on_empty = on_empty
        if self.volume.repair_note is not None:
            log(f"{self.volume.path}: {self.volume.repair_note}")
        h = self.volume.header
        self.store = BitmapStore(self.volume.fd, h)
        try:
            self.table: SlotTable | None = self.store.read_table()
            al_slot = self.table.al_slot if self.table is not None else None
            self.al = ActivityLog(self.store, h.data_size, clock, slot=al_slot)
        except BaseException:
            self.volume.close()
            raise
        #: key -> side, in the order they attached.
        self.legs: dict[str, Side] = {}
        self.lock = threading.Lock()
        self.writes = ClientWrites(self)
        self.closed = False

    # -- legs ---------------------------------------------------------------------------------

    def sides(self) -> tuple[Side, ...]:
        """The legs now (a snapshot, in a fixed order: locks are taken in this order)."""
        return tuple(self.legs.values())

    def receiving(self, but: Side | None = None) -> Side | None:
        """The leg this volume is the secondary of, if any (other than ``but``)."""
        for s in self.legs.values():
            if s is not but and s.record.role is Role.SECONDARY:
                return s
        return None

    def forward_legs(self, origin: Side) -> tuple[Side, ...]:
        """The legs that a change arriving through ``origin`` (the receiving leg) must go on
        to: every other leg on which this volume is the primary."""
        return tuple(
            s for s in self.legs.values() if s is not origin and s.record.role is Role.PRIMARY
        )

    def check_may_join(self, pid: str, group: str, role: Role) -> None:
        """IllegalState unless pair ``pid`` of ``group`` may use this volume as ``role``."""
        for s in self.legs.values():
            if s.record.group == group:
                raise IllegalState(
                    f"volume {self.volume.header.name} is already in group {group} "
                    f"(pair {s.id}): a volume has one leg per consistency group"
                )
        other = self.receiving()
        if role is Role.SECONDARY and other is not None:
            raise IllegalState(
                f"volume {self.volume.header.name} is already the secondary of pair "
                f"{other.id}: a volume receives from one primary only"
            )

    def check_may_receive(self, side: Side) -> None:
        """``side`` is about to become this volume's receiving leg (a swap)."""
        other = self.receiving(but=side)
        if other is not None:
            raise IllegalState(
                f"pair {side.id}: volume {self.volume.header.name} is already the secondary of "
                f"pair {other.id}; a volume receives from one primary only (split or delete "
                f"{other.id} first)"
            )

    def claim_slots(self, key: str) -> tuple[int, int]:
        """Allocate the difference and copy slots of a new leg ``key``, durably (the table is
        written before the caller clears the slots and writes the pair file)."""
        with self.lock:
            table = self._table_for_new()
            grown = table.with_leg(key)
            faults.step("slot table")
            self.store.write_table(grown)
            self.table = grown
            slots = grown.slots_of(key)
            assert slots is not None
            return slots

    def _table_for_new(self) -> SlotTable:
        if self.table is not None:
            return self._without_orphans(self.table)
        # No table yet: a fresh volume, or one whose one pair predates the table (its slots
        # are 0 and 1; attach checked that).
        table = SlotTable(self.store.nslots)
        for s in self.legs.values():
            table = SlotTable(table.nslots, {**table.legs, s.id: LEGACY_SLOTS})
        return table

    def _without_orphans(self, table: SlotTable) -> SlotTable:
        """``table`` without the claims of legs that have no pair file (a create or delete
        interrupted between the table and the pair file)."""
        known = self._ids()
        orphans = sorted(k for k in table.legs if k not in known)
        for k in orphans:
            table = table.without(k)
        if orphans:
            self.log(f"{self.path}: released the bitmap slots of {', '.join(orphans)}")
        return table

    def unclaim(self, key: str) -> None:
        """A claim whose side could not be made is released (the volume closes if no leg is
        left)."""
        with self.lock:
            if self.table is not None and key in self.table.legs and key not in self._ids():
                self.table = self.table.without(key)
                self.store.write_table(self.table)
            empty = not self.legs
        if empty:
            self.close()

    def _ids(self) -> set[str]:
        return {s.id for s in self.legs.values()}

    def attach(self, side: Side) -> None:
        """A leg loaded or created on this volume; its record's slots must be the table's."""
        r = side.record
        with self.lock:
            mine = (r.diff_slot, r.copy_slot)
            if self.table is None:
                if mine != LEGACY_SLOTS or self.legs:
                    raise HeaderCorrupt(
                        f"pair {side.id}: its record names bitmap slots {mine}, but volume "
                        f"{self.volume.header.name} has no slot table"
                    )
            elif self.table.slots_of(side.id) != mine:
                raise HeaderCorrupt(
                    f"pair {side.id}: its record names bitmap slots {mine}, the slot table of "
                    f"volume {self.volume.header.name} says {self.table.slots_of(side.id)}"
                )
            self.legs[side.key] = side

    def detach(self, side: Side, *, release: bool) -> None:
        """A leg goes (``release``: deleted, its slots are free again; after its pair file is
        gone).  The volume closes with its last leg."""
        with self.lock:
            self.legs.pop(side.key, None)
            if release and self.table is not None and side.id in self.table.legs:
                faults.step("release slots")
                self.table = self.table.without(side.id)
                self.store.write_table(self.table)
            empty = not self.legs
        if empty:
            self.close()

    def release_orphans(self) -> None:
        """At start-up, once every pair file is loaded: claims without one are released."""
        with self.lock:
            if self.table is None:
                return
            table = self._without_orphans(self.table)
            if table != self.table:
                self.store.write_table(table)
                self.table = table

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._on_empty(self)
        self.volume.close()

    # -- the VOL information ----------------------------------------------------------------------

    def label(self, changed: ps.PairRecord | None = None) -> None:
        """Keep the VOL information's role and pair id true for all legs (``volume info``
        shows them): the receiving leg, else the first primary leg, else simplex."""

        def record(s: Side) -> ps.PairRecord:
            return changed if changed is not None and changed.name == s.id else s.record

        live = [record(s) for s in self.legs.values() if record(s).state is not ps.State.SMPL]
        ordered = sorted(live, key=lambda r: r.role is not Role.SECONDARY)
        if not ordered:
            role, pair = Role.SIMPLEX, ""
        else:
            role, pair = ordered[0].role, ordered[0].name
        pair = pair.encode()[:PAIR_MAX].decode(errors="ignore")  # the header holds 63 bytes
        h = self.volume.header
        if (h.role, h.pair) != (role, pair):
            faults.step("vol info")
            self.volume.update_info(role=role, pair=pair)
