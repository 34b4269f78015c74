"""The two-sided pair protocol as data: what the peer's state means for us, and who moves when.

Theory of operation
-------------------
Each side of a pair runs its own :class:`~replicator.pair_state.PairMachine`.  The two talk
with ``PairState(state, role, pvid, epoch)`` messages: a side *announces* its state (a
request) and the receiver *replies* with its own.  This module holds the two things that make
the two machines move together, as tables, with no I/O, no clock and no locks:

1. :data:`PEER_RULES`: what a PairState from the peer means for our machine.  The key is
   ``(our role, our state, our cause, peer role, peer state, epoch, via)``: ``our cause`` is
   why our side is suspended (``Cause.NONE`` outside PSUE and PFUS; it is not on the wire, but
   a secondary suspended by its disk or its peer must not rejoin without a copy), ``epoch``
   is the peer's epoch relative to ours (:class:`EpochRelation`) and ``via`` says whether the
   message was an announcement or a reply (:class:`Via`).  The value is the tuple of events
   to feed our machine, in order: usually none or one, sometimes two or three (a secondary in
   PAIR that hears its primary restarted a copy loses and regains the link before it
   resyncs).  Every possible key is in the table; :func:`peer_events` is a lookup.  The table
   is expanded from :data:`PEER_ROWS`, an ordered list of rules in which the first matching
   row decides.  As in h11, the same rules hold for both sides: the table does not know which
   node it runs on.

   Rule one: a primary that hears of a newer epoch from a side that took over (SSWS) or is a
   primary fences itself (PeerTookOver), except when the peer is a primary entering COPY and
   we are in PSUS or PSUE: that is a swap, and we follow as its secondary.  Rule two: a
   secondary that hears of a newer epoch from a secondary in COPY or PSUE (the states a side
   that demoted itself by a swap can be in) finishes the swap the peer began and becomes the
   primary; a newer secondary in SSWS took over, which is no swap: nothing (beside it we
   would be a writable primary with the link up).  Both rules hold for announcements and
   replies alike.  So do two rules about a split that only one side finished: a primary in
   PSUE (not stale) hearing its secondary is PSUS at the same epoch finishes the split (the
   secondary got our PSUS, we lost its answer), and a secondary in COPY hearing its primary
   is PSUS stops waiting for a copy that will not come (PeerError: PSUE, and the next resync
   repairs it).  Every other rule is for announcements only (the peer has already acted on
   ours).

   A secondary in PSUE hearing its primary in PAIR rejoins without a copy only when the link
   suspended it (the primary restarted or the link blipped: nothing is missing); suspended
   by its disk or its peer (a salvaged journal, a truncated image) it stays PSUE.

2. :data:`PLANS`: for each two-sided command, the ordered steps the adapter carries out.  The
   rule: **the side that is, or becomes, the secondary moves first** (docs/protocol.md, "Pair
   control"), so no data is copied to a side that still takes client writes, and no secondary
   stays writable under its primary's PVID.  A step is a local event (:class:`Fire`), an
   announcement to the peer (:class:`Announce`) with what to do when it fails
   (:class:`OnFail`), or one of a few adapter chores (:class:`Query`, :class:`AwaitDrained`,
   :class:`ApplyReceived`, :class:`Exchange`, :class:`Forget`).  :func:`plan` turns a
   command, the record and the highest epoch known of the peer into concrete steps (dry-running
   our machine for the epoch and role the command ends with, so an illegal command raises
   IllegalState before anything is sent).

3. Auto-resync in one place: :func:`auto_resync_due` is the decision and
   :func:`restore_plan` the steps, for every LinkRestored.  An automatic resync first asks the
   peer where it is (a :class:`Query` through the reply rules): a secondary in PSUS means a
   split happened there whose answer we lost, and the split is finished here instead (no
   resync overwrites what was written on it since); a peer that took over fences us.  Then
   it is a resync: the secondary moves first, so the COPY announcement goes out *before* the
   machine is fed LinkRestored (whose AUTO_RESYNC step in pair_state then chains the
   Resync).  The reply to that announcement goes through the reply rules too.

How the adapter uses it (one side; steps, not threads)
------------------------------------------------------
* A PairState announcement arrives: if our link is down, run ``restore_plan(record,
  notify=False)``; learn the peer's epoch and PVID; feed every event of ``peer_events(record,
  ..., reply=False)`` in order (drop the SendPairState they produce: our reply tells the peer);
  reply with our own state.  A refused event (IllegalState) is the peer's error answer.
* A reply arrives (to an Exchange or a Query): learn; feed ``peer_events(..., reply=True)``;
  carry out their SendPairState as an :class:`Exchange` (the peer learns our new state).
* A command: ``p = plan(command, record, peer_epoch, link_up=...)``; carry out ``p.steps`` one
  by one, holding client I/O (the gate) over the steps whose ``hold_io`` is set.  A
  :class:`Query` step ends the plan: after it, call :func:`plan` again with ``queried=True``
  (the reply may have fenced us or taught us a newer epoch) and carry out that plan instead.
* The link comes back (a Pong while down): ``restore_plan(record, notify=True)``.  A partial
  restore plan (an automatic resync) is carried out as a command's: its Query, then
  ``restore_plan(..., queried=True, peer=...)``.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import Final

from replicator.errors import IllegalState, ProtocolError
from replicator.header import Role
from replicator.pair_state import (
    REPLICATING,
    ROLES,
    Cause,
    CopyDone,
    Create,
    Delete,
    Drained,
    Kind,
    LinkLost,
    LinkRestored,
    Mode,
    PairMachine,
    PairRecord,
    PeerError,
    PeerTookOver,
    Resync,
    Split,
    State,
    TableEvent,
    Takeover,
)

_P, _S = Role.PRIMARY, Role.SECONDARY


class EpochRelation(enum.StrEnum):
    """The peer's epoch relative to ours."""

    OLDER = "older"
    SAME = "same"
    NEWER = "newer"

    @classmethod
    def of(cls, ours: int, peer: int) -> EpochRelation:
        if peer > ours:
            return cls.NEWER
        return cls.SAME if peer == ours else cls.OLDER


