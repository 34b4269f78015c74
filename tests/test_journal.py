"""The async-replication journal (replicator.journal): records, wrap-around, overflow, header
slots, recovery after crashes and torn appends, group commit, SIGKILL.

Run as a script, this module is the child process of the SIGKILL test (see ``_child``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from replicator import journal as jr
from replicator.errors import (
    AlreadyExists,
    Closed,
    HeaderCorrupt,
    IllegalState,
    NotFound,
    UsageError,
    VolumeError,
)
from replicator.journal import Entry, EntryKind, Journal, JournalFull

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
W, Z, T = EntryKind.WRITE, EntryKind.ZERO, EntryKind.TRIM


def crash(j: Journal) -> None:
    """Drop the journal as a dying process would: close the fd, nothing else."""
    j._closed = True
    os.close(j.fd)


def disk_header(path: Path | str) -> jr.JournalHeader:
    raw = Path(path).read_bytes()[: 2 * jr.SLOT_SIZE]
    return jr.choose_header(raw[: jr.SLOT_SIZE], raw[jr.SLOT_SIZE :])[0]


def ring_intervals(lo: int, hi: int, cap: int) -> list[tuple[int, int]]:
    """Virtual range [lo, hi) as ring-offset intervals."""
    if hi <= lo:
        return []
    a = lo % cap
    if a + (hi - lo) <= cap:
        return [(a, a + hi - lo)]
    return [(a, cap), (0, hi - lo - (cap - a))]


def all_entries(j: Journal) -> list[Entry]:
    return list(j.entries(j.first_seq))


@contextlib.contextmanager
def new_journal(tmp_path: Path, capacity: int = MIB, name: str = "j") -> Iterator[Journal]:
    j = Journal.create(str(tmp_path / name), capacity, "g1")
    try:
        yield j
    finally:
        j.close()


# -- unit tests -------------------------------------------------------------------------------


def test_create_append_read_back_and_reopen(tmp_path: Path) -> None:
    p = tmp_path / "j"
    with new_journal(tmp_path) as j:
        assert (j.first_seq, j.last_seq, j.applied_seq, j.count) == (1, 0, 0, 0)
        assert j.used_bytes == 0 and j.free_bytes == MIB and j.usage() == 0.0
        assert j.oldest_stamp_ns is None and j.newest_stamp_ns is None
        assert j.append(3, W, 4096, b"abc", fua=True, stamp_ns=111) == 1
        assert j.append(0, Z, 0, length=MIB, stamp_ns=222) == 2
        assert j.append(7, T, 8192, length=512, stamp_ns=333) == 3
        assert j.append(1, W, 0, memoryview(b"x" * 5000), stamp_ns=444) == 4
        want = [
            Entry(1, 3, W, 4096, 3, b"abc", True, 111),
            Entry(2, 0, Z, 0, MIB, b"", False, 222),
            Entry(3, 7, T, 8192, 512, b"", False, 333),
            Entry(4, 1, W, 0, 5000, b"x" * 5000, False, 444),
        ]
        assert all_entries(j) == want
        assert list(j.entries(3)) == want[2:]
        assert list(j.entries(5)) == [] and list(j.entries(99)) == []
        assert [e.seq for e in j.entries(1, max_bytes=4000)] == [1, 2, 3]
        assert [e.seq for e in j.entries(4, max_bytes=1)] == [4]  # at least one
        assert j.used_bytes == 512 * 3 + jr.record_size(5000) == 512 * 3 + 5120
        assert (j.oldest_stamp_ns, j.newest_stamp_ns) == (111, 444)
        assert j.count == 4 and j.last_seq == 4
    st_ = p.stat()
    assert st_.st_size == jr.RING_OFFSET + MIB
    assert st_.st_blocks * 512 >= MIB  # the ring's blocks reserved at creation
    with Journal.open(str(p)) as j2:
        assert all_entries(j2) == want
        assert j2.repaired == []
        assert j2.append(0, W, 0, b"z") == 5


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_create_on_a_full_file_system_fails_and_leaves_nothing(tmp_path: Path) -> None:
    """The ring's blocks are reserved at creation, so a file system without room for it
    refuses the journal there, with the errno, rather than a client's write (the append that
    found no block) later: a sparse ring allocated blocks one append at a time.  Nothing is
    left behind: no journal, no half-built temporary file."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        full = r"journal create .*/g\.journal: No space left on device"
        with pytest.raises(VolumeError, match=full) as info:
            Journal.create(str(mnt / "g.journal"), 8 * MIB, "g")
        assert info.value.errno == errno.ENOSPC
        assert list(mnt.iterdir()) == []
        with Journal.create(str(mnt / "g.journal"), 2 * MIB, "g") as j:  # room for this one
            assert j.append(0, W, 0, b"x" * 4096) == 1
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_create_reads_no_ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal just created reads as zeros: opening it follows no chain and scans
    nothing (the scan reads the whole ring: an async takeover that opened its group's
    journal paid 0.4 s for 256 MiB).  What is opened is a working journal."""
    read: list[int] = []
    real = os.pread

    def counting(fd: int, n: int, off: int) -> bytes:
        if off >= jr.RING_OFFSET:
            read.append(n)
        return real(fd, n, off)

    monkeypatch.setattr(jr.os, "pread", counting)
    p = tmp_path / "j"
    with Journal.create(str(p), 64 * MIB, "g1", first_seq=7) as j:
        assert sum(read) == 0
        assert (j.first_seq, j.last_seq, j.count, j.used_bytes) == (7, 6, 0, 0)
        assert j.append(0, W, 0, b"abc") == 7
    with Journal.open(str(p)) as j2:
        assert sum(read) > 0  # an existing journal is recovered from its ring
        assert [(e.seq, e.data) for e in all_entries(j2)] == [(7, b"abc")]


def test_seq_rules(tmp_path: Path) -> None:
    with new_journal(tmp_path) as j:
        with pytest.raises(IllegalState, match="not the next one"):
            j.append(0, W, 0, b"a", seq=2)
        assert j.append(0, W, 0, b"a", seq=1) == 1
        assert j.append(0, W, 0, b"b") == 2
        for bad in (1, 2, 4):
            with pytest.raises(IllegalState):
                j.append(0, W, 0, b"c", seq=bad)
        assert j.append(0, W, 0, b"c", seq=3) == 3
        j.release(3)
        assert (j.first_seq, j.last_seq, j.count) == (4, 3, 0)
        assert j.append(0, W, 0, b"d", seq=4) == 4
    # A receive journal may start after an existing prefix.
    k = Journal.create(str(tmp_path / "k"), MIB, "g1", first_seq=1001)
    with k:
        assert (k.first_seq, k.last_seq) == (1001, 1000)
        with pytest.raises(IllegalState):
            k.append(0, W, 0, b"a", seq=1)
        assert k.append(0, W, 0, b"a", seq=1001) == 1001
        with pytest.raises(NotFound):
            k.entries(1000)


def test_wrap_around_many_laps(tmp_path: Path) -> None:
    rng = random.Random(7)
    p = tmp_path / "j"
    model: dict[int, bytes] = {}
    written = 0
    j = Journal.create(str(p), MIB, "g1")
    try:
        while written < 25 * MIB:
            data = rng.randbytes(rng.choice([0, 1, 100, 447, 448, 449, 4000, 30000, 120000]))
            try:
                s = j.append(rng.randrange(4), W, rng.randrange(1 << 30), data)
            except JournalFull:
                keep = rng.randrange(0, 5)
                j.release(j.last_seq - min(keep, j.count))
                for old in [s for s in model if s < j.first_seq]:
                    del model[old]
                continue
            model[s] = data
            written += len(data)
            if rng.random() < 0.02:
                j.close()
                j = Journal.open(str(p))
            if rng.random() < 0.05:
                assert {e.seq: e.data for e in all_entries(j)} == model
        assert {e.seq: e.data for e in all_entries(j)} == model
        assert j.last_seq > 500
    finally:
        j.close()


def test_journal_full_leaves_it_unchanged(tmp_path: Path) -> None:
    p = tmp_path / "j"
    with new_journal(tmp_path) as j:
        big = b"q" * 100_000
        n = 0
        with pytest.raises(JournalFull):
            while True:
                j.append(0, W, n, big)
                n += 1
        assert isinstance(JournalFull("x"), IllegalState)
        state = (j.first_seq, j.last_seq, j.next_seq, j.used_bytes, j.count)
        image = p.read_bytes()
        with pytest.raises(JournalFull, match="full"):
            j.append(0, W, 0, big)
        with pytest.raises(JournalFull):
            j.append(0, W, 0, big, seq=j.last_seq + 1)
        with pytest.raises(JournalFull, match="largest"):
            j.append(0, W, 0, bytes(j.max_entry_bytes + 1))
        assert (j.first_seq, j.last_seq, j.next_seq, j.used_bytes, j.count) == state
        assert p.read_bytes() == image
        j.release(2)
        s = j.append(0, W, 0, big)
        assert s == state[1] + 1
        j.drop_all()
        # The largest entry fits an empty journal wherever the head is.
        assert j.append(0, W, 0, bytes(j.max_entry_bytes)) == s + 1


def test_largest_entry_fits_an_empty_journal_at_any_head(tmp_path: Path) -> None:
    with new_journal(tmp_path) as j:
        for step in range(0, j.max_entry_bytes, 24 * 1024):
            j.drop_all()
            j.append(0, W, 0, bytes(step))  # moves the head
            j.drop_all()
            j.append(0, W, 0, bytes(j.max_entry_bytes))
        assert all_entries(j)[0].length == j.max_entry_bytes


def test_drop_all(tmp_path: Path) -> None:
    p = tmp_path / "j"
    with new_journal(tmp_path) as j:
        assert j.drop_all() == []
        j.append(1, W, 100, b"abc", stamp_ns=5)
        j.append(2, Z, 200, length=300, stamp_ns=6)
        j.append(3, T, 400, length=500, fua=True, stamp_ns=7)
        dropped = j.drop_all()
        assert dropped == [
            Entry(1, 1, W, 100, 3, b"", False, 5),
            Entry(2, 2, Z, 200, 300, b"", False, 6),
            Entry(3, 3, T, 400, 500, b"", True, 7),
        ]
        assert (j.first_seq, j.last_seq, j.count, j.used_bytes) == (4, 3, 0, 0)
        assert disk_header(p).tail_seq == 4
        with pytest.raises(NotFound):
            j.entries(3)
    with Journal.open(str(p)) as j:
        assert (j.first_seq, j.last_seq, j.count) == (4, 3, 0)
        assert j.append(0, W, 0, b"x") == 4


def test_applied_mark(tmp_path: Path) -> None:
    p = tmp_path / "j"
    with new_journal(tmp_path) as j:
        for _ in range(5):
            j.append(0, W, 0, b"x")
        j.set_applied(3)
        j.set_applied(3)
        with pytest.raises(IllegalState, match="behind"):
            j.set_applied(2)
        with pytest.raises(IllegalState, match="past"):
            j.set_applied(6)
        assert disk_header(p).applied_seq == 3
    with Journal.open(str(p)) as j:
        assert j.applied_seq == 3
        j.release(3)
        j.set_applied(5)
    with Journal.open(str(p)) as j:
        assert (j.applied_seq, j.first_seq, j.last_seq) == (5, 4, 5)


# -- the applier's marks in one header commit (issue 10) --------------------------------------


class Killed(BaseException):
    """The process dies here (a BaseException: no handler in the journal catches it)."""


#: where a crash can stop one header commit: slot, fdatasync, the other slot, fdatasync
HEADER_CRASH_POINTS = ("torn-1", "written-1", "synced-1", "torn-2", "written-2", "synced-2")


def die_in_header_commit(mp: pytest.MonkeyPatch, point: str, power_loss: bool) -> None:
    """Fault injection through the journal's seams for header writes, ``_pwrite_all`` and
    ``os.fdatasync``: the next header commit raises :class:`Killed` at ``point``, one of
    HEADER_CRASH_POINTS (``torn-N``: the N-th slot write stopped after 100 bytes;
    ``written-N``: it completed, its fdatasync did not run; ``synced-N``: the fdatasync after
    it returned).  With ``power_loss`` the slot writes no fdatasync covered are undone too
    (lost with the page cache); without, they stay (a killed process).  Then ``mp.undo()``
    and :func:`crash`."""
    real_write, real_sync = jr._pwrite_all, os.fdatasync
    writes = syncs = 0
    unsynced: list[tuple[int, int, bytes]] = []

    def die() -> NoReturn:
        if power_loss:
            for fd, offset, old in reversed(unsynced):
                os.pwrite(fd, old, offset)
        raise Killed(point)

    def write(fd: int, data: bytes, offset: int) -> None:
        nonlocal writes
        assert offset in jr.SLOT_OFFSETS, "only header slots are written here"
        writes += 1
        unsynced.append((fd, offset, os.pread(fd, len(data), offset)))
        if point == f"torn-{writes}":
            real_write(fd, data[:100], offset)
            die()
        real_write(fd, data, offset)
        if point == f"written-{writes}":
            die()

    def sync(fd: int) -> None:
        nonlocal syncs
        real_sync(fd)
        unsynced.clear()
        syncs += 1
        if point == f"synced-{syncs}":
            die()

    mp.setattr(jr, "_pwrite_all", write)
    mp.setattr(jr.os, "fdatasync", sync)


def new_header_survives(point: str, power_loss: bool) -> bool:
    """Whether a header commit that died at ``point`` is the header found on reopening: once
    one slot holds it durably (or, for a killed process, completely written), it wins."""
    return not (point == "torn-1" or (point == "written-1" and power_loss))


def test_set_applied_and_release_moves_both_marks_durably(tmp_path: Path) -> None:
    p = tmp_path / "j"
    with new_journal(tmp_path) as j:
        for i in range(10):
            j.append(0, W, i, bytes([i]) * 100)
        j.set_applied_and_release(6)
        assert (j.applied_seq, j.first_seq, j.last_seq, j.count) == (6, 7, 10, 4)
        assert j.used_bytes == 4 * 512  # the space of 1..6 is free
        h = disk_header(p)
        assert (h.applied_seq, h.tail_seq) == (6, 7)
        want = all_entries(j)
        assert [e.seq for e in want] == [7, 8, 9, 10]
        crash(j)
    with Journal.open(str(p)) as j:
        assert (j.applied_seq, j.first_seq, j.last_seq, j.count) == (6, 7, 10, 4)
        assert all_entries(j) == want
        with pytest.raises(NotFound, match="released"):
            j.entries(6)
        j.set_applied_and_release(10)  # everything: the tail is the head
        assert (j.applied_seq, j.first_seq, j.count, j.used_bytes) == (10, 11, 0, 0)
    with Journal.open(str(p)) as j:
        assert (j.applied_seq, j.first_seq, j.last_seq, j.count) == (10, 11, 10, 0)
        assert j.append(0, W, 0, b"next") == 11


def test_set_applied_and_release_is_one_header_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One generation, two slot writes and two fdatasyncs: half of set_applied + release."""
    p = tmp_path / "j"
    with new_journal(tmp_path) as j:
        for _ in range(6):
            j.append(0, W, 0, b"x")
        slots: list[int] = []
        syncs: list[int] = []
        real_write, real_sync = jr._pwrite_all, os.fdatasync

        def write(fd: int, data: bytes, offset: int) -> None:
            slots.append(offset)
            real_write(fd, data, offset)

        def sync(fd: int) -> None:
            syncs.append(fd)
            real_sync(fd)

        monkeypatch.setattr(jr, "_pwrite_all", write)
        monkeypatch.setattr(jr.os, "fdatasync", sync)
        gen = disk_header(p).generation
        j.set_applied_and_release(3)
        assert disk_header(p).generation == gen + 1
        assert slots == list(jr.SLOT_OFFSETS) and syncs == [j.fd, j.fd]
        j.set_applied(5)  # what the applier did before: two commits
        j.release(5)
        assert disk_header(p).generation == gen + 3 and len(syncs) == 6
        assert (disk_header(p).applied_seq, disk_header(p).tail_seq) == (5, 6)


