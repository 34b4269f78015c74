"""The agent's zero-loss failover seen by an application's filesystem (issue 11, item 7 and
its lab test "the application's filesystem mounts and shows every file"; SPEC 4).

The scenario of test_agent_zero_loss_lab with ext4 on a real block device instead of stamps:
an async pair gf/p1 (a -> b) under resource r1, 1 MiB/s both ways (``--max-rate``).  Host a
first writes a raw ballast over the volume's last ``BALLAST`` bytes, then attaches its volume
(nbdfuse + losetup, ``pairvol host attach``), makes ext4 on the first ``FS_SIZE`` bytes,
writes files of known content, syncs, unmounts and detaches: the application's files are
durable on a, and none of them shipped yet (the journal ships in order, the ballast first).
The ballast also keeps b's pull busy while b mounts and reads: the reads fetch the files'
chunks on demand, so without it the pull could end under the test.

Only a's agent is killed; b's agent fails over through ``pair takeover`` (``SVOL-takeover``,
zero loss).  While the pull still runs b attaches its volume, finds the filesystem clean
(``e2fsck -n``), mounts it, reads every file back and writes new ones.  Then the pull ends,
the node swaps the pair back on its own (``pair.reverse``), ``pair verify`` passes and the
filesystem on b, now the pair's primary in PAIR, holds the old files and the new.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require
from labenv import CHUNK, lab_of, poll_until
from test_agent_lab import Agents
from test_agent_zero_loss_lab import agent_mark

from cluster import blockdev
from cluster.pvid_cache import Attachment, CacheFile
from pairvol import lab as labmod

pytestmark = [pytest.mark.privileged, pytest.mark.slow, pytest.mark.timeout(300)]

PID = "gf/p1"
GROUP = "gf"
RATE = "1M"
VOLUME_SIZE = 64 << 20
FS_SIZE = 40 << 20  # ext4 over the volume's first 40 MiB, a raw ballast over the rest
BALLAST = VOLUME_SIZE - FS_SIZE
BALLAST_SEED = 73
CMD_TIMEOUT = 60  # any one mkfs, fsck, mount, umount or sync


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    require(os.path.exists("/dev/fuse"), "needs /dev/fuse")
    require(os.path.exists("/dev/loop-control"), "needs loop devices (/dev/loop-control)")
    programs = ("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
    yield from lab_of(tmp_path_factory, "tfs", Agents, cluster=True, programs=programs)


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False)
    assert r.returncode == 0, f"{' '.join(argv)}: exit {r.returncode}: {r.stderr or r.stdout}"
    return r.stdout


class HostDevice:
    """One lab host's view of its volume as a block device: its own PVID cache, the
    project's attach (``pairvol host scan`` and ``host attach``: nbdfuse and a loop device,
    over the node's unix socket, so no traffic leaves the lab), and a mount point."""

    def __init__(self, env: Agents, host: str, volume: str, work: Path) -> None:
        self.env, self.host, self.volume = env, host, volume
        self.cache = str(work / f"host-{host}-cache.json")
        self.mnt = work / f"mnt-{host}"
        self.mnt.mkdir(exist_ok=True)
        self.device: str | None = None

    def host_cli(self, *argv: str) -> str:
        return self.env.pv(None, "host", "--cache", self.cache, *argv).stdout

    def attach(self) -> str:
        """Scan the volume afresh (its PVID may have changed since the last attach), then
        attach it; the device's path."""
        uri = f"nbd+unix:///{self.volume}?socket={self.env.host(self.host).dir}/nbd.sock"
        self.host_cli("scan", uri, "--as", "fs")
        doc = json.loads(self.host_cli("attach", "fs", "--json"))
        device = str(doc["device"])
        assert blockdev.is_block_device(device), doc
        self.device = device
        return device

    def mount(self) -> Path:
        assert self.device is not None
        sh("mount", "-t", "ext4", self.device, str(self.mnt))
        return self.mnt

    def umount(self) -> None:
        sh("umount", str(self.mnt))

    def detach(self) -> None:
        self.host_cli("detach", "fs")
        self.device = None

    def cleanup(self) -> None:
        """Whatever a failed test left behind: the mount, the loop device, the FUSE mount,
        nbdfuse; by what this host's cache recorded, never by a broad name."""
        if blockdev.is_mountpoint(str(self.mnt)):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False, timeout=CMD_TIMEOUT)
        att: Attachment | None = None
        with contextlib.suppress(Exception):  # no cache, or a broken one: nothing recorded
            att = CacheFile(self.cache).read().get("fs").attachment
        if att is None:
            return
        try:
            blockdev.detach(att)
        except Exception:
            for dev in blockdev.loop_devices_backed_by(
                att.backing_dev, att.backing_ino, att.backing_file
            ):
                subprocess.run(["losetup", "-d", dev], check=False, timeout=CMD_TIMEOUT)
            if att.mountpoint and blockdev.is_mountpoint(att.mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", att.mountpoint], check=False)
            if blockdev.helper_alive(att.helper_pid, att.helper_started) and att.helper_pid:
                os.kill(att.helper_pid, 9)


@pytest.fixture
def devices(env: Agents, tmp_path: Path) -> Iterator[dict[str, HostDevice]]:
    devs = {h: HostDevice(env, h, "v1", tmp_path) for h in ("a", "b")}
    try:
        yield devs
    finally:
        for d in devs.values():
            d.cleanup()


def write_files(mnt: Path, rng: random.Random, prefix: str, count: int) -> dict[str, str]:
    """``count`` files of random sizes (4 KiB to 1 MiB, some not a block multiple) in two
    directories; their SHA-256 by path relative to ``mnt``."""
    sums = {}
    for n in range(count):
        rel = f"{prefix}-{n % 2}/{prefix}-{n:02d}.bin"
        data = rng.randbytes(rng.randrange(4 << 10, 1 << 20) + rng.randrange(2) * 777)
        path = mnt / rel
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def files_of(mnt: Path) -> dict[str, str]:
    return {
        str(p.relative_to(mnt)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(mnt.rglob("*.bin"))
    }


def e2fsck_clean(device: str) -> None:
    """``e2fsck -f -n``: read-only, forced; exit 0 means no error found."""
    r = subprocess.run(
        ["e2fsck", "-f", "-n", device], capture_output=True, text=True, timeout=CMD_TIMEOUT
    )
    assert r.returncode == 0, f"e2fsck -n {device}: exit {r.returncode}\n{r.stdout}{r.stderr}"


def write_ballast(env: Agents, host: str) -> None:
    rng = random.Random(BALLAST_SEED)
    h = env.connect(host, "v1")
    try:
        for off in range(FS_SIZE, VOLUME_SIZE, 1 << 20):
            h.pwrite(rng.randbytes(1 << 20), off)
        h.flush()
    finally:
        h.shutdown()


def hydration(env: Agents, host: str) -> dict[str, Any] | None:
    (side,) = env.control(host, "pair.display", target=PID)["pairs"]
    h = side["hydration"]
    return None if h is None else dict(h)


def pending(env: Agents, host: str) -> dict[str, Any]:
    h = hydration(env, host)
    assert h is not None and h["pending_chunks"] > 0, f"hydration on {host} finished: {h}"
    return h


def test_the_filesystem_mounts_on_the_new_primary_while_the_pull_runs(
    env: Agents, devices: dict[str, HostDevice]
) -> None:
    seed = int(os.environ.get("PAIRVOL_TEST_SEED", "1"))
    rng = random.Random(seed)
    a, b = devices["a"], devices["b"]
    # As in test_agent_zero_loss_lab: created from b, swapped to a with the same limit, so
    # that both sides carry it (a's shipping builds the backlog, b's pull lasts seconds).
    for host in ("a", "b"):
        env.volume(host, "v1", size=VOLUME_SIZE)
    env.pv("b", "pair", "create", PID, "--primary", "b:v1", "--secondary", "a:v1",
           "--mode", "async", "--max-rate", RATE)  # fmt: skip
    env.wait("b", PID, "PAIR")
    env.pv("b", "pair", "split", GROUP)
    env.pv("a", "pair", "resync", GROUP, "--swap", "--max-rate", RATE)
    env.wait("a", PID, "PAIR")
    env.cluster("a", "resource", "create", "r1", "--group", GROUP, "--hosts", "a,b")
    env.wait_agent("a", "cluster.active", resource="r1")
    env.wait_agent("b", "cluster.standby", resource="r1")

    # The ballast first: 1 MiB/s ships it for over 20 s, and the journal ships in order,
    # so that all of the filesystem's writes, queued behind it, are still unsent at the kill.
    write_ballast(env, "a")
    # The application on a: ext4 (inode tables written now, not by a lazy thread after a
    # later mount), files, sync, a clean unmount.
    device = a.attach()
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
       device, f"{FS_SIZE >> 10}k")  # fmt: skip
    mnt = a.mount()
    (mnt / "hello.txt").write_text("written on a before its agent died\n")
    old = write_files(mnt, rng, "old", 14)
    file_bytes = sum(p.stat().st_size for p in mnt.rglob("*.bin"))
    sh("sync", "-f", str(mnt))
    a.umount()
    a.detach()
    (side,) = env.control("a", "pair.display", target=PID)["pairs"]
    # The filesystem's writes are the journal's newest entries: all unsent, if this holds.
    assert side["journal"]["backlog_bytes"] >= file_bytes + (1 << 20), (file_bytes, side)

    mark_b, node_b = agent_mark(env, "b"), env.mark("b")
    labmod.kill_host(env.name, "a", only="agent")  # a's node lives on, and answers
    active = env.wait_agent("b", "cluster.active", resource="r1", after=mark_b, timeout=60)
    assert active["takeover"] == {GROUP: "SVOL-takeover"}, active
    assert active["zero_loss"] is True, active
    report = active["takeover_report"][GROUP]
    assert report["zero_loss"] is True and report["fenced_old_primary"] is True, report
    at_takeover = pending(env, "b")
    # What b lacks is a's still: the files' chunks (the ballast's remainder besides).
    assert at_takeover["pending_chunks"] * CHUNK >= file_bytes, (file_bytes, at_takeover)

    # The application on b while the pull still runs: a clean filesystem, every file.
    device = b.attach()
    e2fsck_clean(device)
    mnt = b.mount()
    try:
        assert (mnt / "hello.txt").read_text() == "written on a before its agent died\n"
        assert files_of(mnt) == old
        during = pending(env, "b")
        assert during["fetched_on_demand"] > at_takeover["fetched_on_demand"], (
            at_takeover,
            during,
        )  # the reads met chunks not pulled yet, and fetched them from a
        new = write_files(mnt, rng, "new", 6)
        (mnt / "old-0" / "old-00.bin").unlink()  # a change to what a had, too
        del old["old-0/old-00.bin"]
        sh("sync", "-f", str(mnt))
        assert files_of(mnt) == old | new
    finally:
        b.umount()
    b.detach()
    pending(env, "b")  # the writes since the takeover went in while the pull ran
    env.forbid("b", "pair.pull.done", after=node_b)

    # The pull ends, the node swaps back on its own: b is the primary, in PAIR.
    pulled = env.wait_event("b", "pair.pull.done", after=node_b, pair=PID, timeout=90)
    poll_until(lambda: hydration(env, "b"), lambda x: x is None, what="b consistent")
    env.wait_event("b", "pair.reverse", after=node_b, target=GROUP, timeout=30)
    env.wait("b", PID, "PAIR", timeout=60)
    (side,) = env.control("b", "pair.display", target=PID)["pairs"]
    assert side["role"] == "primary", side
    # The swap back copied what b wrote since the takeover, not the whole image again.
    copied = env.wait_event("b", "pair.copy.done", after=node_b, pair=PID)
    assert 0 < copied["chunks"] < pulled["chunks"], (copied, pulled)
    r = env.pv("b", "pair", "verify", PID, "--json", ok=False)
    assert r.returncode == 0, r.stdout + r.stderr

    # And the filesystem, read again on the primary: the old files and the new, clean.
    device = b.attach()
    e2fsck_clean(device)
    mnt = b.mount()
    try:
        assert files_of(mnt) == old | new
    finally:
        b.umount()
    b.detach()
