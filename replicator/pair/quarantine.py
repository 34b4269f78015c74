"""What cannot be loaded, and what a crash left half done, at a node's start.

* A pair record that cannot be loaded (damaged, invalid, its bitmaps unreadable), or a volume
  labelled paired with no record that loads: its volume is served to nobody, cannot join
  another pair, and shows as corrupt until ``pair delete`` releases it.
* A record in SMPL: a delete interrupted after its record was written; it is finished.
* A corrupt group journal: salvaged (its pairs suspended, every chunk it may have held
  marked); an unreadable one takes only its own group offline.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

from replicator.atomic_file import fsync_dir, unlink_durably
from replicator.bitmap_store import BitmapStore
from replicator.errors import HeaderCorrupt, PairvolError
from replicator.header import Role
from replicator.journal import Journal, JournalCorrupt
from replicator.pair.activity_log import AL_SLOT
from replicator.pair.doc import SideDoc, doc_key
from replicator.pair.names import split_pair_id
from replicator.volume import Volume

if TYPE_CHECKING:
    from replicator.pair.manager import PairManager
    from replicator.pair.side import Side


class Quarantine:
    """The node's pairs and volumes that must not be served, and why."""

    def __init__(self, manager: PairManager) -> None:
        self.m = manager
        #: Volumes that belong to a pair which cannot be loaded (real path -> why).
        self.broken: dict[str, str] = {}
        #: Every such pair, for display.
        self.broken_pairs: list[dict[str, Any]] = []

    def _open_groups(self) -> None:
        """The journals of the async groups loaded.  A damaged journal takes only its own
        group's pairs out of service: a corrupt one is salvaged (its pairs suspended, every
        chunk it may have held marked for the resync); one whose header cannot be read at all
        makes the group's volumes unserved until an operator deletes its pairs."""
        for side in [s for s in self.m.sides.values() if s.is_async]:
            if side.key not in self.m.sides:
                continue  # its group was taken offline meanwhile
            try:
                self.m._load_async(side)
            except JournalCorrupt as e:
                self._salvage(side, e)
                self.m._load_async(side)
            except (HeaderCorrupt, OSError) as e:
                self._group_offline(side.record.group, side.record.role, e)

    def _journal_members(self, group: str, role: Role) -> list[Side]:
        return [
            s for s in self.m.sides.values() if s.record.group == group and s.record.role is role
        ]

    def _salvage(self, side: Side, e: JournalCorrupt) -> None:
        """Fold what a corrupt journal still shows into its pairs' difference bitmaps (the
        whole volume where a damaged record's extent is unknown), start the journal over
        after the highest sequence it ever named, and suspend the group's pairs."""
        sv = e.salvage
        members = self._journal_members(side.record.group, side.record.role)
        by_stream = {m.stream: m for m in members}
        unapplied = [x for x in sv.entries if x.seq > sv.applied_seq]
        for entry in unapplied:
            m = by_stream.get(entry.stream)
            if m is not None:
                m.mark_dirty(entry.offset, max(entry.length, 1))
        for region in sv.damaged:
            ext = region.extent
            if ext is not None and ext.stream in by_stream:
                by_stream[ext.stream].mark_dirty(ext.offset, max(ext.length, 1))
            else:  # what it held is unknown: every volume of the group, whole
                for m in members:
                    m.mark_dirty(0, m.data_size)
        next_seq = Journal.reset(sv.path)
        why = (
            f"{e}; {len(unapplied)} located entries and {len(sv.damaged)} damaged region(s) "
            "are marked for the next resync, the journal continues at sequence "
            f"{next_seq}"
        )
        if side.record.role is Role.PRIMARY:
            why += "; entries that were not yet on this node's volumes when it stopped are lost"
        self.m.log(f"group {side.record.group}: {why}")
        self.m.events.emit(
            "group.journal.corrupt",
            group=side.record.group,
            path=sv.path,
            first_bad_seq=sv.first_bad_seq,
            located=len(unapplied),
            damaged=len(sv.damaged),
            extent_unknown=sv.extent_unknown,
            next_seq=next_seq,
        )
        for m in members:
            m.suspend_for_disk(
                f"journal {sv.path} was corrupt (first bad sequence {sv.first_bad_seq})"
            )

    def _group_offline(self, group: str, role: Role, e: BaseException) -> None:
        """A group journal that cannot be read at all: that group's volumes are served to
        nobody, and its pairs show as corrupt; every other group goes on."""
        members = self._journal_members(group, role)
        for m in members:
            self.m.sides.pop(m.key, None)
            real = os.path.realpath(m.volume.path)
            reason = f"pair {m.id}: the journal of group {group} cannot be read: {e}"
            self.broken[real] = reason
            self.broken_pairs.append(
                {
                    "id": m.id,
                    "file": self.m.doc_path(m.key),
                    "volume": m.doc.volume,
                    "path": real,
                    "reason": reason,
                }
            )
            m.close()
        self.m.primaries.pop(group, None) if role is Role.PRIMARY else self.m.secondaries.pop(
            group, None
        )
        self.m.log(f"group {group} is offline: its journal cannot be read: {e}")
        self.m.events.emit("group.offline", group=group, reason=str(e))

    def _finish_delete(self, path: str, doc: SideDoc) -> None:
        """A record in SMPL: a delete was interrupted after its record was written.  Finish it
        (the new PVID, if one was due, went on the volume before the record did)."""
        vpath = self.m.volume_path(doc.volume)
        r = doc.record
        legs = self.m.legs_for_path(vpath)
        if legs is not None:  # the volume's other legs are loaded: they keep the log
            for slot in (r.diff_slot, r.copy_slot):
                legs.store.clear(slot)
            unlink_durably(path)  # its slots are an orphan claim now, released at start-up
            legs.label()
        else:
            with Volume.open(vpath, writable=True) as v:
                store = BitmapStore(v.fd, v.header)
                for slot in (r.diff_slot, r.copy_slot, AL_SLOT):
                    store.clear(slot)
                table = store.read_table()
                if table is not None and r.name in table.legs:
                    store.write_table(table.without(r.name))
                if v.header.role is not Role.SIMPLEX or v.header.pair:
                    v.update_info(role=Role.SIMPLEX, pair="")
            unlink_durably(path)
        self.m.log(f"pair {doc.record.name}: finished its delete, interrupted by a restart")
        self.m.events.emit("pair.deleted", pair=doc.record.name, finished_after_restart=True)

    def _mark_broken(self, path: str, doc: SideDoc | None, e: BaseException) -> None:
        key = doc_key(os.path.basename(path))
        parts = key.split("@")
        pid = doc.record.name if doc is not None else "/".join(parts[:2]) if len(parts) > 1 else key
        volume = doc.volume if doc is not None else None
        real = None
        if volume is not None:
            with contextlib.suppress(PairvolError, OSError):
                real = os.path.realpath(self.m.volume_path(volume))
        reason = f"pair {pid} cannot be loaded from {path}: {e}"
        self.m.log(reason)
        self.m.events.emit("pair.corrupt", pair=pid, file=path, reason=str(e))
        self.broken_pairs.append(
            {"id": pid, "file": path, "volume": volume, "path": real, "reason": reason}
        )
        if real is not None:
            self.broken[real] = reason

    def _find_orphans(self) -> None:
        """A volume whose header says it is paired, with no loaded side: its pair file is
        missing or damaged.  Nobody may use it under an identity we cannot vouch for."""
        for entry in sorted(os.scandir(self.m.directory), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            try:
                with Volume.open(entry.path) as v:
                    h = v.header
            except (PairvolError, OSError):
                continue
            real = os.path.realpath(entry.path)
            if h.role is Role.SIMPLEX or real in self.broken or self.m.legs_for_path(real):
                continue
            reason = (
                f"volume {h.name} is labelled {h.role.label} of pair {h.pair!r}, but no pair "
                "file loads it"
            )
            known = [b for b in self.broken_pairs if b["id"] == h.pair and b["path"] is None]
            if known:  # its record is there but unreadable: now we know its volume too
                known[0].update(volume=h.name, path=real)
                self.broken[real] = str(known[0]["reason"])
                continue
            self.m.log(reason)
            self.m.events.emit("pair.corrupt", pair=h.pair, volume=h.name, reason=reason)
            self.broken[real] = reason
            self.broken_pairs.append(
                {"id": h.pair, "file": None, "volume": h.name, "path": real, "reason": reason}
            )

    def release_broken(self, pid: str) -> list[dict[str, Any]]:
        """``pair delete`` of a pair that cannot be loaded: set its damaged file aside (never
        removed), give a volume that was a secondary a new PVID (it may carry its primary's),
        label the volume simplex, and serve it again."""
        out = []
        for b in [b for b in self.broken_pairs if b["id"] == pid]:
            if b["file"] is not None and os.path.exists(b["file"]):
                aside = f"{b['file']}.damaged-{int(time.time())}"
                os.replace(b["file"], aside)
                fsync_dir(os.path.dirname(aside))
                b["file"] = aside
            real = b["path"]
            row: dict[str, Any] = {"id": pid, "role": "?", "state": "SMPL", "pvid": "?"}
            if real is not None:
                row.update(self._release_volume(real))
                self.broken.pop(real, None)
                self.m.rebind(real)
            self.broken_pairs.remove(b)
            self.m.log(f"pair {pid}: released (its record was damaged; kept as {b['file']})")
            out.append({**row, "was": "corrupt", "kept": b["file"]})
        return out

    def _release_volume(self, real: str) -> dict[str, Any]:
        """The volume of a released pair: a new PVID if it was that pair's secondary (it may
        carry its primary's), and its VOL information without the pair.  A volume still in
        other pairs keeps them (their legs relabel it, their secondaries learn the PVID)."""
        legs = self.m.legs_for_path(real)
        if legs is not None:
            h = legs.volume.header
            row = {"role": h.role.label}
            if h.role is Role.SECONDARY and legs.receiving() is None:
                h = legs.volume.set_pvid(None)
                self.m.log(f"volume {h.name}: new PVID {h.pvid_hex} (was a secondary)")
                for side in legs.sides():
                    self.m.notify_soon(side)
            legs.label()
            return {**row, "pvid": legs.volume.header.pvid_hex}
        with Volume.open(real, writable=True) as v:
            row = {"role": v.header.role.label}
            if v.header.role is Role.SECONDARY:
                h = v.set_pvid(None)
                self.m.log(f"volume {h.name}: new PVID {h.pvid_hex} (was a secondary)")
            h = v.update_info(role=Role.SIMPLEX, pair="")
            return {**row, "pvid": h.pvid_hex}

    def _broken_named(self, target: str) -> list[dict[str, Any]]:
        group, pair = split_pair_id(target)
        return [
            b
            for b in self.broken_pairs
            if b["id"] == target or (pair is None and str(b["id"]).split("/")[0] == group)
        ]
