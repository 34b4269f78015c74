"""Compression on peer links (issue 12, item 6): the codec module and the frame flags.

Round trips of random and compressible data in every codec, the header's codec bits, and
the rule that any compressed input either decodes or raises one ProtocolError: corrupt,
truncated, oversized (a decompression bomb) or in a codec that was not agreed.
"""

from __future__ import annotations

import os
import struct
import tracemalloc

import crc32c
import lz4.block
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator import compression, wire
from replicator.compression import LZ4, NONE, ZSTD
from replicator.errors import ProtocolError, UsageError
from replicator.wire import HEADER_SIZE, Chunk, FrameDecoder, Ping, Write, encode

PACKED = (ZSTD, LZ4)
ALL = frozenset(compression.CODECS)


# -- data -------------------------------------------------------------------------------------

_words = st.sampled_from(
    [b"block ", b"storage ", b"replication ", b"\x00" * 64, b"pairvol ", b"\n", b"PVID 0x1f "]
)


@st.composite
def compressible(draw: st.DrawFn, max_size: int = 70_000) -> bytes:
    """Text-like data: words drawn from a small vocabulary, with some random bytes mixed in."""
    parts = draw(st.lists(_words, min_size=1, max_size=40))
    unit = b"".join(parts) + draw(st.binary(max_size=16))
    n = draw(st.integers(1, max_size))
    return (unit * (n // len(unit) + 1))[:n]


any_data = st.one_of(st.binary(min_size=1, max_size=5000), compressible())
codecs = st.sampled_from(compression.CODECS)


def frame_flags(raw: bytes) -> int:
    flags: int = struct.unpack_from("<H", raw, 6)[0]
    return flags


def decode_one(raw: bytes, **kw: object) -> wire.Frame:
    d = FrameDecoder(**kw)  # type: ignore[arg-type]
    d.feed(raw)
    frame = d.next_frame()
    assert frame is not None and d.next_frame() is None and not d.mid_frame
    return frame


def refused(raw: bytes, match: str, **kw: object) -> ProtocolError:
    d = FrameDecoder(**kw)  # type: ignore[arg-type]
    d.feed(raw)
    with pytest.raises(ProtocolError, match=match) as info:
        d.next_frame()
    assert info.value.remote
    assert "\n" not in str(info.value)  # one clear line
    with pytest.raises(ProtocolError):  # and the stream stays failed
        d.next_frame()
    return info.value


def reframe(mtype: int, payload: bytes, flags: int, request_id: int = 0) -> bytes:
    """A frame with correct CRCs around any payload and flags."""
    head = bytearray(struct.pack("<4sBBHQIII", b"PVRP", 1, mtype, flags, request_id, 0, 0, 0))
    struct.pack_into("<I", head, 16, len(payload))
    struct.pack_into("<I", head, 20, crc32c.crc32c(payload))
    struct.pack_into("<I", head, 24, crc32c.crc32c(bytes(head[:24])))
    return bytes(head) + payload


def write_payload(data_len: int, packed: bytes, pair_id: str = "g/p") -> bytes:
    """A Write's payload whose data field holds ``packed`` and declares ``data_len``."""
    raw_pid = pair_id.encode()
    fields = struct.pack("<H", len(raw_pid)) + raw_pid + struct.pack("<QQB", 0, 0, 0)
    return fields + struct.pack("<I", data_len) + packed


WRITE = wire.type_number(Write)


# -- the codec module -------------------------------------------------------------------------


def test_both_libraries_are_available_and_offered() -> None:
    assert compression.available() == ALL
    assert compression.codecs_of(compression.features(ALL)) == ALL
    assert compression.codecs_of(0) == {NONE}
    assert compression.features(ALL) == wire.FEATURE_ZSTD | wire.FEATURE_LZ4 == 0b110
    assert not compression.features(ALL) & wire.FEATURE_NO_SECRET
    assert compression.codecs_of(~0 & (2**64 - 1)) == ALL  # unknown bits are ignored


@given(codecs, any_data)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_pack_then_unpack_gives_the_data_back(codec: str, data: bytes) -> None:
    for blob in (data, memoryview(bytearray(data))):
        packed = compression.pack(codec, blob)
        if packed is None:
            continue
        assert codec != NONE and len(packed) < len(data)
        out = compression.unpack(codec, packed, len(data), limit=len(data), what="t")
        assert out == data


@pytest.mark.parametrize("codec", PACKED)
def test_compressible_data_shrinks_and_random_data_goes_raw(codec: str) -> None:
    text = (b"the quick brown fox jumps over the lazy dog " * 2000)[: 64 * 1024]
    packed = compression.pack(codec, text)
    assert packed is not None and len(packed) < len(text) // 10
    for n in (4096, 64 * 1024, 1 << 20):
        assert compression.pack(codec, os.urandom(n)) is None
    assert compression.pack(codec, b"\x00" * 100) is None  # too small to bother
    assert compression.pack(NONE, text) is None


@pytest.mark.parametrize("codec", PACKED)
def test_a_random_sample_skips_the_full_compression(codec: str) -> None:
    """Random data at the start and the middle: sent raw even if its end would compress (the
    sample decides, so a random chunk costs two 4 KiB trials, not a full pass)."""
    n = 256 * 1024
    data = os.urandom(n // 2 + compression.SAMPLE) + bytes(n // 2 - compression.SAMPLE)
    assert compression.pack(codec, data) is None
    assert compression.pack(codec, bytes(n)) is not None


def test_check_codec() -> None:
    assert [compression.check_codec(c) for c in compression.CODECS] == list(compression.CODECS)
    for bad in ("gzip", "", "ZSTD", None, 1):
        with pytest.raises(UsageError, match="is not one of none, zstd, lz4"):
            compression.check_codec(bad)


@pytest.mark.parametrize("codec", PACKED)
def test_unpack_refuses_corrupt_data(codec: str) -> None:
    data = b"pairvol replicates blocks " * 400
    packed = compression.pack(codec, data)
    assert packed is not None

    def bad(blob: bytes, size: int = len(data)) -> None:
        with pytest.raises(ProtocolError, match=r"^Write\.data: ") as info:
            compression.unpack(codec, blob, size, limit=1 << 20, what="Write.data")
        assert str(info.value).startswith("Write.data: ") and "\n" not in str(info.value)

    bad(packed[: len(packed) // 2])  # truncated
    bad(packed + b"\x00\x01")  # trailing bytes
    bad(packed, len(data) + 1)  # another size than the message says
    bad(packed, len(data) - 1)
    bad(b"\xff" * 64)  # garbage
    bad(b"")
    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 0xFF
    try:
        out = compression.unpack(codec, bytes(flipped), len(data), limit=1 << 20, what="x")
    except ProtocolError:
        pass
    else:
        assert out != data  # a flip the codec cannot see still changes the data (CRC32C sees it)


def test_decompression_bombs_are_refused_before_allocating() -> None:
    n = 64 << 20
    bombs = {
        ZSTD: zstandard.ZstdCompressor(level=1).compress(bytes(n)),
        LZ4: lz4.block.compress(bytes(n), store_size=False),
    }
    for codec, bomb in bombs.items():
        assert len(bomb) < 300_000
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError, match="over the 1048576-byte limit"):
                compression.unpack(codec, bomb, n, limit=1 << 20, what="Write.data")
            # A size within the limit but data that says more: refused, bounded by the size.
            with pytest.raises(ProtocolError):
                compression.unpack(codec, bomb, 1 << 20, limit=1 << 20, what="Write.data")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20, (codec, peak)


def test_a_zstd_frame_without_its_size_is_refused() -> None:
    data = b"abc" * 1000
    blob = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    with pytest.raises(ProtocolError, match="zstd frame declares no size"):
        compression.unpack(ZSTD, blob, len(data), limit=1 << 20, what="Write.data")
    two = compression.pack(ZSTD, data)
    assert two is not None
    with pytest.raises(ProtocolError, match="bytes after the zstd frame"):
        compression.unpack(ZSTD, two + two, len(data), limit=1 << 20, what="Write.data")


# -- frames -----------------------------------------------------------------------------------

bulk_messages = st.one_of(
    st.builds(
        lambda d, off, fua, seq: Write("g/p", off, d, fua, seq),
        any_data,
        st.integers(0, 2**40),
        st.booleans(),
        st.integers(0, 2**64 - 1),
    ),
    st.builds(lambda d, i: Chunk("g/p", i, d), any_data, st.integers(0, 2**64 - 1)),
)


@given(bulk_messages, codecs, st.integers(0, 2**64 - 1))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_compressed_frames_round_trip(msg: Write | Chunk, codec: str, rid: int) -> None:
    raw = encode(msg, rid)
    packed = encode(msg, rid, compress=codec)
    frame = decode_one(packed)
    assert frame.message == msg and frame.request_id == rid
    flags = frame_flags(packed)
    assert flags == compression.CODE[frame.compression]
    if frame.compression == NONE:
        assert packed == raw
    else:
        assert frame.compression == codec and len(packed) < len(raw)
    # The same codec gives back the same bytes (both compressors are deterministic).
    assert encode(frame.message, rid, compress=frame.compression) == packed
    # Split anywhere: the same frame.
    d = FrameDecoder()
    for i in range(0, len(packed), 997):
        d.feed(packed[i : i + 997])
    again = d.next_frame()
    assert again is not None and again == frame


@pytest.mark.parametrize("codec", PACKED)
def test_only_volume_data_is_ever_compressed(codec: str) -> None:
    text = b"zeros and text compress well " * 500
    for msg in (
        Ping(7),
        wire.Digests("g/p", 0, bytes(8 * 512)),
        wire.Bitmap("g/p", "diff", 65536, 65536 * 8 * 4096 * 2, 0, bytes(4096)),
        wire.PairCreate("g/p", "v", 1 << 30, 65536, "sync", "never", 1, 0, compress=codec),
    ):
        assert frame_flags(encode(msg, compress=codec)) == 0
    for msg in (Write("g/p", 0, text), Chunk("g/p", 3, text)):
        assert frame_flags(encode(msg, compress=codec)) == compression.CODE[codec]


def test_pair_create_carries_the_codec() -> None:
    for codec in compression.CODECS:
        msg = wire.PairCreate("g/p", "v", 1 << 30, 65536, "sync", "never", 1, 0, compress=codec)
        assert decode_one(encode(msg)).message.compress == codec  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="compress: 'gzip' is not one of none, zstd, lz4"):
        wire.PairCreate("g/p", "v", 1 << 30, 65536, "sync", "never", 1, 0, compress="gzip")
    # On the wire, an unknown codec code is refused.
    raw = bytearray(encode(wire.PairCreate("g/p", "v", 1 << 30, 65536, "sync", "never", 1, 0)))
    raw[-1] = 3
    refused(reframe(0x10, bytes(raw[HEADER_SIZE:]), 0), "compress: unknown code 3")


def test_unknown_codec_and_reserved_flag_bits_are_refused() -> None:
    data = b"pairvol " * 1000
    good = encode(Write("g/p", 0, data), compress=ZSTD)
    payload = good[HEADER_SIZE:]
    refused(reframe(WRITE, payload, 0b11), r"Write frame flags 0x0003 name an unknown codec")
    for bit in range(2, 16):
        refused(reframe(WRITE, payload, 1 << bit | 1), "are not defined in version 1")
    # Codec bits on a message that never carries compressed data.
    ping = encode(Ping(1))[HEADER_SIZE:]
    refused(reframe(wire.type_number(Ping), ping, 1), "only Write and Chunk data is compressed")
    # A codec the link did not agree on (the handshake offered none, or not this one).
    refused(good, "say zstd, which this link did not agree on", codecs=frozenset({NONE}))
    refused(good, "did not agree on", codecs=frozenset({NONE, LZ4}))
    assert decode_one(good, codecs=frozenset({NONE, ZSTD})).message == Write("g/p", 0, data)
    # A raw frame whose flags claim a codec: its bytes are not that codec's.
    raw = encode(Write("g/p", 0, data))
    refused(reframe(WRITE, raw[HEADER_SIZE:], 1), "corrupt zstd data|zstd frame")
    refused(reframe(WRITE, raw[HEADER_SIZE:], 2), "corrupt lz4 data|lz4 data gives")


@pytest.mark.parametrize("codec", PACKED)
def test_corrupt_and_oversized_compressed_payloads_are_refused(codec: str) -> None:
    data = b"a block of text that compresses " * 2048
    packed = compression.pack(codec, data)
    assert packed is not None
    flag = compression.CODE[codec]
    # Valid CRCs around bad compressed data: the codec's checks catch it.
    refused(reframe(WRITE, write_payload(len(data), packed[:-7]), flag), f"Write.data: .*{codec}")
    refused(reframe(WRITE, write_payload(len(data) + 9, packed), flag), "Write.data: ")
    # A bad CRC is caught first, before any decompression.
    raw = bytearray(reframe(WRITE, write_payload(len(data), packed), flag))
    raw[-3] ^= 1
    refused(bytes(raw), "payload CRC32C mismatch")
    # A bomb: 64 MiB of zeros in a few kB, against a 1 MiB limit, without allocating 64 MiB.
    n = 64 << 20
    if codec == ZSTD:
        bomb = zstandard.ZstdCompressor(level=1).compress(bytes(n))
    else:
        bomb = lz4.block.compress(bytes(n), store_size=False)
    frame = reframe(WRITE, write_payload(n, bomb), flag)
    tracemalloc.start()
    try:
        refused(frame, "over the 1048576-byte limit", max_payload=1 << 20)
        # Over the 64 MiB bulk limit even with the full frame limit.
        refused(reframe(WRITE, write_payload(n + 1, bomb), flag), "over the 67108864")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


@given(st.data())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_compressed_payloads_decode_or_raise_protocol_error(data: st.DataObject) -> None:
    """Valid CRCs around mutated compressed payloads: a frame or one ProtocolError."""
    codec = data.draw(st.sampled_from(PACKED))
    msg = data.draw(bulk_messages)
    raw = encode(msg, 1, compress=codec)
    flags = frame_flags(raw)
    payload = bytearray(raw[HEADER_SIZE:])
    how = data.draw(st.sampled_from(["flip", "cut", "grow", "byte", "flags"]))
    if how == "flip":
        bit = data.draw(st.integers(0, len(payload) * 8 - 1))
        payload[bit // 8] ^= 1 << (bit % 8)
    elif how == "cut":
        del payload[data.draw(st.integers(0, len(payload))) :]
    elif how == "grow":
        payload += data.draw(st.binary(min_size=1, max_size=8))
    elif how == "byte":
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    else:
        flags = data.draw(st.integers(0, 0xFFFF))
    d = FrameDecoder()
    d.feed(reframe(wire.type_number(type(msg)), bytes(payload), flags, 1))
    try:
        frame = d.next_frame()
    except ProtocolError as e:
        assert e.remote and "\n" not in str(e)
        return
    assert frame is not None  # whatever decodes is a valid message
    assert type(frame.message) in (Write, Chunk)
