"""Compression on peer links (issue 12, item 6) end to end: the handshake's codec offer over
real sockets, a pair created with ``--compress`` in the in-process runtime (copy, mirrored
writes, verify, restarts, a swap), and the CLI's option."""

from __future__ import annotations

import errno
import socket
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_peer_link import SECRET, WAIT, Log, Recorder, read_until_closed
from test_runtime_inproc import (
    CHUNK,
    INTERVAL,
    Lab,
    Node,
    identical,
    noise,
    running_lab,
    wait_copy,
    write,
)

from pairvol.cli import main
from pairvol.cli.pair import merge_sides
from replicator import compression, peer_link, wire
from replicator.errors import UsageError
from replicator.peer_auth import Handshake
from replicator.peer_link import Handler, PeerClient, PeerServer

TEXT = (b"pairvol mirrors blocks; the quick brown fox jumps over the lazy dog. " * 1000)[:CHUNK]


def flags_of(parts: list[wire.Blob]) -> int:
    flags: int = struct.unpack_from("<H", bytes(parts[0][:8]), 6)[0]
    return flags


class WireSpy:
    """Wraps ``wire.encode_parts`` (what peer_link sends): counts frames and their bytes by
    (message type, codec)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.frames: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[tuple[str, str]] = Counter()
        real = wire.encode_parts

        def spy(msg: wire.Message, request_id: int = 0, **kw: Any) -> list[wire.Blob]:
            parts = real(msg, request_id, **kw)
            key = (type(msg).__name__, compression.BY_CODE[flags_of(parts) & 3])
            self.frames[key] += 1
            self.bytes[key] += sum(len(p) for p in parts)
            return parts

        monkeypatch.setattr(wire, "encode_parts", spy)


# -- the link ---------------------------------------------------------------------------------

MakeServer = Any
MakeClient = Any


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    servers: list[PeerServer] = []

    def make(handler: Handler, **kw: Any) -> tuple[PeerServer, Log]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        log = Log()
        server = PeerServer("b", sock, SECRET, handler, log, **kw)
        server.start()
        servers.append(server)
        return server, log

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    clients: list[PeerClient] = []

    def make(server: PeerServer, **kw: Any) -> tuple[PeerClient, Log]:
        log = Log()
        host, port = server.address
        client = PeerClient("a", host, port, SECRET, log, **kw)
        clients.append(client)
        return client, log

    yield make
    for c in clients:
        c.close()


def test_both_directions_compress_with_the_pairs_codec(
    make_server: MakeServer, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = WireSpy(monkeypatch)
    recorder = Recorder()
    server, _ = make_server(recorder, compress_for=lambda pid: "lz4")
    client, _ = make_client(server, compress_for=lambda pid: "zstd")
    assert client.request(wire.Write("g/p", 0, TEXT)) == wire.Ack(0, f"write 0 {TEXT[:8].hex()}")
    random_block = noise(CHUNK)
    client.request(wire.Write("g/p", CHUNK, random_block))
    # The answer to a pull is a Chunk (4 KiB of one byte): the server's codec.
    reply = client.request(wire.ChunkRequest("g/p", 3))
    assert isinstance(reply, wire.Chunk) and bytes(reply.data) == b"\x03" * 4096
    assert [bytes(m.data) for _, m in recorder.calls if isinstance(m, wire.Write)] == [
        TEXT,
        random_block,
    ]
    assert spy.frames["Write", "zstd"] == 1 and spy.frames["Write", "none"] == 1
    assert spy.frames["Chunk", "lz4"] == 1
    assert spy.bytes["Write", "zstd"] < len(TEXT) // 10
    assert spy.frames["Ping", "none"] == 0 and spy.frames["Ack", "none"] >= 2
    assert all(c == "none" for (t, c) in spy.frames if t not in ("Write", "Chunk"))


def test_a_peer_that_offers_no_codec_gets_raw_frames(
    make_server: MakeServer, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = peer_link.Handshake

    def no_codecs(role: Any, *args: Any, **kw: Any) -> Handshake:
        if role == "acceptor":  # the server: a node without the libraries
            kw["features"] = 0
        return real(role, *args, **kw)

    monkeypatch.setattr(peer_link, "Handshake", no_codecs)
    spy = WireSpy(monkeypatch)
    recorder = Recorder()
    server, _ = make_server(recorder)
    client, _ = make_client(server, compress_for=lambda pid: "zstd")
    client.request(wire.Write("g/p", 0, TEXT))
    assert bytes(recorder.calls[-1][1].data) == TEXT  # type: ignore[union-attr]
    assert spy.frames["Write", "none"] == 1 and spy.frames["Write", "zstd"] == 0


def _raw_session(server: Any, features: int) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=WAIT)
    hs = Handshake("initiator", SECRET, "raw", features=features)
    decoder = wire.FrameDecoder(max_payload=wire.HANDSHAKE_MAX_PAYLOAD)
    sock.sendall(b"".join(wire.encode(m) for m in hs.start()))
    while not hs.done:
        data = sock.recv(65536)
        assert data, "server closed during the handshake"
        decoder.feed(data)
        while not hs.done and (m := decoder.next_message()) is not None:
            sock.sendall(b"".join(wire.encode(r) for r in hs.receive(m)))
    assert hs.features == features
    return sock


def test_a_codec_the_handshake_did_not_agree_on_is_refused(make_server: MakeServer) -> None:
    server, log = make_server(Recorder())
    frame = wire.encode(wire.Write("g/p", 0, TEXT), 5, compress="zstd")
    # Offered: the server takes it.
    sock = _raw_session(server, wire.FEATURE_ZSTD)
    sock.sendall(frame)
    decoder = wire.FrameDecoder()
    while (got := decoder.next_frame()) is None:
        decoder.feed(sock.recv(65536))
    assert got.request_id == 5 and isinstance(got.message, wire.Ack)
    sock.close()
    # Not offered (lz4 only): refused with one line, and the connection is closed.
    sock = _raw_session(server, wire.FEATURE_LZ4)
    sock.sendall(frame)
    [error] = read_until_closed(sock)
    assert isinstance(error, wire.Error) and error.code == errno.EPROTO
    assert "say zstd, which this link did not agree on" in error.message
    log.wait_for("did not agree on")


# -- a pair with --compress, in the in-process runtime ---------------------------------------


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Lab, Node, Node]]:
    with running_lab(tmp_path) as lab:
        a = lab.node("node-a", "10.0.0.1")
        b = lab.node("node-b", "10.0.0.2")
        lab.start()
        yield lab, a, b


class FakeWire:
    """The in-process fake link encodes with ``wire.encode`` and no codec (it has no
    handshake); this gives it what a real link does: each Write and Chunk in the codec of
    its pair as the nodes hold it, and counts frames by codec."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, a: Node, b: Node) -> None:
        self.frames: Counter[tuple[str, str]] = Counter()
        self.disagree: list[str] = []
        real = wire.encode

        def encode(msg: wire.Message, request_id: int = 0, **kw: Any) -> bytes:
            if isinstance(msg, wire.Write | wire.Chunk):
                codecs = {n.manager.compress_for(msg.pair_id) for n in (a, b)}
                if len(codecs) != 1:
                    self.disagree.append(f"{msg.pair_id}: {codecs}")
                kw["compress"] = min(codecs)
            raw = real(msg, request_id, **kw)
            codec = compression.BY_CODE[struct.unpack_from("<H", raw, 6)[0] & 3]
            self.frames[type(msg).__name__, codec] += 1
            return raw

        monkeypatch.setattr(wire, "encode", encode)


