"""The hydration core (replicator/pair/hydration.py) against a dict-of-blocks model.

A side taken over before its copy was complete serves reads and writes while it pulls what
it lacks from the old primary.  :class:`FakeSide` carries out the core's plans the way
replicator/pair/pull.py does, a step at a time, over a :class:`FakeDisk` with a durable and
a volatile layer; a crash may come before any step, and loses what is not durable.

The model knows nothing of bits: the old primary's image (fixed at the takeover) under the
client's writes since the takeover.  A write acknowledged but not flushed may be lost in a
crash, and so may the one the crash interrupted, so after a crash the model holds every image
a correct side may show (the writes since the last flush that reached the disk are a prefix
of them; the interrupted one may have reached it for some of its chunks only), and each read
keeps those that agree with it.  Every read must agree with one of them, after any
interleaving of reads, writes, zeroes, the pull's steps, bitmap syncs, flushes, crashes and
cuts of the link to the old primary; once nothing is pending, so must the whole image.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from replicator.errors import UsageError
from replicator.pair import hydration
from replicator.pair.hydration import Bits, Do, Geometry, Op, Plan, Step

CS = 8
GEOMETRY = Geometry(CS, 5 * CS + 4)  # six chunks, the last one short
SIZE = GEOMETRY.data_size
N = GEOMETRY.nchunks
MAX_SPAN = 4  # chunks a write may touch (the model's candidates grow with it)


class Crash(Exception):
    """The crash point of an operation was reached."""


class Unreachable(Exception):
    """The old primary was asked for a chunk while the link to it is cut."""


class FakeDisk:
    """The volume's data: what is durable, and the writes since the last sync, in order."""

    def __init__(self, image: bytes) -> None:
        self.durable = bytearray(image)
        self.volatile: list[tuple[int, bytes]] = []

    def write(self, offset: int, data: bytes) -> None:
        self.volatile.append((offset, bytes(data)))

    def read(self, offset: int, length: int) -> bytes:
        image = bytearray(self.durable)
        for off, data in self.volatile:
            image[off : off + len(data)] = data
        return bytes(image[offset : offset + length])

    def sync(self) -> None:
        for off, data in self.volatile:
            self.durable[off : off + len(data)] = data
        self.volatile.clear()

    def crash(self) -> None:
        self.volatile.clear()


class FakeSide:
    """The taken-over side: the three facts of every chunk, in memory and on disk, and the
    volume's data; it carries out plans as replicator/pair/pull.py does."""

    def __init__(self, old: bytes, copied: set[int]) -> None:
        self.old = old
        local = bytearray(b ^ 0xFF for b in old)  # what this side never received
        for c in copied:
            start, size = GEOMETRY.chunk_range(c)
            local[start : start + size] = old[start : start + size]
        self.disk = FakeDisk(bytes(local))
        self.pending = set(range(N)) - copied
        self.pending_on_disk = set(self.pending)
        self.written: set[int] = set()
        self.written_on_disk: set[int] = set()
        self.unsynced: set[int] = set()
        self.reachable = True
        self.budget: int | None = None  # steps left before a crash (None: no crash)
        self.wrote = False  # the client's WRITE step ran

    def bits(self, chunks: Iterable[int]) -> dict[int, Bits]:
        return {c: Bits(c in self.pending, c in self.written, c in self.unsynced) for c in chunks}

    def state(self) -> tuple[object, ...]:
        return (
            bytes(self.disk.durable),
            tuple(self.disk.volatile),
            frozenset(self.pending),
            frozenset(self.pending_on_disk),
            frozenset(self.written),
            frozenset(self.written_on_disk),
            frozenset(self.unsynced),
        )

    def _step(self) -> None:
        if self.budget is None:
            return
        if self.budget == 0:
            raise Crash
        self.budget -= 1

    def carry_out(self, plan: Plan, offset: int = 0, data: bytes = b"", length: int = 0) -> bytes:
        """The plan's actions in order (the client's WRITE writes ``data`` at ``offset``,
        its READ returns ``length`` bytes from it); :class:`Crash` at the crash point."""
        assert plan.refused is None
        got = b""
        for action in plan.actions:
            step, chunks = action.step, action.chunks
            if step is Step.FETCH:
                for c in chunks:  # decided again, as under the chunk's lock
                    self.carry_out(hydration.copy_step(c, self.bits([c])[c]))
                continue
            self._step()
            if step is Step.DROP:
                assert set(chunks) <= self.written, f"a pending bit dropped unwritten: {chunks}"
                self.pending -= set(chunks)
            elif step is Step.COPY:
                if not self.reachable:
                    raise Unreachable
                (c,) = chunks
                assert c in self.pending and c not in self.written, f"copied chunk {c} again"
                start, size = GEOMETRY.chunk_range(c)
                self.disk.write(start, self.old[start : start + size])
                self.pending.discard(c)
                self.unsynced.add(c)
            elif step is Step.SYNC:
                self.disk.sync()
                self.pending_on_disk = set(self.pending)
                self.unsynced.clear()
            elif step is Step.RECORD:
                self.written |= set(chunks)
                self.written_on_disk = set(self.written)
            elif step is Step.WRITE:
                self.disk.write(offset, data)
                self.wrote = True
            elif step is Step.SYNC_DATA:
                self.disk.sync()
            elif step is Step.READ:
                got = self.disk.read(offset, length)
            else:
                raise AssertionError(f"unknown step {step}")
        return got

    def crash(self) -> None:
        self.disk.crash()
        self.pending, self.written = set(), set()
        for c in range(N):
            bits = hydration.after_crash(Bits(c in self.pending_on_disk, c in self.written_on_disk))
            if bits.pending:
                self.pending.add(c)
            if bits.written:
                self.written.add(c)
        self.unsynced.clear()