class Via(enum.StrEnum):
    ANNOUNCEMENT = "announcement"
    REPLY = "reply"


#: Every (role, state) a side can be in or announce (SSWS is a secondary's only).
SIDES: Final = tuple((r, s) for r in ROLES for s in State if r is _S or s is not State.SSWS)


# --------------------------------------------------------------------------------------------
# Peer state -> our events


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """An event of a rule, before the peer's epoch is filled in."""

    kind: Kind
    reason: str = ""

    def make(self, peer_epoch: int) -> TableEvent:
        k = self.kind
        if k is Kind.PEER_TOOK_OVER:
            return PeerTookOver(peer_epoch)
        if k is Kind.RESYNC_SWAP:
            return Resync(swap=True, epoch=peer_epoch)  # the follower adopts the peer's epoch
        if k is Kind.LINK_LOST:
            return LinkLost(self.reason)
        if k is Kind.PEER_ERROR:
            return PeerError(self.reason)
        plain: dict[Kind, TableEvent] = {
            Kind.RESYNC: Resync(),
            Kind.SPLIT: Split(),
            Kind.DELETE: Delete(),
            Kind.COPY_DONE: CopyDone(),
            Kind.LINK_RESTORED: LinkRestored(),
        }
        return plain[k]

    def __str__(self) -> str:
        if self.kind is Kind.PEER_TOOK_OVER:
            return "PeerTookOver(peer's epoch)"
        if self.kind is Kind.RESYNC_SWAP:
            return "Resync(swap, epoch=peer's)"
        return self.kind.value


FENCE: Final = PeerEvent(Kind.PEER_TOOK_OVER)
FOLLOW_SWAP: Final = PeerEvent(Kind.RESYNC_SWAP)
_RESYNC, _SPLIT, _DELETE = PeerEvent(Kind.RESYNC), PeerEvent(Kind.SPLIT), PeerEvent(Kind.DELETE)
_COPY_DONE, _RESTORED = PeerEvent(Kind.COPY_DONE), PeerEvent(Kind.LINK_RESTORED)
_PRIMARY_SUSPENDED = PeerEvent(Kind.PEER_ERROR, "the primary suspended the pair")
_COPY_RESTARTED = PeerEvent(Kind.LINK_LOST, "the primary restarted the copy")
_COPY_ABANDONED = PeerEvent(Kind.PEER_ERROR, "the primary is split: the copy will not come")


@dataclass(frozen=True, slots=True)
class PeerRow:
    """One rule: every combination of its fields maps to ``events`` (unless an earlier row
    already decided that combination)."""

    label: str
    ours: tuple[Role, ...]
    our_states: tuple[State, ...]
    peer: tuple[Role, ...]
    peer_states: tuple[State, ...]
    epochs: tuple[EpochRelation, ...]
    vias: tuple[Via, ...]
    events: tuple[PeerEvent, ...]
    #: Why our side is suspended (PSUE, PFUS; NONE in every other state): not on the wire,
    #: but it decides whether a suspended secondary may rejoin without a copy.
    causes: tuple[Cause, ...] = tuple(Cause)


_ANY: Final = tuple(State)
_ALL_EPOCHS: Final = tuple(EpochRelation)
_NEWER: Final = (EpochRelation.NEWER,)
_SAME: Final = (EpochRelation.SAME,)
_BOTH_VIAS: Final = tuple(Via)
_ANN: Final = (Via.ANNOUNCEMENT,)
_REPLY: Final = (Via.REPLY,)
_REPL: Final = tuple(s for s in State if s in REPLICATING)
SMPL, COPY, PAIR, PSUS, PSUE, PFUS, SSWS = (
    State.SMPL,
    State.COPY,
    State.PAIR,
    State.PSUS,
    State.PSUE,
    State.PFUS,
    State.SSWS,
)

