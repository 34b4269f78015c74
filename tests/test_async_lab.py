"""Async pairs with journals between real nodes in a two-host lab.

The central property: the secondary of an async consistency group is always a write-order-
consistent prefix of the primary, across all the group's volumes together.  The writers here
stamp every write with a global counter and issue one write at a time, so "a prefix" has an
exact meaning: the secondary holds the result of writes 1..k for some k, nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labenv import CHUNK, LabEnv, digest, fill, lab_env, nbd, poll_until

from pairvol import lab as labmod
from replicator.volume import Volume

pytestmark = pytest.mark.timeout(300)

BLOCK = 4096
NBLOCKS = 256  # blocks per volume the stamping writer uses
VSIZE = 16 << 20


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    yield from lab_env(tmp_path_factory, "ta")


def stamp(n: int) -> bytes:
    return n.to_bytes(8, "little") * (BLOCK // 8)


class StampWriter(threading.Thread):
    """Writes stamps 1, 2, 3, ... one at a time, each to a random block of a random volume."""

    def __init__(self, env: LabEnv, host: str, volumes: list[str], seed: int) -> None:
        super().__init__(daemon=True)
        self.env, self.host, self.volumes = env, host, volumes
        self.rng = random.Random(seed)
        self.log: list[tuple[str, int]] = []  # index n-1: (volume, block) of stamp n
        self.acked = 0
        self.stop = threading.Event()
        self.error: Exception | None = None
        self.progress = threading.Condition()  # notified at each acknowledged write
        self.ended = False

    def run(self) -> None:
        try:
            self._write()
        finally:
            self._end()

    def _write(self) -> None:
        handles = {v: self.env.connect(self.host, v) for v in self.volumes}
        try:
            while not self.stop.is_set():
                n = len(self.log) + 1
                vol = self.rng.choice(self.volumes)
                block = self.rng.randrange(NBLOCKS)
                self.log.append((vol, block))
                handles[vol].pwrite(stamp(n), block * BLOCK)
                with self.progress:
                    self.acked = n
                    self.progress.notify_all()
        except nbd.Error as e:
            self.error = e
        finally:
            for h in handles.values():
                with contextlib.suppress(Exception):  # the server may be dead
                    h.shutdown()

    def _end(self) -> None:
        with self.progress:
            self.ended = True
            self.progress.notify_all()

    def wait_acked(self, n: int, timeout: float = 30) -> None:
        """Until ``n`` writes in all have been acknowledged (fails if the writer stops first)."""
        with self.progress:
            self.progress.wait_for(lambda: self.acked >= n or self.ended, timeout)
            assert self.acked >= n, f"{self.acked} writes acknowledged, not {n}: {self.error}"


def stamps_on_image(path: str) -> list[int]:
    with Volume.open(path) as v:
        base = v.header.data_offset
    out = []
    with open(path, "rb") as f:
        for b in range(NBLOCKS):
            f.seek(base + b * BLOCK)
            out.append(int.from_bytes(f.read(8), "little"))
    return out


def assert_prefix(log: list[tuple[str, int]], images: dict[str, list[int]]) -> int:
    """The images hold exactly writes 1..k (k = the largest stamp found); returns k."""
    k = max(max(stamps) for stamps in images.values())
    expected = {v: [0] * NBLOCKS for v in images}
    for n, (vol, block) in enumerate(log[:k], start=1):
        expected[vol][block] = n
    for vol, stamps in images.items():
        for block, (got, want) in enumerate(zip(stamps, expected[vol], strict=True)):
            assert got == want, f"{vol} block {block}: stamp {got}, prefix 1..{k} says {want}"
    return k


def group(env: LabEnv, host: str, name: str) -> dict[str, object]:
    rows = json.loads(env.pv(host, "pair", "display", name, "--json").stdout)["pairs"]
    journal: dict[str, object] = rows[0]["journal"]
    return journal


def wait_drained(env: LabEnv, name: str, timeout: float = 30) -> None:
    """Until the secondary has applied everything group ``name``'s primary journaled (no event
    says so: the primary's ``pair display`` is polled)."""
    poll_until(
        lambda: group(env, "a", name), lambda j: j["lag_entries"] == 0,
        what=f"group {name} drained", timeout=timeout,
    )  # fmt: skip


