"""Labs: real network namespaces, real nodes; and the latency proxy on loopback.

Every lab lives under the test's own PAIRVOL_LAB_ROOT with a unique name and is torn down by
a finalizer (``lab down``), which also checks that nothing of it is left.  Hosts only ever
talk to their own lab's addresses or to loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import require, require_programs, require_root

from cluster import blockdev
from cluster.pvid_cache import CacheFile
from pairvol import lab as labs
from pairvol.cli import main
from pairvol.latency_proxy import parse_endpoint, start_proxy
from replicator.errors import (
    ExternalCommandFailed,
    HeaderCorrupt,
    NotFound,
    ProtocolError,
    UsageError,
)
from replicator.node import read_secret
from replicator.peer_auth import Handshake, PeerSecrets, parse_secrets
from replicator.wire import Message

NBD_GREETING = b"NBDMAGIC"

# A client that proves connectivity: connect with a bounded timeout and read the NBD greeting.
PROBE = (
    "import socket, sys\n"
    "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)\n"
    "s.settimeout(2)\n"
    "sys.exit(0 if s.recv(8) == b'NBDMAGIC' else 1)\n"
)

# A client that keeps one connection open across a cut: it echoes through the server on demand
# ("send N" on stdin) and reports "got N" or "timeout".
ECHO_CLIENT = (
    "import socket, sys\n"
    "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)\n"
    "for line in sys.stdin:\n"
    "    n, wait = line.split()\n"
    "    s.settimeout(float(wait))\n"
    "    s.sendall(n.encode() + b'\\n')\n"
    "    try:\n"
    "        print('got', s.recv(64).decode().strip(), flush=True)\n"
    "    except TimeoutError:\n"
    "        print('timeout', flush=True)\n"
)
ECHO_SERVER = (
    "import socket, sys\n"
    "srv = socket.create_server((sys.argv[1], int(sys.argv[2])))\n"
    "print('ready', flush=True)\n"
    "c, _ = srv.accept()\n"
    "while (data := c.recv(64)):\n"
    "    c.sendall(data)\n"
)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def lab_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "labs"
    monkeypatch.setenv(labs.LAB_ROOT_ENV, str(root))
    monkeypatch.delenv(labs.LAB_ENV, raising=False)
    return root


@pytest.fixture
def lab_name() -> str:
    return f"t{os.getpid() % 100000}{secrets.token_hex(3)}"


def _netns_of(name: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(f"{name}-")]


@pytest.fixture
def make_lab(lab_root: Path, lab_name: str) -> Iterator[Callable[..., dict[str, object]]]:
    """``make_lab("a", "b")`` brings lab ``lab_name`` up; the finalizer takes it down."""
    require_root()
    require_programs("ip", "nbdkit", "nbdinfo")
    made: list[str] = []

    def make(*hosts: str, name: str = lab_name) -> dict[str, object]:
        made.append(name)
        doc = labs.up(name, list(hosts)).to_json()
        return doc

    yield make
    for name in made:
        labs.down(name)
        assert _netns_of(name) == [], f"namespaces of lab {name} left behind"
        assert not (lab_root / name).exists()


def lab_exec(
    pairvol_bin: str, name: str, host: str, *cmd: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [pairvol_bin, "lab", "exec", name, host, "--", *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def reachable(pairvol_bin: str, name: str, src: str, address: str, port: int = 10809) -> bool:
    r = lab_exec(pairvol_bin, name, src, sys.executable, "-c", PROBE, address, str(port))
    return r.returncode == 0


@pytest.mark.privileged
def test_up_status_exec_nbd(
    make_lab: Callable[..., dict[str, object]],
    lab_name: str,
    lab_root: Path,
    pairvol_bin: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_lab("a", "b")
    lab = labs.load(lab_name)
    a, b = lab.host("a"), lab.host("b")
    assert lab.state == "up" and labs.names() == [lab_name]
    assert a.netns == f"{lab_name}-a" and a.dir == str(lab_root / lab_name / "a")
    assert a.nbd_uri == f"nbd://{a.address}/" and a.control == os.path.join(a.dir, "control.sock")
    for h in (a, b):
        assert h.address.startswith(("198.18.", "198.19."))
    assert stat.S_IMODE(os.stat(lab.secret_file).st_mode) == 0o600
    for h, peer in ((a, "b"), (b, "a")):  # per-link keyrings, private too
        assert h.secret_file == str(lab_root / lab_name / f"{h.host}.keys")
        assert stat.S_IMODE(os.stat(h.secret_file).st_mode) == 0o600
        assert read_secret(h.secret_file).peers == (peer,)
    assert read_secret(a.secret_file).for_peer("b") == read_secret(b.secret_file).for_peer("a")

    code, out, _ = run(capsys, "lab", "status", lab_name, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["cuts"] == [] and doc["bridge"]["netns"] == f"{lab_name}-br"
    assert all(h["node_pid"] and h["netns_exists"] for h in doc["hosts"])
    code, out, _ = run(capsys, "lab", "list", "--json")
    assert code == 0 and [x["name"] for x in json.loads(out)["labs"]] == [lab_name]

    # The node answers on its host, reached through `lab exec` and $PAIRVOL_NODE_DIR.
    r = lab_exec(pairvol_bin, lab_name, "b", "pairvol", "node", "status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nbd_uri"] == b.nbd_uri

    # A volume created in b's directory is served, and readable from a over the lab network.
    r = lab_exec(pairvol_bin, lab_name, "b", "pairvol", "volume", "create", "v1.img",
                 "--size", "4M", "--name", "v1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = lab_exec(pairvol_bin, lab_name, "a", "nbdinfo", "--size", f"{b.nbd_uri}v1")
    assert r.returncode == 0 and int(r.stdout) == 4 << 20, r.stderr

    # exec: cwd, environment, exit status passed through.
    script = 'echo "$PWD $PAIRVOL_NODE_DIR $PAIRVOL_LAB $PAIRVOL_HOST_CACHE"; exit 7'
    r = lab_exec(pairvol_bin, lab_name, "a", "sh", "-c", script)
    assert r.returncode == 7
    assert r.stdout.split() == [a.dir, a.dir, lab_name, os.path.join(a.dir, "host-cache.json")]

    # resolve_node finds lab hosts by node name.
    found = labs.resolve_node("b")
    assert found is not None and found.address == b.address
    assert labs.resolve_node("zz") is None

    # The latency proxy runs on a lab host: from a, through a's proxy, to b's NBD server.
    proxy = subprocess.Popen(
        [pairvol_bin, "lab", "exec", lab_name, "a", "--", sys.executable, "-m",
         "pairvol.latency_proxy", "--listen", f"{a.address}:20809",
         "--target", f"{b.address}:10809", "--delay-ms", "5"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proxy.stdout is not None
        assert proxy.stdout.readline().strip() == f"listening on {a.address}:20809"
        r = lab_exec(pairvol_bin, lab_name, "a", "nbdinfo", "--size", f"nbd://{a.address}:20809/v1")
        assert r.returncode == 0 and int(r.stdout) == 4 << 20, r.stderr
    finally:
        proxy.terminate()  # `lab exec` passes SIGTERM on to the proxy
        assert proxy.wait(timeout=20) == 0
        assert proxy.stdout is not None
        proxy.stdout.close()


@pytest.mark.privileged
def test_cut_and_heal(
    make_lab: Callable[..., dict[str, object]],
    lab_name: str,
    pairvol_bin: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_lab("a", "b", "c")
    lab = labs.load(lab_name)
    a, b, c = (lab.host(h) for h in "abc")
    assert reachable(pairvol_bin, lab_name, "a", b.address)

    # One connection a -> b opened before the cut (an echo server on b).
    server = subprocess.Popen(
        [pairvol_bin, "lab", "exec", lab_name, "b", "--", sys.executable, "-c", ECHO_SERVER,
         b.address, "7000"], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs = [server]
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = subprocess.Popen(
            [pairvol_bin, "lab", "exec", lab_name, "a", "--", sys.executable, "-c", ECHO_CLIENT,
             b.address, "7000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(client)

        def echo(n: int, wait: float) -> str:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(f"{n} {wait}\n")
            client.stdin.flush()
            return client.stdout.readline().strip()

        assert echo(1, 5) == "got 1"

        code, out, _ = run(capsys, "lab", "cut", lab_name, "a", "b")
        assert code == 0 and "cut a <-> b" in out
        assert labs.load(lab_name).cuts == [("a", "b")]
        assert not reachable(pairvol_bin, lab_name, "a", b.address)
        assert not reachable(pairvol_bin, lab_name, "b", a.address)
        assert reachable(pairvol_bin, lab_name, "a", c.address)  # other pairs unaffected
        assert reachable(pairvol_bin, lab_name, "c", b.address)
        assert echo(2, 1) == "timeout"  # the established connection is cut too

        code, out, _ = run(capsys, "lab", "cut", lab_name, "b", "a")
        assert code == 0 and "already cut" in out
        code, out, _ = run(capsys, "lab", "status", lab_name)
        assert "cuts: a-b" in out

        code, out, _ = run(capsys, "lab", "heal", lab_name, "b", "a")
        assert code == 0 and "healed" in out
        assert labs.load(lab_name).cuts == []
        assert reachable(pairvol_bin, lab_name, "a", b.address)
        assert reachable(pairvol_bin, lab_name, "b", a.address)
        # TCP retransmits what the cut held back: the old connection carries on.
        line = echo(3, 15)
        assert line.startswith("got 2"), line
        code, out, _ = run(capsys, "lab", "heal", lab_name, "a", "b")
        assert code == 0 and "was not cut" in out
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    with contextlib.suppress(BrokenPipeError):
                        pipe.close()


@pytest.mark.privileged
def test_kill_and_start(
    make_lab: Callable[..., dict[str, object]],
    lab_name: str,
    pairvol_bin: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_lab("a", "b")
    lab = labs.load(lab_name)
    b = lab.host("b")
    before = labs.netns_pids(b.netns)
    assert before

    code, out, _ = run(capsys, "lab", "kill", lab_name, "b")
    assert code == 0 and "killed" in out
    assert labs.netns_pids(b.netns) == []
    assert not any(labs._alive(p) for p in before)
    assert not reachable(pairvol_bin, lab_name, "a", b.address)
    code, out, _ = run(capsys, "lab", "status", lab_name, "--json")
    assert [h["node_pid"] for h in json.loads(out)["hosts"]][1] is None

    code, out, _ = run(capsys, "lab", "start", lab_name, "b")
    assert code == 0 and "started" in out
    assert reachable(pairvol_bin, lab_name, "a", b.address)
    r = lab_exec(pairvol_bin, lab_name, "b", "pairvol", "node", "status", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "b"

    code, _, err = run(capsys, "lab", "start", lab_name, "b")
    assert code == 5 and "already running" in err


@pytest.mark.privileged
def test_down_is_idempotent_and_cleans_half_built_labs(
    make_lab: Callable[..., dict[str, object]],
    lab_name: str,
    lab_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_lab("a", "b")
    # Half gone: host a's processes and namespace vanished under the lab.
    labs.kill_host(lab_name, "a")
    subprocess.run(["ip", "netns", "del", f"{lab_name}-a"], check=True, timeout=10)
    code, out, _ = run(capsys, "lab", "down", lab_name)
    assert code == 0 and f"deleted namespace {lab_name}-b" in out
    assert _netns_of(lab_name) == [] and not (lab_root / lab_name).exists()
    code, out, _ = run(capsys, "lab", "down", lab_name)
    assert code == 0 and "nothing to do" in out


@pytest.mark.privileged
def test_up_refuses_existing_and_rolls_back_failures(
    make_lab: Callable[..., dict[str, object]],
    lab_name: str,
    lab_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_lab("a", "b")
    registry = (lab_root / lab_name / "lab.json").read_bytes()
    code, _, err = run(capsys, "lab", "up", lab_name, "--hosts", "a,b")
    assert code == 4 and "already exists" in err
    assert (lab_root / lab_name / "lab.json").read_bytes() == registry

    # A namespace that is in the way: refused before anything is created.
    other = f"{lab_name}x"
    subprocess.run(["ip", "netns", "add", f"{other}-b"], check=True, timeout=10)
    try:
        code, _, err = run(capsys, "lab", "up", other, "--hosts", "a,b")
        assert code == 4 and f"{other}-b already exists" in err
        assert _netns_of(other) == [f"{other}-b"] and not (lab_root / other).exists()
    finally:
        subprocess.run(["ip", "netns", "del", f"{other}-b"], check=True, timeout=10)

    # A node that cannot start: up fails and removes what it built.
    def broken(lab: labs.Lab, hosts: list[labs.LabHost]) -> None:
        raise ExternalCommandFailed("node start failed (injected)")

    monkeypatch.setattr(labs, "_start_nodes", broken)
    code, _, err = run(capsys, "lab", "up", other, "--hosts", "a,b")
    assert code == 9 and "injected" in err
    assert _netns_of(other) == [] and not (lab_root / other).exists()


@pytest.mark.privileged
def test_bad_inputs_change_nothing(
    make_lab: Callable[..., dict[str, object]],
    lab_name: str,
    lab_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_lab("a", "b")
    registry = (lab_root / lab_name / "lab.json").read_bytes()
    n = lab_name
    cases: list[tuple[list[str], int, str]] = [
        (["up", "Bad_Name", "--hosts", "a"], 2, "lab name 'Bad_Name' is not valid"),
        (["up", "x" * 25, "--hosts", "a"], 2, "is not valid"),
        (["up", "x-", "--hosts", "a"], 2, "is not valid"),
        (["up", "ok", "--hosts", "a,a"], 2, "listed twice"),
        (["up", "ok", "--hosts", "a,,b"], 2, "host name '' is not valid"),
        (["up", "ok", "--hosts", "br"], 2, "reserved"),
        (["up", "ok", "--hosts", "a" * 15], 2, "1 to 14 characters"),
        (["up", "ok", "--hosts", "a b"], 2, "is not valid"),
        (["up", "ok"], 2, "--hosts"),
        (["status", "nope"], 3, "no lab named 'nope'"),
        (["status", "../etc"], 2, "is not valid"),
        (["cut", n, "a", "a"], 2, "from itself"),
        (["heal", n, "b", "b"], 2, "from itself"),
        (["cut", n, "a", "z"], 3, "has no host 'z'"),
        (["cut", "nope", "a", "b"], 3, "no lab named"),
        (["kill", n, "z"], 3, "has no host 'z'"),
        (["start", n, "z"], 3, "has no host 'z'"),
        (["start", n, "a"], 5, "already running"),
        (["exec", n, "z", "--", "true"], 3, "has no host 'z'"),
        (["exec", n, "a"], 2, "no command given"),
        (["exec", n, "a", "--"], 2, "no command given"),
        (["exec", n, "a", "--", "no-such-command-xyz"], 3, "not found on a"),
        (["down", "Bad"], 2, "is not valid"),
    ]
    for argv, want_code, want_msg in cases:
        code, _, err = run(capsys, "lab", *argv)
        assert code == want_code, (argv, err)
        assert want_msg in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)
    assert (lab_root / lab_name / "lab.json").read_bytes() == registry
    assert labs.names() == [lab_name]
    assert sorted(_netns_of(lab_name)) == sorted(f"{lab_name}-{h}" for h in ("a", "b", "br"))


@pytest.mark.privileged
def test_two_labs_coexist_isolated(
    request: pytest.FixtureRequest,
    make_lab: Callable[..., dict[str, object]],
    lab_name: str,
    pairvol_bin: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_lab("a", "b")
    second = f"{lab_name}z"

    def remove_second() -> None:
        labs.down(second)
        assert _netns_of(second) == []

    request.addfinalizer(remove_second)
    code, out, err = run(capsys, "lab", "up", second, "--hosts", "a,c", "--json")
    assert code == 0, err
    doc = json.loads(out)
    first = labs.load(lab_name)
    assert doc["subnet"] != first.subnet
    assert [h["host"] for h in doc["hosts"]] == ["a", "c"]
    code, out, _ = run(capsys, "lab", "list")
    assert lab_name in out and second in out
    # Each lab is its own network: a host of one lab does not reach the other lab.
    assert reachable(pairvol_bin, second, "c", doc["hosts"][0]["address"])
    assert not reachable(pairvol_bin, second, "c", first.host("b").address)


def _pump(a: Handshake, b: Handshake) -> None:
    """Run initiator ``a`` against acceptor ``b`` in memory until neither has more to say."""
    inbox: list[list[Message]] = [b.start(), a.start()]  # what a, and b, have yet to read
    sides = (a, b)
    while any(inbox):
        for i in (0, 1):
            while inbox[i] and not sides[i].failed:
                with contextlib.suppress(ProtocolError):  # failed: it reads no more
                    inbox[1 - i] += sides[i].receive(inbox[i].pop(0))
            if sides[i].failed:
                inbox[i].clear()


def test_link_keys_are_per_pair_so_no_host_can_pose_as_another() -> None:
    master = b"0123456789abcdef" * 4
    hosts = ["a", "b", "c"]
    rings = {h: parse_secrets(labs.keyring_text(master, h, hosts).encode()) for h in hosts}
    assert {h: r.peers for h, r in rings.items()} == {"a": ("b", "c"), "b": ("a", "c"),
                                                      "c": ("a", "b")}  # fmt: skip
    keys = {(x, y): rings[x].for_peer(y) for x in hosts for y in hosts if x != y}
    assert all(keys[x, y] == keys[y, x] for x, y in keys)  # both ends hold the link's key
    assert len({keys[x, y] for x, y in keys}) == 3  # and every link has its own
    assert labs.link_key(master, "a", "b") != labs.link_key(b"other" * 8, "a", "b")
    # c, with every key it has, claiming to be a, against b: refused.
    for key in (rings["c"], PeerSecrets.shared_secret(keys["c", "b"] or b"")):
        impostor = Handshake("initiator", key, "a")
        b = Handshake("acceptor", rings["b"], "b")
        _pump(impostor, b)
        assert b.failed and not b.done and "wrong secret" in str(b.error)
    honest, b = Handshake("initiator", rings["c"], "c"), Handshake("acceptor", rings["b"], "b")
    _pump(honest, b)
    assert b.done and b.peer_name == "c"
    # A lone host still gets a keyring that parses (naming only itself).
    assert parse_secrets(labs.keyring_text(master, "a", ["a"]).encode()).peers == ("a",)


def test_registry_and_resolve_node(lab_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python API over registry files alone (no namespaces needed)."""

    def fake(name: str, index: int, hosts: list[str]) -> None:
        d = lab_root / name
        d.mkdir(parents=True)
        lab_hosts = [
            labs.LabHost(name, h, f"{name}-{h}", labs.host_address(index, i), str(d / h),
                         f"nbd://{labs.host_address(index, i)}/", 10810, str(d / h / "c.sock"))
            for i, h in enumerate(hosts)
        ]  # fmt: skip
        labs._save(labs.Lab(name, str(d), index, str(d / "secret"), lab_hosts, state="up"))

    assert labs.names() == []
    fake("one", 1, ["a", "b"])
    fake("two", 2, ["a", "c"])
    assert labs.names() == ["one", "two"]
    assert labs.load("two").host("c").address == "198.18.2.2"
    assert labs.subnet(300).compressed == "198.19.44.0/24"
    assert labs.free_subnet({1, 2}) == 3

    b = labs.resolve_node("b")
    assert b is not None and b.lab == "one" and b.nbd_uri == "nbd://198.18.1.2/"
    with pytest.raises(UsageError, match="several labs"):
        labs.resolve_node("a")
    found = labs.resolve_node("a", lab="two")
    assert found is not None and found.address == "198.18.2.1"
    monkeypatch.setenv(labs.LAB_ENV, "one")
    found = labs.resolve_node("a")
    assert found is not None and found.lab == "one"
    assert labs.resolve_node("c") is None
    with pytest.raises(NotFound):
        labs.resolve_node("a", lab="three")
    with pytest.raises(NotFound):
        labs.load("three")

    (lab_root / "two" / "lab.json").write_text("{not json")
    with pytest.raises(HeaderCorrupt):
        labs.load("two")


