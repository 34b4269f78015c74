"""What an NBD export says about its volume: the export-name grammar and the description.

Both ends use this module, so the storage end (the plugin) and the host end (the PVID cache)
can never disagree about the format.

Export names follow ``[NAME][@PVID]``.  When a PVID is given, the server refuses the connection
unless the volume's on-disk PVID equals it: SPEC section 1's access check at the storage end.

The export description is one line of ``key=value`` words after the word ``pairvol``, e.g.::

    pairvol name=vol1 pvid=00c5247772d2f36b uuid=... size=67108864 block_size=4096
    generation=3 role=simplex pair=- created_ns=1790000000000000000

Values never contain spaces (names are checked by :func:`replicator.header.check_name`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from replicator.errors import ProtocolError, UsageError
from replicator.header import Header, Role, check_name
from replicator.pvid import format_pvid, parse_pvid

DESCRIPTION_PREFIX = "pairvol"


@dataclass(frozen=True, slots=True)
class ExportName:
    name: str | None
    pvid: int | None

    def __str__(self) -> str:
        return (self.name or "") + (f"@{format_pvid(self.pvid)}" if self.pvid else "")


def parse_export_name(text: str) -> ExportName:
    """Parse ``[NAME][@PVID]``; raise :class:`UsageError` naming what is wrong."""
    name, at, pvid_text = text.partition("@")
    if at and not pvid_text:
        raise UsageError(f"export name {text!r} has '@' but no PVID after it")
    pvid = parse_pvid(pvid_text) if at else None
    if name:
        check_name(name, what="export name")
    return ExportName(name or None, pvid)


@dataclass(frozen=True, slots=True)
class VolInfo:
    """PVID and VOL information as read from a served volume (the host cache stores this)."""

    name: str
    pvid: str
    uuid: str
    size: int
    block_size: int
    generation: int
    role: str
    pair: str | None
    created_ns: int

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "pvid": self.pvid,
            "uuid": self.uuid,
            "size": self.size,
            "block_size": self.block_size,
            "generation": self.generation,
            "role": self.role,
            "pair": self.pair,
            "created_ns": self.created_ns,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> VolInfo:
        try:
            return cls(
                name=str(d["name"]),
                pvid=format_pvid(parse_pvid(str(d["pvid"]))),
                uuid=str(uuid.UUID(str(d["uuid"]))),
                size=int(str(d["size"])),
                block_size=int(str(d["block_size"])),
                generation=int(str(d["generation"])),
                role=str(d["role"]),
                pair=None if d.get("pair") in (None, "", "-") else str(d["pair"]),
                created_ns=int(str(d["created_ns"])),
            )
        except (KeyError, ValueError, UsageError) as e:
            raise ProtocolError(f"malformed volume information: {e}") from e

    @classmethod
    def from_header(cls, h: Header) -> VolInfo:
        return cls(
            name=h.name,
            pvid=h.pvid_hex,
            uuid=str(h.uuid),
            size=h.data_size,
            block_size=h.block_size,
            generation=h.generation,
            role=Role(h.role).label,
            pair=h.pair or None,
            created_ns=h.created_ns,
        )


def describe(h: Header) -> str:
    """The export description the plugin sends for a volume."""
    info = VolInfo.from_header(h).to_json()
    words = [DESCRIPTION_PREFIX]
    for key, value in info.items():
        words.append(f"{key}={'-' if value is None else value}")
    return " ".join(words)


def parse_description(text: str) -> VolInfo:
    """Inverse of :func:`describe`; a description from anything else is a ProtocolError."""
    words = text.split()
    if not words or words[0] != DESCRIPTION_PREFIX:
        raise ProtocolError(f"export description {text!r} is not from a pairvol server")
    fields: dict[str, object] = {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq:
            raise ProtocolError(f"export description word {word!r} is not key=value")
        fields[key] = value
    return VolInfo.from_json(fields)
