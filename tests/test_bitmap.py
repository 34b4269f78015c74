"""Difference bitmaps (replicator.bitmap) against a naive model: a Python set of chunk numbers."""

from __future__ import annotations

import collections
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from replicator.bitmap import DEFAULT_CHUNK, PAGE, Bitmap, check_chunk_size, chunks_for
from replicator.errors import HeaderCorrupt, UsageError
from replicator.header import bitmap_bytes

KIB = 1024
MIB = 1024 * KIB
TIB = 1 << 40
BITS_PER_PAGE = 8 * PAGE


def model_bytes(model: set[int], nbytes: int) -> bytes:
    raw = bytearray(nbytes)
    for c in model:
        raw[c // 8] |= 1 << (c % 8)
    return bytes(raw)


def model_runs(chunks: list[int]) -> list[tuple[int, int]]:
    """Maximal (first, count) runs of ascending chunk numbers."""
    runs: list[tuple[int, int]] = []
    for c in chunks:
        if runs and runs[-1][0] + runs[-1][1] == c:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((c, 1))
    return runs


def model_dirty_bytes(model: set[int], data_size: int, chunk_size: int) -> int:
    return sum(min(chunk_size, data_size - c * chunk_size) for c in model)


# Geometries: mostly a few chunks, sometimes several serialized pages (at 4 KiB chunks a page
# covers 32768 chunks), and sizes that are not a multiple of the chunk.
chunk_sizes = st.sampled_from([4 * KIB, 8 * KIB, 64 * KIB])


@st.composite
def geometries(draw: st.DrawFn) -> tuple[int, int]:
    chunk = draw(chunk_sizes)
    nchunks = draw(
        st.one_of(st.integers(1, 40), st.integers(BITS_PER_PAGE - 8, 2 * BITS_PER_PAGE + 40))
    )
    tail = draw(st.sampled_from([0, 0, 1, 512, chunk - 1]))
    data_size = (nchunks - 1) * chunk + (tail or chunk)
    return data_size, chunk


class BitmapMachine(RuleBasedStateMachine):
    """Every operation on a Bitmap agrees with the same operation on a set of chunk numbers,
    and applying take_dirty_pages() to the last persisted image always yields to_bytes()."""

    def __init__(self) -> None:
        super().__init__()
        self.bm = Bitmap(1)
        self.model: set[int] = set()
        self.persisted = b""

    @initialize(geometry=geometries())
    def setup(self, geometry: tuple[int, int]) -> None:
        data_size, chunk = geometry
        self.bm = Bitmap(data_size, chunk)
        self.model = set()
        self.persisted = bytes(self.bm.nbytes)  # a new map's baseline is a cleared slot
        assert self.bm.nchunks == -(-data_size // chunk)
        assert self.bm.nbytes == bitmap_bytes(data_size, chunk)

    # -- helpers ----------------------------------------------------------------------------

    def chunk_of(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, self.bm.nchunks - 1))

    def near_page_boundary(self, data: st.DataObject) -> int | None:
        """A chunk number close to where one serialized page ends, if the map has two."""
        if self.bm.npages < 2 or not data.draw(st.booleans()):
            return None
        page = data.draw(st.integers(1, self.bm.npages - 1))
        chunk = page * BITS_PER_PAGE + data.draw(st.integers(-12, 12))
        return min(max(chunk, 0), self.bm.nchunks - 1)

    def byte_range(self, data: st.DataObject) -> tuple[int, int]:
        size, cs = self.bm.data_size, self.bm.chunk_size
        near = self.near_page_boundary(data)
        if near is None:
            offset = data.draw(st.integers(0, size - 1))
        else:
            offset = near * cs + data.draw(st.integers(0, cs - 1))
            offset = min(offset, size - 1)
        longest = size - offset
        length = data.draw(
            st.one_of(
                st.integers(0, min(longest, 3 * cs)),
                st.integers(0, min(longest, 40 * cs)),
                st.integers(0, longest),
            )
        )
        return offset, length

    def chunk_run(self, data: st.DataObject) -> tuple[int, int]:
        n = self.bm.nchunks
        near = self.near_page_boundary(data)
        first = data.draw(st.integers(0, n)) if near is None else near
        count = data.draw(st.one_of(st.integers(0, min(40, n - first)), st.integers(0, n - first)))
        return first, count

    def random_chunks(self, data: st.DataObject) -> set[int]:
        n = self.bm.nchunks
        kind = data.draw(st.sampled_from(["few", "run", "stripes"]))
        if kind == "few":
            return set(data.draw(st.lists(st.integers(0, n - 1), max_size=10)))
        if kind == "run":
            first = data.draw(st.integers(0, n - 1))
            return set(range(first, min(n, first + data.draw(st.integers(1, n)))))
        step = data.draw(st.integers(2, 9))
        return set(range(data.draw(st.integers(0, step - 1)), n, step))

    # -- rules ------------------------------------------------------------------------------

    @rule(data=st.data())
    def mark(self, data: st.DataObject) -> None:
        offset, length = self.byte_range(data)
        cs = self.bm.chunk_size
        touched = set(range(offset // cs, (offset + length - 1) // cs + 1)) if length else set()
        assert set(chunks_for(offset, length, cs)) == touched
        new = self.bm.mark(offset, length)
        assert new == sorted(touched - self.model)
        self.model |= touched

    @rule(data=st.data())
    def set_or_clear_chunk(self, data: st.DataObject) -> None:
        c = self.chunk_of(data)
        was = c in self.model
        assert self.bm.test(c) == was
        if data.draw(st.booleans()):
            assert self.bm.set_chunk(c) == (not was)
            self.model.add(c)
        else:
            assert self.bm.clear_chunk(c) == was
            self.model.discard(c)
        assert self.bm.test(c) == (c in self.model)

    @rule(data=st.data())
    def clear_range(self, data: st.DataObject) -> None:
        first, count = self.chunk_run(data)
        span = set(range(first, first + count))
        assert self.bm.clear_range(first, count) == len(span & self.model)
        self.model -= span

    @rule(data=st.data())
    def set_range(self, data: st.DataObject) -> None:
        first, count = self.chunk_run(data)
        span = set(range(first, first + count))
        assert self.bm.set_range(first, count) == len(span - self.model)
        self.model |= span

    @precondition(lambda self: self.bm.npages >= 2)
    @rule(data=st.data(), op=st.sampled_from(["mark", "set", "clear"]))
    def across_page_boundary(self, data: st.DataObject, op: str) -> None:
        """One update whose bits straddle two serialized pages: both must be dirtied."""
        page = data.draw(st.integers(1, self.bm.npages - 1))
        boundary = page * BITS_PER_PAGE
        first = boundary - data.draw(st.integers(1, 40))
        count = min(boundary - first + data.draw(st.integers(1, 40)), self.bm.nchunks - first)
        span = set(range(first, first + count))
        if op == "mark":
            cs = self.bm.chunk_size
            length = min(count * cs, self.bm.data_size - first * cs)
            assert self.bm.mark(first * cs, length) == sorted(span - self.model)
            self.model |= span
        elif op == "set":
            assert self.bm.set_range(first, count) == len(span - self.model)
            self.model |= span
        else:
            assert self.bm.clear_range(first, count) == len(span & self.model)
            self.model -= span

    @rule(data=st.data(), how=st.sampled_from(["update", "or", "ior"]))
    def union(self, data: st.DataObject, how: str) -> None:
        theirs = self.random_chunks(data)
        other = Bitmap.from_bytes(
            self.bm.data_size, self.bm.chunk_size, model_bytes(theirs, self.bm.nbytes)
        )
        other_before = other.to_bytes()
        if how == "update":
            self.bm.union_update(other)
        elif how == "or":
            old = self.bm
            old_bytes = old.to_bytes()
            self.bm = old | other
            assert old.to_bytes() == old_bytes
        else:
            self.bm |= other
        assert other.to_bytes() == other_before
        self.model |= theirs

    @rule(data=st.data())
    def copy_is_independent(self, data: st.DataObject) -> None:
        dup = self.bm.copy()
        assert dup == self.bm
        c = self.chunk_of(data)
        self.bm.clear_chunk(c) if c in self.model else self.bm.set_chunk(c)
        assert dup.test(c) == (c in self.model)
        self.bm = dup  # carries on with the copy, which kept the pending dirty pages

    @rule()
    def round_trip(self) -> None:
        self.take_dirty_pages()
        raw = self.bm.to_bytes()
        back = Bitmap.from_bytes(self.bm.data_size, self.bm.chunk_size, raw)
        assert back == self.bm
        assert back.count() == self.bm.count()
        assert back.take_dirty_pages() == []
        self.bm = back

    @rule()
    def take_dirty_pages(self) -> None:
        pages = self.bm.take_dirty_pages()
        assert pages == sorted(set(pages))
        now = self.bm.to_bytes()
        changed = [
            p
            for p in range(self.bm.npages)
            if now[p * PAGE : (p + 1) * PAGE] != self.persisted[p * PAGE : (p + 1) * PAGE]
        ]
        assert set(changed) <= set(pages)
        image = bytearray(self.persisted)
        for p in pages:
            image[p * PAGE : (p + 1) * PAGE] = now[p * PAGE : (p + 1) * PAGE]
        assert image == now
        self.persisted = now
        assert self.bm.take_dirty_pages() == []

    @rule(data=st.data())
    def big_range(self, data: st.DataObject) -> None:
        """A run long enough for the whole-bytes path (more than a few hundred chunks)."""
        n = self.bm.nchunks
        if n < 300:
            return
        first = data.draw(st.integers(0, n - 300))
        count = data.draw(st.integers(257, n - first))
        span = set(range(first, first + count))
        if data.draw(st.booleans()):
            assert self.bm.set_range(first, count) == len(span - self.model)
            self.model |= span
        else:
            assert self.bm.clear_range(first, count) == len(span & self.model)
            self.model -= span

    @rule(data=st.data())
    def next_set_and_clear(self, data: st.DataObject) -> None:
        n = self.bm.nchunks
        start = data.draw(st.integers(0, n + 2))
        end = data.draw(st.one_of(st.none(), st.integers(0, n + 2)))
        stop = n if end is None else min(end, n)
        inside = range(start, stop)
        want_set = next((c for c in inside if c in self.model), None)
        want_clear = next((c for c in inside if c not in self.model), stop)
        assert self.bm.next_set(start, end) == want_set
        assert self.bm.next_clear(start, end) == want_clear

    @rule(data=st.data())
    def runs_between(self, data: st.DataObject) -> None:
        n = self.bm.nchunks
        start = data.draw(st.integers(0, n + 2))
        end = data.draw(st.one_of(st.none(), st.integers(0, n + 2)))
        stop = n if end is None else min(end, n)
        want = model_runs(sorted(x for x in self.model if start <= x < stop))
        assert list(self.bm.runs(start, end)) == want

    @precondition(lambda self: self.bm.count() > 0)
    @rule(data=st.data())
    def iter_from(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, self.bm.nchunks + 2))
        assert list(self.bm.iter_set(start)) == sorted(c for c in self.model if c >= start)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def agrees_with_model(self) -> None:
        bm = self.bm
        assert bm.count() == len(self.model)
        assert list(bm.iter_set()) == sorted(self.model)
        runs = list(bm.runs())
        rebuilt: set[int] = set()
        prev_end = -2
        for first, n in runs:
            assert n > 0
            assert first > prev_end  # ascending and maximal: runs never touch
            prev_end = first + n
            rebuilt.update(range(first, first + n))
        assert rebuilt == self.model
        assert bm.dirty_bytes() == model_dirty_bytes(self.model, bm.data_size, bm.chunk_size)
        assert bm.to_bytes() == model_bytes(self.model, bm.nbytes)


TestBitmapMachine = BitmapMachine.TestCase
TestBitmapMachine.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- edge cases -----------------------------------------------------------------------------


def test_chunks_for() -> None:
    assert chunks_for(0, 0, 4096) == range(0, 0)
    assert chunks_for(4095, 1, 4096) == range(0, 1)
    assert chunks_for(4095, 2, 4096) == range(0, 2)
    assert chunks_for(4096, 4096, 4096) == range(1, 2)
    assert chunks_for(100, 8192, 4096) == range(0, 3)
    with pytest.raises(ValueError):
        chunks_for(-1, 1, 4096)
    with pytest.raises(ValueError):
        chunks_for(0, -1, 4096)


@pytest.mark.parametrize(
    "bad", [0, 1, 512, 2048, 3 * 4096, 4096 + 1, 32 * MIB, -4096, 4096.0, True]
)
def test_invalid_chunk_sizes_are_usage_errors(bad: object) -> None:
    with pytest.raises(UsageError):
        check_chunk_size(bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Bitmap(MIB, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("good", [4 * KIB, 8 * KIB, 64 * KIB, MIB, 16 * MIB])
def test_valid_chunk_sizes(good: int) -> None:
    assert check_chunk_size(good) == good
    assert Bitmap(good * 3 + 1, good).nchunks == 4


def test_default_chunk_is_64k() -> None:
    assert DEFAULT_CHUNK == 64 * KIB
    assert Bitmap(MIB).chunk_size == 64 * KIB


def test_bad_data_size() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError):
            Bitmap(bad)


def test_partial_last_chunk() -> None:
    bm = Bitmap(10 * 4096 + 100, 4096)
    assert bm.nchunks == 11
    assert bm.chunk_range(0) == (0, 4096)
    assert bm.chunk_range(10) == (40960, 100)
    assert bm.mark(bm.data_size - 1, 1) == [10]
    assert bm.dirty_bytes() == 100
    assert bm.mark(0, bm.data_size) == list(range(10))
    assert bm.dirty_bytes() == bm.data_size
    assert list(bm.runs()) == [(0, 11)]
    with pytest.raises(IndexError):
        bm.mark(bm.data_size - 1, 2)
    with pytest.raises(IndexError):
        bm.chunk_range(11)
    with pytest.raises(IndexError):
        bm.test(-1)
    with pytest.raises(IndexError):
        bm.clear_range(5, 7)


def test_one_chunk_volume() -> None:
    bm = Bitmap(512, 64 * KIB)
    assert (bm.nchunks, bm.nbytes, bm.npages) == (1, PAGE, 1)
    assert list(bm.iter_set()) == [] and list(bm.runs()) == []
    assert bm.mark(0, 0) == []
    assert bm.mark(511, 1) == [0]
    assert bm.mark(0, 512) == []
    assert (bm.count(), bm.dirty_bytes(), list(bm.runs())) == (1, 512, [(0, 1)])
    assert bm.to_bytes() == b"\x01" + bytes(PAGE - 1)
    assert bm.take_dirty_pages() == [0]
    assert bm.clear_chunk(0) and not bm.clear_chunk(0)
    assert bm.dirty_bytes() == 0
    assert bm.take_dirty_pages() == [0]


def test_huge_volume_scans_are_not_per_bit() -> None:
    """1 TiB at 64 KiB: 16 Mi bits, 2 MiB serialized, 512 pages."""
    bm = Bitmap(TIB)
    assert (bm.nchunks, bm.nbytes, bm.npages) == (1 << 24, 2 * MIB, 512)
    assert list(bm.iter_set()) == []
    assert list(bm.iter_set(12345)) == []
    assert list(bm.runs()) == []
    assert bm.set_range(0, bm.nchunks) == bm.nchunks
    assert bm.take_dirty_pages() == list(range(512))
    assert (bm.count(), bm.dirty_bytes()) == (bm.nchunks, TIB)
    assert list(bm.runs()) == [(0, bm.nchunks)]
    last = collections.deque(bm.iter_set(), maxlen=1)  # consumes in C
    assert list(last) == [bm.nchunks - 1]
    assert next(bm.iter_set(bm.nchunks - 3)) == bm.nchunks - 3
    assert bm.clear_range(1, bm.nchunks - 2) == bm.nchunks - 2
    assert list(bm.iter_set()) == [0, bm.nchunks - 1]
    assert bm.take_dirty_pages() == list(range(512))
    # A mark in the middle dirties exactly the page holding its bits.
    assert bm.mark(TIB // 2, 1) == [bm.nchunks // 2]
    assert bm.take_dirty_pages() == [256]
    full = Bitmap.from_bytes(TIB, DEFAULT_CHUNK, b"\xff" * bm.nbytes)
    assert (full | bm) == full
    assert (full.count(), list(full.runs())) == (bm.nchunks, [(0, bm.nchunks)])


@settings(max_examples=60, deadline=None)
@given(
    bits=st.lists(st.integers(0, (1 << 28) - 1), max_size=6, unique=True),
    full=st.lists(st.tuples(st.integers(0, (1 << 28) - 1), st.integers(1, 1 << 22)), max_size=2),
    start=st.integers(0, 1 << 28),
    span=st.one_of(st.none(), st.integers(0, 1 << 28)),
)
def test_scans_of_a_huge_map_skip_whole_blocks(
    bits: list[int], full: list[tuple[int, int]], start: int, span: int | None
) -> None:
    """1 TiB at 4 KiB chunks: 256 Mi bits, 32 MiB.  A few lone bits and long runs (up to
    512 KiB of ones) far apart: next_set, next_clear and runs agree with a model of merged
    intervals (the scans compare whole 64 KiB, 2 KiB and 64-byte blocks, whose edges these
    positions land anywhere between)."""
    bm = Bitmap(TIB, 4 * KIB)
    assert bm.nchunks == 1 << 28
    spans = [(b, b + 1) for b in bits]
    for b in bits:
        bm.set_chunk(b)
    for first, count in full:
        count = min(count, bm.nchunks - first)
        bm.set_range(first, count)
        spans.append((first, first + count))
    merged: list[tuple[int, int]] = []  # disjoint, not touching, ascending [lo, hi)
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    assert bm.count() == sum(hi - lo for lo, hi in merged)
    end = None if span is None else start + span
    stop = bm.nchunks if end is None else min(end, bm.nchunks)
    inside = [(max(lo, start), min(hi, stop)) for lo, hi in merged]
    inside = [(lo, hi) for lo, hi in inside if lo < hi]
    assert list(bm.runs(start, end)) == [(lo, hi - lo) for lo, hi in inside]
    assert bm.next_set(start, end) == (inside[0][0] if inside else None)
    want_clear = inside[0][1] if inside and inside[0][0] == start else min(start, stop)
    assert bm.next_clear(start, end) == want_clear


def test_whole_map_updates_and_walks_take_milliseconds_not_seconds() -> None:
    """The copy of an empty 1 TiB volume: set every bit, walk the one run, clear it in
    pieces.  Counted in C calls, not timed: the walk is a handful of steps."""
    bm = Bitmap(TIB)
    assert bm.set_range(0, bm.nchunks) == bm.nchunks
    assert bm.take_dirty_pages() == list(range(512))
    assert list(bm.runs()) == [(0, bm.nchunks)]
    assert list(bm.runs(5, 9)) == [(5, 4)]
    assert bm.next_clear(0) == bm.nchunks
    step = 1 << 14  # 1 GiB pieces
    for first in range(0, bm.nchunks, step):
        assert bm.clear_range(first, step) == step
    assert (bm.count(), bm.next_set(0), list(bm.runs())) == (0, None, [])
    assert bm.take_dirty_pages() == list(range(512))
    assert bm.to_bytes() == bytes(bm.nbytes)


def test_scans_check_their_start() -> None:
    bm = Bitmap(MIB, 4096)
    for call in (lambda: bm.next_set(-1), lambda: bm.next_clear(-1), lambda: bm.runs(-1)):
        with pytest.raises(ValueError):
            call()
    assert bm.next_set(bm.nchunks) is None and bm.next_clear(bm.nchunks) == bm.nchunks
    assert bm.next_clear(3, 2) == 2  # an empty window: its end


def test_from_bytes_rejects_bad_content() -> None:
    bm = Bitmap(10 * 4096, 4096)  # 10 chunks: bits 10..15 of bytes 0-1 and the rest are spare
    good = bytearray(bm.nbytes)
    good[0], good[1] = 0xFF, 0x03
    assert Bitmap.from_bytes(bm.data_size, 4096, bytes(good)).count() == 10
    for i, v in [(1, 0x04), (1, 0x80), (2, 0x01), (PAGE - 1, 0x01)]:
        bad = bytearray(good)
        bad[i] |= v
        with pytest.raises(HeaderCorrupt, match="past its last chunk"):
            Bitmap.from_bytes(bm.data_size, 4096, bytes(bad))
    for n in (0, PAGE - 1, PAGE + 1, 2 * PAGE):
        with pytest.raises(HeaderCorrupt, match="expected 4096"):
            Bitmap.from_bytes(bm.data_size, 4096, bytes(n))


def test_union_needs_same_geometry() -> None:
    a = Bitmap(MIB, 4096)
    for other in (Bitmap(MIB, 8192), Bitmap(2 * MIB, 4096)):
        with pytest.raises(ValueError, match="geometry"):
            a.union_update(other)
        with pytest.raises(ValueError):
            _ = a | other


def test_failed_flush_can_put_pages_back() -> None:
    bm = Bitmap(TIB)
    bm.mark(0, 1)
    pages = bm.take_dirty_pages()
    bm.mark_pages_dirty(pages)
    assert bm.take_dirty_pages() == [0]
    with pytest.raises(IndexError):
        bm.mark_pages_dirty([512])


@settings(max_examples=200, deadline=None)
@given(
    geometry=geometries(),
    old_seed=st.integers(0, 2**64),
    new_seed=st.integers(0, 2**64),
    mix=st.integers(0, 2**64),
)
def test_torn_serialized_image_decodes_to_old_or_new_bits(
    geometry: tuple[int, int], old_seed: int, new_seed: int, mix: int
) -> None:
    """The crash-safety premise: any byte-wise mix of two valid images is a valid image whose
    every bit comes from one of them."""
    data_size, chunk = geometry
    nchunks = Bitmap(data_size, chunk).nchunks
    images = []
    for seed in (old_seed, new_seed):
        bits = random.Random(seed).getrandbits(nchunks)
        raw = bits.to_bytes(bitmap_bytes(data_size, chunk), "little")
        images.append(Bitmap.from_bytes(data_size, chunk, raw).to_bytes())
    old, new = images
    torn = bytes(
        (new if mix >> (i % 64) & 1 else old)[i] for i in range(len(old))
    )  # byte granularity: finer than any real device tears
    got = int.from_bytes(Bitmap.from_bytes(data_size, chunk, torn).to_bytes(), "little")
    o, n = int.from_bytes(old, "little"), int.from_bytes(new, "little")
    assert (got & ~(o | n)).bit_count() == 0  # no bit that neither image had
    assert (o & n & ~got).bit_count() == 0  # no bit that both images had is lost


def test_clearing_while_iterating_visits_every_bit_once() -> None:
    """The resync loop: copy each set chunk, clear it, carry on iterating."""
    bm = Bitmap(TIB)
    rng = random.Random(7)
    for _ in range(500):
        bm.mark(rng.randrange(TIB - 4 * MIB), rng.randint(1, 4 * MIB))
    bm.set_range(bm.nchunks - 40000, 40000)
    expected = list(bm.iter_set())
    seen = []
    for c in bm.iter_set():
        seen.append(c)
        assert bm.clear_chunk(c)
    assert seen == expected
    assert bm.count() == 0 and list(bm.runs()) == []
    with pytest.raises(ValueError):
        bm.iter_set(-1)  # checked at the call, not at the first next()
