"""Group commit: the sequence numbers in flight and the fdatasyncs that make them durable.

Theory of operation.  Appenders reserve seqs in order with :meth:`GroupCommit.reserve`, under
:attr:`GroupCommit.lock`, which the owner also holds for whatever has to be reserved together
with the seq (the journal's ring space, so that seq order is ring order).  They write their
records without the lock, then call :meth:`~GroupCommit.written` and :meth:`~GroupCommit.wait`.
*Written up to* is the newest seq that, with every seq before it, has been completely written:
the oldest seq still in flight, minus one.  An entry is acknowledged (*durable*) only once every
earlier one is written too (write-back mode) or, with ``sync_appends``, once an fdatasync
started after that has completed.  Whichever waiter finds no flush running does one fdatasync
for everything written so far, with the lock released; the others wait for it.

A failed write or fdatasync breaks it for good: the failing seq is never written, so nothing
after it may be acknowledged, and every later wait raises until the owner is reopened.

The class does no I/O of its own: the owner hands it the fdatasync to call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from replicator.errors import VolumeError


class GroupCommit:
    """Seqs in flight, written and durable marks, and the shared fdatasync.  Every method
    except :meth:`recovered` expects :attr:`lock` held (it is :attr:`cond`'s lock)."""

    def __init__(self, fsync: Callable[[], None], next_seq: int, name: str) -> None:
        #: ``fsync()`` makes everything written durable; it raises VolumeError on failure
        self._fsync = fsync
        self.name = name
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.next_seq = next_seq
        #: acknowledged: this seq and every earlier one are written (write-back) or synced
        self.durable = next_seq - 1
        #: covered by a completed fdatasync
        self.synced = next_seq - 1
        #: True: a wait returns only once an fdatasync covers the seq (see Journal)
        self.sync_appends = True
        #: fdatasync calls made (shared by every waiter of a round)
        self.data_syncs = 0
        self.failed: VolumeError | None = None
        self._inflight: set[int] = set()
        self._flushing = False

    def recovered(self, last_seq: int) -> None:
        """Before any use: every seq up to ``last_seq`` exists and is durable (synced)."""
        self.next_seq = last_seq + 1
        self.durable = self.synced = last_seq

    def check(self) -> None:
        """Raise if an earlier write or fdatasync failed."""
        if self.failed is not None:
            raise VolumeError(
                f"journal {self.name} is broken by an earlier I/O error ({self.failed}); reopen it",
                self.failed.errno,
            )

    def written_upto(self) -> int:
        return min(self._inflight) - 1 if self._inflight else self.next_seq - 1

    def reserve(self) -> tuple[int, int, int]:
        """The next seq, now in flight, and the marks its record vouches with: (seq, written
        up to, synced up to), both below the seq."""
        written = self.written_upto()
        seq = self.next_seq
        self.next_seq += 1
        self._inflight.add(seq)
        return seq, written, self.synced

    def written(self, seq: int) -> None:
        """``seq``'s record is completely written."""
        self._inflight.discard(seq)
        self.cond.notify_all()

    def fail(self, err: VolumeError) -> None:
        """Writing a reserved seq failed: it stays in flight for ever, nothing after it can
        become durable, and every waiter raises."""
        self.failed = err
        self.cond.notify_all()

    def note_synced(self, upto: int) -> None:
        """An fdatasync made outside (a header write) covered everything up to ``upto``."""
        self.synced = max(self.synced, upto)
        self.cond.notify_all()

    def wait(self, seq: int) -> None:
        """Become the flusher or wait for one, until ``seq`` is durable."""
        if not self.sync_appends:
            while self.written_upto() < seq:  # never ahead of an earlier, torn, record
                self.check()
                self.cond.wait()
            self.durable = max(self.durable, self.written_upto())
            return
        while self.durable < seq:
            self.check()
            if not self._flushing and self.written_upto() > self.durable:
                self._flush()
            else:
                self.cond.wait()

    def sync(self) -> None:
        """Until an fdatasync covering everything written so far has completed (shared)."""
        target = self.written_upto()
        while self.synced < target:
            self.check()
            if not self._flushing:
                self._flush()
            else:
                self.cond.wait()

    def drain(self) -> None:
        """Until every reserved seq is durable (or broken) and no flush is running."""
        while self.durable < self.next_seq - 1 and self.failed is None:
            self.cond.wait()
        while self._flushing:
            self.cond.wait()
        self.cond.notify_all()

    def _flush(self) -> None:
        """No flush running: one fdatasync covering every record written so far, the lock
        released meanwhile (the others wait on :attr:`cond`)."""
        target = self.written_upto()
        self._flushing = True
        self.cond.release()
        try:
            self._fsync()
        except BaseException as e:
            self.cond.acquire()
            if isinstance(e, VolumeError):
                self.failed = e
            self._flushing = False
            self.cond.notify_all()
            raise
        self.cond.acquire()
        self.data_syncs += 1
        self.durable = max(self.durable, target)
        self.synced = max(self.synced, target)
        self._flushing = False
        self.cond.notify_all()
