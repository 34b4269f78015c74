"""The replication wire protocol: round trips, incremental decoding, and the fuzzed rule that
any input either decodes or raises ProtocolError (docs/protocol.md, "Replication protocol")."""

from __future__ import annotations

import random
import re
import struct
import time
import tracemalloc

import crc32c
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from replicator import wire
from replicator.errors import ProtocolError
from replicator.header import bitmap_bytes
from replicator.wire import (
    HEADER_SIZE,
    MAGIC,
    MAX_CHUNK,
    MAX_DATA,
    Ack,
    Auth,
    AuthResult,
    Bitmap,
    BitmapRequest,
    Chunk,
    ChunkRequest,
    Error,
    Flush,
    FrameDecoder,
    Goodbye,
    Hello,
    Message,
    PairCreate,
    PairState,
    Ping,
    Pong,
    Write,
    Zero,
    encode,
    encode_parts,
)

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)

# -- strategies -------------------------------------------------------------------------------

_name_chars = st.characters(categories=("L", "N", "P", "S"), exclude_characters="/@\\")
names = st.text(_name_chars, min_size=1, max_size=63).filter(
    lambda s: len(s.encode()) <= 63 and s not in (".", "..")
)
node_names = st.text(
    st.characters(categories=("L", "N", "P", "S")),
    min_size=1,
    max_size=80,
).filter(lambda s: len(s.encode()) <= wire.NODE_NAME_MAX)
pair_ids = st.builds(lambda g, p: f"{g}/{p}", names, names)
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=300).filter(
    lambda s: len(s.encode()) <= wire.TEXT_MAX
)
chunk_sizes = st.sampled_from([1 << k for k in range(12, 27)])


@st.composite
def blobs(draw: st.DrawFn, min_size: int = 1, max_size: int = 2000) -> bytes | memoryview:
    raw = draw(st.binary(min_size=min_size, max_size=max_size))
    if draw(st.booleans()):
        return raw
    return memoryview(bytearray(raw))  # a writable buffer, as nbdkit hands one to pwrite


@st.composite
def bitmaps(draw: st.DrawFn) -> Bitmap:
    chunk = draw(chunk_sizes)
    nchunks = draw(st.integers(1, 3 * 8 * 4096))
    data_size = (nchunks - 1) * chunk + draw(st.integers(1, chunk))
    total = bitmap_bytes(data_size, chunk)
    pages = total // 4096
    first = draw(st.integers(0, pages - 1))
    count = draw(st.integers(1, pages - first))
    bits = bytearray(count * 4096)
    base = first * 4096 * 8
    for chunk_no in draw(st.lists(st.integers(0, nchunks - 1), max_size=50)):
        if base <= chunk_no < base + len(bits) * 8:
            rel = chunk_no - base
            bits[rel // 8] |= 1 << (rel % 8)
    which = draw(st.sampled_from(wire.BITMAP_KINDS))
    return Bitmap(draw(pair_ids), which, chunk, data_size, first * 4096, bytes(bits))


@st.composite
def writes(draw: st.DrawFn) -> Write:
    data = draw(blobs())
    offset = draw(st.integers(0, 2**64 - len(data)))
    return Write(draw(pair_ids), offset, data, draw(st.booleans()), draw(U64))


@st.composite
def entries(draw: st.DrawFn) -> wire.Entries:
    first = draw(st.integers(1, 2**63))
    heads: list[tuple[int, int, int, int, bool]] = []
    data: list[bytes] = []
    for i in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from((wire.ENTRY_WRITE, wire.ENTRY_ZERO, wire.ENTRY_TRIM)))
        length = draw(st.integers(1, 600))
        offset = draw(st.integers(0, 2**64 - length))
        heads.append((first + i, offset, length, kind, draw(st.booleans())))
        if kind == wire.ENTRY_WRITE:
            data.append(draw(st.binary(min_size=length, max_size=length)))
    return wire.pack_entries(draw(pair_ids), heads, data)


@st.composite
def zeros(draw: st.DrawFn) -> Zero:
    length = draw(st.integers(1, 2**64 - 1))
    offset = draw(st.integers(0, 2**64 - length))
    return Zero(draw(pair_ids), offset, length, draw(st.booleans()), draw(st.booleans()), draw(U64))


