"""The cluster agent: one loop around the lease, the peers' heartbeats and the resources.

Theory of operation
-------------------
One thread, one ``select()`` on the agents' UDP :class:`~cluster.agent_link.Endpoint` (and a
wake-up pipe for finished jobs), one timer.  Each turn of :meth:`Agent.step` takes ``now``
(monotonic seconds) and:

1. takes in what peers sent (heartbeats: who is alive, who runs what) and finished jobs;
2. keeps the agent's etcd lease: grant it, renew it every ``lease_renew_interval``;
3. for an **active** resource, checks the fencing deadline: an active agent whose last
   *successful* renewal was *sent* at ``t`` must stop writing by ``t + lease_ttl - margin``
   (the lease cannot have expired before ``t + lease_ttl``).  Past it, the agent has its node
   refuse client writes for the resource's groups (``pair.fence``) at once, then runs the
   stop command.  Exception, Patroni's failsafe: while etcd cannot be reached but every other
   host of the resource is heard and none claims the resource, nothing changes;
4. for a **standby** resource, every heartbeat interval: if the leader key is gone and the
   decision lets this host contend, takes it (:func:`~cluster.coord.acquire_leader`, the new
   epoch above the nodes' pair epochs) and promotes in a job thread: ``pair.takeover`` of each
   group whose side here is the secondary, ``pair.unfence`` at the new epoch, the start command;
5. sends a heartbeat to every peer each ``heartbeat_interval`` (the resources' roles and
   epochs, and the refresh flags);
6. writes its status file when something changed.

Slow things (node takeovers, the application's commands) run in job threads so that the
loop keeps renewing the lease and heartbeating; fencing is done in the loop itself, because
it must happen before a deadline.

The failover decision is behind the small :class:`Decision` interface.  cluster/failover.py
(the pure FailoverCore) did not exist when this loop was written; :class:`LeaseDecision` is
the minimal rule set the loop needs, to be replaced by the core.

Everything is logged to ``STATE_DIR/events.jsonl`` (``cluster.*`` events) and the agent's
state to ``STATE_DIR/agent.json`` (read by ``pairvol agent status`` and ``cluster status``).
"""

from __future__ import annotations

import contextlib
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

from cluster.agent_link import Datagram, Endpoint
from cluster.config import Config, Resource
from cluster.coord import (
    Coord,
    Keys,
    Leader,
    Lease,
    acquire_leader,
    list_resources,
    read_leader,
    release_leader,
)
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
#: After fencing itself, a host does not contend for the resource for this many lease TTLs.
HOLD_OFF_TTLS = 2
#: How often an active resource's monitor command runs (seconds between runs).
MONITOR_INTERVAL = 2.0
MONITOR_TIMEOUT = 10.0
#: A refused datagram is logged once per reason in this many seconds.
REFUSED_EVERY = 10.0
#: How often runtime resource records are read again from etcd.
RESOURCES_EVERY = 1.0

Role = str  # "standby" | "promoting" | "active" | "fenced"


# -- the decision ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerView:
    """What the last heartbeat of a peer said, and whether it is fresh."""

    host: str
    alive: bool
    heard_at: float  # monotonic, ours
    resources: Mapping[str, Mapping[str, Any]]

    def claims(self, resource: str) -> bool:
        r = self.resources.get(resource, {})
        return self.alive and r.get("role") in ("active", "promoting")

    def eligible(self, resource: str) -> bool:
        return self.alive and bool(self.resources.get(resource, {}).get("eligible"))


class Decision(Protocol):
    """The failover decision the loop asks (cluster/failover.py's core will answer it)."""

    def may_contend(
        self, me: str, resource: Resource, leader: Leader | None, peers: Mapping[str, PeerView]
    ) -> bool: ...

    def failsafe(self, me: str, resource: Resource, peers: Mapping[str, PeerView]) -> bool: ...


