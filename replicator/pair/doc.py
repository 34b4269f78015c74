"""The side's persisted document: ``DIR/.pairvol/pairs/GROUP@PAIR[@VOLUME].pair``.

It holds the pair record (the state machine's :class:`~replicator.pair_state.PairRecord`), the
local volume's name, the peer, and what the runtime must remember across a restart: copy
statistics, the copy bandwidth limit, the async stream number and journal settings, the
highest epoch the peer ever announced, and (on a secondary) the primary's PVID.

The file is a two-slot record (docs/format.md, "Two-slot records"): magic ``PVPAIR``, a
checksum and a generation per slot, the JSON document as payload; the newest valid slot
wins, so a write torn by a crash leaves the previous document.  A file of the old form
(``.json``, one JSON document, no checksum) is read once and rewritten in the new form.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from replicator import pair_state as ps
from replicator import record_file
from replicator.compression import CODECS
from replicator.errors import HeaderCorrupt
from replicator.record_codec import SlotCodec

PAIRS_DIR = os.path.join(".pairvol", "pairs")
DOC_FORMAT = "pairvol.pair"
DOC_SUFFIX = ".pair"
LEGACY_SUFFIX = ".json"
PAIR_RECORD = SlotCodec(b"PVPAIR\0\0", 1, 8192, name="pair record")


def doc_file_name(key: str) -> str:
    """``GROUP@PAIR[@VOLUME].pair``: no group, pair or volume name may contain '@' or '/', so
    two different pairs never share a file (``x.y/z`` and ``x/y.z`` once did)."""
    return key.replace("/", "@") + DOC_SUFFIX


def is_doc_file(name: str) -> bool:
    return not name.startswith(".") and name.endswith((DOC_SUFFIX, LEGACY_SUFFIX))


def doc_key(name: str) -> str:
    """The file's name without its suffix (``GROUP@PAIR[@VOLUME]``)."""
    return name.rsplit(".", 1)[0]


def save_doc(path: str, doc: SideDoc) -> None:
    """Write ``doc`` durably (the next generation of its record; a new record if none)."""
    payload = doc.to_json().encode()
    if os.path.exists(path):
        record_file.write(path, PAIR_RECORD, payload)
    else:
        record_file.create(path, PAIR_RECORD, payload)


def load_doc(path: str) -> tuple[SideDoc, str | None]:
    """The document at ``path`` and a note if one of its slots was damaged or stale."""
    if path.endswith(LEGACY_SUFFIX):
        with open(path, "rb") as f:
            return SideDoc.from_json(f.read().decode(errors="replace")), None
    rec = record_file.read(path, PAIR_RECORD)
    return SideDoc.from_json(rec.payload.decode(errors="replace")), rec.note


@dataclass
class PeerRef:
    node: str  # the peer's node name ("" until the handshake tells us)
    host: str
    port: int
    volume: str

    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def label(self) -> str:
        return f"{self.node or '?'}@{self.address()}"


