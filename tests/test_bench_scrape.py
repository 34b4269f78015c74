"""``tools/bench --scrape SECONDS``: the option's checks, the scraper against a local HTTP
server, stopping scrapers, and the summary of their reports (no timing assertions)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pairvol import bench, bench_scrape
from pairvol.cli import build_parser, main
from pairvol.cli.bench import config_from_args
from replicator.errors import UsageError

# -- the option ------------------------------------------------------------------------------


def parse(*argv: str) -> bench.BenchConfig:
    return config_from_args(build_parser().parse_args(["bench", *argv]))


def test_scrape_takes_positive_seconds_for_the_suites_with_a_lab() -> None:
    assert parse("--suite", "sync").scrape is None
    assert parse("--suite", "replicated", "--scrape", "0.5").scrape == 0.5
    assert parse("--suite", "all", "--scrape", "15").scrape == 15.0
    assert bench_scrape.parse_interval("2") == 2.0


@pytest.mark.parametrize("value", ["0", "-1", "abc", "", "nan", "inf", "1s"])
def test_scrape_refuses_what_is_not_a_positive_number(value: str) -> None:
    with pytest.raises(UsageError, match=r"--scrape SECONDS: a positive number of seconds"):
        parse("--suite", "async", "--scrape", value)


@pytest.mark.parametrize(
    ("suite", "says"),
    [
        ("base", "only for the suites with a lab"),
        ("failover", "--scrape does not apply"),
        ("takeover", "--scrape does not apply"),
    ],
)
def test_scrape_is_refused_in_one_line_by_the_other_suites(
    suite: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--suite", suite, "--scrape", "1"]) != 0
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


# -- the scraper -----------------------------------------------------------------------------


class _Metrics(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[Counter[str]] = Counter()  # by path

    def do_GET(self) -> None:
        type(self).hits[self.path] += 1
        body = b"pairvol_node_info 1\n"
        self.send_response(404 if self.path == "/nope" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    """A local metrics endpoint; its base URL."""
    _Metrics.hits = Counter()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def test_an_endpoint_counts_its_scrapes_bytes_and_failures(server: str) -> None:
    ok = bench_scrape.EndpointStats(f"{server}/metrics")
    ok.scrape()
    ok.scrape()
    assert (ok.scrapes, ok.failures, ok.bytes, ok.error) == (2, 0, 40, None)
    assert 0 < ok.max_s <= ok.total_s
    missing = bench_scrape.EndpointStats(f"{server}/nope")
    missing.scrape()
    assert (missing.scrapes, missing.failures, missing.bytes) == (0, 1, 0)
    assert missing.error is not None and "404" in missing.error


def wait_for_hits(n: int, path: str = "/metrics", timeout: float = 30.0) -> None:
    """Until ``path`` was requested ``n`` times.  A scraper sends its next request to an
    endpoint only once the previous one is counted, so ``n`` hits mean ``n - 1`` counted."""
    deadline = time.monotonic() + timeout
    while _Metrics.hits[path] < n:
        assert time.monotonic() < deadline, f"only {_Metrics.hits[path]} requests of {path}"
        time.sleep(0.01)


class LocalScrapers(bench_scrape.Scrapers):
    """The scrapers without ``ip netns exec`` (this machine's network)."""

    def argv(self, netns: str, urls: Sequence[str]) -> list[str]:
        return super().argv(netns, urls)[4:]


def test_scrapers_report_on_sigterm_and_leave_no_process(server: str, tmp_path: Path) -> None:
    hosts = {
        "a": ("ns-a", [f"{server}/a"]),
        "b": ("ns-b", [f"{server}/b", f"{server}/nope"]),
    }
    scrapers = LocalScrapers(hosts, 0.05, tmp_path / "scrape.log")
    assert scrapers.argv("ns", ["U"])[:4] == [sys.executable, "-m", "pairvol.bench_scrape",
                                              str(os.getpid())]  # fmt: skip
    assert bench_scrape.Scrapers(hosts, 0.5, tmp_path).argv("ns-a", ["U"])[:4] == [
        "ip", "netns", "exec", "ns-a",
    ]  # fmt: skip
    with scrapers:
        procs = list(scrapers._procs.values())
        for path in ("/a", "/b", "/nope"):  # each endpoint counted at least once
            wait_for_hits(2, path)
    assert all(p.returncode is not None for p in procs)
    a, b = scrapers.reports["a"], scrapers.reports["b"]
    assert "error" not in a and a["interval_s"] == 0.05
    assert a["endpoints"][0]["scrapes"] >= 1 and a["endpoints"][0]["failures"] == 0
    assert b["endpoints"][1]["scrapes"] == 0 and b["endpoints"][1]["failures"] >= 1
    summary = bench_scrape.summarize_scrapes(0.05, scrapers.reports)
    assert summary["scrapes"] >= 2 and summary["note"] is None


def test_a_scraper_outlives_neither_sigterm_nor_its_parent(server: str) -> None:
    argv = [sys.executable, "-m", "pairvol.bench_scrape", str(os.getpid())]
    argv += ["0.05", f"{server}/metrics"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        wait_for_hits(3)  # at the second, the SIGTERM may cut that scrape short
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    doc = json.loads(out)
    assert doc["endpoints"][0]["scrapes"] >= 2 and doc["cpu_s"] >= 0
    # Started by a shell that exits at once: the scraper sees its parent go and stops.
    orphan = [*argv[:3], "$$", *argv[4:]]  # its parent: the shell
    sh = subprocess.run(
        ["sh", "-c", f"{' '.join(orphan)} > /dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    pid = int(sh.stdout)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and "bench_scrape" in _cmdline(pid):
        assert time.monotonic() < deadline, "the orphaned scraper kept running"
        time.sleep(0.05)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


# -- the summary -----------------------------------------------------------------------------


def endpoint(url: str, scrapes: int, failures: int = 0, **kw: Any) -> dict[str, Any]:
    e = {"url": url, "scrapes": scrapes, "failures": failures, "bytes": 1000 * scrapes}
    e |= {"total_s": 0.004 * scrapes, "max_s": 0.01 if scrapes else 0.0, "error": None}
    return e | kw


def test_summary_per_host_and_in_all() -> None:
    reports = {
        "b": {"cpu_s": 0.5, "endpoints": [endpoint("B", 10, 2, error="timed out")]},
        "a": {"cpu_s": 0.4, "endpoints": [endpoint("A1", 10), endpoint("A2", 30, max_s=0.05)]},
    }
    s = bench_scrape.summarize_scrapes(0.5, reports)
    assert list(s["hosts"]) == ["a", "b"]
    a, b = s["hosts"]["a"], s["hosts"]["b"]
    assert (a["scrapes"], a["failures"], a["bytes"], a["urls"]) == (40, 0, 40000, ["A1", "A2"])
    assert (a["mean_s"], a["max_s"], a["cpu_s"]) == (0.004, 0.05, 0.4)
    assert "errors" not in a and b["errors"] == ["B: timed out"]
    assert (s["interval_s"], s["scrapes"], s["failures"]) == (0.5, 50, 2)
    assert (s["mean_s"], s["max_s"], s["note"]) == (0.004, 0.05, None)
    text = bench_scrape.format_scrapes(s)
    assert "host a: 40 scrapes, 0 failed, mean 4.0 ms, max 50.0 ms" in text
    assert "host b: 10 scrapes, 2 failed" in text and "note" not in text


def test_summary_says_plainly_when_every_scrape_failed() -> None:
    reports = {
        "a": {"endpoints": [endpoint("A", 0, 7, error="Connection refused")]},
        "b": bench_scrape.parse_report("", 1),  # a scraper that wrote nothing
    }
    s = bench_scrape.summarize_scrapes(0.5, reports)
    assert (s["scrapes"], s["failures"], s["mean_s"], s["max_s"]) == (0, 7, None, None)
    assert s["note"].startswith("every scrape failed (7 attempts)")
    assert s["hosts"]["b"]["errors"] == ["the scraper wrote no report (exit status 1, see its log)"]
    assert "note: every scrape failed" in bench_scrape.format_scrapes(s)


def test_summary_names_a_host_never_scraped() -> None:
    reports = {"a": {"endpoints": [endpoint("A", 3)]}, "b": {"endpoints": [endpoint("B", 0, 3)]}}
    assert bench_scrape.summarize_scrapes(1, reports)["note"] == (
        "no successful scrape of host(s) b"
    )


def test_parse_report_takes_the_last_line_and_marks_an_early_exit() -> None:
    line = json.dumps({"interval_s": 1, "endpoints": [endpoint("A", 1)]})
    assert bench_scrape.parse_report(f"noise\n{line}\n", 0)["endpoints"][0]["url"] == "A"
    assert "error" in bench_scrape.parse_report("{not json", 0)
    assert "error" in bench_scrape.parse_report('{"endpoints": 3}', 0)
    early = bench_scrape.parse_report(line, 0, early=True)
    assert early["error"] == "the scraper exited before the suite ended (status 0)"


def test_the_table_shows_the_scrapes() -> None:
    scrape = bench_scrape.summarize_scrapes(0.5, {"a": {"endpoints": [endpoint("A", 0, 2)]}})
    doc: dict[str, Any] = {"summary": [], "targets": [], "config": {"rounds": 1}}
    doc["replicated"] = {
        "targets": [{"name": "sync"}, {"name": "unrepl"}],
        "summary": [],
        "resync": None,
        "lag": None,
        "notes": {"scrape": scrape},
    }
    text = bench.table_of(doc)
    assert "scrape every 0.5 s, host a: 0 scrapes, 2 failed" in text
    assert "note: every scrape failed" in text