class LeaseDecision:
    """The minimal rules:

    * contend only when the leader key is absent, no live peer claims the resource, and no
      live, eligible peer comes before this host in the resource's preference order;
    * failsafe (an active that cannot renew stays active) only while every other host of the
      resource is heard and none claims it."""

    def may_contend(
        self, me: str, resource: Resource, leader: Leader | None, peers: Mapping[str, PeerView]
    ) -> bool:
        if leader is not None or me not in resource.hosts:
            return False
        if any(p.claims(resource.name) for p in peers.values()):
            return False
        before = resource.hosts[: resource.hosts.index(me)]
        return not any(h in peers and peers[h].eligible(resource.name) for h in before)

    def failsafe(self, me: str, resource: Resource, peers: Mapping[str, PeerView]) -> bool:
        others = [h for h in resource.hosts if h != me]
        return bool(others) and all(
            h in peers and peers[h].alive and not peers[h].claims(resource.name) for h in others
        )


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


# -- per-resource state ---------------------------------------------------------------------


@dataclass
class Held:
    resource: Resource
    role: Role = "standby"
    epoch: int = 0
    hold_off_until: float = 0.0
    busy: bool = False  # a job runs for it
    last_failover: dict[str, Any] | None = None
    previous: tuple[str, float] | None = None  # the last other holder seen, when last heard
    takeover: dict[str, str] = field(default_factory=dict)
    since: float = 0.0  # when this agent learnt of the resource
    failsafe_seen: bool = False  # a peer claimed it while its leader key was gone
    monitoring: bool = False  # a monitor command runs
    monitor_due: float = 0.0


@dataclass(frozen=True, slots=True)
class JobDone:
    resource: str
    kind: str  # "promote" | "stop" | "monitor"
    ok: bool
    detail: dict[str, Any]


