"""Peer authentication: two Handshakes talking through the real codec, honest and not."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from replicator import wire
from replicator.errors import ProtocolError, UsageError
from replicator.peer_auth import (
    ACCEPTS,
    Handshake,
    PeerSecrets,
    Step,
    as_peer_secrets,
    compute_mac,
    parse_secrets,
)
from replicator.wire import (
    FEATURE_NO_SECRET,
    Ack,
    Auth,
    AuthResult,
    Error,
    FrameDecoder,
    Goodbye,
    Hello,
    Message,
    PairCreate,
    Ping,
    Write,
    encode,
)

SECRET = b"s3cret-shared-by-a-and-b-0123456"
NA = bytes(range(32))
NB = bytes(range(32, 64))


def over_the_wire(msgs: list[Message]) -> list[Message]:
    d = FrameDecoder(max_payload=wire.HANDSHAKE_MAX_PAYLOAD)
    d.feed(b"".join(encode(m) for m in msgs))
    out = []
    while (m := d.next_message()) is not None:
        out.append(m)
    assert out == msgs
    return out


def run(a: Handshake, b: Handshake) -> tuple[ProtocolError | None, ProtocolError | None]:
    """Pump messages between initiator ``a`` and acceptor ``b`` until both stop.  Returns the
    error each side raised or failed with.  What a side sent before it closed still arrives."""
    errors: list[ProtocolError | None] = [None, None]
    sides = (a, b)
    queues: list[list[Message]] = [over_the_wire(b.start()), over_the_wire(a.start())]
    progress = True
    while progress:
        progress = False
        for i in (0, 1):
            while queues[i] and errors[i] is None:
                msg = queues[i].pop(0)
                progress = True
                try:
                    reply = sides[i].receive(msg)
                except ProtocolError as e:
                    errors[i] = e
                    break
                queues[1 - i] += over_the_wire(reply)
                if sides[i].failed:  # replied, then closes
                    errors[i] = sides[i].error
    return errors[0], errors[1]


def pair(
    secret_a: bytes = SECRET, secret_b: bytes = SECRET, *, allow_no_secret: bool = False
) -> tuple[Handshake, Handshake]:
    return (
        Handshake("initiator", secret_a, "a", nonce=NA, allow_no_secret=allow_no_secret),
        Handshake("acceptor", secret_b, "b", nonce=NB, allow_no_secret=allow_no_secret),
    )


def test_same_secret_succeeds() -> None:
    a, b = pair()
    assert run(a, b) == (None, None)
    assert a.done and b.done and not a.failed and not b.failed
    assert (a.peer_name, b.peer_name) == ("b", "a")
    assert a.proto_version == b.proto_version == 1
    assert a.features == b.features == 0
    assert not a.unauthenticated


@example(b"\0", b"\0\0", NA, NB)  # HMAC alone would pad the shorter key into the longer
@given(
    st.binary(min_size=1, max_size=64),
    st.binary(min_size=1, max_size=64),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
)
def test_succeeds_exactly_when_the_secrets_match(
    sa: bytes, sb: bytes, na: bytes, nb: bytes
) -> None:
    a = Handshake("initiator", sa, "node-a", nonce=na)
    b = Handshake("acceptor", sb, "node-b", nonce=nb)
    ea, eb = run(a, b)
    if na == nb:
        assert ea is not None and eb is not None and "nonce" in str(ea)
    elif sa == sb:
        assert (ea, eb) == (None, None) and a.done and b.done
    else:
        assert not a.done and not b.done and a.failed and b.failed


def test_different_secrets_acceptor_refuses_and_initiator_learns_it() -> None:
    a, b = pair(secret_b=b"another secret")
    ea, eb = run(a, b)
    assert eb is not None and str(eb) == "peer 'a' failed authentication (wrong secret)"
    assert eb.remote and b.failed and b.error is eb
    assert ea is not None and a.failed
    assert str(ea) == "peer 'b' refused our authentication: authentication failed: wrong secret"
    assert a.peer_name is None and b.peer_name is None


def test_wrong_mac_reply_is_a_refusal_and_nothing_else() -> None:
    a, b = pair(secret_b=b"other")
    b.start()
    a.start()
    assert b.receive(Hello(1, "a", NA)) == []  # no MAC for a stranger yet
    reply = b.receive(Auth(bytes(32)))
    assert reply == [AuthResult(ok=False, reason="authentication failed: wrong secret")]
    assert b.failed and not b.done
    with pytest.raises(ProtocolError, match="handshake already failed: peer 'a' failed"):
        b.receive(Auth(bytes(32)))


def acceptor_view(a: Handshake) -> list[Message]:
    """Start initiator ``a`` and give it the acceptor 'b' Hello; return its Auth."""
    a.start()
    return a.receive(Hello(1, "b", NB))


def test_initiator_checks_the_acceptor_proof() -> None:
    a = Handshake("initiator", SECRET, "a", nonce=NA)
    acceptor_view(a)
    with pytest.raises(ProtocolError, match=r"peer 'b' failed authentication \(wrong secret\)"):
        a.receive(Auth(hmac.new(b"guess", b"", hashlib.sha256).digest()))
    assert a.failed


def test_initiator_refuses_success_without_proof() -> None:
    a = Handshake("initiator", SECRET, "a", nonce=NA)
    acceptor_view(a)
    with pytest.raises(ProtocolError, match="reported success without proving the secret"):
        a.receive(AuthResult(ok=True))
    assert not a.done


def test_reflected_mac_fails() -> None:
    """A fake acceptor sends our own Auth back: the role byte makes it the wrong MAC."""
    a = Handshake("initiator", SECRET, "a", nonce=NA)
    [auth] = acceptor_view(a)
    assert isinstance(auth, Auth)
    with pytest.raises(ProtocolError, match="failed authentication"):
        a.receive(auth)
    # The same for an acceptor fed its own would-be proof by a fake initiator.
    b = Handshake("acceptor", SECRET, "b", nonce=NB)
    b.start()
    b.receive(Hello(1, "a", NA))
    own = compute_mac(SECRET, "acceptor", NB, NA, "b", "a")
    assert b.receive(Auth(own)) == [AuthResult(False, "authentication failed: wrong secret")]


def test_reflected_hello_fails() -> None:
    a = Handshake("initiator", SECRET, "a", nonce=NA)
    [hello] = a.start()
    with pytest.raises(ProtocolError, match="claims our own node name 'a'"):
        a.receive(hello)
    a = Handshake("initiator", SECRET, "a", nonce=NA)
    a.start()
    with pytest.raises(ProtocolError, match="sent back our own nonce"):
        a.receive(Hello(1, "b", NA))


def test_replayed_auth_from_another_session_fails() -> None:
    a, b = pair()
    sent_to_b: list[Message] = []
    b_start = b.start()
    sent_to_b += a.start()
    sent_to_b += a.receive(b_start[0])
    assert b.receive(sent_to_b[0]) == []
    reply = b.receive(sent_to_b[1])
    assert b.done and reply[-1] == AuthResult(True)
    # An eavesdropper replays a's Hello and Auth to b in a new session: b's nonce is new.
    b2 = Handshake("acceptor", SECRET, "b")
    b2.start()
    assert b2.receive(sent_to_b[0]) == []
    assert b2.receive(sent_to_b[1]) == [AuthResult(False, "authentication failed: wrong secret")]
    assert b2.failed and not b2.done


def test_acceptor_never_proves_itself_to_a_stranger() -> None:
    """No MAC leaves the acceptor before the initiator's MAC checked out (no oracle)."""
    b = Handshake("acceptor", SECRET, "b", nonce=NB)
    out = b.start() + b.receive(Hello(1, "a", NA)) + b.receive(Auth(bytes(32)))
    assert not any(isinstance(m, Auth) for m in out)


