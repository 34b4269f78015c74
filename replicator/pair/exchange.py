"""The state exchange with the peer: what each PairState (announcement or reply) means.

Rule one, before any other: a primary that hears of a newer epoch from a side that took over
or became primary is fenced at once.  Rule two: a secondary that hears from a secondary with a
newer epoch finishes the swap that side began.  Both apply to replies too; the other mappings
(follow the primary's split, resync, copy done) apply to announcements only, since the peer
has already acted on ours (docs/decisions.md, "PAIR means identical").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from replicator import faults, wire
from replicator import pair_state as ps
from replicator.bitmap import Bitmap
from replicator.errors import ConnectionFailed, IllegalState, Timeout
from replicator.header import Role
from replicator.peer_link import PeerRefused
from replicator.pvid import format_pvid

if TYPE_CHECKING:
    from replicator.pair.side import Side

REQUEST_TIMEOUT = 15.0


class StateExchange:
    """One side's half of the state exchange."""

    def __init__(self, side: Side) -> None:
        self.side = side

    def learn_peer(self, msg: wire.PairState) -> None:
        """What every PairState from the peer (request or reply) teaches us: its PVID and its
        epoch, kept durably (a takeover must outbid the highest epoch the peer ever had).  A
        hidden secondary always carries its primary's PVID: a crash between a PVID change
        and the record that explains it is repaired here (docs/decisions.md, "Crash
        ordering")."""
        side = self.side
        side.peer_pvid = msg.pvid
        changed = False
        if msg.epoch > side.doc.peer_epoch:
            side.doc.peer_epoch = msg.epoch
            changed = True
        r = side.record
        if msg.role == "primary" and r.role is Role.SECONDARY and side.doc.primary_pvid != msg.pvid:
            side.doc.primary_pvid = msg.pvid
            changed = True
        if changed and not side.deleted:
            side.save()
        self.reconcile_pvid()

    def reconcile_pvid(self) -> None:
        """A hidden secondary whose PVID is not its primary's (a crash after a new PVID but
        before the record) takes the primary's again; nobody can see it meanwhile."""
        side = self.side
        want = side.doc.primary_pvid
        with side.state_lock:
            if not (want and side.machine.hidden and side.record.role is Role.SECONDARY):
                return
            h = side.volume.header
            if h.pvid != want:
                faults.step("reconcile pvid")
                side.volume.set_pvid(want)
                side.pvid_changed()
                side.log(
                    f"pair {side.id}: hidden secondary {side.doc.volume} carried PVID "
                    f"{h.pvid_hex}, not its primary's; it carries {format_pvid(want)} again"
                )

    def peer_event(self, msg: wire.PairState) -> ps.Event | None:
        """The event the peer's announced state means for us (docs/protocol.md, "Pair
        control").  Rule one, before any other: a primary that hears of a newer epoch from a
        side that took over or became primary is fenced at once."""
        side = self.side
        r = side.record
        st, role = ps.State(msg.state), msg.role
        claims = st is ps.State.SSWS or role == "primary"
        if r.role is Role.PRIMARY and claims and msg.epoch > r.epoch:
            if role == "primary" and st is ps.State.COPY and r.state in ps.SWAPPABLE_PRIMARY:
                # The peer is becoming the primary by a swap: we become its secondary.
                return ps.Resync(swap=True, epoch=msg.epoch)
            if r.state is ps.State.SMPL:
                return None
            return ps.PeerTookOver(msg.epoch)
        if st is ps.State.SMPL:
            return ps.Delete()
        if role == "primary" and r.role is Role.SECONDARY:
            if st is ps.State.PSUS and r.state is ps.State.PAIR:
                return ps.Split()
            if st is ps.State.COPY and r.state in (ps.State.PSUS, ps.State.PSUE, ps.State.PFUS):
                return ps.Resync()
            if st is ps.State.PAIR and r.state is ps.State.COPY:
                return ps.CopyDone()
            if st is ps.State.PSUE and r.state in ps.REPLICATING:
                return ps.PeerError("the primary suspended the pair")
        elif role == "secondary" and r.role is Role.SECONDARY and msg.epoch > r.epoch:
            # Rule two: the peer demoted itself by a swap (a newer epoch, and both of us
            # secondaries): finish the swap, we become primary and copy to it.
            return ps.Resync(swap=True, epoch=msg.epoch)
        return None

    def on_peer_state(self, msg: wire.PairState) -> wire.PairState:
        """The peer announces its state: map it onto our own event (see the module docstring)."""
        side = self.side
        if not side.machine.link_up:  # we just heard from the peer
            side.host.restore_link(side, notify=False)
        self.learn_peer(msg)
        r = side.record
        st = ps.State(msg.state)
        event = self.peer_event(msg)
        if msg.role == "primary" and r.role is Role.SECONDARY and event is None:
            if st is ps.State.COPY and r.state is ps.State.PAIR:
                # The primary suspended and is resyncing before we noticed the link go.
                side.fire(ps.LinkLost("the primary restarted the copy"), tell_peer=False)
                side.fire(ps.LinkRestored(), tell_peer=False)  # it is talking to us now
                event = ps.Resync()
            elif st is ps.State.PAIR and r.state is ps.State.PSUE:
                # The primary never suspended (it restarted, or the link blipped) and kept
                # replicating: nothing is missing here, so rejoin without a copy.
                side.fire(ps.Resync(), tell_peer=False)
                event = ps.CopyDone()
        if event is not None:
            side.fire(event, tell_peer=False)
            if isinstance(event, ps.Delete):
                side.host.forget(side)
            elif isinstance(event, ps.CopyDone):
                with side.bitmap_lock:  # consistent again: nothing of ours differs any more
                    side.diff_map = Bitmap(side.data_size, side.chunk_size)
                    side.store.clear(side.record.diff_slot)
        return side.my_state()

    def on_peer_reply(self, reply: wire.Message) -> None:
        """The peer's state in answer to ours: learn from it, and obey the epoch rules (one:
        fence on a newer epoch; two: finish a swap the peer began).  The other mappings are
        for announcements only: the peer has already acted on ours."""
        side = self.side
        if not isinstance(reply, wire.PairState) or reply.pair_id != side.id:
            return
        self.learn_peer(reply)
        event = self.peer_event(reply)
        if isinstance(event, ps.PeerTookOver) or (isinstance(event, ps.Resync) and event.swap):
            side.log(
                f"pair {side.id}: the peer is {reply.state} as {reply.role} with epoch "
                f"{reply.epoch} > ours ({side.record.epoch}): "
                + (
                    "fencing this side"
                    if isinstance(event, ps.PeerTookOver)
                    else "finishing its swap"
                )
            )
            side.fire(event)

    def notify_peer(self) -> None:
        """Tell the peer our state and take in its answer (best effort: a failure is a lost
        link).  The answer matters: at a reconnect after a takeover, it is how the old
        primary learns it must fence itside."""
        side = self.side
        try:
            reply = side.request(side.my_state(), timeout=REQUEST_TIMEOUT)
        except (ConnectionFailed, Timeout) as e:
            side.link_failed(f"cannot tell the peer our state: {e}")
            return
        except PeerRefused as e:
            side.log(f"pair {side.id}: the peer refused our state: {e}")
            return
        try:
            self.on_peer_reply(reply)
        except IllegalState as e:
            side.log(f"pair {side.id}: the peer's answer was refused: {e}")
