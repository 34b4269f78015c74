"""Replication links over real sockets on 127.0.0.1: requests, concurrency, bulk frames,
authentication failures, bad peers, timeouts, loss and reconnection."""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator import wire
from replicator.errors import (
    Closed,
    ConnectionFailed,
    IllegalState,
    NotFound,
    PeerLost,
    ProtocolError,
    PvidMismatch,
    Timeout,
    UsageError,
    VolumeError,
)
from replicator.peer_auth import Handshake, PeerSecrets
from replicator.peer_link import (
    Handler,
    LogLimiter,
    PeerClient,
    PeerRefused,
    PeerServer,
    errno_of,
    error_from_wire,
)

SECRET = b"s3cret-shared-by-a-and-b-0123456"
PAIR = "g/p"
BIG = wire.MAX_DATA  # 64 MiB
WAIT = 10.0  # bound on anything that should happen "promptly"


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    """Every link thread ends once its server is stopped and its client closed."""
    yield
    deadline = time.monotonic() + WAIT
    for t in threading.enumerate():
        if t.name.startswith("peer-"):
            t.join(max(deadline - time.monotonic(), 0.0))
    assert [t.name for t in threading.enumerate() if t.name.startswith("peer-")] == []


class Log:
    """A log sink that tests can wait on (no sleeping)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = WAIT) -> str:
        def find() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._cond:
            assert self._cond.wait_for(lambda: find() is not None, timeout), (text, self.lines)
            line = find()
        assert line is not None
        return line


class Recorder:
    """The test handler: answers each request type with a message that identifies it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, wire.Message]] = []
        self.lock = threading.Lock()

    def __call__(self, peer: str, msg: wire.Message) -> wire.Message:
        with self.lock:
            self.calls.append((peer, msg))
        return answer(msg)


def answer(msg: wire.Message) -> wire.Message:
    if isinstance(msg, wire.Ping):
        return wire.Pong(msg.now_ns)
    if isinstance(msg, wire.PairState):
        return wire.PairState(msg.pair_id, "PAIR", "secondary", msg.pvid, msg.epoch)
    if isinstance(msg, wire.BitmapRequest):
        bits = b"\xff\x03" + bytes(wire.BITMAP_PAGE - 2)
        return wire.Bitmap(msg.pair_id, msg.which, 65536, 10 * 65536, 0, bits)
    if isinstance(msg, wire.ChunkRequest):
        size = BIG if msg.index == 7 else 4096
        return wire.Chunk(msg.pair_id, msg.index, bytes([msg.index % 256]) * size)
    if isinstance(msg, wire.Chunk):
        return wire.Ack(0, f"{msg.index}:{len(msg.data)}:{crc32c.crc32c(msg.data):08x}")
    if isinstance(msg, wire.Write):
        return wire.Ack(0, f"write {msg.offset} {bytes(msg.data[:8]).hex()}")
    if isinstance(msg, wire.Zero):
        return wire.Error(errno.ENOSPC, "no space left for zeros")
    return wire.Ack()


MakeServer = Callable[..., tuple[PeerServer, Log]]
MakeClient = Callable[..., tuple[PeerClient, Log]]


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    servers: list[PeerServer] = []

    def make(
        handler: Handler | None = None,
        *,
        name: str = "b",
        secret: bytes | PeerSecrets = SECRET,
        port: int = 0,
        **kw: object,
    ) -> tuple[PeerServer, Log]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(16)
        log = Log()
        server = PeerServer(name, sock, secret, handler or Recorder(), log, **kw)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server, log

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    clients: list[PeerClient] = []

    def make(
        server: PeerServer, *, name: str = "a", secret: bytes | PeerSecrets = SECRET, **kw: object
    ) -> tuple[PeerClient, Log]:
        log = Log()
        host, port = server.address
        client = PeerClient(name, host, port, secret, log, **kw)  # type: ignore[arg-type]
        clients.append(client)
        return client, log

    yield make
    for c in clients:
        c.close()


def raw_connect(server: PeerServer, *, secret: bytes = SECRET) -> socket.socket:
    """A bare socket that did the handshake by hand (to send what PeerClient never would)."""
    sock = socket.create_connection(server.address, timeout=WAIT)
    hs = Handshake("initiator", secret, "raw")
    decoder = wire.FrameDecoder(max_payload=wire.HANDSHAKE_MAX_PAYLOAD)
    sock.sendall(b"".join(wire.encode(m) for m in hs.start()))
    while not hs.done:
        data = sock.recv(65536)
        assert data, "server closed during the handshake"
        decoder.feed(data)
        while not hs.done and (m := decoder.next_message()) is not None:
            sock.sendall(b"".join(wire.encode(r) for r in hs.receive(m)))
    return sock


