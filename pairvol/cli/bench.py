"""``pairvol bench``: fio against the pairvol and nbdkit file plugins, and replicated pairs
against an unpaired volume in a lab (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from pairvol import bench
from pairvol.cli.common import print_json
from replicator.errors import UsageError
from replicator.sizes import format_size, parse_size


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the pairvol plugin against nbdkit's file plugin with fio",
        description="Run fio (nbd engine) against the pairvol plugin and nbdkit's stock file "
        "plugin (suite base), or against sync/async pairs and an unpaired volume of the same "
        "node in a two-host lab (suites sync, async; needs root), alternating, and print "
        "medians and ratios.",
    )
    p.add_argument(
        "--suite",
        choices=list(bench.SUITES),
        default="base",
        help="base: pairvol vs the file plugin (default); sync, async: pairs vs an unpaired "
        "volume, with resync vs nbdcopy (sync) and journal lag (async); replicated: sync and "
        "async; all: everything",
    )
    d = bench.BenchConfig()
    # Defaults are None so that --quick can tell an explicit option from a default.
    p.add_argument("--rounds", type=int, help=f"rounds (default {d.rounds})")
    p.add_argument("--runtime", type=float, help=f"seconds per fio job (default {d.runtime:g})")
    p.add_argument("--ramp-time", type=float, help=f"fio warm-up seconds (default {d.ramp_time:g})")
    p.add_argument("--size", help=f"data size of each image (default {format_size(d.size)})")
    p.add_argument(
        "--workloads",
        default=",".join(w.name for w in d.workloads),
        help="comma-separated subset of: %(default)s",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 64M, 1 round, 1 s per job, no warm-up (explicit options win)",
    )
    p.add_argument(
        "--journal-size", help=f"async suite: the journal (default {format_size(d.journal_size)})"
    )
    p.add_argument(
        "--lag-runtime",
        type=float,
        help=f"async suite: seconds per lag measurement (default {d.lag_runtime:g}, quick 3)",
    )
    p.add_argument("--dir", type=Path, help="work directory for images (default: a temp dir)")
    p.add_argument(
        "--json-out", type=Path, help="default: bench-results/baseline-TIME.json (SUITE-TIME)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=cmd_bench)


def config_from_args(args: argparse.Namespace) -> bench.BenchConfig:
    base = dataclasses.asdict(bench.BenchConfig())
    if args.quick:
        base.update(bench.QUICK)
    size = parse_size(args.size) if args.size is not None else base["size"]
    rounds = args.rounds if args.rounds is not None else base["rounds"]
    runtime = args.runtime if args.runtime is not None else base["runtime"]
    ramp_time = args.ramp_time if args.ramp_time is not None else base["ramp_time"]
    lag_runtime = args.lag_runtime if args.lag_runtime is not None else base["lag_runtime"]
    journal = parse_size(args.journal_size) if args.journal_size else base["journal_size"]
    if rounds < 1:
        raise UsageError("--rounds must be at least 1")
    if runtime <= 0 or ramp_time < 0:
        raise UsageError("--runtime must be positive and --ramp-time not negative")
    if lag_runtime <= 0:
        raise UsageError("--lag-runtime must be positive")
    if journal < 1 << 20:
        raise UsageError("--journal-size must be at least 1M")
    workloads = bench.workloads_named([n for n in args.workloads.split(",") if n])
    if not workloads:
        raise UsageError("no workloads selected")
    modes = [m for m in bench.suite_parts(args.suite) if m != "base"]
    if modes and not bench.replicated_workloads(workloads):
        names = ", ".join(bench.REPLICATED_WORKLOADS)
        raise UsageError(f"--suite {args.suite} runs only {names}: none selected")
    return bench.BenchConfig(
        size=size,
        rounds=rounds,
        runtime=runtime,
        ramp_time=ramp_time,
        workloads=workloads,
        workdir=args.dir,
        suite=args.suite,
        journal_size=journal,
        lag_runtime=lag_runtime,
    )


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the lab's teardown runs


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = args.json_out or bench.default_json_path(suite=cfg.suite)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)

    def progress(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    doc = bench.run(cfg, progress=progress)
    bench.write_json(doc, out)
    if args.json:
        print_json(doc)
    else:
        print(bench.table_of(doc))
        print(
            f"\n{cfg.rounds} round(s) x {cfg.runtime:g} s per job, medians; "
            f"took {doc['duration_s']:.0f} s; JSON: {out}"
        )
    return 0
