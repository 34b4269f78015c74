"""``lab isolate`` / ``lab rejoin``: a host alone on its side of a partition, etcd included.

Reachability is shown with real sockets: a TCP connect, bounded by a timeout, from inside each
namespace (hosts and etcd members alike) to the others' listening ports (a node's NBD port,
etcd's client and peer ports).  Which blackhole routes a lab needs is also checked on its own,
without namespaces, for cuts and isolations mixed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_programs, require_root

from cluster.etcd_server import CLIENT_PORT, PEER_PORT
from pairvol import lab as labs
from pairvol.cli import main
from replicator.errors import HeaderCorrupt
from replicator.node import NBD_PORT

pytestmark = pytest.mark.timeout(120)

# Connects to every ADDR:PORT given, all at once, each bounded by 1 s; prints one JSON object
# {"ADDR:PORT": "ok" | "unreachable" | "refused"}.  A blackhole route makes connect fail at
# once (EINVAL); a dropped SYN would time out.  "refused" means nothing listens: a test error.
PROBE = """
import json, socket, sys, threading
got = {}
def probe(t):
    addr, port = t.rsplit(":", 1)
    try:
        socket.create_connection((addr, int(port)), timeout=1.0).close()
        got[t] = "ok"
    except ConnectionRefusedError:
        got[t] = "refused"
    except OSError:
        got[t] = "unreachable"
