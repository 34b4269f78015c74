"""A host's cached devices: the PVID-checked attach, the detach, the scan of one volume.

``pairvol host attach|detach|scan`` and the cluster agent (attaching a resource's devices
after a takeover, detaching them when it stops) share these.  The attach is the one place
where the cached PVID meets the volume: the server checks the export name's ``@PVID``
(:func:`cluster.probe.check_access`), never the disk here, so a stale cache fails with the
access error (SPEC 3) instead of attaching a volume whose identity changed.
"""

from __future__ import annotations

import os
import time

from cluster import blockdev
from cluster.probe import check_access, parse_uri, probe
from cluster.pvid_cache import Attachment, CacheEntry, CacheFile, check_device_name
from replicator.errors import IllegalState, PairvolError


def attach_state_dir(store: CacheFile, name: str) -> str:
    """Per-device working directory for attachments, beside the cache file."""
    base = os.path.splitext(os.path.basename(store.path))[0]
    return os.path.join(store.directory, f"{base}.attach", name)


def attach(store: CacheFile, name: str, *, method: str | None = None) -> CacheEntry:
    """Attach cached device ``name`` as a block device, PVID-checked; its entry after."""
    attached: Attachment | None = None
    try:
        with store.update() as cache:
            entry = cache.get(name)
            if entry.attachment is not None:
                raise IllegalState(
                    f"{name} is already attached as {entry.attachment.device or '?'}; "
                    "detach it first"
                )
            uri = parse_uri(entry.uri)
            check_access(uri, entry.pvid, f"device {name!r} ({entry.uri})")
            attached = blockdev.attach(
                uri.with_export(entry.export, entry.pvid),
                state_dir=attach_state_dir(store, name),
                now_ns=time.time_ns(),
                method=method,
                block_size=entry.vol.block_size,
            )
            return cache.set_attachment(name, attached)
    except BaseException as e:
        if attached is not None:
            _undo_unrecorded(store, name, attached, e)
        raise


def _undo_unrecorded(store: CacheFile, name: str, att: Attachment, error: BaseException) -> None:
    """Attached, but saving the cache failed: undo it, or nothing would know to detach it."""
    try:
        recorded = store.read().entries.get(name)
        if recorded is None or recorded.attachment != att:
            blockdev.detach(att)
    except PairvolError as cleanup:
        error.add_note(f"undoing the attach of {att.device} also failed: {cleanup}")


def detach(store: CacheFile, name: str) -> tuple[Attachment, list[str]]:
    """Undo the attach of ``name``: (the attachment it had, the steps taken)."""
    with store.update() as cache:
        entry = cache.get(name)
        att = entry.attachment
        if att is None:
            raise IllegalState(f"{name} is not attached")
        steps = blockdev.detach(att)
        cache.set_attachment(name, None)
    return att, steps


def record(store: CacheFile, name: str, export_uri: str) -> CacheEntry:
    """Read the PVID and VOL information of the volume at ``export_uri`` straight from it and
    store them as device ``name`` (a scan of one volume under a given name)."""
    check_device_name(name)
    found = probe(parse_uri(export_uri))
    entry = CacheEntry(uri=str(found.uri), export=found.info.name, vol=found.info,
                       scanned_ns=time.time_ns())  # fmt: skip
    with store.update() as cache:
        cache.record_scan(name, entry)
        return cache.get(name)
