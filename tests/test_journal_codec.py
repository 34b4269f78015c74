"""The journal's pure codec (replicator.journal_codec): any bytes decode or raise the one error
of their decoder (HeaderCorrupt for a header slot, BadRecord for a record header), and what is
encoded decodes to the same thing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator import journal_codec as jc
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
    assert jc.record_data(whole, seq, len(data)) == data
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
