"""The cluster's fence on a storage node: ``pair fence`` and ``pair unfence``.

A cluster agent that can no longer renew its lease must stop its application's writes
*before* the lease can expire (SPEC 4, "Fencing"; issue 9).  Stopping the application is not
enough (it may hang in I/O, or be another process), so the agent has its storage node refuse
client writes for the resource's pairs: ``pair fence GROUP --epoch N --reason TEXT``.

* A fence is a *hold* on each side of the groups named: every client write is refused with
  EIO and one log line (reads go on), whatever the pair's state.  Changes a volume receives
  from its primary are still taken (the hold is on clients, not on replication).
* When ``pair fence`` returns, no client write can be acknowledged any more, including the
  writes in flight: the hold is set first (under each side's ``ack_lock``, which every
  client write takes for its last check before it returns), then made durable.  A write in
  flight fails with EIO when it finishes.  ``pair fence`` never waits for it: a mirrored
  write stuck on a dead link would hold the fence up to the link's timeout, past the lease,
  and with fence=never it would then be acknowledged (issue 9's partition test found it).
* The hold survives a restart of the node (it is in the pair file).
* Epochs: each side keeps the highest cluster epoch an agent ever gave it (``cluster_epoch``).
  A fence or unfence with a lower epoch is refused (a stale agent cannot lift a newer
  fence, nor fence the new active's pairs); ``pair unfence GROUP --epoch N`` lifts a hold only
  with an epoch at least the hold's.
* **The watchdog** (``pair watchdog GROUP --epoch N --seconds S``; ``--off`` disarms it):
  the active agent re-arms it at every lease renewal with the time left before its own
  fencing deadline.  If the agent dies alone (the node, and perhaps the application, live
  on), the node refuses client writes for the groups at that deadline by itself, before the
  lease can expire and a standby can take over: SBD's watchdog, in the node.  That it is
  armed is in the pair file; the deadline is in memory only, so a node that restarts finds
  it armed and expired until the agent sets it again.

:func:`refusal` says why a client write of a side must be refused now (the hold, or the
watchdog past its deadline), or None; the write path asks it before a write and again,
under ``ack_lock``, before acknowledging one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from replicator.errors import IllegalState, UsageError

if TYPE_CHECKING:
    from replicator.pair.manager import PairManager
    from replicator.pair.side import Side


#: The longest a watchdog can be set for (the agent sets about a lease TTL).
WATCHDOG_MAX = 120.0


def refusal(side: Side) -> str | None:
    """Why a client write of ``side`` is refused now (None: it is not)."""
    doc = side.doc
    if doc.hold_reason:
        return f"fenced by the cluster at epoch {doc.hold_epoch} ({doc.hold_reason})"
    if doc.watchdog_epoch and side.clock() >= side.watchdog_deadline:
        return (
            f"the cluster agent's watchdog (epoch {doc.watchdog_epoch}) expired: the agent "
            "did not renew it in time"
        )
    return None


def _epoch(args: dict[str, Any]) -> int:
    raw = args.get("epoch")
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise UsageError(f"--epoch {raw!r} is not a cluster epoch (a whole number, 0 or more)")
    return raw


class Holds:
    """``pair.fence``, ``pair.unfence`` and ``pair.watchdog`` on this node's pairs."""

    def __init__(self, manager: PairManager) -> None:
        self.m = manager

    def _sides(self, args: dict[str, Any], epoch: int, what: str) -> list[Side]:
        sides = self.m.select(str(args["target"]))
        for s in sides:
            if epoch < s.doc.cluster_epoch:
                raise IllegalState(
                    f"pair {s.id}: {what} at cluster epoch {epoch} refused: this node has seen "
                    f"epoch {s.doc.cluster_epoch} (a stale agent?)"
                )
        return sides

    def op_fence(self, args: dict[str, Any]) -> dict[str, Any]:
        epoch = _epoch(args)
        reason = str(args.get("reason") or "fenced by the cluster agent")[:200]
        with self.m.lock:
            sides = self._sides(args, epoch, "fence")
        for s in sides:
            with s.ack_lock:  # from here on no client write of this side is acknowledged
                s.doc.hold_epoch, s.doc.hold_reason = epoch, reason
                s.doc.cluster_epoch = max(s.doc.cluster_epoch, epoch)
            s.save()
            self.m.log(f"pair {s.id}: client writes refused from now on: {reason}")
            self.m.events.emit("pair.fenced", pair=s.id, epoch=epoch, reason=reason)
        return {"pairs": [self.m.describe(s) for s in sides]}

    def op_watchdog(self, args: dict[str, Any]) -> dict[str, Any]:
        """Arm (or re-arm) the watchdog for ``seconds`` from now, or disarm it (``off``)."""
        epoch = _epoch(args)
        off = bool(args.get("off", False))
        raw = args.get("seconds", 0)
        number = isinstance(raw, int | float) and not isinstance(raw, bool)
        if not off and not (number and 0 < raw <= WATCHDOG_MAX):
            raise UsageError(
                f"--seconds {raw!r}: give a number of seconds in (0, {WATCHDOG_MAX:g}]"
            )
        with self.m.lock:
            sides = self._sides(args, epoch, "watchdog")
        for s in sides:
            with s.ack_lock:
                s.watchdog_deadline = 0.0 if off else s.clock() + float(raw)
                was = s.doc.watchdog_epoch
                s.doc.watchdog_epoch = 0 if off else epoch
                s.doc.cluster_epoch = max(s.doc.cluster_epoch, epoch)
            if was != s.doc.watchdog_epoch:  # arming and disarming are durable; re-arming not
                s.save()
                what = "disarmed" if off else f"armed at epoch {epoch}"
                self.m.log(f"pair {s.id}: cluster watchdog {what}")
                self.m.events.emit("pair.watchdog", pair=s.id, epoch=epoch, armed=not off)
        return {"pairs": [self.m.describe(s) for s in sides]}

    def op_unfence(self, args: dict[str, Any]) -> dict[str, Any]:
        epoch = _epoch(args)
        with self.m.lock:
            sides = self._sides(args, epoch, "unfence")
            for s in sides:
                if s.doc.hold_reason and epoch < s.doc.hold_epoch:
                    raise IllegalState(
                        f"pair {s.id}: unfence at cluster epoch {epoch} refused: it was fenced "
                        f"at epoch {s.doc.hold_epoch}"
                    )
        for s in sides:
            held = bool(s.doc.hold_reason)
            s.doc.hold_epoch, s.doc.hold_reason = 0, ""
            s.doc.cluster_epoch = max(s.doc.cluster_epoch, epoch)
            s.save()
            if held:
                self.m.log(f"pair {s.id}: client writes allowed again (cluster epoch {epoch})")
                self.m.events.emit("pair.unfenced", pair=s.id, epoch=epoch)
        return {"pairs": [self.m.describe(s) for s in sides]}
