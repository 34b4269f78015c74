"""Pair and peer names: ``GROUP/PAIR`` ids and ``ADDR[:PORT]`` peer addresses (pure)."""

from __future__ import annotations

from replicator.errors import UsageError
from replicator.header import check_name


def pair_id(group: str, pair: str) -> str:
    return f"{group}/{pair}"


def split_pair_id(text: str) -> tuple[str, str | None]:
    """``GROUP`` or ``GROUP/PAIR``, names checked."""
    group, _, pair = text.partition("/")
    check_name(group, what="group name")
    if pair:
        check_name(pair, what="pair name")
        return group, pair
    if text.endswith("/"):
        raise UsageError(f"{text!r}: the pair name after '/' is empty")
    return group, None


def parse_peer_address(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise UsageError(f"{text!r}: {port!r} is not a TCP port")
    return host.strip("[]"), number
