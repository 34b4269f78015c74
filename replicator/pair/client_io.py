"""The client write path of a paired volume: the policy for each write, and the handles.

:class:`ClientWrites` (one per side) carries out a client write under the side's I/O gate
(shared; commands that need a quiescent point close it), after asking the machine for a
:class:`~replicator.pair_state.WriteDecision`:

* ``MIRROR`` (sync, COPY or PAIR): mark the write's extents in the activity log, lock the
  chunks it touches, write locally, send it to the secondary and wait for the
  acknowledgement.  A failure to reach the secondary suspends the pair (PSUE): with
  ``fence=never`` the chunks go into the difference bitmap and the client gets success; with
  ``fence=data`` the client gets EIO.  The chunk locks order a client write and the copy of
  the same chunk strictly, so the copy can never carry older data over a newer write.
* ``JOURNAL`` (async): append to the group journal (sequenced), then write locally.
* ``LOCAL_RECORD`` (split, suspended, taken over): the chunks' bits go into the difference
  bitmap, durably, *before* the write is issued.
* ``REFUSE_*``: EPERM (hidden secondary) or EIO (fenced, stale) with one log line.

:class:`BoundHandle` is one client connection on a node; it follows its volume's current
role (docs/decisions.md, "Open connections follow the volume's role").
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

from replicator import pair_state as ps
from replicator import wire
from replicator.errors import ConnectionFailed, Timeout, VolumeError
from replicator.export import INFLIGHT, ExportHandle, get_ident
from replicator.header import Role
from replicator.peer_link import PeerRefused
from replicator.pvid import format_pvid

if TYPE_CHECKING:
    from replicator.pair.side import Side


class ClientWrites:
    """The client write path of one side."""

    def __init__(self, side: Side) -> None:
        self.side = side

    def client_write(
        self,
        offset: int,
        length: int,
        local: Callable[[], None],
        remote: Callable[[], wire.Message],
    ) -> None:
        """One client write (pwrite, zero, trim): the policy, then the local and remote parts."""
        side = self.side
        with side.gate.shared():
            if not side.check_image():
                raise VolumeError(f"pair {side.id}: {side.damaged}", errno.EIO)
            decision = side.machine.write_decision()
            if decision is ps.WriteDecision.LOCAL:
                local()
                return
            if decision is ps.WriteDecision.LOCAL_RECORD:
                self._refuse_pending(offset, length)
                side.mark_dirty(offset, length)
                local()
                return
            if decision is ps.WriteDecision.JOURNAL:
                self._journal_write(offset, length, local, remote)
                return
            if decision is not ps.WriteDecision.MIRROR:
                side.host.log_refusal(side, decision)
                raise VolumeError(f"pair {side.id}: {ps._WRITE_WHY[decision]}", decision.errno)
            self._mirror(offset, length, local, remote)

    def _mirror(
        self,
        offset: int,
        length: int,
        local: Callable[[], None],
        remote: Callable[[], wire.Message],
    ) -> None:
        side = self.side
        cs = side.chunk_size
        extents = side.al.enter(offset, length)
        try:
            with side.chunk_locks.hold(offset // cs, (offset + max(length, 1) - 1) // cs):
                local()
                try:
                    side.request(remote())
                    return
                except (ConnectionFailed, Timeout, PeerRefused) as e:
                    failure = e
            # The secondary did not take the write: suspend, then apply the fence policy.
            side.mark_dirty(offset, length)
            side.link_failed(f"write to the secondary failed: {failure}")
            if side.record.fence is ps.Fence.DATA:
                side.log(
                    f"pair {side.id}: fence=data: write at {offset} refused with EIO, "
                    "the secondary cannot be updated"
                )
                raise VolumeError(
                    f"pair {side.id}: fence=data and the secondary cannot be updated",
                    errno.EIO,
                )
        finally:
            side.al.leave(extents)

    def _journal_write(
        self,
        offset: int,
        length: int,
        local: Callable[[], None],
        remote: Callable[[], wire.Message],
    ) -> None:
        """Async: journal first (durable, sequenced), then the volume.  The chunk locks order
        the write against a running copy of the same chunks."""
        side = self.side
        msg = remote()
        assert isinstance(msg, wire.Write | wire.Zero)
        cs = side.chunk_size
        group = side.host.primary_group(side)
        with side.chunk_locks.hold(offset // cs, (offset + max(length, 1) - 1) // cs):
            seq = group.record(side, msg)
            if seq is None:
                side.mark_dirty(offset, length)  # journal full or folded: recorded instead
            try:
                local()
            finally:
                if seq is not None:
                    group.written_locally(seq)

    def client_flush(self, local: Callable[[], None]) -> None:
        side = self.side
        with side.gate.shared():
            local()
            if side.is_async and side.record.role is Role.PRIMARY:
                group = side.host.existing_group(side)
                if group is not None:
                    group.journal.sync()  # what the client wrote is now power-safe here
            if side.machine.write_decision() is ps.WriteDecision.MIRROR:
                try:
                    side.request(wire.Flush(side.id))
                except (ConnectionFailed, Timeout, PeerRefused) as e:
                    side.link_failed(f"flush on the secondary failed: {e}")
                    if side.record.fence is ps.Fence.DATA:
                        raise VolumeError(
                            f"pair {side.id}: fence=data and the secondary cannot be flushed",
                            errno.EIO,
                        ) from e

    # -- chunks this side never received (a forced takeover of an incomplete copy) ----------

    def pending(self, offset: int, length: int) -> int | None:
        """The first chunk of ``[offset, offset + length)`` that this side never received
        (after a forced takeover of an incomplete copy), or None."""
        side = self.side
        if side.record.state is not ps.State.SSWS or not side.record.copy_incomplete:
            return None
        cs = side.chunk_size
        with side.bitmap_lock:
            for c in range(offset // cs, (offset + max(length, 1) - 1) // cs + 1):
                if side.copy_map.test(c):
                    return c
        return None

    def refuse_pending_read(self, offset: int, length: int) -> None:
        chunk = self.pending(offset, length)
        if chunk is not None:
            self._pending_error(chunk, "read")

    def _refuse_pending(self, offset: int, length: int) -> None:
        chunk = self.pending(offset, length)
        if chunk is not None:
            self._pending_error(chunk, "write")

    def _pending_error(self, chunk: int, what: str) -> None:
        side = self.side
        side.host.log_refusal(side, f"pending {what}")
        raise VolumeError(
            f"pair {side.id}: chunk {chunk} was never copied here before the forced takeover "
            f"and has not been pulled from the old primary yet: {what} refused",
            errno.EIO,
        )


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
            side.writes.refuse_pending_read(offset, len(buf))
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
        side.writes.client_write(
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
        side.writes.client_write(
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

        side.writes.client_write(
            offset, count, local, lambda: wire.Zero(pid, offset, count, fua, True)
        )

    def flush(self) -> None:
        side = self._policy()
        if side is None:
            ExportHandle.flush(self)
            return
        side.writes.client_flush(lambda: ExportHandle.flush(self))

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
