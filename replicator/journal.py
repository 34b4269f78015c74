"""The write-ahead journal of async replication: one file per consistency group per node.

docs/format.md ("Journal file") documents every byte; this docstring says why it is safe.
The journal is four modules: :mod:`replicator.journal_codec` encodes and decodes header slots
and records (pure), :mod:`replicator.journal_recovery` rebuilds the chain and tells a torn
tail from corruption (it reads only through a callback), :mod:`replicator.group_commit`
tracks the seqs in flight and shares the fdatasyncs, and this module owns the file and the
ring: creating, opening, appending, releasing, reading, resetting.

Theory of operation.  The file is two 4 KiB header slots followed by a *ring* of ``capacity``
bytes.  Entries are records (a 96-byte header, the data, zero padding to 512 bytes) appended at
the ring's *head*; the oldest retained record is at the *tail*.  Positions are *virtual*: they
only grow, and ``pos % capacity`` is the place in the ring, so ``head - tail`` is the space in
use.  A record never straddles the end of the ring: when one does not fit, a 512-byte *wrap
marker* carrying the next seq is written where it would have gone, and the record goes to
ring offset 0.

On the primary, ``append`` gives each client write the group's next sequence number; on the
secondary the shipped entries are appended with the primary's numbers (``seq=``, exactly
``last_seq + 1``).  ``append`` returns only once an ``fdatasync`` covering the record AND every
record reserved before it has completed, so an acknowledged entry never depends on one that
could still be torn.  Concurrent appenders are group-committed: whichever waiter finds no flush
in progress does one ``fdatasync`` for everything written so far, and the others wait for it.

Recovery (:meth:`Journal.open`) reads the header (the valid slot with the highest generation;
the other one is rewritten), then follows the chain from the tail: each record must have a
valid CRC32C, this journal's id, exactly the next seq, and an *epoch* no older than the
record before it.  The first record that fails ends the chain.  Three kinds of leftovers
sit after the end, and each is rejected:

* a torn append (never acknowledged, because its fdatasync had not returned): bad CRC;
* a record from an earlier lap of the ring: valid CRC, but its seq is too small;
* a record that was complete but sat *after* a torn one when the process died (concurrent
  appenders finish their pwrites out of order): valid CRC and possibly the right seq once the
  journal has grown back to it, but written in an older epoch.  Every ``open`` bumps the epoch
  in the header, durably, before the first append; records carry the epoch they were written
  in, and epochs never decrease along the chain, starting from the header's *tail epoch* (the
  epoch of the record at the tail, or the current one when the tail is the head).  Without
  this, an unacknowledged write discarded by one recovery could come back after the next crash
  once the journal has grown back over its seq.

Torn tail or corruption.  A damaged record followed by the journal's later records is not the
end of the journal: it is corruption (:class:`JournalCorrupt`), and open refuses to go on.
Telling the two apart needs proof that the damaged record was once complete, because a
torn append can legitimately sit before complete, unacknowledged records (the third case
above).  Every record carries that proof for the records before it: ``written_seq`` (every
seq up to it had been completely written when this record was reserved) and ``synced_seq``
(covered by a completed fdatasync); the header carries ``synced_seq`` too.  So recovery scans
the rest of the ring for later records of the same chain (this journal's id, seq >= the bad
one, epoch within the chain's range) and calls it corruption only when one exists AND the bad
seq is vouched for: by the header, by a later record's ``synced_seq``, or by a later record's
``written_seq`` when that record was written in the header's epoch during this same boot (the
page cache could not have lost a completed write).  docs/format.md states the rule exactly.

``release`` writes the new tail into the header (slot A, sync, slot B, sync) BEFORE the freed
space can be handed to an append: if records could overwrite the space while the durable tail
still pointed into it, recovery would start from the old tail, meet a newer record with the
wrong seq and lose the whole journal.

A header commit is atomic: the second slot is written only once the first, with the higher
generation, is durable, and the valid slot with the higher generation wins.  So the
secondary's applier moves the applied mark and the tail in one commit per batch
(:meth:`Journal.set_applied_and_release`): after a crash both have moved or neither.

An I/O error in append (pwrite or fdatasync) breaks the journal: a reserved seq that never
reached the disk would be a hole in front of every later record, so every later call raises
:class:`~replicator.errors.VolumeError` until the file is reopened, and recovery decides.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import crc32c

from replicator.atomic_file import fsync_dir
from replicator.errors import (
    AlreadyExists,
    Closed,
    HeaderCorrupt,
    IllegalState,
    JournalFull,
    NotFound,
    UsageError,
    VolumeError,
)
from replicator.group_commit import GroupCommit
from replicator.header import check_name
from replicator.journal_codec import (
    _U64,
    CAPACITY_ALIGN,
    FLAG_FUA,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HEADER_LEN,
    KIND_WRAP,
    MAGIC,
    MIN_CAPACITY,
    REC_HEADER_LEN,
    REC_MAGIC,
    RECORD_ALIGN,
    RING_OFFSET,
    SLOT_OFFSETS,
    SLOT_SIZE,
    BadRecord,
    Entry,
    EntryKind,
    JournalHeader,
    RecordHead,
    check_entry,
    choose_header,
    decode_header,
    decode_record_head,
    encode_header,
    encode_record,
    encode_record_parts,
    max_entry_bytes,
    place_record,
    record_data,
    record_size,
)
from replicator.journal_recovery import (
    DamagedRegion,
    IndexSlot,
    JournalSalvage,
    Recovery,
    RingRead,
    highest_seq,
    recover,
)

__all__ = [
    "CAPACITY_ALIGN",
    "FLAG_FUA",
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "HEADER_LEN",
    "MAGIC",
    "MIN_CAPACITY",
    "RECORD_ALIGN",
    "REC_HEADER_LEN",
    "REC_MAGIC",
    "RING_OFFSET",
    "SLOT_OFFSETS",
    "SLOT_SIZE",
    "BadRecord",
    "DamagedRegion",
    "Entry",
    "EntryKind",
    "Journal",
    "JournalCorrupt",
    "JournalFull",
    "JournalHeader",
    "JournalSalvage",
    "RecordHead",
    "VolumeError",
    "choose_header",
    "decode_header",
    "decode_record_head",
    "encode_header",
    "encode_record",
    "record_size",
]


class JournalCorrupt(HeaderCorrupt):
    """A damaged record is followed by later records of the journal that vouch for it: not a
    torn tail, so entries that were acknowledged are unreadable.  ``salvage`` says what could
    still be located; the file is left as it was (:meth:`Journal.reset` continues)."""

    def __init__(self, salvage: JournalSalvage) -> None:
        s = salvage
        unknown = ", extent unknown" if s.extent_unknown else ""
        super().__init__(
            f"journal {s.path} is corrupt: the record of seq {s.first_bad_seq} at byte "
            f"{s.first_bad_offset} is damaged and {s.following} valid later record(s) follow "
            f"({len(s.damaged)} damaged region(s){unknown}, {len(s.entries)} entries located)"
        )
        self.path = s.path
        self.salvage = s


_Slot = IndexSlot


class Journal:
    """One group's journal file and its ring, open read-write.  Thread-safe.

    The ring (head, tail, the index of retained records) and the seqs in flight share one
    lock, :class:`~replicator.group_commit.GroupCommit`'s, so that seq order is ring order;
    header rewrites are serialized by a second one."""

    def __init__(self, path: str, fd: int, header: JournalHeader) -> None:
        self.path = path
        self.fd = fd
        self.group = header.group
        self.capacity = header.capacity
        self.journal_id = header.journal_id
        self._hdr = header
        self._gc = GroupCommit(lambda: _fdatasync(fd), header.tail_seq, path)
        self._lock = self._gc.lock
        self._cond = self._gc.cond
        self._meta_lock = threading.Lock()  # serializes header rewrites
        self._index: dict[int, _Slot] = {}
        self._tail = header.tail_pos
        self._first_seq = header.tail_seq
        self._head = header.tail_pos
        self._applied = header.applied_seq
        self._closed = False
        self.appends = 0
        #: what open() found wrong with the header slots (and repaired)
        self.repaired: list[str] = []
        #: which slot to write first: the damaged or stale one, so that a torn write can
        #: never leave only an older header behind
        self._slot_order = (0, 1)

    # -- creating, opening, resetting -------------------------------------------------------

    @classmethod
    def create(cls, path: str, capacity: int, group: str, *, first_seq: int = 1) -> Journal:
        """Create a new journal file (its ring's blocks allocated) and open it.  ``first_seq``
        is the seq the first append will get (a receive journal that starts after an existing
        prefix)."""
        _create_file(path, capacity, group, first_seq)
        return _open_file(cls, path, created=True)

    @classmethod
    def open(cls, path: str) -> Journal:
        """Open and recover: choose the header, rebuild the index by following the chain from
        the tail, bump the epoch (durably, repairing a bad slot).

        :class:`JournalCorrupt` (the file left untouched) when a damaged record is followed
        by later records that vouch for it; :class:`HeaderCorrupt` naming the file when
        neither header slot is valid."""
        return _open_file(cls, path)

    @classmethod
    def reset(cls, path: str, next_seq: int | None = None) -> int:
        """Rewrite the (closed) journal at ``path`` empty, so that its next entry gets
        ``next_seq``; return that seq.  Every entry in it is dropped: fold the salvage of
        :class:`JournalCorrupt` first.

        ``next_seq`` defaults to one past the highest seq the file names anywhere, and may
        not be lower (a seq is never handed out twice); pass a higher one if a peer holds
        higher seqs.  A new journal id and epoch, through the two-slot update: a crash
        leaves the old journal or the empty one (docs/format.md, "Torn tail or
        corruption").  The applied mark becomes ``next_seq - 1``."""
        return _reset_file(path, next_seq)

    # -- header -----------------------------------------------------------------------------

    def _write_header(self) -> None:
        """One slot, sync, the other, sync (caller holds _meta_lock or is single-threaded).
        The first sync also makes every record written before it durable: later records and
        headers vouch for them (``synced_seq``)."""
        slot = encode_header(self._hdr)
        with self._lock:
            written = self._gc.written_upto()
        try:
            for n, i in enumerate(self._slot_order):
                _pwrite_all(self.fd, slot, SLOT_OFFSETS[i])
                os.fdatasync(self.fd)
                if n == 0:
                    with self._cond:
                        self._gc.note_synced(written)
        except OSError as e:
            raise _io_error(e, "header write") from e
        self._slot_order = (0, 1)

    def _commit_header(self, new: JournalHeader) -> None:
        """Make ``new`` (generation bumped here, and the synced mark) the durable header."""
        with self._lock:
            synced = self._gc.synced
        self._hdr = replace(new, generation=self._hdr.generation + 1, synced_seq=synced)
        self._write_header()

    # -- writing ----------------------------------------------------------------------------

    @property
    def sync_appends(self) -> bool:
        """False: append returns once the entry and every earlier one are *written* (in the
        page cache: they survive a crash of the process, kill -9 included), and :meth:`sync`
        makes them durable against power loss, which is the contract of a block device's
        write cache (data is durable after a flush).  True (the default): every append waits
        for an fdatasync (group-committed)."""
        return self._gc.sync_appends

    @sync_appends.setter
    def sync_appends(self, value: bool) -> None:
        self._gc.sync_appends = value

    @property
    def data_syncs(self) -> int:
        """fdatasync calls made for appends (group commit shares them); header syncs excluded."""
        return self._gc.data_syncs

    @property
    def max_entry_bytes(self) -> int:
        """The largest data an entry can carry (:func:`journal_codec.max_entry_bytes`)."""
        return max_entry_bytes(self.capacity)

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"journal {self.path} is closed")
        self._gc.check()

    def append(
        self,
        stream: int,
        kind: EntryKind,
        offset: int,
        data: bytes | memoryview = b"",
        *,
        length: int | None = None,
        fua: bool = False,
        stamp_ns: int | None = None,
        seq: int | None = None,
    ) -> int:
        """Append one entry; return its seq once it (and every earlier entry) is durable.

        ``seq=None`` takes the next seq; an explicit ``seq`` must be exactly the next one.
        :class:`JournalFull` if it does not fit (raised at once; nothing changed)."""
        kind, length = check_entry(stream, kind, offset, len(data), length)
        if stamp_ns is None:
            stamp_ns = time.time_ns()
        dlen = len(data)
        size = record_size(dlen)
        data_crc = crc32c.crc32c(data)  # outside the lock: the data is the big part
        cap = self.capacity
        gc = self._gc
        with self._lock:
            self._check_open()
            if seq is not None and seq != gc.next_seq:
                raise IllegalState(
                    f"journal {self.group}: seq {seq} is not the next one ({gc.next_seq})"
                )
            if dlen > self.max_entry_bytes:
                raise JournalFull(
                    f"journal {self.group}: an entry of {dlen} bytes exceeds the largest this "
                    f"journal holds ({self.max_entry_bytes})"
                )
            start = self._head
            pos = place_record(start, size, cap)
            end = pos + size
            if end - self._tail > cap:
                raise JournalFull(
                    f"journal {self.group} is full: {size} bytes needed, "
                    f"{cap - (self._head - self._tail)} of {cap} free"
                )
            # The record vouches for the ones before it (module docstring).
            my_seq, written, synced = gc.reserve()
            self._head = end
            epoch = self._hdr.epoch
            self._index[my_seq] = _Slot(
                start, pos, end, stream, kind, offset, length, fua, stamp_ns, epoch
            )
        jid = self.journal_id
        try:
            if pos != start:
                marker = encode_record(
                    journal_id=jid,
                    epoch=epoch,
                    seq=my_seq,
                    kind=KIND_WRAP,
                    written_seq=written,
                    synced_seq=synced,
                )
                _pwrite_all(self.fd, marker, RING_OFFSET + start % cap)
            rec = encode_record_parts(
                journal_id=jid,
                epoch=epoch,
                seq=my_seq,
                kind=kind,
                stream=stream,
                offset=offset,
                length=length,
                data=data,
                fua=fua,
                stamp_ns=stamp_ns,
                data_crc=data_crc,
                written_seq=written,
                synced_seq=synced,
            )
            _pwritev_all(self.fd, rec, RING_OFFSET + pos % cap)  # the data is not copied
        except OSError as e:
            err = _io_error(e, f"write of seq {my_seq}")
            with self._cond:
                gc.fail(err)
            raise err from e
        with self._cond:
            gc.written(my_seq)
            gc.wait(my_seq)
            self.appends += 1
        return my_seq

    def sync(self) -> None:
        """Make every entry appended so far durable (one fdatasync, shared)."""
        with self._cond:
            self._check_open()
            self._gc.sync()

    def release(self, upto_seq: int) -> None:
        """Drop the entries <= ``upto_seq``; the new tail is durable before their space is
        free.  Releasing what is already released is a no-op."""
        with self._meta_lock:
            self._move_marks(applied=None, upto=upto_seq)

    def set_applied(self, seq: int) -> None:
        """Durably record that the entries <= ``seq`` are applied (never decreases)."""
        with self._meta_lock:
            self._move_marks(applied=seq, upto=None)

    def set_applied_and_release(self, seq: int) -> None:
        """:meth:`set_applied` and then :meth:`release` of ``seq``, in ONE header commit (the
        secondary's applier, once per batch: two fdatasyncs instead of four).  The two-slot
        update makes it atomic: a crash leaves the old header or the new one, never the
        applied mark moved without the release or the reverse.  The same checks and errors
        as the two (the applied mark's first)."""
        with self._meta_lock:
            self._move_marks(applied=seq, upto=seq)

    def _move_marks(self, *, applied: int | None, upto: int | None) -> None:
        """Commit :meth:`_marks_header` (caller holds _meta_lock), then let the ring and
        the applied mark follow the header now durable."""
        with self._lock:
            new = self._marks_header(applied, upto)
        if new is None:
            return
        self._commit_header(new)
        with self._lock:
            for s in range(self._first_seq, new.tail_seq):
                del self._index[s]
            self._first_seq = new.tail_seq
            self._tail = new.tail_pos
            self._applied = new.applied_seq

    def _marks_header(self, applied: int | None, upto: int | None) -> JournalHeader | None:
        """The header with the applied mark at ``applied`` and the entries <= ``upto``
        released (None: that mark stays), after the checks of :meth:`set_applied` and
        :meth:`release`; None when neither moves (caller holds _lock and _meta_lock)."""
        self._check_open()
        durable = self._gc.durable
        new = self._hdr
        if applied is not None:
            if applied > durable:
                raise IllegalState(
                    f"journal {self.group}: applied seq {applied} is past the newest entry "
                    f"{durable}"
                )
            if applied < self._applied:
                raise IllegalState(
                    f"journal {self.group}: applied seq {applied} is behind {self._applied}"
                )
            if applied > self._applied:
                new = replace(new, applied_seq=applied)
        if upto is not None:
            if upto > durable:
                raise IllegalState(
                    f"journal {self.group}: cannot release up to {upto}; "
                    f"the newest durable entry is {durable}"
                )
            if upto >= self._first_seq:
                nxt = self._index.get(upto + 1)
                # A record found at the new tail later must be the one the index holds, or
                # one appended from now on: never one a recovery discarded (module docstring).
                new = replace(
                    new,
                    tail_pos=nxt.start if nxt is not None else self._head,
                    tail_seq=upto + 1,
                    tail_epoch=nxt.epoch if nxt is not None else self._hdr.epoch,
                )
        return None if new is self._hdr else new

    def drop_all(self, record: Callable[[list[Entry]], None] | None = None) -> list[Entry]:
        """Release every durable entry and return them (WRITE entries without their data).
        Durable before it returns.  ``record`` (a fold) gets them first, and must make them
        durable elsewhere (stream/offset/length in a bitmap) before it returns: a crash
        between the two then leaves them in both places, never in neither."""
        with self._meta_lock:
            with self._lock:
                self._check_open()
                upto = self._gc.durable
                dropped = [_entry(s, self._index[s], b"") for s in range(self._first_seq, upto + 1)]
            if dropped:
                if record is not None:
                    record(dropped)
                self._move_marks(applied=None, upto=upto)
        return dropped

    # -- reading ----------------------------------------------------------------------------

    def entries(self, from_seq: int, max_bytes: int | None = None) -> Iterator[Entry]:
        """The retained entries from ``from_seq`` up to the newest durable one at the time of
        the call, in order.  :class:`NotFound` if ``from_seq`` is already released.  With
        ``max_bytes``, stops before the data would exceed it (but yields at least one)."""
        with self._lock:
            self._check_open()
            if from_seq < self._first_seq:
                raise NotFound(
                    f"journal {self.group}: seq {from_seq} is released "
                    f"(oldest retained is {self._first_seq})"
                )
            last = self._gc.durable
        return self._iter(from_seq, last, max_bytes)

    def _iter(self, first: int, last: int, max_bytes: int | None) -> Iterator[Entry]:
        total = 0
        data: bytes | memoryview
        for seq in range(first, last + 1):
            with self._lock:
                self._check_open()
                slot = self._index.get(seq)
            if slot is None:
                raise NotFound(f"journal {self.group}: seq {seq} was released while reading")
            if slot.kind is EntryKind.WRITE:
                if max_bytes is not None and seq > first and total + slot.length > max_bytes:
                    return
                total += slot.length
                data = self._read_data(seq, slot)
            else:
                data = b""
            yield _entry(seq, slot, data)

    def _read_data(self, seq: int, slot: _Slot) -> memoryview:
        ring = slot.pos % self.capacity
        n = REC_HEADER_LEN + slot.length
        try:
            raw = os.pread(self.fd, n, RING_OFFSET + ring)
        except OSError as e:
            raise _io_error(e, f"read of seq {seq}") from e
        data = record_data(raw, seq, slot.length)
        if data is not None:
            return data
        with self._lock:
            if seq < self._first_seq:
                raise NotFound(f"journal {self.group}: seq {seq} was released while reading")
        raise VolumeError(f"journal {self.group}: record of seq {seq} is damaged on disk")

    # -- state ------------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        return self._first_seq

    @property
    def last_seq(self) -> int:
        """The newest durable seq (0 if nothing was ever appended); survives release."""
        return self._gc.durable

    @property
    def _durable(self) -> int:  # the name tests and the spies use
        return self._gc.durable

    @property
    def next_seq(self) -> int:
        """The seq the next append gets (an explicit ``seq=`` must equal it)."""
        return self._gc.next_seq

    @property
    def applied_seq(self) -> int:
        return self._applied

    @property
    def epoch(self) -> int:
        return self._hdr.epoch

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._head - self._tail

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    def bytes_from(self, seq: int) -> int:
        """The ring bytes the retained entries from ``seq`` on occupy (0 if none)."""
        with self._lock:
            first = max(seq, self._first_seq)
            slot = self._index.get(first)
            return self._head - slot.start if slot is not None else 0

    @property
    def count(self) -> int:
        """Retained durable entries."""
        return self._gc.durable - self._first_seq + 1

    def usage(self) -> float:
        return self.used_bytes / self.capacity

    @property
    def oldest_stamp_ns(self) -> int | None:
        with self._lock:
            s = self._index.get(self._first_seq)
            return s.stamp_ns if s is not None and self._first_seq <= self._gc.durable else None

    def stamp_ns(self, seq: int) -> int | None:
        """When entry ``seq`` was written (its stamp), if it is retained and durable."""
        with self._lock:
            s = self._index.get(seq)
            retained = s is not None and self._first_seq <= seq <= self._gc.durable
            return s.stamp_ns if s is not None and retained else None

    @property
    def newest_stamp_ns(self) -> int | None:
        with self._lock:
            if self._gc.durable < self._first_seq:
                return None
            return self._index[self._gc.durable].stamp_ns

    def close(self) -> None:
        """Wait for appends in progress, then close.  Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            # Every reserved entry must finish (its appender flushes it) before the fd goes.
            self._gc.drain()
            os.close(self.fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the file ---------------------------------------------------------------------------------


def _io_error(e: OSError, doing: str) -> VolumeError:
    return VolumeError(f"journal {doing}: {e.strerror}", e.errno or errno.EIO)


def _fdatasync(fd: int) -> None:
    try:
        os.fdatasync(fd)
    except OSError as e:
        raise _io_error(e, "fdatasync") from e


def _entry(seq: int, slot: _Slot, data: bytes | memoryview) -> Entry:
    return Entry(
        seq, slot.stream, slot.kind, slot.offset, slot.length, data, slot.fua, slot.stamp_ns
    )


def _create_file(path: str, capacity: int, group: str, first_seq: int) -> None:
    """A new, empty journal file at ``path`` (its ring reserved), durable, or nothing at all."""
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise UsageError(f"journal capacity {capacity!r} is not an integer")
    if capacity < MIN_CAPACITY or capacity % CAPACITY_ALIGN:
        raise UsageError(
            f"journal capacity {capacity} must be at least {MIN_CAPACITY} bytes "
            f"and a multiple of {CAPACITY_ALIGN}"
        )
    if not 1 <= first_seq < _U64 // 2:
        raise UsageError(f"first seq {first_seq} is out of range")
    check_name(group, what="group name")
    if os.path.lexists(path):
        raise AlreadyExists(f"journal {path} already exists")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise NotFound(f"directory {directory} does not exist")
    header = JournalHeader(
        journal_id=secrets.randbits(64),
        capacity=capacity,
        group=group,
        created_ns=time.time_ns(),
        epoch=1,
        tail_pos=0,
        tail_seq=first_seq,
        synced_seq=first_seq - 1,
    )
    # Build under a temporary name and link() it in: a crash leaves no journal or a
    # complete one, and link() refuses to replace a file that appeared meanwhile.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.creating-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _io_error(e, f"create {tmp}") from e
    try:
        # Every block reserved, not left sparse (posix_fallocate also sets the size), as a
        # journal volume's capacity is when it is made: a file system without room refuses
        # the journal here with ENOSPC, not a client's write (the append that found no
        # block) later.  It writes nothing (the ring reads as zeros, as holes do; 3 ms for
        # 256 MiB here).  Writing the ring with zeros instead made a first lap's appends
        # faster alone (560 against 890 µs per MiB) but not the async end-to-end rate, and
        # costs 0.6 s per GiB (docs/benchmarks.md, session 18).
        os.posix_fallocate(fd, 0, RING_OFFSET + capacity)
        slot = encode_header(header)
        for off in SLOT_OFFSETS:
            _pwrite_all(fd, slot, off)
        os.fsync(fd)
        try:
            os.link(tmp, path)
        except FileExistsError as e:
            raise AlreadyExists(f"journal {path} already exists") from e
    except OSError as e:
        raise _io_error(e, f"create {path}") from e
    finally:
        os.close(fd)
        os.unlink(tmp)
    fsync_dir(directory)


def _open_file(cls: type[Journal], path: str, *, created: bool = False) -> Journal:
    """:meth:`Journal.open`; ``created``: the file was just built empty by
    :func:`_create_file` (a ring that reads as zeros): recovery has nothing to follow, and
    its scan would read the whole ring for nothing (O(capacity): 0.4 s for 256 MiB here)."""
    fd = _open_locked(path)
    try:
        header, notes, order = _read_header(path, fd)
        j = cls(path, fd, header)
        j._slot_order = order
        if created:
            rec = Recovery({}, header.tail_pos, header.tail_seq - 1, None)
        else:
            rec = recover(_ring_reader(fd), header, same_boot=_same_boot(header), path=path)
        if rec.salvage is not None:
            raise JournalCorrupt(rec.salvage)
        j._index, j._head = rec.slots, rec.head
        # One sync makes what recovery saw durable (page cache left by a killed process),
        # then the new epoch goes to both slots before anything can be appended.
        os.fdatasync(fd)
        j._gc.recovered(rec.last_seq)
        epoch = header.epoch + 1
        tail_epoch = j._index[j._first_seq].epoch if j._index else epoch
        j._commit_header(replace(header, epoch=epoch, tail_epoch=tail_epoch, boot_id=_boot_id()))
        j.repaired = notes
        return j
    except OSError as e:
        os.close(fd)
        raise _io_error(e, f"open {path}") from e
    except BaseException:
        os.close(fd)
        raise


def _reset_file(path: str, next_seq: int | None) -> int:
    """:meth:`Journal.reset`."""
    fd = _open_locked(path)
    try:
        header, _notes, order = _read_header(path, fd)
        floor = highest_seq(_ring_reader(fd), header) + 1
        if next_seq is None:
            next_seq = floor
        if not floor <= next_seq < _U64 // 2:
            raise IllegalState(
                f"journal {path}: cannot continue at seq {next_seq}; seqs up to "
                f"{floor - 1} were used already"
            )
        jid = secrets.randbits(64)
        while jid == header.journal_id:
            jid = secrets.randbits(64)
        epoch = header.epoch + 1
        new = replace(
            header,
            journal_id=jid,
            generation=header.generation + 1,
            epoch=epoch,
            tail_pos=0,
            tail_seq=next_seq,
            applied_seq=next_seq - 1,
            tail_epoch=epoch,
            synced_seq=next_seq - 1,
            boot_id=_boot_id(),
        )
        slot = encode_header(new)
        for i in order:
            _pwrite_all(fd, slot, SLOT_OFFSETS[i])
            os.fdatasync(fd)
        return next_seq
    except OSError as e:
        raise _io_error(e, f"reset {path}") from e
    finally:
        os.close(fd)


def _open_locked(path: str) -> int:
    """Open a journal file read-write with its exclusive lock (released by closing)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise NotFound(f"journal {path} does not exist") from e
    except IsADirectoryError as e:
        raise UsageError(f"journal path {path} is a directory") from e
    except OSError as e:
        raise _io_error(e, f"open {path}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise IllegalState(f"journal {path} is open elsewhere") from e
    except OSError as e:
        os.close(fd)
        raise _io_error(e, f"lock {path}") from e
    return fd


def _read_header(path: str, fd: int) -> tuple[JournalHeader, list[str], tuple[int, int]]:
    """The header, what is wrong with the slots, and the order to rewrite them in (the bad
    slot first).  :class:`HeaderCorrupt` naming the file if no slot is valid."""
    slots = [os.pread(fd, SLOT_SIZE, off) for off in SLOT_OFFSETS]
    try:
        header, notes = choose_header(slots[0], slots[1])
    except HeaderCorrupt as e:
        raise HeaderCorrupt(f"journal {path}: {e}") from e
    size = os.fstat(fd).st_size
    if size < RING_OFFSET + header.capacity:
        raise HeaderCorrupt(
            f"journal {path} is {size} bytes; its header needs {RING_OFFSET + header.capacity}"
        )
    return header, notes, ((1, 0) if notes and notes[0].startswith("slot B") else (0, 1))


def _ring_reader(fd: int) -> RingRead:
    return lambda off, n: os.pread(fd, n, RING_OFFSET + off)


def _boot_id() -> bytes:
    """This boot's id (Linux), or zeros when unknown (then no boot counts as the same)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)


def _same_boot(h: JournalHeader) -> bool:
    return h.boot_id != bytes(16) and h.boot_id == _boot_id()


def _pwritev_all(fd: int, parts: Sequence[bytes | memoryview], offset: int) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = os.pwritev(fd, views, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"pwritev returned {n}")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite returned {n}")
        view = view[n:]
        offset += n
