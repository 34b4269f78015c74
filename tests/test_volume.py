"""Volume image files: creation, opening, header updates, repair, crash safety."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import header as hdr
from replicator.errors import AlreadyExists, HeaderCorrupt, IllegalState, NotFound, UsageError
from replicator.volume import Volume, looks_like_volume

ROOT = Path(__file__).resolve().parent.parent


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_create_is_sparse_aligned_and_readable(tmp_path: Path) -> None:
    p = tmp_path / "v.img"
    with Volume.create(str(p), 64 << 20, name="v") as v:
        h = v.header
    assert p.stat().st_size == h.data_offset + (64 << 20)
    assert p.stat().st_blocks * 512 < 1 << 20  # sparse: only the header is allocated
    assert h.data_offset % (1 << 20) == 0
    with Volume.open(str(p)) as v2:
        assert v2.header == h and v2.report.health() == "ok"
    assert looks_like_volume(str(p))
    assert [f.name for f in tmp_path.iterdir()] == ["v.img"]  # no temp file left behind


def test_create_never_overwrites(tmp_path: Path) -> None:
    p = tmp_path / "v.img"
    p.write_bytes(b"precious")
    with pytest.raises(AlreadyExists):
        Volume.create(str(p), 1 << 20)
    assert p.read_bytes() == b"precious"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["v.img"]


def test_create_in_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        Volume.create(str(tmp_path / "nope" / "v.img"), 1 << 20)


def test_open_refuses_non_volumes_and_truncated_images(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(16384))
    with pytest.raises(HeaderCorrupt, match="no valid header slot"):
        Volume.open(str(junk))
    p = tmp_path / "v.img"
    Volume.create(str(p), 8 << 20).close()
    os.truncate(p, 4 << 20)
    with pytest.raises(HeaderCorrupt, match="truncated"):
        Volume.open(str(p))
    with pytest.raises(NotFound):
        Volume.open(str(tmp_path / "missing"))


def test_set_pvid_bumps_generation_and_remembers_previous(tmp_path: Path) -> None:
    p = tmp_path / "v.img"
    with Volume.create(str(p), 1 << 20, pvid=0x1111) as v:
        h = v.set_pvid()
        assert h.pvid not in (0, 0x1111) and h.prev_pvid == 0x1111 and h.generation == 2
        with pytest.raises(IllegalState, match="already has PVID"):
            v.set_pvid(h.pvid)
        h3 = v.set_pvid(0x2222)
    with Volume.open(str(p)) as v:
        assert v.header == h3 and v.header.generation == 3


def test_read_only_open_reports_but_does_not_repair(tmp_path: Path) -> None:
    p = tmp_path / "v.img"
    Volume.create(str(p), 1 << 20).close()
    with open(p, "r+b") as f:
        f.seek(hdr.SLOT_OFFSETS[1] + 30)
        f.write(b"\xff\xff")
    before = sha(p)
    with Volume.open(str(p)) as v:
        assert v.report.health().startswith("degraded (slot B damaged")
    assert sha(p) == before
    with Volume.open(str(p), writable=True) as v:
        assert v.report.repaired == (1,)
    with Volume.open(str(p)) as v:
        assert v.report.health() == "ok"


_CHURN = """
import sys
sys.path.insert(0, sys.argv[1])
from replicator.volume import Volume
with Volume.open(sys.argv[2], writable=True) as v:
    print("ready", flush=True)
    while True:
        v.set_pvid()
"""


@pytest.mark.slow
def test_kill_9_during_header_updates_always_leaves_a_valid_header(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites the header in a loop, at random moments, many times."""
    p = tmp_path / "v.img"
    Volume.create(str(p), 1 << 20).close()
    data_before = p.read_bytes()[hdr.META_OFFSET :]
    last_gen = 1
    rng = random.Random()
    for _ in range(25):
        with subprocess.Popen(
            [sys.executable, "-c", _CHURN, str(ROOT), str(p)], stdout=subprocess.PIPE
        ) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            # Let it run for a random number of header writes, then kill it mid-stride.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=rng.uniform(0.001, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        with Volume.open(str(p), writable=True) as v:  # repairs a stale or torn slot
            assert v.header.generation >= last_gen
            last_gen = v.header.generation
        with Volume.open(str(p)) as v:
            assert v.report.health() == "ok"
    assert last_gen > 1
    assert p.read_bytes()[hdr.META_OFFSET :] == data_before  # header writes never spill