# The rules; the first row that matches a key decides it.  Anything no row matches: ().  The
# order is the one the hand-written Side.peer_event / on_peer_state / on_peer_reply tried
# them in, with the rows the protocol walk added or narrowed (see the module docstring).
_LINK, _PEER, _DISK = Cause.LINK, Cause.PEER, Cause.DISK
# fmt: off
PEER_ROWS: Final[tuple[PeerRow, ...]] = (
    # -- rule one: a primary hears of a newer epoch from a primary or a taken-over secondary --
    PeerRow("rule one, swap: the peer becomes primary; we follow as its secondary",
            (_P,), (PSUS, PSUE), (_P,), (COPY,), _NEWER, _BOTH_VIAS, (FOLLOW_SWAP,)),
    PeerRow("rule one, not paired: nothing to fence",
            (_P,), (SMPL,), (_P,), _ANY, _NEWER, _BOTH_VIAS, ()),
    PeerRow("rule one, not paired: nothing to fence",
            (_P,), (SMPL,), (_S,), (SSWS,), _NEWER, _BOTH_VIAS, ()),
    PeerRow("rule one: the peer took over or became primary; fence this side",
            (_P,), _ANY, (_P,), _ANY, _NEWER, _BOTH_VIAS, (FENCE,)),
    PeerRow("rule one: the peer took over or became primary; fence this side",
            (_P,), _ANY, (_S,), (SSWS,), _NEWER, _BOTH_VIAS, (FENCE,)),
    # -- delete --
    PeerRow("the peer deleted the pair",
            ROLES, _ANY, ROLES, (SMPL,), _ALL_EPOCHS, _ANN, (_DELETE,)),
    PeerRow("a reply in SMPL deletes nothing (the delete is announced)",
            ROLES, _ANY, ROLES, (SMPL,), _ALL_EPOCHS, _REPLY, ()),
    # -- the primary follows its secondary --
    PeerRow("the secondary split and the answer was lost: finish the split here",
            (_P,), (PSUE,), (_S,), (PSUS,), _SAME, _BOTH_VIAS, (_SPLIT,),
            causes=(_LINK, _PEER, _DISK)),
    # -- the secondary follows its primary's announcements --
    PeerRow("the primary split",
            (_S,), (PAIR,), (_P,), (PSUS,), _ALL_EPOCHS, _ANN, (_SPLIT,)),
    PeerRow("the primary resyncs",
            (_S,), (PSUS, PSUE, PFUS), (_P,), (COPY,), _ALL_EPOCHS, _ANN, (_RESYNC,)),
    PeerRow("the primary's copy is done",
            (_S,), (COPY,), (_P,), (PAIR,), _ALL_EPOCHS, _ANN, (_COPY_DONE,)),
    PeerRow("the primary is split: the copy it announced will not come; suspend, the next "
            "resync repairs it",
            (_S,), (COPY,), (_P,), (PSUS,), _ALL_EPOCHS, _BOTH_VIAS, (_COPY_ABANDONED,)),
    PeerRow("the primary suspended the pair",
            (_S,), _REPL, (_P,), (PSUE,), _ALL_EPOCHS, _ANN, (_PRIMARY_SUSPENDED,)),
    PeerRow("the primary suspended and resyncs before we noticed the link go",
            (_S,), (PAIR,), (_P,), (COPY,), _ALL_EPOCHS, _ANN,
            (_COPY_RESTARTED, _RESTORED, _RESYNC)),
    PeerRow("the primary never suspended (a restart, a blip): rejoin without a copy",
            (_S,), (PSUE,), (_P,), (PAIR,), _ALL_EPOCHS, _ANN, (_RESYNC, _COPY_DONE),
            causes=(_LINK,)),
    PeerRow("suspended by our disk or our peer: no rejoin without a copy, stay PSUE",
            (_S,), (PSUE,), (_P,), (PAIR,), _ALL_EPOCHS, _ANN, (),
            causes=(_PEER, _DISK)),
    # -- rule two: a secondary hears of a newer epoch from a secondary --
    PeerRow("rule two: the peer demoted itself by a swap (COPY, PSUE); finish it, become "
            "primary",
            (_S,), _ANY, (_S,), (COPY, PSUE), _NEWER, _BOTH_VIAS, (FOLLOW_SWAP,)),
    PeerRow("rule two, not a swap: the peer took over; nothing (an operator's case)",
            (_S,), _ANY, (_S,), (SSWS,), _NEWER, _BOTH_VIAS, ()),
)
# fmt: on

PeerKey = tuple[Role, State, Cause, Role, State, EpochRelation, Via]


def causes_of(role: Role, state: State) -> tuple[Cause, ...]:
    """The causes a record in ``(role, state)`` can carry (pair_state's record rules)."""
    if state is State.PFUS:
        return (Cause.JOURNAL,)
    if state is State.PSUE:
        stale = (Cause.TAKEOVER,) if role is _P else ()
        return (Cause.LINK, Cause.PEER, Cause.DISK, *stale)
    return (Cause.NONE,)


#: Every (role, state, cause) our side can be in: the first three fields of a PEER_RULES key.
OUR_SIDES: Final = tuple((r, s, c) for r, s in SIDES for c in causes_of(r, s))


def _expand_peer_rows() -> tuple[dict[PeerKey, tuple[PeerEvent, ...]], dict[PeerKey, str]]:
    table: dict[PeerKey, tuple[PeerEvent, ...]] = {}
    labels: dict[PeerKey, str] = {}
    for row in PEER_ROWS:
        keys = itertools.product(
            row.ours, row.our_states, row.causes, row.peer, row.peer_states, row.epochs, row.vias
        )
        for key in keys:
            if key not in labels:  # an earlier row decided it
                table[key], labels[key] = row.events, row.label
    full: dict[PeerKey, tuple[PeerEvent, ...]] = {}
    full_labels: dict[PeerKey, str] = {}
    for our_role, our_state, cause in OUR_SIDES:
        for peer_role, peer_state in SIDES:
            for epoch in EpochRelation:
                for via in Via:
                    key = (our_role, our_state, cause, peer_role, peer_state, epoch, via)
                    full[key] = table.get(key, ())
                    full_labels[key] = labels.get(key, "nothing")
    return full, full_labels