@pytest.mark.parametrize("power_loss", [False, True], ids=["kill", "power-loss"])
@pytest.mark.parametrize("point", HEADER_CRASH_POINTS)
def test_set_applied_and_release_is_atomic_across_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, power_loss: bool
) -> None:
    """Died at any step of the commit: reopened, both marks have moved or neither, and every
    entry after the applied mark is still there."""
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    for i in range(10):
        j.append(i % 3, W, i * 4096, bytes([i]) * 300)
    j.set_applied_and_release(3)
    want = {e.seq: e for e in all_entries(j)}
    die_in_header_commit(monkeypatch, point, power_loss)
    with pytest.raises(Killed):
        j.set_applied_and_release(7)
    monkeypatch.undo()
    crash(j)
    with Journal.open(str(p)) as j:
        marks = (j.applied_seq, j.first_seq)
        assert marks in ((3, 4), (7, 8)), f"one mark moved without the other: {marks}"
        assert marks == ((7, 8) if new_header_survives(point, power_loss) else (3, 4))
        assert j.last_seq == 10
        assert all_entries(j) == [want[s] for s in range(j.first_seq, 11)]
        j.set_applied_and_release(10)
        assert j.append(0, W, 0, b"on") == 11
    with Journal.open(str(p)) as j:
        assert (j.applied_seq, j.first_seq, j.last_seq) == (10, 11, 11)


