"""The journal's pure codec (replicator.journal_codec): any bytes decode or raise the one error
of their decoder (HeaderCorrupt for a header slot, BadRecord for a record header), and what is
encoded decodes to the same thing."""

from __future__ import annotations

import contextlib
import struct
from dataclasses import replace

import crc32c
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator import journal_codec as jc
from replicator import record_codec as rc
from replicator.errors import HeaderCorrupt, UsageError

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

headers = st.builds(
    jc.JournalHeader,
    journal_id=st.integers(0, U64),
    capacity=st.integers(jc.MIN_CAPACITY // jc.CAPACITY_ALIGN, U64 // jc.CAPACITY_ALIGN).map(
        lambda n: n * jc.CAPACITY_ALIGN
    ),
    group=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])).filter(
        lambda g: len(g.encode()) <= 64
    ),
    created_ns=st.integers(-(1 << 63), (1 << 63) - 1),
    generation=st.integers(1, U64),
    epoch=st.integers(0, U32),
    tail_pos=st.integers(0, U64 // jc.RECORD_ALIGN).map(lambda n: n * jc.RECORD_ALIGN),
    tail_seq=st.integers(1, U64),
    applied_seq=st.integers(0, U64 - 1),
    tail_epoch=st.integers(0, U32),
    synced_seq=st.integers(0, U64),
    boot_id=st.binary(min_size=16, max_size=16),
)


@given(h=headers)
def test_header_round_trip(h: jc.JournalHeader) -> None:
    slot = jc.encode_header(h)
    assert len(slot) == jc.SLOT_SIZE
    assert jc.decode_header(slot) == h


@given(h=headers, at=st.integers(0, jc.HEADER_LEN - 1), mask=st.integers(1, 255))
def test_every_header_byte_is_checked(h: jc.JournalHeader, at: int, mask: int) -> None:
    bad = bytearray(jc.encode_header(h))
    bad[at] ^= mask
    with pytest.raises(HeaderCorrupt):
        jc.decode_header(bytes(bad))


@given(raw=st.binary(max_size=600), magic=st.booleans())
def test_header_decoder_raises_only_header_corrupt(raw: bytes, magic: bool) -> None:
    if magic:
        raw = jc.MAGIC + raw
    with contextlib.suppress(HeaderCorrupt):
        jc.decode_header(raw)
    with contextlib.suppress(HeaderCorrupt):
        jc.choose_header(raw, raw[::-1])


@given(raw=st.binary(max_size=200), magic=st.booleans())
def test_record_decoder_raises_only_bad_record(raw: bytes, magic: bool) -> None:
    if magic:
        raw = jc.REC_MAGIC + raw
    with contextlib.suppress(jc.BadRecord):
        jc.decode_record_head(raw)
    assert jc.record_data(raw, 1, len(raw)) in (None, raw[jc.REC_HEADER_LEN :])


