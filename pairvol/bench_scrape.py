"""Scrapers for the replicated bench suites (``tools/bench --scrape SECONDS``): does collecting
metrics slow the I/O path?

Theory of operation.  While a suite measures, one scraper process per lab host runs inside
that host's network namespace (``ip netns exec NS python -m pairvol.bench_scrape ...``) and
GETs the host's metrics endpoints (its node's, and its agent's in a cluster lab) every
``interval`` seconds, as Prometheus would, only much more often.  A failed scrape is counted,
never fatal.  On SIGTERM (or once the bench that started it is gone) the scraper prints one
JSON line of its counts on stdout and exits: scrapes, failures, bytes, total and longest scrape
time per endpoint, and its own CPU seconds.  :class:`Scrapers` starts them after the lab is up
and always stops them (SIGTERM, a bounded wait, SIGKILL); :func:`summarize_scrapes`, pure,
turns their lines into the report's ``notes.scrape``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from replicator.errors import UsageError

#: A scrape taking longer than this is a failure (Prometheus's default scrape_timeout is 10 s).
SCRAPE_TIMEOUT = 5.0
STOP_TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parent.parent


def parse_interval(text: str) -> float:
    """``--scrape SECONDS``: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--scrape SECONDS: a positive number of seconds, not {text!r}")
    return value


# -- the scraper (runs in a host's namespace) ------------------------------------------------


@dataclass(slots=True)
class EndpointStats:
    """One endpoint's counts, as the scraper reports them."""

    url: str
    scrapes: int = 0  # successful
    failures: int = 0
    bytes: int = 0
    total_s: float = 0.0  # over the successful scrapes
    max_s: float = 0.0
    error: str | None = None  # the last failure's reason

    def scrape(self, timeout: float = SCRAPE_TIMEOUT) -> None:
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(self.url, timeout=timeout) as r:
                n = len(r.read())
        except OSError as e:  # URLError, HTTPError, timeouts, refused connections
            self.failures += 1
            self.error = str(e)
            return
        took = time.monotonic() - t0
        self.scrapes += 1
        self.bytes += n
        self.total_s += took
        self.max_s = max(self.max_s, took)


class _Stopped(Exception):
    """SIGTERM: report and exit."""


def _stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stopped


def scrape_main(argv: Sequence[str]) -> int:
    """``python -m pairvol.bench_scrape PARENT INTERVAL URL...``: scrape every URL each
    INTERVAL seconds until SIGTERM or until process PARENT is no longer this one's parent
    (the bench is gone); then one JSON line."""
    if len(argv) < 3 or not argv[0].isdigit():
        print("usage: python -m pairvol.bench_scrape PARENT INTERVAL URL...", file=sys.stderr)
        return 2
    parent, interval = int(argv[0]), parse_interval(argv[1])
    stats = [EndpointStats(u) for u in argv[2:]]
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the bench stops it, report and all
    try:
        tick = time.monotonic()
        while os.getppid() == parent:  # the bench was killed: do not outlive it
            for s in stats:
                s.scrape()
            tick = max(tick + interval, time.monotonic())  # a slow scrape skips ticks
            time.sleep(max(0.0, tick - time.monotonic()))
    except _Stopped:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    doc = {
        "interval_s": interval,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "endpoints": [asdict(s) for s in stats],
    }
    print(json.dumps(doc), flush=True)
    return 0


# -- the bench's side ------------------------------------------------------------------------


