"""The replication wire protocol between storage nodes: messages, codec, framing; no I/O.

Theory of operation
-------------------
Two storage nodes talk over one byte stream (TCP).  The stream is a sequence of *frames*: a
28-byte header (magic, version, message type, flags, request id, payload length, payload CRC32C,
header CRC32C) and a payload.  docs/protocol.md, "Replication protocol", documents every byte.

*Messages* are frozen, slotted dataclasses that check their own fields when built; building a
bad one raises :class:`~replicator.errors.ProtocolError` with ``remote=False`` (our bug).
They know nothing about bytes: the codec table :data:`CODECS` maps each class to its type
number and its fields' wire encodings, and one generic encoder and decoder walk that table.
Every valid message has exactly one encoding, so decoding then re-encoding a frame gives back
the same bytes.

:class:`FrameDecoder` is incremental and sans-I/O: the adapter feeds it whatever the socket
returned (:meth:`~FrameDecoder.feed`, or :meth:`~FrameDecoder.get_buffer` /
:meth:`~FrameDecoder.buffer_updated` to ``recv_into`` big payloads in place, as
:class:`asyncio.BufferedProtocol` does) and pulls whole frames out.  Any input either decodes
or raises one ``ProtocolError(remote=True)``, never anything else; the header is checked (its
CRC covers the length) before the payload is allocated; and after an error the decoder stays
failed.  Frames completed before the bad bytes are still delivered first.

Compression (issue 12, item 6).  The volume data of Write and Chunk frames may cross the link
compressed (:mod:`replicator.compression`): bits 0-1 of the header's ``flags`` name the codec
of the frame's bulk field (0 none, 1 zstd, 2 lz4), whose u32 length is then the *decompressed*
size and whose bytes run to the end of the payload.  The payload CRC32C covers the bytes on the
wire.  :func:`encode_parts` compresses only when asked (``compress=``) and when it saves space;
a decoder takes only the codecs it was given (the ones both Hellos offered, feature bits
:data:`FEATURE_ZSTD` and :data:`FEATURE_LZ4`; none before the handshake), refuses any other
flag bit, and never decompresses past its payload limit.  A frame we compress decodes and
re-encodes (with :attr:`Frame.compression`) to the same bytes.

Zero copy.  Bulk fields (``Write.data``, ``Chunk.data``, ``Bitmap.bits``) accept ``bytes`` or
a ``memoryview``; :func:`encode_parts` passes them through by reference, ready for
``socket.sendmsg``.  The decoder hands them out as read-only views of the frame's payload
buffer.  The sender must not modify a buffer it passed in until the frame is sent, and a
message holding a view of a writable buffer is not hashable.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import crc32c

from replicator import compression
from replicator.errors import ProtocolError, UsageError
from replicator.header import MIN_CHUNK, NAME_MAX, bitmap_bytes, check_name

MAGIC: Final = b"PVRP"
VERSION: Final = 1
#: magic, version, type, flags, request id, payload length, payload CRC32C, header CRC32C
_HEADER: Final = struct.Struct("<4sBBHQIII")
HEADER_SIZE: Final = _HEADER.size
_HEADER_CRC_AT: Final = HEADER_SIZE - 4
assert HEADER_SIZE == 28

#: Largest bulk field (write data, one copy chunk, one slice of a bitmap): one chunk of the
#: largest chunk size, so a copy chunk always fits in one frame.
MAX_DATA: Final = 64 * 1024 * 1024
MAX_CHUNK: Final = MAX_DATA
#: Largest payload of any frame: the bulk field plus room for the other fields.
MAX_PAYLOAD: Final = MAX_DATA + 4096
#: What a decoder should accept before the peer is authenticated (every handshake message fits).
HANDSHAKE_MAX_PAYLOAD: Final = 4096

NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32
NODE_NAME_MAX: Final = 255
PAIR_ID_MAX: Final = 2 * NAME_MAX + 1
TEXT_MAX: Final = 1024
PEER_ADDRESS_MAX: Final = 300
#: Bitmap slices start and end on page boundaries of the serialized map (replicator.bitmap).
BITMAP_PAGE: Final = 4096

#: Hello.features bit: the sender has no secret configured (authentication is disabled).
FEATURE_NO_SECRET: Final = 1 << 0
#: Hello.features bits: the sender decodes Write and Chunk frames compressed with zstd, lz4.
FEATURE_ZSTD: Final = compression.FEATURE[compression.ZSTD]
FEATURE_LZ4: Final = compression.FEATURE[compression.LZ4]
#: Hello.features bit: the sender takes Entries frames (many journal entries in one request).
FEATURE_ENTRIES: Final = 1 << 3
#: The frame flags this version defines: the bulk field's codec.
FLAGS_CODEC: Final = compression.CODE_MASK

STATES: Final = ("SMPL", "COPY", "PAIR", "PSUS", "PSUE", "PFUL", "PFUS", "SSWS")
ROLES: Final = ("primary", "secondary")
MODES: Final = ("sync", "async")
FENCES: Final = ("never", "data")
#: Which bitmap of the *responder* a BitmapRequest asks for: its difference bitmap, or the
#: not-yet-copied (copy) bitmap of an interrupted copy (SPEC section 4, pull after takeover).
BITMAP_KINDS: Final = ("diff", "pending")

_U64_LIMIT: Final = 1 << 64

Blob: TypeAlias = bytes | memoryview


# --------------------------------------------------------------------------------------------
# Field checks (run in __post_init__; a failure is our own bug, so remote=False)


def _bad(msg: object, name: str, problem: str) -> ProtocolError:
    return ProtocolError(f"{type(msg).__name__}.{name}: {problem}", remote=False)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _uint(msg: object, name: str, bits: int, *, low: int = 0) -> None:
    value = getattr(msg, name)
    if type(value) is not int or not low <= value < 1 << bits:
        raise _bad(msg, name, f"{_show(value)} is not an integer from {low} to 2**{bits}-1")


def _flag(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if type(value) is not bool:
        raise _bad(msg, name, f"{_show(value)} is not a bool")


def _utf8(msg: object, name: str, limit: int) -> str:
    value = getattr(msg, name)
    if type(value) is not str:
        raise _bad(msg, name, f"{_show(value)} is not a str")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(msg, name, f"{_show(value)} is not valid Unicode ({e.reason})") from None
    if len(raw) > limit:
        raise _bad(msg, name, f"{_show(value)} is longer than {limit} bytes of UTF-8")
    return value


def _text(msg: object, name: str) -> None:
    _utf8(msg, name, TEXT_MAX)


def check_node_name(name: str) -> str:
    """A node name: 1 to 255 bytes of UTF-8, printable, no whitespace (UsageError if not)."""
    if type(name) is not str or not name:
        raise UsageError(f"node name {_show(name)} is empty or not a string")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"node name {_show(name)} is not valid Unicode") from None
    if len(raw) > NODE_NAME_MAX:
        raise UsageError(f"node name {_show(name)} is longer than {NODE_NAME_MAX} bytes")
    if any(c.isspace() or not c.isprintable() for c in name):
        raise UsageError(f"node name {_show(name)} contains whitespace or unprintable characters")
    return name


def check_pair_id(pair_id: str) -> str:
    """``GROUP/PAIR``, both parts volume-style names (UsageError if not); at most 127 bytes."""
    if type(pair_id) is not str or pair_id.count("/") != 1:
        raise UsageError(f"pair id {_show(pair_id)} is not GROUP/PAIR")
    group, pair = pair_id.split("/")
    check_name(group, what="group name")
    check_name(pair, what="pair name")
    return pair_id


def _named(msg: object, name: str, check: Callable[[str], str], limit: int) -> None:
    value = _utf8(msg, name, limit)
    try:
        check(value)
    except UsageError as e:
        raise _bad(msg, name, str(e)) from None


def _node(msg: object, name: str) -> None:
    _named(msg, name, check_node_name, NODE_NAME_MAX)


def _pair(msg: object, name: str) -> None:
    _named(msg, name, check_pair_id, PAIR_ID_MAX)


def _volume(msg: object, name: str) -> None:
    _named(msg, name, check_name, NAME_MAX)


def _one_of(msg: object, name: str, values: tuple[str, ...]) -> None:
    value = getattr(msg, name)
    if not isinstance(value, str) or value not in values:
        raise _bad(msg, name, f"{_show(value)} is not one of {', '.join(values)}")


def _fixed(msg: object, name: str, size: int) -> None:
    value = getattr(msg, name)
    if type(value) is not bytes or len(value) != size:
        raise _bad(msg, name, f"{_show(value)} is not exactly {size} bytes")


def _blob(msg: object, name: str, *, low: int = 1, high: int = MAX_DATA) -> int:
    """Bulk bytes: ``bytes`` or a C-contiguous memoryview (normalized to 1-D unsigned bytes)."""
    value = getattr(msg, name)
    if isinstance(value, memoryview):
        if not value.c_contiguous:
            raise _bad(msg, name, "memoryview is not C-contiguous")
        if value.ndim != 1 or value.format != "B":
            value = value.cast("B")
            object.__setattr__(msg, name, value)
    elif type(value) is not bytes:
        raise _bad(msg, name, f"{type(value).__name__} is not bytes or a memoryview")
    if not low <= len(value) <= high:
        raise _bad(msg, name, f"{len(value)} bytes is not from {low} to {high}")
    return len(value)


def _chunk_size(msg: object, name: str) -> None:
    value = getattr(msg, name)
    _uint(msg, name, 32)
    if not MIN_CHUNK <= value <= MAX_CHUNK or value & (value - 1):
        raise _bad(msg, name, f"{value} is not a power of two from {MIN_CHUNK} to {MAX_CHUNK}")


def _range(msg: object, offset: int, length: int) -> None:
    if offset + length > _U64_LIMIT:
        raise _bad(msg, "offset", f"range {offset}+{length} runs past 2**64")


def clip_text(text: str, limit: int = TEXT_MAX) -> str:
    """Make any string fit a text field: bad surrogates replaced, cut at ``limit`` bytes."""
    raw = text.encode("utf-8", "replace")
    if len(raw) > limit:
        raw = raw[: limit - 3].decode("utf-8", "ignore").encode() + b"..."
    return raw.decode("utf-8")


# --------------------------------------------------------------------------------------------
# Messages.  Session: 0x01-0x0f; pair control: 0x10-0x1f; data: 0x20-0x2f.


@dataclass(frozen=True, slots=True)
class Hello:
    """First message from both sides.  ``proto_version``: the highest version the sender
    speaks; ``features``: capability bits (unknown bits are ignored)."""

    proto_version: int
    node_name: str
    nonce: bytes
    features: int = 0

    def __post_init__(self) -> None:
        _uint(self, "proto_version", 16, low=1)
        _node(self, "node_name")
        _fixed(self, "nonce", NONCE_SIZE)
        _uint(self, "features", 64)


@dataclass(frozen=True, slots=True)
class Auth:
    """Proof of the shared secret: an HMAC-SHA256 over both hellos (replicator.peer_auth)."""

    mac: bytes

    def __post_init__(self) -> None:
        _fixed(self, "mac", MAC_SIZE)


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The acceptor's verdict on the initiator's Auth.  After ``ok=False`` both sides close."""

    ok: bool
    reason: str = ""

    def __post_init__(self) -> None:
        _flag(self, "ok")
        _text(self, "reason")


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Orderly close: the sender closes after this; the receiver closes too."""

    reason: str = ""

    def __post_init__(self) -> None:
        _text(self, "reason")


@dataclass(frozen=True, slots=True)
class Ping:
    """Heartbeat; answered by a Pong with the same request id and ``now_ns``."""

    now_ns: int

    def __post_init__(self) -> None:
        _uint(self, "now_ns", 64)


@dataclass(frozen=True, slots=True)
class Pong:
    """Echoes the Ping's ``now_ns`` (a monotonic clock means nothing on the other node)."""

    now_ns: int

    def __post_init__(self) -> None:
        _uint(self, "now_ns", 64)


