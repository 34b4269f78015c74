"""What a side needs of the node that holds it: the narrow interface between
:class:`~replicator.pair.side.Side` and :class:`~replicator.pair.manager.PairManager`.

A side never reaches into the manager beyond these members, so the manager can change (or be
replaced by a test's fake) without touching the side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from replicator import wire
from replicator.events import EventLog
from replicator.peer_link import PeerClient

if TYPE_CHECKING:
    from replicator.groups import GroupPrimary, GroupSecondary
    from replicator.pair.side import Side
    from replicator.pair.volume_legs import VolumeLegs

Log = Callable[[str], None]

REQUEST_TIMEOUT = 15.0  # a request to the peer (a copy, a mirrored write, a state change)
PING_TIMEOUT = 2.0  # a heartbeat, or a quick question to a peer that may be gone


class SideHost(Protocol):
    node_name: str
    log: Log
    events: EventLog
    clock: Callable[[], float]
    heartbeat_interval: float
    heartbeat_timeout: float
    async_link_timeout: float

    def volume_path(self, name: str) -> str: ...

    def open_legs(self, name: str) -> VolumeLegs: ...

    def doc_path(self, key: str) -> str: ...

    def is_self(self, host: str, port: int) -> bool: ...

    def client_for(
        self, host: str, port: int, expect: str = "", *, bulk: bool = False
    ) -> PeerClient: ...

    def deliver_local(self, side: Side, msg: wire.Message) -> wire.Message: ...

    def rebind(self, path: str) -> None: ...

    def notify_soon(self, side: Side) -> None: ...

    def primary_group(self, side: Side) -> GroupPrimary: ...

    def secondary_group(self, side: Side) -> GroupSecondary: ...

    def existing_group(self, side: Side) -> GroupPrimary | GroupSecondary | None: ...

    def drop_journal(self, side: Side) -> None: ...

    def forget(self, side: Side) -> None: ...

    def restore_link(self, side: Side, *, notify: bool) -> None: ...

    def log_refusal(self, side: Side, decision: object) -> None: ...

    def ping_soon(self, side: Side) -> None: ...

    def timer_changed(self) -> None: ...
