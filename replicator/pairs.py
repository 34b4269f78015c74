"""The pair runtime: the adapter around :class:`~replicator.pair_state.PairMachine` in a node.

Theory of operation
-------------------
A storage node owns every volume in its directory, so one :class:`PairManager` in the node's
process holds one :class:`Side` per pair whose local half lives here.  A side is the pure
state machine plus what it needs to act: the volume (opened read-write), its persistent
difference and copy bitmaps (:class:`~replicator.bitmap_store.BitmapStore`), the activity log,
a client to the peer node, and the copy engine.  Nothing here decides *what* may happen; the
machine does (``docs/state-machines.md``).  This module carries out its actions.

Persistence.  Each side's record lives in ``DIR/.pairvol/pairs/GROUP.PAIR.json`` (atomic
replace), next to the volume name and peer address.  The machine asks for ``PersistState``
before anything that depends on it reaches disk or the peer.

Write path (client I/O, :class:`PairedHandle`).  Client requests pass an I/O gate (shared;
commands that need a quiescent point such as split, resync and delete close it) and ask the
machine for a :class:`~replicator.pair_state.WriteDecision`:

* ``MIRROR`` (sync, COPY or PAIR): mark the write's extents in the *activity log* (a persisted
  coarse bitmap; a new extent costs one ``fdatasync``), lock the chunks it touches, write
  locally, send it to the secondary and wait for the acknowledgement, then answer the client.
  A failure to reach the secondary suspends the pair (PSUE): with ``fence=never`` the chunks
  go into the difference bitmap and the client gets success; with ``fence=data`` the client
  gets EIO.  The chunk locks make a client write and the copy of the same chunk strictly
  ordered, so the copy can never carry older data over a newer write.
* ``LOCAL_RECORD`` (split, suspended, taken over): set the chunks' bits in the difference
  bitmap and make them durable *before* the write is issued, then write locally.
* ``REFUSE_*``: EPERM (hidden secondary) or EIO (fenced, stale) with one log line.

Activity log.  After a crash of the primary, a write may be on the primary and not on the
secondary although no difference bit says so.  The activity log (bitmap slot
:data:`AL_SLOT`, :data:`AL_EXTENT` per bit) covers every extent with writes in flight; extents
idle for :data:`AL_IDLE` seconds are cleared.  A side that starts with a non-empty log folds it
into its difference bitmap and, if it was replicating, suspends (PSUE) so that a resync (or
``--auto-resync``) copies exactly those extents.

Two-sided commands.  A command changes both sides.  The rule: the side that is or becomes the
*secondary* moves first, then the primary moves, fetches bitmaps and starts copying.  So a
resync first hides the secondary (its difference bitmap is then frozen), a split stops writes
at the primary (gate closed) while the secondary is told, and a swap demotes the old primary
before the new one copies.  Sides tell each other their state with ``PairState`` requests; the
receiver maps the announced state onto its own event (:meth:`Side.on_peer_state`).

Link.  A failed request, or the machine's heartbeat timeout, is ``LinkLost``.  While a side's
link is down the node's ticker pings the peer every second; a Pong is ``LinkRestored``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import xxhash

from replicator import falloc, faults, wire
from replicator import pair_state as ps
from replicator.atomic_file import write_atomic
from replicator.bitmap import Bitmap
from replicator.bitmap_store import BitmapStore
from replicator.errors import (
    AlreadyExists,
    ConnectionFailed,
    HeaderCorrupt,
    IllegalState,
    NotFound,
    PairvolError,
    ProtocolError,
    Timeout,
    UsageError,
    VolumeError,
)
from replicator.events import EventLog
from replicator.export import INFLIGHT, ExportHandle, get_ident, quiesce
from replicator.gate import ChunkLocks, Gate
from replicator.groups import (
    DEFAULT_HIGH_WATERMARK,
    DEFAULT_JOURNAL_SIZE,
    GroupPrimary,
    GroupSecondary,
    journal_path,
)
from replicator.header import PAIR_MAX, Role, check_name
from replicator.journal import EntryKind, Journal, JournalCorrupt
from replicator.peer_auth import PeerSecrets
from replicator.peer_link import PeerClient, PeerRefused, errno_of
from replicator.pvid import format_pvid
from replicator.volume import Volume

PAIRS_DIR = os.path.join(".pairvol", "pairs")
DOC_FORMAT = "pairvol.pair"
AL_SLOT = 2
AL_EXTENT = 4 << 20
AL_IDLE = 5.0
COPY_IO = 1 << 20  # largest single copy request
COPY_WORKERS = 4
PROGRESS_EVERY = 0.5
REQUEST_TIMEOUT = 15.0
PING_TIMEOUT = 2.0
ASYNC_LINK_TIMEOUT = 30.0  # an async pair's heartbeat timeout: the journal absorbs outages
VERIFY_BATCH = 256

Log = Callable[[str], None]


def _now() -> float:
    return time.monotonic()


def pair_id(group: str, pair: str) -> str:
    return f"{group}/{pair}"


def split_pair_id(text: str) -> tuple[str, str | None]:
    """``GROUP`` or ``GROUP/PAIR``, names checked."""
    group, _, pair = text.partition("/")
    check_name(group, what="group name")
    if pair:
        check_name(pair, what="pair name")
        return group, pair
    if text.endswith("/"):
        raise UsageError(f"{text!r}: the pair name after '/' is empty")
    return group, None


def parse_peer_address(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise UsageError(f"{text!r}: {port!r} is not a TCP port")
    return host.strip("[]"), number


def _segments(fd: int, pos: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(start, length, is_data) runs of the file between pos and end (SEEK_DATA/SEEK_HOLE)."""
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = end
        if data > pos:
            stop = min(data, end)
            yield pos, stop - pos, False
            pos = stop
        else:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            yield pos, hole - pos, True
            pos = hole


@dataclass
class PeerRef:
    node: str  # the peer's node name ("" until the handshake tells us)
    host: str
    port: int
    volume: str

    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def label(self) -> str:
        return f"{self.node or '?'}@{self.address()}"


