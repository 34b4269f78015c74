"""Benchmark harness: fio's ``nbd`` engine against NBD servers ("targets"), side by side.

Theory of operation.  A *target* is something that serves one export of ``size`` bytes of
pre-filled data over NBD: today the pairvol plugin and, as the baseline, nbdkit's stock C
``file`` plugin.  A *workload* is one fio job (4k random read/write, 1M sequential read/write).
Each round runs every workload against every target, a freshly started server per measurement,
and reverses the target order on every other round (A B, B A, ...) so that neither side always
runs first; noise from other processes then spreads evenly over both.  The summary is the
median over rounds per (workload, target), and the ratio of each target's median to the
baseline's.

The pure parts (parsing fio's JSON, medians and ratios, percentiles, the tables) are separate
functions so that they can be tested without running anything.

Suites.  ``base`` (the default) is the above: pairvol against nbdkit's file plugin.  ``sync``
and ``async`` (``replicated`` is both, ``all`` is everything) build a two-host lab
(:mod:`pairvol.lab`, hosts ``a`` and ``b``) and compare, on the write workloads, a volume of a
sync or async pair (primary on a, secondary on b) with an unpaired volume served by the same
node process on a (``unrepl``, the baseline): the only difference is replication.  Before each
measurement every pair is in PAIR with an empty journal; afterwards an async pair is drained
(and resynced if its journal overflowed, which the sample's ``notes`` record), so no
measurement pays for another's replication.  ``sync`` also times a full differential resync
against ``nbdcopy`` copying the same bytes from a to b over the same veth path, alternating;
``async`` also samples the journal lag while fio writes at half the async maximum.  The lab is
always torn down, on errors and Ctrl-C too.

The async pair's figure in the replicated summary is its end-to-end sustained rate (a burst
written and applied on the secondary, :func:`measure_sustained`); fio's rate into the journal,
which lasts only until the journal fills, stays beside it (``into_journal``).  The replicated
part also reports each node's CPU per request and per MiB (:func:`cpu_costs`), issue 10's
targets (:func:`objectives_of`) and, for every target missed, its floor: the measured CPU,
the rates that CPU allows here and on two hosts, and the per-step floor of a mirrored write
(:mod:`pairvol.bench_floor`).

Run it as ``tools/bench`` or ``pairvol bench``; ``--help`` lists the options.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from pairvol import bench_floor, bench_scrape
from pairvol import lab as labmod
from replicator import control, node_process, server
from replicator.errors import (
    ExternalCommandFailed,
    IllegalState,
    NotFound,
    Timeout,
    UsageError,
)
from replicator.sizes import format_size
from replicator.volume import Volume

ROOT = Path(__file__).resolve().parent.parent
# 2: "suite" and "replicated"; "baseline" is null without the base suite.
# 3: replicated.summary's async figure is the end-to-end sustained rate (fio's rate into the
#    journal moved to the row's "into_journal"); replicated "cpu", "objectives" and "floor".
SCHEMA_VERSION = 3
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
FILL_CHUNK = 1 << 20
FILL_SEED = 20240601
_T = TypeVar("_T")


# -- workloads -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """One fio job.  ``metric`` is what the ratio compares; ``goal`` is the target ratio."""

    name: str
    rw: str
    bs: int
    iodepth: int
    metric: str  # "iops" or "mib_s"
    goal: float

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"

    def fio_args(self) -> list[str]:
        return [f"--rw={self.rw}", f"--bs={self.bs}", f"--iodepth={self.iodepth}"]


WORKLOADS: tuple[Workload, ...] = (
    Workload("randread-4k", "randread", 4096, 16, "iops", 0.5),
    Workload("randwrite-4k", "randwrite", 4096, 16, "iops", 0.5),
    Workload("read-1m", "read", 1 << 20, 4, "mib_s", 0.9),
    Workload("write-1m", "write", 1 << 20, 4, "mib_s", 0.9),
)


def workloads_named(names: Sequence[str]) -> tuple[Workload, ...]:
    known = {w.name: w for w in WORKLOADS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return tuple(known[n] for n in names)


# -- one measurement: fio's JSON -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measurement:
    iops: float
    mib_s: float
    lat_mean_us: float
    lat_p99_us: float
    io_bytes: int
    client_cores: float | None = None  # fio's own CPU (usr + sys) per second of its run

    def metric(self, name: str) -> float:
        value: float = getattr(self, name)
        return value


def _json_part(text: str) -> str:
    """fio's nbd engine prints "fio: connected to NBD server" ahead of the JSON document."""
    start = text.find("\n{") + 1 if not text.startswith("{") else 0
    if not text.startswith("{") and start == 0:
        raise ExternalCommandFailed("fio wrote no JSON result")
    return text[start:]


def parse_fio_json(text: str, direction: str) -> Measurement:
    """Sum ``direction`` ("read" or "write") over all jobs of one fio JSON report."""
    try:
        doc = json.loads(_json_part(text))
        jobs = doc["jobs"]
        stats = [job[direction] for job in jobs]
        errors = [int(job.get("error", 0)) for job in jobs]
    except (ValueError, KeyError, TypeError) as e:
        raise ExternalCommandFailed(f"cannot parse fio's JSON output: {e}") from e
    if not jobs or any(errors):
        raise ExternalCommandFailed(f"fio reported job errors {errors}")
    io_bytes = sum(int(s["io_bytes"]) for s in stats)
    if io_bytes <= 0:
        raise ExternalCommandFailed(f"fio did no {direction} I/O")
    iops = sum(float(s["iops"]) for s in stats)
    lat_means = [float(s["lat_ns"]["mean"]) for s in stats]
    p99s = [float(s["clat_ns"].get("percentile", {}).get("99.000000", 0.0)) for s in stats]
    return Measurement(
        iops=iops,
        mib_s=sum(float(s["bw_bytes"]) for s in stats) / (1 << 20),
        lat_mean_us=statistics.fmean(lat_means) / 1000,
        lat_p99_us=max(p99s) / 1000,
        io_bytes=io_bytes,
        client_cores=_client_cores(jobs),
    )


def _client_cores(jobs: Sequence[Any]) -> float | None:
    """fio's own CPU: the jobs' ``usr_cpu`` plus ``sys_cpu`` (percent of one CPU), in cores."""
    try:
        return round(sum(float(j["usr_cpu"]) + float(j["sys_cpu"]) for j in jobs) / 100, 4)
    except (KeyError, TypeError, ValueError):
        return None


# -- servers and targets ---------------------------------------------------------------------


@dataclass
class ServerProcess:
    """One server on a Unix socket: started fresh, ready when it accepts, stopped by SIGTERM."""

    argv: list[str]
    sock: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        self.sock.unlink(missing_ok=True)  # nbdkit leaves its socket behind when it exits
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._accepts():
            if self.proc.poll() is not None:
                # The log may live in a temporary work directory that is about to go: quote it.
                raise ExternalCommandFailed(
                    f"{self.argv[0]} exited with status {self.proc.returncode} at start-up: "
                    + (self.log_tail() or f"(nothing in {self.log})")
                )
            if time.monotonic() > deadline:
                self.stop()
                raise Timeout(f"{self.argv[0]} did not listen on {self.sock} in time")
            time.sleep(0.01)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def _accepts(self) -> bool:
        # The socket file appears at bind(), a moment before listen(): connect to be sure.
        if not self.sock.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.sock))
            except OSError:
                return False
        return True

    def cpu_seconds(self) -> float | None:
        return None if self.proc is None else process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise ExternalCommandFailed(
                    f"{self.argv[0]} (pid {proc.pid}) ignored SIGTERM for {STOP_TIMEOUT:.0f}s"
                ) from None
        self.sock.unlink(missing_ok=True)


def fill_region(path: Path, offset: int, size: int, seed: int = FILL_SEED) -> None:
    """Write ``size`` bytes of seeded pseudo-random data at ``offset`` and fsync.

    Every target fills its data this way with the same seed, so all hold identical bytes and
    reads read data, not holes."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        pos = 0
        while pos < size:
            n = min(FILL_CHUNK, size - pos)
            chunk = rng.randbytes(n)
            if os.pwrite(fd, chunk, offset + pos) != n:
                raise ExternalCommandFailed(f"{path}: short write while filling")
            pos += n
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Endpoint:
    """A running server: its NBD URI, and how busy it has been (None when unknown).

    ``notes`` is filled by the target when the measurement ends (e.g. the pair's state)."""

    uri: str
    cpu_seconds: Callable[[], float | None] = lambda: None
    notes: dict[str, Any] = field(default_factory=dict)


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a live process, from /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Target(ABC):
    """Something that serves ``size`` bytes of pre-filled data as an NBD export.

    ``goals`` overrides a workload's goal ratio for this target (workload name -> ratio)."""

    name: str
    goals: dict[str, float] = {}  # noqa: RUF012 (never mutated; subclasses assign their own)

    @abstractmethod
    def prepare(self, workdir: Path, size: int) -> None:
        """Create and fill the data once, before the first round."""

    @abstractmethod
    def serve(self) -> contextlib.AbstractContextManager[Endpoint]:
        """Start a fresh server; yield its endpoint; stop it (and check it is gone)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class NbdkitTarget(Target):
    """One nbdkit process on a Unix socket in the work directory."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.workdir: Path | None = None

    @abstractmethod
    def command(self, sock: Path) -> list[str]: ...

    def _dir(self) -> Path:
        if self.workdir is None:
            raise UsageError(f"target {self.name} was not prepared")
        return self.workdir

    def prepare(self, workdir: Path, size: int) -> None:
        self.workdir = workdir

    @contextlib.contextmanager
    def serve(self) -> Iterator[Endpoint]:
        d = self._dir()
        sock = d / f"{self.name}.sock"
        srv = ServerProcess(self.command(sock), sock, d / f"{self.name}.log")
        srv.start()
        try:
            yield Endpoint(f"nbd+unix:///?socket={sock}", srv.cpu_seconds)
        finally:
            srv.stop()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "command": self.command(Path("SOCK"))}