_EXPANDED: Final = _expand_peer_rows()
#: (our role, our state, our cause, peer role, peer state, epoch relation, via) → events
#: for our machine.
PEER_RULES: Final = _EXPANDED[0]
#: The same keys → the label of the row that decided it ("nothing" where none did).
PEER_RULE_LABELS: Final = _EXPANDED[1]


@dataclass(frozen=True, slots=True)
class PeerView:
    """What a PairState says about its sender; checked like a wire message."""

    state: State
    role: Role
    epoch: int

    def __post_init__(self) -> None:
        if not isinstance(self.state, State) or not isinstance(self.role, Role):
            raise ProtocolError(f"peer state {self.state!r} / role {self.role!r} is not valid")
        if self.role not in ROLES:
            raise ProtocolError(f"the peer's role {self.role.label} is not primary or secondary")
        if self.state is State.SSWS and self.role is not Role.SECONDARY:
            raise ProtocolError("the peer claims SSWS as a primary")
        if type(self.epoch) is not int or self.epoch < 0:
            raise ProtocolError(f"the peer's epoch {self.epoch!r} is not a non-negative integer")


def _peer_key(
    record: PairRecord, peer_state: State, peer_role: Role, peer_epoch: int, reply: bool
) -> tuple[PeerKey, PeerView]:
    view = PeerView(peer_state, peer_role, peer_epoch)
    key = (
        record.role,
        record.state,
        record.cause,
        view.role,
        view.state,
        EpochRelation.of(record.epoch, view.epoch),
        Via.REPLY if reply else Via.ANNOUNCEMENT,
    )
    return key, view


def peer_events(
    record: PairRecord, peer_state: State, peer_role: Role, peer_epoch: int, *, reply: bool
) -> tuple[TableEvent, ...]:
    """The events a PairState from the peer means for our machine, in order (a lookup in
    :data:`PEER_RULES`).  A peer role or state the wire cannot carry raises ProtocolError."""
    key, view = _peer_key(record, peer_state, peer_role, peer_epoch, reply)
    return tuple(e.make(view.epoch) for e in PEER_RULES[key])


def peer_rule(
    record: PairRecord, peer_state: State, peer_role: Role, peer_epoch: int, *, reply: bool
) -> str:
    """The label of the rule that decides :func:`peer_events` for the same arguments (for
    the log)."""
    return PEER_RULE_LABELS[_peer_key(record, peer_state, peer_role, peer_epoch, reply)[0]]