# --------------------------------------------------------------------------- latency proxy


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A loopback echo server (one thread per connection) for the proxy tests."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve(c: socket.socket) -> None:
        with c:
            try:
                while data := c.recv(65536):
                    c.sendall(data)
            except OSError:
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            c.settimeout(None)
            conns.append(c)
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[:2]
    stop.set()
    t.join(5)
    srv.close()
    for c in conns:
        c.close()


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def test_proxy_adds_at_least_the_delay(echo_server: tuple[str, int]) -> None:
    with start_proxy(("127.0.0.1", 0), echo_server, delay_s=0.05) as proxy:
        s = socket.create_connection(proxy.address, timeout=10)
        with s:
            for _ in range(3):
                t0 = time.monotonic()
                s.sendall(b"ping")
                assert recv_exactly(s, 4) == b"ping"
                assert time.monotonic() - t0 >= 0.1  # 50 ms each way; a lower bound only


def test_proxy_keeps_order_under_jitter_and_forwards_eof(echo_server: tuple[str, int]) -> None:
    payload = os.urandom(1 << 20)

    def send_in_small_chunks(s: socket.socket) -> None:
        for i in range(0, len(payload), 1000):
            s.sendall(payload[i : i + 1000])

    with start_proxy("127.0.0.1:0", echo_server, delay_s=0.001, jitter_s=0.01) as proxy:
        s = socket.create_connection(proxy.address, timeout=20)
        with s:
            sender = threading.Thread(target=send_in_small_chunks, args=(s,))
            sender.start()
            got = recv_exactly(s, len(payload))
            sender.join(10)
            assert got == payload
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""  # our EOF reached the server, and its EOF came back