def apply(image: bytes, writes: Iterable[tuple[int, bytes]]) -> bytes:
    out = bytearray(image)
    for off, data in writes:
        out[off : off + len(data)] = data
    return bytes(out)


class Model:
    """What a client may read: ``bases``, the images a correct side may show if none of
    ``unflushed`` (the writes acknowledged since the last flush or crash) survives, each
    with ``unflushed`` on top."""

    def __init__(self, old: bytes) -> None:
        self.bases = {old}
        self.unflushed: list[tuple[int, bytes]] = []

    def views(self) -> set[bytes]:
        return {apply(b, self.unflushed) for b in self.bases}

    def write(self, offset: int, data: bytes) -> None:
        self.unflushed.append((offset, data))

    def flush(self) -> None:
        self.bases = self.views()
        self.unflushed = []

    def crash(self, interrupted: list[tuple[int, bytes]]) -> None:
        """The writes since the last flush that reached the disk are a prefix of them; the
        ``interrupted`` one's pieces (one per chunk) after all of them, any of its pieces."""
        new: set[bytes] = set()
        for base in self.bases:
            image = base
            new.add(image)
            for w in self.unflushed:
                image = apply(image, [w])
                new.add(image)
            for k in range(1, len(interrupted) + 1):
                for pieces in itertools.combinations(interrupted, k):
                    new.add(apply(image, pieces))
        self.bases = new
        self.unflushed = []

    def observe(self, offset: int, got: bytes, what: str) -> None:
        end = offset + len(got)
        keep = {b for b in self.bases if apply(b, self.unflushed)[offset:end] == got}
        if not keep:
            allowed = sorted(v[offset:end].hex() for v in self.views())[:4]
            raise AssertionError(f"{what} [{offset}, {end}) read {got.hex()}, not one of {allowed}")
        self.bases = keep


def pieces(offset: int, data: bytes) -> list[tuple[int, bytes]]:
    """A write cut at chunk boundaries."""
    out = []
    for c in GEOMETRY.span(offset, len(data)):
        start, size = GEOMETRY.chunk_range(c)
        lo, hi = max(offset, start), min(offset + len(data), start + size)
        out.append((lo, data[lo - offset : hi - offset]))
    return out


