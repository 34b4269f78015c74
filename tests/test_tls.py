"""TLS on peer links over real sockets on 127.0.0.1, with certificates made for each test:
good certificates carry requests end to end; a wrong CA, an expired certificate, a missing
client certificate, a certificate naming another node, and TLS against plaintext (both ways)
are refused, each with one clear line on the server and one on the client."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from replicator import wire
from replicator.errors import ConnectionFailed, NotFound, UsageError
from replicator.node import NodeConfig
from replicator.peer_auth import PeerSecrets
from replicator.peer_link import PeerClient, PeerServer
from replicator.tls import PeerTls, check_options, new_ca, new_node_cert

KEYS = {"a": PeerSecrets({"b": b"key-of-link-a-b-0123456789abcdef"})}
KEYS["b"] = PeerSecrets({"a": b"key-of-link-a-b-0123456789abcdef"})
WAIT = 10.0


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()

    def wait_for(self, text: str) -> str:
        def find() -> str | None:
            return next((ln for ln in self.lines if text in ln), None)

        with self._cond:
            assert self._cond.wait_for(lambda: find() is not None, WAIT), (text, self.lines)
            line = find()
        assert line is not None and "\n" not in line
        return line


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PeerTls]:
    """TLS configurations: a, b and c (CA 1), b-expired, a-other (CA 2), b-as-c (CA 1, node
    b's key file holding a certificate for node c)."""
    d = str(tmp_path_factory.mktemp("pki"))
    ca1, ca2, ca3 = (os.path.join(d, f"ca{i}") for i in (1, 2, 3))
    for sub in (ca1, ca2, ca3, os.path.join(d, "old")):
        os.mkdir(sub)
    one, two, three = new_ca(ca1), new_ca(ca2, "another CA"), new_ca(ca3)  # three: same name
    out: dict[str, PeerTls] = {}
    for node in ("a", "b", "c"):
        cert, key = new_node_cert(ca1, one, node, "127.0.0.1")
        out[node] = PeerTls.load(cert, key, one[0])
    cert, key = new_node_cert(os.path.join(d, "old"), one, "b", expired=True)
    out["b-expired"] = PeerTls.load(cert, key, one[0])
    cert, key = new_node_cert(ca2, two, "a")
    out["a-other"] = PeerTls.load(cert, key, two[0])
    cert, key = new_node_cert(ca3, three, "a")
    out["a-samename"] = PeerTls.load(cert, key, three[0])
    return out


@pytest.fixture
def server() -> Iterator[Callable[..., tuple[PeerServer, Log]]]:
    made: list[PeerServer] = []

    def make(tls: PeerTls | None, name: str = "b") -> tuple[PeerServer, Log]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        log = Log()

        def handler(peer: str, msg: wire.Message) -> wire.Message:
            if isinstance(msg, wire.Write):
                return wire.Ack(0, f"{peer} wrote {len(msg.data)}")
            assert isinstance(msg, wire.Ping)
            return wire.Pong(msg.now_ns)

        s = PeerServer(name, sock, KEYS[name], handler, log, tls=tls)
        s.start()
        made.append(s)
        return s, log

    yield make
    for s in made:
        s.stop()


def client(s: PeerServer, tls: PeerTls | None, name: str = "a") -> PeerClient:
    host, port = s.address
    return PeerClient(name, host, port, KEYS[name], Log(), expect_peer="b", tls=tls)


def refused(c: PeerClient) -> str:
    try:
        with pytest.raises(ConnectionFailed) as e:
            c.request(wire.Ping(1), timeout=WAIT)
    finally:
        c.close()
    text = str(e.value)
    assert "\n" not in text
    return text


def test_good_certificates_carry_requests(server, pki) -> None:  # type: ignore[no-untyped-def]
    s, log = server(pki["b"])
    c = client(s, pki["a"])
    try:
        assert c.request(wire.Ping(42), timeout=WAIT) == wire.Pong(42)
        log.wait_for("peer 'a' connected")
        # Large frames and many small ones in flight at once take the TLS send path.
        big = wire.Write("g/p", 0, b"\x5a" * (8 << 20))
        assert c.request(big, timeout=WAIT) == wire.Ack(0, f"a wrote {8 << 20}")
        pending = [c.send(wire.Write("g/p", i * 4096, bytes(4096))) for i in range(200)]
        assert {p.result() for p in pending} == {wire.Ack(0, "a wrote 4096")}
        assert isinstance(c._conn.link.sock, ssl.SSLSocket)  # type: ignore[union-attr]
    finally:
        c.close()


@pytest.mark.parametrize("which", ["a-other", "a-samename"])
def test_wrong_ca_refused(server, pki, which) -> None:  # type: ignore[no-untyped-def]
    """A CA of another name, and another CA of the same name (another lab's)."""
    s, log = server(pki["b"])
    msg = refused(client(s, pki[which]))
    assert "TLS handshake failed: certificate verify failed (unknown CA: " in msg, msg
    log.wait_for("TLS handshake failed: the peer does not trust our certificate (")


def test_expired_certificate_refused(server, pki) -> None:  # type: ignore[no-untyped-def]
    s, log = server(pki["b-expired"])
    msg = refused(client(s, pki["a"]))
    assert msg.endswith("TLS handshake failed: certificate verify failed (certificate has expired)")
    log.wait_for("TLS handshake failed: the peer refused our certificate (certificate expired)")


def test_expired_client_certificate_refused(server, pki) -> None:  # type: ignore[no-untyped-def]
    s, log = server(pki["a"], name="b")
    host, port = s.address
    c = PeerClient("a", host, port, KEYS["a"], Log(), tls=pki["b-expired"])
    msg = refused(c)
    assert "TLS handshake failed: the peer refused our certificate" in msg, msg
    log.wait_for("TLS handshake failed: certificate verify failed (certificate has expired)")


def test_missing_client_certificate_refused(server, pki) -> None:  # type: ignore[no-untyped-def]
    s, log = server(pki["b"])
    host, port = s.address
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki["b"].ca)
    raw = socket.create_connection((host, port), timeout=WAIT)
    with ctx.wrap_socket(raw) as tls, pytest.raises(ssl.SSLError) as e:
        tls.sendall(b"PVRP")
        tls.recv(1)
    assert "CERTIFICATE_REQUIRED" in str(e.value)
    log.wait_for("TLS handshake failed: the peer sent no certificate")


