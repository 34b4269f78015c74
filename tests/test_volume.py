"""Volume image files: creation, opening, header updates, repair, crash safety."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from replicator import header as hdr
from replicator.errors import AlreadyExists, HeaderCorrupt, IllegalState, NotFound
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
