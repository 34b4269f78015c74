"""Failover benchmark (``pairvol bench --suite failover``): how long a resource is unwritable.

Theory of operation.  For each pair mode (``sync``, ``async``) a lab of its own is built with
``up --cluster`` (hosts a and b, one etcd member, an agent on each host with the lab's
``[timing]``): a pair ``g/p`` of volume ``v`` (primary a, secondary b; sync with
``fence=data``) and resource ``r`` on a,b (a preferred) owning group ``g``.  One lab per mode,
so that a kill moves exactly one resource.

A *kill round*: a probe on the standby host writes one block to the standby's NBD export of
``v`` over and over (a refused write, EPERM while the volume is a hidden secondary, is tried
again ``probe_interval`` later; a lost connection is made again), and has been refused once
before anything is killed (a write accepted there would be two writable hosts, an error).
``t0`` is the wall time just before SIGKILL of every process of the active host
(:func:`pairvol.lab.kill_host`, in this process).  The round's **failover time** is the wall
time at which the first write was acknowledged, minus ``t0``.  The agents' own events give the
parts: ``cluster.promoting`` (the leader key was gone and this host won the new epoch) and
``cluster.active`` (takeover, unfence and start command done), each as seconds after ``t0``
(the agents stamp events with the same wall clock).  Then the killed host is started again
(``lab start``), the new active resyncs the pair towards it (``pair resync g --swap``), and
once its node reports the pair in PAIR as primary and the restarted agent is standby again
(and past its start-up hold), the next round kills the new active: the roles alternate.

A *switchover round* runs ``pairvol cluster switchover r --to STANDBY`` and times the first
acknowledged write on the target the same way, from just before the command.  Where that
command does not exist (``pairvol cluster switchover --help`` fails), the report says "not
available": no number is made up.

*Spurious failovers* are read from the agents' event logs, window by window (setup, each
round): a ``cluster.active`` on any host other than the one expected to hold the resource at
the end of the window, a second promotion in one window, or a ``cluster.fenced`` on that host
(a live active that nobody killed).  Other events worth a look (``cluster.failsafe``,
``cluster.lease.lost``, failed promotions ...) are counted as warnings.

The pure parts (the configuration's checks, the statistics, the audit, the tables) are
separate functions, tested without a lab.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster import agent as agentmod
from cluster.config import Timing, load_config
from pairvol import bench
from pairvol import lab as labmod
from replicator.errors import ExternalCommandFailed, IllegalState, PairvolError, Timeout, UsageError
from replicator.events import read_events, wait_event
from replicator.sizes import format_size
from replicator.volume import Volume

SUITE = "failover"
SCHEMA_VERSION = 1
MODES = ("sync", "async")
HOSTS = ("a", "b")
GROUP = "g"
PAIR = "g/p"
VOLUME = "v"
RESOURCE = "r"
BLOCK = 4096
#: Published defaults the numbers are read against (docs/benchmarks.md, "Failover").
ANCHORS: dict[str, float] = {
    "corosync token (default, alone)": 3.0,
    "Kubernetes lease (default)": 15.0,
    "Patroni ttl (default)": 30.0,
}
TARGET_MEDIAN_S = 2.0
#: A lease's keys go this long after its TTL ran out: measured on etcd 3.4 (one member), the
#: key was gone 2.42 to 2.49 s after the last keep-alive of a 2 s lease (its lessor revokes
#: expired leases in a 500 ms loop), so the delay is taken as the whole 0.5 s.
ETCD_LESSOR_CHECK_S = 0.5
MAX_WARNING_EVENTS = 40  # kept in the report, each with its window and host
SETUP_TIMEOUT = 120.0
RECOVER_TIMEOUT = 180.0
COMMAND_TIMEOUT = 120.0
#: Events that are no failover but say that something was not quite right.
WARNING_EVENTS = (
    "cluster.failsafe",
    "cluster.lease.lost",
    "cluster.etcd.unreachable",
    "cluster.promote.failed",
    "cluster.promote.refused",
    "cluster.node.unavailable",
    "cluster.monitor.failed",
    "cluster.late_report",
)


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    """What one run measures; checked when built (one UsageError for the first mistake)."""

    modes: tuple[str, ...] = MODES
    kills: int = 10
    switchovers: int = 3
    size: int = 64 << 20
    journal_size: int = 32 << 20  # the async group's journal
    workdir: Path | None = None
    probe_interval: float = 0.005  # seconds between two write attempts of the probe
    timeout: float = 60.0  # seconds a failover may take before the round counts as failed

    def __post_init__(self) -> None:
        if not self.modes:
            raise UsageError("--modes: choose at least one of sync, async")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise UsageError(f"--modes: unknown mode(s) {', '.join(unknown)}; known: sync, async")
        if len(set(self.modes)) != len(self.modes):
            raise UsageError("--modes: a mode is listed twice")
        if isinstance(self.kills, bool) or self.kills < 1:
            raise UsageError("--kills must be at least 1")
        if isinstance(self.switchovers, bool) or self.switchovers < 0:
            raise UsageError("--switchovers must not be negative")
        if self.size < 1 << 20 or self.size % BLOCK:
            raise UsageError("--size must be at least 1M and a multiple of 4K")
        if self.journal_size < 1 << 20:
            raise UsageError("--journal-size must be at least 1M")
        if not 0 < self.probe_interval <= 1.0:
            raise UsageError("the probe interval must be in (0, 1] seconds")
        if self.timeout <= 0:
            raise UsageError("the failover timeout must be positive")


QUICK: dict[str, Any] = {"kills": 3, "switchovers": 1, "size": 16 << 20}


def parse_modes(text: str) -> tuple[str, ...]:
    """``sync,async`` → ``("sync", "async")`` (checked by :class:`FailoverConfig`)."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KillRound:
    """One SIGKILL of the active host.  Times are seconds after ``t0`` (None: not seen)."""

    mode: str
    round: int
    killed: str
    new_active: str
    write_s: float | None  # the first write acknowledged on the new active
    active_s: float | None  # its agent's cluster.active
    promoting_s: float | None  # its agent's cluster.promoting (key gone, epoch won)
    kill_s: float  # how long SIGKILL of every process and the wait for their end took
    agent_seconds: float | None = None  # cluster.failover.done: from the old active last heard
    attempts: int = 0  # the probe's writes (and connections) until one was acknowledged
    recover_s: float | None = None  # restart, resync --swap, PAIR, standby again
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SwitchRound:
    """One planned switchover, times in seconds after the command started."""

    mode: str
    round: int
    source: str
    target: str
    command_s: float | None
    write_s: float | None
    active_s: float | None
    accepted_s: float | None = None  # the active agent took the request (cluster.request)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Window:
    """A stretch of the run for the audit: at its end ``expected`` holds the resource;
    ``promotion`` says whether one promotion (a ``cluster.active`` on ``expected``) belongs in
    it; ``killed`` is the host SIGKILLed at its start (its restarted agent is no live active)."""

    label: str
    expected: str
    promotion: bool
    killed: str | None = None


