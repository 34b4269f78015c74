"""``pairvol demo``: the main job on an embedded default, showing each command as it runs.

A two-host lab on this machine (network namespaces ``demoN-a`` and ``demoN-b``, a storage
node on each).  A volume on host a is paired in sync mode with one on host b; host a puts
ext4 on it through a real block device.  Then the things a TrueCopy or DRBD admin does:

1. split: the secondary gets a new PVID and host b mounts the copy as of the split;
2. resync: only the chunks changed since are copied (``last_copy_bytes``);
3. host a dies (every process SIGKILLed); takeover on b keeps the application's PVID, so
   host b's cached PVID from step 1 is refused (access error) until ``host refresh``;
4. host a comes back; ``resync --swap`` makes it the new secondary, copying what differs.

``pair display`` is shown along the way.  Everything lives in a work directory that is
removed afterwards (``--keep`` or ``--workdir`` keep it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from replicator.errors import ExternalCommandFailed, NotFound, PvidMismatch

SIZE = "256M"
GROUP = "demo"
PAIR = f"{GROUP}/data"


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the built-in two-host demonstration (needs root)")
    p.add_argument("--workdir", help="directory for the lab and state (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the lab and work directory")
    p.set_defaults(func=cmd_demo)


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _pairvol(*argv: str, expect: int = 0, node: str | None = None, quiet: bool = False) -> str:
    """Run a pairvol command in-process, echo it like a shell transcript, return stdout.
    ``node``: the node directory the command talks to (as ``lab exec`` would set it);
    ``quiet``: do not echo its standard output (the caller prints what matters)."""
    from pairvol.cli import main  # here, not at import time: pairvol.cli imports this module

    prefix = f"[{os.path.basename(node)}] " if node else ""
    print(f"{prefix}$ pairvol " + shlex.join(argv), flush=True)
    out, err = io.StringIO(), io.StringIO()
    old = os.environ.get("PAIRVOL_NODE_DIR")
    if node:
        os.environ["PAIRVOL_NODE_DIR"] = node
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        if old is None:
            os.environ.pop("PAIRVOL_NODE_DIR", None)
        else:
            os.environ["PAIRVOL_NODE_DIR"] = old
    for stream in (err,) if quiet else (out, err):
        if stream.getvalue():
            print(stream.getvalue().rstrip())
    if code != expect:
        raise ExternalCommandFailed(f"pairvol {argv[0]} {argv[1]} exited {code}, expected {expect}")
    return out.getvalue()


def _sh(*argv: str) -> str:
    print("$ " + shlex.join(argv), flush=True)
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise ExternalCommandFailed(f"{argv[0]} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


@contextlib.contextmanager
def _mounted(device: str, where: Path) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    _sh("mount", device, str(where))
    try:
        yield where
    finally:
        _sh("umount", str(where))


class _Host:
    """One lab host as the demo uses it: its node directory and its own PVID cache."""

    def __init__(self, name: str, node_dir: str, work: Path) -> None:
        self.name = name
        self.dir = node_dir
        self.cache = str(work / f"host-{name}-cache.json")
        self.attached: str | None = None

    def uri(self, volume: str) -> str:
        return f"nbd+unix:///{volume}?socket={self.dir}/nbd.sock"

    def host(self, *argv: str, expect: int = 0) -> str:
        return _pairvol("host", "--cache", self.cache, *argv, expect=expect, node=self.dir)

    def attach(self, dev: str) -> str:
        device = self.host("attach", dev).strip()
        self.attached = dev
        return device

    def detach(self) -> None:
        if self.attached:
            dev, self.attached = self.attached, None
            self.host("detach", dev)


def _files(mnt: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        for p in sorted(mnt.iterdir())
        if p.is_file()
    }


def _last_line(path: str, containing: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line.rstrip() for line in f if containing in line]
    return lines[-1] if lines else f"(nothing about {containing!r} in {path})"


def _display() -> None:
    _pairvol("pair", "display", PAIR)


def cmd_demo(args: argparse.Namespace) -> int:
    from pairvol import lab

    if os.geteuid() != 0:
        raise ExternalCommandFailed("the demo needs root (namespaces, loop devices, FUSE, mount)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pairvol-demo-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PAIRVOL_LAB_ROOT"] = str(work / "labs")
    name = f"demo{os.getpid() % 10000}"
    os.environ["PAIRVOL_LAB"] = name
    hosts: list[_Host] = []
    try:
        _say("a two-host lab: a namespace, an address and a storage node per host")
        _pairvol("lab", "up", name, "--hosts", "a,b")
        layout = lab.load(name)
        a = _Host("a", layout.host("a").dir, work)
        b = _Host("b", layout.host("b").dir, work)
        hosts = [a, b]

        _say("a volume on each host (image files with PVID headers)")
        for h in hosts:
            path = os.path.join(h.dir, "data")
            info = json.loads(
                _pairvol("volume", "create", path, "--size", SIZE, "--json", quiet=True)
            )
            print(f"{h.name}:{path}: PVID {info['pvid']}, {SIZE}")

        _say("pair them: sync replication a -> b; the initial copy skips unallocated space")
        _pairvol("pair", "create", PAIR, "--primary", "a:data", "--secondary", "b:data",
                 "--mode", "sync", "--fence", "never", node=a.dir)  # fmt: skip
        _pairvol("pair", "wait", PAIR, "--state", "PAIR", "--timeout", "60", node=a.dir)
        _display()

        _say("host a attaches the primary as a block device and writes a filesystem")
        a.host("scan", a.uri("data"), "--as", "hdisk0")
        device = a.attach("hdisk0")
        _sh("mkfs.ext4", "-q", "-F", device)
        with _mounted(device, work / "mnt-a") as mnt:
            (mnt / "hello.txt").write_text("written on host a, mirrored to host b\n")
            (mnt / "random.bin").write_bytes(os.urandom(3 << 20))
            _sh("sync")
            before = _files(mnt)
        a.detach()
        print(f"files on a: {before}")

        _say("the secondary is hidden while paired: host b cannot even open it")
        b.host("scan", b.uri("data"), "--as", "hdisk1", expect=NotFound.exit_code)
        print("(NBD can only say 'no such export'; host b's node log says why:)")
        print(_last_line(os.path.join(b.dir, "node.log"), "hidden secondary"))

        _say("split: the secondary gets a new PVID and becomes usable on host b")
        _pairvol("pair", "split", GROUP, node=a.dir)
        _display()
        b.host("scan", b.uri("data"), "--as", "hdisk1")
        with _mounted(b.attach("hdisk1"), work / "mnt-b") as mnt:
            seen = _files(mnt)
        b.detach()
        print(f"files on b: {seen}; same as a at the split: {seen == before}")
        if seen != before:
            raise ExternalCommandFailed("the split secondary differs from the primary")

        _say("host a writes more; resync copies only the chunks that changed since the split")
        with _mounted(a.attach("hdisk0"), work / "mnt-a") as mnt:
            (mnt / "after-split.txt").write_text("written on a after the split\n")
            _sh("sync")
            before = _files(mnt)
        a.detach()
        _pairvol("pair", "resync", GROUP, node=a.dir)
        _pairvol("pair", "wait", PAIR, "--state", "PAIR", "--timeout", "60", node=a.dir)
        shown = json.loads(_pairvol("pair", "display", PAIR, "--json", quiet=True))["pairs"][0]
        print(f"resync sent {shown['last_copy_bytes']} bytes of a {SIZE} volume")

        _say("host a dies: every process on it is SIGKILLed")
        _pairvol("lab", "kill", name, "a")

        _say("takeover on host b: the secondary becomes usable under the application's PVID")
        _pairvol("pair", "takeover", PAIR, node=b.dir)
        print("host b's cached PVID (from the split) is stale now, so attach is refused:")
        b.host("attach", "hdisk1", expect=PvidMismatch.exit_code)
        b.host("refresh", "hdisk1")
        with _mounted(b.attach("hdisk1"), work / "mnt-b") as mnt:
            seen = _files(mnt)
            (mnt / "on-b.txt").write_text("written on b after the takeover\n")
            _sh("sync")
        b.detach()
        print(f"files on b: {seen}; every file from a present: {seen == before}")
        if seen != before:
            raise ExternalCommandFailed("the taken-over secondary lacks data written on a")

        _say("host a returns; resync --swap makes it the new secondary (only differences)")
        _pairvol("lab", "start", name, "a")
        _pairvol("pair", "resync", "--swap", PAIR, node=b.dir)
        _pairvol("pair", "wait", PAIR, "--state", "PAIR", "--timeout", "60", node=b.dir)
        _display()
        print("demo finished successfully")
    finally:
        for h in hosts:
            with contextlib.suppress(Exception):
                h.detach()
        if not args.keep:
            with contextlib.suppress(Exception):
                _pairvol("lab", "down", name)
            if not args.workdir:
                subprocess.run(["rm", "-rf", str(work)], check=False)
        else:
            print(f"lab {name} and work directory kept: {work}")
    return 0
