"""``pairvol events``: the event logs of every node and agent, merged in time order.

pairvol events [--lab NAME] [--since T] [--follow] [--json]

Every daemon writes a structured event log, one JSON object per line with ``ts`` (Unix
seconds) and ``event`` (:mod:`replicator.events`): a node in ``NODEDIR/events.jsonl``, an
agent in ``STATEDIR/events.jsonl``.  This command reads them all and prints one line per
event, oldest first; it is what an operator tails during an incident.

Which logs (the *sources*):

- ``--lab NAME`` (default ``$PAIRVOL_LAB``, which ``lab exec`` sets): each host's node
  (``LABROOT/NAME/HOST``) and, in a cluster lab, its agent (``LABROOT/NAME/HOST/agent``),
  named after the host;
- otherwise the whole machine: every lab's hosts (named ``LAB/HOST``), the nodes of the
  systemd units (``/var/lib/pairvol/nodes/NAME``), the node table's local directories,
  ``$PAIRVOL_NODE_DIR``, the agents under ``/var/lib/pairvol/agent`` and
  ``$PAIRVOL_AGENT_DIR`` (named after their host).  A log reached twice is read once.

``--since T``: only events at or after T, an ISO time (``2026-05-01T12:00:00``, local time
unless it says otherwise: ``Z``, ``+02:00``) or a duration back from now (``90s``, ``5m``,
``2h``, ``1d``, ``1h30m``, ``500ms``).

``--follow``: after the events so far, wait for new ones in every log (a poll every
:data:`POLL` seconds; logs that appear later, such as a new lab's, are picked up) until
SIGINT or SIGTERM, then exit 0.  Events that arrive within one poll are printed in time
order; a line still being written (no newline yet) waits for its end, and is ignored without
``--follow``.  A complete line that is not an event is skipped with a warning on stderr.

Output: ``TIME  KIND NAME  EVENT  KEY=VALUE...`` (local time to the millisecond; a string
value is bare unless it has spaces, quotes or ``=``, then it is JSON, as are other values).
``--json``: one object per line (JSON lines, also without ``--follow``)::

    {"ts": 1780000000.123456, "time": "2026-05-28T20:26:40.123456+00:00",
     "kind": "node" | "agent", "source": "a", "lab": "lab1" | null,
     "event": "pair.state", "fields": {...every other key of the record...}}
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from cluster import agent_process
from cluster.agent import EVENTS as AGENT_EVENTS
from cluster.agent import STATUS as AGENT_STATUS
from pairvol import lab
from replicator.errors import NotFound, UsageError
from replicator.node import EVENTS as NODE_EVENTS
from replicator.node_table import load_node_table

NODE_DIR_ENV = "PAIRVOL_NODE_DIR"
#: where the systemd units keep their nodes (systemd/pairvol-node@.service)
NODE_ROOT = "/var/lib/pairvol/nodes"
AGENT_ROOT = agent_process.DEFAULT_AGENT_ROOT
POLL = 0.2  # seconds between two looks at the logs, with --follow
RESCAN = 2.0  # seconds between two searches for new logs, with --follow
READ_CHUNK = 1 << 20


def register(sub: Any) -> None:
    p = sub.add_parser(
        "events", help="the event logs of every node and agent (machine or lab), in time order"
    )
    p.add_argument("--lab", help=f"only this lab's hosts (default ${lab.LAB_ENV})")
    p.add_argument("--since", metavar="T", help="ISO time, or a duration back: 30s, 5m, 2h, 1d")
    p.add_argument("-f", "--follow", action="store_true", help="then wait for new events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)


# -- pure parts ------------------------------------------------------------------------------

_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, now: float) -> float:
    """``--since``'s value as Unix seconds: an ISO time or a duration before ``now``."""
    value = text.strip()
    if _DURATION.fullmatch(value):
        return now - sum(float(n) * _UNIT[u] for n, u in _DURATION_PART.findall(value))
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"--since {text!r}: neither an ISO time (2026-05-01T12:00:00) nor a duration "
            "(30s, 5m, 2h, 1d)"
        ) from None
    return when.astimezone().timestamp()  # a naive time is local time