def verify(env: LabEnv, host: str, target: str) -> int:
    """How many chunks ``pair verify`` finds different."""
    r = env.pv(host, "pair", "verify", target, "--json", ok=False)
    assert r.returncode in (0, 1), r.stderr
    return sum(p["mismatch_count"] for p in json.loads(r.stdout)["pairs"])


def make_group(env: LabEnv, name: str, vols: list[str], *extra: str) -> None:
    for v in vols:
        env.volume("a", v, size=VSIZE)
        env.volume("b", v, size=VSIZE)
    for v in vols:
        env.pv("a", "pair", "create", f"{name}/{v}", "--primary", f"a:{v}",
               "--secondary", f"b:{v}", "--mode", "async", *extra)  # fmt: skip
    for v in vols:
        env.wait("a", f"{name}/{v}", "PAIR")


def delete_everywhere(env: LabEnv, name: str) -> None:
    for host in ("a", "b"):
        env.pv(host, "pair", "delete", name, ok=False)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_prefix_consistency_after_primary_kill(env: LabEnv, seed: int) -> None:
    name = f"pc{seed}"
    vols = [f"{name}x", f"{name}y"]
    make_group(env, name, vols)
    w = StampWriter(env, "a", vols, seed)
    w.start()
    w.wait_acked(21)
    poll_until(  # so that the takeover below has something applied to report
        lambda: group(env, "a", name), lambda j: j["secondary_applied"] >= 1,
        what=f"group {name}: a first entry applied",
    )  # fmt: skip
    time.sleep(random.Random(seed).random())  # then a crash at a random moment, on purpose
    labmod.kill_host(env.name, "a")
    w.join(30)
    assert w.error is not None and w.acked > 20
    r = env.pv("b", "pair", "takeover", name, "--json")
    result = json.loads(r.stdout)["pairs"]
    assert all(p["state"] == "SSWS" for p in result)
    images = {v: stamps_on_image(os.path.join(env.host("b").dir, v)) for v in vols}
    k = assert_prefix(w.log, images)
    assert k <= len(w.log)
    lost = result[0]["not_received"]
    assert lost["applied_seq"] >= 1
    labmod.start_node(env.name, "a")
    delete_everywhere(env, name)


def test_journal_survives_primary_kill_and_shipping_resumes(env: LabEnv) -> None:
    vols = ["jx", "jy"]
    make_group(env, "jc", vols)
    w = StampWriter(env, "a", vols, 9)
    w.start()
    w.wait_acked(2000)  # the primary dies mid-run, with entries in flight
    labmod.kill_host(env.name, "a")
    w.join(30)
    labmod.start_node(env.name, "a")
    wait_drained(env, "jc", timeout=60)
    assert verify(env, "a", "jc") == 0
    env.pv("a", "pair", "split", "jc")
    for v in vols:
        assert digest(os.path.join(env.host("a").dir, v)) == digest(
            os.path.join(env.host("b").dir, v)
        )
    images = {v: stamps_on_image(os.path.join(env.host("b").dir, v)) for v in vols}
    assert assert_prefix(w.log, images) >= w.acked  # every acknowledged write arrived
    delete_everywhere(env, "jc")


def test_overflow_pful_pfus_then_resync(env: LabEnv) -> None:
    make_group(env, "of", ["ov"], "--journal-size", "1M", "--high-watermark", "50")
    labmod.cut(env.name, "a", "b")
    states = set()
    try:
        h = env.connect("a", "ov")
        try:
            for i in range(64):  # 4 MiB of writes into a 1 MiB journal: none may block
                h.pwrite(os.urandom(CHUNK), (i * CHUNK) % VSIZE)
                states.add(env.side("a", "of/ov")["state"]) if i % 8 == 0 else None
        finally:
            h.shutdown()
        states.add(env.side("a", "of/ov")["state"])
    finally:
        labmod.heal(env.name, "a", "b")
    assert {"PFUL", "PFUS"} <= states, states  # high watermark, then full: no write blocked
    env.pv("a", "pair", "resync", "of")
    env.wait("a", "of/ov", "PAIR", timeout=60)
    # Journaling resumes after the folded sequence numbers, and those entries ship.
    env.write("a", "ov", 3 * CHUNK, os.urandom(CHUNK))
    wait_drained(env, "of")
    assert verify(env, "a", "of") == 0
    env.pv("a", "pair", "split", "of")
    assert digest(os.path.join(env.host("a").dir, "ov")) == digest(
        os.path.join(env.host("b").dir, "ov")
    )
    delete_everywhere(env, "of")


