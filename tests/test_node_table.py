"""The node table (replicator.node_table): parsing, loading, lookup, and the pair CLI over it."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator import node_table as nt
from replicator.errors import NotFound, UsageError
from replicator.node_table import NodeEntry, NodeTable, load_node_table, parse_node_table

GOOD = """\
# name  address[:peerport]  [dir]
east 198.18.0.1 /var/lib/pairvol/east
west 198.18.0.2:11000   # no local directory

   v6     [2001:db8::3]:11001 /srv/v6
bare 2001:db8::4
brak [2001:db8::5]
"""


def test_good_lines_comments_and_blank_lines() -> None:
    table = parse_node_table(GOOD, "nodes")
    assert table.names() == ["east", "west", "v6", "bare", "brak"]
    assert table.entries == (
        NodeEntry("east", "198.18.0.1", 10810, "/var/lib/pairvol/east"),
        NodeEntry("west", "198.18.0.2", 11000, None),
        NodeEntry("v6", "2001:db8::3", 11001, "/srv/v6"),
        NodeEntry("bare", "2001:db8::4", 10810, None),
        NodeEntry("brak", "2001:db8::5", 10810, None),
    )
    assert parse_node_table("", "nodes") == NodeTable("nodes")
    assert len(parse_node_table("# only a comment\n\n  \t\n", "nodes")) == 0
    assert parse_node_table("a 1.2.3.4#comment right after\r\n", "n").entries[0].host == "1.2.3.4"


def test_lookup() -> None:
    table = parse_node_table(GOOD, "/etc/pairvol/nodes")
    assert table.get("west") == table.lookup("west") and table.get("west") in table.entries
    assert "west" in table and "north" not in table and 3 not in table
    assert table.get("north") is None
    with pytest.raises(NotFound, match="'north' is not in the node table /etc/pairvol/nodes"):
        table.lookup("north")
    assert [e.name for e in table] == table.names() and len(table) == 5


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("east\n", 1, "expected NAME ADDR[:PEERPORT] [DIR], got 'east'"),
        ("# c\na 1.2.3.4 /d extra\n", 2, "expected NAME ADDR"),
        ("\n\neast not-an-ip\n", 3, "expected NAME ADDR"),
        ("a 1.2.3.4.5\n", 1, "expected NAME ADDR"),
        ("a [2001:db8::1\n", 1, "expected NAME ADDR"),
        ("a [2001:db8::1]x\n", 1, "expected NAME ADDR"),
        ("a [198.18.0.1]:80:81\n", 1, "'80:81' is not a TCP port"),
        ("a 1.2.3.4:0\n", 1, "'1.2.3.4:0': '0' is not a TCP port"),
        ("a 1.2.3.4:65536\n", 1, "'65536' is not a TCP port"),
        ("a 1.2.3.4:\n", 1, "'' is not a TCP port"),
        ("a 1.2.3.4:http\n", 1, "'http' is not a TCP port"),
        ("a [2001:db8::1]:\n", 1, "'' is not a TCP port"),
        ("a 1.2.3.4\nb 1.2.3.5\na 1.2.3.6\n", 3, "node 'a' is listed twice"),
    ],
)
def test_bad_line_is_one_usage_error_naming_it(text: str, line: int, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_node_table(text, "/etc/pairvol/nodes")
    shown = str(caught.value)
    assert shown.startswith(f"/etc/pairvol/nodes:{line}: ") and message in shown
    assert "\n" not in shown


def test_a_table_built_by_hand_refuses_duplicates() -> None:
    entry = NodeEntry("a", "1.2.3.4", 1, None)
    with pytest.raises(UsageError, match="'a' is listed twice"):
        NodeTable("mine", (entry, entry))


@given(st.text())
def test_any_text_parses_or_is_one_usage_error(text: str) -> None:
    try:
        table = parse_node_table(text, "t")
    except UsageError as e:
        assert str(e).startswith("t:")
    else:
        assert all(0 < e.peer_port < 65536 and nt.is_address(e.host) for e in table)


@given(st.ip_addresses(), st.integers(1, 65535))
def test_addresses_with_and_without_a_port(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    host = str(ip)
    with_port = f"[{host}]:{port}" if ip.version == 6 else f"{host}:{port}"
    assert nt.parse_address(with_port) == (host, port)
    assert nt.parse_address(host, 99) == (host, 99)
    assert nt.parse_address(f"[{host}]", 99) == (host, 99)


def test_default_peer_port_is_the_nodes() -> None:
    from replicator.node import PEER_PORT

    assert nt.DEFAULT_PEER_PORT == PEER_PORT


def test_loader_reads_the_named_file(tmp_path: Path) -> None:
    named, other = tmp_path / "nodes", tmp_path / "other"
    named.write_text("a 1.2.3.4\n")
    other.write_text("b 1.2.3.5\n")
    env = {"PAIRVOL_NODES": str(named)}
    assert load_node_table(environ=env).names() == ["a"]
    assert load_node_table(environ=env).source == str(named)
    assert load_node_table(str(other), environ=env).names() == ["b"]  # an argument wins


def test_missing_default_file_is_an_empty_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nt, "NODES_FILE", str(tmp_path / "absent"))
    assert len(load_node_table(environ={})) == 0
    assert len(load_node_table(environ={"PAIRVOL_NODES": ""})) == 0  # empty is unset
    (tmp_path / "absent").write_text("c 1.2.3.6\n")
    assert load_node_table(environ={}).names() == ["c"]


def test_a_named_missing_file_is_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(NotFound, match=f"node table {missing} does not exist"):
        load_node_table(environ={"PAIRVOL_NODES": str(missing)})
    with pytest.raises(NotFound, match="does not exist"):
        load_node_table(str(missing), environ={})


def test_unreadable_or_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"cannot read node table {tmp_path}: "):
        load_node_table(str(tmp_path))
    bad = tmp_path / "nodes"
    bad.write_bytes(b"a 1.2.3.4\nb\xff 1.2.3.5\n")
    with pytest.raises(UsageError, match=f"^{bad}:2: the node table is not UTF-8 text$"):
        load_node_table(str(bad))


def test_pair_cli_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pairvol.cli.pair import read_nodes, resolve_node

    table = tmp_path / "nodes"
    table.write_text(GOOD)
    monkeypatch.setenv("PAIRVOL_NODES", str(table))
    monkeypatch.setenv("PAIRVOL_LAB_ROOT", str(tmp_path / "no-labs"))
    nodes = read_nodes()
    assert nodes["east"].control == "/var/lib/pairvol/east/control.sock"
    assert (nodes["v6"].host, nodes["v6"].peer_port) == ("2001:db8::3", 11001)
    assert resolve_node("v6", None) == nodes["v6"]
    spec = resolve_node("[2001:db8::9]:11002", None)  # an address, not a name
    assert (spec.name, spec.host, spec.peer_port, spec.control) == ("", "2001:db8::9", 11002, None)
    table.write_text("east 198.18.0.1\nwest\n")
    with pytest.raises(UsageError, match=f"^{table}:2: expected"):
        resolve_node("east", None)
