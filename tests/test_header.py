"""The header codec and slot choice: round trips, every corruption case, torn updates."""

from __future__ import annotations

import dataclasses
import struct
import uuid

import crc32c
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator import header as hdr
from replicator.errors import HeaderCorrupt, UsageError

names = st.text(
    alphabet=st.characters(whitelist_categories=("L", "N"), whitelist_characters="-_."),
    min_size=1,
    max_size=20,
).filter(lambda s: s not in (".", ".."))


@st.composite
def headers(draw: st.DrawFn) -> hdr.Header:
    bs = draw(st.sampled_from([512, 1024, 4096, 65536]))
    h = hdr.Header.new(
        pvid=draw(st.integers(1, (1 << 64) - 1)),
        name=draw(names),
        data_size=bs * draw(st.integers(1, 1 << 20)),
        block_size=bs,
        created_ns=draw(st.integers(-(1 << 62), 1 << 62)),
        vol_uuid=uuid.UUID(int=draw(st.integers(0, (1 << 128) - 1))),
    )
    return dataclasses.replace(
        h,
        role=draw(st.sampled_from(list(hdr.Role))),
        pair=draw(st.sampled_from(["", "g1/p1", "group-name/pair.2"])),
        prev_pvid=draw(st.integers(0, (1 << 64) - 1)),
        generation=draw(st.integers(1, (1 << 63))),
    )


def make(**kw: object) -> hdr.Header:
    args: dict[str, object] = dict(
        pvid=0x00C5247772D2F36B,
        name="vol1",
        data_size=64 << 20,
        block_size=4096,
        created_ns=1_700_000_000_000_000_000,
        vol_uuid=uuid.UUID(int=7),
    )
    args.update(kw)
    return hdr.Header.new(**args)  # type: ignore[arg-type]


@given(headers())
def test_encode_decode_round_trip(h: hdr.Header) -> None:
    slot = hdr.encode(h)
    assert len(slot) == hdr.SLOT_SIZE
    assert hdr.decode(slot) == h


@given(headers(), st.integers(0, hdr.HEADER_LEN - 1), st.integers(1, 255))
def test_any_single_byte_corruption_is_detected(h: hdr.Header, pos: int, xor: int) -> None:
    slot = bytearray(hdr.encode(h))
    slot[pos] ^= xor
    with pytest.raises(HeaderCorrupt):
        hdr.decode(bytes(slot))


@given(headers(), st.integers(0, hdr.HEADER_LEN - 1), st.integers(1, 255))
def test_one_damaged_slot_is_reported_and_the_other_chosen(
    h: hdr.Header, pos: int, xor: int
) -> None:
    good = hdr.encode(h)
    bad = bytearray(good)
    bad[pos] ^= xor
    for a, b, bad_index in ((bytes(bad), good, 0), (good, bytes(bad), 1)):
        choice = hdr.choose(a, b)
        assert choice.header == h
        assert choice.bad_slots == [bad_index]
        assert choice.slots[bad_index].status == "damaged"
        assert "degraded" in choice.describe()


def test_interrupted_update_picks_newer_generation_and_reports_stale() -> None:
    old = make()
    new = old.next(pvid=0x1234)
    # Crash after slot A was rewritten but before slot B: A is newer.
    choice = hdr.choose(hdr.encode(new), hdr.encode(old))
    assert choice.header == new
    assert choice.slots[1].status == "stale"
    assert "interrupted" in choice.slots[1].reason


def test_torn_write_of_slot_a_keeps_the_old_header() -> None:
    old = make()
    new = old.next(pvid=0x1234)
    torn = hdr.encode(new)[:100] + hdr.encode(old)[100:]
    choice = hdr.choose(torn, hdr.encode(old))
    assert choice.header == old
    assert choice.slots[0].status == "damaged"


def test_both_slots_bad_is_corrupt_and_names_both() -> None:
    with pytest.raises(HeaderCorrupt, match=r"slot A: .*slot B: "):
        hdr.choose(b"\0" * 4096, b"garbage" * 100)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: b"NOTPVOL\0" + s[8:], "bad magic"),
        (lambda s: b"\0" * len(s), "blank"),
        (lambda s: s[:100], "truncated"),
        (lambda s: s[:8] + struct.pack("<H", 9) + s[10:], "unsupported header format version 9"),
        (lambda s: s[:252] + b"\0\0\0\0" + s[256:], "bad CRC32C"),
    ],
)
def test_each_corruption_has_a_specific_reason(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(HeaderCorrupt, match=reason):
        hdr.decode(mutate(hdr.encode(make())))


def _resealed(slot: bytes, offset: int, value: bytes) -> bytes:
    """Change a field and recompute the CRC, as a buggy or hostile writer could."""
    body = bytearray(slot[:252])
    body[offset : offset + len(value)] = value
    return bytes(body) + struct.pack("<I", crc32c.crc32c(bytes(body))) + slot[256:]


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (24, struct.pack("<Q", 0), "PVID"),  # pvid zero
        (64, struct.pack("<Q", 1000), "data size"),  # not a multiple of block size
        (88, struct.pack("<I", 3000), "block size"),
        (56, struct.pack("<Q", 4096), "data offset"),  # overlaps metadata
        (92, struct.pack("<H", 9), "unknown role"),
        (104, b"\xff\xfe", "not UTF-8"),
        (16, struct.pack("<Q", 0), "generation"),
    ],
)
def test_crc_valid_but_nonsensical_fields_are_refused(
    offset: int, value: bytes, reason: str
) -> None:
    with pytest.raises(HeaderCorrupt, match=reason):
        hdr.decode(_resealed(hdr.encode(make()), offset, value))


