"""What ``pair display`` shows of one side (a stable JSON schema: scripts read it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from replicator import pair_state as ps
from replicator.header import Role
from replicator.pair import hold
from replicator.pair.pull import PullEngine

if TYPE_CHECKING:
    from replicator.pair.side import Side


def describe(side: Side) -> dict[str, Any]:
    r = side.record
    h = side.volume.header
    with side.bitmap_lock:
        dirty = side.diff_map.dirty_bytes()
        pending = side.copy_map.count()
    total = r.total_chunks
    percent: float | None
    if r.state is ps.State.COPY and total:
        percent = round(100.0 * r.copied_chunks / total, 1)
    elif r.state is ps.State.COPY:
        percent = 0.0
    else:
        percent = 100.0 if r.state in (ps.State.PAIR,) else None
    engine = side.engine
    rate = eta = None
    if engine is not None and engine.thread.is_alive() and r.state is ps.State.COPY:
        elapsed = max(side.clock() - engine.started, 1e-3)
        rate = round(engine.sent_bytes / elapsed)
        if engine.copied:
            eta = round(pending / (engine.copied / elapsed), 1)
    return {
        "group": r.group,
        "pair": r.pair,
        "id": side.id,
        "node": side.host.node_name,
        "role": r.role.label,
        "volume": side.doc.volume,
        "pvid": h.pvid_hex,
        "peer": side.doc.peer.label(),
        "peer_node": side.doc.peer.node,
        "peer_volume": side.doc.peer.volume,
        "mode": str(r.mode),
        "fence": str(r.fence),
        "auto_resync": r.auto_resync,
        "compress": side.doc.compress,
        "state": str(r.state),
        "cause": str(r.cause),
        "epoch": r.epoch,
        "link": "up" if side.machine.link_up else "down",
        "hidden": side.machine.hidden,
        # This S-VOL was taken over and is the volume served here: SSWS, or PSUE while a
        # pull waits for its old primary (the cluster agent reads this, not the state).
        "taken_over": r.role is Role.SECONDARY and r.io_state is ps.State.SSWS,
        "writes": _writes(side),
        "chunk_size": side.chunk_size,
        "data_size": side.data_size,
        "copy_percent": percent,
        "copied_chunks": r.copied_chunks,
        "total_chunks": total,
        "pending_chunks": pending,
        "dirty_bytes": dirty,
        "copy_bytes_sent": engine.sent_bytes if engine else 0,
        "copy_rate_bytes_s": rate,
        "eta_seconds": eta,
        "last_copy_bytes": side.doc.last_copy_bytes,
        "last_copy_seconds": side.doc.last_copy_seconds,
        "svol_consistent": r.svol_consistent,
        "journal": _journal_info(side),
        "hydration": _hydration(side, pending),
        "cluster_epoch": side.doc.cluster_epoch,
        "fenced": (
            {"epoch": side.doc.hold_epoch, "reason": side.doc.hold_reason}
            if side.doc.hold_reason
            else None
        ),
        "watchdog": (
            {
                "epoch": side.doc.watchdog_epoch,
                "remaining": round(max(0.0, side.watchdog_deadline - side.clock()), 3),
            }
            if side.doc.watchdog_epoch
            else None
        ),
    }


def _writes(side: Side) -> str:
    """What a client write gets now: the cluster's hold or watchdog first, then the pair's
    own decision."""
    if side.doc.hold_reason:
        return "REFUSE_HELD"
    if hold.refusal(side) is not None:
        return "REFUSE_WATCHDOG"
    return str(side.machine.write_decision())


def _hydration(side: Side, pending: int) -> dict[str, Any] | None:
    """A side taken over before its copy was complete (SPEC 4): how much of the image is
    here, what clients fetched on demand, and the background pull's rate and ETA."""
    r = side.record
    if not r.pulling:
        return None
    engine = side.engine if isinstance(side.engine, PullEngine) else None
    running = engine is not None and engine.thread.is_alive()
    total = max(engine.total, pending) if engine is not None else pending
    rate = eta = None
    if engine is not None and running:
        elapsed = max(side.clock() - engine.started, 1e-3)
        rate = round(engine.sent_bytes / elapsed)
        if rate:
            eta = round(pending * side.chunk_size / rate, 1)
    return {
        "percent": round(100.0 * (1 - pending / total), 1) if total else 100.0,
        "pending_chunks": pending,
        "pulling": running,
        # PSUE: the old primary cannot be reached; the pull resumes when it is back.
        "suspended_by": str(r.cause) if r.state is ps.State.PSUE else None,
        "pulled_chunks": engine.copied if engine is not None else 0,
        "fetched_on_demand": engine.on_demand if engine is not None else 0,
        "fetch_ms_avg": engine.fetch_ms_avg if engine is not None else None,
        # Clients' reads meanwhile: those that needed a fetch against those served here.
        "read_latency": engine.reads.summary() if engine is not None else None,
        "rate_bytes_s": rate,
        "eta_seconds": eta,
    }


def _journal_info(side: Side) -> dict[str, Any] | None:
    if not side.is_async:
        return None
    group = side.host.existing_group(side)
    return group.describe() if group is not None else None
