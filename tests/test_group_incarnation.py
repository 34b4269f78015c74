"""Journal status and acknowledgements carry the group's incarnation (issue 8, item 5): an
acknowledgement about another sequence space is refused, and a secondary whose primary's
sequence space started over drops what it held of the old one."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicator import wire
from replicator.errors import ProtocolError
from replicator.groups import GroupPrimary, GroupSecondary
from replicator.journal import EntryKind

MIB = 1 << 20


def test_an_ack_of_another_incarnation_is_refused(tmp_path: Path) -> None:
    g = GroupPrimary("g", str(tmp_path / "g.journal"), 4 * MIB, 0.8, print)
    try:
        for i in range(3):
            g.journal.append(1, EntryKind.WRITE, i * 4096, b"x" * 4096)
        ours = g.journal.journal_id
        with pytest.raises(ProtocolError, match="incarnation"):
            g.on_ack(wire.JournalAck("g/p", 3, 3, ours ^ 1))
        assert g.applied == 0 and g.journal.first_seq == 1  # nothing released
        g.on_ack(wire.JournalAck("g/p", 3, 2, ours))
        assert g.applied == 2
        g.on_ack(wire.JournalAck("g/p", 3, 3, 0))  # a secondary that has not learnt it yet
        assert g.applied == 3
    finally:
        g.journal.close()


def test_a_new_incarnation_drops_the_old_sequence_space(tmp_path: Path) -> None:
    lines: list[str] = []
    s = GroupSecondary("g", str(tmp_path / "g.rjournal"), 4 * MIB, lines.append)
    try:
        s.note_status(wire.JournalStatus("g/p", 0, 0, 1, incarnation=111))
        for seq in (1, 2, 3):
            s.journal.append(1, EntryKind.WRITE, 0, b"y" * 4096, seq=seq)
        assert s.ack("g/p") == wire.JournalAck("g/p", 3, 0, 111)
        # The primary's journal was reset after corruption: new id, base 10.
        ack = s.note_status(wire.JournalStatus("g/p", 9, 0, 10, incarnation=222))
        assert (ack.received, ack.applied, ack.incarnation) == (9, 9, 222)
        assert any("incarnation changed" in x for x in lines)
        s.journal.append(1, EntryKind.WRITE, 0, b"z" * 4096, seq=10)  # the new space goes on
        assert s.journal.last_seq == 10
    finally:
        s.journal.close()
