"""Torn tail or corruption (replicator.journal, docs/format.md "Recovery"): a damaged record
followed by later records that vouch for it is JournalCorrupt with a salvage; damage at the end
is a torn tail, truncated as before; reset continues the sequence space."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from replicator import journal as jr
from replicator.errors import EXIT_CODES, HeaderCorrupt, IllegalState
from replicator.journal import Entry, EntryKind, Journal, JournalCorrupt, JournalFull

MIB = 1 << 20
W, Z, T = EntryKind.WRITE, EntryKind.ZERO, EntryKind.TRIM


def crash(j: Journal) -> None:
    """Drop the journal as a dying process would (its writes stay in the page cache)."""
    j._closed = True
    os.close(j.fd)


def file_offset(j: Journal, seq: int) -> int:
    return jr.RING_OFFSET + j._index[seq].pos % j.capacity


def flip(path: Path | str, offset: int, mask: int = 0x5A) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def zero(path: Path | str, offset: int, n: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(n))


def located(e: Entry) -> Entry:
    return replace(e, data=b"")


def fill(j: Journal, n: int, size: int = 3000) -> list[Entry]:
    for i in range(n):
        j.append(i % 3, W, i * 4096, bytes([i % 251]) * size, stamp_ns=i + 1)
    return list(j.entries(j.first_seq))


def open_corrupt(path: Path | str) -> jr.JournalSalvage:
    before = Path(path).read_bytes()
    with pytest.raises(JournalCorrupt) as info:
        Journal.open(str(path))
    assert Path(path).read_bytes() == before, "a corrupt journal must be left untouched"
    err = info.value
    assert isinstance(err, HeaderCorrupt) and err.exit_code == EXIT_CODES["corrupt"]
    assert err.path == str(path) and str(path) in str(err) and "\n" not in str(err)
    return err.salvage


# -- torn tails: truncated, no error ----------------------------------------------------------


@pytest.mark.parametrize("sync_appends", [True, False], ids=["fdatasync", "written"])
def test_torn_last_record_is_truncated(tmp_path: Path, sync_appends: bool) -> None:
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    j.sync_appends = sync_appends
    want = fill(j, 6)
    last = file_offset(j, 6)
    crash(j)
    zero(p, last + jr.REC_HEADER_LEN + 1000, 2000)  # data half written
    with Journal.open(str(p)) as j:
        assert j.last_seq == 5 and list(j.entries(1)) == want[:5]
    # The same, but the header sector never made it; and garbage after the last record.
    with Journal.open(str(p)) as j:
        fill(j, 2)
        last = file_offset(j, 7)
        end = last + jr.record_size(3000)
        crash(j)
    zero(p, last, 512)
    with open(p, "r+b") as f:
        f.seek(end)
        f.write(random.Random(1).randbytes(20000))
    with Journal.open(str(p)) as j:
        assert j.last_seq == 6


def test_damaged_last_record_is_a_torn_tail_even_when_once_durable(tmp_path: Path) -> None:
    """Nothing valid after it: indistinguishable from a torn append, so truncated (the rule
    needs a later record; docs/format.md)."""
    p = tmp_path / "j"
    with Journal.create(str(p), MIB, "g1") as j:
        fill(j, 4)
    with Journal.open(str(p)) as j:  # the header now vouches for 1..4
        off = file_offset(j, 4)
    flip(p, off + 200)
    with Journal.open(str(p)) as j:
        assert j.last_seq == 3


def test_concurrent_leftovers_after_a_torn_record_are_not_corruption(tmp_path: Path) -> None:
    """k torn, k+1 and k+2 complete (their appenders reserved them while k was in flight):
    they do not vouch for k, so this is a torn tail even though valid records follow."""
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    fill(j, 3)
    k = j.last_seq + 1
    pos = j._head % MIB
    recs = [
        jr.encode_record(
            journal_id=j.journal_id,
            epoch=j.epoch,
            seq=k + i,
            kind=W,
            data=bytes([i + 1]) * 700,
            written_seq=k - 1,
            synced_seq=0,
        )
        for i in range(3)
    ]
    crash(j)
    with open(p, "r+b") as f:
        f.seek(jr.RING_OFFSET + pos)
        f.write(recs[0][:300] + bytes(len(recs[0]) - 300))  # header intact, data torn
        f.write(recs[1] + recs[2])
    with Journal.open(str(p)) as j:
        assert j.last_seq == k - 1


# -- corruption: raised, with the salvage -----------------------------------------------------


@pytest.mark.parametrize("sync_appends", [True, False], ids=["fdatasync", "written"])
def test_flipped_payload_byte_is_corruption_with_known_extent(
    tmp_path: Path, sync_appends: bool
) -> None:
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    j.sync_appends = sync_appends
    want = fill(j, 10)
    off = file_offset(j, 4)
    crash(j)
    flip(p, off + jr.REC_HEADER_LEN + 1234)
    s = open_corrupt(p)
    assert (s.first_bad_seq, s.first_bad_offset, s.following) == (4, off, 6)
    assert s.entries == tuple(located(e) for e in want if e.seq != 4)
    assert len(s.damaged) == 1 and not s.extent_unknown
    d = s.damaged[0]
    assert (d.first_seq, d.last_seq, d.ring_offset) == (4, 4, off - jr.RING_OFFSET)
    assert d.extent == located(want[3]) and d.nbytes == jr.record_size(3000)
    assert s.vouched_seq >= 9 and s.max_seq == 10 and s.next_seq == 11
    assert (s.first_seq, s.applied_seq, s.group, s.journal_id) == (1, 0, "g1", j.journal_id)
    assert "seq 4" in str(open_exc(p)) and "6 valid later" in str(open_exc(p))


def open_exc(p: Path) -> JournalCorrupt:
    try:
        Journal.open(str(p)).close()
    except JournalCorrupt as e:
        return e
    raise AssertionError("not corrupt")


@pytest.mark.parametrize("where", [0, 8, 30, 60, 70, 95])
def test_flipped_record_header_byte_is_corruption_with_unknown_extent(
    tmp_path: Path, where: int
) -> None:
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    want = fill(j, 10)
    off = file_offset(j, 7)
    crash(j)
    flip(p, off + where)
    s = open_corrupt(p)
    assert s.first_bad_seq == 7 and s.following == 3
    assert [e.seq for e in s.entries] == [1, 2, 3, 4, 5, 6, 8, 9, 10]
    assert s.entries == tuple(located(e) for e in want if e.seq != 7)
    assert len(s.damaged) == 1 and s.extent_unknown
    d = s.damaged[0]
    assert (d.first_seq, d.last_seq, d.extent) == (7, 7, None)
    assert d.ring_offset == off - jr.RING_OFFSET and d.nbytes == jr.record_size(3000)


def test_several_damaged_records_and_a_damaged_end(tmp_path: Path) -> None:
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    fill(j, 12)
    offs = {s: file_offset(j, s) for s in (3, 4, 8, 12)}
    crash(j)
    zero(p, offs[3], 2 * jr.record_size(3000))  # 3 and 4 gone entirely
    flip(p, offs[8] + 2000)  # 8's data
    flip(p, offs[12] + 10)  # the last one: nothing vouches for it, the torn tail
    s = open_corrupt(p)
    assert s.first_bad_seq == 3 and s.following == 6
    assert [e.seq for e in s.entries] == [1, 2, 5, 6, 7, 9, 10, 11]
    got = [(d.first_seq, d.last_seq, d.extent is not None) for d in s.damaged]
    assert got == [(3, 4, False), (8, 8, True)]
    assert s.damaged[0].nbytes == 2 * jr.record_size(3000)


def test_corruption_found_after_the_ring_has_wrapped(tmp_path: Path) -> None:
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    rng = random.Random(5)

    def straddles() -> bool:  # the retained range runs over the end of the ring
        if j.count < 9:
            return False
        return j._index[j.first_seq].pos % MIB > j._index[j.last_seq - 1].pos % MIB

    while j._head < 3 * MIB or not straddles():  # several laps
        try:
            j.append(rng.randrange(3), W, rng.randrange(1 << 20), rng.randbytes(30000))
        except JournalFull:
            j.release(j.last_seq - 8)
    retained = list(j.entries(j.first_seq))
    assert len(retained) >= 9
    # one record after the end-of-ring wrap, one before it
    after = [e.seq for e in retained[:-1] if j._index[e.seq].pos % MIB < j._head % MIB]
    before = [e.seq for e in retained[:-1] if j._index[e.seq].pos % MIB > j._head % MIB]
    assert after and before
    image = p.read_bytes()
    crash(j)
    for victim in (after[0], before[-1], before[0]):
        p.write_bytes(image)
        vpos = j._index[victim].pos
        flip(p, jr.RING_OFFSET + vpos % MIB + 40)
        s = open_corrupt(p)
        assert s.first_bad_seq == victim and s.first_seq == retained[0].seq
        assert [e.seq for e in s.entries] == [e.seq for e in retained if e.seq != victim]
        assert [(d.first_seq, d.last_seq) for d in s.damaged] == [(victim, victim)]
        assert s.damaged[0].ring_offset == vpos % MIB
    # The wrap marker itself damaged: the record after it is intact and still located.
    wrapped = next(e.seq for e in retained if j._index[e.seq].start != j._index[e.seq].pos)
    marker = j._index[wrapped].start
    p.write_bytes(image)
    flip(p, jr.RING_OFFSET + marker % MIB + 20)
    if wrapped == retained[-1].seq:
        with Journal.open(str(p)) as j2:  # nothing later vouches for it: a torn tail
            assert j2.last_seq == wrapped - 1
    else:
        s = open_corrupt(p)
        assert s.first_bad_seq == wrapped and s.damaged == ()
        assert [e.seq for e in s.entries] == [e.seq for e in retained]


def test_corruption_of_records_from_an_earlier_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records recovered by an earlier open are vouched for by the header it wrote, even
    after a reboot and in write-back mode."""
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    j.sync_appends = False
    fill(j, 5)
    j.close()
    with Journal.open(str(p)) as j:
        off = file_offset(j, 2)
    flip(p, off + 500)
    monkeypatch.setattr(jr, "_boot_id", lambda: b"\x01" * 16)  # and a reboot
    s = open_corrupt(p)
    assert s.first_bad_seq == 2 and [d.extent is not None for d in s.damaged] == [True]


