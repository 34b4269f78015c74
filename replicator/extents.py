"""Where a volume's data area holds data: its allocated extents, through SEEK_DATA/SEEK_HOLE.

A copy sends the chunks that hold data as Writes and everything else as Zero requests, so
it costs what is allocated rather than what the volume's size says.  The filesystem knows
which ranges are holes (they read as zeros); :func:`segments` asks it with
``lseek(fd, pos, SEEK_DATA)`` / ``SEEK_HOLE``, and a file whose filesystem cannot say (or a
platform without the two whence values) is all data, which is always correct, only slower.
A block device answers "all data" by itself (the kernel's generic llseek).

The arithmetic is pure and apart: :func:`chunk_runs` aligns byte ranges of data out to the
chunks they touch (a chunk with one byte of data is a data chunk) and partitions a chunk range
into alternating data and hole runs; :func:`pieces` cuts a run into requests of at most a
given size.  An unwritten (preallocated) extent may be reported as a hole: it reads as zeros,
so that is right too.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator

_SEEK_DATA: int | None = getattr(os, "SEEK_DATA", None)
_SEEK_HOLE: int | None = getattr(os, "SEEK_HOLE", None)
# What lseek answers where the filesystem does not support SEEK_DATA/SEEK_HOLE.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})


def segments(fd: int, pos: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(start, length, is_data) runs of the file between file offsets pos and end, in order,
    covering [pos, end) exactly.  All data where the filesystem cannot tell."""
    if _SEEK_DATA is None or _SEEK_HOLE is None:
        if pos < end:
            yield pos, end - pos, True
        return
    while pos < end:
        try:
            data = os.lseek(fd, pos, _SEEK_DATA)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                yield pos, end - pos, True
                return
            if e.errno != errno.ENXIO:  # ENXIO: no data at or after pos
                raise
            data = end
        if data > pos:
            stop = min(data, end)
            yield pos, stop - pos, False
            pos = stop
            continue
        try:
            hole = os.lseek(fd, pos, _SEEK_HOLE)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            hole = end
        stop = min(max(hole, pos + 1), end)  # a hole at pos right after data at pos: none
        yield pos, stop - pos, True
        pos = stop


def is_hole(fd: int, pos: int, length: int) -> bool:
    """Whether file bytes [pos, pos+length) hold no data at all (False where the filesystem
    cannot tell): one ``lseek(SEEK_DATA)``."""
    if _SEEK_DATA is None:
        return False
    try:
        return os.lseek(fd, pos, _SEEK_DATA) >= pos + length
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data at or after pos
            return True
        if e.errno in _UNSUPPORTED:
            return False
        raise


def data_ranges(fd: int, data_offset: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the ranges of [start, end) of the data area (offsets relative to
    ``data_offset``, where the data area starts in the file) that hold data."""
    for pos, length, is_data in segments(fd, data_offset + start, data_offset + end):
        if is_data:
            yield pos - data_offset, length


def chunk_runs(
    ranges: Iterable[tuple[int, int]], chunk_size: int, first: int, end: int
) -> Iterator[tuple[int, int, bool]]:
    """Chunks [first, end) as maximal (first chunk, count, is_data) runs, alternating, in
    order, covering the chunks exactly: a chunk is data if any byte range of ``ranges``
    (byte offsets, ascending, not overlapping) touches it.  Ranges outside the chunks are
    ignored (clipped).  Lazy: a run is yielded as soon as the next range shows where it
    ends, so a walk over a huge volume starts sending before it has seen all of it."""
    run_first, run_end, run_data = first, first, False  # the run being grown
    for offset, length in ranges:
        if length <= 0:
            continue
        hi = min((offset + length + chunk_size - 1) // chunk_size, end)
        lo = min(max(offset // chunk_size, first), hi)
        if hi <= run_end:
            continue  # within chunks already counted as data
        if lo > run_end:  # a gap of hole chunks before this range
            if run_data:
                yield run_first, run_end - run_first, True
                run_first, run_data = run_end, False
            run_end = lo
        if not run_data:  # the hole so far ends here; data starts
            if run_end > run_first:
                yield run_first, run_end - run_first, False
            run_first, run_data = run_end, True
        run_end = hi
    if run_end < end:
        if run_data:
            yield run_first, run_end - run_first, True
            run_first, run_data = run_end, False
        run_end = end
    if run_end > run_first:
        yield run_first, run_end - run_first, run_data


def pieces(first: int, count: int, most: int) -> Iterator[tuple[int, int]]:
    """(first, count) pieces of the run [first, first + count), each of at most ``most``."""
    if most < 1:
        raise ValueError(f"a piece must hold at least one chunk, not {most}")
    end = first + count
    while first < end:
        n = min(most, end - first)
        yield first, n
        first += n


def data_chunk_runs(
    fd: int, data_offset: int, data_size: int, chunk_size: int, first: int, end: int
) -> Iterator[tuple[int, int, bool]]:
    """The data and hole runs of chunks [first, end) of a volume's data area, lazily (the
    last chunk may be partial: the data area ends at ``data_size``)."""
    start = first * chunk_size
    stop = min(end * chunk_size, data_size)
    if start >= stop:
        return iter(())
    return chunk_runs(data_ranges(fd, data_offset, start, stop), chunk_size, first, end)
