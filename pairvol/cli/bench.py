"""``pairvol bench``: fio against the pairvol and nbdkit file plugins, replicated pairs
against an unpaired volume in a lab, failover times in a cluster lab, and a takeover while the
copy is incomplete (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from pairvol import bench, bench_failover, bench_plot, bench_scrape, bench_takeover
from pairvol.cli.common import print_json
from replicator.errors import PairvolError, UsageError
from replicator.sizes import format_size, parse_size


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the pairvol plugin against nbdkit's file plugin with fio",
        description="Run fio (nbd engine) against the pairvol plugin and nbdkit's stock file "
        "plugin (suite base), or against sync/async pairs and an unpaired volume of the same "
        "node in a two-host lab (suites sync, async; needs root), alternating, and print "
        "medians and ratios; or time failovers of a cluster resource after SIGKILL of its "
        "active host, and planned switchovers (suite failover; needs root); or take over async "
        "secondaries with a backlog: time to ready, fetched against local reads, the pull "
        "against nbdcopy (suite takeover; needs root).  --plot DIR writes PNG charts of the "
        "report; --plot DIR --from REPORT charts saved reports without running anything.",
    )
    p.add_argument(
        "--suite",
        choices=[*bench.SUITES, bench_failover.SUITE, bench_takeover.SUITE],
        default="base",
        help="base: pairvol vs the file plugin (default); sync, async: pairs vs an unpaired "
        "volume, with resync vs nbdcopy (sync) and journal lag (async); replicated: sync and "
        "async; all: everything but failover and takeover; failover: SIGKILL of the active "
        "host to the first write on the new one, sync and async resources; takeover: an async "
        "secondary taken over with a backlog, time to ready, fetched vs local reads, the pull "
        "vs nbdcopy",
    )
    d = bench.BenchConfig()
    # Defaults are None so that --quick can tell an explicit option from a default.
    t = bench_takeover.TakeoverConfig()
    p.add_argument(
        "--rounds", type=int, help=f"rounds (default {d.rounds}; takeover {t.rounds}, quick 1)"
    )
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
        help="smoke test: 64M, 1 round, 1 s per job, no warm-up; failover: 16M, 3 kills, "
        "1 switchover; takeover: sizes 8M,16M,32M, 1 round, 50 reads (explicit options win)",
    )
    p.add_argument(
        "--journal-size", help=f"async suite: the journal (default {format_size(d.journal_size)})"
    )
    p.add_argument(
        "--lag-runtime",
        type=float,
        help=f"async suite: seconds per lag measurement (default {d.lag_runtime:g}, quick 3)",
    )
    f = bench_failover.FailoverConfig()
    q = bench_failover.QUICK
    p.add_argument(
        "--kills",
        type=int,
        help=f"failover suite: SIGKILLs per mode (default {f.kills}, quick {q['kills']})",
    )
    p.add_argument(
        "--switchovers",
        type=int,
        help=f"failover suite: planned switchovers per mode (default {f.switchovers}, "
        f"quick {q['switchovers']}; 0: none)",
    )
    p.add_argument(
        "--modes", help=f"failover suite: resources to measure (default {','.join(f.modes)})"
    )
    tq = bench_takeover.QUICK
    p.add_argument(
        "--sizes",
        help="takeover suite: backlog sizes (default "
        f"{','.join(format_size(s) for s in t.sizes)}, quick "
        f"{','.join(format_size(s) for s in tq['sizes'])})",
    )
    p.add_argument(
        "--reads",
        type=int,
        help=f"takeover suite: reads of each kind for the latencies (default {t.reads}, "
        f"quick {tq['reads']})",
    )
    p.add_argument("--dir", type=Path, help="work directory for images (default: a temp dir)")
    p.add_argument(
        "--json-out", type=Path, help="default: bench-results/baseline-TIME.json (SUITE-TIME)"
    )
    p.add_argument(
        "--tls", action="store_true", help="sync/async suites: TLS on the lab's peer links"
    )
    p.add_argument(
        "--scrape",
        metavar="SECONDS",
        help="sync/async suites: while they measure, poll each lab host's metrics endpoints "
        "every SECONDS from inside its namespace (the report's replicated.notes.scrape)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="after the run, write PNG charts of its report into DIR (matplotlib): ratios per "
        "workload with every round, the async lag trace, failover and takeover times",
    )
    p.add_argument(
        "--from",
        dest="from_reports",
        type=Path,
        nargs="+",
        metavar="REPORT",
        help="with --plot: chart these saved JSON reports (any suites) instead of running",
    )
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
    scrape = None
    if args.scrape is not None:
        if not modes:
            raise UsageError(f"--scrape: only for the suites with a lab (sync, async, "
                             f"replicated, all), not --suite {args.suite}")  # fmt: skip
        scrape = bench_scrape.parse_interval(args.scrape)
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
        tls=args.tls,
        scrape=scrape,
    )


_FIO_ONLY = ("rounds", "runtime", "ramp_time", "lag_runtime", "scrape")
_FAILOVER_ONLY = ("kills", "switchovers", "modes")
_TAKEOVER_ONLY = ("sizes", "reads")
#: What the takeover suite refuses: the fio suites' own options but --rounds, --size and
#: --journal-size (it sizes every pair for its backlog: --sizes), and the failover suite's.
_NOT_TAKEOVER = ("runtime", "ramp_time", "lag_runtime", "size", "journal_size", "scrape",
                 *_FAILOVER_ONLY)  # fmt: skip


def _given(args: argparse.Namespace, names: Sequence[str]) -> str:
    """The options of ``names`` given on the command line, as typed ("" if none)."""
    return ", ".join("--" + n.replace("_", "-") for n in names if getattr(args, n) is not None)


def _given_with_workloads(args: argparse.Namespace, names: Sequence[str]) -> str:
    """:func:`_given`, and ``--workloads`` when it is not the default (a suite without fio
    jobs refuses it)."""
    opts = _given(args, names)
    if args.workloads != ",".join(w.name for w in bench.WORKLOADS):
        opts = ", ".join(o for o in (opts, "--workloads") if o)
    return opts


def takeover_config_from_args(args: argparse.Namespace) -> bench_takeover.TakeoverConfig:
    """The takeover suite's options; those of the other suites are refused, not ignored."""
    opts = _given_with_workloads(args, _NOT_TAKEOVER)
    if getattr(args, "tls", False):  # the sync/async suites' peer links
        opts = ", ".join(o for o in (opts, "--tls") if o)
    if opts:
        raise UsageError(f"--suite takeover runs no fio jobs and sizes its pairs: {opts} "
                         "does not apply (--sizes sets the backlogs)")  # fmt: skip
    base = dataclasses.asdict(bench_takeover.TakeoverConfig())
    if args.quick:
        base.update(bench_takeover.QUICK)
    if args.sizes is not None:
        base["sizes"] = bench_takeover.parse_sizes(args.sizes)
    for name in ("rounds", "reads"):
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    base["workdir"] = args.dir
    return bench_takeover.TakeoverConfig(**base)


