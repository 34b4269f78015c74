"""Prometheus metrics of a storage node (``--metrics ADDR:PORT``; docs/architecture.md, "Metrics").

Nothing is measured for the metrics' sake: a scrape reads, at that moment, what the node already
keeps, through a custom collector (:class:`NodeCollector`) over a *source*: the pairs as
``pair display`` shows them (:func:`replicator.pair.display.describe`) and the plugin's per-thread
request counters (:data:`replicator.export.IO_ROWS`, plain integer increments, no lock).  So the
I/O path pays nothing for a scrape and nothing at all while nobody scrapes.

The HTTP endpoint (:class:`MetricsServer`) is a small threaded WSGI server on its own daemon
thread: ``GET /metrics`` (any path) answers the text exposition format.  The cluster agent's
collector (:mod:`cluster.metrics`) is served the same way.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector, CollectorRegistry

from replicator import pair_state as ps
from replicator.errors import IllegalState, UsageError
from replicator.export import IO_OPS, io_totals

PAIR_STATES = tuple(str(s) for s in ps.State)


def version() -> str:
    """pairvol's version as installed (``unknown`` when run from a bare tree)."""
    try:
        return metadata.version("pairvol")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self}/metrics"


def parse_address(text: str, what: str = "--metrics") -> Address:
    """``ADDR:PORT`` (``[V6ADDR]:PORT`` for IPv6), ADDR an IP address, PORT 1..65535."""
    host, sep, port_text = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
        port = int(port_text) if (ip.version == 6) == bracketed else -1
    except ValueError:
        port = -1
    if not sep or not 0 < port < 65536:
        raise UsageError(f"{what} {text!r} is not ADDR:PORT (an IP address and a TCP port)")
    return Address(host, port)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """``collector``'s metrics over HTTP at ``address``, served by a daemon thread."""

    def __init__(self, address: Address, collector: Collector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)

        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET

        class Server(ThreadingWSGIServer):
            address_family = family

        try:
            self._httpd: WSGIServer = make_server(
                address.host,
                address.port,
                make_wsgi_app(self.registry),
                Server,
                handler_class=_Quiet,
            )
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise IllegalState(f"metrics: {address} is already in use") from e
            raise UsageError(f"metrics: cannot listen on {address}: {e.strerror}") from e
        self.address = Address(address.host, self._httpd.server_port)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)


# -- the node's collector -------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSource:
    """What a node's scrape reads: its name, its pairs (``pair display``'s ``pairs``) and the
    request counters (op -> (requests, bytes)).  Tests hand in fakes."""

    node: str
    pairs: Callable[[], Sequence[Mapping[str, Any]]]
    io: Callable[[], Mapping[str, tuple[int, int]]] = io_totals
    version: str = ""


class NodeCollector(Collector):
    def __init__(self, source: NodeSource) -> None:
        self.source = source
        self.version = source.version or version()

    def collect(self) -> Iterator[Any]:
        src = self.source
        info = InfoMetricFamily("pairvol_node", "this storage node")
        info.add_metric([], {"node": src.node, "version": self.version})
        yield info
        yield from _io_families(src.io())
        yield from _pair_families(src.pairs())


def _io_families(io: Mapping[str, tuple[int, int]]) -> Iterator[Any]:
    reqs = CounterMetricFamily(
        "pairvol_io_requests", "NBD requests received (failed ones too)", labels=["op"]
    )
    nbytes = CounterMetricFamily(
        "pairvol_io_bytes", "bytes NBD requests asked for (read, written, trimmed, zeroed)",
        labels=["op"],
    )  # fmt: skip
    for op in IO_OPS:
        n, b = io.get(op, (0, 0))
        reqs.add_metric([op], n)
        if op != "flush":
            nbytes.add_metric([op], b)
    yield reqs
    yield nbytes


def _pair_families(pairs: Iterable[Mapping[str, Any]]) -> Iterator[Any]:
    pl = ["group", "pair"]
    state = GaugeMetricFamily(
        "pairvol_pair_state", "the side's pair state (1 for the current one)",
        labels=[*pl, "role", "state"],
    )  # fmt: skip
    oos = GaugeMetricFamily(
        "pairvol_outofsync_bytes", "bytes that differ from the peer (the diff bitmap)", labels=pl
    )
    copied = CounterMetricFamily(
        "pairvol_copy_bytes",
        "bytes the current (or last) copy of the pair sent; starts again with each copy",
        labels=pl,
    )
    epoch = GaugeMetricFamily("pairvol_epoch", "the pair's epoch", labels=pl)
    used = GaugeMetricFamily(
        "pairvol_journal_used_bytes", "bytes in use in the group's journal", labels=["group"]
    )
    capacity = GaugeMetricFamily(
        "pairvol_journal_capacity_bytes", "the size of the group's journal", labels=["group"]
    )
    lag = GaugeMetricFamily(
        "pairvol_journal_lag_entries",
        "journal entries the secondary has not applied yet",
        labels=["group"],
    )
    lag_s = GaugeMetricFamily(
        "pairvol_journal_lag_seconds",
        "age of the oldest journal entry the secondary has not applied (primary side)",
        labels=["group"],
    )
    groups: set[str] = set()
    for p in pairs:
        labels = [str(p["group"]), str(p["pair"])]
        current = str(p["state"])
        for s in PAIR_STATES:
            state.add_metric([*labels, str(p["role"]), s], 1.0 if s == current else 0.0)
        oos.add_metric(labels, float(p.get("dirty_bytes") or 0))
        copied.add_metric(labels, float(p.get("copy_bytes_sent") or 0))
        epoch.add_metric(labels, float(p.get("epoch") or 0))
        j = p.get("journal")
        if not isinstance(j, Mapping) or str(j.get("group", p["group"])) in groups:
            continue
        g = str(j.get("group", p["group"]))
        groups.add(g)
        used.add_metric([g], float(j.get("journal_used") or 0))
        capacity.add_metric([g], float(j.get("journal_bytes") or 0))
        if "lag_entries" in j:  # the primary's view
            lag.add_metric([g], float(j["lag_entries"] or 0))
            lag_s.add_metric([g], float(j.get("lag_seconds") or 0))
        elif j.get("primary_newest_seq") is not None:  # the secondary's
            behind = int(j["primary_newest_seq"] or 0) - int(j.get("applied_seq") or 0)
            lag.add_metric([g], float(max(0, behind)))
    yield from (state, oos, copied, epoch, used, capacity, lag, lag_s)


def serve_node(
    address: Address, node: str, pairs: Callable[[], Sequence[Mapping[str, Any]]]
) -> MetricsServer:
    """Start the node's endpoint (the plugin's ``metrics=ADDR:PORT``)."""
    return MetricsServer(address, NodeCollector(NodeSource(node, pairs)))


@contextlib.contextmanager
def serving(address: Address, collector: Collector) -> Iterator[MetricsServer]:
    """A :class:`MetricsServer` for the time of a ``with`` block (tests)."""
    server = MetricsServer(address, collector)
    try:
        yield server
    finally:
        server.stop()
