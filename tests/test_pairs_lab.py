"""Sync pairs between real nodes in a two-host lab (network namespaces, real nbdkit processes).

Clients reach a node's volumes through its unix socket (``HOSTDIR/nbd.sock``), which works from
the test's own namespace.  Contents are compared on the image files themselves, so a hidden
secondary can be checked without asking its node.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VENV_BIN
from labenv import CHUNK, SIZE, LabEnv, digest, fill, lab_env, nbd, pvid

from pairvol import lab as labmod
from replicator.volume import Volume

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    yield from lab_env(tmp_path_factory, "tp")


def verify(env: LabEnv, host: str, target: str) -> int:
    """How many chunks ``pair verify`` finds different."""
    r = env.pv(host, "pair", "verify", target, "--json", ok=False)
    assert r.returncode in (0, 1), r.stderr
    return sum(p["mismatch_count"] for p in json.loads(r.stdout)["pairs"])


def test_create_mirror_split_identical(env: LabEnv) -> None:
    pa, pb = env.volume("a", "v1"), env.volume("b", "v1")
    fill(env, "a", "v1", 4 << 20, seed=1)
    env.write("a", "v1", 20 << 20, b"\x5a" * CHUNK)  # a lone chunk amid holes
    env.pv("a", "pair", "create", "g1/p1", "--primary", "a:v1", "--secondary", "b:v1")
    env.wait("a", "g1/p1", "PAIR")
    row = env.side("a", "g1/p1")
    # The initial copy sent the allocated data only, not the 32 MiB of the volume.
    assert row["last_copy_bytes"] == (4 << 20) + CHUNK
    assert row["pvid_primary"] == row["pvid_secondary"] == pvid(pa) == pvid(pb)
    for path, role in ((pa, "primary"), (pb, "secondary")):
        with Volume.open(path) as v:  # the VOL information says what the volume is now
            assert (v.header.role.label, v.header.pair) == (role, "g1/p1")

    # The secondary is hidden: a client cannot open it.
    with pytest.raises(nbd.Error):
        env.connect("b", "v1")
    # Mirrored writes, then a split: identical data, a new PVID on the secondary.
    env.write("a", "v1", 5 << 20, os.urandom(3 * CHUNK))
    env.write("a", "v1", SIZE - CHUNK, os.urandom(CHUNK))
    assert digest(pa) == digest(pb)
    env.pv("a", "pair", "split", "g1")
    row = env.side("a", "g1/p1")
    assert row["state"] == row["secondary_state"] == "PSUS"
    assert digest(pa) == digest(pb)
    assert pvid(pb) != pvid(pa)
    env.write("b", "v1", 0, b"now writable")  # the split secondary takes writes

    env.pv("a", "pair", "delete", "g1/p1")
    assert env.pv("a", "pair", "display", "--json").stdout.count('"id"') == 0
    for path in (pa, pb):
        with Volume.open(path) as v:
            assert (v.header.role.label, v.header.pair) == ("simplex", "")


def test_resync_copies_only_the_dirty_chunks(env: LabEnv) -> None:
    pa, pb = env.volume("a", "v2"), env.volume("b", "v2")
    fill(env, "a", "v2", 8 << 20, seed=2)
    env.pv("a", "pair", "create", "g2/p1", "--primary", "a:v2", "--secondary", "b:v2")
    env.wait("a", "g2/p1", "PAIR")
    env.pv("a", "pair", "split", "g2/p1")
    for off in (0, 3 * CHUNK, 40 * CHUNK):  # three chunks on the primary
        env.write("a", "v2", off, os.urandom(CHUNK))
    for off in (3 * CHUNK, 70 * CHUNK + 100):  # one shared, one straddling two chunks
        env.write("b", "v2", off, os.urandom(CHUNK))
    row = env.side("a", "g2/p1")
    assert row["dirty_primary"] == 3 * CHUNK and row["dirty_secondary"] == 3 * CHUNK
    assert digest(pa) != digest(pb)

    env.pv("b", "pair", "resync", "g2")  # forwarded from the secondary's node to the primary
    env.wait("a", "g2/p1", "PAIR")
    row = env.side("a", "g2/p1")
    assert row["last_copy_bytes"] == 5 * CHUNK  # the union: chunks 0, 3, 40, 70, 71
    assert row["dirty_primary"] == 0 and row["dirty_secondary"] == 0
    assert digest(pa) == digest(pb)
    assert pvid(pa) == pvid(pb)
    env.pv("a", "pair", "delete", "g2")


def _writer(env: LabEnv, host: str, volume: str, stop: threading.Event, log: list[int]) -> None:
    """Rewrite random chunks with a stamp until told to stop; log each acknowledged one."""
    h = env.connect(host, volume)
    rng = random.Random(7)
    n = 0
    try:
        while not stop.is_set():
            n += 1
            chunk = rng.randrange(SIZE // CHUNK)
            h.pwrite(
                n.to_bytes(8, "little") * (4096 // 8), chunk * CHUNK + 4096 * rng.randrange(16)
            )
            log.append(chunk)
    finally:
        h.shutdown()


def _write_until_paired(env: LabEnv, volume: str, target: str) -> tuple[bool, int]:
    """Run the writer on host a while the pair copies; (was it seen in COPY, writes done)."""
    stop, log = threading.Event(), list[int]()
    t = threading.Thread(target=_writer, args=(env, "a", volume, stop, log))
    t.start()
    try:
        seen_copy = env.side("a", target)["state"] == "COPY"
        env.wait("a", target, "PAIR", timeout=60)
    finally:
        stop.set()
        t.join(30)
    return seen_copy, len(log)


def test_writes_racing_the_initial_copy_and_a_resync_are_kept(env: LabEnv) -> None:
    pa, pb = env.volume("a", "v3"), env.volume("b", "v3")
    fill(env, "a", "v3", SIZE, seed=3)
    # A throttled copy (8 MiB/s over 32 MiB) keeps COPY open while the writer runs.
    env.pv("a", "pair", "create", "g3/p1", "--primary", "a:v3", "--secondary", "b:v3",
           "--max-rate", "8M")  # fmt: skip
    seen_copy, writes = _write_until_paired(env, "v3", "g3/p1")
    assert seen_copy and writes > 100
    env.pv("a", "pair", "split", "g3")
    assert digest(pa) == digest(pb)

    # The same during a differential resync of everything the primary rewrote meanwhile.
    fill(env, "a", "v3", SIZE, seed=4)
    env.pv("a", "pair", "resync", "g3", "--max-rate", "8M")
    seen_copy, writes = _write_until_paired(env, "v3", "g3/p1")
    assert seen_copy and writes > 100
    env.pv("a", "pair", "split", "g3")
    assert digest(pa) == digest(pb)
    env.pv("a", "pair", "delete", "g3")


def test_fence_data_refuses_and_fence_never_records(env: LabEnv) -> None:
    pa, pb = env.volume("a", "v4"), env.volume("b", "v4")
    env.volume("a", "v5")
    env.volume("b", "v5")
    env.pv("a", "pair", "create", "g4/strict", "--primary", "a:v4", "--secondary", "b:v4",
           "--fence", "data")  # fmt: skip
    env.pv("a", "pair", "create", "g4/loose", "--primary", "a:v5", "--secondary", "b:v5")
    env.wait("a", "g4/strict", "PAIR")
    env.wait("a", "g4/loose", "PAIR")
    labmod.cut(env.name, "a", "b")
    try:
        with pytest.raises(nbd.Error) as e:
            env.write("a", "v4", 0, b"x" * 4096)
        assert e.value.errnum == errno.EIO
        env.write("a", "v5", 0, b"y" * 4096)  # fence=never: accepted and recorded
        strict, loose = env.side("a", "g4/strict"), env.side("a", "g4/loose")
        assert strict["state"] == loose["state"] == "PSUE"
        assert loose["dirty_primary"] == CHUNK
        with pytest.raises(nbd.Error):  # and every later write while suspended
            env.write("a", "v4", 8192, b"z" * 4096)
    finally:
        labmod.heal(env.name, "a", "b")
    for p in ("strict", "loose"):
        env.pv("a", "pair", "resync", f"g4/{p}")
        env.wait("a", f"g4/{p}", "PAIR")
    env.pv("a", "pair", "split", "g4")
    assert digest(pa) == digest(pb)
    assert digest(os.path.join(env.host("a").dir, "v5")) == digest(
        os.path.join(env.host("b").dir, "v5")
    )
    env.pv("a", "pair", "delete", "g4")


def test_node_kill_9_keeps_pair_state_and_bitmaps(env: LabEnv) -> None:
    pa, pb = env.volume("a", "v6"), env.volume("b", "v6")
    fill(env, "a", "v6", 2 << 20, seed=6)
    env.pv("a", "pair", "create", "g6/p1", "--primary", "a:v6", "--secondary", "b:v6")
    env.wait("a", "g6/p1", "PAIR")
    env.pv("a", "pair", "split", "g6")
    env.write("a", "v6", 0, os.urandom(2 * CHUNK))
    env.write("b", "v6", 10 * CHUNK, os.urandom(CHUNK))
    before = env.side("a", "g6/p1")
    labmod.kill_host(env.name, "a")
    labmod.kill_host(env.name, "b")
    labmod.start_node(env.name, "a")
    labmod.start_node(env.name, "b")
    after = env.side("a", "g6/p1")
    for key in ("state", "secondary_state", "dirty_primary", "dirty_secondary", "pvid_primary"):
        assert after[key] == before[key], key
    env.pv("a", "pair", "resync", "g6")
    env.wait("a", "g6/p1", "PAIR")
    assert env.side("a", "g6/p1")["last_copy_bytes"] == 3 * CHUNK
    env.pv("a", "pair", "split", "g6")
    assert digest(pa) == digest(pb)
    env.pv("a", "pair", "delete", "g6")


def test_sync_writes_survive_primary_kill_and_takeover(env: LabEnv) -> None:
    pa, pb = env.volume("a", "v7"), env.volume("b", "v7")
    env.pv("a", "pair", "create", "g7/p1", "--primary", "a:v7", "--secondary", "b:v7")
    env.wait("a", "g7/p1", "PAIR")
    acked: dict[int, int] = {}  # block -> last acknowledged stamp
    failed = threading.Event()
    running = threading.Event()  # set once 200 writes are acknowledged

    def writer() -> None:
        h = env.connect("a", "v7")
        stamp = 0
        try:
            while True:
                stamp += 1
                block = stamp % (SIZE // 4096)
                h.pwrite(stamp.to_bytes(8, "little") * 512, block * 4096)
                acked[block] = stamp
                if stamp == 200:
                    running.set()
        except nbd.Error:
            failed.set()
            running.set()

    t = threading.Thread(target=writer)
    t.start()
    assert running.wait(30) and not failed.is_set(), "the writer made no progress"
    labmod.kill_host(env.name, "a")  # the primary host dies mid-run
    t.join(30)
    assert failed.is_set() and len(acked) > 50
    env.pv("b", "pair", "takeover", "g7/p1")
    assert env.side("b", "g7/p1")["secondary_state"] == "SSWS"
    h = env.connect("b", "v7")  # usable now, under the application's PVID
    try:
        for block, stamp in acked.items():
            got = int.from_bytes(h.pread(8, block * 4096), "little")
            assert got >= stamp, f"block {block}: acknowledged stamp {stamp}, found {got}"
    finally:
        h.shutdown()
    assert pvid(pb) == pvid(pa)

    # The old primary comes back stale; resync --swap makes it the new secondary.
    labmod.start_node(env.name, "a")
    env.write("b", "v7", 0, b"after takeover".ljust(4096, b"."))
    env.pv("b", "pair", "resync", "--swap", "g7/p1")
    env.wait("b", "g7/p1", "PAIR")
    row = env.side("b", "g7/p1")
    assert row["primary"] == "b:v7" and row["secondary"] == "a:v7"
    assert verify(env, "b", "g7") == 0
    env.pv("b", "pair", "split", "g7")
    assert digest(pa) == digest(pb)
    env.pv("b", "pair", "delete", "g7")


def test_bad_pair_commands_change_nothing(env: LabEnv) -> None:
    env.volume("a", "v8")
    env.volume("b", "v8", size=SIZE * 2)
    pairs_dirs = [Path(env.host(h).dir, ".pairvol", "pairs") for h in ("a", "b")]

    def files() -> list[str]:
        return sorted(str(p) for d in pairs_dirs if d.exists() for p in d.iterdir())

    start = files()
    cases = [
        (["pair", "create", "g8/p", "--primary", "a:v8", "--secondary", "b:v8"], 5, "sizes differ"),
        (["pair", "create", "g8", "--primary", "a:v8", "--secondary", "b:v8"], 2, "GROUP/PAIR"),
        (["pair", "create", "g8/p", "--primary", "zz:v8", "--secondary", "b:v8"], 3, "unknown"),
        (["pair", "create", "g8/p", "--primary", "a:nope", "--secondary", "b:v8"], 3, "no volume"),
        (["pair", "create", "g8/p", "--primary", "a:v8", "--secondary", "b:v8", "--chunk", "3K"],
         2, "power of two"),
        (["pair", "create", "g8/p", "--primary", "a:v8", "--secondary", "a:v8"], 2, "same volume"),
        (["pair", "split", "nosuch"], 3, "no pairs"),
        (["pair", "resync", "g8/x"], 3, "does not exist"),
        (["pair", "takeover", "bad name"], 2, "name"),
        (["pair", "wait", "g8/x", "--state", "PAIR", "--timeout", "1"], 3, "does not exist"),
    ]  # fmt: skip
    for args, code, text in cases:
        r = env.pv("a", *args, ok=False)
        assert r.returncode == code, (args, r.stderr)
        assert text in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    assert files() == start


def test_auto_resync_after_heal(env: LabEnv) -> None:
    pa, pb = env.volume("a", "v9"), env.volume("b", "v9")
    env.pv("a", "pair", "create", "g9/p1", "--primary", "a:v9", "--secondary", "b:v9",
           "--auto-resync")  # fmt: skip
    env.wait("a", "g9/p1", "PAIR")
    labmod.cut(env.name, "a", "b")
    try:
        env.write("a", "v9", 0, os.urandom(CHUNK))
        env.wait("a", "g9/p1", "PSUE")
    finally:
        labmod.heal(env.name, "a", "b")
    env.wait("a", "g9/p1", "PAIR")  # no resync command: the link's return starts it
    row = env.side("a", "g9/p1")
    assert row["secondary_state"] == "PAIR" and row["last_copy_bytes"] == CHUNK
    env.pv("a", "pair", "split", "g9")
    assert digest(pa) == digest(pb)
    env.pv("a", "pair", "delete", "g9")


def test_initial_copy_resumes_after_primary_kill_9(env: LabEnv) -> None:
    pa, pb = env.volume("a", "v10"), env.volume("b", "v10")
    fill(env, "a", "v10", 16 << 20, seed=10)
    env.pv("a", "pair", "create", "g10/p1", "--primary", "a:v10", "--secondary", "b:v10",
           "--max-rate", "8M")  # fmt: skip
    # Killed as soon as some progress is durable (the record's copied_chunks is saved after
    # the copy bitmap; no event says so), well before the copy (16 MiB at 8 MiB/s) ends.
    env.wait_side("a", "g10/p1", lambda s: s["copied_chunks"] > 0, what="copy progress saved")
    labmod.kill_host(env.name, "a")
    labmod.start_node(env.name, "a")
    row = env.side("a", "g10/p1")
    assert row["state"] == "COPY" and 0 < row["sides"]["primary"]["pending_chunks"] < SIZE // CHUNK
    env.wait("a", "g10/p1", "PAIR")
    assert verify(env, "a", "g10") == 0
    env.pv("a", "pair", "split", "g10")
    assert digest(pa) == digest(pb)
    env.pv("a", "pair", "delete", "g10")


def test_peer_with_wrong_secret_is_refused(env: LabEnv, tmp_path: Path) -> None:
    a = env.host("a")
    script = tmp_path / "intruder.py"
    script.write_text(
        "import sys\n"
        "from replicator import wire\n"
        "from replicator.errors import ConnectionFailed\n"
        "from replicator.peer_link import PeerClient\n"
        f"c = PeerClient('mallory', {a.address!r}, {a.peer_port}, b'not the secret', print)\n"
        "try:\n"
        "    c.request(wire.PairCreate('evil/p', 'v1', 1 << 20, 65536, 'sync', 'never', 1, 0))\n"
        "except ConnectionFailed as e:\n"
        "    print('refused:', e)\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    r = subprocess.run(
        ["ip", "netns", "exec", env.host("b").netns, str(VENV_BIN / "python"), str(script)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "refused" in r.stdout and "secret" in r.stdout
    log = Path(a.dir, "node.log").read_text()
    assert "mallory" in log and "unknown peer 'mallory'" in log
    assert "evil/p" not in env.pv("a", "pair", "display", "--json").stdout


def test_verify_finds_corruption_and_repair_plus_resync_fixes_it(env: LabEnv) -> None:
    pa, pb = env.volume("a", "v11"), env.volume("b", "v11")
    fill(env, "a", "v11", 4 << 20, seed=11)
    env.pv("a", "pair", "create", "g11/p1", "--primary", "a:v11", "--secondary", "b:v11")
    env.wait("a", "g11/p1", "PAIR")
    r = env.pv("a", "pair", "verify", "g11", "--json")
    assert json.loads(r.stdout)["pairs"][0]["mismatch_count"] == 0
    # Corrupt the secondary behind its node's back, straight in the image file.
    with Volume.open(pb) as v:
        base = v.header.data_offset
    with open(pb, "r+b") as f:
        f.seek(base + 37 * CHUNK + 1000)
        f.write(b"\xff" * 10)
        f.flush()
        os.fsync(f.fileno())
    r = env.pv("a", "pair", "verify", "g11", ok=False)
    assert r.returncode == 1 and "1 differ (37)" in r.stdout
    r = env.pv("a", "pair", "verify", "g11/p1", "--repair", "--json", ok=False)
    result = json.loads(r.stdout)["pairs"][0]
    assert r.returncode == 1 and result["mismatches"] == [37] and result["repaired"]
    env.pv("a", "pair", "split", "g11")
    assert env.side("a", "g11/p1")["dirty_primary"] == CHUNK
    env.pv("a", "pair", "resync", "g11")
    env.wait("a", "g11/p1", "PAIR")
    assert env.side("a", "g11/p1")["last_copy_bytes"] == CHUNK
    assert env.pv("a", "pair", "verify", "g11").returncode == 0
    env.pv("a", "pair", "split", "g11")
    assert digest(pa) == digest(pb)
    env.pv("a", "pair", "delete", "g11")


def test_local_pair_within_one_node(env: LabEnv) -> None:
    p1, p2 = env.volume("a", "l1"), env.volume("a", "l2")
    fill(env, "a", "l1", 2 << 20, seed=13)
    env.pv("a", "pair", "create", "gl/p", "--primary", "a:l1", "--secondary", "a:l2")
    env.wait("a", "gl/p", "PAIR")
    row = env.side("a", "gl/p")
    assert (row["primary"], row["secondary"]) == ("a:l1", "a:l2")
    assert row["secondary_state"] == "PAIR" and row["pvid_primary"] == row["pvid_secondary"]
    with pytest.raises(nbd.Error):  # hidden, as on another node
        env.connect("a", "l2")
    env.write("a", "l1", 0, os.urandom(CHUNK))  # mirrored in-process
    assert digest(p1) == digest(p2)

    env.pv("a", "pair", "split", "gl")
    env.write("a", "l1", 5 * CHUNK, os.urandom(CHUNK))
    env.write("a", "l2", 9 * CHUNK, os.urandom(CHUNK))
    labmod.kill_host(env.name, "a")  # both halves restart together
    labmod.start_node(env.name, "a")
    row = env.side("a", "gl/p")
    assert row["state"] == row["secondary_state"] == "PSUS"
    assert row["dirty_primary"] == row["dirty_secondary"] == CHUNK
    env.pv("a", "pair", "resync", "gl")
    env.wait("a", "gl/p", "PAIR")
    assert env.side("a", "gl/p")["last_copy_bytes"] == 2 * CHUNK
    assert digest(p1) == digest(p2)

    env.pv("a", "pair", "takeover", "gl/p")  # the secondary half, on the same node
    env.write("a", "l2", 0, os.urandom(CHUNK))
    env.pv("a", "pair", "resync", "--swap", "gl/p")
    env.wait("a", "gl/p", "PAIR")
    row = env.side("a", "gl/p")
    assert (row["primary"], row["secondary"]) == ("a:l2", "a:l1")
    assert digest(p1) == digest(p2)
    env.pv("a", "pair", "delete", "gl")
    assert '"id"' not in env.pv("a", "pair", "display", "--json").stdout
    env.write("a", "l1", 0, b"both usable again")


def test_pair_check_exits_with_pairvolchk_values_on_both_sides(env: LabEnv) -> None:
    """``pair check`` is ``pairvolchk -ss``: the state as the exit status, P-VOL on the
    primary's node and S-VOL on the secondary's, sync and async, SSWS its own, SMPL for a
    volume in no pair (README's table)."""

    def check(host: str, *args: str) -> int:
        r = env.pv(host, "pair", "check", *args, ok=False)
        assert r.stderr == "" and r.stdout.count("\n") == 1, (r.stdout, r.stderr)
        return r.returncode

    env.volume("a", "ck1")
    env.volume("b", "ck1")
    env.volume("a", "ck2")
    env.volume("b", "ck2")
    assert check("a", "--volume", "ck1") == 11  # SMPL: in no pair yet
    env.pv("a", "pair", "create", "gck/p", "--primary", "a:ck1", "--secondary", "b:ck1")
    env.pv("a", "pair", "create", "gcka/p", "--primary", "a:ck2", "--secondary", "b:ck2",
           "--mode", "async")  # fmt: skip
    env.wait("a", "gck/p", "PAIR")
    env.wait("a", "gcka/p", "PAIR")
    assert (check("a", "gck/p"), check("b", "gck/p"), check("b", "gck")) == (23, 33, 33)
    assert (check("a", "gcka"), check("b", "--volume", "ck2")) == (43, 53)
    env.pv("a", "pair", "split", "gck")
    assert (check("a", "gck/p"), check("b", "gck/p")) == (24, 34)
    env.pv("b", "pair", "takeover", "gcka")  # async, the old primary answers: SSWS
    assert check("b", "gcka/p") == 59
    r = env.pv("a", "pair", "check", "nosuch/p", ok=False)
    assert r.returncode not in range(11, 60) and r.stderr.count("\n") == 1, r
    for host in ("a", "b"):
        for group in ("gck", "gcka"):
            env.pv(host, "pair", "delete", group, ok=False)
