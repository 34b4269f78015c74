"""TLS on peer links: the standard :mod:`ssl` module under the HMAC handshake.

A node with TLS has three files: its certificate, its key and the CA that signs every node's
certificate.  Both ends verify each other (mutual authentication, ``CERT_REQUIRED`` on both
sides) against the CA.  Peers are addressed by IP, so the host name is not checked; instead the
certificate names the node (subject CN and a SAN DNS name), and once the HMAC handshake of
:mod:`replicator.peer_auth` has proven the peer's node name, that name must be one the peer's
certificate carries (docs/decisions.md, "TLS identity").  TLS protects the channel; the
handshake still proves the node name and its key.

Threads: a link has one reader and, under its send lock, one writer at a time.  OpenSSL lets
a read and a write run at once only when neither needs the other direction, so the server
sends no session tickets (``num_tickets = 0``) and renegotiation is off; TLS 1.3 key updates
are never requested.  Reads then only read and writes only write.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Final

from replicator.errors import NotFound, UsageError

#: The first byte of every TLS connection (a handshake record); a pairvol frame starts "PVRP".
TLS_HANDSHAKE_BYTE: Final = 0x16

OPTIONS: Final = ("--tls-cert", "--tls-key", "--tls-ca")

#: OpenSSL reasons, in words (:func:`describe`).
_REASONS: Final = {
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate (unknown CA)",
    "TLSV1_ALERT_DECRYPT_ERROR": "the peer does not trust our certificate (signed by another CA?)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer refused our certificate (certificate expired)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a certificate and we sent none",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (plaintext peer link?)",
    "HTTP_REQUEST": "the peer does not speak TLS (plaintext peer link?)",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection (no TLS on its peer links?)",
}


def describe(e: BaseException) -> str:
    """One line saying why a TLS handshake failed."""
    if isinstance(e, ssl.SSLCertVerificationError):
        why = e.verify_message or "unknown reason"
        if why in ("unable to get local issuer certificate", "self-signed certificate",
                   "self signed certificate", "self-signed certificate in certificate chain",
                   "self signed certificate in certificate chain",
                   "certificate signature failure"):  # fmt: skip
            why = f"unknown CA: {why}"
        return f"certificate verify failed ({why})"
    if isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError | EOFError):
        return "the peer closed the connection (no TLS on its peer links?)"
    if isinstance(e, ssl.SSLError):
        reason = getattr(e, "reason", None)
        if reason in _REASONS:
            return _REASONS[reason]
        if reason:
            return str(reason).lower().replace("_", " ")
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def check_options(cert: str | None, key: str | None, ca: str | None) -> bool:
    """Whether TLS is configured: all three files or none (UsageError otherwise)."""
    given = [opt for opt, v in zip(OPTIONS, (cert, key, ca), strict=True) if v]
    if given and len(given) != len(OPTIONS):
        missing = [opt for opt in OPTIONS if opt not in given]
        raise UsageError(
            f"{', '.join(OPTIONS)} go together: {' '.join(given)} without {' '.join(missing)}"
        )
    return bool(given)


def _read_pem(option: str, path: str, marker: bytes) -> None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise NotFound(f"{option} {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot read it: {e.strerror}") from None
    if marker not in data:
        what = "private key" if marker.endswith(b"KEY-----") else "certificate"
        raise UsageError(f"{option} {path} holds no PEM {what}")


@dataclass(frozen=True)
class PeerTls:
    """A node's TLS configuration and its two contexts (build with :meth:`load`)."""

    cert: str
    key: str
    ca: str
    server: ssl.SSLContext = field(repr=False, compare=False)
    client: ssl.SSLContext = field(repr=False, compare=False)

    @classmethod
    def load(cls, cert: str, key: str, ca: str) -> PeerTls:
        """Check and load the three files; NotFound or UsageError naming the file."""
        cert, key, ca = (os.path.abspath(p) for p in (cert, key, ca))
        _read_pem("--tls-cert", cert, b"-----BEGIN CERTIFICATE-----")
        _read_pem("--tls-key", key, b"PRIVATE KEY-----")
        _read_pem("--tls-ca", ca, b"-----BEGIN CERTIFICATE-----")
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False  # peers are IPs; the node name is checked instead
        for ctx in (server, client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.options |= ssl.OP_NO_RENEGOTIATION
            try:
                ctx.load_verify_locations(cafile=ca)
            except ssl.SSLError as e:
                raise UsageError(
                    f"--tls-ca {ca}: not a usable CA certificate: {e.reason}"
                ) from None
            try:
                ctx.load_cert_chain(cert, key)
            except ssl.SSLError as e:
                why = "does not match the certificate" if "MISMATCH" in str(e.reason) else e.reason
                raise UsageError(f"--tls-key {key}: {why} (--tls-cert {cert})") from None
        server.num_tickets = 0  # no post-handshake writes by the reader (module docstring)
        return cls(cert, key, ca, server, client)


def peer_names(sock: ssl.SSLSocket) -> list[str]:
    """The node names the peer's (verified) certificate carries: its SAN DNS names and its
    subject CN."""
    cert: dict[str, Any] = dict(sock.getpeercert() or {})
    names: list[str] = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS" and value not in names:
            names.append(str(value))
    for rdn in cert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName" and value not in names:
                names.append(str(value))
    return names


def identity_error(sock: socket.socket, proven: str | None) -> str | None:
    """None if the certificate of the peer on ``sock`` names node ``proven`` (or ``sock`` has
    no TLS), else why not."""
    if not isinstance(sock, ssl.SSLSocket) or proven is None:
        return None
    names = peer_names(sock)
    if proven in names:
        return None
    return f"its TLS certificate is for {', '.join(map(repr, names)) or 'no name'}, not {proven!r}"


# --------------------------------------------------------------------------------------------
# Making certificates (the lab and the tests; ``cryptography`` is imported only here)


def new_ca(directory: str, name: str = "pairvol lab CA", *, days: float = 3650) -> tuple[str, str]:
    """A self-signed CA in ``directory``: ``ca.pem`` and ``ca.key`` (mode 0600); their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _write_pair(directory, "ca", cert, key)


def new_node_cert(
    directory: str,
    ca: tuple[str, str],
    node: str,
    address: str | None = None,
    *,
    days: float = 3650,
    expired: bool = False,
) -> tuple[str, str]:
    """A certificate for node ``node`` signed by ``ca`` (its ``ca.pem``, ``ca.key`` paths):
    subject CN and SAN DNS ``node``, and SAN IP ``address``; ``NODE.pem`` and ``NODE.key`` in
    ``directory``.  ``expired``: one that ran out yesterday (for tests)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    with open(ca[0], "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    with open(ca[1], "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    if expired:
        start, end = now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
    names: list[x509.GeneralName] = [x509.DNSName(node)]
    if address:
        names.append(x509.IPAddress(ipaddress.ip_address(address)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _write_pair(directory, node, cert, key)


def _write_pair(directory: str, stem: str, cert: Any, key: Any) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    cert_path = os.path.join(directory, f"{stem}.pem")
    key_path = os.path.join(directory, f"{stem}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path
