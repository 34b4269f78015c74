"""The pull's sync (replicator/pair/pull.py, PullEngine._sync): the bitmap's image is taken
first, then the volume's fdatasync, then the image is written.  A store that lands during
the fdatasync (its data written after the fdatasync began, then its bit cleared) must not
have its cleared bit written by that sync: flushing the in-memory bitmap after the
fdatasync made that bit durable over data that may not be.  The interleaving is forced by
the fake fdatasync, not timed."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from replicator.bitmap import Bitmap
from replicator.pair import pull

CHUNK = 64 << 10
SIZE = 64 * CHUNK


class Store:
    def __init__(self) -> None:
        self.saved: list[tuple[int, Bitmap, list[int]]] = []

    def save_pages(self, slot: int, bitmap: Bitmap, pages: list[int]) -> int:
        self.saved.append((slot, bitmap.copy(), list(pages)))
        return len(pages)


def engine(tmp_path: Path) -> tuple[pull.PullEngine, Any]:
    fd = os.open(tmp_path / "vol", os.O_RDWR | os.O_CREAT)
    copy_map = Bitmap(SIZE, CHUNK)
    copy_map.set_range(0, copy_map.nchunks)
    copy_map.take_dirty_pages()
    side = SimpleNamespace(
        id="g/p", chunk_size=CHUNK, data_size=SIZE, copy_map=copy_map, max_rate=0,
        pull_rate=0, bitmap_lock=threading.Lock(), store=Store(),
        record=SimpleNamespace(copy_slot=1), volume=SimpleNamespace(fd=fd),
        clock=lambda: 0.0,
    )  # fmt: skip
    return pull.PullEngine(side), side  # type: ignore[arg-type]


def test_a_bit_cleared_during_the_fdatasync_waits_for_the_next_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng, side = engine(tmp_path)
    with side.bitmap_lock:  # chunk 3 landed before the sync: data written, bit cleared
        side.copy_map.clear_chunk(3)
        eng._unsynced.add(3)
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        # Chunk 5 lands while the volume syncs: its data may have missed this fdatasync.
        with side.bitmap_lock:
            side.copy_map.clear_chunk(5)
            eng._unsynced.add(5)
        real(fd)

    monkeypatch.setattr(pull.os, "fdatasync", fdatasync)
    eng._sync()
    ((slot, image, pages),) = side.store.saved
    assert slot == 1 and pages == [0]
    assert not image.test(3)  # durable: its data was written before the fdatasync began
    assert image.test(5)  # not by this sync
    assert eng._unsynced == {5} and not side.copy_map.test(5)
    monkeypatch.setattr(pull.os, "fdatasync", real)
    eng._sync()  # the next sync takes it
    _, image, pages = side.store.saved[-1]
    assert pages == [0] and not image.test(5) and eng._unsynced == set()


def test_a_failed_write_of_the_bitmap_leaves_its_pages_dirty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng, side = engine(tmp_path)
    with side.bitmap_lock:
        side.copy_map.clear_chunk(7)
        eng._unsynced.add(7)

    def broken(slot: int, bitmap: Bitmap, pages: list[int]) -> int:
        raise OSError(5, "the bitmap write failed (the test)")

    monkeypatch.setattr(side.store, "save_pages", broken)
    with pytest.raises(OSError):
        eng._sync()
    assert side.copy_map.take_dirty_pages() == [0] and eng._unsynced == {7}