@st.composite
def ranges(draw: st.DrawFn) -> tuple[int, int]:
    """A range to write: inside one chunk, whole chunks, or any."""
    kind = draw(st.sampled_from(["part", "whole", "any"]))
    if kind == "whole":
        first = draw(st.integers(0, N - 1))
        last = draw(st.integers(first, min(N - 1, first + MAX_SPAN - 1)))
        start, _ = GEOMETRY.chunk_range(first)
        return start, sum(GEOMETRY.chunk_range(last)) - start
    offset = draw(st.integers(0, SIZE - 1))
    if kind == "part":
        start, size = GEOMETRY.chunk_range(offset // CS)
        end = start + size
        return offset, draw(st.integers(1, max(1, end - offset - (offset == start))))
    return offset, draw(st.integers(1, min(SIZE - offset, (MAX_SPAN - 1) * CS)))


crash_points = st.integers(0, 20).map(lambda n: n if n <= 6 else None)


class HydrationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.side = FakeSide(bytes(SIZE), set(range(N)))
        self.model = Model(bytes(SIZE))

    @initialize(
        old=st.binary(min_size=SIZE, max_size=SIZE),
        copied=st.sets(st.integers(0, N - 1)),
    )
    def takeover(self, old: bytes, copied: set[int]) -> None:
        self.side = FakeSide(old, copied)
        self.model = Model(old)

    # -- helpers ----------------------------------------------------------------------------

    def run(
        self,
        plan: Plan,
        crash_at: int | None,
        offset: int = 0,
        data: bytes = b"",
        length: int = 0,
    ) -> bytes | None:
        """Carry out ``plan``; None if it crashed (the side and the model then recover)."""
        side = self.side
        side.budget, side.wrote = crash_at, False
        try:
            return side.carry_out(plan, offset, data, length)
        except Crash:
            side.budget = None
            side.crash()
            self.model.crash(pieces(offset, data) if side.wrote else [])
            return None
        finally:
            side.budget = None

    def refused(self, plan: Plan, covered: Iterable[int] = ()) -> None:
        """A refusal: only while the link is cut, for a chunk that lacks and that the
        request does not overwrite whole; nothing was done."""
        assert not self.side.reachable
        assert plan.refused is not None and not plan.actions
        c = plan.refused
        assert self.side.bits([c])[c].lacking and c not in covered

    # -- rules ------------------------------------------------------------------------------

    @rule(data=st.data(), crash_at=crash_points)
    def read(self, data: st.DataObject, crash_at: int | None) -> None:
        offset = data.draw(st.integers(0, SIZE - 1))
        length = data.draw(st.integers(1, SIZE - offset))
        span = GEOMETRY.span(offset, length)
        plan = hydration.read(GEOMETRY, offset, length, self.side.bits(span), self.side.reachable)
        if plan.refused is not None:
            self.refused(plan)
            return
        got = self.run(plan, crash_at, offset, length=length)
        if got is not None:
            self.model.observe(offset, got, "read")

    def _write(self, offset: int, data: bytes, crash_at: int | None) -> None:
        span = GEOMETRY.span(offset, len(data))
        bits = self.side.bits(span)
        plan = hydration.write(GEOMETRY, offset, len(data), bits, self.side.reachable)
        covered = {c for c in span if GEOMETRY.covers(offset, len(data), c)}
        # A whole chunk that lacks is overwritten, never fetched (the issue 11 fix).
        for c, do in plan.decisions:
            if bits[c].lacking and c in covered:
                assert do is Do.WRITE_WITHOUT_FETCH
        assert not set(plan.chunks(Step.FETCH)) & covered
        if plan.refused is not None:
            self.refused(plan, covered)
            return
        if self.run(plan, crash_at, offset, data) is not None:
            self.model.write(offset, data)

    @rule(where=ranges(), data=st.data(), crash_at=crash_points)
    def write(self, where: tuple[int, int], data: st.DataObject, crash_at: int | None) -> None:
        offset, length = where
        self._write(offset, data.draw(st.binary(min_size=length, max_size=length)), crash_at)

    @rule(where=ranges(), crash_at=crash_points)
    def zero_or_trim(self, where: tuple[int, int], crash_at: int | None) -> None:
        offset, length = where
        self._write(offset, bytes(length), crash_at)

    @precondition(lambda self: bool(self.side.pending))
    @rule(data=st.data(), crash_at=crash_points)
    def copy_step(self, data: st.DataObject, crash_at: int | None) -> None:
        """The pull's step (on the lowest pending chunk, or any: a client's fetch jumps the
        queue)."""
        chunk = data.draw(st.sampled_from(sorted(self.side.pending)))
        plan = hydration.copy_step(chunk, self.side.bits([chunk])[chunk])
        before = self.side.state()
        try:
            self.run(plan, crash_at)
        except Unreachable:  # the pull's request fails: nothing changes
            assert plan.chunks(Step.COPY) == (chunk,)
            assert self.side.state() == before

    @rule(crash_at=crash_points)
    def sync(self, crash_at: int | None) -> None:
        self.run(hydration.sync(), crash_at)

    @rule()
    def flush(self) -> None:
        self.side.disk.sync()
        self.model.flush()

    @rule()
    def crash(self) -> None:
        self.side.crash()
        self.model.crash([])

    @rule()
    def cut(self) -> None:
        self.side.reachable = False

    @rule()
    def heal(self) -> None:
        self.side.reachable = True

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def bits_agree(self) -> None:
        side = self.side
        assert not side.unsynced & side.pending
        assert side.written == side.written_on_disk  # RECORD is durable at once
        assert side.pending <= side.pending_on_disk  # cleared in memory first, never set again

    @invariant()
    def complete_image_is_the_model(self) -> None:
        if not self.side.pending:
            self.model.observe(0, self.side.disk.read(0, SIZE), "the image")

    def teardown(self) -> None:
        """The link back, the pull to its end and a sync: the image is the model's, and
        stays so through a crash."""
        side = self.side
        side.reachable = True
        for c in range(N):
            side.carry_out(hydration.copy_step(c, side.bits([c])[c]))
        side.carry_out(hydration.sync())
        assert not side.pending and not side.pending_on_disk
        self.model.observe(0, side.disk.read(0, SIZE), "the pulled image")
        side.crash()
        self.model.crash([])
        self.model.observe(0, side.disk.read(0, SIZE), "the pulled image after a crash")


TestHydrationMachine = HydrationMachine.TestCase
TestHydrationMachine.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- the table and the plans, by example --------------------------------------------------------

LACKING = Bits(pending=True)
HERE = Bits()
STALE = Bits(pending=True, written=True)


def test_the_table_answers_every_operation_for_every_chunk() -> None:
    for op in Op:
        for bits in (LACKING, HERE, STALE, Bits(unsynced=True), Bits(written=True)):
            hydration.decide(op, bits)
    assert hydration.decide(Op.WRITE_WHOLE, LACKING) is Do.WRITE_WITHOUT_FETCH
    assert hydration.decide(Op.WRITE_PART, LACKING) is Do.FETCH_THEN_MERGE
    assert hydration.decide(Op.READ, STALE) is Do.SERVE
    assert hydration.decide(Op.COPY_STEP, STALE) is Do.SKIP


def test_a_whole_chunk_write_fetches_nothing_and_syncs_its_data_before_its_bit() -> None:
    plan = hydration.write(GEOMETRY, CS, 2 * CS, {1: LACKING, 2: LACKING}, reachable=False)
    assert plan.refused is None and not plan.chunks(Step.FETCH)
    assert plan.steps() == (Step.WRITE, Step.SYNC_DATA, Step.RECORD, Step.DROP)
    assert plan.chunks(Step.RECORD) == plan.chunks(Step.DROP) == (1, 2)


def test_a_write_across_chunks_fetches_the_ends_it_writes_part_of() -> None:
    bits = {0: LACKING, 1: LACKING, 2: Bits(unsynced=True), 3: STALE}
    plan = hydration.write(GEOMETRY, 4, 3 * CS, bits, reachable=True)
    assert plan.actions == (
        hydration.Action(Step.DROP, (3,)),
        hydration.Action(Step.FETCH, (0,)),
        hydration.Action(Step.SYNC),
        hydration.Action(Step.RECORD, (0, 2, 3)),
        hydration.Action(Step.WRITE),
        hydration.Action(Step.SYNC_DATA, (1,)),
        hydration.Action(Step.RECORD, (1,)),
        hydration.Action(Step.DROP, (1,)),
    )
    cut = hydration.write(GEOMETRY, 4, 3 * CS, bits, reachable=False)
    assert cut.refused == 0 and not cut.actions


def test_the_short_last_chunk_is_whole_when_a_write_reaches_the_end() -> None:
    last = N - 1
    start, size = GEOMETRY.chunk_range(last)
    assert size == 4
    plan = hydration.write(GEOMETRY, start, size, {last: LACKING}, reachable=False)
    assert plan.decisions == ((last, Do.WRITE_WITHOUT_FETCH),)


def test_a_read_of_a_stale_chunk_needs_no_old_primary() -> None:
    plan = hydration.read(GEOMETRY, 0, 2 * CS, {0: STALE, 1: HERE}, reachable=False)
    assert plan.steps() == (Step.DROP, Step.READ) and plan.chunks(Step.DROP) == (0,)
    cut = hydration.read(GEOMETRY, 0, 2 * CS, {0: STALE, 1: LACKING}, reachable=False)
    assert cut.refused == 1


def test_a_range_outside_the_volume_is_refused() -> None:
    with pytest.raises(UsageError):
        GEOMETRY.span(SIZE - 1, 2)
