"""The bitmap slot table of a volume: which replication leg owns which metadata slots.

Theory of operation
-------------------
A volume's metadata region holds ``nslots`` bitmap slots (docs/format.md, "Bitmap slots").
A volume may be in several pairs at once (SPEC 5 and 6: the primary of a sync leg and of an
async leg, or the secondary of one leg and the primary of the next), and every *leg* (one pair
side on this volume) needs a difference bitmap and a copy bitmap of its own.  The volume's
activity log (4 MiB extents with mirrored writes in flight) is one per volume: a write is
in flight for every leg at once.

The table says who owns what, in the volume itself, so an image moved to another node keeps
its meaning:

* the last slot (``nslots - 1``) holds the table, as a two-slot record (magic ``PVSLOTS``,
  two 2048-byte record slots at the start of the bitmap slot; docs/format.md, "Two-slot
  records");
* slot :data:`AL_SLOT` is the activity log;
* each leg, named by its pair id, owns a ``(diff, copy)`` pair of the other slots.

A volume that never had a table (blank table slot: volumes of earlier versions, and every
volume before its first pair) reads as :meth:`SlotTable.legacy`: a pair recorded with slots
0 and 1 and the log in slot 2, which is exactly what earlier versions used, so their pairs
keep their bitmaps.

Allocation is ordered for crash safety by the caller (replicator/pair): the table naming the
new leg is written *before* the leg's slots are cleared and its pair file is written; a leg is
removed from the table only *after* its pair file is gone.  A crash in between leaves a claim
without a pair file, which start-up releases (:meth:`SlotTable.without`).

The class is pure (no I/O); :mod:`replicator.bitmap_store` reads and writes it.  A table that
does not decode or names impossible slots is :class:`~replicator.errors.HeaderCorrupt`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from replicator.errors import HeaderCorrupt, IllegalState
from replicator.record_codec import SlotCodec

#: The activity log's slot (the slot earlier versions used for it).
AL_SLOT = 2
#: A pair's slots in volumes without a table (earlier versions): difference 0, copy 1.
LEGACY_SLOTS = (0, 1)
TABLE_FORMAT = "pairvol.slot-table"
TABLE_RECORD = SlotCodec(b"PVSLOTS\0", 1, 2048, name="bitmap slot table")
#: The smallest slot count with room for a table, the log and one leg.
MIN_SLOTS = 4


def table_slot(nslots: int) -> int:
    """The bitmap slot that holds the table: the last one."""
    return nslots - 1


@dataclass(frozen=True)
class SlotTable:
    """Which slots of a volume with ``nslots`` bitmap slots each leg owns."""

    nslots: int
    legs: dict[str, tuple[int, int]] = field(default_factory=dict)
    al_slot: int = AL_SLOT

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem is not None:
            raise HeaderCorrupt(f"bitmap slot table: {problem}")

    def _problem(self) -> str | None:
        if self.nslots < MIN_SLOTS:
            return f"{self.nslots} bitmap slots leave no room for a table"
        reserved = {self.al_slot, table_slot(self.nslots)}
        if not 0 <= self.al_slot < table_slot(self.nslots):
            return f"activity log slot {self.al_slot} is outside 0..{self.nslots - 2}"
        seen: dict[int, str] = {}
        for key, (diff, copy) in self.legs.items():
            for slot in (diff, copy):
                if not 0 <= slot < self.nslots or slot in reserved:
                    return f"leg {key} names slot {slot}, which is reserved or outside the region"
                if slot in seen:
                    return f"slot {slot} belongs to both {seen[slot]} and {key}"
                seen[slot] = key
        return None

    # -- the table as data ----------------------------------------------------------------------

    @classmethod
    def legacy(cls, nslots: int, key: str | None = None) -> SlotTable:
        """The table a volume without one implies: ``key`` (the one pair of an earlier
        version, if any) owns slots 0 and 1."""
        return cls(nslots, {key: LEGACY_SLOTS} if key is not None else {})

    def slots_of(self, key: str) -> tuple[int, int] | None:
        return self.legs.get(key)

    def free(self) -> list[int]:
        used = {s for pair in self.legs.values() for s in pair}
        used |= {self.al_slot, table_slot(self.nslots)}
        return [s for s in range(self.nslots) if s not in used]

    def with_leg(self, key: str) -> SlotTable:
        """The table with ``key`` owning two free slots (lowest first); IllegalState if the
        volume has no two free slots left."""
        if key in self.legs:
            raise IllegalState(f"leg {key} already owns bitmap slots {self.legs[key]}")
        free = self.free()
        if len(free) < 2:
            owners = ", ".join(sorted(self.legs)) or "none"
            raise IllegalState(
                f"no free bitmap slots: the volume's {self.nslots} slots hold {len(self.legs)} "
                f"legs ({owners}), the activity log and this table"
            )
        return SlotTable(self.nslots, {**self.legs, key: (free[0], free[1])}, self.al_slot)

    def without(self, key: str) -> SlotTable:
        legs = dict(self.legs)
        legs.pop(key, None)
        return SlotTable(self.nslots, legs, self.al_slot)

    # -- the record's payload ---------------------------------------------------------------------

    def to_payload(self) -> bytes:
        return json.dumps(
            {
                "format": TABLE_FORMAT,
                "version": 1,
                "nslots": self.nslots,
                "al": self.al_slot,
                "legs": {k: list(v) for k, v in sorted(self.legs.items())},
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_payload(cls, payload: bytes, nslots: int) -> SlotTable:
        try:
            doc = json.loads(payload.decode())
            if doc.get("format") != TABLE_FORMAT or doc.get("version") != 1:
                raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}")
            if doc["nslots"] != nslots:
                raise ValueError(f"it is for {doc['nslots']} slots, the volume has {nslots}")
            legs: dict[str, tuple[int, int]] = {}
            for key, pair in doc["legs"].items():
                diff, copy = pair
                if not (isinstance(diff, int) and isinstance(copy, int)):
                    raise ValueError(f"leg {key}: slots {pair!r} are not numbers")
                legs[str(key)] = (diff, copy)
            al = doc["al"]
            if not isinstance(al, int):
                raise ValueError(f"activity log slot {al!r} is not a number")
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise HeaderCorrupt(f"bitmap slot table is damaged: {e}") from e
        return cls(nslots, legs, al)
