"""The two-sided pair commands: split, resync (and swap), takeover, delete, verify, display.

The rule for every command: the side that is or becomes the *secondary* moves first, then
the primary moves, fetches bitmaps and starts copying (docs/protocol.md, "Pair control").  So
a resync first hides the secondary (its difference bitmap is then frozen), a split stops
writes at the primary (gate closed) while the secondary is told, and a swap demotes the old
primary before the new one copies.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import replace
from errno import EBUSY
from typing import TYPE_CHECKING, Any

from replicator import faults, wire
from replicator import pair_state as ps
from replicator.bitmap import Bitmap
from replicator.errors import (
    ConnectionFailed,
    HeaderCorrupt,
    IllegalState,
    NotFound,
    PairvolError,
    ProtocolError,
    Timeout,
)
from replicator.groups import GroupSecondary
from replicator.header import Role
from replicator.pair.display import describe
from replicator.pair.host import PING_TIMEOUT, REQUEST_TIMEOUT
from replicator.pair.side import Side
from replicator.pair.verify import verify
from replicator.peer_link import PeerRefused

if TYPE_CHECKING:
    from replicator.pair.manager import PairManager


class Commands:
    """The control operations on this node's pairs (the CLI's ``pair ...``)."""

    def __init__(self, manager: PairManager) -> None:
        self.m = manager
        self._reversing: set[str] = set()
        self._reversing_lock = threading.Lock()
        self._reverse_failed: dict[str, str] = {}

    def reverse_due(self) -> None:
        """SPEC 4, issue 11 item 5: a takeover that pulled the old primary's final image,
        once the image is whole here, swaps back on its own (``resync --swap``): the old
        primary becomes the secondary and receives what was written since the takeover, and
        the pair ends reversed in PAIR.  A group goes as one, once all its pulls are done;
        one that is not ready, or whose swap fails (the link went down), waits for the next
        round.  The swap talks to the peer: it runs on a thread of its own."""
        sides = [s for s in list(self.m.sides.values()) if not s.deleted]
        for group in sorted({s.record.group for s in sides if s.doc.reverse_after_pull}):
            members = [s for s in sides if s.record.group == group]
            flagged = [s for s in members if s.doc.reverse_after_pull]
            if not all(_whole_again(s) for s in flagged):
                continue
            targets = [group] if flagged == members else [s.id for s in flagged]
            with self._reversing_lock:
                if group in self._reversing:
                    continue
                self._reversing.add(group)
            threading.Thread(
                target=self._reverse, args=(group, targets), name=f"reverse {group}", daemon=True
            ).start()

    def _reverse(self, group: str, targets: list[str]) -> None:
        try:
            for target in targets:
                self.op_resync({"target": target, "swap": True})
                self.m.events.emit("pair.reverse", target=target)
        except PairvolError as e:
            why = f"group {group}: the swap back after the pull did not start: {e}"
            if self._reverse_failed.get(group) != why:  # once, not every round
                self.m.log(f"{why}; trying again")
            self._reverse_failed[group] = why
        else:
            self._reverse_failed.pop(group, None)
        finally:
            with self._reversing_lock:
                self._reversing.discard(group)

    def _dry_run(self, side: Side, event: ps.Event, link_up: bool | None = None) -> ps.PairRecord:
        trial = ps.PairMachine(
            side.record,
            self.m.clock(),
            heartbeat_interval=self.m.heartbeat_interval,
            heartbeat_timeout=self.m.heartbeat_timeout,
            link_up=side.machine.link_up if link_up is None else link_up,
        )
        trial.handle(event, self.m.clock())
        return trial.record

    def _announce(
        self, side: Side, state: ps.State, role: Role, epoch: int, timeout: float = REQUEST_TIMEOUT
    ) -> None:
        msg = wire.PairState(side.id, str(state), role.label, side.volume.header.pvid, epoch)
        try:
            side.request(msg, timeout)
        except PeerRefused as e:
            raise IllegalState(f"pair {side.id}: the peer refused: {e.message}") from e

    def op_split(self, args: dict[str, Any]) -> dict[str, Any]:
        sides = self.m.select(str(args["target"]), Role.PRIMARY)
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
                s.al.expire_all()  # nothing in flight (gate closed): the log can empty
        # Async: once the secondary has applied everything up to the cut, finish the split.
        timeout = float(args.get("timeout", 120))
        for s in sides:
            if not s.record.draining or s.drain_cut is None:
                continue
            group = self.m.primary_group(s)
            if not group.wait_applied(s.drain_cut, timeout):
                raise Timeout(
                    f"pair {s.id}: the secondary did not apply up to sequence {s.drain_cut} "
                    f"within {timeout:.0f}s; the split is still draining"
                )
            self._announce(s, ps.State.PSUS, Role.PRIMARY, s.record.epoch)
            s.fire(ps.Drained(), tell_peer=False)
            s.drain_cut = None
        for name in {s.record.group for s in sides if s.is_async}:
            g = self.m.primaries.get(name)
            if g is not None:
                g.cut = None
        return {"pairs": [describe(s) for s in sides]}

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
            self.m.log(
                f"pair {side.id}: {what} overwrites {n} chunks written {where} since the pair "
                "was split, suspended or taken over"
            )
            self.m.events.emit("pair.resync.overwrite", pair=side.id, chunks=n, swap=swap)
        return n

    def op_resync(self, args: dict[str, Any]) -> dict[str, Any]:
        swap = bool(args.get("swap", False))
        overwritten: dict[str, int] = {}
        # A local pair's swap is carried out by the side that becomes the primary.
        sides = self.m.select(str(args["target"]), Role.SECONDARY if swap else Role.PRIMARY)
        if args.get("max_rate") is not None:
            for s in sides:
                s.doc.max_rate = int(args["max_rate"])
                s.save()
        for s in sides:
            if not s.machine.link_up:
                self.m.probe(s)
            if not swap and s.record.role is not Role.PRIMARY:
                raise IllegalState(
                    f"pair {s.id}: run resync on the primary's node ({s.doc.peer.label()}), "
                    "or resync --swap here to make this side the primary"
                )
        for s in sides:
            with s.gate.closed():
                peer = s.exchange.query()  # may fence us: then the dry run below refuses
                pulled = swap and _peer_pulled(s, peer)
                event = ps.Resync(swap=swap, peer_epoch=s.doc.peer_epoch, peer_pulled=pulled)
                after = self._dry_run(s, event)
                overwritten[s.id] = 0 if pulled else self._overwritten(s, after.role, swap)
                if s.is_async and after.role is Role.PRIMARY and s.record.group in self.m.primaries:
                    # Nothing shipped before the fold may reach the secondary after it has
                    # discarded what it received: wait for the shipper's requests in flight.
                    self.m.primaries[s.record.group].quiesce()
                if after.role is Role.PRIMARY:
                    # The peer (the secondary afterwards) moves first; then we copy to it.
                    self._announce(s, ps.State.COPY, Role.PRIMARY, after.epoch)
                    s.doc.reverse_after_pull = False  # persisted with the move
                    s.fire(event, tell_peer=False)
                else:
                    # A swap that demotes us: we move first, then the peer copies to us.
                    s.fire(event, tell_peer=False)
                    self._announce(s, ps.State.COPY, Role.SECONDARY, after.epoch)
        return {
            "pairs": [{**describe(s), "discarding_chunks": overwritten.get(s.id, 0)} for s in sides]
        }

    def op_takeover(self, args: dict[str, Any]) -> dict[str, Any]:
        sides = self.m.select(str(args["target"]), Role.SECONDARY)
        force = bool(args.get("force", False))
        reports: dict[str, dict[str, Any]] = {}
        summaries: dict[str, dict[str, Any]] = {}
        for s in sides:  # the pull's limit, this takeover's only (None: the pair's rate)
            s.doc.pull_rate = None if args.get("max_rate") is None else int(args["max_rate"])
            s.save()
        for s in sides:
            if s.is_async and s.record.role is Role.SECONDARY:
                # Apply everything received first: the image is then the newest consistent
                # prefix this side has; report what never arrived.
                g = self.m.secondary_group(s)
                g.drain()
                reports[s.id] = self._rpo_report(g)
            answers = False
            if s.machine.link_up:
                # The old primary's epoch as it is now: the takeover's must be newer.
                try:
                    s.exchange.query(timeout=PING_TIMEOUT)
                    answers = True
                except (ConnectionFailed, Timeout, PeerRefused, ProtocolError) as e:
                    self.m.log(f"pair {s.id}: cannot ask the old primary its epoch: {e}")
            was = s.record.state
            # In COPY the image is half-built: without force, only the old primary's pending
            # bitmap (the pull) makes this side whole, so the move is a pull or nothing.
            copying = was is ps.State.COPY and not force
            event = ps.Takeover(force=force, peer_epoch=s.doc.peer_epoch, pull=copying)
            after = self._dry_run(s, event)
            # The move pulls what it lacks whatever else: a forced takeover of an incomplete
            # copy, or a copy taken over whole.
            must_pull = after.copy_incomplete
            # SPEC 4, no data lost: the old primary's node still answers, so this side takes
            # what it lacks of its final image (the copy not done, the async journal's tail)
            # and pulls it.  The old primary is fenced *before* that is asked, or the chunks
            # pulled could mix two points in time; it is durable here before the record that
            # reveals this side.  (A failure or a crash in between leaves the old primary
            # fenced, this side hidden, and a new takeover outbids the announced epoch.)
            zero_loss = answers and was in (ps.State.PAIR, ps.State.PFUL, ps.State.COPY)
            if copying and not answers:
                raise IllegalState(
                    f"pair {s.id}: the secondary is not consistent until PAIR and the old "
                    "primary does not answer to give what it lacks; use force to take over anyway"
                )
            told = False
            # Every acknowledged write is here: a sync pair in PAIR, or what lacks is pulled.
            whole = not s.is_async and was is ps.State.PAIR
            taken = 0
            if must_pull or zero_loss:
                try:
                    self._announce(s, ps.State.SSWS, Role.SECONDARY, after.epoch, PING_TIMEOUT)
                    told = True
                    pending = s.copies.fetch_pending()
                except (ConnectionFailed, Timeout, PeerRefused, ProtocolError, IllegalState) as e:
                    if must_pull:
                        raise ConnectionFailed(
                            f"pair {s.id}: cannot take the old primary's pending bitmap: {e}; "
                            "not taken over (the old primary stays fenced): try again"
                        ) from e
                    self.m.log(
                        f"pair {s.id}: the old primary cannot give what this side lacks "
                        f"({e}); taking over at this side's last consistent point"
                    )
                else:
                    # Nothing lacking (a sync pair in PAIR): no durable step, as before.
                    need = must_pull or pending.count()
                    taken = s.copies.take_pending(pending) if need else 0
                    if zero_loss and taken:
                        event = replace(event, pull=True)
                    whole = whole or zero_loss
                    if zero_loss and s.id in reports:
                        reports[s.id]["pulled_from_old_primary_chunks"] = taken
            s.doc.reverse_after_pull = event.pull or must_pull  # persisted with the move
            s.fire(event, tell_peer=False)
            summaries[s.id] = {
                "previous": str(was),
                "fenced_old_primary": told,
                "pulled_chunks": taken if event.pull else 0,
                # False is "not known": an async pair whose old primary did not answer lacks
                # what not_received names; a suspended pair, what was written since.
                "zero_loss": whole,
            }
            if s.machine.link_up and not told:
                try:
                    self._announce(s, ps.State.SSWS, Role.SECONDARY, s.record.epoch)
                except (ConnectionFailed, Timeout, IllegalState) as e:
                    self.m.log(f"pair {s.id}: could not tell the old primary: {e}")
        out = []
        for s in sides:
            d = describe(s)
            d["takeover"] = summaries[s.id]
            if s.id in reports:
                d["not_received"] = reports[s.id]
                self.m.events.emit(
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

    def op_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        target = str(args["target"])
        released: list[dict[str, Any]] = []
        for pid in sorted({str(b["id"]) for b in self.m.quarantine._broken_named(target)}):
            released += self.m.quarantine.release_broken(pid)
        try:
            sides = self.m.select(target, Role.PRIMARY)
        except NotFound:
            if released:
                return {"pairs": released}
            raise
        out = released
        force = bool(args.get("force", False))
        delete = ps.Delete(force=force)
        for s in sides:
            with s.gate.closed():
                self._dry_run(s, delete)
                told: str | None = "the link is down"
                if s.machine.link_up:
                    try:
                        self._announce(s, ps.State.SMPL, s.record.role, s.record.epoch)
                        told = None
                    except IllegalState as e:
                        # The peer's machine refused (EBUSY: a side taken over still pulling
                        # from this one): deleting here would strand it.
                        cause = e.__cause__
                        if not force and isinstance(cause, PeerRefused) and cause.code == EBUSY:
                            raise IllegalState(
                                f"{e}; nothing deleted (pair delete --force deletes this side "
                                "anyway)"
                            ) from e
                        told = str(e)
                    except (ConnectionFailed, Timeout) as e:
                        told = str(e)
                if told is not None and s.partner is None:
                    self.m.log(
                        f"pair {s.id}: deleted here, but the peer was not told ({told}); "
                        f"run pair delete {s.id} on {s.doc.peer.label()} as well"
                    )
                pending = s.copy_map.count() if s.record.pulling else 0
                s.fire(delete, tell_peer=False)
                if pending:
                    self.m.log(
                        f"pair {s.id}: deleted by force before its pull was done: {pending} "
                        f"chunks of {s.doc.volume} were never received from the old primary"
                    )
                row = describe(s)
                row["peer_not_told"] = told if s.partner is None else None
                out.append(row)
                self.m.forget(s)
        return {"pairs": out}

    def op_verify(self, args: dict[str, Any]) -> dict[str, Any]:
        sides = self.m.select(str(args["target"]), Role.PRIMARY)
        repair = bool(args.get("repair", False))
        return {"pairs": [verify(s, repair) for s in sides]}

    def op_display(self, args: dict[str, Any]) -> dict[str, Any]:
        target = args.get("target")
        corrupt = (
            self.m.quarantine._broken_named(str(target))
            if target
            else list(self.m.quarantine.broken_pairs)
        )
        if target and corrupt and not any(s.id == target for s in self.m.sides.values()):
            raise HeaderCorrupt(corrupt[0]["reason"])
        if target and not corrupt:
            sides = self.m.select(str(target))
        elif target:
            sides = [s for s in self.m.sides.values() if s.id == target]
        else:
            sides = sorted(self.m.sides.values(), key=lambda s: s.id)
        return {
            "node": self.m.node_name,
            "pairs": [describe(s) for s in sides],
            "corrupt": [{k: v for k, v in b.items() if k != "path"} for b in corrupt],
        }

    def op_crash_at(self, args: dict[str, Any]) -> dict[str, Any]:
        """Tests: SIGKILL this node at the ``step``-th durable write from now (0: disarm);
        the answer holds the steps taken since the last arming (replicator/faults.py)."""
        taken = faults.trace()
        after = int(args.get("step", 0))

        def announce(label: str, n: int) -> None:
            self.m.events.emit("debug.crash", step=n, label=label)

        faults.arm(after, announce)
        return {"armed": after, "steps_taken": taken}


def _whole_again(side: Side) -> bool:
    """A side taken over with a pull whose pull is done: ready to swap back."""
    r = side.record
    return (
        r.role is Role.SECONDARY
        and r.state is ps.State.SSWS
        and r.svol_consistent
        and not r.copy_incomplete
        and side.machine.link_up
    )


def _peer_pulled(side: Side, peer: wire.PairState) -> bool:
    """This side's pull of the old primary's image ended at the epoch it still has, and the
    peer is that old primary, fenced ever since (a primary suspended at our takeover's epoch:
    only the fence gives it that epoch, and it writes nothing while fenced).  Its difference
    bitmap is then what this side pulled: nothing on it lacks here."""
    epoch = side.record.epoch
    return (
        side.doc.pulled_epoch == epoch > 0
        and peer.role == Role.PRIMARY.label
        and peer.state == str(ps.State.PSUE)
        and peer.epoch == epoch
    )