@contextlib.contextmanager
def unblocking(fifo: Path, after: float = 5.0) -> Iterator[None]:
    """If the code under test blocks opening ``fifo`` for reading, open its write end after
    ``after`` seconds, so that the test fails on its clock instead of hanging."""
    done = threading.Event()

    def rescue() -> None:
        if done.wait(after):
            return
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    t = threading.Thread(target=rescue, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def _special(tmp_path: Path, kind: str) -> Path:
    if kind == "fifo":
        p = tmp_path / "v.img"
        os.mkfifo(p)
    elif kind == "socket":
        p = tmp_path / "s.img"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(p))
        s.close()
    elif kind == "directory":
        p = tmp_path / "d.img"
        p.mkdir()
    else:
        p = Path("/dev/null")
    return p


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        ("fifo", "a FIFO"),
        ("socket", "a socket"),
        ("directory", "a directory"),
        ("chardev", "a character device"),
    ],
)
@pytest.mark.parametrize("writable", [False, True])
def test_open_refuses_anything_but_a_regular_file_without_blocking(
    tmp_path: Path, kind: str, what: str, writable: bool
) -> None:
    p = _special(tmp_path, kind)
    started = time.monotonic()
    with unblocking(p), pytest.raises(UsageError) as info:
        Volume.open(str(p), writable=writable)
    assert time.monotonic() - started < 2.0
    assert str(info.value) == f"{p} is not a regular file ({what}), so not a volume image"
    if kind != "chardev":
        assert not looks_like_volume(str(p))


def test_open_follows_a_symlink_to_a_volume_but_not_to_a_fifo(tmp_path: Path) -> None:
    Volume.create(str(tmp_path / "v.img"), 1 << 20).close()
    (tmp_path / "link.img").symlink_to("v.img")
    with Volume.open(str(tmp_path / "link.img")) as v:
        assert v.header.data_size == 1 << 20
    os.mkfifo(tmp_path / "f")
    (tmp_path / "flink.img").symlink_to("f")
    with unblocking(tmp_path / "f"), pytest.raises(UsageError, match=r"\(a FIFO\)"):
        Volume.open(str(tmp_path / "flink.img"))


def test_looks_like_volume_never_blocks_on_a_fifo(tmp_path: Path) -> None:
    p = tmp_path / "f"
    os.mkfifo(p)
    started = time.monotonic()
    with unblocking(p):
        assert not looks_like_volume(str(p))
    assert time.monotonic() - started < 2.0


def _damage(p: Path, slot: int) -> None:
    with open(p, "r+b") as f:
        f.seek(hdr.SLOT_OFFSETS[slot] + 30)
        f.write(b"\xff\xff")


def test_repair_note_says_which_slot_was_bad_why_and_what_was_kept(tmp_path: Path) -> None:
    p = tmp_path / "v.img"
    with Volume.create(str(p), 1 << 20) as v:
        v.set_pvid()  # generation 2
        assert v.repair_note is None
    _damage(p, 1)
    before = sha(p)
    with Volume.open(str(p)) as v:
        note = v.repair_note
    assert sha(p) == before  # read-only: reported, not repaired
    assert note is not None and "\n" not in note
    assert note.startswith("header slot B damaged (bad CRC32C (stored ")
    assert note.endswith(": kept slot A (generation 2); not repaired (opened read-only)")
    with Volume.open(str(p), writable=True, repair=False) as v:
        assert v.repair_note is not None and v.repair_note.endswith("not repaired (asked not to)")
    assert sha(p) == before

    with Volume.open(str(p), writable=True) as v:
        assert v.repair_note is not None
        assert v.repair_note.startswith("header slot B damaged (bad CRC32C")
        assert v.repair_note.endswith("kept slot A (generation 2); slot B rewritten from it")
    with Volume.open(str(p)) as v:
        assert v.repair_note is None and v.report.health() == "ok"


def test_repair_note_for_an_interrupted_update(tmp_path: Path) -> None:
    p = tmp_path / "v.img"
    Volume.create(str(p), 1 << 20).close()
    old_slot_b = p.read_bytes()[hdr.SLOT_OFFSETS[1] : hdr.SLOT_OFFSETS[1] + hdr.SLOT_SIZE]
    with Volume.open(str(p), writable=True) as v:
        v.set_pvid()
    with open(p, "r+b") as f:  # as if the crash came between the writes of slot A and slot B
        f.seek(hdr.SLOT_OFFSETS[1])
        f.write(old_slot_b)
    with Volume.open(str(p), writable=True) as v:
        assert v.repair_note == (
            "header slot B stale (generation 1 behind 2 (interrupted update)): "
            "kept slot A (generation 2); slot B rewritten from it"
        )
    _damage(p, 0)
    with Volume.open(str(p)) as v:
        assert v.repair_note is not None and "slot A damaged" in v.repair_note
        assert "kept slot B (generation 2)" in v.repair_note
        v2 = v.reread()
        assert v2.generation == 2 and v.repair_note is not None


def test_repair_is_never_written_through_a_read_only_open(tmp_path: Path) -> None:
    p = tmp_path / "v.img"
    Volume.create(str(p), 1 << 20).close()
    with pytest.raises(IllegalState, match="needs the volume opened writable"):
        Volume.open(str(p), repair=True)
    _damage(p, 1)
    before = sha(p)
    with pytest.raises(IllegalState, match="needs the volume opened writable"):
        Volume.open(str(p), repair=True)
    assert sha(p) == before
