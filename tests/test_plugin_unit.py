"""plugins/pairvol.py against a stub ``nbdkit`` module: errnos, re-raising, exports, the data path.

The stub records every ``set_error`` call, so each failure test checks both halves of the rule
"set nbdkit's errno, then RE-RAISE": the errno is the specific one, and the exception reaches
the caller (a callback that returned instead would report success to the client).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
import traceback
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PLUGIN

from replicator import falloc
from replicator.errors import HeaderCorrupt, NotFound, PvidMismatch, UsageError, VolumeError
from replicator.export_info import describe, parse_description
from replicator.volume import Volume

MiB = 1 << 20
BS = 4096


class StubNbdkit(types.ModuleType):
    """What the plugin uses of nbdkit's embedded module (values as in nbdkit 1.32)."""

    FLAG_MAY_TRIM = 1 << 0
    FLAG_FUA = 1 << 1
    FLAG_REQ_ONE = 1 << 2
    FLAG_FAST_ZERO = 1 << 3
    THREAD_MODEL_PARALLEL = 3
    FUA_NATIVE = 2
    CACHE_NATIVE = 2

    def __init__(self) -> None:
        super().__init__("nbdkit")
        self.errors: list[int] = []
        self.name = ""

    def set_error(self, err: int) -> None:
        self.errors.append(err)

    def export_name(self) -> str:
        return self.name


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> StubNbdkit:
    s = StubNbdkit()
    monkeypatch.setitem(sys.modules, "nbdkit", s)
    return s


