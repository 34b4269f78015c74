"""Copies of sparse volumes in time proportional to what is allocated (issue 10), in-process.

The pairs run as in tests/test_runtime_inproc.py: two real PairManagers over temporary
directories of real (sparse) image files, joined by a fake link through the wire codec.
The copy engine walks the copy bitmap by runs, sends each hole run as a few large Zero
requests and data as Writes; these tests check that a copy of an empty 1 TiB volume is a
few hundred requests, that both images read the same afterwards, that a client write never
loses to a Zero of the same chunks, and that a chunk's bit is only cleared once the peer
acknowledged it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_runtime_inproc import (
    CHUNK,
    Lab,
    Node,
    noise,
    read,
    running_lab,
    wait_copy,
    wait_until,
    write,
)

from replicator import pair_state as ps
from replicator import wire
from replicator.errors import VolumeError
from replicator.extents import data_chunk_runs
from replicator.gate import ChunkLocks
from replicator.pair.copy_engine import ZERO_MAX, ZERO_MIN, ZERO_START, ZeroSize
from replicator.volume import Volume

MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
PID = "g/p1"


# -- the harness ------------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with running_lab(tmp_path) as lab:
        yield lab


def two_nodes(lab: Lab, size: int) -> tuple[Node, Node]:
    a = lab.node("node-a", "10.0.0.1", {"vol": size})
    b = lab.node("node-b", "10.0.0.2", {"vol": size})
    lab.start()
    return a, b


def require_sparse_files(where: Path, size: int) -> None:
    """The filesystem holds a sparse file of ``size`` bytes and reports it as one hole (else
    a copy would read every byte of it, and a 1 TiB test would run for hours)."""
    probe = where / "sparse-probe"
    try:
        with open(probe, "wb") as f:
            f.truncate(size + GIB)
            fd = f.fileno()
            runs = data_chunk_runs(fd, 0, size, MIB, 0, size // MIB)
            empty = os.fstat(fd).st_blocks == 0 and not any(d for _, _, d in runs)
    except OSError as e:
        if e.errno in (errno.EFBIG, errno.ENOSPC, errno.EINVAL):
            pytest.skip(f"{where}: cannot hold a sparse file of {size} bytes: {e}")
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()
    if not empty:
        pytest.skip(f"{where}: a sparse file of {size} bytes does not read as one hole")


def data_chunks(node: Node) -> list[tuple[int, int]]:
    """(first chunk, count) of the runs of chunks that hold data in the node's image."""
    with Volume.open(node.paths["vol"]) as v:
        h = v.header
        runs = data_chunk_runs(v.fd, h.data_offset, h.data_size, CHUNK, 0, -(-h.data_size // CHUNK))
        return [(f, n) for f, n, is_data in runs if is_data]


def read_image(node: Node, offset: int, length: int) -> bytes:
    with Volume.open(node.paths["vol"]) as v:
        data = os.pread(v.fd, length, v.header.data_offset + offset)
    assert len(data) == length
    return data


def same_images(a: Node, b: Node, size: int) -> None:
    """Whole images, compared a MiB at a time (small volumes only)."""
    for off in range(0, size, MIB):
        n = min(MIB, size - off)
        assert read_image(a, off, n) == read_image(b, off, n), f"images differ at {off}"


def sent(lab: Lab, kind: str) -> int:
    return sum(link.sent["node-a", "node-b", kind] for link in lab.links.values())


Handler = Callable[[str, wire.Message], wire.Message]


def intercept(node: Node, hook: Callable[[Handler, str, wire.Message], wire.Message]) -> None:
    """Route what the node's peers send it through ``hook(real_handler, peer, msg)``."""
    real: Handler = node.manager.handle_peer
    setattr(node.manager, "handle_peer", lambda peer, msg: hook(real, peer, msg))  # noqa: B010


# -- the Zero size ------------------------------------------------------------------------------


def test_zero_size_grows_on_fast_full_zeros_and_shrinks_on_slow_ones() -> None:
    z = ZeroSize()
    assert z.size == ZERO_START == wire.MAX_DATA
    z.took(z.size // 2, 0.001)  # a short Zero says nothing about a full one
    assert z.size == ZERO_START
    for _ in range(20):
        z.took(z.size, 0.001)
    assert z.size == ZERO_MAX
    z.took(ZERO_MAX, 0.05)  # neither fast nor slow: stays
    assert z.size == ZERO_MAX
    for _ in range(20):
        z.took(z.size, 1.0)
    assert z.size == ZERO_MIN
    z.took(4096, 0.5)  # slow, however short
    assert z.size == ZERO_MIN


# -- 1 TiB ------------------------------------------------------------------------------------


def test_an_empty_sparse_1tib_volume_pairs_in_a_few_hundred_requests(
    lab: Lab, tmp_path: Path
) -> None:
    """The issue's case: an empty sparse 1 TiB volume (plus a few written chunks on the
    primary, and stale ones on the secondary that the copy must wipe).  The copy is
    O(allocated): a few hundred Zero requests and one Write per data run, not 16 Mi chunks;
    afterwards both images hold data in the same chunks and read the same there, at the
    stale chunks and at random places."""
    require_sparse_files(tmp_path, TIB)
    a, b = two_nodes(lab, TIB)
    ha = a.open()
    placed = {0: noise(CHUNK), TIB // 2 + 12345: noise(3 * CHUNK), TIB - CHUNK: noise(CHUNK)}
    for off, data in placed.items():
        write(ha, off, data)
    hb = b.open()
    stale = [5 * GIB, TIB // 2 + 100 * MIB, TIB - 3 * CHUNK]
    for off in stale:
        write(hb, off, noise(CHUNK))
    hb.close()

    began = time.monotonic()
    a.create(PID, b)
    wait_copy(a, PID)
    seconds = time.monotonic() - began
    print(f"\n1 TiB empty sparse volume: initial copy {seconds:.3f}s, {sent(lab, 'Zero')} Zeros")

    assert b.state(PID) == ("PAIR", "secondary")
    zeros, writes = sent(lab, "Zero"), sent(lab, "Write")
    assert zeros <= TIB // (ZERO_MAX // 4), zeros  # a few hundred, not 16 Mi / 16 = 1 Mi
    assert writes == 3  # one per data run of the primary (all shorter than COPY_IO)
    assert a.side(PID).doc.last_copy_bytes == 6 * CHUNK  # the written chunks, aligned out
    runs = data_chunks(a)
    assert runs == [(0, 1), ((TIB // 2) // CHUNK, 4), (TIB // CHUNK - 1, 1)]
    assert data_chunks(b) == runs  # the stale chunks are holes again
    for first, count in runs:
        offset = first * CHUNK
        assert read_image(a, offset, count * CHUNK) == read_image(b, offset, count * CHUNK)
    for off in stale:
        assert read_image(b, off, CHUNK) == bytes(CHUNK)
    rng = random.Random(1)
    for _ in range(256):
        off = rng.randrange(TIB // 4096) * 4096
        assert read_image(a, off, 4096) == read_image(b, off, 4096)
    assert read(ha, TIB // 2 + 12345, 3 * CHUNK) == placed[TIB // 2 + 12345]


# -- client writes against the copy's Zeros -----------------------------------------------


def test_a_client_write_into_a_planned_hole_is_copied_not_zeroed(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine plans its pieces from the extents without holding any lock.  A client
    write that lands in a planned hole before the piece's locks are taken is mirrored, and
    the piece, looking again under its locks, sends that chunk as data: the secondary keeps
    it (a Zero from the stale plan would wipe it after the mirrored write)."""
    size = 64 * MIB
    a, b = two_nodes(lab, size)
    ha = a.open()
    offset, data = 10 * MIB + 4096, noise(5000)
    real_hold = ChunkLocks.hold
    done: list[tuple[int, int]] = []

    def hold(self: ChunkLocks, first: int, last: int) -> contextlib.AbstractContextManager[None]:
        if threading.current_thread().name.startswith("copy ") and not done:
            done.append((first, last))
            write(ha, offset, data)  # the piece's own thread: no lock held yet
        return real_hold(self, first, last)

    monkeypatch.setattr(ChunkLocks, "hold", hold)
    a.create(PID, b)
    wait_copy(a, PID)
    assert done and done[0][0] <= offset // CHUNK <= done[0][1], done
    assert sent(lab, "Write") == 2  # the mirrored write, then the chunk as the copy's data
    assert read_image(b, offset, len(data)) == data
    same_images(a, b, size)
    assert a.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 0


def test_a_client_write_waits_for_the_zero_of_its_chunks(lab: Lab) -> None:
    """While the secondary carries out a copy's Zero, a client write of chunks in its range
    waits on the primary (the piece holds their chunk locks until the Zero is acknowledged),
    so its mirrored write reaches the secondary after the Zero, never before."""
    size = 64 * MIB
    a, b = two_nodes(lab, size)
    ha = a.open()
    offset, data = 20 * MIB + 512, noise(CHUNK)
    writer_done = threading.Event()
    seen: list[bool] = []

    def client_write() -> None:
        write(ha, offset, data)
        writer_done.set()

    writer = threading.Thread(target=client_write, name="client writer")

    def hook(real: Handler, peer: str, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.Zero) and not seen:
            assert msg.offset <= offset < msg.offset + msg.length
            writer.start()
            # A write that did not wait would be mirrored (and applied here) meanwhile.
            seen.append(writer_done.wait(0.3))
        return real(peer, msg)

    intercept(b, hook)
    a.create(PID, b)
    wait_copy(a, PID)
    writer.join(5)
    assert seen == [False], "the client write did not wait for the Zero of its chunk"
    assert writer_done.is_set()
    assert read_image(b, offset, len(data)) == data
    same_images(a, b, size)


def test_random_client_writes_racing_the_copy_are_kept(lab: Lab) -> None:
    """A volume of data and holes, copied while a client writes, zeroes and trims at random
    (into holes, into data, across both): afterwards both images are the same and
    ``pair verify`` finds nothing."""
    size = 256 * MIB
    a, b = two_nodes(lab, size)
    ha = a.open()
    rng = random.Random(random.randrange(1 << 32))  # replayable: conftest seeds random
    for off in range(0, size, 4 * MIB):  # data in every fourth MiB, holes between
        write(ha, off + rng.randrange(MIB - CHUNK), noise(rng.randint(512, CHUNK)))
    hb = b.open()
    for _ in range(20):  # stale data on the secondary, wherever
        write(hb, rng.randrange(size - CHUNK), noise(CHUNK))
    hb.close()
    stop = threading.Event()
    ops: list[str] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            while not stop.is_set():
                off = rng.randrange(size - 3 * CHUNK)
                n = rng.randint(1, 3 * CHUNK)
                what = rng.choice(["write", "write", "zero", "trim"])
                if what == "write":
                    write(ha, off, noise(n))
                elif what == "zero":
                    ha.zero(n, off, False, False)
                else:
                    ha.trim(n, off, False)
                ops.append(what)
        except BaseException as e:  # the test fails below with it
            errors.append(e)

    writer = threading.Thread(target=client, name="client writer")
    writer.start()
    try:
        a.create(PID, b)
        wait_copy(a, PID)
        after = len(ops)
        wait_until("writes in PAIR too", lambda: len(ops) >= after + 20 or bool(errors))
    finally:
        stop.set()
        writer.join(10)
    assert not errors, errors
    assert ops, "the writer did not run"
    same_images(a, b, size)
    assert a.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 0


# -- the crash rule -----------------------------------------------------------------------------


def test_bits_are_cleared_only_for_what_the_secondary_acknowledged(lab: Lab) -> None:
    """The secondary refuses every copy request from some offset on: the copy fails, and
    every chunk not covered by an acknowledged Write or Zero is still set, in memory and on
    disk."""
    size = 512 * MIB
    a, b = two_nodes(lab, size)
    ha = a.open()
    for off in range(0, size, 8 * MIB):
        write(ha, off, noise(CHUNK))
    refuse_from = 300 * MIB
    acked: set[int] = set()
    lock = threading.Lock()

    def hook(real: Handler, peer: str, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.Write | wire.Zero):
            length = len(msg.data) if isinstance(msg, wire.Write) else msg.length
            if msg.offset + length > refuse_from:
                raise VolumeError("refused by the test", errno.EIO)
            answer = real(peer, msg)
            with lock:
                acked.update(range(msg.offset // CHUNK, -(-(msg.offset + length) // CHUNK)))
            return answer
        return real(peer, msg)

    intercept(b, hook)
    a.create(PID, b)
    side = a.side(PID)
    engine = side.engine
    assert engine is not None
    engine.thread.join(10)
    assert not engine.thread.is_alive()
    assert side.record.state is ps.State.PSUE, side.record
    with side.bitmap_lock:
        left = set(side.copy_map.iter_set())
        on_disk = set(side.store.load(side.record.copy_slot, side.chunk_size).iter_set())
    nchunks = size // CHUNK
    assert acked and left, (len(acked), len(left))
    assert left >= set(range(nchunks)) - acked  # nothing unacknowledged was cleared
    assert on_disk >= set(range(nchunks)) - acked  # nor is it cleared on disk
    # Pieces are taken in order: all before the first refused one were copied (a hole piece
    # here is shorter than the 8 MiB between two data chunks).
    assert min(left) >= (refuse_from - 8 * MIB) // CHUNK
