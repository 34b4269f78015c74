"""Direct writes (replicator.direct_io): beneath the page cache where the file system takes
them, refused (False, nothing written) where it does not or the write is not aligned."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from replicator.direct_io import ALIGN, DirectWriter

SIZE = 1 << 20


def _file(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SIZE)
    return fd


def test_an_aligned_write_goes_to_the_file(tmp_path: Path) -> None:
    fd = _file(tmp_path / "vol")
    w = DirectWriter(fd, 64 << 10)
    try:
        assert w.usable
        data = os.urandom(3 * ALIGN)
        assert w.write(memoryview(data), 5 * ALIGN)
        assert w.write(data[:ALIGN], 0)  # bytes, shorter than the buffer
        assert os.pread(fd, 3 * ALIGN, 5 * ALIGN) == data
        assert os.pread(fd, ALIGN, 0) == data[:ALIGN]
    finally:
        w.close()
        os.close(fd)


def test_a_write_longer_than_the_buffer_goes_in_slices(tmp_path: Path) -> None:
    fd = _file(tmp_path / "vol")
    w = DirectWriter(fd, 16 << 10)
    try:
        data = os.urandom(5 * (16 << 10) + 3 * ALIGN)  # five buffers and a short one
        assert w.write(data, 2 * ALIGN)
        assert os.pread(fd, len(data), 2 * ALIGN) == data
    finally:
        w.close()
        os.close(fd)


@pytest.mark.parametrize(
    ("length", "pos"),
    [(ALIGN + 512, 0), (ALIGN, 512), (0, 0)],
    ids=["length", "offset", "empty"],
)
def test_a_write_it_cannot_take_writes_nothing(tmp_path: Path, length: int, pos: int) -> None:
    fd = _file(tmp_path / "vol")
    w = DirectWriter(fd, 64 << 10)
    try:
        assert not w.write(b"\xff" * length, pos)
        assert os.pread(fd, SIZE, 0) == bytes(SIZE)
        assert w.usable  # still takes the next aligned one
    finally:
        w.close()
        os.close(fd)


def test_a_file_system_without_direct_io_is_left_to_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses O_DIRECT at open (EINVAL: tmpfs before Linux 6.6)."""
    fd = _file(tmp_path / "vol")
    carry = os.open

    def refusing(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return carry(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    try:
        w = DirectWriter(fd, 64 << 10)
        assert not w.usable
        assert not w.write(b"\x01" * ALIGN, 0)
        assert os.pread(fd, ALIGN, 0) == bytes(ALIGN)
        w.close()
    finally:
        os.close(fd)


def test_a_direct_write_refused_later_turns_it_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL from the write itself (a device with blocks larger than ALIGN): that write
    and every later one are left to the caller."""
    fd = _file(tmp_path / "vol")
    w = DirectWriter(fd, 64 << 10)
    calls: list[int] = []

    def refusing(fd: int, buffers: object, pos: int, flags: int = 0) -> int:
        calls.append(pos)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwritev", refusing)
    try:
        assert not w.write(b"\x01" * ALIGN, 0)
        assert not w.usable
        assert not w.write(b"\x01" * ALIGN, ALIGN)
        assert calls == [0]  # not tried again
    finally:
        monkeypatch.undo()
        w.close()
        assert os.pread(fd, 2 * ALIGN, 0) == bytes(2 * ALIGN)
        os.close(fd)


def test_the_buffer_size_must_be_aligned(tmp_path: Path) -> None:
    fd = _file(tmp_path / "vol")
    try:
        with pytest.raises(ValueError, match="multiple of 4096"):
            DirectWriter(fd, ALIGN + 1)
    finally:
        os.close(fd)
