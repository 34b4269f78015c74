"""The bitmap slot table (replicator/slot_table.py) and its place in the volume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from replicator import record_codec as rc
from replicator.bitmap_store import BitmapStore
from replicator.errors import HeaderCorrupt, IllegalState
from replicator.slot_table import AL_SLOT, TABLE_RECORD, SlotTable, table_slot
from replicator.volume import Volume

KEYS = st.sampled_from([f"g{i}/p" for i in range(6)])


class TableMachine(RuleBasedStateMachine):
    """SlotTable against a model: a dict of key -> two slots, never overlapping, never the
    log's or the table's, at most three legs in eight slots."""

    def __init__(self) -> None:
        super().__init__()
        self.table = SlotTable(8)
        self.model: dict[str, tuple[int, int]] = {}

    @rule(key=KEYS)
    def add(self, key: str) -> None:
        if key in self.model:
            with pytest.raises(IllegalState, match="already owns"):
                self.table.with_leg(key)
            return
        if len(self.model) == 3:
            with pytest.raises(IllegalState, match="no free bitmap slots"):
                self.table.with_leg(key)
            return
        self.table = self.table.with_leg(key)
        slots = self.table.slots_of(key)
        assert slots is not None
        self.model[key] = slots

    @rule(key=KEYS)
    def remove(self, key: str) -> None:
        self.table = self.table.without(key)
        self.model.pop(key, None)

    @invariant()
    def agrees(self) -> None:
        assert self.table.legs == self.model
        used = [s for pair in self.model.values() for s in pair]
        assert len(used) == len(set(used))
        assert AL_SLOT not in used and table_slot(8) not in used
        assert sorted(self.table.free()) == sorted(set(range(8)) - set(used) - {2, 7})
        again = SlotTable.from_payload(self.table.to_payload(), 8)
        assert again == self.table


TestTableMachine = TableMachine.TestCase


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"not json", "damaged"),
        (b'{"format": "other", "version": 1}', "format"),
        (b'{"format": "pairvol.slot-table", "version": 1, "nslots": 4, "al": 2, "legs": {}}', "4"),
        (
            b'{"format": "pairvol.slot-table", "version": 1, "nslots": 8, "al": 2,'
            b' "legs": {"a/x": [0, 0]}}',
            "both",
        ),
        (
            b'{"format": "pairvol.slot-table", "version": 1, "nslots": 8, "al": 2,'
            b' "legs": {"a/x": [2, 3]}}',
            "reserved",
        ),
        (
            b'{"format": "pairvol.slot-table", "version": 1, "nslots": 8, "al": 2,'
            b' "legs": {"a/x": [0, 7]}}',
            "reserved",
        ),
        (
            b'{"format": "pairvol.slot-table", "version": 1, "nslots": 8, "al": 2,'
            b' "legs": {"a/x": ["0", 1]}}',
            "not numbers",
        ),
    ],
)
def test_a_bad_table_is_header_corrupt(payload: bytes, why: str) -> None:
    with pytest.raises(HeaderCorrupt, match=why):
        SlotTable.from_payload(payload, 8)


@given(st.binary(max_size=300))
def test_any_payload_decodes_or_is_header_corrupt(payload: bytes) -> None:
    try:
        table = SlotTable.from_payload(payload, 8)
    except HeaderCorrupt:
        return  # the one error it may raise
    assert SlotTable.from_payload(table.to_payload(), 8) == table


def test_the_table_in_the_volume_survives_a_torn_update(tmp_path: Path) -> None:
    """A write torn after its first record slot leaves the old table or the new one."""
    path = str(tmp_path / "v.img")
    Volume.create(path, 4 << 20, name="v").close()
    with Volume.open(path, writable=True) as v:
        store = BitmapStore(v.fd, v.header)
        assert store.read_table() is None  # blank: no table yet
        one = SlotTable(store.nslots).with_leg("a/x")
        store.write_table(one)
        assert store.read_table() == one
        two = one.with_leg("b/x")
        # The update's first slot only, as a crash after its sync would leave it.
        off = store.slot_offset(table_slot(store.nslots))
        image = os.pread(v.fd, 2 * TABLE_RECORD.slot_size, off)
        choice = rc.read_pair(TABLE_RECORD, image)
        assert isinstance(choice, rc.Choice)
        plan = rc.next_write(choice)
        slot = TABLE_RECORD.encode(plan.generation, two.to_payload())
        os.pwrite(v.fd, slot, off + plan.first * TABLE_RECORD.slot_size)
        assert store.read_table() == two  # the newer generation wins
        # Torn inside that first slot instead: the old table.
        os.pwrite(v.fd, slot[:100] + b"\xee" * 20, off + plan.first * TABLE_RECORD.slot_size)
        assert store.read_table() == one
        store.write_table(two)  # the next write repairs it
        assert store.read_table() == two
        # The table never touches a bitmap slot of a leg.
        for s in (0, 1, 3, 4):
            assert os.pread(v.fd, 16, store.slot_offset(s)) == bytes(16)
