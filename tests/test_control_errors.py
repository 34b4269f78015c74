"""Errors cross the node's control socket as one tree: the CLI raises the node's class again
and exits with the code it would have had the error been raised in its own process."""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pairvol.cli import main
from replicator import control, errors
from replicator.errors import (
    AlreadyExists,
    ConnectionFailed,
    HeaderCorrupt,
    IllegalState,
    NotFound,
    PairvolError,
    PeerLost,
    ProtocolError,
    PvidMismatch,
    Timeout,
    UsageError,
    VolumeError,
)
from replicator.journal import JournalFull
from replicator.peer_link import PeerRefused


@pytest.fixture
def node_dir() -> Iterator[Path]:
    # A short path: a unix socket's name must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="pv-ctl-") as d:
        yield Path(d)


def serve(node_dir: Path, handlers: dict[str, control.Handler]) -> control.ControlServer:
    logged: list[str] = []
    server = control.ControlServer(str(node_dir / "control.sock"), handlers, logged.append)
    server.start()
    return server


def raising(e: BaseException) -> control.Handler:
    def handler(_args: dict[str, Any]) -> dict[str, Any]:
        raise e

    return handler


CASES: list[tuple[Callable[[], PairvolError], int]] = [
    (lambda: UsageError("bad"), 2),
    (lambda: NotFound("no volume v9"), 3),
    (lambda: AlreadyExists("there"), 4),
    (lambda: IllegalState("pair g/p is PSUS"), 5),
    (lambda: HeaderCorrupt("no valid header slot"), 6),
    (lambda: PvidMismatch("v1", "00c5247772d2f36b", "1234567890abcdef"), 7),
    (lambda: ProtocolError("bad frame"), 8),
    (lambda: ConnectionFailed("peer b is unreachable"), 20),
    (lambda: PeerLost("peer b hung up"), 20),
    (lambda: Timeout("peer b did not answer"), 21),
    # Defined outside errors.py: registered by subclassing, nothing else.
    (lambda: JournalFull("journal of group g is full"), 5),
    (lambda: PeerRefused(errno.EBUSY, "busy", peer="b"), 5),
]


@pytest.mark.parametrize(("make", "code"), CASES)
def test_the_node_error_is_raised_again_with_its_class_and_exit_code(
    node_dir: Path, capsys: pytest.CaptureFixture[str], make: Callable[[], PairvolError], code: int
) -> None:
    e = make()
    server = serve(node_dir, {"node.status": raising(e)})
    try:
        with pytest.raises(PairvolError) as info:
            control.call(str(node_dir / "control.sock"), "node.status")
        assert type(info.value) is type(e)
        assert str(info.value) == str(e) and info.value.errno == e.errno
        assert info.value.exit_code == e.exit_code == code

        got = main(["node", "status", "--dir", str(node_dir)])
        _out, err = capsys.readouterr()
        assert got == code, err
        assert err == f"pairvol: error: {e}\n"
    finally:
        server.stop()


def test_rebuilt_errors_keep_their_errno_and_remote_flag(node_dir: Path) -> None:
    server = serve(
        node_dir,
        {
            "disk": raising(VolumeError("v1: write: No space left on device", errno.ENOSPC)),
            "proto": raising(ProtocolError("peer sent junk")),
        },
    )
    sock = str(node_dir / "control.sock")
    try:
        with pytest.raises(VolumeError) as v:
            control.call(sock, "disk")
        assert v.value.errno == errno.ENOSPC and v.value.exit_code == 1
        with pytest.raises(ProtocolError) as p:
            control.call(sock, "proto")
        assert p.value.remote is True
    finally:
        server.stop()


def test_a_class_this_process_does_not_know_falls_back_to_its_nearest_known_base(
    node_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class GroupFrozen(IllegalState):  # what a newer node might raise
        pass

    class SomethingNew(PairvolError):
        exit_code = 42

    server = serve(
        node_dir,
        {"node.status": raising(GroupFrozen("group g is frozen")), "x": raising(SomethingNew("?"))},
    )
    monkeypatch.delitem(errors._REGISTRY, "GroupFrozen")  # as if this CLI were older
    monkeypatch.delitem(errors._REGISTRY, "SomethingNew")
    try:
        with pytest.raises(IllegalState) as info:
            control.call(str(node_dir / "control.sock"), "node.status")
        assert type(info.value) is IllegalState and str(info.value) == "group g is frozen"
        assert main(["node", "status", "--dir", str(node_dir)]) == 5
        with pytest.raises(PairvolError) as base:
            control.call(str(node_dir / "control.sock"), "x")
        assert type(base.value) is PairvolError and base.value.exit_code == 1
    finally:
        server.stop()
    assert capsys.readouterr().err == "pairvol: error: group g is frozen\n"


def test_a_bug_in_a_handler_is_the_base_error_and_the_server_keeps_serving(
    node_dir: Path,
) -> None:
    server = serve(node_dir, {"boom": raising(RuntimeError("boom")), "ok": lambda a: {"a": 1}})
    sock = str(node_dir / "control.sock")
    try:
        with pytest.raises(PairvolError, match="internal: RuntimeError: boom") as info:
            control.call(sock, "boom")
        assert type(info.value) is PairvolError
        assert control.call(sock, "ok") == {"a": 1}
        with pytest.raises(UsageError, match="unknown control operation"):
            control.call(sock, "no.such.op")
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("doc", "cls"),
    [
        ({"kind": "NotFound", "message": "gone"}, NotFound),  # an older node: no bases, no errno
        ({"kind": "Nope", "bases": ["Timeout", "PairvolError"], "message": "m"}, Timeout),
        ({"kind": "Nope", "bases": ["Nope2"], "message": "m", "errno": 5}, PairvolError),
        ({"kind": "Timeout", "bases": [7, None], "message": "m", "errno": -1}, Timeout),
    ],
)
def test_from_wire(doc: dict[str, Any], cls: type[PairvolError]) -> None:
    e = errors.from_wire(doc)
    assert type(e) is cls and str(e) == doc["message"]
    assert e.errno == (doc["errno"] if doc.get("errno", 0) > 0 else cls.errno)