threads = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[1:]]
for th in threads: th.start()
for th in threads: th.join()
print(json.dumps(got))
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class Net:
    """A cluster lab's namespaces as places: host names and ``etcdJ`` for the members."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lab = labs.load(name)
        assert self.lab.cluster is not None
        c = self.lab.cluster
        self.netns = {h.host: h.netns for h in self.lab.hosts}
        self.address = {h.host: h.address for h in self.lab.hosts}
        self.port = dict.fromkeys(self.address, NBD_PORT)
        for j, (ns, address) in enumerate(zip(c["etcd_netns"], c["etcd_addresses"], strict=True)):
            self.netns[f"etcd{j}"], self.address[f"etcd{j}"] = ns, address
            self.port[f"etcd{j}"] = CLIENT_PORT

    @property
    def places(self) -> list[str]:
        return sorted(self.netns)

    def probe(self, src: str, dsts: list[str], port: int | None = None) -> dict[str, str]:
        """From ``src``'s namespace, connect to each of ``dsts``: {dst: outcome}."""
        targets = {f"{self.address[d]}:{port or self.port[d]}": d for d in dsts}
        r = subprocess.run(
            ["ip", "netns", "exec", self.netns[src], sys.executable, "-c", PROBE, *targets],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return {targets[t]: outcome for t, outcome in json.loads(r.stdout).items()}

    def matrix(self) -> dict[tuple[str, str], bool]:
        """Whether each place reaches each other place."""
        seen: dict[tuple[str, str], bool] = {}
        for src in self.places:
            got = self.probe(src, [d for d in self.places if d != src])
            assert "refused" not in got.values(), f"nothing listens: {src} -> {got}"
            seen.update({(src, d): outcome == "ok" for d, outcome in got.items()})
        return seen

    def expect(self, blocked: set[frozenset[str]]) -> None:
        """Every place reaches every other, except the unordered pairs in ``blocked``, which
        reach each other in neither direction."""
        want = {
            (s, d): frozenset((s, d)) not in blocked
            for s in self.places
            for d in self.places
            if s != d
        }
        got = self.matrix()
        wrong = sorted((k, got[k]) for k in want if got[k] != want[k])
        assert not wrong, f"reachable (True) or not, unlike expected: {wrong}"

    def blackholes(self) -> set[tuple[str, str]]:
        """The blackhole routes in the lab's namespaces now: (place, destination place)."""
        by_address = {a: p for p, a in self.address.items()}
        found = set()
        for place, ns in self.netns.items():
            out = subprocess.run(
                ["ip", "-n", ns, "route", "show", "type", "blackhole"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout  # fmt: skip
            found |= {(place, by_address[line.split()[1]]) for line in out.splitlines()}
        return found


def cut_off(*pairs: tuple[str, str]) -> set[frozenset[str]]:
    return {frozenset(p) for p in pairs}


def alone(net: Net, host: str) -> set[frozenset[str]]:
    return {frozenset((host, p)) for p in net.places if p != host}


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("labs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(labs.LAB_ROOT_ENV, str(root))
        mp.delenv(labs.LAB_ENV, raising=False)
        yield root


@contextlib.contextmanager
def cluster_lab(lab_root: Path, hosts: list[str], members: int) -> Iterator[Net]:
    require_root()
    require_programs("ip", "nbdkit", "etcd")
    name = f"ti{os.getpid() % 100000}{secrets.token_hex(2)}"
    try:
        labs.up(name, hosts, cluster=True, etcd_members=members)
        yield Net(name)
    finally:
        labs.down(name)
        assert not (lab_root / name).exists()


@pytest.fixture(scope="module")
def net(lab_root: Path) -> Iterator[Net]:
    """Hosts a, b, c and one etcd member, shared by the tests, each of which leaves it whole."""
    with cluster_lab(lab_root, ["a", "b", "c"], 1) as net:
        yield net


@pytest.fixture
def whole(net: Net) -> Iterator[Net]:
    """``net``, checked whole before the test and made whole again after it."""
    assert net.blackholes() == set()
    try:
        yield net
    finally:
        lab = labs.load(net.name)
        for h in list(lab.isolated):
            labs.rejoin(net.name, h)
        for a, b in list(lab.cuts):
            labs.heal(net.name, a, b)
        assert net.blackholes() == set()


@pytest.mark.privileged
def test_isolate_cuts_the_host_from_every_host_and_etcd_and_rejoin_undoes_it(
    whole: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    net = whole
    net.expect(set())

    code, out, err = run(capsys, "lab", "isolate", net.name, "a")
    assert code == 0 and "isolated a" in out, err
    lab = labs.load(net.name)
    assert lab.isolated == ["a"] and lab.cuts == []
    net.expect(alone(net, "a"))  # b, c and etcd still reach one another
    assert net.blackholes() == {("a", "b"), ("a", "c"), ("a", "etcd0"), ("b", "a"),
                                ("c", "a"), ("etcd0", "a")}  # fmt: skip
    # etcd's peer port too: nothing of etcd is reachable from a, or reaches a.
    assert net.probe("a", ["etcd0"], PEER_PORT) == {"etcd0": "unreachable"}

    code, out, _ = run(capsys, "lab", "status", net.name)
    assert code == 0 and "isolated: a" in out and "cuts: none" in out
    code, out, _ = run(capsys, "lab", "status", net.name, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["isolated"] == ["a"] and doc["cuts"] == []

    registry = (Path(lab.dir) / "lab.json").read_bytes()
    code, out, _ = run(capsys, "lab", "isolate", net.name, "a")
    assert code == 0 and "a was already isolated" in out
    assert labs.isolate(net.name, "a") is False
    assert (Path(lab.dir) / "lab.json").read_bytes() == registry

    code, out, _ = run(capsys, "lab", "rejoin", net.name, "a")
    assert code == 0 and "a rejoined" in out
    assert labs.load(net.name).isolated == []
    assert net.blackholes() == set()
    net.expect(set())
    code, out, _ = run(capsys, "lab", "rejoin", net.name, "a")
    assert code == 0 and "a was not isolated" in out
    assert labs.rejoin(net.name, "a") is False
    code, out, _ = run(capsys, "lab", "status", net.name)
    assert "isolated: none" in out


@pytest.mark.privileged
def test_cuts_and_isolations_are_kept_apart(whole: Net) -> None:
    net, n = whole, whole.name
    # A cut made first outlives an isolation of one of its hosts.
    assert labs.cut(n, "a", "b")
    assert labs.isolate(n, "a")
    net.expect(alone(net, "a"))
    assert labs.rejoin(n, "a")
    assert labs.load(n).cuts == [("a", "b")]
    net.expect(cut_off(("a", "b")))
    assert labs.heal(n, "a", "b")
    net.expect(set())

    # A cut made while isolated is kept too; healing it leaves the isolation whole.
    assert labs.isolate(n, "b")
    assert labs.cut(n, "b", "c")
    assert labs.heal(n, "b", "c")
    assert labs.cut(n, "c", "b")
    assert not labs.heal(n, "a", "b")  # a-b is blocked by the isolation only: no cut to heal
    net.expect(alone(net, "b"))
    assert labs.rejoin(n, "b")
    net.expect(cut_off(("b", "c")))
    assert labs.heal(n, "b", "c")

    # Two isolated hosts: the routes between them go with the last isolation.
    assert labs.isolate(n, "a") and labs.isolate(n, "c")
    assert labs.load(n).isolated == ["a", "c"]
    net.expect(alone(net, "a") | alone(net, "c"))
    assert labs.rejoin(n, "a")
    net.expect(alone(net, "c"))
    assert labs.rejoin(n, "c")
    net.expect(set())


@pytest.mark.privileged
def test_isolate_and_rejoin_bad_input(whole: Net, capsys: pytest.CaptureFixture[str]) -> None:
    registry = (Path(whole.lab.dir) / "lab.json").read_bytes()
    cases: list[tuple[list[str], int, str]] = [
        (["isolate", whole.name, "z"], 3, "has no host 'z'"),
        (["rejoin", whole.name, "z"], 3, "has no host 'z'"),
        (["isolate", "nope", "a"], 3, "no lab named 'nope'"),
        (["rejoin", "nope", "a"], 3, "no lab named 'nope'"),
        (["isolate", "Bad_Name", "a"], 2, "is not valid"),
        (["isolate", whole.name], 2, "host"),
    ]
    for argv, want_code, want_msg in cases:
        code, _, err = run(capsys, "lab", *argv)
        assert code == want_code, (argv, err)
        assert want_msg in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)
    assert (Path(whole.lab.dir) / "lab.json").read_bytes() == registry


@pytest.mark.privileged
@pytest.mark.slow
def test_isolate_cuts_the_host_from_each_of_three_etcd_members(lab_root: Path) -> None:
    with cluster_lab(lab_root, ["a", "b"], 3) as net:
        assert [net.netns[f"etcd{j}"] for j in range(3)] == [
            f"{net.name}_etcd{j}" for j in range(3)
        ]
        assert labs.isolate(net.name, "a")
        net.expect(alone(net, "a"))
        for j in range(3):  # the members still reach one another's peer ports
            others = [f"etcd{k}" for k in range(3) if k != j]
            assert set(net.probe(f"etcd{j}", others, PEER_PORT).values()) == {"ok"}
        assert labs.rejoin(net.name, "a")
        assert net.blackholes() == set()
        net.expect(set())


def test_blackholes_of_cuts_and_isolations_without_namespaces() -> None:
    def host(name: str, i: int) -> labs.LabHost:
        return labs.LabHost("l", name, f"l-{name}", f"10.0.0.{i}", "", "", 0, "", "")

    lab = labs.Lab("l", "/nowhere", 1, "", [host("a", 1), host("b", 2), host("c", 3)])
    assert labs._blackholes(lab) == set()
    lab.isolated = ["a"]  # no cluster: only the other hosts
    assert labs._blackholes(lab) == {("l-a", "10.0.0.2"), ("l-a", "10.0.0.3"),
                                     ("l-b", "10.0.0.1"), ("l-c", "10.0.0.1")}  # fmt: skip
    lab.cluster = {"etcd_netns": ["l_etcd0", "l_etcd1"],
                   "etcd_addresses": ["10.0.0.201", "10.0.0.202"]}  # fmt: skip
    assert labs._blackholes(lab) >= {("l-a", "10.0.0.201"), ("l_etcd0", "10.0.0.1"),
                                     ("l-a", "10.0.0.202"), ("l_etcd1", "10.0.0.1")}  # fmt: skip
    assert len(labs._blackholes(lab)) == 8
    lab.isolated, lab.cuts = [], [("b", "c")]
    assert labs._blackholes(lab) == {("l-b", "10.0.0.3"), ("l-c", "10.0.0.2")}
    lab.isolated = ["b"]  # b-c needed by both: still one route each way
    assert len(labs._blackholes(lab)) == 8 and ("l-c", "10.0.0.2") in labs._blackholes(lab)


def test_a_registry_naming_an_unknown_isolated_host_is_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(labs.LAB_ROOT_ENV, str(tmp_path))
    lab = labs.Lab("l", str(tmp_path / "l"), 1, "", [])
    doc = lab.to_json()
    assert doc["isolated"] == []
    del doc["isolated"]  # a registry from before isolate
    assert labs.Lab.from_json(doc).isolated == []
    doc["isolated"] = ["ghost"]
    os.makedirs(tmp_path / "l")
    (tmp_path / "l" / "lab.json").write_text(json.dumps(doc))
    with pytest.raises(HeaderCorrupt, match="ghost"):
        labs.load("l")
