"""A header repair made by a node is logged, never silent (issue 7)."""

from __future__ import annotations

from pathlib import Path

from replicator import header as hdr
from replicator.export import Exporter
from replicator.volume import Volume


def _damage_slot_b(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(hdr.SLOT_OFFSETS[1] + 100)
        b = f.read(1)[0]
        f.seek(hdr.SLOT_OFFSETS[1] + 100)
        f.write(bytes([b ^ 0xFF]))


def test_a_repair_on_open_is_logged_once_with_what_was_kept(tmp_path: Path) -> None:
    p = tmp_path / "v1"
    Volume.create(str(p), 1 << 20, name="v1").close()
    _damage_slot_b(p)
    lines: list[str] = []
    ex = Exporter(warn=lines.append)
    ex.config("dir", str(tmp_path))
    ex.config_complete()
    ex.open("v1", readonly=True).close()  # read-only: nothing repaired, nothing to say here
    assert not [x for x in lines if "slot B" in x]
    ex.open("v1", readonly=False).close()
    (note,) = [x for x in lines if "slot B" in x]
    assert note.startswith(f"{p}: header slot B damaged") and "slot B rewritten" in note
    lines.clear()
    ex.open("v1", readonly=False).close()  # repaired: the next open is quiet
    assert not [x for x in lines if "slot B" in x]
