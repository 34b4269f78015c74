"""The failover decision for one resource on one host, pure code (SPEC 4 fencing; issue 9).

Theory of operation
-------------------
A resource (an application and the pair groups it owns) runs on one of its hosts, the
*active*; the others are *standbys*.  The active holds the resource's leader key in etcd under
its lease (created only if absent, with the resource's epoch bumped in the same transaction:
Patroni's model; cluster/coord.py does the etcd part).  Each host's agent runs one
:class:`FailoverCore` per resource.  The core takes *events* with ``now`` (monotonic seconds)
and returns *actions* that the loop carries out in list order; it asks for one timer
(:meth:`FailoverCore.get_timer`, :meth:`FailoverCore.handle_timer`) and does no I/O.

Roles: STANDBY, CANDIDATE (the leader key is gone and this host will try to take it),
PROMOTING (it won the epoch transaction; the storage takeover runs), ACTIVE (the application
runs), DEMOTING (a planned switchover: the application stops, the pairs are swapped) and
FENCED (this host stopped being active on its own: its node refuses writes for the
resource's pairs).  Every move is a row of :data:`ROWS`, keyed ``(role, trigger)``; a trigger
is an event (a report such as AcquireResult, a command such as SwitchoverRequested, an
observation of the leader key) or a condition the core derives after every input (DEADLINE,
ELIGIBLE, ...).  A command or report the table has no row for raises
:class:`~replicator.errors.IllegalState` and changes nothing; a report of an action asked for
in an earlier role (a TakeoverDone after the host fenced itself) is absorbed and logged.

The rules:

1. **Promotion.**  A standby becomes a candidate only when the leader key is known to be
   gone (its lease expired, or it was released), it holds a lease of its own that is not past
   its deadline, etcd answers, no live peer claims to be active, and no hold is running (see
   4).  Hosts try in preference order: a candidate waits ``try_delay`` for every live host
   ahead of it in the list (a switchover's target waits for none), so the preferred one
   usually wins.  It promotes only after it *won* the transaction (AcquireResult(won)), then
   runs the storage takeover with the epoch it won, then starts the application.
2. **Self-fencing.**  An active (or promoting, or demoting) host's *deadline* is the send
   time of the last renewal etcd confirmed, plus the lease TTL, minus ``margin``: never the
   reply's arrival time, so a slow reply cannot stretch it.  At the deadline the core fences:
   FenceNode (the node refuses writes for the resource's pairs) then StopApp.  It fences at
   once when etcd says its lease is gone, when the leader key is gone or held by another host,
   or when a peer claims to be active at an epoch not older than ours.
3. **Failsafe (Patroni's failsafe mode).**  With ``failsafe`` on, an active past its deadline
   keeps running while *every* other host of the resource confirms it: each one's latest
   heartbeat, received less than ``heartbeat_timeout`` ago, names this host in ``confirms``
   at an epoch not newer than ours.  The first host that stops confirming (or is not heard
   for ``heartbeat_timeout``) fences it.  A host confirms X in its heartbeats while it hears
   X claim to be active at an epoch not older than the highest it knows *and say it cannot
   reach etcd* (only such an active can need it), and it is not itself active.  A change of
   this host's etcd reachability or of whom it confirms goes out to the peers at once.  So
   when etcd is unreachable but the agents see each other, nothing fails over; when etcd is
   unreachable and the peer is lost too, the active fences at its deadline and nobody
   promotes (nobody can reach etcd).
4. **Holds.**  A host does not try to take the key before ``heartbeat_timeout + margin``
   after it last *sent* a confirmation (the confirmed active fences at most
   ``heartbeat_timeout`` after it last *received* one), nor before ``heartbeat_timeout +
   margin`` after it started (it may have confirmed before a restart), nor for ``lease_ttl``
   after a switchover handed the key to another host, nor for ``cooldown`` after its own
   application or takeover failed.
5. **Starting, and a key left behind.**  An agent that starts fences its node and stops the
   application: it cannot know whether it was the active before it restarted (a restarted
   preferred host wins the key back when its old lease has expired).  A host that sees the
   leader key name it while it does not claim the resource (a key of an earlier life, or one
   it could not release while etcd was away) releases it (a conditional delete).
6. **Switchover.**  SwitchoverRequested(to) on the active: StopApp; when stopped, SwapPairs
   (the target becomes the primary; only differences are copied); when swapped,
   ReleaseLeader naming the target, and the target takes the key at once (the others hold).
   A failed swap restarts the application here.
7. **Deletion.**  Retire() (the resource was deleted, as ``pcs resource delete`` stops a
   resource before it removes it): the active stops the application, then releases the key
   (no handover) and stands by; a host that does not run it stands by.  A retired core never
   tries for the key again (the loop drops it once it stands by).

Heartbeats: one :class:`~replicator.liveness.Liveness` per peer host (the same class the
storage nodes use per link): a SendHeartbeat every ``heartbeat_interval`` to each peer (and
at once on every role change), PeerLost when one is not heard for ``heartbeat_timeout``.

docs/decisions.md, "Cluster agent", says why; docs/state-machines.md has the table, generated
by ``tools/gen-state-docs``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

from replicator import liveness as lv
from replicator.errors import IllegalState, UsageError


class Role(enum.StrEnum):
    STANDBY = "standby"
    CANDIDATE = "candidate"
    PROMOTING = "promoting"
    ACTIVE = "active"
    DEMOTING = "demoting"
    FENCED = "fenced"


#: Roles in which this host claims the resource (its heartbeats say active).
CLAIMING: Final = frozenset({Role.PROMOTING, Role.ACTIVE, Role.DEMOTING})


# --------------------------------------------------------------------------------------------
# Events


def _check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise UsageError(f"{what} {value!r} is not a printable, non-empty string")


def _check_epoch(value: object) -> None:
    if type(value) is not int or not 0 <= value < 1 << 63:
        raise UsageError(f"epoch {value!r} is not a non-negative 63-bit integer")


def _check_time(what: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise UsageError(f"{what} {value!r} is not a finite number of seconds")


@dataclass(frozen=True, slots=True)
class Started:
    """The agent started: ask for a lease, start the heartbeats."""


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    """etcd granted this host's lease; ``at``: when the grant request was *sent*."""

    at: float
    ttl: float

    def __post_init__(self) -> None:
        _check_time("at", self.at)
        _check_time("ttl", self.ttl)