def test_proxy_stop_closes_connections(echo_server: tuple[str, int]) -> None:
    proxy = start_proxy(("127.0.0.1", 0), echo_server, delay_s=0)
    s = socket.create_connection(proxy.address, timeout=10)
    s.sendall(b"x")
    assert recv_exactly(s, 1) == b"x"
    proxy.stop()
    assert s.recv(1) == b""
    s.close()
    with pytest.raises(OSError):
        socket.create_connection(proxy.address, timeout=2).close()


def test_proxy_bad_input() -> None:
    for bad in ("127.0.0.1", "host:80", "127.0.0.1:99999", ":80"):
        with pytest.raises(UsageError):
            parse_endpoint(bad)
    assert parse_endpoint("[::1]:80") == ("::1", 80)
    with pytest.raises(UsageError):
        start_proxy("127.0.0.1:0", "127.0.0.1:1", delay_s=-1)
    r = subprocess.run(
        [sys.executable, "-m", "pairvol.latency_proxy", "--listen", "nope", "--target",
         "127.0.0.1:1", "--delay-ms", "1"], capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not ADDR:PORT" in r.stderr


@pytest.mark.privileged
def test_a_host_cannot_pose_as_another_to_a_node(
    make_lab: Callable[..., dict[str, object]], lab_name: str, pairvol_bin: str
) -> None:
    """Issue 7 on real nodes: c, with its own keyring, cannot pass for a at b; as c it can."""
    make_lab("a", "b", "c")
    lab = labs.load(lab_name)
    b, c = lab.host("b"), lab.host("c")
    script = (
        "import sys\n"
        "from replicator import wire\n"
        "from replicator.errors import ConnectionFailed\n"
        "from replicator.node import read_secret\n"
        "from replicator.peer_link import PeerClient\n"
        "keys = read_secret(sys.argv[3])\n"
        "c = PeerClient(sys.argv[4], sys.argv[1], int(sys.argv[2]), keys, lambda m: None)\n"
        "try:\n"
        "    print('answer:', c.request(wire.Ping(7), timeout=10))\n"
        "except ConnectionFailed as e:\n"
        "    print('refused:', e)\n"
        "c.close()\n"
    )
    args = (b.address, str(b.peer_port), c.secret_file)
    r = lab_exec(pairvol_bin, lab_name, "c", sys.executable, "-c", script, *args, "a")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused:") and "wrong secret" in r.stdout, r.stdout
    r = lab_exec(pairvol_bin, lab_name, "c", sys.executable, "-c", script, *args, "c")
    assert r.returncode == 0 and r.stdout.startswith("answer: Pong"), r.stdout + r.stderr
    log = Path(b.dir, "node.log").read_text()
    assert "peer 'a' failed authentication (wrong secret)" in log
    assert "peer 'c' connected" in log


@pytest.fixture
def loop_bindings() -> Iterator[list[blockdev.LoopBinding]]:
    """Loop-device bindings a test made; any still in place at the end is detached (a leak
    the test failed on must not outlive it)."""
    made: list[blockdev.LoopBinding] = []
    yield made
    for binding in made:
        if binding.in_place():
            subprocess.run(["losetup", "-d", binding.device], check=False, timeout=30)


def _attach_on(pairvol_bin: str, name: str, host: labs.LabHost, volume: str) -> tuple[str, str]:
    """``host attach`` run on ``host`` (in its namespace, so nbdfuse mounts in a mount
    namespace of its own, as an agent's does): (the cached device name, the block device)."""
    uri = f"nbd+unix:///{volume}?socket={host.dir}/nbd.sock"
    r = lab_exec(pairvol_bin, name, host.host, "pairvol", "host", "scan", uri, "--as", volume)
    assert r.returncode == 0, r.stderr
    r = lab_exec(pairvol_bin, name, host.host, "pairvol", "host", "attach", volume, "--json")
    assert r.returncode == 0, r.stderr
    device = str(json.loads(r.stdout)["device"])
    assert device.startswith("/dev/loop"), device  # this test is about nbdfuse + losetup
    return volume, device


@pytest.mark.privileged
def test_a_hosts_loop_devices_go_with_it_when_killed_and_at_down(
    make_lab: Callable[..., dict[str, object]],
    lab_name: str,
    pairvol_bin: str,
    loop_bindings: list[blockdev.LoopBinding],
) -> None:
    """A loop device over nbdfuse outlives nbdfuse: SIGKILLed with its host, it leaves the
    device bound to a dead file (shown as ``/nbd`` once its mount namespace is gone) that
    nothing detaches.  ``lab kill`` and ``lab down`` release exactly the host's own."""
    require_programs("nbdfuse", "losetup", "fusermount3")
    require(os.path.exists("/dev/loop-control"), "needs loop devices (/dev/loop-control)")
    require(not blockdev.nbd_driver_present(), "the kernel NBD driver is present: no loop")
    make_lab("a")
    a = labs.load(lab_name).host("a")
    for volume in ("v1", "v2"):
        assert main(["volume", "create", os.path.join(a.dir, volume), "--size", "8M"]) == 0

    # A crash (every process of the host SIGKILLed, nbdfuse with them).
    name, device = _attach_on(pairvol_bin, lab_name, a, "v1")
    binding = blockdev.current_binding(device)
    assert binding is not None and binding.in_place()
    loop_bindings.append(binding)
    labs.kill_host(lab_name, "a")
    assert not binding.in_place(), f"{device} is left bound to a dead nbdfuse"
    # Restarted, the host detaches its stale attachment cleanly: nothing left to undo but
    # the working directory.
    labs.start_node(lab_name, "a")
    r = lab_exec(pairvol_bin, lab_name, "a", "pairvol", "host", "detach", name, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == [
        f"removed {os.path.join(a.dir, 'host-cache.attach', name)}"
    ]

    # nbdfuse alone dies: its mount namespace (that of the ``lab exec`` that attached) goes
    # with it, the backing file reads ``/nbd``, and ``host detach`` still knows the device.
    _, device = _attach_on(pairvol_bin, lab_name, a, "v2")
    binding = blockdev.current_binding(device)
    assert binding is not None
    loop_bindings.append(binding)
    cached = CacheFile(os.path.join(a.dir, "host-cache.json")).read().get("v2").attachment
    assert cached is not None and cached.helper_pid is not None
    helper = psutil.Process(cached.helper_pid)
    helper.kill()
    psutil.wait_procs([helper], timeout=30)  # not our child: bounded wait through psutil
    assert blockdev.loop_backing_file(device) == "/nbd" and binding.in_place()
    r = lab_exec(pairvol_bin, lab_name, "a", "pairvol", "host", "detach", "v2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"][0] == f"losetup -d {device}"
    assert not binding.in_place()

    # down with a device attached: detached while its nbdfuse runs, so the node stops on
    # SIGTERM (no client holds it) rather than being SIGKILLed, and no loop device is left.
    _, device = _attach_on(pairvol_bin, lab_name, a, "v2")
    binding = blockdev.current_binding(device)
    assert binding is not None and binding.in_place()
    loop_bindings.append(binding)
    started = time.monotonic()
    done = labs.down(lab_name)
    assert not binding.in_place(), f"{device} is left bound after lab down: {done}"
    # down cannot see the FUSE mount (another mount namespace), so it SIGTERMs nbdfuse at
    # once instead of waiting EXIT_TIMEOUT for an exit that an unmount would have caused.
    assert time.monotonic() - started < blockdev.EXIT_TIMEOUT, done
    assert f"a: detached v2 ({device})" in done and any("stopped node a" in s for s in done)
