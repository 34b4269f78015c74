"""Peer authentication: an HMAC-SHA256 challenge-response, as a pure state machine.

Theory of operation
-------------------
Each side of a new connection runs one :class:`Handshake`: the *initiator* (the node that
connected) or the *acceptor* (the node that accepted).  Messages go in through
:meth:`Handshake.receive` and the messages to send come out; there is no I/O and no clock (the
adapter bounds the handshake's duration and keeps its decoder at
:data:`~replicator.wire.HANDSHAKE_MAX_PAYLOAD` until :attr:`Handshake.done`)::

    initiator                                   acceptor
    Hello(name_i, nonce_i)  ---->    <----  Hello(name_a, nonce_a)     (both at start)
    Auth(mac_i)             ---->                                      (after the peer's Hello)
                                    acceptor checks mac_i
                            <----   Auth(mac_a), AuthResult(ok=True)   ... acceptor done
    initiator checks mac_a, then AuthResult: done
                            <----   AuthResult(ok=False, reason)       (wrong mac_i: both close)

    mac_x = HMAC-SHA256(SHA-256(key), b"pairvol-auth-v1" || role_x || own nonce
                        || peer nonce || u8 len || own name || u8 len || peer name)

Keys.  Each side picks the key by the name in the *peer's* Hello, from its
:class:`PeerSecrets`: a keyring holds one key per peer (the two ends of a link hold the same
key, a key no other node knows), so the name a handshake reports in :attr:`Handshake.peer_name`
is proven by the key bound to that name, and a node cannot pose as another.  An acceptor that
has no key for the announced name refuses at once with ``AuthResult(ok=False)``; an initiator
that has none for the acceptor's name fails.  A single shared secret
(:meth:`PeerSecrets.shared_secret`, or plain ``bytes``) is the same key for every name:
weaker, since every holder can pose as every node.  :func:`parse_secrets` reads the secret
file's format.

``role_x`` is ``b"I"`` or ``b"A"``: a MAC sent by one role never verifies as the other's, so a
peer cannot reflect our own proof back at us.  The fresh nonces of both sides make a recorded
Auth useless in any other session.  The acceptor proves itself only to an initiator that has
already proved itself, so an unauthenticated stranger never gets a MAC out of a node.

What it does not do: the stream is neither encrypted nor integrity-protected after the
handshake, so an attacker who can rewrite TCP traffic between the nodes can hijack an
authenticated connection.  Replication links belong on a trusted network or in a tunnel
(docs/protocol.md, "Authentication").

Failures.  A malformed, unexpected or unproven message raises
:class:`~replicator.errors.ProtocolError` (nothing but Hello, Auth and AuthResult is accepted
before authentication).  One failure returns instead of raising, because the peer must be told:
an acceptor that gets a wrong MAC returns ``[AuthResult(ok=False)]`` and is then
:attr:`~Handshake.failed`, with the error in :attr:`~Handshake.error`; the caller sends the
reply and closes the connection.  Any later call raises.

No secret.  A node configured without a secret (``secret=b""`` or an empty
:class:`PeerSecrets`, only with
``allow_no_secret=True``) runs the same exchange with an empty HMAC key, so it succeeds only
against a peer that has no secret either; both sides flag it in Hello (``FEATURE_NO_SECRET``),
so a one-sided configuration gets a clear message, and :attr:`Handshake.unauthenticated` tells
the adapter to log a warning.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Final, Literal

from replicator.errors import ProtocolError, UsageError
from replicator.wire import (
    FEATURE_NO_SECRET,
    NONCE_SIZE,
    Auth,
    AuthResult,
    Error,
    Goodbye,
    Hello,
    Message,
    check_node_name,
)

AUTH_CONTEXT: Final = b"pairvol-auth-v1"
PROTO_VERSION: Final = 1

HandshakeRole = Literal["initiator", "acceptor"]
_ROLE_BYTE: Final[dict[str, bytes]] = {"initiator": b"I", "acceptor": b"A"}
_OTHER: Final[dict[str, HandshakeRole]] = {"initiator": "acceptor", "acceptor": "initiator"}


class PeerSecrets:
    """The keys of a node's peer links: a keyring (one key per peer name), one shared secret
    for every peer, or nothing (no authentication).  Immutable; its repr shows no key."""

    __slots__ = ("_keys", "_shared")

    def __init__(self, keys: Mapping[str, bytes] | None = None, *, shared: bytes = b"") -> None:
        keys = dict(keys or {})
        if keys and shared:
            raise UsageError("peer secrets are a keyring or one shared secret, not both")
        for name, key in keys.items():
            check_node_name(name)
            if not isinstance(key, bytes) or not key:
                raise UsageError(f"the key for peer {name!r} must be non-empty bytes")
        if not isinstance(shared, bytes):
            raise UsageError("the peer secret must be bytes")
        self._keys: Final = keys
        self._shared: Final = shared

    @classmethod
    def shared_secret(cls, secret: bytes) -> PeerSecrets:
        """One secret for every peer (``b""``: none at all)."""
        return cls(shared=secret)

    @property
    def shared(self) -> bool:
        """One secret for every peer name: any holder can pose as any node."""
        return bool(self._shared)

    @property
    def peers(self) -> tuple[str, ...]:
        """The peer names of a keyring, sorted (empty for a shared secret or none)."""
        return tuple(sorted(self._keys))

    def for_peer(self, name: str) -> bytes | None:
        """The key for the link to ``name``; None if a keyring has none for it (``b""`` when
        no secret is configured at all)."""
        if self._keys:
            return self._keys.get(name)
        return self._shared

    def __bool__(self) -> bool:
        """Whether any secret is configured."""
        return bool(self._keys or self._shared)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PeerSecrets):
            return NotImplemented
        return self._keys == other._keys and self._shared == other._shared

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if self._keys:
            return f"PeerSecrets(keyring for {', '.join(self.peers)})"
        return "PeerSecrets(shared secret)" if self._shared else "PeerSecrets(none)"


def as_peer_secrets(secret: bytes | PeerSecrets) -> PeerSecrets:
    """``secret`` as :class:`PeerSecrets`: plain bytes are a shared secret."""
    if isinstance(secret, PeerSecrets):
        return secret
    if isinstance(secret, bytes):
        return PeerSecrets.shared_secret(secret)
    raise UsageError("the peer secret must be bytes or PeerSecrets")


def parse_secrets(data: bytes, source: str = "secret file") -> PeerSecrets:
    """Parse a secret file (docs/protocol.md, "Secrets").

    Lines ``PEERNAME SECRET`` make a keyring, one line per peer; blank lines and lines whose
    first non-blank character is ``#`` are ignored; a file whose only such line is one bare
    word is a shared secret.  Neither names nor secrets contain whitespace.  Any other
    content raises one :class:`~replicator.errors.UsageError` naming ``source`` and the line.
    """
    entries: list[tuple[int, list[bytes]]] = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.rstrip(b"\r").strip()
        if line and not line.startswith(b"#"):
            entries.append((number, line.split()))
    if not entries:
        raise UsageError(f"{source} is empty (no secret in it)")
    if len(entries) == 1 and len(entries[0][1]) == 1:
        return PeerSecrets.shared_secret(entries[0][1][0])
    keys: dict[str, bytes] = {}
    seen: dict[str, int] = {}
    for number, fields in entries:
        where = f"{source} line {number}"
        if len(fields) != 2:
            what = "a bare secret is allowed only alone" if len(fields) == 1 else "too many fields"
            raise UsageError(f"{where}: expected 'PEERNAME SECRET' ({what})")
        try:
            name = check_node_name(fields[0].decode("utf-8"))
        except (UnicodeDecodeError, UsageError) as e:
            why = "is not UTF-8" if isinstance(e, UnicodeDecodeError) else str(e)
            raise UsageError(f"{where}: bad peer name: {why}") from None
        if name in seen:
            raise UsageError(f"{where}: peer {name!r} already has a key (line {seen[name]})")
        seen[name] = number
        keys[name] = fields[1]
    return PeerSecrets(keys)


def compute_mac(
    key: bytes,
    role: HandshakeRole,
    own_nonce: bytes,
    peer_nonce: bytes,
    own_name: str,
    peer_name: str,
) -> bytes:
    """The Auth MAC that the side playing ``role`` sends (docs/protocol.md), with the link's
    ``key`` (the shared secret, or the keyring's key for the pair of names)."""
    own, peer = own_name.encode(), peer_name.encode()
    text = b"".join(
        (
            AUTH_CONTEXT,
            _ROLE_BYTE[role],
            own_nonce,
            peer_nonce,
            bytes([len(own)]),
            own,
            bytes([len(peer)]),
            peer,
        )
    )
    # HMAC pads short keys with zero bytes, so b"k" and b"k\0" would be the same key; hashing
    # the secret first gives every secret a key of the same length.
    hashed = hashlib.sha256(key).digest()
    return hmac.new(hashed, text, hashlib.sha256).digest()


class Step(enum.Enum):
    START = "start"  # start() not called yet
    HELLO = "wait-hello"  # our Hello sent, waiting for the peer's
    AUTH = "wait-auth"  # waiting for the peer's Auth (initiator: or a refusal)
    RESULT = "wait-result"  # initiator: acceptor proven, waiting for AuthResult
    DONE = "done"
    FAILED = "failed"


#: What each side accepts in each step; anything else is a ProtocolError.
ACCEPTS: Final[dict[tuple[HandshakeRole, Step], tuple[type, ...]]] = {
    ("initiator", Step.HELLO): (Hello,),
    ("initiator", Step.AUTH): (Auth, AuthResult),
    ("initiator", Step.RESULT): (AuthResult,),
    ("acceptor", Step.HELLO): (Hello,),
    ("acceptor", Step.AUTH): (Auth,),
}


class Handshake:
    """One side of the authentication handshake.  See the module docstring."""

    def __init__(
        self,
        role: HandshakeRole,
        secret: bytes | PeerSecrets,
        node_name: str,
        *,
        nonce: bytes | None = None,
        expect_peer: str | None = None,
        features: int = 0,
        allow_no_secret: bool = False,
    ) -> None:
        if role not in _ROLE_BYTE:
            raise UsageError(f"handshake role {role!r} is not initiator or acceptor")
        keys = as_peer_secrets(secret)
        if not keys and not allow_no_secret:
            raise UsageError("no peer secret configured; replication links need a shared secret")
        check_node_name(node_name)
        if expect_peer is not None:
            check_node_name(expect_peer)
        if nonce is None:
            nonce = secrets.token_bytes(NONCE_SIZE)
        if keys:
            features &= ~FEATURE_NO_SECRET
        else:
            features |= FEATURE_NO_SECRET
        self.role: HandshakeRole = role
        self.node_name = node_name
        self.expect_peer = expect_peer
        self._secrets = keys
        self._key = b""  # the link's key, chosen by the peer's name when its Hello arrives
        self._hello = Hello(PROTO_VERSION, node_name, nonce, features)  # checks nonce, features
        self._peer: Hello | None = None
        self._step = Step.START
        self.error: ProtocolError | None = None

    # -- state ------------------------------------------------------------------------------

    @property
    def step(self) -> Step:
        return self._step

    @property
    def done(self) -> bool:
        """The peer proved it knows the secret (for the initiator: and accepted our proof)."""
        return self._step is Step.DONE

    @property
    def failed(self) -> bool:
        return self._step is Step.FAILED

    @property
    def unauthenticated(self) -> bool:
        """Authentication is disabled (no secret on either side): log a warning."""
        return not self._secrets

    @property
    def shared_secret(self) -> bool:
        """This side uses one secret for every peer, so the name is not bound to a key."""
        return self._secrets.shared

    @property
    def peer_name(self) -> str | None:
        """The authenticated peer's node name, proven by the key bound to it; None until
        :attr:`done`."""
        return self._peer.node_name if self.done and self._peer else None

    @property
    def proto_version(self) -> int | None:
        """The protocol version both sides speak; None until :attr:`done`."""
        if not self.done or self._peer is None:
            return None
        return min(PROTO_VERSION, self._peer.proto_version)

    @property
    def features(self) -> int | None:
        """The feature bits both sides offered; None until :attr:`done`."""
        if not self.done or self._peer is None:
            return None
        return self._hello.features & self._peer.features & ~FEATURE_NO_SECRET

    # -- input ------------------------------------------------------------------------------

    def start(self) -> list[Message]:
        """The messages to send as soon as the connection is up: our Hello."""
        if self._step is not Step.START:
            raise ProtocolError("handshake already started", remote=False)
        self._step = Step.HELLO
        return [self._hello]

    def receive(self, msg: Message) -> list[Message]:
        """Take one message from the peer; return the messages to send, in order."""
        step = self._step
        if step is Step.START:
            raise ProtocolError("handshake not started: call start() first", remote=False)
        if step is Step.FAILED:
            raise ProtocolError(f"handshake already failed: {self.error}")
        if step is Step.DONE:
            raise ProtocolError("handshake is finished; messages go to the session", remote=False)
        who = self._who()
        if isinstance(msg, Goodbye):
            why = msg.reason or "no reason given"
            return self._fail(f"{who} closed the connection during the handshake: {why}")
        if isinstance(msg, Error):
            return self._fail(f"{who} reported error {msg.code}: {msg.message}")
        if not isinstance(msg, ACCEPTS[self.role, step]):
            return self._fail(f"{who} sent {type(msg).__name__} before authentication")
        if isinstance(msg, Hello):
            return self._on_hello(msg)
        if isinstance(msg, Auth):
            return self._on_auth(msg)
        assert isinstance(msg, AuthResult)
        return self._on_result(msg)

    def _on_hello(self, hello: Hello) -> list[Message]:
        name = hello.node_name
        if self.expect_peer is not None and name != self.expect_peer:
            return self._fail(f"expected peer {self.expect_peer!r} but {name!r} answered")
        if name == self.node_name:
            return self._fail(f"peer claims our own node name {name!r}")
        if hello.nonce == self._hello.nonce:
            return self._fail(f"peer {name!r} sent back our own nonce (reflection)")
        key = self._secrets.for_peer(name)
        if key is None:
            why = f"unknown peer {name!r}: {self.node_name!r} has no secret for it"
            if self.role == "acceptor":
                self._fail(why, raise_=False)
                return [AuthResult(ok=False, reason=f"authentication failed: {why}")]
            return self._fail(why)
        self._key = key
        self._peer = hello
        self._step = Step.AUTH
        if self.role == "initiator":
            return [Auth(self._mac(self.role, self._hello, hello))]
        return []

    def _on_auth(self, auth: Auth) -> list[Message]:
        assert self._peer is not None
        expected = self._mac(_OTHER[self.role], self._peer, self._hello)
        if not hmac.compare_digest(auth.mac, expected):
            problem = self._secret_problem()
            if self.role == "acceptor":
                self._fail(f"{self._who()} failed authentication ({problem})", raise_=False)
                return [AuthResult(ok=False, reason=f"authentication failed: {problem}")]
            return self._fail(f"{self._who()} failed authentication ({problem})")
        if self.role == "acceptor":
            self._step = Step.DONE
            return [Auth(self._mac(self.role, self._hello, self._peer)), AuthResult(ok=True)]
        self._step = Step.RESULT
        return []

    def _on_result(self, result: AuthResult) -> list[Message]:
        if not result.ok:
            why = result.reason or "no reason given"
            return self._fail(f"{self._who()} refused our authentication: {why}")
        if self._step is not Step.RESULT:
            return self._fail(f"{self._who()} reported success without proving the secret")
        self._step = Step.DONE
        return []

    # -- helpers ----------------------------------------------------------------------------

    def _mac(self, role: HandshakeRole, sender: Hello, receiver: Hello) -> bytes:
        return compute_mac(
            self._key, role, sender.nonce, receiver.nonce, sender.node_name, receiver.node_name
        )

    def _secret_problem(self) -> str:
        assert self._peer is not None
        peer_has_none = bool(self._peer.features & FEATURE_NO_SECRET)
        if peer_has_none and self._secrets:
            return f"{self._peer.node_name!r} has no secret configured, {self.node_name!r} has one"
        if not peer_has_none and not self._secrets:
            return f"{self.node_name!r} has no secret configured, {self._peer.node_name!r} has one"
        return "wrong secret"

    def _who(self) -> str:
        return f"peer {self._peer.node_name!r}" if self._peer is not None else "the peer"

    def _fail(self, message: str, *, raise_: bool = True) -> list[Message]:
        self._step = Step.FAILED
        self.error = ProtocolError(message)
        if raise_:
            raise self.error
        return []