@dataclass(frozen=True, slots=True)
class LeaseRenewed:
    """etcd confirmed a renewal; ``at``: when that renewal was *sent* (the deadline counts
    from there, never from the reply)."""

    at: float
    ttl: float

    def __post_init__(self) -> None:
        _check_time("at", self.at)
        _check_time("ttl", self.ttl)


@dataclass(frozen=True, slots=True)
class LeaseRenewFailed:
    """A grant or renewal failed.  ``gone``: etcd answered that the lease does not exist
    (expired or revoked); otherwise etcd did not answer."""

    reason: str = ""
    gone: bool = False


@dataclass(frozen=True, slots=True)
class LeaderObserved:
    """The resource's leader key exists: ``holder`` holds it at ``epoch`` (a watch or a read).
    ``lease_alive``: the holder's lease still exists (False: the key is about to go)."""

    holder: str
    epoch: int
    lease_alive: bool = True

    def __post_init__(self) -> None:
        _check_name("holder", self.holder)
        _check_epoch(self.epoch)


@dataclass(frozen=True, slots=True)
class LeaderGone:
    """The leader key is absent.  ``epoch``: the resource's epoch as read with it (0: not
    read); ``handover``: the host a switchover released it to, if any."""

    epoch: int = 0
    handover: str | None = None

    def __post_init__(self) -> None:
        _check_epoch(self.epoch)
        if self.handover is not None:
            _check_name("handover", self.handover)


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """The TryAcquire transaction's answer: ``won`` with the bumped ``epoch``, or lost (the
    key existed, or the lease was gone); ``epoch`` then is the resource's current one."""

    won: bool
    epoch: int

    def __post_init__(self) -> None:
        _check_epoch(self.epoch)


@dataclass(frozen=True, slots=True)
class PeerHeard:
    """A heartbeat from another host's agent, for this resource.  ``epoch``: the highest it
    knows (its own when active); ``active``: it claims the resource; ``confirms``: the host
    it confirms as active (failsafe); ``etcd_ok``: whether etcd backs it (it answers and,
    for an active, the lease is renewed within the deadline: an active that says False
    asks for confirmations); ``flags``: its refresh flags, carried for status only."""

    host: str
    epoch: int
    active: bool
    confirms: str | None = None
    etcd_ok: bool = True
    flags: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check_name("host", self.host)
        _check_epoch(self.epoch)
        if self.confirms is not None:
            _check_name("confirms", self.confirms)


@dataclass(frozen=True, slots=True)
class PeerLost:
    """A heartbeat to ``host`` failed outright (refused, reset): it is lost at once."""

    host: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class EtcdUnreachable:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class EtcdReachable:
    pass


@dataclass(frozen=True, slots=True)
class TakeoverDone:
    """The storage takeover ended; ``detail``: its result as horctakeover names them (nop,
    swap, SVOL-takeover, PVOL-PSUE, ...) or why it failed."""

    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AppStarted:
    pass


@dataclass(frozen=True, slots=True)
class AppStopped:
    pass


@dataclass(frozen=True, slots=True)
class AppFailed:
    """The start, stop or monitor command failed (or the application died)."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class SwitchoverRequested:
    """Planned switchover to ``to`` (None: the first live host after this one in preference
    order)."""

    to: str | None = None


@dataclass(frozen=True, slots=True)
class Retire:
    """The resource was deleted: stop it here, let go of the key, never try for it again."""


@dataclass(frozen=True, slots=True)
class SwapDone:
    """The SwapPairs of a switchover ended."""

    ok: bool
    detail: str = ""


Event = (
    Started
    | LeaseGranted
    | LeaseRenewed
    | LeaseRenewFailed
    | LeaderObserved
    | LeaderGone
    | AcquireResult
    | PeerHeard
    | PeerLost
    | EtcdUnreachable
    | EtcdReachable
    | TakeoverDone
    | AppStarted
    | AppStopped
    | AppFailed
    | SwitchoverRequested
    | SwapDone
    | Retire
)


# --------------------------------------------------------------------------------------------
# Actions


@dataclass(frozen=True, slots=True)
class GrantLease:
    """Ask etcd for a lease of ``ttl`` seconds; feed LeaseGranted(at=the send time) or
    LeaseRenewFailed."""

    ttl: float


@dataclass(frozen=True, slots=True)
class RenewLease:
    """Send one keep-alive; feed LeaseRenewed(at=the send time) or LeaseRenewFailed."""


@dataclass(frozen=True, slots=True)
class TryAcquire:
    """The leader transaction: create the resource's leader key for ``host`` under its lease
    if absent (``create_revision == 0``) and bump the epoch in the same transaction; feed
    AcquireResult."""

    resource: str
    host: str


@dataclass(frozen=True, slots=True)
class RunTakeover:
    """Take the resource's pairs over on this host's storage node with ``epoch`` (SPEC 4);
    then refresh or check the PVID cache and attach the devices; feed TakeoverDone."""

    resource: str
    epoch: int


@dataclass(frozen=True, slots=True)
class FenceNode:
    """Have this host's storage node refuse writes for the resource's pairs, now."""

    resource: str
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class StartApp:
    """Run the resource's start command; feed AppStarted or AppFailed."""

    resource: str


@dataclass(frozen=True, slots=True)
class StopApp:
    """Run the resource's stop command; feed AppStopped or AppFailed."""

    resource: str


@dataclass(frozen=True, slots=True)
class SwapPairs:
    """Switchover: swap the resource's pairs so that ``to``'s side becomes the primary
    (``pair resync --swap``: only differences are copied); feed SwapDone."""

    resource: str
    to: str


@dataclass(frozen=True, slots=True)
class ReleaseLeader:
    """Delete the leader key if this host holds it (a conditional delete), naming
    ``handover`` as the host that should take it next (or None)."""

    resource: str
    handover: str | None = None


@dataclass(frozen=True, slots=True)
class SendHeartbeat:
    """One heartbeat to ``to``'s agent, carrying this host's view (the peer feeds it back as
    :class:`PeerHeard`); the loop adds the refresh flags."""

    to: str
    resource: str
    host: str
    epoch: int
    active: bool
    confirms: str | None
    etcd_ok: bool


FieldValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class EmitEvent:
    """One structured line for the event log (``cluster.*``)."""

    name: str
    fields: tuple[tuple[str, FieldValue], ...] = ()

    def as_dict(self) -> dict[str, FieldValue]:
        return dict(self.fields)


Action = (
    GrantLease
    | RenewLease
    | TryAcquire
    | RunTakeover
    | FenceNode
    | StartApp
    | StopApp
    | SwapPairs
    | ReleaseLeader
    | SendHeartbeat
    | EmitEvent
)


# --------------------------------------------------------------------------------------------
# The table


class Trigger(enum.StrEnum):
    """The event dimension of the table: reports and commands (from events), observations
    (facts about the leader key and the peers) and conditions the core derives."""

    STARTED = "Started"
    ACQUIRE_WON = "AcquireResult(won)"
    ACQUIRE_LOST = "AcquireResult(lost)"
    TAKEOVER_OK = "TakeoverDone(ok)"
    TAKEOVER_FAILED = "TakeoverDone(failed)"
    APP_STARTED = "AppStarted"
    APP_STOPPED = "AppStopped"
    APP_FAILED = "AppFailed"
    SWITCHOVER = "SwitchoverRequested"
    SWAP_OK = "SwapDone(ok)"
    SWAP_FAILED = "SwapDone(failed)"
    RETIRE = "Retire"
    STOPPED_RETIRING = "AppStopped(retiring)"
    # observations
    LEADER_OURS = "leader key: ours"
    LEADER_OTHER = "leader key: another host's"
    LEADER_GONE = "leader key: gone"
    LEASE_GONE = "lease gone"
    NEWER_ACTIVE = "a peer active at our epoch or newer"
    # derived conditions
    DEADLINE = "deadline passed, not confirmed"
    ELIGIBLE = "may try"
    INELIGIBLE = "may no longer try"
    TRY_DUE = "try time"
    REJOIN = "etcd and a lease again"


REPORTS: Final = frozenset(
    {
        Trigger.ACQUIRE_WON,
        Trigger.ACQUIRE_LOST,
        Trigger.TAKEOVER_OK,
        Trigger.TAKEOVER_FAILED,
        Trigger.APP_STARTED,
        Trigger.APP_STOPPED,
        Trigger.APP_FAILED,
        Trigger.STOPPED_RETIRING,
        Trigger.SWAP_OK,
        Trigger.SWAP_FAILED,
    }
)
COMMANDS: Final = frozenset({Trigger.STARTED, Trigger.SWITCHOVER, Trigger.RETIRE})

#: The action a report answers (a report with none outstanding is refused).
_ANSWERS: Final[Mapping[Trigger, str]] = {
    Trigger.ACQUIRE_WON: "acquire",
    Trigger.ACQUIRE_LOST: "acquire",
    Trigger.TAKEOVER_OK: "takeover",
    Trigger.TAKEOVER_FAILED: "takeover",
    Trigger.APP_STARTED: "app",
    Trigger.APP_STOPPED: "app",
    Trigger.APP_FAILED: "app",
    Trigger.STOPPED_RETIRING: "app",
    Trigger.SWAP_OK: "swap",
    Trigger.SWAP_FAILED: "swap",
}


class _Ctx:
    __slots__ = ("core", "event", "now", "out", "reason")

    def __init__(self, core: FailoverCore, event: Event | None, now: float, reason: str):
        self.core = core
        self.event = event
        self.now = now
        self.out: list[Action] = []
        self.reason = reason

    def emit(self, name: str, **fields: FieldValue) -> None:
        self.out.append(EmitEvent(name, self.core._fields(fields)))


@dataclass(frozen=True, slots=True)
class Step:
    label: str
    run: Callable[[_Ctx], None]


def _step(label: str) -> Callable[[Callable[[_Ctx], None]], Step]:
    def wrap(fn: Callable[[_Ctx], None]) -> Step:
        return Step(label, fn)

    return wrap


@_step("grant a lease")
def GRANT(c: _Ctx) -> None:
    c.core._grant(c.now, c.out)


@_step("fence the node and stop the application (a restarted agent cannot know it still holds)")
def FENCE_AT_START(c: _Ctx) -> None:
    k = c.core
    c.out.append(FenceNode(k.resource, k._epoch, "agent started"))
    k._pending.add("app")
    c.out.append(StopApp(k.resource))


@_step("schedule the try (try_delay per live host ahead)")
def SCHEDULE(c: _Ctx) -> None:
    k = c.core
    rank = k._rank()
    k._try_at = c.now + rank * k.try_delay
    c.emit("cluster.candidate", rank=rank, try_at=k._try_at)


@_step("TryAcquire")
def TRY(c: _Ctx) -> None:
    k = c.core
    k._pending.add("acquire")
    k._try_at = None
    c.out.append(TryAcquire(k.resource, k.host))
    c.emit("cluster.acquire", state="trying")


@_step("take the won epoch")
def WON(c: _Ctx) -> None:
    e = c.event
    assert isinstance(e, AcquireResult)
    k = c.core
    k._my_epoch = e.epoch
    k._epoch = max(k._epoch, e.epoch)
    k._won_at = c.now
    k._leader, k._leader_epoch = k.host, e.epoch
    c.emit("cluster.acquire", state="won")


@_step("log the lost race; wait for the watch to show the key")
def LOST(c: _Ctx) -> None:
    c.core._leader_known = False  # someone holds it now (or our lease was gone): look again
    c.emit("cluster.acquire", state="lost")


@_step("RunTakeover(epoch)")
def TAKEOVER(c: _Ctx) -> None:
    k = c.core
    k._pending.add("takeover")
    c.out.append(RunTakeover(k.resource, k._my_epoch))


@_step("log the failover (result, time from the key's loss)")
def FAILED_OVER(c: _Ctx) -> None:
    e = c.event
    assert isinstance(e, TakeoverDone)
    k = c.core
    since = k._gone_at if k._gone_at is not None else k._won_at
    k.last_failover = {
        "epoch": k._my_epoch,
        "result": e.detail,
        "took": round(c.now - (since or c.now), 6),
        "at": c.now,
        "why": k._gone_why,
    }
    c.emit("cluster.failover", result=e.detail, took=k.last_failover["took"], why=k._gone_why)