def render_peer_rules() -> list[str]:
    """The rules and the expanded table, as Markdown lines for docs/state-machines.md."""

    def names(items: tuple[State, ...] | tuple[Role, ...] | tuple[Cause, ...]) -> str:
        if items in (_ANY, ROLES, tuple(Cause)):
            return "any"
        return ", ".join(i.label if isinstance(i, Role) else i.value for i in items)

    def events(evs: tuple[PeerEvent, ...]) -> str:
        return ", ".join(str(e) for e in evs) if evs else "—"

    lines = [
        "#### Rules (the first row that matches decides)",
        "",
        "| # | rule | our role | our state | our cause | peer role | peer state | "
        "peer's epoch | via | events |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(PEER_ROWS, 1):
        epochs = "any" if row.epochs == _ALL_EPOCHS else ", ".join(row.epochs)
        vias = "both" if row.vias == _BOTH_VIAS else ", ".join(row.vias)
        lines.append(
            f"| {i} | {row.label} | {names(row.ours)} | {names(row.our_states)} | "
            f"{names(row.causes)} | {names(row.peer)} | {names(row.peer_states)} | {epochs} | "
            f"{vias} | {events(row.events)} |"
        )
    also = [
        str(i)
        for i, row in enumerate(PEER_ROWS, 1)
        if Via.REPLY in row.vias and row.events and row.epochs != _NEWER
    ]
    lines += [
        "",
        f"Replies take the epoch rules and rows {', '.join(also[:-1])} and {also[-1]}: a split "
        "that only one side finished (a lost answer) is finished, whichever side speaks first.",
        "",
        "#### Every combination that does something",
        "",
        "One row per (our side, the peer's side, via); the columns are the peer's epoch "
        "relative to ours.  Our side names its cause only where the cause changes the row.",
        "",
        "| our side | peer says | via | older | same | newer |",
        "|---|---|---|---|---|---|",
    ]
    for our_role, our_state in SIDES:
        causes = causes_of(our_role, our_state)
        for peer_role, peer_state in SIDES:
            for via in Via:
                groups: dict[tuple[tuple[PeerEvent, ...], ...], list[Cause]] = {}
                for cause in causes:
                    cells = tuple(
                        PEER_RULES[our_role, our_state, cause, peer_role, peer_state, e, via]
                        for e in EpochRelation
                    )
                    groups.setdefault(cells, []).append(cause)
                for cells, same in groups.items():
                    if not any(cells):
                        continue
                    ours = f"{our_role.label} {our_state}"
                    if len(groups) > 1:
                        ours += f" ({', '.join(same)})"
                    lines.append(
                        f"| {ours} | {peer_role.label} {peer_state} | {via} | "
                        + " | ".join(events(c) for c in cells)
                        + " |"
                    )
    return [*lines, ""]


# --------------------------------------------------------------------------------------------
# Plans: who moves when


class Command(enum.StrEnum):
    CREATE = "create"
    SPLIT = "split"
    RESYNC = "resync"
    RESYNC_SWAP = "resync --swap"
    TAKEOVER = "takeover"
    TAKEOVER_FORCE = "takeover --force"
    DELETE = "delete"


class PlanKind(enum.StrEnum):
    """The variants of the commands' plans (and of a link's return), keys of :data:`PLANS`."""

    CREATE = "create"
    SPLIT_SYNC = "split (sync, link up)"
    SPLIT_LOCAL = "split (from PSUE, or link down)"
    SPLIT_ASYNC = "split (async: drain)"
    RESYNC = "resync"
    SWAP_PROMOTE = "resync --swap (on the side that becomes primary)"
    SWAP_DEMOTE = "resync --swap (on the side that becomes secondary)"
    TAKEOVER = "takeover"
    DELETE = "delete"
    RESTORE = "link restored (the peer announced itself)"
    RESTORE_NOTIFY = "link restored (our ping was answered)"
    AUTO_RESYNC = "link restored, auto-resync"


class Mover(enum.StrEnum):
    """Which side changes state first."""

    LOCAL = "this side"
    PEER = "the peer"


class OnFail(enum.StrEnum):
    """What a failed step (the link failed, or the peer refused) does to the plan."""

    #: Stop and raise the error; the steps already carried out stay done.
    ABORT = "abort"
    #: As ABORT; a link failure (not a refusal) is also fed to the machine as LinkLost.
    ABORT_LINK_LOST = "abort; link failure: LinkLost"
    #: Log it and carry on with the next step ("the peer was not told").
    CONTINUE = "log it and continue (an announcement: the peer was not told)"
    #: Link restoration only: stop quietly; the link stays down and the next Pong retries.
    STAY_DOWN = "stop: the link stays down, the next Pong retries"
    #: A link failure is LinkLost (an async pair in PAIR or PFUL rides it out), a refusal is
    #: logged; no error to the caller.
    LINK_LOST = "link failure: LinkLost; refusal: logged"


class ReplyUse(enum.StrEnum):
    """What becomes of the PairState the peer answers an announcement with."""

    IGNORE = "ignored"  # the peer has acted on it; its reply says what we already know
    RULES = "reply rules"  # learn from it and feed peer_events(..., reply=True) first


class Ref(enum.StrEnum):
    """A value of a template step filled in by :func:`plan`."""

    OUR_ROLE = "our role"
    EPOCH_NOW = "our epoch"
    EPOCH_AFTER = "our epoch after the move"


# -- concrete steps ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """Send our state and take the reply through the reply rules (the peer's epoch and PVID
    are learnt; we may be fenced), then plan again with ``queried=True``.  ``reconnect``: if
    the link is down, try it first (a ping; a Pong runs :func:`restore_plan`)."""

    on_fail: OnFail
    reconnect: bool = False
    hold_io: bool = False


@dataclass(frozen=True, slots=True)
class Announce:
    """Send ``PairState(state, role, our PVID, epoch)`` and wait for the answer."""

    state: State
    role: Role
    epoch: int
    on_fail: OnFail
    reply: ReplyUse = ReplyUse.IGNORE
    hold_io: bool = False


@dataclass(frozen=True, slots=True)
class AnnounceCreate:
    """Send ``PairCreate``: the peer becomes the secondary (it fires Create itself)."""

    on_fail: OnFail
    hold_io: bool = False


@dataclass(frozen=True, slots=True)
class Fire:
    """Feed ``event`` to our machine; drop the SendPairState it asks for (the plan tells)."""

    event: TableEvent
    hold_io: bool = False


@dataclass(frozen=True, slots=True)
class AwaitDrained:
    """Async split: wait until the secondary applied the journal up to the split's cut."""

    on_fail: OnFail
    hold_io: bool = False


@dataclass(frozen=True, slots=True)
class ApplyReceived:
    """Async takeover: apply every journal entry received (report what never arrived)."""

    hold_io: bool = False


@dataclass(frozen=True, slots=True)
class Exchange:
    """Send our current state; take the reply through the reply rules (the state exchange)."""

    on_fail: OnFail
    hold_io: bool = False


@dataclass(frozen=True, slots=True)
class Forget:
    """The pair is gone here: drop it from the node (and its journal with its group's last)."""

    hold_io: bool = False


Step = Query | Announce | AnnounceCreate | Fire | AwaitDrained | ApplyReceived | Exchange | Forget


# -- templates --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tell:
    """Template of an Announce.  ``if_link_up``: left out (peer not told) when the link is
    down."""

    state: State
    role: Role | Ref
    epoch: Ref
    on_fail: OnFail
    reply: ReplyUse = ReplyUse.IGNORE
    if_link_up: bool = False
    hold_io: bool = False


@dataclass(frozen=True, slots=True)
class Move:
    """Template of a Fire: the event of ``kind``, its epochs filled in by :func:`plan`."""

    kind: Kind
    hold_io: bool = False


@dataclass(frozen=True, slots=True)
class AsyncOnly:
    """A chore done for async pairs only."""

    step: ApplyReceived


