"""A host's cached devices: the PVID-checked attach, the detach, the scan of one volume.

``pairvol host attach|detach|scan`` and the cluster agent (attaching a resource's devices
after a takeover, detaching them when it stops) share these.  The attach is the one place
where the cached PVID meets the volume: the server checks the export name's ``@PVID``
(:func:`cluster.probe.check_access`), never the disk here, so a stale cache fails with the
access error (SPEC 3) instead of attaching a volume whose identity changed.

A lab host's teardown (:mod:`pairvol.lab`) uses :func:`detach_all` while its helpers still
run and :func:`release_loops` after they were killed: the caches of a directory are found
by their attachments' working directories, ``BASE.attach/NAME`` beside ``BASE.json``.
"""

from __future__ import annotations

import glob
import os
import time

from cluster import blockdev
from cluster.probe import check_access, parse_uri, probe
from cluster.pvid_cache import Attachment, CacheEntry, CacheFile, check_device_name
from replicator.errors import IllegalState, PairvolError

ATTACH_SUFFIX = ".attach"


def attach_state_dir(store: CacheFile, name: str) -> str:
    """Per-device working directory for attachments, beside the cache file."""
    base = os.path.splitext(os.path.basename(store.path))[0]
    return os.path.join(store.directory, f"{base}{ATTACH_SUFFIX}", name)


def _attach_dirs(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(directory), f"*{ATTACH_SUFFIX}")))


def detach_all(directory: str) -> tuple[list[str], list[str]]:
    """Detach every device attached by the caches in ``directory``: (what was done, what
    failed).  Best effort: a failure (a device still mounted) is reported, not raised."""
    done: list[str] = []
    failed: list[str] = []
    for attach_dir in _attach_dirs(directory):
        path = attach_dir.removesuffix(ATTACH_SUFFIX) + ".json"
        if not os.path.exists(path):
            continue
        store = CacheFile(path)
        try:
            attached = [n for n, e in store.read().entries.items() if e.attachment is not None]
        except PairvolError as e:
            failed.append(f"{path}: {e}")
            continue
        for name in sorted(attached):
            try:
                att, _ = detach(store, name)
                done.append(f"detached {name} ({att.device or '?'})")
            except PairvolError as e:
                failed.append(f"{name}: {e}")
    return done, failed


def release_loops(directory: str) -> tuple[list[str], list[str]]:
    """Once the helpers of the caches in ``directory`` are dead (killed with their lab host),
    detach each loop device their attachments set up whose binding is still in place
    (:func:`cluster.blockdev.release_loop`): (what was done, what failed).  Nothing else
    would ever detach them: the kernel keeps a loop device bound to a dead FUSE file."""
    done: list[str] = []
    failed: list[str] = []
    for attach_dir in _attach_dirs(directory):
        for state_dir in sorted(glob.glob(os.path.join(glob.escape(attach_dir), "*"))):
            try:
                done += blockdev.release_loop(state_dir)
            except PairvolError as e:
                failed.append(f"{os.path.basename(state_dir)}: {e}")
    return done, failed


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
