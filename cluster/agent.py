"""The cluster agent: the loop around one FailoverCore per resource.

Theory of operation
-------------------
Every decision is made by the pure cores: :class:`cluster.failover.FailoverCore` (one per
resource: lease, leader key, epoch, fencing deadline, failsafe, switchover) and, once wired
in, the refresh protocol's machines.  This module only carries out what they ask and feeds
back what happened, with ``now`` (monotonic seconds):

* **One thread, one select.**  :meth:`Agent.run` waits on the agents' UDP
  :class:`~cluster.agent_link.Endpoint` and a wake-up pipe, until the earliest timer of the
  cores or of the loop's own polls.  :meth:`Agent.step` is one turn: datagrams in, finished
  work in, due timers, polls, heartbeats out, the status file.
* **Nothing slow on the loop.**  etcd requests go to one worker thread, in order (a hung
  etcd holds up only etcd requests, never the heartbeats the failsafe rests on); the
  storage takeover, the switchover's swap and the application's commands run in job
  threads.  Each posts its answer back as a callable the loop runs: the event for the core
  (LeaseRenewed carries the time the renewal was *sent*, as the core requires).
* **Fencing is on the loop**, at once: FenceNode has the node refuse writes for the
  resource's groups (``pair.fence``), bounded by what is left before the lease could expire.
* **Leader key**: read every heartbeat interval per resource (LeaderObserved / LeaderGone,
  with the epoch and a switchover's handover), together with the resource's operator
  request (``pairvol cluster switchover``), which the active answers in the same key.
* **Heartbeats**: the cores' SendHeartbeat actions of one turn become one datagram per peer
  (every resource the peer is a host of), sent at once; a peer's datagram is fed to the
  cores of the resources it names *and* is a host of (a peer is trusted only for those).
* **Takeover** (RunTakeover), per group of the resource, reported as horctakeover does:
  ``nop`` (this side already is the primary, in PAIR or COPY, or its S-VOLs were taken
  over already, SSWS, by an earlier life of this agent), ``swap`` (the S-VOL side,
  the old primary answering: split there or already split, then ``resync --swap``: the pair
  ends reversed, only differences copied), ``SVOL-takeover`` (the pair not split, or the
  old primary not answering: ``pair takeover``, SSWS), ``PVOL-PSUE`` / ``PVOL-PSUS`` (this
  side is the primary, its pair suspended).  An ``SVOL-takeover`` whose old primary's node
  still answers has no data loss (SPEC 4: the node fences it and pulls what this side lacks,
  serving I/O meanwhile); each such group's report (``zero_loss``, ``pulled_chunks``) is
  kept apart from the names, in ``takeover_report``, and goes into ``cluster.active``, the
  status and the last failover (``pairvol cluster status`` adds the hydration, live).
  Then ``pair unfence`` at the won epoch, then the resource's devices: each is attached
  from the host PVID cache, PVID-checked (cluster/devices.py), so a stale cache fails the
  takeover with the access error instead of attaching the wrong identity.
* **Switchover** (SwapPairs on the demoting host, after StopApp): fence the node (no stray
  write after the application stopped), split the groups (async: drained, so the target
  has every entry), then the core releases the leader key naming the target, whose
  takeover is the ``swap``.

Everything is logged to ``STATE_DIR/events.jsonl`` (``cluster.*``) and the agent's state to
``STATE_DIR/agent.json`` (``pairvol agent status``, ``cluster status``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import queue
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster import devices
from cluster import failover as fo
from cluster.agent_link import Datagram, Endpoint
from cluster.config import Config, Resource
from cluster.coord import (
    Coord,
    Keys,
    Lease,
    Request,
    acquire_leader,
    answer_request,
    list_resources,
    read_epoch,
    read_handover,
    read_leader,
    read_request,
    release_leader,
)
from cluster.pvid_cache import CacheFile, cache_path
from cluster.refresh import HostRole, Op
from cluster.refresh import Kind as NoticeKind
from cluster.refresh_driver import RefreshDriver
from replicator import control
from replicator.atomic_file import write_atomic
from replicator.errors import ConnectionFailed, LeaseLost, PairvolError, Timeout
from replicator.events import EventLog

EVENTS = "events.jsonl"
STATUS = "agent.json"
PIDFILE = "agent.pid"
#: The active stops writing this long before its lease could expire.
FENCE_MARGIN = 0.25
#: Bounds of the application's commands and of one node control call (seconds).
COMMAND_TIMEOUT = 30.0
NODE_TIMEOUT = 10.0
TAKEOVER_TIMEOUT = 60.0
#: After its own application or takeover failed, a host does not try again for this long
#: (at least): the other hosts get their turn first, as Pacemaker moves a failed resource.
COOLDOWN = 10.0
#: How often an active resource's monitor command runs (seconds between runs).
MONITOR_INTERVAL = 2.0
MONITOR_TIMEOUT = 10.0
#: Bound of one call setting the node's watchdog (on the loop, like a fence).
WATCHDOG_TIMEOUT = 0.5
#: How often the leader key is read while its holder is not heard (seconds).
FAST_POLL = 0.05
#: A refused datagram is logged once per reason in this many seconds.
REFUSED_EVERY = 10.0
#: How often runtime resource records are read again from etcd.
RESOURCES_EVERY = 1.0
#: Roles in which a deleted resource retires at once (promoting and demoting finish first).
RETIRABLE = frozenset({fo.Role.ACTIVE, fo.Role.STANDBY, fo.Role.CANDIDATE, fo.Role.FENCED})

#: The refresh protocol's notices, each a datagram kind of its own.
NOTICE_KINDS = frozenset(k.value.lower() for k in NoticeKind)
#: Node pair states from which the S-VOL side swaps (``resync --swap``) at once.
SWAP_STATES = ("PSUS", "PSUE")


# -- the side effects, injectable for tests --------------------------------------------------


class Node(Protocol):
    def call(self, op: str, args: dict[str, Any], timeout: float = NODE_TIMEOUT) -> Any: ...


class ControlNode:
    """The storage node of this host, through its control socket."""

    def __init__(self, socket_path: str) -> None:
        self.path = socket_path

    def call(self, op: str, args: dict[str, Any], timeout: float = NODE_TIMEOUT) -> Any:
        return control.call(self.path, op, args, timeout=timeout)


def run_command(cmd: str, timeout: float, env: Mapping[str, str]) -> tuple[int, str]:
    """Run an application command with ``sh -c``; (status, last line of its output).  A
    command past ``timeout`` is killed with its process group (status -9)."""
    proc = subprocess.Popen(
        ["/bin/sh", "-c", cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dict(env),
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, f"timed out after {timeout:g}s"
    lines = (out or "").strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


Runner = Callable[[str, float, Mapping[str, str]], tuple[int, str]]
Posted = Callable[[float], None]


def takeover_report(doc: Mapping[str, Any]) -> dict[str, Any]:
    """One group's SVOL-takeover, from ``pair.takeover``'s answer (each pair's ``takeover``
    summary, SPEC 4): ``zero_loss`` (every pair holds every write its old primary
    acknowledged; None if the node did not say), ``pulled_chunks`` (what is pulled from the
    old primary in the background, the hydration), ``fenced_old_primary``, and for async
    pairs ``not_received_entries`` (the journal entries that had not arrived: pulled when
    zero_loss, else lost: the RPO)."""
    pairs = [p for p in doc.get("pairs", []) if isinstance(p, dict)]
    known = [p["takeover"] for p in pairs if isinstance(p.get("takeover"), dict)]
    zero_loss: bool | None = None  # not said (a node before SPEC 4's takeover)
    if known and len(known) == len(pairs):
        zero_loss = all(t.get("zero_loss") is True for t in known)
    elif any(t.get("zero_loss") is False for t in known):
        zero_loss = False
    report: dict[str, Any] = {
        "pairs": len(pairs),
        "zero_loss": zero_loss,
        "pulled_chunks": sum(int(t.get("pulled_chunks") or 0) for t in known),
        "fenced_old_primary": bool(known) and all(t.get("fenced_old_primary") for t in known),
    }
    missing = [p["not_received"] for p in pairs if isinstance(p.get("not_received"), dict)]
    if missing:
        report["not_received_entries"] = sum(int(m.get("missing_entries") or 0) for m in missing)
    return report


def zero_loss_of(reports: Mapping[str, Mapping[str, Any]]) -> bool | None:
    """A resource's takeover, from its groups' reports: None if no group was taken over."""
    if not reports:
        return None
    seen = [r.get("zero_loss") for r in reports.values()]
    if any(z is False for z in seen):
        return False
    return None if any(z is None for z in seen) else True


# -- per-resource state ---------------------------------------------------------------------


@dataclass
class Held:
    """One resource on this host: its core and what the loop keeps around it."""

    resource: Resource
    core: fo.FailoverCore
    lease: Lease | None = None
    inflight: set[str] = field(default_factory=set)  # etcd requests asked and not answered
    poll_due: float = 0.0
    takeover: dict[str, str] = field(default_factory=dict)  # group -> horctakeover's name
    # group -> what its SVOL-takeover lost and pulls (SVOL-takeover groups only): see
    # takeover_report(); kept apart from ``takeover``, whose shape scripts rely on.
    takeover_report: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_failover: dict[str, Any] | None = None
    last_switchover: dict[str, Any] | None = None
    handed_over: bool = False  # a switchover released the key to this host
    active_seen: tuple[str, float] | None = None  # the last other host heard active, when
    monitoring: bool = False
    monitor_due: float = 0.0
    request: Request | None = None  # an operator request being carried out here
    starting: bool = False  # taken over, the start command runs
    stopping: bool = False  # the agent is shutting down: nothing new starts

    @property
    def name(self) -> str:
        return self.resource.name

    @property
    def role(self) -> str:
        return str(self.core.role)

    @property
    def epoch(self) -> int:
        return self.core.epoch

    @property
    def zero_loss(self) -> bool | None:
        """Whether the last takeover here lost no acknowledged write: None when no group
        was taken over (``nop``, ``swap``, ``PVOL-*``), False when any group's may have."""
        return zero_loss_of(self.takeover_report)


