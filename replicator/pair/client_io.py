"""The client write path of a paired volume: the policy for each write, and the handles.

:class:`ClientWrites` (one per volume, :mod:`~replicator.pair.volume_legs`) carries out a
client write under the I/O gate of each of the volume's legs (shared; commands that need a
quiescent point close it), after asking each leg's machine for a
:class:`~replicator.pair_state.WriteDecision`:

* ``MIRROR`` (sync, COPY or PAIR): mark the write's extents in the activity log, lock the
  chunks it touches, send it to the secondary, write locally while the secondary does, and
  wait for the acknowledgement.  A local write that fails after the send suspends the pair
  (PSUE) with the chunks in its bitmap: the secondary may hold what this volume does not.
  A failure to reach the secondary suspends the pair (PSUE): with ``fence=never`` the
  chunks go into the difference bitmap and the client gets success; with ``fence=data``
  the client gets EIO.  The chunk locks order a client write and the copy of the same
  chunk strictly, so the copy can never carry older data over a newer write.
* ``JOURNAL`` (async): append to the group journal (sequenced), then write locally.
* ``LOCAL_RECORD`` (split, suspended, taken over): the chunks' bits go into the difference
  bitmap, durably, *before* the write is issued.  A side taken over before its copy was
  complete, still pulling, follows the plan of :func:`replicator.pair.hydration.write`
  under the chunk locks of the write: a chunk it lacks is fetched first, unless the write
  covers all of it; such a whole chunk is written and synced *before* its bit.
* ``REFUSE_*``: EPERM (hidden secondary) or EIO (fenced, stale) with one log line.

A volume in several pairs applies every leg's decision to the one write (refused if any leg
refuses); a change that arrives through the volume's receiving leg is carried on to the legs
it is the primary of (:meth:`ClientWrites.forward_write`).

:class:`BoundHandle` is one client connection on a node; it follows its volume's current
role (docs/decisions.md, "Open connections follow the volume's role").
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from replicator import pair_state as ps
from replicator import wire
from replicator.errors import ConnectionFailed, PairvolError, Timeout, VolumeError
from replicator.export import INFLIGHT, ExportHandle, get_ident
from replicator.header import Role
from replicator.pair import hold, hydration
from replicator.pair.hydration import Step
from replicator.pair.pull import PullEngine, carry_out, chunk_bits
from replicator.peer_link import PeerRefused
from replicator.pvid import format_pvid

if TYPE_CHECKING:
    from replicator.pair.side import Side
    from replicator.pair.volume_legs import VolumeLegs


#: The decisions under which a write goes ahead (every other one is a refusal).
_GOES_AHEAD = frozenset(
    {
        ps.WriteDecision.LOCAL,
        ps.WriteDecision.LOCAL_RECORD,
        ps.WriteDecision.JOURNAL,
        ps.WriteDecision.MIRROR,
    }
)
_LINK_ERRORS = (ConnectionFailed, Timeout, PeerRefused)


class ClientWrites:
    """The write path of one volume: every write, whoever makes it, under every leg's policy.

    One write goes to the local volume once, and to each leg as its machine decides, in this
    order: every leg's gate (shared, in the legs' fixed order); the activity log if a leg
    mirrors; the chunk locks of a leg still pulling (first: the pull holds one while it
    carries a chunk on to the other legs) and the steps of its plan up to the write; the
    chunk locks of the legs that mirror or journal; each journaling leg's entry and each
    recording leg's bits (both durable *before* the local write); the mirrored legs'
    requests sent; the local write; the pulling legs' steps after it; the mirrored legs'
    answers.  A mirrored leg that fails is suspended and its chunks recorded before the
    activity log lets go of them; ``fence=data`` then fails the write.
    """

    def __init__(self, legs: VolumeLegs) -> None:
        self.legs = legs

    def client_write(
        self,
        offset: int,
        length: int,
        local: Callable[[], None],
        remote: Callable[[str], wire.Message],
    ) -> None:
        """A client's write (pwrite, zero, trim): refused if any leg refuses it."""
        self._write(self.legs.sides(), False, offset, length, local, remote)

    def forward_write(
        self,
        origin: Side,
        offset: int,
        length: int,
        local: Callable[[], None],
        remote: Callable[[str], wire.Message],
    ) -> None:
        """A change that arrived through the receiving leg ``origin`` (a replicated write,
        a copied chunk, an applied journal entry): written locally and carried on to every
        leg this volume is the primary of (the middle of a cascade).  A leg that would
        refuse a client records the change in its difference bitmap instead: the volume
        must take what its primary sends."""
        legs = self.legs.forward_legs(origin)
        if not legs:
            local()
            return
        self._write(legs, True, offset, length, local, remote)

    def _write(
        self,
        legs: tuple[Side, ...],
        forwarding: bool,
        offset: int,
        length: int,
        local: Callable[[], None],
        remote: Callable[[str], wire.Message],
    ) -> None:
        with contextlib.ExitStack() as held:
            for leg in legs:
                held.enter_context(leg.gate.shared())
            plan = [(leg, self._decide(leg, forwarding)) for leg in legs]
            extents = None
            if any(d is ps.WriteDecision.MIRROR for _, d in plan):
                extents = self.legs.al.enter(offset, length)
            try:
                failed = self._carry_out(plan, offset, length, local, remote)
                for leg, failure in failed:
                    # The secondary did not take the write: suspend, then the fence policy.
                    leg.mark_dirty(offset, length)
                    leg.link_failed(f"write to the secondary failed: {failure}")
                for leg, _ in failed:
                    if leg.record.fence is ps.Fence.DATA and not forwarding:
                        leg.log(
                            f"pair {leg.id}: fence=data: write at {offset} refused with EIO, "
                            "the secondary cannot be updated"
                        )
                        raise VolumeError(
                            f"pair {leg.id}: fence=data and the secondary cannot be updated",
                            errno.EIO,
                        )
                if not forwarding:
                    self._not_fenced_since(legs)
            finally:
                if extents is not None:
                    self.legs.al.leave(extents)

    @staticmethod
    def _not_fenced_since(legs: tuple[Side, ...]) -> None:
        """A client write (or flush) is acknowledged only if no leg was fenced while it was
        in flight (``pair fence`` sets the hold under the same lock, and never waits)."""
        for leg in legs:
            with leg.ack_lock:
                why = hold.refusal(leg)
                if why is not None:
                    leg.host.log_refusal(leg, why)
                    raise VolumeError(
                        f"pair {leg.id}: {why} while the write was in flight: not acknowledged",
                        errno.EIO,
                    )

    def _decide(self, leg: Side, forwarding: bool) -> ps.WriteDecision:
        if not leg.check_image():
            raise VolumeError(f"pair {leg.id}: {leg.damaged}", errno.EIO)
        decision = leg.machine.write_decision()
        why = None if forwarding else hold.refusal(leg)  # the primary's changes are taken
        if why is not None and decision is not ps.WriteDecision.REFUSE_HIDDEN:
            leg.host.log_refusal(leg, why)
            raise VolumeError(f"pair {leg.id}: {why}: write refused", errno.EIO)
        if decision in _GOES_AHEAD:
            return decision
        if forwarding:
            leg.host.log_refusal(leg, f"forwarded change recorded ({decision})")
            return ps.WriteDecision.LOCAL_RECORD
        leg.host.log_refusal(leg, decision)
        raise VolumeError(f"pair {leg.id}: {ps._WRITE_WHY[decision]}", decision.errno)

    def _carry_out(
        self,
        plan: list[tuple[Side, ps.WriteDecision]],
        offset: int,
        length: int,
        local: Callable[[], None],
        remote: Callable[[str], wire.Message],
    ) -> list[tuple[Side, Exception]]:
        """The steps under the chunk locks; the mirrored legs that failed."""
        failed: list[tuple[Side, Exception]] = []
        journaled: list[tuple[Side, int]] = []
        with contextlib.ExitStack() as locks:
            pulling = [
                (leg, self._before_write(leg, offset, length, locks))
                for leg, d in plan
                if d is ps.WriteDecision.LOCAL_RECORD and self._pulling(leg)
            ]
            pulled = [leg for leg, _ in pulling]
            for leg, d in plan:
                if d is ps.WriteDecision.LOCAL_RECORD:
                    if leg not in pulled:
                        leg.mark_dirty(offset, length)
                elif d is ps.WriteDecision.MIRROR or d is ps.WriteDecision.JOURNAL:
                    # The chunk locks order the write against a copy of the same chunks.
                    cs = leg.chunk_size
                    last = (offset + max(length, 1) - 1) // cs
                    locks.enter_context(leg.chunk_locks.hold(offset // cs, last))
                    if d is ps.WriteDecision.JOURNAL:
                        seq = self._journal(leg, offset, length, remote)
                        if seq is not None:
                            journaled.append((leg, seq))
            # The mirrored legs' requests go first: the secondaries write while this node
            # does (the activity log already covers the chunks, should it crash meanwhile).
            sent: list[tuple[Side, Callable[[], wire.Message]]] = []
            for leg, d in plan:
                if d is ps.WriteDecision.MIRROR:
                    try:
                        sent.append((leg, leg.send(remote(leg.id))))
                    except _LINK_ERRORS as e:
                        failed.append((leg, e))
            try:
                local()
            except BaseException as e:
                self._local_failed(sent, offset, length, e)
                raise
            finally:
                for leg, seq in journaled:
                    leg.host.primary_group(leg).written_locally(seq)
            for leg, steps in pulling:
                carry_out(leg, steps, held=True)  # a whole chunk written without a fetch
            for leg, answer in sent:
                try:
                    answer()
                except _LINK_ERRORS as e:
                    failed.append((leg, e))
        return failed

    @staticmethod
    def _local_failed(
        sent: list[tuple[Side, Callable[[], wire.Message]]],
        offset: int,
        length: int,
        error: BaseException,
    ) -> None:
        """The local write failed after the mirrored legs were sent it: their secondaries
        may hold a write this volume does not.  The chunks go into each leg's bitmap and the
        leg is suspended (PSUE, a disk error), so that nothing reports it identical; the
        client gets the local error."""
        for leg, answer in sent:
            with contextlib.suppress(*_LINK_ERRORS):
                answer()
            with contextlib.suppress(PairvolError, OSError):
                leg.mark_dirty(offset, length)
            leg.suspend_for_disk(
                f"the local write at {offset} ({length} bytes) failed after the secondary "
                f"was sent it: {error}"
            )

    def _journal(
        self, leg: Side, offset: int, length: int, remote: Callable[[str], wire.Message]
    ) -> int | None:
        """Async: the journal entry (durable, sequenced) before the volume; None when the
        write is recorded in the bitmap instead (the journal is full, or folded)."""
        msg = remote(leg.id)
        assert isinstance(msg, wire.Write | wire.Zero)
        seq = leg.host.primary_group(leg).record(leg, msg)
        if seq is None:
            leg.mark_dirty(offset, length)
        return seq

    def client_flush(self, local: Callable[[], None]) -> None:
        self._flush(self.legs.sides(), False, local)

    def forward_flush(self, origin: Side, local: Callable[[], None]) -> None:
        """A flush that arrived through the receiving leg, carried on like its writes."""
        self._flush(self.legs.forward_legs(origin), True, local)

    def _flush(self, legs: tuple[Side, ...], forwarding: bool, local: Callable[[], None]) -> None:
        with contextlib.ExitStack() as held:
            for leg in legs:
                held.enter_context(leg.gate.shared())
            local()
            for leg in legs:
                if leg.is_async and leg.record.role is Role.PRIMARY:
                    group = leg.host.existing_group(leg)
                    if group is not None:
                        group.journal.sync()  # what the client wrote is now power-safe here
                if leg.machine.write_decision() is not ps.WriteDecision.MIRROR:
                    continue
                try:
                    leg.request(wire.Flush(leg.id))
                except _LINK_ERRORS as e:
                    leg.link_failed(f"flush on the secondary failed: {e}")
                    if leg.record.fence is ps.Fence.DATA and not forwarding:
                        raise VolumeError(
                            f"pair {leg.id}: fence=data and the secondary cannot be flushed",
                            errno.EIO,
                        ) from e
            if not forwarding:
                self._not_fenced_since(legs)

    # -- chunks a leg never received (a forced takeover of an incomplete copy) ---------------

    @staticmethod
    def _pulling(leg: Side) -> bool:
        """``leg`` was taken over before its copy was complete and still lacks chunks."""
        return leg.record.pulling

    @staticmethod
    def _reachable(leg: Side) -> bool:
        """The old primary can be asked for a chunk now."""
        return isinstance(leg.engine, PullEngine) and leg.machine.link_up

    def pending(self, leg: Side, offset: int, length: int) -> int | None:
        """The first chunk of ``[offset, offset + length)`` that ``leg`` never received
        (after a forced takeover of an incomplete copy), or None."""
        if not self._pulling(leg):
            return None
        cs = leg.chunk_size
        with leg.bitmap_lock:
            for c in range(offset // cs, (offset + max(length, 1) - 1) // cs + 1):
                if leg.copy_map.test(c):
                    return c
        return None

    def refuse_hidden(self) -> None:
        for leg in self.legs.sides():
            if not leg.readable():
                raise VolumeError(
                    f"volume {leg.doc.volume} is the hidden secondary of pair {leg.id}",
                    errno.EPERM,
                )

    def hydrate_read(
        self, offset: int, length: int
    ) -> tuple[list[PullEngine], list[tuple[int, bytes | memoryview]]]:
        """Every chunk of the read that a leg never received is fetched first (copy on
        read), or the read is refused (:func:`replicator.pair.hydration.read`).  Returns the
        pulls of the legs still pulling, and the chunks fetched for it as (byte offset,
        bytes): the caller reads the range here, then lays those over it (their stores into
        the volume may not be done yet; :meth:`PullEngine.fetch_for_read`), and notes the
        read's latency, fetched or local, in the pulls' ReadLatency."""
        engines: list[PullEngine] = []
        fetched: list[tuple[int, bytes | memoryview]] = []
        for leg in self.legs.sides():
            if not self._pulling(leg) or offset < 0 or offset + length > leg.data_size:
                continue  # a range outside the volume: the handle refuses it
            geometry = hydration.Geometry(leg.chunk_size, leg.data_size)
            with leg.bitmap_lock:
                bits = chunk_bits(leg, geometry.span(offset, length))
            plan = hydration.read(geometry, offset, length, bits, self._reachable(leg))
            if plan.refused is not None:
                self._pending_error(leg, plan.refused, "read", "the old primary cannot be reached")
            engine = leg.engine if isinstance(leg.engine, PullEngine) else None
            for action in plan.split(Step.READ)[0]:
                if action.step is not Step.FETCH or engine is None:
                    self._carry(leg, (action,), "read", held=False)
                    continue
                for chunk in action.chunks:
                    try:
                        data = engine.fetch_for_read(chunk)
                    except (PairvolError, OSError) as e:
                        self._pending_error(leg, chunk, "read", f"fetching it failed: {e}")
                    if data is not None:
                        fetched.append((chunk * leg.chunk_size, data))
            if engine is not None:
                engines.append(engine)
        return engines, fetched

    def _before_write(
        self, leg: Side, offset: int, length: int, locks: contextlib.ExitStack
    ) -> tuple[hydration.Action, ...]:
        """A client write on a leg still pulling: the write's chunk locks (held until the
        write is done, so the pull cannot carry older data over it), then the steps of
        :func:`replicator.pair.hydration.write` before the write itself (fetches of chunks
        it writes part of, a sync of chunks pulled since the last one, the written bits of
        the chunks that are here); the steps after the write are returned.  EIO with one
        log line when a fetch is needed and the old primary cannot be reached."""
        geometry = hydration.Geometry(leg.chunk_size, leg.data_size)
        span = geometry.span(offset, length)
        locks.enter_context(leg.chunk_locks.hold(span.start, span[-1]))
        with leg.bitmap_lock:
            bits = chunk_bits(leg, span)
        plan = hydration.write(geometry, offset, length, bits, self._reachable(leg))
        if plan.refused is not None:
            self._pending_error(leg, plan.refused, "write", "the old primary cannot be reached")
        before, after = plan.split(Step.WRITE)
        self._carry(leg, before, "write", held=True)
        return after

    def _carry(
        self, leg: Side, actions: tuple[hydration.Action, ...], what: str, *, held: bool
    ) -> None:
        """Carry out ``actions``; a fetch that fails refuses the client's request (EIO)."""
        for action in actions:
            if action.step is not Step.FETCH:
                carry_out(leg, (action,), held=held)
                continue
            for chunk in action.chunks:
                try:
                    carry_out(leg, (hydration.Action(Step.FETCH, (chunk,)),), held=held)
                except (PairvolError, OSError) as e:
                    self._pending_error(leg, chunk, what, f"fetching it failed: {e}")

    def _pending_error(self, leg: Side, chunk: int, what: str, why: str) -> NoReturn:
        leg.host.log_refusal(leg, f"pending {what}")
        raise VolumeError(
            f"pair {leg.id}: chunk {chunk} was never copied here before the takeover and is "
            f"not here yet ({why}): {what} refused",
            errno.EIO,
        )


class BoundHandle(ExportHandle):
    """A client connection on a storage node.  It follows its volume's *current* role: the
    manager rebinds every open handle of a volume when a pair is created, loaded or deleted
    under it and whenever its PVID changes (:meth:`PairManager.rebind`), so a connection
    opened while the volume was simplex is mirrored or refused like a new one.

    ``legs``: the volume's legs (its pairs), or None (plain: the plugin may take its fast
    path).  ``refusal``: why every request is refused (the PVID the client asked for is gone,
    a pair cannot be loaded, the image is damaged), or None."""

    __slots__ = ("legs", "on_close", "plain", "refusal")

    def __init__(self, handle: ExportHandle) -> None:
        super().__init__(handle.volume, handle.readonly, handle.want_pvid)
        self.legs: VolumeLegs | None = None
        self.refusal: VolumeError | None = None
        self.plain = True
        self.on_close: Callable[[BoundHandle], None] | None = None

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close(self)
        super().close()

    def bind(self, legs: VolumeLegs | None, pvid: int, refusal: VolumeError | None) -> None:
        if refusal is None and self.want_pvid is not None and self.want_pvid != pvid:
            refusal = VolumeError(
                f"volume {self.header.name} now carries PVID {format_pvid(pvid)}, not the "
                f"{format_pvid(self.want_pvid)} this connection was opened for",
                errno.EIO,
            )
        self.legs, self.refusal = legs, refusal
        self.plain = legs is None and refusal is None

    def _policy(self) -> ClientWrites | None:
        if self.refusal is not None:
            raise self.refusal
        return self.legs.writes if self.legs is not None else None

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
        writes = self._policy()
        if writes is None:
            super().pread(buf, offset)
            return
        writes.refuse_hidden()
        t0 = time.monotonic()
        pulls, fetched = writes.hydrate_read(offset, len(buf))
        end = offset + len(buf)
        if not any(at <= offset and end <= at + len(data) for at, data in fetched):
            super().pread(buf, offset)  # else one fetched chunk holds the whole read
        for at, data in fetched:  # the old primary's bytes, maybe not stored here yet
            lo, hi = max(at, offset), min(at + len(data), end)
            if lo < hi:
                buf[lo - offset : hi - offset] = memoryview(data)[lo - at : hi - at]
        for pull in pulls:  # while a takeover's pull runs: fetched against local reads
            pull.reads.note(bool(fetched), time.monotonic() - t0)

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        count = len(buf)
        if offset < 0 or offset + count > self.size:
            raise self._outside(count, offset)
        if self._plain(lambda: ExportHandle.pwrite(self, buf, offset, fua)):
            return
        writes = self._policy()
        if writes is None:  # unbound between the two looks: the plain path again
            ExportHandle.pwrite(self, buf, offset, fua)
            return
        writes.client_write(
            offset,
            count,
            lambda: ExportHandle.pwrite(self, buf, offset, fua),
            lambda pid: wire.Write(pid, offset, buf, fua),
        )

    def zero(self, count: int, offset: int, may_trim: bool, fua: bool) -> None:
        self._check(count, offset)
        if self._plain(lambda: ExportHandle.zero(self, count, offset, may_trim, fua)):
            return
        writes = self._policy()
        if writes is None:
            ExportHandle.zero(self, count, offset, may_trim, fua)
            return
        writes.client_write(
            offset,
            count,
            lambda: ExportHandle.zero(self, count, offset, may_trim, fua),
            lambda pid: wire.Zero(pid, offset, count, fua, may_trim),
        )

    def trim(self, count: int, offset: int, fua: bool) -> None:
        self._check(count, offset)
        if self._plain(lambda: ExportHandle.trim(self, count, offset, fua)):
            return
        writes = self._policy()
        if writes is None:
            ExportHandle.trim(self, count, offset, fua)
            return

        def local() -> None:
            # Mirror a trim as a zero that may punch holes, so both sides read the same.
            ExportHandle.zero(self, count, offset, True, fua)

        writes.client_write(
            offset, count, local, lambda pid: wire.Zero(pid, offset, count, fua, True)
        )

    def flush(self) -> None:
        writes = self._policy()
        if writes is None:
            ExportHandle.flush(self)
            return
        writes.client_flush(lambda: ExportHandle.flush(self))

    def cache(self, count: int, offset: int) -> None:
        writes = self._policy()
        if writes is not None:
            writes.refuse_hidden()
        super().cache(count, offset)

    def extents(self, count: int, offset: int, req_one: bool) -> list[tuple[int, int, int]]:
        writes = self._policy()
        if writes is not None:
            writes.refuse_hidden()
        return super().extents(count, offset, req_one)
