"""Allocated extents (replicator.extents): the chunk arithmetic against a naive model, and the
SEEK_DATA/SEEK_HOLE walk against real sparse files."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator import extents
from replicator.extents import chunk_runs, data_chunk_runs, data_ranges, pieces, segments

KIB = 1024
MIB = 1024 * KIB


# -- the pure arithmetic --------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int, int, int]:
    """Byte ranges of data (ascending, disjoint, some touching, some past the chunks), a chunk
    size and a chunk range [first, end)."""
    chunk = draw(st.sampled_from([1, 4, 16, 4096]))
    first = draw(st.integers(0, 6))
    end = first + draw(st.integers(0, 24))
    edges = sorted(set(draw(st.lists(st.integers(0, (end + 4) * chunk), max_size=16))))
    ranges = [(edges[i], edges[i + 1] - edges[i]) for i in range(0, len(edges) - 1, 2)]
    if draw(st.booleans()) and ranges:  # an empty range, which touches nothing
        ranges.insert(draw(st.integers(0, len(ranges))), (ranges[0][0], 0))
        ranges.sort()
    return ranges, chunk, first, end


def model_is_data(ranges: list[tuple[int, int]], chunk: int, c: int) -> bool:
    return any(off < (c + 1) * chunk and off + n > c * chunk for off, n in ranges if n > 0)


@settings(max_examples=500, deadline=None)
@given(layouts())
def test_chunk_runs_match_a_per_chunk_model(
    layout: tuple[list[tuple[int, int]], int, int, int],
) -> None:
    ranges, chunk, first, end = layout
    runs = list(chunk_runs(ranges, chunk, first, end))
    flags: list[bool] = []
    pos = first
    for i, (f, n, is_data) in enumerate(runs):
        assert f == pos and n > 0  # in order, covering exactly, no empty run
        if i:
            assert is_data is not runs[i - 1][2]  # maximal: data and holes alternate
        flags += [is_data] * n
        pos = f + n
    assert pos == max(first, end) or not runs
    assert flags == [model_is_data(ranges, chunk, c) for c in range(first, end)]


@given(first=st.integers(0, 1000), count=st.integers(0, 1000), most=st.integers(1, 300))
def test_pieces_cut_a_run_in_order(first: int, count: int, most: int) -> None:
    got = list(pieces(first, count, most))
    assert all(1 <= n <= most for _, n in got)
    assert [c for f, n in got for c in range(f, f + n)] == list(range(first, first + count))
    assert all(n == most for _, n in got[:-1])  # only the last piece is short


def test_pieces_need_a_positive_size() -> None:
    with pytest.raises(ValueError):
        list(pieces(0, 10, 0))


def test_chunk_runs_are_lazy() -> None:
    """A walk over a huge volume yields the first run before it has seen the last range."""

    def ranges() -> Iterator[tuple[int, int]]:
        yield 0, 10
        yield 100, 10
        raise AssertionError("read too far")

    runs = chunk_runs(ranges(), 10, 0, 1 << 40)
    assert next(runs) == (0, 1, True)
    assert next(runs) == (1, 9, False)


# -- SEEK_DATA / SEEK_HOLE on real files ----------------------------------------------------


def sparse_file(path: Path, size: int, writes: list[tuple[int, int]]) -> int:
    """A sparse file of ``size`` bytes with ``writes`` (offset, length) filled with 0x5A;
    returns an fd open for reading (the caller closes it)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in writes:
            f.seek(off)
            f.write(b"\x5a" * n)
        os.fsync(f.fileno())
    return os.open(path, os.O_RDONLY)


def holes_are_exact(tmp_path: Path) -> bool:
    """The filesystem reports holes at block granularity (ext4, xfs, btrfs, tmpfs do)."""
    fd = sparse_file(tmp_path / "probe", 4 * MIB, [(MIB, 4096)])
    try:
        return list(data_ranges(fd, 0, 0, 4 * MIB)) == [(MIB, 4096)]
    finally:
        os.close(fd)