@st.composite
def pair_states(draw: st.DrawFn) -> PairState:
    state = draw(st.sampled_from(wire.STATES))
    role = "secondary" if state == "SSWS" else draw(st.sampled_from(wire.ROLES))
    return PairState(draw(pair_ids), state, role, draw(U64), draw(U64))


@st.composite
def pair_creates(draw: st.DrawFn) -> PairCreate:
    mode = draw(st.sampled_from(wire.MODES))
    fence = "never" if mode == "async" else draw(st.sampled_from(wire.FENCES))
    return PairCreate(
        draw(pair_ids),
        draw(names),
        draw(st.integers(1, 2**63 - 1)),
        draw(chunk_sizes),
        mode,
        fence,
        draw(st.integers(1, 2**64 - 1)),
        draw(U64),
    )


STRATEGIES: dict[type, st.SearchStrategy[Message]] = {
    Hello: st.builds(
        Hello, st.integers(1, 2**16 - 1), node_names, st.binary(min_size=32, max_size=32), U64
    ),
    Auth: st.builds(Auth, st.binary(min_size=32, max_size=32)),
    AuthResult: st.builds(AuthResult, st.booleans(), texts),
    Goodbye: st.builds(Goodbye, texts),
    Ping: st.builds(Ping, U64),
    Pong: st.builds(Pong, U64),
    Ack: st.builds(Ack, U32, texts),
    Error: st.builds(Error, st.integers(1, 2**32 - 1), texts),
    PairCreate: pair_creates(),
    PairState: pair_states(),
    BitmapRequest: st.builds(BitmapRequest, pair_ids, st.sampled_from(wire.BITMAP_KINDS)),
    Bitmap: bitmaps(),
    Write: writes(),
    Zero: zeros(),
    wire.Entries: entries(),
    Flush: st.builds(Flush, pair_ids),
    Chunk: st.builds(Chunk, pair_ids, U64, blobs()),
    ChunkRequest: st.builds(ChunkRequest, pair_ids, U64, st.integers(1, 2**32 - 1)),
    wire.JournalStatus: st.builds(wire.JournalStatus, pair_ids, U64, U64, U64),
    wire.JournalAck: st.tuples(U64, U64).map(lambda t: wire.JournalAck("g/p", max(t), min(t))),
    wire.DigestRequest: st.builds(wire.DigestRequest, pair_ids, U64, st.integers(1, 65536)),
    wire.Digests: st.builds(
        wire.Digests,
        pair_ids,
        U64,
        st.integers(1, 64).flatmap(lambda n: st.binary(min_size=8 * n, max_size=8 * n)),
    ),
}
messages = st.one_of(*STRATEGIES.values())
frames = st.tuples(messages, U64)


def test_every_message_type_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(wire.CODECS)
    assert len({c.number for c in wire.CODECS.values()}) == len(wire.CODECS)


def decode_all(data: bytes, **kw: int) -> list[wire.Frame]:
    d = FrameDecoder(**kw)
    d.feed(data)
    out = []
    while (f := d.next_frame()) is not None:
        out.append(f)
    assert not d.mid_frame
    return out


def reframe(
    mtype: int,
    payload: bytes,
    request_id: int = 0,
    *,
    version: int = 1,
    flags: int = 0,
    length: int | None = None,
    magic: bytes = MAGIC,
) -> bytes:
    """A frame with correct CRCs around any payload (to reach the field decoders)."""
    n = len(payload) if length is None else length
    head = bytearray(struct.pack("<4sBBHQIII", magic, version, mtype, flags, request_id, n, 0, 0))
    struct.pack_into("<I", head, 20, crc32c.crc32c(payload))
    struct.pack_into("<I", head, 24, crc32c.crc32c(bytes(head[:24])))
    return bytes(head) + payload


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
def test_round_trip_each_type(cls: type) -> None:
    @given(STRATEGIES[cls], U64)
    @settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
    def check(msg: Message, request_id: int) -> None:
        raw = encode(msg, request_id)
        assert raw[5] == wire.type_number(cls)
        [frame] = decode_all(raw)
        assert frame.message == msg
        assert type(frame.message) is cls
        assert frame.request_id == request_id
        assert encode(frame.message, request_id) == raw  # one encoding per message

    check()