@pytest.fixture
def plugin(stub: StubNbdkit, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh copy of the plugin module (its Exporter is module state)."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the plugin may prepend its root
    spec = importlib.util.spec_from_file_location("pairvol_plugin_under_test", PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make(path: Path, size: int = 4 * MiB, **kw: Any) -> Volume:
    v = Volume.create(str(path), size, **kw)
    v.close()
    return v


def configured(plugin: Any, **params: str) -> Any:
    for k, v in params.items():
        plugin.config(k, v)
    plugin.config_complete()
    return plugin


@pytest.fixture
def vol(tmp_path: Path) -> Volume:
    return make(tmp_path / "v1.img", name="v1")


@pytest.fixture
def handle(plugin: Any, stub: StubNbdkit, vol: Volume) -> Iterator[Any]:
    configured(plugin, volume=vol.path)
    h = plugin.open(False)
    yield h
    plugin.close(h)


def frames(e: BaseException) -> list[str]:
    return [f.filename for f in traceback.extract_tb(e.__traceback__)]


# -- configuration ------------------------------------------------------------------------------


def test_plugin_loads_with_parallel_thread_model_and_api_2(plugin: Any, stub: StubNbdkit) -> None:
    assert plugin.API_VERSION == 2
    assert plugin.thread_model() == stub.THREAD_MODEL_PARALLEL
    assert stub.errors == []


def test_unknown_parameter_is_einval(plugin: Any, stub: StubNbdkit) -> None:
    with pytest.raises(UsageError, match="unknown parameter 'size'"):
        plugin.config("size", "1G")
    assert stub.errors == [errno.EINVAL]


@pytest.mark.parametrize("params", [{}, {"volume": "x.img", "dir": "."}])
def test_exactly_one_of_volume_or_dir(
    plugin: Any, stub: StubNbdkit, params: dict[str, str]
) -> None:
    for k, v in params.items():
        plugin.config(k, v)
    with pytest.raises(UsageError, match="exactly one of volume=PATH or dir=DIR"):
        plugin.config_complete()
    assert stub.errors == [errno.EINVAL]


def test_missing_volume_or_dir_is_enoent(plugin: Any, stub: StubNbdkit, tmp_path: Path) -> None:
    plugin.config("volume", str(tmp_path / "nope.img"))
    with pytest.raises(NotFound):
        plugin.config_complete()
    assert stub.errors == [errno.ENOENT]


def test_missing_dir_is_enoent(plugin: Any, stub: StubNbdkit, tmp_path: Path) -> None:
    plugin.config("dir", str(tmp_path / "nope"))
    with pytest.raises(NotFound, match="is not a directory"):
        plugin.config_complete()
    assert stub.errors == [errno.ENOENT]


def test_a_file_that_is_not_a_volume_fails_at_startup(
    plugin: Any, stub: StubNbdkit, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\x01" * 16384)
    plugin.config("volume", str(junk))
    with pytest.raises(HeaderCorrupt):
        plugin.config_complete()
    assert stub.errors == [errno.EIO]


def test_relative_volume_path_is_made_absolute_at_config(
    plugin: Any, stub: StubNbdkit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make(tmp_path / "rel.img")
    monkeypatch.chdir(tmp_path)
    configured(plugin, volume="rel.img")
    monkeypatch.chdir("/")  # nbdkit chdirs to / when it forks into the background
    h = plugin.open(False)
    assert plugin.get_size(h) == 4 * MiB
    plugin.close(h)


# -- exports, default export, access check ------------------------------------------------------


def test_volume_mode_lists_its_volume_and_makes_it_the_default(
    plugin: Any, stub: StubNbdkit, vol: Volume
) -> None:
    configured(plugin, volume=vol.path)
    assert plugin.list_exports(False, False) == [("v1", describe(vol.header))]
    assert plugin.default_export(False, False) == "v1"
    ((_, desc),) = plugin.list_exports(True, False)
    assert parse_description(desc).pvid == vol.header.pvid_hex
    assert stub.errors == []


def test_dir_mode_lists_volumes_by_name_with_pvids(
    plugin: Any, stub: StubNbdkit, tmp_path: Path
) -> None:
    vols = [make(tmp_path / f"{n}.img", name=n) for n in ("b", "a", "c")]
    (tmp_path / "notes.txt").write_text("not a volume")
    (tmp_path / "sub").mkdir()
    os.link(vols[0].path, tmp_path / ".hidden.img")  # dot files are never served
    configured(plugin, dir=str(tmp_path))
    listed = plugin.list_exports(False, False)
    assert [n for n, _ in listed] == ["a", "b", "c"]
    by_name = {v.header.name: v.header.pvid_hex for v in vols}
    for name, desc in listed:
        info = parse_description(desc)
        assert (info.name, info.pvid) == (name, by_name[name])
    assert plugin.default_export(False, False) == ""  # several volumes: no default
    assert stub.errors == []


def test_dir_mode_with_one_volume_defaults_to_it(
    plugin: Any, stub: StubNbdkit, tmp_path: Path
) -> None:
    configured(plugin, dir=str(tmp_path))
    assert plugin.list_exports(False, False) == []
    assert plugin.default_export(False, False) == ""
    make(tmp_path / "only.img", name="only")  # appears without restarting
    assert plugin.default_export(False, False) == "only"
    h = plugin.open(False)
    assert h.header.name == "only"
    plugin.close(h)


def test_a_damaged_volume_is_left_out_and_reported_not_fatal(
    plugin: Any, stub: StubNbdkit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make(tmp_path / "good.img", name="good")
    bad = make(tmp_path / "bad.img", name="bad")
    with open(bad.path, "r+b") as f:  # break both CRCs but keep the magic
        for off in (100, 4096 + 100):
            f.seek(off)
            f.write(b"\xff\xff")
    configured(plugin, dir=str(tmp_path))
    assert [n for n, _ in plugin.list_exports(False, False)] == ["good"]
    err = capsys.readouterr().err
    assert f"not serving {bad.path}" in err and "bad CRC32C" in err
    assert stub.errors == []


def test_open_by_name_and_by_name_at_pvid(plugin: Any, stub: StubNbdkit, tmp_path: Path) -> None:
    a = make(tmp_path / "a.img", name="a", size=2 * MiB)
    make(tmp_path / "b.img", name="b", size=3 * MiB)
    configured(plugin, dir=str(tmp_path))
    for name in ("b", f"a@{a.header.pvid_hex}", f"a@{a.header.pvid_hex.upper()}"):
        stub.name = name
        h = plugin.open(True)
        assert h.header.name == name[0]
        assert plugin.get_size(h) == {"a": 2 * MiB, "b": 3 * MiB}[name[0]]
        plugin.close(h)
    assert stub.errors == []


def test_pvid_mismatch_is_eacces_naming_both_pvids(
    plugin: Any, stub: StubNbdkit, vol: Volume
) -> None:
    configured(plugin, volume=vol.path)
    for name in ("v1@00c5247772d2f36b", "@00c5247772d2f36b"):
        stub.name = name
        with pytest.raises(PvidMismatch) as ei:
            plugin.open(False)
        msg = str(ei.value)
        assert "00c5247772d2f36b" in msg and vol.header.pvid_hex in msg and vol.path in msg
        assert "\n" not in msg
        # nbdkit logs "Type: message" alone when there is no traceback: one line, no frames
        # from inside the project.
        assert not [f for f in frames(ei.value) if "replicator" in f]
    assert stub.errors == [errno.EACCES, errno.EACCES]


def test_pvid_is_checked_on_the_header_actually_served(
    plugin: Any, stub: StubNbdkit, vol: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PVID changed between the directory scan and the open must still be refused."""
    configured(plugin, volume=vol.path)
    exporter = plugin._service.exporter
    real_select = exporter._select

    def select_then_split(wanted: Any) -> Any:
        chosen = real_select(wanted)
        with Volume.open(vol.path, writable=True) as v:
            v.set_pvid()
        return chosen

    monkeypatch.setattr(exporter, "_select", select_then_split)
    stub.name = f"v1@{vol.header.pvid_hex}"
    with pytest.raises(PvidMismatch):
        plugin.open(False)
    assert stub.errors == [errno.EACCES]


@pytest.mark.parametrize("name", ["nosuch", "nosuch@00c5247772d2f36b"])
def test_unknown_export_is_enoent(plugin: Any, stub: StubNbdkit, vol: Volume, name: str) -> None:
    configured(plugin, volume=vol.path)
    stub.name = name
    with pytest.raises(NotFound, match="no volume named 'nosuch'"):
        plugin.open(False)
    assert stub.errors == [errno.ENOENT]


def test_no_default_export_among_several_is_enoent(
    plugin: Any, stub: StubNbdkit, tmp_path: Path
) -> None:
    make(tmp_path / "a.img", name="a")
    make(tmp_path / "b.img", name="b")
    configured(plugin, dir=str(tmp_path))
    with pytest.raises(NotFound, match=r"no default export: name one of the volumes \(a, b\)"):
        plugin.open(False)
    assert stub.errors == [errno.ENOENT]


@pytest.mark.parametrize("name", ["v1@", "v1@xyz", "v1@0000000000000000", "v 1", "a/b"])
def test_malformed_export_name_is_einval(
    plugin: Any, stub: StubNbdkit, vol: Volume, name: str
) -> None:
    configured(plugin, volume=vol.path)
    stub.name = name
    with pytest.raises(UsageError):
        plugin.open(False)
    assert stub.errors == [errno.EINVAL]


def test_a_bug_is_eio_and_keeps_its_traceback(
    plugin: Any, stub: StubNbdkit, vol: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    configured(plugin, volume=vol.path)

    def broken(export_name: str, readonly: bool) -> None:
        raise TypeError("a bug")

    monkeypatch.setattr(plugin._service.exporter, "open", broken)
    with pytest.raises(TypeError) as ei:
        plugin.open(False)
    assert stub.errors == [errno.EIO]
    assert any(f.endswith("test_plugin_unit.py") for f in frames(ei.value))  # where the bug is


# -- the handle: sizes, flags, description ------------------------------------------------------


def test_handle_reports_size_flags_and_description(
    plugin: Any, stub: StubNbdkit, handle: Any, vol: Volume
) -> None:
    assert plugin.get_size(handle) == 4 * MiB
    assert plugin.block_size(handle) == (1, BS, 0xFFFFFFFF)
    assert plugin.can_write(handle) and plugin.can_trim(handle) and plugin.can_zero(handle)
    assert plugin.can_flush(handle) and plugin.can_multi_conn(handle)
    assert plugin.can_extents(handle) and plugin.can_fast_zero(handle)
    assert plugin.can_fua(handle) == stub.FUA_NATIVE
    assert plugin.can_cache(handle) == stub.CACHE_NATIVE
    assert plugin.is_rotational(handle) is False
    assert parse_description(plugin.export_description(handle)).pvid == vol.header.pvid_hex
    assert stub.errors == []


def test_readonly_handle_offers_no_writes(plugin: Any, stub: StubNbdkit, vol: Volume) -> None:
    configured(plugin, volume=vol.path)
    h = plugin.open(True)
    assert not plugin.can_write(h) and not plugin.can_trim(h) and not plugin.can_zero(h)
    with pytest.raises(OSError) as ei:  # the descriptor itself is read-only
        plugin.pwrite(h, memoryview(b"x" * BS), 0, 0)
    assert stub.errors == [errno.EBADF] and ei.value.errno == errno.EBADF
    plugin.close(h)


# -- the data path ------------------------------------------------------------------------------


def test_pread_fills_the_callers_buffer_in_place(
    plugin: Any, stub: StubNbdkit, handle: Any, vol: Volume
) -> None:
    base = vol.header.data_offset
    with open(vol.path, "r+b") as f:
        f.seek(base + 4 * MiB - BS)
        f.write(b"\x5a" * BS)
    buf = bytearray(b"\xee" * BS)
    view = memoryview(buf)
    assert plugin.pread(handle, view, 4 * MiB - BS, 0) is None
    assert buf == b"\x5a" * BS  # the same object, filled by the kernel
    plugin.pread(handle, view, 0, 0)
    assert buf == bytes(BS)
    assert stub.errors == []


def test_pwrite_lands_in_the_data_area_only(
    plugin: Any, stub: StubNbdkit, handle: Any, vol: Volume
) -> None:
    base = vol.header.data_offset
    head = Path(vol.path).read_bytes()[:base]
    plugin.pwrite(handle, memoryview(b"\x11" * BS), 0, 0)
    plugin.pwrite(handle, memoryview(b"\x22" * BS), 4 * MiB - BS, 0)
    raw = Path(vol.path).read_bytes()
    assert raw[base : base + BS] == b"\x11" * BS
    assert raw[-BS:] == b"\x22" * BS
    assert raw[:base] == head
    with Volume.open(vol.path) as v:  # the header is untouched and still healthy
        assert v.header == vol.header and v.report.health() == "ok"
    assert stub.errors == []


def test_fua_write_asks_the_kernel_for_dsync(
    plugin: Any, stub: StubNbdkit, handle: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = os.pwritev

    def spy(fd: int, bufs: Any, offset: int, flags: int = 0) -> int:
        seen.append(flags)
        return real(fd, bufs, offset, flags)

    monkeypatch.setattr(os, "pwritev", spy)
    monkeypatch.setattr(plugin, "_pwritev", spy)  # the plugin's bound fast path
    plugin.pwrite(handle, memoryview(b"a" * BS), 0, stub.FLAG_FUA)
    plugin.pwrite(handle, memoryview(b"b" * BS), BS, 0)
    plugin.pwrite(handle, memoryview(b"c" * BS), BS, stub.FLAG_MAY_TRIM)  # not FUA
    assert seen == [os.RWF_DSYNC, 0, 0]
    assert stub.errors == []


@pytest.mark.parametrize(
    ("call", "args"),
    [
        ("pread", (memoryview(bytearray(BS)), 4 * MiB - BS + 1, 0)),
        ("pread", (memoryview(bytearray(BS)), -BS, 0)),
        ("pwrite", (memoryview(b"x" * BS), 4 * MiB, 0)),
        ("pwrite", (memoryview(b"x" * 2 * BS), 4 * MiB - BS, 0)),
        ("pwrite", (memoryview(b"x" * BS), -BS, 0)),
        ("trim", (BS, 4 * MiB, 0)),
        ("zero", (2 * BS, 4 * MiB - BS, 0)),
        ("zero", (BS, -BS, 1)),
        ("cache", (BS, 4 * MiB, 0)),
        ("extents", (BS, 4 * MiB, 0)),
    ],
)
def test_out_of_range_request_is_einval_and_touches_nothing(
    plugin: Any, stub: StubNbdkit, handle: Any, vol: Volume, call: str, args: tuple[Any, ...]
) -> None:
    before = Path(vol.path).read_bytes()
    with pytest.raises(VolumeError, match="outside the data area") as ei:
        getattr(plugin, call)(handle, *args)
    assert ei.value.errno == errno.EINVAL
    assert stub.errors == [errno.EINVAL]
    assert Path(vol.path).read_bytes() == before


def test_short_read_is_an_error(plugin: Any, stub: StubNbdkit, handle: Any, vol: Volume) -> None:
    os.truncate(vol.path, vol.header.data_offset + 4 * MiB - BS)  # shrunk under our feet
    with pytest.raises(VolumeError, match=r"short read \(0 of 4096 bytes\)"):
        plugin.pread(handle, memoryview(bytearray(BS)), 4 * MiB - BS, 0)
    assert stub.errors == [errno.EIO]


def test_trim_zero_and_extents(plugin: Any, stub: StubNbdkit, handle: Any) -> None:
    plugin.pwrite(handle, memoryview(b"\xff" * (4 * 65536)), 0, 0)
    ext = plugin.extents(handle, 4 * MiB, 0, 0)
    assert ext[0] == (0, 4 * 65536, 0) and ext[-1][2] == 3
    assert sum(n for _, n, _ in ext) == 4 * MiB

    plugin.trim(handle, 65536, 0, stub.FLAG_FUA)
    plugin.zero(handle, 65536, 65536, stub.FLAG_MAY_TRIM)  # may punch a hole
    plugin.zero(handle, 65536, 2 * 65536, 0)  # must stay allocated
    buf = bytearray(3 * 65536)
    plugin.pread(handle, memoryview(buf), 0, 0)
    assert buf == bytes(3 * 65536)
    assert plugin.extents(handle, 2 * 65536, 0, 0) == [(0, 2 * 65536, 3)]
    # REQ_ONE: one extent is enough, and it starts at the requested offset.
    first = plugin.extents(handle, 4 * MiB - 3 * 65536, 3 * 65536, stub.FLAG_REQ_ONE)
    assert first == [(3 * 65536, 65536, 0)]
    plugin.flush(handle, 0)
    plugin.cache(handle, 65536, 0, 0)
    assert stub.errors == []


def test_zero_without_zero_range_asks_nbdkit_to_fall_back(
    plugin: Any, stub: StubNbdkit, handle: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(falloc, "zero_range", unsupported)
    with pytest.raises(OSError) as ei:
        plugin.zero(handle, BS, 0, 0)
    assert ei.value.errno == errno.EOPNOTSUPP
    assert stub.errors == [errno.EOPNOTSUPP]
    # Punching a hole still works, so zero with MAY_TRIM needs no fallback.
    plugin.zero(handle, BS, 0, stub.FLAG_MAY_TRIM)
    assert stub.errors == [errno.EOPNOTSUPP]

    monkeypatch.setattr(falloc, "punch_hole", unsupported)
    with pytest.raises(OSError):
        plugin.zero(handle, BS, 0, stub.FLAG_MAY_TRIM)  # neither works: nbdkit writes zeros
    assert stub.errors == [errno.EOPNOTSUPP, errno.EOPNOTSUPP]
    plugin.trim(handle, BS, 0, 0)  # trim is advisory: nothing to do is not an error
    assert stub.errors == [errno.EOPNOTSUPP, errno.EOPNOTSUPP]


def test_io_error_from_the_kernel_keeps_its_errno(
    plugin: Any, stub: StubNbdkit, handle: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def enospc(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", enospc)
    monkeypatch.setattr(plugin, "_pwritev", enospc)
    with pytest.raises(OSError):
        plugin.pwrite(handle, memoryview(b"x" * BS), 0, 0)
    assert stub.errors == [errno.ENOSPC]


def test_close_closes_the_descriptor(plugin: Any, stub: StubNbdkit, vol: Volume) -> None:
    configured(plugin, volume=vol.path)
    h = plugin.open(False)
    fd = h.fd
    os.fstat(fd)
    plugin.close(h)
    with pytest.raises(OSError) as ei:
        os.fstat(fd)
    assert ei.value.errno == errno.EBADF