def test_segments_cover_the_range_and_holes_read_zero(tmp_path: Path) -> None:
    writes = [(0, 4096), (MIB, 3 * 4096), (5 * MIB - 4096, 4096)]
    fd = sparse_file(tmp_path / "img", 8 * MIB, writes)
    try:
        segs = list(segments(fd, 4096 // 2, 7 * MIB))
        pos = 4096 // 2
        for start, n, is_data in segs:
            assert start == pos and n > 0
            if not is_data:
                assert os.pread(fd, n, start) == bytes(n)
            pos += n
        assert pos == 7 * MIB
        data = [(s, n) for s, n, d in segs if d]
        for off, n in writes:  # every written byte is in a data segment
            lo, hi = max(off, 4096 // 2), min(off + n, 7 * MIB)
            assert any(s <= lo and hi <= s + m for s, m in data) or lo >= hi
    finally:
        os.close(fd)


def test_an_empty_sparse_file_is_one_hole(tmp_path: Path) -> None:
    fd = sparse_file(tmp_path / "img", 64 * MIB, [])
    try:
        require_holes = os.fstat(fd).st_blocks == 0
        if not require_holes:
            pytest.skip("this filesystem allocates blocks for a truncated file")
        assert list(segments(fd, 0, 64 * MIB)) == [(0, 64 * MIB, False)]
        assert list(data_ranges(fd, MIB, 0, 63 * MIB)) == []
        assert list(data_chunk_runs(fd, MIB, 63 * MIB, 64 * KIB, 0, 1008)) == [(0, 1008, False)]
    finally:
        os.close(fd)


def test_a_range_past_the_end_of_the_file_is_a_hole(tmp_path: Path) -> None:
    """ENXIO from SEEK_DATA (no data at or after the offset, or past EOF): a hole."""
    fd = sparse_file(tmp_path / "img", MIB, [(0, 4096)])
    try:
        assert list(segments(fd, 2 * MIB, 3 * MIB)) == [(2 * MIB, MIB, False)]
        assert list(segments(fd, 5, 5)) == []
    finally:
        os.close(fd)


@settings(max_examples=25, deadline=None)
@given(
    blocks=st.lists(st.integers(0, 255), max_size=12, unique=True),
    base_blocks=st.integers(0, 3),
    chunk_blocks=st.sampled_from([1, 2, 16]),
    tail=st.sampled_from([0, 512, 4095]),
)
def test_data_chunk_runs_of_a_real_file_match_the_written_chunks(
    tmp_path_factory: pytest.TempPathFactory,
    blocks: list[int],
    base_blocks: int,
    chunk_blocks: int,
    tail: int,
) -> None:
    """Relative to data_offset, clipped to data_size, aligned out to chunks: exactly the
    chunks holding a written 4 KiB block are data (on a filesystem with exact holes)."""
    tmp = tmp_path_factory.mktemp("extents")
    if not holes_are_exact(tmp):
        pytest.skip("this filesystem does not report holes at block granularity")
    block, chunk = 4096, chunk_blocks * 4096
    base = base_blocks * block
    data_size = 200 * block + tail  # blocks past data_size are outside the data area
    writes = [(base + b * block, block) for b in sorted(blocks)]
    fd = sparse_file(tmp / "img", base + 256 * block, writes)
    try:
        nchunks = -(-data_size // chunk)
        runs = list(data_chunk_runs(fd, base, data_size, chunk, 0, nchunks))
        got = {c for f, n, d in runs if d for c in range(f, f + n)}
        want = {b * block // chunk for b in blocks if b * block < data_size}
        assert got == want
        assert sum(n for _, n, _ in runs) == nchunks
    finally:
        os.close(fd)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP])
def test_without_seek_data_everything_is_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    fd = sparse_file(tmp_path / "img", 4 * MIB, [])
    real = os.lseek

    def lseek(f: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(code, os.strerror(code))
        return real(f, pos, how)

    try:
        monkeypatch.setattr(os, "lseek", lseek)
        assert list(segments(fd, 0, 4 * MIB)) == [(0, 4 * MIB, True)]
        assert list(data_chunk_runs(fd, 0, 4 * MIB, MIB, 1, 3)) == [(1, 2, True)]
    finally:
        os.close(fd)


def test_other_lseek_errors_are_raised() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as e:
            list(segments(r, 0, MIB))  # not seekable: ESPIPE, not "all data"
        assert e.value.errno == errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)


def test_a_platform_without_seek_data_is_all_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd = sparse_file(tmp_path / "img", MIB, [])
    try:
        monkeypatch.setattr(extents, "_SEEK_DATA", None)
        assert list(segments(fd, 0, MIB)) == [(0, MIB, True)]
        assert list(segments(fd, MIB, MIB)) == []
    finally:
        os.close(fd)


def test_is_hole_answers_for_a_range(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        os.pwrite(fd, b"x" * 65536, 65536)
        os.fsync(fd)
        assert extents.is_hole(fd, 0, 65536)
        assert not extents.is_hole(fd, 0, 65537)
        assert not extents.is_hole(fd, 65536 + 4096, 4096)
        assert extents.is_hole(fd, 2 * 65536, 65536)  # no data after it at all (ENXIO)
        assert extents.is_hole(fd, 1 << 20, 4096)  # past the end
    finally:
        os.close(fd)