def test_overflow_without_a_cut_reports_pful(env: LabEnv) -> None:
    """Writes faster than a tiny journal drains: PFUL (and PFUS if it fills); writes never
    fail, and the pair ends identical."""
    make_group(env, "fu", ["fv"], "--journal-size", "1M", "--high-watermark", "10")
    h = env.connect("a", "fv")
    try:
        for i in range(256):
            h.pwrite(os.urandom(CHUNK), (i * CHUNK) % VSIZE)
    finally:
        h.shutdown()
    events = Path(env.host("a").dir, "events.jsonl").read_text().splitlines()
    states = {
        e["state"]
        for e in map(json.loads, events)
        if e.get("event") == "pair.state" and e.get("group") == "fu"
    }
    assert "PFUL" in states, states
    if env.side("a", "fu/fv")["state"] == "PFUS":
        env.pv("a", "pair", "resync", "fu")
    env.wait("a", "fu/fv", "PAIR", timeout=60)
    env.pv("a", "pair", "split", "fu")
    assert digest(os.path.join(env.host("a").dir, "fv")) == digest(
        os.path.join(env.host("b").dir, "fv")
    )
    delete_everywhere(env, "fu")


def test_consistent_split_of_a_group_under_load(env: LabEnv) -> None:
    vols = ["sx", "sy"]
    make_group(env, "cs", vols)
    w = StampWriter(env, "a", vols, 5)
    w.start()
    w.wait_acked(200)
    env.pv("a", "pair", "split", "cs")
    w.wait_acked(w.acked + 100)  # the writer carries on after the split: none may reach b
    w.stop.set()
    w.join(30)
    assert w.error is None
    images = {v: stamps_on_image(os.path.join(env.host("b").dir, v)) for v in vols}
    k = assert_prefix(w.log, images)  # one point in time across both volumes
    assert 0 < k < len(w.log)
    rows = json.loads(env.pv("a", "pair", "display", "cs", "--json").stdout)["pairs"]
    assert {r["state"] for r in rows} == {"PSUS"} and all(r["dirty_primary"] for r in rows)
    delete_everywhere(env, "cs")


def test_resync_throttle_is_honoured(env: LabEnv) -> None:
    env.volume("a", "tv", size=VSIZE)
    env.volume("b", "tv", size=VSIZE)
    fill(env, "a", "tv", VSIZE, seed=12)
    env.pv("a", "pair", "create", "th/tv", "--primary", "a:tv", "--secondary", "b:tv",
           "--mode", "async", "--max-rate", "8M")  # fmt: skip
    env.wait("a", "th/tv", "PAIR", timeout=60)
    row = env.side("a", "th/tv")["sides"]["primary"]
    rate = row["last_copy_bytes"] / row["last_copy_seconds"]
    assert row["last_copy_bytes"] == VSIZE
    assert rate <= 8 * 2**20 * 1.10, f"{rate / 2**20:.1f} MiB/s against a limit of 8 MiB/s"
    # A resync of known size (8 MiB rewritten after a split) at a new limit.
    env.pv("a", "pair", "split", "th")
    fill(env, "a", "tv", 8 << 20, seed=13)
    env.pv("a", "pair", "resync", "th", "--max-rate", "4M")
    env.wait("a", "th/tv", "PAIR", timeout=60)
    row = env.side("a", "th/tv")["sides"]["primary"]
    rate = row["last_copy_bytes"] / row["last_copy_seconds"]
    assert row["last_copy_bytes"] == 8 << 20
    assert rate <= 4 * 2**20 * 1.10, f"{rate / 2**20:.1f} MiB/s against a limit of 4 MiB/s"
    assert rate >= 4 * 2**20 * 0.80, f"{rate / 2**20:.1f} MiB/s: far below the 4 MiB/s limit"
    delete_everywhere(env, "th")