@given(frames)
def test_encode_parts_passes_bulk_data_by_reference(frame: tuple[Message, int]) -> None:
    msg, rid = frame
    parts = encode_parts(msg, rid)
    assert b"".join(parts) == encode(msg, rid)
    bulk = getattr(msg, "data", getattr(msg, "bits", getattr(msg, "digests", None)))
    if bulk is not None:
        assert parts[-1] is bulk
    else:
        assert len(parts) == 1


@given(st.lists(frames, max_size=8), st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_split_gives_the_same_frames(
    batch: list[tuple[Message, int]], data: st.DataObject
) -> None:
    stream = b"".join(encode(m, r) for m, r in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    d = FrameDecoder()
    got = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        d.feed(stream[prev:cut])
        prev = cut
        while (f := d.next_frame()) is not None:
            got.append((f.message, f.request_id))
    assert got == batch
    assert not d.mid_frame


@given(st.lists(frames, min_size=1, max_size=4))
@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow])
def test_byte_by_byte(batch: list[tuple[Message, int]]) -> None:
    stream = b"".join(encode(m, r) for m, r in batch)
    d = FrameDecoder()
    got = []
    for i in range(len(stream)):
        d.feed(stream[i : i + 1])
        assert d.mid_frame == (i + 1 < len(stream) and not _ends_frame(stream, i + 1))
        while (f := d.next_frame()) is not None:
            got.append((f.message, f.request_id))
    assert got == batch


def _ends_frame(stream: bytes, pos: int) -> bool:
    at = 0
    while at < pos:
        (length,) = struct.unpack_from("<I", stream, at + 16)
        at += HEADER_SIZE + length
    return at == pos


def recv_into_decoder(d: FrameDecoder, stream: bytes, sizes: random.Random) -> list[wire.Frame]:
    """What an asyncio.BufferedProtocol adapter does: recv_into the lent buffer."""
    got = []
    pos = 0
    while pos < len(stream):
        buf = d.get_buffer()
        n = min(len(buf), len(stream) - pos, sizes.randint(1, 200_000))
        buf[:n] = stream[pos : pos + n]
        del buf
        d.buffer_updated(n)
        pos += n
        while (f := d.next_frame()) is not None:
            got.append(f)
    return got


@given(st.lists(frames, max_size=6), st.randoms(use_true_random=False))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_get_buffer_path_gives_the_same_frames(
    batch: list[tuple[Message, int]], rnd: random.Random
) -> None:
    stream = b"".join(encode(m, r) for m, r in batch)
    got = recv_into_decoder(FrameDecoder(), stream, rnd)
    assert [(f.message, f.request_id) for f in got] == batch


def test_big_payload_is_received_in_place_and_handed_out_without_copy() -> None:
    data = random.randbytes(5 * 1024 * 1024 + 7)
    big = encode(Write("g/p", 0, data), 9) + encode(Ping(1), 10)
    d = FrameDecoder()
    first = d.get_buffer()
    first[:HEADER_SIZE] = big[:HEADER_SIZE]
    del first
    d.buffer_updated(HEADER_SIZE)
    lent = d.get_buffer()
    assert len(lent) > 5 * 1024 * 1024  # the frame's own payload buffer, not a scratch copy
    del lent
    got = recv_into_decoder(d, big[HEADER_SIZE:], random.Random(1))
    assert [f.request_id for f in got] == [9, 10]
    msg = got[0].message
    assert isinstance(msg, Write) and msg.data == data
    assert isinstance(msg.data, memoryview) and msg.data.readonly


def test_big_payload_in_small_feeds_is_linear() -> None:
    data = bytes(range(256)) * (16 * 4096)  # 16 MiB
    raw = encode(Write("g/p", 0, data))
    d = FrameDecoder()
    t0 = time.monotonic()
    for i in range(0, len(raw), 4096):
        d.feed(raw[i : i + 4096])
    msg = d.next_message()
    assert time.monotonic() - t0 < 10  # quadratic buffering would copy ~32 GiB here
    assert isinstance(msg, Write) and msg.data == data


