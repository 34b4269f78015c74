"""The secondary's receive journal takes shipped entries strictly in order (issue 10: many
entries per Entries frame): a frame continues what is held, one that starts inside it adds
only what is new, an early one waits for its predecessor (and fails if it never comes), and
the reader takes a frame inline only when it would not wait.  A real receive journal."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator import groups, wire
from replicator.errors import IllegalState
from replicator.groups import GroupSecondary
from replicator.journal import EntryKind

MIB = 1 << 20
BLOCK = 4096
PID = "g/p"


class FakeSide:
    """A pair's secondary side as the group sees it: its stream, nothing else is used."""

    id = PID
    stream = 7


def frame(first: int, n: int, *, kind: int = wire.ENTRY_WRITE) -> wire.Entries:
    """``n`` consecutive entries from ``first``; entry ``seq`` writes block ``seq`` with its
    own byte."""
    heads = [(s, s * BLOCK, BLOCK, kind, s % 2 == 0) for s in range(first, first + n)]
    data = [bytes([s % 256]) * BLOCK for s in range(first, first + n)]
    return wire.pack_entries(PID, heads, data if kind == wire.ENTRY_WRITE else [])


def held(g: GroupSecondary) -> list[tuple[Any, ...]]:
    return [
        (e.seq, e.stream, e.kind, e.offset, e.length, e.fua, bytes(e.data[:1]))
        for e in g.journal.entries(g.journal.first_seq)
    ]


@pytest.fixture
def g(tmp_path: Path) -> Iterator[GroupSecondary]:
    s = GroupSecondary("g", str(tmp_path / "g.rjournal"), 4 * MIB, print)
    try:
        yield s
    finally:
        s.journal.close()


def test_frames_append_their_entries_in_order(g: GroupSecondary) -> None:
    ack = g.receive_entries(FakeSide(), frame(1, 3))
    assert (ack.received, ack.applied) == (3, 0)
    g.receive_entries(FakeSide(), frame(4, 2, kind=wire.ENTRY_TRIM))
    assert held(g) == [
        (1, 7, EntryKind.WRITE, BLOCK, BLOCK, False, b"\x01"),
        (2, 7, EntryKind.WRITE, 2 * BLOCK, BLOCK, True, b"\x02"),
        (3, 7, EntryKind.WRITE, 3 * BLOCK, BLOCK, False, b"\x03"),
        (4, 7, EntryKind.TRIM, 4 * BLOCK, BLOCK, True, b""),
        (5, 7, EntryKind.TRIM, 5 * BLOCK, BLOCK, False, b""),
    ]


def test_a_frame_that_starts_inside_what_is_held_adds_only_what_is_new(
    g: GroupSecondary,
) -> None:
    """Sent again after a broken link whose acknowledgement was lost: nothing twice."""
    g.receive_entries(FakeSide(), frame(1, 3))
    ack = g.receive_entries(FakeSide(), frame(2, 4))
    assert ack.received == 5
    assert [row[0] for row in held(g)] == [1, 2, 3, 4, 5]
    assert g.receive_entries(FakeSide(), frame(1, 2)).received == 5  # all held: acked again


def test_an_early_frame_waits_for_its_predecessor(g: GroupSecondary) -> None:
    done = threading.Event()
    errors: list[BaseException] = []

    def early() -> None:
        try:
            g.receive_entries(FakeSide(), frame(4, 2))
        except BaseException as e:  # reported by the test
            errors.append(e)
        done.set()

    t = threading.Thread(target=early)
    t.start()
    assert not done.wait(0.2)  # a bound: it must still be waiting
    assert g.journal.last_seq == 0
    g.receive_entries(FakeSide(), frame(1, 3))
    assert done.wait(10)
    t.join()
    assert errors == []
    assert [row[0] for row in held(g)] == [1, 2, 3, 4, 5]


def test_an_early_frame_whose_predecessor_never_comes_fails(
    g: GroupSecondary, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(groups, "ORDER_WAIT", 0.05)
    with pytest.raises(IllegalState, match="entry 4 arrived but 1 never did"):
        g.receive_entries(FakeSide(), frame(4, 2))
    assert g.journal.last_seq == 0


def test_a_frame_is_taken_inline_only_when_it_would_not_wait(tmp_path: Path) -> None:
    """The node's reader appends a frame itself only if its first entry is the next one and
    the receive journal has room for all of them; otherwise a worker waits for it."""
    g = GroupSecondary("g", str(tmp_path / "small.rjournal"), 1 * MIB, print)
    try:
        assert g.takes_now(frame(1, 128))
        assert not g.takes_now(frame(2, 3))  # its predecessor is not here yet
        for first in range(1, 201, 100):
            g.receive_entries(FakeSide(), frame(first, 100))  # 200 records of 4 KiB: 800+ KiB
        assert g.takes_now(frame(150, 3))  # starts inside what is held
        assert not g.takes_now(frame(201, 128))  # no room for all of them
        assert g.takes_now(frame(201, 10))
    finally:
        g.journal.close()
