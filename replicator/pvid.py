"""PVIDs: 64-bit volume identities, shown as 16 lowercase hex digits (as AIX prints them).

A new PVID comes from the operating system's CSPRNG.  Zero is reserved for "no PVID"; a new
PVID is also never equal to any PVID the caller says the volume has held before, so a volume
never gets an old identity back (docs/decisions.md, "PVID uniqueness").
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from replicator.errors import UsageError

NO_PVID = 0
_PVID_RE = re.compile(r"[0-9a-fA-F]{16}")


def format_pvid(pvid: int) -> str:
    return f"{pvid:016x}"


def parse_pvid(text: str) -> int:
    """Parse exactly 16 hex digits (either case); refuse the reserved all-zero PVID."""
    if not _PVID_RE.fullmatch(text):
        raise UsageError(f"PVID {text!r} is malformed; a PVID is exactly 16 hex digits")
    value = int(text, 16)
    if value == NO_PVID:
        raise UsageError("PVID 0000000000000000 is reserved and cannot be assigned")
    return value


def new_pvid(avoid: Iterable[int] = ()) -> int:
    """A fresh random PVID, never zero and never one of ``avoid``."""
    avoided = set(avoid)
    while True:
        value = int.from_bytes(os.urandom(8), "big")
        if value != NO_PVID and value not in avoided:
            return value
