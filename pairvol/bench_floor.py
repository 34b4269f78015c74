"""The per-step floor of a replicated write: the CPU of each unavoidable step, measured here.

Theory of operation.  A sync mirrored write costs node a (the primary) what an unreplicated
write costs, plus encoding the Write frame, sending it and receiving and decoding the peer's
Ack; it costs node b (the secondary) receiving and decoding the frame, ``pwritev`` of its data
and encoding and sending the Ack.  :func:`measure_steps` times each of those steps on its own,
in this process, with no other work in the way: CPU time of this thread
(:func:`time.thread_time_ns`) over many iterations, the median of several repeats.  The whole
measurement is bounded in time (about 1 s at the default settings).

:func:`sync_floor` adds the steps up per node, with the unreplicated write's own cost as
measured by the benchmark run (``local``), into a per-request (4 KiB) and per-MiB (1 MiB)
floor: a write path that did these steps and nothing else could not cost less CPU on this
machine, with this Python and this ``crc32c``.  :func:`ceilings` turns CPU per request into the
rates it allows: on this machine (every core shared by both nodes and the client), and on two
hosts (each node its own machine, bounded by the busier one).  Those rates are estimates; the
step times are measurements, and the report says which is which.

An async write is journalled on both nodes before it is applied: :func:`async_floor` adds,
for 1 MiB entries, a :class:`~replicator.journal.Journal` append (CRC, record, ``pwritev``,
``fdatasync``) on each node and the volume's ``pwritev`` on b to the frame and socket steps.
Its ``first_lap`` variant charges each journal ``pwritev`` what writing into pages the page
cache has never held costs (``pwritev_1m_fresh``): a new journal's first pass over its ring.
On some virtual machines that is many times an overwrite of cached pages (the host backs
each new guest page on first touch); on a host that recycles its page cache it is close to
``pwritev_1m``.

The socket steps run over TCP loopback with both ends in this thread: on loopback the kernel
delivers into the receiver's queue during the sender's ``sendmsg``, so the split between the
a and b sides is approximate and their sum is what counts.  The lab's nodes talk over a veth
pair between namespaces, which the same TCP stack serves.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import crc32c

from replicator import wire
from replicator.journal import Journal
from replicator.journal_codec import Entry, EntryKind, record_size

SMALL = 4096
LARGE = 1 << 20
REPEATS = 5
#: CPU seconds one repeat of a step aims for when the iteration count is calibrated.
REPEAT_S = 0.015
MAX_ITERATIONS = 20_000
PROBE = 4  # iterations of the calibrating run
FILE_SPAN = 8 << 20  # the temp file the pwritev steps overwrite, all of it in the page cache
#: Iterations per repeat, at most, of the steps that write new data to the disk (each one
#: takes a fresh MiB, or makes a journal append durable): a few seconds of disk, not minutes.
DISK_ITERATIONS = {"pwritev_1m_fresh": 32, "journal_append_4k": 400, "journal_append_1m": 8}
PAIR_ID = "bench/p"

#: Step name -> what it is, in the order the report lists them.
STEPS: dict[str, str] = {
    "encode_write_4k": "encode a 4 KiB Write frame (wire.encode_parts, header and payload CRC)",
    "encode_write_1m": "encode a 1 MiB Write frame",
    "decode_write_4k": "decode a 4 KiB Write frame (FrameDecoder.feed + next_frame, CRCs)",
    "decode_write_1m": "decode a 1 MiB Write frame (feed copies it once)",
    "alloc_1m": "bytearray(1 MiB), inside decode_write_1m: a fresh payload buffer per frame",
    "encode_ack": "encode an Ack frame",
    "decode_ack": "decode an Ack frame",
    "crc32c_1m": "CRC32C of 1 MiB (inside every encode and decode above)",
    "pwritev_4k": "os.pwritev of 4 KiB into a cached temp file",
    "pwritev_1m": "os.pwritev of 1 MiB into a cached temp file",
    "pwritev_1m_fresh": "os.pwritev of 1 MiB into pages the page cache never held (a file "
    "that grows: a new journal's first lap)",
    "journal_append_4k": "Journal.append of a 4 KiB entry, one writer: CRC, record, pwritev, "
    "its own fdatasync",
    "journal_append_1m": "Journal.append of a 1 MiB entry into a ring whose pages are cached "
    "(past its first lap), one writer, its own fdatasync",
    "journal_read_1m": "Journal.entries: one 1 MiB entry read back from a cached journal "
    "(pread, CRC check), as the shipper and the applier do",
    "tcp_4k_a": "TCP loopback, a's side: sendmsg a 4 KiB request, recv_into the ack",
    "tcp_4k_b": "TCP loopback, b's side: recv_into the 4 KiB request, sendmsg the ack",
    "tcp_1m_a": "TCP loopback, a's side: send a 1 MiB request, recv_into the ack",
    "tcp_1m_b": "TCP loopback, b's side: recv_into the 1 MiB request, send the ack",
}

#: A step's runner: do the step ``n`` times, return the CPU nanoseconds per named part.
Runner = Callable[[int], dict[str, int]]


def _timed(name: str, op: Callable[[int], object]) -> Runner:
    def run(n: int) -> dict[str, int]:
        t0 = time.thread_time_ns()
        for i in range(n):
            op(i)
        return {name: time.thread_time_ns() - t0}

    return run


def _median_us(
    run: Runner, iterations: int | None, repeats: int, cap: int = MAX_ITERATIONS
) -> dict[str, dict[str, Any]]:
    """Each part's CPU µs per operation: the median of ``repeats`` runs of ``iterations``
    (calibrated to about :data:`REPEAT_S` each, at most ``cap``, when None), with the runs'
    min and max."""
    run(1)  # warm-up: first allocations, page faults, socket buffers
    if iterations is not None:
        iterations = min(iterations, cap)
    else:
        probe = sum(run(PROBE).values()) / PROBE / 1e9
        iterations = max(PROBE, min(cap, int(REPEAT_S / max(probe, 1e-7))))
    per: dict[str, list[float]] = {}
    for _ in range(repeats):
        for part, ns in run(iterations).items():
            per.setdefault(part, []).append(ns / iterations / 1000)
    return {
        part: {
            "us": round(statistics.median(xs), 3),
            "min_us": round(min(xs), 3),
            "max_us": round(max(xs), 3),
            "iterations": iterations,
            "repeats": repeats,
        }
        for part, xs in per.items()
    }


def _decoder() -> wire.FrameDecoder:
    return wire.FrameDecoder(max_payload=wire.MAX_PAYLOAD, codecs=frozenset())


def _codec_ops(small: bytes, large: bytes) -> dict[str, Callable[[int], object]]:
    def encoder(data: bytes) -> Callable[[int], object]:
        return lambda i: wire.encode_parts(wire.Write(PAIR_ID, 0, data), i)

    def decoder(frame: bytes) -> Callable[[int], object]:
        dec = _decoder()

        def op(_i: int) -> object:
            dec.feed(frame)
            return dec.next_frame()

        return op

    return {
        "encode_write_4k": encoder(small),
        "encode_write_1m": encoder(large),
        "decode_write_4k": decoder(wire.encode(wire.Write(PAIR_ID, 0, small))),
        "decode_write_1m": decoder(wire.encode(wire.Write(PAIR_ID, 0, large))),
        "alloc_1m": lambda _i: bytearray(LARGE),
        "encode_ack": lambda i: wire.encode_parts(wire.Ack(), i),
        "decode_ack": decoder(wire.encode(wire.Ack(), 1)),
        "crc32c_1m": lambda _i: crc32c.crc32c(large),
    }


@contextlib.contextmanager
def _cached_file(directory: Path | None) -> Iterator[int]:
    """A temp file of :data:`FILE_SPAN` bytes, written once so that its pages are cached."""
    with tempfile.TemporaryFile(dir=directory) as f:
        fd = f.fileno()
        block = os.urandom(LARGE)
        for off in range(0, FILE_SPAN, LARGE):
            os.pwrite(fd, block, off)
        yield fd


def _pwritev_ops(fd: int, small: bytes, large: bytes) -> dict[str, Callable[[int], object]]:
    def write(data: bytes) -> Callable[[int], object]:
        slots = FILE_SPAN // len(data)
        # A stride that visits the slots out of order, as a random writer would.
        return lambda i: os.pwritev(fd, [data], (i * 7919 % slots) * len(data))

    return {"pwritev_4k": write(small), "pwritev_1m": write(large)}


def _fresh_op(fd: int, large: bytes) -> Callable[[int], object]:
    """Each call writes the next MiB of a file that only grows: pages never cached before."""
    offsets = itertools.count(0, LARGE)
    return lambda _i: os.pwritev(fd, [large], next(offsets))


@contextlib.contextmanager
def _journal(directory: Path | None, capacity: int) -> Iterator[Journal]:
    """A new journal of ``capacity`` bytes whose ring is written once first (through another
    descriptor, beyond anything the journal reads back), so that its pages are cached."""
    with tempfile.TemporaryDirectory(dir=directory) as d:
        journal = Journal.create(os.path.join(d, "journal"), capacity, "bench")
        try:
            fd = os.open(journal.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                zeros = bytes(LARGE)
                for off in range(size - capacity, size, LARGE):
                    os.pwrite(fd, zeros[: size - off], off)
            finally:
                os.close(fd)
            yield journal
        finally:
            journal.close()


def _journal_op(journal: Journal, data: bytes) -> Callable[[int], object]:
    return lambda i: journal.append(0, EntryKind.WRITE, (i % 64) * len(data), data)


def _read_back_op(journal: Journal) -> Callable[[int], object]:
    """Each call reads the next retained entry back (from the oldest again at the end)."""
    entries: Iterator[Entry] = iter(())

    def op(_i: int) -> object:
        nonlocal entries
        entry = next(entries, None)
        if entry is None:
            entries = journal.entries(journal.first_seq)
            entry = next(entries)
        return entry

    return op


def _journal_capacity(size: int, repeats: int) -> int:
    """Room for every append :func:`_median_us` can make of ``size`` bytes: no lap, no
    release, never full."""
    appends = 1 + PROBE + repeats * DISK_ITERATIONS[f"journal_append_{_size_name(size)}"]
    return (-(-appends * record_size(size) // LARGE) + 2) * LARGE  # whole MiB, and slack


def _size_name(size: int) -> str:
    return "1m" if size == LARGE else "4k"


@contextlib.contextmanager
def _loopback_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    with a, b:
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        yield a, b


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("loopback peer closed")
        got += n


def _tcp_small(a: socket.socket, b: socket.socket, small: bytes) -> Runner:
    """One 4 KiB request and its ack per iteration, blocking, one in flight."""
    request = wire.encode_parts(wire.Write(PAIR_ID, 0, small), 1)
    ack = wire.encode(wire.Ack(), 1)
    inbox = memoryview(bytearray(sum(len(p) for p in request)))
    ack_in = memoryview(bytearray(len(ack)))
    clock = time.thread_time_ns

    def run(n: int) -> dict[str, int]:
        a_ns = b_ns = 0
        for _ in range(n):
            t0 = clock()
            a.sendmsg(request)
            t1 = clock()
            _recv_exact(b, inbox)
            b.sendmsg([ack])
            t2 = clock()
            _recv_exact(a, ack_in)
            t3 = clock()
            a_ns += (t1 - t0) + (t3 - t2)
            b_ns += t2 - t1
        return {"tcp_4k_a": a_ns, "tcp_4k_b": b_ns}

    return run


def _tcp_large(a: socket.socket, b: socket.socket, large: bytes) -> Runner:
    """One 1 MiB request and its ack per iteration: both ends non-blocking in this one
    thread, a sending while b's receive buffer takes it, b draining it in turn."""
    frame = memoryview(wire.encode(wire.Write(PAIR_ID, 0, large), 1))
    ack = wire.encode(wire.Ack(), 1)
    inbox = memoryview(bytearray(len(frame)))
    ack_in = memoryview(bytearray(len(ack)))
    clock = time.thread_time_ns

    def run(n: int) -> dict[str, int]:
        a.setblocking(False)
        b.setblocking(False)
        a_ns = b_ns = 0
        try:
            for _ in range(n):
                sent = got = 0
                while got < len(frame):
                    t0 = clock()
                    if sent < len(frame):
                        with contextlib.suppress(BlockingIOError):
                            sent += a.send(frame[sent:])
                    t1 = clock()
                    with contextlib.suppress(BlockingIOError):
                        got += b.recv_into(inbox[got:])
                    t2 = clock()
                    a_ns += t1 - t0
                    b_ns += t2 - t1
                t0 = clock()
                b.send(ack)  # a few bytes into an empty buffer: never short
                t1 = clock()
                b.setblocking(True)  # so that the ack's receive below waits, not spins
                a.setblocking(True)
                _recv_exact(a, ack_in)
                a.setblocking(False)
                b.setblocking(False)
                t2 = clock()
                a_ns += t2 - t1
                b_ns += t1 - t0
        finally:
            a.setblocking(True)
            b.setblocking(True)
        return {"tcp_1m_a": a_ns, "tcp_1m_b": b_ns}

    return run