def test_to_wire_names_the_class_and_its_bases() -> None:
    assert errors.to_wire(JournalFull("full")) == {
        "kind": "JournalFull",
        "bases": ["IllegalState", "PairvolError"],
        "message": "full",
        "errno": errno.EBUSY,
    }


def test_a_subclass_registers_itself_and_a_taken_kind_is_refused() -> None:
    class MirrorBroken(PairvolError):
        exit_code = 5

    assert errors.error_class("MirrorBroken") is MirrorBroken
    try:
        with pytest.raises(TypeError, match="taken"):
            type("Imposter", (PairvolError,), {"kind": "MirrorBroken", "__module__": "elsewhere"})

        class Renamed(PairvolError):
            kind = "OldWireName"  # a class renamed keeps its name on the wire

        assert errors.error_class("OldWireName") is Renamed
        assert errors.to_wire(Renamed("x"))["kind"] == "OldWireName"
    finally:
        errors._REGISTRY.pop("MirrorBroken", None)
        errors._REGISTRY.pop("OldWireName", None)


def _raw_server(path: str, reply: bytes) -> threading.Thread:
    """A node that answers one request with ``reply`` (bytes, as sent)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(
    ("reply", "cls", "message"),
    [
        (b"not json\n", ProtocolError, "malformed reply"),
        (b'{"ok": false, "error": "x"}\n', ProtocolError, "malformed reply"),
        (b'{"ok": false}\n', ProtocolError, "malformed reply"),
        (b'{"ok": false, "error": {"kind": "NotFound", "mess', PeerLost, "closed the connection"),
    ],
)
def test_malformed_or_cut_replies(
    node_dir: Path, reply: bytes, cls: type[PairvolError], message: str
) -> None:
    path = str(node_dir / "control.sock")
    t = _raw_server(path, reply)
    with pytest.raises(cls, match=message) as info:
        control.call(path, "node.status", timeout=10)
    assert type(info.value) is cls
    t.join(10)


def test_unreachable_nodes_are_connection_errors(node_dir: Path) -> None:
    sock = str(node_dir / "control.sock")
    with pytest.raises(ConnectionFailed, match=r"no node is running in .*does not exist"):
        control.call(sock, "node.status")
    with pytest.raises(ConnectionFailed, match=r"node directory .* does not exist"):
        control.call(str(node_dir / "nope" / "control.sock"), "node.status")
    # A node that died leaves its socket file behind: connecting to it is refused.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock)
    s.close()
    assert os.path.exists(sock)
    with pytest.raises(ConnectionFailed, match="refuses connections") as info:
        control.call(sock, "node.status")
    assert info.value.exit_code == 20


def test_a_node_that_does_not_answer_is_a_timeout(node_dir: Path) -> None:
    release = threading.Event()

    def slow(_args: dict[str, Any]) -> dict[str, Any]:
        release.wait(10)
        return {}

    server = serve(node_dir, {"slow": slow})
    try:
        with pytest.raises(Timeout, match=r"did not answer slow within 0\.2s"):
            control.call(str(node_dir / "control.sock"), "slow", timeout=0.2)
    finally:
        release.set()
        server.stop()


def test_the_reply_on_the_socket(node_dir: Path) -> None:
    server = serve(node_dir, {"full": raising(JournalFull("full"))})
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(node_dir / "control.sock"))
            s.sendall(b'{"op": "full", "args": {}}\n')
            with s.makefile("rb") as f:
                reply = json.loads(f.readline())
    finally:
        server.stop()
    assert reply == {
        "ok": False,
        "error": {
            "kind": "JournalFull",
            "bases": ["IllegalState", "PairvolError"],
            "message": "full",
            "errno": errno.EBUSY,
        },
    }
