"""The agents' own link: heartbeats and notices between cluster agents, as signed datagrams.

Theory of operation
-------------------
Agents talk to each other directly (not through etcd), so that two agents that still see
each other know it when etcd is gone (issue 9: nothing fails over then), and so that the
status flags of the PVID-refresh protocol ride on every heartbeat (SPEC 3).  Every message is
one UDP datagram:

    magic "PVAG" | version u8 | MAC (16 bytes) | JSON payload

The MAC is HMAC-SHA256 over the version, the cluster name and the payload, keyed with the
cluster secret, cut to 16 bytes.  The payload says who sent it (``host``), its *boot* (a random
64-bit id chosen when the agent starts), a sequence number that grows with every datagram of
that boot, the sender's wall-clock time, the message ``kind`` (``heartbeat``, or a notice of
the refresh protocol: ``start``, ``start_ack``, ``complete``, ``reflected``) and its ``body``.

Datagrams can be lost, duplicated and reordered: the protocols on top are built for that (a
heartbeat is sent every interval; a notice is resent until its answer comes or a heartbeat
shows it arrived).  A receiver refuses, each with one specific reason (:class:`MessageRefused`):

* a wrong MAC (another cluster, another secret, a forged or damaged datagram);
* a host it does not know, or one that claims to be the receiver itself;
* a replay: a sequence number not above the highest seen from that boot; a boot whose first
  datagram is older than the newest boot's (a restart makes a new boot: it is taken when its
  time is newer);
* a time further than :data:`MAX_SKEW` from the receiver's clock (every lab namespace shares
  one clock; in production, NTP keeps hosts within far less).

The codec and the replay filter are pure (no socket, no clock: ``now`` is passed in);
:class:`Endpoint` is the thin UDP adapter.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from replicator.errors import ProtocolError, UsageError

MAGIC: Final = b"PVAG"
VERSION: Final = 1
MAC_SIZE: Final = 16
_HEAD: Final = struct.Struct(f"<4sB{MAC_SIZE}s")
#: The largest datagram: a heartbeat names every pair's flag of every resource.
MAX_DATAGRAM: Final = 8192
#: How far a sender's clock may be from ours (seconds).
MAX_SKEW: Final = 30.0
KINDS: Final = frozenset({"heartbeat", "start", "start_ack", "complete", "reflected"})


class MessageRefused(ProtocolError):
    """A datagram that is not taken (bad MAC, unknown host, replay, skew, malformed)."""


@dataclass(frozen=True, slots=True)
class Datagram:
    host: str
    boot: int
    seq: int
    sent_at: float
    kind: str
    body: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.host or len(self.host) > 64:
            raise UsageError(f"agent host name {self.host!r} is empty or too long")
        if not 0 < self.boot < 1 << 64 or not 0 < self.seq < 1 << 63:
            raise UsageError(f"boot {self.boot} / sequence {self.seq} out of range")
        if self.kind not in KINDS:
            raise UsageError(f"message kind {self.kind!r} is not one of {sorted(KINDS)}")


def _mac(secret: bytes, cluster: str, payload: bytes) -> bytes:
    msg = bytes([VERSION]) + cluster.encode() + b"\0" + payload
    return hmac.new(secret, msg, hashlib.sha256).digest()[:MAC_SIZE]


def encode(d: Datagram, cluster: str, secret: bytes) -> bytes:
    payload = json.dumps(
        {
            "host": d.host,
            "boot": d.boot,
            "seq": d.seq,
            "sent_at": d.sent_at,
            "kind": d.kind,
            "body": d.body,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    out = _HEAD.pack(MAGIC, VERSION, _mac(secret, cluster, payload)) + payload
    if len(out) > MAX_DATAGRAM:
        raise UsageError(f"a {d.kind} of {len(out)} bytes exceeds {MAX_DATAGRAM}")
    return out


def decode(data: bytes, cluster: str, secret: bytes) -> Datagram:
    """The datagram in ``data``, or :class:`MessageRefused` with the reason (nothing else)."""
    if len(data) < _HEAD.size or len(data) > MAX_DATAGRAM:
        raise MessageRefused(f"a datagram of {len(data)} bytes is not an agent message")
    magic, version, mac = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise MessageRefused("not an agent message (bad magic)")
    if version != VERSION:
        raise MessageRefused(f"agent message version {version}, this agent speaks {VERSION}")
    payload = data[_HEAD.size :]
    if not hmac.compare_digest(mac, _mac(secret, cluster, payload)):
        raise MessageRefused("bad MAC: another cluster or secret, or a forged message")
    try:
        doc = json.loads(payload)
        if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict):
            raise ValueError("not an object with a body")
        for key, kind in (("host", str), ("boot", int), ("seq", int), ("kind", str)):
            if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
                raise ValueError(f"{key} is missing or not a {kind.__name__}")
        sent = doc.get("sent_at")
        if not isinstance(sent, int | float) or isinstance(sent, bool):
            raise ValueError("sent_at is missing or not a number")
        return Datagram(doc["host"], doc["boot"], doc["seq"], float(sent), doc["kind"], doc["body"])
    except (ValueError, UsageError, UnicodeDecodeError, RecursionError) as e:
        raise MessageRefused(f"malformed agent message: {e}") from e


class ReplayFilter:
    """Which datagrams of which hosts are new (pure: ``now`` is given)."""

    def __init__(self, me: str, hosts: set[str], max_skew: float = MAX_SKEW) -> None:
        self.me = me
        self.hosts = set(hosts)
        self.max_skew = max_skew
        #: host -> (boot, its first datagram's time, the highest seq seen of it)
        self._seen: dict[str, tuple[int, float, int]] = {}

    def admit(self, d: Datagram, now: float) -> bool:
        """True if ``d`` is new; False for a duplicate or an old one; MessageRefused for what must
        never come (an unknown host, ourselves, a time too far off)."""
        if d.host == self.me:
            raise MessageRefused(f"a message claiming to come from this agent ({self.me})")
        if d.host not in self.hosts:
            raise MessageRefused(f"a message from {d.host!r}, which is not a host of this cluster")
        if abs(d.sent_at - now) > self.max_skew:
            raise MessageRefused(
                f"a message from {d.host} sent {d.sent_at - now:+.1f}s from our clock "
                f"(more than {self.max_skew:g}s)"
            )
        seen = self._seen.get(d.host)
        if seen is None or (d.boot != seen[0] and d.sent_at > seen[1]):
            self._seen[d.host] = (d.boot, d.sent_at, d.seq)  # a first message, or a restart
            return True
        boot, first, high = seen
        if d.boot != boot or d.seq <= high:
            return False
        self._seen[d.host] = (boot, first, d.seq)
        return True


class Endpoint:
    """One agent's UDP socket: ``send`` a datagram to a host, ``receive`` what is new."""

    def __init__(
        self,
        me: str,
        bind: tuple[str, int],
        peers: Mapping[str, tuple[str, int]],
        cluster: str,
        secret: bytes,
    ) -> None:
        self.me = me
        self.cluster = cluster
        self._secret = secret
        self.peers = dict(peers)
        self.boot = secrets.randbits(63) or 1
        self._seq = 0
        self.filter = ReplayFilter(me, set(self.peers))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(bind)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, host: str, kind: str, body: Mapping[str, Any], now: float) -> None:
        """Best effort: a datagram that cannot leave (no route, a cut link) is lost, as any
        datagram may be."""
        self._seq += 1
        d = Datagram(self.me, self.boot, self._seq, now, kind, body)
        with contextlib.suppress(OSError):
            self.sock.sendto(encode(d, self.cluster, self._secret), self.peers[host])

    def receive(self, now: float) -> tuple[Datagram | None, str | None]:
        """One waiting datagram: (datagram, None) if new, (None, None) for a duplicate or
        nothing waiting, (None, reason) when refused (the caller logs it, rate-limited)."""
        try:
            data, _ = self.sock.recvfrom(MAX_DATAGRAM + 1, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None, None
        try:
            d = decode(data, self.cluster, self._secret)
            return (d if self.filter.admit(d, now) else None), None
        except MessageRefused as e:
            return None, str(e)

    def close(self) -> None:
        self.sock.close()
