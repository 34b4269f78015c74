"""A volume in several pairs (issue 8 item 5; SPEC 5 and 6), in one process.

Multi-target: P's volume is the primary of a sync leg to S and of an async leg to R.  Cascade:
L's volume is the secondary of P's pair and the primary of a pair to R, and every change it
receives goes on to R.  Each leg has its own bitmap slots, allocated by the volume's slot table
(docs/format.md, "Bitmap slot table"); the rules of the model (one receiving leg, one leg per
group, a bounded number of legs) are refused with one clear error each.

The harness is test_runtime_inproc's: real PairManagers over real volumes, a fake link, a
scripted clock.  Every scenario ends with ``pair verify`` of each leg.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_runtime_inproc import (
    CHUNK,
    SIZE,
    Lab,
    MiB,
    Node,
    identical,
    noise,
    read,
    running_lab,
    wait_copy,
    wait_until,
    write,
)

from replicator import record_codec as rc
from replicator.bitmap_store import BitmapStore
from replicator.errors import IllegalState, VolumeError
from replicator.header import Role
from replicator.slot_table import AL_SLOT, TABLE_RECORD, SlotTable, table_slot
from replicator.volume import Volume


def leg(node: Node, pid: str, peer: Node, **kw: Any) -> dict[str, Any]:
    return node.create(pid, peer, **kw)


def verified(node: Node, group: str) -> None:
    rows = node.cmd("pair.verify", target=group)["pairs"]
    assert rows and all(r["mismatch_count"] == 0 for r in rows), rows


def table_of(node: Node, vol: str = "vol") -> SlotTable | None:
    with Volume.open(node.paths[vol]) as v:
        return BitmapStore(v.fd, v.header).read_table()


def header(node: Node, vol: str = "vol") -> tuple[Role, str, int]:
    with Volume.open(node.paths[vol]) as v:
        return v.header.role, v.header.pair, v.header.pvid


@pytest.fixture(name="lab")
def lab_fixture(tmp_path: Path) -> Iterator[Lab]:
    with running_lab(tmp_path) as lab:
        yield lab


@pytest.fixture
def three(lab: Lab) -> tuple[Lab, Node, Node, Node]:
    p = lab.node("node-p", "10.0.0.1")
    s = lab.node("node-s", "10.0.0.2")
    r = lab.node("node-r", "10.0.0.3")
    lab.start()
    return lab, p, s, r


def test_multi_target_sync_near_async_far(three: tuple[Lab, Node, Node, Node]) -> None:
    _, p, s, r = three
    h = p.open()
    for off in range(0, SIZE, MiB):
        write(h, off, noise(CHUNK))
    leg(p, "near/db", s)
    wait_copy(p, "near/db")
    leg(p, "far/db", r, mode="async")
    wait_copy(p, "far/db")

    # Each leg has slots of its own; the log is the volume's.
    table = table_of(p)
    assert table is not None
    near, far = table.slots_of("near/db"), table.slots_of("far/db")
    assert near is not None and far is not None and not set(near) & set(far)
    assert AL_SLOT not in set(near) | set(far)
    assert (p.side("near/db").record.diff_slot, p.side("near/db").record.copy_slot) == near

    # A write is acknowledged once on S (sync) and reaches R (async) by the journal.
    data = noise(3 * CHUNK)
    write(h, 2 * MiB + 4096, data)
    assert s.image()[2 * MiB + 4096 : 2 * MiB + 4096 + len(data)] == data
    h.flush()
    wait_until("R has the async leg's writes", lambda: p.image() == r.image())
    identical(p, s)
    verified(p, "near")
    verified(p, "far")

    # Splitting one leg leaves the other replicating: the far leg records, the near mirrors.
    p.cmd("pair.split", target="far")
    wait_until("far split", lambda: p.state("far/db") == ("PSUS", "primary"))
    assert p.state("near/db") == ("PAIR", "primary")
    write(h, 5 * CHUNK, noise(CHUNK))
    identical(p, s)
    assert p.show("far/db")["dirty_bytes"] == CHUNK
    assert p.show("near/db")["dirty_bytes"] == 0
    p.cmd("pair.resync", target="far")
    wait_copy(p, "far/db")
    wait_until("R caught up", lambda: p.image() == r.image())
    verified(p, "near")
    verified(p, "far")

    # The S-VOLs carry the primary's PVID; the P-VOL's VOL information names its first leg.
    assert header(s)[2] == header(p)[2] == header(r)[2]
    assert header(p)[:2] == (Role.PRIMARY, "near/db")


def test_cascade_forwards_every_change_and_follows_the_pvid(
    three: tuple[Lab, Node, Node, Node],
) -> None:
    lab, p, l_, r = three  # P -> L (sync), L -> R (sync): L is storage only
    hp = p.open()
    for off in range(0, SIZE, MiB):
        write(hp, off, noise(2 * CHUNK))
    leg(l_, "b/x", r)  # the far leg first: the copy into L goes on to R
    wait_copy(l_, "b/x")
    leg(p, "a/x", l_)
    wait_copy(p, "a/x")
    wait_until("R has the copy", lambda: r.image() == p.image())

    data = noise(2 * CHUNK)
    write(hp, MiB + 512, data)  # mirrored to L, which mirrors it to R before it acks
    assert r.image()[MiB + 512 : MiB + 512 + len(data)] == data
    hp.zero(CHUNK, 3 * MiB, False, False)
    hp.flush()
    identical(p, l_)
    identical(l_, r)
    with pytest.raises(IllegalState, match="hidden secondary"):
        l_.open()  # L receives from P: nobody writes it directly
    assert header(l_)[:2] == (Role.SECONDARY, "a/x")  # labelled as the S-VOL it is
    assert header(l_)[2] == header(p)[2], l_.lines
    lab.tick()  # the timer tells R (L's PVID changed when it became a's secondary)
    wait_until("R carries P's PVID", lambda: header(r)[2] == header(l_)[2])

    # Split P -> L: L gets a PVID of its own, and R (L's hidden secondary) follows it.
    p.cmd("pair.split", target="a")
    assert header(l_)[2] != header(p)[2]
    lab.tick()  # the timer tells R
    wait_until("R carries L's new PVID", lambda: header(r)[2] == header(l_)[2])
    hl = l_.open()
    mine = noise(CHUNK)
    write(hl, 7 * CHUNK, mine)  # written at L: recorded for a, mirrored to R by b
    assert r.image()[7 * CHUNK : 8 * CHUNK] == mine
    assert l_.show("a/x")["dirty_bytes"] == CHUNK
    write(hp, 0, noise(CHUNK))
    hl.close()

    # Resync P -> L: L's own write is overwritten, and the copy goes on to R.
    p.cmd("pair.resync", target="a")
    wait_copy(p, "a/x")
    identical(p, l_)
    wait_until("R follows the resync", lambda: r.image() == l_.image())
    assert header(l_)[2] == header(p)[2]  # hidden again: P's PVID
    lab.tick()
    wait_until("R follows L's PVID", lambda: header(r)[2] == header(l_)[2])
    verified(p, "a")
    verified(l_, "b")


def test_the_model_rules_are_refused_one_line_each(three: tuple[Lab, Node, Node, Node]) -> None:
    lab, p, s, r = three
    leg(p, "a/x", s)
    wait_copy(p, "a/x")
    with pytest.raises(IllegalState, match="one leg per consistency group"):
        p.create("a/y", r)  # a second pair of group a on the same volume
    with pytest.raises(IllegalState, match="receives from one primary only"):
        r.create("c/x", s)  # S already receives a/x from P
    assert "c/x" not in s.manager.sides and "c/x" not in r.manager.sides
    leg(p, "b/x", r)
    wait_copy(p, "b/x")
    # The third leg fits (slots 0, 1 / 3, 4 / 5, 6); a fourth has no slots left.
    extra = lab.node("node-t", "10.0.0.4")
    extra.start()
    leg(p, "c/x", extra)
    wait_copy(p, "c/x")
    table = table_of(p)
    assert table is not None and sorted(table.legs) == ["a/x", "b/x", "c/x"]
    fourth = lab.node("node-u", "10.0.0.5")
    fourth.start()
    with pytest.raises(IllegalState, match="no free bitmap slots"):
        p.create("d/x", fourth)
    assert "d/x" not in fourth.manager.sides  # nothing half made on either side
    table = table_of(p)
    assert table is not None and sorted(table.legs) == ["a/x", "b/x", "c/x"]
    for g in "abc":
        verified(p, g)


def test_a_swap_that_would_receive_twice_is_refused(three: tuple[Lab, Node, Node, Node]) -> None:
    """L receives from P (a) and is the primary of b to R.  Swapping b would make L receive
    from R too: refused, nothing changes; with a deleted first, the swap goes ahead."""
    _, p, l_, r = three
    leg(p, "a/x", l_)
    wait_copy(p, "a/x")
    leg(l_, "b/x", r)
    wait_copy(l_, "b/x")
    l_.cmd("pair.split", target="b")
    with pytest.raises(IllegalState, match="receives from one primary only"):
        r.cmd("pair.resync", target="b", swap=True)
    assert l_.state("b/x") == ("PSUS", "primary") and r.state("b/x") == ("PSUS", "secondary")
    p.cmd("pair.delete", target="a")
    r.cmd("pair.resync", target="b", swap=True)
    wait_copy(r, "b/x")
    assert l_.state("b/x") == ("PAIR", "secondary")
    verified(r, "b")


def test_delete_one_leg_keeps_the_other_and_frees_its_slots(
    three: tuple[Lab, Node, Node, Node],
) -> None:
    _, p, s, r = three
    h = p.open()
    leg(p, "a/x", s)
    wait_copy(p, "a/x")
    leg(p, "b/x", r)
    wait_copy(p, "b/x")
    slots_b = p.side("b/x").record.diff_slot, p.side("b/x").record.copy_slot
    p.cmd("pair.delete", target="a")
    table = table_of(p)
    assert table is not None and list(table.legs) == ["b/x"]
    assert table.slots_of("b/x") == slots_b
    assert header(p)[:2] == (Role.PRIMARY, "b/x")
    data = noise(CHUNK)
    write(h, 0, data)  # the handle follows: b still mirrors
    assert r.image()[:CHUNK] == data
    verified(p, "b")
    # A new leg takes the freed slots.
    leg(p, "c/x", s)
    wait_copy(p, "c/x")
    table = table_of(p)
    assert table is not None and set(table.legs) == {"b/x", "c/x"}
    verified(p, "b")
    verified(p, "c")


def test_restart_keeps_both_legs_and_releases_an_orphan_claim(
    three: tuple[Lab, Node, Node, Node],
) -> None:
    lab, p, s, r = three
    leg(p, "a/x", s)
    wait_copy(p, "a/x")
    leg(p, "b/x", r)
    wait_copy(p, "b/x")
    # A create interrupted after the table named its leg, before its pair file existed.
    with Volume.open(p.paths["vol"], writable=True) as v:
        store = BitmapStore(v.fd, v.header)
        table = store.read_table()
        assert table is not None
        store.write_table(table.with_leg("z/gone"))
    p.restart()
    table = table_of(p)
    assert table is not None and sorted(table.legs) == ["a/x", "b/x"]
    assert any("released the bitmap slots of z/gone" in line for line in p.lines)
    for _ in range(5):
        lab.tick(1.0)
    for pid in ("a/x", "b/x"):
        wait_until(f"{pid} back in PAIR", lambda pid=pid: p.state(pid) == ("PAIR", "primary"))
    h = p.open()
    data = noise(2 * CHUNK)
    write(h, MiB, data)
    assert s.image()[MiB : MiB + len(data)] == data
    assert r.image()[MiB : MiB + len(data)] == data
    verified(p, "a")
    verified(p, "b")


def test_a_volume_of_an_earlier_version_keeps_its_slots(lab: Lab) -> None:
    """Earlier versions kept no table: a pair with slots 0 and 1 and the log in 2.  Such a
    volume loads, and a second leg gets a table naming both."""
    p = lab.node("node-p", "10.0.0.1")
    s = lab.node("node-s", "10.0.0.2")
    r = lab.node("node-r", "10.0.0.3")
    lab.start()
    leg(p, "a/x", s)
    wait_copy(p, "a/x")
    p.stop()
    with Volume.open(p.paths["vol"], writable=True) as v:  # as an earlier version left it
        store = BitmapStore(v.fd, v.header)
        os.pwrite(v.fd, bytes(2 * TABLE_RECORD.slot_size), store.slot_offset(table_slot(8)))
        assert store.read_table() is None
    p.restart()
    assert p.state("a/x")[1] == "primary"
    leg(p, "b/x", r)
    wait_copy(p, "b/x")
    table = table_of(p)
    assert table is not None and table.slots_of("a/x") == (0, 1)
    assert table.slots_of("b/x") == (3, 4)
    for _ in range(5):
        lab.tick(1.0)
    wait_until("a/x back in PAIR", lambda: p.state("a/x") == ("PAIR", "primary"))
    verified(p, "a")
    verified(p, "b")


def test_a_damaged_table_is_refused_not_guessed(lab: Lab) -> None:
    p = lab.node("node-p", "10.0.0.1")
    s = lab.node("node-s", "10.0.0.2")
    lab.start()
    leg(p, "a/x", s)
    wait_copy(p, "a/x")
    p.stop()
    with Volume.open(p.paths["vol"], writable=True) as v:
        store = BitmapStore(v.fd, v.header)
        off = store.slot_offset(table_slot(store.nslots))
        for i in (0, 1):  # both record slots: a bad CRC each
            os.pwrite(v.fd, b"\xff", off + i * TABLE_RECORD.slot_size + 30)
        image = os.pread(v.fd, 2 * TABLE_RECORD.slot_size, off)
        assert isinstance(rc.read_pair(TABLE_RECORD, image), rc.NoValidSlot)
    p.restart()
    assert "a/x" not in p.manager.sides
    listed = p.cmd("pair.display")
    assert any("slot table" in str(b) for b in listed.get("corrupt", [])), listed
    with pytest.raises(IllegalState):
        p.open()


def test_client_write_refused_if_any_leg_refuses(three: tuple[Lab, Node, Node, Node]) -> None:
    """A fence=data leg whose secondary is gone fails the write (EIO) although the other leg
    took it; the other leg stays in PAIR."""
    lab, p, s, r = three
    leg(p, "a/x", s, fence="data")
    wait_copy(p, "a/x")
    leg(p, "b/x", r)
    wait_copy(p, "b/x")
    h = p.open()
    lab.link(p, s).cut()
    with pytest.raises(VolumeError) as refused:
        write(h, 0, noise(CHUNK))
    assert refused.value.errno == errno.EIO
    assert p.state("a/x")[0] == "PSUE" and p.state("b/x") == ("PAIR", "primary")
    data = read(h, 0, CHUNK)
    assert r.image()[:CHUNK] == data  # b mirrored what the volume holds
    verified(p, "b")