def test_set_applied_and_release_refuses_to_go_back(tmp_path: Path) -> None:
    p = tmp_path / "j"
    with new_journal(tmp_path) as j:
        for _ in range(8):
            j.append(0, W, 0, b"x")
        j.set_applied(5)
        before = disk_header(p)
        with pytest.raises(IllegalState, match=r"applied seq 4 is behind 5$"):
            j.set_applied_and_release(4)  # even though 1..4 are not released yet
        assert disk_header(p) == before
        assert (j.applied_seq, j.first_seq, j.count) == (5, 1, 8)


def test_set_applied_and_release_refuses_past_the_newest_entry(tmp_path: Path) -> None:
    p = tmp_path / "j"
    with new_journal(tmp_path) as j:
        for _ in range(8):
            j.append(0, W, 0, b"x")
        before = disk_header(p)
        with pytest.raises(IllegalState, match=r"applied seq 9 is past the newest entry 8$"):
            j.set_applied_and_release(9)
        assert disk_header(p) == before
        assert (j.applied_seq, j.first_seq, j.count) == (0, 1, 8)
        # what release alone says for the same seq, for comparison
        with pytest.raises(IllegalState, match="cannot release up to 9; the newest durable"):
            j.release(9)


def test_set_applied_and_release_of_a_released_range_is_a_no_op(tmp_path: Path) -> None:
    p = tmp_path / "j"
    with new_journal(tmp_path) as j:
        for _ in range(10):
            j.append(0, W, 0, b"x")
        j.set_applied_and_release(4)
        gen = disk_header(p).generation
        j.set_applied_and_release(4)  # both marks there already: nothing is written
        assert disk_header(p).generation == gen
        j.release(8)  # the primary's kind of release, ahead of the applied mark
        j.set_applied_and_release(6)  # the release part is a no-op, the applied mark moves
        h = disk_header(p)
        assert (h.generation, h.applied_seq, h.tail_seq) == (gen + 2, 6, 9)
        assert (j.applied_seq, j.first_seq, j.count) == (6, 9, 2)
    with Journal.open(str(p)) as j:
        assert (j.applied_seq, j.first_seq, j.last_seq) == (6, 9, 10)