# -- statistics and the audit (pure) ---------------------------------------------------------


def summarize_times(values: Sequence[float | None]) -> dict[str, Any]:
    """Count, median, nearest-rank p90, min and max of the values that are not None."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"n": 0, "missing": len(values)}
    return {
        "n": len(xs),
        "missing": len(values) - len(xs),
        "median": round(statistics.median(xs), 3),
        "p90": round(bench.percentile(xs, 90), 3),
        "min": round(xs[0], 3),
        "max": round(xs[-1], 3),
    }


def audit(
    window: Window, events: Mapping[str, Sequence[Mapping[str, Any]]], resource: str = RESOURCE
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The spurious failovers of one window (each a dict naming the host, event and why), and
    its warning events (each with its window and host).  ``events`` are each host's agent
    events of the window."""
    spurious: list[dict[str, Any]] = []
    notable: list[dict[str, Any]] = []
    promotions = 0

    def flag(host: str, e: Mapping[str, Any], why: str) -> None:
        spurious.append(
            {"window": window.label, "host": host, "event": e.get("event"),
             "ts": e.get("ts"), "epoch": e.get("epoch"), "why": why}
        )  # fmt: skip

    for host in sorted(events):
        for e in events[host]:
            name = e.get("event")
            if name in WARNING_EVENTS:
                notable.append({"window": window.label, "host": host, **e})
            if e.get("resource") != resource:
                continue
            if name == "cluster.active":
                if host != window.expected:
                    flag(host, e, f"active on {host}; expected {window.expected}")
                elif e.get("again"):
                    continue  # the same active back from the failsafe: it never moved
                else:
                    promotions += 1
                    if not window.promotion or promotions > 1:
                        flag(host, e, "a promotion where none was due")
            elif name == "cluster.fenced" and host == window.expected:
                flag(host, e, f"the live active {host} was fenced: {e.get('why')}")
    return spurious, notable


