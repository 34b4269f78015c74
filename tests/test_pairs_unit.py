"""Unit tests of the pair runtime's small pure parts (the lab tests drive the whole thing)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pairvol.cli.pair import merge_sides, parse_side
from replicator import pair_state as ps
from replicator.errors import HeaderCorrupt, NotFound, UsageError
from replicator.gate import ChunkLocks, Gate
from replicator.header import Role
from replicator.pair.copy_engine import _segments
from replicator.pair.doc import PeerRef, SideDoc
from replicator.pair.names import parse_peer_address, split_pair_id


def test_split_pair_id() -> None:
    assert split_pair_id("g") == ("g", None)
    assert split_pair_id("g/p1") == ("g", "p1")
    for bad in ("", "g/", "/p", "g/p/q", "g p"):
        with pytest.raises(UsageError):
            split_pair_id(bad)


def test_parse_peer_address() -> None:
    assert parse_peer_address("198.18.0.2", 10810) == ("198.18.0.2", 10810)
    assert parse_peer_address("198.18.0.2:999", 10810) == ("198.18.0.2", 999)
    for bad in ("198.18.0.2:x", "198.18.0.2:0", "198.18.0.2:70000"):
        with pytest.raises(UsageError, match="is not a TCP port"):
            parse_peer_address(bad, 10810)


def test_parse_side() -> None:
    assert parse_side("a:vol1", "--primary") == ("a", "vol1")
    assert parse_side("198.18.0.2:10810:vol1", "--primary") == ("198.18.0.2:10810", "vol1")
    for bad in ("vol1", ":vol1", "a:", "a:bad name"):
        with pytest.raises(UsageError):
            parse_side(bad, "--primary")


def test_side_doc_round_trip_and_damage() -> None:
    record = ps.PairRecord("g", "p1", Role.PRIMARY, ps.Mode.SYNC, ps.Fence.DATA, "b@1.2.3.4:1")
    doc = SideDoc(record, "vol1", PeerRef("b", "1.2.3.4", 1, "vol2"), 123, 0.5)
    again = SideDoc.from_json(doc.to_json())
    assert again.record == record and again.peer == doc.peer
    assert (again.volume, again.last_copy_bytes) == ("vol1", 123)
    damaged = ("", "{}", '{"format": "pairvol.pair"}', doc.to_json().replace('"primary"', '"x"'))
    for bad in damaged:
        with pytest.raises(HeaderCorrupt):
            SideDoc.from_json(bad)


def test_gate_closed_waits_for_shared_and_blocks_new_ones() -> None:
    gate = Gate()
    order: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def reader(name: str, hold: threading.Event | None) -> None:
        with gate.shared():
            order.append(f"{name} in")
            if hold is not None:
                inside.set()
                hold.wait(5)
            order.append(f"{name} out")

    def writer() -> None:
        with gate.closed():
            order.append("closed")

    r1 = threading.Thread(target=reader, args=("r1", release))
    r1.start()
    assert inside.wait(5)
    w = threading.Thread(target=writer)
    w.start()
    while not gate._waiting:  # the writer is queued
        time.sleep(0.001)
    r2 = threading.Thread(target=reader, args=("r2", None))
    r2.start()
    time.sleep(0.05)
    assert order == ["r1 in"]  # neither the writer nor the late reader got in
    release.set()
    for t in (r1, w, r2):
        t.join(5)
    assert order == ["r1 in", "r1 out", "closed", "r2 in", "r2 out"]


def test_chunk_locks_serialize_overlapping_ranges_only() -> None:
    locks = ChunkLocks()
    with locks.hold(10, 12):
        got = []

        def other(first: int, last: int) -> None:
            with locks.hold(first, last):
                got.append((first, last))

        t1 = threading.Thread(target=other, args=(13, 20))
        t1.start()
        t1.join(5)
        assert got == [(13, 20)]  # disjoint: not blocked
        t2 = threading.Thread(target=other, args=(12, 14))
        t2.start()
        t2.join(0.1)
        assert t2.is_alive()  # overlapping: waits
    t2.join(5)
    assert got == [(13, 20), (12, 14)]
    with locks.hold(0, 5000):  # more chunks than stripes: takes every stripe once
        pass


def test_segments_report_data_and_holes(tmp_path: Path) -> None:
    path = tmp_path / "img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"x" * (1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        segs = list(_segments(fd, 0, 8 << 20))
    finally:
        os.close(fd)
    assert sum(n for _, n, _ in segs) == 8 << 20
    data = [(s, n) for s, n, is_data in segs if is_data]
    assert data == [(1 << 20, 1 << 20)]


def _side(role: str, state: str, dirty: int) -> dict[str, object]:
    return {
        "id": "g/p",
        "group": "g",
        "pair": "p",
        "role": role,
        "state": state,
        "node": "a" if role == "primary" else "b",
        "volume": "v",
        "peer": "x",
        "mode": "sync",
        "fence": "never",
        "copy_percent": 100.0,
        "dirty_bytes": dirty,
        "pvid": "00000000000000aa",
        "last_copy_bytes": 7,
        "link": "up",
    }


def test_merge_sides_one_row_per_pair() -> None:
    rows = merge_sides([_side("secondary", "PSUS", 4096), _side("primary", "PSUS", 8192)])
    assert len(rows) == 1
    row = rows[0]
    assert (row["primary"], row["secondary"]) == ("a:v", "b:v")
    assert (row["dirty_primary"], row["dirty_secondary"]) == (8192, 4096)
    assert row["last_copy_bytes"] == 7 and row["state"] == "PSUS"
    only = merge_sides([_side("secondary", "SSWS", 0)])[0]
    assert only["state"] == "SSWS" and only["dirty_primary"] is None


def test_node_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pairvol.cli.pair import read_nodes, resolve_node

    table = tmp_path / "nodes"
    table.write_text(
        "# name  address[:peerport]  [dir]\n"
        "east 198.18.0.1 /var/lib/pairvol/east\n"
        "west 198.18.0.2:11000   # no local directory\n\n"
    )
    nodes = read_nodes(str(table))
    assert nodes["east"].host == "198.18.0.1" and nodes["east"].peer_port == 10810
    assert nodes["east"].control == "/var/lib/pairvol/east/control.sock"
    assert (nodes["west"].peer_port, nodes["west"].control) == (11000, None)
    monkeypatch.setenv("PAIRVOL_NODES", str(table))
    monkeypatch.setenv("PAIRVOL_LAB_ROOT", str(tmp_path / "no-labs"))
    assert resolve_node("west", None).host == "198.18.0.2"
    with pytest.raises(NotFound, match="unknown node 'north'"):
        resolve_node("north", None)
    for bad in ("east\n", "east not-an-ip\n", "a 1.2.3.4\na 1.2.3.5\n", "a 1.2.3.4:0\n"):
        table.write_text(bad)
        with pytest.raises(UsageError):
            read_nodes(str(table))
    with pytest.raises(NotFound, match="does not exist"):
        read_nodes(str(tmp_path / "missing"))