def test_set_applied_and_release_keeps_the_tail_epoch_rule(tmp_path: Path) -> None:
    """The tail epoch is the epoch of the record at the new tail, or the current one when the
    tail is the head (module docstring), as release records it."""
    p = tmp_path / "j"
    with new_journal(tmp_path) as j:
        e1 = j.epoch
        for _ in range(3):
            j.append(0, W, 0, b"x")
    with Journal.open(str(p)) as j:
        e2 = j.epoch
        for _ in range(2):
            j.append(0, W, 0, b"y")
    with Journal.open(str(p)) as j:
        e3 = j.epoch
        assert e1 < e2 < e3
        j.set_applied_and_release(2)  # seq 3 at the tail, written in e1
        assert disk_header(p).tail_epoch == e1
        j.set_applied_and_release(3)  # seq 4, written in e2
        assert disk_header(p).tail_epoch == e2
        j.set_applied_and_release(5)  # the head
        assert disk_header(p).tail_epoch == e3
    with Journal.open(str(p)) as j:
        assert (j.applied_seq, j.first_seq, j.count) == (5, 6, 0)


def test_set_applied_and_release_on_a_closed_journal(tmp_path: Path) -> None:
    j = Journal.create(str(tmp_path / "j"), MIB, "g1")
    j.append(0, W, 0, b"x")
    j.close()
    with pytest.raises(Closed, match="closed"):
        j.set_applied_and_release(1)


def test_not_found_for_released_seqs(tmp_path: Path) -> None:
    with new_journal(tmp_path) as j:
        for _ in range(10):
            j.append(0, W, 0, b"x")
        j.release(4)
        j.release(2)  # already released: no-op
        assert j.first_seq == 5
        for bad in (0, 1, 4):
            with pytest.raises(NotFound, match="released"):
                j.entries(bad)
        assert [e.seq for e in j.entries(5)] == list(range(5, 11))
        with pytest.raises(IllegalState):
            j.release(11)


def test_bad_paths_and_params(tmp_path: Path) -> None:
    p = str(tmp_path / "j")
    for cap in (0, MIB - 4096, MIB + 512, -MIB):
        with pytest.raises(UsageError, match="capacity"):
            Journal.create(p, cap, "g1")
    with pytest.raises(UsageError, match="capacity"):
        Journal.create(p, "1M", "g1")  # type: ignore[arg-type]
    for group in ("", "a/b", "x" * 64, "sp ace"):
        with pytest.raises(UsageError, match="group name"):
            Journal.create(p, MIB, group)
    with pytest.raises(NotFound, match="directory"):
        Journal.create(str(tmp_path / "nodir" / "j"), MIB, "g1")
    with pytest.raises(NotFound):
        Journal.open(p)
    with pytest.raises(UsageError, match="directory"):
        Journal.open(str(tmp_path))
    (tmp_path / "junk").write_bytes(b"hello" * 10000)
    with pytest.raises(HeaderCorrupt, match="no valid journal header"):
        Journal.open(str(tmp_path / "junk"))
    with pytest.raises(AlreadyExists):
        Journal.create(str(tmp_path / "junk"), MIB, "g1")
    assert sorted(os.listdir(tmp_path)) == ["junk"]  # no temporary left behind
    j = Journal.create(p, MIB, "g1")
    with pytest.raises(AlreadyExists):
        Journal.create(p, MIB, "g1")
    with pytest.raises(IllegalState, match="open elsewhere"):
        Journal.open(p)
    with pytest.raises(UsageError, match="len"):
        j.append(0, W, 0, b"abc", length=4)
    with pytest.raises(UsageError, match="no data"):
        j.append(0, Z, 0, b"abc", length=3)
    with pytest.raises(UsageError, match="need a length"):
        j.append(0, T, 0)
    with pytest.raises(UsageError, match="stream"):
        j.append(1 << 32, W, 0, b"a")
    with pytest.raises(UsageError, match="range"):
        j.append(0, W, -1, b"a")
    with pytest.raises(UsageError, match="kind"):
        j.append(0, 9, 0, b"a")  # type: ignore[arg-type]
    assert j.last_seq == 0
    j.close()
    j.close()
    with pytest.raises(Closed):
        j.append(0, W, 0, b"a")
    with pytest.raises(Closed):
        j.entries(1)
    (tmp_path / "short").write_bytes(Path(p).read_bytes()[: jr.RING_OFFSET + 4096])
    with pytest.raises(HeaderCorrupt, match="bytes; its header needs"):
        Journal.open(str(tmp_path / "short"))