def read_until_closed(sock: socket.socket) -> list[wire.Message]:
    """Everything the server sends until it closes (bounded by the socket timeout)."""
    decoder = wire.FrameDecoder()
    while data := sock.recv(65536):
        decoder.feed(data)
    out = []
    while (m := decoder.next_message()) is not None:
        out.append(m)
    sock.close()
    return out


# --------------------------------------------------------------------------------------------
# Requests and responses


def test_every_response_type_round_trips(make_server: MakeServer, make_client: MakeClient) -> None:
    server, _ = make_server()
    client, log = make_client(server, expect_peer="b")
    assert not client.connected() and client.peer_name is None

    assert client.request(wire.Ping(12345)) == wire.Pong(12345)
    assert client.connected() and client.peer_name == "b"
    assert "connected to peer 'b'" in log.lines[0]

    state = client.request(wire.PairState(PAIR, "COPY", "primary", 9, 3))
    assert state == wire.PairState(PAIR, "PAIR", "secondary", 9, 3)

    bitmap = client.request(wire.BitmapRequest(PAIR, "pending"))
    assert isinstance(bitmap, wire.Bitmap) and bitmap.last and bitmap.which == "pending"
    assert bytes(bitmap.bits[:3]) == b"\xff\x03\x00"

    chunk = client.request(wire.ChunkRequest(PAIR, 3))
    assert isinstance(chunk, wire.Chunk) and bytes(chunk.data) == b"\x03" * 4096

    ack = client.request(wire.Write(PAIR, 8192, b"\x01\x02" * 100, fua=True))
    assert ack == wire.Ack(0, "write 8192 0102010201020102")
    assert client.request(wire.Flush(PAIR)) == wire.Ack()

    with pytest.raises(PeerRefused) as info:  # the handler answered an Error itself
        client.request(wire.Zero(PAIR, 0, 4096))
    assert info.value.code == errno.ENOSPC and info.value.message == "no space left for zeros"
    assert client.connected()  # a refusal is an answer, not a failure


def test_requests_carry_the_authenticated_peer_name(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    rec = Recorder()
    server, slog = make_server(rec)
    client, _ = make_client(server, name="node-a")
    client.request(wire.Flush(PAIR))
    assert rec.calls == [("node-a", wire.Flush(PAIR))]
    slog.wait_for("peer 'node-a' connected from 127.0.0.1:")


def test_fifty_concurrent_requests_from_eight_threads(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, _ = make_server()
    client, _ = make_client(server)

    def one(i: int) -> tuple[int, wire.Message]:
        data = i.to_bytes(8, "big") * 64
        return i, client.request(wire.Write(PAIR, i * 4096, data), timeout=WAIT)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(50)))
    for i, response in results:
        assert response == wire.Ack(0, f"write {i * 4096} {i.to_bytes(8, 'big').hex()}")