_BARE = re.compile(r"[^\s\"'=]+")


def format_value(value: Any) -> str:
    if isinstance(value, str) and _BARE.fullmatch(value):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Source:
    kind: str  # "node" or "agent"
    name: str  # the node's or the agent's host name (LAB/HOST for a lab's, machine-wide)
    path: str  # its events.jsonl
    lab: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Event:
    ts: float
    event: str
    fields: dict[str, Any]
    source: Source

    def to_json(self) -> dict[str, Any]:
        when = dt.datetime.fromtimestamp(self.ts, dt.UTC)
        return {
            "ts": self.ts,
            "time": when.isoformat(),
            "kind": self.source.kind,
            "source": self.source.name,
            "lab": self.source.lab,
            "event": self.event,
            "fields": self.fields,
        }

    def line(self, width: int) -> str:
        when = dt.datetime.fromtimestamp(self.ts).isoformat(sep=" ", timespec="milliseconds")
        fields = " ".join(f"{k}={format_value(v)}" for k, v in self.fields.items())
        return f"{when}  {self.source.label:<{width}}  {self.event}  {fields}".rstrip()


def decode(line: bytes, source: Source) -> Event | str:
    """One complete log line as an Event, or why it is not one."""
    try:
        record = json.loads(line)
    except ValueError as e:  # JSON errors and bytes that are not UTF-8
        return f"not JSON ({e})"
    if not isinstance(record, dict):
        return "not a JSON object"
    ts, event = record.pop("ts", None), record.pop("event", None)
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not isinstance(event, str):
        return "no numeric 'ts' and string 'event'"
    return Event(float(ts), event, record, source)


# -- reading the logs ------------------------------------------------------------------------


@dataclass
class Tail:
    """A log read so far: only complete lines are taken, the rest waits for its newline.
    A file that shrank or was replaced is read again from its start."""

    source: Source
    offset: int = 0
    line_no: int = 0
    inode: int | None = None
    warn: Callable[[str], None] = field(default=lambda _m: None)
    unreadable: str | None = None  # the last reason the file could not be opened, said once

    def read(self) -> list[Event]:
        try:
            f = open(self.source.path, "rb")  # noqa: SIM115 - closed below, after the stat
        except (FileNotFoundError, NotADirectoryError):
            return []  # not written yet (a node that never started), or gone
        except OSError as e:
            if e.strerror != self.unreadable:
                self.unreadable = e.strerror
                self.warn(f"{self.source.path}: {e.strerror}; skipped")
            return []
        with f:
            st = os.fstat(f.fileno())
            if st.st_ino != self.inode or st.st_size < self.offset:
                self.inode, self.offset, self.line_no = st.st_ino, 0, 0
            f.seek(self.offset)
            events: list[Event] = []
            while True:
                chunk = f.read(READ_CHUNK)
                end = chunk.rfind(b"\n") + 1
                if end == 0:
                    break  # nothing, or a line still being written
                for line in chunk[: end - 1].split(b"\n"):
                    self.line_no += 1
                    if not line.strip():
                        continue
                    decoded = decode(line, self.source)
                    if isinstance(decoded, str):
                        self.warn(f"{self.source.path}:{self.line_no}: {decoded}; skipped")
                    else:
                        events.append(decoded)
                self.offset += end
                if end < len(chunk):
                    f.seek(self.offset)
            return events


def _agent_name(directory: str) -> str:
    """An agent's host, from its status file; else its directory's name."""
    try:
        with open(os.path.join(directory, AGENT_STATUS), encoding="utf-8") as f:
            host = json.load(f).get("host")
    except (OSError, ValueError, AttributeError):
        host = None
    return host if isinstance(host, str) and host else os.path.basename(directory)