@pytest.mark.parametrize("slot", [0, 1])
def test_corrupt_header_slot_is_repaired_from_the_other(tmp_path: Path, slot: int) -> None:
    p = tmp_path / "j"
    with new_journal(tmp_path) as j:
        for i in range(20):
            j.append(i, W, i, bytes([i]) * 1000)
        j.release(5)
        j.set_applied(9)
        want = all_entries(j)
    with p.open("r+b") as f:
        f.seek(jr.SLOT_OFFSETS[slot] + 40)
        f.write(b"\xde\xad")
    with Journal.open(str(p)) as j:
        assert len(j.repaired) == 1 and f"slot {'AB'[slot]} damaged" in j.repaired[0]
        assert all_entries(j) == want and j.applied_seq == 9
    raw = p.read_bytes()
    a = jr.decode_header(raw[: jr.SLOT_SIZE])
    b = jr.decode_header(raw[jr.SLOT_SIZE : 2 * jr.SLOT_SIZE])
    assert a == b
    with Journal.open(str(p)) as j:
        assert j.repaired == []


def test_both_header_slots_corrupt(tmp_path: Path) -> None:
    p = tmp_path / "j"
    with new_journal(tmp_path) as j:
        j.append(0, W, 0, b"x")
    with p.open("r+b") as f:
        for off in jr.SLOT_OFFSETS:
            f.seek(off + 100)
            f.write(b"\x01")
    with pytest.raises(HeaderCorrupt, match=r"slot A: bad CRC32C.*slot B: bad CRC32C"):
        Journal.open(str(p))


def test_header_codec_rejects_each_field() -> None:
    h = jr.JournalHeader(journal_id=5, capacity=MIB, group="g", created_ns=1)
    assert jr.decode_header(jr.encode_header(h)) == h
    with pytest.raises(HeaderCorrupt, match="blank"):
        jr.decode_header(bytes(jr.SLOT_SIZE))
    with pytest.raises(HeaderCorrupt, match="truncated"):
        jr.decode_header(jr.encode_header(h)[:100])
    for major in (jr.FORMAT_MAJOR - 1, jr.FORMAT_MAJOR + 1):  # format 1 had other records
        bad = bytearray(jr.encode_header(h))
        bad[8] = major
        with pytest.raises(HeaderCorrupt, match="version"):
            jr.decode_header(bytes(bad))
    with pytest.raises(HeaderCorrupt, match="capacity"):
        jr.decode_header(jr.encode_header(replace(h, capacity=MIB + 1)))
    older = jr.encode_header(h)
    newer = jr.encode_header(replace(h, generation=2, tail_seq=9))
    got, notes = jr.choose_header(older, newer)
    assert got.tail_seq == 9 and notes == ["slot A stale (generation 1 < 2)"]


