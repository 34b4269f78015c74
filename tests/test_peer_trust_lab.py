"""A peer is trusted only for the pairs it belongs to (issue 7, item 10): a third node that
authenticates with its own key can neither act on a pair of two other nodes nor pose as one
of them.  Three real nodes in their own lab."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VENV_BIN
from labenv import LabEnv, digest, fill, lab_of, nbd

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]
assert nbd is not None
SMALL = 2 << 20


def verify(env: LabEnv, target: str) -> int:
    r = env.pv("a", "pair", "verify", target, ok=False)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode


def paired(env: LabEnv, target: str, vol: str) -> tuple[str, str]:
    pa, pb = env.volume("a", vol, SMALL), env.volume("b", vol, SMALL)
    fill(env, "a", vol, SMALL, seed=7)
    env.pv("a", "pair", "create", target, "--primary", f"a:{vol}", "--secondary", f"b:{vol}")
    env.wait("a", target, "PAIR")
    return pa, pb


# -- 10. a peer is trusted only for its own pairs ------------------------------------------------


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    """Three hosts: a and b pair up, c is a node b also talks to (it holds a key for b)."""
    yield from lab_of(tmp_path_factory, "tt", LabEnv, hosts=("a", "b", "c"))


#: The start of a script run on a host: argv is the key file, b's address and peer port;
#: ``attempt`` sends each message as node ``name`` and counts the ones accepted.
SCRIPT_HEAD = """
import sys
from replicator import wire
from replicator.node import read_secret
from replicator.peer_link import PeerClient
from replicator.errors import PairvolError

keys = read_secret(sys.argv[1])
host, port = sys.argv[2], int(sys.argv[3])


def attempt(name, msgs):
    client = PeerClient(name, host, port, keys, print)
    accepted = 0
    for msg in msgs:
        try:
            client.request(msg)
            accepted += 1
            print("accepted:", type(msg).__name__)
        except PairvolError as e:
            print("refused:", type(msg).__name__, e)
    client.close()
    return accepted
"""


def run_script(
    env: LabEnv, host: str, body: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """``SCRIPT_HEAD + body`` in ``host``'s namespace with its key, against node b."""
    h, b = env.host(host), env.host("b")
    script = tmp_path / f"{host}.py"
    script.write_text(SCRIPT_HEAD + body)
    return subprocess.run(
        ["ip", "netns", "exec", h.netns, str(VENV_BIN / "python"), str(script),
         h.secret_file or env.lab.secret_file, b.address, str(b.peer_port)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


INTRUDER = """
# c's own name, with its own key: authenticated, but c is not gt/p1's peer.
accepted = attempt("c", (
    wire.Write("gt/p1", 0, b"\x66" * 4096),
    wire.Zero("gt/p1", 4096, 4096),
    wire.pack_entries("gt/p1", [(1, 0, 4096, wire.ENTRY_WRITE, False)], [b"\x66" * 4096]),
    wire.PairState("gt/p1", "PSUS", "primary", 1, 99),
    wire.BitmapRequest("gt/p1", "diff"),
))
# Posing as a, the pair's real peer, with c's keys: the handshake fails.
try:
    PeerClient("a", host, port, keys, print).request(wire.Ping(1))
    accepted += 1
    print("accepted: posing as a")
except PairvolError as e:
    print("refused: posing as a:", e)
sys.exit(1 if accepted else 0)
"""


def test_a_node_is_trusted_only_for_the_pairs_it_belongs_to(trio: LabEnv, tmp_path: Path) -> None:
    env = trio
    _, pb = paired(env, "gt/p1", "tv1")
    b = env.host("b")
    before = digest(pb)
    r = run_script(env, "c", INTRUDER, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert digest(pb) == before
    row = env.side("a", "gt/p1")
    assert (row["state"], row["secondary_state"]) == ("PAIR", "PAIR")
    log = Path(b.dir, "node.log").read_text()
    assert "refused Write for pair gt/p1 from node 'c'" in log
    assert verify(env, "gt/p1") == 0
    env.pv("a", "pair", "delete", "gt")


JOURNAL_ENTRIES = """
accepted = attempt("a", (
    wire.Write("gt/p2", 0, b"\x66" * 4096, seq=1),
    wire.pack_entries("gt/p2", [(1, 0, 4096, wire.ENTRY_WRITE, False)], [b"\x66" * 4096]),
))
sys.exit(1 if accepted else 0)
"""


def test_a_sync_pair_takes_no_journal_entries_even_from_its_own_peer(
    trio: LabEnv, tmp_path: Path
) -> None:
    """A journal entry (an async Write, an Entries frame) for a sync pair is refused, even
    from the pair's own peer: a sync secondary has no receive journal, and a stray entry must
    not make one (nor reach the volume)."""
    env = trio
    _, pb = paired(env, "gt/p2", "tv2")
    b = env.host("b")
    before = digest(pb)
    r = run_script(env, "a", JOURNAL_ENTRIES, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("takes no journal entries (sync,") == 2, r.stdout
    assert digest(pb) == before
    assert not Path(b.dir, ".pairvol", "journals", "gt.rjournal").exists()
    row = env.side("a", "gt/p2")
    assert (row["state"], row["secondary_state"]) == ("PAIR", "PAIR")
    assert verify(env, "gt/p2") == 0
    env.pv("a", "pair", "delete", "gt")
