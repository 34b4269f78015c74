"""The state exchange with the peer: what each PairState (announcement or reply) means, and
what a side does when its link comes back.

The decisions are :mod:`replicator.pair_protocol`'s tables: ``peer_events`` says which events
a PairState means for our machine (rule one: a primary hearing of a newer epoch from a side
that took over or became primary is fenced at once; rule two: a secondary hearing a newer
secondary that demoted itself by a swap finishes it; the rest follow the primary's split,
resync and copy, and finish a split only one side finished), and ``restore_plan`` the steps
of a link's return (an automatic resync asks the peer first).  This module is the adapter:
it learns the peer's PVID and epoch first, fires the events in order, and carries out what
goes with them (a Delete forgets the pair, a CopyDone clears the difference bitmap).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import TYPE_CHECKING

from replicator import faults, pair_protocol, wire
from replicator import pair_state as ps
from replicator.bitmap import Bitmap
from replicator.errors import ConnectionFailed, IllegalState, ProtocolError, Timeout
from replicator.header import Role
from replicator.pair.host import REQUEST_TIMEOUT
from replicator.peer_link import PeerRefused
from replicator.pvid import format_pvid

if TYPE_CHECKING:
    from replicator.pair.side import Side


def peer_view(msg: wire.PairState) -> pair_protocol.PeerView:
    """What a PairState says about its sender, in the tables' terms (the wire checked it)."""
    role = Role.PRIMARY if msg.role == Role.PRIMARY.label else Role.SECONDARY
    return pair_protocol.PeerView(ps.State(msg.state), role, msg.epoch)


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

    def _events(self, msg: wire.PairState, *, reply: bool) -> tuple[ps.TableEvent, ...]:
        view = peer_view(msg)
        return pair_protocol.peer_events(
            self.side.record, view.state, view.role, view.epoch, reply=reply
        )

    def _fire(self, event: ps.TableEvent, *, tell_peer: bool) -> None:
        """One event of the peer rules, and what the adapter does with it."""
        side = self.side
        side.fire(event, tell_peer=tell_peer)
        if isinstance(event, ps.Delete):
            side.host.forget(side)
        elif isinstance(event, ps.CopyDone):
            with side.bitmap_lock:  # consistent again: nothing of ours differs any more
                side.diff_map = Bitmap(side.data_size, side.chunk_size)
                side.store.clear(side.record.diff_slot)

    def on_peer_state(self, msg: wire.PairState) -> wire.PairState:
        """The peer announces its state: feed our machine the events the announcement rules
        give, in order (our reply tells the peer where we are; a refused event is the peer's
        error answer)."""
        side = self.side
        if not side.machine.link_up:  # we just heard from the peer
            side.host.restore_link(side, notify=False)
        self.learn_peer(msg)
        for event in self._events(msg, reply=False):
            self._fire(event, tell_peer=False)
        return side.my_state()

    def on_peer_reply(self, reply: wire.Message) -> None:
        """The peer's state in answer to ours: learn from it, and feed our machine the events
        the reply rules give (the epoch rules, and finishing a split only one side finished);
        the peer is told our new state.  The other rules are for announcements only: the
        peer has already acted on ours."""
        side = self.side
        if not isinstance(reply, wire.PairState) or reply.pair_id != side.id:
            return
        self.learn_peer(reply)
        events = self._events(reply, reply=True)
        if events:
            view = peer_view(reply)
            rule = pair_protocol.peer_rule(
                side.record, view.state, view.role, view.epoch, reply=True
            )
            side.log(
                f"pair {side.id}: the peer is {reply.state} as {reply.role} with epoch "
                f"{reply.epoch} (ours {side.record.epoch}): {rule}"
            )
        for event in events:
            self._fire(event, tell_peer=True)

    def query(self, timeout: float = REQUEST_TIMEOUT) -> wire.PairState:
        """Send our state and take the answer through the reply rules (a Query step)."""
        side = self.side
        reply = side.request(side.my_state(), timeout=timeout)
        if not isinstance(reply, wire.PairState) or reply.pair_id != side.id:
            raise ProtocolError(f"pair {side.id}: the peer answered a state query oddly")
        self.on_peer_reply(reply)
        return reply

    def restore(self, *, notify: bool) -> bool:
        """The peer answered while our link was down: carry out ``restore_plan`` (LinkRestored;
        an automatic resync queries the peer first, then announces COPY before LinkRestored
        chains its Resync).  The manager's restore_link runs this under the side's restore
        lock; True: the plan ends with the state exchange, for the caller to run once the
        lock is released."""
        side = self.side
        plan = pair_protocol.restore_plan(side.record, notify=notify)
        try:
            if plan.partial:
                # An automatic resync: where is the peer?  A split secondary (a split whose
                # answer we lost) is split here too, by the reply rules, and not resynced.
                reply = self.query()
                plan = pair_protocol.restore_plan(
                    side.record, notify=notify, queried=True, peer=peer_view(reply)
                )
            for held, run in itertools.groupby(plan.steps, key=lambda step: step.hold_io):
                with side.gate.closed() if held else contextlib.nullcontext():
                    for step in run:
                        self._restore_step(step)
        except (IllegalState, ConnectionFailed, Timeout, PeerRefused, ProtocolError) as e:
            # OnFail.STAY_DOWN: the link stays down, the next Pong retries.
            side.log(f"pair {side.id}: {e}")
            return False
        return any(isinstance(step, pair_protocol.Exchange) for step in plan.steps)

    def _restore_step(self, step: pair_protocol.Step) -> None:
        if isinstance(step, pair_protocol.Announce):
            self._announce(step)
        elif isinstance(step, pair_protocol.Fire):
            self.side.fire(step.event, tell_peer=False)
        elif not isinstance(step, pair_protocol.Exchange):  # the caller's, after the lock
            raise AssertionError(f"a restore plan has no {type(step).__name__} step")

    def _announce(self, step: pair_protocol.Announce) -> None:
        side = self.side
        msg = wire.PairState(
            side.id, str(step.state), step.role.label, side.volume.header.pvid, step.epoch
        )
        try:
            reply = side.request(msg)
        except PeerRefused as e:
            raise IllegalState(f"pair {side.id}: the peer refused: {e.message}") from e
        if step.reply is pair_protocol.ReplyUse.RULES:
            self.on_peer_reply(reply)

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