DATA_MESSAGES: list[Message] = [
    Ping(1),
    Ack(0, ""),
    Write("g/p", 0, b"x"),
    PairCreate("g/p", "v", 4096, 65536, "sync", "never", 1, 1),
]


@pytest.mark.parametrize("role", ["initiator", "acceptor"])
@pytest.mark.parametrize("msg", DATA_MESSAGES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("after_hello", [False, True])
def test_nothing_else_before_authentication(role: str, msg: Message, after_hello: bool) -> None:
    h = Handshake(role, SECRET, "me", nonce=NA)  # type: ignore[arg-type]
    h.start()
    if after_hello:
        h.receive(Hello(1, "peer", NB))
    with pytest.raises(ProtocolError, match=f"sent {type(msg).__name__} before authentication"):
        h.receive(msg)
    assert h.failed
    with pytest.raises(ProtocolError, match="already failed"):
        h.receive(Hello(1, "peer", NB))


def test_out_of_order_handshake_messages_are_refused() -> None:
    for role, step in [("initiator", Step.HELLO), ("acceptor", Step.HELLO)]:
        h = Handshake(role, SECRET, "me", nonce=NA)  # type: ignore[arg-type]
        h.start()
        assert h.step is step and Auth not in ACCEPTS[h.role, step]
        with pytest.raises(ProtocolError, match="sent Auth before authentication"):
            h.receive(Auth(bytes(32)))
    b = Handshake("acceptor", SECRET, "b", nonce=NB)
    b.start()
    b.receive(Hello(1, "a", NA))
    with pytest.raises(ProtocolError, match="sent Hello before authentication"):
        b.receive(Hello(1, "a", NA))
    b = Handshake("acceptor", SECRET, "b", nonce=NB)
    b.start()
    b.receive(Hello(1, "a", NA))
    with pytest.raises(ProtocolError, match="sent AuthResult before authentication"):
        b.receive(AuthResult(True))


def test_goodbye_and_error_during_the_handshake() -> None:
    h = Handshake("acceptor", SECRET, "b", nonce=NB)
    h.start()
    with pytest.raises(
        ProtocolError, match="the peer closed the connection during the handshake: bye"
    ):
        h.receive(Goodbye("bye"))
    h = Handshake("initiator", SECRET, "a", nonce=NA)
    acceptor_view(h)
    with pytest.raises(ProtocolError, match="peer 'b' reported error 13: no"):
        h.receive(Error(13, "no"))


def test_expected_peer_name() -> None:
    a = Handshake("initiator", SECRET, "a", nonce=NA, expect_peer="c")
    a.start()
    with pytest.raises(ProtocolError, match="expected peer 'c' but 'b' answered"):
        a.receive(Hello(1, "b", NB))


def test_no_secret_on_both_sides_is_allowed_but_flagged() -> None:
    a, b = pair(b"", b"", allow_no_secret=True)
    assert run(a, b) == (None, None)
    assert a.done and b.done and a.unauthenticated and b.unauthenticated
    assert a.features == 0  # the flag is not a negotiated feature


@pytest.mark.parametrize(
    ("sa", "sb", "why"),
    [
        (b"", SECRET, "'a' has no secret configured, 'b' has one"),
        (SECRET, b"", "'b' has no secret configured, 'a' has one"),
    ],
)
def test_no_secret_on_one_side_fails_clearly(sa: bytes, sb: bytes, why: str) -> None:
    a, b = pair(sa, sb, allow_no_secret=True)
    ea, eb = run(a, b)
    assert eb is not None and str(eb) == f"peer 'a' failed authentication ({why})"
    assert ea is not None and why in str(ea)


def test_no_secret_needs_explicit_permission() -> None:
    with pytest.raises(UsageError, match="no peer secret configured"):
        Handshake("acceptor", b"", "b")


def test_features_are_the_intersection() -> None:
    a = Handshake("initiator", SECRET, "a", nonce=NA, features=0b1110)
    b = Handshake("acceptor", SECRET, "b", nonce=NB, features=0b0110 | FEATURE_NO_SECRET)
    assert run(a, b) == (None, None)
    assert a.features == b.features == 0b0110


def test_api_misuse_is_a_local_error() -> None:
    h = Handshake("initiator", SECRET, "a", nonce=NA)
    with pytest.raises(ProtocolError, match="call start\\(\\) first") as info:
        h.receive(Hello(1, "b", NB))
    assert not info.value.remote
    h.start()
    with pytest.raises(ProtocolError, match="already started"):
        h.start()
    a, b = pair()
    run(a, b)
    with pytest.raises(ProtocolError, match="handshake is finished") as info:
        a.receive(Ping(1))
    assert not info.value.remote
    with pytest.raises(UsageError):
        Handshake("server", SECRET, "a")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Handshake("initiator", SECRET, "a b")
    with pytest.raises(ProtocolError):
        Handshake("initiator", SECRET, "a", nonce=b"short")


def test_mac_known_answer() -> None:
    """The vector in docs/protocol.md ("Authentication")."""
    mac = compute_mac(b"secret", "initiator", NA, NB, "node-a", "node-b")
    text = b"pairvol-auth-v1" + b"I" + NA + NB + b"\x06node-a" + b"\x06node-b"
    key = hashlib.sha256(b"secret").digest()
    assert mac == hmac.new(key, text, hashlib.sha256).digest()
    assert mac.hex() == KNOWN_MAC


KNOWN_MAC = "a3e89ac8e0594d54e75ae71c86b278ecc5d0d421bf92186fcd15c58e311d744f"


# --------------------------------------------------------------------------------------------
# Per-link keys: a keyring binds each peer name to a key only that pair of nodes holds

K_AB, K_AC, K_BC = b"key-of-a-and-b", b"key-of-a-and-c", b"key-of-b-and-c"
KEYRINGS = {
    "a": PeerSecrets({"b": K_AB, "c": K_AC}),
    "b": PeerSecrets({"a": K_AB, "c": K_BC}),
    "c": PeerSecrets({"a": K_AC, "b": K_BC}),
}


def handshake_as(claimed: str, keys: PeerSecrets, acceptor: str) -> tuple[Handshake, Handshake]:
    """An initiator announcing ``claimed`` with ``keys``, to ``acceptor`` with its keyring."""
    a = Handshake("initiator", keys, claimed, nonce=NA)
    b = Handshake("acceptor", KEYRINGS[acceptor], acceptor, nonce=NB)
    return a, b


def test_every_pair_of_nodes_authenticates_with_its_own_key() -> None:
    for me in "abc":
        for peer in "abc":
            if me != peer:
                a, b = handshake_as(me, KEYRINGS[me], peer)
                assert run(a, b) == (None, None)
                assert (a.peer_name, b.peer_name) == (peer, me)
                assert not a.shared_secret and not b.shared_secret


def test_a_node_with_its_own_keys_cannot_pose_as_another() -> None:
    """Issue 7: c holds keys for a and for b, but not the a-b key, so it cannot be 'a' to b."""
    a, b = handshake_as("a", KEYRINGS["c"], "b")
    ea, eb = run(a, b)
    assert eb is not None and str(eb) == "peer 'a' failed authentication (wrong secret)"
    assert ea is not None and "refused our authentication" in str(ea)
    assert a.peer_name is None and b.peer_name is None and not b.done


def test_the_other_links_key_proves_nothing_either() -> None:
    """c uses the b-c key (which b has) while claiming 'a': b checks against the a-b key."""
    a, b = handshake_as("a", PeerSecrets.shared_secret(K_BC), "b")
    _, eb = run(a, b)
    assert eb is not None and "failed authentication (wrong secret)" in str(eb)
    assert not b.done and b.peer_name is None


def test_with_a_shared_secret_any_holder_can_pose_as_any_node() -> None:
    """Documented as weaker: one secret for all is not bound to a name."""
    a = Handshake("initiator", SECRET, "a", nonce=NA)  # really node c, claiming to be a
    b = Handshake("acceptor", SECRET, "b", nonce=NB)
    assert run(a, b) == (None, None)
    assert b.peer_name == "a" and b.shared_secret


def test_acceptor_refuses_an_unknown_peer_name_before_any_mac() -> None:
    a, b = handshake_as("mallory", PeerSecrets.shared_secret(K_AB), "b")
    b.start()
    a.start()
    reason = "authentication failed: unknown peer 'mallory': 'b' has no secret for it"
    assert b.receive(Hello(1, "mallory", NA)) == [AuthResult(ok=False, reason=reason)]
    assert b.failed and b.error is not None
    assert str(b.error) == "unknown peer 'mallory': 'b' has no secret for it"
    a2, b2 = handshake_as("mallory", PeerSecrets.shared_secret(K_AB), "b")
    ea, _ = run(a2, b2)
    assert ea is not None and str(ea) == f"peer 'b' refused our authentication: {reason}"


def test_initiator_refuses_an_acceptor_it_has_no_key_for() -> None:
    a = Handshake("initiator", KEYRINGS["a"], "a", nonce=NA)
    b = Handshake("acceptor", SECRET, "mallory", nonce=NB)
    ea, eb = run(a, b)
    assert ea is not None and str(ea) == "unknown peer 'mallory': 'a' has no secret for it"
    assert eb is None and not b.done  # it waits for an Auth that never comes (the adapter closes)


def test_keyring_and_shared_secret_interoperate_when_the_keys_match() -> None:
    a = Handshake("initiator", PeerSecrets({"b": SECRET}), "a", nonce=NA)
    b = Handshake("acceptor", SECRET, "b", nonce=NB)
    assert run(a, b) == (None, None)


def test_keyring_on_one_side_no_secret_on_the_other_fails_clearly() -> None:
    a = Handshake("initiator", b"", "a", nonce=NA, allow_no_secret=True)
    b = Handshake("acceptor", KEYRINGS["b"], "b", nonce=NB)
    _, eb = run(a, b)
    assert eb is not None and "'a' has no secret configured, 'b' has one" in str(eb)


def test_peer_secrets_value_semantics() -> None:
    ring = PeerSecrets({"b": K_AB})
    assert ring.for_peer("b") == K_AB and ring.for_peer("c") is None
    assert ring.peers == ("b",) and not ring.shared and ring
    shared = as_peer_secrets(SECRET)
    assert shared == PeerSecrets.shared_secret(SECRET) and shared.shared
    assert shared.for_peer("anyone") == SECRET and shared.peers == ()
    none = as_peer_secrets(b"")
    assert not none and none.for_peer("b") == b"" and not none.shared
    assert as_peer_secrets(ring) is ring
    for text in (repr(ring), repr(shared), str(ring)):
        assert "key-of" not in text and "s3cret" not in text
    with pytest.raises(UsageError):
        PeerSecrets({"b": K_AB}, shared=SECRET)
    with pytest.raises(UsageError):
        PeerSecrets({"b c": K_AB})
    with pytest.raises(UsageError):
        PeerSecrets({"b": b""})
    with pytest.raises(UsageError):
        as_peer_secrets("text")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="no peer secret configured"):
        Handshake("acceptor", PeerSecrets(), "b")


