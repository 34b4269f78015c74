"""The pair state machine: one :class:`PairMachine` per pair per side, pure code, no I/O.

Theory of operation
-------------------
A pair has one Hitachi state (SMPL, COPY, PAIR, PSUS, PSUE, PFUL, PFUS, SSWS; SPEC section 2)
and each side has a role in it, primary or secondary.  Each side runs its own machine over its
own :class:`PairRecord`; the two exchange state over the wire, which is not this module's
business.  The adapter feeds a machine *events* together with ``now`` (monotonic seconds) and
carries out the *actions* it returns, in list order, each finishing before the next starts.

Every legal move is a row of :data:`TRANSITIONS`, a data table keyed by
``(role, state, event kind)`` (one table per mode): a target state, guards (conditions on the
record or the link, each with the reason given when it fails) and steps (record changes and
actions specific to that move); a secondary taken over before its image was whole (its pull
not done: ``PairRecord.pulling``) moves by :data:`PULLING_TRANSITIONS` instead, SSWS while it
pulls, PSUE while the old primary cannot be reached.  Anything not in the table, or whose
guard fails, raises
:class:`~replicator.errors.IllegalState` with a one-line message and leaves the machine as it
was.  Events are of three sorts: *commands* (Create, Split, Resync, Takeover, Delete) and
*engine reports* (CopyProgress, CopyDone, Drained) are refused where they make no sense;
*facts* (link, peer, disk and journal-level reports) are accepted in every state of a mode that
has them, and do nothing where they change nothing.

Around each move the machine derives the actions that every move needs, in this order:
``AssignNewPvid`` (if the move has one) before anything else, so that a crash never leaves a
volume revealed under its primary's PVID; then ``PersistState`` whenever the record changed
or the move talks to the peer (so nothing reaches the peer that a crash could forget);
``SetHidden(True)`` before the steps when the secondary becomes hidden, ``SetHidden(False)``
after them when it is revealed (hide first, reveal last: a client never sees the S-VOL
writable under the primary's PVID); ``SendPairState`` when state, role or epoch changed; then
``pair.state``, ``pair.link``, ``pair.writes`` and ``pair.split.aborted`` events for the log.

Client I/O is not an event: the adapter asks :func:`write_decision` / :func:`read_decision`
(or the machine's methods of the same name) per request; both are table lookups.

Heartbeat (aioquic style): :meth:`PairMachine.get_timer` says when to call
:meth:`PairMachine.handle_timer`.  While the link is up and the pair exists, the machine asks
for a ``SendPing`` every ``heartbeat_interval`` and, if nothing (Ping or Pong) is heard for
``heartbeat_timeout``, feeds itself ``LinkLost``.  A machine restored from disk in COPY, PAIR
or PFUL (or SSWS while pulling) starts with the link down and the same deadline: if the peer
is not back in time, the pair goes to PSUE.

docs/state-machines.md is generated from these tables by ``tools/gen-state-docs``.
"""

from __future__ import annotations

import enum
import errno as _errno
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Final, Literal

from replicator.errors import HeaderCorrupt, IllegalState, ProtocolError, UsageError
from replicator.header import BITMAP_SLOTS, MIN_CHUNK, Role, check_name

FORMAT: Final = "pairvol.pair-state"
VERSION: Final = 1
DEFAULT_CHUNK: Final = 64 * 1024
MAX_CHUNK: Final = 64 * 1024 * 1024
PEER_MAX: Final = 255

ROLES: Final = (Role.PRIMARY, Role.SECONDARY)


class State(enum.StrEnum):
    SMPL = "SMPL"
    COPY = "COPY"
    PAIR = "PAIR"
    PSUS = "PSUS"
    PSUE = "PSUE"
    PFUL = "PFUL"
    PFUS = "PFUS"
    SSWS = "SSWS"


class Mode(enum.StrEnum):
    SYNC = "sync"
    ASYNC = "async"


class Fence(enum.StrEnum):
    NEVER = "never"
    DATA = "data"


class Cause(enum.StrEnum):
    """Why a pair is suspended (PSUE, PFUS); NONE in every other state."""

    NONE = "none"
    LINK = "link"
    PEER = "peer"
    DISK = "disk"
    JOURNAL = "journal"
    TAKEOVER = "takeover"


#: States in which data flows to the secondary.
REPLICATING: Final = frozenset({State.COPY, State.PAIR, State.PFUL})
#: A secondary in one of these states is hidden: clients may neither read nor write it.
HIDDEN_STATES: Final = frozenset({State.COPY, State.PAIR, State.PFUL, State.PSUE, State.PFUS})
SUSPENDED: Final = frozenset({State.PSUE, State.PFUS})
#: A secondary taken over before its copy was complete is in one of these while it pulls.
PULLING_STATES: Final = frozenset({State.SSWS, State.PSUE})
#: A primary in one of these states can be demoted by its peer's swap (Resync(swap)).
SWAPPABLE_PRIMARY: Final = frozenset({State.PSUS, State.PSUE})


def is_hidden(role: Role, state: State) -> bool:
    return role is Role.SECONDARY and state in HIDDEN_STATES


# --------------------------------------------------------------------------------------------
# The persisted record


_ROLE_BY_LABEL: Final = {r.label: r for r in ROLES}


