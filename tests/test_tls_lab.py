"""TLS on peer links between real nodes: ``lab up --tls``, a sync pair created, written and
verified over TLS, and a plaintext peer refused by a TLS node with one line on each side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import require_programs, require_root
from labenv import CHUNK, LabEnv, digest, fill

from pairvol import lab as labmod
from pairvol.cli import main

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    require_root()
    require_programs("ip", "nbdkit")
    root = tmp_path_factory.mktemp("labs")
    name = f"tls{os.getpid() % 100000}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAIRVOL_LAB_ROOT", str(root))
        mp.delenv("PAIRVOL_LAB", raising=False)
        try:
            labmod.up(name, ["a", "b"], tls=True)
            yield LabEnv(name, root)
        finally:
            labmod.down(name)


def test_lab_reports_tls(env: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "status", env.name, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tls"] is True
    for h in ("a", "b"):
        assert env.control(h, "node.status")["peer_tls"] is True
        assert os.stat(os.path.join(doc["dir"], "tls", f"{h}.key")).st_mode & 0o077 == 0


def test_sync_pair_over_tls_verifies(env: LabEnv) -> None:
    pa, pb = env.volume("a", "t1"), env.volume("b", "t1")
    fill(env, "a", "t1", 4 << 20, seed=12)
    env.pv("a", "pair", "create", "gt/t1", "--primary", "a:t1", "--secondary", "b:t1")
    env.wait("a", "gt/t1", "PAIR")
    env.write("a", "t1", 6 << 20, os.urandom(3 * CHUNK))  # mirrored writes, over TLS
    r = env.pv("a", "pair", "verify", "gt/t1", "--json", ok=False)
    assert r.returncode == 0, r.stderr
    assert sum(p["mismatch_count"] for p in json.loads(r.stdout)["pairs"]) == 0
    assert digest(pa) == digest(pb)
    with open(os.path.join(env.host("b").dir, "node.log")) as f:
        log = f.read()
    assert "peer 'a' connected" in log and "TLS handshake failed" not in log


def test_plaintext_peer_refused(env: LabEnv) -> None:
    """A client with the right key but no TLS: refused, one line on each side."""
    a, b = env.host("a"), env.host("b")
    keys = a.secret_file
    code = (
        "import sys\n"
        "from replicator import wire\n"
        "from replicator.node import read_secret\n"
        "from replicator.peer_link import PeerClient\n"
        f"c = PeerClient('a', {b.address!r}, {b.peer_port}, read_secret({keys!r}), print)\n"
        "try:\n"
        "    c.request(wire.Ping(1), timeout=10)\n"
        "except Exception as e:\n"
        "    print(e)\n"
    )
    mark = os.path.getsize(os.path.join(b.dir, "node.log"))
    out = subprocess.run(
        ["ip", "netns", "exec", a.netns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert out.endswith("node b requires TLS on peer links"), out
    with open(os.path.join(b.dir, "node.log")) as f:
        f.seek(mark)
        lines = [ln for ln in f.read().splitlines() if "plaintext peer link" in ln]
    assert len(lines) == 1 and "refused: plaintext peer link, this node requires TLS" in lines[0]
