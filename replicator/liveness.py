"""Liveness of one peer link: heartbeats and the link-lost deadline, pure code, no I/O.

Theory of operation
-------------------
One :class:`Liveness` per peer link (per pair of nodes), however many pairs share that link;
the cluster agent uses the same class for its peers.  It is aioquic-style: every entry point
takes ``now`` (monotonic seconds), :meth:`Liveness.get_timer` says when it wants
:meth:`Liveness.handle_timer` called, and ``handle_timer`` returns the actions to carry out.

Two states.  **Up**: the adapter reports every message heard from the peer (:meth:`heard`) and
every message sent to it (:meth:`sent`).  When nothing has been sent for ``interval`` the core
asks for a ``SendPing``; when nothing has been heard for ``timeout`` it says ``Lost`` and goes
down.  A request that fails outright is reported with :meth:`failed` (Lost at once).
**Down**: the core asks for a ``SendPing`` every ``interval`` (a probe); when the peer answers,
the adapter runs its reconnection (the pairs' state exchange) and calls :meth:`restored`.
Hearing from the peer while down changes nothing by itself: the link is up again when the
adapter says so, not when a stray message arrives.

``now`` never goes backwards inside the core: an earlier ``now`` than one already seen counts
as the later one.

The adapter (one loop per node, aioquic's ``transmit``): after feeding input, carry out the
actions (a ``Lost`` becomes ``LinkLost`` for every pair on that link; a pair may ride it out,
as an async pair in PAIR does), then arm one timer for :func:`earliest` of every core's
``get_timer()`` (:class:`Timers` says when that changes).  Pairs that wait longer than the
link's timeout (async: 30 s against 5 s) can use a second Liveness on the same link with the
longer timeout, fed the same ``heard``/``sent`` calls: their pings coincide, and the adapter
sends one ping per round.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from replicator.errors import UsageError


class LinkState(enum.StrEnum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class SendPing:
    """Send the peer a Ping (and call :meth:`Liveness.sent`)."""


@dataclass(frozen=True, slots=True)
class Lost:
    """The link is lost: every pair on it gets LinkLost(reason)."""

    reason: str


Action = SendPing | Lost


class Liveness:
    """The heartbeat of one peer link."""

    def __init__(self, interval: float, timeout: float, now: float, *, up: bool = True) -> None:
        """``up``: the link is connected, or assumed to be (pairs restored from disk give
        their peer one ``timeout`` to be heard from); False: known to be down (probe only)."""
        if not (
            math.isfinite(interval) and math.isfinite(timeout) and 0 < interval < timeout
        ) or not math.isfinite(now):
            raise UsageError(
                f"heartbeat interval {interval}s must be positive and shorter than the timeout "
                f"{timeout}s, and now ({now}) finite"
            )
        self.interval = interval
        self.timeout = timeout
        self._state = LinkState.UP if up else LinkState.DOWN
        self._now = now
        self._heard_at = now
        self._sent_at = now

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def up(self) -> bool:
        return self._state is LinkState.UP

    def _clock(self, now: float) -> float:
        self._now = max(self._now, now)
        return self._now

    # -- inputs --

    def heard(self, now: float) -> None:
        """A message (any: Ping, Pong, request, response) arrived from the peer."""
        now = self._clock(now)
        if self.up:
            self._heard_at = now

    def sent(self, now: float) -> None:
        """A message went to the peer: no ping is needed for another ``interval``."""
        self._sent_at = self._clock(now)

    def failed(self, now: float, reason: str) -> list[Action]:
        """A request to the peer failed outright (refused connection, reset): Lost at once."""
        now = self._clock(now)
        if not self.up:
            return []
        self._state = LinkState.DOWN
        return [Lost(reason)]

    def restored(self, now: float) -> None:
        """The peer is back (answered a probe and the adapter reconnected)."""
        now = self._clock(now)
        self._state = LinkState.UP
        self._heard_at = now
        self._sent_at = now

    # -- the timer --

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` wants to be called next (never None: a link is always
        either watched or probed)."""
        ping_at = self._sent_at + self.interval
        if self.up:
            return min(self._heard_at + self.timeout, ping_at)
        return ping_at

    def handle_timer(self, now: float) -> list[Action]:
        """What is due at ``now``: Lost (if nothing was heard for ``timeout``), then SendPing
        (if nothing was sent for ``interval``); either, both, or nothing."""
        now = self._clock(now)
        actions: list[Action] = []
        if self.up and now >= self._heard_at + self.timeout:
            self._state = LinkState.DOWN
            actions.append(Lost(f"peer not heard from for {self.timeout:g}s (heartbeat timeout)"))
        if now >= self._sent_at + self.interval:
            self._sent_at = now
            actions.append(SendPing())
        return actions


def earliest(deadlines: Iterable[float | None]) -> float | None:
    """The earliest of several cores' ``get_timer()`` values (None: nobody wants a timer)."""
    times = [d for d in deadlines if d is not None]
    return min(times) if times else None


class Timers:
    """The one timer an adapter arms for several cores.  ``armed`` is the deadline it should
    be armed for (None: disarmed); :meth:`update` says whether that changed, so the adapter
    re-arms only then."""

    def __init__(self) -> None:
        self.armed: float | None = None

    def update(self, deadlines: Iterable[float | None]) -> bool:
        want = earliest(deadlines)
        if want == self.armed:
            return False
        self.armed = want
        return True