def failover_config_from_args(args: argparse.Namespace) -> bench_failover.FailoverConfig:
    """The failover suite's options; the fio suites' own options are refused, not ignored."""
    opts = _given_with_workloads(args, _FIO_ONLY)
    if opts:
        raise UsageError(f"--suite failover runs no fio jobs: {opts} does not apply")
    base = dataclasses.asdict(bench_failover.FailoverConfig())
    if args.quick:
        base.update(bench_failover.QUICK)
    return bench_failover.FailoverConfig(
        modes=bench_failover.parse_modes(args.modes) if args.modes is not None else base["modes"],
        kills=args.kills if args.kills is not None else base["kills"],
        switchovers=args.switchovers if args.switchovers is not None else base["switchovers"],
        size=parse_size(args.size) if args.size is not None else base["size"],
        journal_size=parse_size(args.journal_size) if args.journal_size else base["journal_size"],
        workdir=args.dir,
    )


def _run_suite(
    args: argparse.Namespace,
    suite: str,
    run: Callable[[Callable[[str], None]], dict[str, Any]],
    table_of: Callable[[dict[str, Any]], str],
    footer: str,
) -> dict[str, Any]:
    """Run a suite (``run(progress)``), write its JSON report and print it (as JSON, or as
    its table and then ``footer``, "took ..." and the report's path); the report."""
    out = args.json_out or bench.default_json_path(suite=suite)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)

    def progress(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    doc = run(progress)
    bench.write_json(doc, out)
    if args.json:
        print_json(doc)
    else:
        print(table_of(doc))
        print(f"\n{footer}; took {doc['duration_s']:.0f} s; JSON: {out}")
    if args.plot is not None:
        try:
            plotted = bench_plot.plot([(str(out), doc)], args.plot)
        except PairvolError:
            print(f"bench: the report is kept: --plot DIR --from {out} tries again",
                  file=sys.stderr)  # fmt: skip
            raise
        _print_plotted(plotted, sys.stderr if args.json else sys.stdout)
    return doc


def _print_plotted(plotted: bench_plot.Plotted, out: TextIO) -> None:
    for note in plotted.notes:
        print(f"note: {note}", file=out)
    print(f"charts: {', '.join(str(p) for p in plotted.written)}", file=out)


#: Every option that says how to run a suite: --from runs none, so it refuses them.
_RUN_OPTIONS = ("rounds", "runtime", "ramp_time", "size", "journal_size", "lag_runtime",
                "scrape", *_FAILOVER_ONLY, *_TAKEOVER_ONLY, "dir", "json_out")  # fmt: skip


def cmd_plot(args: argparse.Namespace) -> int:
    """``--plot DIR --from REPORT...``: the charts of saved reports, nothing run."""
    if args.plot is None:
        raise UsageError("--from needs --plot DIR (where the charts go)")
    opts = _given_with_workloads(args, _RUN_OPTIONS)
    extra = [f"--{n}" for n in ("quick", "tls") if getattr(args, n)]
    if args.suite != "base":
        extra.append("--suite")
    opts = ", ".join(o for o in (opts, *extra) if o)
    if opts:
        raise UsageError(f"--from runs no suite: {opts} does not apply")
    bench_plot.check_output(args.plot)
    reports = [(str(p), bench_plot.load_report(p)) for p in args.from_reports]
    plotted = bench_plot.plot(reports, args.plot)
    if args.json:
        print_json({"charts": [str(p) for p in plotted.written], "notes": plotted.notes})
    else:
        _print_plotted(plotted, sys.stdout)
    return 0


def cmd_failover(args: argparse.Namespace) -> int:
    cfg = failover_config_from_args(args)
    doc = _run_suite(
        args,
        bench_failover.SUITE,
        lambda progress: bench_failover.run(cfg, progress=progress),
        bench_failover.table_of,
        f"{cfg.kills} kill(s) per mode",
    )
    for mode, error in doc["errors"].items():
        print(f"pairvol: error: failover suite, {mode}: {error}", file=sys.stderr)
    return 1 if doc["errors"] else 0


def cmd_takeover(args: argparse.Namespace) -> int:
    cfg = takeover_config_from_args(args)
    doc = _run_suite(
        args,
        bench_takeover.SUITE,
        lambda progress: bench_takeover.run(cfg, progress=progress),
        bench_takeover.table_of,
        f"{cfg.rounds} round(s), medians",
    )
    for error in doc["errors"]:
        print(f"pairvol: error: takeover suite: {error}", file=sys.stderr)
    return 1 if doc["errors"] else 0


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the lab's teardown runs


def cmd_bench(args: argparse.Namespace) -> int:
    if args.from_reports is not None:
        return cmd_plot(args)
    if args.plot is not None:
        bench_plot.check_output(args.plot)  # before minutes of measuring, not after
    if args.suite == bench_takeover.SUITE:
        return cmd_takeover(args)
    opts = _given(args, _TAKEOVER_ONLY)
    if opts:
        raise UsageError(f"{opts}: only for --suite takeover")
    if args.suite == bench_failover.SUITE:
        return cmd_failover(args)
    opts = _given(args, _FAILOVER_ONLY)
    if opts:
        raise UsageError(f"{opts}: only for --suite failover")
    cfg = config_from_args(args)
    _run_suite(
        args,
        cfg.suite,
        lambda progress: bench.run(cfg, progress=progress),
        bench.table_of,
        f"{cfg.rounds} round(s) x {cfg.runtime:g} s per job, medians",
    )
    return 0