def test_release_makes_the_tail_durable_before_space_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spy on every record write: it never lands on a record that the ON-DISK header still
    counts as retained (from its tail to the newest durable record)."""
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    real, real_v = jr._pwrite_all, jr._pwritev_all
    checked = 0

    def check(fd: int, size: int, offset: int) -> None:
        nonlocal checked
        if offset >= jr.RING_OFFSET and fd == j.fd:
            h = disk_header(p)
            end = j._index[j._durable].end if j._durable >= h.tail_seq else h.tail_pos
            lo, hi = offset - jr.RING_OFFSET, offset - jr.RING_OFFSET + size
            for a, b in ring_intervals(h.tail_pos, end, j.capacity):
                assert hi <= a or lo >= b, "overwrote a record the disk still retains"
            checked += 1

    def spy(fd: int, data: bytes, offset: int) -> None:  # headers and wrap markers
        check(fd, len(data), offset)
        real(fd, data, offset)

    def spy_v(fd: int, parts: Sequence[bytes | memoryview], offset: int) -> None:  # records
        check(fd, sum(len(x) for x in parts), offset)
        real_v(fd, parts, offset)

    monkeypatch.setattr(jr, "_pwrite_all", spy)
    monkeypatch.setattr(jr, "_pwritev_all", spy_v)
    rng = random.Random(3)
    try:
        while j.last_seq < 600:
            try:
                j.append(0, W, 0, rng.randbytes(rng.randrange(60000)))
            except JournalFull:
                j.release(j.last_seq - rng.randrange(min(4, j.count) + 1))
    finally:
        j.close()
    assert checked >= 600


def test_stale_records_of_a_discarded_epoch_never_come_back(tmp_path: Path) -> None:
    """Concurrent appenders: k is torn, k+1 complete when the process dies.  Recovery ends at
    k-1.  Later the journal grows back over k and k+1's place (or the tail moves there): the
    old k+1 has the right seq and a valid CRC, but an older epoch, and must stay dead."""
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    for _ in range(3):
        j.append(0, W, 0, b"a" * 1000)
    k = j.last_seq + 1
    pos = j._head % MIB
    epoch = j.epoch
    old_k1 = jr.encode_record(
        journal_id=j.journal_id, epoch=epoch, seq=k + 1, kind=W, length=300, data=b"OLD" * 100
    )
    torn_k = jr.encode_record(
        journal_id=j.journal_id, epoch=epoch, seq=k, kind=W, length=400, data=b"k" * 400
    )
    crash(j)
    with p.open("r+b") as f:
        f.seek(jr.RING_OFFSET + pos)
        f.write(torn_k[:200])
        f.seek(jr.RING_OFFSET + pos + len(torn_k))
        f.write(old_k1)
    j = Journal.open(str(p))
    assert j.last_seq == k - 1
    assert j.append(0, W, 0, b"n" * 400) == k  # same size: ends where the old k+1 starts
    crash(j)
    with Journal.open(str(p)) as j:
        assert j.last_seq == k
        j.release(k)  # the tail now points at the old k+1's place
    with Journal.open(str(p)) as j:
        assert (j.first_seq, j.last_seq, j.count) == (k + 1, k, 0)
        assert j.append(0, W, 0, b"new") == k + 1
        assert [e.data for e in all_entries(j)] == [b"new"]


def test_io_error_breaks_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    j.append(0, W, 0, b"ok")

    def boom(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(jr.os, "fdatasync", boom)
    with pytest.raises(jr.VolumeError, match="fdatasync"):
        j.append(0, W, 0, b"lost?")
    monkeypatch.undo()
    with pytest.raises(jr.VolumeError, match="broken"):
        j.append(0, W, 0, b"x")
    j.close()
    with Journal.open(str(p)) as j:
        assert j.last_seq in (1, 2)  # the failed one may or may not have reached the disk


# -- group commit -----------------------------------------------------------------------------


def test_sixteen_threads_share_fdatasyncs(tmp_path: Path) -> None:
    per_thread = 150
    results: list[tuple[int, bytes]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)
    with new_journal(tmp_path, capacity=32 * MIB) as j:

        def worker(t: int) -> None:
            rng = random.Random(t)
            barrier.wait()
            for i in range(per_thread):
                data = f"{t}:{i}:".encode() + rng.randbytes(rng.randrange(2000))
                s = j.append(t, W, i * 4096, data)
                with lock:
                    results.append((s, data))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        n = 16 * per_thread
        assert sorted(s for s, _ in results) == list(range(1, n + 1))
        got = {e.seq: e.data for e in all_entries(j)}
        assert got == dict(results)
        assert j.appends == n
        assert 1 <= j.data_syncs < n
        print(f"{n} appends, {j.data_syncs} fdatasyncs")


def test_no_append_returns_before_every_earlier_one_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seq 1's pwrite is held back; seq 2 (written, and synced by a flusher) must not be
    acknowledged until seq 1 is on disk too, or a crash could leave an acknowledged gap."""
    with new_journal(tmp_path) as j:
        real = jr._pwritev_all  # a record: its header, data and padding in one pwritev
        hold = threading.Event()
        entered = threading.Event()

        def slow(fd: int, parts: Sequence[bytes | memoryview], offset: int) -> None:
            head = bytes(parts[0])
            if head[:4] == jr.REC_MAGIC and head[8:16] == (1).to_bytes(8, "little"):
                entered.set()
                hold.wait()
            real(fd, parts, offset)

        monkeypatch.setattr(jr, "_pwritev_all", slow)
        got: dict[str, int] = {}
        first = threading.Thread(target=lambda: got.update(a=j.append(0, W, 0, b"a")))
        first.start()
        entered.wait()
        second = threading.Thread(target=lambda: got.update(b=j.append(0, W, 0, b"b")))
        second.start()
        try:
            second.join(timeout=0.3)  # a correct journal never lets it finish here
            assert second.is_alive() and "b" not in got
        finally:
            hold.set()
        first.join()
        second.join()
        assert got == {"a": 1, "b": 2}
        assert [e.data for e in all_entries(j)] == [b"a", b"b"]


# -- hypothesis: stateful model ---------------------------------------------------------------

CAP = MIB


