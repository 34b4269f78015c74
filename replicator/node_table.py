"""The node table: which storage nodes there are and where they listen for their peers.

Like horcm.conf's HORCM_INST, the table is a text file with one node per line::

    # NAME   ADDR[:PEERPORT]        [DIR]
    east     198.18.0.1             /var/lib/pairvol/east
    west     198.18.0.2:11000
    north    [2001:db8::3]:11000

``ADDR`` is an IP address (an IPv6 address with a port goes in brackets), ``PEERPORT``
defaults to :data:`DEFAULT_PEER_PORT`, and ``DIR`` is the node's directory when the node runs
on this machine.  ``#`` starts a comment; blank lines are ignored.  A name is listed once.

The file is ``$PAIRVOL_NODES``, or /etc/pairvol/nodes when that is unset.  A missing default
file is an empty table (most machines have none); a file that ``$PAIRVOL_NODES`` names must
exist, or a typo would quietly empty the table.

:func:`parse_node_table` and the address helpers do no I/O; :func:`load_node_table` reads the
file and hands its text to them.  Every error is one line: a bad line is a
:class:`~replicator.errors.UsageError` naming the file and the line number.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from replicator.errors import NotFound, UsageError

NODES_ENV = "PAIRVOL_NODES"
NODES_FILE = "/etc/pairvol/nodes"
#: replicator.node.PEER_PORT (a test keeps them equal); repeated here so that reading the
#: table needs none of the node's machinery.
DEFAULT_PEER_PORT = 10810
_LINE_FORM = "NAME ADDR[:PEERPORT] [DIR]"


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """One line of the table."""

    name: str
    host: str  # an IP address, without brackets
    peer_port: int
    dir: str | None  # the node's directory when it runs on this machine


@dataclass(frozen=True, slots=True)
class NodeTable:
    """The nodes of one table file, in file order, each name once."""

    source: str  # the file it was read from
    entries: tuple[NodeEntry, ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for entry in self.entries:
            if entry.name in seen:
                raise UsageError(f"{self.source}: node {entry.name!r} is listed twice")
            seen.add(entry.name)

    def get(self, name: str) -> NodeEntry | None:
        return next((e for e in self.entries if e.name == name), None)

    def lookup(self, name: str) -> NodeEntry:
        """The node called ``name`` (NotFound if the table does not list it)."""
        entry = self.get(name)
        if entry is None:
            raise NotFound(f"node {name!r} is not in the node table {self.source}")
        return entry

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __contains__(self, name: object) -> bool:
        return any(e.name == name for e in self.entries)

    def __iter__(self) -> Iterator[NodeEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _split_address(text: str) -> tuple[str, str | None] | None:
    """``(host, port text or None)`` when ``text`` is ``IP``, ``[IP]``, ``IP:PORT`` or
    ``[IP]:PORT``; None when it is no address at all.  The port is not checked here."""
    port: str | None
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close:
            return None
        if not rest:
            port = None
        elif rest.startswith(":"):
            port = rest[1:]
        else:
            return None
    elif text.count(":") == 1:  # IPv4:PORT; a bare IPv6 address has two colons or more
        host, _, port = text.partition(":")
    else:
        host, port = text, None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, port


def is_address(text: str) -> bool:
    """Whether ``text`` has the form of ``ADDR[:PORT]`` (the port may still be out of range)."""
    return _split_address(text) is not None


def parse_address(text: str, default_port: int = DEFAULT_PEER_PORT) -> tuple[str, int]:
    """``ADDR[:PORT]`` as ``(host, port)``; a UsageError when it is not an IP address or the
    port is not 1 to 65535."""
    split = _split_address(text)
    if split is None:
        raise UsageError(
            f"{text!r} is not an IP address (an IPv6 address with a port: [ADDR]:PORT)"
        )
    host, port = split
    if port is None:
        return host, default_port
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise UsageError(f"{text!r}: {port!r} is not a TCP port")
    return host, number


def parse_node_table(text: str, source: str) -> NodeTable:
    """The table in ``text``; ``source`` (the file's name) starts every error message."""
    entries: list[NodeEntry] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) not in (2, 3) or not is_address(words[1]):
            raise UsageError(f"{source}:{number}: expected {_LINE_FORM}, got {raw!r}")
        try:
            host, port = parse_address(words[1])
        except UsageError as e:
            raise UsageError(f"{source}:{number}: {e}") from None
        if words[0] in seen:
            raise UsageError(f"{source}:{number}: node {words[0]!r} is listed twice")
        seen.add(words[0])
        entries.append(NodeEntry(words[0], host, port, words[2] if len(words) == 3 else None))
    return NodeTable(source, tuple(entries))


def node_table_path(environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """``(path, named)``: the table's file, and whether ``$PAIRVOL_NODES`` named it."""
    named = (os.environ if environ is None else environ).get(NODES_ENV)
    return (named, True) if named else (NODES_FILE, False)


def load_node_table(path: str | None = None, environ: Mapping[str, str] | None = None) -> NodeTable:
    """Read the table from ``path``, else ``$PAIRVOL_NODES``, else /etc/pairvol/nodes.

    Only the default file may be missing (an empty table); a missing file that was named is
    NotFound, an unreadable one or one that is not UTF-8 is a UsageError."""
    source, named = (path, True) if path else node_table_path(environ)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        if named:
            raise NotFound(f"node table {source} does not exist") from e
        return NodeTable(source)
    except OSError as e:
        raise UsageError(f"cannot read node table {source}: {e.strerror}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UsageError(f"{source}:{line}: the node table is not UTF-8 text") from None
    return parse_node_table(text, source)