@dataclass
class SideDoc:
    """What ``DIR/.pairvol/pairs/GROUP.PAIR.json`` holds."""

    record: ps.PairRecord
    volume: str
    peer: PeerRef
    last_copy_bytes: int = 0
    last_copy_seconds: float = 0.0
    created: float = field(default_factory=time.time)
    max_rate: int = 0  # copy bandwidth limit in bytes per second; 0: none
    stream: int = 0  # this pair's stream number in its group's journal (async)
    journal_size: int = 0  # async primary: the group journal's capacity when created
    high_watermark: float = 0.8
    #: The highest epoch the peer ever announced (a takeover takes max(ours, this) + 1).
    peer_epoch: int = 0
    #: Secondary: the primary's PVID, which the volume carries while hidden (0: not known).
    primary_pvid: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": DOC_FORMAT,
                "version": 1,
                "record": json.loads(self.record.to_json()),
                "volume": self.volume,
                "peer": {
                    "node": self.peer.node,
                    "host": self.peer.host,
                    "port": self.peer.port,
                    "volume": self.peer.volume,
                },
                "last_copy_bytes": self.last_copy_bytes,
                "last_copy_seconds": self.last_copy_seconds,
                "created": self.created,
                "max_rate": self.max_rate,
                "stream": self.stream,
                "journal_size": self.journal_size,
                "high_watermark": self.high_watermark,
                "peer_epoch": self.peer_epoch,
                "primary_pvid": self.primary_pvid,
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> SideDoc:
        try:
            doc = json.loads(text)
            if doc.get("format") != DOC_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            record = ps.PairRecord.from_json(json.dumps(doc["record"]))
            peer = doc["peer"]
            return cls(
                record,
                str(doc["volume"]),
                PeerRef(
                    str(peer["node"]), str(peer["host"]), int(peer["port"]), str(peer["volume"])
                ),
                int(doc["last_copy_bytes"]),
                float(doc["last_copy_seconds"]),
                float(doc["created"]),
                int(doc.get("max_rate", 0)),
                int(doc.get("stream", 0)),
                int(doc.get("journal_size", 0)),
                float(doc.get("high_watermark", 0.8)),
                int(doc.get("peer_epoch", 0)),
                int(doc.get("primary_pvid", 0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HeaderCorrupt(f"pair file is damaged: {e}") from e


class CopyEngine:
    """Pushes the set chunks of a side's copy bitmap to the secondary, pipelined."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"copy {side.id}", daemon=True)
        self.sent_bytes = 0
        self.started = _now()
        self.total = 0
        self.copied = 0
        self.budget = 0
        self.budget_lock = threading.Lock()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_flag.set()

    def _runs(self) -> Iterator[tuple[int, int]]:
        """(first chunk, count) pieces of at most COPY_IO bytes, from the copy bitmap."""
        side = self.side
        per = max(1, COPY_IO // side.chunk_size)
        with side.bitmap_lock:
            runs = list(side.copy_map.runs())
        for first, count in runs:
            while count > 0:
                n = min(count, per)
                yield first, n
                first += n
                count -= n

    def _copy_run(self, first: int, count: int) -> int:
        side = self.side
        cs = side.chunk_size
        start = first * cs
        end = min((first + count) * cs, side.data_size)
        sent = 0
        if side.doc.max_rate > 0:  # wait for the bandwidth budget before holding any chunk
            fd, base = side.volume.fd, side.data_offset
            data_bytes = sum(n for _, n, d in _segments(fd, base + start, base + end) if d)
            self._throttle(data_bytes)
        with side.chunk_locks.hold(first, first + count - 1):
            fd, base = side.volume.fd, side.data_offset
            for pos, length, is_data in list(_segments(fd, base + start, base + end)):
                offset = pos - base
                if is_data:
                    data = os.pread(fd, length, pos)
                    if len(data) != length:
                        raise VolumeError(f"short read at {offset} during copy", errno.EIO)
                    side.request(wire.Write(side.id, offset, data))
                    sent += length
                else:
                    side.request(wire.Zero(side.id, offset, length, may_trim=True))
            with side.bitmap_lock:
                side.copy_map.clear_range(first, count)
        return sent

    def _throttle(self, nbytes: int) -> None:
        """Hold the copy to ``max_rate`` bytes of data per second (holes travel as Zero
        requests and cost nothing).  Called by each worker before it sends data."""
        rate = self.side.doc.max_rate
        if rate <= 0:
            return
        with self.budget_lock:
            self.budget += nbytes
            ahead = self.budget / rate - (_now() - self.started)
        if ahead > 0:
            self.stop_flag.wait(ahead)

    def _run(self) -> None:
        side = self.side
        try:
            with side.bitmap_lock:
                self.total = side.copy_map.count()
                last_report = _now()
            with ThreadPoolExecutor(COPY_WORKERS, thread_name_prefix=f"copy {side.id}") as pool:
                pending: list[tuple[Future[int], int]] = []
                for first, count in self._runs():
                    if self.stop_flag.is_set():
                        break
                    pending.append((pool.submit(self._copy_run, first, count), count))
                    while len(pending) >= COPY_WORKERS * 2 or (pending and pending[0][0].done()):
                        fut, n = pending.pop(0)
                        self.sent_bytes += fut.result()
                        self.copied += n
                    if _now() - last_report > PROGRESS_EVERY:
                        last_report = _now()
                        side.copy_progress(self.copied, self.total, self.sent_bytes, self.started)
                for fut, n in pending:
                    self.sent_bytes += fut.result()
                    self.copied += n
            if self.stop_flag.is_set():
                side.flush_copy_map()
                return
            side.request(wire.Flush(side.id))
            side.copy_finished(self.copied, self.total, self.sent_bytes, self.started)
        except (PairvolError, OSError) as e:
            with contextlib.suppress(PairvolError, OSError):
                side.flush_copy_map()
            if not self.stop_flag.is_set():
                side.link_failed(f"copy failed: {e}")
        except Exception as e:  # pragma: no cover - a bug; never leave the pair hanging
            side.log(f"pair {side.id}: copy engine crashed: {e!r}")
            side.link_failed(f"copy engine crashed: {e!r}")


class Side:
    """The local half of one pair."""

    def __init__(self, manager: PairManager, doc: SideDoc, *, link_up: bool) -> None:
        self.manager = manager
        self.doc = doc
        self.id = doc.record.name
        self.log = manager.log
        self.machine = ps.PairMachine(
            doc.record,
            _now(),
            heartbeat_interval=manager.heartbeat_interval,
            heartbeat_timeout=(
                manager.async_link_timeout
                if doc.record.mode is ps.Mode.ASYNC
                else manager.heartbeat_timeout
            ),
            link_up=link_up,
        )
        self.state_lock = threading.RLock()
        self.restore_lock = threading.Lock()
        self.bitmap_lock = threading.Lock()
        self.gate = Gate()
        self.chunk_locks = ChunkLocks()
        self.volume = Volume.open(manager.volume_path(doc.volume), writable=True)
        if self.volume.repair_note is not None:
            self.log(f"pair {self.id}: {self.volume.path}: {self.volume.repair_note}")
        h = self.volume.header
        self.data_size = h.data_size
        self.data_offset = h.data_offset
        self.chunk_size = doc.record.chunk_size
        self.store = BitmapStore(self.volume.fd, h)
        r = doc.record
        self.diff_map = self.store.load(r.diff_slot, self.chunk_size)
        self.copy_map = self.store.load(r.copy_slot, self.chunk_size)
        self.al = self.store.load(AL_SLOT, AL_EXTENT)
        self.al_inflight: dict[int, int] = {}
        self.al_used: dict[int, float] = {}
        self.al_lock = threading.Lock()
        self.engine: CopyEngine | None = None
        self.peer_pvid: int | None = None
        self.fetched: Bitmap | None = None
        self.client: PeerClient | None = None
        self.progress_bytes = 0
        self.copy_started: float | None = None
        self.last_ping = 0.0
        self.deleted = False
        # A local pair (both volumes on this node): the other side, reached in-process.
        self.partner: Side | None = None
        self.link_trouble_logged = -1e9
        self.copy_kind: ps.CopyKind | None = None
        self.drain_cut: int | None = None
        #: Why the volume is damaged (a truncated image): then nobody is served.
        self.damaged: str | None = None

    # -- small helpers ------------------------------------------------------------------------

    @property
    def record(self) -> ps.PairRecord:
        return self.machine.record

    @property
    def local(self) -> bool:
        return self.manager.is_self(self.doc.peer.host, self.doc.peer.port)

    @property
    def key(self) -> str:
        """Where the manager files this side: the pair id, plus the volume for a local pair
        (whose two sides share the id)."""
        return f"{self.id}@{self.doc.volume}" if self.local else self.id

    @property
    def events(self) -> EventLog:
        return self.manager.events

    def peer_client(self) -> PeerClient:
        if self.client is None:
            p = self.doc.peer
            self.client = self.manager.client_for(p.host, p.port, p.node)
        return self.client

    def request(self, msg: wire.Message, timeout: float = REQUEST_TIMEOUT) -> wire.Message:
        if self.partner is not None:
            return self.manager.deliver_local(self.partner, msg)
        reply = self.peer_client().request(msg, timeout=timeout)
        if isinstance(reply, wire.Ack) and reply.status:
            raise PeerRefused(reply.status, reply.message)
        if isinstance(reply, wire.Error):
            raise PeerRefused(reply.code, reply.message)
        return reply

    def save(self) -> None:
        self.doc.record = self.machine.record
        if self.deleted:
            return
        write_atomic(self.manager.doc_path(self.key), self.doc.to_json().encode())

    def pvid_changed(self) -> None:
        """Open connections check the PVID they were opened for again."""
        self.manager.rebind(self.volume.path, self)

    def check_image(self) -> bool:
        """The image file still holds the whole data area its header describes.  A truncated
        image is damage: the pair suspends (DiskError) and the volume is served to nobody.
        Mirrored writes would otherwise extend the file again and hide the loss."""
        if self.damaged is not None:
            return False
        size = os.fstat(self.volume.fd).st_size
        need = self.data_offset + self.data_size
        if size >= need:
            return True
        self.damaged = f"the image {self.volume.path} is {size} bytes, its header needs {need}"
        self.log(f"pair {self.id}: {self.damaged}: suspending and serving it to nobody")
        self.events.emit("pair.damaged", pair=self.id, reason=self.damaged)
        self.manager.rebind(self.volume.path, self)
        try:
            self.fire(ps.DiskError(self.damaged[: wire.TEXT_MAX]), tell_peer=True)
        except IllegalState as e:
            self.log(f"pair {self.id}: {e}")
        return False

    def flush_copy_map(self) -> None:
        with self.bitmap_lock:
            self.store.flush(self.record.copy_slot, self.copy_map)

    def my_state(self) -> wire.PairState:
        r = self.record
        return wire.PairState(self.id, str(r.state), r.role.label, self.volume.header.pvid, r.epoch)

    # -- firing events and carrying out actions ------------------------------------------------

    def fire(self, event: ps.Event, *, tell_peer: bool = True) -> None:
        """Feed one event; carry out its actions.  Peer notifications go out after the state
        lock is released (the peer may call back); ``tell_peer=False`` when the caller has
        already told the peer."""
        with self.state_lock:
            actions = self.machine.handle(event, _now())
            later = self._carry_out(actions)
        self._after(later, tell_peer)

    def _after(self, later: list[ps.Action], tell_peer: bool) -> None:
        for a in later:
            if isinstance(a, ps.SendPairState):
                if tell_peer:
                    self.notify_peer()
            elif isinstance(a, ps.StartCopy):
                self._start_engine()
            elif isinstance(a, ps.StartDrain):
                self.drain_cut = self.manager.primary_group(self).start_drain()

    def notify_peer(self) -> None:
        """Tell the peer our state and take in its answer (best effort: a failure is a lost
        link).  The answer matters: at a reconnect after a takeover, it is how the old
        primary learns it must fence itself."""
        try:
            reply = self.request(self.my_state(), timeout=REQUEST_TIMEOUT)
        except (ConnectionFailed, Timeout) as e:
            self.link_failed(f"cannot tell the peer our state: {e}")
            return
        except PeerRefused as e:
            self.log(f"pair {self.id}: the peer refused our state: {e}")
            return
        try:
            self.on_peer_reply(reply)
        except IllegalState as e:
            self.log(f"pair {self.id}: the peer's answer was refused: {e}")

    def _carry_out(self, actions: list[ps.Action]) -> list[ps.Action]:
        later: list[ps.Action] = []
        for a in actions:
            if isinstance(a, ps.PersistState):
                self.doc.record = a.record
                if not self.deleted:
                    faults.step(f"record {a.record.state}")
                    write_atomic(self.manager.doc_path(self.key), self.doc.to_json().encode())
                self._label_volume(a.record)
            elif isinstance(a, ps.SendPairState):
                later.append(a)
            elif isinstance(a, ps.StartCopy):
                self._prepare_copy(a)
                later.append(a)
            elif isinstance(a, ps.StopCopy):
                if self.engine is not None:
                    self.engine.stop()
            elif isinstance(a, ps.FetchPeerBitmap):
                self._fetch_bitmap(a.which)
            elif isinstance(a, ps.AssignNewPvid):
                faults.step("new pvid")
                h = self.volume.set_pvid(None)
                self.log(f"pair {self.id}: volume {self.doc.volume} has new PVID {h.pvid_hex}")
                self.pvid_changed()
            elif isinstance(a, ps.AdoptPrimaryPvid):
                if self.peer_pvid is not None:
                    self.doc.primary_pvid = self.peer_pvid
                    self.save()
                    if self.peer_pvid != self.volume.header.pvid:
                        faults.step("adopt pvid")
                        self.volume.set_pvid(self.peer_pvid)
                        self.pvid_changed()
                else:
                    self.log(f"pair {self.id}: the primary's PVID is not known yet")
            elif isinstance(a, ps.DiscardReceived):
                self.manager.secondary_group(self).discard_unapplied(self)
            elif isinstance(a, ps.SwapRoles):
                faults.step("swap role")
                self.volume.update_info(role=a.role)
            elif isinstance(a, ps.SetHidden):
                what = "hidden from clients" if a.hidden else "visible to clients"
                self.log(f"pair {self.id}: volume {self.doc.volume} is {what}")
            elif isinstance(a, ps.EmitEvent):
                self.events.emit(a.name, **a.as_dict())
                if a.name == "pair.writes":
                    self.log(f"pair {self.id}: {a.as_dict().get('why')}")
            elif isinstance(a, ps.DropBitmaps):
                faults.step("drop bitmaps")
                with self.bitmap_lock:
                    for slot in (self.record.diff_slot, self.record.copy_slot, AL_SLOT):
                        self.store.clear(slot)
                self.diff_map = Bitmap(self.data_size, self.chunk_size)
                self.copy_map = Bitmap(self.data_size, self.chunk_size)
            elif isinstance(a, ps.SendPing | ps.SendPong):
                pass  # heartbeats are sent by the manager's ticker
            elif isinstance(a, ps.StartDrain):
                later.append(a)
            elif isinstance(a, ps.FoldJournal):
                self.manager.primary_group(self).fold()
            elif isinstance(a, ps.DropJournal):
                self.manager.drop_journal(self)
        return later

    def _label_volume(self, r: ps.PairRecord) -> None:
        """Keep the VOL information's role and pair id true (``volume info`` shows them)."""
        role, pair = (Role.SIMPLEX, "") if r.state is ps.State.SMPL else (r.role, r.name)
        pair = pair.encode()[:PAIR_MAX].decode(errors="ignore")  # the header holds 63 bytes
        h = self.volume.header
        if (h.role, h.pair) != (role, pair):
            faults.step("vol info")
            self.volume.update_info(role=role, pair=pair)

    def _fetch_bitmap(self, which: ps.BitmapRef) -> None:
        kind = "pending" if which is ps.BitmapRef.PEER_PENDING else "diff"
        reply = self.request(wire.BitmapRequest(self.id, kind))
        if not isinstance(reply, wire.Bitmap) or not reply.last or reply.offset:
            raise IllegalState(f"pair {self.id}: the peer answered a bitmap request oddly")
        if (reply.data_size, reply.chunk_size) != (self.data_size, self.chunk_size):
            raise IllegalState(f"pair {self.id}: the peer's bitmap has another geometry")
        self.fetched = Bitmap.from_bytes(self.data_size, self.chunk_size, bytes(reply.bits))

    def _prepare_copy(self, a: ps.StartCopy) -> None:
        r = self.record
        with self.bitmap_lock:
            if a.kind is ps.CopyKind.FULL:
                self.copy_map.set_range(0, self.copy_map.nchunks)
            elif a.kind is ps.CopyKind.DIFFERENTIAL:
                self.copy_map |= self.diff_map
                if ps.BitmapRef.PEER_DIFF in a.bitmaps and self.fetched is not None:
                    self.copy_map |= self.fetched
                self.fetched = None
            elif a.kind is ps.CopyKind.PULL:
                self.log(f"pair {self.id}: pulling from the old primary is not supported yet")
                return
            # Copy bitmap durable first, then the difference bitmap may forget.
            faults.step("copy bitmap")
            self.store.save_all(r.copy_slot, self.copy_map)
            self.copy_map.take_dirty_pages()
            if a.kind is ps.CopyKind.DIFFERENTIAL:
                self.diff_map = Bitmap(self.data_size, self.chunk_size)
                self.store.clear(r.diff_slot)
        self.copy_kind = a.kind

    def _start_engine(self) -> None:
        if self.record.role is not Role.PRIMARY or self.record.state is not ps.State.COPY:
            return
        if self.engine is not None and self.engine.thread.is_alive():
            self.engine.stop()
            self.engine.thread.join(timeout=REQUEST_TIMEOUT + 5)
        self.engine = CopyEngine(self)
        self.copy_started = time.time()
        self.engine.start()

    # -- engine callbacks ----------------------------------------------------------------------

    def copy_progress(self, copied: int, total: int, sent: int, started: float) -> None:
        self.progress_bytes = sent
        self.flush_copy_map()
        with contextlib.suppress(IllegalState):
            self.fire(ps.CopyProgress(copied, total))

    def copy_finished(self, copied: int, total: int, sent: int, started: float) -> None:
        self.flush_copy_map()
        self.doc.last_copy_bytes = sent
        self.doc.last_copy_seconds = round(_now() - started, 3)
        self.progress_bytes = sent
        self.events.emit(
            "pair.copy.done",
            pair=self.id,
            chunks=total,
            bytes_sent=sent,
            seconds=self.doc.last_copy_seconds,
        )
        if self.is_async:
            # The secondary is consistent once it has applied what was journaled meanwhile.
            group = self.manager.primary_group(self)
            if not group.wait_applied(group.journal.last_seq, REQUEST_TIMEOUT * 4):
                self.link_failed("the secondary did not apply the journal after the copy")
                return
        with contextlib.suppress(IllegalState):
            self.fire(ps.CopyProgress(copied, total))
            self.fire(ps.CopyDone())

    def suspend_for_disk(self, reason: str) -> None:
        """The pair's data on this node cannot be vouched for (a damaged journal): PSUE."""
        try:
            self.fire(ps.DiskError(reason[: wire.TEXT_MAX]), tell_peer=False)
        except IllegalState as e:
            self.log(f"pair {self.id}: {e}")

    def peer_failed(self, reason: str) -> None:
        """The peer answered but refused what it must take: suspend (PSUE, cause peer)."""
        if self.deleted:
            return
        self.log(f"pair {self.id}: {reason}")
        try:
            self.fire(ps.PeerError(reason[: wire.TEXT_MAX]), tell_peer=False)
        except IllegalState as e:
            self.log(f"pair {self.id}: {e}")

    def link_failed(self, reason: str) -> None:
        if self.deleted:
            return
        if self.is_async and self.record.state in (ps.State.PAIR, ps.State.PFUL):
            # An async pair rides out link trouble on its journal (PFUL, then PFUS when it
            # fills); its heartbeat timeout, not one failed request, declares the link lost.
            now = _now()
            if now - self.link_trouble_logged >= 10:
                self.link_trouble_logged = now
                self.log(
                    f"pair {self.id}: cannot reach {self.doc.peer.label()} ({reason}); "
                    "writes are journaled, PSUE if the peer is not back within "
                    f"{self.manager.async_link_timeout:g}s"
                )
            return
        self.log(f"pair {self.id}: link to {self.doc.peer.label()} lost: {reason}")
        with contextlib.suppress(IllegalState):
            self.fire(ps.LinkLost(reason[: wire.TEXT_MAX]), tell_peer=False)

    # -- the peer's messages -------------------------------------------------------------------

    def learn_peer(self, msg: wire.PairState) -> None:
        """What every PairState from the peer (request or reply) teaches us: its PVID and its
        epoch, kept durably (a takeover must outbid the highest epoch the peer ever had).  A
        hidden secondary always carries its primary's PVID: a crash between a PVID change
        and the record that explains it is repaired here (docs/decisions.md, "Crash
        ordering")."""
        self.peer_pvid = msg.pvid
        changed = False
        if msg.epoch > self.doc.peer_epoch:
            self.doc.peer_epoch = msg.epoch
            changed = True
        r = self.record
        if msg.role == "primary" and r.role is Role.SECONDARY and self.doc.primary_pvid != msg.pvid:
            self.doc.primary_pvid = msg.pvid
            changed = True
        if changed and not self.deleted:
            self.save()
        self.reconcile_pvid()

    def reconcile_pvid(self) -> None:
        """A hidden secondary whose PVID is not its primary's (a crash after a new PVID but
        before the record) takes the primary's again; nobody can see it meanwhile."""
        want = self.doc.primary_pvid
        with self.state_lock:
            if not (want and self.machine.hidden and self.record.role is Role.SECONDARY):
                return
            h = self.volume.header
            if h.pvid != want:
                faults.step("reconcile pvid")
                self.volume.set_pvid(want)
                self.pvid_changed()
                self.log(
                    f"pair {self.id}: hidden secondary {self.doc.volume} carried PVID "
                    f"{h.pvid_hex}, not its primary's; it carries {format_pvid(want)} again"
                )

    def peer_event(self, msg: wire.PairState) -> ps.Event | None:
        """The event the peer's announced state means for us (docs/protocol.md, "Pair
        control").  Rule one, before any other: a primary that hears of a newer epoch from a
        side that took over or became primary is fenced at once."""
        r = self.record
        st, role = ps.State(msg.state), msg.role
        claims = st is ps.State.SSWS or role == "primary"
        if r.role is Role.PRIMARY and claims and msg.epoch > r.epoch:
            if role == "primary" and st is ps.State.COPY and r.state in ps.SWAPPABLE_PRIMARY:
                # The peer is becoming the primary by a swap: we become its secondary.
                return ps.Resync(swap=True, epoch=msg.epoch)
            if r.state is ps.State.SMPL:
                return None
            return ps.PeerTookOver(msg.epoch)
        if st is ps.State.SMPL:
            return ps.Delete()
        if role == "primary" and r.role is Role.SECONDARY:
            if st is ps.State.PSUS and r.state is ps.State.PAIR:
                return ps.Split()
            if st is ps.State.COPY and r.state in (ps.State.PSUS, ps.State.PSUE, ps.State.PFUS):
                return ps.Resync()
            if st is ps.State.PAIR and r.state is ps.State.COPY:
                return ps.CopyDone()
            if st is ps.State.PSUE and r.state in ps.REPLICATING:
                return ps.PeerError("the primary suspended the pair")
        elif role == "secondary" and r.role is Role.SECONDARY and msg.epoch > r.epoch:
            # Rule two: the peer demoted itself by a swap (a newer epoch, and both of us
            # secondaries): finish the swap, we become primary and copy to it.
            return ps.Resync(swap=True, epoch=msg.epoch)
        return None

    def on_peer_state(self, msg: wire.PairState) -> wire.PairState:
        """The peer announces its state: map it onto our own event (see the module docstring)."""
        if not self.machine.link_up:  # we just heard from the peer
            self.manager.restore_link(self, notify=False)
        self.learn_peer(msg)
        r = self.record
        st = ps.State(msg.state)
        event = self.peer_event(msg)
        if msg.role == "primary" and r.role is Role.SECONDARY and event is None:
            if st is ps.State.COPY and r.state is ps.State.PAIR:
                # The primary suspended and is resyncing before we noticed the link go.
                self.fire(ps.LinkLost("the primary restarted the copy"), tell_peer=False)
                self.fire(ps.LinkRestored(), tell_peer=False)  # it is talking to us now
                event = ps.Resync()
            elif st is ps.State.PAIR and r.state is ps.State.PSUE:
                # The primary never suspended (it restarted, or the link blipped) and kept
                # replicating: nothing is missing here, so rejoin without a copy.
                self.fire(ps.Resync(), tell_peer=False)
                event = ps.CopyDone()
        if event is not None:
            self.fire(event, tell_peer=False)
            if isinstance(event, ps.Delete):
                self.manager.forget(self)
            elif isinstance(event, ps.CopyDone):
                with self.bitmap_lock:  # consistent again: nothing of ours differs any more
                    self.diff_map = Bitmap(self.data_size, self.chunk_size)
                    self.store.clear(self.record.diff_slot)
        return self.my_state()

    def on_peer_reply(self, reply: wire.Message) -> None:
        """The peer's state in answer to ours: learn from it, and obey the epoch rules (one:
        fence on a newer epoch; two: finish a swap the peer began).  The other mappings are
        for announcements only: the peer has already acted on ours."""
        if not isinstance(reply, wire.PairState) or reply.pair_id != self.id:
            return
        self.learn_peer(reply)
        event = self.peer_event(reply)
        if isinstance(event, ps.PeerTookOver) or (isinstance(event, ps.Resync) and event.swap):
            self.log(
                f"pair {self.id}: the peer is {reply.state} as {reply.role} with epoch "
                f"{reply.epoch} > ours ({self.record.epoch}): "
                + (
                    "fencing this side"
                    if isinstance(event, ps.PeerTookOver)
                    else "finishing its swap"
                )
            )
            self.fire(event)

    def check_journal_marks(self, *, split: bool = False) -> None:
        """This secondary may take journal entries and acknowledge its marks: it replicates,
        or the link only blipped (PSUE by the link; it rejoins without a copy), or, for a
        status only, a split is being finished.  Suspended by its disk or its peer (a
        salvaged journal), its marks are not to be trusted: an acknowledgement would let the
        primary release entries nobody applied, so the primary is refused and folds them."""
        r = self.record
        ok = r.role is Role.SECONDARY and (
            r.state in ps.REPLICATING
            or (r.state is ps.State.PSUE and r.cause is ps.Cause.LINK)
            or (split and r.state is ps.State.PSUS)
        )
        if not ok:
            raise IllegalState(
                f"pair {self.id}: this side takes no journal entries ({r.role.label}, "
                f"{r.state}, cause {r.cause})"
            )

    def apply_write(self, msg: wire.Write | wire.Zero | wire.Flush) -> wire.Message:
        r = self.record
        if r.role is not Role.SECONDARY or r.state not in ps.REPLICATING | {ps.State.PSUE}:
            raise IllegalState(f"pair {self.id}: not a replicating secondary here ({r.state})")
        if isinstance(msg, wire.Flush):
            os.fdatasync(self.volume.fd)
            return wire.Ack()
        length = len(msg.data) if isinstance(msg, wire.Write) else msg.length
        if msg.offset + length > self.data_size:
            raise UsageError(f"pair {self.id}: write past the end of {self.doc.volume}")
        if not self.check_image():
            raise VolumeError(f"pair {self.id}: {self.damaged}", errno.EIO)
        if msg.seq:
            self.check_journal_marks()
            group = self.manager.secondary_group(self)
            return group.receive(self, msg)
        if isinstance(msg, wire.Write):
            self.apply_entry(EntryKind.WRITE, msg.offset, length, msg.data, msg.fua)
        else:
            kind = EntryKind.TRIM if msg.may_trim else EntryKind.ZERO
            self.apply_entry(kind, msg.offset, length, b"", msg.fua)
        return wire.Ack()

    def apply_entry(
        self, kind: EntryKind, offset: int, length: int, data: bytes | memoryview, fua: bool
    ) -> None:
        """Write one change to the local volume (shipped, copied, or redone from a journal)."""
        fd, base = self.volume.fd, self.data_offset
        if kind is EntryKind.WRITE:
            done = os.pwritev(fd, [data], base + offset, os.RWF_DSYNC if fua else 0)
            if done != len(data):
                raise VolumeError(f"short write on {self.doc.volume}", errno.ENOSPC)
            return
        punched = False
        if kind is EntryKind.TRIM:
            try:
                falloc.punch_hole(fd, base + offset, length)
                punched = True
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
        if not punched:
            falloc.zero_range(fd, base + offset, length)
        if fua:
            os.fdatasync(fd)

    # -- async groups ---------------------------------------------------------------------------

    @property
    def is_async(self) -> bool:
        return self.record.mode is ps.Mode.ASYNC

    @property
    def stream(self) -> int:
        return self.doc.stream

    def ships(self) -> bool:
        r = self.record
        return (
            r.role is Role.PRIMARY
            and r.state in ps.REPLICATING
            and self.machine.link_up
            and not self.deleted
        )

    def journals(self) -> bool:
        """Client writes of this side go to the group journal now (asked again under the
        group's fold gate, since the state may have changed since the write's decision)."""
        return self.machine.write_decision() is ps.WriteDecision.JOURNAL

    def journal_level(self, high: bool) -> None:
        state = self.record.state
        if (high and state is ps.State.PAIR) or (not high and state is ps.State.PFUL):
            with contextlib.suppress(IllegalState):
                self.fire(ps.JournalHigh() if high else ps.JournalLow())

    def journal_full(self) -> None:
        with contextlib.suppress(IllegalState):
            self.fire(ps.JournalFull())

    def mark_dirty(self, offset: int, length: int) -> None:
        self._mark_diff(offset, length)

    def digests(self, first: int, count: int) -> bytes:
        """XXH3-64 of chunks ``first .. first+count-1`` (the last chunk may be short)."""
        cs = self.chunk_size
        if count < 1 or first + count > self.diff_map.nchunks:
            raise UsageError(f"pair {self.id}: chunks {first}+{count} are outside the volume")
        out = bytearray()
        fd, base = self.volume.fd, self.data_offset
        for c in range(first, first + count):
            length = min(cs, self.data_size - c * cs)
            data = os.pread(fd, length, base + c * cs)
            if len(data) != length:
                raise VolumeError(f"short read of chunk {c} of {self.doc.volume}", errno.EIO)
            out += xxhash.xxh3_64_digest(data)[::-1]  # little-endian
        return bytes(out)

    def verify(self, repair: bool, batch: int = VERIFY_BATCH) -> dict[str, Any]:
        """Compare every chunk with the peer by digest (only digests cross the wire)."""
        r = self.record
        if r.role is not Role.PRIMARY:
            raise IllegalState(f"pair {self.id}: run verify on the primary's node")
        if r.state not in (ps.State.PAIR, ps.State.PSUS):
            raise IllegalState(f"pair {self.id}: verify needs PAIR or PSUS, not {r.state}")
        total = self.diff_map.nchunks
        mismatches: list[int] = []
        started = _now()
        for first in range(0, total, batch):
            count = min(batch, total - first)
            # Hold the chunks so no mirrored write lands between the two digests.
            with self.chunk_locks.hold(first, first + count - 1):
                if self.is_async and r.state is ps.State.PAIR:
                    # No entry for these chunks can be journaled while we hold them: once the
                    # secondary has applied what the journal holds now, it has them all.
                    group = self.manager.primary_group(self)
                    if not group.wait_applied(group.journal.last_seq, REQUEST_TIMEOUT * 4):
                        raise Timeout(f"pair {self.id}: the secondary lags too far to verify")
                mine = self.digests(first, count)
                reply = self.request(wire.DigestRequest(self.id, first, count))
            if not isinstance(reply, wire.Digests) or reply.first != first:
                raise IllegalState(f"pair {self.id}: the peer answered a digest request oddly")
            theirs = bytes(reply.digests)
            if len(theirs) != len(mine):
                raise IllegalState(f"pair {self.id}: the peer sent {len(theirs)} digest bytes")
            for i in range(count):
                if mine[8 * i : 8 * i + 8] != theirs[8 * i : 8 * i + 8]:
                    mismatches.append(first + i)
        if repair and mismatches:
            with self.bitmap_lock:
                for c in mismatches:
                    self.diff_map.set_chunk(c)
                self.store.flush(r.diff_slot, self.diff_map)
        result = {
            "pair": self.id,
            "state": str(r.state),
            "chunks": total,
            "chunk_size": self.chunk_size,
            "bytes_compared": self.data_size,
            "mismatch_count": len(mismatches),
            "mismatches": mismatches[:1000],
            "repaired": bool(repair and mismatches),
            "seconds": round(_now() - started, 3),
        }
        self.events.emit(
            "pair.verify", pair=self.id, mismatches=len(mismatches), repaired=result["repaired"]
        )
        if mismatches:
            self.log(f"pair {self.id}: verify found {len(mismatches)} differing chunks")
        return result

    def bitmap_for_peer(self, which: str) -> wire.Bitmap:
        with self.bitmap_lock:
            bm = self.copy_map if which == "pending" else self.diff_map
            bits = bm.to_bytes()
        return wire.Bitmap(self.id, which, self.chunk_size, self.data_size, 0, bits)

    # -- the client write path -----------------------------------------------------------------

    def _mark_diff(self, offset: int, length: int) -> None:
        with self.bitmap_lock:
            if self.diff_map.mark(offset, length):
                self.store.flush(self.record.diff_slot, self.diff_map)

    def _al_enter(self, offset: int, length: int) -> range:
        extents = range(offset // AL_EXTENT, (offset + max(length, 1) - 1) // AL_EXTENT + 1)
        with self.al_lock:
            fresh = False
            for e in extents:
                self.al_inflight[e] = self.al_inflight.get(e, 0) + 1
                if self.al.set_chunk(e):
                    fresh = True
            if fresh:
                self.store.flush(AL_SLOT, self.al)
        return extents

    def _al_leave(self, extents: range) -> None:
        now = _now()
        with self.al_lock:
            for e in extents:
                self.al_inflight[e] -= 1
                self.al_used[e] = now

    def al_expire(self, idle: float = AL_IDLE) -> None:
        now = _now()
        with self.al_lock:
            gone = [
                e
                for e, used in self.al_used.items()
                if not self.al_inflight.get(e) and now - used >= idle
            ]
            for e in gone:
                self.al.clear_chunk(e)
                del self.al_used[e]
                self.al_inflight.pop(e, None)
            if gone:
                self.store.flush(AL_SLOT, self.al)

    def fold_activity_log(self) -> bool:
        """At start-up: extents in the log may differ between the sides.  True if any."""
        if not self.al.count():
            return False
        per = AL_EXTENT // self.chunk_size
        with self.bitmap_lock:
            for e in self.al.iter_set():
                first = e * per
                count = min(per, self.diff_map.nchunks - first)
                if count > 0:
                    self.diff_map.set_range(first, count)
            self.store.flush(self.record.diff_slot, self.diff_map)
            self.al = Bitmap(self.data_size, AL_EXTENT)
            self.store.clear(AL_SLOT)
        return True

    def client_write(
        self,
        offset: int,
        length: int,
        local: Callable[[], None],
        remote: Callable[[], wire.Message],
    ) -> None:
        """One client write (pwrite, zero, trim): the policy, then the local and remote parts."""
        with self.gate.shared():
            if not self.check_image():
                raise VolumeError(f"pair {self.id}: {self.damaged}", errno.EIO)
            decision = self.machine.write_decision()
            if decision is ps.WriteDecision.LOCAL:
                local()
                return
            if decision is ps.WriteDecision.LOCAL_RECORD:
                self._mark_diff(offset, length)
                local()
                return
            if decision is ps.WriteDecision.JOURNAL:
                self._journal_write(offset, length, local, remote)
                return
            if decision is not ps.WriteDecision.MIRROR:
                self.manager.log_refusal(self, decision)
                raise VolumeError(f"pair {self.id}: {ps._WRITE_WHY[decision]}", decision.errno)
            cs = self.chunk_size
            extents = self._al_enter(offset, length)
            try:
                with self.chunk_locks.hold(offset // cs, (offset + max(length, 1) - 1) // cs):
                    local()
                    try:
                        self.request(remote())
                        return
                    except (ConnectionFailed, Timeout, PeerRefused) as e:
                        failure = e
                # The secondary did not take the write: suspend, then apply the fence policy.
                self._mark_diff(offset, length)
                self.link_failed(f"write to the secondary failed: {failure}")
                if self.record.fence is ps.Fence.DATA:
                    self.log(
                        f"pair {self.id}: fence=data: write at {offset} refused with EIO, "
                        "the secondary cannot be updated"
                    )
                    raise VolumeError(
                        f"pair {self.id}: fence=data and the secondary cannot be updated",
                        errno.EIO,
                    )
            finally:
                self._al_leave(extents)

    def _journal_write(
        self,
        offset: int,
        length: int,
        local: Callable[[], None],
        remote: Callable[[], wire.Message],
    ) -> None:
        """Async: journal first (durable, sequenced), then the volume.  The chunk locks order
        the write against a running copy of the same chunks."""
        msg = remote()
        assert isinstance(msg, wire.Write | wire.Zero)
        cs = self.chunk_size
        group = self.manager.primary_group(self)
        with self.chunk_locks.hold(offset // cs, (offset + max(length, 1) - 1) // cs):
            seq = group.record(self, msg)
            if seq is None:
                self._mark_diff(offset, length)  # journal full: the group is in PFUS now
            try:
                local()
            finally:
                if seq is not None:
                    group.written_locally(seq)

    def client_flush(self, local: Callable[[], None]) -> None:
        with self.gate.shared():
            local()
            if self.is_async and self.record.role is Role.PRIMARY:
                group = self.manager.primaries.get(self.record.group)
                if group is not None:
                    group.journal.sync()  # what the client wrote is now power-safe here
            if self.machine.write_decision() is ps.WriteDecision.MIRROR:
                try:
                    self.request(wire.Flush(self.id))
                except (ConnectionFailed, Timeout, PeerRefused) as e:
                    self.link_failed(f"flush on the secondary failed: {e}")
                    if self.record.fence is ps.Fence.DATA:
                        raise VolumeError(
                            f"pair {self.id}: fence=data and the secondary cannot be flushed",
                            errno.EIO,
                        ) from e

    def readable(self) -> bool:
        return self.machine.read_decision() is not ps.ReadDecision.REFUSE_HIDDEN

    # -- display -------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        r = self.record
        h = self.volume.header
        with self.bitmap_lock:
            dirty = self.diff_map.dirty_bytes()
            pending = self.copy_map.count()
        total = r.total_chunks
        percent: float | None
        if r.state is ps.State.COPY and total:
            percent = round(100.0 * r.copied_chunks / total, 1)
        elif r.state is ps.State.COPY:
            percent = 0.0
        else:
            percent = 100.0 if r.state in (ps.State.PAIR,) else None
        engine = self.engine
        rate = eta = None
        if engine is not None and engine.thread.is_alive() and r.state is ps.State.COPY:
            elapsed = max(_now() - engine.started, 1e-3)
            rate = round(engine.sent_bytes / elapsed)
            if engine.copied:
                eta = round(pending / (engine.copied / elapsed), 1)
        return {
            "group": r.group,
            "pair": r.pair,
            "id": self.id,
            "node": self.manager.node_name,
            "role": r.role.label,
            "volume": self.doc.volume,
            "pvid": h.pvid_hex,
            "peer": self.doc.peer.label(),
            "peer_node": self.doc.peer.node,
            "peer_volume": self.doc.peer.volume,
            "mode": str(r.mode),
            "fence": str(r.fence),
            "auto_resync": r.auto_resync,
            "state": str(r.state),
            "cause": str(r.cause),
            "epoch": r.epoch,
            "link": "up" if self.machine.link_up else "down",
            "hidden": self.machine.hidden,
            "writes": str(self.machine.write_decision()),
            "chunk_size": self.chunk_size,
            "data_size": self.data_size,
            "copy_percent": percent,
            "copied_chunks": r.copied_chunks,
            "total_chunks": total,
            "pending_chunks": pending,
            "dirty_bytes": dirty,
            "copy_bytes_sent": engine.sent_bytes if engine else 0,
            "copy_rate_bytes_s": rate,
            "eta_seconds": eta,
            "last_copy_bytes": self.doc.last_copy_bytes,
            "last_copy_seconds": self.doc.last_copy_seconds,
            "svol_consistent": r.svol_consistent,
            "journal": self._journal_info(),
        }

    def _journal_info(self) -> dict[str, Any] | None:
        if not self.is_async:
            return None
        group = self.record.group
        if self.record.role is Role.PRIMARY and group in self.manager.primaries:
            return self.manager.primaries[group].describe()
        if self.record.role is Role.SECONDARY and group in self.manager.secondaries:
            return self.manager.secondaries[group].describe()
        return None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            self.engine.thread.join(timeout=5)
        with contextlib.suppress(PairvolError, OSError):
            self.flush_copy_map()
        with contextlib.suppress(PairvolError, OSError):
            self.al_expire(idle=0.0)
        self.volume.close()


class BoundHandle(ExportHandle):
    """A client connection on a storage node.  It follows its volume's *current* role: the
    manager rebinds every open handle of a volume when a pair is created, loaded or deleted
    under it and whenever its PVID changes (:meth:`PairManager.rebind`), so a connection
    opened while the volume was simplex is mirrored or refused like a new one.

    ``side``: the pair side of the volume, or None (plain: the plugin may take its fast path).
    ``refusal``: why every request is refused (the PVID the client asked for is gone, the
    pair cannot be loaded, the image is damaged), or None."""

    __slots__ = ("on_close", "plain", "refusal", "side")

    def __init__(self, handle: ExportHandle) -> None:
        super().__init__(handle.volume, handle.readonly, handle.want_pvid)
        self.side: Side | None = None
        self.refusal: VolumeError | None = None
        self.plain = True
        self.on_close: Callable[[BoundHandle], None] | None = None

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close(self)
        super().close()

    def bind(self, side: Side | None, pvid: int, refusal: VolumeError | None) -> None:
        if refusal is None and self.want_pvid is not None and self.want_pvid != pvid:
            refusal = VolumeError(
                f"volume {self.header.name} now carries PVID {format_pvid(pvid)}, not the "
                f"{format_pvid(self.want_pvid)} this connection was opened for",
                errno.EIO,
            )
        self.side, self.refusal = side, refusal
        self.plain = side is None and refusal is None

    def _policy(self) -> Side | None:
        if self.refusal is not None:
            raise self.refusal
        return self.side

    def _refuse_hidden(self, side: Side) -> None:
        if not side.readable():
            raise VolumeError(
                f"volume {side.doc.volume} is the hidden secondary of pair {side.id}",
                errno.EPERM,
            )

    def _plain(self, run: Callable[[], None]) -> bool:
        """Carry out ``run`` as a plain request if the handle is plain (published in
        INFLIGHT, so a pair created meanwhile waits for it).  False: take the pair's path."""
        tid = get_ident()
        INFLIGHT[tid] = self
        try:
            if not self.plain:
                return False
            run()
            return True
        finally:
            INFLIGHT[tid] = None

    def pread(self, buf: memoryview, offset: int) -> None:
        side = self._policy()
        if side is not None:
            self._refuse_hidden(side)
        super().pread(buf, offset)

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        count = len(buf)
        if offset < 0 or offset + count > self.size:
            raise self._outside(count, offset)
        if self._plain(lambda: ExportHandle.pwrite(self, buf, offset, fua)):
            return
        side = self._policy()
        if side is None:  # unbound between the two looks: the plain path again
            ExportHandle.pwrite(self, buf, offset, fua)
            return
        pid = side.id
        side.client_write(
            offset,
            count,
            lambda: ExportHandle.pwrite(self, buf, offset, fua),
            lambda: wire.Write(pid, offset, buf, fua),
        )

    def zero(self, count: int, offset: int, may_trim: bool, fua: bool) -> None:
        self._check(count, offset)
        if self._plain(lambda: ExportHandle.zero(self, count, offset, may_trim, fua)):
            return
        side = self._policy()
        if side is None:
            ExportHandle.zero(self, count, offset, may_trim, fua)
            return
        pid = side.id
        side.client_write(
            offset,
            count,
            lambda: ExportHandle.zero(self, count, offset, may_trim, fua),
            lambda: wire.Zero(pid, offset, count, fua, may_trim),
        )

    def trim(self, count: int, offset: int, fua: bool) -> None:
        self._check(count, offset)
        if self._plain(lambda: ExportHandle.trim(self, count, offset, fua)):
            return
        side = self._policy()
        if side is None:
            ExportHandle.trim(self, count, offset, fua)
            return
        pid = side.id

        def local() -> None:
            # Mirror a trim as a zero that may punch holes, so both sides read the same.
            ExportHandle.zero(self, count, offset, True, fua)

        side.client_write(offset, count, local, lambda: wire.Zero(pid, offset, count, fua, True))

    def flush(self) -> None:
        side = self._policy()
        if side is None:
            ExportHandle.flush(self)
            return
        side.client_flush(lambda: ExportHandle.flush(self))

    def cache(self, count: int, offset: int) -> None:
        side = self._policy()
        if side is not None:
            self._refuse_hidden(side)
        super().cache(count, offset)

    def extents(self, count: int, offset: int, req_one: bool) -> list[tuple[int, int, int]]:
        side = self._policy()
        if side is not None:
            self._refuse_hidden(side)
        return super().extents(count, offset, req_one)


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
    ) -> None:
        self.node_name = node_name
        self.directory = directory
        self.listen = listen
        self.peer_port = peer_port
        self.secret = secret
        self.events = events
        self.log = log
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.async_link_timeout = async_link_timeout
        self.sides: dict[str, Side] = {}
        self.primaries: dict[str, GroupPrimary] = {}
        self.secondaries: dict[str, GroupSecondary] = {}
        self.lock = threading.RLock()
        self.clients: dict[tuple[str, int], PeerClient] = {}
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="pair ticker", daemon=True)
        self._refusals: dict[tuple[str, str], float] = {}
        #: Open client connections per volume (real path), rebound when the volume's role or
        #: PVID changes under them.
        self.handles: dict[str, set[BoundHandle]] = {}
        self.handles_lock = threading.Lock()
        #: Volumes that belong to a pair which cannot be loaded (real path -> why), served to
        #: nobody until an operator deletes the pair; and every such pair for display.
        self.broken: dict[str, str] = {}
        self.broken_pairs: list[dict[str, Any]] = []
        os.makedirs(os.path.join(directory, PAIRS_DIR), exist_ok=True)

    # -- files ----------------------------------------------------------------------------------

    def doc_path(self, key: str) -> str:
        """``GROUP@PAIR[@VOLUME].json``: no group, pair or volume name may contain '@' or '/',
        so two different pairs never share a file (``x.y/z`` and ``x/y.z`` once did)."""
        return os.path.join(self.directory, PAIRS_DIR, key.replace("/", "@") + ".json")

    def is_self(self, host: str, port: int) -> bool:
        return host == self.listen and port == self.peer_port

    def deliver_local(self, side: Side, msg: wire.Message) -> wire.Message:
        """A local pair's request, handed to the other side in-process; errors look exactly
        as they would from a remote peer."""
        try:
            return self._dispatch(side, "", msg)
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

    def client_for(self, host: str, port: int, expect: str = "") -> PeerClient:
        """The client for the node at ``host:port``; ``expect``: the node name the pair knows
        its peer by (a different node answering there is refused)."""
        with self.lock:
            c = self.clients.get((host, port))
            if c is not None and expect and c.expect_peer not in (None, expect):
                raise IllegalState(
                    f"{host}:{port} is node {c.expect_peer!r} for other pairs, not {expect!r}"
                )
            if c is not None and expect and c.expect_peer is None:
                c.expect_peer = expect  # checked at its next handshake
            if c is None:
                c = PeerClient(
                    self.node_name,
                    host,
                    port,
                    self.secret,
                    self.log,
                    allow_no_secret=not self.secret,
                    expect_peer=expect or None,
                )
                self.clients[host, port] = c
            return c

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        pairs_dir = os.path.join(self.directory, PAIRS_DIR)
        for name in sorted(os.listdir(pairs_dir)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(pairs_dir, name)
            doc: SideDoc | None = None
            try:
                with open(path) as f:
                    doc = SideDoc.from_json(f.read())
                if doc.record.state is ps.State.SMPL:
                    self._finish_delete(path, doc)
                    continue
                local = self.is_self(doc.peer.host, doc.peer.port)
                side = Side(self, doc, link_up=local)
            except (PairvolError, OSError) as e:
                self._mark_broken(path, doc, e)
                continue
            if path != self.doc_path(side.key):  # a file named the old way (GROUP.PAIR.json)
                write_atomic(self.doc_path(side.key), doc.to_json().encode())
                os.unlink(path)
            self.sides[side.key] = side
            if local:
                self._link_partner(side)
            restarted_busy = not side.is_async and side.fold_activity_log()
            if restarted_busy and side.record.state in ps.REPLICATING:
                side.link_failed("restarted with writes in flight (activity log not empty)")
            self.events.emit("pair.loaded", pair=side.id, state=str(side.record.state))
        self._open_groups()
        self._find_orphans()
        for name, g in self.primaries.items():
            drained = any(s.record.draining for s in g.sides.values())
            if not drained:
                n = g.redo()
                if n:
                    self.log(f"group {name}: redid {n} journal entries after a restart")
            g.start()
        self._ticker.start()

    def _open_groups(self) -> None:
        """The journals of the async groups loaded.  A damaged journal takes only its own
        group's pairs out of service: a corrupt one is salvaged (its pairs suspended, every
        chunk it may have held marked for the resync); one whose header cannot be read at all
        makes the group's volumes unserved until an operator deletes its pairs."""
        for side in [s for s in self.sides.values() if s.is_async]:
            if side.key not in self.sides:
                continue  # its group was taken offline meanwhile
            try:
                self._load_async(side)
            except JournalCorrupt as e:
                self._salvage(side, e)
                self._load_async(side)
            except (HeaderCorrupt, OSError) as e:
                self._group_offline(side.record.group, side.record.role, e)

    def _journal_members(self, group: str, role: Role) -> list[Side]:
        return [s for s in self.sides.values() if s.record.group == group and s.record.role is role]

    def _salvage(self, side: Side, e: JournalCorrupt) -> None:
        """Fold what a corrupt journal still shows into its pairs' difference bitmaps (the
        whole volume where a damaged record's extent is unknown), start the journal over
        after the highest sequence it ever named, and suspend the group's pairs."""
        sv = e.salvage
        members = self._journal_members(side.record.group, side.record.role)
        by_stream = {m.stream: m for m in members}
        unapplied = [x for x in sv.entries if x.seq > sv.applied_seq]
        for entry in unapplied:
            m = by_stream.get(entry.stream)
            if m is not None:
                m.mark_dirty(entry.offset, max(entry.length, 1))
        for region in sv.damaged:
            ext = region.extent
            targets = (
                [by_stream[ext.stream]] if ext is not None and ext.stream in by_stream else members
            )
            for m in targets:
                if ext is not None and ext.stream == m.stream:
                    m.mark_dirty(ext.offset, max(ext.length, 1))
                else:
                    m.mark_dirty(0, m.data_size)
        next_seq = Journal.reset(sv.path)
        why = (
            f"{e}; {len(unapplied)} located entries and {len(sv.damaged)} damaged region(s) "
            "are marked for the next resync, the journal continues at sequence "
            f"{next_seq}"
        )
        if side.record.role is Role.PRIMARY:
            why += "; entries that were not yet on this node's volumes when it stopped are lost"
        self.log(f"group {side.record.group}: {why}")
        self.events.emit(
            "group.journal.corrupt",
            group=side.record.group,
            path=sv.path,
            first_bad_seq=sv.first_bad_seq,
            located=len(unapplied),
            damaged=len(sv.damaged),
            extent_unknown=sv.extent_unknown,
            next_seq=next_seq,
        )
        for m in members:
            m.suspend_for_disk(
                f"journal {sv.path} was corrupt (first bad sequence {sv.first_bad_seq})"
            )

    def _group_offline(self, group: str, role: Role, e: BaseException) -> None:
        """A group journal that cannot be read at all: that group's volumes are served to
        nobody, and its pairs show as corrupt; every other group goes on."""
        members = self._journal_members(group, role)
        for m in members:
            self.sides.pop(m.key, None)
            real = os.path.realpath(m.volume.path)
            reason = f"pair {m.id}: the journal of group {group} cannot be read: {e}"
            self.broken[real] = reason
            self.broken_pairs.append(
                {
                    "id": m.id,
                    "file": self.doc_path(m.key),
                    "volume": m.doc.volume,
                    "path": real,
                    "reason": reason,
                }
            )
            m.close()
        self.primaries.pop(group, None) if role is Role.PRIMARY else self.secondaries.pop(
            group, None
        )
        self.log(f"group {group} is offline: its journal cannot be read: {e}")
        self.events.emit("group.offline", group=group, reason=str(e))

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
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join(timeout=5)
        for gp in list(self.primaries.values()):
            gp.stop()
        for gs in list(self.secondaries.values()):
            gs.stop()
        for side in list(self.sides.values()):
            side.close()
        for c in list(self.clients.values()):
            c.close()

    def _tick_loop(self) -> None:
        while not self._stop.wait(0.2):
            for side in list(self.sides.values()):
                try:
                    self._tick(side)
                except Exception as e:  # keep ticking for the other pairs
                    self.log(f"pair {side.id}: ticker: {e!r}")

    def _tick(self, side: Side) -> None:
        now = _now()
        with side.state_lock:
            actions = side.machine.handle_timer(now)
            later = side._carry_out([a for a in actions if not isinstance(a, ps.SendPing)])
        side._after(later, tell_peer=False)
        want_ping = any(isinstance(a, ps.SendPing) for a in actions)
        if side.record.state is ps.State.SMPL:
            return
        side.check_image()
        if side.machine.link_up:
            if want_ping:
                self._ping(side)
        elif now - side.last_ping >= 1.0:
            side.last_ping = now
            self._ping(side)
        side.al_expire()

    def _ping(self, side: Side) -> None:
        try:
            reply = side.request(wire.Ping(time.monotonic_ns()), timeout=PING_TIMEOUT)
        except (ConnectionFailed, Timeout, PeerRefused) as e:
            if side.machine.link_up:
                side.link_failed(f"heartbeat failed: {e}")
            return
        if side.doc.peer.node == "" and side.client is not None and side.client.peer_name:
            side.doc.peer.node = side.client.peer_name
            side.save()
        if not isinstance(reply, wire.Pong):
            return
        if side.machine.link_up:
            with side.state_lock:
                side.machine.handle(ps.Pong(), _now())
            return
        self.restore_link(side, notify=True)

    def restore_link(self, side: Side, *, notify: bool) -> None:
        """The peer answered while our link was down: LinkRestored, and the state exchange."""
        with side.restore_lock:
            if side.machine.link_up:
                return
            self.log(f"pair {side.id}: link to {side.doc.peer.label()} is back")
            r = side.record
            try:
                if r.role is Role.PRIMARY and r.auto_resync and r.cause is ps.Cause.LINK:
                    # An automatic resync is a resync: the secondary moves first.
                    with side.gate.closed():
                        self._announce(side, ps.State.COPY, Role.PRIMARY, r.epoch)
                        side.fire(ps.LinkRestored(), tell_peer=False)
                    return
                side.fire(ps.LinkRestored(), tell_peer=False)
            except (IllegalState, ConnectionFailed, Timeout) as e:
                self.log(f"pair {side.id}: {e}")
                return
        # State exchange on reconnect: the peer learns where we are (a resumed copy) and
        # moves along (docs/protocol.md, "Pair control").
        if notify:
            side.notify_peer()

    def log_refusal(self, side: Side, decision: ps.WriteDecision) -> None:
        """One log line per pair and decision per ten seconds, not one per request."""
        key = (side.id, str(decision))
        now = _now()
        if now - self._refusals.get(key, -1e9) >= 10:
            self._refusals[key] = now
            self.log(f"pair {side.id}: client write refused: {ps._WRITE_WHY[decision]}")

    def forget(self, side: Side) -> None:
        side.deleted = True
        if side.is_async:
            # The group's journals go with its last pair: a group created again under the
            # same name must start a new sequence space on both sides.
            self.drop_journal(side)
        with self.lock:
            self.sides.pop(side.key, None)
        faults.step("remove record")
        _unlink_durably(self.doc_path(side.key))
        path = side.volume.path
        side.close()
        self.rebind(path, None)

    # -- what cannot be loaded, and what a crash left half done -----------------------------------

    def _finish_delete(self, path: str, doc: SideDoc) -> None:
        """A record in SMPL: a delete was interrupted after its record was written.  Finish it
        (the new PVID, if one was due, went on the volume before the record did)."""
        vpath = self.volume_path(doc.volume)
        with Volume.open(vpath, writable=True) as v:
            store = BitmapStore(v.fd, v.header)
            for slot in (doc.record.diff_slot, doc.record.copy_slot, AL_SLOT):
                store.clear(slot)
            if v.header.role is not Role.SIMPLEX or v.header.pair:
                v.update_info(role=Role.SIMPLEX, pair="")
        _unlink_durably(path)
        self.log(f"pair {doc.record.name}: finished its delete, interrupted by a restart")
        self.events.emit("pair.deleted", pair=doc.record.name, finished_after_restart=True)

    def _mark_broken(self, path: str, doc: SideDoc | None, e: BaseException) -> None:
        key = os.path.basename(path)[: -len(".json")]
        parts = key.split("@")
        pid = doc.record.name if doc is not None else "/".join(parts[:2]) if len(parts) > 1 else key
        volume = doc.volume if doc is not None else None
        real = None
        if volume is not None:
            with contextlib.suppress(PairvolError, OSError):
                real = os.path.realpath(self.volume_path(volume))
        reason = f"pair {pid} cannot be loaded from {path}: {e}"
        self.log(reason)
        self.events.emit("pair.corrupt", pair=pid, file=path, reason=str(e))
        self.broken_pairs.append(
            {"id": pid, "file": path, "volume": volume, "path": real, "reason": reason}
        )
        if real is not None:
            self.broken[real] = reason

    def _find_orphans(self) -> None:
        """A volume whose header says it is paired, with no loaded side: its pair file is
        missing or damaged.  Nobody may use it under an identity we cannot vouch for."""
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            try:
                with Volume.open(entry.path) as v:
                    h = v.header
            except (PairvolError, OSError):
                continue
            real = os.path.realpath(entry.path)
            if h.role is Role.SIMPLEX or real in self.broken or self.side_for_path(real):
                continue
            reason = (
                f"volume {h.name} is labelled {h.role.label} of pair {h.pair!r}, but no pair "
                "file loads it"
            )
            known = [b for b in self.broken_pairs if b["id"] == h.pair and b["path"] is None]
            if known:  # its record is there but unreadable: now we know its volume too
                known[0].update(volume=h.name, path=real)
                self.broken[real] = str(known[0]["reason"])
                continue
            self.log(reason)
            self.events.emit("pair.corrupt", pair=h.pair, volume=h.name, reason=reason)
            self.broken[real] = reason
            self.broken_pairs.append(
                {"id": h.pair, "file": None, "volume": h.name, "path": real, "reason": reason}
            )

    def release_broken(self, pid: str) -> list[dict[str, Any]]:
        """``pair delete`` of a pair that cannot be loaded: set its damaged file aside (never
        removed), give a volume that was a secondary a new PVID (it may carry its primary's),
        label the volume simplex, and serve it again."""
        out = []
        for b in [b for b in self.broken_pairs if b["id"] == pid]:
            if b["file"] is not None and os.path.exists(b["file"]):
                aside = f"{b['file']}.damaged-{int(time.time())}"
                os.replace(b["file"], aside)
                _fsync_dir(os.path.dirname(aside))
                b["file"] = aside
            real = b["path"]
            row: dict[str, Any] = {"id": pid, "role": "?", "state": "SMPL", "pvid": "?"}
            if real is not None:
                with Volume.open(real, writable=True) as v:
                    row["role"] = v.header.role.label
                    if v.header.role is Role.SECONDARY:
                        h = v.set_pvid(None)
                        self.log(f"volume {h.name}: new PVID {h.pvid_hex} (was a secondary)")
                    h = v.update_info(role=Role.SIMPLEX, pair="")
                    row["pvid"] = h.pvid_hex
                self.broken.pop(real, None)
                self.rebind(real, None)
            self.broken_pairs.remove(b)
            self.log(f"pair {pid}: released (its record was damaged; kept as {b['file']})")
            out.append({**row, "was": "corrupt", "kept": b["file"]})
        return out

    # -- open client connections ----------------------------------------------------------------

    def _refusal_for(self, real: str, side: Side | None) -> VolumeError | None:
        if real in self.broken:
            return VolumeError(f"{self.broken[real]}; not served", errno.EIO)
        if side is not None and side.damaged is not None:
            return VolumeError(f"pair {side.id}: {side.damaged}; not served", errno.EIO)
        return None

    def wrap(self, handle: ExportHandle) -> ExportHandle:
        """A new client connection: bound to the volume's pair side (if any), registered so
        that it follows every later change (pairvol never serves a stale binding)."""
        real = os.path.realpath(handle.volume.path)
        with self.lock:
            side = self.side_for_path(real)
            refusal = self._refusal_for(real, side)
            if refusal is not None:
                handle.close()
                raise IllegalState(str(refusal))
            if side is not None and not side.readable():
                handle.close()
                raise IllegalState(
                    f"volume {side.doc.volume} is the hidden secondary of pair {side.id} "
                    f"({side.record.state}); clients may not use it until split or takeover"
                )
            bound = BoundHandle(handle)
            bound.bind(side, handle.volume.header.pvid, None)
            with self.handles_lock:
                self.handles.setdefault(real, set()).add(bound)
        bound.on_close = self._closed
        return bound

    def _closed(self, handle: BoundHandle) -> None:
        real = os.path.realpath(handle.volume.path)
        with self.handles_lock:
            group = self.handles.get(real)
            if group is not None:
                group.discard(handle)
                if not group:
                    del self.handles[real]

    def rebind(self, path: str, side: Side | None) -> None:
        """Every open connection of the volume at ``path`` now follows ``side`` (None: plain)
        and its current PVID; returns once no plain request is left in flight on them."""
        real = os.path.realpath(path)
        with self.handles_lock:
            handles = list(self.handles.get(real, ()))
        if not handles:
            return
        refusal = self._refusal_for(real, side)
        if side is not None and not side.deleted:
            pvid = side.volume.header.pvid
        else:
            with Volume.open(real) as v:
                pvid = v.header.pvid
        for h in handles:
            h.bind(side, pvid, refusal)
        quiesce(handles)
        self.events.emit(
            "pair.handles.rebound",
            path=real,
            handles=len(handles),
            pair=side.id if side is not None else "",
        )

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

    def side_for_path(self, path: str) -> Side | None:
        real = os.path.realpath(path)
        for s in list(self.sides.values()):
            if os.path.realpath(s.volume.path) == real:
                return s
        return None

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

    # -- control operations (the CLI) -------------------------------------------------------------

    def op_create(self, args: dict[str, Any]) -> dict[str, Any]:
        group, pair = str(args["group"]), str(args["pair"])
        check_name(group, what="group name")
        check_name(pair, what="pair name")
        pid = pair_id(group, pair)
        mode = ps.Mode(str(args.get("mode", "sync")))
        fence = ps.Fence(str(args.get("fence", "never")))
        if mode is ps.Mode.ASYNC and fence is ps.Fence.DATA:
            raise UsageError("--fence data needs --mode sync (an async secondary always lags)")
        chunk = int(args.get("chunk", ps.DEFAULT_CHUNK))
        journal_size = int(args.get("journal_size") or DEFAULT_JOURNAL_SIZE)
        raw_high = args.get("high_watermark")
        high = DEFAULT_HIGH_WATERMARK if raw_high is None else float(raw_high)
        if not 0 < high <= 1:
            raise UsageError(f"--high-watermark {high * 100:g}% is not more than 0 and at most 100")
        volume = str(args["volume"])
        peer = PeerRef(
            str(args.get("peer_node", "")),
            str(args["peer_host"]),
            int(args["peer_port"]),
            str(args["peer_volume"]),
        )
        local = self.is_self(peer.host, peer.port)
        if local:
            peer.node = self.node_name
            if peer.volume == volume:
                raise UsageError(f"--primary and --secondary are the same volume ({volume})")
        with self.lock:
            if self.has_pair(pid):
                raise AlreadyExists(f"pair {pid} already exists on node {self.node_name}")
            path = self.volume_path(volume)
            self._check_free(path, volume)
            members = [x for x in self.sides.values() if x.record.group == group]
            stream = 1 + max((x.stream for x in members), default=0)
            for x in members:
                if x.partner is not None and x.record.role is Role.SECONDARY:
                    continue  # the other half of one of this group's local pairs
                if x.record.mode is not mode or x.record.role is not Role.PRIMARY:
                    raise IllegalState(
                        f"group {group} holds {x.record.mode} pairs with this node as "
                        f"{x.record.role.label}: a group has one mode and one direction"
                    )
                if (x.doc.peer.host, x.doc.peer.port) != (peer.host, peer.port):
                    raise IllegalState(
                        f"group {group} replicates to {x.doc.peer.label()}: every pair of a "
                        "group has the same two nodes"
                    )
            record = ps.PairRecord(
                group,
                pair,
                Role.PRIMARY,
                mode,
                fence,
                peer.label(),
                chunk_size=chunk,
                auto_resync=bool(args.get("auto_resync", False)),
            )
            doc = SideDoc(
                record,
                volume,
                peer,
                max_rate=int(args.get("max_rate", 0)),
                stream=stream,
                journal_size=journal_size,
                high_watermark=high,
            )
            side = Side(self, doc, link_up=True)
            try:
                for slot in (record.diff_slot, record.copy_slot, AL_SLOT):
                    side.store.clear(slot)
                side.diff_map = Bitmap(side.data_size, chunk)
                side.copy_map = Bitmap(side.data_size, chunk)
                side.al = Bitmap(side.data_size, AL_EXTENT)
                h = side.volume.header
                create = wire.PairCreate(
                    pid,
                    peer.volume,
                    h.data_size,
                    chunk,
                    str(mode),
                    str(fence),
                    h.pvid,
                    0,
                    f"{self.listen}:{self.peer_port}",
                    h.block_size,
                )
                if local:
                    secondary = self.on_pair_create(self.node_name, create)
                    side.partner, secondary.partner = secondary, side
                else:
                    try:
                        side.request(create)
                    except PeerRefused as e:
                        raise IllegalState(f"the secondary refused the pair: {e.message}") from e
                    if side.client is not None and side.client.peer_name:
                        peer.node = side.client.peer_name
                self.sides[side.key] = side
                if mode is ps.Mode.ASYNC:
                    self.primary_group(side).start()
            except BaseException:
                side.volume.close()
                raise
        try:
            # Connections opened while the volume was simplex now go through the pair; the
            # gate holds their writes until the copy's policy (mirror, journal) is in force.
            with side.gate.closed():
                self.rebind(side.volume.path, side)
                side.fire(ps.Create(), tell_peer=False)
        except BaseException:
            self.forget(side)
            raise
        return side.describe()

    def _check_free(self, path: str, volume: str) -> None:
        """A volume may join a new pair only if it belongs to none, loadable or not."""
        if self.side_for_path(path) is not None:
            raise IllegalState(f"volume {volume} on {self.node_name} already belongs to a pair")
        real = os.path.realpath(path)
        if real in self.broken:
            raise IllegalState(f"volume {volume} on {self.node_name}: {self.broken[real]}")

    def on_pair_create(self, peer_name: str, msg: wire.PairCreate) -> Side:
        pid = msg.pair_id
        group, _, pair = pid.partition("/")
        with self.lock:
            if self.has_pair(pid):
                raise AlreadyExists(f"pair {pid} already exists on node {self.node_name}")
            path = self.volume_path(msg.volume)
            self._check_free(path, msg.volume)
            with Volume.open(path) as v:
                if v.header.data_size != msg.data_size:
                    raise UsageError(
                        f"volume sizes differ: the primary has {msg.data_size} bytes, "
                        f"{msg.volume} on {self.node_name} has {v.header.data_size}"
                    )
                if v.header.block_size != msg.block_size:
                    raise UsageError(
                        f"block sizes differ: the primary's is {msg.block_size} bytes, "
                        f"{msg.volume} on {self.node_name} has {v.header.block_size}"
                    )
            host, port = parse_peer_address(msg.primary_peer, self.peer_port)
            peer = PeerRef(peer_name, host, port, "")
            record = ps.PairRecord(
                group,
                pair,
                Role.SECONDARY,
                ps.Mode(msg.mode),
                ps.Fence(msg.fence),
                peer.label(),
                chunk_size=msg.chunk_size,
            )
            members = [x for x in self.sides.values() if x.record.group == group]
            stream = 1 + max((x.stream for x in members), default=0)
            if not any(x.record.role is Role.SECONDARY for x in members):
                # A new group here: no receive journal of an earlier group of that name.
                stale = self.secondaries.pop(group, None)
                if stale is not None:
                    stale.stop()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(journal_path(self.directory, group, receive=True))
            doc = SideDoc(record, msg.volume, peer, stream=stream)
            side = Side(self, doc, link_up=True)
            try:
                for slot in (record.diff_slot, record.copy_slot, AL_SLOT):
                    side.store.clear(slot)
                side.diff_map = Bitmap(side.data_size, msg.chunk_size)
                side.copy_map = Bitmap(side.data_size, msg.chunk_size)
                side.peer_pvid = msg.pvid
                side.doc.primary_pvid = msg.pvid
                self.sides[side.key] = side
                if record.mode is ps.Mode.ASYNC:
                    self.secondary_group(side)
                # Connections already open on the S-VOL are refused from now on, as new ones.
                with side.gate.closed():
                    self.rebind(side.volume.path, side)
                    side.fire(ps.Create(), tell_peer=False)
            except BaseException:
                self.sides.pop(side.key, None)
                side.volume.close()
                self.rebind(path, None)
                raise
        return side

    def _query_peer(self, side: Side, timeout: float = REQUEST_TIMEOUT) -> wire.PairState:
        reply = side.request(side.my_state(), timeout=timeout)
        if not isinstance(reply, wire.PairState) or reply.pair_id != side.id:
            raise ProtocolError(f"pair {side.id}: the peer answered a state query oddly")
        side.on_peer_reply(reply)
        return reply

    def _dry_run(self, side: Side, event: ps.Event, link_up: bool | None = None) -> ps.PairRecord:
        trial = ps.PairMachine(
            side.record,
            _now(),
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=self.heartbeat_timeout,
            link_up=side.machine.link_up if link_up is None else link_up,
        )
        trial.handle(event, _now())
        return trial.record

    def _announce(self, side: Side, state: ps.State, role: Role, epoch: int) -> None:
        msg = wire.PairState(side.id, str(state), role.label, side.volume.header.pvid, epoch)
        try:
            side.request(msg)
        except PeerRefused as e:
            raise IllegalState(f"pair {side.id}: the peer refused: {e.message}") from e

    def op_split(self, args: dict[str, Any]) -> dict[str, Any]:
        sides = self.select(str(args["target"]), Role.PRIMARY)
        for s in sides:
            if s.record.role is not Role.PRIMARY:
                raise IllegalState(
                    f"pair {s.id}: run split on the primary's node ({s.doc.peer.label()})"
                )
            self._dry_run(s, ps.Split())
        # One point in time for the whole group: close every gate, then split each pair.
        with contextlib.ExitStack() as stack:
            for s in sides:
                stack.enter_context(s.gate.closed())
            for s in sides:
                if s.is_async and s.record.state in (ps.State.PAIR, ps.State.PFUL):
                    s.fire(ps.Split(), tell_peer=False)  # cuts the journal: a drain starts
                    continue
                if s.machine.link_up and s.record.state is ps.State.PAIR:
                    try:
                        self._announce(s, ps.State.PSUS, Role.PRIMARY, s.record.epoch)
                    except (ConnectionFailed, Timeout) as e:
                        s.link_failed(str(e))
                        raise
                s.fire(ps.Split(), tell_peer=False)
                s.al_expire(idle=0.0)  # nothing in flight (gate closed): the log can empty
        # Async: once the secondary has applied everything up to the cut, finish the split.
        timeout = float(args.get("timeout", 120))
        for s in sides:
            if not s.record.draining or s.drain_cut is None:
                continue
            group = self.primary_group(s)
            if not group.wait_applied(s.drain_cut, timeout):
                raise Timeout(
                    f"pair {s.id}: the secondary did not apply up to sequence {s.drain_cut} "
                    f"within {timeout:.0f}s; the split is still draining"
                )
            self._announce(s, ps.State.PSUS, Role.PRIMARY, s.record.epoch)
            s.fire(ps.Drained(), tell_peer=False)
            s.drain_cut = None
        for name in {s.record.group for s in sides if s.is_async}:
            g = self.primaries.get(name)
            if g is not None:
                g.cut = None
        return {"pairs": [s.describe() for s in sides]}

    def _overwritten(self, side: Side, role_after: Role, swap: bool) -> int:
        """How many chunks written on the side that will be the secondary the resync is about
        to overwrite (said, and logged, before anything is copied)."""
        if role_after is Role.PRIMARY:
            reply = side.request(wire.BitmapRequest(side.id, "diff"))
            if not isinstance(reply, wire.Bitmap) or reply.pair_id != side.id:
                raise ProtocolError(f"pair {side.id}: the peer answered a bitmap request oddly")
            n = Bitmap.from_bytes(side.data_size, side.chunk_size, bytes(reply.bits)).count()
            where = f"on {side.doc.peer.label()}"
        else:
            with side.bitmap_lock:
                n = side.diff_map.count()
            where = "here"
        if n:
            what = "resync --swap" if swap else "resync"
            self.log(
                f"pair {side.id}: {what} overwrites {n} chunks written {where} since the pair "
                "was split, suspended or taken over"
            )
            self.events.emit("pair.resync.overwrite", pair=side.id, chunks=n, swap=swap)
        return n

    def op_resync(self, args: dict[str, Any]) -> dict[str, Any]:
        swap = bool(args.get("swap", False))
        overwritten: dict[str, int] = {}
        # A local pair's swap is carried out by the side that becomes the primary.
        sides = self.select(str(args["target"]), Role.SECONDARY if swap else Role.PRIMARY)
        if args.get("max_rate") is not None:
            for s in sides:
                s.doc.max_rate = int(args["max_rate"])
                s.save()
        for s in sides:
            if not s.machine.link_up:
                self._ping(s)
            if not swap and s.record.role is not Role.PRIMARY:
                raise IllegalState(
                    f"pair {s.id}: run resync on the primary's node ({s.doc.peer.label()}), "
                    "or resync --swap here to make this side the primary"
                )
        for s in sides:
            with s.gate.closed():
                self._query_peer(s)  # may fence us: then the dry run below refuses
                event = ps.Resync(swap=swap, peer_epoch=s.doc.peer_epoch)
                after = self._dry_run(s, event)
                overwritten[s.id] = self._overwritten(s, after.role, swap)
                if s.is_async and after.role is Role.PRIMARY and s.record.group in self.primaries:
                    # Nothing shipped before the fold may reach the secondary after it has
                    # discarded what it received: wait for the shipper's requests in flight.
                    self.primaries[s.record.group].quiesce()
                if after.role is Role.PRIMARY:
                    # The peer (the secondary afterwards) moves first; then we copy to it.
                    self._announce(s, ps.State.COPY, Role.PRIMARY, after.epoch)
                    s.fire(event, tell_peer=False)
                else:
                    # A swap that demotes us: we move first, then the peer copies to us.
                    s.fire(event, tell_peer=False)
                    self._announce(s, ps.State.COPY, Role.SECONDARY, after.epoch)
        return {
            "pairs": [
                {**s.describe(), "discarding_chunks": overwritten.get(s.id, 0)} for s in sides
            ]
        }

    def op_takeover(self, args: dict[str, Any]) -> dict[str, Any]:
        sides = self.select(str(args["target"]), Role.SECONDARY)
        force = bool(args.get("force", False))
        reports: dict[str, dict[str, Any]] = {}
        for s in sides:
            if s.is_async and s.record.role is Role.SECONDARY:
                # Apply everything received first: the image is then the newest consistent
                # prefix this side has; report what never arrived.
                g = self.secondary_group(s)
                g.drain()
                reports[s.id] = self._rpo_report(g)
            if s.machine.link_up:
                # The old primary's epoch as it is now: the takeover's must be newer.
                try:
                    self._query_peer(s, timeout=PING_TIMEOUT)
                except (ConnectionFailed, Timeout, PeerRefused, ProtocolError) as e:
                    self.log(f"pair {s.id}: cannot ask the old primary its epoch: {e}")
            s.fire(ps.Takeover(force=force, peer_epoch=s.doc.peer_epoch), tell_peer=False)
            if s.machine.link_up:
                try:
                    self._announce(s, ps.State.SSWS, Role.SECONDARY, s.record.epoch)
                except (ConnectionFailed, Timeout, IllegalState) as e:
                    self.log(f"pair {s.id}: could not tell the old primary: {e}")
        out = []
        for s in sides:
            d = s.describe()
            if s.id in reports:
                d["not_received"] = reports[s.id]
                self.events.emit(
                    "pair.takeover.rpo",
                    pair=s.id,
                    **{k: v for k, v in reports[s.id].items() if v is not None},
                )
            out.append(d)
        return {"pairs": out}

    @staticmethod
    def _rpo_report(g: GroupSecondary) -> dict[str, Any]:
        """What an async takeover loses: the sequence range the primary had and we did not."""
        newest = max(g.primary_newest, g.received)
        missing = newest - g.received
        age = None
        if missing and g.primary_newest_ns:
            age = round(time.time() - g.primary_newest_ns / 1e9, 3)
        return {
            "applied_seq": g.applied,
            "primary_newest_seq": newest,
            "missing_entries": missing,
            "missing_range": [g.received + 1, newest] if missing else None,
            "newest_missing_age_s": age,
            "primary_last_heard_s": round(time.time() - g.heard_at, 3) if g.heard_at else None,
        }

    def _broken_named(self, target: str) -> list[dict[str, Any]]:
        group, pair = split_pair_id(target)
        return [
            b
            for b in self.broken_pairs
            if b["id"] == target or (pair is None and str(b["id"]).split("/")[0] == group)
        ]

    def op_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        target = str(args["target"])
        released: list[dict[str, Any]] = []
        for pid in sorted({str(b["id"]) for b in self._broken_named(target)}):
            released += self.release_broken(pid)
        try:
            sides = self.select(target, Role.PRIMARY)
        except NotFound:
            if released:
                return {"pairs": released}
            raise
        out = released
        for s in sides:
            with s.gate.closed():
                self._dry_run(s, ps.Delete())
                told: str | None = "the link is down"
                if s.machine.link_up:
                    try:
                        self._announce(s, ps.State.SMPL, s.record.role, s.record.epoch)
                        told = None
                    except (ConnectionFailed, Timeout, IllegalState) as e:
                        told = str(e)
                if told is not None and s.partner is None:
                    self.log(
                        f"pair {s.id}: deleted here, but the peer was not told ({told}); "
                        f"run pair delete {s.id} on {s.doc.peer.label()} as well"
                    )
                s.fire(ps.Delete(), tell_peer=False)
                row = s.describe()
                row["peer_not_told"] = told if s.partner is None else None
                out.append(row)
                self.forget(s)
        return {"pairs": out}

    def op_verify(self, args: dict[str, Any]) -> dict[str, Any]:
        sides = self.select(str(args["target"]), Role.PRIMARY)
        repair = bool(args.get("repair", False))
        return {"pairs": [s.verify(repair) for s in sides]}

    def op_display(self, args: dict[str, Any]) -> dict[str, Any]:
        target = args.get("target")
        corrupt = self._broken_named(str(target)) if target else list(self.broken_pairs)
        if target and corrupt and not any(s.id == target for s in self.sides.values()):
            raise HeaderCorrupt(corrupt[0]["reason"])
        if target and not corrupt:
            sides = self.select(str(target))
        elif target:
            sides = [s for s in self.sides.values() if s.id == target]
        else:
            sides = sorted(self.sides.values(), key=lambda s: s.id)
        return {
            "node": self.node_name,
            "pairs": [s.describe() for s in sides],
            "corrupt": [{k: v for k, v in b.items() if k != "path"} for b in corrupt],
        }

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {
            "pair.create": self.op_create,
            "pair.split": self.op_split,
            "pair.resync": self.op_resync,
            "pair.takeover": self.op_takeover,
            "pair.delete": self.op_delete,
            "pair.display": self.op_display,
            "pair.verify": self.op_verify,
            "debug.crash-at": self.op_crash_at,
        }

    def op_crash_at(self, args: dict[str, Any]) -> dict[str, Any]:
        """Tests: SIGKILL this node at the ``step``-th durable write from now (0: disarm);
        the answer holds the steps taken since the last arming (replicator/faults.py)."""
        taken = faults.trace()
        after = int(args.get("step", 0))

        def announce(label: str, n: int) -> None:
            self.events.emit("debug.crash", step=n, label=label)

        faults.arm(after, announce)
        return {"armed": after, "steps_taken": taken}

    # -- the peer protocol (server side) ----------------------------------------------------------

    def handle_peer(self, peer_name: str, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.Ping):
            now = _now()
            for s in list(self.sides.values()):
                if s.doc.peer.node == peer_name and s.machine.link_up:
                    with s.state_lock:
                        s.machine.handle(ps.Ping(), now)
            return wire.Pong(msg.now_ns)
        if isinstance(msg, wire.PairCreate):
            self.on_pair_create(peer_name, msg)
            return wire.Ack()
        pid = getattr(msg, "pair_id", None)
        if pid is None:
            raise ProtocolError(f"unexpected {type(msg).__name__} request")
        side = self.side(pid)
        if side.doc.peer.node != peer_name or side.local:
            # A peer is trusted only for the pairs it belongs to (docs/decisions.md, "Peer
            # identity"): the same answer as for a pair that does not exist, and one line.
            self.log_untrusted(peer_name, pid, type(msg).__name__, side.doc.peer.node)
            raise NotFound(f"pair {pid} does not exist on node {self.node_name}")
        return self._dispatch(side, peer_name, msg)

    def log_untrusted(self, peer_name: str, pid: str, what: str, member: str) -> None:
        """One line per peer and pair per ten seconds, however many requests it sends."""
        key = (f"untrusted {peer_name}", pid)
        now = _now()
        if now - self._refusals.get(key, -1e9) >= 10:
            self._refusals[key] = now
            self.log(
                f"refused {what} for pair {pid} from node {peer_name!r}: the pair's peer is "
                f"{member!r}"
            )
            self.events.emit("peer.refused", peer=peer_name, pair=pid, request=what)

    def _dispatch(self, side: Side, peer_name: str, msg: wire.Message) -> wire.Message:
        """A request for one side (from its remote peer, or from its local partner)."""
        pid = side.id
        if isinstance(msg, wire.Ping):
            if side.machine.link_up:
                with side.state_lock:
                    side.machine.handle(ps.Ping(), _now())
            return wire.Pong(msg.now_ns)
        if isinstance(msg, wire.PairState):
            return side.on_peer_state(msg)
        if isinstance(msg, wire.BitmapRequest):
            return side.bitmap_for_peer(msg.which)
        if isinstance(msg, wire.DigestRequest):
            return wire.Digests(pid, msg.first, side.digests(msg.first, msg.count))
        if isinstance(msg, wire.Write | wire.Zero | wire.Flush):
            return side.apply_write(msg)
        if isinstance(msg, wire.JournalStatus):
            side.check_journal_marks(split=True)
            return self.secondary_group(side).note_status(msg)
        raise UsageError(f"unexpected {type(msg).__name__} request")


def describe_pvid(pvid: int) -> str:
    return format_pvid(pvid)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_durably(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        _fsync_dir(os.path.dirname(path))