@_step("StartApp")
def START_APP(c: _Ctx) -> None:
    c.core._pending.add("app")
    c.out.append(StartApp(c.core.resource))


@_step("StopApp")
def STOP_APP(c: _Ctx) -> None:
    c.core._pending.add("app")
    c.out.append(StopApp(c.core.resource))


@_step("FenceNode")
def FENCE(c: _Ctx) -> None:
    k = c.core
    c.out.append(FenceNode(k.resource, max(k._my_epoch, k._epoch), c.reason))
    c.emit("cluster.fenced", reason=c.reason)


@_step("ReleaseLeader (if etcd answers)")
def RELEASE(c: _Ctx) -> None:
    k = c.core
    if k._etcd_ok:
        c.out.append(ReleaseLeader(k.resource, None))


@_step("the key names us but we do not claim it (an earlier life, or we fenced): release it")
def RELEASE_OURS(c: _Ctx) -> None:
    k = c.core
    if k._etcd_ok and "acquire" not in k._pending:  # not our own win, reported by the watch
        c.out.append(ReleaseLeader(k.resource, None))
        c.emit("cluster.release", why="the leader key names this host, which does not claim it")


@_step("cool down (no try for `cooldown`)")
def COOLDOWN(c: _Ctx) -> None:
    c.core._cooldown_until = c.now + c.core.cooldown


@_step("pick the target, log the switchover")
def SWITCH(c: _Ctx) -> None:
    e = c.event
    assert isinstance(e, SwitchoverRequested)
    k = c.core
    k._switch_to = k._switch_target(e.to)
    c.emit("cluster.switchover", state="stopping", to=k._switch_to)


@_step("retire: never try for the key again")
def RETIRING(c: _Ctx) -> None:
    c.core._retired = True
    c.emit("cluster.retire", state="stopping" if c.core.role is Role.ACTIVE else "retired")


@_step("log: retired")
def RETIRED(c: _Ctx) -> None:
    c.emit("cluster.retire", state="retired")


@_step("SwapPairs(to)")
def SWAP(c: _Ctx) -> None:
    k = c.core
    assert k._switch_to is not None
    k._pending.add("swap")
    c.out.append(SwapPairs(k.resource, k._switch_to))
    c.emit("cluster.switchover", state="swapping", to=k._switch_to)


@_step("ReleaseLeader naming the target; hold for a TTL")
def HAND_OVER(c: _Ctx) -> None:
    k = c.core
    to = k._switch_to
    assert to is not None
    c.out.append(ReleaseLeader(k.resource, to))
    k._hold(c.now + k.lease_ttl)
    k._switch_to = None
    c.emit("cluster.switchover", state="released", to=to)


@_step("log the failed swap; the application starts again")
def SWAP_BACK(c: _Ctx) -> None:
    e = c.event
    assert isinstance(e, SwapDone)
    c.emit("cluster.switchover", state="failed", detail=e.detail, to=c.core._switch_to or "")
    c.core._switch_to = None


@_step("forget the epoch we held")
def DROP_EPOCH(c: _Ctx) -> None:
    c.core._my_epoch = 0


@_step("log")
def NOTE(c: _Ctx) -> None:
    c.emit("cluster.note", what=c.reason)


@_step("log the application stopped")
def STOPPED(c: _Ctx) -> None:
    c.emit("cluster.app.stopped")


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    roles: tuple[Role, ...]
    triggers: tuple[Trigger, ...]
    target: Role | None  # None: stay
    steps: tuple[Step, ...] = ()


@dataclass(frozen=True, slots=True)
class Move:
    target: Role
    steps: tuple[Step, ...]
    label: str


R, T = Role, Trigger
_LOST_CLAIM = (T.DEADLINE, T.LEASE_GONE, T.LEADER_OTHER, T.LEADER_GONE, T.NEWER_ACTIVE)

# The rules; the first row that matches decides.
# fmt: off
ROWS: Final[tuple[Row, ...]] = (
    Row("start: fence the node, stop the application, grant a lease (heartbeats start)",
        (R.STANDBY,), (T.STARTED,), None, (FENCE_AT_START, GRANT)),
    # -- promotion --
    Row("the key is gone and nothing holds us back: candidate", (R.STANDBY,), (T.ELIGIBLE,),
        R.CANDIDATE, (SCHEDULE,)),
    Row("our turn: try the leader transaction", (R.CANDIDATE,), (T.TRY_DUE,), None, (TRY,)),
    Row("conditions changed before the try: back to standby", (R.CANDIDATE,),
        (T.INELIGIBLE, T.LEADER_OTHER), R.STANDBY),
    Row("the key is ours (our win, seen first by the watch; or an earlier life's key)",
        (R.CANDIDATE,), (T.LEADER_OURS,), R.STANDBY, (RELEASE_OURS,)),
    Row("the key is ours but we do not claim it: release it", (R.STANDBY, R.FENCED),
        (T.LEADER_OURS,), None, (RELEASE_OURS,)),
    Row("won the epoch: take the storage over", (R.CANDIDATE, R.STANDBY), (T.ACQUIRE_WON,),
        R.PROMOTING, (WON, TAKEOVER)),
    Row("lost the race", (R.CANDIDATE, R.STANDBY), (T.ACQUIRE_LOST,), R.STANDBY, (LOST,)),
    Row("taken over: start the application", (R.PROMOTING,), (T.TAKEOVER_OK,), R.ACTIVE,
        (FAILED_OVER, START_APP)),
    Row("the takeover failed: fence, release, cool down", (R.PROMOTING,),
        (T.TAKEOVER_FAILED,), R.FENCED, (FENCE, RELEASE, COOLDOWN, DROP_EPOCH)),
    # -- losing the claim: fence first, then stop the application --
    Row("promoting, lost the claim: fence", (R.PROMOTING,), _LOST_CLAIM, R.FENCED,
        (FENCE, DROP_EPOCH)),
    Row("active, lost the claim (deadline, lease, key, newer active): fence, stop",
        (R.ACTIVE, R.DEMOTING), _LOST_CLAIM, R.FENCED, (FENCE, STOP_APP, DROP_EPOCH)),
    Row("the application failed: fence, stop it, release, cool down", (R.ACTIVE,),
        (T.APP_FAILED, T.APP_STOPPED), R.FENCED,
        (FENCE, STOP_APP, RELEASE, COOLDOWN, DROP_EPOCH)),
    Row("the application runs", (R.ACTIVE,), (T.APP_STARTED,), None, (NOTE,)),
    # -- switchover --
    Row("switchover: stop the application", (R.ACTIVE,), (T.SWITCHOVER,), R.DEMOTING,
        (SWITCH, STOP_APP)),
    Row("stopped: swap the pairs", (R.DEMOTING,), (T.APP_STOPPED,), None, (SWAP,)),
    Row("swapped: release the key to the target", (R.DEMOTING,), (T.SWAP_OK,), R.STANDBY,
        (HAND_OVER, DROP_EPOCH)),
    Row("the swap failed: start the application again", (R.DEMOTING,), (T.SWAP_FAILED,),
        R.ACTIVE, (SWAP_BACK, START_APP)),
    Row("the stop failed: fence, release", (R.DEMOTING,), (T.APP_FAILED,), R.FENCED,
        (FENCE, RELEASE, COOLDOWN, DROP_EPOCH)),
    # -- deletion --
    Row("deleted: stop the application", (R.ACTIVE,), (T.RETIRE,), R.DEMOTING,
        (RETIRING, STOP_APP)),
    Row("deleted, not running here: retire", (R.STANDBY, R.CANDIDATE, R.FENCED), (T.RETIRE,),
        R.STANDBY, (RETIRING,)),
    Row("stopped for the deletion: release the key, stand by", (R.DEMOTING,),
        (T.STOPPED_RETIRING,), R.STANDBY, (RELEASE, DROP_EPOCH, RETIRED)),
    # -- fenced --
    Row("fenced, etcd and a lease again: standby", (R.FENCED,), (T.REJOIN,), R.STANDBY),
    Row("stopped (the stop at start-up, or a fence's): nothing runs here",
        (R.STANDBY, R.CANDIDATE, R.FENCED), (T.APP_STOPPED,), None, (STOPPED,)),
    # -- observations that change nothing here --
    Row("noted", tuple(Role), (T.LEADER_OURS, T.LEADER_OTHER, T.LEADER_GONE, T.LEASE_GONE,
                               T.NEWER_ACTIVE), None),
)
# fmt: on