def test_bulk_limits_fit_the_pair_layer() -> None:
    from replicator.pair_state import MAX_CHUNK as PAIR_MAX_CHUNK

    assert MAX_CHUNK == MAX_DATA >= PAIR_MAX_CHUNK
    big = Chunk("g/p", 0, bytes(MAX_DATA))
    [frame] = decode_all(encode(big))
    assert frame.message == big
    with pytest.raises(ProtocolError):
        Chunk("g/p", 0, bytes(MAX_DATA + 1))


def test_bitmap_message_carries_replicator_bitmap_bytes() -> None:
    from replicator.bitmap import Bitmap as ChunkMap

    m = ChunkMap(10 * 2**30 + 12345, 65536)
    for c in (0, 7, 8, 1000, m.nchunks - 1):
        m.set_chunk(c)
    msg = Bitmap("g/p", "diff", m.chunk_size, m.data_size, 0, m.to_bytes())
    assert msg.last
    [frame] = decode_all(encode(msg))
    assert isinstance(frame.message, Bitmap)
    back = ChunkMap.from_bytes(m.data_size, m.chunk_size, frame.message.bits)
    assert back == m


# -- the fuzzed rule: decode or ProtocolError, nothing else -----------------------------------


def decode_or_protocol_error(data: bytes, *, step: int = 0) -> list[bytes]:
    """Feed ``data`` (all at once, or ``step`` bytes at a time through get_buffer); return the
    re-encoded frames it decoded to before an error (if any)."""
    d = FrameDecoder()
    out: list[bytes] = []
    try:
        for pos in range(0, len(data), step or len(data) or 1):
            piece = data[pos : pos + step] if step else data
            if step:
                buf = d.get_buffer()
                n = min(len(buf), len(piece))
                buf[:n] = piece[:n]
                del buf
                d.buffer_updated(n)
                d.feed(piece[n:])
            else:
                d.feed(piece)
            while (f := d.next_frame()) is not None:
                out.append(encode(f.message, f.request_id))
    except ProtocolError as e:
        assert e.remote
        with pytest.raises(ProtocolError):
            d.next_frame()
        with pytest.raises(ProtocolError):
            d.feed(b"x")
        return out
    return out


@given(st.binary(max_size=400))
@example(MAGIC)
@example(MAGIC + b"\x01" * 40)
def test_arbitrary_bytes(data: bytes) -> None:
    decode_or_protocol_error(data)


@given(frames, st.data())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_frames(frame: tuple[Message, int], data: st.DataObject) -> None:
    raw = bytearray(encode(*frame))
    how = data.draw(st.sampled_from(["flip", "truncate", "length", "splice", "byte"]))
    if how == "flip":
        for bit in data.draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=4)):
            raw[bit // 8] ^= 1 << (bit % 8)
    elif how == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    elif how == "length":  # a new length with a valid header CRC: the payload CRC must catch it
        struct.pack_into("<I", raw, 16, data.draw(U32))
        struct.pack_into("<I", raw, 24, crc32c.crc32c(bytes(raw[:24])))
    elif how == "splice":
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    out = decode_or_protocol_error(bytes(raw), step=data.draw(st.sampled_from([0, 1, 7, 1000])))
    decoded = b"".join(out)
    assert decoded == bytes(raw)[: len(decoded)]  # whatever decoded is canonical


@given(st.data())
@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_payloads_with_valid_crcs(data: st.DataObject) -> None:
    """Reach every field decoder: right CRCs around mutated or random payloads of any type."""
    msg, rid = data.draw(frames)
    payload = bytearray(encode(msg, rid)[HEADER_SIZE:])
    mtype = data.draw(st.sampled_from([*sorted({c.number for c in wire.CODECS.values()}), 0, 99]))
    how = data.draw(st.sampled_from(["random", "flip", "cut", "grow", "byte", "keep"]))
    if how == "random":
        payload = bytearray(data.draw(st.binary(max_size=400)))
    elif how == "flip" and payload:
        bit = data.draw(st.integers(0, len(payload) * 8 - 1))
        payload[bit // 8] ^= 1 << (bit % 8)
    elif how == "cut":
        del payload[data.draw(st.integers(0, len(payload))) :]
    elif how == "grow":
        payload += data.draw(st.binary(min_size=1, max_size=8))
    elif how == "byte" and payload:
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(
            st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF])
        )
    raw = reframe(mtype, bytes(payload), rid)
    out = decode_or_protocol_error(raw)
    if out:
        assert out == [raw]  # decoding then re-encoding gives back the same bytes