class JournalMachine(RuleBasedStateMachine):
    """A journal against a list of retained entries, last_seq and applied_seq."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="pvjournal-")
        self.path = os.path.join(self.dir, "j")
        self.j = Journal.create(self.path, CAP, "g1")
        self.model: list[Entry] = []
        self.first = 1
        self.last = 0
        self.applied = 0
        self.stamp = 0

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.j.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        size=st.sampled_from([0, 1, 447, 448, 449, 3000, 40000, 150000]),
        stream=st.integers(0, 3),
        kind=st.sampled_from(list(EntryKind)),
        offset=st.integers(0, 1 << 40),
        explicit=st.booleans(),
        fua=st.booleans(),
        seed=st.integers(0, 255),
    )
    def append(
        self,
        size: int,
        stream: int,
        kind: EntryKind,
        offset: int,
        explicit: bool,
        fua: bool,
        seed: int,
    ) -> None:
        self.stamp += 1
        data = random.Random(seed).randbytes(size) if kind is W else b""
        length = size if kind is W else size + 1
        used = self.j.used_bytes
        try:
            s = self.j.append(
                stream,
                kind,
                offset,
                data,
                length=length,
                fua=fua,
                stamp_ns=self.stamp,
                seq=self.last + 1 if explicit else None,
            )
        except JournalFull:
            assert (self.j.used_bytes, self.j.next_seq) == (used, self.last + 1)
            return
        assert s == self.last + 1
        self.last = s
        self.model.append(Entry(s, stream, kind, offset, length, data, fua, self.stamp))

    @rule(back=st.integers(0, 20))
    def release(self, back: int) -> None:
        upto = max(self.first - 1, self.last - back)
        self.j.release(upto)
        self.model = [e for e in self.model if e.seq > upto]
        self.first = max(self.first, upto + 1)

    @rule()
    def drop_all(self) -> None:
        got = self.j.drop_all()
        assert got == [replace(e, data=b"") for e in self.model]
        self.model = []
        self.first = self.last + 1

    @rule(ahead=st.integers(0, 5))
    def set_applied(self, ahead: int) -> None:
        target = min(self.last, self.applied + ahead)
        self.j.set_applied(target)
        self.applied = target

    @rule(ahead=st.integers(0, 5))
    def set_applied_and_release(self, ahead: int) -> None:
        """The secondary's applier: both marks in one header commit."""
        target = min(self.last, self.applied + ahead)
        self.j.set_applied_and_release(target)
        self._applied_and_released(target)

    @rule(
        ahead=st.integers(0, 5),
        point=st.sampled_from(HEADER_CRASH_POINTS),
        power_loss=st.booleans(),
    )
    def crash_in_set_applied_and_release(self, ahead: int, point: str, power_loss: bool) -> None:
        """Die in the middle of its header commit: then both marks moved or neither."""
        target = min(self.last, self.applied + ahead)
        with pytest.MonkeyPatch.context() as mp:
            die_in_header_commit(mp, point, power_loss)
            try:
                self.j.set_applied_and_release(target)
                died = False  # nothing to commit: both marks were there already
            except Killed:
                died = True
        crash(self.j)
        self.j = Journal.open(self.path)
        if not died or new_header_survives(point, power_loss):
            self._applied_and_released(target)

    def _applied_and_released(self, target: int) -> None:
        self.applied = target
        self.model = [e for e in self.model if e.seq > target]
        self.first = max(self.first, target + 1)

    @rule()
    def reopen(self) -> None:
        self.j.close()
        self.j = Journal.open(self.path)

    @rule(
        leftover=st.sampled_from(["none", "garbage", "torn", "gap", "old-epoch", "complete"]),
        size=st.sampled_from([0, 10, 448, 5000]),
        seed=st.integers(0, 1 << 16),
    )
    def crash(self, leftover: str, size: int, seed: int) -> None:
        """Die, leaving what an append in progress could leave after the last record."""
        j = self.j
        rng = random.Random(seed)
        head = j._head
        ring = head % CAP
        fits = ring + jr.record_size(size) <= CAP and head + jr.record_size(size) - j._tail <= CAP
        data = rng.randbytes(size)
        nxt = self.last + 1

        def rec(seq: int, epoch: int) -> bytes:
            return jr.encode_record(
                journal_id=j.journal_id,
                epoch=epoch,
                seq=seq,
                kind=W,
                length=size,
                data=data,
                stamp_ns=1,
            )

        junk = b""
        if not fits or leftover == "none":
            pass
        elif leftover == "garbage":
            junk = rng.randbytes(jr.record_size(size))
        elif leftover == "torn":
            # The first byte it did not write must differ from the record's: otherwise bytes
            # left there by an earlier crash with the same data complete the record on disk.
            full = rec(nxt, j.epoch)
            cut = rng.randrange(jr.REC_HEADER_LEN + size)
            junk = full[:cut] + bytes([full[cut] ^ 0xFF])
        elif leftover == "gap":
            junk = rec(nxt + 1, j.epoch)
        elif leftover == "old-epoch":
            junk = rec(nxt, 1)  # no record is ever written in epoch 1 (open bumps it)
        elif leftover == "complete":
            junk = rec(nxt, j.epoch)
        crash(j)
        if junk:
            fd = os.open(self.path, os.O_WRONLY)
            os.pwrite(fd, junk, jr.RING_OFFSET + ring)
            os.close(fd)
        self.j = Journal.open(self.path)
        if junk and leftover == "complete":
            # It finished writing but was never acknowledged: recovery may keep it.
            self.last = nxt
            self.model.append(Entry(nxt, 0, W, 0, size, data, False, 1))

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 1 << 16))
    def read_from(self, pick: int) -> None:
        e = self.model[pick % len(self.model)]
        assert list(self.j.entries(e.seq)) == [x for x in self.model if x.seq >= e.seq]

    @invariant()
    def matches_model(self) -> None:
        j = self.j
        assert (j.first_seq, j.last_seq, j.applied_seq) == (self.first, self.last, self.applied)
        assert j.count == len(self.model)
        assert all_entries(j) == self.model
        if self.first <= self.last - 1:
            with pytest.raises(NotFound):
                j.entries(self.first - 1)


def test_machine_torn_leftover_over_an_earlier_crash_stays_torn() -> None:
    """A crash leaving a record with a later seq, then one leaving the next seq torn with the
    same data: the old record's bytes past the cut must not complete the torn one."""
    m = JournalMachine()
    try:
        m.append(size=1, stream=0, kind=W, offset=0, explicit=False, fua=False, seed=0)
        m.crash(leftover="gap", size=448, seed=0)  # seed 0 cuts the torn record at byte 111
        m.matches_model()
        m.crash(leftover="torn", size=448, seed=0)
        m.matches_model()
    finally:
        m.teardown()


JournalMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestJournalMachine = JournalMachine.TestCase


# -- hypothesis: replay equals direct application ----------------------------------------------

VOL = 64 * 1024


def apply(vol: bytearray, kind: EntryKind, offset: int, length: int, data: bytes) -> None:
    vol[offset : offset + length] = data if kind is W else bytes(length)


@st.composite
def writes(draw: st.DrawFn) -> list[tuple[EntryKind, int, int, bytes]]:
    out = []
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from([W, W, W, Z, T]))
        offset = draw(st.integers(0, VOL - 1))
        length = draw(st.integers(1, min(VOL - offset, 9000)))
        fill = draw(st.integers(1, 255))
        data = bytes([fill]) * length if kind is W else b""
        out.append((kind, offset, length, data))
    return out


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=writes(), crash_at=st.integers(0, 30), cut=st.integers(0, 1 << 20))
def test_replay_equals_direct_application(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[EntryKind, int, int, bytes]],
    crash_at: int,
    cut: int,
) -> None:
    d = tmp_path_factory.mktemp("replay")
    p = str(d / "j")
    direct = bytearray(VOL)
    states = [bytes(direct)]
    with Journal.create(p, MIB, "g1") as j:
        for kind, offset, length, data in ops:
            j.append(0, kind, offset, data, length=length)
            apply(direct, kind, offset, length, data)
            states.append(bytes(direct))
        head = j._head
        # where each record's CRC-covered bytes end (padding is not covered)
        ends = {0: 0}
        for s in range(1, j.last_seq + 1):
            slot = j._index[s]
            ends[s] = slot.pos + jr.REC_HEADER_LEN + (slot.length if slot.kind is W else 0)
    replayed = bytearray(VOL)
    with Journal.open(p) as j:
        for e in j.entries(1):
            apply(replayed, e.kind, e.offset, e.length, e.data)
    assert replayed == direct
    # Crash after the first k appends: what follows record k is torn (kept up to some byte
    # of a later record, the rest never written).  Recovery yields the records whose bytes
    # all survived: a prefix, and the image is exactly the one after that many writes.
    k = min(crash_at, len(ops))
    keep = ends[k] + cut % (head - ends[k] + 1)
    with open(p, "r+b") as f:
        f.seek(jr.RING_OFFSET + keep)
        f.write(bytes(head - keep))
    replayed = bytearray(VOL)
    with Journal.open(p) as j:
        assert j.last_seq == max(s for s, end in ends.items() if end <= keep)
        assert j.last_seq >= k
        for e in j.entries(1):
            apply(replayed, e.kind, e.offset, e.length, e.data)
        assert bytes(replayed) == states[j.last_seq]