class PairvolTarget(NbdkitTarget):
    """A pairvol volume served the way pairvol serves it (:func:`replicator.server.plugin_command`).

    ``plugin`` and ``options`` exist for design experiments only; the default is exactly
    pairvol's own launch command."""

    def __init__(
        self,
        name: str = "pairvol",
        *,
        plugin: str | None = None,
        options: Sequence[str] | None = None,
    ) -> None:
        super().__init__(name)
        self.plugin = plugin
        self.options = None if options is None else tuple(options)
        self.image: Path | None = None

    def prepare(self, workdir: Path, size: int) -> None:
        super().prepare(workdir, size)
        self.image = workdir / f"{self.name}.img"
        self.image.unlink(missing_ok=True)
        with Volume.create(str(self.image), size, name="bench") as vol:
            data_offset = vol.header.data_offset
        fill_region(self.image, data_offset, size)

    def command(self, sock: Path) -> list[str]:
        extra = ("--unix", str(sock), "--foreground", "--exit-with-parent")
        volume = f"volume={self.image or 'IMAGE'}"
        if self.plugin is None and self.options is None:
            return server.plugin_command(volume, extra=extra)
        options = server.NBDKIT_OPTIONS if self.options is None else self.options
        plugin = self.plugin or server.PLUGIN
        return ["nbdkit", *options, *extra, "python", plugin, volume]


class FileTarget(NbdkitTarget):
    """The baseline: nbdkit's stock C ``file`` plugin, default options, on a raw file."""

    def __init__(self, name: str = "file", *, options: Sequence[str] = ()) -> None:
        super().__init__(name)
        self.options = tuple(options)
        self.image: Path | None = None

    def prepare(self, workdir: Path, size: int) -> None:
        super().prepare(workdir, size)
        self.image = workdir / f"{self.name}.raw"
        self.image.unlink(missing_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(size)
        fill_region(self.image, 0, size)

    def command(self, sock: Path) -> list[str]:
        extra = ("--unix", str(sock), "--foreground", "--exit-with-parent")
        return ["nbdkit", *self.options, *extra, "file", str(self.image or "FILE")]


def default_targets() -> list[Target]:
    """The baseline comparison; the last target is the one the others are divided by."""
    return [PairvolTarget(), FileTarget()]


# -- a run -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchConfig:
    size: int = 1 << 30
    rounds: int = 3
    runtime: float = 10.0
    ramp_time: float = 1.0
    workloads: tuple[Workload, ...] = WORKLOADS
    workdir: Path | None = None
    fio: str = "fio"
    numjobs: int = 1  # fio's nbd engine opens one NBD connection per job
    suite: str = "base"
    journal_size: int = 512 << 20  # the async group's journal
    lag_runtime: float = 20.0  # seconds of rate-limited writing per lag measurement
    lag_interval: float = 0.25  # seconds between journal lag samples
    tls: bool = False  # the replicated suites' lab with TLS on its peer links (lab up --tls)
    scrape: float | None = None  # replicated suites: poll each host's metrics every N seconds

    def fio_args(self) -> list[str]:
        args = ["--ioengine=nbd", f"--numjobs={self.numjobs}", "--time_based"]
        args.append(f"--runtime={self.runtime:g}")
        if self.ramp_time > 0:
            args.append(f"--ramp_time={self.ramp_time:g}")
        return args


QUICK = {"size": 64 << 20, "rounds": 1, "runtime": 1.0, "ramp_time": 0.0, "lag_runtime": 3.0}


@dataclass(frozen=True, slots=True)
class Sample:
    round: int
    workload: str
    target: str
    result: Measurement
    server_cores: float | None = None  # server CPU seconds per second of the fio run
    notes: dict[str, Any] | None = None  # the target's own observations (pair state, ...)


def fio_argv(cfg: BenchConfig, workload: Workload, uri: str, out: Path) -> list[str]:
    return [
        cfg.fio,
        f"--name={workload.name}",
        *cfg.fio_args(),
        *workload.fio_args(),
        f"--uri={uri}",
        "--output-format=json",
        f"--output={out}",
    ]


def run_fio(cfg: BenchConfig, workload: Workload, uri: str, out: Path) -> Measurement:
    argv = fio_argv(cfg, workload, uri, out)
    limit = cfg.runtime + cfg.ramp_time + 120
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired as e:
        raise Timeout(f"fio ran for more than {limit:.0f}s: {' '.join(argv)}") from e
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ExternalCommandFailed(f"fio exited with {done.returncode}: {' | '.join(tail)}")
    return parse_fio_json(out.read_text(), workload.direction)


def order_for_round(targets: Sequence[_T], rnd: int) -> list[_T]:
    """A B on even rounds, B A on odd ones."""
    return list(targets) if rnd % 2 == 0 else list(reversed(targets))


@contextlib.contextmanager
def work_directory(workdir: Path | None, prefix: str = "pairvol-bench-") -> Iterator[Path]:
    """``workdir`` (made if missing), or a temporary directory removed afterwards (every
    suite's ``--dir``)."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield Path(d)


def check_lab_prerequisites(
    suite: str, programs: Sequence[str], *, nbd: bool = False, lab: str = "a lab"
) -> None:
    """A suite that builds ``lab``: root, ``programs`` on PATH and, with ``nbd``, the
    python3-libnbd module; one error naming the first thing missing."""
    if os.geteuid() != 0:
        raise IllegalState(f"the {suite} builds {lab} (network namespaces): run it as root")
    for prog in programs:
        if shutil.which(prog) is None:
            raise ExternalCommandFailed(f"{prog} not found (run tools/setup)")
    if nbd and importlib.util.find_spec("nbd") is None:
        raise ExternalCommandFailed("the python3-libnbd module nbd is not importable (tools/setup)")


def measure(
    cfg: BenchConfig,
    targets: Sequence[Target],
    progress: Callable[[str], None] = lambda _msg: None,
    workdir: Path | None = None,
    workloads: Sequence[Workload] | None = None,
) -> list[Sample]:
    """Prepare every target, then run all rounds of ``workloads`` (default ``cfg.workloads``).
    Without ``workdir``, the work directory is ``cfg``'s (see :func:`work_directory`)."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(work_directory(cfg.workdir))
        for t in targets:
            progress(f"preparing {t.name} ({cfg.size >> 20} MiB)")
            t.prepare(workdir, cfg.size)
        samples = []
        for rnd in range(cfg.rounds):
            for w in cfg.workloads if workloads is None else workloads:
                for t in order_for_round(targets, rnd):
                    with t.serve() as ep:
                        cpu0, t0 = ep.cpu_seconds(), time.monotonic()
                        m = run_fio(cfg, w, ep.uri, workdir / f"fio-{t.name}.json")
                        cpu1, t1 = ep.cpu_seconds(), time.monotonic()
                    cores = None
                    if cpu0 is not None and cpu1 is not None:
                        cores = round((cpu1 - cpu0) / (t1 - t0), 3)
                    samples.append(Sample(rnd, w.name, t.name, m, cores, ep.notes or None))
                    progress(
                        f"round {rnd + 1}/{cfg.rounds} {w.name:<13} {t.name:<10} "
                        f"{m.iops:>10.0f} IOPS {m.mib_s:>8.1f} MiB/s"
                        + (f"  server {cores:.2f} cores" if cores is not None else "")
                        + "".join(f" {k}={v}" for k, v in ep.notes.items() if k in _SHOWN)
                    )
        return samples


# -- summary ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """Medians of one workload for every target, and each target's ratio to the baseline."""

    workload: str
    metric: str
    goal: float
    iops: dict[str, float]
    mib_s: dict[str, float]
    ratio: dict[str, float]  # target -> median(target) / median(baseline), on ``metric``
    round_ratios: dict[str, list[float]]  # the same ratio per round, to show the spread
    goals: dict[str, float] = field(default_factory=dict)  # per-target goals, where not ``goal``
    # Targets whose figure above is not fio's (the async pair's: end to end, see
    # end_to_end_rows) -> fio's own medians: "iops", "mib_s", "ratio", "round_ratios".
    into_journal: dict[str, dict[str, Any]] = field(default_factory=dict)


def summarize(
    samples: Sequence[Sample],
    workloads: Sequence[Workload],
    targets: Sequence[str],
    goals: Mapping[str, Mapping[str, float]] | None = None,
) -> list[Row]:
    """Medians per (workload, target); ratios of each target to the last one (the baseline).
    ``goals`` (target -> workload -> ratio) overrides the workloads' own goals."""
    baseline = targets[-1]
    rows = []
    for w in workloads:
        by_target = {
            t: [s for s in samples if s.workload == w.name and s.target == t] for t in targets
        }
        if any(not v for v in by_target.values()):
            continue
        iops = {t: statistics.median(s.result.iops for s in v) for t, v in by_target.items()}
        mib_s = {t: statistics.median(s.result.mib_s for s in v) for t, v in by_target.items()}
        med = iops if w.metric == "iops" else mib_s
        base_by_round = {s.round: s.result.metric(w.metric) for s in by_target[baseline]}
        ratio: dict[str, float] = {}
        round_ratios: dict[str, list[float]] = {}
        for t in targets[:-1]:
            ratio[t] = med[t] / med[baseline] if med[baseline] > 0 else 0.0
            round_ratios[t] = [
                round(s.result.metric(w.metric) / base_by_round[s.round], 4)
                for s in by_target[t]
                if base_by_round.get(s.round)
            ]
        own = {t: g[w.name] for t, g in (goals or {}).items() if w.name in g and t in ratio}
        rows.append(Row(w.name, w.metric, w.goal, iops, mib_s, ratio, round_ratios, own))
    return rows


def format_table(rows: Sequence[Row], targets: Sequence[str]) -> str:
    """Workload, then IOPS and MiB/s per target, then each ratio to the baseline and its goal.
    A target whose figure is end to end (``into_journal``) is labelled so, and fio's rate into
    its journal follows in a column of its own."""
    baseline = targets[-1]
    e2e = [t for t in targets if any(t in r.into_journal for r in rows)]
    label = {t: f"{t} e2e" if t in e2e else t for t in targets}
    header = ["workload"]
    for t in targets:
        header += [f"{label[t]} IOPS", f"{label[t]} MiB/s"]
    header += [f"{label[t]}/{baseline}" for t in targets[:-1]]
    header.append("goal")
    header += [f"{t} into journal" for t in e2e]
    lines = [header]
    for r in rows:
        cells = [r.workload]
        for t in targets:
            cells += [f"{r.iops[t]:.0f}", f"{r.mib_s[t]:.1f}"]
        for t in targets[:-1]:
            mark = "ok" if r.ratio[t] >= r.goals.get(t, r.goal) else "below"
            cells.append(f"{r.ratio[t]:.2f} ({mark})")
        if r.goals:
            cells.append(">= " + " / ".join(f"{r.goals.get(t, r.goal):g}" for t in targets[:-1]))
        else:
            cells.append(f">= {r.goal:.1f}")
        for t in e2e:
            fio = r.into_journal.get(t)
            cells.append(
                "-"
                if fio is None
                else f"{format_rate(fio[r.metric], r.metric)} ({fio['ratio']:.2f})"
            )
        lines.append(cells)
    table = aligned(lines)
    for t in e2e:
        table += (
            f"\n{t} e2e: end to end, written on a and applied on b (one burst from empty, "
            f"from fio's first write until drained); {t} into journal: fio's rate (ratio), "
            "which the journal takes only until it fills"
        )
    return table


def format_rate(value: float, metric: str) -> str:
    return f"{value:.0f} IOPS" if metric == "iops" else f"{value:.1f} MiB/s"


def aligned(lines: Sequence[Sequence[str]]) -> str:
    """A header line, a rule, then rows: first column left-aligned, the others right."""
    header = lines[0]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# -- replicated suites: a two-host lab -------------------------------------------------------

SUITES: dict[str, tuple[str, ...]] = {
    "base": ("base",),
    "sync": ("sync",),
    "async": ("async",),
    "replicated": ("sync", "async"),
    "all": ("base", "sync", "async"),
}
REPLICATED_WORKLOADS = ("randwrite-4k", "write-1m")
# Issue 10's targets, as ratios to the unreplicated volume; async's is its end-to-end rate.
MODE_GOALS: dict[str, dict[str, float]] = {
    "sync": {"randwrite-4k": 0.4, "write-1m": 0.6},
    "async": {"randwrite-4k": 0.4, "write-1m": 0.4},
}
RESYNC_GOAL = 0.9  # full resync / nbdcopy
LAG_GOAL_S = 0.05  # async lag p99 at half the end-to-end rate, below this
SETTLE_TIMEOUT = 300.0
STALL_TIMEOUT = 20.0  # a journal that ships nothing for this long is stuck
COPY_FLOOR_RATE = 5 << 20  # bytes/s: a copy slower than this is a failure, not a result
UNREPLICATED = "unrepl"
NBDCOPY_DST = "copydst"
_SHOWN = ("cores_a", "cores_b", "state_end", "resynced", "recreated")


def suite_parts(suite: str) -> tuple[str, ...]:
    """What a suite runs: ``base`` and/or the pair modes ``sync``, ``async``."""
    try:
        return SUITES[suite]
    except KeyError:
        raise UsageError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}") from None


