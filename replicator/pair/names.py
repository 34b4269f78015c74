"""Pair and peer names: ``GROUP/PAIR`` ids and ``ADDR[:PORT]`` peer addresses (pure)."""

from __future__ import annotations

from replicator.errors import UsageError
from replicator.header import check_name
from replicator.node_table import parse_address


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
    """``ADDR[:PORT]`` (IPv6 as ``[ADDR]:PORT``): the node table's one parser."""
    return parse_address(text, default_port)