def _link_back(lab: Lab, *sides: Any) -> None:
    for _ in range(10):
        if all(s.machine.link_up for s in sides):
            return
        lab.tick(INTERVAL)
    assert all(s.machine.link_up for s in sides)


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_a_compressed_pair_replicates_verifies_and_keeps_its_codec(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch, codec: str
) -> None:
    lab, a, b = two
    pid = "g/p1"
    fake = FakeWire(monkeypatch, a, b)
    ha = a.open()
    write(ha, 0, TEXT * 3)  # compressible
    write(ha, 8 * CHUNK, noise(2 * CHUNK))  # not
    write(ha, 20 * CHUNK, bytes(100) + TEXT[100:])
    result = a.create(pid, b, compress=codec)
    assert result["compress"] == codec
    wait_copy(a, pid)
    assert a.show(pid)["compress"] == b.show(pid)["compress"] == codec
    copied = fake.frames["Write", codec]
    assert copied >= 2, fake.frames  # the copy's compressible runs (runs of chunks coalesce)
    assert fake.frames["Write", "none"] >= 1  # the random run went raw

    # Mirrored writes, compressible and not.
    write(ha, 30 * CHUNK, TEXT)
    write(ha, 31 * CHUNK + 512, noise(4096))
    write(ha, 40 * CHUNK, TEXT[:4096])
    identical(a, b)
    assert fake.frames["Write", codec] >= copied + 2
    assert a.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 0

    # Restarts: both pair files keep the codec.
    ha.close()
    a.restart()
    b.restart()
    _link_back(lab, a.side(pid), b.side(pid))
    assert a.side(pid).doc.compress == b.side(pid).doc.compress == codec
    ha = a.open()
    before = fake.frames["Write", codec]
    write(ha, 50 * CHUNK, TEXT)
    assert fake.frames["Write", codec] == before + 1
    ha.close()

    # A swap: B becomes the primary and sends, with the same codec.
    a.cmd("pair.split", target="g")
    hb = b.open()
    write(hb, 60 * CHUNK, TEXT)  # B's change since the split: the resync copies it
    before = fake.frames["Write", codec]
    b.cmd("pair.resync", target="g", swap=True)
    wait_copy(b, pid)
    assert b.state(pid) == ("PAIR", "primary") and a.state(pid) == ("PAIR", "secondary")
    write(hb, 61 * CHUNK, TEXT)
    assert fake.frames["Write", codec] >= before + 2
    identical(a, b)
    assert b.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 0
    assert b.show(pid)["compress"] == a.show(pid)["compress"] == codec
    [row] = merge_sides([a.show(pid), b.show(pid)])  # pair display --json's row
    assert row["compress"] == codec
    assert not fake.disagree, fake.disagree
    hb.close()