class Agent:
    """One host's agent.  ``step(now)`` is one turn of the loop; ``run()`` loops until stop().

    ``threaded=False`` (tests on a scripted clock): etcd requests and jobs run inline, and
    their answers are taken in the same turn."""

    def __init__(
        self,
        config: Config,
        host: str,
        state_dir: str,
        coord: Coord,
        node: Node,
        *,
        endpoint: Endpoint | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        runner: Runner = run_command,
        threaded: bool = True,
        cache: CacheFile | None = None,
    ) -> None:
        self.config = config
        self.me = config.host(host).name
        self.state_dir = state_dir
        os.makedirs(state_dir, exist_ok=True)
        self.coord = coord
        self.node = node
        self.keys = Keys(config.cluster)
        self.timing = config.timing
        self.endpoint = endpoint
        self.clock = clock
        self.wall = wall
        self.runner = runner
        self.threaded = threaded
        self.cache = cache or CacheFile(cache_path())
        self.events = EventLog(os.path.join(state_dir, EVENTS), clock=wall)
        self.resources: dict[str, Held] = {}
        self.peers: dict[str, tuple[float, dict[str, Any]]] = {}  # host -> (heard, body)
        self.etcd_ok: bool | None = None
        self._posted: queue.SimpleQueue[Posted] = queue.SimpleQueue()
        self._etcd_q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._etcd_thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()
        self._outbox: dict[str, dict[str, Any]] = {}  # peer -> resource -> heartbeat fields
        self._refusals: dict[str, tuple[float, int]] = {}
        self._status_written = ""
        #: (resource, result) -> failovers to this host that completed (the metrics'
        #: ``pairvol_failovers_total``, cluster/metrics.py); result as horctakeover names it.
        self.failovers: dict[tuple[str, str], int] = {}
        self._resources_due = clock()
        self.refresh = RefreshDriver(
            host=self.me, state_dir=state_dir, coord=coord, keys=self.keys, node=node,
            cache=self.cache, send_notice=self._send_notice, emit=self._emit_now,
            spawn=self._spawn_work, lease=self._any_lease,
        )  # fmt: skip
        if threaded:
            self._etcd_thread = threading.Thread(
                target=self._etcd_worker, name="agent-etcd", daemon=True
            )
            self._etcd_thread.start()
        self.events.emit(
            "cluster.started", host=self.me, cluster=config.cluster, pid=os.getpid(),
            resources=sorted(r.name for r in config.resources if self.me in r.hosts),
        )  # fmt: skip
        now = clock()
        for r in config.resources:
            self._track(r, now)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self.step(self.clock())
                wait = min(self.get_timer() - self.clock(), self.timing.heartbeat_interval)
                fds: list[Any] = [self._wake_r]
                if self.endpoint is not None:
                    fds.append(self.endpoint)
                readable, _, _ = select.select(fds, [], [], max(0.0, wait))
                if self._wake_r in readable:
                    os.read(self._wake_r, 4096)
        finally:
            self.shutdown()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()

    def get_timer(self) -> float:
        """When the loop wants the next turn (monotonic)."""
        times = [self._resources_due]
        t = self.refresh.get_timer()
        if t is not None:
            times.append(t)
        for h in self.resources.values():
            if "poll" not in h.inflight:
                times.append(h.poll_due)
            t = h.core.get_timer()
            if t is not None:
                times.append(t)
            if h.core.role is fo.Role.ACTIVE and h.resource.monitor and not h.monitoring:
                times.append(h.monitor_due)
        return min(times)

    def step(self, now: float) -> None:
        self._receive(now)
        self._take_posted()
        for h in list(self.resources.values()):
            t = h.core.get_timer()
            if t is not None and now >= t:
                before = h.core.role
                self._carry(h, h.core.handle_timer(now), before)
            if now >= h.poll_due and "poll" not in h.inflight:
                h.poll_due = now + self._poll_interval(h)
                self._poll(h)
            self._maybe_monitor(h, now)
        if now >= self._resources_due:
            self._resources_due = now + RESOURCES_EVERY
            self._etcd(self._load_runtime_resources)
        t = self.refresh.get_timer()
        if t is not None and now >= t:
            self.refresh.handle_timer(now)
        self._follow_requests(now)
        self._take_posted()
        self._flush_heartbeats()
        self._write_status(now)

    def _poll_interval(self, h: Held) -> float:
        """Every heartbeat interval; faster while the key's holder is a host that is not
        heard any more (its key is about to go, and the failover waits for that)."""
        holder = h.core.leader
        gone = holder in h.resource.hosts and holder != self.me and not h.core.peer_up(holder)
        return FAST_POLL if gone else self.timing.heartbeat_interval

    # -- carrying out the core's actions ---------------------------------------------------

    def _feed(self, h: Held, event: fo.Event, now: float | None = None) -> None:
        if self.resources.get(h.name) is not h:
            return  # dropped meanwhile
        before = h.core.role
        if isinstance(event, fo.TakeoverDone) and not event.ok:
            self.events.emit("cluster.takeover.failed", resource=h.name, detail=event.detail,
                             takeover=h.takeover)  # fmt: skip
        try:
            actions = h.core.handle(event, self.clock() if now is None else now)
        except PairvolError as e:  # an answer the core has no row for: logged, changes nothing
            self.events.emit("cluster.core.refused", resource=h.name, input=repr(event),
                             reason=str(e))  # fmt: skip
            return
        self._carry(h, actions, before)
        if isinstance(event, fo.AppStarted) and h.starting and h.core.role is fo.Role.ACTIVE:
            h.starting = False  # taken over and the application runs: the resource is active
            self._failed_over(h, self.clock())
            self._announce("cluster.active", resource=h.name, epoch=h.epoch, takeover=h.takeover,
                           zero_loss=h.zero_loss, takeover_report=h.takeover_report)  # fmt: skip

    def _carry(self, h: Held, actions: list[fo.Action], before: fo.Role) -> None:
        """Carry out ``actions`` in order; ``before``: the role before the input that asked
        for them (a role change is announced once they are under way)."""
        for a in actions:
            if isinstance(a, fo.EmitEvent):
                self.events.emit(a.name, **a.as_dict())
            elif isinstance(a, fo.SendHeartbeat):
                self._outbox.setdefault(a.to, {})[h.name] = {
                    "epoch": a.epoch, "active": a.active, "confirms": a.confirms,
                    "etcd_ok": a.etcd_ok, "role": str(h.core.role),
                    "last_failover": h.last_failover,
                }  # fmt: skip
            elif isinstance(a, fo.FenceNode):
                self._fence_node(h, a)
            elif isinstance(a, fo.GrantLease):
                self._etcd(functools.partial(self._grant, h, a))
            elif isinstance(a, fo.RenewLease):
                if "renew" not in h.inflight:
                    h.inflight.add("renew")
                    self._etcd(lambda: self._renew(h))
            elif isinstance(a, fo.TryAcquire):
                self._etcd(lambda: self._acquire(h))
            elif isinstance(a, fo.ReleaseLeader):
                self._etcd(functools.partial(self._release, h, a.handover))
            elif isinstance(a, fo.RunTakeover):
                reread = self.refresh.unreflected(h.name)
                self._job(h, "takeover", functools.partial(self._take_over, h, a.epoch, reread))
            elif isinstance(a, fo.StartApp):
                self._job(h, "start", lambda: self._start_app(h))
            elif isinstance(a, fo.StopApp):
                self._job(h, "stop", lambda: self._stop_app(h))
            elif isinstance(a, fo.SwapPairs):
                self._job(h, "swap", functools.partial(self._swap, h, a.to))
        if h.core.role is not before:
            self._role_changed(h, before)

    def _role_changed(self, h: Held, before: fo.Role) -> None:
        role = h.core.role
        now = self.clock()
        self._track_refresh(h, now)
        fields: dict[str, Any] = {"resource": h.name, "epoch": h.epoch, "previous": str(before)}
        h.starting = role is fo.Role.ACTIVE and before is fo.Role.PROMOTING
        if h.starting:
            h.monitor_due = now + MONITOR_INTERVAL
        if role is fo.Role.FENCED or role is fo.Role.STANDBY:
            self._finish_request(h, "failed" if role is fo.Role.FENCED else "done")
        if role is fo.Role.PROMOTING or (
            role is fo.Role.STANDBY and before is not fo.Role.CANDIDATE
        ):
            self._announce(f"cluster.{role}", **fields)
        else:
            self._write_status(now, force=True)

    def _failed_over(self, h: Held, now: float) -> None:
        """Record how this host came to be active: a failover from the host last seen
        active, or the planned switchover that handed the key to it."""
        seen = h.active_seen
        if seen is None or seen[0] == self.me:
            return
        last = h.core.last_failover or {}
        seconds = round(now - seen[1], 3)
        record = {
            "at": round(self.wall(), 3), "from": seen[0], "to": self.me, "epoch": h.epoch,
            "seconds": seconds, "takeover": h.takeover, "result": last.get("result"),
            "why": "switchover" if h.handed_over else last.get("why"),
            # Compact (it rides on every heartbeat): the groups' reports are in the status.
            "zero_loss": h.zero_loss,
            "pulled_chunks": sum(int(r.get("pulled_chunks") or 0)
                                 for r in h.takeover_report.values()),
        }  # fmt: skip
        kind = "switchover" if h.handed_over else "failover"
        h.handed_over = False
        if kind == "failover":
            h.last_failover = record
            key = (h.name, str(record["result"] or "unknown"))
            self.failovers[key] = self.failovers.get(key, 0) + 1
        else:
            h.last_switchover = record
        self.events.emit(
            f"cluster.{kind}.done", resource=h.name, seconds=seconds, epoch=h.epoch,
            takeover=h.takeover, zero_loss=h.zero_loss, **{"from": seen[0]},
        )  # fmt: skip

    # -- etcd: one worker, in order ------------------------------------------------------

    def _etcd(self, fn: Callable[[], None]) -> None:
        if self.threaded:
            self._etcd_q.put(fn)
        else:
            fn()

    def _etcd_worker(self) -> None:
        while True:
            fn = self._etcd_q.get()
            if fn is None:
                return
            try:
                fn()
            except Exception as e:  # a bug must not kill the worker: logged
                self._emit_later("cluster.bug", error=repr(e))

    def _emit_later(self, name: str, **fields: Any) -> None:
        """An event from a worker thread, written by the loop (one writer of the log)."""

        def emit(_now: float) -> None:
            self.events.emit(name, **fields)

        self._post(emit)

    def _post(self, fn: Posted) -> None:
        self._posted.put(fn)
        if self.threaded:
            self._wake()

    def _take_posted(self) -> None:
        for _ in range(1000):
            try:
                fn = self._posted.get_nowait()
            except queue.Empty:
                return
            fn(self.clock())

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _etcd_state(self, ok: bool, reason: str = "") -> None:
        """Called on the worker after every request: the agent-wide reachability."""

        def note(_now: float) -> None:
            if ok is not self.etcd_ok:
                if ok:
                    self.events.emit("cluster.etcd.reachable")
                else:
                    self.events.emit("cluster.etcd.unreachable", reason=reason)
            self.etcd_ok = ok

        self._post(note)

    def _grant(self, h: Held, a: fo.GrantLease) -> None:
        at = self.clock()
        try:
            lease = self.coord.grant_lease(math.ceil(a.ttl))
        except (ConnectionFailed, Timeout) as e:
            self._etcd_state(False, str(e))
            failed = fo.LeaseRenewFailed(str(e))
            self._post(lambda _now: self._feed(h, failed))
            return
        self._etcd_state(True)

        def granted(_now: float) -> None:
            h.lease = lease
            self._feed(h, fo.LeaseGranted(at, float(lease.ttl)))

        self._post(granted)

    def _renew(self, h: Held) -> None:
        at = self.clock()
        lease = h.lease
        event: fo.Event
        try:
            if lease is None:
                event = fo.LeaseRenewFailed("no lease", gone=True)
            else:
                self.coord.keepalive(lease)
                event = fo.LeaseRenewed(at, float(lease.ttl))
                self._etcd_state(True)
        except LeaseLost as e:
            event = fo.LeaseRenewFailed(str(e), gone=True)
            self._etcd_state(True)
        except (ConnectionFailed, Timeout) as e:
            event = fo.LeaseRenewFailed(str(e))
            self._etcd_state(False, str(e))

        def answered(now: float) -> None:
            h.inflight.discard("renew")
            if isinstance(event, fo.LeaseRenewFailed) and event.gone:
                h.lease = None
            self._feed(h, event)
            left = h.core.lease_remaining(now)
            if isinstance(event, fo.LeaseRenewed) and h.core.claiming and left is not None:
                self._arm(h, h.epoch, left)  # the node's watchdog follows the new deadline

        self._post(answered)

    def _acquire(self, h: Held) -> None:
        lease = h.lease
        event: fo.Event
        try:
            floor = self._node_floor(h.resource)
        except PairvolError as e:
            self._emit_later("cluster.node.unavailable", resource=h.name, reason=str(e))
            floor = None
        try:
            if lease is None or floor is None:
                event = fo.AcquireResult(False, read_epoch(self.coord, self.keys, h.name))
            else:
                epoch = acquire_leader(self.coord, self.keys, h.name, self.me, lease, floor=floor)
                won = epoch is not None
                event = fo.AcquireResult(
                    won, epoch if epoch is not None else read_epoch(self.coord, self.keys, h.name)
                )
            self._etcd_state(True)
        except (ConnectionFailed, Timeout) as e:
            self._etcd_state(False, str(e))
            event = fo.AcquireResult(False, 0)
        except PairvolError as e:
            self._emit_later("cluster.acquire.refused", resource=h.name, reason=str(e))  # fmt: skip
            event = fo.AcquireResult(False, 0)
        self._post(lambda _n: self._feed(h, event))

    def _release(self, h: Held, handover: str | None) -> None:
        try:
            release_leader(self.coord, self.keys, h.name, self.me, handover=handover)
            self._etcd_state(True)
        except (ConnectionFailed, Timeout) as e:
            self._etcd_state(False, str(e))
        except PairvolError as e:
            self._emit_later("cluster.release.failed", resource=h.name, reason=str(e))  # fmt: skip

    def _poll(self, h: Held) -> None:
        """Read the leader key (and, when absent, the epoch and handover) and the resource's
        operator request; feed what they say."""
        h.inflight.add("poll")

        def read() -> None:
            event: fo.Event | None
            request: Request | None = None
            try:
                leader = read_leader(self.coord, self.keys, h.name)
                if leader is None:
                    epoch = read_epoch(self.coord, self.keys, h.name)
                    handover = read_handover(self.coord, self.keys, h.name)
                    event = fo.LeaderGone(epoch, handover)
                else:
                    event = fo.LeaderObserved(leader.holder, leader.epoch)
                with contextlib.suppress(PairvolError):
                    request = read_request(self.coord, self.keys, h.name)
                self._etcd_state(True)
            except (ConnectionFailed, Timeout) as e:
                self._etcd_state(False, str(e))
                event = fo.EtcdUnreachable(str(e))
            except PairvolError as e:
                event = None
                self._emit_later("cluster.leader.unreadable", resource=h.name, reason=str(e))

            def answered(now: float) -> None:
                h.inflight.discard("poll")
                # A new holder seen in the key; heartbeats keep the time fresh (a dead
                # holder's key stays until its lease expires, and a failover counts from the
                # last sign of life).
                seen = h.active_seen
                holder = event.holder if isinstance(event, fo.LeaderObserved) else self.me
                if holder != self.me and (seen is None or seen[0] != holder):
                    h.active_seen = (holder, now)
                if isinstance(event, fo.LeaderGone) and h.core.role is not fo.Role.PROMOTING:
                    h.handed_over = event.handover == self.me
                if event is not None:
                    self._feed(h, event)
                if request is not None and request.state == "pending":
                    self._take_request(h, request)

            self._post(answered)

        self._etcd(read)

    # -- the refresh protocol (cluster/refresh_driver.py) -------------------------------

    def _track_refresh(self, h: Held, now: float) -> None:
        """Tell the refresh driver this host's role for the resource (active while it runs
        it, standby otherwise) and the peer: the active when this host stands by, else the
        first other host in preference order."""
        others = [x for x in h.resource.hosts if x != self.me]
        active = h.core.role is fo.Role.ACTIVE
        leader = h.core.leader
        peer = others[0] if others else None
        if not active and leader in others:
            peer = leader
        try:
            self.refresh.track(h.resource, HostRole.ACTIVE if active else HostRole.STANDBY,
                               peer, now)  # fmt: skip
        except PairvolError as e:
            self.events.emit("refresh.untracked", resource=h.name, reason=str(e))

    def _emit_now(self, name: str, **fields: Any) -> None:
        self.events.emit(name, **fields)

    def _send_notice(self, peer: str, body: dict[str, Any]) -> None:
        """A refresh notice goes out as a datagram of its own kind (start, start_ack,
        complete, reflected: docs/protocol.md)."""
        if self.endpoint is not None and peer in self.endpoint.peers:
            self.endpoint.send(peer, str(body.get("notice")).lower(), body, self.wall())

    def _spawn_work(self, work: Callable[[], Any], done: Callable[[Any], None], what: str) -> None:
        def run() -> None:
            result = work()
            self._post(lambda _now: done(result))

        self._thread(run, f"agent-refresh-{what}")

    def _any_lease(self) -> Lease | None:
        """The S-VOL lock's lease: any lease this agent holds (each expires with the agent)."""
        return next((h.lease for h in self.resources.values() if h.lease is not None), None)

    def _follow_requests(self, now: float) -> None:
        """A split or resync request is done once the refresh exchange it began is over."""
        for h in self.resources.values():
            req = h.request
            if req is None or req.op not in ("split", "resync") or req.state != "accepted":
                continue  # (accepted: its answer is stored, with the revision to answer to)
            target = req.target or h.name
            if not self.refresh.idle(target):
                continue
            h.request = None
            mine = [p for p in self.refresh.status().values() if p["resource"] == h.name
                    and (req.target is None or p["group"] == req.target)]  # fmt: skip
            bad = [p["last"] for p in mine if not (p["last"] or {}).get("ok", False)
                   or not (p["last"] or {}).get("reflected", False)]  # fmt: skip
            if bad:
                self._answer(h, req, "failed", f"{target}: {bad[0]}")
            else:
                self._answer(h, req, "done", req.detail)  # the pairs, as when accepted

    # -- operator requests -----------------------------------------------------------------

    def _take_request(self, h: Held, req: Request) -> None:
        if not h.core.claiming or h.request is not None:
            return  # the active answers; one at a time
        if req.op in ("split", "resync"):
            if h.core.role is not fo.Role.ACTIVE:
                self._answer(h, req, "refused", f"resource {h.name} is {h.core.role} here")
                return
            op = Op.SPLIT if req.op == "split" else Op.CONSTRUCTION
            try:
                pairs = self.refresh.begin(req.target or h.name, op, self.clock())
            except PairvolError as e:
                self._answer(h, req, "refused", str(e))
                return
            h.request = req
            self._answer(h, req, "accepted", " ".join(pairs))
            return
        before = h.core.role
        try:
            actions = h.core.handle(fo.SwitchoverRequested(req.to), self.clock())
        except PairvolError as e:
            self._answer(h, req, "refused", str(e))
            return
        h.request = req
        self._answer(h, req, "accepted")
        self._carry(h, actions, before)

    def _finish_request(self, h: Held, state: str) -> None:
        req, h.request = h.request, None
        if req is not None:
            self._answer(h, req, state)

    def _answer(self, h: Held, req: Request, state: str, detail: str = "") -> None:
        """Write the answer into the request's key (on the etcd worker); an accepted request
        is followed as stored, so that its final answer compares against that revision."""
        self.events.emit("cluster.request", resource=h.name, id=req.id, op=req.op, state=state,
                         detail=detail or None)  # fmt: skip

        def write() -> None:
            try:
                stored = answer_request(self.coord, self.keys, h.name, req, state, detail)
            except PairvolError:
                stored = None

            def follow(_now: float) -> None:
                if stored is not None and h.request is not None and h.request.id == stored.id:
                    h.request = stored

            self._post(follow)

        self._etcd(write)

    # -- the node ------------------------------------------------------------------------

    def _fence_node(self, h: Held, a: fo.FenceNode) -> None:
        """Have the node refuse client writes for the resource's groups, now (on the loop:
        it must happen before the lease could expire)."""
        left = h.core.lease_remaining(self.clock())
        timeout = max(0.2, (left if left is not None else 0.0) + FENCE_MARGIN)
        failed = []
        for group in h.resource.groups:
            args = {"target": group, "epoch": a.epoch, "reason": f"cluster: {a.reason}"}
            try:
                try:
                    self.node.call("pair.fence", args, timeout=timeout)
                except PairvolError as e:
                    if "refused" not in str(e):
                        raise
                    # The node has seen a newer epoch than this core knows (a restart):
                    # fence at the node's own epoch, which it accepts.
                    args["epoch"] = self._node_floor(h.resource)
                    self.node.call("pair.fence", args, timeout=timeout)
            except PairvolError as e:
                failed.append(f"{group}: {e}")
        if failed:
            self.events.emit("cluster.fence.failed", resource=h.name, errors=failed)

    def _arm(self, h: Held, epoch: int, seconds: float, *, raises: bool = False) -> None:
        """Set the node's watchdog for the resource's groups: client writes stop by
        themselves ``seconds`` from now unless set again (replicator/pair/hold.py), so an
        agent that dies alone leaves no writable primary behind its lease."""
        for group in h.resource.groups:
            args = {"target": group, "epoch": epoch, "seconds": max(0.001, seconds)}
            try:
                self.node.call("pair.watchdog", args, timeout=WATCHDOG_TIMEOUT)
            except PairvolError as e:
                if raises:
                    raise
                self._emit_later("cluster.watchdog.failed", resource=h.name, group=group,
                                 reason=str(e))  # fmt: skip

    def _node_floor(self, r: Resource) -> int:
        """The highest pair or cluster epoch the node has for the resource's groups."""
        floor = 0
        for group in r.groups:
            doc = self.node.call("pair.display", {"target": group})
            for p in doc.get("pairs", []):
                floor = max(floor, int(p.get("epoch") or 0), int(p.get("cluster_epoch") or 0))
        return floor

    def _take_over(self, h: Held, epoch: int, reread: Mapping[str, str]) -> fo.Event:
        """Off the loop: the storage takeover of every group, the node's watchdog and
        unfence at ``epoch``, then the devices (``reread``: those whose refresh exchange was
        under way here, read on the loop when the takeover began: the protocol's own
        recovery runs only once the resource is active, after the attach; a cache left
        stale *outside* the protocol, a plain pair split, stays a failed attach with the
        access error)."""
        results: dict[str, str] = {}
        reports: dict[str, dict[str, Any]] = {}
        try:
            for group in h.resource.groups:
                results[group], report = self._take_over_group(group)
                if report is not None:
                    reports[group] = report
            left = h.core.lease_remaining(self.clock())
            self._arm(h, epoch, left if left is not None else 0.0, raises=True)
            for group in h.resource.groups:
                self.node.call("pair.unfence", {"target": group, "epoch": epoch})
            self._attach_devices(h.resource, reread)
        except PairvolError as e:
            h.takeover, h.takeover_report = results, reports
            return fo.TakeoverDone(False, f"{type(e).__name__}: {e}")
        h.takeover, h.takeover_report = results, reports
        detail = ", ".join(f"{g}: {r}" for g, r in sorted(results.items()))
        return fo.TakeoverDone(True, detail or "nop")

    def _take_over_group(self, group: str) -> tuple[str, dict[str, Any] | None]:
        """The storage takeover of one group here: its result as horctakeover names it, and
        for an ``SVOL-takeover`` its report (:func:`takeover_report`): with the old
        primary's node answering, the node fenced it and pulls what this side lacks in the
        background, a takeover with no loss (SPEC 4); without, the last consistent point."""
        pairs = self.node.call("pair.display", {"target": group}).get("pairs", [])
        roles = {p.get("role") for p in pairs}
        states = {str(p.get("state")) for p in pairs}
        if "secondary" not in roles:
            for bad in ("PSUE", "PSUS"):
                if bad in states:
                    return f"PVOL-{bad}", None
            return "nop", None
        if all(p.get("taken_over") for p in pairs):
            # Taken over already (an earlier life of this agent): SSWS, or PSUE while the
            # pull of what it lacks waits for the old primary's node.
            return "nop", None
        link_up = all(p.get("link") == "up" for p in pairs)
        if link_up and states <= set(SWAP_STATES):
            # Split already (a switchover): the old primary answers, swap at once.
            with contextlib.suppress(ConnectionFailed, Timeout):
                self.node.call("pair.resync", {"target": group, "swap": True},
                               timeout=TAKEOVER_TIMEOUT)  # fmt: skip
                return "swap", None
        doc = self.node.call("pair.takeover", {"target": group}, timeout=TAKEOVER_TIMEOUT)
        return "SVOL-takeover", takeover_report(doc if isinstance(doc, dict) else {})

    def _attach_devices(self, r: Resource, reread: Mapping[str, str] | None = None) -> None:
        """Attach the resource's devices on this host from the PVID cache (PVID-checked); a
        device not cached yet, or named in ``reread`` (device → why) and not attached, is
        read from its volume first."""
        for name, export in sorted(r.devices_on(self.me).items()):
            cached = self.cache.read().entries.get(name)
            why = (reread or {}).get(name)
            if cached is None or (why is not None and cached.attachment is None):
                cached = devices.record(self.cache, name, export)
                if why is not None:
                    self.events.emit("cluster.device.reread", resource=r.name, device=name,
                                     pvid=cached.pvid, why=why)  # fmt: skip
            if cached.attachment is None:
                devices.attach(self.cache, name)
            self.events.emit("cluster.device.attached", resource=r.name, device=name)

    def _detach_devices(self, r: Resource) -> list[str]:
        errors = []
        for name in sorted(r.devices_on(self.me)):
            entry = self.cache.read().entries.get(name)
            if entry is not None and entry.attachment is not None:
                try:
                    devices.detach(self.cache, name)
                except PairvolError as e:
                    errors.append(f"{name}: {e}")
        return errors

    def _swap(self, h: Held, to: str) -> fo.Event:
        """Switchover, on the active after its application stopped: no write from here any
        more, then split each group (async: drained), so the target holds everything."""
        try:
            for group in h.resource.groups:
                self.node.call(
                    "pair.fence",
                    {"target": group, "epoch": h.epoch, "reason": f"cluster: switchover to {to}"},
                )
            self._detach_devices(h.resource)
            for group in h.resource.groups:
                pairs = self.node.call("pair.display", {"target": group}).get("pairs", [])
                if any(p.get("state") in ("PAIR", "COPY", "PFUL") for p in pairs):
                    self.node.call("pair.split", {"target": group}, timeout=TAKEOVER_TIMEOUT)
        except PairvolError as e:
            for group in h.resource.groups:
                with contextlib.suppress(PairvolError):
                    self.node.call("pair.unfence", {"target": group, "epoch": h.epoch})
            return fo.SwapDone(False, f"{type(e).__name__}: {e}")
        return fo.SwapDone(True, f"split for {to}")

    # -- the application -------------------------------------------------------------------

    def _start_app(self, h: Held) -> fo.Event:
        r = h.resource
        if r.start is None:
            return fo.AppStarted()
        code, tail = self.runner(r.start, COMMAND_TIMEOUT, self._command_env(h))
        return fo.AppStarted() if code == 0 else fo.AppFailed(f"start: status {code}: {tail}")

    def _stop_app(self, h: Held) -> fo.Event:
        r = h.resource
        code, tail = 0, ""
        if r.stop is not None:
            code, tail = self.runner(r.stop, COMMAND_TIMEOUT, self._command_env(h))
        errors = self._detach_devices(r)
        if code != 0:
            return fo.AppFailed(f"stop: status {code}: {tail}")
        if errors:
            return fo.AppFailed(f"detach: {'; '.join(errors)}")
        return fo.AppStopped()

    def _maybe_monitor(self, h: Held, now: float) -> None:
        r = h.resource
        if h.core.role is not fo.Role.ACTIVE or not r.monitor or h.monitoring:
            return
        if now < h.monitor_due:
            return
        h.monitoring = True
        monitor = r.monitor

        def run() -> None:
            code, tail = self.runner(monitor, MONITOR_TIMEOUT, self._command_env(h))

            def done(now: float) -> None:
                h.monitoring = False
                h.monitor_due = now + MONITOR_INTERVAL
                if code != 0 and h.core.role is fo.Role.ACTIVE:
                    self.events.emit("cluster.monitor.failed", resource=h.name, status=code,
                                     output=tail)  # fmt: skip
                    self._feed(h, fo.AppFailed(f"monitor: status {code}: {tail}"), now)

            self._post(done)

        self._thread(run, f"agent-monitor-{h.name}")

    def _command_env(self, h: Held) -> dict[str, str]:
        return dict(
            os.environ,
            PAIRVOL_RESOURCE=h.name,
            PAIRVOL_HOST=self.me,
            PAIRVOL_EPOCH=str(h.epoch),
            PAIRVOL_GROUPS=" ".join(h.resource.groups),
        )

    # -- jobs ----------------------------------------------------------------------------

    def _job(self, h: Held, kind: str, fn: Callable[[], fo.Event]) -> None:
        def job() -> None:
            event: fo.Event
            try:
                event = fn()
            except Exception as e:  # a job's failure is reported, never lost with its thread
                reason = f"{kind}: {type(e).__name__}: {e}"
                if kind == "takeover":
                    event = fo.TakeoverDone(False, reason)
                elif kind == "swap":
                    event = fo.SwapDone(False, reason)
                else:
                    event = fo.AppFailed(reason)
            self._post(lambda now: self._feed(h, event, now))

        self._thread(job, f"agent-{kind}-{h.name}")

    def _thread(self, fn: Callable[[], None], name: str) -> None:
        if self.threaded:
            threading.Thread(target=fn, name=name, daemon=True).start()
        else:
            fn()

    # -- peers ---------------------------------------------------------------------------

    def _receive(self, now: float) -> None:
        if self.endpoint is None:
            return
        for _ in range(64):
            d, refused = self.endpoint.receive(self.wall())
            if refused is not None:
                self._refused(refused, now)
                continue
            if d is None:
                return
            self.hear(d, now)

    def _refused(self, reason: str, now: float) -> None:
        """Log a refused datagram, once per reason every REFUSED_EVERY seconds (a flood of
        forged datagrams must not fill the disk), with how many were refused since."""
        last, count = self._refusals.get(reason, (-math.inf, 0))
        if now - last < REFUSED_EVERY:
            self._refusals[reason] = (last, count + 1)
            return
        self._refusals[reason] = (now, 0)
        self.events.emit("cluster.refused", reason=reason, also_refused=count)

    def hear(self, d: Datagram, now: float) -> None:
        if d.kind in NOTICE_KINDS:
            self.refresh.notice(d.host, d.body, now)  # trusted only for its resources' pairs
            return
        if d.kind != "heartbeat":
            return
        body = dict(d.body)
        self.refresh.peer_flags(d.host, body.get("flags"), now)
        was = self.peers.get(d.host)
        self.peers[d.host] = (now, body)
        if was is None or now - was[0] > self.timing.heartbeat_timeout:
            self.events.emit("cluster.peer.up", peer=d.host)
        resources = body.get("resources")
        if not isinstance(resources, dict):
            return
        for name, r in resources.items():
            h = self.resources.get(name)
            if h is None or not isinstance(r, dict) or d.host not in h.resource.hosts:
                continue  # a peer is heard only for the resources it is a host of
            try:
                event = fo.PeerHeard(
                    d.host, int(r.get("epoch", 0)), bool(r.get("active")),
                    r.get("confirms"), bool(r.get("etcd_ok", True)),
                )  # fmt: skip
            except (PairvolError, TypeError, ValueError) as e:
                self._refused(f"a heartbeat from {d.host} for {name}: {e}", now)
                continue
            if event.active:
                h.active_seen = (d.host, now)
            self._feed(h, event, now)
            if h.core.in_failsafe and event.confirms == self.me:
                # Past the lease, running on confirmations: the node's watchdog lasts as long
                # as this one does (the core fences when they stop).
                self._arm(h, h.epoch, self.timing.heartbeat_timeout)

    def _flush_heartbeats(self) -> None:
        outbox, self._outbox = self._outbox, {}
        if self.endpoint is None:
            return
        for peer, resources in outbox.items():
            if peer not in self.endpoint.peers:
                continue
            body = {"resources": resources, "flags": self.refresh.heartbeat_flags()}
            try:
                self.endpoint.send(peer, "heartbeat", body, self.wall())
            except OSError as e:
                for h in self.resources.values():
                    if peer in h.resource.hosts:
                        self._feed(h, fo.PeerLost(peer, str(e)))

    # -- resources -----------------------------------------------------------------------

    def _track(self, r: Resource, now: float) -> None:
        if self.me not in r.hosts:
            return
        held = self.resources.get(r.name)
        if held is not None and held.core.retired:  # deleted, then created again
            if held.core.role not in (fo.Role.STANDBY, fo.Role.FENCED):
                return  # still stopping: taken up at a later reading of the records
            self._drop_resource(r.name)
            held = None
        if held is not None:
            held.resource = r
            return
        t = self.timing
        core = fo.FailoverCore(
            r.name, self.me, r.hosts, lease_ttl=float(t.lease_ttl),
            renew_interval=t.lease_renew_interval, margin=FENCE_MARGIN,
            heartbeat_interval=t.heartbeat_interval, heartbeat_timeout=t.heartbeat_timeout,
            now=now, cooldown=max(COOLDOWN, 3.0 * t.lease_ttl),
        )  # fmt: skip
        h = Held(r, core, poll_due=now)
        self.resources[r.name] = h
        self._announce("cluster.standby", resource=r.name, epoch=0)
        self._track_refresh(h, now)
        self._feed(h, fo.Started(), now)

    def _load_runtime_resources(self) -> None:
        """On the etcd worker: read the runtime resources, then (on the loop) track them."""
        try:
            runtime = list_resources(self.coord, self.keys, known_hosts=self.config.host_names())
        except (ConnectionFailed, Timeout):
            return
        except PairvolError as e:
            self._emit_later("cluster.resource.bad", reason=str(e))
            return

        def track(now: float) -> None:
            names = {r.name for r in self.config.resources}
            for r in runtime:
                if r.name not in names:
                    self._track(r, now)
            gone = set(self.resources) - names - {r.name for r in runtime}
            for name in gone:
                h = self.resources[name]
                if not h.core.retired and h.core.role in RETIRABLE:
                    self._feed(h, fo.Retire(), now)  # the active stops it first
                if h.core.role in (fo.Role.STANDBY, fo.Role.FENCED):
                    self._drop_resource(name)

        self._post(track)

    def _drop_resource(self, name: str) -> None:
        del self.resources[name]
        self.refresh.forget(name)
        self.events.emit("cluster.resource.dropped", resource=name)

    # -- status and shutdown --------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        return {
            "host": self.me,
            "cluster": self.config.cluster,
            "pid": os.getpid(),
            "etcd": "reachable" if self.etcd_ok else "unreachable",
            "resources": [
                {
                    "name": name,
                    "role": "stopped" if h.stopping else h.role,
                    "epoch": h.epoch,
                    "leader": h.core.leader,
                    "failsafe": h.core.in_failsafe,
                    "lease_remaining": None
                    if h.core.lease_remaining(now) is None
                    else round(max(0.0, h.core.lease_remaining(now) or 0.0), 3),
                    "takeover": h.takeover,
                    "takeover_report": h.takeover_report,
                    "zero_loss": h.zero_loss,
                    "last_failover": h.last_failover,
                    "last_switchover": h.last_switchover,
                    "ready": self.refresh.ready(name),
                }
                for name, h in sorted(self.resources.items())
            ],
            "peers": {
                p: {
                    "alive": now - heard <= self.timing.heartbeat_timeout,
                    "heard_ago": round(now - heard, 3),
                    "resources": body.get("resources", {}),
                    "flags": body.get("flags", {}),
                }
                for p, (heard, body) in sorted(self.peers.items())
            },
            "flags": self.refresh.status(),
            "updated": round(self.wall(), 3),
        }

    def _announce(self, event: str, **fields: Any) -> None:
        """A role change: the status file first, then the event (tests wait on events)."""
        self._write_status(self.clock(), force=True)
        self.events.emit(event, **fields)

    def _write_status(self, now: float, *, force: bool = False) -> None:
        doc = self.status(now)
        key = json.dumps(
            {k: v for k, v in doc.items() if k not in ("updated", "peers")}
            | {"resources": [(r["name"], r["role"], r["epoch"]) for r in doc["resources"]]}
        )
        if not force and key == self._status_written and int(now) % 2:
            return
        self._status_written = key
        write_atomic(
            os.path.join(self.state_dir, STATUS),
            json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n",
        )

    def shutdown(self) -> None:
        """A clean stop: each claimed resource's application is stopped, its node fenced,
        its leader key released and the lease revoked (the standby takes over at once)."""
        self._stopping.set()
        now = self.clock()
        for h in self.resources.values():
            h.stopping = True
            if h.core.claiming:
                self._stop_app(h)
                for group in h.resource.groups:
                    with contextlib.suppress(PairvolError):
                        self.node.call(
                            "pair.fence",
                            {"target": group, "epoch": h.epoch, "reason": "cluster: agent stopped"},
                        )
                with contextlib.suppress(PairvolError):
                    release_leader(self.coord, self.keys, h.name, self.me)
                self.events.emit("cluster.released", resource=h.name, epoch=h.epoch)
            if h.lease is not None:
                with contextlib.suppress(PairvolError):
                    self.coord.revoke(h.lease)
                h.lease = None
        if self._etcd_thread is not None:
            self._etcd_q.put(None)
            self._etcd_thread.join(timeout=5.0)
        self._write_status(now, force=True)
        self.events.emit("cluster.stopped", host=self.me)
        if self.endpoint is not None:
            self.endpoint.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
