"""The host's status file: SPEC 3's flags, this host's and its peer's, for every pair.

Theory of operation.  The refresh machines (cluster/refresh.py) ask for every flag change
with a ``SaveFlags(pair, flags)`` action, and the agent's loop carries it out here before
the next action: :meth:`FlagsFile.set` reads the file, replaces the pair's line and writes
the next generation.  The file is a two-slot record (replicator/record_file.py; docs/format.md,
"Two-slot records") with its own magic ``PVFLAGS\\0``: each write goes to one slot, then the
other, each synced, so a writer killed at any moment leaves the old record or the new one and
never anything else; the newest valid slot wins on reading.

The payload is one JSON document::

    {"format": "pairvol.cluster-flags", "version": 1, "host": "a",
     "pairs": {"GROUP/PAIR": {"own": "A1", "peer": "0", "serial": 3, "peer_serial": 2,
                              "op": "split", "replica_started": false,
                              "cache_stale": false}}}

A file that cannot be read back (both slots damaged, a payload that is not such a document,
another host's file) is :class:`~replicator.errors.HeaderCorrupt` naming the file, never a
silent reset: the flags are the host's only memory of an interrupted exchange.  A file that
does not exist is a host that never saved a flag: every pair at rest (:func:`load`).

:func:`encode` and :func:`decode` are pure; the rest is the thin file adapter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final

from cluster.refresh import Flag, Op, PairFlags
from replicator import record_file
from replicator.errors import AlreadyExists, HeaderCorrupt, IllegalState, NotFound, UsageError
from replicator.record_codec import SlotCodec

FORMAT: Final = "pairvol.cluster-flags"
VERSION: Final = 1
#: 64 KiB slots: some 300 pairs per host (about 200 bytes a pair).
FLAGS_RECORD: Final = SlotCodec(b"PVFLAGS\0", 1, 65536, name="status flags")

_PAIR_KEYS: Final = frozenset(
    {"own", "peer", "serial", "peer_serial", "op", "replica_started", "cache_stale"}
)


@dataclass(frozen=True, slots=True)
class HostFlags:
    """What one host's status file holds: ``pairs`` maps a pair id to its flags (a pair
    with no entry is at rest)."""

    host: str
    pairs: Mapping[str, PairFlags] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host or not self.host.isprintable():
            raise UsageError(f"host name {self.host!r} is not a printable, non-empty string")
        for pair, flags in self.pairs.items():
            if not isinstance(pair, str) or not pair or not pair.isprintable():
                raise UsageError(f"pair id {pair!r} is not a printable, non-empty string")
            if not isinstance(flags, PairFlags):
                raise UsageError(f"pair {pair}: {flags!r} is not PairFlags")
        object.__setattr__(self, "pairs", MappingProxyType(dict(self.pairs)))

    def get(self, pair: str) -> PairFlags:
        return self.pairs.get(pair, PairFlags())

    def with_pair(self, pair: str, flags: PairFlags | None) -> HostFlags:
        """A copy with ``pair``'s line replaced (None: removed)."""
        pairs = dict(self.pairs)
        if flags is None:
            pairs.pop(pair, None)
        else:
            pairs[pair] = flags
        return replace(self, pairs=pairs)


# -- pure encoding ---------------------------------------------------------------------------