def count_events(events: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many of each event name, sorted by name."""
    out: dict[str, int] = {}
    for e in events:
        out[str(e.get("event"))] = out.get(str(e.get("event")), 0) + 1
    return dict(sorted(out.items()))


def expected_expiry(t: Timing) -> dict[str, float]:
    """From a kill at a uniformly random moment of the renewal period, when the lease's key is
    gone (cluster/config.py, Timing): TTL - U(0, renew) + the lessor's delay; median, range."""
    return {
        "median_s": round(t.lease_ttl - t.lease_renew_interval / 2 + ETCD_LESSOR_CHECK_S, 3),
        "min_s": round(t.lease_ttl - t.lease_renew_interval + ETCD_LESSOR_CHECK_S, 3),
        "max_s": round(t.lease_ttl + ETCD_LESSOR_CHECK_S, 3),
    }


def expected_hold(t: Timing, margin: float) -> dict[str, float]:
    """From a kill, when the standby's confirmation hold ends (cluster/failover.py, rule 4).
    It last heard the active up to a heartbeat interval before the kill, keeps confirming it
    until it has not heard it for heartbeat_timeout (its last confirmation up to an interval
    before that), and may contend heartbeat_timeout + margin after its last confirmation."""
    late = 2 * t.heartbeat_timeout + margin
    return {"min_s": round(late - 2 * t.heartbeat_interval, 3), "max_s": round(late, 3)}


# -- tables (pure) ---------------------------------------------------------------------------


def _s(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_failover_table(doc: Mapping[str, Any]) -> str:
    """The summary: per mode, kills and switchovers; then settings, anchors and the target."""
    lines = [
        ["failover (s after SIGKILL)", "kills", "median", "p90", "max", "active median",
         "promoting median", "spurious", "failed"]
    ]  # fmt: skip
    for mode, m in doc["modes"].items():
        s, a, p = m["summary"]["write_s"], m["summary"]["active_s"], m["summary"]["promoting_s"]
        failed = sum(1 for r in m["rounds"] if r["error"])
        lines.append(
            [f"{mode}: first write", str(len(m["rounds"])), _s(s.get("median")), _s(s.get("p90")),
             _s(s.get("max")), _s(a.get("median")), _s(p.get("median")),
             str(len(m["spurious"])), str(failed)]
        )  # fmt: skip
    out = [bench.aligned(lines)]
    sw = [["planned switchover (s)", "n", "median", "p90", "max", "accepted median",
           "command median", "failed"]]  # fmt: skip
    for mode, m in doc["modes"].items():
        so = m["switchover"]
        if not so["available"]:
            sw.append([f"{mode}: first write", "not available", "", "", "", "", "", ""])
            continue
        s, c = so["summary"]["write_s"], so["summary"]["command_s"]
        acc = so["summary"].get("accepted_s", {})
        failed = sum(1 for r in so["rounds"] if r["error"])
        sw.append(
            [f"{mode}: first write", str(len(so["rounds"])), _s(s.get("median")),
             _s(s.get("p90")), _s(s.get("max")), _s(acc.get("median")), _s(c.get("median")),
             str(failed)]
        )  # fmt: skip
    out.append(bench.aligned(sw))
    notes = [n for mode, m in doc["modes"].items() for n in mode_notes(mode, m)]
    if notes:
        out.append("\n".join(notes))
    out.append(format_settings(doc))
    return "\n\n".join(out)


def mode_notes(mode: str, m: Mapping[str, Any]) -> list[str]:
    notes = []
    if m.get("error"):
        notes.append(f"{mode}: stopped early: {m['error']}")
    if not m["switchover"]["available"]:
        notes.append(f"{mode}: switchover: {m['switchover']['why']}")
    for s in m["spurious"]:
        notes.append(f"{mode}: SPURIOUS in {s['window']}: {s['event']} on {s['host']}: {s['why']}")
    if m["warnings"]:
        shown = ", ".join(f"{k} x{v}" for k, v in m["warnings"].items())
        notes.append(f"{mode}: warning events: {shown}")
    return notes


def format_rounds_table(doc: Mapping[str, Any]) -> str:
    """Every round's own values: the kills, then the switchovers (if any ran)."""
    lines = [["round", "killed", "new active", "write s", "active s", "promoting s",
              "agent s", "attempts", "recover s", "error"]]  # fmt: skip
    switches = [["switchover", "from", "to", "write s", "active s", "accepted s", "command s",
                 "error"]]  # fmt: skip
    for mode, m in doc["modes"].items():
        for r in m["rounds"]:
            lines.append(
                [f"{mode} kill {r['round'] + 1}", r["killed"], r["new_active"], _s(r["write_s"]),
                 _s(r["active_s"]), _s(r["promoting_s"]), _s(r["agent_seconds"]),
                 str(r["attempts"]), _s(r["recover_s"]), r["error"] or ""]
            )  # fmt: skip
        for r in m["switchover"]["rounds"]:
            switches.append(
                [f"{mode} switch {r['round'] + 1}", r["source"], r["target"], _s(r["write_s"]),
                 _s(r["active_s"]), _s(r.get("accepted_s")), _s(r["command_s"]),
                 r["error"] or ""]
            )  # fmt: skip
    tables = [bench.aligned(lines)]
    if len(switches) > 1:
        tables.append(bench.aligned(switches))
    return "\n\n".join(tables)


def format_settings(doc: Mapping[str, Any]) -> str:
    t = doc["settings"]
    exp, hold = t["expected_lease_expiry"], t["expected_confirmation_hold"]
    medians = [m["summary"]["write_s"].get("median") for m in doc["modes"].values()]
    reached = [x for x in medians if x is not None]
    verdict = (
        "no measurement"
        if not reached
        else ("reached" if max(reached) < doc["target_median_s"] else "NOT reached")
    )
    anchors = ", ".join(f"{k} {v:g} s" for k, v in doc["anchors"].items())
    return "\n".join(
        [
            f"settings: lease_ttl {t['lease_ttl']} s, renewed every "
            f"{t['lease_renew_interval']:g} s, heartbeat every {t['heartbeat_interval']:g} s, "
            f"peer lost after {t['heartbeat_timeout']:g} s, etcd request timeout "
            f"{t['etcd_timeout']:g} s, fence margin {t['fence_margin']:g} s",
            f"lease gone after a kill (expected): median {exp['median_s']:g} s, "
            f"{exp['min_s']:g} to {exp['max_s']:g} s (the floor: nothing can promote "
            "before); a confirmation hold (only after an active that lost etcd) would end "
            f"{hold['min_s']:g} to {hold['max_s']:g} s after it",
            f"anchors: {anchors}",
            f"target: median failover under {doc['target_median_s']:g} s: {verdict}",
        ]
    )


def table_of(doc: Mapping[str, Any]) -> str:
    return format_failover_table(doc) + "\n\n" + format_rounds_table(doc)


# -- the lab ---------------------------------------------------------------------------------


def _run(
    argv: Sequence[str], env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv), env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise Timeout(f"{' '.join(argv)}: no result after {timeout:.0f}s") from e


def _checked(argv: Sequence[str], done: subprocess.CompletedProcess[str]) -> str:
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise ExternalCommandFailed(f"{' '.join(argv)}: exit status {done.returncode}: {tail}")
    return done.stdout


class ClusterLab:
    """Lab ``name`` (hosts a and b, etcd, agents) under ``root``: built on enter, always torn
    down on exit.  Its registry lives in ``root``, so ``down`` can only remove this lab."""

    def __init__(self, root: Path, name: str, progress: Callable[[str], None]) -> None:
        self.root = root
        self.name = name
        self.progress = progress
        self._saved_root: str | None = None
        self._lab: labmod.Lab | None = None

    def __enter__(self) -> ClusterLab:
        self.root.mkdir(parents=True, exist_ok=True)
        self._saved_root = os.environ.get(labmod.LAB_ROOT_ENV)
        os.environ[labmod.LAB_ROOT_ENV] = str(self.root)  # pairvol.lab reads it on every call
        try:
            self.progress(f"lab {self.name}: up --cluster, hosts a and b")
            self._lab = labmod.up(self.name, list(HOSTS), cluster=True)
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

    @property
    def lab(self) -> labmod.Lab:
        if self._lab is None:
            raise IllegalState(f"lab {self.name} is not up")
        return self._lab

    def host(self, host: str) -> labmod.LabHost:
        return self.lab.host(host)

    def config_path(self) -> str:
        assert self.lab.cluster is not None
        return str(self.lab.cluster["config"])

    def settings(self) -> dict[str, Any]:
        """The agents' timing as the lab's cluster.toml sets it, and the loop's constants."""
        cfg = load_config(self.config_path())
        return {
            **asdict(cfg.timing),
            "etcd_timeout": cfg.etcd.timeout,
            "etcd_members": len(cfg.etcd.endpoints),
            "fence_margin": agentmod.FENCE_MARGIN,
            "standby_poll_interval": cfg.timing.heartbeat_interval,
            "etcd_lessor_check": ETCD_LESSOR_CHECK_S,
            "expected_lease_expiry": expected_expiry(cfg.timing),
            "expected_confirmation_hold": expected_hold(cfg.timing, agentmod.FENCE_MARGIN),
            "timing": cfg.timing,
        }

    # -- commands ----------------------------------------------------------------------------

    def env(self, host: str | None) -> dict[str, str]:
        env = dict(os.environ, PAIRVOL_LAB=self.name)
        env[labmod.LAB_ROOT_ENV] = str(self.root)
        env.pop("PAIRVOL_NODE_DIR", None)
        if host is not None:
            env["PAIRVOL_NODE_DIR"] = self.host(host).dir
        return env

    def pv(self, host: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """``pairvol ARGS`` against ``host``'s node."""
        argv = [sys.executable, "-m", "pairvol", *args]
        return _checked(argv, _run(argv, self.env(host), timeout))

    def cluster_argv(self, host: str, *args: str) -> list[str]:
        """``pairvol cluster ARGS`` on ``host``, as an operator types it there: one process in
        its namespace, with what ``lab exec`` sets (no ``lab exec`` process in between)."""
        pairvol = os.path.join(labmod.bin_dir(), "pairvol")
        return ["ip", "netns", "exec", self.host(host).netns, pairvol, "cluster", *args]

    def host_env(self, host: str) -> dict[str, str]:
        return labmod.host_env(self.lab, self.host(host))

    def cluster(self, host: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        argv = self.cluster_argv(host, *args)
        return _checked(argv, _run(argv, self.host_env(host), timeout))

    def has_command(self, host: str, *args: str) -> bool:
        """Whether ``pairvol cluster ARGS --help`` works on ``host``."""
        done = _run(self.cluster_argv(host, *args, "--help"), self.host_env(host), 60.0)
        return done.returncode == 0

    def create_volume(self, host: str, name: str, size: int) -> None:
        with Volume.create(os.path.join(self.host(host).dir, name), size, name=name):
            pass

    def volume_uri(self, host: str, volume: str) -> str:
        return f"nbd+unix:///{volume}?socket={self.host(host).dir}/nbd.sock"

    # -- events ------------------------------------------------------------------------------

    def agent_events(self, host: str) -> str:
        return os.path.join(labmod.agent_dir(self.host(host)), agentmod.EVENTS)

    def node_events(self, host: str) -> str:
        return os.path.join(self.host(host).dir, "events.jsonl")

    def marks(self) -> dict[str, int]:
        """How many agent events each host has logged so far."""
        return {h: len(read_events(self.agent_events(h))) for h in HOSTS}

    def since(self, marks: Mapping[str, int]) -> dict[str, list[dict[str, Any]]]:
        return {h: read_events(self.agent_events(h))[marks.get(h, 0) :] for h in HOSTS}

    def wait_agent(
        self, host: str, event: str, *, after: int, timeout: float, **fields: Any
    ) -> dict[str, Any]:
        path = self.agent_events(host)
        try:
            return wait_event(path, event, _matching(fields), after=after, timeout=timeout)
        except Timeout:
            tail = [e for e in read_events(path) if e.get("event") != "cluster.peer.up"][-6:]
            raise Timeout(
                f"no {event} on {host} in {timeout:.0f}s; its last events: {tail}"
            ) from None

    def wait_node(
        self, host: str, event: str, *, after: int, timeout: float, **fields: Any
    ) -> dict[str, Any]:
        path = self.node_events(host)
        try:
            return wait_event(path, event, _matching(fields), after=after, timeout=timeout)
        except Timeout:
            tail = [e for e in read_events(path) if e.get("group") == fields.get("group")][-6:]
            raise Timeout(f"no {event} on {host}'s node in {timeout:.0f}s; last: {tail}") from None

    def node_mark(self, host: str) -> int:
        return len(read_events(self.node_events(host)))


def _matching(fields: Mapping[str, Any]) -> Callable[[dict[str, Any]], bool]:
    return lambda e: all(e.get(k) == v for k, v in fields.items())


def first_event(
    events: Sequence[Mapping[str, Any]], event: str, resource: str = RESOURCE
) -> Mapping[str, Any] | None:
    for e in events:
        if e.get("event") == event and e.get("resource") == resource:
            return e
    return None


# -- the probe -------------------------------------------------------------------------------


class WriteProbe(threading.Thread):
    """Writes one block at offset 0 of ``uri`` until a write is acknowledged (``accepted``,
    wall time) or ``timeout`` passes.  A refused write is tried again ``interval`` later, a
    dead connection is made again: the standby's export accepts a connection but refuses
    writes (EPERM) until its node took the pair over."""

    def __init__(self, uri: str, interval: float, timeout: float, stamp: int) -> None:
        super().__init__(daemon=True, name="failover-probe")
        self.uri = uri
        self.interval = interval
        self.timeout = timeout
        self.data = stamp.to_bytes(8, "little") * (BLOCK // 8)
        self.accepted: float | None = None
        self.attempts = 0
        self.last_error: str | None = None
        self.tried = threading.Event()  # the first attempt is over (refused or not)
        self._stop_now = threading.Event()

    def run(self) -> None:
        import nbd  # the python3-libnbd module; checked by check_prerequisites

        deadline = time.monotonic() + self.timeout
        h: Any = None
        try:
            while not self._stop_now.is_set() and time.monotonic() < deadline:
                self.attempts += 1
                try:
                    if h is None:
                        h = nbd.NBD()
                        h.connect_uri(self.uri)
                    h.pwrite(self.data, 0)
                    self.accepted = time.time()
                    return
                except nbd.Error as e:
                    self.last_error = str(e)
                    if h is not None and not h.aio_is_ready():
                        h = None  # refused or dropped: a fresh handle next time
                self.tried.set()
                self._stop_now.wait(self.interval)
        finally:
            self.tried.set()
            if h is not None and h.aio_is_ready():
                with contextlib.suppress(nbd.Error):  # the write is in; a late close is no result
                    h.shutdown()

    def stop(self) -> None:
        self._stop_now.set()

    def start_refused(self, what: str) -> None:
        """Start, and return once a first write was refused: the probe is then connected
        and trying.  A first write that is accepted means the volume was writable on two
        hosts at once (IllegalState, before anything is killed)."""
        self.start()
        if not self.tried.wait(self.timeout):
            self.stop()
            raise Timeout(f"the write probe on {what} made no attempt in {self.timeout:g}s")
        if self.accepted is not None:
            raise IllegalState(f"{what} accepted a write while the active host was alive")

    def result(self, t0: float) -> float | None:
        """Seconds from ``t0`` to the acknowledged write (wait for the probe first)."""
        self.join(self.timeout + 5)
        return None if self.accepted is None else round(self.accepted - t0, 3)


# -- one mode --------------------------------------------------------------------------------


@dataclass
class ModeRun:
    """A mode's lab and what it measured so far (kept when a round fails)."""

    cfg: FailoverConfig
    mode: str
    lab: ClusterLab
    progress: Callable[[str], None]
    settings: dict[str, Any] = field(default_factory=dict)
    rounds: list[KillRound] = field(default_factory=list)
    switches: list[SwitchRound] = field(default_factory=list)
    spurious: list[dict[str, Any]] = field(default_factory=list)
    notable: list[dict[str, Any]] = field(default_factory=list)
    switch_available: bool = False
    switch_why: str = ""
    error: str | None = None

    @property
    def timing(self) -> Timing:
        t: Timing = self.settings["timing"]
        return t

    def check(self, window: Window, marks: Mapping[str, int]) -> None:
        spurious, notable = audit(window, self.lab.since(marks))
        self.spurious += spurious
        self.notable += notable
        for s in spurious:
            self.progress(f"{self.mode}: SPURIOUS {s['event']} on {s['host']}: {s['why']}")

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        lab, cfg = self.lab, self.cfg
        self.settings = lab.settings()
        for h in HOSTS:
            lab.create_volume(h, VOLUME, cfg.size)
        create = ["pair", "create", PAIR, "--primary", f"a:{VOLUME}", "--secondary", f"b:{VOLUME}"]
        if self.mode == "sync":
            create += ["--mode", "sync", "--fence", "data"]
        else:
            create += ["--mode", "async", "--journal-size", str(cfg.journal_size)]
        self.progress(f"{self.mode}: pair {PAIR} ({format_size(cfg.size)}), initial copy")
        lab.pv("a", *create)
        lab.pv("a", "pair", "wait", PAIR, "--state", "PAIR", "--timeout", f"{SETUP_TIMEOUT:.0f}",
               timeout=SETUP_TIMEOUT + 30)  # fmt: skip
        marks = lab.marks()
        lab.cluster("a", "resource", "create", RESOURCE, "--group", GROUP, "--hosts", "a,b",
                    "--start", "true")  # fmt: skip
        lab.wait_agent("a", "cluster.active", after=marks["a"], timeout=SETUP_TIMEOUT,
                       resource=RESOURCE)  # fmt: skip
        standby = lab.wait_agent("b", "cluster.standby", after=marks["b"], timeout=SETUP_TIMEOUT,
                                 resource=RESOURCE)  # fmt: skip
        self.hold(standby)
        self.check(Window("setup", "a", promotion=True), marks)

    def hold(self, standby: Mapping[str, Any]) -> None:
        """Wait out the holds of an agent that has just learnt of the resource (``standby``
        is its ``cluster.standby`` event): the failover core holds for heartbeat_timeout +
        margin after it starts, the loop reads runtime resources every RESOURCES_EVERY; and a
        heartbeat more.  A kill before that would time the hold, not a failover."""
        t = self.timing
        held = max(
            agentmod.RESOURCES_EVERY + t.heartbeat_timeout,
            t.heartbeat_timeout + agentmod.FENCE_MARGIN,
        )
        time.sleep(max(0.0, float(standby["ts"]) + held + t.heartbeat_interval - time.time()))

    # -- kills -------------------------------------------------------------------------------

    def kill_round(self, rnd: int, active: str, standby: str) -> KillRound:
        lab, cfg = self.lab, self.cfg
        marks = lab.marks()
        probe = WriteProbe(lab.volume_uri(standby, VOLUME), cfg.probe_interval, cfg.timeout,
                           stamp=rnd + 1)  # fmt: skip
        probe.start_refused(f"standby {standby}")
        # A host dies at a random moment of its lease renewal period: without this, the
        # rounds' fixed rhythm (wait for an event, then kill) samples one phase only, and the
        # time to the lease's expiry (TTL - phase + etcd's revocation delay) with it.
        time.sleep(random.uniform(0.0, self.timing.lease_renew_interval))
        t0 = time.time()
        labmod.kill_host(lab.name, active)  # node, agent and everything else: SIGKILL
        kill_s = round(time.time() - t0, 3)
        write_s = probe.result(t0)
        error = None
        try:
            active_ev = lab.wait_agent(standby, "cluster.active", after=marks[standby],
                                       timeout=cfg.timeout, resource=RESOURCE)  # fmt: skip
        except Timeout as e:
            active_ev, error = None, str(e)
        if write_s is None and error is None:
            error = f"no write acknowledged on {standby} in {cfg.timeout:g}s ({probe.last_error})"
        events = lab.since(marks)[standby]
        promoting = first_event(events, "cluster.promoting")
        done = first_event(events, "cluster.failover.done")
        return KillRound(
            mode=self.mode,
            round=rnd,
            killed=active,
            new_active=standby,
            write_s=write_s,
            active_s=None if active_ev is None else round(float(active_ev["ts"]) - t0, 3),
            promoting_s=None if promoting is None else round(float(promoting["ts"]) - t0, 3),
            kill_s=kill_s,
            agent_seconds=None if done is None else done.get("seconds"),
            attempts=probe.attempts,
            error=error,
        )

    def recover(self, killed: str, active: str) -> None:
        """The killed host back as the standby: start it, resync the pair towards it from the
        new active (``resync --swap``, only the differences), wait for PAIR there and for the
        restarted agent to be standby (and past its hold)."""
        lab = self.lab
        node_mark = lab.node_mark(active)
        agent_mark = lab.marks()[killed]
        labmod.start_host(lab.name, killed)
        lab.pv(active, "pair", "resync", GROUP, "--swap")
        lab.wait_node(active, "pair.state", after=node_mark, timeout=RECOVER_TIMEOUT,
                      group=GROUP, state="PAIR", role="primary")  # fmt: skip
        standby = lab.wait_agent(killed, "cluster.standby", after=agent_mark,
                                 timeout=RECOVER_TIMEOUT, resource=RESOURCE)  # fmt: skip
        self.hold(standby)

    def kills(self) -> str:
        """Kill rounds, alternating the host; the host active at the end."""
        active, standby = "a", "b"
        for rnd in range(self.cfg.kills):
            marks = self.lab.marks()
            r = self.kill_round(rnd, active, standby)
            self.progress(
                f"{self.mode} kill {rnd + 1}/{self.cfg.kills}: {active} killed, first write on "
                f"{standby} after {_s(r.write_s)} s (promoting {_s(r.promoting_s)} s, "
                f"active {_s(r.active_s)} s, {r.attempts} attempts)"
            )
            if r.error is not None:
                self.rounds.append(r)
                self.check(Window(f"kill {rnd + 1}", standby, True, active), marks)
                raise Timeout(f"kill {rnd + 1}: {r.error}")
            t = time.monotonic()
            self.recover(active, standby)
            self.rounds.append(
                KillRound(**{**asdict(r), "recover_s": round(time.monotonic() - t, 3)})
            )
            self.check(Window(f"kill {rnd + 1}", standby, True, active), marks)
            active, standby = standby, active
        return active

    # -- switchovers -------------------------------------------------------------------------

    def switchovers(self, active: str) -> None:
        if self.cfg.switchovers == 0:
            self.switch_why = "not run (--switchovers 0)"
            return
        if not self.lab.has_command(active, "switchover"):
            self.switch_why = "not available: `pairvol cluster switchover --help` fails"
            self.progress(f"{self.mode}: switchover {self.switch_why}")
            return
        self.switch_available = True
        standby = "b" if active == "a" else "a"
        for rnd in range(self.cfg.switchovers):
            marks = self.lab.marks()
            r = self.switch_round(rnd, active, standby)
            self.switches.append(r)
            self.check(Window(f"switchover {rnd + 1}", standby, promotion=True), marks)
            self.progress(
                f"{self.mode} switchover {rnd + 1}/{self.cfg.switchovers}: {active} -> "
                f"{standby}: first write after {_s(r.write_s)} s (command {_s(r.command_s)} s)"
            )
            if r.error is not None:
                raise ExternalCommandFailed(f"switchover {rnd + 1}: {r.error}")
            active, standby = standby, active

    def switch_round(self, rnd: int, source: str, target: str) -> SwitchRound:
        lab, cfg = self.lab, self.cfg
        marks, node_mark = lab.marks(), lab.node_mark(target)
        probe = WriteProbe(lab.volume_uri(target, VOLUME), cfg.probe_interval, cfg.timeout,
                           stamp=1000 + rnd)  # fmt: skip
        probe.start_refused(f"switchover target {target}")
        t0 = time.time()
        argv = lab.cluster_argv(source, "switchover", RESOURCE, "--to", target)
        done = _run(argv, lab.host_env(source), COMMAND_TIMEOUT)
        command_s = round(time.time() - t0, 3)
        error = None
        if done.returncode != 0:
            probe.stop()
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            error = f"exit status {done.returncode}: {tail}"
        write_s = probe.result(t0)
        active_s = None
        if error is None:
            try:
                ev = lab.wait_agent(target, "cluster.active", after=marks[target],
                                    timeout=cfg.timeout, resource=RESOURCE)  # fmt: skip
                active_s = round(float(ev["ts"]) - t0, 3)
                # The switchover swapped the pairs: the target is the primary, in PAIR.
                lab.wait_node(target, "pair.state", after=node_mark, timeout=RECOVER_TIMEOUT,
                              group=GROUP, state="PAIR", role="primary")  # fmt: skip
            except Timeout as e:
                error = str(e)
        if write_s is None and error is None:
            error = f"no write acknowledged on {target} in {cfg.timeout:g}s ({probe.last_error})"
        accepted = [
            e for e in lab.since(marks)[source]
            if e.get("event") == "cluster.request" and e.get("state") == "accepted"
        ]  # fmt: skip
        accepted_s = round(float(accepted[0]["ts"]) - t0, 3) if accepted else None
        # Hosts other than a switchover's target hold for a TTL (docs/decisions.md).
        time.sleep(self.timing.lease_ttl)
        return SwitchRound(
            self.mode, rnd, source, target, command_s, write_s, active_s, accepted_s, error
        )

    # -- the report --------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.setup()
            active = self.kills()
            self.switchovers(active)
        except PairvolError as e:
            self.error = f"{type(e).__name__}: {e}"
            self.progress(f"{self.mode}: {self.error}")

    def report(self) -> dict[str, Any]:
        settings = {k: v for k, v in self.settings.items() if k != "timing"}
        return {
            "lab": {"name": self.lab.name,
                    "hosts": {h: self.lab.host(h).address for h in HOSTS}},
            "pair": {"name": PAIR, "mode": self.mode, "size": self.cfg.size,
                     **({"fence": "data"} if self.mode == "sync" else
                        {"journal_size": self.cfg.journal_size})},
            "resource": {"name": RESOURCE, "group": GROUP, "hosts": list(HOSTS),
                         "start": "true"},
            "settings": settings,
            "rounds": [asdict(r) for r in self.rounds],
            "summary": {
                key: summarize_times([getattr(r, key) for r in self.rounds])
                for key in ("write_s", "active_s", "promoting_s", "agent_seconds", "recover_s")
            },
            "switchover": {
                "available": self.switch_available,
                "why": self.switch_why,
                "rounds": [asdict(r) for r in self.switches],
                "summary": {
                    key: summarize_times([getattr(r, key) for r in self.switches])
                    for key in ("write_s", "active_s", "command_s", "accepted_s")
                },
            },
            "spurious": self.spurious,
            "warnings": count_events(self.notable),
            "warning_events": self.notable[:MAX_WARNING_EVENTS],
            "error": self.error,
        }  # fmt: skip


# -- the whole run ---------------------------------------------------------------------------


def check_prerequisites() -> None:
    programs = ("ip", "nbdkit", "etcd")
    bench.check_lab_prerequisites("failover suite", programs, nbd=True, lab="a cluster lab")


def etcd_version() -> str:
    done = _run(["etcd", "--version"], os.environ, 30.0)
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else f"unknown (status {done.returncode})"


def run(cfg: FailoverConfig, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Measure every mode of ``cfg`` in a lab of its own; the JSON report."""
    check_prerequisites()
    started = dt.datetime.now().astimezone()
    t0 = time.monotonic()
    machine = bench.machine_info()
    machine["etcd_version"] = etcd_version()
    modes: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    with bench.work_directory(cfg.workdir, "pairvol-failover-") as workdir:
        for mode in cfg.modes:
            name = f"pvf{os.getpid() % 100000}{mode[0]}"
            with ClusterLab(workdir / "labs", name, progress) as lab:
                m = ModeRun(cfg, mode, lab, progress)
                m.run()
                modes[mode] = m.report()
                settings = settings or modes[mode]["settings"]
    machine["loadavg_end"] = list(os.getloadavg())
    return {
        "schema": SCHEMA_VERSION,
        "suite": SUITE,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "machine": machine,
        "config": {
            "modes": list(cfg.modes),
            "kills": cfg.kills,
            "switchovers": cfg.switchovers,
            "size": cfg.size,
            "journal_size": cfg.journal_size,
            "probe_interval_s": cfg.probe_interval,
            "timeout_s": cfg.timeout,
            "how": "t0 just before SIGKILL of every process of the active host; write_s: the "
            "first 4 KiB write acknowledged by the standby's node through its NBD export; "
            "active_s/promoting_s: the new active agent's cluster.active/cluster.promoting "
            "event times; all wall clock, seconds after t0",
        },
        "settings": settings,
        "anchors": dict(ANCHORS),
        "target_median_s": TARGET_MEDIAN_S,
        "modes": modes,
        "spurious_total": sum(len(m["spurious"]) for m in modes.values()),
        "errors": {k: m["error"] for k, m in modes.items() if m["error"]},
    }
