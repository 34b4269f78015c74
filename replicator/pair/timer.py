"""The node's one timer for all its pairs (issue 8: one timer, armed as asked).

``get_timer()`` is the earliest deadline of every pair's machine, every peer link and the
housekeeping round; ``handle_timer(now)`` does what is due.  The timer thread is the adapter:
it waits until that deadline (or until something changed), calls ``handle_timer``, asks again.
In-process tests start the manager without the thread and drive both calls with a scripted
clock.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from replicator import pair_state as ps
from replicator import wire
from replicator.errors import ConnectionFailed, PairvolError, Timeout
from replicator.liveness import earliest
from replicator.pair.host import PING_TIMEOUT
from replicator.peer_link import PeerRefused

if TYPE_CHECKING:
    from replicator.pair.manager import PairManager
    from replicator.pair.side import Side

HOUSEKEEPING = 1.0  # idle activity-log extents and image sizes are looked at this often


class PairTimer:
    """The one timer of a node's pair manager."""

    def __init__(self, manager: PairManager) -> None:
        self.m = manager
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pair timer", daemon=True)
        self._housekeeping_at = manager.clock() + HOUSEKEEPING
        self._local_pings: set[Side] = set()
        self._notify: set[Side] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` wants to be called next: the earliest deadline of every
        pair's machine, every peer link and the housekeeping round."""
        m = self.m
        deadlines = [s.machine.get_timer() for s in list(m.sides.values())]
        deadlines += [m.links.get_timer(), self._housekeeping_at]
        if self._local_pings or self._notify:
            deadlines.append(m.clock())
        return earliest(deadlines)

    def handle_timer(self, now: float) -> None:
        """Everything due at ``now``: the machines' heartbeat deadlines, one Ping per link
        (and per local pair) that is due, the peers to tell our state, and the housekeeping
        (idle activity-log extents, truncated images) once a second."""
        m = self.m
        for side in list(m.sides.values()):
            try:
                with side.state_lock:
                    actions = side.machine.handle_timer(now)
                    later = side._carry_out(actions)
                side._after(later, tell_peer=False)
            except PairvolError as e:
                m.log(f"pair {side.id}: timer: {e}")
        m.links.handle_timer(now)
        local, self._local_pings = self._local_pings, set()
        for side in local:
            self._ping_partner(side, now)
        notify, self._notify = self._notify, set()
        for side in notify:
            if not side.deleted and side.machine.link_up:
                try:
                    side.exchange.notify_peer()
                except PairvolError as e:
                    m.log(f"pair {side.id}: telling the peer our state failed: {e}")
        if now >= self._housekeeping_at:
            self._housekeeping_at = now + HOUSEKEEPING
            for side in list(m.sides.values()):
                if side.record.state is not ps.State.SMPL:
                    side.check_image()
                    side.al.expire()
            m.commands.reverse_due()

    def ping_soon(self, side: Side) -> None:
        """A machine asked for a heartbeat (its SendPing action): one per link per round."""
        if side.partner is not None:
            self._local_pings.add(side)
        else:
            self.m.links.ping_soon(side)

    def notify_soon(self, side: Side) -> None:
        """Tell the side's peer our state at the next round (another leg of its volume
        changed the PVID: a hidden secondary takes its primary's)."""
        self._notify.add(side)
        self._wake.set()

    def changed(self) -> None:
        """A state changed: the timer thread looks at :meth:`get_timer` again."""
        self._wake.set()

    def _ping_partner(self, side: Side, now: float) -> None:
        try:
            reply = side.request(wire.Ping(time.monotonic_ns()), timeout=PING_TIMEOUT)
        except (ConnectionFailed, Timeout, PeerRefused) as e:
            side.link_failed(f"heartbeat failed: {e}")
            return
        if isinstance(reply, wire.Pong) and side.machine.link_up:
            with side.state_lock:
                side.machine.handle(ps.Pong(), now)

    def _loop(self) -> None:
        m = self.m
        while not self._stop.is_set():
            due = self.get_timer()
            # A floor of 10 ms: a deadline that handle_timer could not move (a machine whose
            # timer keeps failing) must not spin the node.
            delay = HOUSEKEEPING if due is None else max(0.01, due - m.clock())
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.handle_timer(m.clock())
            except Exception as e:  # keep the node's timer alive; this is a bug to report
                m.log(f"pair timer: {e!r}")