@dataclass
class Scrapers:
    """One scraper per host: ``hosts`` maps a host to its namespace and metrics URLs.  A
    context manager: started on enter, stopped on exit (also on errors), then
    :attr:`reports` holds each host's JSON line (or what went wrong)."""

    hosts: Mapping[str, tuple[str, Sequence[str]]]
    interval: float
    log: Path
    reports: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)
    _procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict, init=False, repr=False)

    def argv(self, netns: str, urls: Sequence[str]) -> list[str]:
        me = [sys.executable, "-m", "pairvol.bench_scrape", str(os.getpid())]
        me += [f"{self.interval:g}", *urls]
        return ["ip", "netns", "exec", netns, *me]

    def __enter__(self) -> Scrapers:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        try:
            with open(self.log, "a") as log:
                for host, (netns, urls) in self.hosts.items():
                    self._procs[host] = subprocess.Popen(
                        self.argv(netns, urls),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=log,
                        text=True,
                        env=env,
                    )
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM each scraper, wait a bounded time, SIGKILL what is left; read its line."""
        procs, self._procs = self._procs, {}
        early = {host for host, proc in procs.items() if proc.poll() is not None}
        for host, proc in procs.items():
            if host not in early:
                proc.terminate()
        for host, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            self.reports[host] = parse_report(out, proc.returncode, early=host in early)


def parse_report(out: str, returncode: int | None, *, early: bool = False) -> dict[str, Any]:
    """A scraper's JSON line, or ``{"error": ...}`` when it wrote none (or quit by itself)."""
    lines = out.strip().splitlines()
    try:
        doc = json.loads(lines[-1]) if lines else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("endpoints"), list):
        return {"error": f"the scraper wrote no report (exit status {returncode}, see its log)"}
    if early:
        doc["error"] = f"the scraper exited before the suite ended (status {returncode})"
    return doc


def summarize_scrapes(interval: float, reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The report's ``notes.scrape``: the interval, per host the scrapes, failures, bytes,
    mean and max scrape seconds (all its endpoints together), the totals, and ``note``: a
    plain sentence when every scrape failed or a scraper reported nothing."""
    hosts: dict[str, dict[str, Any]] = {}
    for host, rep in sorted(reports.items()):
        eps = rep.get("endpoints") or []
        ok = sum(int(e["scrapes"]) for e in eps)
        total = sum(float(e["total_s"]) for e in eps)
        h: dict[str, Any] = {
            "urls": [e["url"] for e in eps],
            "scrapes": ok,
            "failures": sum(int(e["failures"]) for e in eps),
            "bytes": sum(int(e["bytes"]) for e in eps),
            "mean_s": round(total / ok, 6) if ok else None,
            "max_s": round(max((float(e["max_s"]) for e in eps), default=0.0), 6) if ok else None,
            "cpu_s": rep.get("cpu_s"),
        }
        errors = [str(rep["error"])] if rep.get("error") else []
        errors += [f"{e['url']}: {e['error']}" for e in eps if e.get("error")]
        if errors:
            h["errors"] = errors
        hosts[host] = h
    ok = sum(h["scrapes"] for h in hosts.values())
    failed = sum(h["failures"] for h in hosts.values())
    total_s = sum(h["mean_s"] * h["scrapes"] for h in hosts.values() if h["scrapes"])
    out: dict[str, Any] = {
        "interval_s": interval,
        "hosts": hosts,
        "scrapes": ok,
        "failures": failed,
        "mean_s": round(total_s / ok, 6) if ok else None,
        "max_s": max((h["max_s"] for h in hosts.values() if h["scrapes"]), default=None),
        "note": None,
    }
    silent = [host for host, h in hosts.items() if h["scrapes"] == 0]
    if ok == 0:
        out["note"] = (
            f"every scrape failed ({failed} attempts): the metrics were not collected, so this "
            "run measured nothing about their cost"
        )
    elif silent:
        out["note"] = f"no successful scrape of host(s) {', '.join(silent)}"
    return out


def format_scrapes(summary: Mapping[str, Any]) -> str:
    """One line per host for the bench's table, and the note if there is one."""
    lines = []
    for host, h in summary["hosts"].items():
        timing = (
            f", mean {h['mean_s'] * 1000:.1f} ms, max {h['max_s'] * 1000:.1f} ms"
            if h["scrapes"]
            else ""
        )
        lines.append(
            f"scrape every {summary['interval_s']:g} s, host {host}: {h['scrapes']} scrapes, "
            f"{h['failures']} failed{timing}"
        )
    if summary.get("note"):
        lines.append(f"note: {summary['note']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(scrape_main(sys.argv[1:]))
