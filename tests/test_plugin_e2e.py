"""End to end: a real nbdkit running plugins/pairvol.py, driven through libnbd.

Every server is ``nbdkit -s --exit-with-parent`` started by libnbd's ``connect_command``: the
socket is a socketpair, so there are no ports, and closing the handle reaps the process (an
autouse fixture checks that no nbdkit outlives its test).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import PLUGIN, require, require_programs

from replicator.export_info import parse_description
from replicator.volume import Volume

try:
    import nbd
except ImportError:  # pragma: no cover - tools/setup installs python3-libnbd
    nbd = None

MiB = 1 << 20
BS = 4096
ALLOC = "base:allocation"


@pytest.fixture(autouse=True)
def _nbdkit_available_and_reaped() -> Iterator[None]:
    require(nbd is not None, "needs the libnbd Python module (python3-libnbd)")
    require_programs("nbdkit")
    yield
    left = [p for p in psutil.Process().children(recursive=True) if p.name() == "nbdkit"]
    assert not left, f"nbdkit outlived the test: {left}"


def server(*params: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["nbdkit", "-s", "--exit-with-parent", *extra, "python", PLUGIN, *params]


def close(h: Any) -> None:
    """nbd_close now: hang up and reap the nbdkit child (libnbd 1.14's Python handle has no
    close(); its __del__ is nbd_close, and removing ``_o`` stops a second close at GC)."""
    if hasattr(h, "_o"):
        h.__del__()
        del h._o


@contextlib.contextmanager
def connected(
    *params: str,
    export: str | None = None,
    extra: tuple[str, ...] = (),
    opt_mode: bool = False,
) -> Iterator[Any]:
    h = nbd.NBD()
    try:
        h.add_meta_context(ALLOC)
        h.set_full_info(True)  # ask for NBD_INFO_DESCRIPTION
        h.set_opt_mode(opt_mode)
        if export is not None:
            h.set_export_name(export)
        h.connect_command(server(*params, extra=extra))
        yield h
        if h.aio_is_ready():
            h.shutdown()
    finally:
        close(h)


def extents(h: Any, count: int, offset: int = 0) -> list[tuple[int, int, int]]:
    """base:allocation extents as (offset, length, flags), merged, covering the range."""
    out: list[tuple[int, int, int]] = []

    def cb(context: str, start: int, entries: list[int], err: Any) -> int:
        if context == ALLOC:
            pos = start
            for i in range(0, len(entries), 2):
                out.append((pos, entries[i], entries[i + 1]))
                pos += entries[i]
        return 0

    while offset < count:
        before = len(out)
        h.block_status(count - offset, offset, cb)
        assert len(out) > before
        offset = out[-1][0] + out[-1][1]
    merged: list[tuple[int, int, int]] = []
    for off, n, fl in out:
        if merged and merged[-1][2] == fl:
            merged[-1] = (merged[-1][0], merged[-1][1] + n, fl)
        else:
            merged.append((off, n, fl))
    return merged


HOLE_ZERO = 3  # nbd.STATE_HOLE | nbd.STATE_ZERO


def make(path: Path, size: int = 8 * MiB, **kw: Any) -> Volume:
    v = Volume.create(str(path), size, **kw)
    v.close()
    return v


def head_sha(vol: Volume) -> str:
    with open(vol.path, "rb") as f:
        return hashlib.sha256(f.read(vol.header.data_offset)).hexdigest()


def on_disk(vol: Volume, offset: int, count: int) -> bytes:
    with open(vol.path, "rb") as f:
        f.seek(vol.header.data_offset + offset)
        return f.read(count)


@pytest.fixture
def vol(tmp_path: Path) -> Volume:
    return make(tmp_path / "v1.img", name="v1")


# -- one volume ---------------------------------------------------------------------------------


def test_size_block_size_and_flags(vol: Volume) -> None:
    with connected(f"volume={vol.path}") as h:
        assert h.get_size() == 8 * MiB
        assert h.get_block_size(nbd.SIZE_PREFERRED) == BS
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert not h.is_read_only()
        assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
        assert h.can_fast_zero() and h.can_cache() and h.can_multi_conn()
        assert h.can_meta_context(ALLOC)
        assert h.get_canonical_export_name() == "v1"  # the default export is the volume
        info = parse_description(h.get_export_description())
        assert (info.name, info.pvid, info.size) == ("v1", vol.header.pvid_hex, 8 * MiB)


def test_round_trips_at_the_first_and_last_blocks(vol: Volume) -> None:
    first, last = random.randbytes(BS), random.randbytes(BS)
    with connected(f"volume={vol.path}") as h:
        h.pwrite(first, 0)
        h.pwrite(last, 8 * MiB - BS)
        assert h.pread(BS, 0) == first
        assert h.pread(BS, 8 * MiB - BS) == last
        # Unaligned, straddling the written block.
        assert h.pread(100, BS - 50) == first[-50:] + bytes(50)
    assert on_disk(vol, 0, BS) == first
    assert on_disk(vol, 8 * MiB - BS, BS) == last


def test_trim_and_zero_read_back_zeros_and_show_holes(vol: Volume) -> None:
    data = random.randbytes(MiB)
    with connected(f"volume={vol.path}") as h:
        h.pwrite(data, 0)
        assert extents(h, 8 * MiB) == [(0, MiB, 0), (MiB, 7 * MiB, HOLE_ZERO)]
        h.trim(256 * 1024, 0)
        h.zero(256 * 1024, 256 * 1024)  # no NO_HOLE: the server may punch a hole
        h.zero(256 * 1024, 512 * 1024, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(768 * 1024, 0) == bytes(768 * 1024)
        assert h.pread(256 * 1024, 768 * 1024) == data[768 * 1024 :]
        got = extents(h, 8 * MiB)
        assert got[0] == (0, 512 * 1024, HOLE_ZERO)
        # The NO_HOLE range may show as data or hole (ext4 reports fresh unwritten extents
        # either way); the untouched data must show as data.
        assert any(o <= 768 * 1024 and o + n >= MiB and f == 0 for o, n, f in got)
        assert got[-1] == (MiB, 7 * MiB, HOLE_ZERO)


def test_flush_and_fua_write(vol: Volume) -> None:
    a, b = random.randbytes(BS), random.randbytes(2 * BS)
    with connected(f"volume={vol.path}") as h:
        h.pwrite(a, BS)
        h.flush()
        h.pwrite(b, 3 * MiB, nbd.CMD_FLAG_FUA)
        h.trim(BS, 0, nbd.CMD_FLAG_FUA)
        h.zero(BS, 2 * BS, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
        h.cache(MiB, 0)
        assert h.pread(BS, BS) == a
        assert h.pread(2 * BS, 3 * MiB) == b
    assert on_disk(vol, BS, BS) == a and on_disk(vol, 3 * MiB, 2 * BS) == b


def test_connections_share_one_view(vol: Volume) -> None:
    """can_multi_conn: what one connection wrote and flushed, another reads."""
    data = random.randbytes(BS)
    with connected(f"volume={vol.path}") as h1, connected(f"volume={vol.path}") as h2:
        h1.pwrite(data, 5 * BS)
        h1.flush()
        assert h2.pread(BS, 5 * BS) == data


def test_writing_the_whole_export_never_touches_header_or_metadata(vol: Volume) -> None:
    before = head_sha(vol)
    data = random.randbytes(8 * MiB)
    with connected(f"volume={vol.path}") as h:
        for off in range(0, 8 * MiB, MiB):
            h.pwrite(data[off : off + MiB], off)
        h.flush()
        assert hashlib.sha256(h.pread(8 * MiB, 0)).digest() == hashlib.sha256(data).digest()
        h.zero(8 * MiB, 0)
        h.trim(8 * MiB, 0)
    assert head_sha(vol) == before
    assert os.path.getsize(vol.path) == vol.header.image_size
    with Volume.open(vol.path) as v:
        assert v.header == vol.header and v.report.health() == "ok"


def test_read_only_server_refuses_writes(vol: Volume) -> None:
    with connected(f"volume={vol.path}", extra=("-r",)) as h:
        assert h.is_read_only()
        assert not h.can_trim() and not h.can_zero()
        with pytest.raises(nbd.Error) as client_side:
            h.pwrite(b"x" * BS, 0)
        assert client_side.value.errno == "EPERM"
        h.set_strict_mode(0)  # let the request reach the server: it must refuse it too
        with pytest.raises(nbd.Error) as server_side:
            h.pwrite(b"x" * BS, 0)
        assert server_side.value.errno == "EPERM"
        assert h.pread(BS, 0) == bytes(BS)
    assert on_disk(vol, 0, BS) == bytes(BS)


def test_access_check_refuses_a_wrong_pvid_and_accepts_the_right_one(
    vol: Volume, capfd: pytest.CaptureFixture[str]
) -> None:
    right = vol.header.pvid_hex
    wrong = "00c5247772d2f36b"
    with connected(f"volume={vol.path}", opt_mode=True) as h:
        for name in (f"v1@{wrong}", f"@{wrong}"):
            h.set_export_name(name)
            with pytest.raises(nbd.Error) as ei:
                h.opt_go()
            # nbdkit 1.32 answers every failed open with NBD_REP_ERR_UNKNOWN, whatever errno
            # the plugin set (EACCES here), and libnbd reports that as ENOENT.
            assert ei.value.errno == "ENOENT"
        # The refusal did not end the negotiation: the same connection gets in with the
        # right PVID.
        h.set_export_name(f"v1@{right}")
        h.opt_go()
        assert h.get_size() == 8 * MiB
        assert parse_description(h.get_export_description()).pvid == right
    log = capfd.readouterr().err
    lines = [ln for ln in log.splitlines() if "access error" in ln]
    assert len(lines) == 2, log
    assert all(wrong in ln and right in ln and vol.path in ln for ln in lines)
    assert "Traceback" not in log


def test_a_pvid_changed_while_serving_is_enforced_on_the_next_connection(vol: Volume) -> None:
    old = vol.header.pvid_hex
    with connected(f"volume={vol.path}", opt_mode=True) as h:
        h.set_export_name(f"v1@{old}")
        h.opt_info()  # allowed now
        with Volume.open(vol.path, writable=True) as v:
            new = v.set_pvid().pvid_hex
        with pytest.raises(nbd.Error):
            h.opt_info()
        h.set_export_name(f"v1@{new}")
        h.opt_go()
        assert parse_description(h.get_export_description()).pvid == new


def test_serves_from_any_working_directory(
    vol: Volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plugin finds the project from its own path, not from the cwd or PYTHONPATH."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir("/")
    with connected(f"volume={vol.path}") as h:
        h.pwrite(b"\x42" * BS, 0)
        assert h.pread(BS, 0) == b"\x42" * BS
    monkeypatch.chdir(tmp_path)  # and a relative volume= is relative to where nbdkit started
    with connected("volume=v1.img") as h:
        assert h.pread(BS, 0) == b"\x42" * BS


# -- a directory of volumes ---------------------------------------------------------------------


def list_exports(h: Any) -> dict[str, str]:
    found: dict[str, str] = {}
    n = h.opt_list(lambda name, desc: found.__setitem__(name, desc))
    assert n == len(found)
    return found


@pytest.fixture
def voldir(tmp_path: Path) -> tuple[Path, dict[str, Volume]]:
    d = tmp_path / "vols"
    d.mkdir()
    vols = {n: make(d / f"{n}.img", size=(i + 1) * MiB, name=n) for i, n in enumerate("abc")}
    (d / "README").write_text("not a volume")
    return d, vols


def test_dir_mode_lists_every_volume_with_its_pvid(
    voldir: tuple[Path, dict[str, Volume]],
) -> None:
    d, vols = voldir
    with connected(f"dir={d}", opt_mode=True) as h:
        listed = list_exports(h)
        assert sorted(listed) == ["a", "b", "c"]
        for name, desc in listed.items():
            info = parse_description(desc)
            assert (info.name, info.pvid) == (name, vols[name].header.pvid_hex)
            assert info.size == vols[name].header.data_size
        h.set_export_name("")  # several volumes: there is no default export
        with pytest.raises(nbd.Error):
            h.opt_go()
        h.opt_abort()


@pytest.mark.parametrize("pick", ["b", "b@PVID"])
def test_dir_mode_selects_by_name_and_name_at_pvid(
    voldir: tuple[Path, dict[str, Volume]], pick: str
) -> None:
    d, vols = voldir
    name = pick.replace("PVID", vols["b"].header.pvid_hex)
    data = random.randbytes(BS)
    with connected(f"dir={d}", export=name) as h:
        assert h.get_size() == 2 * MiB
        assert parse_description(h.get_export_description()).name == "b"
        h.pwrite(data, 2 * MiB - BS)
    assert on_disk(vols["b"], 2 * MiB - BS, BS) == data
    assert on_disk(vols["a"], 0, MiB) == bytes(MiB) and on_disk(vols["c"], 0, BS) == bytes(BS)


def test_dir_mode_refuses_a_wrong_pvid_and_an_unknown_name(
    voldir: tuple[Path, dict[str, Volume]],
) -> None:
    d, vols = voldir
    with connected(f"dir={d}", opt_mode=True) as h:
        for name in (f"b@{vols['a'].header.pvid_hex}", "nosuch", "README"):
            h.set_export_name(name)
            with pytest.raises(nbd.Error):
                h.opt_go()
        h.set_export_name(f"a@{vols['a'].header.pvid_hex}")
        h.opt_go()
        assert h.get_size() == MiB


def test_dir_mode_serves_a_volume_created_after_start(
    voldir: tuple[Path, dict[str, Volume]],
) -> None:
    d, _ = voldir
    with connected(f"dir={d}", opt_mode=True) as h:
        # nbdkit answers one NBD_OPT_LIST per connection, so list before, open after.
        assert sorted(list_exports(h)) == ["a", "b", "c"]
        h.set_export_name("late")
        with pytest.raises(nbd.Error):
            h.opt_info()
        late = make(d / "late.img", size=5 * MiB, name="late")
        h.set_export_name(f"late@{late.header.pvid_hex}")
        h.opt_go()
        assert h.get_size() == 5 * MiB
        assert parse_description(h.get_export_description()).pvid == late.header.pvid_hex
        h.pwrite(b"\x77" * BS, 0)
        assert h.pread(BS, 0) == b"\x77" * BS
    assert on_disk(late, 0, BS) == b"\x77" * BS


def test_dir_mode_with_one_volume_has_it_as_default(tmp_path: Path) -> None:
    v = make(tmp_path / "solo.img", name="solo")
    with connected(f"dir={tmp_path}") as h:
        assert h.get_canonical_export_name() == "solo"
        assert parse_description(h.get_export_description()).pvid == v.header.pvid_hex


# -- zeroing on a filesystem without FALLOC_FL_ZERO_RANGE ---------------------------------------


def _fs_type(path: str) -> str:
    best, kind = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fstype, *_ = line.split()
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, fstype
    return kind


@pytest.fixture(params=["disk", "tmpfs"])
def fs_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if request.param == "disk":
        require(_fs_type(str(tmp_path)) != "tmpfs", f"{tmp_path} is itself tmpfs")
        yield "disk", tmp_path
        return
    require(_fs_type("/dev/shm") == "tmpfs", "needs /dev/shm mounted as tmpfs")
    d = Path(tempfile.mkdtemp(prefix="pairvol-test-", dir="/dev/shm"))
    try:
        yield "tmpfs", d
    finally:
        shutil.rmtree(d)


def test_zero_falls_back_where_zero_range_is_missing(fs_dir: tuple[str, Path]) -> None:
    kind, d = fs_dir
    v = make(d / "z.img", name="z")
    ones = b"\xff" * (64 * 1024)
    with connected(f"volume={v.path}") as h:
        h.pwrite(ones * 2, 0)
        # NO_HOLE rules out punching: the plugin tries FALLOC_FL_ZERO_RANGE.  On tmpfs that is
        # EOPNOTSUPP and nbdkit writes the zeros itself.
        h.zero(len(ones), 0, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(2 * len(ones), 0) == bytes(len(ones)) + ones
        # A fast zero must not be emulated by slow writes: refused on tmpfs, done on disk.
        if kind == "tmpfs":
            with pytest.raises(nbd.Error) as ei:
                h.zero(len(ones), len(ones), nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
            assert ei.value.errno == "ENOTSUP"
            assert h.pread(len(ones), len(ones)) == ones
            assert extents(h, 2 * len(ones))[0] == (0, 2 * len(ones), 0)  # zeros were written
        else:
            h.zero(len(ones), len(ones), nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
            assert h.pread(len(ones), len(ones)) == bytes(len(ones))
        # Zeroing that may punch a hole works natively on both.
        h.pwrite(ones, 0)
        h.zero(len(ones), 0, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(len(ones), 0) == bytes(len(ones))
        assert extents(h, len(ones))[0] == (0, len(ones), HOLE_ZERO)