def test_oversized_length_is_refused_before_allocating() -> None:
    header = reframe(wire.type_number(Write), b"", length=2**32 - 1)[:HEADER_SIZE]
    d = FrameDecoder()
    tracemalloc.start()
    try:
        d.feed(header)
        with pytest.raises(ProtocolError, match=r"over the .*-byte limit"):
            d.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_handshake_limit_refuses_bulk_frames() -> None:
    raw = encode(Write("g/p", 0, bytes(8192)))
    with pytest.raises(ProtocolError, match="4096-byte limit"):
        decode_all(raw, max_payload=wire.HANDSHAKE_MAX_PAYLOAD)
    assert decode_all(encode(Hello(1, "n" * 255, bytes(32))), max_payload=4096)


def test_raised_limit_applies_from_the_next_frame_even_if_already_received() -> None:
    """The acceptor may send data right behind AuthResult, in the same TCP segment."""
    d = FrameDecoder(max_payload=wire.HANDSHAKE_MAX_PAYLOAD)
    d.feed(encode(AuthResult(True), 0) + encode(Write("g/p", 0, bytes(100_000)), 1))
    assert d.next_message() == AuthResult(True)
    d.max_payload = wire.MAX_PAYLOAD
    assert d.next_message() == Write("g/p", 0, bytes(100_000))
    assert d.next_frame() is None and not d.mid_frame