@dataclass(frozen=True, slots=True)
class PairRecord:
    """Everything a side must remember about its pair across a restart.

    ``svol_consistent``: this side is a secondary whose image is a consistent point in time
    (it reached PAIR since its last copy began).  ``copy_incomplete``: SSWS after a forced
    takeover, while the forward copy from the old primary still runs (SPEC section 4).
    ``cause``: why the pair is suspended; a primary suspended with cause TAKEOVER is *stale*.
    """

    group: str
    pair: str
    role: Role
    mode: Mode
    fence: Fence
    peer: str
    state: State = State.SMPL
    epoch: int = 0
    chunk_size: int = DEFAULT_CHUNK
    diff_slot: int = 0
    copy_slot: int = 1
    auto_resync: bool = False
    draining: bool = False
    svol_consistent: bool = False
    copy_incomplete: bool = False
    cause: Cause = Cause.NONE
    copied_chunks: int = 0
    total_chunks: int = 0

    def __post_init__(self) -> None:
        problem = _record_problem(self)
        if problem is not None:
            raise UsageError(f"pair state {self.name}: {problem}")

    @property
    def name(self) -> str:
        return f"{self.group}/{self.pair}"

    @property
    def stale(self) -> bool:
        """The peer took over with a newer epoch: this side must never accept another write."""
        return self.cause is Cause.TAKEOVER

    @property
    def pulling(self) -> bool:
        """Taken over before its image was whole (SPEC 4): the old primary still has chunks
        this side lacks.  SSWS while they are pulled; PSUE while the old primary cannot be
        reached (the pull suspended by an error, the takeover still standing)."""
        return self.copy_incomplete

    @property
    def io_state(self) -> State:
        """The state whose client I/O rules apply: a side taken over whose pull is suspended
        (PSUE) serves as the taken-over side it is, not as a hidden secondary."""
        return State.SSWS if self.copy_incomplete else self.state

    def to_json(self) -> str:
        doc: dict[str, object] = {"format": FORMAT, "version": VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            doc[f.name] = value.label if isinstance(value, Role) else value
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> PairRecord:
        """Parse and validate; anything but a well-formed record raises HeaderCorrupt."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise HeaderCorrupt(f"pair state is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise HeaderCorrupt("pair state is not a JSON object")
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise HeaderCorrupt(
                f"pair state has format {doc.get('format')!r} version {doc.get('version')!r}; "
                f"expected {FORMAT!r} version {VERSION}"
            )
        names = {f.name for f in fields(cls)}
        keys = set(doc) - {"format", "version"}
        if keys != names:
            odd = sorted(keys ^ names)
            raise HeaderCorrupt(f"pair state has missing or unknown fields: {', '.join(odd)}")
        try:
            values: dict[str, Any] = dict(doc)
            del values["format"], values["version"]
            role = _ROLE_BY_LABEL.get(values["role"]) if isinstance(values["role"], str) else None
            if role is None:
                raise UsageError(f"role {values['role']!r} is not primary or secondary")
            values["role"] = role
            for key, enum_type in (("state", State), ("mode", Mode), ("fence", Fence)):
                values[key] = enum_type(values[key])
            values["cause"] = Cause(values["cause"])
            return cls(**values)
        except (UsageError, ValueError, TypeError) as e:
            raise HeaderCorrupt(f"pair state is invalid: {e}") from e


def _record_problem(r: PairRecord) -> str | None:
    for what, name in (("group name", r.group), ("pair name", r.pair)):
        if not isinstance(name, str):
            return f"{what} is not a string"
        try:
            check_name(name, what=what)
        except UsageError as e:
            return str(e)
    if not isinstance(r.peer, str) or not r.peer or len(r.peer.encode()) > PEER_MAX:
        return f"peer {r.peer!r} is not a non-empty string of at most {PEER_MAX} bytes"
    if any(c.isspace() or not c.isprintable() for c in r.peer):
        return f"peer {r.peer!r} contains whitespace or unprintable characters"
    typed = (
        ("role", Role),
        ("mode", Mode),
        ("fence", Fence),
        ("state", State),
        ("cause", Cause),
    )
    for key, t in typed:
        if not isinstance(getattr(r, key), t):
            return f"{key} {getattr(r, key)!r} is not a {t.__name__}"
    if r.role not in ROLES:
        return f"role {r.role.label} is not primary or secondary"
    for key in ("epoch", "chunk_size", "diff_slot", "copy_slot", "copied_chunks", "total_chunks"):
        value = getattr(r, key)
        if type(value) is not int or value < 0 or value >= 1 << 63:
            return f"{key} {value!r} is not a non-negative 63-bit integer"
    for key in ("auto_resync", "draining", "svol_consistent", "copy_incomplete"):
        if type(getattr(r, key)) is not bool:
            return f"{key} {getattr(r, key)!r} is not a boolean"
    c = r.chunk_size
    if c < MIN_CHUNK or c > MAX_CHUNK or c & (c - 1):
        return f"chunk size {c} is not a power of two from {MIN_CHUNK} to {MAX_CHUNK}"
    if r.diff_slot >= BITMAP_SLOTS or r.copy_slot >= BITMAP_SLOTS or r.diff_slot == r.copy_slot:
        return f"bitmap slots {r.diff_slot} and {r.copy_slot} must differ and be < {BITMAP_SLOTS}"
    if r.copied_chunks > r.total_chunks:
        return f"copied {r.copied_chunks} of only {r.total_chunks} chunks"
    if r.mode is Mode.ASYNC and r.fence is Fence.DATA:
        return "fence=data needs mode sync (an async secondary always lags)"
    if r.state is State.SSWS and r.role is not Role.SECONDARY:
        return "only a secondary can be in SSWS"
    if r.state in (State.PFUL, State.PFUS) and r.mode is not Mode.ASYNC:
        return f"{r.state} exists only in async mode"
    if r.draining and (
        r.role is not Role.PRIMARY or r.mode is not Mode.ASYNC or r.state not in _DRAIN_STATES
    ):
        return "only an async primary in PAIR or PFUL can drain for a split"
    if r.copy_incomplete and (r.role is not Role.SECONDARY or r.state not in PULLING_STATES):
        return "copy_incomplete is set outside SSWS and PSUE of a secondary"
    if r.svol_consistent and r.role is not Role.SECONDARY:
        return "svol_consistent is set on a primary"
    if (r.cause is not Cause.NONE) != (r.state in SUSPENDED):
        return f"cause {r.cause} does not fit state {r.state}"
    if r.state is State.PFUS and r.cause is not Cause.JOURNAL:
        return f"PFUS with cause {r.cause}"
    if r.state is State.PSUE and r.cause is Cause.JOURNAL:
        return "PSUE with cause journal"
    if r.stale and r.role is not Role.PRIMARY:
        return "a secondary cannot be stale"
    if r.state is State.SMPL and (r.svol_consistent or r.copied_chunks or r.total_chunks):
        return "SMPL with leftover pair flags or progress"
    return None


_DRAIN_STATES: Final = frozenset({State.PAIR, State.PFUL})


# --------------------------------------------------------------------------------------------
# Events


class Kind(enum.StrEnum):
    """The event dimension of the transition tables (a Resync or Takeover variant is a kind)."""

    CREATE = "Create"
    SPLIT = "Split"
    DRAINED = "Drained"
    RESYNC = "Resync"
    RESYNC_SWAP = "Resync(swap)"
    TAKEOVER = "Takeover"
    TAKEOVER_FORCE = "Takeover(force)"
    DELETE = "Delete"
    COPY_PROGRESS = "CopyProgress"
    COPY_DONE = "CopyDone"
    JOURNAL_HIGH = "JournalHigh"
    JOURNAL_LOW = "JournalLow"
    JOURNAL_FULL = "JournalFull"
    LINK_LOST = "LinkLost"
    LINK_RESTORED = "LinkRestored"
    PEER_ERROR = "PeerError"
    DISK_ERROR = "DiskError"
    PEER_TOOK_OVER = "PeerTookOver"


COMMANDS: Final = frozenset(
    {Kind.CREATE, Kind.SPLIT, Kind.RESYNC, Kind.RESYNC_SWAP, Kind.TAKEOVER}
    | {Kind.TAKEOVER_FORCE, Kind.DELETE}
)
ENGINE_REPORTS: Final = frozenset({Kind.COPY_PROGRESS, Kind.COPY_DONE, Kind.DRAINED})
JOURNAL_FACTS: Final = frozenset({Kind.JOURNAL_HIGH, Kind.JOURNAL_LOW, Kind.JOURNAL_FULL})
FACTS: Final = frozenset(set(Kind) - COMMANDS - ENGINE_REPORTS - {Kind.PEER_TOOK_OVER})

_VERB: Final = {
    Kind.CREATE: "create",
    Kind.SPLIT: "split",
    Kind.DRAINED: "finish a split drain",
    Kind.RESYNC: "resync",
    Kind.RESYNC_SWAP: "resync --swap",
    Kind.TAKEOVER: "take over",
    Kind.TAKEOVER_FORCE: "force a takeover",
    Kind.DELETE: "delete",
    Kind.COPY_PROGRESS: "record copy progress",
    Kind.COPY_DONE: "finish a copy",
    Kind.JOURNAL_HIGH: "report a journal above its high watermark",
    Kind.JOURNAL_LOW: "report a journal below its high watermark",
    Kind.JOURNAL_FULL: "report a full journal",
    Kind.LINK_LOST: "lose the link",
    Kind.LINK_RESTORED: "restore the link",
    Kind.PEER_ERROR: "take a peer error",
    Kind.DISK_ERROR: "take a disk error",
    Kind.PEER_TOOK_OVER: "accept a takeover by the peer",
}


def _check_count(what: str, value: object) -> None:
    if type(value) is not int or value < 0:
        raise ProtocolError(f"{what} {value!r} is not a non-negative integer", remote=False)


def _check_text(what: str, value: object) -> None:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} {value!r} is not a string", remote=False)


@dataclass(frozen=True, slots=True)
class Create:
    """Pair the volumes: the primary starts the initial copy, the secondary hides."""

    kind: ClassVar[Kind] = Kind.CREATE


@dataclass(frozen=True, slots=True)
class Split:
    """Sync: PAIR → PSUS at once.  Async primary: start a drain; ``Drained`` finishes it."""

    kind: ClassVar[Kind] = Kind.SPLIT


@dataclass(frozen=True, slots=True)
class Drained:
    """The journal up to the split's cut is applied on the secondary (async primary only)."""

    kind: ClassVar[Kind] = Kind.DRAINED


@dataclass(frozen=True, slots=True)
class Resync:
    """Back to COPY.  ``swap`` reverses the direction first.  The side that moves first in a
    swap gives ``peer_epoch``, the highest epoch it knows of the other side, and takes
    ``max(ours, peer_epoch) + 1``; the side that follows gives ``epoch``, the epoch the mover
    announced, and adopts it (so both end with the same epoch; docs/decisions.md, "Epochs")."""

    swap: bool = False
    peer_epoch: int = 0
    epoch: int = 0
    #: A swap back after a takeover's pull: this side pulled everything the peer (the old
    #: primary, fenced at this epoch ever since) had and it lacked, so the peer's difference
    #: bitmap is no news and the copy back takes this side's own differences only.
    peer_pulled: bool = False

    def __post_init__(self) -> None:
        _check_count("peer epoch", self.peer_epoch)
        _check_count("epoch", self.epoch)
        if self.peer_pulled is not False and (self.peer_pulled is not True or not self.swap):
            raise ProtocolError("peer_pulled belongs to a swap (Resync(swap=True))", remote=False)

    @property
    def kind(self) -> Kind:
        return Kind.RESYNC_SWAP if self.swap else Kind.RESYNC


@dataclass(frozen=True, slots=True)
class Takeover:
    """Make the secondary usable on its own (SSWS).  ``force`` allows an inconsistent image.
    ``peer_epoch``: the highest epoch this side has seen from the old primary; the takeover's
    epoch is ``max(ours, peer_epoch) + 1``, so it is newer than anything the peer announced."""

    force: bool = False
    peer_epoch: int = 0
    #: The command fenced the reachable old primary and took what this side lacks of its
    #: final image (its copy and difference bitmaps, the journal folded in) into the copy
    #: bitmap, durably: pull it (SPEC 4's takeover with no data lost).
    pull: bool = False

    def __post_init__(self) -> None:
        _check_count("peer epoch", self.peer_epoch)

    @property
    def kind(self) -> Kind:
        return Kind.TAKEOVER_FORCE if self.force else Kind.TAKEOVER


@dataclass(frozen=True, slots=True)
class Delete:
    """Dissolve the pair.  ``force``: also on a side taken over whose pull is not done (its
    image keeps the chunks it never received as they were)."""

    force: bool = False

    kind: ClassVar[Kind] = Kind.DELETE


@dataclass(frozen=True, slots=True)
class CopyProgress:
    copied: int
    total: int

    kind: ClassVar[Kind] = Kind.COPY_PROGRESS

    def __post_init__(self) -> None:
        _check_count("copied chunks", self.copied)
        _check_count("total chunks", self.total)
        if self.copied > self.total:
            raise ProtocolError(f"copied {self.copied} of {self.total} chunks", remote=False)


@dataclass(frozen=True, slots=True)
class CopyDone:
    kind: ClassVar[Kind] = Kind.COPY_DONE


@dataclass(frozen=True, slots=True)
class JournalHigh:
    kind: ClassVar[Kind] = Kind.JOURNAL_HIGH


@dataclass(frozen=True, slots=True)
class JournalLow:
    kind: ClassVar[Kind] = Kind.JOURNAL_LOW


@dataclass(frozen=True, slots=True)
class JournalFull:
    kind: ClassVar[Kind] = Kind.JOURNAL_FULL


@dataclass(frozen=True, slots=True)
class LinkLost:
    reason: str = ""

    kind: ClassVar[Kind] = Kind.LINK_LOST

    def __post_init__(self) -> None:
        _check_text("reason", self.reason)


@dataclass(frozen=True, slots=True)
class LinkRestored:
    """The peer link is (re)connected and authenticated."""

    kind: ClassVar[Kind] = Kind.LINK_RESTORED


@dataclass(frozen=True, slots=True)
class PeerError:
    """The peer reported a failure on its side (its disk, its apply)."""

    reason: str = ""

    kind: ClassVar[Kind] = Kind.PEER_ERROR

    def __post_init__(self) -> None:
        _check_text("reason", self.reason)


@dataclass(frozen=True, slots=True)
class DiskError:
    """This side's volume failed an I/O the pair depends on."""

    reason: str = ""

    kind: ClassVar[Kind] = Kind.DISK_ERROR

    def __post_init__(self) -> None:
        _check_text("reason", self.reason)


@dataclass(frozen=True, slots=True)
class PeerTookOver:
    """The peer (our secondary) took over with this epoch: fence ourselves."""

    epoch: int

    kind: ClassVar[Kind] = Kind.PEER_TOOK_OVER

    def __post_init__(self) -> None:
        _check_count("epoch", self.epoch)


@dataclass(frozen=True, slots=True)
class Ping:
    """A heartbeat from the peer: answer with SendPong."""


@dataclass(frozen=True, slots=True)
class Pong:
    """The peer answered our SendPing."""


TableEvent = (
    Create
    | Split
    | Drained
    | Resync
    | Takeover
    | Delete
    | CopyProgress
    | CopyDone
    | JournalHigh
    | JournalLow
    | JournalFull
    | LinkLost
    | LinkRestored
    | PeerError
    | DiskError
    | PeerTookOver
)
Event = TableEvent | Ping | Pong


# --------------------------------------------------------------------------------------------
# Actions


class CopyKind(enum.StrEnum):
    FULL = "full"  # every allocated chunk (holes skipped)
    DIFFERENTIAL = "differential"  # the union of the named bitmaps
    RESUME = "resume"  # carry on from the persisted copy bitmap
    PULL = "pull"  # SPEC 4: fetch the old primary's not-yet-copied chunks, never over new writes


class BitmapRef(enum.StrEnum):
    LOCAL_DIFF = "local-diff"  # this side's difference bitmap (record.diff_slot)
    PEER_DIFF = "peer-diff"  # the other side's difference bitmap
    PEER_PENDING = "peer-pending"  # the old primary's not-yet-copied bitmap (SPEC 4)


@dataclass(frozen=True, slots=True)
class PersistState:
    """Write ``record`` durably (atomic file) before carrying out the next action."""

    record: PairRecord
    to_peer: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class SendPairState:
    """Tell the peer our state (best effort: repeated by the state exchange on reconnect)."""

    state: State
    role: Role
    epoch: int
    to_peer: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class StartCopy:
    """Start the copy engine (primary pushes; PULL: this SSWS side pulls).  For DIFFERENTIAL the
    engine ORs ``bitmaps`` into the copy bitmap, persists it, then clears the diffs it took."""

    kind: CopyKind
    bitmaps: tuple[BitmapRef, ...] = ()
    to_peer: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class StopCopy:
    to_peer: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class FetchPeerBitmap:
    """Get ``which`` from the peer into the copy bitmap; the next action waits for it."""

    which: BitmapRef
    to_peer: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class StartDrain:
    """Cut the group's journal at its newest sequence, ship up to the cut, report Drained."""

    to_peer: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class FoldJournal:
    """Mark every chunk of the unsent journal entries in the local difference bitmap, then drop
    those entries (PFUS, and PSUE in async mode)."""

    to_peer: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class DropJournal:
    """Discard this pair's journal entries (async primary, on delete)."""

    to_peer: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class DropBitmaps:
    """Release the pair's bitmap slots (on delete)."""

    to_peer: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class AssignNewPvid:
    """Give the local volume a new unique PVID (secondary on split, hidden or stale on delete).

    It always comes *before* the move's PersistState: until the record says the volume may be
    used on its own, it is hidden (or stale), so a crash between the two leaves a hidden
    volume with a fresh PVID, never a visible one with its primary's (docs/decisions.md,
    "Crash ordering")."""

    to_peer: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class DiscardReceived:
    """Async secondary entering a copy: every entry of this pair received but not applied is
    superseded by the chunks the copy brings (the primary folded them into its bitmap), so it
    is skipped, durably, before the copy can write the first chunk."""

    to_peer: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class AdoptPrimaryPvid:
    """Set the local (secondary) volume's PVID to the primary's, learnt from the peer."""

    to_peer: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class SetHidden:
    hidden: bool
    to_peer: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class SwapRoles:
    """The local volume's role in its header becomes ``role``."""

    role: Role
    to_peer: ClassVar[bool] = False


FieldValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class EmitEvent:
    """One structured line for the event log."""

    name: str
    fields: tuple[tuple[str, FieldValue], ...] = ()
    to_peer: ClassVar[bool] = False

    def as_dict(self) -> dict[str, FieldValue]:
        return dict(self.fields)


@dataclass(frozen=True, slots=True)
class SendPing:
    to_peer: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class SendPong:
    to_peer: ClassVar[bool] = True


Action = (
    PersistState
    | SendPairState
    | StartCopy
    | StopCopy
    | FetchPeerBitmap
    | StartDrain
    | FoldJournal
    | DropJournal
    | DropBitmaps
    | AssignNewPvid
    | DiscardReceived
    | AdoptPrimaryPvid
    | SetHidden
    | SwapRoles
    | EmitEvent
    | SendPing
    | SendPong
)


# --------------------------------------------------------------------------------------------
# Client I/O policy


class WriteDecision(enum.StrEnum):
    LOCAL = "LOCAL"  # plain volume: write locally
    MIRROR = "MIRROR"  # sync: write locally and on the secondary, ack after both
    JOURNAL = "JOURNAL"  # async: write locally, ack once the journal entry is durable
    LOCAL_RECORD = "LOCAL_RECORD"  # write locally and mark the chunk in the difference bitmap
    REFUSE_FENCED = "REFUSE_FENCED"  # fence=data and the secondary cannot be updated
    REFUSE_HIDDEN = "REFUSE_HIDDEN"  # hidden secondary
    REFUSE_STALE = "REFUSE_STALE"  # the peer took over with a newer epoch

    @property
    def errno(self) -> int:
        """0 when the write goes ahead, else the errno the client gets."""
        return _WRITE_ERRNO.get(self, 0)


_WRITE_ERRNO: Final = {
    WriteDecision.REFUSE_FENCED: _errno.EIO,
    WriteDecision.REFUSE_HIDDEN: _errno.EPERM,
    WriteDecision.REFUSE_STALE: _errno.EIO,
}


class ReadDecision(enum.StrEnum):
    LOCAL = "LOCAL"
    LOCAL_OR_FETCH = "LOCAL_OR_FETCH"  # SPEC 4: a chunk not yet copied comes from the old primary
    REFUSE_HIDDEN = "REFUSE_HIDDEN"

    @property
    def errno(self) -> int:
        return _errno.EPERM if self is ReadDecision.REFUSE_HIDDEN else 0


_BY_FENCE: Final = "by-fence"  # REFUSE_FENCED under fence=data, LOCAL_RECORD under fence=never
_Rule = WriteDecision | Literal["by-fence"] | None

_W = WriteDecision
# (role, state) -> (sync with the link up, sync with the link down, async either way).
# None: the combination cannot exist.
_WRITE_RULES: Final[dict[tuple[Role, State], tuple[_Rule, _Rule, _Rule]]] = {
    (Role.PRIMARY, State.SMPL): (_W.LOCAL, _W.LOCAL, _W.LOCAL),
    (Role.PRIMARY, State.COPY): (_W.MIRROR, _BY_FENCE, _W.JOURNAL),
    (Role.PRIMARY, State.PAIR): (_W.MIRROR, _BY_FENCE, _W.JOURNAL),
    (Role.PRIMARY, State.PFUL): (None, None, _W.JOURNAL),
    (Role.PRIMARY, State.PSUS): (_W.LOCAL_RECORD, _W.LOCAL_RECORD, _W.LOCAL_RECORD),
    (Role.PRIMARY, State.PSUE): (_BY_FENCE, _BY_FENCE, _W.LOCAL_RECORD),
    (Role.PRIMARY, State.PFUS): (None, None, _W.LOCAL_RECORD),
    (Role.SECONDARY, State.SMPL): (_W.LOCAL, _W.LOCAL, _W.LOCAL),
    (Role.SECONDARY, State.COPY): (_W.REFUSE_HIDDEN, _W.REFUSE_HIDDEN, _W.REFUSE_HIDDEN),
    (Role.SECONDARY, State.PAIR): (_W.REFUSE_HIDDEN, _W.REFUSE_HIDDEN, _W.REFUSE_HIDDEN),
    (Role.SECONDARY, State.PFUL): (None, None, _W.REFUSE_HIDDEN),
    (Role.SECONDARY, State.PSUS): (_W.LOCAL_RECORD, _W.LOCAL_RECORD, _W.LOCAL_RECORD),
    (Role.SECONDARY, State.PSUE): (_W.REFUSE_HIDDEN, _W.REFUSE_HIDDEN, _W.REFUSE_HIDDEN),
    (Role.SECONDARY, State.PFUS): (None, None, _W.REFUSE_HIDDEN),
    (Role.SECONDARY, State.SSWS): (_W.LOCAL_RECORD, _W.LOCAL_RECORD, _W.LOCAL_RECORD),
}


def _materialize_write_policy() -> dict[tuple[Role, State, Mode, Fence, bool], WriteDecision]:
    table: dict[tuple[Role, State, Mode, Fence, bool], WriteDecision] = {}
    for (role, state), (sync_up, sync_down, async_any) in _WRITE_RULES.items():
        for fence in Fence:
            for link_up in (True, False):
                cells: list[tuple[Mode, _Rule]] = [(Mode.SYNC, sync_up if link_up else sync_down)]
                if fence is Fence.NEVER:
                    cells.append((Mode.ASYNC, async_any))
                for mode, rule in cells:
                    if rule == _BY_FENCE:
                        rule = _W.REFUSE_FENCED if fence is Fence.DATA else _W.LOCAL_RECORD
                    if isinstance(rule, WriteDecision):
                        table[role, state, mode, fence, link_up] = rule
    return table


#: (role, state, mode, fence, link_up) → what to do with a client write.
WRITE_POLICY: Final = _materialize_write_policy()

#: (role, state) → what to do with a client read (SSWS with copy_incomplete: LOCAL_OR_FETCH).
READ_POLICY: Final[dict[tuple[Role, State], ReadDecision]] = {
    (role, state): ReadDecision.REFUSE_HIDDEN if is_hidden(role, state) else ReadDecision.LOCAL
    for role in ROLES
    for state in State
    if not (role is Role.PRIMARY and state is State.SSWS)
}


def write_decision(
    state: State,
    role: Role,
    mode: Mode,
    fence: Fence,
    link_up: bool,
    *,
    draining: bool = False,
    stale: bool = False,
) -> WriteDecision:
    """The write policy: a lookup in :data:`WRITE_POLICY` plus two overrides.  A stale primary
    refuses everything; a primary draining for a split records instead of journaling (its
    writes come after the split's cut)."""
    if stale:
        return WriteDecision.REFUSE_STALE
    try:
        decision = WRITE_POLICY[role, state, mode, fence, link_up]
    except KeyError:
        raise UsageError(
            f"no write policy for a {role.label} in {state} ({mode}, fence={fence})"
        ) from None
    if draining and decision is WriteDecision.JOURNAL:
        return WriteDecision.LOCAL_RECORD
    return decision


def read_decision(state: State, role: Role, *, copy_incomplete: bool = False) -> ReadDecision:
    try:
        decision = READ_POLICY[role, state]
    except KeyError:
        raise UsageError(f"no read policy for a {role.label} in {state}") from None
    if copy_incomplete and state is State.SSWS:
        return ReadDecision.LOCAL_OR_FETCH
    return decision


# --------------------------------------------------------------------------------------------
# The transition tables


class _Ctx:
    """What a guard sees and what a step writes to, for one move."""

    __slots__ = ("chain", "changes", "event", "link_up", "old", "out", "was_link_up")

    def __init__(self, old: PairRecord, event: TableEvent, link_up: bool, was_link_up: bool):
        self.old = old
        self.event = event
        self.link_up = link_up
        self.was_link_up = was_link_up
        self.changes: dict[str, Any] = {}
        self.out: list[Action] = []
        self.chain: TableEvent | None = None

    def emit(self, name: str, **fields: FieldValue) -> None:
        self.out.append(EmitEvent(name, _event_fields(self.old, fields)))


def _event_fields(
    r: PairRecord, extra: dict[str, FieldValue]
) -> tuple[tuple[str, FieldValue], ...]:
    return (("group", r.group), ("pair", r.pair), *extra.items())


@dataclass(frozen=True, slots=True)
class Guard:
    label: str
    test: Callable[[_Ctx], bool]
    reason: str


@dataclass(frozen=True, slots=True)
class Step:
    """Part of a move.  A step limited to some ``states`` or ``modes`` is left out of the
    table's rows for the others, so the tables say exactly what each move does."""

    label: str
    run: Callable[[_Ctx], None]
    states: frozenset[State] | None = None
    modes: frozenset[Mode] | None = None

    def applies(self, mode: Mode, state: State) -> bool:
        return (self.states is None or state in self.states) and (
            self.modes is None or mode in self.modes
        )


@dataclass(frozen=True, slots=True)
class Transition:
    target: State
    steps: tuple[Step, ...] = ()
    guards: tuple[Guard, ...] = ()


LINK_UP = Guard("link", lambda c: c.link_up, "the peer is unreachable")
NOT_STALE = Guard(
    "not stale",
    lambda c: not c.old.stale,
    "the peer took over with a newer epoch; only resync --swap can rejoin this side",
)
CONSISTENT_TO_TAKE_OVER = Guard(
    "consistent",
    lambda c: c.old.svol_consistent,
    "the secondary was suspended before its copy finished and is not consistent; "
    "use force to take over anyway",
)
CONSISTENT_TO_SWAP = Guard(
    "consistent source",
    lambda c: c.old.svol_consistent,
    "the secondary was suspended before its copy finished; an inconsistent image cannot "
    "become the primary",
)
TAKEN_TO_TAKE_OVER = Guard(
    "taken",
    lambda c: isinstance(c.event, Takeover) and c.event.pull,
    "the secondary is not consistent until PAIR and the old primary's pending bitmap was not "
    "taken; use force to take over anyway",
)
DRAINING = Guard("draining", lambda c: c.old.draining, "no split drain is in progress")
NOT_DRAINING = Guard("not draining", lambda c: not c.old.draining, "a split is already draining")
FORCED_DELETE = Guard(
    "forced",
    lambda c: isinstance(c.event, Delete) and c.event.force,
    "this side still lacks chunks only the old primary has (the pull is not done); wait for "
    "it, or delete --force to keep the image as it is, two points in time mixed",
)


def _newer_epoch(c: _Ctx) -> bool:
    return isinstance(c.event, PeerTookOver) and c.event.epoch > c.old.epoch


NEWER_EPOCH = Guard("newer epoch", _newer_epoch, "the peer's epoch is not newer than ours")


def _step(
    label: str, *, states: frozenset[State] | None = None, modes: frozenset[Mode] | None = None
) -> Callable[[Callable[[_Ctx], None]], Step]:
    def wrap(fn: Callable[[_Ctx], None]) -> Step:
        return Step(label, fn, states, modes)

    return wrap


@_step("start full copy")
def START_FULL_COPY(c: _Ctx) -> None:
    c.changes.update(copied_chunks=0, total_chunks=0)
    c.out.append(StartCopy(CopyKind.FULL))


def _differential(c: _Ctx) -> None:
    c.changes.update(copied_chunks=0, total_chunks=0)
    c.out.append(FetchPeerBitmap(BitmapRef.PEER_DIFF))
    c.out.append(StartCopy(CopyKind.DIFFERENTIAL, (BitmapRef.LOCAL_DIFF, BitmapRef.PEER_DIFF)))


START_DIFF_COPY = Step("fetch peer diff, start differential copy of the union", _differential)


@_step(
    "start differential copy (of ours only if the peer's image was pulled; full if the "
    "taken-over image was inconsistent)"
)
def START_SWAP_COPY(c: _Ctx) -> None:
    if not c.old.svol_consistent:
        START_FULL_COPY.run(c)
    elif isinstance(c.event, Resync) and c.event.peer_pulled:
        c.changes.update(copied_chunks=0, total_chunks=0)
        c.out.append(StartCopy(CopyKind.DIFFERENTIAL, (BitmapRef.LOCAL_DIFF,)))
    else:
        _differential(c)


@_step("resume copy if reconnecting")
def RESUME_COPY(c: _Ctx) -> None:
    if not c.was_link_up:
        c.out.append(StartCopy(CopyKind.RESUME))


@_step("resume pull if reconnecting")
def RESUME_PULL(c: _Ctx) -> None:
    if c.old.copy_incomplete and not c.was_link_up:
        c.out.append(StartCopy(CopyKind.PULL, (BitmapRef.PEER_PENDING,)))


@_step("stop copy", states=frozenset({State.COPY}))
def STOP_COPY(c: _Ctx) -> None:
    c.out.append(StopCopy())


@_step("stop pull if running", states=frozenset({State.SSWS}))
def STOP_PULL(c: _Ctx) -> None:
    if c.old.copy_incomplete:
        c.out.append(StopCopy())


@_step("record progress")
def RECORD_PROGRESS(c: _Ctx) -> None:
    assert isinstance(c.event, CopyProgress)
    c.changes.update(copied_chunks=c.event.copied, total_chunks=c.event.total)


@_step("progress 100%")
def COMPLETE_PROGRESS(c: _Ctx) -> None:
    c.changes.update(copied_chunks=c.old.total_chunks)


@_step("S-VOL consistent")
def MARK_CONSISTENT(c: _Ctx) -> None:
    c.changes.update(svol_consistent=True, copy_incomplete=False)


@_step("adopt primary PVID, S-VOL inconsistent")
def ADOPT(c: _Ctx) -> None:
    c.changes.update(svol_consistent=False, copied_chunks=0, total_chunks=0)
    c.out.append(AdoptPrimaryPvid())


@_step("discard received, unapplied entries", modes=frozenset({Mode.ASYNC}))
def DISCARD_RECEIVED(c: _Ctx) -> None:
    c.out.append(DiscardReceived())


@_step("new PVID")
def NEW_PVID(c: _Ctx) -> None:
    c.out.append(AssignNewPvid())


@_step("new PVID if stale")
def NEW_PVID_IF_STALE(c: _Ctx) -> None:
    if c.old.stale:
        c.out.append(AssignNewPvid())


@_step("epoch = the announced one, or max(ours, peer's) + 1")
def SWAP_EPOCH(c: _Ctx) -> None:
    ev = c.event
    assert isinstance(ev, Resync)
    mover = max(c.old.epoch, ev.peer_epoch) + 1
    c.changes.update(epoch=max(ev.epoch, c.old.epoch + 1) if ev.epoch else mover)


@_step("become primary")
def BECOME_PRIMARY(c: _Ctx) -> None:
    c.changes.update(role=Role.PRIMARY, svol_consistent=False)
    c.out.append(SwapRoles(Role.PRIMARY))


@_step("become secondary")
def BECOME_SECONDARY(c: _Ctx) -> None:
    c.changes.update(role=Role.SECONDARY)
    c.out.append(SwapRoles(Role.SECONDARY))


@_step("epoch = max(ours, peer's) + 1, pair.takeover")
def TAKE_OVER(c: _Ctx) -> None:
    peer_epoch = c.event.peer_epoch if isinstance(c.event, Takeover) else 0
    epoch = max(c.old.epoch, peer_epoch) + 1
    c.changes.update(epoch=epoch)
    c.emit(
        "pair.takeover",
        epoch=epoch,
        previous=str(c.old.state),
        forced=isinstance(c.event, Takeover) and c.event.force,
        consistent=c.old.svol_consistent,
    )


@_step("pull the taken pending chunks if inconsistent (or taken) and the old primary answers")
def FORCED_PULL(c: _Ctx) -> None:
    # The command took the old primary's pending bitmap into the copy bitmap, durably, after
    # fencing it and before this move: the record that reveals this side never comes first.
    taken = isinstance(c.event, Takeover) and c.event.pull
    if (taken or not c.old.svol_consistent) and c.link_up:
        c.changes.update(copy_incomplete=True, copied_chunks=0, total_chunks=0)
        c.out.append(StartCopy(CopyKind.PULL, (BitmapRef.PEER_PENDING,)))


@_step("pull the chunks taken from the old primary (a takeover with no data lost)")
def PULL_TAKEN(c: _Ctx) -> None:
    # Until the last chunk is in, the image on disk mixes two points in time.
    if isinstance(c.event, Takeover) and c.event.pull and c.link_up:
        c.changes.update(
            copy_incomplete=True, svol_consistent=False, copied_chunks=0, total_chunks=0
        )
        c.out.append(StartCopy(CopyKind.PULL, (BitmapRef.PEER_PENDING,)))


@_step("start drain")
def BEGIN_DRAIN(c: _Ctx) -> None:
    c.changes.update(draining=True)
    c.out.append(StartDrain())
    c.emit("pair.split.draining")


@_step("fold journal", states=REPLICATING, modes=frozenset({Mode.ASYNC}))
def FOLD_JOURNAL(c: _Ctx) -> None:
    c.out.append(FoldJournal())


def _cause(cause: Cause) -> Step:
    def run(c: _Ctx) -> None:
        c.changes.update(cause=cause)

    return Step(f"cause {cause}", run)


@_step("cause takeover, epoch = peer's")
def FENCED_BY_PEER(c: _Ctx) -> None:
    assert isinstance(c.event, PeerTookOver)
    c.changes.update(cause=Cause.TAKEOVER, epoch=c.event.epoch)


@_step("pair.error")
def NOTE_ERROR(c: _Ctx) -> None:
    ev = c.event
    source = "peer" if isinstance(ev, PeerError) else "disk"
    reason = ev.reason if isinstance(ev, PeerError | DiskError) else ""
    c.emit("pair.error", source=source, reason=reason)


@_step("resync if auto_resync and suspended by the link")
def AUTO_RESYNC(c: _Ctx) -> None:
    if c.old.auto_resync and c.old.cause is Cause.LINK and not c.was_link_up:
        c.chain = Resync()


@_step("drop journal", modes=frozenset({Mode.ASYNC}))
def DROP_JOURNAL(c: _Ctx) -> None:
    c.out.append(DropJournal())


@_step("drop bitmaps")
def DROP_BITMAPS(c: _Ctx) -> None:
    c.out.append(DropBitmaps())


LINK_CAUSE, PEER_CAUSE, DISK_CAUSE = _cause(Cause.LINK), _cause(Cause.PEER), _cause(Cause.DISK)
JOURNAL_CAUSE = _cause(Cause.JOURNAL)


@dataclass(frozen=True, slots=True)
class _Row:
    roles: tuple[Role, ...]
    states: tuple[State, ...]
    kinds: tuple[Kind, ...]
    target: State | None  # None: stays in the state it was in
    steps: tuple[Step, ...] = ()
    guards: tuple[Guard, ...] = ()
    modes: tuple[Mode, ...] = (Mode.SYNC, Mode.ASYNC)


P, S, BOTH = (Role.PRIMARY,), (Role.SECONDARY,), ROLES
SMPL, COPY, PAIR, PSUS, PSUE, PFUL, PFUS, SSWS = (
    State.SMPL,
    State.COPY,
    State.PAIR,
    State.PSUS,
    State.PSUE,
    State.PFUL,
    State.PFUS,
    State.SSWS,
)
REPL = (COPY, PAIR, PFUL)
QUIET = (SMPL, PSUS, PSUE, PFUS, SSWS)
SYNC, ASYNC = (Mode.SYNC,), (Mode.ASYNC,)
K = Kind

# The transitions, one row per rule.  A row names roles, states and event kinds and expands to
# every combination; states that cannot exist for a mode or role (PFUL and PFUS in sync mode,
# SSWS on a primary) are skipped, and so are steps limited to other states or modes (see
# Step), which keeps one row per rule instead of one per case.
# fmt: off
_ROWS: Final[tuple[_Row, ...]] = (
    # -- facts: the link, the peer and the disk (accepted in every state) --
    _Row(P, REPL, (K.LINK_LOST,), PSUE, (LINK_CAUSE, STOP_COPY, FOLD_JOURNAL)),
    _Row(S, REPL, (K.LINK_LOST,), PSUE, (LINK_CAUSE,)),
    _Row(P, REPL, (K.PEER_ERROR,), PSUE, (NOTE_ERROR, PEER_CAUSE, STOP_COPY, FOLD_JOURNAL)),
    _Row(S, REPL, (K.PEER_ERROR,), PSUE, (NOTE_ERROR, PEER_CAUSE)),
    _Row(P, REPL, (K.DISK_ERROR,), PSUE, (NOTE_ERROR, DISK_CAUSE, STOP_COPY, FOLD_JOURNAL)),
    _Row(S, REPL, (K.DISK_ERROR,), PSUE, (NOTE_ERROR, DISK_CAUSE)),
    _Row(BOTH, QUIET, (K.LINK_LOST,), None),
    _Row(BOTH, QUIET, (K.PEER_ERROR, K.DISK_ERROR), None, (NOTE_ERROR,)),
    _Row(P, (COPY,), (K.LINK_RESTORED,), None, (RESUME_COPY,)),
    _Row(P, (PSUE,), (K.LINK_RESTORED,), None, (AUTO_RESYNC,)),
    _Row(P, (SMPL, PAIR, PFUL, PSUS, PFUS), (K.LINK_RESTORED,), None),
    _Row(S, (SMPL, *REPL, PSUS, PSUE, PFUS, SSWS), (K.LINK_RESTORED,), None),
    # -- facts: journal levels (async only; accepted in every state) --
    _Row(BOTH, (PAIR, PFUL), (K.JOURNAL_HIGH,), PFUL, modes=ASYNC),
    _Row(BOTH, (PAIR, PFUL), (K.JOURNAL_LOW,), PAIR, modes=ASYNC),
    _Row(BOTH, (COPY, *QUIET), (K.JOURNAL_HIGH, K.JOURNAL_LOW), None, modes=ASYNC),
    _Row(P, REPL, (K.JOURNAL_FULL,), PFUS, (JOURNAL_CAUSE, STOP_COPY, FOLD_JOURNAL), modes=ASYNC),
    _Row(S, REPL, (K.JOURNAL_FULL,), PFUS, (JOURNAL_CAUSE,), modes=ASYNC),
    _Row(BOTH, QUIET, (K.JOURNAL_FULL,), None, modes=ASYNC),
    # -- the peer took over: fence this (primary) side --
    _Row(P, (*REPL, PSUS, PSUE, PFUS), (K.PEER_TOOK_OVER,), PSUE,
         (STOP_COPY, FOLD_JOURNAL, FENCED_BY_PEER), (NEWER_EPOCH,)),
    # -- engine reports --
    _Row(BOTH, (COPY,), (K.COPY_PROGRESS,), None, (RECORD_PROGRESS,)),
    _Row(P, (COPY,), (K.COPY_DONE,), PAIR, (COMPLETE_PROGRESS,)),
    _Row(S, (COPY,), (K.COPY_DONE,), PAIR, (COMPLETE_PROGRESS, MARK_CONSISTENT)),
    _Row(P, (PAIR, PFUL), (K.DRAINED,), PSUS, (), (DRAINING,), modes=ASYNC),
    # -- commands --
    _Row(P, (SMPL,), (K.CREATE,), COPY, (START_FULL_COPY,), (LINK_UP,)),
    _Row(S, (SMPL,), (K.CREATE,), COPY, (ADOPT,), (LINK_UP,)),
    _Row(P, (PAIR,), (K.SPLIT,), PSUS, modes=SYNC),
    _Row(P, (PAIR, PFUL), (K.SPLIT,), None, (BEGIN_DRAIN,), (NOT_DRAINING,), modes=ASYNC),
    _Row(P, (PSUE,), (K.SPLIT,), PSUS, (), (NOT_STALE,)),
    _Row(S, (PAIR, PFUL), (K.SPLIT,), PSUS, (NEW_PVID,)),
    _Row(P, (PSUS, PFUS), (K.RESYNC,), COPY, (START_DIFF_COPY,), (LINK_UP,)),
    _Row(P, (PSUE,), (K.RESYNC,), COPY, (START_DIFF_COPY,), (LINK_UP, NOT_STALE)),
    _Row(S, (PSUS, PSUE, PFUS), (K.RESYNC,), COPY, (ADOPT, DISCARD_RECEIVED), (LINK_UP,)),
    _Row(P, (PSUS, PSUE), (K.RESYNC_SWAP,), COPY,
         (SWAP_EPOCH, BECOME_SECONDARY, ADOPT), (LINK_UP,)),
    _Row(S, (PSUS, PSUE), (K.RESYNC_SWAP,), COPY,
         (SWAP_EPOCH, BECOME_PRIMARY, START_DIFF_COPY), (LINK_UP, CONSISTENT_TO_SWAP)),
    _Row(S, (SSWS,), (K.RESYNC_SWAP,), COPY,
         (SWAP_EPOCH, BECOME_PRIMARY, START_SWAP_COPY), (LINK_UP,)),
    _Row(S, (PAIR, PFUL), (K.TAKEOVER,), SSWS, (TAKE_OVER, PULL_TAKEN)),
    _Row(S, (COPY,), (K.TAKEOVER,), SSWS, (TAKE_OVER, PULL_TAKEN), (TAKEN_TO_TAKE_OVER,)),
    _Row(S, (PSUS,), (K.TAKEOVER,), SSWS, (TAKE_OVER,)),
    _Row(S, (PSUE, PFUS), (K.TAKEOVER,), SSWS, (TAKE_OVER,), (CONSISTENT_TO_TAKE_OVER,)),
    _Row(S, (*REPL, PSUS, PSUE, PFUS), (K.TAKEOVER_FORCE,), SSWS, (TAKE_OVER, FORCED_PULL)),
    _Row(P, (*REPL, PSUS, PFUS), (K.DELETE,), SMPL, (STOP_COPY, DROP_JOURNAL, DROP_BITMAPS)),
    _Row(P, (PSUE,), (K.DELETE,), SMPL, (NEW_PVID_IF_STALE, DROP_JOURNAL, DROP_BITMAPS)),
    _Row(S, (*REPL, PSUE, PFUS), (K.DELETE,), SMPL, (NEW_PVID, DROP_BITMAPS)),
    _Row(S, (PSUS,), (K.DELETE,), SMPL, (DROP_BITMAPS,)),
    _Row(S, (SSWS,), (K.DELETE,), SMPL, (DROP_BITMAPS,)),
)

# A secondary taken over before its copy was complete (``PairRecord.pulling``) has a table of
# its own: SSWS while it pulls what it lacks from the old primary, PSUE while that primary
# cannot be reached (the pull suspended by the link; the takeover stands, the side serves as
# SSWS: io_state).  The commands wait for the pull's end; only a forced delete gives up.
_PULLING_ROWS: Final[tuple[_Row, ...]] = (
    _Row(S, (SSWS,), (K.LINK_LOST,), PSUE, (LINK_CAUSE, STOP_PULL)),
    _Row(S, (PSUE,), (K.LINK_LOST,), None),
    _Row(S, (SSWS,), (K.LINK_RESTORED,), None, (RESUME_PULL,)),
    _Row(S, (PSUE,), (K.LINK_RESTORED,), SSWS, (RESUME_PULL,)),
    _Row(S, (SSWS, PSUE), (K.PEER_ERROR, K.DISK_ERROR), None, (NOTE_ERROR,)),
    _Row(S, (SSWS, PSUE), (K.JOURNAL_HIGH, K.JOURNAL_LOW, K.JOURNAL_FULL), None, modes=ASYNC),
    _Row(S, (SSWS, PSUE), (K.COPY_PROGRESS,), None, (RECORD_PROGRESS,)),
    _Row(S, (SSWS,), (K.COPY_DONE,), None, (COMPLETE_PROGRESS, MARK_CONSISTENT)),
    _Row(S, (PSUE,), (K.COPY_DONE,), SSWS, (COMPLETE_PROGRESS, MARK_CONSISTENT)),
    _Row(S, (SSWS, PSUE), (K.DELETE,), SMPL, (STOP_PULL, DROP_BITMAPS), (FORCED_DELETE,)),
)
# fmt: on

_Table = dict[tuple[Role, State, Kind], Transition]


def states_of(mode: Mode, role: Role) -> tuple[State, ...]:
    """The states a side in ``role`` can be in under ``mode``."""
    return tuple(
        s
        for s in State
        if (mode is Mode.ASYNC or s not in (State.PFUL, State.PFUS))
        and (role is Role.SECONDARY or s is not State.SSWS)
    )


def _expand(mode: Mode, rows: tuple[_Row, ...]) -> _Table:
    table: _Table = {}
    for row in rows:
        if mode not in row.modes:
            continue
        for role in row.roles:
            for state in row.states:
                if state not in states_of(mode, role):
                    continue
                for kind in row.kinds:
                    assert (role, state, kind) not in table, ("two rows for", role, state, kind)
                    target = state if row.target is None else row.target
                    steps = tuple(s for s in row.steps if s.applies(mode, state))
                    table[role, state, kind] = Transition(target, steps, row.guards)
    return table


#: mode → (role, state, event kind) → transition.
TRANSITIONS: Final[dict[Mode, _Table]] = {mode: _expand(mode, _ROWS) for mode in Mode}
#: The same for a record that is ``pulling`` (a secondary in SSWS or PSUE).
PULLING_TRANSITIONS: Final[dict[Mode, _Table]] = {
    mode: _expand(mode, _PULLING_ROWS) for mode in Mode
}


# Why an event is refused on a pulling side (PULLING_TRANSITIONS has no row).
_PULLING_WHY: Final[dict[Kind, str]] = {
    Kind.SPLIT: "taken over, and the pull from the old primary is not done; the swap back "
    "follows it",
    Kind.RESYNC: "taken over, and the pull from the old primary is not done; the swap back "
    "follows it",
    Kind.RESYNC_SWAP: "the forward copy from the old primary is still running (SPEC 4); swap "
    "when it is done",
    Kind.TAKEOVER: "already taken over",
    Kind.TAKEOVER_FORCE: "already taken over",
}

# Why an event is refused where the table has no row; the most specific key wins.
_WHY: Final[dict[tuple[Kind, State | None, Role | None], str]] = {
    (Kind.CREATE, None, None): "already paired",
    (Kind.SPLIT, State.COPY, None): "the secondary is not consistent until PAIR",
    (Kind.SPLIT, State.PSUS, None): "already split",
    (Kind.SPLIT, State.PSUE, Role.SECONDARY): (
        "a pair suspended by error is split from the primary; take over to use the secondary"
    ),
    (Kind.SPLIT, State.PFUS, None): "suspended by a journal overflow; resync or delete the pair",
    (Kind.SPLIT, State.SSWS, None): "the secondary was taken over; resync --swap or delete",
    (Kind.DRAINED, None, None): "no split drain is in progress",
    (Kind.RESYNC, State.COPY, None): "a copy is already running",
    (Kind.RESYNC, State.PAIR, None): "already paired",
    (Kind.RESYNC, State.PFUL, None): "already paired",
    (Kind.RESYNC, State.SSWS, None): (
        "the secondary was taken over; only resync --swap keeps its writes"
    ),
    (Kind.RESYNC_SWAP, State.COPY, None): "a copy is running; swap from PSUS, PSUE or SSWS",
    (Kind.RESYNC_SWAP, State.PAIR, None): "split first; swap from PSUS, PSUE or SSWS",
    (Kind.RESYNC_SWAP, State.PFUL, None): "split first; swap from PSUS, PSUE or SSWS",
    (Kind.RESYNC_SWAP, State.PFUS, None): "resync the overflow first; swap from PSUS or PSUE",
    (Kind.TAKEOVER, None, Role.PRIMARY): "takeover runs on the secondary; this is the primary",
    (Kind.TAKEOVER_FORCE, None, Role.PRIMARY): (
        "takeover runs on the secondary; this is the primary"
    ),
    (Kind.TAKEOVER, State.SSWS, None): "already taken over",
    (Kind.TAKEOVER_FORCE, State.SSWS, None): "already taken over",
    (Kind.COPY_PROGRESS, None, None): "no copy is running",
    (Kind.COPY_DONE, None, None): "no copy is running",
    (Kind.PEER_TOOK_OVER, None, Role.SECONDARY): "only a primary can be taken over by its peer",
}


def why_refused(mode: Mode, role: Role, state: State, kind: Kind, *, pulling: bool = False) -> str:
    """The reason printed when ``(role, state, kind)`` has no row in ``mode``'s table (the
    pulling table if ``pulling``)."""
    if kind in JOURNAL_FACTS and mode is Mode.SYNC:
        return "a sync pair has no journal"
    if pulling and kind in _PULLING_WHY:
        return _PULLING_WHY[kind]
    for key in ((kind, state, role), (kind, state, None), (kind, None, role), (kind, None, None)):
        if key in _WHY:
            return _WHY[key]
    if state is State.SMPL:
        return "not paired"
    return f"not allowed for the {role.label}"


def _refusal(r: PairRecord, kind: Kind, reason: str) -> IllegalState:
    return IllegalState(f"pair {r.name}: cannot {_VERB[kind]} in state {r.state} ({reason})")


def _settle(old: PairRecord, target: State, changes: dict[str, Any]) -> PairRecord:
    """Apply a move's changes plus the rules every move obeys, then validate once."""
    changes = dict(changes, state=target)
    if target not in _DRAIN_STATES:
        changes["draining"] = False
    if target not in SUSPENDED:
        changes["cause"] = Cause.NONE
    if target not in PULLING_STATES:
        changes["copy_incomplete"] = False
    if target is State.SMPL:
        changes.update(svol_consistent=False, copied_chunks=0, total_chunks=0)
    return replace(old, **changes)


# --------------------------------------------------------------------------------------------
# The machine


class PairMachine:
    """One side of one pair.  ``now`` is monotonic seconds, given to every entry point."""

    def __init__(
        self,
        record: PairRecord,
        now: float,
        *,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 5.0,
        link_up: bool = False,
    ) -> None:
        """``link_up``: the peer link is already connected (a new pair on a live connection);
        a machine restored from disk starts with it down and waits for LinkRestored."""
        if not (0 < heartbeat_interval < heartbeat_timeout and math.isfinite(heartbeat_timeout)):
            raise UsageError(
                f"heartbeat interval {heartbeat_interval}s must be positive and shorter than "
                f"the timeout {heartbeat_timeout}s"
            )
        self._record = record
        self._interval = heartbeat_interval
        self._timeout = heartbeat_timeout
        self._link_up = link_up
        self._heard_at = now
        self._pinged_at = now

    # -- what the adapter reads --

    @property
    def record(self) -> PairRecord:
        return self._record

    @property
    def state(self) -> State:
        return self._record.state

    @property
    def role(self) -> Role:
        return self._record.role

    @property
    def link_up(self) -> bool:
        return self._link_up

    @property
    def hidden(self) -> bool:
        return is_hidden(self._record.role, self._record.io_state)

    def write_decision(self) -> WriteDecision:
        return self._write(self._record, self._link_up)

    def read_decision(self) -> ReadDecision:
        r = self._record
        return read_decision(r.io_state, r.role, copy_incomplete=r.copy_incomplete)

    # -- inputs --

    def handle(self, event: Event, now: float) -> list[Action]:
        """Feed one event; returns the actions to carry out, in order.  An illegal event raises
        IllegalState and changes nothing."""
        if isinstance(event, Ping):
            if self._link_up:
                self._heard_at = now
            return [SendPong()]
        if isinstance(event, Pong):
            if self._link_up:
                self._heard_at = now
            return []
        return self._fire(event, now)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` wants to be called next, or None."""
        if self._heartbeat_active():
            return min(self._heard_at + self._timeout, self._pinged_at + self._interval)
        if self._awaiting_peer():
            return self._heard_at + self._timeout
        return None

    def pinged(self, now: float) -> None:
        """A heartbeat went to the peer on this pair's behalf (one Ping per peer link serves
        every pair on it): the next SendPing is due an interval from now."""
        self._pinged_at = max(self._pinged_at, now)

    def handle_timer(self, now: float) -> list[Action]:
        if (self._heartbeat_active() or self._awaiting_peer()) and (
            now >= self._heard_at + self._timeout
        ):
            return self._fire(
                LinkLost(f"peer not heard from for {self._timeout:g}s (heartbeat timeout)"), now
            )
        if self._heartbeat_active() and now >= self._pinged_at + self._interval:
            self._pinged_at = now
            return [SendPing()]
        return []

    # -- internals --

    def _heartbeat_active(self) -> bool:
        return self._link_up and self._record.state is not State.SMPL

    def _awaiting_peer(self) -> bool:
        # Restored from disk while pulling: an old primary not back in time suspends the pull.
        r = self._record
        return not self._link_up and (
            r.state in REPLICATING or (r.state is State.SSWS and r.pulling)
        )

    def _fire(self, event: TableEvent, now: float) -> list[Action]:
        old = self._record
        kind = event.kind
        table = PULLING_TRANSITIONS if old.pulling else TRANSITIONS
        transition = table[old.mode].get((old.role, old.state, kind))
        if transition is None:
            why = why_refused(old.mode, old.role, old.state, kind, pulling=old.pulling)
            raise _refusal(old, kind, why)
        link_up = {Kind.LINK_LOST: False, Kind.LINK_RESTORED: True}.get(kind, self._link_up)
        ctx = _Ctx(old, event, link_up, self._link_up)
        for guard in transition.guards:
            if not guard.test(ctx):
                raise _refusal(old, kind, guard.reason)
        for step in transition.steps:
            step.run(ctx)
        new = _settle(old, transition.target, ctx.changes)
        actions = _derive(old, new, ctx, self._write(old, self._link_up), self._write(new, link_up))

        was_active = self._heartbeat_active()
        self._record = new
        self._link_up = link_up
        if (kind is Kind.LINK_RESTORED and not ctx.was_link_up) or (
            self._heartbeat_active() and not was_active
        ):
            self._heard_at = self._pinged_at = now
        if ctx.chain is not None:
            # Only AUTO_RESYNC chains, after a move that changed nothing durable: the chained
            # move's PersistState leads the combined list, as it leads every move.
            assert not any(isinstance(a, PersistState) for a in actions)
            chained = self._fire(ctx.chain, now)
            actions = chained[:1] + actions + chained[1:]
        return actions

    @staticmethod
    def _write(r: PairRecord, link_up: bool) -> WriteDecision:
        return write_decision(
            r.io_state, r.role, r.mode, r.fence, link_up, draining=r.draining, stale=r.stale
        )


def _derive(
    old: PairRecord,
    new: PairRecord,
    ctx: _Ctx,
    old_write: WriteDecision,
    new_write: WriteDecision,
) -> list[Action]:
    """Wrap a move's own actions in the ones every move needs (see the module docstring)."""
    tell_peer = (old.state, old.role, old.epoch) != (new.state, new.role, new.epoch)
    hide_before, hide_after = is_hidden(old.role, old.io_state), is_hidden(new.role, new.io_state)
    # A new PVID goes on the volume before the record that may reveal it (AssignNewPvid).
    early = [a for a in ctx.out if isinstance(a, AssignNewPvid)]
    actions: list[Action] = list(early)
    if new != old or tell_peer or any(a.to_peer for a in ctx.out):
        actions.append(PersistState(new))
    if hide_after and not hide_before:
        actions.append(SetHidden(True))
    actions += [a for a in ctx.out if not isinstance(a, AssignNewPvid)]
    if hide_before and not hide_after:
        actions.append(SetHidden(False))
    if tell_peer:
        actions.append(SendPairState(new.state, new.role, new.epoch))
    base = _event_fields(new, {})
    if new.state is not old.state or new.role is not old.role:
        extra: tuple[tuple[str, FieldValue], ...] = (
            ("state", str(new.state)),
            ("previous", str(old.state)),
            ("role", new.role.label),
            ("epoch", new.epoch),
            ("cause", str(ctx.event.kind)),
        )
        if new.state in SUSPENDED:
            extra += (("suspended_by", str(new.cause)),)
        actions.append(EmitEvent("pair.state", base + extra))
    if ctx.link_up != ctx.was_link_up:
        reason = ctx.event.reason if isinstance(ctx.event, LinkLost) else ""
        actions.append(EmitEvent("pair.link", (*base, ("up", ctx.link_up), ("reason", reason))))
    if new_write is not old_write:
        why = _WRITE_WHY[new_write]
        fields_ = (*base, ("decision", str(new_write)), ("errno", new_write.errno), ("why", why))
        actions.append(EmitEvent("pair.writes", fields_))
    if old.draining and not new.draining and new.state is not State.PSUS:
        actions.append(EmitEvent("pair.split.aborted", (*base, ("state", str(new.state)))))
    return actions


_WRITE_WHY: Final = {
    WriteDecision.LOCAL: "not paired",
    WriteDecision.MIRROR: "sync replication: acknowledged after both sides",
    WriteDecision.JOURNAL: "async replication: acknowledged once journaled",
    WriteDecision.LOCAL_RECORD: "not replicating: changes recorded in the difference bitmap",
    WriteDecision.REFUSE_FENCED: (
        "writes refused: fence=data and the secondary cannot be updated (EIO)"
    ),
    WriteDecision.REFUSE_HIDDEN: "the secondary is hidden while paired (EPERM)",
    WriteDecision.REFUSE_STALE: "writes refused: the peer took over with a newer epoch (EIO)",
}