TemplateStep = Query | Tell | Move | AnnounceCreate | AwaitDrained | AsyncOnly | Exchange | Forget


@dataclass(frozen=True, slots=True)
class PlanTemplate:
    first: Mover
    steps: tuple[TemplateStep, ...]
    note: str = ""


_HELD = True
_SPLIT_NOTE = "client I/O of every pair of the group is held together: one point in time"
# fmt: off
PLANS: Final[dict[PlanKind, PlanTemplate]] = {
    PlanKind.CREATE: PlanTemplate(Mover.PEER, (
        AnnounceCreate(OnFail.ABORT),
        Move(Kind.CREATE, _HELD),
    ), "the adapter routes the volume's open connections through the pair under the gate"),
    PlanKind.SPLIT_SYNC: PlanTemplate(Mover.PEER, (
        Tell(State.PSUS, Role.PRIMARY, Ref.EPOCH_NOW, OnFail.ABORT_LINK_LOST, hold_io=_HELD),
        Move(Kind.SPLIT, _HELD),
    ), _SPLIT_NOTE),
    PlanKind.SPLIT_LOCAL: PlanTemplate(Mover.LOCAL, (
        Move(Kind.SPLIT, _HELD),
    ), "the peer is not told: it is unreachable, or suspended and hidden"),
    PlanKind.SPLIT_ASYNC: PlanTemplate(Mover.PEER, (
        Move(Kind.SPLIT, _HELD),
        AwaitDrained(OnFail.ABORT),
        Tell(State.PSUS, Role.PRIMARY, Ref.EPOCH_NOW, OnFail.CONTINUE),
        Move(Kind.DRAINED),
    ), "Split only cuts the journal (a drain); the pair stays PAIR or PFUL until Drained. "
       "The secondary has everything up to the cut: if it is not told, the split is finished "
       "here and the state exchange on reconnect splits it (rule: the primary split)"),
    PlanKind.RESYNC: PlanTemplate(Mover.PEER, (
        Query(OnFail.ABORT, reconnect=True),
        Tell(State.COPY, Role.PRIMARY, Ref.EPOCH_AFTER, OnFail.ABORT, hold_io=_HELD),
        Move(Kind.RESYNC, _HELD),
    )),
    PlanKind.SWAP_PROMOTE: PlanTemplate(Mover.PEER, (
        Query(OnFail.ABORT, reconnect=True),
        Tell(State.COPY, Role.PRIMARY, Ref.EPOCH_AFTER, OnFail.ABORT, hold_io=_HELD),
        Move(Kind.RESYNC_SWAP, _HELD),
    )),
    PlanKind.SWAP_DEMOTE: PlanTemplate(Mover.LOCAL, (
        Query(OnFail.ABORT, reconnect=True),
        Move(Kind.RESYNC_SWAP, _HELD),
        Tell(State.COPY, Role.SECONDARY, Ref.EPOCH_AFTER, OnFail.ABORT, hold_io=_HELD),
    ), "if the announcement fails, this side has moved: rule two finishes the swap at the "
       "next state exchange"),
    PlanKind.TAKEOVER: PlanTemplate(Mover.LOCAL, (
        Query(OnFail.CONTINUE),
        AsyncOnly(ApplyReceived()),
        Move(Kind.TAKEOVER),
        Tell(State.SSWS, Role.SECONDARY, Ref.EPOCH_AFTER, OnFail.CONTINUE, if_link_up=True),
    ), "the query runs only while the link is up; rule one fences the old primary later"),
    PlanKind.DELETE: PlanTemplate(Mover.PEER, (
        Tell(State.SMPL, Ref.OUR_ROLE, Ref.EPOCH_NOW, OnFail.CONTINUE, if_link_up=True,
             hold_io=_HELD),
        Move(Kind.DELETE, _HELD),
        Forget(_HELD),
    ), "run on the secondary, the primary is told first"),
    PlanKind.RESTORE: PlanTemplate(Mover.LOCAL, (
        Move(Kind.LINK_RESTORED),
    ), "the peer's announcement that woke the link is the exchange: our reply answers it"),
    PlanKind.RESTORE_NOTIFY: PlanTemplate(Mover.LOCAL, (
        Move(Kind.LINK_RESTORED),
        Exchange(OnFail.LINK_LOST),
    )),
    PlanKind.AUTO_RESYNC: PlanTemplate(Mover.PEER, (
        Query(OnFail.STAY_DOWN),
        Tell(State.COPY, Role.PRIMARY, Ref.EPOCH_NOW, OnFail.STAY_DOWN, ReplyUse.RULES,
             hold_io=_HELD),
        Move(Kind.LINK_RESTORED, _HELD),
    ), "the query's reply may finish a split that reached the secondary (it is PSUS: no "
       "resync) or fence us; LinkRestored chains Resync() in the machine (pair_state's "
       "AUTO_RESYNC step); the COPY announcement is the exchange"),
}
# fmt: on


@dataclass(frozen=True, slots=True)
class Plan:
    """The steps to carry out, in order.  ``peer_not_told``: why an announcement of the plan
    was left out (the link is down); ``partial``: the plan ends at its Query, plan again
    after it."""

    kind: PlanKind
    first: Mover
    steps: tuple[Step, ...]
    peer_not_told: str | None = None
    partial: bool = False