def replicated_workloads(workloads: Sequence[Workload]) -> tuple[Workload, ...]:
    """The write workloads, the only ones replication changes."""
    return tuple(w for w in workloads if w.name in REPLICATED_WORKLOADS)


def copy_timeout(size: int) -> float:
    return 60.0 + size / COPY_FLOOR_RATE


def _run_bounded(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``argv``; its stdout, or one error line (with the end of its stderr)."""
    try:
        done = subprocess.run(
            list(argv), env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise Timeout(f"{' '.join(argv)}: no result after {timeout:.0f}s") from e
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise ExternalCommandFailed(f"{' '.join(argv)}: exit status {done.returncode}: {tail}")
    return done.stdout


class BenchLab:
    """Lab ``name`` with hosts a and b under ``root``: built on enter, always torn down on exit
    (the lab's own registry lives in ``root``, so ``down`` can only remove this lab)."""

    def __init__(
        self,
        root: Path,
        name: str | None = None,
        progress: Callable[[str], None] = print,
        *,
        tls: bool = False,
    ) -> None:
        self.root = root
        self.tls = tls
        self.name = name or f"pvb{os.getpid() % 100000}"
        self.progress = progress
        self._saved_root: str | None = None
        self._info: labmod.Lab | None = None

    def __enter__(self) -> BenchLab:
        self.root.mkdir(parents=True, exist_ok=True)
        self._saved_root = os.environ.get(labmod.LAB_ROOT_ENV)
        os.environ[labmod.LAB_ROOT_ENV] = str(self.root)  # pairvol.lab reads it on every call
        try:
            self.progress(f"lab {self.name}: up, hosts a and b{', TLS' if self.tls else ''}")
            labmod.up(self.name, ["a", "b"], tls=self.tls)
            self._info = labmod.load(self.name)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if labmod.down(self.name):
                self.progress(f"lab {self.name}: down")
        finally:
            if self._saved_root is None:
                os.environ.pop(labmod.LAB_ROOT_ENV, None)
            else:
                os.environ[labmod.LAB_ROOT_ENV] = self._saved_root

    def host(self, host: str) -> labmod.LabHost:
        if self._info is None:
            raise IllegalState(f"lab {self.name} is not up")
        return self._info.host(host)

    def dir(self, host: str) -> Path:
        return Path(self.host(host).dir)

    def socket_uri(self, host: str, volume: str) -> str:
        return f"nbd+unix:///{volume}?socket={self.dir(host) / 'nbd.sock'}"

    def pairvol(self, *args: str, timeout: float = 120.0) -> str:
        """``pairvol ARGS`` as the lab's host a runs it (its node, the lab's names)."""
        env = dict(os.environ, PAIRVOL_LAB=self.name, PAIRVOL_NODE_DIR=self.host("a").dir)
        env[labmod.LAB_ROOT_ENV] = str(self.root)
        return _run_bounded([sys.executable, "-m", "pairvol", *args], timeout, env)

    def create_volume(self, host: str, name: str, size: int) -> tuple[Path, int]:
        """A new volume in ``host``'s node directory; its path and data offset."""
        path = self.dir(host) / name
        with Volume.create(str(path), size, name=name) as vol:
            return path, vol.header.data_offset

    def side(self, pair: str) -> dict[str, Any]:
        """The primary's view of ``pair``, straight from node a's control socket (fast enough
        to sample several times a second, unlike a ``pairvol pair display`` process)."""
        shown = control.call(self.host("a").control, "pair.display", {"target": pair}, 10)
        for s in shown["pairs"]:
            if s["role"] == "primary":
                found: dict[str, Any] = s
                return found
        raise NotFound(f"node a has no primary side of {pair}")

    def node_cpu(self, host: str) -> float | None:
        pid = node_process.running_pid(self.host(host).dir)
        return None if pid is None else process_cpu_seconds(pid)

    def cpu_seconds(self) -> float | None:
        """Both nodes together: a replicated write costs CPU on each."""
        a, b = self.node_cpu("a"), self.node_cpu("b")
        return None if a is None or b is None else a + b

    def metrics_urls(self, host: str) -> list[str]:
        """``host``'s node metrics endpoint, and its agent's in a cluster lab."""
        h = self.host(host)
        urls = [f"http://{h.address}:{labmod.NODE_METRICS_PORT}/metrics"]
        if self._info is not None and self._info.cluster is not None:
            urls.append(f"http://{h.address}:{labmod.AGENT_METRICS_PORT}/metrics")
        return urls

    def scrapers(self, interval: float, log: Path) -> bench_scrape.Scrapers:
        """One metrics scraper per host, in its namespace (``--scrape``; not started yet)."""
        hosts = {h: (self.host(h).netns, self.metrics_urls(h)) for h in "ab"}
        return bench_scrape.Scrapers(hosts, interval, log)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hosts": {
                h: {"address": self.host(h).address, "netns": self.host(h).netns} for h in "ab"
            },
        }


@contextlib.contextmanager
def node_cores(lab: BenchLab, notes: dict[str, Any]) -> Iterator[None]:
    """Record each node's CPU cores (CPU seconds per second) over the block in ``notes``, and
    its CPU seconds (``cpu_s_a``, ``cpu_s_b``)."""
    a0, b0, t0 = lab.node_cpu("a"), lab.node_cpu("b"), time.monotonic()
    yield
    a1, b1, dt_s = lab.node_cpu("a"), lab.node_cpu("b"), time.monotonic() - t0
    if None not in (a0, a1, b0, b1) and dt_s > 0:
        notes["cores_a"] = round((a1 - a0) / dt_s, 3)  # type: ignore[operator]
        notes["cores_b"] = round((b1 - b0) / dt_s, 3)  # type: ignore[operator]
        notes["cpu_s_a"] = cpu_spent(a0, a1)
        notes["cpu_s_b"] = cpu_spent(b0, b1)


class LabTarget(Target):
    """Volume ``name`` on lab host a, served by a's node process.  With ``mode``, it is the
    primary of pair ``name/p`` (group ``name``; ``nameN`` once created again N times) whose
    secondary is volume ``name`` on host b."""

    def __init__(
        self, lab: BenchLab, name: str, mode: str | None = None, *, journal_size: int = 512 << 20
    ) -> None:
        if mode not in (None, "sync", "async"):
            raise UsageError(f"unknown pair mode {mode!r}")
        self.lab = lab
        self.name = name
        self.mode = mode
        self.journal_size = journal_size
        self.goals = dict(MODE_GOALS[mode]) if mode else {}
        self.size = 0
        self.generation = 0  # how many times the pair was created again

    @property
    def group(self) -> str:
        return self.name if self.generation == 0 else f"{self.name}{self.generation}"

    @property
    def pair(self) -> str:
        return f"{self.group}/p"

    @property
    def uri(self) -> str:
        return self.lab.socket_uri("a", self.name)

    def prepare(self, workdir: Path, size: int) -> None:
        self.size = size
        path, data_offset = self.lab.create_volume("a", self.name, size)
        fill_region(path, data_offset, size)
        if self.mode is None:
            return
        self.lab.create_volume("b", self.name, size)
        self.create()

    def create(self) -> None:
        create = ["pair", "create", self.pair, "--primary", f"a:{self.name}"]
        create += ["--secondary", f"b:{self.name}", "--mode", str(self.mode)]
        if self.mode == "async":
            create += ["--journal-size", str(self.journal_size)]
        self.lab.pairvol(*create)
        self.wait_state("PAIR", copy_timeout(self.size))

    def recreate(self) -> None:
        """Delete the pair and create it again (a full initial copy) under a new group name.
        After an async journal overflow a resync reaches PAIR but leaves the journal shipping
        stuck, and a group created again under the same name ships nothing until its seq
        passes the secondary's old one (bugs outside the harness, docs/benchmarks.md)."""
        self.lab.pairvol("pair", "delete", self.group)
        self.generation += 1
        self.create()

    def wait_state(self, state: str, timeout: float) -> None:
        wait = ["pair", "wait", self.pair, "--state", state, "--timeout", f"{timeout:.0f}"]
        self.lab.pairvol(*wait, timeout=timeout + 30)

    def resync(self) -> None:
        self.lab.pairvol("pair", "resync", self.group)
        self.wait_state("PAIR", copy_timeout(self.size))

    def settle(self) -> dict[str, Any]:
        """Bring the pair to PAIR with nothing left to ship: wait for the journal to drain,
        resync if it left PAIR (an async journal overflow: PFUS)."""
        notes: dict[str, Any] = {}
        t0 = progress_at = time.monotonic()
        applied = None
        while True:
            side = self.lab.side(self.pair)
            state = str(side["state"])
            journal = side.get("journal") or {}
            if state == "PAIR" and int(journal.get("lag_entries", 0)) == 0:
                break
            if journal.get("secondary_applied") != applied:
                applied, progress_at = journal.get("secondary_applied"), time.monotonic()
            stalled = time.monotonic() - progress_at > STALL_TIMEOUT
            if state == "PSUS":
                self.lab.progress(f"{self.pair} is {state}: resync")
                notes["resynced"] = state
                self.resync()
            elif state in ("PSUE", "PFUS") or stalled:
                why = f"{state}, journal stalled at {applied}" if stalled else state
                self.lab.progress(f"{self.pair} is {why}: delete and create it again")
                notes["recreated"] = why
                self.recreate()
                progress_at = time.monotonic()
            elif time.monotonic() - t0 > SETTLE_TIMEOUT:
                raise Timeout(f"{self.pair} still {state}, lag {journal.get('lag_entries')}")
            time.sleep(0.05)
        notes["settle_s"] = round(time.monotonic() - t0, 2)
        return notes

    @contextlib.contextmanager
    def serve(self) -> Iterator[Endpoint]:
        if self.mode is not None:
            self.settle()
        ep = Endpoint(self.uri, self.lab.cpu_seconds)
        with node_cores(self.lab, ep.notes):
            yield ep
        if self.mode is not None:
            ep.notes["state_end"] = self.lab.side(self.pair)["state"]
            ep.notes.update(self.settle())

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "served_by": "lab host a's node", "uri": self.uri}
        if self.mode is not None:
            d.update(pair=self.pair, mode=self.mode, secondary=f"b:{self.name}")
            if self.mode == "async":
                d["journal_size"] = self.journal_size
        return d