def test_max_rate_limits_shipping_so_a_backlog_builds_and_drains(env: LabEnv) -> None:
    """``--max-rate`` on an async pair limits its shipping too: 4 MiB written at once to a
    pair shipping at 1 MiB/s leave a backlog ``pair display`` shows; it drains, and the
    sides end identical."""
    make_group(env, "bk", ["bkv"], "--max-rate", "1M")
    fill(env, "a", "bkv", 4 << 20, seed=21)
    j = group(env, "a", "bk")
    assert j["ship_rate_limit"] == 1 << 20
    assert isinstance(j["backlog_bytes"], int) and j["backlog_bytes"] >= 1 << 20, j
    assert isinstance(j["backlog_entries"], int) and j["backlog_entries"] > 0, j
    wait_drained(env, "bk", timeout=60)
    assert group(env, "a", "bk")["backlog_bytes"] == 0
    assert verify(env, "a", "bk") == 0
    delete_everywhere(env, "bk")


def test_verify_an_async_pair_under_load(env: LabEnv) -> None:
    make_group(env, "vf", ["vv"])
    w = StampWriter(env, "a", ["vv"], 3)
    w.start()
    try:
        r = env.pv("a", "pair", "verify", "vf", "--json")  # lagging by design, yet identical
        assert json.loads(r.stdout)["pairs"][0]["mismatch_count"] == 0
    finally:
        w.stop.set()
        w.join(30)
    path = os.path.join(env.host("b").dir, "vv")
    with Volume.open(path) as v:
        base = v.header.data_offset
    with open(path, "r+b") as f:  # corrupt the secondary's image behind its node's back
        f.seek(base + 200 * CHUNK)
        f.write(b"\x01" * 512)
    r = env.pv("a", "pair", "verify", "vf", "--repair", "--json", ok=False)
    assert r.returncode == 1 and json.loads(r.stdout)["pairs"][0]["mismatches"] == [200]
    env.pv("a", "pair", "split", "vf")
    env.pv("a", "pair", "resync", "vf")
    env.wait("a", "vf/vv", "PAIR")
    assert env.pv("a", "pair", "verify", "vf").returncode == 0
    delete_everywhere(env, "vf")


def test_local_async_pair(env: LabEnv) -> None:
    env.volume("a", "la1", size=VSIZE)
    env.volume("a", "la2", size=VSIZE)
    env.pv("a", "pair", "create", "lg/p", "--primary", "a:la1", "--secondary", "a:la2",
           "--mode", "async")  # fmt: skip
    env.wait("a", "lg/p", "PAIR")
    w = StampWriter(env, "a", ["la1"], 4)
    w.start()
    w.wait_acked(200)
    env.pv("a", "pair", "split", "lg")
    w.stop.set()
    w.join(30)
    images = {"la1": stamps_on_image(os.path.join(env.host("a").dir, "la2"))}
    assert 0 < assert_prefix(w.log, images) <= len(w.log)
    delete_everywhere(env, "lg")


def test_a_group_created_again_starts_a_new_sequence_space(env: LabEnv) -> None:
    make_group(env, "rg", ["rv"])
    env.write("a", "rv", 0, os.urandom(CHUNK))
    env.wait("a", "rg/rv", "PAIR")
    delete_everywhere(env, "rg")
    assert not os.path.exists(os.path.join(env.host("b").dir, ".pairvol/journals/rg.rjournal"))
    env.pv("a", "pair", "create", "rg/rv", "--primary", "a:rv", "--secondary", "b:rv",
           "--mode", "async")  # fmt: skip
    env.wait("a", "rg/rv", "PAIR")
    env.write("a", "rv", CHUNK, os.urandom(CHUNK))  # sequence 1 of the new group
    wait_drained(env, "rg")
    assert verify(env, "a", "rg") == 0
    env.pv("a", "pair", "split", "rg")
    assert digest(os.path.join(env.host("a").dir, "rv")) == digest(
        os.path.join(env.host("b").dir, "rv")
    )
    delete_everywhere(env, "rg")