# --------------------------------------------------------------------------------------------
# The secret file: a keyring, or one bare shared secret


def test_parse_a_bare_secret_is_shared() -> None:
    assert parse_secrets(b"s3cret\n") == PeerSecrets.shared_secret(b"s3cret")
    assert parse_secrets(b"# lab secret\n\n  s3cret  \r\n\n") == PeerSecrets.shared_secret(
        b"s3cret"
    )


def test_parse_a_keyring() -> None:
    text = b"# keys of node a\nb  K1\r\n\n   # c is far away\nc\tK2\n"
    keys = parse_secrets(text)
    assert keys == PeerSecrets({"b": b"K1", "c": b"K2"})
    assert parse_secrets(b"b K1") == PeerSecrets({"b": b"K1"})  # one line with a name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "f is empty"),
        (b"\n# only a comment\n  \n", "f is empty"),
        (b"b K1\nK2\n", "f line 2: expected 'PEERNAME SECRET' (a bare secret is allowed only"),
        (b"s1\ns2\n", "f line 1: expected 'PEERNAME SECRET' (a bare secret"),
        (b"b K1 extra\n", "f line 1: expected 'PEERNAME SECRET' (too many fields)"),
        (b"b K1\n\nb K2\n", "f line 3: peer 'b' already has a key (line 1)"),
        (b"\xff K1\n", "f line 1: bad peer name: is not UTF-8"),
        (b"b\x7f K1\nc K2\n", "f line 1: bad peer name: node name"),
    ],
)
def test_parse_errors_name_the_line(text: bytes, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_secrets(text, "f")
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)
words = st.binary(min_size=1, max_size=40).filter(lambda b: b.split() == [b])


@given(st.dictionaries(names.filter(lambda n: not n.startswith("#")), words, min_size=1))
def test_a_written_keyring_parses_back(ring: dict[str, bytes]) -> None:
    text = b"".join(name.encode() + b" " + key + b"\n" for name, key in ring.items())
    assert parse_secrets(b"# header\n" + text) == PeerSecrets(ring)