def test_after_a_reboot_only_durable_proof_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later record's written mark proves nothing across a reboot (the page cache is gone);
    its synced mark does."""
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    j.sync_appends = False
    fill(j, 4)
    j.sync()  # 1..4 durable: records from now on say so
    fill(j, 4)
    offs = {s: file_offset(j, s) for s in (3, 6)}
    crash(j)
    image = p.read_bytes()
    monkeypatch.setattr(jr, "_boot_id", lambda: b"\x01" * 16)  # a new boot
    flip(p, offs[6] + 100)  # written, never synced: lost in a power cut is allowed
    with Journal.open(str(p)) as j:
        assert j.last_seq == 5
    p.write_bytes(image)
    flip(p, offs[3] + 100)  # synced: its damage is corruption
    s = open_corrupt(p)
    assert s.first_bad_seq == 3
    monkeypatch.undo()
    p.write_bytes(image)
    flip(p, offs[6] + 100)  # same boot: written is enough
    assert open_corrupt(p).first_bad_seq == 6


def test_stale_records_of_an_earlier_lap_are_not_later_records(tmp_path: Path) -> None:
    """After wrapping, the free part of the ring is full of valid records of earlier laps;
    a torn tail in front of them is still a torn tail."""
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    while j._head < 2 * MIB:
        try:
            j.append(0, W, 0, bytes(20000))
        except JournalFull:
            j.release(j.last_seq - 2)
    last = j.last_seq
    off = file_offset(j, last)
    crash(j)
    flip(p, off + 3000)
    with Journal.open(str(p)) as j:
        assert j.last_seq == last - 1


# -- reset ------------------------------------------------------------------------------------


def test_reset_continues_the_sequence(tmp_path: Path) -> None:
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1", first_seq=500)
    fill(j, 10)
    off = file_offset(j, 503)
    old_id = j.journal_id
    crash(j)
    flip(p, off + 10)
    s = open_corrupt(p)
    assert s.next_seq == 510
    with pytest.raises(IllegalState, match="used already"):
        Journal.reset(str(p), 509)
    assert Journal.reset(str(p)) == 510
    with Journal.open(str(p)) as j:
        assert (j.first_seq, j.last_seq, j.applied_seq, j.count) == (510, 509, 509, 0)
        assert j.journal_id != old_id and j.repaired == []
        assert j.append(0, W, 0, b"new") == 510
        assert j.append(0, W, 0, b"new2") == 511
        crash(j)
    with Journal.open(str(p)) as j:  # nothing of the old journal ever comes back
        assert [e.data for e in j.entries(510)] == [b"new", b"new2"]
    assert Journal.reset(str(p), 1000) == 1000  # higher is fine (a peer saw more)
    with Journal.open(str(p)) as j:
        assert j.next_seq == 1000
    with Journal.open(str(p)) as j, pytest.raises(IllegalState, match="open elsewhere"):
        Journal.reset(str(p))


def test_reset_goes_past_every_seq_in_the_file(tmp_path: Path) -> None:
    """A leftover record with a higher seq than the chain (never acknowledged) still counts:
    a number is never handed out twice."""
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    fill(j, 3)
    far = jr.encode_record(journal_id=j.journal_id, epoch=j.epoch, seq=77, kind=Z, length=5)
    pos = j._head % MIB + 100 * 512
    crash(j)
    with open(p, "r+b") as f:
        f.seek(jr.RING_OFFSET + pos)
        f.write(far)
    with Journal.open(str(p)) as j:
        assert j.last_seq == 3
    assert Journal.reset(str(p)) == 78


@pytest.mark.parametrize("stop_after", [1, 2])
def test_reset_is_crash_safe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_after: int
) -> None:
    """Killed after the first slot (durable) or in the middle of writing it: the journal is
    either the new empty one or the old corrupt one, never anything else."""
    p = tmp_path / "j"
    j = Journal.create(str(p), MIB, "g1")
    fill(j, 6)
    off = file_offset(j, 2)
    crash(j)
    flip(p, off + 5)
    real = jr._pwrite_all
    calls = 0

    class Killed(BaseException):
        pass

    def dying(fd: int, data: bytes, offset: int) -> None:
        nonlocal calls
        calls += 1
        if calls == stop_after:
            if stop_after == 1:
                real(fd, data[:100], offset)  # torn first slot
            raise Killed
        real(fd, data, offset)

    monkeypatch.setattr(jr, "_pwrite_all", dying)
    with pytest.raises(Killed):
        Journal.reset(str(p))
    monkeypatch.undo()
    if stop_after == 1:
        assert open_corrupt(p).first_bad_seq == 2
        assert Journal.reset(str(p)) == 7
    with Journal.open(str(p)) as j:
        assert (j.first_seq, j.count) == (7, 0)
        assert stop_after == 1 or any("stale" in n for n in j.repaired)


def test_reset_writes_the_bad_slot_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "j"
    Journal.create(str(p), MIB, "g1").close()
    zero(p, jr.SLOT_OFFSETS[1] + 50, 10)
    order: list[int] = []
    real = jr._pwrite_all

    def spy(fd: int, data: bytes, offset: int) -> None:
        order.append(offset)
        real(fd, data, offset)

    monkeypatch.setattr(jr, "_pwrite_all", spy)
    Journal.reset(str(p))
    assert order == [jr.SLOT_OFFSETS[1], jr.SLOT_OFFSETS[0]]
    order.clear()
    zero(p, jr.SLOT_OFFSETS[1] + 50, 10)
    Journal.open(str(p)).close()  # open repairs the same way
    assert order[:2] == [jr.SLOT_OFFSETS[1], jr.SLOT_OFFSETS[0]]


# -- header slots -----------------------------------------------------------------------------


def test_both_header_slots_corrupt_names_that_file_only(tmp_path: Path) -> None:
    bad, good = tmp_path / "bad.journal", tmp_path / "good.journal"
    for path in (bad, good):
        with Journal.create(str(path), MIB, "g1") as j:
            fill(j, 3)
    for off in jr.SLOT_OFFSETS:
        flip(bad, off + 30)
    with pytest.raises(HeaderCorrupt) as info:
        Journal.open(str(bad))
    assert not isinstance(info.value, JournalCorrupt)
    assert str(bad) in str(info.value) and "no valid journal header slot" in str(info.value)
    assert info.value.exit_code == EXIT_CODES["corrupt"]
    with pytest.raises(HeaderCorrupt, match="no valid journal header slot"):
        Journal.reset(str(bad))
    with Journal.open(str(good)) as j:
        assert j.last_seq == 3


# -- hypothesis: damage before the last record raises, damage in the tail never does ----------


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, int]]:
    ops = []
    for _ in range(draw(st.integers(2, 40))):
        op = draw(st.sampled_from(["append"] * 6 + ["burst", "release", "reopen", "sync"]))
        ops.append((op, draw(st.sampled_from([0, 1, 400, 417, 3000, 40000, 120000]))))
    return ops


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=histories(),
    sync_appends=st.booleans(),
    where=st.sampled_from(["before", "last", "tail"]),
    pick=st.integers(0, 1 << 30),
)
def test_damage_before_the_last_record_is_always_corruption(
    ops: list[tuple[str, int]], sync_appends: bool, where: str, pick: int
) -> None:
    d = tempfile.mkdtemp(prefix="pvjc-")
    try:
        _damage_case(os.path.join(d, "j"), ops, sync_appends, where, pick)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _damage_case(
    p: str, ops: list[tuple[str, int]], sync_appends: bool, where: str, pick: int
) -> None:
    rng = random.Random(pick)
    j = Journal.create(p, MIB, "g1")
    j.sync_appends = sync_appends
    for op, size in ops:
        for _ in range(8 if op == "burst" else 1 if op == "append" else 0):
            size = rng.randrange(60000, 150000) if op == "burst" else size
            kind = W if size else rng.choice([Z, T])
            try:
                j.append(rng.randrange(4), kind, rng.randrange(1 << 30), rng.randbytes(size),
                         length=size if size else 4096)  # fmt: skip
            except JournalFull:
                j.release(j.last_seq - rng.randrange(min(3, j.count) + 1))
        if op == "release" and j.count:
            j.release(j.last_seq - rng.randrange(j.count + 1))
        elif op == "reopen":
            j.close()
            j = Journal.open(p)
            j.sync_appends = sync_appends
        elif op == "sync":
            j.sync()
    retained = list(j.entries(j.first_seq))
    cap = j.capacity

    def covered(seq: int) -> tuple[int, int]:  # file offset and length of CRC-covered bytes
        s = j._index[seq]
        return jr.RING_OFFSET + s.pos % cap, jr.REC_HEADER_LEN + len(
            retained[seq - j.first_seq].data
        )

    if (where == "before" and len(retained) < 2) or (where == "last" and not retained):
        where = "tail"
    if where == "tail":
        # anywhere after the last record's covered bytes, in the free part of the ring
        lo = j._index[j.last_seq].pos + covered(j.last_seq)[1] if retained else j._head
        hi = j._tail + cap
        if hi <= lo:
            j.close()
            return
        target_pos = lo + rng.randrange(hi - lo)
        target = jr.RING_OFFSET + target_pos % cap
        victim = None
    else:
        victim = retained[rng.randrange(len(retained) - 1)].seq if where == "before" else j.last_seq
        off, n = covered(victim)
        target = off + rng.randrange(n)
    event(f"damage {where}" + (", wrapped" if j._head > cap else ""))
    crash(j)
    flip(p, target, rng.randrange(1, 256))
    if where == "before":
        assert victim is not None
        with pytest.raises(JournalCorrupt) as info:
            Journal.open(p)
        s = info.value.salvage
        assert s.first_bad_seq == victim
        assert [e.seq for e in s.entries] == [e.seq for e in retained if e.seq != victim]
        assert [(r.first_seq, r.last_seq) for r in s.damaged] == [(victim, victim)]
        if target - covered(victim)[0] >= jr.REC_HEADER_LEN:
            assert s.damaged[0].extent == located(retained[victim - retained[0].seq])
        else:
            assert s.damaged[0].extent is None
        return
    with Journal.open(p) as j2:
        got = list(j2.entries(j2.first_seq))
    assert got == (retained[:-1] if where == "last" else retained)
