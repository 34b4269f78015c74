"""Two-slot records: the pure codec (replicator.record_codec) and its file adapter
(replicator.record_file).

The codec: round trips, any bytes decode to a slot or a problem (never an exception), the
newest valid slot wins whatever tore or damaged the slots, and the write order keeps the
newest record through a torn write.  The file: a hypothesis state machine checks it against
a model of what each slot may hold while writes are torn at any byte, and a SIGKILLed writer
never loses an acknowledged record.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from replicator import record_codec as rc
from replicator import record_file
from replicator.errors import AlreadyExists, IllegalState, NotFound, UsageError

ROOT = Path(__file__).resolve().parent.parent
MAGIC = b"PVTEST\0\0"
SLOT = 256
VAR = rc.SlotCodec(MAGIC, 3, SLOT, minor=1, name="test record")
FIXED = rc.SlotCodec(MAGIC, 3, SLOT, payload_size=40, name="test header")
U64 = (1 << 64) - 1

generations = st.integers(0, U64)
var_payloads = st.binary(max_size=VAR.max_payload)
fixed_payloads = st.binary(min_size=40, max_size=40)


# -- one slot ------------------------------------------------------------------------------


def test_the_layout_is_the_documented_one() -> None:
    """docs/format.md, "Two-slot records": magic, version, minor, length, generation,
    payload, CRC32C of everything before it, zeros."""
    codec = rc.SlotCodec(MAGIC, 3, 64, minor=1)
    image = codec.encode(2, b"hi")
    body = MAGIC + struct.pack("<HHIQ", 3, 1, 30, 2) + b"hi"
    assert image == (body + struct.pack("<I", crc32c.crc32c(body))).ljust(64, b"\0")
    assert image.hex() == (
        "5056544553540000030001001e00000002000000000000006869c072498c" + "00" * 34
    )


@given(generations, var_payloads)
def test_round_trip(generation: int, payload: bytes) -> None:
    image = VAR.encode(generation, payload)
    assert len(image) == SLOT
    assert VAR.decode(image) == rc.Slot(generation, payload, 1)
    assert VAR.decode(image[: rc.OVERHEAD + len(payload)]) == rc.Slot(generation, payload, 1)


@given(generations, fixed_payloads)
def test_fixed_round_trip(generation: int, payload: bytes) -> None:
    assert FIXED.decode(FIXED.encode(generation, payload)) == rc.Slot(generation, payload)


@given(raw=st.binary(max_size=SLOT + 10), prefix=st.sampled_from(["none", "magic", "frame"]))
def test_any_bytes_decode_to_a_slot_or_a_problem(raw: bytes, prefix: str) -> None:
    if prefix == "magic":
        raw = MAGIC + raw
    elif prefix == "frame":  # a plausible prefix, so that the later checks are reached
        raw = MAGIC + struct.pack("<HHIQ", 3, 0, len(raw) + rc.OVERHEAD, 7) + raw
    for codec in (VAR, FIXED):
        got = codec.decode(raw)
        assert isinstance(got, rc.Slot | rc.SlotProblem)
        if isinstance(got, rc.SlotProblem):
            assert got.detail and got.describe() == got.detail
        else:  # then the bytes are exactly what encoding the same record writes
            again = rc.SlotCodec(
                MAGIC, 3, SLOT, minor=got.minor, payload_size=codec.payload_size
            ).encode(got.generation, got.value)
            n = rc.OVERHEAD + len(got.value)
            assert again[:n] == raw[:n]


@given(generations, var_payloads, st.data())
def test_every_byte_of_the_record_is_checked(
    generation: int, payload: bytes, data: st.DataObject
) -> None:
    image = bytearray(VAR.encode(generation, payload))
    at = data.draw(st.integers(0, rc.OVERHEAD + len(payload) - 1))
    image[at] ^= data.draw(st.integers(1, 255))
    assert isinstance(VAR.decode(bytes(image)), rc.SlotProblem)


@given(generations, var_payloads, st.binary(min_size=1, max_size=SLOT))
def test_the_padding_is_not_covered(generation: int, payload: bytes, junk: bytes) -> None:
    image = VAR.encode(generation, payload)
    end = rc.OVERHEAD + len(payload)
    assert VAR.decode(image[:end] + junk) == rc.Slot(generation, payload, 1)


def _reframed(image: bytes, **fields: int) -> bytes:
    """``image`` with prefix fields changed, CRC recomputed (a writer of another format)."""
    _m, version, minor, length, generation = struct.unpack_from("<8sHHIQ", image)
    version = fields.get("version", version)
    length = fields.get("length", length)
    head = struct.pack("<8sHHIQ", MAGIC, version, minor, length, generation)
    end = min(length, len(image)) - 4
    body = head + image[24:end]
    return (body + struct.pack("<I", crc32c.crc32c(body))).ljust(len(image), b"\0")


@pytest.mark.parametrize(
    ("codec", "mutate", "kind", "detail"),
    [
        (VAR, lambda s: s[:20], rc.Damage.TRUNCATED,
         "test record slot is truncated (20 of 28 bytes)"),
        (FIXED, lambda s: s[:60], rc.Damage.TRUNCATED,
         "test header slot is truncated (60 of 68 bytes)"),
        (VAR, lambda s: s[:31], rc.Damage.TRUNCATED,
         "test record slot is truncated (31 of 32 bytes)"),
        (VAR, lambda s: bytes(len(s)), rc.Damage.BLANK, "test record slot is blank (all zero)"),
        (FIXED, lambda s: bytes(68) + b"x" * 100, rc.Damage.BLANK,
         "test header slot is blank (all zero)"),
        (VAR, lambda s: bytes(len(s) - 1) + b"x", rc.Damage.BAD_MAGIC,
         "bad magic: not a test record slot"),
        (VAR, lambda s: b"X" + s[1:], rc.Damage.BAD_MAGIC, "bad magic: not a test record slot"),
        (VAR, lambda s: _reframed(s, version=4), rc.Damage.BAD_VERSION,
         "unsupported test record format version 4 (this is 3)"),
        (FIXED, lambda s: _reframed(s, length=67), rc.Damage.BAD_LENGTH,
         "test header length 67 is not 68"),
        (VAR, lambda s: _reframed(s, length=27), rc.Damage.BAD_LENGTH,
         "test record length 27 is not from 28 to 256"),
        (VAR, lambda s: s[:12] + b"\xff" * 4 + s[16:], rc.Damage.BAD_LENGTH, None),
        (VAR, lambda s: s[:28] + b"\0\0\0\0" + s[32:], rc.Damage.BAD_CRC,
         "bad CRC32C (stored 00000000"),
    ],
)  # fmt: skip
def test_each_damage_has_its_kind_and_reason(
    codec: rc.SlotCodec,
    mutate,
    kind: rc.Damage,
    detail: str | None,  # type: ignore[no-untyped-def]
) -> None:
    image = codec.encode(5, b"abcd" if codec is VAR else bytes(range(40)))
    got = codec.decode(mutate(image))
    assert isinstance(got, rc.SlotProblem) and got.kind is kind
    if detail is not None:
        assert got.detail.startswith(detail)


def test_a_caller_keeps_its_own_wording() -> None:
    got = VAR.decode(VAR.encode(1, b"x")[:10])
    assert isinstance(got, rc.SlotProblem)
    texts = {rc.Damage.TRUNCATED: "short ({found} of {expected})"}
    assert got.describe(texts) == "short (10 of 28)"
    assert got.describe({rc.Damage.BLANK: "?"}) == got.detail  # not in the table: detail
    assert rc.SlotProblem.rejected("pvid 0").describe({rc.Damage.REJECTED: "{detail}!"}) == (
        "pvid 0!"
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: rc.SlotCodec(b"short", 1, 64),
        lambda: rc.SlotCodec(bytes(8), 1, 64),
        lambda: rc.SlotCodec(MAGIC, 1 << 16, 64),
        lambda: rc.SlotCodec(MAGIC, 1, 27),
        lambda: rc.SlotCodec(MAGIC, 1, 64, payload_size=37),
        lambda: VAR.encode(-1, b""),
        lambda: VAR.encode(1 << 64, b""),
        lambda: VAR.encode(True, b""),
        lambda: VAR.encode(1, b"x" * (VAR.max_payload + 1)),
        lambda: VAR.encode(1, "text"),
        lambda: FIXED.encode(1, b"x" * 39),
        lambda: VAR.decode("text"),
        lambda: rc.choose(b"a", b"b"),
        lambda: rc.next_write(rc.NoValidSlot((rc.SlotProblem.rejected("x"),) * 2)),
        lambda: rc.read_pair(VAR, 5),
    ],
)
def test_misuse_raises_the_one_error(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(rc.RecordCodecError):
        call()


# -- two slots -----------------------------------------------------------------------------


@st.composite
def damaged_slot(draw: st.DrawFn, image: bytes, others: list[bytes]) -> bytes:
    """``image`` as a crash, a disk or a test may leave it."""
    how = draw(st.sampled_from(["intact", "flip", "torn", "truncated", "junk", "blank"]))
    if how == "intact":
        return image
    if how == "flip":
        at = draw(st.integers(0, SLOT - 1))
        return image[:at] + bytes([image[at] ^ draw(st.integers(1, 255))]) + image[at + 1 :]
    if how == "torn":  # a write of this image over an older one, cut short at any byte
        under = draw(st.sampled_from(others))
        cut = draw(st.integers(0, SLOT))
        return image[:cut] + under[cut:]
    if how == "truncated":
        return image[: draw(st.integers(0, SLOT))]
    if how == "junk":
        return draw(st.binary(max_size=SLOT))
    return bytes(SLOT)


records = st.tuples(st.integers(0, 20), var_payloads)


@given(st.lists(records, min_size=2, max_size=4), st.data())
def test_choose_picks_the_newest_valid_slot(
    recs: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    images = [VAR.encode(g, p) for g, p in recs]
    raw = [data.draw(damaged_slot(images[i], images)) for i in (0, 1)]

    def holds(s: bytes) -> tuple[int, bytes] | None:
        """Which record a slot holds, judged by its bytes alone (a CRC collision aside)."""
        for (g, p), image in zip(recs, images, strict=True):
            n = rc.OVERHEAD + len(p)
            if s[:n] == image[:n]:
                return (g, p)
        return None

    held = [holds(s) for s in raw]
    got = rc.choose(VAR.decode(raw[0]), VAR.decode(raw[1]))
    valid = [h for h in held if h is not None]
    if not valid:
        assert isinstance(got, rc.NoValidSlot)
        assert got.describe().startswith("slot A: ") and "; slot B: " in got.describe()
        return
    assert isinstance(got, rc.Choice)
    best = max(h[0] for h in valid)
    winner = 0 if held[0] is not None and held[0][0] == best else 1
    assert got.winner == winner and (got.generation, got.value) == held[winner]
    other = held[1 - winner]
    status = got.verdicts[1 - winner].status
    if other is None:
        assert status is rc.Status.DAMAGED
    elif other == held[winner]:
        assert status is rc.Status.OK
    elif other[0] < best:
        assert status is rc.Status.STALE
    else:
        assert status is rc.Status.CONFLICT
    assert got.verdicts[winner].status is rc.Status.OK
    assert got.healthy == (status is rc.Status.OK)
    assert (got.note() is None) == got.healthy


@given(st.lists(records, min_size=2, max_size=3), st.data(), var_payloads)
def test_a_write_torn_anywhere_keeps_the_newest_record_or_makes_the_new_one(
    recs: list[tuple[int, bytes]], data: st.DataObject, new: bytes
) -> None:
    """Whatever state the slots are in, a crash during either write of next_write's plan
    leaves the record that won before the write, or the new one: never an older one."""
    images = [VAR.encode(g, p) for g, p in recs]
    raw = [data.draw(damaged_slot(images[i], images)) for i in (0, 1)]
    before = rc.choose(VAR.decode(raw[0]), VAR.decode(raw[1]))
    if not isinstance(before, rc.Choice):
        return
    plan = rc.next_write(before)
    assert plan.generation == before.generation + 1
    assert plan.first == 1 - before.winner if not before.healthy else plan.first == 0
    image = VAR.encode(plan.generation, new)
    slots = [s.ljust(SLOT, b"\0") for s in raw]
    crash_at = data.draw(st.sampled_from([0, 1]))
    cut = data.draw(st.integers(0, SLOT))
    if crash_at == 1:
        slots[plan.order[0]] = image
    i = plan.order[crash_at]
    slots[i] = image[:cut] + slots[i][cut:]
    after = rc.choose(VAR.decode(slots[0]), VAR.decode(slots[1]))
    assert isinstance(after, rc.Choice)
    if crash_at == 1:
        assert after.value == new and after.generation == plan.generation
    else:
        assert (after.generation, after.value) in (
            (before.generation, before.value),
            (plan.generation, new),
        )


def test_verdicts_and_notes() -> None:
    a, b = VAR.encode(2, b"new"), VAR.encode(1, b"old")
    got = rc.read_pair(VAR, a + b)
    assert isinstance(got, rc.Choice) and got.value == b"new" and got.bad_slots == (1,)
    assert (
        got.note("pair p1")
        == "pair p1 slot B stale (generation 1 behind 2): kept slot A (generation 2)"
    )
    assert rc.next_write(got) == rc.WritePlan((1, 0), 3)
    bad = a[:30] + b"\xff" + a[31:]
    got = rc.read_pair(VAR, bad + a)
    assert isinstance(got, rc.Choice) and got.winner == 1 and got.bad_slots == (0,)
    note = got.note()
    assert note is not None and note.startswith("record slot A damaged (bad CRC32C (stored ")
    assert note.endswith(": kept slot B (generation 2)")
    assert rc.next_write(got) == rc.WritePlan((0, 1), 3)
    got = rc.read_pair(VAR, a + VAR.encode(2, b"other"))  # equal generations, other content
    assert isinstance(got, rc.Choice) and got.winner == 0
    assert got.verdicts[1].status is rc.Status.CONFLICT
    assert rc.next_write(got).order == (1, 0)
    got = rc.read_pair(VAR, a + a)
    assert isinstance(got, rc.Choice) and got.healthy and got.note() is None
    assert rc.next_write(got) == rc.WritePlan((0, 1), 3)
    assert rc.read_pair(VAR, a[: SLOT + 10]).winner == 0  # type: ignore[union-attr]
    assert isinstance(rc.read_pair(VAR, b""), rc.NoValidSlot)
    with pytest.raises(rc.RecordCodecError, match="maximum"):
        rc.next_write(rc.read_pair(VAR, VAR.encode(U64, b"") * 2))  # type: ignore[arg-type]


def test_the_minor_version_does_not_make_slots_differ() -> None:
    """Readers accept any minor of their major, and a slot written by another minor holds the
    same record."""
    other_minor = rc.SlotCodec(MAGIC, 3, SLOT, minor=7)
    got = rc.read_pair(VAR, VAR.encode(4, b"x") + other_minor.encode(4, b"x"))
    assert isinstance(got, rc.Choice) and got.healthy and got.slot.minor == 1


# -- the record file -----------------------------------------------------------------------


def test_create_read_write(tmp_path: Path) -> None:
    p = str(tmp_path / "doc.rec")
    rec = record_file.create(p, VAR, b'{"a": 1}')
    assert (rec.payload, rec.generation, rec.note) == (b'{"a": 1}', 1, None)
    assert os.path.getsize(p) == 2 * SLOT
    assert [f for f in os.listdir(tmp_path)] == ["doc.rec"]  # no temporary file left
    assert record_file.read(p, VAR) == rec
    rec = record_file.write(p, VAR, b'{"a": 2}')
    assert (rec.payload, rec.generation) == (b'{"a": 2}', 2)
    assert record_file.read(p, VAR).payload == b'{"a": 2}'
    with pytest.raises(AlreadyExists):
        record_file.create(p, VAR, b"again")
    assert record_file.create(p, VAR, b"over", replace=True).generation == 1
    assert record_file.read(p, VAR).payload == b"over"
    with pytest.raises(NotFound):
        record_file.read(str(tmp_path / "missing"), VAR)
    with pytest.raises(NotFound):
        record_file.write(str(tmp_path / "missing"), VAR, b"")
    with pytest.raises(UsageError, match="not a regular file"):
        record_file.read(str(tmp_path), VAR)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UsageError, match="not a regular file"):
        record_file.read(str(tmp_path / "fifo"), VAR)  # and does not block
    with pytest.raises(rc.RecordCodecError):
        record_file.write(p, VAR, b"x" * SLOT)
    assert record_file.read(p, VAR).payload == b"over"


def test_a_bad_slot_is_reported_and_the_next_write_repairs_it(tmp_path: Path) -> None:
    p = tmp_path / "doc.rec"
    record_file.create(str(p), VAR, b"one")
    record_file.write(str(p), VAR, b"two")
    with open(p, "r+b") as f:
        f.seek(SLOT + 30)
        f.write(b"\xff")
    rec = record_file.read(str(p), VAR)
    assert rec.payload == b"two" and rec.note is not None
    assert rec.note.startswith(f"{p}: test record slot B damaged (bad CRC32C (stored ")
    assert rec.note.endswith(": kept slot A (generation 2)")
    written: list[int] = []
    real = record_file._pwrite_all

    def spy(fd: int, data: bytes, offset: int) -> None:
        written.append(offset)
        real(fd, data, offset)

    with mock.patch.object(record_file, "_pwrite_all", spy):
        rec = record_file.write(str(p), VAR, b"three")
    assert written == [SLOT, 0]  # the damaged slot first
    assert rec.generation == 3 and record_file.read(str(p), VAR).note is None


def test_no_valid_slot_is_record_corrupt_and_nothing_is_written(tmp_path: Path) -> None:
    p = tmp_path / "doc.rec"
    record_file.create(str(p), VAR, b"one")
    p.write_bytes(b"\0" * SLOT + b"junk" * 10)
    with pytest.raises(record_file.RecordCorrupt, match=r"slot A: .*blank.*; slot B: .*bad magic"):
        record_file.read(str(p), VAR)
    with pytest.raises(record_file.RecordCorrupt):
        record_file.write(str(p), VAR, b"two")
    assert p.read_bytes() == b"\0" * SLOT + b"junk" * 10


def test_expected_generation_is_a_compare_and_swap(tmp_path: Path) -> None:
    p = str(tmp_path / "doc.rec")
    record_file.create(p, VAR, b"one")
    assert record_file.write(p, VAR, b"two", expected_generation=1).generation == 2
    with pytest.raises(IllegalState, match="generation 2, not 1"):
        record_file.write(p, VAR, b"lost update", expected_generation=1)
    assert record_file.read(p, VAR).payload == b"two"


class Crash(BaseException):
    """The process died here (BaseException: nothing in record_file may catch it)."""


class RecordFileMachine(RuleBasedStateMachine):
    """record_file against a model of what each slot may hold.

    Each write k has its own payload, and each slot holds a set of possibilities: the writes
    whose record it may hold intact, and None if it may hold garbage.  A write torn in a slot
    adds "the new write, or garbage" to what the slot held; a completed slot write makes it
    exactly the new write; the test's own damage makes it garbage.  A read must return the
    newest write of one combination of the possibilities (or fail when both may be garbage),
    and a torn write must leave what a read returned just before it, or the new payload."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="pairvol-record-")
        self.path = os.path.join(self.dir, "r.rec")
        self.payloads: list[bytes] = []
        self.slots: list[set[int | None]] = [set(), set()]
        self._start(b"")

    def teardown(self) -> None:
        shutil.rmtree(self.dir)

    def _next(self, extra: bytes) -> bytes:
        payload = f"w{len(self.payloads)}:".encode() + extra[: VAR.max_payload - 8]
        self.payloads.append(payload)
        return payload

    def _start(self, extra: bytes) -> None:
        payload = self._next(extra)
        record_file.create(self.path, VAR, payload, replace=True)
        k = len(self.payloads) - 1
        self.slots = [{k}, {k}]

    def _possible(self) -> set[bytes | None]:
        out: set[bytes | None] = set()
        for x in self.slots[0]:
            for y in self.slots[1]:
                held = [k for k in (x, y) if k is not None]
                out.add(self.payloads[max(held)] if held else None)
        return out

    def _read(self) -> bytes | None:
        try:
            got: bytes | None = record_file.read(self.path, VAR).payload
        except record_file.RecordCorrupt:
            got = None
        assert got in self._possible()
        return got

    @invariant()
    def reads_match_the_model(self) -> None:
        self._read()

    @rule(extra=st.binary(max_size=VAR.max_payload))
    def write(self, extra: bytes) -> None:
        now = self._read()
        payload = self._next(extra)
        if now is None:  # both slots destroyed (at least one of them by the test itself)
            with pytest.raises(record_file.RecordCorrupt):
                record_file.write(self.path, VAR, payload)
            return
        assert record_file.write(self.path, VAR, payload).payload == payload
        k = len(self.payloads) - 1
        self.slots = [{k}, {k}]
        assert self._read() == payload

    @rule(
        extra=st.binary(max_size=VAR.max_payload),
        call=st.sampled_from([0, 1]),
        cut=st.integers(0, SLOT),
    )
    def torn_write(self, extra: bytes, call: int, cut: int) -> None:
        before = self._read()
        payload = self._next(extra)
        k = len(self.payloads) - 1
        writes: list[int] = []

        def dying(fd: int, data: bytes, offset: int) -> None:
            writes.append(offset)
            if len(writes) - 1 == call:
                os.pwrite(fd, data[:cut], offset)
                raise Crash
            os.pwrite(fd, data, offset)

        with mock.patch.object(record_file, "_pwrite_all", dying):
            if before is None:
                with pytest.raises(record_file.RecordCorrupt):
                    record_file.write(self.path, VAR, payload)
                assert writes == []
                return
            with pytest.raises(Crash):
                record_file.write(self.path, VAR, payload)
        for n, offset in enumerate(writes):
            i = offset // SLOT
            self.slots[i] = self.slots[i] | {k, None} if n == call else {k}
        after = self._read()
        if call == 1:
            assert after == payload  # the first slot was written and synced
        else:
            assert after in (before, payload)

    @rule(slot=st.sampled_from([0, 1]), junk=st.binary(min_size=SLOT, max_size=SLOT))
    def damage(self, slot: int, junk: bytes) -> None:
        junk = bytes([MAGIC[0] ^ 0xFF]) + junk[1:]  # never a valid slot
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, junk, slot * SLOT)
        finally:
            os.close(fd)
        self.slots[slot] = {None}

    @precondition(lambda self: None in self._possible())
    @rule(extra=st.binary(max_size=20))
    def start_over(self, extra: bytes) -> None:
        self._start(extra)


TestRecordFileMachine = RecordFileMachine.TestCase
TestRecordFileMachine.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


_WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from replicator import record_codec as rc, record_file
codec = rc.SlotCodec(b"PVTEST\\0\\0", 3, 4096, name="test record")
k = int(record_file.read(sys.argv[2], codec).payload)
print("ready", flush=True)
while True:
    k += 1
    record_file.write(sys.argv[2], codec, b"%d" % k + b" " * (k % 3000))
    print(k, flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_writes_never_loses_an_acknowledged_record(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites a record in a loop, at random moments: the record
    read afterwards is the last one whose write returned, or the one after it."""
    codec = rc.SlotCodec(MAGIC, 3, 4096, name="test record")
    p = tmp_path / "r.rec"
    record_file.create(str(p), codec, b"0")
    rng = random.Random()
    last = 0
    for _ in range(25):
        with subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(ROOT), str(p)], stdout=subprocess.PIPE
        ) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=rng.uniform(0.001, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            acked = [int(line) for line in proc.stdout.read().split()]
        got = int(record_file.read(str(p), codec).payload)
        acked_last = acked[-1] if acked else last
        assert acked_last <= got <= acked_last + 1
        last = got
    assert last > 0