class Agent:
    """One host's agent.  ``step(now)`` is one turn of the loop; ``run()`` loops until stop()."""

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
        decision: Decision | None = None,
        threaded: bool = True,
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
        self.decision: Decision = decision or LeaseDecision()
        self.threaded = threaded
        self.events = EventLog(os.path.join(state_dir, EVENTS), clock=wall)
        self.resources: dict[str, Held] = {}
        self.peers: dict[str, tuple[float, dict[str, Any]]] = {}
        self.lease: Lease | None = None
        self.renewed_sent = 0.0  # when the last successful renewal (or the grant) was sent
        self.etcd_ok = False
        self._etcd_seen: bool | None = None
        self.failsafe_on: set[str] = set()
        self.started = clock()
        self._grant_due = self.started
        self._renew_due = 0.0
        self._poll_due = self.started
        self._hb_due = self.started
        self._resources_due = self.started
        self._jobs: queue.SimpleQueue[JobDone] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()
        self._sender: threading.Thread | None = None
        self._hb_body: dict[str, Any] | None = None
        self._refusals: dict[str, tuple[float, int]] = {}
        self._status_written: str = ""
        for r in config.resources:
            self._track(r)
        self.events.emit(
            "cluster.started", host=self.me, cluster=config.cluster, pid=os.getpid(),
            resources=sorted(self.resources),
        )  # fmt: skip

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        # Heartbeats leave from a thread of their own: an etcd request that hangs until its
        # timeout holds the loop up, and must not make the peers think this host is gone
        # (the failsafe rests on them hearing it).  The loop refreshes what they say.
        sender = threading.Thread(target=self._send_heartbeats, name="agent-heartbeat", daemon=True)
        self._sender = sender
        sender.start()
        try:
            while not self._stopping.is_set():
                now = self.clock()
                self.step(now)
                wait = max(
                    0.0, min(self.get_timer() - self.clock(), self.timing.heartbeat_interval)
                )
                fds: list[Any] = [self._wake_r]
                if self.endpoint is not None:
                    fds.append(self.endpoint)
                readable, _, _ = select.select(fds, [], [], wait)
                if self._wake_r in readable:
                    os.read(self._wake_r, 4096)
        finally:
            self.shutdown()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def get_timer(self) -> float:
        """When the loop wants the next turn (monotonic)."""
        times = [self._hb_due, self._poll_due, self._resources_due]
        times.append(self._grant_due if self.lease is None else self._renew_due)
        for h in self.resources.values():
            if h.role in ("active", "promoting"):
                times.append(self.deadline())
        return min(times)

    def deadline(self) -> float:
        return self.renewed_sent + self.timing.lease_ttl - FENCE_MARGIN

    def step(self, now: float) -> None:
        self._receive(now)
        self._finish_jobs(now)
        self._keep_lease(now)
        if now >= self._resources_due and self.etcd_ok:
            self._resources_due = now + RESOURCES_EVERY
            self._load_runtime_resources()
        for h in list(self.resources.values()):
            if h.role in ("active", "promoting"):
                self._check_active(h, now)
            self._maybe_monitor(h, now)
        if now >= self._poll_due:
            self._poll_due = now + self.timing.heartbeat_interval
            for h in list(self.resources.values()):
                if h.role == "standby" and not h.busy:
                    self._consider(h, now)
        if now >= self._hb_due:
            self._hb_due = now + self.timing.heartbeat_interval
            self._heartbeat(now)
            self._write_status(now)

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
        if d.kind != "heartbeat":
            return  # the refresh notices belong to the refresh protocol, not wired here yet
        body = dict(d.body)
        was = self.peers.get(d.host)
        self.peers[d.host] = (now, body)
        if was is None or now - was[0] > self.timing.heartbeat_timeout:
            self.events.emit("cluster.peer.up", peer=d.host)
        for name, r in body.get("resources", {}).items():
            h = self.resources.get(name)
            if h is not None and isinstance(r, dict) and r.get("role") == "active":
                h.previous = (d.host, now)

    def peer_views(self, now: float) -> dict[str, PeerView]:
        out = {}
        for host, (heard, body) in self.peers.items():
            alive = now - heard <= self.timing.heartbeat_timeout
            res = body.get("resources", {})
            out[host] = PeerView(host, alive, heard, res if isinstance(res, dict) else {})
        return out

    def _heartbeat(self, now: float) -> None:
        if self.endpoint is None:
            return
        body = {
            "resources": {
                name: {
                    "role": h.role,
                    "epoch": h.epoch,
                    "eligible": self._eligible(h, now),
                    "last_failover": h.last_failover,
                }
                for name, h in self.resources.items()
            },
            # The refresh protocol's flags (SPEC 3) ride here once it is wired in: none yet.
            "flags": {},
        }
        self._hb_body = body
        if self._sender is None:  # step() driven by a test: send from here
            for peer in self.endpoint.peers:
                self.endpoint.send(peer, "heartbeat", body, self.wall())

    def _send_heartbeats(self) -> None:
        assert self.endpoint is not None
        while not self._stopping.wait(self.timing.heartbeat_interval):
            body = self._hb_body
            if body is not None:
                for peer in self.endpoint.peers:
                    self.endpoint.send(peer, "heartbeat", body, self.wall())

    def _eligible(self, h: Held, now: float) -> bool:
        return (
            h.role == "standby"
            and not h.busy
            and now >= h.hold_off_until
            and self.lease is not None
        )

    # -- the lease -----------------------------------------------------------------------

    def _keep_lease(self, now: float) -> None:
        if self.lease is None:
            if now < self._grant_due:
                return
            try:
                self.lease = self.coord.grant_lease(self.timing.lease_ttl)
            except (ConnectionFailed, Timeout) as e:
                self._etcd_down(now, str(e))
                self._grant_due = now + self.timing.lease_renew_interval / 2
                return
            self.renewed_sent = now
            self._renew_due = now + self.timing.lease_renew_interval
            self._etcd_up()
            self.events.emit("cluster.lease.granted", lease=self.lease.id, ttl=self.lease.ttl)
            for h in self.resources.values():
                if h.role in ("active", "promoting"):
                    self._reacquire(h, now)  # back from the failsafe
            return
        if now < self._renew_due:
            return
        try:
            self.coord.keepalive(self.lease)
        except LeaseLost as e:
            self.events.emit("cluster.lease.lost", lease=self.lease.id, reason=str(e))
            self.lease = None
            self._grant_due = now
            self._etcd_up()
            for h in list(self.resources.values()):
                # In the failsafe, the lease ran out while etcd was away: take the key again
                # under a new lease (the peers heard us active all along, so none contended).
                if h.role in ("active", "promoting") and h.resource.name not in self.failsafe_on:
                    self.fence(h, now, "the lease was lost")
            self._keep_lease(now)  # a new lease at once
            return
        except (ConnectionFailed, Timeout) as e:
            self._etcd_down(now, str(e))
            self._renew_due = now + self.timing.lease_renew_interval / 4
            return
        self.renewed_sent = now
        self._renew_due = now + self.timing.lease_renew_interval
        self._etcd_up()

    def _etcd_down(self, now: float, reason: str) -> None:
        if self._etcd_seen is not False:
            self.events.emit("cluster.etcd.unreachable", reason=reason)
        self._etcd_seen = False
        self.etcd_ok = False

    def _etcd_up(self) -> None:
        if self._etcd_seen is not True:
            self.events.emit("cluster.etcd.reachable")
        self._etcd_seen = True
        self.etcd_ok = True

    def _reacquire(self, h: Held, now: float) -> None:
        """After the failsafe, the active takes its leader key again under the new lease."""
        assert self.lease is not None
        try:
            leader = read_leader(self.coord, self.keys, h.resource.name)
            epoch = None
            if leader is None:
                floor = h.epoch
                with contextlib.suppress(PairvolError):
                    floor = max(floor, self._node_floor(h.resource))
                epoch = acquire_leader(
                    self.coord, self.keys, h.resource.name, self.me, self.lease, floor=floor
                )
        except (ConnectionFailed, Timeout) as e:
            self._etcd_down(now, str(e))
            return
        if epoch is None:
            self.fence(h, now, "another host holds the resource after etcd came back")
            return
        self._unfence(h.resource, epoch)
        h.epoch = epoch
        self.failsafe_on.discard(h.resource.name)
        self._announce("cluster.active", resource=h.resource.name, epoch=epoch, again=True)

    # -- active resources: the fencing deadline -------------------------------------------

    def _check_active(self, h: Held, now: float) -> None:
        if self.lease is not None and now < self.deadline():
            return
        name = h.resource.name
        if not self.etcd_ok and self.decision.failsafe(self.me, h.resource, self.peer_views(now)):
            if name not in self.failsafe_on:
                self.failsafe_on.add(name)
                self.events.emit("cluster.failsafe", resource=name, epoch=h.epoch)
            return
        self.fence(h, now, "the lease could not be renewed in time")

    def fence(self, h: Held, now: float, why: str) -> None:
        """Have the node refuse client writes for the resource, then stop the application."""
        name = h.resource.name
        self.failsafe_on.discard(name)
        failed = []
        for group in h.resource.groups:
            try:
                self.node.call(
                    "pair.fence",
                    {"target": group, "epoch": h.epoch, "reason": f"cluster: {why}"},
                    timeout=max(0.2, self.deadline() + FENCE_MARGIN - now),
                )
            except PairvolError as e:
                failed.append(f"{group}: {e}")
        h.role = "fenced"
        h.hold_off_until = now + HOLD_OFF_TTLS * self.timing.lease_ttl
        self._announce(
            "cluster.fenced", resource=name, epoch=h.epoch, why=why, errors=failed or None
        )
        h.busy = True
        self._spawn(lambda: self._stop_app(h.resource), name, "stop")
        with contextlib.suppress(ConnectionFailed, Timeout, PairvolError):
            if self.lease is not None:
                release_leader(self.coord, self.keys, name, self.me)

    def _maybe_monitor(self, h: Held, now: float) -> None:
        r = h.resource
        if h.role != "active" or not r.monitor or h.monitoring or h.busy or now < h.monitor_due:
            return
        h.monitoring = True
        self._spawn(lambda: self._monitor(r), r.name, "monitor")

    def _monitor(self, r: Resource) -> tuple[bool, dict[str, Any]]:
        assert r.monitor is not None
        code, tail = self.runner(r.monitor, MONITOR_TIMEOUT, self._command_env(r))
        return code == 0, {"status": code, "output": tail}

    def _stop_app(self, r: Resource) -> tuple[bool, dict[str, Any]]:
        if r.stop is None:
            return True, {}
        code, tail = self.runner(r.stop, COMMAND_TIMEOUT, self._command_env(r))
        return code == 0, {"status": code, "output": tail}

    # -- standby resources: promotion -----------------------------------------------------

    def _consider(self, h: Held, now: float) -> None:
        if self.lease is None or now < h.hold_off_until:
            return
        if now - h.since < RESOURCES_EVERY + self.timing.heartbeat_timeout:
            # Hear the peers first: a preferred host may be starting too, or learn of a new
            # resource a little later than we did.
            return
        name = h.resource.name
        if not self.etcd_ok:
            return  # the lease renewal finds out when it is back; no request to hang on here
        try:
            leader = read_leader(self.coord, self.keys, name)
        except (ConnectionFailed, Timeout) as e:
            self._etcd_down(now, str(e))
            return
        if leader is not None:
            h.epoch = leader.epoch  # what a standby shows: the resource's current epoch
            h.failsafe_seen = False
            if leader.holder != self.me:
                h.previous = (leader.holder, h.previous[1] if h.previous else now)
            return
        views = self.peer_views(now)
        if any(v.claims(name) for v in views.values()):
            h.failsafe_seen = True  # an active without its key: it is in the failsafe
        if not self.decision.may_contend(self.me, h.resource, None, views):
            return
        # An active in the failsafe fences itself once it has not heard us for
        # heartbeat_timeout (plus a turn of its loop, which an etcd request may hold up to its
        # timeout): give it twice that from the last time we heard it.
        held = h.previous[1] + 2 * self.timing.heartbeat_timeout if h.previous else 0.0
        if h.failsafe_seen and now < held:
            return
        try:
            floor = self._node_floor(h.resource)
        except PairvolError as e:
            self.events.emit("cluster.node.unavailable", resource=name, reason=str(e))
            h.hold_off_until = now + self.timing.lease_ttl
            return
        try:
            epoch = acquire_leader(self.coord, self.keys, name, self.me, self.lease, floor=floor)
        except (ConnectionFailed, Timeout) as e:
            self._etcd_down(now, str(e))
            return
        except PairvolError as e:
            self.events.emit("cluster.promote.refused", resource=name, reason=str(e))
            h.hold_off_until = now + self.timing.lease_ttl
            return
        if epoch is None:
            return
        h.role, h.epoch, h.busy = "promoting", epoch, True
        previous = h.previous
        self.events.emit(
            "cluster.promoting", resource=name, epoch=epoch, floor=floor,
            previous=previous[0] if previous else None,
        )  # fmt: skip
        self._spawn(lambda: self._promote(h.resource, epoch), name, "promote")

    def _node_floor(self, r: Resource) -> int:
        """The highest pair or cluster epoch the node has for the resource's groups."""
        floor = 0
        for group in r.groups:
            doc = self.node.call("pair.display", {"target": group})
            for p in doc.get("pairs", []):
                floor = max(floor, int(p.get("epoch") or 0), int(p.get("cluster_epoch") or 0))
        return floor

    def _promote(self, r: Resource, epoch: int) -> tuple[bool, dict[str, Any]]:
        takeover: dict[str, str] = {}
        try:
            for group in r.groups:
                doc = self.node.call("pair.display", {"target": group})
                roles = {p.get("role") for p in doc.get("pairs", [])}
                if "secondary" in roles:
                    out = self.node.call("pair.takeover", {"target": group}, timeout=60.0)
                    states = sorted({str(p.get("state")) for p in out.get("pairs", [])})
                    takeover[group] = "SVOL-takeover " + "/".join(states)
                else:
                    takeover[group] = "nop"
            self._unfence(r, epoch)
        except PairvolError as e:
            return False, {"takeover": takeover, "error": f"{type(e).__name__}: {e}"}
        if r.start is not None:
            code, tail = self.runner(r.start, COMMAND_TIMEOUT, self._command_env(r))
            if code != 0:
                return False, {"takeover": takeover, "error": f"start: status {code}: {tail}"}
        return True, {"takeover": takeover}

    def _unfence(self, r: Resource, epoch: int) -> None:
        for group in r.groups:
            self.node.call("pair.unfence", {"target": group, "epoch": epoch})

    def _command_env(self, r: Resource) -> dict[str, str]:
        h = self.resources[r.name]
        return dict(
            os.environ,
            PAIRVOL_RESOURCE=r.name,
            PAIRVOL_HOST=self.me,
            PAIRVOL_EPOCH=str(h.epoch),
            PAIRVOL_GROUPS=" ".join(r.groups),
        )

    # -- jobs ----------------------------------------------------------------------------

    def _spawn(self, fn: Callable[[], tuple[bool, dict[str, Any]]], name: str, kind: str) -> None:
        def job() -> None:
            try:
                ok, detail = fn()
            except Exception as e:  # a job's failure is reported, never lost with its thread
                ok, detail = False, {"error": f"{type(e).__name__}: {e}"}
            self._jobs.put(JobDone(name, kind, ok, detail))
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"j")

        if self.threaded:
            threading.Thread(target=job, name=f"agent-{kind}-{name}", daemon=True).start()
        else:
            job()

    def _finish_jobs(self, now: float) -> None:
        while True:
            try:
                done = self._jobs.get_nowait()
            except queue.Empty:
                return
            h = self.resources.get(done.resource)
            if h is None:
                continue
            if done.kind == "monitor":
                h.monitor_due = now + MONITOR_INTERVAL
                h.monitoring = False
                if not done.ok and h.role == "active":
                    self.events.emit("cluster.monitor.failed", resource=done.resource,
                                     **done.detail)  # fmt: skip
                    self.fence(h, now, f"the monitor command failed: {done.detail}")
                continue
            h.busy = False
            if done.kind == "stop":
                self.events.emit("cluster.stopped.app", resource=done.resource, ok=done.ok,
                                 **done.detail)  # fmt: skip
                if h.role == "fenced":
                    h.role = "standby"
                    self._announce("cluster.standby", resource=done.resource, epoch=h.epoch)
                continue
            if not done.ok:
                self.events.emit("cluster.promote.failed", resource=done.resource, **done.detail)
                self.fence(h, now, f"promotion failed: {done.detail.get('error')}")
                continue
            h.role = "active"
            h.monitor_due = now + MONITOR_INTERVAL
            h.takeover = dict(done.detail.get("takeover", {}))
            devices = h.resource.devices_on(self.me)
            self._announce(
                "cluster.active", resource=done.resource, epoch=h.epoch, takeover=h.takeover,
                # Not pretended: the PVID-cache refresh and attach are not wired in yet.
                devices_not_attached=sorted(devices) or None,
            )  # fmt: skip
            prev = h.previous
            if prev is not None and prev[0] != self.me:
                seconds = round(now - prev[1], 3)
                h.last_failover = {
                    "at": round(self.wall(), 3), "from": prev[0], "to": self.me,
                    "epoch": h.epoch, "seconds": seconds, "takeover": h.takeover,
                    "why": "the leader key vanished and the active host was not heard",
                }  # fmt: skip
                self._announce("cluster.failover.done", resource=done.resource,
                                 seconds=seconds, **{"from": prev[0]}, epoch=h.epoch,
                                 takeover=h.takeover)  # fmt: skip

    # -- resources -----------------------------------------------------------------------

    def _track(self, r: Resource) -> None:
        if self.me not in r.hosts:
            return
        if r.name in self.resources:
            self.resources[r.name].resource = r
            return
        self.resources[r.name] = Held(r, since=self.clock())
        self._announce("cluster.standby", resource=r.name, epoch=0)

    def _load_runtime_resources(self) -> None:
        try:
            runtime = list_resources(self.coord, self.keys, known_hosts=self.config.host_names())
        except (ConnectionFailed, Timeout):
            return
        except PairvolError as e:
            self.events.emit("cluster.resource.bad", reason=str(e))
            return
        names = {r.name for r in self.config.resources}
        for r in runtime:
            if r.name not in names:
                self._track(r)
        gone = set(self.resources) - names - {r.name for r in runtime}
        for name in gone:
            h = self.resources[name]
            if h.role == "standby" and not h.busy:
                del self.resources[name]
                self.events.emit("cluster.resource.dropped", resource=name)

    # -- status and shutdown --------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        views = self.peer_views(now)
        return {
            "host": self.me,
            "cluster": self.config.cluster,
            "pid": os.getpid(),
            "etcd": "reachable" if self.etcd_ok else "unreachable",
            "lease": None
            if self.lease is None
            else {
                "id": self.lease.id,
                "ttl": self.lease.ttl,
                "renewed_ago": round(now - self.renewed_sent, 3),
            },
            "resources": [
                {
                    "name": name,
                    "role": h.role,
                    "epoch": h.epoch,
                    "failsafe": name in self.failsafe_on,
                    "takeover": h.takeover,
                    "last_failover": h.last_failover,
                }
                for name, h in sorted(self.resources.items())
            ],
            "peers": {
                p: {
                    "alive": v.alive,
                    "heard_ago": round(now - v.heard_at, 3),
                    "resources": dict(v.resources),
                    "flags": self.peers[p][1].get("flags", {}),
                }
                for p, v in sorted(views.items())
            },
            "flags": {},
            "updated": round(self.wall(), 3),
        }

    def _announce(self, event: str, **fields: Any) -> None:
        """A role change: the status file first, then the event (tests wait on events)."""
        self._write_status(self.clock(), force=True)
        self.events.emit(event, **fields)

    def _write_status(self, now: float, *, force: bool = False) -> None:
        doc = self.status(now)
        key = json.dumps({k: v for k, v in doc.items() if k not in ("updated", "lease", "peers")})
        if not force and key == self._status_written and int(now) % 2:
            return
        self._status_written = key
        write_atomic(
            os.path.join(self.state_dir, STATUS),
            json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n",
        )

    def shutdown(self) -> None:
        """A clean stop: each active resource's application is stopped, its node fenced,
        its leader key released and the lease revoked (the standby takes over at once)."""
        self._stopping.set()
        if self._sender is not None:
            self._sender.join()
        now = self.clock()
        for h in self.resources.values():
            if h.role in ("active", "promoting"):
                self._stop_app(h.resource)
                for group in h.resource.groups:
                    with contextlib.suppress(PairvolError):
                        self.node.call(
                            "pair.fence",
                            {"target": group, "epoch": h.epoch, "reason": "cluster: agent stopped"},
                        )
                with contextlib.suppress(PairvolError):
                    release_leader(self.coord, self.keys, h.resource.name, self.me)
                h.role = "standby"
                self.events.emit("cluster.released", resource=h.resource.name, epoch=h.epoch)
        if self.lease is not None:
            with contextlib.suppress(PairvolError):
                self.coord.revoke(self.lease)
            self.lease = None
        self._write_status(now)
        self.events.emit("cluster.stopped", host=self.me)
        if self.endpoint is not None:
            self.endpoint.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