def encode(doc: HostFlags) -> bytes:
    pairs = {
        pair: {
            "own": f.own.value,
            "peer": f.peer.value,
            "serial": f.serial,
            "peer_serial": f.peer_serial,
            "op": f.op.value if f.op is not None else None,
            "replica_started": f.replica_started,
            "cache_stale": f.cache_stale,
        }
        for pair, f in sorted(doc.pairs.items())
    }
    body = {"format": FORMAT, "version": VERSION, "host": doc.host, "pairs": pairs}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def decode(payload: bytes, where: str) -> HostFlags:
    """The document in ``payload``; anything else is HeaderCorrupt naming ``where``."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise HeaderCorrupt(f"{where}: status flags are not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise HeaderCorrupt(f"{where}: status flags are not a JSON object")
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise HeaderCorrupt(
            f"{where}: format {doc.get('format')!r} version {doc.get('version')!r}; expected "
            f"{FORMAT!r} version {VERSION}"
        )
    if set(doc) != {"format", "version", "host", "pairs"} or not isinstance(doc["pairs"], dict):
        raise HeaderCorrupt(f"{where}: status flags have missing or unknown fields")
    try:
        pairs = {str(pair): _pair_flags(line) for pair, line in doc["pairs"].items()}
        return HostFlags(doc["host"], pairs)
    except (UsageError, ValueError, TypeError, KeyError) as e:
        raise HeaderCorrupt(f"{where}: status flags are invalid: {e}") from e


def _pair_flags(line: Any) -> PairFlags:
    if not isinstance(line, dict) or set(line) != _PAIR_KEYS:
        raise ValueError(f"a pair's flags are {sorted(_PAIR_KEYS)}, not {line!r}")
    for key in ("serial", "peer_serial"):
        if type(line[key]) is not int:
            raise ValueError(f"{key} {line[key]!r} is not an integer")
    op = line["op"]
    return PairFlags(
        own=Flag(line["own"]),
        peer=Flag(line["peer"]),
        serial=line["serial"],
        peer_serial=line["peer_serial"],
        op=None if op is None else Op(op),
        replica_started=line["replica_started"],
        cache_stale=line["cache_stale"],
    )


# -- the file --------------------------------------------------------------------------------


def read(path: str) -> tuple[HostFlags, str | None]:
    """The flags in ``path`` and a note when one slot was damaged or stale (None when both
    were good).  NotFound if there is no file; HeaderCorrupt (naming it) if it is damaged."""
    rec = record_file.read(path, FLAGS_RECORD)
    return decode(rec.payload, path), rec.note


def load(path: str, host: str) -> HostFlags:
    """``host``'s flags; a missing file is a host that never saved one (all at rest).  A file
    written for another host is HeaderCorrupt."""
    try:
        doc, _note = read(path)
    except NotFound:
        return HostFlags(host)
    return _own(doc, path, host)


def save(path: str, doc: HostFlags) -> None:
    """Write ``doc`` durably: the next generation of the record (a new record if none)."""
    payload = encode(doc)
    if os.path.exists(path):
        record_file.write(path, FLAGS_RECORD, payload)
    else:
        record_file.create(path, FLAGS_RECORD, payload)


class FlagsFile:
    """One host's status file, as the agent's loop uses it: :meth:`set` carries out a
    SaveFlags.  A change is a compare-and-swap on the record's generation (retried when
    another process of the host wrote in between), so two writers never undo each other's
    lines."""

    def __init__(self, path: str, host: str) -> None:
        self.path = path
        self.host = host

    def read(self) -> HostFlags:
        return load(self.path, self.host)

    def get(self, pair: str) -> PairFlags:
        return self.read().get(pair)

    def set(self, pair: str, flags: PairFlags) -> HostFlags:
        return self._change(pair, flags)

    def remove(self, pair: str) -> HostFlags:
        return self._change(pair, None)

    def _change(self, pair: str, flags: PairFlags | None) -> HostFlags:
        for _ in range(_CAS_TRIES):
            try:
                rec = record_file.read(self.path, FLAGS_RECORD)
            except NotFound:
                doc = HostFlags(self.host).with_pair(pair, flags)
                try:
                    record_file.create(self.path, FLAGS_RECORD, encode(doc))
                except AlreadyExists:
                    continue  # another writer created it first: read theirs
                return doc
            doc = _own(decode(rec.payload, self.path), self.path, self.host)
            doc = doc.with_pair(pair, flags)
            try:
                record_file.write(
                    self.path, FLAGS_RECORD, encode(doc), expected_generation=rec.generation
                )
            except IllegalState:
                continue  # written in between: start over from what is there now
            return doc
        raise IllegalState(f"{self.path}: status flags changed {_CAS_TRIES} times under us")


_CAS_TRIES: Final = 20


def _own(doc: HostFlags, path: str, host: str) -> HostFlags:
    if doc.host != host:
        raise HeaderCorrupt(f"{path}: status flags of host {doc.host!r}, not {host!r}")
    return doc