@given(
    seq=st.integers(1, (1 << 62)),
    kind=st.sampled_from([1, 2, 3, jc.KIND_WRAP]),
    stream=st.integers(0, U32),
    offset=st.integers(0, 1 << 60),
    data=st.binary(max_size=600),
    fua=st.booleans(),
    back=st.integers(1, 1 << 20),
    flip_at=st.integers(0, jc.REC_HEADER_LEN - 1),
)
def test_record_round_trip_and_every_header_flip_is_caught(
    seq: int, kind: int, stream: int, offset: int, data: bytes, fua: bool, back: int, flip_at: int
) -> None:
    if kind != jc.EntryKind.WRITE:
        data = b""
    length = len(data) if kind in (jc.EntryKind.WRITE, jc.KIND_WRAP) else 4096
    written = max(0, seq - back)
    rec = jc.encode_record(
        journal_id=42, epoch=3, seq=seq, kind=kind, stream=stream, offset=offset,
        length=length, data=data, fua=fua, stamp_ns=-5, written_seq=written,
        synced_seq=written // 2,
    )  # fmt: skip
    assert len(rec) == jc.record_size(len(data)) and len(rec) % jc.RECORD_ALIGN == 0
    rh = jc.decode_record_head(rec)
    assert (rh.seq, rh.kind, rh.stream, rh.offset, rh.length, rh.fua, rh.stamp_ns) == (
        seq, kind, stream, offset, length, fua, -5,
    )  # fmt: skip
    assert (rh.epoch, rh.journal_id, rh.written_seq, rh.synced_seq) == (
        3,
        42,
        written,
        written // 2,
    )
    assert rh.is_wrap == (kind == jc.KIND_WRAP) and rh.size == len(rec)
    whole = rec[: jc.REC_HEADER_LEN + len(data)]
    got = jc.record_data(whole, seq, len(data))
    assert got == data
    # A view of what was read, not a copy: the shipper reads every entry back, and a copy of
    # each 1 MiB record into fresh memory cost more than the read itself.
    assert isinstance(got, memoryview) and got.obj is whole
    assert jc.record_data(whole, seq + 1, len(data)) is None
    bad = bytearray(rec)
    bad[flip_at] ^= 0x01
    with pytest.raises(jc.BadRecord):
        jc.decode_record_head(bytes(bad))
    if data:
        bad = bytearray(whole)
        bad[-1] ^= 0x80
        assert jc.record_data(bytes(bad), seq, len(data)) is None  # the data CRC