def test_plaintext_client_refused_by_tls_server(server, pki) -> None:  # type: ignore[no-untyped-def]
    s, log = server(pki["b"])
    msg = refused(client(s, None))
    assert "node b requires TLS on peer links" in msg, msg
    log.wait_for("refused: plaintext peer link, this node requires TLS")


def test_tls_client_refused_by_plaintext_server(server, pki) -> None:  # type: ignore[no-untyped-def]
    s, log = server(None)
    msg = refused(client(s, pki["a"]))
    assert msg.endswith("TLS handshake failed: the peer does not speak TLS (plaintext peer link?)")
    log.wait_for("refused: the peer speaks TLS, this node has no TLS on peer links")


def test_certificate_must_name_the_proven_node(server, pki) -> None:  # type: ignore[no-untyped-def]
    s, log = server(pki["b"])
    msg = refused(client(s, pki["c"]))  # node a, holding a's key, presents c's certificate
    assert "its TLS certificate is for 'c', not 'a'" in msg, msg
    log.wait_for("peer 'a' (127.0.0.1:")
    s2, _ = server(pki["c"])  # and the client checks the server the same way
    assert "its TLS certificate is for 'c', not 'b'" in refused(client(s2, pki["a"]))


def test_options_all_or_none_and_files_named(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    assert check_options(None, None, None) is False
    with pytest.raises(UsageError, match="go together: --tls-cert without --tls-key --tls-ca"):
        check_options("c", None, None)
    b = pki["b"]
    with pytest.raises(NotFound, match=f"--tls-ca {tmp_path}/nope does not exist"):
        PeerTls.load(b.cert, b.key, str(tmp_path / "nope"))
    (tmp_path / "junk").write_text("not a certificate\n")
    with pytest.raises(UsageError, match=f"--tls-cert {tmp_path}/junk holds no PEM certificate"):
        PeerTls.load(str(tmp_path / "junk"), b.key, b.ca)
    with pytest.raises(UsageError, match=r"--tls-key .* does not match the certificate"):
        PeerTls.load(b.cert, pki["a"].key, b.ca)
    config = NodeConfig()
    config.set("tls-cert", b.cert)
    with pytest.raises(UsageError, match="go together"):
        config.load_tls()


def test_handshake_deadline_holds_with_tls(server, pki) -> None:  # type: ignore[no-untyped-def]
    """A stranger that connects and says nothing does not hold the server up."""
    s, _ = server(pki["b"])
    with socket.create_connection(s.address, timeout=WAIT):
        c = client(s, pki["a"])
        start = time.monotonic()
        try:
            assert c.request(wire.Ping(7), timeout=WAIT) == wire.Pong(7)
        finally:
            c.close()
        assert time.monotonic() - start < WAIT
