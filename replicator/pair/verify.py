"""Online verify: compare both sides chunk by chunk; only digests cross the wire."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from replicator import pair_state as ps
from replicator import wire
from replicator.errors import IllegalState, ProtocolError, Timeout
from replicator.header import Role

if TYPE_CHECKING:
    from replicator.pair.side import Side

VERIFY_BATCH = 256
APPLY_WAIT = 60.0  # how long an async batch waits for the secondary to apply the journal


def verify(side: Side, repair: bool, batch: int = VERIFY_BATCH) -> dict[str, Any]:
    """Compare every chunk with the peer by digest (only digests cross the wire)."""
    r = side.record
    if r.role is not Role.PRIMARY:
        raise IllegalState(f"pair {side.id}: run verify on the primary's node")
    if r.state not in (ps.State.PAIR, ps.State.PSUS):
        raise IllegalState(f"pair {side.id}: verify needs PAIR or PSUS, not {r.state}")
    total = side.diff_map.nchunks
    mismatches: list[int] = []
    started = side.clock()
    for first in range(0, total, batch):
        count = min(batch, total - first)
        # Hold the chunks so no mirrored write lands between the two digests.
        with side.chunk_locks.hold(first, first + count - 1):
            if side.is_async and r.state is ps.State.PAIR:
                # No entry for these chunks can be journaled while we hold them: once the
                # secondary has applied what the journal holds now, it has them all.
                group = side.host.primary_group(side)
                if not group.wait_applied(group.journal.last_seq, APPLY_WAIT):
                    raise Timeout(f"pair {side.id}: the secondary lags too far to verify")
            mine = side.replica.digests(first, count)
            reply = side.request(wire.DigestRequest(side.id, first, count))
        if not isinstance(reply, wire.Digests) or reply.first != first:
            raise ProtocolError(f"pair {side.id}: the peer answered a digest request oddly")
        theirs = bytes(reply.digests)
        if len(theirs) != len(mine):
            raise ProtocolError(f"pair {side.id}: the peer sent {len(theirs)} digest bytes")
        for i in range(count):
            if mine[8 * i : 8 * i + 8] != theirs[8 * i : 8 * i + 8]:
                mismatches.append(first + i)
    if repair and mismatches:
        with side.bitmap_lock:
            for c in mismatches:
                side.diff_map.set_chunk(c)
            side.store.flush(r.diff_slot, side.diff_map)
    result = {
        "pair": side.id,
        "state": str(r.state),
        "chunks": total,
        "chunk_size": side.chunk_size,
        "bytes_compared": side.data_size,
        "mismatch_count": len(mismatches),
        "mismatches": mismatches[:1000],
        "repaired": bool(repair and mismatches),
        "seconds": round(side.clock() - started, 3),
    }
    side.events.emit(
        "pair.verify", pair=side.id, mismatches=len(mismatches), repaired=result["repaired"]
    )
    if mismatches:
        side.log(f"pair {side.id}: verify found {len(mismatches)} differing chunks")
    return result
