"""The local half of one pair: the pure state machine plus what it needs to act.

A side is one *leg* of its volume (:mod:`~replicator.pair.volume_legs`: a volume may be in
several pairs, and the open image, the bitmap store, the activity log and the client write
path are the volume's).  The side owns its persistent difference and copy bitmaps (the slots
the volume's slot table gives it), a client to the peer node and, while copying, a copy
engine.  The machine
decides *what* may happen (``docs/state-machines.md``); :meth:`Side.fire` feeds it an event
and :meth:`Side._carry_out` carries out every action it returns, exhaustively (a new action
type that is not handled fails the type check).  The parts of a side live next to it:
:mod:`~replicator.pair.client_io` (client writes), :mod:`~replicator.pair.replica` (what the
peer sends a secondary), :mod:`~replicator.pair.exchange` (the state exchange with the peer).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import assert_never

from replicator import faults, wire
from replicator import pair_state as ps
from replicator.bitmap import Bitmap
from replicator.errors import IllegalState, PairvolError
from replicator.events import EventLog
from replicator.gate import ChunkLocks, Gate
from replicator.header import Role
from replicator.journal import EntryKind
from replicator.pair.copy_control import CopyControl
from replicator.pair.copy_engine import CopyEngine
from replicator.pair.doc import SideDoc, save_doc
from replicator.pair.exchange import StateExchange
from replicator.pair.host import REQUEST_TIMEOUT, SideHost
from replicator.pair.pull import PullEngine
from replicator.pair.replica import Replica
from replicator.peer_link import PeerClient, PeerRefused


class Side:
    """The local half of one pair (see the module docstring)."""

    def __init__(self, host: SideHost, doc: SideDoc, *, link_up: bool) -> None:
        self.host = host
        self.doc = doc
        self.id = doc.record.name
        self.log = host.log
        self.clock = host.clock
        self.machine = ps.PairMachine(
            doc.record,
            self.clock(),
            heartbeat_interval=host.heartbeat_interval,
            heartbeat_timeout=(
                host.async_link_timeout
                if doc.record.mode is ps.Mode.ASYNC
                else host.heartbeat_timeout
            ),
            link_up=link_up,
        )
        self.state_lock = threading.RLock()
        self.restore_lock = threading.Lock()
        self.bitmap_lock = threading.Lock()
        self.gate = Gate()
        #: Orders a client write's acknowledgement against ``pair fence`` (pair/hold.py).
        self.ack_lock = threading.Lock()
        #: The watchdog's deadline (monotonic; 0: expired or never set since the node
        #: started), meaningful while ``doc.watchdog_epoch`` is set (pair/hold.py).
        self.watchdog_deadline = 0.0
        self.chunk_locks = ChunkLocks()
        self.legs = host.open_legs(doc.volume)
        self.volume = self.legs.volume
        h = self.volume.header
        self.data_size = h.data_size
        self.data_offset = h.data_offset
        self.chunk_size = doc.record.chunk_size
        self.store = self.legs.store
        self.al = self.legs.al
        r = doc.record
        try:
            self.diff_map = self.store.load(r.diff_slot, self.chunk_size)
            self.copy_map = self.store.load(r.copy_slot, self.chunk_size)
            self.legs.attach(self)
        except BaseException:
            if not self.legs.legs:
                self.legs.close()
            raise
        self.engine: CopyEngine | PullEngine | None = None
        self.peer_pvid: int | None = None
        self.fetched: Bitmap | None = None
        self.client: PeerClient | None = None
        self.bulk: PeerClient | None = None  # the peer's bulk connection (a pull's pieces)
        self.progress_bytes = 0
        self.copy_started: float | None = None
        self.deleted = False
        # A local pair (both volumes on this node): the other side, reached in-process.
        self.partner: Side | None = None
        self.link_trouble_logged = -1e9
        self.copy_kind: ps.CopyKind | None = None
        self.drain_cut: int | None = None
        #: Why the volume is damaged (a truncated image): then nobody is served.
        self.damaged: str | None = None
        self.replica = Replica(self)
        self.exchange = StateExchange(self)
        self.copies = CopyControl(self)

    # -- small helpers ------------------------------------------------------------------------

    @property
    def record(self) -> ps.PairRecord:
        return self.machine.record

    @property
    def local(self) -> bool:
        return self.host.is_self(self.doc.peer.host, self.doc.peer.port)

    @property
    def key(self) -> str:
        """Where the manager files this side: the pair id, plus the volume for a local pair
        (whose two sides share the id)."""
        return f"{self.id}@{self.doc.volume}" if self.local else self.id

    @property
    def events(self) -> EventLog:
        return self.host.events

    @property
    def max_rate(self) -> int:
        return self.doc.max_rate

    @property
    def pull_rate(self) -> int:
        """The pull's limit: the takeover's ``--max-rate``, or else the pair's."""
        return self.doc.max_rate if self.doc.pull_rate is None else self.doc.pull_rate

    @property
    def is_async(self) -> bool:
        return self.record.mode is ps.Mode.ASYNC

    @property
    def stream(self) -> int:
        return self.doc.stream

    def peer_client(self) -> PeerClient:
        if self.client is None:
            p = self.doc.peer
            self.client = self.host.client_for(p.host, p.port, p.node)
        return self.client

    def request(self, msg: wire.Message, timeout: float = REQUEST_TIMEOUT) -> wire.Message:
        if self.partner is not None:
            return self.host.deliver_local(self.partner, msg)
        return _answer(self.peer_client().request(msg, timeout=timeout))

    def bulk_client(self) -> PeerClient:
        if self.bulk is None:
            p = self.doc.peer
            self.bulk = self.host.client_for(p.host, p.port, p.node, bulk=True)
        return self.bulk

    def takes_entries(self) -> bool:
        """Whether the peer takes Entries frames (both Hellos offered the feature; a local
        partner always does).  Connects if there is no connection yet."""
        if self.partner is not None:
            return True
        return self.peer_client().agreed(wire.FEATURE_ENTRIES, REQUEST_TIMEOUT)

    def send(
        self, msg: wire.Message, timeout: float = REQUEST_TIMEOUT, *, bulk: bool = False
    ) -> Callable[[], wire.Message]:
        """Send ``msg`` now; the call returned collects the answer (as :meth:`request`
        returns or raises it).  A local partner answers at once.  ``bulk``: on the peer's
        bulk connection, behind nothing that must be quick."""
        if self.partner is not None:
            reply = self.host.deliver_local(self.partner, msg)
            return lambda: reply
        client = self.bulk_client() if bulk else self.peer_client()
        pending = client.send(msg, timeout=timeout)
        return lambda: _answer(pending.result())

    def save(self) -> None:
        self.doc.record = self.machine.record
        if self.deleted:
            return
        save_doc(self.host.doc_path(self.key), self.doc)

    def pvid_changed(self) -> None:
        """Open connections check the PVID they were opened for again, and the secondaries
        of the volume's other legs learn it (a hidden secondary carries its primary's)."""
        self.host.rebind(self.volume.path)
        for leg in self.legs.forward_legs(self):
            self.host.notify_soon(leg)

    def check_image(self) -> bool:
        """The image file still holds the whole data area its header describes.  A truncated
        image is damage: the pair suspends (DiskError) and the volume is served to nobody.
        Mirrored writes would otherwise extend the file again and hide the loss."""
        if self.damaged is not None:
            return False
        size = os.fstat(self.volume.fd).st_size
        need = self.data_offset + self.data_size
        if size >= need:
            return True
        self.damaged = f"the image {self.volume.path} is {size} bytes, its header needs {need}"
        self.log(f"pair {self.id}: {self.damaged}: suspending and serving it to nobody")
        self.events.emit("pair.damaged", pair=self.id, reason=self.damaged)
        self.host.rebind(self.volume.path)
        self.try_fire(ps.DiskError(self.damaged[: wire.TEXT_MAX]), tell_peer=True)
        return False

    def flush_copy_map(self) -> None:
        with self.bitmap_lock:
            self.store.flush(self.record.copy_slot, self.copy_map)

    def mark_dirty(self, offset: int, length: int) -> None:
        self.mark_dirty_all(((offset, length),))

    def mark_dirty_all(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Mark every ``(offset, length)`` in the difference bitmap, then make it durable
        once (a fold of a journal's backlog: one write of the bitmap, not one per chunk)."""
        with self.bitmap_lock:
            changed = False
            for offset, length in ranges:
                if self.diff_map.mark(offset, length):
                    changed = True
            if changed:
                self.store.flush(self.record.diff_slot, self.diff_map)

    def my_state(self) -> wire.PairState:
        r = self.record
        return wire.PairState(self.id, str(r.state), r.role.label, self.volume.header.pvid, r.epoch)

    def readable(self) -> bool:
        return self.machine.read_decision() is not ps.ReadDecision.REFUSE_HIDDEN

    def fold_extents(self, extents: list[int], extent_size: int) -> None:
        """At start-up: activity-log extents (writes that were in flight) into this leg's
        difference bitmap, durably."""
        per = max(1, extent_size // self.chunk_size)
        with self.bitmap_lock:
            for e in extents:
                first = e * per
                count = min(per, self.diff_map.nchunks - first)
                if count > 0:
                    self.diff_map.set_range(first, count)
            self.store.flush(self.record.diff_slot, self.diff_map)

    # -- firing events and carrying out actions ------------------------------------------------

    def fire(self, event: ps.Event, *, tell_peer: bool = True) -> None:
        """Feed one event; carry out its actions.  Peer notifications go out after the state
        lock is released (the peer may call back); ``tell_peer=False`` when the caller has
        already told the peer.  A swap that would make the volume receive from a second
        primary is refused first (IllegalState)."""
        with self.state_lock:
            if isinstance(event, ps.Resync) and event.swap and self.record.role is Role.PRIMARY:
                self.legs.check_may_receive(self)
            actions = self.machine.handle(event, self.clock())
            later = self._carry_out(actions)
        self.host.timer_changed()
        self._after(later, tell_peer)

    def try_fire(self, event: ps.Event, *, tell_peer: bool = True) -> bool:
        """Fire a *fact* (an engine report, a link, disk or journal event) that the machine
        may refuse in the state it is in now; a refusal is logged with its reason, never
        silently dropped.  False if refused."""
        try:
            self.fire(event, tell_peer=tell_peer)
        except IllegalState as e:
            self.log(f"pair {self.id}: {type(event).__name__} not taken: {e}")
            return False
        return True

    def _after(self, later: list[ps.Action], tell_peer: bool) -> None:
        for a in later:
            if isinstance(a, ps.SendPairState):
                if tell_peer:
                    self.exchange.notify_peer()
            elif isinstance(a, ps.StartCopy):
                self.copies.start_engine()
            elif isinstance(a, ps.StartDrain):
                self.drain_cut = self.host.primary_group(self).start_drain()
            elif isinstance(a, ps.SwapRoles):
                # An async side that now receives opens its group's journal at once, as one
                # loaded or created as the secondary does: a takeover must not pay for it.
                self.host.secondary_group(self)

    def _carry_out(self, actions: list[ps.Action]) -> list[ps.Action]:
        """Every action, in order; those that talk to the peer or start threads are returned
        to run after the state lock is released."""
        later: list[ps.Action] = []
        for a in actions:
            match a:
                case ps.PersistState():
                    self.doc.record = a.record
                    if not self.deleted:
                        faults.step(f"record {a.record.state}")
                        save_doc(self.host.doc_path(self.key), self.doc)
                    self.legs.label(a.record)
                case ps.SendPairState() | ps.StartDrain():
                    later.append(a)
                case ps.StartCopy():
                    self.copies.prepare(a)
                    later.append(a)
                case ps.StopCopy():
                    if self.engine is not None:
                        self.engine.stop()
                case ps.FetchPeerBitmap():
                    self.copies.fetch_bitmap(a.which)
                case ps.AssignNewPvid():
                    faults.step("new pvid")
                    h = self.volume.set_pvid(None)
                    self.log(f"pair {self.id}: volume {self.doc.volume} has new PVID {h.pvid_hex}")
                    self.pvid_changed()
                case ps.AdoptPrimaryPvid():
                    self._adopt_primary_pvid()
                case ps.DiscardReceived():
                    self.host.secondary_group(self).discard_unapplied(self)
                case ps.SwapRoles():
                    faults.step("swap role")
                    self.legs.label()
                    if a.role is Role.SECONDARY and self.is_async:
                        later.append(a)
                case ps.SetHidden():
                    what = "hidden from clients" if a.hidden else "visible to clients"
                    self.log(f"pair {self.id}: volume {self.doc.volume} is {what}")
                case ps.EmitEvent():
                    self.events.emit(a.name, **a.as_dict())
                    if a.name == "pair.writes":
                        self.log(f"pair {self.id}: {a.as_dict().get('why')}")
                case ps.DropBitmaps():
                    self._drop_bitmaps()
                case ps.SendPing():
                    self.host.ping_soon(self)  # one Ping per peer link per timer round
                case ps.SendPong():
                    pass  # the Pong is the answer to the Ping being handled (peer_requests)
                case ps.FoldJournal():
                    self.host.primary_group(self).fold()
                case ps.DropJournal():
                    self.host.drop_journal(self)
                case _:
                    assert_never(a)
        return later

    def _adopt_primary_pvid(self) -> None:
        if self.peer_pvid is None:
            self.log(f"pair {self.id}: the primary's PVID is not known yet")
            return
        self.doc.primary_pvid = self.peer_pvid
        self.save()
        if self.peer_pvid != self.volume.header.pvid:
            faults.step("adopt pvid")
            self.volume.set_pvid(self.peer_pvid)
            self.pvid_changed()

    def _drop_bitmaps(self) -> None:
        faults.step("drop bitmaps")
        with self.bitmap_lock:
            for slot in (self.record.diff_slot, self.record.copy_slot):
                self.store.clear(slot)
            if len(self.legs.legs) == 1:  # the log is the volume's: other legs may need it
                self.al.clear()
            self.diff_map = Bitmap(self.data_size, self.chunk_size)
            self.copy_map = Bitmap(self.data_size, self.chunk_size)

    # -- engine callbacks ----------------------------------------------------------------------

    def copy_progress(self, copied: int, total: int, sent: int, started: float) -> None:
        self.progress_bytes = sent
        self.flush_copy_map()
        self.try_fire(ps.CopyProgress(copied, total))

    def copy_finished(self, copied: int, total: int, sent: int, started: float) -> None:
        self.flush_copy_map()
        self.doc.last_copy_bytes = sent
        self.doc.last_copy_seconds = round(self.clock() - started, 3)
        self.progress_bytes = sent
        self.events.emit(
            "pair.copy.done",
            pair=self.id,
            chunks=total,
            bytes_sent=sent,
            seconds=self.doc.last_copy_seconds,
        )
        if self.is_async:
            # The secondary is consistent once it has applied what was journaled meanwhile.
            group = self.host.primary_group(self)
            if not group.wait_applied(group.journal.last_seq, REQUEST_TIMEOUT * 4):
                self.link_failed("the secondary did not apply the journal after the copy")
                return
        if self.try_fire(ps.CopyProgress(copied, total)):
            self.try_fire(ps.CopyDone())

    # -- facts from the link, the peer, the disk and the journal --------------------------------

    def suspend_for_disk(self, reason: str) -> None:
        """The pair's data on this node cannot be vouched for (a damaged journal): PSUE."""
        self.try_fire(ps.DiskError(reason[: wire.TEXT_MAX]), tell_peer=False)

    def peer_failed(self, reason: str) -> None:
        """The peer answered but refused what it must take: suspend (PSUE, cause peer)."""
        if self.deleted:
            return
        self.log(f"pair {self.id}: {reason}")
        self.try_fire(ps.PeerError(reason[: wire.TEXT_MAX]), tell_peer=False)

    def link_failed(self, reason: str) -> None:
        if self.deleted:
            return
        if self.is_async and self.record.state in (ps.State.PAIR, ps.State.PFUL):
            # An async pair rides out link trouble on its journal (PFUL, then PFUS when it
            # fills); its heartbeat timeout, not one failed request, declares the link lost.
            now = self.clock()
            if now - self.link_trouble_logged >= 10:
                self.link_trouble_logged = now
                self.log(
                    f"pair {self.id}: cannot reach {self.doc.peer.label()} ({reason}); "
                    "writes are journaled, PSUE if the peer is not back within "
                    f"{self.host.async_link_timeout:g}s"
                )
            return
        self.log(f"pair {self.id}: link to {self.doc.peer.label()} lost: {reason}")
        self.try_fire(ps.LinkLost(reason[: wire.TEXT_MAX]), tell_peer=False)

    def ships(self) -> bool:
        r = self.record
        return (
            r.role is Role.PRIMARY
            and r.state in ps.REPLICATING
            and self.machine.link_up
            and not self.deleted
        )

    def journals(self) -> bool:
        """Client writes of this side go to the group journal now (asked again under the
        group's fold gate, since the state may have changed since the write's decision)."""
        return self.machine.write_decision() is ps.WriteDecision.JOURNAL

    def journal_level(self, high: bool) -> None:
        state = self.record.state
        if (high and state is ps.State.PAIR) or (not high and state is ps.State.PFUL):
            self.try_fire(ps.JournalHigh() if high else ps.JournalLow())

    def journal_full(self) -> None:
        self.try_fire(ps.JournalFull())

    def apply_entry(
        self, kind: EntryKind, offset: int, length: int, data: bytes | memoryview, fua: bool
    ) -> None:
        self.replica.apply_entry(kind, offset, length, data, fua)

    def close(self, *, release: bool = False) -> None:
        """Stop the side; ``release``: it is deleted, and its bitmap slots are free again."""
        if self.engine is not None:
            self.engine.stop()
            self.engine.thread.join(timeout=5)
        # A pull's progress through its own sync: its landing threads may still store (the
        # join timed out), and a bit flushed from memory could be over data not yet synced.
        progress = self.flush_copy_map if self.engine is None else self.engine.save_progress
        steps = (("copy progress", progress), ("activity log", self.al.expire_all))
        for what, step in steps:
            try:
                step()
            except (PairvolError, OSError) as e:
                self.log(f"pair {self.id}: saving its {what} at close failed: {e}")
        self.replica.close()
        self.legs.detach(self, release=release)


def _answer(reply: wire.Message) -> wire.Message:
    """A peer's answer; a refusal (an Ack with a status, an Error) raises PeerRefused."""
    if isinstance(reply, wire.Ack) and reply.status:
        raise PeerRefused(reply.status, reply.message)
    if isinstance(reply, wire.Error):
        raise PeerRefused(reply.code, reply.message)
    return reply
