"""``pairvol demo``: the main job on an embedded default, showing each command as it runs.

A two-host lab on this machine (network namespaces ``demoN-a`` and ``demoN-b``, a storage
node on each).  A volume on host a is paired in sync mode with one on host b; host a puts
ext4 on it through a real block device.  Then the things a TrueCopy or DRBD admin does:

1. split: the secondary gets a new PVID and host b mounts the copy as of the split;
2. resync: only the chunks changed since are copied (``last_copy_bytes``);
3. host a dies (every process SIGKILLed); takeover on b keeps the application's PVID, so
   host b's cached PVID from step 1 is refused (access error) until ``host refresh``;
4. host a comes back; ``resync --swap`` makes it the new secondary, copying what differs;
5. a cluster lab (etcd, an agent per host) with two resources: ``cluster split`` and
   ``cluster resync`` keep host b's PVID cache true, a plain ``pair split`` does not; host a
   is killed, b fails over on its own (the time it took is shown), and the resource whose
   cache went stale fails its attach with the access error.

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
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from replicator.errors import ExternalCommandFailed, NotFound, PvidMismatch
from replicator.events import read_events, wait_event

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
        _pairvol("lab", "down", name)
        _cluster_part(f"{name}c", work)
        print("demo finished successfully")
    finally:
        for h in hosts:
            with contextlib.suppress(Exception):
                h.detach()
        if not args.keep:
            for lab_name in (name, f"{name}c"):
                if lab_name in lab.names():
                    with contextlib.suppress(Exception):
                        _pairvol("lab", "down", lab_name)
            if not args.workdir:
                subprocess.run(["rm", "-rf", str(work)], check=False)
        else:
            print(f"lab {name} and work directory kept: {work}")
    return 0


def _agent_event(lab_name: str, host: str, event: str, after: int, **match: Any) -> dict[str, Any]:
    from pairvol import lab

    path = os.path.join(lab.agent_dir(lab.load(lab_name).host(host)), "events.jsonl")
    return wait_event(path, event, lambda e: all(e.get(k) == v for k, v in match.items()),
                      timeout=60, after=after)  # fmt: skip


def _agent_mark(lab_name: str, host: str) -> int:
    from pairvol import lab

    return len(read_events(os.path.join(lab.agent_dir(lab.load(lab_name).host(host)),
                                        "events.jsonl")))  # fmt: skip


def _on(lab_name: str, host: str, *argv: str) -> str:
    """``pairvol ARGV`` run on a lab host (its namespace: the cluster's etcd is reachable only
    from there), echoed like a shell transcript; its stdout."""
    print(f"[{host}] $ pairvol " + shlex.join(argv), flush=True)
    exe = os.path.join(os.path.dirname(sys.executable), "pairvol")
    cmd = [exe if os.path.exists(exe) else "pairvol", "lab", "exec", lab_name, host, "--",
           "pairvol", *argv]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for text in (r.stdout, r.stderr):
        if text.strip():
            print(text.rstrip())
    if r.returncode != 0:
        raise ExternalCommandFailed(f"pairvol {' '.join(argv[:2])} on {host} exited {r.returncode}")
    return r.stdout


def _cluster_part(name: str, work: Path) -> None:
    """The cluster agent: automatic failover of two resources on a killed host, and SPEC 3's
    refresh protocol (cluster split/resync) next to its negative control (plain pair
    split/resync), whose stale cached PVID makes the new active's attach fail."""
    from pairvol import lab

    _say("a cluster lab: etcd, and an agent on each host (leases, heartbeats, fencing)")
    _pairvol("lab", "up", name, "--hosts", "a,b", "--cluster")
    layout = lab.load(name)
    a, b = (_Host(h, layout.host(h).dir, work) for h in ("a", "b"))
    os.environ["PAIRVOL_LAB"] = name
    for n in (1, 2):
        for h in (a, b):
            _pairvol("volume", "create", os.path.join(h.dir, f"v{n}"), "--size", "64M",
                     quiet=True)  # fmt: skip
        _pairvol("pair", "create", f"g{n}/p{n}", "--primary", f"a:v{n}", "--secondary",
                 f"b:v{n}", "--fence", "data", node=a.dir)  # fmt: skip
    for n in (1, 2):
        _pairvol("pair", "wait", f"g{n}/p{n}", "--state", "PAIR", "--timeout", "60", node=a.dir)

    _say("two resources, each owning a pair group and a PVID-cache device on each host")
    marks = {h: _agent_mark(name, h) for h in ("a", "b")}
    for n in (1, 2):
        _on(name, "a", "cluster", "resource", "create", f"r{n}", "--group", f"g{n}", "--hosts",
            "a,b", "--device", f"a:pv{n}={a.uri(f'v{n}')}", "--device",
            f"b:pv{n}={b.uri(f'v{n}')}")  # fmt: skip
    for n in (1, 2):
        _agent_event(name, "a", "cluster.active", marks["a"], resource=f"r{n}")
    _on(name, "b", "cluster", "status")

    _say("cluster split: host b's agent reads each S-VOL's new PVID into its cache")
    for n in (1, 2):
        _on(name, "a", "cluster", "split", f"r{n}")
    _say("the negative control: plain pair resync and split of g1 (nobody tells host b)")
    _pairvol("pair", "resync", "g1", node=a.dir)
    _pairvol("pair", "wait", "g1/p1", "--state", "PAIR", "--timeout", "60", node=a.dir)
    _pairvol("pair", "split", "g1", node=a.dir)
    _say("the protocol: cluster resync and split of g2 (host b erases, then reads again)")
    _on(name, "a", "cluster", "resync", "g2")
    _pairvol("pair", "wait", "g2/p2", "--state", "PAIR", "--timeout", "60", node=a.dir)
    _on(name, "a", "cluster", "split", "g2")

    _say("host a dies (SIGKILL of everything on it); host b's agent fails over on its own")
    mark = _agent_mark(name, "b")
    killed = time.time()
    _pairvol("lab", "kill", name, "a")
    active = _agent_event(name, "b", "cluster.active", mark, resource="r2")
    print(f"r2 active on b {active['ts'] - killed:.2f}s after the kill, takeover "
          f"{active['takeover']}, its device attached (PVID-checked)")  # fmt: skip
    failed = _agent_event(name, "b", "cluster.takeover.failed", mark, resource="r1")
    print(f"r1 on b (the negative control): {failed['detail']}")
    _on(name, "b", "cluster", "status")
    _pairvol("lab", "down", name)
