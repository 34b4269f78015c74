"""``pair create``: the primary's command, and the secondary's side of it (PairCreate)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING, Any

from replicator import compression, wire
from replicator import pair_state as ps
from replicator.bitmap import Bitmap
from replicator.errors import AlreadyExists, IllegalState, UsageError
from replicator.groups import DEFAULT_HIGH_WATERMARK, DEFAULT_JOURNAL_SIZE, journal_path
from replicator.header import Role, check_name
from replicator.pair.display import describe
from replicator.pair.doc import PeerRef, SideDoc
from replicator.pair.names import pair_id, parse_peer_address
from replicator.pair.side import Side
from replicator.peer_link import PeerRefused
from replicator.volume import Volume

if TYPE_CHECKING:
    from replicator.pair.manager import PairManager
    from replicator.pair.volume_legs import VolumeLegs


class Creation:
    """Creates pairs on this node (as primary, or as secondary when a peer asks)."""

    def __init__(self, manager: PairManager) -> None:
        self.m = manager

    def op_create(self, args: dict[str, Any]) -> dict[str, Any]:
        group, pair = str(args["group"]), str(args["pair"])
        check_name(group, what="group name")
        check_name(pair, what="pair name")
        pid = pair_id(group, pair)
        mode = ps.Mode(str(args.get("mode", "sync")))
        fence = ps.Fence(str(args.get("fence", "never")))
        if mode is ps.Mode.ASYNC and fence is ps.Fence.DATA:
            raise UsageError("--fence data needs --mode sync (an async secondary always lags)")
        chunk = int(args.get("chunk", ps.DEFAULT_CHUNK))
        compress = compression.check_codec(args.get("compress") or compression.NONE)
        journal_size = int(args.get("journal_size") or DEFAULT_JOURNAL_SIZE)
        raw_high = args.get("high_watermark")
        high = DEFAULT_HIGH_WATERMARK if raw_high is None else float(raw_high)
        if not 0 < high <= 1:
            raise UsageError(f"--high-watermark {high * 100:g}% is not more than 0 and at most 100")
        volume = str(args["volume"])
        peer = PeerRef(
            str(args.get("peer_node", "")),
            str(args["peer_host"]),
            int(args["peer_port"]),
            str(args["peer_volume"]),
        )
        local = self.m.is_self(peer.host, peer.port)
        if local:
            peer.node = self.m.node_name
            if peer.volume == volume:
                raise UsageError(f"--primary and --secondary are the same volume ({volume})")
        with self.m.lock:
            if self.m.has_pair(pid):
                raise AlreadyExists(f"pair {pid} already exists on node {self.m.node_name}")
            legs = self._legs_for(volume, pid, group, Role.PRIMARY)
            members = [x for x in self.m.sides.values() if x.record.group == group]
            stream = 1 + max((x.stream for x in members), default=0)
            for x in members:
                if x.partner is not None and x.record.role is Role.SECONDARY:
                    continue  # the other half of one of this group's local pairs
                if x.record.mode is not mode or x.record.role is not Role.PRIMARY:
                    raise IllegalState(
                        f"group {group} holds {x.record.mode} pairs with this node as "
                        f"{x.record.role.label}: a group has one mode and one direction"
                    )
                if (x.doc.peer.host, x.doc.peer.port) != (peer.host, peer.port):
                    raise IllegalState(
                        f"group {group} replicates to {x.doc.peer.label()}: every pair of a "
                        "group has the same two nodes"
                    )
            diff_slot, copy_slot = legs.claim_slots(pid)
            record = ps.PairRecord(
                group,
                pair,
                Role.PRIMARY,
                mode,
                fence,
                peer.label(),
                chunk_size=chunk,
                auto_resync=bool(args.get("auto_resync", False)),
                diff_slot=diff_slot,
                copy_slot=copy_slot,
            )
            doc = SideDoc(
                record,
                volume,
                peer,
                max_rate=int(args.get("max_rate", 0)),
                stream=stream,
                journal_size=journal_size,
                high_watermark=high,
                compress=compress,
            )
            side = self._new_side(legs, doc)
            try:
                self._clear_bitmaps(side)
                h = side.volume.header
                create = wire.PairCreate(
                    pid,
                    peer.volume,
                    h.data_size,
                    chunk,
                    str(mode),
                    str(fence),
                    h.pvid,
                    0,
                    f"{self.m.listen}:{self.m.peer_port}",
                    h.block_size,
                    doc.max_rate,
                    doc.compress,
                )
                if local:
                    secondary = self.on_pair_create(self.m.node_name, create)
                    side.partner, secondary.partner = secondary, side
                else:
                    try:
                        side.request(create)
                    except PeerRefused as e:
                        raise IllegalState(f"the secondary refused the pair: {e.message}") from e
                    if side.client is not None and side.client.peer_name:
                        peer.node = side.client.peer_name
                self.m.sides[side.key] = side
                if mode is ps.Mode.ASYNC:
                    self.m.primary_group(side).start()
            except BaseException:
                self.m.sides.pop(side.key, None)
                side.close(release=True)
                raise
        try:
            # Connections opened while the volume was simplex now go through the pair; the
            # gate holds their writes until the copy's policy (mirror, journal) is in force.
            with side.gate.closed():
                self.m.rebind(side.volume.path)
                side.fire(ps.Create(), tell_peer=False)
        except BaseException:
            self.m.forget(side)
            raise
        return describe(side)

    def _legs_for(self, volume: str, pid: str, group: str, role: Role) -> VolumeLegs:
        """The volume a new pair uses, if it may (IllegalState otherwise): not one that
        cannot be loaded, not twice in one group, and receiving from one primary only."""
        path = self.m.volume_path(volume)
        real = os.path.realpath(path)
        if real in self.m.quarantine.broken:
            raise IllegalState(
                f"volume {volume} on {self.m.node_name}: {self.m.quarantine.broken[real]}"
            )
        existing = self.m.legs_for_path(real)
        if existing is not None:
            existing.check_may_join(pid, group, role)
        return self.m.open_legs(volume)

    def _new_side(self, legs: VolumeLegs, doc: SideDoc) -> Side:
        """The new leg's side; its claimed slots are released if it cannot be made."""
        try:
            return Side(self.m, doc, link_up=True)
        except BaseException:
            legs.unclaim(doc.record.name)
            raise

    def _clear_bitmaps(self, side: Side) -> None:
        """A new leg starts with empty bitmaps (its slots may hold a deleted leg's), and a
        volume's first leg with an empty activity log."""
        r = side.record
        for slot in (r.diff_slot, r.copy_slot):
            side.store.clear(slot)
        side.diff_map = Bitmap(side.data_size, r.chunk_size)
        side.copy_map = Bitmap(side.data_size, r.chunk_size)
        if len(side.legs.legs) == 1:
            side.al.clear()

    def on_pair_create(self, peer_name: str, msg: wire.PairCreate) -> Side:
        pid = msg.pair_id
        group, _, pair = pid.partition("/")
        with self.m.lock:
            if self.m.has_pair(pid):
                raise AlreadyExists(f"pair {pid} already exists on node {self.m.node_name}")
            path = self.m.volume_path(msg.volume)
            compression.check_codec(msg.compress, f"the secondary's node {self.m.node_name}")
            legs = self._legs_for(msg.volume, pid, group, Role.SECONDARY)
            with Volume.open(path) as v:
                if v.header.data_size != msg.data_size:
                    raise UsageError(
                        f"volume sizes differ: the primary has {msg.data_size} bytes, "
                        f"{msg.volume} on {self.m.node_name} has {v.header.data_size}"
                    )
                if v.header.block_size != msg.block_size:
                    raise UsageError(
                        f"block sizes differ: the primary's is {msg.block_size} bytes, "
                        f"{msg.volume} on {self.m.node_name} has {v.header.block_size}"
                    )
            host, port = parse_peer_address(msg.primary_peer, self.m.peer_port)
            peer = PeerRef(peer_name, host, port, "")
            record = ps.PairRecord(
                group,
                pair,
                Role.SECONDARY,
                ps.Mode(msg.mode),
                ps.Fence(msg.fence),
                peer.label(),
                chunk_size=msg.chunk_size,
            )
            members = [x for x in self.m.sides.values() if x.record.group == group]
            stream = 1 + max((x.stream for x in members), default=0)
            if not any(x.record.role is Role.SECONDARY for x in members):
                # A new group here: no receive journal of an earlier group of that name.
                stale = self.m.secondaries.pop(group, None)
                if stale is not None:
                    stale.stop()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(journal_path(self.m.directory, group, receive=True))
            diff_slot, copy_slot = legs.claim_slots(pid)
            record = dataclasses.replace(record, diff_slot=diff_slot, copy_slot=copy_slot)
            doc = SideDoc(
                record,
                msg.volume,
                peer,
                stream=stream,
                max_rate=msg.max_rate,
                compress=msg.compress,
            )
            side = self._new_side(legs, doc)
            try:
                self._clear_bitmaps(side)
                side.peer_pvid = msg.pvid
                side.doc.primary_pvid = msg.pvid
                self.m.sides[side.key] = side
                if record.mode is ps.Mode.ASYNC:
                    self.m.secondary_group(side)
                # Connections already open on the S-VOL are refused from now on, as new ones.
                with side.gate.closed():
                    self.m.rebind(side.volume.path)
                    side.fire(ps.Create(), tell_peer=False)
            except BaseException:
                self.m.sides.pop(side.key, None)
                side.close(release=True)
                self.m.rebind(path)
                raise
        return side