@dataclass(frozen=True, slots=True)
class Ack:
    """The answer to a request: ``status`` 0 for success, else an errno; ``message`` says why."""

    status: int = 0
    message: str = ""

    def __post_init__(self) -> None:
        _uint(self, "status", 32)
        _text(self, "message")


@dataclass(frozen=True, slots=True)
class Error:
    """A protocol-level failure (``code`` is an errno, never 0), as an answer or unsolicited."""

    code: int
    message: str = ""

    def __post_init__(self) -> None:
        _uint(self, "code", 32, low=1)
        _text(self, "message")


@dataclass(frozen=True, slots=True)
class PairCreate:
    """Make the receiver the secondary of a new pair (its S-VOL takes the P-VOL's ``pvid``)."""

    pair_id: str
    volume: str
    data_size: int
    chunk_size: int
    mode: str
    fence: str
    pvid: int
    epoch: int
    #: ``ADDR:PORT`` where the primary takes replication connections, for the secondary's own
    #: requests (heartbeats, state changes it starts); empty: the connection's source address.
    primary_peer: str = ""
    #: The P-VOL's logical block size: both volumes of a pair must have the same.
    block_size: int = 512
    #: The pair's ``--max-rate`` (bytes/s, 0: none): the secondary keeps it, for the pull
    #: after a takeover and for the copies and shipping once a swap makes it the primary.
    max_rate: int = 0
    #: The pair's ``--compress`` (none, zstd, lz4): the codec of its volume data on the link,
    #: both ways (the secondary's pull answers, and everything once a swap reverses it).
    compress: str = compression.NONE

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        _volume(self, "volume")
        _utf8(self, "primary_peer", PEER_ADDRESS_MAX)
        _uint(self, "block_size", 32, low=1)
        _uint(self, "max_rate", 63)
        _one_of(self, "compress", compression.CODECS)
        _uint(self, "data_size", 63, low=1)
        _chunk_size(self, "chunk_size")
        _one_of(self, "mode", MODES)
        _one_of(self, "fence", FENCES)
        _uint(self, "pvid", 64, low=1)
        _uint(self, "epoch", 64)
        if self.mode == "async" and self.fence == "data":
            raise _bad(self, "fence", "fence=data needs mode sync (an async secondary lags)")


