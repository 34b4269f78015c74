"""Clients nobody here wrote: qemu-img, qemu-io, nbdcopy and nbdinfo against the plugin.

Servers run captive (``nbdkit -U - ... --run CLIENT``): nbdkit makes a private Unix socket,
runs the client with ``$uri`` pointing at it, and exits with the client's status when the
client is done, so nothing outlives ``subprocess.run``.  nbdinfo starts its own server with
the ``[ nbdkit ... ]`` syntax.  A fixture checks that no process still mentions the test's
directory afterwards.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import PLUGIN, require_programs

from replicator.export_info import parse_description
from replicator.volume import Volume

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture(autouse=True)
def _no_leftover_servers(tmp_path: Path) -> Iterator[None]:
    require_programs("nbdkit")
    yield
    left = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(tmp_path) in arg for arg in p.info["cmdline"] or ()):
            left.append(p)
    assert not left, f"processes outlived the test: {left}"


def captive(
    client: str, *params: str, export: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the shell command ``client`` against a private nbdkit serving ``params``."""
    cmd = ["nbdkit", "-U", "-"]
    if export is not None:
        cmd += ["-e", export]
    cmd += ["--run", client, "python", PLUGIN, *params]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path | str, offset: int = 0, count: int | None = None) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return sha(f.read() if count is None else f.read(count))


@pytest.fixture
def vol(tmp_path: Path) -> Volume:
    v = Volume.create(str(tmp_path / "v1.img"), SIZE, name="v1")
    v.close()
    return v


@pytest.fixture
def random_raw(tmp_path: Path) -> Path:
    src = tmp_path / "src.raw"
    src.write_bytes(random.randbytes(SIZE))
    return src


# -- qemu ---------------------------------------------------------------------------------------


def test_qemu_img_info_sees_the_data_area_as_raw(vol: Volume) -> None:
    require_programs("qemu-img")
    for export in (None, "v1", f"v1@{vol.header.pvid_hex}"):
        client = 'qemu-img info -f raw --output=json "$uri"'
        info = json.loads(ok(captive(client, f"volume={vol.path}", export=export)))
        assert info["virtual-size"] == SIZE and info["format"] == "raw"


def test_qemu_img_is_refused_with_a_wrong_pvid(vol: Volume) -> None:
    require_programs("qemu-img")
    proc = captive(
        'qemu-img info -f raw "$uri"', f"volume={vol.path}", export="v1@00c5247772d2f36b"
    )
    assert proc.returncode != 0
    assert "expected PVID 00c5247772d2f36b" in proc.stderr
    assert f"the volume has PVID {vol.header.pvid_hex}" in proc.stderr


def test_qemu_img_convert_in_and_out(vol: Volume, random_raw: Path, tmp_path: Path) -> None:
    require_programs("qemu-img")
    head = file_sha(vol.path, 0, vol.header.data_offset)
    ok(captive(f'qemu-img convert -n -f raw -O raw {random_raw} "$uri"', f"volume={vol.path}"))
    out = tmp_path / "out.raw"
    ok(captive(f'qemu-img convert -f raw -O raw "$uri" {out}', f"volume={vol.path}"))
    assert file_sha(out) == file_sha(random_raw)
    assert file_sha(vol.path, vol.header.data_offset) == file_sha(random_raw)
    assert file_sha(vol.path, 0, vol.header.data_offset) == head