# -- resync against nbdcopy ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CopySample:
    round: int
    method: str  # "resync" or "nbdcopy"
    bytes: int
    seconds: float
    cores_a: float | None = None
    cores_b: float | None = None
    cpu_s_a: float | None = None  # each node's CPU seconds over the copy and its set-up
    cpu_s_b: float | None = None

    @property
    def mib_s(self) -> float:
        return self.bytes / self.seconds / (1 << 20) if self.seconds > 0 else 0.0


COPY_METHODS = ("resync", "nbdcopy")


def summarize_copies(samples: Sequence[CopySample], goal: float = RESYNC_GOAL) -> dict[str, Any]:
    """Median MiB/s per method, resync/nbdcopy of the medians, and the same ratio per round."""
    by = {m: [s for s in samples if s.method == m] for m in COPY_METHODS}
    if not all(by.values()):
        return {}
    med = {m: statistics.median(s.mib_s for s in v) for m, v in by.items()}
    base = {s.round: s.mib_s for s in by["nbdcopy"]}
    return {
        "metric": "mib_s",
        "goal": goal,
        "mib_s": med,
        "bytes": {m: int(statistics.median(s.bytes for s in v)) for m, v in by.items()},
        "seconds": {m: statistics.median(s.seconds for s in v) for m, v in by.items()},
        "ratio": med["resync"] / med["nbdcopy"] if med["nbdcopy"] > 0 else 0.0,
        "round_ratios": [
            round(s.mib_s / base[s.round], 4) for s in by["resync"] if base.get(s.round)
        ],
    }


def nbdcopy_argv(lab: BenchLab, src: str, dst: str, *, flush: bool = False) -> list[str]:
    """nbdcopy on host a: from a's node (Unix socket) to b's node over TCP, the veth path the
    replication takes; ``flush``: the destination flushed at the end (``--flush``)."""
    dst_uri = f"nbd://{lab.host('b').address}/{dst}"
    return [
        "ip",
        "netns",
        "exec",
        lab.host("a").netns,
        "nbdcopy",
        *(["--flush"] if flush else []),
        lab.socket_uri("a", src),
        dst_uri,
    ]


def rewrite(cfg: BenchConfig, uri: str, size: int, out: Path) -> None:
    """Write every byte of the first ``size`` through NBD (so the difference bitmap sees it)."""
    argv = [cfg.fio, "--name=dirty", "--ioengine=nbd", f"--uri={uri}", "--rw=write"]
    argv += ["--bs=1M", "--iodepth=4", f"--size={size}", "--output-format=json", f"--output={out}"]
    _run_bounded(argv, copy_timeout(size))


def timed_resync(cfg: BenchConfig, t: LabTarget, rnd: int, workdir: Path) -> CopySample:
    """Split, rewrite everything on the primary, resync: the node's own copy time."""
    t.settle()
    t.lab.pairvol("pair", "split", t.group)
    t.wait_state("PSUS", 60)
    rewrite(cfg, t.uri, t.size, workdir / "fio-dirty.json")
    notes: dict[str, Any] = {}
    with node_cores(t.lab, notes):
        t.resync()
    side = t.lab.side(t.pair)
    return copy_sample(
        rnd, "resync", int(side["last_copy_bytes"]), float(side["last_copy_seconds"]), notes
    )


def copy_sample(
    rnd: int, method: str, size: int, seconds: float, notes: dict[str, Any]
) -> CopySample:
    """A copy's sample with the CPU figures :func:`node_cores` noted."""
    cpu = [notes.get(k) for k in ("cores_a", "cores_b", "cpu_s_a", "cpu_s_b")]
    return CopySample(rnd, method, size, seconds, *cpu)


def timed_nbdcopy(
    lab: BenchLab, src: str, size: int, rnd: int, *, flush: bool = False
) -> CopySample:
    notes: dict[str, Any] = {}
    with node_cores(lab, notes):
        t0 = time.monotonic()
        _run_bounded(nbdcopy_argv(lab, src, NBDCOPY_DST, flush=flush), copy_timeout(size))
        seconds = time.monotonic() - t0
    return copy_sample(rnd, "nbdcopy", size, seconds, notes)


def measure_copies(
    cfg: BenchConfig,
    pair: LabTarget,
    source: LabTarget,
    workdir: Path,
    progress: Callable[[str], None],
) -> list[CopySample]:
    """Alternating rounds of a full differential resync of ``pair`` and an nbdcopy of as many
    bytes (``source``, unpaired on a, to a fresh volume on b), flushed at the end as the
    resync is."""
    # Filled like every volume: a first copy into a sparse file would also pay for allocation.
    path, data_offset = pair.lab.create_volume("b", NBDCOPY_DST, source.size)
    fill_region(path, data_offset, source.size)
    samples = []
    for rnd in range(cfg.rounds):
        for method in order_for_round(COPY_METHODS, rnd):
            if method == "resync":
                s = timed_resync(cfg, pair, rnd, workdir)
            else:
                # --flush: the resync ends with its Flush (the copy durable before PAIR),
                # so the baseline pays for the same durability.
                s = timed_nbdcopy(pair.lab, source.name, source.size, rnd, flush=True)
            samples.append(s)
            progress(
                f"round {rnd + 1}/{cfg.rounds} copy {method:<8} {s.bytes >> 20} MiB in "
                f"{s.seconds:.2f} s = {s.mib_s:.1f} MiB/s  cores a {s.cores_a} b {s.cores_b}"
            )
    return samples


# -- async lag at a fixed write rate ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LagSample:
    t: float  # seconds since fio started
    lag_seconds: float  # 0 when nothing is unapplied (see lag_sample)
    lag_entries: int
    journal_percent: float
    state: str
    newest_seq: int = 0  # the primary's newest journal entry
    applied_seq: int = 0  # the newest the secondary has applied


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]


def summarize_lag(samples: Sequence[LagSample], skip_s: float) -> dict[str, Any]:
    """p50/p99/max of the journal lag after the first ``skip_s`` seconds (the ramp)."""
    steady = [s for s in samples if s.t >= skip_s]
    if not steady:
        return {"samples": 0}
    lags = [s.lag_seconds for s in steady]
    first, last = steady[0], steady[-1]
    span = last.t - first.t
    return {
        "samples": len(steady),
        # entries per second into the journal and applied by the secondary, over the window
        "journaled_per_s": round((last.newest_seq - first.newest_seq) / span, 1) if span else None,
        "applied_per_s": round((last.applied_seq - first.applied_seq) / span, 1) if span else None,
        "p50_s": percentile(lags, 50),
        "p99_s": percentile(lags, 99),
        "max_s": max(lags),
        "p50_entries": percentile([s.lag_entries for s in steady], 50),
        "max_entries": max(s.lag_entries for s in steady),
        "max_journal_percent": max(s.journal_percent for s in steady),
        "states": sorted({s.state for s in steady}),
        # the secondary "applied" more than was ever journaled: the numbers are not a lag
        "inconsistent": any(s.applied_seq > s.newest_seq for s in samples),
    }


def lag_sample(side: dict[str, Any], t: float) -> LagSample:
    """One reading of the primary's journal.  The node's ``lag_seconds`` is the age of the
    oldest entry still *retained*, which stays and grows after everything was applied (until
    the space is reused); with no entry outstanding the lag is 0."""
    j = side.get("journal") or {}
    entries = int(j.get("lag_entries", 0))
    return LagSample(
        round(t, 3),
        float(j.get("lag_seconds", 0.0)) if entries else 0.0,
        entries,
        float(j.get("journal_percent", 0.0)),
        str(side["state"]),
        int(j.get("newest_seq", 0)),
        int(j.get("secondary_applied", 0)),
    )


def fio_io_start(text: str) -> float:
    """The wall-clock time (``time.time()`` seconds) at which one fio run's I/O began: its
    report's ``timestamp_ms`` (taken as fio writes the report, a few ms after the last I/O)
    less its longest job's ``job_runtime``.  fio spends about 0.3 s here starting up before
    its first I/O (a fork, then a 100 ms wait for its job): a window timed from fio's launch
    charges that to what is measured, while fio's own rates (the unreplicated baseline) do
    not count it."""
    try:
        doc = json.loads(_json_part(text))
        stamp_ms = float(doc["timestamp_ms"])
        runtime_ms = max(float(job["job_runtime"]) for job in doc["jobs"])
    except (ValueError, KeyError, TypeError) as e:
        raise ExternalCommandFailed(f"cannot parse fio's JSON output: {e}") from e
    return (stamp_ms - runtime_ms) / 1000