def test_a_pair_without_compress_sends_raw(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, a, b = two
    fake = FakeWire(monkeypatch, a, b)
    ha = a.open()
    write(ha, 0, TEXT * 2)
    assert a.create("g/p1", b)["compress"] == "none"
    wait_copy(a, "g/p1")
    write(ha, CHUNK * 4, TEXT)
    identical(a, b)
    assert fake.frames["Write", "none"] >= 2
    assert not [k for k in fake.frames if k[1] != "none"]
    ha.close()


def test_a_bad_codec_is_refused_by_the_node(two: tuple[Lab, Node, Node]) -> None:
    _, a, b = two
    with pytest.raises(UsageError, match="--compress 'gzip' is not one of none, zstd, lz4"):
        a.create("g/p1", b, compress="gzip")
    assert not a.manager.sides and not b.manager.sides


def test_the_secondary_refuses_a_codec_it_lacks(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, a, b = two
    real = compression.check_codec

    def b_lacks_lz4(name: object, where: str = "this node") -> str:
        if name == "lz4" and "node-b" in where:
            raise UsageError(f"--compress lz4: {where} has no lz4 library installed")
        return real(name, where)

    monkeypatch.setattr(compression, "check_codec", b_lacks_lz4)
    with pytest.raises(Exception, match="secondary's node node-b has no lz4 library"):
        a.create("g/p1", b, compress="lz4")
    assert not b.manager.sides


# -- the CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["gzip", "ZSTD", ""])
def test_a_bad_compress_value_is_one_line_and_exit_2(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["pair", "create", "g/p", "--primary", "a:v", "--secondary", "b:v"]
    assert main([*argv, "--compress", value]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "--compress" in err and "invalid choice" in err


def test_a_bad_codec_from_the_cli_helper_is_one_line() -> None:
    with pytest.raises(UsageError) as info:
        compression.check_codec("brotli")
    assert "\n" not in str(info.value)


def test_the_pair_file_keeps_the_codec_and_refuses_a_bad_one() -> None:
    import json

    from replicator import pair_state as ps
    from replicator.errors import HeaderCorrupt
    from replicator.header import Role
    from replicator.pair.doc import PeerRef, SideDoc

    record = ps.PairRecord("g", "p", Role.PRIMARY, ps.Mode.SYNC, ps.Fence.NEVER, "b@h:1")
    doc = SideDoc(record, "v", PeerRef("b", "h", 1, "v"), compress="lz4")
    text = doc.to_json()
    assert SideDoc.from_json(text).compress == "lz4"
    raw = json.loads(text)
    del raw["compress"]  # a pair file from before compression
    assert SideDoc.from_json(json.dumps(raw)).compress == "none"
    raw["compress"] = "gzip"
    with pytest.raises(HeaderCorrupt, match="compress is 'gzip'"):
        SideDoc.from_json(json.dumps(raw))