@dataclass(frozen=True, slots=True)
class PairState:
    """The sender's view of a pair: state, its own role, its volume's PVID, the epoch."""

    pair_id: str
    state: str
    role: str
    pvid: int
    epoch: int

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        _one_of(self, "state", STATES)
        _one_of(self, "role", ROLES)
        _uint(self, "pvid", 64)
        _uint(self, "epoch", 64)
        if self.state == "SSWS" and self.role != "secondary":
            raise _bad(self, "state", "only a secondary can be in SSWS")


@dataclass(frozen=True, slots=True)
class BitmapRequest:
    """Ask for one of the responder's bitmaps of a pair; answered by Bitmap frames."""

    pair_id: str
    which: str = "diff"

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        _one_of(self, "which", BITMAP_KINDS)


@dataclass(frozen=True, slots=True)
class Bitmap:
    """A page-aligned slice of a serialized bitmap (replicator.bitmap: chunk ``i`` is bit
    ``i % 8`` of byte ``i // 8``, whole 4 KiB pages, zero past the last chunk) starting at
    byte ``offset``.  A big map comes as several frames; the one that ends at the map's full
    length is the last."""

    pair_id: str
    which: str
    chunk_size: int
    data_size: int
    offset: int
    bits: Blob = field(repr=False)

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        _one_of(self, "which", BITMAP_KINDS)
        _chunk_size(self, "chunk_size")
        _uint(self, "data_size", 63, low=1)
        _uint(self, "offset", 64)
        n = _blob(self, "bits")
        if self.offset % BITMAP_PAGE or n % BITMAP_PAGE:
            raise _bad(self, "bits", f"slice {self.offset}+{n} is not whole {BITMAP_PAGE}B pages")
        if self.offset + n > self.total_bytes:
            raise _bad(self, "bits", f"slice {self.offset}+{n} runs past {self.total_bytes}")
        # Bits past the last chunk are zero; they all sit in the map's last page.
        used, spare = divmod(-(-self.data_size // self.chunk_size), 8)
        view = memoryview(self.bits)
        if spare and self.offset <= used < self.offset + n and view[used - self.offset] >> spare:
            raise _bad(self, "bits", "bits are set past the last chunk")
        zeros = max(used + (spare > 0) - self.offset, 0)
        if zeros < n and bytes(view[zeros:]).count(0) != n - zeros:
            raise _bad(self, "bits", "bits are set past the last chunk")

    @property
    def total_bytes(self) -> int:
        """Length of the whole serialized map."""
        return bitmap_bytes(self.data_size, self.chunk_size)

    @property
    def last(self) -> bool:
        return self.offset + len(self.bits) == self.total_bytes


@dataclass(frozen=True, slots=True)
class Write:
    """Host data for the secondary.  ``seq``: 0 in sync mode; the group's sequence number in
    async mode.  ``fua``: durable on the secondary before the Ack."""

    pair_id: str
    offset: int
    data: Blob = field(repr=False)
    fua: bool = False
    seq: int = 0

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        _uint(self, "offset", 64)
        _range(self, self.offset, _blob(self, "data"))
        _flag(self, "fua")
        _uint(self, "seq", 64)


#: One entry of an Entries frame: seq u64, offset u64, length u64, kind u8, fua u8.
ENTRY_HEAD: Final = struct.Struct("<QQQBB")
#: Entries.index kind codes (the wire's own, not the journal's).
ENTRY_WRITE: Final = 0
ENTRY_ZERO: Final = 1
ENTRY_TRIM: Final = 2
#: Most entries one Entries frame carries (its index fits the payload's room beside the data).
MAX_ENTRIES: Final = 128


@dataclass(frozen=True, slots=True)
class Entries:
    """Async primary → secondary: consecutive journal entries of one pair, in one request
    answered by one JournalAck.  ``index``: one :data:`ENTRY_HEAD` per entry, their seqs
    consecutive from ``first``; ``data``: the data of the WRITE entries, in order.  Only sent to
    a peer whose Hello offered :data:`FEATURE_ENTRIES`."""

    pair_id: str
    index: Blob = field(repr=False)
    data: Blob = field(repr=False)
    #: The seq of the first entry and of the last (from the index, for the receiver's order).
    first: int = field(init=False)
    last: int = field(init=False)

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        n = _blob(self, "index", low=ENTRY_HEAD.size, high=MAX_ENTRIES * ENTRY_HEAD.size)
        if n % ENTRY_HEAD.size:
            raise _bad(self, "index", f"{n} bytes is not a whole number of entries")
        total = _blob(self, "data", low=0)
        expect = 0
        written = 0
        for seq, offset, length, kind, fua in ENTRY_HEAD.iter_unpack(self.index):
            if not expect:
                if seq < 1:
                    raise _bad(self, "index", "the first entry's seq is 0")
                object.__setattr__(self, "first", seq)
            elif seq != expect:
                raise _bad(self, "index", f"seq {seq} follows {expect - 1}, not consecutive")
            expect = seq + 1
            if kind > ENTRY_TRIM:
                raise _bad(self, "index", f"entry {seq} has kind {kind}, not 0, 1 or 2")
            if fua > 1:
                raise _bad(self, "index", f"entry {seq} has fua byte {fua}, not 0 or 1")
            if length < 1:
                raise _bad(self, "index", f"entry {seq} has length 0")
            _range(self, offset, length)
            if kind == ENTRY_WRITE:
                written += length
        if written != total:
            raise _bad(self, "data", f"{total} bytes, but the index's writes hold {written}")
        object.__setattr__(self, "last", expect - 1)

    def items(self) -> Iterator[tuple[int, int, int, int, bool, Blob]]:
        """Each entry as (seq, kind code, offset, length, fua, data: a view, empty unless a
        WRITE)."""
        data = memoryview(self.data)
        pos = 0
        for seq, offset, length, kind, fua in ENTRY_HEAD.iter_unpack(self.index):
            if kind == ENTRY_WRITE:
                yield seq, kind, offset, length, fua == 1, data[pos : pos + length]
                pos += length
            else:
                yield seq, kind, offset, length, fua == 1, b""


def pack_entries(
    pair_id: str, heads: list[tuple[int, int, int, int, bool]], data: list[Blob]
) -> Entries:
    """An Entries message from (seq, offset, length, kind code, fua) tuples and the WRITE
    entries' data buffers (joined into one: the frame's bulk field)."""
    index = b"".join(ENTRY_HEAD.pack(s, o, n, k, 1 if f else 0) for s, o, n, k, f in heads)
    return Entries(pair_id, index, data[0] if len(data) == 1 else b"".join(data))


@dataclass(frozen=True, slots=True)
class Zero:
    """Write zeros (``may_trim``: holes allowed); ``seq`` and ``fua`` as for Write."""

    pair_id: str
    offset: int
    length: int
    fua: bool = False
    may_trim: bool = False
    seq: int = 0

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        _uint(self, "offset", 64)
        _uint(self, "length", 64, low=1)
        _range(self, self.offset, self.length)
        _flag(self, "fua")
        _flag(self, "may_trim")
        _uint(self, "seq", 64)


@dataclass(frozen=True, slots=True)
class Flush:
    """Make every acknowledged Write and Zero of the pair durable on the secondary."""

    pair_id: str

    def __post_init__(self) -> None:
        _pair(self, "pair_id")


@dataclass(frozen=True, slots=True)
class Chunk:
    """Copy traffic: chunk ``index`` of the pair (bytes from ``index * chunk_size``; only the
    volume's last chunk may be short)."""

    pair_id: str
    index: int
    data: Blob = field(repr=False)

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        _uint(self, "index", 64)
        _blob(self, "data")


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    """Pull copy (SPEC section 4): ask the peer for ``count`` chunks from chunk ``index``;
    answered by one Chunk holding them all (at most :data:`MAX_DATA` bytes)."""

    pair_id: str
    index: int
    count: int = 1

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        _uint(self, "index", 64)
        _uint(self, "count", 32, low=1)


#: Most chunk digests one DigestRequest may ask for.
MAX_DIGESTS: Final = 65536
DIGEST_SIZE: Final = 8


@dataclass(frozen=True, slots=True)
class DigestRequest:
    """Online verify: ask for the digests of ``count`` chunks from chunk ``first``;
    answered by a Digests."""

    pair_id: str
    first: int
    count: int

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        _uint(self, "first", 64)
        _uint(self, "count", 32, low=1)
        if self.count > MAX_DIGESTS:
            raise _bad(self, "count", f"{self.count} is more than {MAX_DIGESTS} chunks")


@dataclass(frozen=True, slots=True)
class Digests:
    """XXH3-64 digests (8 bytes, little-endian, each) of consecutive chunks from ``first``."""

    pair_id: str
    first: int
    digests: Blob = field(repr=False)

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        _uint(self, "first", 64)
        n = _blob(self, "digests", low=DIGEST_SIZE, high=MAX_DIGESTS * DIGEST_SIZE)
        if n % DIGEST_SIZE:
            raise _bad(self, "digests", f"{n} bytes is not a whole number of digests")


@dataclass(frozen=True, slots=True)
class JournalStatus:
    """Async primary → secondary, with each heartbeat: the newest sequence number of the
    group's journal and when it was written (for the secondary's RPO report after a takeover).
    Answered by a JournalAck."""

    pair_id: str
    newest: int
    newest_ns: int
    #: The oldest sequence number the primary still holds or will ship.  Entries below it
    #: were folded into bitmaps (overflow, suspension): the secondary's receive journal
    #: continues from here.
    base: int = 0
    #: The group's incarnation: the id of the primary's group journal, new whenever the
    #: sequence space starts over (a group created again, a journal reset after corruption).
    incarnation: int = 0

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        _uint(self, "newest", 64)
        _uint(self, "newest_ns", 64)
        _uint(self, "base", 64)
        _uint(self, "incarnation", 64)


@dataclass(frozen=True, slots=True)
class JournalAck:
    """The answer to an async Write or Zero (``seq`` ≠ 0) and to a JournalStatus: the newest
    sequence number the secondary holds durably (``received``) and the newest it has applied
    to its volumes (``applied``), for the whole consistency group of ``pair_id``."""

    pair_id: str
    received: int
    applied: int
    #: The incarnation these marks belong to (0: the secondary has not learnt one yet).
    incarnation: int = 0

    def __post_init__(self) -> None:
        _pair(self, "pair_id")
        _uint(self, "received", 64)
        _uint(self, "applied", 64)
        _uint(self, "incarnation", 64)
        if self.applied > self.received:
            raise _bad(self, "applied", f"{self.applied} is past received {self.received}")


Message: TypeAlias = (
    Hello
    | Auth
    | AuthResult
    | Goodbye
    | Ping
    | Pong
    | Ack
    | Error
    | PairCreate
    | PairState
    | BitmapRequest
    | Bitmap
    | Write
    | Entries
    | Zero
    | Flush
    | Chunk
    | ChunkRequest
    | DigestRequest
    | Digests
    | JournalStatus
    | JournalAck
)


# --------------------------------------------------------------------------------------------
# Field encodings


class _Reader:
    """A cursor over one payload; running off its end is a ProtocolError naming the field."""

    __slots__ = ("pos", "view", "what")

    def __init__(self, view: memoryview, what: str) -> None:
        self.view = view
        self.pos = 0
        self.what = what

    def take(self, n: int, name: str) -> memoryview:
        end = self.pos + n
        if end > len(self.view):
            raise ProtocolError(f"{self.what} payload ends inside {name}")
        out = self.view[self.pos : end]
        self.pos = end
        return out


class _Field:
    """One field's wire encoding; ``min_size``/``max_size`` bound its bytes on the wire."""

    __slots__ = ("max_size", "min_size", "name")

    def __init__(self, name: str, min_size: int, max_size: int) -> None:
        self.name = name
        self.min_size = min_size
        self.max_size = max_size

    def put(self, value: object, out: bytearray) -> Blob | None:
        raise NotImplementedError

    def get(self, r: _Reader) -> object:
        raise NotImplementedError


class _UInt(_Field):
    __slots__ = ("_fmt",)

    def __init__(self, name: str, fmt: str) -> None:
        self._fmt = struct.Struct("<" + fmt)
        super().__init__(name, self._fmt.size, self._fmt.size)

    def put(self, value: object, out: bytearray) -> None:
        out += self._fmt.pack(value)

    def get(self, r: _Reader) -> object:
        value: int = self._fmt.unpack(r.take(self._fmt.size, self.name))[0]
        return value


class _Bool(_Field):
    def __init__(self, name: str) -> None:
        super().__init__(name, 1, 1)

    def put(self, value: object, out: bytearray) -> None:
        out.append(1 if value else 0)

    def get(self, r: _Reader) -> object:
        b = r.take(1, self.name)[0]
        if b > 1:
            raise ProtocolError(f"{r.what}.{self.name}: boolean byte is {b}, not 0 or 1")
        return b == 1


class _Choice(_Field):
    """A string from a fixed set, sent as one byte: its code."""

    __slots__ = ("_codes", "_values")

    def __init__(self, name: str, values: Mapping[int, str]) -> None:
        super().__init__(name, 1, 1)
        self._values = dict(values)
        self._codes = {v: k for k, v in values.items()}

    def put(self, value: object, out: bytearray) -> None:
        out.append(self._codes[str(value)])

    def get(self, r: _Reader) -> object:
        b = r.take(1, self.name)[0]
        if b not in self._values:
            raise ProtocolError(f"{r.what}.{self.name}: unknown code {b}")
        return self._values[b]


class _Fixed(_Field):
    def __init__(self, name: str, size: int) -> None:
        super().__init__(name, size, size)

    def put(self, value: object, out: bytearray) -> None:
        assert isinstance(value, bytes)
        out += value

    def get(self, r: _Reader) -> object:
        return bytes(r.take(self.max_size, self.name))


class _Str(_Field):
    """u16 byte length, then that many bytes of UTF-8."""

    __slots__ = ("_limit",)

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(name, 2, 2 + limit)
        self._limit = limit

    def put(self, value: object, out: bytearray) -> None:
        assert isinstance(value, str)
        raw = value.encode("utf-8")
        out += _U16.pack(len(raw))
        out += raw

    def get(self, r: _Reader) -> object:
        (n,) = _U16.unpack(r.take(2, self.name))
        if n > self._limit:
            raise ProtocolError(f"{r.what}.{self.name}: {n} bytes is over the {self._limit} limit")
        try:
            return str(r.take(n, self.name), "utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"{r.what}.{self.name}: not UTF-8 ({e.reason})") from None


class _Bulk(_Field):
    """u32 byte length, then the bytes (passed by reference both ways)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, 4, 4 + MAX_DATA)

    def put(self, value: object, out: bytearray) -> Blob:
        assert isinstance(value, bytes | memoryview)
        out += _U32.pack(len(value))
        return value

    def get(self, r: _Reader) -> object:
        (n,) = _U32.unpack(r.take(4, self.name))
        if n > MAX_DATA:
            raise ProtocolError(f"{r.what}.{self.name}: {n} bytes is over the {MAX_DATA} limit")
        return r.take(n, self.name).toreadonly()

    def get_packed(self, r: _Reader, codec: str, limit: int) -> bytes:
        """A compressed field: u32 decompressed length, then ``codec``'s bytes to the end of
        the payload, decompressed to at most ``limit`` bytes (and at most MAX_DATA)."""
        (n,) = _U32.unpack(r.take(4, self.name))
        packed = r.take(len(r.view) - r.pos, self.name)
        what = f"{r.what}.{self.name}"
        return compression.unpack(codec, packed, n, limit=min(limit, MAX_DATA), what=what)


class _Bytes(_Field):
    """u32 byte length, then at most ``limit`` bytes, copied into the payload (a bulk field
    that is not the last)."""

    __slots__ = ("_limit",)

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(name, 4, 4 + limit)
        self._limit = limit

    def put(self, value: object, out: bytearray) -> None:
        assert isinstance(value, bytes | memoryview)
        out += _U32.pack(len(value))
        out += value

    def get(self, r: _Reader) -> object:
        (n,) = _U32.unpack(r.take(4, self.name))
        if n > self._limit:
            raise ProtocolError(f"{r.what}.{self.name}: {n} bytes is over the {self._limit} limit")
        return r.take(n, self.name).toreadonly()


_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Codec:
    """One row of the codec table: a message class, its type number and its fields in wire
    order (a bulk field is always last)."""

    number: int
    cls: type
    fields: tuple[_Field, ...]
    #: The bulk field (the last) may be compressed: it is volume data (Write, Chunk).
    packable: bool = False
    min_size: int = field(init=False)
    max_size: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_size", sum(f.min_size for f in self.fields))
        object.__setattr__(self, "max_size", sum(f.max_size for f in self.fields))


def _u8(name: str) -> _UInt:
    return _UInt(name, "B")


def _u16(name: str) -> _UInt:
    return _UInt(name, "H")


def _u32(name: str) -> _UInt:
    return _UInt(name, "I")


def _u64(name: str) -> _UInt:
    return _UInt(name, "Q")


def _pair_id() -> _Str:
    return _Str("pair_id", PAIR_ID_MAX)


def _text_field(name: str) -> _Str:
    return _Str(name, TEXT_MAX)


def _choice(name: str, values: tuple[str, ...], first: int = 0) -> _Choice:
    return _Choice(name, {first + i: v for i, v in enumerate(values)})


#: The codec table: class -> (type number, fields in wire order).  docs/protocol.md mirrors it.
# fmt: off
CODECS: Final[dict[type, Codec]] = {
    c.cls: c
    for c in (
        Codec(0x01, Hello, (
            _u16("proto_version"), _u64("features"), _Fixed("nonce", NONCE_SIZE),
            _Str("node_name", NODE_NAME_MAX),
        )),
        Codec(0x02, Auth, (_Fixed("mac", MAC_SIZE),)),
        Codec(0x03, AuthResult, (_Bool("ok"), _text_field("reason"))),
        Codec(0x04, Goodbye, (_text_field("reason"),)),
        Codec(0x05, Ping, (_u64("now_ns"),)),
        Codec(0x06, Pong, (_u64("now_ns"),)),
        Codec(0x07, Ack, (_u32("status"), _text_field("message"))),
        Codec(0x08, Error, (_u32("code"), _text_field("message"))),
        Codec(0x10, PairCreate, (
            _pair_id(), _Str("volume", NAME_MAX), _u64("data_size"), _u32("chunk_size"),
            _choice("mode", MODES), _choice("fence", FENCES), _u64("pvid"), _u64("epoch"),
            _Str("primary_peer", PEER_ADDRESS_MAX), _u32("block_size"), _u64("max_rate"),
            _choice("compress", compression.CODECS),
        )),
        Codec(0x11, PairState, (
            _pair_id(), _choice("state", STATES), _choice("role", ROLES, first=1),
            _u64("pvid"), _u64("epoch"),
        )),
        Codec(0x12, BitmapRequest, (_pair_id(), _choice("which", BITMAP_KINDS))),
        Codec(0x13, Bitmap, (
            _pair_id(), _choice("which", BITMAP_KINDS), _u32("chunk_size"), _u64("data_size"),
            _u64("offset"), _Bulk("bits"),
        )),
        Codec(0x14, DigestRequest, (_pair_id(), _u64("first"), _u32("count"))),
        Codec(0x15, Digests, (_pair_id(), _u64("first"), _Bulk("digests"))),
        Codec(0x16, JournalStatus, (
            _pair_id(), _u64("newest"), _u64("newest_ns"), _u64("base"), _u64("incarnation"),
        )),
        Codec(0x17, JournalAck, (
            _pair_id(), _u64("received"), _u64("applied"), _u64("incarnation"),
        )),
        Codec(0x20, Write, (
            _pair_id(), _u64("offset"), _u64("seq"), _Bool("fua"), _Bulk("data"),
        ), packable=True),
        Codec(0x21, Zero, (
            _pair_id(), _u64("offset"), _u64("length"), _u64("seq"), _Bool("fua"),
            _Bool("may_trim"),
        )),
        Codec(0x22, Flush, (_pair_id(),)),
        Codec(0x23, Chunk, (_pair_id(), _u64("index"), _Bulk("data")), packable=True),
        Codec(0x24, ChunkRequest, (_pair_id(), _u64("index"), _u32("count"))),
        Codec(0x25, Entries, (
            _pair_id(), _Bytes("index", MAX_ENTRIES * ENTRY_HEAD.size), _Bulk("data"),
        ), packable=True),
    )
}
# fmt: on
_BY_TYPE: Final[dict[int, Codec]] = {c.number: c for c in CODECS.values()}
assert len(_BY_TYPE) == len(CODECS)
assert all(c.max_size <= MAX_PAYLOAD for c in CODECS.values())
assert all(isinstance(c.fields[-1], _Bulk) for c in CODECS.values() if c.packable)
assert all(
    c.max_size <= HANDSHAKE_MAX_PAYLOAD
    for c in CODECS.values()
    if c.cls in (Hello, Auth, AuthResult, Goodbye, Error)
)


def type_number(msg_type: type) -> int:
    """The wire type number of a message class."""
    return CODECS[msg_type].number


# --------------------------------------------------------------------------------------------
# Encoding


def encode_parts(
    msg: Message, request_id: int = 0, *, compress: str = compression.NONE
) -> list[Blob]:
    """The frame for ``msg`` as buffers to send in order (bulk data by reference, for
    ``socket.sendmsg``).  ``request_id``: a request's id, or the id a response echoes.
    ``compress``: the codec for a Write's or Chunk's data (the peer must have offered it);
    the data goes raw if it does not shrink, and for every other message."""
    codec = CODECS.get(type(msg))
    if codec is None:
        raise ProtocolError(f"{type(msg).__name__} is not a wire message", remote=False)
    if type(request_id) is not int or not 0 <= request_id < _U64_LIMIT:
        raise ProtocolError(f"request id {_show(request_id)} is not a u64", remote=False)
    body = bytearray()
    bulk: Blob | None = None
    for f in codec.fields:
        out = f.put(getattr(msg, f.name), body)
        if out is not None:
            bulk = out
    flags = 0
    if compress != compression.NONE and codec.packable and bulk is not None:
        if compress not in compression.CODECS:
            raise ProtocolError(f"codec {_show(compress)} is not one of {compression.CODECS}")
        packed = compression.pack(compress, bulk)
        if packed is not None:
            bulk, flags = packed, compression.CODE[compress]
    crc = crc32c.crc32c(body)
    length = len(body)
    if bulk is not None:
        crc = crc32c.crc32c(bulk, crc)
        length += len(bulk)
    header = bytearray(
        _HEADER.pack(MAGIC, VERSION, codec.number, flags, request_id, length, crc, 0)
    )
    _U32.pack_into(header, _HEADER_CRC_AT, crc32c.crc32c(header[:_HEADER_CRC_AT]))
    parts: list[Blob] = [bytes(header) + body]
    if bulk is not None and len(bulk):
        parts.append(bulk)
    return parts


def encode(msg: Message, request_id: int = 0, *, compress: str = compression.NONE) -> bytes:
    """The frame for ``msg`` as one bytes object."""
    return b"".join(encode_parts(msg, request_id, compress=compress))


# --------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame: the message, the request id it carried, and the codec its bulk
    data crossed the link with (``none``: raw)."""

    message: Message
    request_id: int
    compression: str = compression.NONE


@dataclass(frozen=True, slots=True)
class _Head:
    codec: Codec
    request_id: int
    length: int
    crc: int
    packing: str  # the bulk field's codec
    limit: int  # the payload limit (a compressed field decompresses to no more)


def _parse_header(
    raw: bytes | bytearray, max_payload: int, codecs: frozenset[str] = frozenset()
) -> _Head:
    magic, version, mtype, flags, request_id, length, crc, hcrc = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r} (not a pairvol replication stream)")
    actual = crc32c.crc32c(memoryview(raw)[:_HEADER_CRC_AT])
    if hcrc != actual:
        raise ProtocolError(f"frame header CRC32C mismatch ({hcrc:#010x} != {actual:#010x})")
    if version != VERSION:
        raise ProtocolError(f"frame version {version} is not supported (this node: {VERSION})")
    if flags & ~FLAGS_CODEC:
        raise ProtocolError(f"frame flags {flags:#06x} are not defined in version {VERSION}")
    codec = _BY_TYPE.get(mtype)
    if codec is None:
        raise ProtocolError(f"unknown message type {mtype:#04x}")
    name = codec.cls.__name__
    packing = compression.BY_CODE.get(flags & FLAGS_CODEC)
    if packing is None:
        raise ProtocolError(f"{name} frame flags {flags:#06x} name an unknown codec")
    if packing != compression.NONE and not codec.packable:
        raise ProtocolError(
            f"{name} frame flags {flags:#06x} say {packing}: only Write and Chunk data is"
            " compressed"
        )
    if packing != compression.NONE and packing not in codecs:
        raise ProtocolError(
            f"{name} frame flags {flags:#06x} say {packing}, which this link did not agree on"
        )
    limit = min(codec.max_size, max_payload)
    if length > limit:
        raise ProtocolError(f"{name} payload of {length} bytes is over the {limit}-byte limit")
    if length < codec.min_size:
        raise ProtocolError(f"{name} payload of {length} bytes is under {codec.min_size}")
    return _Head(codec, request_id, length, crc, packing, limit)


def _decode(head: _Head, payload: bytearray) -> Frame:
    codec = head.codec
    name = codec.cls.__name__
    actual = crc32c.crc32c(payload)
    if actual != head.crc:
        raise ProtocolError(f"{name} payload CRC32C mismatch ({head.crc:#010x} != {actual:#010x})")
    r = _Reader(memoryview(payload), name)
    if head.packing == compression.NONE:
        values = {f.name: f.get(r) for f in codec.fields}
    else:
        *plain, bulk = codec.fields
        values = {f.name: f.get(r) for f in plain}
        assert isinstance(bulk, _Bulk)
        values[bulk.name] = bulk.get_packed(r, head.packing, head.limit)
    if r.pos != len(payload):
        raise ProtocolError(f"{name} payload has {len(payload) - r.pos} bytes of trailing garbage")
    try:
        msg: Message = codec.cls(**values)
    except ProtocolError as e:
        raise ProtocolError(f"peer sent an invalid {e}") from None
    return Frame(msg, head.request_id, head.packing)


_SCRATCH: Final = 64 * 1024


class FrameDecoder:
    """Incremental frame decoder: bytes in, :class:`Frame` objects out, no I/O.

    ``max_payload`` bounds what the decoder will allocate for one frame; keep it at
    :data:`HANDSHAKE_MAX_PAYLOAD` until the peer is authenticated, then raise it to
    :data:`MAX_PAYLOAD`.  The decoder looks at most one frame ahead: the header of the next
    frame is read only when :meth:`next_frame` is called again, so a new limit applies to
    every frame after the one just returned, even if its bytes arrived in the same read.

    Errors surface from :meth:`next_frame` (after the frames that were complete before the bad
    bytes); from then on every call raises.  Call :meth:`next_frame` until it returns None after
    each :meth:`feed`: bytes fed past a complete frame wait, copied, in a backlog.
    """

    def __init__(
        self, *, max_payload: int = MAX_PAYLOAD, codecs: frozenset[str] | None = None
    ) -> None:
        self.max_payload = max_payload
        #: The codecs of compressed frames it takes (default: every one this node has); like
        #: ``max_payload``, a change applies from the frame after the one just returned.
        self.codecs: frozenset[str] = compression.available() if codecs is None else codecs
        self._header = bytearray(HEADER_SIZE)
        self._hfill = 0
        self._head: _Head | None = None  # parsed header of the frame being received
        self._payload = bytearray()
        self._pfill = 0
        self._ready: tuple[_Head, bytearray] | None = None  # complete, not yet decoded
        self._backlog: deque[bytes] = deque()  # input after the ready frame
        self._backlog_pos = 0  # consumed bytes of _backlog[0]
        self._pending: ProtocolError | None = None  # found, not yet raised
        self._failed: ProtocolError | None = None  # raised: the stream is dead
        self._scratch: bytearray | None = None
        self._lent_direct = False
        self._lent = 0

    # -- input ------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes from the stream (copied; the caller may reuse its buffer)."""
        self._check_alive()
        if self._pending is not None:
            return  # the stream is already broken; the error comes from next_frame
        view = memoryview(data).cast("B")
        used = 0 if self._ready is not None else self._consume(view)
        if used < len(view) and self._pending is None:
            self._backlog.append(bytes(view[used:]))

    def _consume(self, view: memoryview) -> int:
        """Take bytes from ``view`` until it ends, a frame completes or an error shows."""
        pos, end = 0, len(view)
        while pos < end and self._ready is None and self._pending is None:
            if self._head is None:
                n = min(HEADER_SIZE - self._hfill, end - pos)
                self._header[self._hfill : self._hfill + n] = view[pos : pos + n]
                self._hfill += n
                pos += n
                if self._hfill == HEADER_SIZE:
                    self._start_payload()
            else:
                n = min(self._head.length - self._pfill, end - pos)
                self._payload[self._pfill : self._pfill + n] = view[pos : pos + n]
                self._pfill += n
                pos += n
                self._maybe_complete()
        return pos

    def _pump(self) -> None:
        """Work through the backlog until a frame completes or it runs out."""
        while self._backlog and self._ready is None and self._pending is None:
            chunk = memoryview(self._backlog[0])[self._backlog_pos :]
            used = self._consume(chunk)
            if used == len(chunk):
                self._backlog.popleft()
                self._backlog_pos = 0
            else:
                self._backlog_pos += used
        if self._pending is not None:
            self._backlog.clear()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A buffer to ``recv_into``; report the byte count with :meth:`buffer_updated`.
        Big payloads are received straight into the frame's own buffer."""
        self._check_alive()
        head = self._head
        if head is not None and self._pending is None and head.length - self._pfill >= _SCRATCH:
            self._lent_direct = True
            self._lent = head.length - self._pfill
            return memoryview(self._payload)[self._pfill :]
        if self._scratch is None:
            self._scratch = bytearray(_SCRATCH)
        self._lent_direct = False
        self._lent = _SCRATCH
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer` buffer."""
        if not 0 <= nbytes <= self._lent:
            raise ProtocolError(f"buffer_updated({nbytes}) but {self._lent} lent", remote=False)
        self._lent = 0
        if self._lent_direct:
            self._check_alive()
            self._pfill += nbytes
            self._maybe_complete()
        else:
            assert self._scratch is not None
            self.feed(memoryview(self._scratch)[:nbytes])

    def _start_payload(self) -> None:
        try:
            head = _parse_header(self._header, self.max_payload, self.codecs)
        except ProtocolError as e:
            self._pending = e
            return
        self._head = head
        self._payload = bytearray(head.length)  # only now: the header CRC covered the length
        self._pfill = 0
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        head = self._head
        if head is not None and self._pfill == head.length:
            self._ready = (head, self._payload)
            self._head = None
            self._hfill = 0
            self._payload = bytearray()
            self._pfill = 0

    # -- output -----------------------------------------------------------------------------

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed."""
        self._check_alive()
        if self._ready is None:
            self._pump()
        if self._ready is not None:
            head, payload = self._ready
            self._ready = None
            try:
                return _decode(head, payload)
            except ProtocolError as e:
                self._fail(e)
                raise
        if self._pending is not None:
            error = self._pending
            self._fail(error)
            raise error
        return None

    def next_message(self) -> Message | None:
        """Like :meth:`next_frame`, dropping the request id (for the handshake)."""
        frame = self.next_frame()
        return None if frame is None else frame.message

    @property
    def mid_frame(self) -> bool:
        """Bytes of an incomplete frame are buffered: end of stream now means truncation
        (meaningful once :meth:`next_frame` has returned None)."""
        return self._hfill > 0 or self._head is not None or bool(self._backlog)

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise ProtocolError(f"stream already failed: {self._failed}")

    def _fail(self, error: ProtocolError) -> None:
        self._failed = error
        self._pending = None
        self._ready = None
        self._backlog.clear()
        self._head = None
        self._payload = bytearray()
        self._scratch = None