def measure_sustained(
    cfg: BenchConfig, t: LabTarget, workload: Workload, burst: int, workdir: Path
) -> dict[str, Any]:
    """The async pair's end-to-end rate for ``workload``: fio writes ``burst`` bytes (sized
    to fit in the journal) as fast as it can; the rate counts from fio's first I/O
    (:func:`fio_io_start`, not fio's launch) until the secondary has applied the last of them.
    fio alone measures how fast the journal takes writes, which says nothing about what the
    pair can sustain once the journal is full."""
    burst = max(workload.bs, burst // workload.bs * workload.bs)
    out = workdir / f"fio-burst-{workload.name}.json"
    argv = [cfg.fio, f"--name=burst-{workload.name}", "--ioengine=nbd", f"--uri={t.uri}"]
    argv += [*workload.fio_args(), f"--size={t.size}", f"--io_size={burst}"]
    argv += ["--output-format=json", f"--output={out}"]
    t.settle()
    cpu: dict[str, Any] = {}
    with node_cores(t.lab, cpu):  # each node's CPU from fio's start until b applied it all
        t0, launched = time.monotonic(), time.time()
        _run_bounded(argv, copy_timeout(burst))
        fio_s = time.monotonic() - t0
        io_start = max(launched, fio_io_start(out.read_text()))
        while True:
            side = t.lab.side(t.pair)
            state = str(side["state"])
            lag = int((side.get("journal") or {})["lag_entries"])
            if state not in ("PAIR", "PFUL") or lag == 0:
                break
            if time.monotonic() - t0 > copy_timeout(burst):
                raise Timeout(f"{t.pair}: the journal did not drain in {copy_timeout(burst):.0f}s")
            time.sleep(0.02)
        total_s = time.monotonic() - t0
        drained = time.time()
    t.settle()
    io_s = drained - io_start
    per_s = burst / io_s
    return {
        "bytes": burst,
        "entries": burst // workload.bs,
        "fio_seconds": round(fio_s, 3),  # from fio's launch until it exited
        "fio_start_seconds": round(io_start - launched, 3),  # fio's launch to its first I/O
        "drained_seconds": round(total_s, 3),  # from fio's launch until b applied the last
        "seconds": round(io_s, 3),  # fio's first I/O until b applied the last: the rate's
        "state_end": state,
        "rate": round(per_s / workload.bs if workload.metric == "iops" else per_s / (1 << 20), 1),
        "iops": round(per_s / workload.bs, 1),
        "mib_s": round(per_s / (1 << 20), 2),
        "cpu_s_a": cpu.get("cpu_s_a"),
        "cpu_s_b": cpu.get("cpu_s_b"),
    }


def cpu_spent(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 4)


def measure_lag(
    cfg: BenchConfig,
    t: LabTarget,
    workload: Workload,
    rate: float,
    workdir: Path,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """fio ``workload`` capped at ``rate`` (IOPS or MiB/s, the workload's metric) for
    ``cfg.lag_runtime`` seconds while sampling the primary's journal lag."""
    if workload.metric == "iops":
        cap = f"--rate_iops={max(1, int(rate))}"
    else:
        cap = f"--rate={max(1, int(rate * (1 << 20)))}"
    out = workdir / f"fio-lag-{workload.name}.json"
    argv = [cfg.fio, f"--name=lag-{workload.name}", "--ioengine=nbd", "--numjobs=1"]
    argv += ["--time_based", f"--runtime={cfg.lag_runtime:g}", *workload.fio_args(), cap]
    argv += [f"--uri={t.uri}", "--output-format=json", f"--output={out}"]
    t.settle()
    samples: list[LagSample] = []
    notes: dict[str, Any] = {}
    with open(workdir / "fio-lag.log", "ab") as log, node_cores(t.lab, notes):
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            deadline = t0 + cfg.lag_runtime + 60
            tick = t0
            while proc.poll() is None:
                samples.append(lag_sample(t.lab.side(t.pair), time.monotonic() - t0))
                tick += cfg.lag_interval
                time.sleep(max(0.0, tick - time.monotonic()))
                if time.monotonic() > deadline:
                    raise Timeout(f"fio ran for more than {deadline - t0:.0f}s: {' '.join(argv)}")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise ExternalCommandFailed(f"fio exited with {proc.returncode} (see {log.name})")
    achieved = parse_fio_json(out.read_text(), workload.direction)
    notes["state_end"] = t.lab.side(t.pair)["state"]
    notes.update(t.settle())
    skip = min(2.0, cfg.lag_runtime / 4)
    result = {
        "workload": workload.name,
        "metric": workload.metric,
        "rate": round(rate, 1),
        "achieved": round(achieved.metric(workload.metric), 1),
        "runtime_s": cfg.lag_runtime,
        "interval_s": cfg.lag_interval,
        "skip_s": skip,
        **summarize_lag(samples, skip),
        "notes": notes,
        "trace_columns": ["t", "lag_seconds", "lag_entries", "newest_seq", "applied_seq"],
        "trace": [
            [s.t, s.lag_seconds, s.lag_entries, s.newest_seq, s.applied_seq] for s in samples
        ],
    }
    progress(
        f"lag {workload.name} at {rate:.0f} {workload.metric}: "
        f"p50 {result.get('p50_s')} s p99 {result.get('p99_s')} s, states {result.get('states')}"
    )
    return result


# -- a replicated suite ----------------------------------------------------------------------


def check_replicated_prerequisites(modes: Sequence[str]) -> None:
    programs = ("ip", "nbdcopy") if "sync" in modes else ("ip",)
    check_lab_prerequisites(f"{'/'.join(modes)} suite", programs)


def sample_json(s: Sample) -> dict[str, Any]:
    d = {
        "round": s.round,
        "workload": s.workload,
        "target": s.target,
        "server_cores": s.server_cores,
        **asdict(s.result),
    }
    if s.notes:
        d["notes"] = s.notes
    return d


def run_replicated(
    cfg: BenchConfig, modes: Sequence[str], workdir: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Build a lab, measure the pair modes against the unpaired volume, tear the lab down.
    With ``cfg.scrape``, a scraper per host polls its metrics the whole time (``notes.scrape``)."""
    workloads = replicated_workloads(cfg.workloads)
    if not workloads:
        raise UsageError(f"the replicated suites run only {', '.join(REPLICATED_WORKLOADS)}")
    with BenchLab(workdir / "labs", progress=progress, tls=cfg.tls) as lab:
        if cfg.scrape is None:
            return measure_replicated(cfg, lab, modes, workloads, workdir, progress)
        scrapers = lab.scrapers(cfg.scrape, workdir / "scrape.log")
        progress(f"scrapers: every {cfg.scrape:g} s, {', '.join(scrapers.hosts)}")
        with scrapers:
            out = measure_replicated(cfg, lab, modes, workloads, workdir, progress)
        scrape = bench_scrape.summarize_scrapes(cfg.scrape, scrapers.reports)
        out["notes"]["scrape"] = scrape
        progress(bench_scrape.format_scrapes(scrape).replace("\n", "\nbench: "))
        return out


def measure_replicated(
    cfg: BenchConfig,
    lab: BenchLab,
    modes: Sequence[str],
    workloads: Sequence[Workload],
    workdir: Path,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """The replicated suites' measurements in ``lab``: the ``replicated`` part of the report."""
    unrepl = LabTarget(lab, UNREPLICATED)
    paired = [LabTarget(lab, m, m, journal_size=cfg.journal_size) for m in modes]
    targets: list[Target] = [*paired, unrepl]
    names = [t.name for t in targets]
    samples = measure(cfg, targets, progress, workdir=workdir, workloads=workloads)
    rows = summarize(samples, workloads, names, {t.name: t.goals for t in paired})
    out: dict[str, Any] = {
        "lab": lab.describe(),
        "baseline": UNREPLICATED,
        "targets": [t.describe() for t in targets],
        "workloads": [asdict(w) for w in workloads],
        "goals": {t.name: t.goals for t in paired},
        "samples": [sample_json(s) for s in samples],
        "summary": [asdict(r) for r in rows],
        "resync": None,
        "lag": None,
        "notes": {},  # the run's own observations: "scrape" (--scrape)
        "cores": os.cpu_count() or 1,  # shared by both nodes and fio (the floors' ceilings)
    }
    by_mode = {t.mode: t for t in paired}
    if "sync" in by_mode:
        copies = measure_copies(cfg, by_mode["sync"], unrepl, workdir, progress)
        out["resync"] = {
            "how": "split, rewrite the whole volume on the primary, resync, wait PAIR; the "
            "node's last_copy_bytes/last_copy_seconds, against nbdcopy of the same size "
            "from a's node (Unix socket) to b's node (TCP), run on host a",
            "nbdcopy_command": nbdcopy_argv(lab, UNREPLICATED, NBDCOPY_DST),
            "samples": [{**asdict(s), "mib_s": s.mib_s} for s in copies],
            "summary": summarize_copies(copies),
        }
    if "async" in by_mode:
        at, lag, sustained_by = by_mode["async"], [], {}
        for row, w in zip(rows, workloads, strict=True):
            fio_max = row.mib_s["async"] * (1 << 20)  # bytes/s into the journal
            burst = int(min(at.size, 0.4 * at.journal_size, fio_max * cfg.runtime))
            sustained = measure_sustained(cfg, at, w, burst, workdir)
            progress(
                f"async {w.name} end to end: {sustained['bytes'] >> 20} MiB applied "
                f"{sustained['seconds']:.2f} s after fio's first write (fio done "
                f"{sustained['fio_seconds']:.2f} s after its launch, of which "
                f"{sustained['fio_start_seconds']:.2f} s starting) = {sustained['rate']} "
                f"{w.metric}"
            )
            fio_best = row.iops["async"] if w.metric == "iops" else row.mib_s["async"]
            best = min(sustained["rate"], fio_best)
            result = measure_lag(cfg, at, w, best / 2, workdir, progress)
            lag.append({**result, "sustained": sustained})
            sustained_by[w.name] = sustained
        out["lag"] = lag
        # The async figure is what the pair sustains, not what fio put into the journal.
        rows = end_to_end_rows(rows, sustained_by, "async", UNREPLICATED)
        out["summary"] = [asdict(r) for r in rows]
    out["left_pair"] = left_pair(samples)
    out["cpu"] = cpu_costs(out)
    out["floor"] = measure_floor(out, out["cores"], workdir, progress)
    out["objectives"] = objectives_of(out, out["cores"])
    return out


def left_pair(samples: Sequence[Sample]) -> dict[str, dict[str, int]]:
    """target -> workload -> rounds whose pair was no longer replicating when fio ended
    (an async journal overflow: PFUS).  Such a rate is mostly an unreplicated one."""
    out: dict[str, dict[str, int]] = {}
    for s in samples:
        state = (s.notes or {}).get("state_end")
        if state is not None and state not in ("PAIR", "PFUL"):
            per = out.setdefault(s.target, {})
            per[s.workload] = per.get(s.workload, 0) + 1
    return out


def format_left_pair(left: dict[str, dict[str, int]], rounds: int) -> str:
    return "\n".join(
        f"note: {t} {w}: the pair left PAIR (journal overflow) in {n} of {rounds} round(s); "
        "fio's rate there is mostly unreplicated writing"
        for t, per in sorted(left.items())
        for w, n in sorted(per.items())
    )


def format_copy_table(summary: dict[str, Any]) -> str:
    mib = summary["mib_s"]
    mark = "ok" if summary["ratio"] >= summary["goal"] else "below"
    return aligned(
        [
            ["copy", "bytes", "resync MiB/s", "nbdcopy MiB/s", "resync/nbdcopy", "goal"],
            [
                "full resync",
                format_size(summary["bytes"]["resync"]),
                f"{mib['resync']:.1f}",
                f"{mib['nbdcopy']:.1f}",
                f"{summary['ratio']:.2f} ({mark})",
                f">= {summary['goal']:g}",
            ],
        ]
    )


def format_lag_table(lag: Sequence[dict[str, Any]]) -> str:
    lines = [["async lag at", "end to end", "rate", "achieved", "p50 s", "p99 s", "max s"]]
    lines[0] += ["entries in/s", "applied/s", "journal max%", "states"]
    for r in lag:
        unit = "IOPS" if r["metric"] == "iops" else "MiB/s"
        lines.append(
            [
                r["workload"],
                f"{r['sustained']['rate']:.0f} {unit}" if "sustained" in r else "-",
                f"{r['rate']:.0f} {unit}",
                f"{r['achieved']:.0f} {unit}",
                f"{r.get('p50_s', 0):.3f}",
                f"{r.get('p99_s', 0):.3f}",
                f"{r.get('max_s', 0):.3f}",
                f"{r.get('journaled_per_s') or 0:.0f}",
                f"{r.get('applied_per_s') or 0:.0f}",
                f"{r.get('max_journal_percent', 0):.1f}",
                ",".join(r.get("states", [])),
            ]
        )
    return aligned(lines)


# -- issue 10's targets: CPU per request and per MiB, and the floor of each one missed -------

#: The replicated workloads' sizes in the per-step floor (bench_floor.NODE_STEPS).
FLOOR_SIZE = {"randwrite-4k": "4k", "write-1m": "1m"}
FIGURE_FIO, FIGURE_E2E, FIGURE_JOURNAL = "fio", "end to end", "into journal"
FLOOR_NOTE = (
    "(CPU of one thread, median of repeats; the TCP steps run over loopback with both ends in "
    "one thread, so their a/b split is approximate; decode counts one copy that recv_into "
    "saves; the sums below are measured, the rates they allow are estimates)"
)
CPU_HOW = (
    "each node's CPU seconds (/proc, the nbdkit process) per second of the fio run, divided by "
    "fio's rate, median of rounds; async end to end: each node's CPU seconds from fio's start "
    "until b had applied the last entry, divided by the entries (bytes) applied; fio: its own "
    "usr_cpu + sys_cpu over its rate"
)


def end_to_end_rows(
    rows: Sequence[Row], sustained: Mapping[str, Mapping[str, Any]], target: str, baseline: str
) -> list[Row]:
    """``rows`` with ``target``'s figure replaced by its end-to-end sustained rate
    (:func:`measure_sustained`, by workload) and its ratio to ``baseline``; fio's own medians
    move to ``into_journal``.  Workloads without a sustained figure stay as they were."""
    out = []
    for r in rows:
        s = sustained.get(r.workload)
        if s is None or target not in r.ratio:
            out.append(r)
            continue
        iops, mib_s = float(s["iops"]), float(s["mib_s"])
        base = (r.iops if r.metric == "iops" else r.mib_s)[baseline]
        ratio = (iops if r.metric == "iops" else mib_s) / base if base > 0 else 0.0
        fio = {
            "iops": r.iops[target],
            "mib_s": r.mib_s[target],
            "ratio": r.ratio[target],
            "round_ratios": r.round_ratios.get(target, []),
        }
        out.append(
            replace(
                r,
                iops={**r.iops, target: iops},
                mib_s={**r.mib_s, target: mib_s},
                ratio={**r.ratio, target: ratio},
                round_ratios={**r.round_ratios, target: [round(ratio, 4)]},  # one burst
                into_journal={**r.into_journal, target: fio},
            )
        )
    return out


def _cost(seconds_per_request: Sequence[float], bs: int) -> dict[str, float] | None:
    """The median CPU per request, in µs per request and in ms per MiB."""
    if not seconds_per_request:
        return None
    s = statistics.median(seconds_per_request)
    return {"us_per_request": round(s * 1e6, 2), "ms_per_mib": round(s * (1 << 20) / bs * 1e3, 4)}


def _per_request(samples: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """Each sample's cores ``key`` (CPU seconds per second: fio's own at the sample's top
    level, a node's in its notes) over its IOPS, where both are known."""
    out = []
    for s in samples:
        c = s.get(key, (s.get("notes") or {}).get(key))
        if c is not None and s["iops"] > 0:
            out.append(float(c) / float(s["iops"]))
    return out


def cpu_costs(rep: Mapping[str, Any]) -> dict[str, Any]:
    """CPU per request and per MiB on node a, node b and fio, for every (target, workload) of
    the replicated part ``rep`` (its samples, and the async end-to-end bursts of its lag)."""
    e2e = {t for row in rep["summary"] for t in row.get("into_journal") or {}}
    sustained = {r["workload"]: r["sustained"] for r in rep.get("lag") or [] if "sustained" in r}
    rows: list[dict[str, Any]] = []
    for w in rep["workloads"]:
        name, bs = w["name"], int(w["bs"])
        for t in (t["name"] for t in rep["targets"]):
            ss = [s for s in rep["samples"] if s["workload"] == name and s["target"] == t]
            if t in e2e and name in sustained:
                rows.append(_sustained_cost(t, w, sustained[name]))
            if not ss:
                continue
            rows.append(
                {
                    "target": t,
                    "figure": FIGURE_JOURNAL if t in e2e else FIGURE_FIO,
                    "workload": name,
                    "metric": w["metric"],
                    "rate": {
                        "iops": statistics.median(s["iops"] for s in ss),
                        "mib_s": statistics.median(s["mib_s"] for s in ss),
                    },
                    "rounds": len(ss),
                    "a": _cost(_per_request(ss, "cores_a"), bs),
                    "b": _cost(_per_request(ss, "cores_b"), bs),
                    "fio": _cost(_per_request(ss, "client_cores"), bs),
                }
            )
    return {"how": CPU_HOW, "rows": rows}


def _sustained_cost(target: str, w: Mapping[str, Any], s: Mapping[str, Any]) -> dict[str, Any]:
    entries, bs = int(s["entries"]), int(w["bs"])
    per = {h: s.get(f"cpu_s_{h}") for h in "ab"}
    return {
        "target": target,
        "figure": FIGURE_E2E,
        "workload": w["name"],
        "metric": w["metric"],
        "rate": {"iops": s["iops"], "mib_s": s["mib_s"]},
        "rounds": 1,
        **{h: None if c is None else _cost([c / entries], bs) for h, c in per.items()},
        "fio": None,  # the burst's fio is not the client cost the ceilings use (unrepl's is)
    }


def cost_of(
    cpu: Mapping[str, Any] | None, target: str, figure: str, workload: str
) -> dict[str, Any] | None:
    for row in (cpu or {}).get("rows") or []:
        if (row["target"], row["figure"], row["workload"]) == (target, figure, workload):
            found: dict[str, Any] = row
            return found
    return None


def unit_seconds(cost: Mapping[str, float], metric: str) -> float:
    """A cost in CPU seconds per request (``iops``) or per MiB (``mib_s``)."""
    return cost["us_per_request"] / 1e6 if metric == "iops" else cost["ms_per_mib"] / 1e3


def floor_of(
    rep: Mapping[str, Any],
    steps: Mapping[str, Mapping[str, Any]],
    cores: int,
    disk: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The per-step floor of a sync mirrored write (:func:`bench_floor.sync_floor`) and of an
    async one (:func:`bench_floor.async_floor`, with the durable rate of the ``disk``
    measurement when there is one) with this run's unreplicated write on a, fio's cost and
    the unreplicated rates."""
    baseline = rep["baseline"]
    local: dict[str, float | None] = {}
    client: dict[str, float | None] = {}
    base: dict[str, float | None] = {}
    for row in rep["summary"]:
        size = FLOOR_SIZE.get(row["workload"])
        if size is None:
            continue
        metric = row["metric"]
        base[size] = (row["iops"] if metric == "iops" else row["mib_s"])[baseline]
        cost = cost_of(rep.get("cpu"), baseline, FIGURE_FIO, row["workload"]) or {}
        local[size] = None if cost.get("a") is None else unit_seconds(cost["a"], metric) * 1e6
        client[size] = None if cost.get("fio") is None else unit_seconds(cost["fio"], metric) * 1e6
    return {
        "how": "each step timed on its own in the bench's process (pairvol.bench_floor): CPU "
        "of one thread, median of repeats; node a adds the unreplicated write's CPU on a "
        "measured by this run (local_us); the rates are estimates (bench_floor.ceilings)",
        "crc32c_hardware": bench_floor.hardware_crc(),
        "python": platform.python_version(),
        "steps": dict(steps),
        "sync": bench_floor.sync_floor(steps, local, client, base, cores),
        "disk": disk,
        "async": bench_floor.async_floor(
            steps, local, client, base, cores, None if disk is None else disk["mib_s"]
        ),
    }


def measure_floor(
    rep: Mapping[str, Any], cores: int, workdir: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    progress("floor: timing each step of a replicated write in this process (about 2 s)")
    steps = bench_floor.measure_steps(workdir)
    return floor_of(rep, steps, cores, bench_floor.measure_disk(workdir))


def objectives_of(rep: Mapping[str, Any], cores: int) -> list[dict[str, Any]]:
    """Issue 10's targets as measured in ``rep``: each one's value, goal, whether it was
    reached, and for each one not reached its ``floor`` (the measured CPU per request or per
    MiB on each node, and the rates CPU allows here and on two hosts: estimates)."""
    baseline, cpu = rep["baseline"], rep.get("cpu")
    out: list[dict[str, Any]] = []
    for row in rep["summary"]:
        w, metric = row["workload"], row["metric"]
        base = (row["iops"] if metric == "iops" else row["mib_s"])[baseline]
        for t, ratio in row["ratio"].items():
            e2e = t in (row.get("into_journal") or {})
            if t == "async" and not e2e:
                continue  # fio's rate into a journal is no target of issue 10
            goal = (row.get("goals") or {}).get(t, row["goal"])
            obj: dict[str, Any] = {
                "name": f"{t}{' end to end' if e2e else ''} {w} / {baseline}",
                "kind": "ratio",
                "target": t,
                "workload": w,
                "value": round(ratio, 3),
                "goal": goal,
                "op": ">=",
                "reached": ratio >= goal,
            }
            if not obj["reached"]:
                figure = FIGURE_E2E if e2e else FIGURE_FIO
                client = cost_of(cpu, baseline, FIGURE_FIO, w) or {}
                obj["floor"] = _rate_floor(
                    cost_of(cpu, t, figure, w), client.get("fio"), metric, cores, base
                )
                obj["floor"]["step_floor"] = FLOOR_SIZE.get(w)
            out.append(obj)
    out += [_lag_objective(r, cores) for r in rep.get("lag") or []]
    copies = (rep.get("resync") or {}).get("summary")
    if copies:
        out.append(_resync_objective(rep["resync"], cores))
    return out


def _rate_floor(
    cost: Mapping[str, Any] | None,
    client: Mapping[str, float] | None,
    metric: str,
    cores: int,
    base: float,
) -> dict[str, Any]:
    unit = "request" if metric == "iops" else "MiB"
    if cost is None or cost.get("a") is None or cost.get("b") is None:
        return {"unit": unit, "missing": "no CPU figures for the nodes"}
    cpu_a, cpu_b = unit_seconds(cost["a"], metric), unit_seconds(cost["b"], metric)
    fio = None if client is None else unit_seconds(client, metric)
    return {
        "unit": unit,
        "cpu": {"a": cost["a"], "b": cost["b"], "fio": client},
        "client": "fio's cost in the unreplicated run"
        if fio is not None
        else "fio left out, its CPU unknown",
        "ceilings": bench_floor.ceilings(cpu_a, cpu_b, fio, cores, base),
    }


def _lag_objective(r: Mapping[str, Any], cores: int) -> dict[str, Any]:
    value = r.get("p99_s")
    reached = value is not None and value < LAG_GOAL_S
    obj: dict[str, Any] = {
        "name": f"async lag p99 at half the end-to-end rate, {r['workload']}",
        "kind": "seconds",
        "target": "async",
        "workload": r["workload"],
        "value": value,
        "goal": LAG_GOAL_S,
        "op": "<",
        "reached": reached,
    }
    if reached:
        return obj
    notes, metric = r.get("notes") or {}, r["metric"]
    a, b, rate = notes.get("cores_a"), notes.get("cores_b"), float(r.get("achieved") or 0)
    floor: dict[str, Any] = {
        "unit": "request" if metric == "iops" else "MiB",
        "rate": rate,
        "metric": metric,
        "step_floor": FLOOR_SIZE.get(r["workload"]),
    }
    if a is not None and b is not None:
        floor["cores"] = {"a": a, "b": b}
        floor["busy"] = round((a + b) / cores, 3)  # of this machine's cores, fio left out
        if rate > 0:
            per = {"a": a / rate, "b": b / rate}  # CPU seconds per request or per MiB
            floor["cpu"] = {
                h: {"us_per_request": round(s * 1e6, 2)}
                if metric == "iops"
                else {"ms_per_mib": round(s * 1e3, 4)}
                for h, s in per.items()
            }
    obj["floor"] = floor
    return obj


def _copy_cost(samples: Sequence[Mapping[str, Any]], method: str) -> dict[str, Any]:
    """Each node's CPU per MiB copied by ``method``, median over rounds (None: unknown).
    The CPU seconds span the whole command (a resync's too, not only its copy seconds)."""
    out: dict[str, Any] = {}
    for h in "ab":
        xs = [
            s[f"cpu_s_{h}"] / (s["bytes"] / (1 << 20))
            for s in samples
            if s["method"] == method and s.get(f"cpu_s_{h}") is not None and s["bytes"] > 0
        ]
        out[h] = {"ms_per_mib": round(statistics.median(xs) * 1e3, 4)} if xs else None
    return out


def _resync_objective(resync: Mapping[str, Any], cores: int) -> dict[str, Any]:
    c = resync["summary"]
    obj: dict[str, Any] = {
        "name": "full resync / nbdcopy",
        "kind": "ratio",
        "target": "resync",
        "workload": "full resync",
        "value": round(c["ratio"], 3),
        "goal": c["goal"],
        "op": ">=",
        "reached": c["ratio"] >= c["goal"],
    }
    if obj["reached"]:
        return obj
    cost = _copy_cost(resync.get("samples") or [], "resync")
    floor = _rate_floor(
        {"a": cost["a"], "b": cost["b"]}, None, "mib_s", cores, c["mib_s"]["nbdcopy"]
    )
    floor["client"] = "no client, nbdcopy's own CPU not measured"
    floor["nbdcopy_nodes"] = _copy_cost(resync.get("samples") or [], "nbdcopy")
    obj["floor"] = floor
    return obj


def _cost_text(cost: Mapping[str, float] | None, metric: str) -> str:
    if cost is None:
        return "-"
    if metric == "iops":
        return f"{cost['us_per_request']:.0f} µs/req"
    return f"{cost['ms_per_mib']:.2f} ms/MiB"


def format_cpu_table(cpu: Mapping[str, Any]) -> str:
    lines = [["CPU per request / per MiB", "figure", "rate", "node a", "node b", "fio"]]
    for r in cpu["rows"]:
        m = r["metric"]
        lines.append(
            [
                f"{r['workload']} {r['target']}",
                r["figure"],
                format_rate(r["rate"][m], m),
                *(_cost_text(r[k], m) for k in ("a", "b", "fio")),
            ]
        )
    return aligned(lines) + f"\n({cpu['how']})"


def _value_text(obj: Mapping[str, Any]) -> str:
    v = obj["value"]
    if v is None:
        return "-"
    return f"{v:.3f} s" if obj["kind"] == "seconds" else f"{v:.2f}"


def format_objectives(objectives: Sequence[Mapping[str, Any]]) -> str:
    lines = [["issue 10 target", "measured", "goal", ""]]
    for o in objectives:
        goal = f"{o['goal']:g} s" if o["kind"] == "seconds" else f"{o['goal']:g}"
        lines.append(
            [o["name"], _value_text(o), f"{o['op']} {goal}", "ok" if o["reached"] else "below"]
        )
    return aligned(lines)


def _rates_text(c: Mapping[str, Any], unit: str) -> dict[str, str]:
    """Each ceiling of :func:`bench_floor.ceilings` as "RATE UNIT = RATIOx"."""
    per_s = "IOPS" if unit == "request" else "MiB/s"
    out = {}
    for k, v in c["rate"].items():
        ratio = (c.get("ratio") or {}).get(k)
        text = "-" if v is None else f"{v:.0f} {per_s}" if unit == "request" else f"{v:.1f} {per_s}"
        out[k] = text + ("" if ratio is None else f" = {ratio:.2f}x")
    return out


def _ceiling_lines(c: Mapping[str, Any], unit: str, client: str, against: str) -> list[str]:
    r = _rates_text(c, unit)
    n = c["cores"]
    share = f"a + b + {client}" if c["client_included"] else f"a + b; {client}"
    return [
        f"  estimate, CPU-bound ceiling on this machine ({n} cores for {share}): "
        f"{r['this_machine']} {against}",
        f"  estimate, two hosts (each node its own, bounded by the busier: {c['busier']}): "
        f"GIL-serialized 1/cpu_node {r['two_hosts_gil']}; if all {n} cores: cores/cpu_node"
        f"{' (a with fio)' if c['client_included'] else ''} {r['two_hosts_all_cores']}",
    ]


def format_floors(
    objectives: Sequence[Mapping[str, Any]], floor: Mapping[str, Any] | None = None
) -> str:
    """The floor analysis of every target not reached (nothing when all were)."""
    out = []
    for o in objectives:
        f = o.get("floor")
        if o["reached"] or f is None:
            continue
        goal = f"{o['goal']:g}{' s' if o['kind'] == 'seconds' else ''}"
        out.append(f"floor: {o['name']} = {_value_text(o)}, goal {o['op']} {goal}: not reached")
        if f.get("missing"):
            out.append(f"  {f['missing']}")
        elif o["kind"] == "seconds":
            out += _lag_floor_lines(f, floor)
        else:
            out += _rate_floor_lines(o, f, floor)
    return "\n".join(out)


def _rate_floor_lines(
    o: Mapping[str, Any], f: Mapping[str, Any], floor: Mapping[str, Any] | None
) -> list[str]:
    metric = "iops" if f["unit"] == "request" else "mib_s"
    cpu = f["cpu"]
    against = "nbdcopy" if o["target"] == "resync" else "unrepl"
    lines = [
        f"  measured, CPU per {f['unit']}: a {_cost_text(cpu['a'], metric)}, "
        f"b {_cost_text(cpu['b'], metric)}"
        + (f", fio {_cost_text(cpu['fio'], metric)} (unreplicated run)" if cpu.get("fio") else "")
    ]
    if f.get("nbdcopy_nodes"):
        n = f["nbdcopy_nodes"]
        lines.append(
            f"  measured, the nodes serving nbdcopy: a {_cost_text(n['a'], metric)}, "
            f"b {_cost_text(n['b'], metric)}"
        )
    lines += _ceiling_lines(f["ceilings"], f["unit"], f["client"], f"of {against}")
    size = f.get("step_floor") or ""
    journaled = ((floor or {}).get("async") or {}).get(size) if o["target"] == "async" else None
    if journaled:
        for label, step in (
            ("warm journals", journaled["warm"]),
            ("first lap", journaled["first_lap"]),
        ):
            lines.append(
                _step_floor_line(f"per-step floor of an async entry, {label}", step, f["unit"])
            )
        if journaled.get("disk"):
            lines.append(_disk_floor_line(journaled["disk"], (floor or {}).get("disk") or {}))
        return lines
    step = ((floor or {}).get("sync") or {}).get(size)
    if step:
        lower = " (a sync write's steps; async also journals: a lower bound)"
        label = f"per-step floor{lower if o['target'] == 'async' else ''}"
        lines.append(_step_floor_line(label, step, f["unit"]))
    return lines


def _disk_floor_line(d: Mapping[str, Any], how: Mapping[str, Any]) -> str:
    ratio = d.get("ratio") or {}

    def at(where: str) -> str:
        x = ratio.get(where)
        return f"{d['rate'][where]:.0f} MiB/s" + ("" if x is None else f" = {x:.2f}x")

    copies = d["copies"]
    return (
        f"  measured, durable journal appends here: {d['durable_mib_s']:.0f} MiB/s "
        f"({how.get('writers', '?')} writers of 1 MiB, fdatasync each); estimate, disk-bound: "
        f"each MiB made durable {copies['this_machine']} times on this disk (a's journal, "
        f"b's journal, b's volume) <= {at('this_machine')}; two hosts ({copies['two_hosts']} "
        f"on b's) <= {at('two_hosts')} (the unreplicated run writes to the page cache only)"
    )


def _step_floor_line(label: str, step: Mapping[str, Any], unit: str) -> str:
    r = _rates_text(step["ceilings"], unit)
    return (
        f"  estimate, {label}: a {step['a_us']:.0f} µs, b {step['b_us']:.0f} µs per {unit}: "
        f"here {r['this_machine']}, two hosts {r['two_hosts_gil']} (GIL) / "
        f"{r['two_hosts_all_cores']} (all cores)"
    )


def _lag_floor_lines(f: Mapping[str, Any], floor: Mapping[str, Any] | None) -> list[str]:
    metric = f["metric"]
    lines = []
    if "cores" in f:
        cpu = f.get("cpu") or {}
        lines.append(
            f"  measured, at {format_rate(f['rate'], metric)} the nodes used a "
            f"{f['cores']['a']:.2f} + b {f['cores']['b']:.2f} cores = {f['busy']:.0%} of "
            f"this machine (fio left out); CPU per {f['unit']}: a "
            f"{_cost_text(cpu.get('a'), metric)}, b {_cost_text(cpu.get('b'), metric)}"
        )
    step = ((floor or {}).get("sync") or {}).get(f.get("step_floor") or "")
    if step:
        own = step["a_us"] - (step.get("local_us") or 0) + step["b_us"]
        lines.append(
            f"  estimate, per-step floor of shipping one {f['unit']} a to b: {own:.0f} µs of "
            "CPU, against a 50 ms goal"
        )
    if "busy" in f:
        lines.append(
            "  so the lag is "
            + ("not " if f["busy"] < 0.8 else "")
            + "CPU-bound here"
            + (": it is waiting (batches, round trips, timers)" if f["busy"] < 0.8 else "")
            + " (an inference from the two lines above)"
        )
    return lines


def format_step_floor(floor: Mapping[str, Any]) -> str:
    head = (
        f"per-step floor of a sync mirrored write (measured in this run, in the bench's "
        f"process; Python {floor.get('python')}, crc32c hardware: {floor.get('crc32c_hardware')})"
    )
    lines = [head, aligned(bench_floor.format_steps(floor["steps"])), FLOOR_NOTE]
    for size, s in (floor.get("sync") or {}).items():
        local = s.get("local_us")
        own = (
            f" + the unreplicated write on a ({local:.0f} µs, measured in this run)"
            if local is not None
            else " (the unreplicated write on a left out: unknown)"
        )
        c = s["ceilings"]
        r = _rates_text(c, s["unit"])
        client = "" if c["client_included"] else ", fio left out"
        lines += [
            f"{size} per {s['unit']}: node a = {' + '.join(s['a_steps'])}{own} = "
            f"{s['a_us']:.0f} µs",
            f"{size} per {s['unit']}: node b = {' + '.join(s['b_steps'])} = {s['b_us']:.0f} µs",
            f"{size} estimate, what that floor allows (x: of unrepl): this machine "
            f"{r['this_machine']} ({c['cores']} cores{client}); two hosts "
            f"{r['two_hosts_gil']} (GIL) / {r['two_hosts_all_cores']} (all cores)",
        ]
    for size, s in (floor.get("async") or {}).items():
        warm, lap = s["warm"], s["first_lap"]
        lines += [
            f"async {size} per {warm['unit']}: node a = {' + '.join(warm['a_steps'])} + the "
            f"unreplicated write = {warm['a_us']:.0f} µs; node b = {' + '.join(warm['b_steps'])} "
            f"= {warm['b_us']:.0f} µs (journals past their first lap)",
            f"async {size} first lap (each journal's pwritev into pages never cached: "
            f"+{lap['extra_per_journal_us']:.0f} µs on each node): a {lap['a_us']:.0f} µs, "
            f"b {lap['b_us']:.0f} µs (new pages cost what the kernel hands out at the time: "
            "on a VM whose host backs guest pages lazily, often many times an overwrite, and "
            "varying; not a lower bound)",
        ]
        for label, step in (("warm", warm), ("first lap", lap)):
            c, r = step["ceilings"], _rates_text(step["ceilings"], warm["unit"])
            lines.append(
                f"async {size} estimate, {label}: this machine {r['this_machine']} "
                f"({c['cores']} cores); two hosts {r['two_hosts_gil']} (GIL) / "
                f"{r['two_hosts_all_cores']} (all cores)"
            )
        if s.get("disk"):
            lines.append(f"async {size}:" + _disk_floor_line(s["disk"], floor.get("disk") or {}))
    return "\n".join(lines)


# -- machine description ---------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as e:
        return f"unavailable ({e.strerror})"
    if done.returncode != 0:  # e.g. git outside a checkout: not a version string
        return f"unknown (exit status {done.returncode})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def machine_info(fio: str = "fio") -> dict[str, Any]:
    python_plugin = _first_line(["sh", "-c", "nbdkit python --dump-plugin | grep ^python_version="])
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "mem_total": _mem_total(),
        "kernel": platform.release(),
        "loadavg": list(os.getloadavg()),
        "nbdkit_version": _first_line(["nbdkit", "--version"]),
        "nbdkit_python_plugin": python_plugin.partition("=")[2] or python_plugin,
        "python_version": platform.python_version(),
        "fio_version": _first_line([fio, "--version"]),
        "git_commit": _first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
    }


# -- the whole run ---------------------------------------------------------------------------


def default_json_path(now: dt.datetime | None = None, suite: str = "base") -> Path:
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path("bench-results") / f"{'baseline' if suite == 'base' else suite}-{stamp}.json"


def report(
    cfg: BenchConfig,
    targets: Sequence[Target],
    samples: Sequence[Sample],
    machine: dict[str, Any],
    started: dt.datetime,
    duration: float,
    replicated: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document (schema version ``SCHEMA_VERSION``).  The top level is the base
    suite (empty without it); ``replicated`` is the sync/async suites' part, or null."""
    names = [t.name for t in targets]
    rows = summarize(samples, cfg.workloads, names) if names else []
    return {
        "schema": SCHEMA_VERSION,
        "suite": cfg.suite,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(duration, 1),
        "machine": machine,
        "config": {
            "size": cfg.size,
            "rounds": cfg.rounds,
            "runtime_s": cfg.runtime,
            "ramp_time_s": cfg.ramp_time,
            "numjobs": cfg.numjobs,
            "fio_common_args": cfg.fio_args(),
            "order": "targets alternate A B / B A per round; a fresh server per measurement",
            "journal_size": cfg.journal_size,
            "lag_runtime_s": cfg.lag_runtime,
            "lag_interval_s": cfg.lag_interval,
            "tls": cfg.tls,
            "scrape_s": cfg.scrape,
        },
        "baseline": names[-1] if names else None,
        "targets": [t.describe() for t in targets],
        "workloads": [asdict(w) for w in cfg.workloads] if names else [],
        "samples": [sample_json(s) for s in samples],
        "summary": [asdict(r) for r in rows],
        "replicated": replicated,
    }


def run(
    cfg: BenchConfig,
    targets: Sequence[Target] | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Measure the suite ``cfg.suite`` and return the report (see :func:`report`).
    ``targets`` replaces the base suite's default targets."""
    parts = suite_parts(cfg.suite)
    modes = [m for m in parts if m != "base"]
    if modes:  # before the base suite spends minutes
        check_replicated_prerequisites(modes)
    if shutil.which(cfg.fio) is None:
        raise ExternalCommandFailed(f"{cfg.fio} not found (run tools/setup)")
    if shutil.which("nbdkit") is None:
        raise ExternalCommandFailed("nbdkit not found (run tools/setup)")
    if "base" not in parts:
        targets = []
    targets = list(targets) if targets is not None else default_targets()
    started = dt.datetime.now().astimezone()
    t0 = time.monotonic()
    machine = machine_info(cfg.fio)
    with work_directory(cfg.workdir) as workdir:
        samples = measure(cfg, targets, progress, workdir=workdir) if targets else []
        replicated = run_replicated(cfg, modes, workdir, progress) if modes else None
    machine["loadavg_end"] = list(os.getloadavg())
    return report(cfg, targets, samples, machine, started, time.monotonic() - t0, replicated)


def table_of(doc: dict[str, Any]) -> str:
    """The tables for a report produced by :func:`run` (or read back from its JSON)."""
    tables = []
    if doc["summary"]:
        names = [t["name"] for t in doc["targets"]]
        tables.append(format_table([Row(**r) for r in doc["summary"]], names))
    rep = doc.get("replicated")
    if rep:
        names = [t["name"] for t in rep["targets"]]
        table = format_table([Row(**r) for r in rep["summary"]], names)
        if rep.get("left_pair"):
            table += "\n" + format_left_pair(rep["left_pair"], doc["config"]["rounds"])
        tables.append(table)
        if rep["resync"] and rep["resync"]["summary"]:
            tables.append(format_copy_table(rep["resync"]["summary"]))
        if rep["lag"]:
            tables.append(format_lag_table(rep["lag"]))
        if rep.get("cpu"):
            tables.append(format_cpu_table(rep["cpu"]))
        if (rep.get("notes") or {}).get("scrape"):
            tables.append(bench_scrape.format_scrapes(rep["notes"]["scrape"]))
        tables += _objective_parts(rep)
    return "\n\n".join(t for t in tables if t)


def _objective_parts(rep: Mapping[str, Any]) -> list[str]:
    """Issue 10's targets, the floor of each one missed, and the per-step floor (reports of
    schema 3; older ones have none of them)."""
    parts = []
    if rep.get("objectives"):
        parts += [
            format_objectives(rep["objectives"]),
            format_floors(rep["objectives"], rep.get("floor")),
        ]
    if rep.get("floor"):
        parts.append(format_step_floor(rep["floor"]))
    return parts


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pairvol.bench ARGS`` is ``pairvol bench ARGS``."""
    from pairvol.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