def test_records_that_vouch_for_themselves_or_carry_data_they_should_not_are_refused() -> None:
    ok = {"journal_id": 1, "epoch": 1, "seq": 5}
    for bad in (
        jc.encode_record(kind=1, data=b"x", written_seq=5, **ok),  # vouches for itself
        jc.encode_record(kind=1, data=b"x", written_seq=2, synced_seq=3, **ok),  # synced > written
        jc.encode_record(kind=2, data=b"x", **ok),  # a ZERO with data
        jc.encode_record(kind=jc.KIND_WRAP, length=9, **ok),  # a marker with a length
        jc.encode_record(kind=7, **ok),  # an unknown kind
        jc.encode_record(kind=1, data=b"xy", length=3, **ok),  # WRITE length != data length
    ):
        with pytest.raises(jc.BadRecord):
            jc.decode_record_head(bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 9, 0, 0, 5), "kind"),
        ((0, 1, 0, 3, 4), "len"),
        ((0, 2, 0, 3, 3), "no data"),
        ((0, 3, 0, 0, None), "need a length"),
        ((1 << 32, 1, 0, 1, None), "stream"),
        ((0, 1, -1, 1, None), "range"),
        ((0, 2, U64, 0, 2), "range"),
    ],
)
def test_check_entry(args: tuple[int, int, int, int, int | None], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        jc.check_entry(*args)


def test_check_entry_and_placement() -> None:
    assert jc.check_entry(3, 1, 10, 4, None) == (jc.EntryKind.WRITE, 4)
    assert jc.check_entry(3, 3, 10, 0, 8192) == (jc.EntryKind.TRIM, 8192)
    cap = jc.MIN_CAPACITY
    assert jc.place_record(cap - 1024, 1024, cap) == cap - 1024  # fits exactly
    assert jc.place_record(cap - 1024, 1536, cap) == cap  # next lap
    assert jc.place_record(5 * cap + 512, 512, cap) == 5 * cap + 512
    assert jc.max_entry_bytes(cap) == cap // 2 - jc.REC_HEADER_LEN


# The layout of docs/format.md ("Journal file", "Header slot") as a second encoder: the
# header's framing moved to record_codec and its bytes must not have moved.
_DOCUMENTED = struct.Struct("<8sHHIQQQQIIQQQqI64sQ16s72s")


def _documented_encoding(h: jc.JournalHeader) -> bytes:
    body = _DOCUMENTED.pack(
        b"PVJRNL\0\0", 2, 0, 256, h.generation, h.journal_id, h.capacity, 8192, 512, h.epoch,
        h.tail_pos, h.tail_seq, h.applied_seq, h.created_ns, h.tail_epoch, h.group.encode(),
        h.synced_seq, h.boot_id, b"",
    )  # fmt: skip
    return (body + struct.pack("<I", crc32c.crc32c(body))).ljust(4096, b"\0")


@given(h=headers)
def test_header_bytes_are_the_documented_ones(h: jc.JournalHeader) -> None:
    assert jc.encode_header(h) == _documented_encoding(h)


def _set(slot: bytes, offset: int, value: bytes, *, reseal: bool = False) -> bytes:
    slot = slot[:offset] + value + slot[offset + len(value) :]
    if reseal:
        slot = slot[:252] + struct.pack("<I", crc32c.crc32c(slot[:252])) + slot[256:]
    return slot


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s[:100], "journal header slot is truncated (100 bytes)"),
        (lambda s: bytes(256) + s[256:], "journal header slot is blank (all zero)"),
        (lambda s: _set(s, 0, b"X"), "bad magic: not a pairvol journal header"),
        (lambda s: _set(s, 8, b"\x01"), "unsupported journal format version 1 (this is 2)"),
        (lambda s: _set(s, 12, struct.pack("<I", 64)), "journal header length 64 is not 256"),
        (lambda s: _set(s, 252, b"\0\0\0\0"), "bad CRC32C (stored 00000000, computed "),
        (lambda s: _set(s, 40, struct.pack("<Q", 4096), reseal=True),
         "unsupported ring layout (4096, 512)"),
        (lambda s: _set(s, 32, struct.pack("<Q", 4096), reseal=True),
         "journal capacity 4096 is invalid"),
        (lambda s: _set(s, 16, struct.pack("<Q", 0), reseal=True),
         "journal header positions are invalid"),
        (lambda s: _set(s, 92, b"\xff", reseal=True), "journal group field is not UTF-8"),
    ],
)  # fmt: skip
def test_header_reasons_are_worded_as_they_always_were(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    good = jc.encode_header(
        jc.JournalHeader(journal_id=5, capacity=1 << 20, group="g", created_ns=1)
    )
    bad = mutate(good)
    with pytest.raises(HeaderCorrupt) as e:
        jc.decode_header(bad)
    assert str(e.value).startswith(message)
    for a, b, name in ((bad, good, "A"), (good, bad, "B")):
        _h, notes = jc.choose_header(a, b)
        assert notes == [f"slot {name} damaged: {e.value}"]
    with pytest.raises(HeaderCorrupt) as both:
        jc.choose_header(bad, bytes(4096))
    assert str(both.value) == (
        f"no valid journal header slot (slot A: {e.value}; "
        "slot B: journal header slot is blank (all zero))"
    )


def test_header_slot_choice_and_write_order() -> None:
    h = jc.JournalHeader(journal_id=5, capacity=1 << 20, group="g", created_ns=1)
    newer = replace(h, generation=2, tail_seq=9)
    choice = jc.choose_header_slots(jc.encode_header(newer), jc.encode_header(h))
    assert choice.value == newer and jc.header_notes(choice) == ["slot B stale (generation 1 < 2)"]
    assert rc.next_write(choice) == rc.WritePlan((1, 0), 3)  # the stale slot first
    # Equal generations with other content (tampering): slot A is trusted, and the note is
    # the journal's old one.
    choice = jc.choose_header_slots(jc.encode_header(h), jc.encode_header(replace(h, epoch=7)))
    assert choice.value == h and jc.header_notes(choice) == ["slot B stale (generation 1 < 1)"]
    same = jc.choose_header_slots(jc.encode_header(h), jc.encode_header(h))
    assert jc.header_notes(same) == [] and rc.next_write(same).order == (0, 1)
