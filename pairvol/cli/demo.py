"""``pairvol demo``: the main job on an embedded default, showing each command as it runs.

One volume is created and served by nbdkit with the pairvol plugin; the host scans it into
its PVID cache and attaches it as a real block device; ext4 goes on it, files are written,
the device is detached and attached again and the files are read back.  Then the volume's
PVID changes behind the host's back (as a split will do), and the host's attach is refused
with an access error naming both PVIDs until ``host refresh`` re-reads the identity.
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

from replicator.errors import ExternalCommandFailed, PvidMismatch
from replicator.server import NbdkitServer

SIZE = "256M"


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the built-in demonstration (needs root)")
    p.add_argument("--workdir", help="directory for volumes and state (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    p.set_defaults(func=cmd_demo)


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _pairvol(*argv: str, expect: int = 0) -> str:
    """Run a pairvol command in-process, echo it like a shell transcript, return stdout."""
    from pairvol.cli import main  # here, not at import time: pairvol.cli imports this module

    print("$ pairvol " + shlex.join(argv), flush=True)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    for stream in (out, err):
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


def cmd_demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise ExternalCommandFailed("the demo needs root (loop devices, FUSE, mount)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pairvol-demo-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    vols, cache = work / "volumes", str(work / "host-cache.json")
    vols.mkdir(exist_ok=True)
    host = ("host", "--cache", cache)
    server = NbdkitServer(("dir=" + str(vols),), work / "nbd.sock", log=work / "nbdkit.log")
    attached = False
    try:
        _say("create a volume: an image file with a PVID header")
        _pairvol("volume", "create", str(vols / "data.img"), "--size", SIZE, "--name", "data")

        _say("serve the volume directory with nbdkit and the pairvol plugin")
        print(
            "$ "
            + shlex.join(["nbdkit", "--unix", str(server.socket), "python", "...", *server.params])
        )
        server.start()
        uri = server.uri("data")

        _say("the host reads the PVID straight from the volume into its PVID cache")
        _pairvol(*host, "scan", uri, "--as", "hdisk0")

        _say("attach as a real block device, make ext4, write files")
        device = _pairvol(*host, "attach", "hdisk0").strip()
        attached = True
        _sh("mkfs.ext4", "-q", "-F", device)
        payload = os.urandom(3 << 20)
        with _mounted(device, work / "mnt") as mnt:
            (mnt / "hello.txt").write_text("written through pairvol\n")
            (mnt / "random.bin").write_bytes(payload)
            _sh("sync")
        _pairvol(*host, "detach", "hdisk0")
        attached = False

        _say("attach again and read the files back")
        device = _pairvol(*host, "attach", "hdisk0").strip()
        attached = True
        with _mounted(device, work / "mnt") as mnt:
            text = (mnt / "hello.txt").read_text()
            same = hashlib.sha256((mnt / "random.bin").read_bytes()).digest() == (
                hashlib.sha256(payload).digest()
            )
            print(f"hello.txt: {text.strip()!r}; random.bin intact: {same}")
            if not same or text != "written through pairvol\n":
                raise ExternalCommandFailed("the files read back differ from what was written")
        _pairvol(*host, "detach", "hdisk0")
        attached = False

        _say("the volume's PVID changes behind the host's back (as a split will do)")
        _pairvol("volume", "set-pvid", str(vols / "data.img"), "--new")

        _say("the host's cached PVID is now stale: attach is an access error")
        _pairvol(*host, "attach", "hdisk0", expect=PvidMismatch.exit_code)

        _say("refresh re-reads the identity from the volume; attach works again")
        _pairvol(*host, "refresh", "hdisk0")
        device = _pairvol(*host, "attach", "hdisk0").strip()
        attached = True
        with _mounted(device, work / "mnt") as mnt:
            print(f"hello.txt: {(mnt / 'hello.txt').read_text().strip()!r}")
        _pairvol(*host, "detach", "hdisk0")
        attached = False

        _say("the host cache")
        listing = json.loads(_pairvol(*host, "list", "--json"))
        print(f"{len(listing['entries'])} device(s) cached; demo finished successfully")
    finally:
        if attached:
            with contextlib.suppress(Exception):
                _pairvol(*host, "detach", "hdisk0")
        server.stop()
        server.socket.unlink(missing_ok=True)
        if not args.keep and not args.workdir:
            subprocess.run(["rm", "-rf", str(work)], check=False)
        else:
            print(f"work directory kept: {work}")
    return 0
