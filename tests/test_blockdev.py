"""``host attach``/``detach`` make and unmake real block devices (root, FUSE, loop devices).

The scenario of SPEC section 1 end to end: a filesystem on an attached volume survives
detach/attach; after the volume's PVID changes the host gets an access error until it
refreshes its cache; a detach leaves no loop device, no FUSE mount and no nbdfuse behind,
even when nbdfuse died under us.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import require, require_programs, require_root
from test_host_cli import NbdServer

from cluster import blockdev
from cluster.probe import parse_uri
from cluster.pvid_cache import Attachment, CacheFile
from pairvol.cli import main
from replicator.errors import ExternalCommandFailed

pytestmark = pytest.mark.privileged


@dataclass
class Lab:
    root: Path
    server: NbdServer
    volume: Path
    cache: Path
    fs: Path

    def host(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        code = main(["host", "--cache", str(self.cache), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    def attach(self, capsys: pytest.CaptureFixture[str]) -> Attachment:
        code, out, err = self.host(capsys, "attach", "pv0", "--json")
        assert code == 0, err
        doc = json.loads(out)
        att = Attachment.from_json(doc["attachment"])
        assert doc["device"] == att.device and blockdev.is_block_device(att.device)
        return att

    def cached(self) -> Attachment | None:
        return CacheFile(str(self.cache)).read().get("pv0").attachment


def _force_cleanup(lab: Lab) -> None:
    """Teardown that works whatever state a failed test left behind."""
    if blockdev.is_mountpoint(str(lab.fs)):
        subprocess.run(["umount", "-l", str(lab.fs)], check=False)
    att = None
    with contextlib.suppress(Exception):  # a broken cache must not stop the cleanup
        att = lab.cached()
    if att is not None:
        try:
            blockdev.detach(att)
        except Exception:
            ours = (att.backing_dev, att.backing_ino, att.backing_file)
            for dev in blockdev.loop_devices_backed_by(*ours):
                subprocess.run(["losetup", "-d", dev], check=False)
            if att.mountpoint and blockdev.is_mountpoint(att.mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", att.mountpoint], check=False)
            if blockdev.helper_alive(att.helper_pid, att.helper_started):
                os.kill(att.helper_pid or 0, 9)
    for dev in _loops_under(lab.root):
        subprocess.run(["losetup", "-d", dev], check=False)
    for _, mp, fstype in blockdev.mounts():
        if mp.startswith(str(lab.root)) and fstype.startswith("fuse"):
            subprocess.run(["fusermount3", "-u", "-z", mp], check=False)
    for p in _nbdfuse_processes(lab.root):
        p.kill()


def _loops_under(root: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ln.split()[0] for ln in out.splitlines() if str(root) in ln]


def _nbdfuse_processes(root: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        if p.info["name"] != "nbdfuse" or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # a zombie is dead; reaping it is its parent's (PID 1's) business
        if any(str(root) in arg for arg in p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_root()
    require(os.path.exists("/dev/fuse"), "needs /dev/fuse")
    require(os.path.exists("/dev/loop-control"), "needs loop devices (/dev/loop-control)")
    require_programs(
        "nbdkit", "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount", "setsid"
    )
    server = NbdServer(tmp_path)
    volume = server.create("data", 64 << 20)
    server.start()
    fs = tmp_path / "fs"
    fs.mkdir()
    the_lab = Lab(tmp_path, server, volume, tmp_path / "host-cache.json", fs)
    try:
        yield the_lab
    finally:
        try:
            _force_cleanup(the_lab)
        finally:
            server.stop()
    assert_clean(the_lab)


def assert_clean(lab: Lab, att: Attachment | None = None) -> None:
    """No loop device, FUSE mount or nbdfuse process of ours is left (losetup, /proc/mounts,
    psutil), and the attachment's working directory is gone."""
    assert _loops_under(lab.root) == []
    with open("/proc/mounts", encoding="utf-8") as f:
        assert str(lab.root) not in f.read()
    assert _nbdfuse_processes(lab.root) == []
    if att is not None:
        assert not blockdev.helper_alive(att.helper_pid, att.helper_started)
        ours = (att.backing_dev, att.backing_ino, att.backing_file)
        assert blockdev.loop_devices_backed_by(*ours) == []
        if att.backing_file:
            r = subprocess.run(
                ["losetup", "-j", att.backing_file], capture_output=True, text=True, check=False
            )
            assert r.stdout == ""
        if att.state_dir:
            assert not os.path.exists(att.state_dir)


