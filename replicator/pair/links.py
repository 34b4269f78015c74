"""Heartbeats per peer link: one :class:`~replicator.liveness.Liveness` per node the pairs of
this node replicate with, however many pairs share it.

Each round of the node's one timer (:meth:`PeerLinks.handle_timer`) sends at most one Ping
per link: when the link's liveness asks for one, or when a pair's machine asked
(``SendPing``, :meth:`PeerLinks.ping_soon`).  A Pong is heard by every pair of the link (their
machines' heartbeat deadlines move on; a pair whose link was down is restored, with the state
exchange); a failed Ping, or the link's timeout, is a lost link for every pair on it (an async
pair in PAIR rides it out on its journal, as :meth:`Side.link_failed` decides).  A local pair
(both halves on this node) has no link: its halves ping each other in-process.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from replicator import pair_state as ps
from replicator import wire
from replicator.errors import ConnectionFailed, PairvolError, Timeout
from replicator.liveness import Liveness, Lost, SendPing, earliest
from replicator.pair.host import PING_TIMEOUT
from replicator.peer_link import PeerRefused

if TYPE_CHECKING:
    from replicator.pair.manager import PairManager
    from replicator.pair.side import Side

LinkKey = tuple[str, int]


class PeerLinks:
    """The liveness of every peer link of a node."""

    def __init__(self, manager: PairManager) -> None:
        self.m = manager
        self._links: dict[LinkKey, Liveness] = {}
        self._soon: set[LinkKey] = set()

    @staticmethod
    def key(side: Side) -> LinkKey:
        return (side.doc.peer.host, side.doc.peer.port)

    def sides_of(self, key: LinkKey) -> list[Side]:
        return [
            s
            for s in list(self.m.sides.values())
            if s.partner is None
            and not s.deleted
            and self.key(s) == key
            and s.record.state is not ps.State.SMPL
        ]

    def _sync(self, now: float) -> None:
        """One liveness per link that has pairs; a new link starts up if any of its pairs
        has its link up, else down (probed)."""
        keys: dict[LinkKey, bool] = {}
        for s in list(self.m.sides.values()):
            if s.partner is None and not s.deleted and s.record.state is not ps.State.SMPL:
                k = self.key(s)
                keys[k] = keys.get(k, False) or s.machine.link_up
        for k in list(self._links):
            if k not in keys:
                del self._links[k]
        for k, up in keys.items():
            if k not in self._links:
                self._links[k] = Liveness(
                    self.m.heartbeat_interval, self.m.heartbeat_timeout, now, up=up
                )

    def ping_soon(self, side: Side) -> None:
        """A pair's machine asked for a heartbeat (``SendPing``)."""
        self._soon.add(self.key(side))

    def get_timer(self) -> float | None:
        self._sync(self.m.clock())
        if self._soon:
            return self.m.clock()
        return earliest(live.get_timer() for live in self._links.values())

    def handle_timer(self, now: float) -> None:
        self._sync(now)
        for key, live in list(self._links.items()):
            actions = live.handle_timer(now)
            if key in self._soon and not any(isinstance(a, SendPing) for a in actions):
                actions.append(SendPing())
            for a in actions:
                if isinstance(a, Lost):
                    for s in self.sides_of(key):
                        s.link_failed(a.reason)
                else:
                    self._ping(key, live)
        self._soon.clear()

    def heard_from(self, peer_name: str, now: float) -> None:
        """A request came in from node ``peer_name``: its links are alive."""
        for key, live in self._links.items():
            if any(s.doc.peer.node == peer_name for s in self.sides_of(key)):
                live.heard(now)

    def probe(self, side: Side) -> None:
        """Ping the side's link now (a command is about to need it)."""
        now = self.m.clock()
        self._sync(now)
        live = self._links.get(self.key(side))
        if live is not None:
            self._ping(self.key(side), live)

    def _ping(self, key: LinkKey, live: Liveness) -> None:
        sides = self.sides_of(key)
        if not sides:
            return
        sent_at = self.m.clock()
        live.sent(sent_at)
        for s in sides:  # every pair of the link is served by this one Ping: one phase
            with s.state_lock:
                s.machine.pinged(sent_at)
        try:
            reply = sides[0].peer_client().request(wire.Ping(time.monotonic_ns()), PING_TIMEOUT)
        except (ConnectionFailed, Timeout, PeerRefused, PairvolError) as e:
            live.failed(self.m.clock(), f"heartbeat failed: {e}")  # down; its pairs learn below
            for s in sides:
                if s.machine.link_up:
                    s.link_failed(f"heartbeat failed: {e}")
            return
        if not isinstance(reply, wire.Pong):
            return
        now = self.m.clock()
        client = sides[0].client
        if not live.up:
            live.restored(now)
        live.heard(now)
        for s in sides:
            if s.doc.peer.node == "" and client is not None and client.peer_name:
                s.doc.peer.node = client.peer_name
                s.save()
            if s.machine.link_up:
                with s.state_lock:
                    s.machine.handle(ps.Pong(), now)
            else:
                self.m.restore_link(s, notify=True)

    def describe(self) -> list[dict[str, object]]:
        return [
            {"peer": f"{h}:{p}", "state": str(live.state), "pairs": len(self.sides_of((h, p)))}
            for (h, p), live in sorted(self._links.items())
        ]