def _runs_on(command: Command, r: PairRecord) -> None:
    """The commands that the machine has follower rows for must be run on the right side."""
    if command is Command.SPLIT and r.role is not Role.PRIMARY:
        raise IllegalState(f"pair {r.name}: run split on the primary's node ({r.peer})")
    if command is Command.RESYNC and r.role is not Role.PRIMARY:
        raise IllegalState(
            f"pair {r.name}: run resync on the primary's node ({r.peer}), "
            "or resync --swap here to make this side the primary"
        )
    if command is Command.CREATE and r.role is not Role.PRIMARY:
        raise IllegalState(f"pair {r.name}: a pair is created from its primary's node")


#: The peer states a swap can follow: the peer must become what we are not.
_CAN_DEMOTE: Final = frozenset({State.PSUS, State.PSUE})  # a primary that can follow a swap
_CAN_PROMOTE: Final = frozenset({State.PSUS, State.PSUE, State.SSWS})  # a secondary


def _check_peer(kind: PlanKind, r: PairRecord, peer: PeerView | None) -> None:
    """A swap needs the peer to follow it: refuse it here, before anything moves, when the
    peer's last answer says it cannot.  (Whether a secondary's image is consistent is not on
    the wire: an inconsistent PSUE secondary still refuses to become primary after we have
    demoted ourselves.)"""
    if peer is None:
        return
    if kind is PlanKind.SWAP_PROMOTE and not (
        peer.role is Role.PRIMARY and peer.state in _CAN_DEMOTE
    ):
        raise IllegalState(
            f"pair {r.name}: cannot resync --swap in state {r.state} (the peer is the "
            f"{peer.role.label} in {peer.state}; it must be the primary in PSUS or PSUE)"
        )
    if kind is PlanKind.SWAP_DEMOTE and not (
        peer.role is Role.SECONDARY and peer.state in _CAN_PROMOTE
    ):
        raise IllegalState(
            f"pair {r.name}: cannot resync --swap in state {r.state} (the peer is the "
            f"{peer.role.label} in {peer.state}; it must be the secondary in PSUS, PSUE or "
            "SSWS)"
        )


def _variant(command: Command, r: PairRecord, link_up: bool) -> PlanKind:
    if command is Command.SPLIT:
        if r.mode is Mode.ASYNC and r.state in (State.PAIR, State.PFUL):
            return PlanKind.SPLIT_ASYNC
        return PlanKind.SPLIT_SYNC if link_up and r.state is State.PAIR else PlanKind.SPLIT_LOCAL
    if command is Command.RESYNC_SWAP:  # a swap always changes this side's role
        return PlanKind.SWAP_PROMOTE if r.role is Role.SECONDARY else PlanKind.SWAP_DEMOTE
    simple = {
        Command.CREATE: PlanKind.CREATE,
        Command.RESYNC: PlanKind.RESYNC,
        Command.TAKEOVER: PlanKind.TAKEOVER,
        Command.TAKEOVER_FORCE: PlanKind.TAKEOVER,
        Command.DELETE: PlanKind.DELETE,
    }
    return simple[command]


def _command_event(command: Command, peer_epoch: int) -> TableEvent:
    events: dict[Command, TableEvent] = {
        Command.CREATE: Create(),
        Command.SPLIT: Split(),
        Command.RESYNC: Resync(peer_epoch=peer_epoch),
        Command.RESYNC_SWAP: Resync(swap=True, peer_epoch=peer_epoch),
        Command.TAKEOVER: Takeover(peer_epoch=peer_epoch),
        Command.TAKEOVER_FORCE: Takeover(force=True, peer_epoch=peer_epoch),
        Command.DELETE: Delete(),
    }
    return events[command]


def _dry_run(r: PairRecord, events: list[TableEvent], link_up: bool) -> PairRecord:
    """Our record after ``events`` (raises IllegalState as the real machine would)."""
    trial = PairMachine(r, 0.0, link_up=link_up)
    for event in events:
        trial.handle(event, 0.0)
    return trial.record


def _instantiate(
    kind: PlanKind,
    r: PairRecord,
    after: PairRecord,
    moves: dict[Kind, TableEvent],
    link_up: bool,
) -> Plan:
    template = PLANS[kind]
    steps: list[Step] = []
    not_told: str | None = None
    for t in template.steps:
        if isinstance(t, Query):
            continue  # carried out already (see plan)
        if isinstance(t, Tell):
            if t.if_link_up and not link_up:
                not_told = "the link is down"
                continue
            role = r.role if t.role is Ref.OUR_ROLE else t.role
            assert isinstance(role, Role)
            epoch = after.epoch if t.epoch is Ref.EPOCH_AFTER else r.epoch
            steps.append(Announce(t.state, role, epoch, t.on_fail, t.reply, t.hold_io))
        elif isinstance(t, Move):
            steps.append(Fire(moves[t.kind], t.hold_io))
        elif isinstance(t, AsyncOnly):
            if r.mode is Mode.ASYNC:
                steps.append(t.step)
        else:
            steps.append(t)
    return Plan(kind, template.first, tuple(steps), not_told)


