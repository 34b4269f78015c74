"""Shared helpers for the lab tests: a two-host lab, CLI calls, NBD clients, image digests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import VENV_BIN, require_programs, require_root

from pairvol import lab as labmod
from replicator import control
from replicator.events import read_events, wait_event
from replicator.volume import Volume

nbd = pytest.importorskip("nbd")

CHUNK = 64 * 1024
SIZE = 32 << 20

T = TypeVar("T")


def poll_until(
    probe: Callable[[], T], done: Callable[[T], bool], *, what: str, timeout: float = 30
) -> T:
    """``probe()`` until ``done`` holds of its value (which is returned), for at most
    ``timeout`` seconds.  For a state that no event announces: wait on the event log first."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s (last: {value!r})"
        time.sleep(0.05)  # the poll's period, inside the deadline: never a wait for the state


class LabEnv:
    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.lab = labmod.load(name)

    def host(self, name: str) -> labmod.LabHost:
        return self.lab.host(name)

    def env(self, host: str | None) -> dict[str, str]:
        env = dict(os.environ, PAIRVOL_LAB_ROOT=str(self.root), PAIRVOL_LAB=self.name)
        env.pop("PAIRVOL_NODE_DIR", None)
        if host is not None:
            env["PAIRVOL_NODE_DIR"] = self.host(host).dir
        return env

    def pv(self, host: str | None, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [str(VENV_BIN / "pairvol"), *args],
            env=self.env(host),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if ok:
            assert r.returncode == 0, f"pairvol {' '.join(args)}: {r.stderr}"
        return r

    def volume(self, host: str, name: str, size: int = SIZE) -> str:
        path = os.path.join(self.host(host).dir, name)
        self.pv(None, "volume", "create", path, "--size", str(size), "--name", name)
        return path

    def connect(self, host: str, volume: str) -> Any:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///{volume}?socket={self.host(host).dir}/nbd.sock")
        return h

    def write(self, host: str, volume: str, offset: int, data: bytes) -> None:
        h = self.connect(host, volume)
        try:
            h.pwrite(data, offset)
            h.flush()
        finally:
            h.shutdown()

    def side(self, host: str, target: str) -> dict[str, Any]:
        out = self.pv(host, "pair", "display", target, "--json").stdout
        rows = json.loads(out)["pairs"]
        assert len(rows) == 1
        row: dict[str, Any] = rows[0]
        return row

    def wait(self, host: str, target: str, state: str, timeout: float = 30) -> None:
        self.pv(host, "pair", "wait", target, "--state", state, "--timeout", str(timeout))

    def wait_side(
        self,
        host: str,
        target: str,
        done: Callable[[dict[str, Any]], bool],
        *,
        what: str,
        timeout: float = 30,
    ) -> dict[str, Any]:
        """Poll ``host``'s own side of pair ``target`` (``pair.display`` on its control socket:
        no CLI start-up between two looks) until ``done`` holds of it, for what no event
        announces, such as copy progress."""

        def probe() -> dict[str, Any]:
            (side,) = self.control(host, "pair.display", target=target)["pairs"]
            return dict(side)

        return poll_until(probe, done, what=f"{target} on {host}: {what}", timeout=timeout)

    def events_path(self, host: str) -> str:
        return os.path.join(self.host(host).dir, "events.jsonl")

    def mark(self, host: str) -> int:
        """How many events ``host`` has logged so far (wait_event(after=...) starts there)."""
        return len(read_events(self.events_path(host)))

    def wait_event(
        self, host: str, event: str, *, after: int = 0, timeout: float = 30, **fields: Any
    ) -> dict[str, Any]:
        """The first ``event`` logged by ``host`` (after ``after`` lines) with ``fields``."""
        return wait_event(
            self.events_path(host),
            event,
            lambda e: all(e.get(k) == v for k, v in fields.items()),
            after=after,
            timeout=timeout,
        )

    def forbid(self, host: str, event: str, *, after: int = 0, **fields: Any) -> None:
        """No ``event`` with ``fields`` was logged by ``host`` after ``after`` lines."""
        seen = [
            e
            for e in read_events(self.events_path(host))[after:]
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]
        assert not seen, f"forbidden {event} on {host}: {seen[0]}"

    # -- the scenario's verbs, as drbd9-tests write them ---------------------------------------

    def cut(self, a: str, b: str) -> None:
        labmod.cut(self.name, a, b)

    def heal(self, a: str, b: str) -> None:
        labmod.heal(self.name, a, b)

    def kill(self, host: str) -> None:
        labmod.kill_host(self.name, host)

    def start(self, host: str) -> None:
        labmod.start_node(self.name, host)

    @contextlib.contextmanager
    def forbidden(self, host: str, event: str, **fields: Any) -> Iterator[None]:
        """Fail if ``host`` logs ``event`` with ``fields`` while the block runs (for example
        an unexpected ``pair.state`` PSUE)."""
        after = self.mark(host)
        yield
        self.forbid(host, event, after=after, **fields)

    def control(self, host: str, op: str, **args: Any) -> Any:
        return control.call(os.path.join(self.host(host).dir, "control.sock"), op, args)


def digest(path: str) -> str:
    """SHA-256 of a volume's data area, read from the image file."""
    with Volume.open(path) as v:
        base, size = v.header.data_offset, v.header.data_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(base)
        left = size
        while left:
            block = f.read(min(left, 1 << 20))
            assert block, "image shorter than its header says"
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def pvid(path: str) -> str:
    with Volume.open(path) as v:
        return v.header.pvid_hex


E = TypeVar("E", bound="LabEnv")


def lab_of(
    tmp_path_factory: pytest.TempPathFactory,
    prefix: str,
    make: Callable[[str, Path], E],
    *,
    hosts: tuple[str, ...] = ("a", "b"),
    cluster: bool = False,
    etcd_members: int = 1,
    programs: tuple[str, ...] = (),
) -> Iterator[E]:
    """A module's lab of ``hosts`` (with ``cluster``: etcd and an agent on each host), as
    ``make(name, root)`` sees it, removed afterwards (use from a module fixture; ``prefix``
    tells the modules' labs apart)."""
    require_root()
    require_programs("ip", "nbdkit", *(["etcd"] if cluster else []), *programs)
    root = tmp_path_factory.mktemp("labs")
    name = f"{prefix}{os.getpid() % 100000}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAIRVOL_LAB_ROOT", str(root))
        mp.delenv("PAIRVOL_LAB", raising=False)
        try:
            labmod.up(name, list(hosts), cluster=cluster, etcd_members=etcd_members)
            yield make(name, root)
        finally:
            labmod.down(name)


def lab_env(tmp_path_factory: pytest.TempPathFactory, prefix: str) -> Iterator[LabEnv]:
    """A module's lab: hosts a and b, removed afterwards (use from a module fixture)."""
    yield from lab_of(tmp_path_factory, prefix, LabEnv)


def fill(env: LabEnv, host: str, volume: str, size: int, seed: int) -> None:
    """Allocated, recognisable data over the first ``size`` bytes."""
    rng = random.Random(seed)
    h = env.connect(host, volume)
    try:
        for off in range(0, size, 1 << 20):
            h.pwrite(rng.randbytes(1 << 20), off)
        h.flush()
    finally:
        h.shutdown()