def test_layout_aligns_data_to_a_mebibyte_and_reserves_bitmaps() -> None:
    for size in (4096, 64 << 20, 10 << 30, 1 << 40):
        meta_off, meta_size, data_off = hdr.layout_for(size)
        assert meta_off == 2 * hdr.SLOT_SIZE
        assert data_off % (1 << 20) == 0
        assert data_off >= meta_off + meta_size
        assert meta_size >= hdr.BITMAP_SLOTS * ((size // hdr.MIN_CHUNK + 7) // 8)


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "a@b", "has space", "x" * 64, "tab\there", "a\0b", "\0", "/", "..\\x", "\ud800"],
)
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(UsageError):
        hdr.check_name(bad)


@pytest.mark.parametrize("bad", [".", ".."])
def test_dot_and_dot_dot_are_not_names(bad: str) -> None:
    """They would be the directory itself, or its parent, once the name becomes a file name."""
    with pytest.raises(UsageError, match=r"'\.' and '\.\.' name directories"):
        hdr.check_name(bad)
    with pytest.raises(UsageError):
        make(name=bad)


@pytest.mark.parametrize("good", ["v1", "a.b", "...", ".hidden", "x..", "-v", "data_1-2", "é"])
def test_names_that_stay_valid(good: str) -> None:
    assert hdr.check_name(good) == good


def test_size_must_be_a_multiple_of_block_size() -> None:
    with pytest.raises(UsageError, match="multiple of the block size"):
        make(data_size=1000)


# The layout of docs/format.md ("Header slot"), written out here as a second, independent
# encoder: the header's framing moved to record_codec and its bytes must not have moved.
_DOCUMENTED = struct.Struct("<8sHHIQQQ16sQQQQIHHq64s64s20s")


def _documented_encoding(h: hdr.Header) -> bytes:
    body = _DOCUMENTED.pack(
        b"PAIRVOL\0", 1, 0, 256, h.generation, h.pvid, h.prev_pvid, h.uuid.bytes,
        h.data_offset, h.data_size, h.meta_offset, h.meta_size, h.block_size, int(h.role), 0,
        h.created_ns, h.name.encode(), h.pair.encode(), b"",
    )  # fmt: skip
    return (body + struct.pack("<I", crc32c.crc32c(body))).ljust(4096, b"\0")


@given(headers())
def test_the_bytes_are_the_documented_ones(h: hdr.Header) -> None:
    assert hdr.encode(h) == _documented_encoding(h)


def _set(slot: bytes, offset: int, value: bytes) -> bytes:
    return slot[:offset] + value + slot[offset + len(value) :]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s[:100], "slot is truncated (100 of 256 bytes)"),
        (lambda s: bytes(256) + s[256:], "slot is blank (all zero)"),
        (lambda s: _set(s, 0, b"X"), "bad magic: not a pairvol volume header"),
        (lambda s: _set(s, 8, struct.pack("<H", 9)),
         "unsupported header format version 9 (this is 1)"),
        (lambda s: _set(s, 12, struct.pack("<I", 255)), "header length 255 is not 256"),
        (lambda s: _set(s, 252, struct.pack("<I", 0x1234)),
         "bad CRC32C (stored 00001234, computed "),
        (lambda s: _resealed(s, 92, struct.pack("<H", 9)), "unknown role 9"),
        (lambda s: _resealed(s, 16, struct.pack("<Q", 0)), "generation 0 is invalid"),
        (lambda s: _resealed(s, 104, b"v\0x"), "name field has bytes after its terminator"),
    ],
)  # fmt: skip
def test_the_reasons_are_worded_as_they_always_were(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    """Repair notes and `volume check` quote these words; record_codec must not change them."""
    bad = mutate(hdr.encode(make()))
    with pytest.raises(HeaderCorrupt) as e:
        hdr.decode(bad)
    assert str(e.value).startswith(message)
    choice = hdr.choose(bad, hdr.encode(make()))
    assert choice.slots[0] == hdr.SlotState("damaged", str(e.value))
    assert choice.slots[1] == hdr.SlotState("ok", generation=1)


def test_both_slots_bad_names_both_reasons() -> None:
    with pytest.raises(HeaderCorrupt) as e:
        hdr.choose(bytes(4096), b"X" * 4096)
    assert str(e.value) == (
        "no valid header slot (slot A: slot is blank (all zero); "
        "slot B: bad magic: not a pairvol volume header)"
    )


def test_equal_generations_with_other_content_trust_slot_a() -> None:
    a, b = make(), make(pvid=0x4242)
    choice = hdr.choose(hdr.encode(a), hdr.encode(b))
    assert choice.header == a
    assert choice.slots == (
        hdr.SlotState("ok", generation=1),
        hdr.SlotState("damaged", "differs from the other slot at equal generation"),
    )


def test_stale_reason_and_write_plan() -> None:
    old = make()
    new = old.next(pvid=0x1234)
    choice = hdr.choose(hdr.encode(old), hdr.encode(new))
    assert choice.header == new
    assert choice.slots[0] == hdr.SlotState(
        "stale", "generation 1 behind 2 (interrupted update)", 1
    )
    assert choice.write_plan.order == (0, 1) and choice.write_plan.generation == 3
    choice = hdr.choose(hdr.encode(new), hdr.encode(old))
    assert choice.write_plan.order == (1, 0)  # the stale slot first: A still holds new
    healthy = hdr.choose(hdr.encode(new), hdr.encode(new))
    assert healthy.healthy and healthy.write_plan.order == (0, 1)