@dataclass
class SideDoc:
    """What ``DIR/.pairvol/pairs/GROUP@PAIR.pair`` holds."""

    record: ps.PairRecord
    volume: str
    peer: PeerRef
    last_copy_bytes: int = 0
    last_copy_seconds: float = 0.0
    created: float = field(default_factory=time.time)
    max_rate: int = 0  # copy bandwidth limit in bytes per second; 0: none
    stream: int = 0  # this pair's stream number in its group's journal (async)
    journal_size: int = 0  # async primary: the group journal's capacity when created
    high_watermark: float = 0.8
    #: The highest epoch the peer ever announced (a takeover takes max(ours, this) + 1).
    peer_epoch: int = 0
    #: Secondary: the primary's PVID, which the volume carries while hidden (0: not known).
    primary_pvid: int = 0
    #: The highest cluster epoch an agent gave this side (``pair fence``/``unfence``).
    cluster_epoch: int = 0
    #: A cluster fence in force (client writes refused): its epoch and reason ("": none).
    hold_epoch: int = 0
    hold_reason: str = ""
    #: The cluster agent's watchdog (``pair watchdog``): the epoch it was armed at, 0 when
    #: disarmed.  Armed, client writes stop at the deadline the agent last set, which lives in
    #: memory only: a node that restarts with it armed refuses writes until it is set again.
    watchdog_epoch: int = 0
    #: SSWS after a takeover that pulls the old primary's final image (SPEC 4): once it is
    #: whole, swap back on its own, so the old primary becomes the secondary (issue 11, 5).
    reverse_after_pull: bool = False
    #: The codec of the pair's volume data on the link (none, zstd, lz4): both sides keep it.
    compress: str = "none"
    #: A takeover's ``--max-rate`` for its pull only (bytes/s, 0 unlimited); None: the
    #: pair's ``max_rate``.  Forgotten when the pull is done: the pair keeps its own rate.
    pull_rate: int | None = None
    #: The epoch at which this side's pull of the old primary's image ended (0: none).  At
    #: that epoch the old primary is fenced and has nothing this side lacks: a swap back
    #: while both are still there copies only what was written here (``Resync.peer_pulled``).
    pulled_epoch: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": DOC_FORMAT,
                "version": 1,
                "record": json.loads(self.record.to_json()),
                "volume": self.volume,
                "peer": {
                    "node": self.peer.node,
                    "host": self.peer.host,
                    "port": self.peer.port,
                    "volume": self.peer.volume,
                },
                "last_copy_bytes": self.last_copy_bytes,
                "last_copy_seconds": self.last_copy_seconds,
                "created": self.created,
                "max_rate": self.max_rate,
                "stream": self.stream,
                "journal_size": self.journal_size,
                "high_watermark": self.high_watermark,
                "peer_epoch": self.peer_epoch,
                "primary_pvid": self.primary_pvid,
                "cluster_epoch": self.cluster_epoch,
                "hold_epoch": self.hold_epoch,
                "hold_reason": self.hold_reason,
                "watchdog_epoch": self.watchdog_epoch,
                "reverse_after_pull": self.reverse_after_pull,
                "compress": self.compress,
                "pull_rate": self.pull_rate,
                "pulled_epoch": self.pulled_epoch,
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> SideDoc:
        try:
            doc = json.loads(text)
            if doc.get("format") != DOC_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            record = ps.PairRecord.from_json(json.dumps(doc["record"]))
            peer = doc["peer"]
            return cls(
                record,
                str(doc["volume"]),
                PeerRef(
                    str(peer["node"]), str(peer["host"]), int(peer["port"]), str(peer["volume"])
                ),
                int(doc["last_copy_bytes"]),
                float(doc["last_copy_seconds"]),
                float(doc["created"]),
                int(doc.get("max_rate", 0)),
                int(doc.get("stream", 0)),
                int(doc.get("journal_size", 0)),
                float(doc.get("high_watermark", 0.8)),
                int(doc.get("peer_epoch", 0)),
                int(doc.get("primary_pvid", 0)),
                int(doc.get("cluster_epoch", 0)),
                int(doc.get("hold_epoch", 0)),
                str(doc.get("hold_reason", "")),
                int(doc.get("watchdog_epoch", 0)),
                _flag(doc.get("reverse_after_pull", False)),
                _codec(doc.get("compress", "none")),
                _rate(doc.get("pull_rate")),
                int(doc.get("pulled_epoch", 0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HeaderCorrupt(f"pair file is damaged: {e}") from e


def _codec(value: object) -> str:
    if not isinstance(value, str) or value not in CODECS:
        raise ValueError(f"compress is {value!r}, not one of {', '.join(CODECS)}")
    return value


def _rate(value: object) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ValueError(f"pull_rate is {value!r}, not a rate in bytes/s or null")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"a flag is {value!r}, not true or false")
    return value
