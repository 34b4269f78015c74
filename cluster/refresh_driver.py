"""The glue that runs the refresh machines (cluster/refresh.py) of one agent.

Theory of operation
-------------------
:class:`~cluster.refresh.RefreshMachine` is pure: events and ``now`` in, actions out.  One
:class:`RefreshDriver` per agent owns one machine per pair of every resource this host is a
host of, feeds them what the loop hears, and carries out what they ask, in order, each
action finished before the next one starts.  It never blocks on anything slow: a replica
operation, a read of a volume's identity and every etcd request of the S-VOL lock go to
``spawn`` and come back on the loop (an etcd that does not answer holds up that pair's list
only, never the loop: the agent's heartbeats and lease renewals go on).

What the agent's loop calls, and when::

    d = RefreshDriver(host=..., state_dir=..., coord=..., keys=..., node=..., cache=...,
                      send_notice=..., emit=..., spawn=..., lease=...)
    d.track(resource, role, peer, now)   # a resource appears, or this host's role for it
                                         # changes (active / standby); peer: the other host
    d.forget(name)                       # a resource is gone, or this host is not its host
    body["flags"] = d.heartbeat_flags()  # in every heartbeat this host sends
    d.peer_flags(host, body["flags"], now)   # every heartbeat heard (the peer is up)
    d.notice(host, body, now)            # every datagram of kind "refresh"
    d.peer_lost(host, now)               # optional: the loop's liveness lost the peer
    d.begin(target, op, now)             # ``cluster split|resync RESOURCE|GROUP`` here
    d.get_timer() / d.handle_timer(now)  # arm the one timer it asks for; call it when due
    d.status(), d.ready(name), d.idle(target)   # for status files and the CLI
    d.unreflected(name)                  # the S-VOL devices a promotion must read afresh

``role`` is :class:`~cluster.refresh.HostRole`: the loop passes ACTIVE while this host runs
the resource and STANDBY otherwise (fenced, contending, stopping).  ``track`` raises only
for a call that makes no sense (a host that is not the resource's) and for a status file
that cannot be read (HeaderCorrupt: the flags are the host's only memory of an interrupted
exchange, never reset silently); a node that does not answer is retried.

``spawn(work, done, what)`` runs ``work()`` off the loop; the loop later calls
``done(result)`` on the loop, where ``result`` is what ``work`` returned (the driver's works
never raise: they return the exception instead).  ``what`` says whom the work waits on:
``"etcd"`` (the S-VOL lock) or ``"node"`` (a replica, a read of an identity).
``send_notice(peer, body)`` sends ``body`` as an authenticated datagram of kind
``refresh``; it is best effort (a lost notice is resent by the machine or replaced by the
next heartbeat), so a failure is logged, never retried here.

The pairs of a resource are the pairs of its groups as this host's node shows them
(``pair.display {"target": GROUP}``), listed when the resource is tracked, again at every
:meth:`~RefreshDriver.begin` and role change; a node that cannot be asked is asked again
every ``retry_interval``.  A pair found is restarted from its line in the status file
(``STATE_DIR/refresh.flags``, :mod:`cluster.flags_file`) with
:meth:`RefreshMachine.restart <cluster.refresh.RefreshMachine.restart>`; a pair with no
line is at rest, its operation seeded from the pair's state (PSUS or SSWS: the S-VOL is
visible under its own PVID, a split; any other state: a construction).  After a restart
and at every role change the machine is also fed that op as
:class:`~cluster.refresh.PairState` (taken only at rest): a takeover changes the pair's
state with no exchange, and the next refresh must be of the pair as it is.

Carrying out the actions, per pair and in list order:

* ``SaveFlags``: :meth:`FlagsFile.set <cluster.flags_file.FlagsFile.set>` (synced) before
  the next action.
* ``SendNotice``: ``send_notice(peer, encode_notice(...))``.
* ``RunReplica``: the node's ``pair.split`` or ``pair.resync`` in a spawned job, then
  ``ReplicaDone(ok, detail)`` back into the machine.  A consistency group is split (and
  resynced) as one unit (SPEC 2), so the driver collects its pairs' RunReplica: it waits
  until no pair of the group still waits for the standby's acknowledgement or retries from
  A1 (at most ``group_wait`` seconds), then runs one call naming the group.  When only
  some of the group's pairs asked (the others aborted, or were never begun: a kill in the
  middle of ``begin``) nothing runs and the ones that asked get ``ReplicaDone(ok=False)``:
  their reflection still runs, and the operator runs the command again.  With ``redo`` (a
  recovery), a pair already in the target state (split: PSUS; construction: COPY or PAIR)
  counts as done.
* ``TakeLock`` / ``ReleaseLock``: :func:`~cluster.coord.acquire_lock` /
  :func:`~cluster.coord.release_lock` of the pair id, under ``lease()`` (read on the loop),
  in a spawned job; the rest of the list waits for it.  A lock another
  host holds, no lease, or an etcd that does not answer is a failure (below): the machine
  retries after ``retry_interval``.
* ``ReadIdentityFromVolume``: in a spawned job, the pair listed again on this node (its
  S-VOL as it is now, below), then the PVID and VOL information of each S-VOL device read
  over NBD by ``read_identity(uri, export)`` (default: :func:`cluster.probe.probe`, which
  bypasses the cache); the rest of the list waits for it.
* ``StoreCacheEntry``: the identities read go into the host's PVID cache
  (:meth:`PvidCache.set_info <cluster.pvid_cache.PvidCache.set_info>`, or a new entry under
  the device's name).
* ``EraseCacheEntries``: the pair listed again in a spawned job (as for a read), then on
  the loop the S-VOL devices' entries are removed, except one that is the
  P-VOL's (read from a primary, or holding the P-VOL's PVID, which is exactly what the
  S-VOL carries after a construction); an attached entry is refused (a failure: detach it).
* ``ReportUsable``: ``emit("refresh.usable", ...)``; ``EmitEvent``: ``emit(name, ...)``.

An action that raises a :class:`~replicator.errors.PairvolError` (or ``OSError``) stops the
list: the machine gets ``ActionFailed(index)`` and says what to do.  Anything else is a bug
and propagates.  While a pair's list waits for a spawned action, the events for that pair
are queued and fed in order once the list is finished, so ``ActionFailed`` always names an
action of the list the machine returned last.

**Which device is the S-VOL.**  From the pair's rows in this node's ``pair.display``, as
the node shows them when the reflection runs (a ``pair resync --swap`` or a takeover made
outside the protocol moves the S-VOL without telling the agent): the S-VOL is the
``volume`` of the side whose ``role`` is ``secondary`` when this node holds it (the
standby's case), else the primary side's ``peer_volume`` (unknown on a side that was made
as the secondary and swapped since: it never learnt its peer's volume name).  The S-VOL
devices of the pair on this host are the resource's ``devices_on(host)`` whose export name
is that volume (the plugin's export name is the volume name, :func:`cluster.probe.probe`
checks it).  On
the active host this often matches its own P-VOL device as well (both nodes name the
volume alike): reading it again is harmless and erasing it is refused above.

**Peers.**  A resource's ``peer`` is the other host of the exchange.  It is up while its
heartbeats come (:meth:`~RefreshDriver.peer_flags`), lost ``peer_timeout`` seconds after
the last one (the machines get ``PeerLost``).  A host is heard only for pairs of resources
it is a host of, and only as the declared peer: flags or notices for anything else are
refused, logged once per peer and reason (``refresh.refused``), never raised.  Heartbeat
flags are ``{PAIR: [flag, serial, op or null]}`` (:func:`encode_heartbeat_flags`); a pair
missing from a peer's heartbeat is one its agent does not track (nothing is fed), and a
``begin`` that needs it is refused.

Events: the machines' ``refresh.*`` events as they are, with ``resource`` added, and the
driver's own: ``refresh.usable``, ``refresh.refused``, ``refresh.dropped`` (a notice the
machine refused: the hosts disagree on their roles), ``refresh.pairs``,
``refresh.discovery_failed``, ``refresh.replica_run``, ``refresh.send_failed``,
``refresh.peer_silent``, ``refresh.peer_heard``, ``refresh.no_device`` (no device of this
host is the pair's S-VOL), ``refresh.entry_kept``, ``refresh.pair_conflict`` (a pair listed
by two resources' groups), ``refresh.forgotten``.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from cluster.config import Resource
from cluster.coord import Coord, Keys, Lease, acquire_lock, lock_holder, release_lock
from cluster.flags_file import FlagsFile
from cluster.probe import parse_uri, probe
from cluster.pvid_cache import CacheEntry, CacheFile
from cluster.refresh import (
    Action,
    ActionFailed,
    Begin,
    EmitEvent,
    EraseCacheEntries,
    Event,
    Flag,
    HostRole,
    Op,
    PairFlags,
    PairState,
    PeerFlags,
    PeerLost,
    Phase,
    ReadIdentityFromVolume,
    RefreshMachine,
    ReleaseLock,
    ReplicaDone,
    ReportUsable,
    RoleChanged,
    RunReplica,
    SaveFlags,
    SendNotice,
    StoreCacheEntry,
    TakeLock,
    decode_notice,
    encode_notice,
    flag_from_wire,
)
from replicator.errors import (
    IllegalState,
    NotFound,
    PairvolError,
    ProtocolError,
    UsageError,
)
from replicator.export_info import VolInfo

FLAGS_FILE: Final = "refresh.flags"
#: The crash tests' fault-injection file (RefreshDriver._crash_point).
CRASH_FILE: Final = "refresh.crash-at"
#: Bounds of one node call: a listing, and a replica operation (an async split drains first:
#: the node's own bound is 120 s).
NODE_TIMEOUT: Final = 10.0
REPLICA_TIMEOUT: Final = 300.0
#: The target states in which a redone replica counts as done.
DONE_STATES: Final[Mapping[Op, frozenset[str]]] = {
    Op.SPLIT: frozenset({"PSUS"}),
    Op.CONSTRUCTION: frozenset({"COPY", "PAIR"}),
}
#: The pair states in which the S-VOL is visible under its own PVID (a split).
SPLIT_STATES: Final = frozenset({"PSUS", "SSWS"})


class NodeCall(Protocol):
    """This host's storage node (the agent's ``ControlNode``)."""

    def call(self, op: str, args: dict[str, Any], timeout: float) -> Any: ...


ReadIdentity = Callable[[str, str], VolInfo]
Spawn = Callable[[Callable[[], Any], Callable[[Any], None], str], None]


def read_identity_over_nbd(uri: str, export: str) -> VolInfo:
    """The PVID and VOL information of ``export`` at the server of ``uri``, straight from the
    volume (SPEC 1's refresh: the cache is not looked at)."""
    return probe(parse_uri(uri).with_export(export)).info


# -- heartbeat flags on the wire (pure) ------------------------------------------------------


def encode_heartbeat_flags(flags: Mapping[str, PeerFlags]) -> dict[str, list[Any]]:
    """``{PAIR: [flag, serial, op or None]}``: what a heartbeat's ``flags`` carries."""
    return {
        pair: [f.flag.value, f.serial, None if f.op is None else f.op.value]
        for pair, f in sorted(flags.items())
    }


def decode_heartbeat_flags(doc: object) -> dict[str, PeerFlags]:
    """A heartbeat's ``flags``; anything else raises ProtocolError, only that."""
    if not isinstance(doc, dict):
        raise ProtocolError(f"heartbeat flags are a JSON object, not {type(doc).__name__}")
    out: dict[str, PeerFlags] = {}
    for pair, line in doc.items():
        if not isinstance(pair, str) or not pair or len(pair) > 255 or not pair.isprintable():
            raise ProtocolError(f"pair id {pair!r} is not a printable string of 1-255 characters")
        if not isinstance(line, list) or len(line) != 3:
            raise ProtocolError(f"pair {pair}: flags {line!r} are not [flag, serial, op]")
        flag, serial, op = line
        if op is not None and (not isinstance(op, str) or op not in {o.value for o in Op}):
            raise ProtocolError(f"pair {pair}: operation {op!r} is not split or construction")
        out[pair] = PeerFlags(flag_from_wire(flag), serial, None if op is None else Op(op))
    return out


# -- the driver's records --------------------------------------------------------------------


@dataclass(eq=False)
class _Pair:
    id: str
    group: str
    resource: str
    machine: RefreshMachine
    rows: list[dict[str, Any]]  # this node's sides of the pair (pair.display)
    saved: PairFlags  # its line in the status file (the machine may be further: busy)
    busy: bool = False  # its action list waits for a spawned action
    queue: deque[Event] = field(default_factory=deque)
    identity: dict[str, tuple[str, str, VolInfo]] | None = None  # device → (uri, export, read)
    ask: RunReplica | None = None  # RunReplica asked for, not started yet
    asked_at: float = 0.0
    running: bool = False  # its replica runs
    last: dict[str, Any] | None = None  # how the last exchange ended


@dataclass(eq=False)
class _Tracked:
    resource: Resource
    role: HostRole
    peer: str | None
    pairs: list[str] | None = None  # None: not listed yet (the node did not answer)
    retry_at: float | None = None


@dataclass(eq=False)
class _Peer:
    heard: float
    up: bool = True
    listed: frozenset[str] = frozenset()  # the pairs its last heartbeat carried


class RefreshDriver:
    """One agent's refresh machines, and the adapter that carries out their actions."""

    def __init__(
        self,
        *,
        host: str,
        state_dir: str,
        coord: Coord,
        keys: Keys,
        node: NodeCall,
        cache: CacheFile,
        send_notice: Callable[[str, dict[str, Any]], None],
        emit: Callable[..., None],
        spawn: Spawn,
        lease: Callable[[], Lease | None],
        read_identity: ReadIdentity = read_identity_over_nbd,
        retry_interval: float = 1.0,
        peer_timeout: float = 1.0,
        group_wait: float = 10.0,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if not retry_interval > 0 or not peer_timeout > 0 or not group_wait > 0:
            raise UsageError("retry interval, peer timeout and group wait must be positive")
        self.host = host
        self.flags = FlagsFile(os.path.join(state_dir, FLAGS_FILE), host)
        self._crash_file = os.path.join(state_dir, CRASH_FILE)
        self._coord = coord
        self._keys = keys
        self._node = node
        self._cache = cache
        self._send = send_notice
        self._emit = emit
        self._spawn = spawn
        self._lease = lease
        self._read_identity = read_identity
        self._retry = retry_interval
        self._peer_timeout = peer_timeout
        self._group_wait = group_wait
        self._wall_ns = wall_ns
        self._now = 0.0
        self._tracked: dict[str, _Tracked] = {}
        self._pairs: dict[str, _Pair] = {}
        self._peers: dict[str, _Peer] = {}
        self._begun: dict[str, list[str]] = {}
        self._logged: set[tuple[str, ...]] = set()

    # -- resources ----------------------------------------------------------------------

    def track(self, resource: Resource, role: HostRole, peer: str | None, now: float) -> None:
        """Declare ``resource`` with this host's ``role`` for it and the host on the other
        side of its exchanges (None: none).  The first call lists its pairs and restarts
        their machines from the status file; a later one with another role is a role change
        (RoleChanged: a restart under the new role from the current flags)."""
        now = self._tick(now)
        if not isinstance(role, HostRole):
            raise UsageError(f"host role {role!r} is not active or standby")
        if self.host not in resource.hosts:
            raise UsageError(f"resource {resource.name}: {self.host} is not one of its hosts")
        if peer is not None and (peer == self.host or peer not in resource.hosts):
            raise UsageError(f"resource {resource.name}: {peer!r} is not another of its hosts")
        t = self._tracked.get(resource.name)
        if t is None:
            t = self._tracked[resource.name] = _Tracked(resource, role, peer)
            changed_role = False
        else:
            same = (t.resource, t.role, t.peer) == (resource, role, peer)
            changed_role = role is not t.role
            t.resource, t.role, t.peer = resource, role, peer
            if same and t.pairs is not None:
                return
        if peer is not None and peer not in self._peers:
            self._peers[peer] = _Peer(heard=now)  # heard from now on: a grace of peer_timeout
        self._list(t, now, changed_role=changed_role)
        self._launch(now)

    def forget(self, resource_name: str) -> None:
        """Stop running the resource's machines (their status-file lines stay); the S-VOL
        locks this host holds for its pairs are released (in a spawned job) if etcd answers."""
        t = self._tracked.pop(resource_name, None)
        if t is None:
            return
        for pid in t.pairs or []:
            self._drop(pid)
        for target in [k for k, pids in self._begun.items() if set(pids) <= set(t.pairs or [])]:
            del self._begun[target]

    # -- heartbeats and notices ---------------------------------------------------------

    def heartbeat_flags(self) -> dict[str, Any]:
        """Every tracked pair's ``[flag, serial, op]``, for the heartbeat body's ``flags``:
        what its line in the status file says, never a flag the machine asked for that is
        not saved yet (a list waiting for a spawned action may still fail before it saves,
        and the peer would act on a state this host never reached)."""
        return encode_heartbeat_flags(
            {pid: p.saved.on_heartbeat() for pid, p in self._pairs.items()}
        )

    def peer_flags(self, peer: str, flags: Any, now: float) -> None:
        """A heartbeat's ``flags`` from ``peer``: the peer is up, and each pair it may speak
        for gets its flags (PeerFlags).  Malformed flags, or pairs of resources ``peer`` is
        not a host of, are refused and logged once."""
        now = self._tick(now)
        try:
            decoded = decode_heartbeat_flags(flags)
        except ProtocolError as e:
            self._refuse(peer, "malformed flags", str(e))
            return
        state = self._peers.get(peer)
        if state is None or not any(t.peer == peer for t in self._tracked.values()):
            for pid in decoded:
                if pid in self._pairs:
                    self._trusted(peer, pid, "flags")  # logs the refusal
            return
        listed: set[str] = set()
        for pid, pf in decoded.items():
            p = self._trusted(peer, pid, "flags")
            if p is None:
                continue
            listed.add(pid)
            self._feed(p, pf, now)
        state.heard, state.listed = now, frozenset(listed)
        if not state.up:
            state.up = True
            self._emit("refresh.peer_heard", peer=peer)
        self._launch(now)

    def notice(self, peer: str, body: Any, now: float) -> None:
        """A datagram of kind ``refresh`` from ``peer``.  A malformed one, one for a pair
        ``peer`` may not speak for, or one the machine refuses (the hosts disagree on their
        roles) is logged and dropped."""
        now = self._tick(now)
        try:
            n = decode_notice(body)
        except ProtocolError as e:
            self._refuse(peer, "malformed notice", str(e))
            return
        p = self._trusted(peer, n.pair, "notice")
        if p is None:
            return
        self._feed(p, n, now)
        self._launch(now)

    def peer_lost(self, peer: str, now: float, reason: str = "") -> None:
        """The loop's liveness says ``peer`` is lost (the driver also finds out by itself,
        ``peer_timeout`` after its last heartbeat)."""
        now = self._tick(now)
        state = self._peers.get(peer)
        if state is not None and state.up:
            self._lose(peer, state, reason or "the agent lost its heartbeat", now)
            self._launch(now)

    # -- commands -----------------------------------------------------------------------

    def begin(self, target: str, op: Op, now: float) -> list[str]:
        """``cluster split|resync TARGET`` on this (active) host: start the exchange for
        every pair of the resource or group ``target``; the pair ids.  Refused, with nothing
        started, when this host is not the resource's active, the target is unknown or has
        no pairs, an exchange of one of its pairs is running, or the standby is lost or does
        not know one of the pairs."""
        now = self._tick(now)
        if not isinstance(op, Op):
            raise UsageError(f"operation {op!r} is not split or construction")
        t, groups = self._resolve(target)
        r = t.resource
        if t.role is not HostRole.ACTIVE:
            raise IllegalState(
                f"resource {r.name}: {self.host} is its {t.role} host; run it on the active host"
            )
        if t.peer is None:
            raise IllegalState(
                f"resource {r.name} has no standby to refresh; use the pair commands directly"
            )
        if not self._list(t, now, changed_role=False, strict=True):
            raise IllegalState(f"resource {r.name}: its pairs could not be listed")
        pids = [pid for pid in t.pairs or [] if self._pairs[pid].group in groups]
        if not pids:
            raise IllegalState(
                f"{target}: no pairs on {self.host}'s node in group(s) {', '.join(groups)}"
            )
        peer = self._peers[t.peer]
        for pid in pids:
            p = self._pairs[pid]
            m = p.machine
            if p.busy or p.queue or p.ask or p.running or m.phase is not Phase.IDLE:
                raise IllegalState(
                    f"pair {pid}: an exchange is already running (phase {m.phase}, flag "
                    f"{m.own}); wait for it"
                )
            if not peer.up or not m.peer_up:
                raise IllegalState(
                    f"pair {pid}: the standby {t.peer} is not heard; its cache could not be "
                    "refreshed (wait for it, or use the pair commands and refresh it later)"
                )
            if pid not in peer.listed:
                raise IllegalState(
                    f"pair {pid}: the standby {t.peer} does not report it (its agent does not "
                    f"track resource {r.name} yet)"
                )
            if op is Op.CONSTRUCTION:
                self._check_detached(p)
        for pid in pids:
            p = self._pairs[pid]
            self._carry(p, p.machine.handle(Begin(op), now), 0, now)
        self._begun[target] = pids
        self._launch(now)
        return pids

    # -- time ---------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` wants to be called (None: never, until something
        comes in)."""
        due: list[float] = []
        for p in self._pairs.values():
            if p.ask is not None:
                due.append(p.asked_at + self._group_wait)
            if not p.busy:
                t = p.machine.get_timer()
                if t is not None:
                    due.append(t)
        counterparts = {t.peer for t in self._tracked.values()}
        for name, state in self._peers.items():
            if state.up and name in counterparts:
                due.append(state.heard + self._peer_timeout)
        due += [t.retry_at for t in self._tracked.values() if t.retry_at is not None]
        return min(due) if due else None

    def handle_timer(self, now: float) -> None:
        now = self._tick(now)
        counterparts = {t.peer for t in self._tracked.values()}
        for name, state in list(self._peers.items()):
            if state.up and name in counterparts and now >= state.heard + self._peer_timeout:
                self._lose(name, state, f"no heartbeat for {self._peer_timeout:g}s", now)
        for t in list(self._tracked.values()):
            if t.retry_at is not None and now >= t.retry_at:
                self._list(t, now, changed_role=False)
        for p in list(self._pairs.values()):
            if self._pairs.get(p.id) is not p or p.busy:
                continue
            t_due = p.machine.get_timer()
            if t_due is not None and now >= t_due:
                self._carry(p, p.machine.handle_timer(now), 0, now)
        self._launch(now)

    # -- what the loop reads ------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Per pair: its resource, group, this host's role, own and peer flags, serials,
        operation, phase, whether it is ready, and how its last exchange ended."""
        out: dict[str, Any] = {}
        for pid, p in sorted(self._pairs.items()):
            m = p.machine
            f = m.flags
            out[pid] = {
                "resource": p.resource,
                "group": p.group,
                "role": str(m.role),
                "own": str(f.own),
                "peer": str(f.peer),
                "serial": f.serial,
                "peer_serial": f.peer_serial,
                "op": None if f.op is None else str(f.op),
                "phase": str(m.phase),
                "peer_up": m.peer_up,
                "cache_stale": f.cache_stale,
                "replica_running": p.running or p.ask is not None,
                "busy": p.busy,
                "ready": self._pair_ready(p),
                "last": p.last,
            }
        return out

    def unreflected(self, resource_name: str) -> dict[str, str]:
        """This host's devices of the resource while one of its pairs is in an exchange
        here as the standby (B1: the peer's replica may have run; B2: reflecting), or has
        its cache marked stale: device name → why.  Their cache entries may not show what
        the replica did yet (a standby promoted now reads them from their volumes).  Every
        device of the resource, not only those the rows name as the S-VOL: the rows were
        listed earlier and may be stale, and reading a true entry again changes nothing.
        The flags are the saved ones: a list waiting for its read has its machine at B3."""
        t = self._tracked.get(resource_name)
        for p in self._pairs.values():
            f = p.saved
            if t is None or p.resource != resource_name:
                continue
            if f.own in (Flag.B1, Flag.B2) or f.cache_stale:
                why = f"refresh {f.op} of {p.id} at {f.own}"
                why += " (cache stale)" if f.cache_stale else ""
                return dict.fromkeys(sorted(t.resource.devices_on(self.host)), why)
        return {}

    def ready(self, resource_name: str) -> bool:
        """Every pair of the resource at rest here, and this host's cache true for it (a
        standby: refreshed, not stale, and in step with the active)."""
        t = self._tracked.get(resource_name)
        if t is None or t.pairs is None:
            return False
        return all(self._pair_ready(self._pairs[pid]) for pid in t.pairs)

    def idle(self, target: str) -> bool:
        """The exchange begun for ``target`` has finished (no exchange of its pairs runs)."""
        pids = self._begun.get(target)
        if pids is None:
            t, groups = self._resolve(target)
            pids = [pid for pid in t.pairs or [] if self._pairs[pid].group in groups]
        return all(self._pair_idle(self._pairs[pid]) for pid in pids if pid in self._pairs)

    # -- internals: feeding a machine and carrying out its actions ----------------------

    def _tick(self, now: float) -> float:
        self._now = max(self._now, now)
        return self._now

    def _feed(self, p: _Pair, event: Event, now: float) -> None:
        if p.busy:
            if isinstance(event, PeerFlags) and p.queue and isinstance(p.queue[-1], PeerFlags):
                p.queue[-1] = event  # heartbeats while a read runs: only the newest matters
            else:
                p.queue.append(event)
            return
        try:
            actions = p.machine.handle(event, now)
        except IllegalState as e:
            kind = type(event).__name__
            self._once(("dropped", p.id, kind, str(p.machine.role), str(p.machine.phase)),
                       "refresh.dropped", resource=p.resource, pair=p.id, event=kind,
                       reason=str(e))  # fmt: skip
            return
        self._carry(p, actions, 0, now)

    def _carry(self, p: _Pair, actions: list[Action], start: int, now: float) -> None:
        for i in range(start, len(actions)):
            if self._pairs.get(p.id) is not p:
                return  # forgotten meanwhile
            a = actions[i]
            try:
                remote = self._remote(p, a)
                if remote is None:
                    self._do(p, a)
            except (PairvolError, OSError) as e:
                self._failed(p, i, e, now)
                return
            if remote is not None:
                p.busy = True
                work, what = remote
                self._spawn(
                    functools.partial(_attempt, work),
                    functools.partial(self._resumed, p, actions, i),
                    what,
                )
                return
        p.busy = False
        while p.queue and not p.busy and self._pairs.get(p.id) is p:
            self._feed(p, p.queue.popleft(), now)

    def _failed(self, p: _Pair, index: int, error: BaseException, now: float) -> None:
        reason = str(error) or type(error).__name__
        self._carry(p, p.machine.handle(ActionFailed(index, reason), now), 0, now)

    def _remote(self, p: _Pair, a: Action) -> tuple[Callable[[], object], str] | None:
        """The work that carries out ``a`` off the loop and whom it waits on, if ``a`` talks
        to another process (etcd for the S-VOL lock, a node for a volume's identity); None
        for the rest.  What the work needs of the loop's state is taken here, on the loop."""
        if isinstance(a, ReadIdentityFromVolume | EraseCacheEntries):
            read = isinstance(a, ReadIdentityFromVolume)
            r = self._tracked[p.resource].resource
            return functools.partial(self._fresh, p.group, p.id, r, read), "node"
        if isinstance(a, TakeLock):
            return functools.partial(self._take_lock, p.id, self._lease()), "etcd"
        if isinstance(a, ReleaseLock):
            return functools.partial(self._release, p.id), "etcd"
        return None

    def _fresh(self, group: str, pid: str, resource: Resource, read: bool) -> object:
        """Off the loop: the pair's rows as this node shows them now (the rows listed
        earlier may be stale: a ``pair resync --swap`` or a takeover outside the protocol
        moves the S-VOL) and, with ``read``, the identities of the S-VOL devices they name,
        straight from the volumes: (rows, device → (uri, export, identity) or None)."""
        try:
            reply = self._node.call("pair.display", {"target": group}, NODE_TIMEOUT)
            rows = _rows(reply).get(pid, [])
        except NotFound:
            rows = []
        if not read:
            return rows, None
        devices = _devices_named(resource, self.host, _svol_name(rows))
        return rows, {
            dev: (uri, exp, self._read_identity(uri, exp)) for dev, (uri, exp) in devices.items()
        }

    def _resumed(self, p: _Pair, actions: list[Action], index: int, result: object) -> None:
        """Back on the loop: the list goes on after the spawned ``actions[index]``."""
        if self._pairs.get(p.id) is not p:
            return
        now = self._now
        if isinstance(result, BaseException):
            p.busy = False  # the machine's answer to the failure is a new list
            self._failed(p, index, result, now)
        else:
            a = actions[index]
            if isinstance(a, ReadIdentityFromVolume | EraseCacheEntries):
                assert isinstance(result, tuple)
                rows, p.identity = result
                p.rows = rows or p.rows
                if isinstance(a, EraseCacheEntries):
                    try:
                        self._erase(p)
                    except (PairvolError, OSError) as e:
                        p.busy = False
                        self._failed(p, index, e, now)
                        self._launch(now)
                        return
            self._carry(p, actions, index + 1, now)
        self._launch(now)

    def _do(self, p: _Pair, a: Action) -> None:
        if isinstance(a, SaveFlags):
            self.flags.set(a.pair, a.flags)
            p.saved = a.flags
            self._crash_point(p, str(a.flags.own))
        elif isinstance(a, SendNotice):
            peer = self._tracked[p.resource].peer
            if peer is None:
                return
            try:
                self._send(peer, encode_notice(a.notice))
            except (PairvolError, OSError) as e:
                self._emit("refresh.send_failed", resource=p.resource, pair=p.id, peer=peer,
                           notice=str(a.notice.kind), reason=str(e))  # fmt: skip
        elif isinstance(a, RunReplica):
            p.ask, p.asked_at = a, self._now
        elif isinstance(a, StoreCacheEntry):
            self._store(p)
        elif isinstance(a, ReportUsable):
            self._emit("refresh.usable", resource=p.resource, pair=p.id,
                       devices=sorted(self._svol_devices(p)))  # fmt: skip
        elif isinstance(a, EmitEvent):
            fields = a.as_dict()
            if a.name in ("refresh.done", "refresh.aborted"):
                p.last = {"event": a.name, **fields}
            self._emit(a.name, resource=p.resource, **fields)
        else:  # TakeLock, ReleaseLock, ReadIdentityFromVolume, EraseCacheEntries: _remote
            raise AssertionError(f"unexpected action {a!r}")

    def _crash_point(self, p: _Pair, flag: str) -> None:
        """Fault injection for the crash tests: a file ``STATE_DIR/refresh.crash-at`` naming
        a flag makes the agent SIGKILL itself right after it saved that flag (once; the file
        is removed first).  Only root can write the agent's state directory."""
        try:
            with open(self._crash_file) as f:
                wanted = f.read().strip()
        except FileNotFoundError:
            return
        if wanted != flag:
            return
        os.unlink(self._crash_file)
        self._emit("refresh.crash", resource=p.resource, pair=p.id, flag=flag)
        os.kill(os.getpid(), signal.SIGKILL)

    def _release(self, pid: str) -> None:
        release_lock(self._coord, self._keys, pid, self.host)

    def _take_lock(self, pid: str, lease: Lease | None) -> None:
        if lease is None:
            raise IllegalState(f"pair {pid}: no etcd lease, so no S-VOL lock")
        if not acquire_lock(self._coord, self._keys, pid, self.host, lease):
            holder = lock_holder(self._coord, self._keys, pid)
            raise IllegalState(f"pair {pid}: the S-VOL lock is held by {holder or 'nobody'}")

    # -- internals: the cache -----------------------------------------------------------

    def _svol_devices(self, p: _Pair) -> dict[str, tuple[str, str]]:
        """The S-VOL's devices on this host: device name → (export URI, export name)."""
        return _devices_named(self._tracked[p.resource].resource, self.host, _svol_name(p.rows))

    @staticmethod
    def _pvol_pvid(p: _Pair) -> str | None:
        for row in p.rows:
            if row.get("role") == "primary" and isinstance(row.get("pvid"), str):
                return str(row["pvid"])
        return None

    def _store(self, p: _Pair) -> None:
        read, p.identity = p.identity, None
        if read is None:
            raise IllegalState(f"pair {p.id}: nothing was read to store")
        if not read:
            self._once(("no device", p.id), "refresh.no_device", resource=p.resource,
                       pair=p.id, svol=_svol_name(p.rows) or "?")  # fmt: skip
            return
        ns = self._wall_ns()
        with self._cache.update() as cache:
            for dev, (uri, export, vol) in sorted(read.items()):
                if dev in cache.entries:
                    cache.set_info(dev, vol, ns)
                else:
                    cache.record_scan(
                        dev, CacheEntry(uri=uri, export=export, vol=vol, scanned_ns=ns)
                    )

    @staticmethod
    def _serving(p: _Pair) -> bool:
        """Whether this host's side of the pair is an S-VOL taken over (SSWS, or PSUE while
        its pull waits for the old primary: the node's ``taken_over``): writable here, the
        application's volume, so its cache entries are this host's own and are never erased
        as a standby's copy (a new active that adopted a construction would otherwise erase,
        or fail on, the very device it serves)."""
        return any(r.get("role") == "secondary" and r.get("taken_over") for r in p.rows)

    def _erase(self, p: _Pair) -> None:
        if self._serving(p):
            self._once(("serving", p.id), "refresh.entry_kept", resource=p.resource, pair=p.id,
                       device="*", pvid="", why="SSWS: the S-VOL is served here")  # fmt: skip
            return
        devices = self._svol_devices(p)
        pvol = self._pvol_pvid(p)
        kept: list[tuple[str, str]] = []
        with self._cache.update() as cache:
            for dev in sorted(devices):
                entry = cache.entries.get(dev)
                if entry is None:
                    continue
                if entry.vol.role == "primary" or entry.pvid == pvol:
                    kept.append((dev, entry.pvid))  # the P-VOL's, or already right
                    continue
                if entry.attachment is not None:
                    raise IllegalState(
                        f"pair {p.id}: device {dev} is attached as {entry.attachment.device}; "
                        "detach it so its entry can be erased"
                    )
                cache.remove(dev)
        for dev, pvid in kept:
            self._once(("kept", p.id, dev), "refresh.entry_kept", resource=p.resource,
                       pair=p.id, device=dev, pvid=pvid)  # fmt: skip

    def _check_detached(self, p: _Pair) -> None:
        if self._serving(p):
            return  # the resync goes the other way (a swap): this S-VOL stays in use
        cache = self._cache.read()
        pvol = self._pvol_pvid(p)
        for dev in sorted(self._svol_devices(p)):
            entry = cache.entries.get(dev)
            if entry is None or entry.vol.role == "primary" or entry.pvid == pvol:
                continue
            if entry.attachment is not None:
                raise IllegalState(
                    f"pair {p.id}: its S-VOL is attached here as {dev} "
                    f"({entry.attachment.device}); detach it before the resync"
                )

    # -- internals: replicas ------------------------------------------------------------

    def _launch(self, now: float) -> None:
        """Start the replicas asked for, one job per group (see the module docstring)."""
        groups: dict[tuple[str, str, Op], list[_Pair]] = {}
        for p in self._pairs.values():
            if p.ask is not None:
                groups.setdefault((p.resource, p.group, p.ask.op), []).append(p)
        for (res, group, op), asking in sorted(groups.items(), key=lambda kv: kv[0]):
            members = [q for q in self._pairs.values() if (q.resource, q.group) == (res, group)]
            oldest = min(p.asked_at for p in asking)
            waiting = [q for q in members if q.ask is None and not q.running and _on_the_way(q)]
            if waiting and now < oldest + self._group_wait:
                continue
            redo = {p.id for p in asking if p.ask is not None and p.ask.redo}
            for p in asking:
                p.ask, p.running = None, True
            ids = sorted(p.id for p in asking)
            self._emit("refresh.replica_run", resource=res, group=group, op=str(op),
                       pairs=ids, redo=sorted(redo))  # fmt: skip
            self._spawn(
                functools.partial(
                    _attempt,
                    functools.partial(
                        self._replica, group, op, ids, sorted(q.id for q in members), redo
                    ),
                ),
                functools.partial(self._replica_done, list(asking)),
                "node",
            )

    def _replica(
        self, group: str, op: Op, ids: list[str], members: list[str], redo: set[str]
    ) -> dict[str, tuple[bool, str, list[dict[str, Any]]]]:
        """Off the loop: the node's split or resync of the whole group; pair id → (ok,
        detail, its rows).  Only some of the group's pairs (the others aborted, or were
        never begun: a kill in the middle of begin) is a failure, not a split of those
        alone: a consistency group is split (and resynced) as one unit (SPEC 2)."""
        node_op = "pair.split" if op is Op.SPLIT else "pair.resync"
        out: dict[str, tuple[bool, str, list[dict[str, Any]]]] = {}
        todo = list(ids)
        if redo:
            try:
                rows = _rows(self._node.call("pair.display", {"target": group}, NODE_TIMEOUT))
            except PairvolError:
                rows = {}
            for pid in sorted(redo):
                state = next(
                    (r.get("state") for r in rows.get(pid, []) if r.get("role") == "primary"), None
                )
                if state in DONE_STATES[op]:
                    out[pid] = (True, f"already {state}", rows[pid])
                    todo.remove(pid)
        if not todo:
            return out
        if set(todo) != set(members):
            absent = ", ".join(sorted(set(members) - set(todo)))
            detail = (
                f"{node_op} {group} not run: {absent} of the group is not in this exchange, and "
                f"a group is split or resynced as one unit; run the command for {group} again"
            )
            return {**out, **{pid: (False, detail, []) for pid in todo}}
        try:
            reply = _rows(self._node.call(node_op, {"target": group}, REPLICA_TIMEOUT))
        except PairvolError as e:
            return {**out, **{pid: (False, f"{node_op} {group}: {e}", []) for pid in todo}}
        return {**out, **{pid: (True, "", reply.get(pid, [])) for pid in todo}}

    def _replica_done(self, batch: list[_Pair], result: object) -> None:
        now = self._now
        results: Mapping[str, tuple[bool, str, list[dict[str, Any]]]] = (
            result if isinstance(result, dict) else {}
        )
        for p in batch:
            if self._pairs.get(p.id) is not p:
                continue
            p.running = False
            ok, detail, rows = results.get(p.id, (False, str(result), []))
            if rows:
                p.rows = rows
            self._feed(p, ReplicaDone(ok, detail), now)
        self._launch(now)

    # -- internals: resources, pairs, peers ---------------------------------------------

    def _list(self, t: _Tracked, now: float, *, changed_role: bool, strict: bool = False) -> bool:
        """List the resource's pairs on this node and start, re-role or drop machines.
        False (and a retry later) if the node did not answer; ``strict``: raise instead."""
        rows: dict[str, list[dict[str, Any]]] = {}
        groups: dict[str, str] = {}
        for group in t.resource.groups:
            try:
                found = _rows(self._node.call("pair.display", {"target": group}, NODE_TIMEOUT))
            except NotFound:
                found = {}
            except PairvolError as e:
                if strict:
                    raise
                t.retry_at = now + self._retry
                self._once(("discovery", t.resource.name, str(e)), "refresh.discovery_failed",
                           resource=t.resource.name, group=group, reason=str(e))  # fmt: skip
                if changed_role:
                    self._reroles(t, now)
                return False
            for pid, sides in found.items():
                rows[pid], groups[pid] = sides, group
        t.retry_at = None
        old = set(t.pairs or [])
        for pid in sorted(old - set(rows)):
            self._drop(pid)
        saved = self.flags.read() if set(rows) - old else None
        peer = self._peers.get(t.peer) if t.peer is not None else None
        for pid in sorted(rows):
            p = self._pairs.get(pid)
            if p is not None and p.resource != t.resource.name:
                self._once(("taken", pid, t.resource.name), "refresh.pair_conflict",
                           resource=t.resource.name, pair=pid, owner=p.resource)  # fmt: skip
                del rows[pid]
                continue
            op = _state_op(rows[pid])
            if p is not None:
                p.rows = rows[pid]
                if changed_role:
                    self._feed(p, RoleChanged(t.role), now)
                    self._feed(p, PairState(op), now)  # a takeover changed it, no exchange
                continue
            assert saved is not None
            flags = saved.pairs.get(pid) or PairFlags(op=op)
            m, actions = RefreshMachine.restart(
                pid, t.role, flags, now, retry_interval=self._retry,
                peer_up=peer is not None and peer.up,
            )  # fmt: skip
            p = _Pair(pid, groups[pid], t.resource.name, m, rows[pid], flags)
            self._pairs[pid] = p
            self._carry(p, actions, 0, now)
            self._feed(p, PairState(op), now)  # changed while this agent was away
        t.pairs = sorted(rows)
        if set(t.pairs) != old:
            self._emit("refresh.pairs", resource=t.resource.name, pairs=t.pairs, role=str(t.role))
        return True

    def _reroles(self, t: _Tracked, now: float) -> None:
        for pid in t.pairs or []:
            self._feed(self._pairs[pid], RoleChanged(t.role), now)

    def _drop(self, pid: str) -> None:
        p = self._pairs.pop(pid, None)
        if p is None:
            return

        def released(result: object) -> None:
            if isinstance(result, BaseException):
                self._emit("refresh.forgotten", resource=p.resource, pair=pid,
                           lock=f"not released: {result}")  # fmt: skip

        self._spawn(
            functools.partial(_attempt, functools.partial(self._release, pid)), released, "etcd"
        )

    def _resolve(self, target: str) -> tuple[_Tracked, tuple[str, ...]]:
        """The tracked resource ``target`` names (a resource, or one of its groups) and the
        groups meant."""
        t = self._tracked.get(target)
        if t is not None:
            return t, t.resource.groups
        for t in self._tracked.values():
            if target in t.resource.groups:
                return t, (target,)
        known = ", ".join(sorted(self._tracked)) or "none"
        raise NotFound(
            f"{target!r} is no resource or group of a resource on {self.host} (resources: {known})"
        )

    def _trusted(self, peer: str, pid: str, what: str) -> _Pair | None:
        """The pair, if ``peer`` may speak for it; else None (refused, logged once)."""
        p = self._pairs.get(pid)
        if p is None:
            if what == "notice":  # flags for pairs we do not share are no news
                self._refuse(peer, f"{what} for {pid}", f"{self.host} does not track pair {pid}")
            return None
        t = self._tracked[p.resource]
        if peer not in t.resource.hosts:
            self._refuse(peer, f"{what} for {pid}",
                         f"{peer} is not a host of resource {p.resource}")  # fmt: skip
            return None
        if peer != t.peer:
            self._refuse(peer, f"{what} for {pid}",
                         f"{peer} is not the peer of resource {p.resource} ({t.peer})")  # fmt: skip
            return None
        return p

    def _lose(self, peer: str, state: _Peer, reason: str, now: float) -> None:
        state.up = False
        self._emit("refresh.peer_silent", peer=peer, reason=reason)
        for p in list(self._pairs.values()):
            if self._tracked[p.resource].peer == peer and self._pairs.get(p.id) is p:
                self._feed(p, PeerLost(reason), now)

    def _refuse(self, peer: str, what: str, reason: str) -> None:
        self._once(("refused", peer, what), "refresh.refused", peer=peer, what=what, reason=reason)

    def _once(self, key: tuple[str, ...], name: str, **fields: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            self._emit(name, **fields)

    def _pair_idle(self, p: _Pair) -> bool:
        return p.machine.phase is Phase.IDLE and not (
            p.busy or p.queue or p.ask is not None or p.running
        )

    def _pair_ready(self, p: _Pair) -> bool:
        m = p.machine
        if not self._pair_idle(p) or m.own is not Flag.ZERO or m.flags.cache_stale:
            return False
        return m.ready if m.role is HostRole.STANDBY else True


def _state_op(rows: list[dict[str, Any]]) -> Op:
    """The op a pair's state on this node stands for: split (PSUS or SSWS: the S-VOL is
    visible under its own PVID) or construction (any other)."""
    states = {"SSWS" if r.get("taken_over") else r.get("state") for r in rows}
    return Op.SPLIT if states & SPLIT_STATES else Op.CONSTRUCTION


def _svol_name(rows: list[dict[str, Any]]) -> str | None:
    """The S-VOL's volume name from a node's rows of the pair: the volume of a secondary
    side, else a primary side's peer volume (a side made secondary, then swapped, does not
    know its peer's volume name: "")."""
    for row in rows:
        if row.get("role") == "secondary" and isinstance(row.get("volume"), str):
            return str(row["volume"]) or None
    for row in rows:
        if row.get("role") == "primary" and row.get("peer_volume"):
            return str(row["peer_volume"])
    return None


def _devices_named(resource: Resource, host: str, name: str | None) -> dict[str, tuple[str, str]]:
    """``resource``'s devices on ``host`` whose export is named ``name``: device name →
    (export URI, export name)."""
    out: dict[str, tuple[str, str]] = {}
    if name is None:
        return out
    for dev, uri in resource.devices_on(host).items():
        try:
            export = parse_uri(uri).export.name
        except UsageError:
            continue
        if export == name:
            out[dev] = (uri, name)
    return out


def _attempt(work: Callable[[], object]) -> object:
    """What a spawned action returns: its result, or the failure it raised (the loop feeds
    it to the machine as ActionFailed)."""
    try:
        return work()
    except (PairvolError, OSError) as e:
        return e


def _on_the_way(p: _Pair) -> bool:
    """The pair's machine will ask for its replica unless the exchange aborts: it waits for
    the standby's acknowledgement, takes the S-VOL lock (in a spawned job), or retries from
    A1 (a failed TakeLock, say)."""
    m = p.machine
    return (
        m.phase is Phase.AWAIT_ACK
        or (m.phase is Phase.REPLICA and p.busy)
        or (m.phase is Phase.RETRY and m.own is Flag.A1)
    )


def _rows(reply: Any) -> dict[str, list[dict[str, Any]]]:
    """A node reply's ``pairs`` by pair id (an in-node pair has two sides with one id)."""
    pairs = reply.get("pairs") if isinstance(reply, dict) else None
    if not isinstance(pairs, list):
        raise ProtocolError(f"the node's answer has no pairs list: {str(reply)[:80]}")
    out: dict[str, list[dict[str, Any]]] = {}
    for row in pairs:
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            out.setdefault(row["id"], []).append(row)
    return out