def test_written_mode_appends_without_fdatasync_and_sync_makes_durable(tmp_path: Path) -> None:
    p = str(tmp_path / "j")
    j = Journal.create(p, 1 * MIB, "g1")
    j.sync_appends = False
    try:
        seqs = [j.append(0, W, i * 4096, bytes([i]) * 100) for i in range(10)]
        assert seqs == list(range(1, 11)) and j.last_seq == 10
        assert j.data_syncs == 0  # nothing synced yet, yet every entry is readable
        assert [e.data[0] for e in j.entries(1)] == list(range(10))
        j.sync()
        assert j.data_syncs == 1
        j.sync()  # nothing new: no second fdatasync
        assert j.data_syncs == 1
        j.release(5)
        assert j.first_seq == 6
    finally:
        j.close()
    with Journal.open(p) as again:
        assert [e.seq for e in again.entries(6)] == list(range(6, 11))


# -- SIGKILL while appending from several threads ---------------------------------------------

KILL_THREADS = 6


def _child(path: str, seed: int, sync_appends: bool = True, applier: bool = False) -> None:
    """Append from several threads and release, as the primary does (``release``) or, with
    ``applier``, as the secondary's applier does (``set_applied_and_release``)."""
    j = Journal.open(path)
    j.sync_appends = sync_appends
    out_lock = threading.Lock()
    print("ready", flush=True)

    def appender(t: int) -> None:
        rng = random.Random(seed * 100 + t)
        while True:
            data = rng.randbytes(rng.choice([0, 10, 500, 3000, 20000]))
            try:
                s = j.append(t, W, rng.randrange(1 << 30), data)
            except JournalFull:
                continue
            with out_lock:
                sys.stdout.write(f"{s} {hashlib.blake2b(data).hexdigest()}\n")
                sys.stdout.flush()

    def releaser() -> None:
        while True:
            if j.usage() > 0.6 and j.count > 40:
                if applier:
                    j.set_applied_and_release(max(j.last_seq - 40, j.applied_seq))
                else:
                    j.release(j.last_seq - 40)
            time.sleep(0.002)

    threads = [threading.Thread(target=appender, args=(t,), daemon=True) for t in range(6)]
    threads.append(threading.Thread(target=releaser, daemon=True))
    for th in threads:
        th.start()
    threading.Event().wait()


@pytest.mark.parametrize(
    ("sync_appends", "applier"),
    [(True, False), (False, False), (False, True)],
    ids=["fdatasync", "written", "written-applier"],
)
def test_sigkill_loses_no_acknowledged_append(
    tmp_path: Path, sync_appends: bool, applier: bool
) -> None:
    """Either durability mode: a SIGKILLed process loses no append that returned (the page
    cache survives the process), and recovery never shows a torn or out-of-order record.
    Releasing as the secondary's applier does, the applied mark is always just behind the
    tail: they move in one header commit."""
    p = tmp_path / "j"
    Journal.create(str(p), 2 * MIB, "g1").close()
    rng = random.Random(random.randrange(1 << 32))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    total = 0
    for _ in range(6):
        seed = rng.randrange(1 << 32)
        with subprocess.Popen(
            [
                sys.executable,
                __file__,
                str(p),
                str(seed),
                str(int(sync_appends)),
                str(int(applier)),
            ],
            stdout=subprocess.PIPE,
            env=env,
        ) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=rng.uniform(0.1, 0.6))
            proc.send_signal(signal.SIGKILL)
            out = proc.stdout.read()
            proc.wait()
        acked = {}
        for line in out.split(b"\n")[:-1]:  # the last piece may be cut short by the kill
            s, digest = line.split()
            acked[int(s)] = digest.decode()
        assert acked, "the child acknowledged nothing"
        total += len(acked)
        with Journal.open(str(p)) as j:
            entries = all_entries(j)
            seqs = [e.seq for e in entries]
            assert seqs == list(range(j.first_seq, j.last_seq + 1))
            assert j.last_seq >= max(acked), f"acknowledged seq lost (child seed {seed})"
            got = {e.seq: hashlib.blake2b(e.data).hexdigest() for e in entries}
            for s, digest in acked.items():
                if s >= j.first_seq:
                    assert got[s] == digest, f"seq {s} has other data (child seed {seed})"
            assert sum(1 for s in acked if s >= j.first_seq) > 0
            if applier:
                assert j.applied_seq == j.first_seq - 1, f"marks apart (child seed {seed})"
            head = j._head
    assert total > 100
    assert head > 2 * 2 * MIB  # the ring went round more than once


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1")


def test_a_record_written_in_short_pwritevs_lands_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record goes down as header, data and padding in one ``pwritev`` (the data is not
    copied into a joined buffer); a write that takes fewer bytes goes on from there."""
    real = os.pwritev
    calls = 0

    def short(fd: int, views: Sequence[memoryview], offset: int) -> int:
        nonlocal calls
        calls += 1
        first = bytes(views[0][:7]) if len(views[0]) >= 7 else bytes(views[0])
        return real(fd, [first], offset)  # at most 7 bytes of the first part

    data = bytes(range(256)) * 40  # 10 KiB
    with new_journal(tmp_path) as j:
        monkeypatch.setattr(jr.os, "pwritev", short)
        seq = j.append(0, W, 0, data)
        monkeypatch.undo()
        assert calls > 10_000 // 7
        assert [e.data for e in j.entries(seq)] == [data]
    with Journal.open(str(tmp_path / "j")) as j:
        assert [e.data for e in j.entries(seq)] == [data]
