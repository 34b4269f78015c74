"""Nodes compute CRC32C in hardware (issue 10): PyPI's crc32c (SSE4.2) in .venv, and the same
module inside nbdkit's embedded /usr/bin/python3, which the plugin points at .venv's
site-packages (Debian's python3-crc32c is software only, about 12 times slower)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import crc32c
import pytest
from conftest import ROOT, require_programs

from replicator import node_process
from replicator.events import read_events
from replicator.volume import Volume

VENV_SITE = (
    ROOT / ".venv" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_venv_crc32c_is_the_hardware_one() -> None:
    assert crc32c.hardware_based is True
    assert Path(crc32c.__file__).resolve().is_relative_to(VENV_SITE.resolve())
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c.crc32c(memoryview(b"123456789")[3:]) == crc32c.crc32c(b"456789")


@pytest.fixture
def node_dir(tmp_path: Path) -> Iterator[Path]:
    require_programs("nbdkit")
    d = tmp_path / "node"
    d.mkdir()
    Volume.create(str(d / "vol1.img"), 8 << 20, name="vol1").close()
    yield d
    if node_process.running_pid(str(d)) is not None:
        node_process.stop(str(d))  # fails the test if the node ignores SIGTERM


def test_a_node_under_nbdkit_computes_crc32c_in_hardware(node_dir: Path) -> None:
    """A real node (nbdkit running plugins/pairvol.py in its embedded interpreter) says so in
    node.started, and the crc32c extension mapped into the nbdkit process is .venv's, not
    Debian's."""
    pid = node_process.start(
        "n1", str(node_dir), "127.0.0.1", nbd_port=free_port(), peer_port=free_port()
    )
    started = [
        e
        for e in read_events(str(node_dir / "events.jsonl"))
        if e["event"] == "node.started" and e["pid"] == pid
    ]
    assert len(started) == 1, started
    assert started[0]["crc32c_hardware"] is True, started[0]
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    libs = {line.split()[-1] for line in maps if "crc32c" in line.rsplit("/", 1)[-1]}
    assert libs, "no crc32c extension is loaded in the nbdkit process"
    venv = str(VENV_SITE.resolve())
    assert all(Path(lib).resolve().is_relative_to(venv) for lib in libs), libs