def _subdirs(root: str) -> list[str]:
    try:
        return sorted(e.path for e in os.scandir(root) if e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def lab_sources(name: str, *, prefix: bool = False) -> list[Source]:
    """The node and agent logs of lab ``name`` (NotFound if there is no such lab)."""
    layout = lab.load(name)
    found = []
    for h in layout.hosts:
        label = f"{name}/{h.host}" if prefix else h.host
        found.append(Source("node", label, os.path.join(h.dir, NODE_EVENTS), name))
        if layout.cluster is not None:
            found.append(Source("agent", label, os.path.join(lab.agent_dir(h), AGENT_EVENTS), name))
    return found


def machine_sources() -> list[Source]:
    """Every node and agent log of this machine (see the module docstring)."""
    found: list[Source] = []
    for name in lab.names():
        with contextlib.suppress(NotFound):  # removed while we looked
            found += lab_sources(name, prefix=True)
    nodes = [(os.path.basename(d), d) for d in _subdirs(NODE_ROOT)]
    nodes += [(e.name, e.dir) for e in load_node_table() if e.dir]
    env_node = os.environ.get(NODE_DIR_ENV)
    if env_node:
        nodes.append((os.path.basename(os.path.abspath(env_node)), env_node))
    found += [Source("node", n, os.path.join(d, NODE_EVENTS)) for n, d in nodes]
    agents = _subdirs(AGENT_ROOT)
    env_agent = os.environ.get(agent_process.AGENT_DIR_ENV)
    if env_agent:
        agents.append(env_agent)
    found += [Source("agent", _agent_name(d), os.path.join(d, AGENT_EVENTS)) for d in agents]
    unique: dict[str, Source] = {}
    for s in found:
        unique.setdefault(os.path.realpath(s.path), s)
    return list(unique.values())


# -- the command -----------------------------------------------------------------------------


class _Printer:
    def __init__(self, as_json: bool, sources: Sequence[Source], *, flush: bool) -> None:
        self.as_json = as_json
        self.flush = flush
        self.width = max((len(s.label) for s in sources), default=0)

    def __call__(self, events: list[Event]) -> None:
        for e in events:
            if self.as_json:
                print(json.dumps(e.to_json(), sort_keys=True), flush=self.flush)
            else:
                self.width = max(self.width, len(e.source.label))
                print(e.line(self.width), flush=self.flush)


def _warn(message: str) -> None:
    print(f"pairvol: warning: {message}", file=sys.stderr, flush=True)


def _in_order(batch: list[tuple[int, Event]]) -> list[Event]:
    """Time order; ties keep the order of the sources and of each log's lines."""
    return [e for _, e in sorted(batch, key=lambda pair: (pair[1].ts, pair[0]))]


@contextlib.contextmanager
def _until_signalled() -> Iterator[threading.Event]:
    """An Event set by SIGINT or SIGTERM while the block runs (main thread only)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_events(args: argparse.Namespace) -> int:
    since = parse_since(args.since, time.time()) if args.since is not None else None
    chosen = args.lab or os.environ.get(lab.LAB_ENV) or None

    def discover() -> list[Source]:
        return lab_sources(chosen) if chosen else machine_sources()

    sources = discover()
    if not sources and not args.follow:
        raise NotFound(
            "no event logs on this machine: no lab, no node in "
            f"{NODE_ROOT} or the node table, no agent in {AGENT_ROOT}"
        )
    tails: dict[str, Tail] = {}
    order: dict[str, int] = {}

    def read_all() -> list[Event]:
        batch: list[tuple[int, Event]] = []
        for path, tail in tails.items():
            batch += [(order[path], e) for e in tail.read()]
        return [e for e in _in_order(batch) if since is None or e.ts >= since]

    def add(found: list[Source]) -> None:
        for s in found:
            if s.path not in tails:
                order[s.path] = len(order)
                tails[s.path] = Tail(s, warn=_warn)

    add(sources)
    show = _Printer(args.json, sources, flush=args.follow)
    if not args.follow:
        show(read_all())
        return 0
    with _until_signalled() as stop:
        show(read_all())
        rescan_due = time.monotonic() + RESCAN
        while not stop.is_set():
            time.sleep(POLL)  # a signal ends the sleep's use: the flag is checked next
            if time.monotonic() >= rescan_due:
                with contextlib.suppress(NotFound):  # a lab taken down: keep its logs
                    add(discover())
                rescan_due = time.monotonic() + RESCAN
            show(read_all())
    return 0