def plan(
    command: Command,
    record: PairRecord,
    peer_epoch: int,
    *,
    link_up: bool = True,
    queried: bool = False,
    peer: PeerView | None = None,
) -> Plan:
    """The steps of ``command`` on the side whose record is ``record``.  ``peer_epoch``: the
    highest epoch this side has heard from the peer; ``link_up``: our machine's view.

    A plan that starts with a Query (resync, swap, and takeover while the link is up) comes
    back ``partial``, with the Query as its one step: carry it out, then plan again with
    ``queried=True``, the record and peer epoch as they are now and ``peer``, the state the
    peer answered with (a swap is refused when the peer cannot follow it).  Raises
    IllegalState, and changes nothing, when the command cannot run on this side now."""
    _runs_on(command, record)
    kind = _variant(command, record, link_up)
    template = PLANS[kind]
    head = template.steps[0]
    if isinstance(head, Query) and not queried and (link_up or head.on_fail is not OnFail.CONTINUE):
        return Plan(kind, template.first, (head,), partial=True)
    _check_peer(kind, record, peer)
    event = _command_event(command, peer_epoch)
    events = [event, Drained()] if kind is PlanKind.SPLIT_ASYNC else [event]
    after = _dry_run(record, events, link_up)
    # The template names the plain kind; Takeover(force) is the takeover plan's move too.
    moves: dict[Kind, TableEvent] = {event.kind: event, Kind.DRAINED: Drained()}
    if isinstance(event, Takeover):
        moves[Kind.TAKEOVER] = event
    return _instantiate(kind, record, after, moves, link_up)


# --------------------------------------------------------------------------------------------
# Auto-resync and the link's return


def auto_resync_due(record: PairRecord, *, link_was_up: bool = False) -> bool:
    """Whether LinkRestored starts a resync on this side: a primary with auto_resync that the
    link (and nothing else: not a disk, a peer error or a takeover) suspended.  The secondary
    never resyncs by itself; it follows the primary's COPY announcement."""
    return (
        not link_was_up
        and record.role is Role.PRIMARY
        and record.auto_resync
        and record.cause is Cause.LINK
    )


def split_there(peer: PeerView | None) -> bool:
    """The peer's answer says it is a split secondary (PSUS): in use on its own since a split
    whose answer we lost; an automatic resync would overwrite what was written there."""
    return peer is not None and peer.role is Role.SECONDARY and peer.state is State.PSUS


def restore_plan(
    record: PairRecord, *, notify: bool, queried: bool = False, peer: PeerView | None = None
) -> Plan:
    """The steps when the peer link is back and our machine still thinks it is down.
    ``notify``: our ping was answered (we tell the peer our state); False when the peer's own
    announcement woke the link (our reply to it tells).

    An automatic resync first learns the peer's state: the plan comes back ``partial``, its
    one step a Query (through the reply rules: a split secondary finishes the split here, a
    peer that took over fences us).  Carry it out, then call again with ``queried=True``, the
    record as it is now and ``peer``, the state the peer answered with; a peer that is a
    split secondary is never resynced automatically."""
    due = auto_resync_due(record) and not split_there(peer)
    if due and not queried:
        head = PLANS[PlanKind.AUTO_RESYNC].steps[0]
        assert isinstance(head, Query)
        return Plan(PlanKind.AUTO_RESYNC, Mover.PEER, (head,), partial=True)
    kind = PlanKind.RESTORE_NOTIFY if notify else PlanKind.RESTORE
    if due:
        kind = PlanKind.AUTO_RESYNC
    moves: dict[Kind, TableEvent] = {Kind.LINK_RESTORED: LinkRestored()}
    return _instantiate(kind, record, record, moves, True)


def render_plans() -> list[str]:
    """The plans as Markdown lines for docs/state-machines.md."""

    def step_text(t: TemplateStep) -> str:
        held = " (I/O held)" if getattr(t, "hold_io", False) else ""
        if isinstance(t, Query):
            extra = "; reconnect first if down" if t.reconnect else ""
            when = " (link up only)" if t.on_fail is OnFail.CONTINUE else ""
            return f"query the peer{when}{extra}, then plan again; on failure: {t.on_fail}"
        if isinstance(t, Tell):
            role = t.role.value if isinstance(t.role, Ref) else t.role.label
            when = " (link up only)" if t.if_link_up else ""
            reply = f"; reply: {t.reply}" if t.reply is ReplyUse.RULES else ""
            return (
                f"announce PairState({t.state}, {role}, {t.epoch.value}){when}{held}; "
                f"on failure: {t.on_fail}{reply}"
            )
        if isinstance(t, Move):
            return f"fire {t.kind.value}{held}"
        if isinstance(t, AnnounceCreate):
            return f"announce PairCreate{held}; on failure: {t.on_fail}"
        if isinstance(t, AwaitDrained):
            return f"wait until the secondary applied up to the cut; on failure: {t.on_fail}"
        if isinstance(t, AsyncOnly):
            return "async only: apply every received journal entry"
        if isinstance(t, Exchange):
            return f"exchange states (send ours, reply rules); on failure: {t.on_fail}"
        return f"forget the pair{held}"

    lines = [
        "| plan | moves first | steps | note |",
        "|---|---|---|---|",
    ]
    for kind, template in PLANS.items():
        steps = "<br>".join(f"{i}. {step_text(t)}" for i, t in enumerate(template.steps, 1))
        lines.append(f"| {kind} | {template.first} | {steps} | {template.note} |")
    return [*lines, ""]
