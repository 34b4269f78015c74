"""Persistent bitmaps in the metadata region (replicator.bitmap_store): layout, bounds, crash
safety under SIGKILL, torn page writes.

Run as a script, this module is the child process of the SIGKILL test (see ``_child``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import header as hdr
from replicator.bitmap import PAGE, Bitmap
from replicator.bitmap_store import BitmapStore
from replicator.errors import HeaderCorrupt, IllegalState, UsageError, VolumeError
from replicator.volume import Volume

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def outside_slot_digest(path: Path, store: BitmapStore, slot: int | None) -> str:
    """sha256 of the whole image except bitmap slot ``slot`` (header slots, the other bitmap
    slots, the gap before the data area and the data area itself)."""
    h = hashlib.sha256()
    lo = hi = 0
    if slot is not None:
        lo = store.slot_offset(slot)
        hi = lo + store.slot_size
    with path.open("rb") as f:
        h.update(f.read(lo))
        f.seek(hi)
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def scribble(path: Path, v: Volume) -> None:
    """Non-zero bytes where a stray bitmap write would land: the data area's edges and the
    gap after the metadata region.  (The header slots are non-zero already.)"""
    h = v.header
    rng = random.Random(1)
    spots = [h.data_offset, h.data_offset + h.data_size - PAGE]
    meta_end = h.meta_offset + h.meta_size
    if meta_end < h.data_offset:
        spots.append(meta_end)
    with path.open("r+b") as f:
        for off in spots:
            f.seek(off)
            f.write(rng.randbytes(PAGE))


@contextlib.contextmanager
def opened(path: Path, size: int) -> Iterator[tuple[Volume, BitmapStore]]:
    if not path.exists():
        Volume.create(str(path), size).close()
    with Volume.open(str(path), writable=True) as v:
        yield v, BitmapStore(v.fd, v.header)


def test_slots_match_the_documented_layout(tmp_path: Path) -> None:
    with opened(tmp_path / "v.img", 64 * MIB) as (v, store):
        h = v.header
        assert store.slot_size == hdr.bitmap_bytes(h.data_size, hdr.MIN_CHUNK) == 4096
        assert store.nslots == hdr.BITMAP_SLOTS == 8
        assert store.slot_offset(0) == h.meta_offset == hdr.META_OFFSET
        assert store.slot_offset(7) + store.slot_size == h.meta_offset + h.meta_size
        for bad in (-1, 8):
            with pytest.raises(IllegalState):
                store.slot_offset(bad)


def test_round_trip_every_slot_and_chunk_size(tmp_path: Path) -> None:
    size = 600 * MIB + 4096  # not a multiple of the larger chunks; 5 pages at 4 KiB
    p = tmp_path / "v.img"
    with opened(p, size) as (_v, store):
        maps = {}
        for slot, chunk in enumerate([4096, 8192, 65536, MIB, 16 * MIB, 4096, 65536, 4096]):
            bm = Bitmap(size, chunk)
            rng = random.Random(slot)
            for _ in range(50):
                off = rng.randrange(size)
                bm.mark(off, rng.randint(1, min(size - off, 3 * chunk)))
            bm.mark(size - 1, 1)
            store.save_all(slot, bm)
            maps[slot] = bm
    with opened(p, size) as (_v, store):
        for slot, bm in maps.items():
            assert store.load(slot, bm.chunk_size) == bm
        with pytest.raises(UsageError):
            store.load(0, 3000)


def test_flush_writes_only_dirty_pages(tmp_path: Path) -> None:
    size = 512 * MIB  # 4 pages at 4 KiB
    p = tmp_path / "v.img"
    with opened(p, size) as (v, store):
        bm = Bitmap(size, 4096)
        assert bm.npages == 4
        assert store.flush(2, bm) == 0  # nothing dirty: no write, no sync
        bm.mark(0, 1)
        bm.mark(3 * 128 * MIB, 1)
        assert store.flush(2, bm) == 2
        assert store.load(2, 4096) == bm
        # Tamper with page 1 on disk behind the store's back; a flush of page 0 leaves it.
        slot = store.slot_offset(2)
        os.pwrite(v.fd, b"\x80", slot + PAGE + 5)
        bm.mark(4096, 1)
        assert bm.take_dirty_pages() == [0]
        bm.mark_pages_dirty([0])
        assert store.flush(2, bm) == 1
        disk = store.load(2, 4096)
        assert disk.test(8 * (PAGE + 5) + 7) and not bm.test(8 * (PAGE + 5) + 7)
        assert sorted(disk.iter_set()) == sorted({*bm.iter_set(), 8 * (PAGE + 5) + 7})
        with pytest.raises(IndexError):
            store.save_pages(2, bm, [4])
        with pytest.raises(ValueError):
            store.save_all(2, Bitmap(size // 2, 4096))


def test_failed_flush_keeps_pages_dirty(tmp_path: Path) -> None:
    p = tmp_path / "v.img"
    Volume.create(str(p), 64 * MIB).close()
    with Volume.open(str(p)) as v:  # read-only fd: every write fails with EBADF
        store = BitmapStore(v.fd, v.header)
        bm = Bitmap(v.header.data_size, 4096)
        bm.mark(0, 1)
        with pytest.raises(VolumeError):
            store.flush(0, bm)
        assert bm.take_dirty_pages() == [0]


def test_clear_zeroes_only_its_slot(tmp_path: Path) -> None:
    size = 256 * MIB
    p = tmp_path / "v.img"
    with opened(p, size) as (v, store):
        full = Bitmap(size, 4096)
        full.set_range(0, full.nchunks)
        for slot in range(store.nslots):
            store.save_all(slot, full)
        before = outside_slot_digest(p, store, 5)
        store.clear(5)
        assert outside_slot_digest(p, store, 5) == before
        assert store.load(5, 4096).count() == 0
        assert store.load(5, 65536).count() == 0
        assert os.pread(v.fd, store.slot_size, store.slot_offset(5)) == bytes(store.slot_size)
        assert store.load(4, 4096) == full


def test_writes_never_leave_the_slot(tmp_path: Path) -> None:
    """Largest possible bitmaps, all ones, in every slot and at every chunk size: nothing
    outside the slot changes, and a larger chunk only uses the front of its slot."""
    size = 256 * MIB + 4096  # 65537 chunks at 4 KiB: 3 pages, the last holding one bit
    p = tmp_path / "v.img"
    with opened(p, size) as (v, store):
        scribble(p, v)
        for slot in range(store.nslots):
            pattern = random.Random(slot).randbytes(store.slot_size)
            before = outside_slot_digest(p, store, slot)
            for chunk in (16 * MIB, 65536, 4096):
                full = Bitmap(size, chunk)
                full.set_range(0, full.nchunks)
                os.pwrite(v.fd, pattern, store.slot_offset(slot))
                store.save_all(slot, full)
                store.save_pages(slot, full, range(full.npages))
                raw = os.pread(v.fd, store.slot_size, store.slot_offset(slot))
                assert raw[: full.nbytes] == full.to_bytes()
                assert raw[full.nbytes :] == pattern[full.nbytes :]
                store.clear(slot)
            assert outside_slot_digest(p, store, slot) == before


def test_bounds_are_checked_before_any_write(tmp_path: Path) -> None:
    with opened(tmp_path / "v.img", 64 * MIB) as (v, store):
        h = v.header
        for off, n in [
            (0, 1),  # header slot A
            (hdr.SLOT_SIZE, 1),  # header slot B
            (h.meta_offset - 1, 2),
            (h.meta_offset + h.meta_size - 1, 2),
            (h.data_offset, 1),
        ]:
            with pytest.raises(AssertionError, match="outside the metadata region"):
                store._pwrite(b"\xff" * n, off)


def test_garbage_in_a_slot_is_header_corrupt(tmp_path: Path) -> None:
    with opened(tmp_path / "v.img", 64 * MIB + 4096) as (v, store):
        bm = Bitmap(v.header.data_size, 65536)  # 1025 chunks: bits past 1025 are spare
        os.pwrite(v.fd, b"\xff" * 200, store.slot_offset(1))
        with pytest.raises(HeaderCorrupt, match="past its last chunk"):
            store.load(1, 65536)
        assert store.load(1, 4096).count() == 1600  # the same bytes are valid at 4 KiB
        store.clear(1)
        assert store.load(1, bm.chunk_size) == bm


@pytest.mark.parametrize("seed", range(12))
def test_torn_page_write_leaves_every_bit_old_or_new(tmp_path: Path, seed: int) -> None:
    """Simulate a crash inside a page write: only a prefix (and, for reordered sectors, some
    scattered 512-byte sectors) of the new pages reached the disk."""
    size = 300 * MIB
    rng = random.Random(seed)
    with opened(tmp_path / "v.img", size) as (v, store):
        old = Bitmap(size, 4096)
        for _ in range(40):
            off = rng.randrange(size)
            old.mark(off, rng.randint(1, min(size - off, 8 * MIB)))
        store.save_all(3, old)
        new = old.copy()
        new.take_dirty_pages()
        for _ in range(20):
            if rng.random() < 0.5:
                first = rng.randrange(new.nchunks)
                new.clear_range(first, rng.randint(0, min(3000, new.nchunks - first)))
            else:
                off = rng.randrange(size)
                new.mark(off, rng.randint(1, min(size - off, 8 * MIB)))
        pages = new.take_dirty_pages()
        raw = new.to_bytes()
        base = store.slot_offset(3)
        for page in pages:
            if rng.random() < 0.5:
                cut = rng.randrange(PAGE + 1)  # torn at any byte
                os.pwrite(v.fd, raw[page * PAGE : page * PAGE + cut], base + page * PAGE)
            else:
                for sector in range(page * PAGE, (page + 1) * PAGE, 512):
                    if rng.random() < 0.5:
                        os.pwrite(v.fd, raw[sector : sector + 512], base + sector)
        got = store.load(3, 4096)  # decodes: no spare bit is ever set by a mix
        g, o, n = (int.from_bytes(b.to_bytes(), "little") for b in (got, old, new))
        assert (g & ~(o | n)).bit_count() == 0  # no bit that neither image had
        assert (o & n & ~g).bit_count() == 0  # no bit that both images had is lost


# -- SIGKILL while marking, clearing and flushing ----------------------------------------------

CRASH_SIZE = 384 * MIB  # 3 pages of bitmap at 4 KiB chunks
CRASH_CHUNK = 4096
CRASH_SLOT = 3


def crash_steps(seed: int, data_size: int, chunk: int) -> Iterator[list[tuple[str, int, int]]]:
    """The child's operations, step by step, reproducible from ``seed``: marks (offset,
    length in bytes) and clears (first chunk, count).  Each step ends with a flush."""
    rng = random.Random(seed)
    nchunks = -(-data_size // chunk)
    while True:
        ops: list[tuple[str, int, int]] = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.3:
                first = rng.randrange(nchunks)
                ops.append(("clear", first, rng.randint(0, min(nchunks - first, 20000))))
            else:
                off = rng.randrange(data_size)
                longest = rng.choice([chunk, MIB, 64 * MIB])
                ops.append(("mark", off, rng.randint(1, min(data_size - off, longest))))
        yield ops


def apply_ops(model: int, ops: list[tuple[str, int, int]], chunk: int) -> tuple[int, int, int]:
    """(model after ops, bits cleared, bits set) with the model as an int of chunk bits."""
    cleared = touched = 0
    for kind, a, b in ops:
        if kind == "clear":
            mask = ((1 << b) - 1) << a
            cleared |= mask
            model &= ~mask
        else:
            first, last = a // chunk, (a + b - 1) // chunk
            mask = ((1 << (last - first + 1)) - 1) << first
            touched |= mask
            model |= mask
    return model, cleared, touched


def _child(path: str, seed: int) -> None:
    with Volume.open(path, writable=True) as v:
        store = BitmapStore(v.fd, v.header)
        bm = store.load(CRASH_SLOT, CRASH_CHUNK)
        print("ready", flush=True)
        for n, ops in enumerate(crash_steps(seed, v.header.data_size, CRASH_CHUNK), 1):
            for kind, a, b in ops:
                if kind == "clear":
                    bm.clear_range(a, b)
                else:
                    bm.mark(a, b)
            store.flush(CRASH_SLOT, bm)
            print(f"durable {n}", flush=True)


def bits(bm: Bitmap) -> int:
    return int.from_bytes(bm.to_bytes(), "little")


@pytest.mark.slow
def test_sigkill_never_loses_a_durable_bit(tmp_path: Path) -> None:
    """A child marks random ranges, clears random runs and flushes, printing "durable N" after
    each fdatasync; it is SIGKILLed at random moments.  With N the last step reported, the
    reloaded bitmap holds every bit of step N that step N+1 does not clear, and no bit that
    neither step N nor step N+1 set."""
    p = tmp_path / "v.img"
    with opened(p, CRASH_SIZE) as (v, store):
        scribble(p, v)
        digest = outside_slot_digest(p, store, CRASH_SLOT)
        state = bits(store.load(CRASH_SLOT, CRASH_CHUNK))
    rng = random.Random(random.randrange(1 << 32))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    steps_seen = 0
    for _ in range(30):
        seed = rng.randrange(1 << 32)
        with subprocess.Popen(
            [sys.executable, __file__, str(p), str(seed)], stdout=subprocess.PIPE, env=env
        ) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGKILL)
            out = proc.stdout.read()
            proc.wait()
        # Complete lines only: the last piece may have been cut short by the kill.
        lines = [ln for ln in out.split(b"\n")[:-1] if ln.startswith(b"durable ")]
        durable = int(lines[-1].split()[1]) if lines else 0
        steps_seen += durable
        model = state
        steps = crash_steps(seed, CRASH_SIZE, CRASH_CHUNK)
        for _ in range(durable):
            model, _c, _t = apply_ops(model, next(steps), CRASH_CHUNK)
        _after, cleared, touched = apply_ops(model, next(steps), CRASH_CHUNK)
        with opened(p, CRASH_SIZE) as (v, store):
            got = bits(store.load(CRASH_SLOT, CRASH_CHUNK))
        lost = (model & ~cleared & ~got).bit_count()
        extra = (got & ~(model | touched)).bit_count()
        assert lost == 0, f"{lost} durable bits lost (child seed {seed}, step {durable})"
        assert extra == 0, f"{extra} bits from nowhere (child seed {seed}, step {durable})"
        state = got
    assert steps_seen > 30  # the child did get work done between kills
    with opened(p, CRASH_SIZE) as (v, store):
        assert outside_slot_digest(p, store, CRASH_SLOT) == digest


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