def test_qemu_io_patterns_at_both_ends(vol: Volume) -> None:
    require_programs("qemu-io")
    last = SIZE - 64 * 1024
    cmds = [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        f"write -P 0xcd {last} 64k",
        f"read -P 0xcd {last} 64k",
        "write -z 16k 16k",
        "read -P 0 16k 16k",
        "read -P 0xab 32k 32k",
        "discard 0 4k",
        "read -P 0 0 4k",
        "flush",
    ]
    script = "qemu-io -f raw " + " ".join(f"-c '{c}'" for c in cmds) + ' "$uri"'
    out = ok(captive(script, f"volume={vol.path}"))
    assert "Pattern verification failed" not in out
    assert out.count("read ") == 5
    data = Path(vol.path).read_bytes()[vol.header.data_offset :]
    assert data[:4096] == bytes(4096)
    assert data[4096 : 16 * 1024] == b"\xab" * (12 * 1024)
    assert data[16 * 1024 : 32 * 1024] == bytes(16 * 1024)
    assert data[last:] == b"\xcd" * 64 * 1024


def test_qemu_io_notices_a_wrong_pattern(vol: Volume) -> None:
    """The pattern checks above can fail: reading a pattern that is not there is caught."""
    require_programs("qemu-io")
    proc = captive("qemu-io -f raw -c 'read -P 0x55 0 4k' \"$uri\"", f"volume={vol.path}")
    assert "Pattern verification failed" in proc.stdout
    assert proc.returncode != 0


# -- libnbd's tools -----------------------------------------------------------------------------


def test_nbdcopy_in_and_out(vol: Volume, random_raw: Path, tmp_path: Path) -> None:
    require_programs("nbdcopy")
    head = file_sha(vol.path, 0, vol.header.data_offset)
    ok(captive(f'nbdcopy --flush {random_raw} "$uri"', f"volume={vol.path}"))
    out = tmp_path / "out.raw"
    ok(captive(f'nbdcopy "$uri" {out}', f"volume={vol.path}"))
    assert out.stat().st_size == SIZE
    assert file_sha(out) == file_sha(random_raw)
    assert file_sha(vol.path, 0, vol.header.data_offset) == head


def test_nbdcopy_of_a_sparse_export_keeps_it_sparse(vol: Volume, tmp_path: Path) -> None:
    """nbdcopy skips what base:allocation reports as holes; the copy still reads as zeros."""
    require_programs("nbdcopy")
    out = tmp_path / "out.raw"
    ok(captive(f'nbdcopy "$uri" {out}', f"volume={vol.path}"))
    assert out.read_bytes() == bytes(SIZE)
    assert out.stat().st_blocks * 512 < SIZE // 2


def nbdinfo(*params: str, list_all: bool = False) -> dict[str, Any]:
    """``nbdinfo --json`` against its own nbdkit (no -s: nbdinfo hands it a socket)."""
    require_programs("nbdinfo")
    server = ["[", "nbdkit", "--exit-with-parent", "python", PLUGIN, *params, "]"]
    argv = ["nbdinfo", "--json", *(["--list"] if list_all else []), "--", *server]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    result: dict[str, Any] = json.loads(ok(proc))
    return result


def test_nbdinfo_shows_size_flags_and_pvid(vol: Volume) -> None:
    (export,) = nbdinfo(f"volume={vol.path}")["exports"]
    assert export["export-name"] == "v1" and export["export-size"] == SIZE
    assert export["block_size_preferred"] == 4096
    assert export["can_multi_conn"] and export["can_fua"] and not export["is_read_only"]
    assert "base:allocation" in export["contexts"]
    described = parse_description(export["description"])
    assert described.pvid == vol.header.pvid_hex and described.size == SIZE


def test_nbdinfo_lists_a_directory(tmp_path: Path) -> None:
    vols = {}
    for i, name in enumerate(["x", "y", "z"]):
        v = Volume.create(str(tmp_path / f"{name}.img"), (i + 1) * MiB, name=name)
        v.close()
        vols[name] = v
    exports = {e["export-name"]: e for e in nbdinfo(f"dir={tmp_path}", list_all=True)["exports"]}
    assert sorted(exports) == ["x", "y", "z"]
    for name, e in exports.items():
        d = parse_description(e["description"])
        assert (d.name, d.pvid) == (name, vols[name].header.pvid_hex)
        assert e["export-size"] == vols[name].header.data_size