def _expand() -> dict[tuple[Role, Trigger], Move]:
    table: dict[tuple[Role, Trigger], Move] = {}
    for row in ROWS:
        for role in row.roles:
            for trigger in row.triggers:
                if (role, trigger) not in table:
                    target = role if row.target is None else row.target
                    table[role, trigger] = Move(target, row.steps, row.label)
    return table


#: (role, trigger) → the move.
TRANSITIONS: Final = _expand()


# --------------------------------------------------------------------------------------------
# The core


@dataclass
class _Peer:
    live: lv.Liveness
    last: PeerHeard | None = None
    heard_at: float | None = None


class FailoverCore:
    """One resource on one host."""

    STARTED_NEEDED: ClassVar[str] = "feed Started first"

    def __init__(
        self,
        resource: str,
        host: str,
        hosts: tuple[str, ...] | list[str],
        *,
        lease_ttl: float,
        renew_interval: float,
        margin: float,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        now: float,
        try_delay: float | None = None,
        cooldown: float | None = None,
        failsafe: bool = True,
    ) -> None:
        """``hosts``: the resource's hosts in preference order, this one included.
        ``try_delay``: how long a candidate waits per live host ahead of it (default: the
        heartbeat timeout); ``cooldown``: no try after this host's own failure (default: the
        lease TTL)."""
        _check_name("resource", resource)
        _check_name("host", host)
        hosts = tuple(hosts)
        for h in hosts:
            _check_name("host", h)
        if host not in hosts or len(set(hosts)) != len(hosts):
            raise UsageError(f"hosts {list(hosts)} must name {host!r} once, and no host twice")
        for what, value in (
            ("lease TTL", lease_ttl),
            ("renew interval", renew_interval),
            ("margin", margin),
            ("now", now),
        ):
            _check_time(what, value)
        if not (margin > 0 and 0 < renew_interval < lease_ttl - margin):
            raise UsageError(
                f"renew interval {renew_interval}s and margin {margin}s must be positive and "
                f"their sum below the lease TTL {lease_ttl}s (a renewal must come before the "
                "deadline)"
            )
        self.resource = resource
        self.host = host
        self.hosts = hosts
        self.lease_ttl = float(lease_ttl)
        self.renew_interval = float(renew_interval)
        self.margin = float(margin)
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.try_delay = heartbeat_timeout if try_delay is None else float(try_delay)
        self.cooldown = lease_ttl if cooldown is None else float(cooldown)
        self.failsafe = failsafe
        self._now = now
        self._peers = {
            h: _Peer(lv.Liveness(heartbeat_interval, heartbeat_timeout, now, up=False))
            for h in hosts
            if h != host
        }
        self._role = Role.STANDBY
        self._started = False
        # etcd
        self._etcd_ok = True
        self._granted = False
        self._deadline: float | None = None  # last confirmed renewal's send time + ttl - margin
        self._grant_sent_at: float | None = None
        self._renew_sent_at: float | None = None
        # the leader key
        self._leader: str | None = None  # None: gone, or not known yet (_leader_known)
        self._leader_known = False
        self._leader_epoch = 0
        self._gone_at: float | None = None
        self._gone_why = ""
        self._handover: str | None = None
        self._epoch = 0  # the highest epoch known
        self._my_epoch = 0  # the epoch this host won (while it claims the resource)
        self._won_at: float | None = None
        # holds
        self._hold_until = now + heartbeat_timeout + margin
        self._cooldown_until = now
        self._try_at: float | None = None
        self._pending: set[str] = set()
        self._switch_to: str | None = None
        self._retired = False
        self._failsafe_active = False
        self._told: tuple[bool, str | None] | None = None  # what the peers last heard (_says)
        self._fresh_leader = False  # a leader observation since this host fenced itself
        self.last_failover: dict[str, FieldValue] | None = None

    # -- what the loop reads --

    @property
    def role(self) -> Role:
        return self._role

    @property
    def epoch(self) -> int:
        """This host's epoch while it claims the resource, else the highest it knows."""
        return self._my_epoch if self._role in CLAIMING else self._epoch

    @property
    def claiming(self) -> bool:
        return self._role in CLAIMING

    @property
    def leader(self) -> str | None:
        return self._leader

    @property
    def retired(self) -> bool:
        """Retire() came: the resource was deleted."""
        return self._retired

    @property
    def in_failsafe(self) -> bool:
        return self._failsafe_active

    def lease_remaining(self, now: float) -> float | None:
        """Seconds until this host's own deadline (None: no lease)."""
        return None if self._deadline is None else self._deadline - now

    def peer_up(self, host: str) -> bool:
        return self._peers[host].live.up

    # -- inputs --

    def handle(self, event: Event, now: float) -> list[Action]:
        """Feed one event; the actions to carry out, in order."""
        now = self._clock(now)
        out: list[Action] = []
        reachable = self._etcd_ok
        trigger = self._observe(event, now, out)
        if trigger is not None:
            self._dispatch(trigger, event, now, out, self._why(event))
        if (
            not reachable
            and self._etcd_ok
            and self._granted
            and self._role in CLAIMING
            and self._past_deadline(now)
        ):
            # etcd is back while the failsafe carries us: renew now, not at the next period
            # (the confirmations go on until a renewal lands, see _backed)
            self._renew_sent_at = now
            out.append(RenewLease())
        self._evaluate(now, out)
        self._tell_changes(now, out)
        return out

    def _says(self, now: float) -> tuple[bool, str | None]:
        """What the peers' failsafe rests on: whether etcd backs us, and whom we confirm."""
        return self._backed(now), self._confirms()

    def _tell_changes(self, now: float, out: list[Action]) -> None:
        if self._started and self._says(now) != self._told:
            # Tell the peers now, not at the next heartbeat (an active that lost etcd needs
            # confirmations before its deadline).
            self._heartbeats(now, out, only_due=False)

    def _backed(self, now: float) -> bool:
        """Whether etcd backs this host: it answers and, when we claim the resource, our
        deadline is more than ``margin`` away (a renewal landed in time).  So an active asks
        for confirmations when its renewal is late even if no request has failed yet (the
        failure of one queued behind another comes late), and keeps asking past its
        deadline even once etcd answers again (after an etcd leader election, say) until a
        renewal lands: the peers' confirmations carry it until then."""
        if self._role in CLAIMING and (self._deadline is None or now >= self._asks_at()):
            return False
        return self._etcd_ok

    def _asks_at(self) -> float:
        """When an active whose renewal has not landed starts asking for confirmations:
        ``margin`` before its deadline, so that they are in before it (a renewal that hangs
        behind another etcd request is reported late: its failure may come after the
        deadline, and a peer confirms only an active that says etcd does not back it)."""
        assert self._deadline is not None
        return self._deadline - self.margin

    def get_timer(self) -> float | None:
        if not self._started:
            return None
        times: list[float | None] = [p.live.get_timer() for p in self._peers.values()]
        if self._granted and self._renew_sent_at is not None:
            times.append(self._renew_sent_at + self.renew_interval)
        elif not self._granted and self._grant_sent_at is not None:
            times.append(self._grant_sent_at + self.renew_interval)
        if self._role in CLAIMING and self._deadline is not None:
            if self._deadline > self._now:
                times.append(self._deadline)
                if self._asks_at() > self._now:
                    times.append(self._asks_at())
            else:  # failsafe: when the first confirmation runs out
                times += [self._confirm_expiry(p) for p in self._peers.values()]
        if self._role is Role.CANDIDATE and self._try_at is not None:
            times.append(self._try_at)
        if self._role is Role.STANDBY and self._leader_known and self._leader is None:
            later = max(self._hold_until, self._cooldown_until)
            if later > self._now:
                times.append(later)
        return lv.earliest(times)

    def handle_timer(self, now: float) -> list[Action]:
        now = self._clock(now)
        out: list[Action] = []
        if not self._started:
            return out
        if self._granted and self._renew_sent_at is not None:
            if now >= self._renew_sent_at + self.renew_interval:
                self._renew_sent_at = now
                out.append(RenewLease())
        elif (
            not self._granted
            and self._grant_sent_at is not None
            and now >= self._grant_sent_at + self.renew_interval
        ):
            self._grant(now, out)
        self._heartbeats(now, out, only_due=True)
        self._evaluate(now, out)
        self._tell_changes(now, out)
        return out

    # -- internals: facts --

    def _clock(self, now: float) -> float:
        self._now = max(self._now, now)
        return self._now

    def _fields(self, extra: Mapping[str, FieldValue]) -> tuple[tuple[str, FieldValue], ...]:
        base: dict[str, FieldValue] = {
            "resource": self.resource,
            "host": self.host,
            "role": str(self._role),
            "epoch": self.epoch,
        }
        base.update(extra)
        return tuple(base.items())

    @staticmethod
    def _why(event: Event) -> str:
        reason = getattr(event, "reason", "")
        name = type(event).__name__
        return f"{name}: {reason}" if reason else name

    def _observe(self, e: Event, now: float, out: list[Action]) -> Trigger | None:
        """Record what ``e`` says; the trigger it is, if any."""
        if isinstance(e, Started):
            if self._started:
                raise IllegalState(f"resource {self.resource}: the agent already started")
            self._started = True
            return Trigger.STARTED
        if not self._started:
            raise IllegalState(f"resource {self.resource}: {self.STARTED_NEEDED}")
        if isinstance(e, LeaseGranted | LeaseRenewed):
            first = not self._granted
            self._granted = True
            self._etcd_ok = True
            deadline = e.at + e.ttl - self.margin
            self._deadline = deadline if first else max(self._deadline or deadline, deadline)
            if first:
                self._renew_sent_at = max(e.at, self._renew_sent_at or e.at)
                self._emit(out, "cluster.lease", state="granted", deadline=deadline)
            return None
        if isinstance(e, LeaseRenewFailed):
            if e.gone:
                was = self._granted
                self._granted = False
                self._deadline = None
                self._grant_sent_at = now  # a new grant after renew_interval
                if was:
                    self._emit(out, "cluster.lease", state="gone", reason=e.reason)
                return Trigger.LEASE_GONE
            if self._etcd_ok:
                self._etcd_ok = False
                self._emit(out, "cluster.etcd", up=False, reason=e.reason)
            return None
        if isinstance(e, EtcdUnreachable):
            if self._etcd_ok:
                self._etcd_ok = False
                self._emit(out, "cluster.etcd", up=False, reason=e.reason)
            return None
        if isinstance(e, EtcdReachable):
            if not self._etcd_ok:
                self._etcd_ok = True
                self._emit(out, "cluster.etcd", up=True)
            return None
        if isinstance(e, LeaderObserved):
            self._etcd_ok = True
            self._fresh_leader = True
            self._leader_known = True
            self._leader, self._leader_epoch = e.holder, e.epoch
            self._epoch = max(self._epoch, e.epoch)
            self._gone_at = None
            self._handover = None
            if e.holder == self.host:
                if self._role in CLAIMING and e.epoch == self._my_epoch:
                    return None
                return Trigger.LEADER_OURS if self._role not in CLAIMING else Trigger.LEADER_OTHER
            return Trigger.LEADER_OTHER
        if isinstance(e, LeaderGone):
            self._etcd_ok = True
            self._fresh_leader = True
            known, holder = self._leader_known, self._leader
            self._leader_known = True
            self._epoch = max(self._epoch, e.epoch)
            if not known or holder is not None:
                self._gone_at = now
                self._gone_why = f"leader key of {holder} gone" if holder else "no leader key"
            self._leader = None
            self._handover = e.handover
            if e.handover is not None and e.handover != self.host:
                self._hold(now + self.lease_ttl)  # the switchover's target goes first
            return Trigger.LEADER_GONE
        if isinstance(e, AcquireResult):
            self._report("acquire", e)
            self._etcd_ok = True
            self._epoch = max(self._epoch, e.epoch)
            return Trigger.ACQUIRE_WON if e.won else Trigger.ACQUIRE_LOST
        if isinstance(e, PeerHeard):
            peer = self._peer(e.host)
            if not peer.live.up:
                peer.live.restored(now)
                self._emit(out, "cluster.peer", peer=e.host, up=True)
            peer.live.heard(now)
            peer.last, peer.heard_at = e, now
            self._epoch = max(self._epoch, e.epoch)
            if (
                e.active
                and self._role in CLAIMING
                and e.epoch >= self._my_epoch
                and e.host != self.host
            ):
                return Trigger.NEWER_ACTIVE
            return None
        if isinstance(e, PeerLost):
            peer = self._peer(e.host)
            for a in peer.live.failed(now, e.reason or "heartbeat failed"):
                if isinstance(a, lv.Lost):
                    self._emit(out, "cluster.peer", peer=e.host, up=False, reason=a.reason)
            return None
        if isinstance(e, TakeoverDone):
            self._report("takeover", e)
            return Trigger.TAKEOVER_OK if e.ok else Trigger.TAKEOVER_FAILED
        if isinstance(e, AppStarted | AppStopped | AppFailed):
            if isinstance(e, AppStarted) or "app" in self._pending:
                self._report("app", e)
            # else: the monitor says the application failed or exited on its own
            if isinstance(e, AppStarted):
                return Trigger.APP_STARTED
            if isinstance(e, AppStopped) and self._retired and self._role is Role.DEMOTING:
                return Trigger.STOPPED_RETIRING
            return Trigger.APP_STOPPED if isinstance(e, AppStopped) else Trigger.APP_FAILED
        if isinstance(e, SwitchoverRequested):
            return Trigger.SWITCHOVER
        if isinstance(e, Retire):
            return Trigger.RETIRE
        if isinstance(e, SwapDone):
            self._report("swap", e)
            return Trigger.SWAP_OK if e.ok else Trigger.SWAP_FAILED
        raise UsageError(f"not a failover event: {e!r}")

    def _peer(self, host: str) -> _Peer:
        peer = self._peers.get(host)
        if peer is None:
            raise IllegalState(f"resource {self.resource}: {host!r} is not another of its hosts")
        return peer

    def _report(self, what: str, e: Event) -> None:
        if what not in self._pending:
            raise IllegalState(
                f"resource {self.resource}: {type(e).__name__} but no such action is outstanding"
            )
        self._pending.discard(what)

    def _emit(self, out: list[Action], name: str, **fields: FieldValue) -> None:
        out.append(EmitEvent(name, self._fields(fields)))

    # -- internals: decisions --

    def _dispatch(
        self, trigger: Trigger, event: Event | None, now: float, out: list[Action], reason: str
    ) -> None:
        move = TRANSITIONS.get((self._role, trigger))
        if move is None:
            if trigger in REPORTS:
                # Asked for in an earlier role (we fenced while it ran): absorbed.
                self._emit(out, "cluster.late_report", report=str(trigger))
                return
            if trigger in COMMANDS:
                raise IllegalState(
                    f"resource {self.resource}: cannot handle {trigger} as {self._role}"
                )
            return  # a derived condition with no row here: nothing to do
        if trigger is Trigger.SWITCHOVER:
            assert isinstance(event, SwitchoverRequested)
            self._switch_target(event.to)  # refuse before anything moves
        ctx = _Ctx(self, event, now, reason)
        for step in move.steps:
            step.run(ctx)
        old = self._role
        self._role = move.target
        out += ctx.out
        if move.target is not old:
            self._try_at = None if move.target is not Role.CANDIDATE else self._try_at
            if move.target is Role.FENCED:
                self._fresh_leader = False
            self._emit(out, "cluster.role", previous=str(old), reason=reason, rule=move.label)
            self._heartbeats(now, out, only_due=False)  # tell the peers at once
        elif trigger is Trigger.STARTED:
            self._heartbeats(now, out, only_due=False)

    def _evaluate(self, now: float, out: list[Action]) -> None:
        """Fire the derived conditions until none applies (a few rounds at most)."""
        for _ in range(6):
            trigger, reason = self._condition(now)
            failsafe = trigger is None and self._role in CLAIMING and self._past_deadline(now)
            if failsafe is not self._failsafe_active:
                self._failsafe_active = failsafe
                confirmed_by = ",".join(self._peers)
                self._emit(out, "cluster.failsafe", active=failsafe, confirmed_by=confirmed_by)
            if trigger is None:
                return
            self._dispatch(trigger, None, now, out, reason)

    def _past_deadline(self, now: float) -> bool:
        return self._deadline is None or now >= self._deadline

    def _condition(self, now: float) -> tuple[Trigger | None, str]:
        role = self._role
        if role in CLAIMING:
            if self._deadline is None:
                return Trigger.DEADLINE, "no lease"
            if now >= self._deadline:
                ok, why = self._confirmed(now)
                return (None, "") if ok else (Trigger.DEADLINE, why)
            return None, ""
        if role is Role.STANDBY:
            if self._eligible(now)[0]:
                return Trigger.ELIGIBLE, "the leader key is gone"
            return None, ""
        if role is Role.CANDIDATE:
            if "acquire" in self._pending:
                return None, ""
            ok, why = self._eligible(now, candidate=True)
            if not ok:
                return Trigger.INELIGIBLE, why
            if self._try_at is not None and now >= self._try_at:
                return Trigger.TRY_DUE, "our turn"
            return None, ""
        if role is Role.FENCED and self._etcd_ok and self._lease_valid(now) and self._fresh_leader:
            return Trigger.REJOIN, "etcd answers and the lease is renewed"
        return None, ""

    def _lease_valid(self, now: float) -> bool:
        return self._granted and self._deadline is not None and now < self._deadline

    def _eligible(self, now: float, *, candidate: bool = False) -> tuple[bool, str]:
        if self._retired:
            return False, "retired: the resource was deleted"
        if not self._etcd_ok:
            return False, "etcd does not answer"
        if not self._lease_valid(now):
            return False, "no valid lease"
        if not self._leader_known or self._leader is not None:
            return False, f"the leader key is held by {self._leader}"
        if now < self._cooldown_until:
            return False, "cooling down after a failure here"
        if now < self._hold_until:
            return False, "holding (a recent confirmation, a start, or a handover)"
        for h, p in self._peers.items():
            if p.live.up and p.last is not None and p.last.active and p.last.epoch >= self._epoch:
                return False, f"{h} claims the resource"
        return True, ""

    def _rank(self) -> int:
        if self._handover == self.host:
            return 0
        ahead = self.hosts[: self.hosts.index(self.host)]
        return sum(1 for h in ahead if self._peers[h].live.up)

    def _hold(self, until: float) -> None:
        self._hold_until = max(self._hold_until, until)

    def _confirm_expiry(self, p: _Peer) -> float | None:
        if p.heard_at is None or not self._confirms_us(p):
            return None
        return p.heard_at + self.heartbeat_timeout

    def _confirms_us(self, p: _Peer) -> bool:
        last = p.last
        return (
            last is not None
            and p.live.up
            and last.confirms == self.host
            and last.epoch <= self._my_epoch
            and not last.active
        )

    def _confirmed(self, now: float) -> tuple[bool, str]:
        """Failsafe: every other host confirms us, heard less than the timeout ago."""
        if not self.failsafe:
            return False, "lease not renewed in time (deadline passed)"
        for h, p in self._peers.items():
            if not self._confirms_us(p) or p.heard_at is None:
                return False, f"deadline passed and {h} does not confirm us (failsafe)"
            if now >= p.heard_at + self.heartbeat_timeout:
                return False, f"deadline passed and {h}'s confirmation is too old (failsafe)"
        return True, ""

    def _confirms(self) -> str | None:
        """The host this one confirms as active, if any (failsafe)."""
        if self._role in CLAIMING:
            return None
        for h in self.hosts:
            p = self._peers.get(h)
            if p is None or not p.live.up or p.last is None:
                continue
            # Only an active that says it cannot reach etcd needs (and gets) confirmations:
            # each one holds this host back afterwards, so confirming a healthy active would
            # add the hold to every failover.
            if p.last.active and not p.last.etcd_ok and p.last.epoch >= self._epoch:
                return h
        return None

    def _switch_target(self, to: str | None) -> str:
        if to is not None:
            if to not in self._peers:
                raise IllegalState(
                    f"resource {self.resource}: cannot switch over to {to!r}: not another of "
                    f"its hosts ({', '.join(self._peers)})"
                )
            if not self._peers[to].live.up:
                raise IllegalState(f"resource {self.resource}: {to} is not heard from")
            return to
        i = self.hosts.index(self.host)
        for h in self.hosts[i + 1 :] + self.hosts[:i]:
            if self._peers[h].live.up:
                return h
        raise IllegalState(f"resource {self.resource}: no live host to switch over to")

    def _grant(self, now: float, out: list[Action]) -> None:
        self._grant_sent_at = now
        out.append(GrantLease(self.lease_ttl))

    def _heartbeats(self, now: float, out: list[Action], *, only_due: bool) -> None:
        due: set[str] = set()
        for h, p in self._peers.items():
            for a in p.live.handle_timer(now):
                if isinstance(a, lv.Lost):
                    self._emit(out, "cluster.peer", peer=h, up=False, reason=a.reason)
                else:
                    due.add(h)
        confirms = self._confirms()  # after the losses: never confirm a host just lost
        if not only_due:
            self._told = (self._backed(now), confirms)
        for h, p in self._peers.items():
            if h in due or not only_due:
                p.live.sent(now)
                out.append(
                    SendHeartbeat(
                        h,
                        self.resource,
                        self.host,
                        self.epoch,
                        self._role in CLAIMING,
                        confirms,
                        self._backed(now),
                    )
                )
                if confirms is not None:
                    self._hold(now + self.heartbeat_timeout + self.margin)


# --------------------------------------------------------------------------------------------
# The document (docs/state-machines.md, by tools/gen-state-docs)


def render_table() -> list[str]:
    """The rules as Markdown lines."""

    def names(items: tuple[enum.StrEnum, ...], every: tuple[enum.StrEnum, ...]) -> str:
        return "any" if set(items) == set(every) else ", ".join(str(i) for i in items)

    lines = [
        "### Rules (the first row that matches decides)",
        "",
        "Triggers are reports and commands (from events), observations of the leader key, the "
        "lease and the peers, and conditions the core derives after every input. A report "
        "with no row in the current role is absorbed (its action was asked for in an earlier "
        "role); a command with no row is refused with IllegalState.",
        "",
        "| # | rule | role | trigger | next | steps |",
        "|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(ROWS, 1):
        target = "=" if row.target is None else str(row.target)
        steps = "; ".join(s.label for s in row.steps) or "—"
        lines.append(
            f"| {i} | {row.label} | {names(row.roles, tuple(Role))} | "
            f"{names(row.triggers, tuple(Trigger))} | {target} | {steps} |"
        )
    return [*lines, ""]
