"""The peer protocol's server side: what a peer's request does on this node.

A peer is trusted only for the pairs it belongs to: every pair-scoped request is checked
against the pair's peer node name, which the handshake proved (docs/decisions.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from replicator import pair_state as ps
from replicator import wire
from replicator.errors import NotFound, ProtocolError
from replicator.pair.pull import serve_chunk

if TYPE_CHECKING:
    from replicator.pair.manager import PairManager
    from replicator.pair.side import Side


class PeerRequests:
    """Requests from peers (and from a local pair's other half) for this node's sides."""

    def __init__(self, manager: PairManager) -> None:
        self.m = manager

    def handle(self, peer_name: str, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.Ping):
            now = self.m.clock()
            self.m.links.heard_from(peer_name, now)
            for s in list(self.m.sides.values()):
                if s.doc.peer.node == peer_name and s.machine.link_up:
                    with s.state_lock:
                        s.machine.handle(ps.Ping(), now)
            return wire.Pong(msg.now_ns)
        if isinstance(msg, wire.PairCreate):
            self.m.creation.on_pair_create(peer_name, msg)
            return wire.Ack()
        pid = getattr(msg, "pair_id", None)
        if pid is None:
            raise ProtocolError(f"unexpected {type(msg).__name__} request")
        side = self.m.side(pid)
        if side.doc.peer.node != peer_name or side.local:
            # A peer is trusted only for the pairs it belongs to (docs/decisions.md, "Peer
            # identity"): the same answer as for a pair that does not exist, and one line.
            self.log_untrusted(peer_name, pid, type(msg).__name__, side.doc.peer.node)
            raise NotFound(f"pair {pid} does not exist on node {self.m.node_name}")
        return self.dispatch(side, msg)

    def log_untrusted(self, peer_name: str, pid: str, what: str, member: str) -> None:
        """One line per peer and pair per ten seconds, however many requests it sends."""
        key = (f"untrusted {peer_name}", pid)
        now = self.m.clock()
        if now - self.m._refusals.get(key, -1e9) >= 10:
            self.m._refusals[key] = now
            self.m.log(
                f"refused {what} for pair {pid} from node {peer_name!r}: the pair's peer is "
                f"{member!r}"
            )
            self.m.events.emit("peer.refused", peer=peer_name, pair=pid, request=what)

    def dispatch(self, side: Side, msg: wire.Message) -> wire.Message:
        """A request for one side (from its remote peer, or from its local partner)."""
        pid = side.id
        if isinstance(msg, wire.Ping):
            if side.machine.link_up:
                with side.state_lock:
                    side.machine.handle(ps.Ping(), self.m.clock())
            return wire.Pong(msg.now_ns)
        if isinstance(msg, wire.PairState):
            return side.exchange.on_peer_state(msg)
        if isinstance(msg, wire.BitmapRequest):
            return side.replica.bitmap_for_peer(msg.which)
        if isinstance(msg, wire.ChunkRequest):
            return serve_chunk(side, msg)
        if isinstance(msg, wire.DigestRequest):
            return wire.Digests(pid, msg.first, side.replica.digests(msg.first, msg.count))
        if isinstance(msg, wire.Write | wire.Zero | wire.Flush):
            return side.replica.apply_write(msg)
        if isinstance(msg, wire.Entries):
            return side.replica.apply_entries(msg)
        if isinstance(msg, wire.JournalStatus):
            side.replica.check_journal_marks(split=True)
            return self.m.secondary_group(side).note_status(msg)
        raise ProtocolError(f"unexpected {type(msg).__name__} request")
