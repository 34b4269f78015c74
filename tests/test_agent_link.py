"""The agents' datagrams (cluster/agent_link.py): codec, MAC, replay filter, UDP endpoint."""

from __future__ import annotations

import json
import select
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster import agent_link
from cluster.agent_link import (
    Datagram,
    Endpoint,
    MessageRefused,
    ReplayFilter,
    decode,
    encode,
)

SECRET = b"s" * 32


def dg(seq: int = 1, boot: int = 7, at: float = 1000.0, host: str = "b") -> Datagram:
    return Datagram(host, boot, seq, at, "heartbeat", {"flags": {"g/p": ["A1", 3]}})


def test_round_trip() -> None:
    d = dg()
    assert decode(encode(d, "c1", SECRET), "c1", SECRET) == d


@pytest.mark.parametrize(
    ("cluster", "secret", "why"),
    [("c2", SECRET, "bad MAC"), ("c1", b"t" * 32, "bad MAC")],
)
def test_another_cluster_or_secret_is_refused(cluster: str, secret: bytes, why: str) -> None:
    with pytest.raises(MessageRefused, match=why):
        decode(encode(dg(), "c1", SECRET), cluster, secret)


def test_a_flipped_byte_is_refused() -> None:
    raw = bytearray(encode(dg(), "c1", SECRET))
    raw[-3] ^= 1
    with pytest.raises(MessageRefused, match="bad MAC"):
        decode(bytes(raw), "c1", SECRET)


@given(st.binary(max_size=400))
def test_any_bytes_decode_or_are_refused(data: bytes) -> None:
    try:
        d = decode(data, "c1", SECRET)
    except MessageRefused:
        return
    assert isinstance(d, Datagram)  # only a well-signed datagram gets here


@given(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=4))
def test_a_signed_but_odd_payload_is_refused_not_crashed(body: dict[str, object]) -> None:
    """A peer with the secret but a bug: its fields are checked, one error type."""
    payload = json.dumps(body).encode()
    raw = (
        agent_link._HEAD.pack(agent_link.MAGIC, 1, agent_link._mac(SECRET, "c1", payload)) + payload
    )
    with pytest.raises(MessageRefused):
        decode(raw, "c1", SECRET)


def test_replay_filter() -> None:
    f = ReplayFilter("a", {"b"})
    assert f.admit(dg(1), 1000.0)
    assert f.admit(dg(3), 1000.1)
    assert not f.admit(dg(3), 1000.2)  # a duplicate
    assert not f.admit(dg(2), 1000.2)  # overtaken: old
    assert f.admit(dg(1, boot=8, at=1001.0), 1001.0)  # a restart: a new boot, newer
    assert not f.admit(dg(9, boot=7, at=1000.5), 1001.0)  # the old boot is over
    with pytest.raises(MessageRefused, match="not a host of this cluster"):
        f.admit(dg(host="z"), 1000.0)
    with pytest.raises(MessageRefused, match="from this agent"):
        f.admit(dg(host="a"), 1000.0)
    with pytest.raises(MessageRefused, match="from our clock"):
        f.admit(dg(10, boot=8, at=1100.0), 1001.0)


def test_udp_endpoints_on_loopback() -> None:
    a = Endpoint("a", ("127.0.0.1", 0), {}, "c1", SECRET)
    b = Endpoint("b", ("127.0.0.1", 0), {"a": a.sock.getsockname()}, "c1", SECRET)
    a.peers["b"] = b.sock.getsockname()
    a.filter.hosts.add("b")
    evil = Endpoint("b", ("127.0.0.1", 0), {"a": a.sock.getsockname()}, "c1", b"x" * 32)
    try:
        now = time.time()
        b.send("a", "heartbeat", {"n": 1}, now)
        got = _wait(a, now)
        assert got[0] is not None and got[0].host == "b" and got[0].body == {"n": 1}
        evil.send("a", "start", {}, now)
        got = _wait(a, now)
        assert got[0] is None and got[1] is not None and "bad MAC" in got[1]
    finally:
        for e in (a, b, evil):
            e.close()


def _wait(e: Endpoint, now: float) -> tuple[Datagram | None, str | None]:
    ready, _, _ = select.select([e], [], [], 5.0)
    assert ready, "no datagram within 5 s"
    return e.receive(now)