def test_per_type_limit_refuses_a_long_small_message() -> None:
    raw = reframe(wire.type_number(Ping), bytes(9))
    with pytest.raises(ProtocolError, match="Ping payload of 9 bytes is over the 8-byte limit"):
        decode_all(raw)
    with pytest.raises(ProtocolError, match="Ping payload of 7 bytes is under 8"):
        decode_all(reframe(wire.type_number(Ping), bytes(7)))


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (reframe(0x7E, b""), "unknown message type 0x7e"),
        (reframe(0, b""), "unknown message type 0x00"),
        (reframe(5, bytes(8), magic=b"HTTP"), "bad frame magic"),
        (reframe(5, bytes(8), version=2), "frame version 2 is not supported"),
        (reframe(5, bytes(8), flags=1), "frame flags 0x0001"),
        (reframe(0x22, b"\x03\x00g/p" + b"x"), "1 bytes of trailing garbage"),
        (reframe(0x22, b"\x03\x00g/q"[:4]), "ends inside pair_id"),
        (reframe(0x22, b"\x03\x00g\xffp"), "not UTF-8"),
        (reframe(0x22, b"\x03\x00gpp"), "invalid Flush.pair_id"),
        (reframe(0x20, b"\xff\x00" + b"a" * 300), "255 bytes is over the 127 limit"),
        (reframe(0x03, b"\x02\x00\x00"), "boolean byte is 2"),
        (reframe(0x11, b"\x03\x00g/p\x08\x01" + bytes(16)), "state: unknown code 8"),
        (reframe(0x11, b"\x03\x00g/p\x00\x00" + bytes(16)), "role: unknown code 0"),
        (reframe(0x08, bytes(6)), r"Error.code: 0 is not an integer from 1"),
    ],
)
def test_specific_decode_errors(frame: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        decode_all(frame)
    assert info.value.remote


def test_crc_mismatches() -> None:
    raw = bytearray(encode(Ping(5), 1))
    raw[HEADER_SIZE] ^= 1
    with pytest.raises(ProtocolError, match="Ping payload CRC32C mismatch"):
        decode_all(bytes(raw))
    raw = bytearray(encode(Ping(5), 1))
    raw[8] ^= 1  # the request id: only the header CRC covers it
    with pytest.raises(ProtocolError, match="frame header CRC32C mismatch"):
        decode_all(bytes(raw))


def test_frames_before_an_error_come_first_and_the_decoder_stays_failed() -> None:
    d = FrameDecoder()
    d.feed(encode(Ping(1), 1) + encode(Pong(1), 2) + b"garbage, not a header" + encode(Ping(3)))
    assert d.next_message() == Ping(1)
    assert d.next_message() == Pong(1)
    with pytest.raises(ProtocolError, match="bad frame magic"):
        d.next_frame()
    assert d.failed
    for call in (d.next_frame, lambda: d.feed(encode(Ping(4))), d.get_buffer):
        with pytest.raises(ProtocolError, match="stream already failed: bad frame magic"):
            call()


def test_incomplete_input_waits() -> None:
    raw = encode(Goodbye("bye"), 3)
    d = FrameDecoder()
    assert d.next_frame() is None and not d.mid_frame
    d.feed(raw[:-1])
    assert d.next_frame() is None and d.mid_frame
    d.feed(raw[-1:])
    assert d.next_frame() == wire.Frame(Goodbye("bye"), 3)


# -- building messages ------------------------------------------------------------------------

ENTRY = wire.ENTRY_HEAD.pack(1, 0, 4, wire.ENTRY_WRITE, 0)  # one 4-byte write at seq 1
BAD_BUILDS = [
    lambda: Hello(0, "a", bytes(32)),
    lambda: Hello(1, "", bytes(32)),
    lambda: Hello(1, "a b", bytes(32)),
    lambda: Hello(1, "a" * 256, bytes(32)),
    lambda: Hello(1, "a", bytes(31)),
    lambda: Hello(1, "a", bytearray(32)),  # type: ignore[arg-type]
    lambda: Hello(1, "a", bytes(32), -1),
    lambda: Auth(bytes(33)),
    lambda: AuthResult(1, ""),  # type: ignore[arg-type]
    lambda: Goodbye("x" * 1025),
    lambda: Goodbye("\udcff"),
    lambda: Ping(2**64),
    lambda: Ping(True),
    lambda: Ack(-1),
    lambda: Error(0),
    lambda: PairCreate("g/p", "v", 0, 65536, "sync", "never", 1, 0),
    lambda: PairCreate("g/p", "v", 1, 65537, "sync", "never", 1, 0),
    lambda: PairCreate("g/p", "v", 1, 2048, "sync", "never", 1, 0),
    lambda: PairCreate("g/p", "v", 1, 65536, "async", "data", 1, 0),
    lambda: PairCreate("g/p", "v", 1, 65536, "semi", "never", 1, 0),
    lambda: PairCreate("g/p", "v", 1, 65536, "sync", "never", 0, 0),
    lambda: PairCreate("g/p", "a/b", 1, 65536, "sync", "never", 1, 0),
    lambda: PairState("g/p", "SSWS", "primary", 1, 1),
    lambda: PairState("g/p", "pair", "primary", 1, 1),
    lambda: Flush("gp"),
    lambda: Flush("g/p/q"),
    lambda: Flush("g/" + "p" * 64),
    lambda: Flush("g /p"),
    lambda: BitmapRequest("g/p", "all"),
    lambda: Write("g/p", 0, b""),
    lambda: Write("g/p", 2**64 - 1, b"ab"),
    lambda: Write("g/p", 0, "text"),  # type: ignore[arg-type]
    lambda: Write("g/p", 0, memoryview(bytes(8))[::2]),
    lambda: Zero("g/p", 0, 0),
    lambda: wire.Entries("g/p", b"", b""),
    lambda: wire.Entries("g/p", ENTRY + b"x", b"d" * 4),
    lambda: wire.Entries("g/p", ENTRY, b"d" * 3),  # the index's write holds 4 bytes
    lambda: wire.Entries("g/p", ENTRY * (wire.MAX_ENTRIES + 1), b"d" * 4),
    lambda: wire.pack_entries("g/p", [(1, 0, 4, 0, False), (3, 0, 4, 0, False)], [b"d" * 8]),
    lambda: wire.pack_entries("g/p", [(0, 0, 4, 0, False)], [b"d" * 4]),  # seq 0
    lambda: wire.pack_entries("g/p", [(1, 0, 4, 3, False)], [b"d" * 4]),  # no kind 3
    lambda: wire.pack_entries("g/p", [(1, 0, 0, 1, False)], []),  # a zero of no bytes
    lambda: wire.pack_entries("g/p", [(1, 2**64 - 2, 4, 1, False)], []),
    lambda: wire.Entries("g/p", wire.ENTRY_HEAD.pack(1, 0, 4, 0, 2), b"d" * 4),  # fua byte 2
    lambda: Zero("g/p", 2, 2**64 - 1),
    lambda: Chunk("g/p", -1, b"x"),
    lambda: Bitmap("g/p", "diff", 65536, 65536, 0, bytes(4095)),
    lambda: Bitmap("g/p", "diff", 65536, 65536, 4096, bytes(4096)),
    lambda: Bitmap("g/p", "diff", 65536, 65536, 0, b"\x02" + bytes(4095)),
    lambda: Bitmap("g/p", "diff", 65536, 65536 * 9, 0, b"\xff\x02" + bytes(4094)),
    lambda: Bitmap("g/p", "diff", 65536, 65536 * 8, 0, b"\xff" + bytes(4094) + b"\x01"),
]


@pytest.mark.parametrize("build", BAD_BUILDS)
def test_bad_fields_are_refused_locally(build: object) -> None:
    assert callable(build)
    with pytest.raises(ProtocolError) as info:
        build()
    assert not info.value.remote


def test_good_edge_builds() -> None:
    assert Write("g/p", 2**64 - 2, b"ab").offset == 2**64 - 2
    assert Zero("g/p", 0, 2**64 - 1).length == 2**64 - 1
    assert Bitmap("g/p", "diff", 65536, 65536 * 9, 0, b"\xff\x01" + bytes(4094)).last
    mv = memoryview(bytearray(16)).cast("I")
    data = Write("g/p", 0, mv).data
    assert isinstance(data, memoryview) and data.format == "B"  # normalized to bytes
    assert len(Write("g/p", 0, mv).data) == 16
    assert PairCreate("g/p", "v", 1, 65536, "sync", "data", 1, 0).fence == "data"


def test_clip_text() -> None:
    assert wire.clip_text("ok") == "ok"
    clipped = wire.clip_text("é" * 1000)
    assert len(clipped.encode()) <= wire.TEXT_MAX and clipped.endswith("...")
    assert Error(5, wire.clip_text("bad \udcff name")).message == "bad ? name"


def test_encode_refuses_bad_request_id() -> None:
    with pytest.raises(ProtocolError) as info:
        encode(Ping(1), 2**64)
    assert not info.value.remote


# -- docs/protocol.md agrees with the code ----------------------------------------------------


def test_documented_example_frame() -> None:
    raw = encode(Ping(0x0102030405060708), 42)
    assert raw.hex(" ") == (
        "50 56 52 50 01 05 00 00 2a 00 00 00 00 00 00 00 08 00 00 00 1c 02 f9 26 51 82 f4 43 "
        "08 07 06 05 04 03 02 01"
    )


def test_documented_message_table_matches_the_codec_table() -> None:
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    section = doc[doc.index("## Replication protocol") :]
    rows = re.findall(r"^\| (0x[0-9a-f]{2}) \| (\w+) \| ([^|]+) \|", section, re.M)
    documented = {int(num, 16): (name, fields) for num, name, fields in rows}
    actual = {c.number: c for c in wire.CODECS.values()}
    assert set(documented) == set(actual)
    for num, (name, fields) in documented.items():
        codec = actual[num]
        assert name == codec.cls.__name__
        names = [f.split()[0] for f in fields.split(", ")]
        assert names == [f.name for f in codec.fields], name


def test_pair_layer_enums_are_accepted() -> None:
    from replicator.pair_state import Fence, Mode, State

    msg = PairState("g/p", State.SSWS, "secondary", 1, 2)
    [frame] = decode_all(encode(msg))
    assert frame.message == msg and frame.message.state == "SSWS"
    create = PairCreate("g/p", "v", 4096, 65536, Mode.SYNC, Fence.DATA, 1, 0)
    assert decode_all(encode(create))[0].message == create
