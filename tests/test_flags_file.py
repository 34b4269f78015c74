"""The host's status file (cluster/flags_file.py): a two-slot checksummed record of SPEC 3's
flags.  Round trips, damage named with the file, and writers SIGKILLed at random moments:
the file always reads as the old value or the new one.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster import flags_file
from cluster.flags_file import FLAGS_RECORD, FlagsFile, HostFlags
from cluster.refresh import Flag, Op, PairFlags
from replicator import record_file
from replicator.errors import HeaderCorrupt, NotFound

ROOT = Path(__file__).resolve().parent.parent

pair_flags = st.builds(
    PairFlags,
    own=st.just(Flag.ZERO),
    peer=st.sampled_from(Flag),
    serial=st.integers(0, (1 << 63) - 1),
    peer_serial=st.integers(0, 1 << 40),
    op=st.none() | st.sampled_from(Op),
    replica_started=st.booleans(),
    cache_stale=st.booleans(),
) | st.builds(
    PairFlags,
    own=st.sampled_from(Flag),
    serial=st.integers(1, 1000),
    op=st.sampled_from(Op),
)
host_flags = st.builds(
    HostFlags,
    host=st.sampled_from(["a", "b", "host-3"]),
    pairs=st.dictionaries(st.sampled_from(["g1/p1", "g1/p2", "g2/x"]), pair_flags, max_size=3),
)


@given(host_flags)
def test_encode_decode_round_trip(doc: HostFlags) -> None:
    back = flags_file.decode(flags_file.encode(doc), "f")
    assert back == doc


@given(st.binary(max_size=300))
def test_any_payload_decodes_or_is_header_corrupt_naming_the_file(payload: bytes) -> None:
    try:
        flags_file.decode(payload, "/x/flags")
    except HeaderCorrupt as e:
        assert str(e).startswith("/x/flags: ")


def test_set_get_remove_and_a_missing_file_is_all_at_rest(tmp_path: Path) -> None:
    path = str(tmp_path / "flags")
    f = FlagsFile(path, "a")
    assert f.read() == HostFlags("a")
    assert f.get("g1/p1") == PairFlags()
    one = PairFlags(Flag.A1, serial=3, op=Op.SPLIT)
    f.set("g1/p1", one)
    f.set("g1/p2", PairFlags(Flag.B3, Flag.A3, serial=2, peer_serial=2, op=Op.CONSTRUCTION))
    assert f.get("g1/p1") == one
    assert set(f.read().pairs) == {"g1/p1", "g1/p2"}
    f.remove("g1/p2")
    assert set(f.read().pairs) == {"g1/p1"}
    doc, note = flags_file.read(path)
    assert note is None and doc.get("g1/p1") == one
    with pytest.raises(NotFound):
        flags_file.read(str(tmp_path / "none"))


def test_another_hosts_file_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "flags")
    FlagsFile(path, "a").set("g1/p1", PairFlags())
    with pytest.raises(HeaderCorrupt, match="flags of host 'a', not 'b'"):
        FlagsFile(path, "b").read()
    with pytest.raises(HeaderCorrupt, match="not 'b'"):
        FlagsFile(path, "b").set("g1/p1", PairFlags())


def _corrupt(path: str, slot: int) -> None:
    with open(path, "r+b") as f:
        f.seek(slot * FLAGS_RECORD.slot_size + 30)
        byte = f.read(1)
        f.seek(slot * FLAGS_RECORD.slot_size + 30)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_one_damaged_slot_leaves_the_other_and_both_are_header_corrupt(tmp_path: Path) -> None:
    path = str(tmp_path / "flags")
    f = FlagsFile(path, "a")
    f.set("g1/p1", PairFlags(Flag.A1, serial=1, op=Op.SPLIT))
    f.set("g1/p1", PairFlags(Flag.A2, serial=1, op=Op.SPLIT))
    _corrupt(path, 0)
    doc, note = flags_file.read(path)
    assert doc.get("g1/p1").own in (Flag.A1, Flag.A2)
    assert note is not None and "damaged" in note
    f.set("g1/p1", PairFlags(Flag.A3, serial=1, op=Op.SPLIT))  # the next write repairs both
    assert flags_file.read(path)[1] is None
    _corrupt(path, 0)
    _corrupt(path, 1)
    with pytest.raises(HeaderCorrupt, match=str(tmp_path / "flags")):
        f.read()


def test_a_payload_that_is_not_a_flags_document_is_header_corrupt(tmp_path: Path) -> None:
    path = str(tmp_path / "flags")
    bad = [
        b"not json",
        b"[]",
        b'{"format":"pairvol.cluster-flags","version":2,"host":"a","pairs":{}}',
        b'{"format":"pairvol.cluster-flags","version":1,"host":"a","pairs":{"p":{"own":"A9"}}}',
        b'{"format":"pairvol.cluster-flags","version":1,"host":"","pairs":{}}',
    ]
    for payload in bad:
        record_file.create(path, FLAGS_RECORD, payload, replace=True)
        with pytest.raises(HeaderCorrupt, match=path):
            FlagsFile(path, "a").read()


_WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from cluster.flags_file import FlagsFile
from cluster.refresh import Flag, Op, PairFlags
f = FlagsFile(sys.argv[2], "a")
pair = sys.argv[3]
k = f.get(pair).serial
flags = (Flag.A1, Flag.A2, Flag.A3, Flag.ZERO)
print("ready", flush=True)
while True:
    k += 1
    f.set(pair, PairFlags(flags[k % 4], serial=k, op=Op.SPLIT))
    print(k, flush=True)
"""


@pytest.mark.slow
def test_sigkilled_writers_leave_the_old_value_or_the_new_one(tmp_path: Path) -> None:
    """Two writers (two pairs, one file) are SIGKILLed at random moments: the file always
    reads, each pair's line is the last one whose write returned or the one after it, and
    neither writer undid the other's line."""
    path = str(tmp_path / "flags")
    FlagsFile(path, "a").set("g1/p1", PairFlags())
    rng = random.Random()
    last = {"g1/p1": 0, "g1/p2": 0}
    for _ in range(20):
        procs = {
            pair: subprocess.Popen(
                [sys.executable, "-c", _WRITER, str(ROOT), path, pair], stdout=subprocess.PIPE
            )
            for pair in last
        }
        try:
            for proc in procs.values():
                assert proc.stdout is not None
                assert proc.stdout.readline() == b"ready\n"
            with contextlib.suppress(subprocess.TimeoutExpired):
                next(iter(procs.values())).wait(timeout=rng.uniform(0.001, 0.05))
            for proc in procs.values():
                proc.kill()  # SIGKILL; nothing if it was already reaped (it ended on its own)
            acked: dict[str, int] = {}
            for pair, proc in procs.items():
                proc.wait()
                assert proc.stdout is not None
                lines = proc.stdout.read().split()
                acked[pair] = int(lines[-1]) if lines else last[pair]
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        doc = FlagsFile(path, "a").read()
        for pair in last:
            got = doc.get(pair).serial
            assert acked[pair] <= got <= acked[pair] + 1, (pair, acked[pair], got)
            flags = doc.get(pair)
            assert flags.own is (Flag.A1, Flag.A2, Flag.A3, Flag.ZERO)[got % 4] or got == 0
            last[pair] = got
    assert all(v > 0 for v in last.values())
