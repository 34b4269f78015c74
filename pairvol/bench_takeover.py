"""Takeover benchmark (``pairvol bench --suite takeover``): a secondary made the primary while
its copy is incomplete (issue 11, "Benchmark").

Theory of operation.  One two-host lab (:class:`pairvol.bench.BenchLab`, hosts a and b).
Every scenario is a fresh async pair ``G/p`` of volume ``G`` (primary a, secondary b) whose
shipping is throttled so that what a writes piles up unshipped (the backlog, which a's journal
holds); then ``pair.takeover G`` on b's node (its control socket, as the CLI calls it), with
a's node still answering: b fences a, takes what it lacks as *pending* chunks, and returns,
writable; a background pull (hydration) copies the pending chunks from a, and a read of one
still pending is fetched on demand.  When the pull is done (``pair.pull.done`` in b's event
log) the pair swaps back on its own (``pair.reverse``) and ends in PAIR with b the primary;
then ``pair verify`` must find no difference, and the pair is deleted.

1. **Time to ready against the backlog.**  For each size S (and each round, the order of the
   sizes reversed every other round): a pair of volumes of the largest size plus a tail that
   is never written (so the bitmap, and everything else that scales with the volume, is the
   same at every S and only the backlog changes), created with ``--max-rate`` (shipping)
   low; S bytes written through a's export; a's ``backlog_bytes``; then the takeover, without
   a limit on the pull.  ``takeover_s`` is the control call; ``first_read_s`` the connection to
   b's export and the first 4 KiB read of a pending chunk (the last one written: the pull goes
   from the first); ``ready_s`` their sum.
2. **Read latency, fetched against local.**  A pair whose first ``local_size`` bytes reached b
   before shipping was throttled (``split`` then ``resync --max-rate``) and whose next
   ``reads`` chunks and a quarter were written after: taken over with the pull at
   ``pull_rate`` (16 chunks a second), so that most stay pending.  Then ``reads`` times, one
   read at a time: 4 KiB at a random block of a distinct pending chunk (the last ``reads`` of
   the region, in a random order: the pull goes from the first), 4 KiB of a random local
   block, and the **round trip**, measured the same way: a libnbd reader in b's network
   namespace (:class:`RoundTrips`) reads 4 KiB, then a whole chunk, from an unpaired volume
   of a's node over TCP.  b's ``fetched_on_demand`` after each pending read says whether it
   was a fetch (a pending read the pull got to first is counted apart).  Then every chunk of
   the region is read (untimed), so the slow pull ends at once.  (The swap back runs at the
   same limit, see docs/benchmarks.md.)
3. **Hydration throughput against nbdcopy.**  Each takeover of scenario 1 pulls without a
   limit: its rate is the bytes pending at the takeover over the seconds from the call's
   return to ``pair.pull.done``.  Beside it in the same round (the order alternating),
   ``nbdcopy`` copies as many bytes from an unpaired volume of a's node to one of b's over TCP
   (:func:`pairvol.bench.timed_nbdcopy`, the veth path the pull takes).

Targets: ready in under 1 s at every size (the median of each), hydration at 0.8x nbdcopy or
better (at the largest size: the least start-up in it), a fetched read's p50 no slower than two
round trips' p50.  The pure parts (the configuration's checks, the statistics, the targets,
the tables) are separate functions, tested without a lab.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pairvol import bench
from replicator import control, falloc
from replicator.bitmap import DEFAULT_CHUNK
from replicator.errors import (
    ExternalCommandFailed,
    IllegalState,
    PairvolError,
    ProtocolError,
    Timeout,
    UsageError,
)
from replicator.events import read_events, wait_event
from replicator.sizes import format_size, parse_size

SUITE = "takeover"
SCHEMA_VERSION = 1
CHUNK = DEFAULT_CHUNK  # the pairs' chunk (pair create's default)
READ = 4096  # a client read
WRITE = 1 << 20  # the writer's request size
READY_TARGET_S = 1.0
HYDRATION_GOAL = 0.8
FETCH_ROUND_TRIPS = 2.0
#: Reads of pending chunks right after each takeover of scenario 1, the pull at full speed.
BUSY_READS = 30
COMMAND_TIMEOUT = 120.0
SETTLE_TIMEOUT = 300.0
RTT_VOLUME = "rtt"
COPY_SOURCE = "cpsrc"  # + the size's index: unpaired volumes on a, nbdcopy's sources
SEED = 20250611


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TakeoverConfig:
    """What one run measures; checked when built (one UsageError for the first mistake)."""

    sizes: tuple[int, ...] = (64 << 20, 256 << 20, 1 << 30)
    rounds: int = 2
    reads: int = 200  # per kind: fetched, local, round trip
    tail: int = 64 << 20  # never written, after the largest backlog
    local_size: int = 16 << 20  # scenario 2: what b has before the takeover
    ship_rate: int = 1 << 20  # bytes/s: async shipping while a backlog is written
    pull_rate: int = 1 << 20  # bytes/s: scenario 2's pull (its chunks stay pending)
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if not self.sizes:
            raise UsageError("--sizes: give at least one backlog size")
        if any(s < 1 << 20 or s % CHUNK for s in self.sizes):
            raise UsageError(
                f"--sizes: each at least 1M and a multiple of {format_size(CHUNK)} (the chunk)"
            )
        if len(set(self.sizes)) != len(self.sizes):
            raise UsageError("--sizes: a size is listed twice")
        if isinstance(self.rounds, bool) or self.rounds < 1:
            raise UsageError("--rounds must be at least 1")
        if isinstance(self.reads, bool) or self.reads < 10:
            raise UsageError("--reads must be at least 10")
        if self.tail < CHUNK or self.tail % CHUNK:
            raise UsageError("the never-written tail must be a whole number of chunks")
        if self.local_size < 1 << 20 or self.local_size % CHUNK:
            raise UsageError("the local region must be at least 1M, whole chunks")
        if self.ship_rate < 4096 or self.pull_rate < 4096:
            raise UsageError("the shipping and pull limits must be at least 4K/s")

    @property
    def volume_size(self) -> int:
        """Scenario 1's volumes: the same at every backlog size."""
        return max(self.sizes) + self.tail

    @property
    def pending_size(self) -> int:
        """Scenario 2's region written after the throttle: ``reads`` chunks and a quarter."""
        chunks = self.reads + self.reads // 4 + 4
        return -(-chunks * CHUNK // WRITE) * WRITE


QUICK: dict[str, Any] = {
    "sizes": (8 << 20, 16 << 20, 32 << 20),
    "rounds": 1,
    "reads": 50,
    "tail": 8 << 20,
    "local_size": 4 << 20,
}


def parse_sizes(text: str) -> tuple[int, ...]:
    """``64M,256M,1G`` → bytes (checked by :class:`TakeoverConfig`)."""
    return tuple(parse_size(s.strip()) for s in text.split(",") if s.strip())


def journal_size(backlog: int) -> int:
    """An async group journal that holds ``backlog`` below the high watermark (80 %)."""
    return backlog + backlog // 2 + (16 << 20)


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadySample:
    """One takeover of scenario 1 (times in seconds; None: not reached)."""

    round: int
    size: int  # bytes written while shipping was throttled
    group: str
    backlog_bytes: int  # a's journal, unshipped, just before the takeover
    backlog_entries: int
    state_before: str  # the pair on a just before
    pending_chunks: int  # what the takeover took to pull
    takeover_s: float  # the pair.takeover control call on b's node
    connect_s: float  # to b's export, after the call returned
    read_s: float  # the first 4 KiB read of a pending chunk
    fetched: bool  # that read fetched its chunk on demand (the pull had not got there)
    #: Then up to BUSY_READS reads of other pending chunks, one at a time, while the pull
    #: runs at full speed: the seconds of each that fetched its chunk on demand.
    busy_fetched_s: tuple[float, ...] = ()
    pull_s: float | None = None  # the call's return to pair.pull.done
    reverse_s: float | None = None  # pair.pull.done to PAIR with b the primary
    reverse_copy_bytes: int | None = None  # what the swap back copied to a
    reverse_overwrote_chunks: int | None = None  # chunks of a it said it overwrites
    mismatches: int | None = None  # pair verify afterwards
    error: str | None = None

    @property
    def first_read_s(self) -> float:
        return self.connect_s + self.read_s

    @property
    def ready_s(self) -> float:
        return self.takeover_s + self.first_read_s

    @property
    def pulled_bytes(self) -> int:
        return self.pending_chunks * CHUNK

    @property
    def pull_mib_s(self) -> float | None:
        if not self.pull_s or self.pull_s <= 0 or not self.pending_chunks:
            return None
        return self.pulled_bytes / self.pull_s / (1 << 20)


def ready_json(s: ReadySample) -> dict[str, Any]:
    return {
        **asdict(s),
        "first_read_s": round(s.first_read_s, 6),
        "ready_s": round(s.ready_s, 6),
        "pulled_bytes": s.pulled_bytes,
        "pull_mib_s": None if s.pull_mib_s is None else round(s.pull_mib_s, 2),
    }


# -- statistics and targets (pure) -----------------------------------------------------------


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def summarize_ready(samples: Sequence[ReadySample], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Per backlog size (in ``sizes``' order): medians of the parts of the time to ready, and
    each round's ready time (the spread); failed rounds are left out and counted."""
    rows: list[dict[str, Any]] = []
    for size in sizes:
        ok = [s for s in samples if s.size == size and s.error is None]
        failed = sum(1 for s in samples if s.size == size and s.error is not None)
        if not ok:
            rows.append({"size": size, "n": 0, "failed": failed})
            continue
        ready = [s.ready_s for s in ok]
        rows.append(
            {
                "size": size,
                "n": len(ok),
                "failed": failed,
                "backlog_bytes": int(statistics.median(s.backlog_bytes for s in ok)),
                "pending_chunks": int(statistics.median(s.pending_chunks for s in ok)),
                "takeover_s": _r(statistics.median(s.takeover_s for s in ok)),
                "first_read_s": _r(statistics.median(s.first_read_s for s in ok)),
                "ready_s": _r(statistics.median(ready)),
                "ready_min_s": _r(min(ready)),
                "ready_max_s": _r(max(ready)),
                "ready_per_round": [_r(x) for x in ready],
                "fetched": sum(1 for s in ok if s.fetched),
                "busy_fetched": latency_stats([x for s in ok for x in s.busy_fetched_s]),
            }
        )
    return rows


def latency_stats(values: Sequence[float]) -> dict[str, Any]:
    """n, p50, p99 (nearest rank), mean and max of latencies in seconds, in milliseconds."""
    if not values:
        return {"n": 0}
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": round(bench.percentile(ms, 50), 3),
        "p99_ms": round(bench.percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "max_ms": round(max(ms), 3),
    }


def summarize_hydration(
    samples: Sequence[ReadySample], copies: Sequence[bench.CopySample], sizes: Sequence[int]
) -> list[dict[str, Any]]:
    """Per size: the median pull rate and nbdcopy rate (MiB/s), the ratio of the medians, and
    the ratio per round (the pull against the nbdcopy of its round)."""
    rows: list[dict[str, Any]] = []
    for size in sizes:
        pulls = [s for s in samples if s.size == size and s.pull_mib_s is not None]
        cps = [c for c in copies if c.bytes == size and c.seconds > 0]
        if not pulls or not cps:
            rows.append({"size": size, "n": 0})
            continue
        pull = statistics.median(s.pull_mib_s or 0.0 for s in pulls)
        copy = statistics.median(c.mib_s for c in cps)
        by_round = {c.round: c.mib_s for c in cps}
        rows.append(
            {
                "size": size,
                "n": len(pulls),
                "pulled_bytes": int(statistics.median(s.pulled_bytes for s in pulls)),
                "pull_s": _r(statistics.median(s.pull_s or 0.0 for s in pulls), 3),
                "pull_mib_s": round(pull, 2),
                "nbdcopy_s": _r(statistics.median(c.seconds for c in cps), 3),
                "nbdcopy_mib_s": round(copy, 2),
                "ratio": round(pull / copy, 3) if copy > 0 else 0.0,
                # The swap back to PAIR afterwards, and what it copied to the old primary.
                "reverse_s": _r(statistics.median(s.reverse_s or 0.0 for s in pulls), 3),
                "reverse_copy_bytes": int(
                    statistics.median(s.reverse_copy_bytes or 0 for s in pulls)
                ),
                "round_ratios": [
                    round((s.pull_mib_s or 0.0) / by_round[s.round], 3)
                    for s in pulls
                    if by_round.get(s.round)
                ],
            }
        )
    return rows


def targets(
    ready: Sequence[Mapping[str, Any]],
    latency: Mapping[str, Any] | None,
    hydration: Sequence[Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """The three targets of issue 11, each with its value and whether it is reached (None:
    nothing measured)."""
    measured = [r for r in ready if r.get("n")]
    worst = max((float(r["ready_s"]) for r in measured), default=None)
    out: dict[str, dict[str, Any]] = {
        "ready": {
            "goal": f"ready_s median < {READY_TARGET_S:g} s at every backlog size",
            "value": worst,
            "reached": None if worst is None or len(measured) < len(ready) else worst < 1,
        }
    }
    rows = [h for h in hydration if h.get("n")]
    largest = max(rows, key=lambda h: int(h["size"]), default=None)
    ratio = None if largest is None else float(largest["ratio"])
    out["hydration"] = {
        "goal": f"pull/nbdcopy >= {HYDRATION_GOAL:g} at the largest size",
        "size": None if largest is None else largest["size"],
        "value": ratio,
        "reached": None if ratio is None else ratio >= HYDRATION_GOAL,
    }
    fetched = (latency or {}).get("fetched", {}).get("p50_ms")
    rtt = (latency or {}).get("round_trip", {}).get("p50_ms")
    times = round(fetched / rtt, 3) if fetched is not None and rtt else None
    out["fetched_read"] = {
        "goal": f"fetched p50 <= {FETCH_ROUND_TRIPS:g} round trips (p50, the same read length)",
        "value": times,
        "fetched_p50_ms": fetched,
        "round_trip_p50_ms": rtt,
        "reached": None if times is None else times <= FETCH_ROUND_TRIPS,
    }
    return out


# -- tables (pure) ---------------------------------------------------------------------------


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f}M"


def _mark(reached: bool | None) -> str:
    return {True: "reached", False: "NOT reached", None: "not measured"}[reached]


def format_ready_table(doc: Mapping[str, Any]) -> str:
    lines = [["time to ready (s)", "backlog", "pending", "takeover call", "first read",
              "ready", "ready per round", "fetched", "target < 1"]]  # fmt: skip
    for r in doc["ready"]["summary"]:
        label = f"{format_size(r['size'])} written"
        if not r.get("n"):
            lines.append([label, "-", "-", "-", "-", "-", "-", "-", f"{r['failed']} failed"])
            continue
        ok = "ok" if r["ready_s"] < READY_TARGET_S else "over"
        lines.append(
            [label, _mib(r["backlog_bytes"]), str(r["pending_chunks"]),
             _f(r["takeover_s"]), _f(r["first_read_s"]), _f(r["ready_s"]),
             ",".join(_f(x) for x in r["ready_per_round"]), f"{r['fetched']}/{r['n']}",
             ok + (f", {r['failed']} failed" if r["failed"] else "")]
        )  # fmt: skip
    busy = [["fetched reads during the full-speed pull (ms)", "n", "p50", "p99", "max"]]
    for r in doc["ready"]["summary"]:
        x = r.get("busy_fetched") or {"n": 0}
        busy.append([f"{format_size(r['size'])} written", str(x["n"]), _f(x.get("p50_ms")),
                     _f(x.get("p99_ms")), _f(x.get("max_ms"))])  # fmt: skip
    return bench.aligned(lines) + "\n\n" + bench.aligned(busy)


def format_latency_table(doc: Mapping[str, Any]) -> str:
    lat = doc.get("latency")
    if not lat or not lat.get("summary"):
        return "read latency: not measured" + (f" ({lat['error']})" if lat else "")
    s = lat["summary"]
    lines = [["read latency (ms)", "n", "p50", "p99", "mean", "max"]]
    for key, label in (
        ("fetched", f"pending, fetched ({format_size(READ)})"),
        ("local", f"local ({format_size(READ)})"),
        ("round_trip", f"round trip b->a ({format_size(READ)})"),
        ("round_trip_chunk", f"round trip b->a ({format_size(CHUNK)})"),
        ("pending_not_fetched", "pending, pulled before the read"),
    ):
        x = s.get(key) or {"n": 0}
        if key == "pending_not_fetched" and not x["n"]:
            continue
        lines.append(
            [label, str(x["n"]), _f(x.get("p50_ms")), _f(x.get("p99_ms")),
             _f(x.get("mean_ms")), _f(x.get("max_ms"))]
        )  # fmt: skip
    notes = [
        f"interleaved, one at a time; the pull at {format_size(lat['pull_rate'])}/s meanwhile",
    ]
    if lat.get("node_fetch_ms_avg") is not None:
        notes.append(
            f"b's node timed its {lat['node_fetched_on_demand']} fetches on demand at "
            f"{lat['node_fetch_ms_avg']:.3f} ms on average (the peer request and the local write)"
        )
    return bench.aligned(lines) + "\n" + "\n".join(notes)


def format_hydration_table(doc: Mapping[str, Any]) -> str:
    lines = [["hydration", "bytes", "pull s", "pull MiB/s", "nbdcopy s", "nbdcopy MiB/s",
              f"pull/nbdcopy (>= {HYDRATION_GOAL:g})", "per round", "swap back s",
              "copied back"]]  # fmt: skip
    for r in doc["hydration"]["summary"]:
        label = f"{format_size(r['size'])} written"
        if not r.get("n"):
            lines.append([label, "-", "-", "-", "-", "-", "-", "-", "-", "-"])
            continue
        mark = "ok" if r["ratio"] >= HYDRATION_GOAL else "below"
        lines.append(
            [label, _mib(r["pulled_bytes"]), _f(r["pull_s"], ".2f"),
             _f(r["pull_mib_s"], ".1f"), _f(r["nbdcopy_s"], ".2f"), _f(r["nbdcopy_mib_s"], ".1f"),
             f"{r['ratio']:.2f} ({mark})", ",".join(f"{x:.2f}" for x in r["round_ratios"]),
             _f(r.get("reverse_s"), ".2f"),
             _mib(r.get("reverse_copy_bytes"))]
        )  # fmt: skip
    return bench.aligned(lines)


def format_targets(doc: Mapping[str, Any]) -> str:
    t = doc["targets"]
    ready, hyd, fr = t["ready"], t["hydration"], t["fetched_read"]
    sizes = [r for r in doc["ready"]["summary"] if r.get("n")]
    growth = ""
    if len(sizes) > 1 and sizes[0]["ready_s"]:
        small, large = min(sizes, key=lambda r: r["size"]), max(sizes, key=lambda r: r["size"])
        growth = (
            f" (at {format_size(large['size'])} {large['ready_s'] / small['ready_s']:.1f}x "
            f"the time at {format_size(small['size'])})"
        )
    lines = [
        f"target: ready under {READY_TARGET_S:g} s at every size: {_mark(ready['reached'])}, "
        f"worst median {_f(ready['value'])} s{growth}",
        f"target: hydration >= {HYDRATION_GOAL:g}x nbdcopy: {_mark(hyd['reached'])}, "
        + (
            f"{_f(hyd['value'], '.2f')}x at {format_size(hyd['size'])}"
            if hyd["size"]
            else "no ratio"
        ),
        f"target: fetched read p50 <= {FETCH_ROUND_TRIPS:g} round trips: "
        f"{_mark(fr['reached'])}, {_f(fr['value'], '.2f')} round trips "
        f"({_f(fr['fetched_p50_ms'])} ms against {_f(fr['round_trip_p50_ms'])} ms)",
    ]
    for v in doc["verify"]:
        for c in v.get("pair_errors", []):
            lines.append(f"note: {v['scenario']}: pair.error on {c['host']}: {c['reason']}")
        if v.get("mismatches"):
            lines.append(
                f"ERROR: {v['scenario']}: pair verify found {v['mismatches']} chunks differ"
            )
    for e in doc["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def table_of(doc: Mapping[str, Any]) -> str:
    return "\n\n".join(
        [
            format_ready_table(doc),
            format_latency_table(doc),
            format_hydration_table(doc),
            format_targets(doc),
        ]
    )


# -- the lab ---------------------------------------------------------------------------------


def block_data(seed: int, index: int) -> bytes:
    """The writer's ``index``-th request of ``WRITE`` bytes: known, so reads can be checked."""
    return random.Random(seed * 1_000_003 + index).randbytes(WRITE)


#: The round-trip reader, run by Python in b's network namespace: connected to URI, it reads
#: one "LENGTH OFFSET" line at a time from stdin, reads that through NBD and prints the read's
#: seconds; so its reads interleave with the others, under the same conditions.
RTT_READER = """
import sys, time
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(4096, 0)
print("ready", flush=True)
for line in sys.stdin:
    length, offset = map(int, line.split())
    t = time.perf_counter()
    h.pread(length, offset)
    print(repr(time.perf_counter() - t), flush=True)
h.shutdown()
"""


class RoundTrips:
    """The round-trip reader (:data:`RTT_READER`) in ``netns``, reading ``uri``."""

    def __init__(self, netns: str, uri: str) -> None:
        argv = ["ip", "netns", "exec", netns, sys.executable, "-c", RTT_READER, uri]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1,
        )  # fmt: skip
        self._expect("ready")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            err = self.proc.stderr.read() if self.proc.stderr is not None else ""
            tail = " | ".join(err.strip().splitlines()[-3:])
            raise ExternalCommandFailed(
                f"the round-trip reader exited with status {self.proc.returncode}: {tail}"
            )
        return line.strip()

    def _expect(self, what: str) -> None:
        line = self._line()
        if line != what:
            raise ExternalCommandFailed(f"the round-trip reader said {line!r}, not {what!r}")

    def read(self, length: int, offset: int) -> float:
        """One read; its seconds as the reader timed them."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{length} {offset}\n")
        self.proc.stdin.flush()
        return float(self._line())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@dataclass
class TakeoverRun:
    """The lab and what was measured so far (kept when a scenario fails)."""

    cfg: TakeoverConfig
    lab: bench.BenchLab
    progress: Callable[[str], None]
    ready: list[ReadySample] = field(default_factory=list)
    copies: list[bench.CopySample] = field(default_factory=list)
    latency: dict[str, Any] | None = None
    verify: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    groups: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(SEED))
    copy_dst: tuple[Path, int] = (Path(), 0)  # nbdcopy's destination on b: path, data offset

    # -- helpers -----------------------------------------------------------------------------

    def control(self, host: str, op: str, timeout: float = COMMAND_TIMEOUT, **args: Any) -> Any:
        return control.call(self.lab.host(host).control, op, args, timeout)

    def side(self, host: str, group: str) -> dict[str, Any]:
        """``host``'s side of ``group/p``, from its node's control socket."""
        rows = self.control(host, "pair.display", 10, target=f"{group}/p")["pairs"]
        if len(rows) != 1:
            raise ProtocolError(f"node {host} shows {len(rows)} sides of {group}/p")
        row: dict[str, Any] = rows[0]
        return row

    def fetched_on_demand(self, group: str) -> int:
        """b's count of chunks fetched for a client (0 once the pull is over)."""
        hydration = self.side("b", group).get("hydration") or {}
        return int(hydration.get("fetched_on_demand") or 0)

    def log_tail(self, host: str, lines: int = 3) -> str:
        """The end of ``host``'s node log, for an error message (the lab's directory goes)."""
        try:
            text = (self.lab.dir(host) / "node.log").read_text(errors="replace")
        except OSError as e:
            return f"{host}'s node log: {e.strerror}"
        return f"{host}'s node log: " + " | ".join(text.strip().splitlines()[-lines:])

    def events(self, host: str) -> str:
        return str(self.lab.dir(host) / "events.jsonl")

    def mark(self, host: str) -> int:
        return len(read_events(self.events(host)))

    def new_group(self, kind: str) -> str:
        self.groups += 1
        return f"{kind}{self.groups}"

    def create_pair(self, group: str, size: int, journal: int, *extra: str) -> None:
        for h in ("a", "b"):
            if not (self.lab.dir(h) / group).exists():
                self.lab.create_volume(h, group, size)
        self.lab.pairvol("pair", "create", f"{group}/p", "--primary", f"a:{group}",
                         "--secondary", f"b:{group}", "--mode", "async",
                         "--journal-size", str(journal), *extra)  # fmt: skip
        self.wait_state(group, "PAIR", bench.copy_timeout(size))

    def wait_state(self, group: str, state: str, timeout: float) -> None:
        wait = ["pair", "wait", f"{group}/p", "--state", state, "--timeout", f"{timeout:.0f}"]
        self.lab.pairvol(*wait, timeout=timeout + 30)

    def write(self, group: str, offset: int, size: int, seed: int) -> None:
        """``size`` bytes of :func:`block_data` at ``offset`` through a's export, flushed."""
        import nbd  # python3-libnbd, checked by check_prerequisites

        h = nbd.NBD()
        try:
            h.connect_uri(self.lab.socket_uri("a", group))
            for i in range(size // WRITE):
                h.pwrite(block_data(seed, i), offset + i * WRITE)
            h.flush()
            h.shutdown()
        except nbd.Error as e:
            raise ExternalCommandFailed(f"writing {group} on a: {e}; {self.log_tail('a')}") from e

    def backlog(self, group: str) -> tuple[int, int, str]:
        side = self.lab.side(f"{group}/p")
        j = side.get("journal") or {}
        return int(j.get("backlog_bytes", 0)), int(j.get("backlog_entries", 0)), side["state"]

    def takeover(self, group: str, max_rate: int) -> tuple[float, dict[str, Any]]:
        """``pair.takeover`` on b's node; its seconds and b's row of the answer, checked."""
        t0 = time.monotonic()
        reply = self.control("b", "pair.takeover", target=group, force=False, max_rate=max_rate)
        seconds = time.monotonic() - t0
        (row,) = reply["pairs"]
        took = row.get("takeover") or {}
        if row["state"] != "SSWS" or not took.get("zero_loss") or not took.get("pulled_chunks"):
            raise IllegalState(f"takeover of {group}: {row['state']}, {took}")
        return seconds, row

    def marks(self) -> dict[str, int]:
        return {h: self.mark(h) for h in ("a", "b")}

    def finish(
        self, group: str, marks: Mapping[str, int], returned: float, scenario: str
    ) -> dict[str, Any]:
        """After a takeover (the nodes' event logs had ``marks`` lines; the call returned at
        wall time ``returned``): the pull's end, the swap back to PAIR with b the primary,
        verify, and the pair deleted.  Seconds from the return to the pull's end, from there
        to PAIR, what the swap back copied, and the chunks verify found different."""
        pid = f"{group}/p"
        mark = marks["b"]
        size = int(self.side("b", group)["data_size"])
        done = wait_event(self.events("b"), "pair.pull.done", lambda e: e.get("pair") == pid,
                          after=mark, timeout=bench.copy_timeout(size))  # fmt: skip
        wait_event(self.events("b"), "pair.reverse", lambda e: e.get("target") == group,
                   after=mark, timeout=SETTLE_TIMEOUT)  # fmt: skip
        deadline = time.monotonic() + bench.copy_timeout(size)
        while True:
            side = self.side("b", group)
            if side["role"] == "primary" and side["state"] == "PAIR":
                break
            if time.monotonic() > deadline:
                raise Timeout(f"{pid}: not back in PAIR on b: {side['role']} {side['state']}")
            time.sleep(0.05)
        paired_at = time.time()
        # What the swap back sent to the old primary: the chunks it overwrote there (the
        # node says so before copying) and the copy's bytes.
        overwrite = [
            e for e in read_events(self.events("b"))[mark:]
            if e.get("event") == "pair.resync.overwrite" and e.get("pair") == pid
        ]  # fmt: skip
        shown = self.control("b", "pair.verify", bench.copy_timeout(2 * size), target=group)
        mismatches = sum(int(p["mismatch_count"]) for p in shown["pairs"])
        # The nodes' own complaints meanwhile (a pair.error is no failure of the run, but
        # worth a look: it says the pair left PAIR for a moment).
        complaints = [
            {"host": h, "reason": e.get("reason")}
            for h in ("a", "b") for e in read_events(self.events(h))[marks[h]:]
            if e.get("event") == "pair.error" and e.get("group") == group
        ]  # fmt: skip
        self.verify.append({"scenario": scenario, "group": group, "mismatches": mismatches,
                            "pair_errors": complaints})  # fmt: skip
        if mismatches:
            self.errors.append(f"{scenario}: pair verify: {mismatches} chunks differ")
        self.control("b", "pair.delete", target=group)
        for h in ("a", "b"):  # the space back (a node may hold it open until the lab goes)
            (self.lab.dir(h) / group).unlink(missing_ok=True)
        pulled_at = float(done["ts"])
        return {
            "pull_s": round(pulled_at - returned, 4),
            "reverse_s": round(paired_at - pulled_at, 4),
            "reverse_copy_bytes": int(side.get("last_copy_bytes") or 0),
            "reverse_overwrote_chunks": sum(int(e.get("chunks", 0)) for e in overwrite),
            "mismatches": mismatches,
        }

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        """The unpaired volumes: a's round-trip target and nbdcopy sources, b's destination
        (made sparse again before each copy, see :meth:`copy_round`)."""
        lab, cfg = self.lab, self.cfg
        self.progress(f"unpaired volumes: {RTT_VOLUME}, nbdcopy sources and destination")
        path, offset = lab.create_volume("a", RTT_VOLUME, cfg.local_size)
        bench.fill_region(path, offset, cfg.local_size)
        for i, size in enumerate(cfg.sizes):
            path, offset = lab.create_volume("a", f"{COPY_SOURCE}{i}", size)
            bench.fill_region(path, offset, size, seed=SEED + i)
        self.copy_dst = lab.create_volume("b", bench.NBDCOPY_DST, max(cfg.sizes))

    # -- scenario 1 and 3: time to ready, the pull's rate -----------------------------------

    def ready_round(self, rnd: int, size: int) -> ReadySample:
        import nbd

        cfg = self.cfg
        group = self.new_group("r")
        self.create_pair(group, cfg.volume_size, journal_size(size),
                         "--max-rate", str(cfg.ship_rate))  # fmt: skip
        seed = SEED + self.groups
        self.write(group, 0, size, seed)
        backlog, entries, state = self.backlog(group)
        marks = self.marks()
        takeover_s, row = self.takeover(group, max_rate=0)
        returned = time.time()
        # The pull goes from the first chunk: the last one written comes last.
        off = size - CHUNK + self.rng.randrange(CHUNK // READ) * READ
        want = block_data(seed, off // WRITE)[off % WRITE : off % WRITE + READ]
        error = None
        busy: list[float] = []
        t0 = t1 = t2 = time.monotonic()
        h = nbd.NBD()
        try:
            h.connect_uri(self.lab.socket_uri("b", group))
            t1 = time.monotonic()
            data = h.pread(READ, off)
            t2 = time.monotonic()
            if data != want:
                error = "the first read returned the wrong data"
            error = error or self.busy_reads(h, group, size, seed, busy)
            h.shutdown()
        except nbd.Error as e:  # the pull may still finish: go on to see the rest
            error = f"the first read through b's export: {e}; {self.log_tail('b')}"
        sample = ReadySample(
            round=rnd,
            size=size,
            group=group,
            backlog_bytes=backlog,
            backlog_entries=entries,
            state_before=state,
            pending_chunks=int(row["takeover"]["pulled_chunks"]),
            takeover_s=round(takeover_s, 6),
            connect_s=round(t1 - t0, 6),
            read_s=round(t2 - t1, 6),
            fetched=self.fetched_on_demand(group) >= 1,
            busy_fetched_s=tuple(round(x, 6) for x in busy),
            error=error,
        )
        after = self.finish(group, marks, returned, f"ready {format_size(size)} round {rnd + 1}")
        return ReadySample(**{**asdict(sample), **after})

    def busy_reads(
        self, h: Any, group: str, size: int, seed: int, fetched: list[float]
    ) -> str | None:
        """Right after the first read, with the pull at full speed: up to BUSY_READS reads
        of 4 KiB, one at a time, each in a distinct chunk of the region's upper half (the
        pull goes from the first), in a random order; the seconds of each that fetched its
        chunk on demand (b's count went up) go to ``fetched``.  Stops when the pull is over
        (the count reads 0).  What a client sees of a read of a chunk not here yet right
        after a failover; the latency scenario's pull is throttled.  An error, or None."""
        chunks = list(range(size // CHUNK // 2, size // CHUNK - 1))
        self.rng.shuffle(chunks)
        before = self.fetched_on_demand(group)
        for c in chunks[:BUSY_READS]:
            off = c * CHUNK + self.rng.randrange(CHUNK // READ) * READ
            want = block_data(seed, off // WRITE)[off % WRITE : off % WRITE + READ]
            t0 = time.monotonic()
            data = h.pread(READ, off)
            seconds = time.monotonic() - t0
            if data != want:
                return f"a read during the pull returned the wrong data at {off}"
            after = self.fetched_on_demand(group)
            if after == 0:
                break  # the pull is over (or b forgot its count): nothing pending any more
            if after > before:
                fetched.append(seconds)
            before = after
        return None

    def copy_round(self, rnd: int, index: int, size: int) -> bench.CopySample:
        """nbdcopy doing the pull's work: into a destination whose data region is a hole
        (the pull writes where the secondary never had data: the file system allocates as
        it goes), flushed at the end (the pull's data is durable when it is done)."""
        path, offset = self.copy_dst
        fd = os.open(path, os.O_RDWR)
        try:
            falloc.punch_hole(fd, offset, max(self.cfg.sizes))
            os.fsync(fd)
        finally:
            os.close(fd)
        return bench.timed_nbdcopy(self.lab, f"{COPY_SOURCE}{index}", size, rnd, flush=True)

    def ready_rounds(self) -> None:
        cfg = self.cfg
        for rnd in range(cfg.rounds):
            for size in bench.order_for_round(cfg.sizes, rnd):
                index = cfg.sizes.index(size)
                for what in bench.order_for_round(("takeover", "nbdcopy"), rnd):
                    try:
                        if what == "nbdcopy":
                            c = self.copy_round(rnd, index, size)
                            self.copies.append(c)
                            self.progress(
                                f"round {rnd + 1}/{cfg.rounds} nbdcopy {format_size(size)}: "
                                f"{c.seconds:.2f} s = {c.mib_s:.1f} MiB/s"
                            )
                            continue
                        s = self.ready_round(rnd, size)
                    except PairvolError as e:
                        why = f"round {rnd + 1} {what} {format_size(size)}: {type(e).__name__}: {e}"
                        self.errors.append(why)
                        self.progress(why)
                        continue
                    self.ready.append(s)
                    if s.error:
                        self.errors.append(f"{s.group}: {s.error}")
                    self.progress(
                        f"round {rnd + 1}/{cfg.rounds} takeover {format_size(size)}: backlog "
                        f"{format_size(s.backlog_bytes)}, call {s.takeover_s:.3f} s, first read "
                        f"{s.first_read_s:.3f} s ({'fetched' if s.fetched else 'local'}), "
                        f"pull {_f(s.pull_mib_s, '.1f')} MiB/s, verify {s.mismatches}"
                    )

    # -- scenario 2: fetched against local reads, and the round trip -------------------------

    def latency_scenario(self) -> dict[str, Any]:
        import nbd

        cfg = self.cfg
        group = self.new_group("l")
        local, pending = cfg.local_size, cfg.pending_size
        size = local + pending + cfg.tail
        path, offset = self.lab.create_volume("a", group, size)
        bench.fill_region(path, offset, local)
        self.lab.create_volume("b", group, size)
        self.progress(f"latency: pair {group}/p, {format_size(local)} copied to b first")
        self.create_pair(group, size, journal_size(pending))
        self.lab.pairvol("pair", "split", group)
        self.wait_state(group, "PSUS", SETTLE_TIMEOUT)
        self.lab.pairvol("pair", "resync", group, "--max-rate", str(cfg.ship_rate))
        self.wait_state(group, "PAIR", SETTLE_TIMEOUT)
        seed = SEED + self.groups
        self.write(group, local, pending, seed)
        backlog, entries, state = self.backlog(group)
        marks = self.marks()
        takeover_s, row = self.takeover(group, max_rate=cfg.pull_rate)
        returned = time.time()
        first = local // CHUNK
        # The pull goes from the first chunk: the sample is the last ``reads`` of them (in a
        # random order), the pull eats into the margin below them meanwhile.
        top = first + pending // CHUNK
        chunks = self.rng.sample(range(top - cfg.reads, top), cfg.reads)
        fetched: list[float] = []
        not_fetched: list[float] = []
        local_reads: list[float] = []
        wrong = 0
        rtt: list[float] = []
        rtt_chunk: list[float] = []
        a = self.lab.host("a")
        reader = RoundTrips(self.lab.host("b").netns, f"nbd://{a.address}/{RTT_VOLUME}")
        h = nbd.NBD()
        try:
            h.connect_uri(self.lab.socket_uri("b", group))
            seen = self.fetched_on_demand(group)
            for c in chunks:
                off = c * CHUNK + self.rng.randrange(CHUNK // READ) * READ
                t = time.perf_counter()
                data = h.pread(READ, off)
                took = time.perf_counter() - t
                at = off - local
                want = block_data(seed, at // WRITE)[at % WRITE : at % WRITE + READ]
                wrong += data != want
                now = self.fetched_on_demand(group)
                (fetched if now > seen else not_fetched).append(took)
                seen = now
                loff = self.rng.randrange(local // READ) * READ
                t = time.perf_counter()
                h.pread(READ, loff)
                local_reads.append(time.perf_counter() - t)
                rtt.append(reader.read(READ, self.rng.randrange(local // READ) * READ))
                rtt_chunk.append(reader.read(CHUNK, self.rng.randrange(local // CHUNK) * CHUNK))
            node = self.side("b", group).get("hydration") or {}
            for c in range(first, first + pending // CHUNK):  # the rest: the slow pull ends
                h.pread(CHUNK, c * CHUNK)
        except nbd.Error as e:
            raise ExternalCommandFailed(f"reading {group} on b: {e}; {self.log_tail('b')}") from e
        finally:
            reader.close()
            with contextlib.suppress(nbd.Error):
                h.shutdown()
        if wrong:
            self.errors.append(f"latency: {wrong} pending reads returned the wrong data")
        after = self.finish(group, marks, returned, "latency")
        summary = {
            "fetched": latency_stats(fetched),
            "local": latency_stats(local_reads),
            "round_trip": latency_stats(rtt),
            "round_trip_chunk": latency_stats(rtt_chunk),
            "pending_not_fetched": latency_stats(not_fetched),
        }
        self.progress(
            "latency p50/p99 ms: fetched "
            f"{summary['fetched'].get('p50_ms')}/{summary['fetched'].get('p99_ms')}, local "
            f"{summary['local'].get('p50_ms')}/{summary['local'].get('p99_ms')}, round trip "
            f"{summary['round_trip'].get('p50_ms')}/{summary['round_trip'].get('p99_ms')}"
        )
        return {
            "group": group,
            "volume_size": size,
            "local_size": local,
            "pending_size": pending,
            "backlog_bytes": backlog,
            "backlog_entries": entries,
            "state_before": state,
            "pending_chunks": int(row["takeover"]["pulled_chunks"]),
            "takeover_s": round(takeover_s, 6),
            "pull_rate": cfg.pull_rate,
            "wrong_data": wrong,
            # b's node's own mean time of a fetch on demand (replicator/pair/pull.py)
            "node_fetch_ms_avg": node.get("fetch_ms_avg"),
            "node_fetched_on_demand": node.get("fetched_on_demand"),
            **after,
            "summary": summary,
            "samples_s": {
                "fetched": [round(x, 6) for x in fetched],
                "local": [round(x, 6) for x in local_reads],
                "round_trip": [round(x, 6) for x in rtt],
                "round_trip_chunk": [round(x, 6) for x in rtt_chunk],
                "pending_not_fetched": [round(x, 6) for x in not_fetched],
            },
        }

    def run(self) -> None:
        try:
            self.setup()
        except PairvolError as e:
            self.errors.append(f"setup: {type(e).__name__}: {e}")
            return
        self.ready_rounds()
        try:
            self.latency = self.latency_scenario()
        except PairvolError as e:
            why = f"latency: {type(e).__name__}: {e}"
            self.errors.append(why)
            self.progress(why)
            self.latency = {"error": why}


# -- the whole run ---------------------------------------------------------------------------


def check_prerequisites() -> None:
    bench.check_lab_prerequisites("takeover suite", ("ip", "nbdkit", "nbdcopy"), nbd=True)


def report(
    cfg: TakeoverConfig,
    runner: TakeoverRun,
    lab: dict[str, Any],
    machine: dict[str, Any],
    started: dt.datetime,
    duration: float,
) -> dict[str, Any]:
    """The JSON document (schema version ``SCHEMA_VERSION``)."""
    ready = summarize_ready(runner.ready, cfg.sizes)
    hydration = summarize_hydration(runner.ready, runner.copies, cfg.sizes)
    latency = runner.latency
    return {
        "schema": SCHEMA_VERSION,
        "suite": SUITE,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(duration, 1),
        "machine": machine,
        "lab": lab,
        "config": {
            "sizes": list(cfg.sizes),
            "rounds": cfg.rounds,
            "reads": cfg.reads,
            "tail": cfg.tail,
            "volume_size": cfg.volume_size,
            "local_size": cfg.local_size,
            "pending_size": cfg.pending_size,
            "ship_rate": cfg.ship_rate,
            "pull_rate": cfg.pull_rate,
            "chunk_size": CHUNK,
            "read_size": READ,
            "write_size": WRITE,
            "order": "sizes reversed every other round, takeover and nbdcopy likewise",
            "how": "ready_s = the pair.takeover control call on b's node + connecting to b's "
            "export + the first 4 KiB read of the last chunk written (pending); pull rate = "
            "pending chunks x chunk size / (pair.pull.done's time - the call's return); "
            "nbdcopy from a's node (Unix socket) to b's (TCP), run on a; round trip = a 4 KiB "
            "NBD read from b's namespace of an unpaired volume of a's node over TCP",
        },
        "ready": {
            "samples": [ready_json(s) for s in runner.ready],
            "summary": ready,
        },
        "hydration": {
            "nbdcopy_samples": [{**asdict(c), "mib_s": round(c.mib_s, 2)} for c in runner.copies],
            "summary": hydration,
        },
        "latency": latency,
        "verify": runner.verify,
        "targets": targets(ready, (latency or {}).get("summary"), hydration),
        "errors": runner.errors,
    }


def run(cfg: TakeoverConfig, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Measure the three scenarios in one lab; the JSON report (see :func:`report`)."""
    check_prerequisites()
    started = dt.datetime.now().astimezone()
    t0 = time.monotonic()
    machine = bench.machine_info()
    with (
        bench.work_directory(cfg.workdir, "pairvol-takeover-") as workdir,
        bench.BenchLab(workdir / "labs", f"pvt{os.getpid() % 100000}", progress) as lab,
    ):
        runner = TakeoverRun(cfg, lab, progress)
        runner.run()
        described = lab.describe()
    machine["loadavg_end"] = list(os.getloadavg())
    return report(cfg, runner, described, machine, started, time.monotonic() - t0)