def test_send_puts_many_requests_in_flight_from_one_thread(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    """``send`` returns once the frame is out; the answers are collected later, in any order
    of collection.  The handler sees the sixteen requests before any answer is collected."""
    gate = Gate()
    server, _ = make_server(gate, workers=16)
    client, _ = make_client(server)
    pending = [client.send(wire.Flush(PAIR), timeout=WAIT) for _ in range(16)]
    gate.wait_entered(16)  # all sixteen in the handler at once: none waited for an answer
    gate.release.set()
    assert [p.result() for p in reversed(pending)] == [wire.Ack()] * 16
    refused = client.send(wire.Zero(PAIR, 0, 4096), timeout=WAIT)
    with pytest.raises(PeerRefused):  # an Error answer raises when collected
        refused.result()


def test_send_fails_every_answer_not_yet_collected_when_the_connection_breaks(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    gate = Gate()
    server, _ = make_server(gate)
    client, _ = make_client(server)
    pending = [client.send(wire.Flush(PAIR), timeout=60.0) for _ in range(3)]
    gate.wait_entered(3)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    try:
        for p in pending:
            with pytest.raises(PeerLost):
                p.result()
    finally:
        gate.release.set()
        stopper.join(WAIT)


def test_mirrored_writes_are_handled_by_the_reader_in_arrival_order(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    """A mirrored Write or Zero (no journal seq) is carried out by the connection's reader, no
    hand-off to a worker; journal entries and every other request still go to the workers."""
    seen: list[tuple[str, str, int]] = []

    def handler(peer: str, msg: wire.Message) -> wire.Message:
        kind = type(msg).__name__ + (" seq" if getattr(msg, "seq", 0) else "")
        seen.append((kind, threading.current_thread().name, getattr(msg, "offset", -1)))
        return answer(msg) if not isinstance(msg, wire.Zero) else wire.Ack()

    server, _ = make_server(handler)
    client, _ = make_client(server)
    for i in range(5):
        client.request(wire.Write(PAIR, i * 4096, b"d" * 4096), timeout=WAIT)
    client.request(wire.Zero(PAIR, 0, 4096), timeout=WAIT)
    client.request(wire.Write(PAIR, 8192, b"j" * 512, seq=3), timeout=WAIT)
    client.request(wire.Ping(1), timeout=WAIT)
    assert [k for k, _, _ in seen] == ["Write"] * 5 + ["Zero", "Write seq", "Ping"]
    threads = [t for _, t, _ in seen]
    assert all(t.startswith("peer-in ") for t in threads[:6])
    assert all(t.startswith("peer-work ") for t in threads[6:])
    assert [o for _, _, o in seen[:5]] == [i * 4096 for i in range(5)]


def test_a_reader_busy_with_a_mirrored_write_delays_nothing_it_has_not_read(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    """Writes from several threads at once while the reader is held up in one of them: every
    one is answered with its own answer (the reader takes the next frame once the write it
    carries out is done)."""
    release = threading.Event()

    def handler(peer: str, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.Write) and msg.offset == 0:
            release.wait(WAIT)
        return answer(msg)

    server, _ = make_server(handler)
    client, _ = make_client(server)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.request, wire.Write(PAIR, 0, b"\x01" * 16), WAIT)
        others = [
            pool.submit(client.request, wire.Write(PAIR, i * 4096, b"\x02" * 16), WAIT)
            for i in range(1, 4)
        ]
        release.set()
        assert first.result(WAIT) == wire.Ack(0, "write 0 " + "01" * 8)
        for i, f in enumerate(others, 1):
            assert f.result(WAIT) == wire.Ack(0, f"write {i * 4096} " + "02" * 8)


def test_64_mib_chunk_both_ways(make_server: MakeServer, make_client: MakeClient) -> None:
    server, _ = make_server()
    client, _ = make_client(server)
    data = memoryview(bytearray(b"0123456789abcdef" * (BIG // 16)))
    ack = client.request(wire.Chunk(PAIR, 5, data), timeout=WAIT * 3)
    assert ack == wire.Ack(0, f"5:{BIG}:{crc32c.crc32c(data):08x}")
    chunk = client.request(wire.ChunkRequest(PAIR, 7), timeout=WAIT * 3)
    assert isinstance(chunk, wire.Chunk) and len(chunk.data) == BIG
    assert bytes(chunk.data[:1]) == b"\x07" and bytes(chunk.data).count(7) == BIG


def test_small_requests_proceed_while_a_big_frame_is_in_flight(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, _ = make_server()
    client, _ = make_client(server)
    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(client.request, wire.ChunkRequest(PAIR, 7), WAIT * 3)
        pings = [client.request(wire.Ping(i), WAIT) for i in range(20)]
        assert pings == [wire.Pong(i) for i in range(20)]
        assert len(big.result(WAIT * 3).data) == BIG  # type: ignore[union-attr]


def test_request_rejects_non_requests_without_connecting(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, _ = make_server()
    client, _ = make_client(server)
    for msg in (wire.Ack(), wire.Goodbye(), wire.Error(errno.EIO), wire.Pong(1)):
        with pytest.raises(ProtocolError) as info:
            client.request(msg)
        assert info.value.remote is False
    assert not client.connected()


def test_notification_reaches_handler_and_gets_no_answer(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    seen = threading.Event()
    rec = Recorder()

    def handler(peer: str, msg: wire.Message) -> wire.Message:
        response = rec(peer, msg)
        seen.set()
        return response

    server, _ = make_server(handler)
    client, _ = make_client(server)
    client.notify(wire.PairState(PAIR, "PSUE", "primary", 1, 2))
    assert seen.wait(WAIT)
    assert client.request(wire.Ping(1)) == wire.Pong(1)  # the link is still in step
    assert rec.calls[0][1] == wire.PairState(PAIR, "PSUE", "primary", 1, 2)


# --------------------------------------------------------------------------------------------
# Handler errors


def test_handler_pairvol_error_becomes_peer_refused(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    def handler(peer: str, msg: wire.Message) -> wire.Message:
        raise IllegalState(f"pair {PAIR} is in PSUS; {peer} may not write")

    server, slog = make_server(handler)
    client, _ = make_client(server)
    with pytest.raises(PeerRefused) as info:
        client.request(wire.Write(PAIR, 0, b"x"))
    e = info.value
    assert e.code == errno.EBUSY and e.errno == errno.EBUSY and e.exit_code == 5
    assert e.message == "pair g/p is in PSUS; a may not write" and e.peer == "b"
    assert str(e) == "peer 'b' refused: pair g/p is in PSUS; a may not write [EBUSY]"
    assert not any("failed" in line for line in slog.lines)  # refusals are not logged


def test_handler_bug_answers_eio_and_server_keeps_serving(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    def handler(peer: str, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.Flush):
            raise RuntimeError("boom")
        return answer(msg)

    server, slog = make_server(handler)
    client, _ = make_client(server)
    with pytest.raises(PeerRefused) as info:
        client.request(wire.Flush(PAIR))
    assert info.value.code == errno.EIO
    assert info.value.message == "internal error: RuntimeError: boom"
    line = slog.wait_for("RuntimeError: boom")
    assert "Flush #1 failed" in line and "test_peer_link.py:" in line
    assert client.request(wire.Ping(5)) == wire.Pong(5)


def test_handler_returning_a_non_message_is_an_internal_error(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, slog = make_server(lambda peer, msg: "not a message")
    client, _ = make_client(server)
    with pytest.raises(PeerRefused) as info:
        client.request(wire.Ping(1))
    assert info.value.code == errno.EIO and "handler returned str" in info.value.message
    slog.wait_for("handler returned str")


def test_errno_mapping() -> None:
    assert errno_of(IllegalState("x")) == errno.EBUSY
    assert errno_of(NotFound("x")) == errno.ENOENT
    assert errno_of(UsageError("x")) == errno.EINVAL
    assert errno_of(PvidMismatch("w", "1", "2")) == errno.EACCES
    assert errno_of(VolumeError("x", errno.ENOSPC)) == errno.ENOSPC
    assert errno_of(VolumeError("x")) == errno.EIO
    assert errno_of(ProtocolError("x")) == errno.EPROTO
    assert errno_of(OSError(errno.EROFS, "ro")) == errno.EROFS
    assert errno_of(RuntimeError("x")) == errno.EIO
    assert errno_of(OSError("no errno")) == errno.EIO
    e = error_from_wire(errno.ENOENT, "no pair g/p")
    assert isinstance(e, PeerRefused) and e.code == errno.ENOENT and e.message == "no pair g/p"
    assert str(e) == "no pair g/p [ENOENT]"
    assert errno_of(e) == errno.ENOENT


# --------------------------------------------------------------------------------------------
# Authentication


def test_wrong_secret(make_server: MakeServer, make_client: MakeClient) -> None:
    rec = Recorder()
    server, slog = make_server(rec)
    client, _ = make_client(server, secret=b"not-the-secret")
    with pytest.raises(ConnectionFailed) as info:
        client.request(wire.Ping(1))
    assert not isinstance(info.value, PeerLost)
    assert "peer 'b' refused our authentication" in str(info.value)
    assert "wrong secret" in str(info.value)
    line = slog.wait_for("handshake failed")
    assert "127.0.0.1:" in line and "peer 'a' failed authentication (wrong secret)" in line
    assert rec.calls == [] and not client.connected()


@pytest.mark.parametrize(
    ("server_secret", "client_secret", "lacking"),
    [(b"", SECRET, "'b' has no secret configured, 'a' has one"), (SECRET, b"", "'a' has no")],
)
def test_secret_on_one_side_only(
    make_server: MakeServer,
    make_client: MakeClient,
    server_secret: bytes,
    client_secret: bytes,
    lacking: str,
) -> None:
    rec = Recorder()
    server, slog = make_server(rec, secret=server_secret, allow_no_secret=True)
    client, _ = make_client(server, secret=client_secret, allow_no_secret=True)
    with pytest.raises(ConnectionFailed) as info:
        client.request(wire.Ping(1))
    assert lacking in str(info.value)
    assert lacking in slog.wait_for("handshake failed")
    assert rec.calls == []


def test_no_secret_on_either_side_works_with_a_warning(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, slog = make_server(secret=b"", allow_no_secret=True)
    client, clog = make_client(server, secret=b"", allow_no_secret=True)
    assert client.request(wire.Ping(1)) == wire.Pong(1)
    assert "NOT authenticated" in clog.wait_for("connected to peer 'b'")
    assert "NOT authenticated" in slog.wait_for("peer 'a' connected")


def test_empty_secret_needs_allow_no_secret() -> None:
    sock = socket.socket()
    try:
        with pytest.raises(UsageError, match="no peer secret"):
            PeerServer("b", sock, b"", Recorder(), Log())
    finally:
        sock.close()
    with pytest.raises(UsageError, match="no peer secret"):
        PeerClient("a", "127.0.0.1", 1, b"", Log())


def test_expect_peer_mismatch(make_server: MakeServer, make_client: MakeClient) -> None:
    server, slog = make_server(name="c")
    client, _ = make_client(server, expect_peer="b")
    with pytest.raises(ConnectionFailed, match="expected peer 'b' but 'c' answered"):
        client.request(wire.Ping(1))
    slog.wait_for("handshake failed")


def test_nothing_listening(make_server: MakeServer, make_client: MakeClient) -> None:
    server, _ = make_server()
    server.stop()
    client, _ = make_client(server, expect_peer="b")
    with pytest.raises(ConnectionFailed, match=r"cannot connect to peer 'b' at 127\.0\.0\.1:"):
        client.request(wire.Ping(1))


# --------------------------------------------------------------------------------------------
# Bad peers: the server logs, closes, and applies nothing after the bad bytes


def test_garbage_before_the_handshake(make_server: MakeServer) -> None:
    rec = Recorder()
    server, slog = make_server(rec)
    sock = socket.create_connection(server.address, timeout=WAIT)
    sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(20))
    read_until_closed(sock)
    assert "bad frame magic" in slog.wait_for("handshake failed")
    assert rec.calls == []


def test_garbage_after_the_handshake(make_server: MakeServer) -> None:
    rec = Recorder()
    server, slog = make_server(rec)
    sock = raw_connect(server)
    slog.wait_for("peer 'raw' connected")
    sock.sendall(b"\x00garbage" * 8)
    replies = read_until_closed(sock)
    assert "bad frame magic" in slog.wait_for("closing the connection")
    assert rec.calls == []
    assert [type(m) for m in replies] == [wire.Error]  # told why, then closed


def test_corrupted_crc_closes_and_nothing_after_it_applies(make_server: MakeServer) -> None:
    rec = Recorder()
    server, slog = make_server(rec)
    sock = raw_connect(server)
    bad = bytearray(wire.encode(wire.Write(PAIR, 0, b"data" * 10), 2))
    bad[-1] ^= 0x01
    after = wire.encode(wire.Flush(PAIR), 3)
    sock.sendall(wire.encode(wire.Ping(7), 1) + bytes(bad) + after)
    read_until_closed(sock)
    assert "payload CRC32C mismatch" in slog.wait_for("closing the connection")
    assert [m for _, m in rec.calls] in ([], [wire.Ping(7)])  # the frame before may apply


def test_response_type_at_the_server_closes(make_server: MakeServer) -> None:
    rec = Recorder()
    server, slog = make_server(rec)
    sock = raw_connect(server)
    sock.sendall(wire.encode(wire.Ack(), 5) + wire.encode(wire.Flush(PAIR), 6))
    read_until_closed(sock)
    assert "unexpected Ack (not a request)" in slog.wait_for("closing the connection")
    assert rec.calls == []


def test_big_frame_before_authentication_is_refused(make_server: MakeServer) -> None:
    server, slog = make_server()
    sock = socket.create_connection(server.address, timeout=WAIT)
    sock.sendall(wire.encode(wire.Write(PAIR, 0, bytes(8192)), 1))
    read_until_closed(sock)
    assert "over the 4096-byte limit" in slog.wait_for("handshake failed")


def test_goodbye_closes_quietly(make_server: MakeServer) -> None:
    server, slog = make_server()
    sock = raw_connect(server)
    sock.sendall(wire.encode(wire.Goodbye("maintenance")))
    assert read_until_closed(sock) == []
    slog.wait_for("peer 'raw' (127.0.0.1:")
    assert "said goodbye: maintenance" in slog.wait_for("goodbye")


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(junk=st.binary(min_size=1, max_size=200))
def test_any_junk_after_the_handshake_never_reaches_the_handler(
    make_server: MakeServer, junk: bytes
) -> None:
    rec = Recorder()
    server, _ = make_server(rec)
    sock = raw_connect(server)
    sock.sendall(junk)
    sock.shutdown(socket.SHUT_WR)  # a junk prefix of a frame ends in truncation
    read_until_closed(sock)
    assert rec.calls == []
    server.stop()


# --------------------------------------------------------------------------------------------
# Loss, timeouts, reconnection


class Gate:
    """A handler that blocks until released and counts who is waiting."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self._cond = threading.Condition()
        self.entered = 0

    def __call__(self, peer: str, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.Flush):
            with self._cond:
                self.entered += 1
                self._cond.notify_all()
            self.release.wait(WAIT * 2)
        return answer(msg)

    def wait_entered(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.entered >= n, WAIT)


def test_server_stop_fails_every_waiting_request_promptly(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    gate = Gate()
    server, _ = make_server(gate)
    client, clog = make_client(server)
    lost: list[str] = []
    client.on_disconnect = lost.append
    client.request(wire.Ping(1))
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.request, wire.Flush(PAIR), 60.0) for _ in range(3)]
        gate.wait_entered(3)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        try:
            for f in futures:
                assert isinstance(f.exception(WAIT), PeerLost)
        finally:
            gate.release.set()
            stopper.join(WAIT)
    assert not stopper.is_alive()
    assert len(lost) == 1 and "closed the connection" in lost[0]
    assert "lost the connection to peer 'b'" in clog.wait_for("lost")
    assert not client.connected()
    with pytest.raises(ConnectionFailed):
        client.request(wire.Ping(2))
    assert len(lost) == 1  # a failed connection attempt is not a lost connection


def test_client_reconnects_after_the_server_restarts(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, _ = make_server()
    port = server.address[1]
    client, _ = make_client(server)
    lost = threading.Event()
    reasons: list[str] = []

    def on_disconnect(reason: str) -> None:
        reasons.append(reason)
        lost.set()

    client.on_disconnect = on_disconnect
    assert client.request(wire.Ping(1)) == wire.Pong(1)
    server.stop()
    assert lost.wait(WAIT)
    assert not client.connected()
    make_server(port=port)
    assert client.request(wire.Ping(2)) == wire.Pong(2)
    assert client.connected() and client.peer_name == "b" and len(reasons) == 1


def test_timeout_breaks_the_link_and_the_next_request_reconnects(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    gate = Gate()
    server, slog = make_server(gate)
    client, _ = make_client(server)
    lost: list[str] = []
    client.on_disconnect = lost.append
    try:
        with pytest.raises(Timeout, match=r"did not answer Flush within 0\.5s"):
            client.request(wire.Flush(PAIR), timeout=0.5)
        assert not client.connected()
        assert len(lost) == 1 and "no answer to Flush #1 within 0.5s" in lost[0]
    finally:
        gate.release.set()
    assert client.request(wire.Ping(3)) == wire.Pong(3)
    assert len(lost) == 1
    assert len([line for line in slog.lines if "connected from" in line]) == 2


def test_close_fails_waiters_with_closed_and_is_final(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    gate = Gate()
    server, _ = make_server(gate)
    client, _ = make_client(server)
    lost: list[str] = []
    client.on_disconnect = lost.append
    try:
        with ThreadPoolExecutor(1) as pool:
            f = pool.submit(client.request, wire.Flush(PAIR), 60.0)
            gate.wait_entered(1)
            client.close()
            assert isinstance(f.exception(WAIT), Closed)
    finally:
        gate.release.set()
    with pytest.raises(Closed):
        client.request(wire.Ping(1))
    assert lost == []  # we closed it: not a loss


def test_disconnect_then_request_reconnects(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, _ = make_server()
    client, _ = make_client(server)
    assert client.request(wire.Ping(1)) == wire.Pong(1)
    client.disconnect()
    assert not client.connected()
    assert client.request(wire.Ping(2)) == wire.Pong(2)


def test_stop_with_an_idle_and_a_half_open_connection(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, _ = make_server(handshake_timeout=30.0)
    client, _ = make_client(server)
    lost = threading.Event()
    client.on_disconnect = lambda reason: lost.set()
    client.request(wire.Ping(1))
    stranger = socket.create_connection(server.address, timeout=WAIT)  # never says hello
    try:
        assert stranger.recv(65536)  # the server's Hello: it is mid-handshake with us
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < WAIT
        assert read_until_closed(stranger) == []
        assert lost.wait(WAIT)
    finally:
        stranger.close()


def raw_accept(listener: socket.socket) -> socket.socket:
    """Accept one connection and do the acceptor's handshake by hand."""
    sock, _ = listener.accept()
    sock.settimeout(WAIT)
    hs = Handshake("acceptor", SECRET, "b")
    decoder = wire.FrameDecoder(max_payload=wire.HANDSHAKE_MAX_PAYLOAD)
    sock.sendall(b"".join(wire.encode(m) for m in hs.start()))
    while not hs.done:
        data = sock.recv(65536)
        assert data, "client closed during the handshake"
        decoder.feed(data)
        while not hs.done and (m := decoder.next_message()) is not None:
            sock.sendall(b"".join(wire.encode(r) for r in hs.receive(m)))
    return sock


def test_peer_that_stops_reading_times_out_a_big_send() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = PeerClient("a", "127.0.0.1", listener.getsockname()[1], SECRET, Log())
    lost: list[str] = []
    client.on_disconnect = lost.append
    try:
        with ThreadPoolExecutor(1) as pool:
            accepted = pool.submit(raw_accept, listener)
            big = wire.Chunk(PAIR, 0, bytes(BIG))
            with pytest.raises(Timeout):  # the peer never reads: the kernel buffers fill up
                client.request(big, timeout=0.5)
            peer = accepted.result(WAIT)
        assert len(lost) == 1 and "took longer than 0.5s" in lost[0]
        peer.close()
    finally:
        client.close()
        listener.close()


def test_server_send_timeout_drops_a_peer_that_stops_reading(make_server: MakeServer) -> None:
    server, slog = make_server(send_timeout=0.5)
    sock = raw_connect(server)
    sock.sendall(wire.encode(wire.ChunkRequest(PAIR, 7), 1))  # 64 MiB answer, never read
    slog.wait_for("sending the response failed")
    sock.close()


# --------------------------------------------------------------------------------------------
# Peer identity: per-link keys (issue 7)

KEYRINGS = {
    "a": PeerSecrets({"b": b"key-a-b", "c": b"key-a-c"}),
    "b": PeerSecrets({"a": b"key-a-b", "c": b"key-b-c"}),
    "c": PeerSecrets({"a": b"key-a-c", "b": b"key-b-c"}),
}


def test_a_node_cannot_pose_as_another_with_its_own_keys(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    rec = Recorder()
    server, slog = make_server(rec, secret=KEYRINGS["b"])
    impostor, _ = make_client(server, name="a", secret=KEYRINGS["c"])
    with pytest.raises(ConnectionFailed, match="wrong secret"):
        impostor.request(wire.Ping(1))
    assert "peer 'a' failed authentication (wrong secret)" in slog.wait_for("handshake failed")
    assert rec.calls == [] and impostor.peer_name is None
    # Under its own name, with the same keys, c gets in, and the handler sees "c".
    honest, _ = make_client(server, name="c", secret=KEYRINGS["c"])
    assert honest.request(wire.Ping(2)) == wire.Pong(2)
    real_a, _ = make_client(server, name="a", secret=KEYRINGS["a"])
    assert real_a.request(wire.Ping(3)) == wire.Pong(3)
    assert [peer for peer, _ in rec.calls] == ["c", "a"]
    assert honest.peer_name == real_a.peer_name == "b"


def test_an_unknown_peer_name_is_refused_with_a_reason(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, slog = make_server(secret=KEYRINGS["b"])
    client, _ = make_client(server, name="mallory", secret=b"key-a-b")
    with pytest.raises(ConnectionFailed) as info:
        client.request(wire.Ping(1))
    assert "unknown peer 'mallory': 'b' has no secret for it" in str(info.value)
    line = slog.wait_for("handshake failed")
    assert line.endswith("handshake failed: unknown peer 'mallory': 'b' has no secret for it")


def test_a_client_refuses_a_server_it_has_no_key_for(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, _ = make_server(name="mallory", secret=b"key-a-b")
    client, _ = make_client(server, secret=KEYRINGS["a"])
    with pytest.raises(ConnectionFailed, match="unknown peer 'mallory': 'a' has no secret"):
        client.request(wire.Ping(1))


def test_expect_peer_with_a_keyring_proves_the_name(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, _ = make_server(secret=KEYRINGS["b"])
    client, _ = make_client(server, secret=KEYRINGS["a"], expect_peer="b")
    assert client.request(wire.Ping(1)) == wire.Pong(1) and client.peer_name == "b"
    # c pretending to be b to a: a uses its a-b key, which c does not have.
    fake_b, _ = make_server(name="b", secret=KEYRINGS["c"])
    client2, _ = make_client(fake_b, secret=KEYRINGS["a"], expect_peer="b")
    with pytest.raises(ConnectionFailed):
        client2.request(wire.Ping(1))


# --------------------------------------------------------------------------------------------
# Denial of service: handshake deadline, separate limits, rate-limited logs (issue 7)


def idle_stranger(server: PeerServer, source: str = "127.0.0.1") -> socket.socket:
    """A connection that never says hello, once the server has started its handshake."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.bind((source, 0))
    sock.connect(server.address)
    assert sock.recv(65536)  # the server's Hello: it counts us as pending now
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` within WAIT (it sends nothing more before)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_trickling_client_is_cut_at_the_handshake_deadline(make_server: MakeServer) -> None:
    """The deadline counts from the accept; bytes that keep arriving do not extend it."""
    server, slog = make_server(handshake_timeout=0.5)
    hello = wire.encode(wire.Hello(1, "slow", bytes(32), 0))
    sock = socket.create_connection(server.address, timeout=WAIT)
    started = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:  # one byte every 0.1 s: the whole Hello would take 7 s
        for i in range(len(hello) - 1):
            if stop.wait(0.1):
                return
            try:
                sock.send(hello[i : i + 1])
            except OSError:
                return

    t = threading.Thread(target=trickle, name="trickler", daemon=True)
    t.start()
    try:
        assert sock.recv(65536)  # the server's Hello
        assert closed_by_server(sock)
        assert time.monotonic() - started < 0.5 + 3.0, "the deadline was stretched"
        assert "not done within 0.5s of the accept" in slog.wait_for("handshake failed")
    finally:
        stop.set()
        t.join(WAIT)
        sock.close()


def test_a_real_peer_gets_in_while_strangers_fill_the_pending_cap(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    rec = Recorder()
    server, slog = make_server(rec, max_pending=4, handshake_timeout=60.0)
    strangers = [idle_stranger(server) for _ in range(4)]
    try:
        assert server.connection_counts() == (4, 0)
        client, _ = make_client(server)
        assert client.request(wire.Ping(1)) == wire.Pong(1)
        assert rec.calls == [("a", wire.Ping(1))]
        assert closed_by_server(strangers[0])  # the oldest made room
        assert "dropped, still unauthenticated" in slog.wait_for("127.0.0.1")
        assert server.connection_counts() == (3, 1)
    finally:
        for s in strangers:
            s.close()


def test_a_flood_from_one_address_evicts_its_own_first(make_server: MakeServer) -> None:
    server, _ = make_server(max_pending=4, handshake_timeout=60.0)
    other = idle_stranger(server, "127.0.0.1")  # the oldest, but alone at its address
    flood = [idle_stranger(server, "127.0.0.2") for _ in range(3)]
    try:
        flood.append(idle_stranger(server, "127.0.0.2"))
        assert closed_by_server(flood[0])
        other.settimeout(0.3)
        assert not closed_by_server(other)
        assert server.connection_counts() == (4, 0)
    finally:
        for s in [other, *flood]:
            s.close()


def test_authenticated_connections_do_not_count_as_pending(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, _ = make_server(max_pending=1)
    clients = [make_client(server, name=f"n{i}")[0] for i in range(3)]
    for i, c in enumerate(clients):
        assert c.request(wire.Ping(i)) == wire.Pong(i)
    assert server.connection_counts() == (0, 3)
    stranger = idle_stranger(server)
    try:
        assert all(c.request(wire.Ping(9)) == wire.Pong(9) for c in clients)
        assert server.connection_counts() == (1, 3)
    finally:
        stranger.close()


def test_authenticated_cap_refuses_with_a_reason(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server, slog = make_server(max_connections=1)
    first, _ = make_client(server)
    assert first.request(wire.Ping(1)) == wire.Pong(1)
    second, _ = make_client(server, name="c")
    with pytest.raises(ConnectionFailed, match="too many peer connections"):
        second.request(wire.Ping(2))
    assert "peer 'c'" in slog.wait_for("refused: too many peer connections")
    first.close()
    deadline = time.monotonic() + WAIT
    while server.connection_counts() != (0, 0):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert second.request(wire.Ping(3)) == wire.Pong(3)


def test_a_flood_of_failed_handshakes_logs_a_bounded_number_of_lines(
    make_server: MakeServer,
) -> None:
    server, slog = make_server(log_burst=3, log_interval=3600.0)
    for _ in range(40):
        sock = socket.create_connection(server.address, timeout=WAIT)
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(20))
        read_until_closed(sock)  # answered and closed: each failure is done
    for _ in range(20):
        idle_stranger(server).close()
    deadline = time.monotonic() + WAIT
    while server.connection_counts() != (0, 0):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.stop()
    assert len([line for line in slog.lines if "handshake failed" in line]) == 3
    assert slog.wait_for("lines were suppressed") == (
        "peer link: 57 more 'handshake' lines were suppressed"
    )


def test_a_flood_of_evictions_logs_a_bounded_number_of_lines(make_server: MakeServer) -> None:
    server, slog = make_server(max_pending=2, handshake_timeout=60.0, log_burst=2)
    strangers = [idle_stranger(server) for _ in range(30)]
    try:
        assert all(closed_by_server(s) for s in strangers[:28])
        assert len([line for line in slog.lines if "dropped" in line]) == 2
    finally:
        for s in strangers:
            s.close()


def test_log_limiter_with_a_scripted_clock() -> None:
    lim = LogLimiter(interval=10.0, burst=2)
    assert lim.admit("x", 0.0) == (True, 0)
    assert lim.admit("x", 1.0) == (True, 0)
    assert lim.admit("x", 2.0) == (False, 0)
    assert lim.admit("y", 2.0) == (True, 0)  # kinds are counted apart
    assert lim.admit("x", 9.9) == (False, 0)
    assert lim.admit("x", 10.0) == (True, 2)  # a new window: says what it held back
    assert lim.admit("x", 11.0) == (True, 0)
    assert lim.admit("x", 12.0) == (False, 0)
    assert lim.flush() == {"x": 1} and lim.flush() == {}
    with pytest.raises(UsageError):
        LogLimiter(burst=0)
