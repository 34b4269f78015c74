"""The node's pairs: every side, the peer clients, the ticker, and the peer protocol's
server side (what a peer's request does).  Commands live in
:mod:`~replicator.pair.commands` and :mod:`~replicator.pair.create`, client connections in
:mod:`~replicator.pair.handles`, start-up recovery in :mod:`~replicator.pair.quarantine`."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from replicator import faults, wire
from replicator import pair_state as ps
from replicator.atomic_file import unlink_durably
from replicator.errors import (
    IllegalState,
    NotFound,
    PairvolError,
)
from replicator.events import EventLog
from replicator.export import ExportHandle
from replicator.groups import DEFAULT_JOURNAL_SIZE, GroupPrimary, GroupSecondary, journal_path
from replicator.header import Role
from replicator.pair.activity_log import AL_EXTENT
from replicator.pair.commands import Commands
from replicator.pair.create import Creation
from replicator.pair.display import describe
from replicator.pair.doc import (
    PAIRS_DIR,
    SideDoc,
    doc_file_name,
    is_doc_file,
    load_doc,
    save_doc,
)
from replicator.pair.handles import HandleRegistry
from replicator.pair.hold import Holds
from replicator.pair.links import PeerLinks
from replicator.pair.names import pair_id, split_pair_id
from replicator.pair.peer_requests import PeerRequests
from replicator.pair.quarantine import Quarantine
from replicator.pair.side import Side
from replicator.pair.timer import PairTimer
from replicator.pair.volume_legs import VolumeLegs
from replicator.peer_auth import PeerSecrets
from replicator.peer_link import PeerClient, PeerRefused, errno_of
from replicator.tls import PeerTls
from replicator.volume import Volume

ASYNC_LINK_TIMEOUT = 30.0  # an async pair's heartbeat timeout: the journal absorbs outages

Log = Callable[[str], None]


class PairManager:
    """Every side on this node, the peer clients, and the ticker (heartbeats, link retries)."""

    def __init__(
        self,
        node_name: str,
        directory: str,
        listen: str,
        peer_port: int,
        secret: PeerSecrets,
        events: EventLog,
        log: Log,
        *,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 5.0,
        async_link_timeout: float = ASYNC_LINK_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        tls: PeerTls | None = None,
    ) -> None:
        self.node_name = node_name
        self.tls = tls  # the peer links' TLS (replicator/tls.py): its clients use it too
        #: The groups loaded at start-up are started (their shipper runs): a group made after
        #: that starts at once (primary_group).
        self._groups_started = False
        self.directory = directory
        self.listen = listen
        self.peer_port = peer_port
        self.secret = secret
        self.events = events
        self.log = log
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.async_link_timeout = async_link_timeout
        #: Monotonic seconds; every timing decision of the runtime reads this clock.
        self.clock = clock
        self.sides: dict[str, Side] = {}
        #: The volumes with pairs, by real path: each with its legs.
        self.volumes: dict[str, VolumeLegs] = {}
        self.primaries: dict[str, GroupPrimary] = {}
        self.secondaries: dict[str, GroupSecondary] = {}
        self.lock = threading.RLock()
        self.clients: dict[tuple[str, int], PeerClient] = {}
        # A second connection per peer for bulk transfers (a takeover's pull): what must be
        # quick (heartbeats, state, a client's fetch on demand) never waits behind megabytes
        # of pieces at the peer's reader, which serves each ChunkRequest inline, in order.
        self.bulk_clients: dict[tuple[str, int], PeerClient] = {}
        self.timer = PairTimer(self)
        self._refusals: dict[tuple[str, str], float] = {}
        self.handle_registry = HandleRegistry(self)
        self.quarantine = Quarantine(self)
        self.creation = Creation(self)
        self.commands = Commands(self)
        self.holds = Holds(self)
        self.peer_requests = PeerRequests(self)
        self.links = PeerLinks(self)
        os.makedirs(os.path.join(directory, PAIRS_DIR), exist_ok=True)

    # -- files ----------------------------------------------------------------------------------

    def doc_path(self, key: str) -> str:
        return os.path.join(self.directory, PAIRS_DIR, doc_file_name(key))

    def is_self(self, host: str, port: int) -> bool:
        return host == self.listen and port == self.peer_port

    def deliver_local(self, side: Side, msg: wire.Message) -> wire.Message:
        """A local pair's request, handed to the other side in-process; errors look exactly
        as they would from a remote peer."""
        try:
            return self.peer_requests.dispatch(side, msg)
        except PairvolError as e:
            raise PeerRefused(errno_of(e), str(e)) from e

    def volume_path(self, name: str) -> str:
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            with contextlib.suppress(PairvolError, OSError), Volume.open(entry.path) as v:
                if v.header.name == name:
                    return entry.path
        raise NotFound(f"node {self.node_name} has no volume named {name!r}")

    def open_legs(self, name: str) -> VolumeLegs:
        """The volume ``name`` with its legs, opened with its first leg."""
        real = os.path.realpath(self.volume_path(name))
        with self.lock:
            legs = self.volumes.get(real)
            if legs is None or legs.closed:
                legs = VolumeLegs(real, self.clock, self.log, self._volume_closed)
                self.volumes[real] = legs
            return legs

    def _volume_closed(self, legs: VolumeLegs) -> None:
        with self.lock:
            if self.volumes.get(legs.path) is legs:
                del self.volumes[legs.path]

    def legs_for_path(self, path: str) -> VolumeLegs | None:
        legs = self.volumes.get(os.path.realpath(path))
        return legs if legs is not None and legs.legs else None

    def client_for(
        self, host: str, port: int, expect: str = "", *, bulk: bool = False
    ) -> PeerClient:
        """The client for the node at ``host:port``; ``expect``: the node name the pair knows
        its peer by (a different node answering there is refused).  ``bulk``: the second
        connection, for bulk transfers."""
        clients = self.bulk_clients if bulk else self.clients
        with self.lock:
            c = clients.get((host, port))
            if c is not None and expect and c.expect_peer not in (None, expect):
                raise IllegalState(
                    f"{host}:{port} is node {c.expect_peer!r} for other pairs, not {expect!r}"
                )
            if c is not None and expect and c.expect_peer is None:
                c.expect_peer = expect  # checked at its next handshake
            if c is None:
                c = self.new_client(host, port, expect or None)
                clients[host, port] = c
            return c

    def new_client(self, host: str, port: int, expect: str | None) -> PeerClient:
        """A new client to the node at ``host:port`` (in-process tests give a fake link's)."""
        return PeerClient(
            self.node_name,
            host,
            port,
            self.secret,
            self.log,
            allow_no_secret=not self.secret,
            expect_peer=expect,
            tls=self.tls,
            compress_for=self.compress_for,
        )

    # -- life cycle -----------------------------------------------------------------------------

    def start(self, *, timer_thread: bool = True) -> None:
        """Load every pair and start the groups and the timer thread.  ``timer_thread=False``
        (in-process tests with a scripted clock): the caller drives :meth:`handle_timer`."""
        pairs_dir = os.path.join(self.directory, PAIRS_DIR)
        deleting: list[tuple[str, SideDoc]] = []
        for name in sorted(os.listdir(pairs_dir)):
            if not is_doc_file(name):
                continue
            path = os.path.join(pairs_dir, name)
            doc: SideDoc | None = None
            try:
                doc, note = load_doc(path)
                if note is not None:
                    self.log(f"{path}: {note}")  # the next write rewrites both slots
                if doc.record.state is ps.State.SMPL:
                    deleting.append((path, doc))  # once the volume's other legs are loaded
                    continue
                local = self.is_self(doc.peer.host, doc.peer.port)
                side = Side(self, doc, link_up=local)
            except (PairvolError, OSError) as e:
                self.quarantine._mark_broken(path, doc, e)
                continue
            if path != self.doc_path(side.key):  # an old name (GROUP.PAIR.json) or old form
                save_doc(self.doc_path(side.key), doc)
                unlink_durably(path)
            self.sides[side.key] = side
            if local:
                self._link_partner(side)
            self.events.emit("pair.loaded", pair=side.id, state=str(side.record.state))
        for path, doc in deleting:
            try:
                self.quarantine._finish_delete(path, doc)
            except (PairvolError, OSError) as e:
                self.quarantine._mark_broken(path, doc, e)
        for legs in list(self.volumes.values()):
            if legs.path not in self.quarantine.broken:
                legs.release_orphans()
            self._fold_activity_log(legs)
        self.quarantine._open_groups()
        self.quarantine._find_orphans()
        for name, g in self.primaries.items():
            drained = any(s.record.draining for s in self.sides.values() if s.record.group == name)
            if not drained:
                n = g.redo()
                if n:
                    self.log(f"group {name}: redid {n} journal entries after a restart")
            g.start()
        self._groups_started = True
        self._reach_old_primaries()
        if timer_thread:
            self.timer.start()

    def _reach_old_primaries(self) -> None:
        """At start-up, before any client is served: a side still pulling after a takeover
        asks its old primary now (one Ping, at most PING_TIMEOUT), so that its pull resumes
        and a client's first read of a chunk not here yet fetches it.  Waiting for the timer's
        first heartbeat refused those reads with EIO for a moment after every restart."""
        for side in list(self.sides.values()):
            r = side.record
            if side.partner is None and r.pulling:
                self.probe(side)

    def _fold_activity_log(self, legs: VolumeLegs) -> None:
        """At start-up: extents in the volume's activity log may differ between the volume and
        the secondaries of its sync legs: into their difference bitmaps, and suspend them."""
        extents = legs.al.take()
        if not extents:
            return
        sync = [s for s in legs.sides() if not s.is_async]
        for side in sync:
            side.fold_extents(extents, AL_EXTENT)
        legs.al.clear()
        for side in sync:
            if side.record.state in ps.REPLICATING:
                side.link_failed("restarted with writes in flight (activity log not empty)")

    def _link_partner(self, side: Side) -> None:
        for other in self.sides.values():
            if other is not side and other.id == side.id and other.local:
                side.partner, other.partner = other, side

    def _load_async(self, side: Side) -> None:
        if side.record.role is Role.PRIMARY and side.record.state is not ps.State.SMPL:
            self.primary_group(side)
        elif side.record.role is Role.SECONDARY:
            self.secondary_group(side)

    def stop(self) -> None:
        self.timer.stop()
        for gp in list(self.primaries.values()):
            gp.stop()
        for gs in list(self.secondaries.values()):
            gs.stop()
        for side in list(self.sides.values()):
            side.close()
        for c in [*self.clients.values(), *self.bulk_clients.values()]:
            c.close()

    # -- the one timer (replicator/pair/timer.py) ------------------------------------------------

    def get_timer(self) -> float | None:
        return self.timer.get_timer()

    def handle_timer(self, now: float) -> None:
        self.timer.handle_timer(now)

    def ping_soon(self, side: Side) -> None:
        self.timer.ping_soon(side)

    def notify_soon(self, side: Side) -> None:
        self.timer.notify_soon(side)

    def timer_changed(self) -> None:
        self.timer.changed()

    def probe(self, side: Side) -> None:
        """Ping the side's peer now (a command needs to know whether it is there)."""
        if side.partner is None:
            self.links.probe(side)

    def restore_link(self, side: Side, *, notify: bool) -> None:
        """The peer answered while our link was down: the restore plan (LinkRestored; an
        automatic resync asks the peer first; pair_protocol.restore_plan), then the state
        exchange."""
        with side.restore_lock:
            if side.machine.link_up:
                return
            self.log(f"pair {side.id}: link to {side.doc.peer.label()} is back")
            exchange = side.exchange.restore(notify=notify)
        # State exchange on reconnect: the peer learns where we are (a resumed copy) and
        # moves along (docs/protocol.md, "Pair control").
        if exchange:
            side.exchange.notify_peer()

    def log_refusal(self, side: Side, decision: object) -> None:
        """One log line per pair and decision per ten seconds, not one per request."""
        key = (side.id, str(decision))
        now = self.clock()
        if now - self._refusals.get(key, -1e9) >= 10:
            self._refusals[key] = now
            if isinstance(decision, ps.WriteDecision):
                why = ps._WRITE_WHY[decision]
            else:
                why = str(decision)
            self.log(f"pair {side.id}: client request refused: {why}")

    def forget(self, side: Side) -> None:
        side.deleted = True
        if side.is_async:
            # The group's journals go with its last pair: a group created again under the
            # same name must start a new sequence space on both sides.
            self.drop_journal(side)
        with self.lock:
            self.sides.pop(side.key, None)
        faults.step("remove record")
        unlink_durably(self.doc_path(side.key))
        path = side.volume.path
        side.close(release=True)
        self.rebind(path)

    # -- what cannot be loaded, and what a crash left half done -----------------------------------

    # -- async groups ---------------------------------------------------------------------------

    def primary_group(self, side: Side) -> GroupPrimary:
        name = side.record.group
        with self.lock:
            g = self.primaries.get(name)
            if g is None:
                size = side.doc.journal_size or DEFAULT_JOURNAL_SIZE
                path = journal_path(self.directory, name, receive=False)
                g = GroupPrimary(name, path, size, side.doc.high_watermark, self.log)
                self.primaries[name] = g
                if self._groups_started:
                    # A side that became the primary while the node runs (a swap, the swap
                    # back after a takeover's pull): its shipper starts now.  At start-up it
                    # starts after the journal's redo (start()).
                    g.start()
            g.add(side.stream, side)
            return g

    def secondary_group(self, side: Side) -> GroupSecondary:
        name = side.record.group
        with self.lock:
            g = self.secondaries.get(name)
            if g is None:
                path = journal_path(self.directory, name, receive=True)
                g = GroupSecondary(name, path, DEFAULT_JOURNAL_SIZE, self.log)
                self.secondaries[name] = g
                g.start()
            g.add(side)
            return g

    def drop_journal(self, side: Side) -> None:
        """On delete: the group's journal goes when its last pair does."""
        name = side.record.group
        others = [s for s in self.sides.values() if s is not side and s.record.group == name]
        if others:
            return
        for groups, receive in ((self.primaries, False), (self.secondaries, True)):
            g = groups.pop(name, None)
            if g is not None:
                g.stop()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(journal_path(self.directory, name, receive))

    # -- lookups --------------------------------------------------------------------------------

    def side(self, pid: str) -> Side:
        """The side of a remote pair (peer requests name pairs by id)."""
        s = self.sides.get(pid)
        if s is None:
            raise NotFound(f"pair {pid} does not exist on node {self.node_name}")
        return s

    def has_pair(self, pid: str) -> bool:
        return any(s.id == pid for s in self.sides.values())

    def select(self, target: str, role: Role | None = None) -> list[Side]:
        """The sides ``GROUP[/PAIR]`` names.  ``role``: of a local pair, only the side in
        that role (a command acts once per pair, from the side that carries it out)."""
        group, pair = split_pair_id(target)
        if pair is not None:
            pid = pair_id(group, pair)
            found = [s for s in self.sides.values() if s.id == pid]
            if not found:
                raise NotFound(f"pair {pid} does not exist on node {self.node_name}")
        else:
            found = [s for s in self.sides.values() if s.record.group == group]
            if not found:
                raise NotFound(f"group {group} has no pairs on node {self.node_name}")
        if role is not None:
            found = [s for s in found if s.partner is None or s.record.role is role]
        return sorted(found, key=lambda s: (s.id, s.record.role))

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        c = self.commands
        return {
            "pair.create": self.creation.op_create,
            "pair.split": c.op_split,
            "pair.resync": c.op_resync,
            "pair.takeover": c.op_takeover,
            "pair.delete": c.op_delete,
            "pair.display": c.op_display,
            "pair.verify": c.op_verify,
            "pair.fence": self.holds.op_fence,
            "pair.unfence": self.holds.op_unfence,
            "pair.watchdog": self.holds.op_watchdog,
            "debug.crash-at": c.op_crash_at,
        }

    def op_display(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.commands.op_display(args)

    def describe(self, side: Side) -> dict[str, Any]:
        return describe(side)

    # -- open client connections, and the groups of a side ------------------------------------

    def wrap(self, handle: ExportHandle) -> ExportHandle:
        return self.handle_registry.wrap(handle)

    def rebind(self, path: str) -> None:
        self.handle_registry.rebind(path)

    def existing_group(self, side: Side) -> GroupPrimary | GroupSecondary | None:
        """The side's group journal, if it has one open (no journal is created)."""
        name = side.record.group
        if side.record.role is Role.PRIMARY:
            return self.primaries.get(name)
        return self.secondaries.get(name)

    # -- the peer protocol (server side): replicator/pair/peer_requests.py ----------------------

    def receives_inline(self, msg: wire.Message) -> bool:
        """The peer requests a connection's reader carries out itself, without a hand-off
        to a worker (replicator/peer_link.py, ``inline``): a mirrored write, and a journal
        entry its group's receive journal takes without waiting (the next one, with room).
        One that would wait, for a predecessor or for space, goes to a worker: a reader that
        waits reads nothing else, its predecessor included.  A ChunkRequest (a pull's piece,
        or a chunk a client of the taken-over side waits for) too: it is one ``pread`` that
        waits for nothing, and the hand-off was most of a fetch on demand."""
        if isinstance(msg, wire.ChunkRequest):
            return True
        if not isinstance(msg, wire.Write | wire.Zero | wire.Entries):
            return False
        if not isinstance(msg, wire.Entries) and not msg.seq:
            return True
        side = self.sides.get(msg.pair_id)
        g = self.secondaries.get(side.record.group) if side is not None else None
        return g is not None and g.takes_now(msg)

    def compress_for(self, pid: str) -> str:
        """The codec of pair ``pid``'s volume data on its link (``pair create --compress``),
        looked up for every Write and Chunk this node sends (peer_link.py)."""
        side = self.sides.get(pid)
        return side.doc.compress if side is not None else "none"

    def handle_peer(self, peer_name: str, msg: wire.Message) -> wire.Message:
        return self.peer_requests.handle(peer_name, msg)
