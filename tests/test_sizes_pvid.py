from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.errors import UsageError
from replicator.export_info import describe, parse_description, parse_export_name
from replicator.pvid import format_pvid, new_pvid, parse_pvid
from replicator.sizes import MAX_SIZE, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("64M", 64 << 20),
        ("64m", 64 << 20),
        ("64MiB", 64 << 20),
        ("10G", 10 << 30),
        ("1.5G", 3 << 29),
        ("512K", 512 << 10),
        ("1T", 1 << 40),
        (" 8M ", 8 << 20),
    ],
)
def test_parse_size_accepts(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0", "zero"),
        ("0M", "zero"),
        ("-5", "negative"),
        ("-64M", "negative"),
        ("abc", "not a size"),
        ("64X", "not a size"),
        ("", "not a size"),
        ("1.0000001K", "whole number"),
        ("2P", "maximum"),
        ("M", "not a size"),
    ],
)
def test_parse_size_refuses(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        parse_size(text)


@pytest.mark.parametrize(
    "text",
    [
        "\u0666\u0664M",  # Arabic-Indic 64
        "\u06f4\u06f0\u06f9\u06f6",  # Extended Arabic-Indic 4096
        "\uff16\uff14M",  # fullwidth 64
        "\u0968K",  # Devanagari 2
        "\U0001d7d2K",  # mathematical bold 4
        "1\u0665",  # mixed ASCII and Arabic-Indic
        "1.\u0665G",  # a non-ASCII fraction
        "\u00b2",  # superscript two
        "4\u00b2K",
        "\u2074M",  # superscript four
        "\u2464M",  # circled five
        "4\u212a",  # KELVIN SIGN, which a Unicode IGNORECASE takes for K
    ],
)
def test_parse_size_takes_only_ascii_digits_and_units(text: str) -> None:
    with pytest.raises(UsageError, match="not a size"):
        parse_size(text)


@given(st.integers(1, MAX_SIZE))
def test_format_then_parse_exact_sizes(n: int) -> None:
    text = format_size(n)
    if "." not in text:
        assert parse_size(text) == n


@given(st.integers(1, (1 << 64) - 1))
def test_pvid_text_round_trip(p: int) -> None:
    text = format_pvid(p)
    assert len(text) == 16 and text == text.lower()
    assert parse_pvid(text) == p
    assert parse_pvid(text.upper()) == p


@pytest.mark.parametrize(
    "bad", ["", "123", "00c5247772d2f36", "00c5247772d2f36b0", "0xc5247772d2f36b", "g" * 16]
)
def test_malformed_pvids_are_refused(bad: str) -> None:
    with pytest.raises(UsageError, match="malformed"):
        parse_pvid(bad)


def test_zero_pvid_is_reserved() -> None:
    with pytest.raises(UsageError, match="reserved"):
        parse_pvid("0" * 16)


def test_new_pvid_avoids_given_values_and_zero() -> None:
    seen = {new_pvid() for _ in range(1000)}
    assert len(seen) == 1000 and 0 not in seen
    assert new_pvid(avoid=seen) not in seen


@pytest.mark.parametrize(
    ("text", "name", "pvid"),
    [
        ("", None, None),
        ("vol1", "vol1", None),
        ("vol1@00c5247772d2f36b", "vol1", 0x00C5247772D2F36B),
        ("@00c5247772d2f36b", None, 0x00C5247772D2F36B),
    ],
)
def test_export_name_grammar(text: str, name: str | None, pvid: int | None) -> None:
    e = parse_export_name(text)
    assert (e.name, e.pvid) == (name, pvid)
    assert str(e) == text


@pytest.mark.parametrize("bad", ["vol1@", "vol1@xyz", "a/b@00c5247772d2f36b", "vol@" + "0" * 16])
def test_export_name_grammar_refuses(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_export_name(bad)


def test_description_round_trip() -> None:
    import uuid

    from replicator.header import Header

    h = Header.new(
        pvid=0xABC,
        name="data-1",
        data_size=1 << 20,
        block_size=512,
        created_ns=5,
        vol_uuid=uuid.UUID(int=3),
    ).next(pair="g/p")
    info = parse_description(describe(h))
    assert info.pvid == "0000000000000abc"
    assert (info.name, info.size, info.pair, info.generation) == ("data-1", 1 << 20, "g/p", 2)