def write_files(fs: Path) -> dict[str, str]:
    rng = random.Random(1234)
    (fs / "dir").mkdir()
    files = {"a.bin": 1 << 20, "dir/b.txt": 5000, "c.bin": 3 * 4096 + 17}
    digests = {}
    for name, size in files.items():
        data = rng.randbytes(size)
        (fs / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def read_files(fs: Path, names: list[str]) -> dict[str, str]:
    return {n: hashlib.sha256((fs / n).read_bytes()).hexdigest() for n in names}


def mount(device: str, fs: Path) -> None:
    subprocess.run(["mount", "-t", "ext4", device, str(fs)], check=True)


def umount(fs: Path) -> None:
    subprocess.run(["umount", str(fs)], check=True)


def test_filesystem_survives_reattach_and_pvid_change_needs_refresh(
    lab: Lab, capsys: pytest.CaptureFixture[str], pairvol_bin: str
) -> None:
    code, out, err = lab.host(capsys, "scan", lab.server.uri("data"), "--json")
    assert code == 0, err
    old_pvid = json.loads(out)["scanned"][0]["pvid"]

    # First attach through the console script: the device must outlive the command.
    r = subprocess.run(
        [pairvol_bin, "host", "--cache", str(lab.cache), "attach", "pv0"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    device = r.stdout.strip()
    att = lab.cached()
    assert att is not None and att.device == device and blockdev.is_block_device(device)
    assert att.uri.endswith(f"/data@{old_pvid}?socket={lab.server.sock}")  # server checks too
    if att.method == "nbdfuse-loop":
        assert blockdev.loop_backing_file(device) == att.backing_file
        assert blockdev.helper_alive(att.helper_pid, att.helper_started)

    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
    mount(device, lab.fs)
    digests = write_files(lab.fs)
    # Detaching a mounted device is refused and changes nothing.
    before = lab.cache.read_bytes()
    code, _, err = lab.host(capsys, "detach", "pv0")
    assert code == 5 and f"{device} is mounted on {lab.fs}" in err
    assert lab.cache.read_bytes() == before
    umount(lab.fs)

    code, out, err = lab.host(capsys, "detach", "pv0", "--json")
    assert code == 0, err
    assert json.loads(out)["device"] == device and lab.cached() is None
    assert_clean(lab, att)

    att = lab.attach(capsys)
    mount(att.device, lab.fs)
    assert read_files(lab.fs, list(digests)) == digests
    umount(lab.fs)
    assert lab.host(capsys, "detach", "pv0")[0] == 0
    assert_clean(lab, att)

    # The volume's identity changes behind the host's back.
    code, out, _ = lab.host(capsys, "list", "--json")
    assert json.loads(out)["entries"][0]["pvid"] == old_pvid
    assert main(["volume", "set-pvid", str(lab.volume), "--new", "--json"]) == 0
    new_pvid = json.loads(capsys.readouterr().out)["pvid"]
    before = lab.cache.read_bytes()
    code, out, err = lab.host(capsys, "attach", "pv0")
    assert code == 7 and out == ""
    assert f"expected PVID {old_pvid}" in err and f"the volume has PVID {new_pvid}" in err
    assert lab.cache.read_bytes() == before
    assert_clean(lab)  # a refused attach sets nothing up

    code, out, _ = lab.host(capsys, "refresh", "pv0")
    assert code == 0 and out.strip() == f"pv0: PVID {old_pvid} -> {new_pvid}"
    att = lab.attach(capsys)
    assert f"@{new_pvid}?" in att.uri
    mount(att.device, lab.fs)
    assert read_files(lab.fs, list(digests)) == digests  # same data, new identity
    umount(lab.fs)
    code, _, err = lab.host(capsys, "detach", "pv0")
    assert code == 0, err
    assert_clean(lab, att)


def test_detach_is_clean_when_the_helper_died(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert lab.host(capsys, "scan", lab.server.uri("data"))[0] == 0
    att = lab.attach(capsys)
    if att.method != "nbdfuse-loop":
        pytest.skip("the kernel NBD driver is present: no nbdfuse helper to kill")
    assert att.helper_pid is not None
    helper = psutil.Process(att.helper_pid)
    helper.kill()
    # Not our child (it was orphaned on purpose), so wait through psutil, bounded.
    psutil.wait_procs([helper], timeout=30)
    assert not blockdev.helper_alive(att.helper_pid, att.helper_started)

    code, out, _ = lab.host(capsys, "list", "--json")
    status = json.loads(out)["entries"][0]["attachment"]["status"]
    assert status["helper_alive"] is False and status["device_ours"] is True

    code, out, err = lab.host(capsys, "detach", "pv0", "--json")
    assert code == 0, err
    steps = json.loads(out)["steps"]
    assert steps[0] == f"losetup -d {att.device}" and not any("SIG" in s for s in steps)
    assert lab.cached() is None
    assert_clean(lab, att)

    # And the volume attaches again afterwards.
    att = lab.attach(capsys)
    assert lab.host(capsys, "detach", "pv0")[0] == 0
    assert_clean(lab, att)


def test_a_second_attach_is_refused(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert lab.host(capsys, "scan", lab.server.uri("data"))[0] == 0
    att = lab.attach(capsys)
    before = lab.cache.read_bytes()
    code, _, err = lab.host(capsys, "attach", "pv0")
    assert code == 5 and f"already attached as {att.device}" in err
    code, _, err = lab.host(capsys, "forget", "pv0")
    assert code == 5 and "detach it first" in err
    assert lab.cache.read_bytes() == before
    assert lab.host(capsys, "detach", "pv0")[0] == 0
    assert lab.host(capsys, "forget", "pv0")[0] == 0
    assert_clean(lab, att)


def test_the_server_refuses_a_stale_pvid_even_if_the_host_check_is_skipped(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defence in depth: attach connects as NAME@PVID, so nbdkit itself refuses."""
    stale = "0123456789abcdef"
    uri = parse_uri(lab.server.uri(f"data@{stale}"))
    state_dir = lab.root / "direct"
    with pytest.raises(ExternalCommandFailed, match=r"nbdfuse .* exited"):
        blockdev.attach(uri, state_dir=str(state_dir), now_ns=0, method="nbdfuse-loop", timeout=60)
    assert not state_dir.exists()  # everything half-made was undone
    assert_clean(lab)