def measure_steps(
    directory: Path | None = None, *, iterations: int | None = None, repeats: int = REPEATS
) -> dict[str, dict[str, Any]]:
    """Every step of :data:`STEPS`: CPU µs per operation (``us``, the median of ``repeats``),
    with ``min_us``, ``max_us``, ``iterations`` and ``repeats``.  ``iterations`` None
    calibrates each step to about :data:`REPEAT_S` of CPU per repeat.  The pwritev steps write
    a temp file in ``directory`` (default: the system's temp directory)."""
    small, large = os.urandom(SMALL), os.urandom(LARGE)
    out: dict[str, dict[str, Any]] = {}
    with _cached_file(directory) as fd:
        ops = {**_codec_ops(small, large), **_pwritev_ops(fd, small, large)}
        for name, op in ops.items():
            out.update(_median_us(_timed(name, op), iterations, repeats))
    with tempfile.TemporaryFile(dir=directory) as f:
        cap = DISK_ITERATIONS["pwritev_1m_fresh"]
        run = _timed("pwritev_1m_fresh", _fresh_op(f.fileno(), large))
        out.update(_median_us(run, iterations, repeats, cap))
    for data in (small, large):
        name = f"journal_append_{_size_name(len(data))}"
        with _journal(directory, _journal_capacity(len(data), repeats)) as journal:
            run = _timed(name, _journal_op(journal, data))
            out.update(_median_us(run, iterations, repeats, DISK_ITERATIONS[name]))
            if data is large:
                run = _timed("journal_read_1m", _read_back_op(journal))
                out.update(_median_us(run, iterations, repeats))
    with _loopback_pair() as (a, b):
        out.update(_median_us(_tcp_small(a, b, small), iterations, repeats))
        out.update(_median_us(_tcp_large(a, b, large), iterations, repeats))
    return {name: out[name] for name in STEPS}


