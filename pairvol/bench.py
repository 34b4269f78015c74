"""Benchmark harness: fio's ``nbd`` engine against NBD servers ("targets"), side by side.

Theory of operation.  A *target* is something that serves one export of ``size`` bytes of
pre-filled data over NBD: today the pairvol plugin and, as the baseline, nbdkit's stock C
``file`` plugin.  A *workload* is one fio job (4k random read/write, 1M sequential read/write).
Each round runs every workload against every target, a freshly started server per measurement,
and reverses the target order on every other round (A B, B A, ...) so that neither side always
runs first; noise from other processes then spreads evenly over both.  The summary is the
median over rounds per (workload, target), and the ratio of each target's median to the
baseline's.

The pure parts (parsing fio's JSON, medians and ratios, the table) are separate functions so
that they can be tested without running anything.  More targets (a replicated pair in sync or
async mode between two lab hosts) are more :class:`Target` subclasses: anything that can
``prepare`` its data and ``serve`` an NBD URI.

Run it as ``tools/bench`` or ``pairvol bench``; ``--help`` lists the options.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from replicator import server
from replicator.errors import ExternalCommandFailed, Timeout, UsageError
from replicator.volume import Volume

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
FILL_CHUNK = 1 << 20
FILL_SEED = 20240601


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
    )


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
    """A running server: its NBD URI, and how busy it has been (None when unknown)."""

    uri: str
    cpu_seconds: Callable[[], float | None] = lambda: None


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a live process, from /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Target(ABC):
    """Something that serves ``size`` bytes of pre-filled data as an NBD export."""

    name: str

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

    def fio_args(self) -> list[str]:
        args = ["--ioengine=nbd", f"--numjobs={self.numjobs}", "--time_based"]
        args.append(f"--runtime={self.runtime:g}")
        if self.ramp_time > 0:
            args.append(f"--ramp_time={self.ramp_time:g}")
        return args


QUICK = {"size": 64 << 20, "rounds": 1, "runtime": 1.0, "ramp_time": 0.0}


@dataclass(frozen=True, slots=True)
class Sample:
    round: int
    workload: str
    target: str
    result: Measurement
    server_cores: float | None = None  # server CPU seconds per second of the fio run


def run_fio(cfg: BenchConfig, workload: Workload, uri: str, out: Path) -> Measurement:
    argv = [
        cfg.fio,
        f"--name={workload.name}",
        *cfg.fio_args(),
        *workload.fio_args(),
        f"--uri={uri}",
        "--output-format=json",
        f"--output={out}",
    ]
    limit = cfg.runtime + cfg.ramp_time + 120
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired as e:
        raise Timeout(f"fio ran for more than {limit:.0f}s: {' '.join(argv)}") from e
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ExternalCommandFailed(f"fio exited with {done.returncode}: {' | '.join(tail)}")
    return parse_fio_json(out.read_text(), workload.direction)


def order_for_round(targets: Sequence[Target], rnd: int) -> list[Target]:
    """A B on even rounds, B A on odd ones."""
    return list(targets) if rnd % 2 == 0 else list(reversed(targets))


def measure(
    cfg: BenchConfig,
    targets: Sequence[Target],
    progress: Callable[[str], None] = lambda _msg: None,
) -> list[Sample]:
    """Prepare every target, then run all rounds.  The work directory is removed afterwards
    unless the caller named it."""
    with contextlib.ExitStack() as stack:
        if cfg.workdir is None:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="pairvol-bench-"))
            )
        else:
            workdir = cfg.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        for t in targets:
            progress(f"preparing {t.name} ({cfg.size >> 20} MiB)")
            t.prepare(workdir, cfg.size)
        samples = []
        for rnd in range(cfg.rounds):
            for w in cfg.workloads:
                for t in order_for_round(targets, rnd):
                    with t.serve() as ep:
                        cpu0, t0 = ep.cpu_seconds(), time.monotonic()
                        m = run_fio(cfg, w, ep.uri, workdir / f"fio-{t.name}.json")
                        cpu1, t1 = ep.cpu_seconds(), time.monotonic()
                    cores = None
                    if cpu0 is not None and cpu1 is not None:
                        cores = round((cpu1 - cpu0) / (t1 - t0), 3)
                    samples.append(Sample(rnd, w.name, t.name, m, cores))
                    progress(
                        f"round {rnd + 1}/{cfg.rounds} {w.name:<13} {t.name:<10} "
                        f"{m.iops:>10.0f} IOPS {m.mib_s:>8.1f} MiB/s"
                        + (f"  server {cores:.2f} cores" if cores is not None else "")
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


def summarize(
    samples: Sequence[Sample], workloads: Sequence[Workload], targets: Sequence[str]
) -> list[Row]:
    """Medians per (workload, target); ratios of each target to the last one (the baseline)."""
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
        rows.append(Row(w.name, w.metric, w.goal, iops, mib_s, ratio, round_ratios))
    return rows


def format_table(rows: Sequence[Row], targets: Sequence[str]) -> str:
    """Workload, then IOPS and MiB/s per target, then each ratio to the baseline and its goal."""
    baseline = targets[-1]
    header = ["workload"]
    for t in targets:
        header += [f"{t} IOPS", f"{t} MiB/s"]
    header += [f"{t}/{baseline}" for t in targets[:-1]]
    header.append("goal")
    lines = [header]
    for r in rows:
        cells = [r.workload]
        for t in targets:
            cells += [f"{r.iops[t]:.0f}", f"{r.mib_s[t]:.1f}"]
        for t in targets[:-1]:
            mark = "ok" if r.ratio[t] >= r.goal else "below"
            cells.append(f"{r.ratio[t]:.2f} ({mark})")
        cells.append(f">= {r.goal:.1f}")
        lines.append(cells)
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


def default_json_path(now: dt.datetime | None = None) -> Path:
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path("bench-results") / f"baseline-{stamp}.json"


def report(
    cfg: BenchConfig,
    targets: Sequence[Target],
    samples: Sequence[Sample],
    machine: dict[str, Any],
    started: dt.datetime,
    duration: float,
) -> dict[str, Any]:
    """The JSON document (schema version ``SCHEMA_VERSION``)."""
    names = [t.name for t in targets]
    rows = summarize(samples, cfg.workloads, names)
    return {
        "schema": SCHEMA_VERSION,
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
        },
        "baseline": names[-1],
        "targets": [t.describe() for t in targets],
        "workloads": [asdict(w) for w in cfg.workloads],
        "samples": [
            {
                "round": s.round,
                "workload": s.workload,
                "target": s.target,
                "server_cores": s.server_cores,
                **asdict(s.result),
            }
            for s in samples
        ],
        "summary": [asdict(r) for r in rows],
    }


def run(
    cfg: BenchConfig,
    targets: Sequence[Target] | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Measure and return the report (see :func:`report`)."""
    if shutil.which(cfg.fio) is None:
        raise ExternalCommandFailed(f"{cfg.fio} not found (run tools/setup)")
    if shutil.which("nbdkit") is None:
        raise ExternalCommandFailed("nbdkit not found (run tools/setup)")
    targets = list(targets) if targets is not None else default_targets()
    started = dt.datetime.now().astimezone()
    t0 = time.monotonic()
    machine = machine_info(cfg.fio)
    samples = measure(cfg, targets, progress)
    machine["loadavg_end"] = list(os.getloadavg())
    return report(cfg, targets, samples, machine, started, time.monotonic() - t0)


def table_of(doc: dict[str, Any]) -> str:
    """The table for a report produced by :func:`run` (or read back from its JSON)."""
    names = [t["name"] for t in doc["targets"]]
    rows = [Row(**r) for r in doc["summary"]]
    return format_table(rows, names)


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
