"""Storage nodes: one nbdkit process serving TCP and a unix socket, with a control API."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require, require_programs

from pairvol.cli import main
from replicator import control, node_process
from replicator.events import read_events, wait_event
from replicator.volume import Volume

try:
    import nbd
except ImportError:  # pragma: no cover - tools/setup installs python3-libnbd
    nbd = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def node_dir(tmp_path: Path) -> Iterator[Path]:
    require_programs("nbdkit", "nbdinfo")
    d = tmp_path / "node"
    d.mkdir()
    Volume.create(str(d / "vol1.img"), 8 << 20, name="vol1").close()
    yield d
    if node_process.running_pid(str(d)) is not None:
        node_process.stop(str(d))  # fails the test if the node ignores SIGTERM


def nbd_size(uri: str) -> int:
    r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_start_status_serve_stop(node_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code, out, err = run(
        capsys, "node", "start", "--name", "n1", "--dir", str(node_dir),
        "--listen", "127.0.0.1", "--port", str(port), "--peer-port", str(free_port()), "--json",
    )  # fmt: skip
    assert code == 0, err
    pid = json.loads(out)["pid"]
    assert node_process.running_pid(str(node_dir)) == pid

    code, out, _ = run(capsys, "node", "status", "--dir", str(node_dir), "--json")
    status = json.loads(out)
    assert code == 0 and status["name"] == "n1" and status["pid"] == pid
    assert [v["name"] for v in status["volumes"]] == ["vol1"]
    assert status["nbd_uri"] == f"nbd://127.0.0.1:{port}/"

    # One process, two listeners: TCP and the unix socket in the node directory.
    assert nbd_size(f"nbd://127.0.0.1:{port}/vol1") == 8 << 20
    assert nbd_size(f"nbd+unix:///vol1?socket={node_dir}/nbd.sock") == 8 << 20
    mode = stat.S_IMODE(os.stat(node_dir / "control.sock").st_mode)
    assert mode == 0o600

    code, _, err = run(
        capsys, "node", "start", "--name", "n1", "--dir", str(node_dir), "--listen", "127.0.0.1",
        "--port", str(free_port()),
    )  # fmt: skip
    assert code == 5 and "already serving" in err

    code, _, _ = run(capsys, "node", "stop", "--dir", str(node_dir))
    assert code == 0 and node_process.running_pid(str(node_dir)) is None
    assert not (node_dir / "control.sock").exists()
    events = [e["event"] for e in read_events(str(node_dir / "events.jsonl"))]
    assert events == ["node.started", "node.stopped"]
    code, _, err = run(capsys, "node", "stop", "--dir", str(node_dir))
    assert code == 5 and "no node is running" in err


def test_restart_after_kill_9(node_dir: Path) -> None:
    port, peer = free_port(), free_port()
    pid = node_process.start("n1", str(node_dir), "127.0.0.1", nbd_port=port, peer_port=peer)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while node_process.running_pid(str(node_dir)) == pid:  # dead once gone or a zombie
        assert time.monotonic() < deadline, "SIGKILLed node still running"
        time.sleep(0.01)
    # The pidfile, sockets and listeners it left behind do not stop a new start.
    pid2 = node_process.start("n1", str(node_dir), "127.0.0.1", nbd_port=port, peer_port=peer)
    assert pid2 != pid
    assert nbd_size(f"nbd://127.0.0.1:{port}/vol1") == 8 << 20
    started = [e for e in read_events(str(node_dir / "events.jsonl")) if e["pid"] == pid2]
    assert len(started) == 1


def test_control_api_stop_and_unknown_ops(node_dir: Path) -> None:
    node_process.start(
        "n1", str(node_dir), "127.0.0.1", nbd_port=free_port(), peer_port=free_port()
    )
    sock = str(node_dir / "control.sock")
    with pytest.raises(Exception, match="unknown control operation"):
        control.call(sock, "no.such.op")
    assert control.call(sock, "node.stop") == {"stopping": "n1"}
    wait_event(str(node_dir / "events.jsonl"), "node.stopped", timeout=20)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--listen", "not-an-ip"], 2, "not an IP address"),
        (["--listen", "127.0.0.1", "--port", "0"], 2, "not a TCP port"),
        (["--listen", "127.0.0.1", "--secret-file", "/nonexistent"], 3, "does not exist"),
        (["--listen", "127.0.0.1", "--name", "bad name"], 2, "node name"),
        (["--listen", "192.0.2.1"], 2, "cannot listen"),
        (["--listen", "127.0.0.1", "--max-connections", "-1"], 2, "max connections -1"),
    ],
)
def test_bad_start_input(
    node_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    base = ["node", "start", "--dir", str(node_dir), "--port", str(free_port())]
    base += ["--peer-port", str(free_port())]
    if "--name" not in argv:
        base += ["--name", "n1"]
    got, _, err = run(capsys, *base, *argv)
    assert got == code and message in err, err
    assert node_process.running_pid(str(node_dir)) is None


def test_missing_dir_and_no_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    got, _, err = run(
        capsys, "node", "start", "--name", "n", "--dir", str(tmp_path / "nope"),
        "--listen", "127.0.0.1",
    )  # fmt: skip
    assert got == 3 and "not a directory" in err
    got, _, err = run(capsys, "node", "status", "--dir", str(tmp_path))
    assert got == 20 and "no node is running" in err


def nbd_open(uri: str) -> Any:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def nbd_close(h: Any) -> None:
    """Hang up now (libnbd 1.14's Python handle has no close(); __del__ is nbd_close)."""
    if h.aio_is_ready():
        h.shutdown()
    h.__del__()
    del h._o


def test_max_connections_bounds_nbd_clients(node_dir: Path) -> None:
    """Issue 7: N clients are served, client N+1 is refused at connect (TCP and the unix
    socket count together), and a slot that frees up serves the next client."""
    require(nbd is not None, "needs the libnbd Python module (python3-libnbd)")
    port = free_port()
    node_process.start(
        "n1", str(node_dir), "127.0.0.1", nbd_port=port, peer_port=free_port(),
        max_connections=2,
    )  # fmt: skip
    tcp = f"nbd://127.0.0.1:{port}/vol1"
    handles = [nbd_open(tcp), nbd_open(f"nbd+unix:///vol1?socket={node_dir}/nbd.sock")]
    try:
        for i, h in enumerate(handles):
            h.pwrite(bytes([i + 1]) * 4096, 4096 * i)
            assert h.pread(4096, 4096 * i) == bytes([i + 1]) * 4096
        with pytest.raises(nbd.Error, match="disconnected"):
            nbd_open(tcp)
        assert "too many clients connected" in (node_dir / "node.log").read_text()
        nbd_close(handles.pop(0))
        deadline = time.monotonic() + 10
        while True:  # the server notices the hang-up on its own thread
            try:
                handles.append(nbd_open(tcp))
                break
            except nbd.Error:
                assert time.monotonic() < deadline, "the freed slot was never reused"
                time.sleep(0.05)
        assert handles[-1].pread(4096, 0) == bytes([1]) * 4096
    finally:
        for h in handles:
            nbd_close(h)  # a node with clients still connected may not stop on SIGTERM


def test_secret_file_keyring_or_shared(
    node_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.keys"
    bad.write_text("# keys of n1\nb K1\nc K2 extra\n")
    base = ["node", "start", "--name", "n1", "--dir", str(node_dir), "--listen", "127.0.0.1"]
    base += ["--port", str(free_port()), "--peer-port", str(free_port())]
    code, _, err = run(capsys, *base, "--secret-file", str(bad))
    assert code == 2 and f"secret file {bad} line 3: expected 'PEERNAME SECRET'" in err, err

    ring = tmp_path / "n1.keys"
    ring.write_text("# keys of n1\nc K-n1-c\nb K-n1-b\n")
    code, _, err = run(capsys, *base, "--secret-file", str(ring))
    assert code == 0, err
    status = control.call(str(node_dir / "control.sock"), "node.status")
    assert status["peer_secret"] == "keyring" and status["peer_keyring"] == ["b", "c"]
    assert "K-n1" not in json.dumps(status)
    node_process.stop(str(node_dir))

    shared = tmp_path / "shared"
    shared.write_text("one-secret-for-all\n")
    code, _, err = run(capsys, *base, "--secret-file", str(shared))
    assert code == 0, err
    status = control.call(str(node_dir / "control.sock"), "node.status")
    assert status["peer_secret"] == "shared" and status["peer_keyring"] == []
    assert "any node that has it can pose as any other" in (node_dir / "node.log").read_text()