#: :func:`measure_disk`: journal writers (the nodes' four nbdkit threads), 1 MiB appends each
#: per round, and rounds.
DISK_WRITERS, DISK_APPENDS, DISK_ROUNDS = 4, 16, 3


def measure_disk(
    directory: Path | None = None,
    *,
    writers: int = DISK_WRITERS,
    appends: int = DISK_APPENDS,
    rounds: int = DISK_ROUNDS,
) -> dict[str, Any]:
    """How fast 1 MiB journal appends become durable here, by the wall clock: ``writers``
    threads each append ``appends`` entries to one journal whose ring is cached (each append
    waits for its fdatasync, which the writers share as the nodes' do); the median MiB/s of
    ``rounds``, with each round's.  Async writes are durable in a journal before they are
    acknowledged, so this bounds them where CPU does not."""
    data = os.urandom(LARGE)
    per_round = writers * appends
    capacity = (-(-(1 + rounds * per_round) * record_size(LARGE) // LARGE) + 2) * LARGE
    rates: list[float] = []
    with _journal(directory, capacity) as journal:
        journal.append(0, EntryKind.WRITE, 0, data)  # warm-up: the first sync, the file's blocks

        def write() -> None:
            for i in range(appends):
                journal.append(0, EntryKind.WRITE, i * LARGE, data)

        for _ in range(rounds):
            threads = [threading.Thread(target=write, daemon=True) for _ in range(writers)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rates.append(per_round / max(time.monotonic() - t0, 1e-9))
    return {
        "mib_s": round(statistics.median(rates), 1),
        "rounds_mib_s": [round(r, 1) for r in rates],
        "writers": writers,
        "appends": appends,
    }


# -- the floor of a sync mirrored write, and the rates CPU allows -----------------------------

#: The steps each node pays per write, on top of the unreplicated write (node a only).
NODE_STEPS: dict[str, dict[str, tuple[str, ...]]] = {
    "4k": {
        "a": ("encode_write_4k", "tcp_4k_a", "decode_ack"),
        "b": ("tcp_4k_b", "decode_write_4k", "pwritev_4k", "encode_ack"),
    },
    "1m": {
        "a": ("encode_write_1m", "tcp_1m_a", "decode_ack"),
        "b": ("tcp_1m_b", "decode_write_1m", "pwritev_1m", "encode_ack"),
    },
}


def ceilings(
    cpu_a: float, cpu_b: float, client: float | None, cores: int, base: float | None = None
) -> dict[str, Any]:
    """The rates CPU alone allows (estimates), for ``cpu_a``, ``cpu_b`` and ``client`` CPU
    seconds per unit (a request, or a MiB) on node a, node b and the client (fio; None when
    unknown, then left out):

    - ``this_machine``: ``cores`` shared by both nodes and the client;
    - ``two_hosts_gil``: each node its own host, bounded by the busier node, all of whose
      CPU is taken as serialized (one core: the GIL's bound);
    - ``two_hosts_all_cores``: the same with every core of each host usable (the client
      runs on a's host).

    With ``base`` (the unreplicated rate in the same unit), each rate also as a ratio."""
    extra = client or 0.0
    busier = max(cpu_a, cpu_b)
    rates = {
        "this_machine": cores / (cpu_a + cpu_b + extra) if cpu_a + cpu_b + extra > 0 else None,
        "two_hosts_gil": 1 / busier if busier > 0 else None,
        "two_hosts_all_cores": cores / max(cpu_a + extra, cpu_b) if busier > 0 else None,
    }
    out: dict[str, Any] = {
        "cores": cores,
        "client_included": client is not None,
        "busier": "a" if cpu_a >= cpu_b else "b",
        "rate": {k: None if v is None else round(v, 1) for k, v in rates.items()},
    }
    if base:
        out["ratio"] = {k: None if v is None else round(v / base, 3) for k, v in rates.items()}
    return out


#: The steps each node pays per async entry of 1 MiB, on top of the unreplicated write (node
#: a only): a journals it, reads it back and ships it in a frame of its own (an entry of 1 MiB
#: fills an Entries frame, which costs what a Write frame does); b journals it, reads it back
#: and applies it to the volume.
ASYNC_STEPS: dict[str, dict[str, tuple[str, ...]]] = {
    "1m": {
        "a": ("journal_append_1m", "journal_read_1m", "encode_write_1m", "tcp_1m_a", "decode_ack"),
        "b": ("tcp_1m_b", "decode_write_1m", "journal_append_1m", "journal_read_1m", "pwritev_1m"),
    },
}
#: A new journal's first lap: each journal append's ``pwritev`` lands in pages the page
#: cache never held, at the cost of this step instead of ``pwritev_1m`` (on each node).
FIRST_LAP = ("pwritev_1m_fresh", "pwritev_1m")


def sync_floor(
    steps: Mapping[str, Mapping[str, Any]],
    local: Mapping[str, float | None],
    client: Mapping[str, float | None],
    base: Mapping[str, float | None],
    cores: int,
) -> dict[str, Any]:
    """The per-request (``4k``) and per-MiB (``1m``) floor of a sync mirrored write on nodes a
    and b, in µs: :data:`NODE_STEPS`' steps, plus on a the unreplicated write's CPU
    (``local``, µs per request / per MiB as measured by the run; None: left out), and the
    :func:`ceilings` those allow with the client's cost (``client``, µs) and against the
    unreplicated rate (``base``: IOPS for ``4k``, MiB/s for ``1m``)."""
    return {
        size: _node_floor(size, nodes, steps, local, client, base, cores)
        for size, nodes in NODE_STEPS.items()
    }


#: How many times one async MiB is made durable (written and fdatasynced) on the busiest disk:
#: on this machine's one disk a's journal, b's receive journal and b's volume (the applier
#: syncs it per batch); on two hosts b's disk takes the last two.  a's volume is written back
#: in time, never waited for.
DURABLE_COPIES = {"this_machine": 3, "two_hosts": 2}


def async_floor(
    steps: Mapping[str, Mapping[str, Any]],
    local: Mapping[str, float | None],
    client: Mapping[str, float | None],
    base: Mapping[str, float | None],
    cores: int,
    disk_mib_s: float | None = None,
) -> dict[str, Any]:
    """The per-MiB floor of an async write of 1 MiB entries, end to end (written on a,
    applied on b), as :func:`sync_floor` with :data:`ASYNC_STEPS`: ``warm`` with every
    journal's ring in the page cache, and ``first_lap`` with each node's journal ``pwritev``
    charged at :data:`FIRST_LAP`'s cost of pages never cached.  With ``disk_mib_s`` (the
    durable rate of :func:`measure_disk`), also ``disk``: the rates the disk allows with
    :data:`DURABLE_COPIES`, and their ratios to ``base``."""
    fresh, cached = (float(steps[s]["us"]) for s in FIRST_LAP)
    out: dict[str, Any] = {}
    for size, nodes in ASYNC_STEPS.items():
        warm = _node_floor(size, nodes, steps, local, client, base, cores)
        lap = {h: warm[f"{h}_us"] + fresh - cached for h in "ab"}
        fio = client.get(size)
        out[size] = {
            "warm": warm,
            "first_lap": {
                "a_us": round(lap["a"], 2),
                "b_us": round(lap["b"], 2),
                "extra_per_journal_us": round(fresh - cached, 2),
                "ceilings": ceilings(
                    lap["a"] / 1e6,
                    lap["b"] / 1e6,
                    None if fio is None else fio / 1e6,
                    cores,
                    base.get(size),
                ),
            },
        }
        if disk_mib_s:
            out[size]["disk"] = _disk_ceilings(disk_mib_s, base.get(size))
    return out


def _disk_ceilings(mib_s: float, base: float | None) -> dict[str, Any]:
    rates = {where: mib_s / n for where, n in DURABLE_COPIES.items()}
    out: dict[str, Any] = {
        "durable_mib_s": mib_s,
        "copies": dict(DURABLE_COPIES),
        "rate": {k: round(v, 1) for k, v in rates.items()},
    }
    if base:
        out["ratio"] = {k: round(v / base, 3) for k, v in rates.items()}
    return out


def _node_floor(
    size: str,
    nodes: Mapping[str, tuple[str, ...]],
    steps: Mapping[str, Mapping[str, Any]],
    local: Mapping[str, float | None],
    client: Mapping[str, float | None],
    base: Mapping[str, float | None],
    cores: int,
) -> dict[str, Any]:
    a = sum(float(steps[s]["us"]) for s in nodes["a"])
    b = sum(float(steps[s]["us"]) for s in nodes["b"])
    own = local.get(size)
    if own is not None:
        a += own
    fio = client.get(size)
    return {
        "unit": "request" if size == "4k" else "MiB",
        "a_us": round(a, 2),
        "b_us": round(b, 2),
        "a_steps": list(nodes["a"]),
        "b_steps": list(nodes["b"]),
        "local_us": own,  # the unreplicated write on a, measured by the run (None: left out)
        "client_us": fio,
        "ceilings": ceilings(
            a / 1e6, b / 1e6, None if fio is None else fio / 1e6, cores, base.get(size)
        ),
    }


def format_steps(steps: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Table lines: each step's median CPU µs and its spread over the repeats."""
    lines = [["step", "µs", "min-max µs", "iterations"]]
    for name, what in STEPS.items():
        s = steps.get(name)
        if s is None:
            continue
        lines.append(
            [
                f"{name}: {what}",
                f"{s['us']:.1f}",
                f"{s['min_us']:.1f}-{s['max_us']:.1f}",
                f"{s['iterations']}x{s['repeats']}",
            ]
        )
    return lines


def hardware_crc() -> bool | None:
    """Whether the ``crc32c`` module the project imports uses the CPU's instruction."""
    value = getattr(crc32c, "hardware_based", None)
    return None if value is None else bool(value)
