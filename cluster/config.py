"""The cluster agent's configuration: one TOML file, and the runtime resource records.

Theory of operation.  :func:`load_config` reads the file (the only I/O here) and hands its text
to :func:`parse_config`, which turns it into frozen dataclasses or raises one
:class:`~replicator.errors.UsageError` (exit code 2) for the first mistake it meets.  Every
message names the file and the key path, so the user can go straight to the line::

    config /etc/pairvol/agent.toml: resources.db.hosts: host 'c' is not defined in [hosts]

A TOML syntax error names the line and column tomllib found it at.  Unknown keys are mistakes
too (a misspelt ``hearbeat_interval`` would otherwise silently keep its default).

Resources can also be created at run time (``pairvol cluster resource create``) and are then
stored in etcd as JSON documents (:mod:`cluster.coord` puts and gets them).
:func:`resource_to_json` and :func:`resource_from_json` are their codec; decoding runs the
same checks as the TOML file, with ``resource record NAME`` in place of the file name.

The file (see :data:`EXAMPLE_CONFIG`)::

    [cluster]   name, secret_file
    [etcd]      endpoints, timeout
    [timing]    heartbeat_interval, heartbeat_timeout, lease_ttl, lease_renew_interval
    [hosts.NAME]        agent = "ADDR:PORT", node = "/path/control.sock" or "ADDR[:PEERPORT]"
    [resources.NAME]    hosts, groups, start, stop, monitor
    [resources.NAME.devices.HOST]   DEVICE = "nbd://ADDR:PORT/EXPORT" (or nbd+unix://...)

Names (cluster, hosts, resources) become etcd key segments and file names, so they are kept
boring: letters, digits, ``_``, ``.``, ``-``, at most 63 characters, not starting with ``.``
or ``-``.  Group names follow the volume-name rules of the pair commands; device names and
export URIs are the host PVID cache's (:mod:`cluster.pvid_cache`, :mod:`cluster.probe`).
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from cluster.probe import parse_uri
from cluster.pvid_cache import check_device_name
from replicator.errors import NotFound, UsageError
from replicator.header import check_name
from replicator.node_table import is_address, parse_address

#: The agents' own port (NBD is 10809, the replication peers 10810).
DEFAULT_AGENT_PORT = 10811
DEFAULT_ETCD_PORT = 2379
DEFAULT_ETCD_TIMEOUT = 0.5
RESOURCE_RECORD_VERSION = 1

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def check_cluster_name(name: str, *, what: str = "name") -> str:
    """A cluster, host or resource name: it becomes an etcd key segment and a file name."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"{what} {name!r} is not valid: use 1-63 letters, digits, '_', '.', '-' "
            "(not starting with '.' or '-')"
        )
    return name


# -- timing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    """How often agents speak, and how long a lease lives.

    Why these defaults (the target: a median failover under 2 s, and no spurious failover).

    After the active host dies, the standby can take over only once etcd has deleted the
    leader key, that is once the active's lease has expired.  Measured on etcd 3.4 (one
    member), a lease expires ``lease_ttl`` plus 0 to 0.5 s after its last keep-alive: etcd's
    lessor looks for expired leases every 500 ms.  The active dies at a uniformly random
    moment of its renewal period, so, from the death::

        time to expiry = lease_ttl - U(0, lease_renew_interval) + U(0, 0.5 s)
        median         = lease_ttl - lease_renew_interval / 2 + 0.25 s

    * ``lease_ttl`` is an integer because etcd's leases are, and 2 s is the shortest etcd
      grants with its default 1 s election timeout (it silently raises a shorter TTL to
      1.5 x election timeout, rounded up).
    * Renewing every ``lease_ttl / 4`` (0.5 s) would give a median of 2.0 s before the
      takeover even starts.  Renewing every ``lease_ttl / 2`` (1 s) gives 1.75 s, leaving
      about 0.25 s for the watch to report the deletion, the epoch transaction, the storage
      takeover and the start command.  Renewing more often makes failover *slower* (the lease
      runs longer after the last renewal), not safer.
    * The price of renewing every second: an active host that sends a renewal at ``t`` must
      stop writing by ``t + lease_ttl - margin`` unless a later renewal succeeded; with the
      0.5 s request timeout it has two attempts (at ``t + 1`` and, at once after a failure,
      ``t + 1.5``) before a deadline around ``t + 1.75``.  Keep-alives do not go through raft
      (no disk write), so a healthy etcd answers them in milliseconds.
    * Heartbeats between agents every 0.2 s; a peer is lost after 1 s (five missed), which
      tolerates a scheduling hiccup on a loaded machine and is still shorter than the lease.

    Defaults follow what is set: ``lease_renew_interval`` is ``lease_ttl / 2``,
    ``heartbeat_timeout`` five heartbeat intervals (at least 1 s), and ``etcd.timeout``
    0.5 s or half the renewal interval, whichever is shorter.
    """

    heartbeat_interval: float = 0.2
    heartbeat_timeout: float = 1.0
    lease_ttl: int = 2
    lease_renew_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """Where etcd is (canonical ``http://HOST:PORT`` URLs) and how long one request may take."""

    endpoints: tuple[str, ...]
    timeout: float = 0.5  # DEFAULT_ETCD_TIMEOUT


def parse_endpoint(text: str) -> str:
    """``http://HOST[:PORT]`` (or https) as its canonical form with an explicit port.

    UsageError naming the endpoint when it is anything else (a path, a query, a user...)."""
    if not isinstance(text, str):
        raise UsageError(f"etcd endpoint {text!r} is not a string")
    try:
        u = urllib.parse.urlsplit(text)
        port = u.port
    except ValueError as e:
        raise UsageError(f"etcd endpoint {text!r} is malformed: {e}") from None
    if u.scheme not in ("http", "https"):
        raise UsageError(f"etcd endpoint {text!r}: use http://HOST:PORT (or https://)")
    if not u.hostname:
        raise UsageError(f"etcd endpoint {text!r} names no host")
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        raise UsageError(f"etcd endpoint {text!r}: only scheme, host and port are allowed")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host}:{port or DEFAULT_ETCD_PORT}"


# -- hosts ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeRef:
    """How an agent reaches its storage node: the control socket's path, or the node's
    address (``ADDR``, peer port).  Exactly one is set."""

    socket: str | None = None
    address: tuple[str, int] | None = None

    def __str__(self) -> str:
        if self.socket is not None:
            return self.socket
        assert self.address is not None
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class HostConfig:
    name: str
    agent: tuple[str, int]  # the agent's heartbeat/notice address
    node: NodeRef


# -- resources ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Device:
    """A host PVID-cache device of a resource on one host: ``name`` (``pv0``) → ``export``
    (a canonical NBD URI naming the export, without ``@PVID``: the cache holds the PVID)."""

    host: str
    name: str
    export: str


@dataclass(frozen=True, slots=True)
class Resource:
    """What runs on one host at a time, and everything it needs there.

    ``hosts`` are in preference order; ``groups`` are the pair groups it owns (their pairs
    move with it); ``devices`` are its PVID-cache devices, per host; the commands are shell
    command lines for the application (None: nothing to run)."""

    name: str
    hosts: tuple[str, ...]
    groups: tuple[str, ...]
    devices: tuple[Device, ...] = ()
    start: str | None = None
    stop: str | None = None
    monitor: str | None = None

    def devices_on(self, host: str) -> dict[str, str]:
        """Device name → export URI on ``host``."""
        return {d.name: d.export for d in self.devices if d.host == host}


@dataclass(frozen=True, slots=True)
class Config:
    source: str  # the file it was read from
    cluster: str
    secret_file: str  # absolute
    etcd: EtcdConfig
    timing: Timing = field(default_factory=Timing)
    hosts: tuple[HostConfig, ...] = ()
    resources: tuple[Resource, ...] = ()

    def host(self, name: str) -> HostConfig:
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts) or "none"
        raise NotFound(f"config {self.source}: no host {name!r} in [hosts] (known: {known})")

    def resource(self, name: str) -> Resource:
        for r in self.resources:
            if r.name == name:
                return r
        known = ", ".join(r.name for r in self.resources) or "none"
        raise NotFound(f"config {self.source}: no resource {name!r} (known: {known})")

    def host_names(self) -> list[str]:
        return [h.name for h in self.hosts]


# -- where a mistake is ---------------------------------------------------------------------


class _At:
    """A position in the document: ``source`` starts every message, ``path`` is the keys."""

    def __init__(self, source: str, path: tuple[str, ...] = ()) -> None:
        self.source = source
        self.path = path

    def __truediv__(self, key: str) -> _At:
        return _At(self.source, (*self.path, key))

    def __str__(self) -> str:
        return ".".join(k if _BARE_KEY_RE.fullmatch(k) else json.dumps(k) for k in self.path)

    def fail(self, message: str) -> NoReturn:
        where = f"{self.source}: {self}" if self.path else self.source
        raise UsageError(f"{where}: {message}")

    def checked(self, check: Any, value: Any, **kwargs: Any) -> Any:
        """``check(value)``, with its UsageError's text moved under this position."""
        try:
            return check(value, **kwargs)
        except UsageError as e:
            self.fail(str(e))


def _table(at: _At, value: Any, known: Iterable[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        at.fail(f"must be a table, not {_kind(value)}")
    if known is not None:
        allowed = list(known)
        for key in value:
            if key not in allowed:
                (at / key).fail(f"unknown key (known: {', '.join(allowed)})")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if value is None:
        return "null"
    return type(value).__name__


def _required(at: _At, table: Mapping[str, Any], key: str) -> Any:
    if key not in table:
        (at / key).fail("is required")
    return table[key]


def _string(at: _At, value: Any) -> str:
    if not isinstance(value, str):
        at.fail(f"must be a string, not {_kind(value)}")
    if not value.strip():
        at.fail("must not be empty")
    if "\0" in value:
        at.fail("must not contain a NUL character")
    return value


def _opt_string(at: _At, value: Any) -> str | None:
    return None if value is None else _string(at, value)


def _seconds(at: _At, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        at.fail(f"must be a number of seconds, not {_kind(value)}")
    if not math.isfinite(value) or value <= 0:
        at.fail(f"must be more than 0 seconds, not {value!r}")
    return float(value)


def _names(at: _At, value: Any, check: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list):
        at.fail(f"must be an array of {what}s, not {_kind(value)}")
    if not value:
        at.fail(f"must name at least one {what}")
    seen: list[str] = []
    for item in value:
        if not isinstance(item, str):
            at.fail(f"{what} {item!r} is not a string")
        at.checked(check, item)
        if item in seen:
            at.fail(f"{what} {item!r} is listed twice")
        seen.append(item)
    return tuple(seen)


# -- the file -------------------------------------------------------------------------------

_TOP_KEYS = ("cluster", "etcd", "timing", "hosts", "resources")
_CLUSTER_KEYS = ("name", "secret_file")
_ETCD_KEYS = ("endpoints", "timeout")
_TIMING_KEYS = ("heartbeat_interval", "heartbeat_timeout", "lease_ttl", "lease_renew_interval")
_HOST_KEYS = ("agent", "node")
_RESOURCE_KEYS = ("hosts", "groups", "devices", "start", "stop", "monitor")


def load_config(path: str) -> Config:
    """Read and check the agent's config file (see :func:`parse_config`).

    A missing file is NotFound; one that cannot be read, is not UTF-8 or not TOML, or holds
    any mistake, is one UsageError line naming the file."""
    source = f"config {path}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise NotFound(f"{source} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{source} is a directory") from None
    except OSError as e:
        raise UsageError(f"{source} cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UsageError(f"{source}: line {line}: not UTF-8 text") from None
    return parse_config(text, path)


_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def parse_config(text: str, path: str, *, base_dir: str | None = None) -> Config:
    """The config in ``text`` (no I/O).  ``path`` is only named in errors and recorded in
    :attr:`Config.source`; a relative ``secret_file`` is relative to ``base_dir``, by default
    the directory of ``path``."""
    source = f"config {path}"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _TOML_POS_RE.search(msg)
        if m:
            detail = msg[: m.start()]
            where = f"line {m.group(1)}, column {m.group(2)}"
        else:
            last = text.count("\n") + (0 if text.endswith("\n") else 1)
            detail = msg.replace(" (at end of document)", "")
            where = f"line {max(last, 1)}, at the end of the file"
        detail = detail[:1].lower() + detail[1:]
        raise UsageError(f"{source}: {where}: invalid TOML: {detail}") from None
    at = _At(source)
    top = _table(at, doc, _TOP_KEYS)

    cl_at = at / "cluster"
    cl = _table(cl_at, _required(at, top, "cluster"), _CLUSTER_KEYS)
    name = (cl_at / "name").checked(
        check_cluster_name,
        _string(cl_at / "name", _required(cl_at, cl, "name")),
        what="cluster name",
    )
    secret = _string(cl_at / "secret_file", _required(cl_at, cl, "secret_file"))
    base = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(path))
    secret = os.path.normpath(os.path.join(base, secret))

    timing = _timing(at / "timing", top.get("timing", {}))
    etcd = _etcd(at / "etcd", _required(at, top, "etcd"), timing)

    hosts_at = at / "hosts"
    hosts_table = _table(hosts_at, _required(at, top, "hosts"))
    if not hosts_table:
        hosts_at.fail("must define at least one host")
    hosts = tuple(_host(hosts_at / h, h, spec) for h, spec in hosts_table.items())
    agents: dict[tuple[str, int], str] = {}
    for h in hosts:
        if h.agent in agents:
            (hosts_at / h.name / "agent").fail(
                f"address {h.agent[0]}:{h.agent[1]} is already host {agents[h.agent]!r}'s"
            )
        agents[h.agent] = h.name

    res_at = at / "resources"
    res_table = _table(res_at, top.get("resources", {}))
    resources: list[Resource] = []
    owner: dict[str, str] = {}
    for rname, spec in res_table.items():
        r = _resource(res_at / rname, rname, spec, [h.name for h in hosts])
        for g in r.groups:
            if g in owner:
                (res_at / rname / "groups").fail(
                    f"group {g!r} is already owned by resource {owner[g]!r}"
                )
            owner[g] = rname
        resources.append(r)
    return Config(
        source=path,
        cluster=name,
        secret_file=secret,
        etcd=etcd,
        timing=timing,
        hosts=hosts,
        resources=tuple(resources),
    )


def _timing(at: _At, value: Any) -> Timing:
    t = _table(at, value, _TIMING_KEYS)
    d = Timing()
    hb = _seconds(at / "heartbeat_interval", t.get("heartbeat_interval", d.heartbeat_interval))
    hb_timeout = _seconds(
        at / "heartbeat_timeout", t.get("heartbeat_timeout", max(d.heartbeat_timeout, 5 * hb))
    )
    if hb_timeout < 2 * hb:
        (at / "heartbeat_timeout").fail(
            f"{hb_timeout:g}s is less than two heartbeat intervals ({2 * hb:g}s): "
            "one late heartbeat would lose the peer"
        )
    ttl = t.get("lease_ttl", d.lease_ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int):
        (at / "lease_ttl").fail(
            f"must be a whole number of seconds (etcd's leases are), not {ttl!r}"
        )
    if ttl < 1:
        (at / "lease_ttl").fail(f"must be at least 1 second, not {ttl}")
    renew = _seconds(at / "lease_renew_interval", t.get("lease_renew_interval", ttl / 2))
    if renew > ttl / 2:
        (at / "lease_renew_interval").fail(
            f"{renew:g}s is more than half the lease TTL ({ttl}s): the lease must be renewed "
            "at least twice per TTL"
        )
    return Timing(hb, hb_timeout, ttl, renew)


def _etcd(at: _At, value: Any, timing: Timing) -> EtcdConfig:
    e = _table(at, value, _ETCD_KEYS)
    eps_at = at / "endpoints"
    raw = _required(at, e, "endpoints")
    if isinstance(raw, str) or not isinstance(raw, list):
        eps_at.fail(f"must be an array of URLs (http://HOST:PORT), not {_kind(raw)}")
    if not raw:
        eps_at.fail("must name at least one etcd endpoint")
    endpoints: list[str] = []
    for item in raw:
        ep = eps_at.checked(parse_endpoint, item)
        if ep in endpoints:
            eps_at.fail(f"endpoint {ep} is listed twice")
        endpoints.append(ep)
    default = min(DEFAULT_ETCD_TIMEOUT, timing.lease_renew_interval / 2)
    timeout = _seconds(at / "timeout", e.get("timeout", default))
    if timeout >= timing.lease_renew_interval:
        (at / "timeout").fail(
            f"{timeout:g}s is not shorter than the lease renewal interval "
            f"({timing.lease_renew_interval:g}s): a hung renewal would delay the next one"
        )
    return EtcdConfig(tuple(endpoints), timeout)


def _host(at: _At, name: str, value: Any) -> HostConfig:
    if not _NAME_RE.fullmatch(name):
        at.checked(check_cluster_name, name, what="host name")
    h = _table(at, value, _HOST_KEYS)
    agent_text = _string(at / "agent", _required(at, h, "agent"))
    agent = (at / "agent").checked(parse_address, agent_text, default_port=DEFAULT_AGENT_PORT)
    node_at = at / "node"
    node_text = _string(node_at, _required(at, h, "node"))
    if node_text.startswith("/"):
        node = NodeRef(socket=os.path.normpath(node_text))
    elif is_address(node_text):
        node = NodeRef(address=node_at.checked(parse_address, node_text))
    else:
        node_at.fail(
            f"{node_text!r} is neither the node's control socket (an absolute path) nor its "
            "address (ADDR[:PEERPORT])"
        )
    return HostConfig(name, agent, node)


def _check_group(name: str) -> str:
    return check_name(name, what="group name")


def _check_host(name: str) -> str:
    return check_cluster_name(name, what="host name")


def _resource(at: _At, name: str, value: Any, known_hosts: Collection[str] | None) -> Resource:
    if not _NAME_RE.fullmatch(name):
        at.checked(check_cluster_name, name, what="resource name")
    r = _table(at, value, _RESOURCE_KEYS)
    hosts_at = at / "hosts"
    hosts = _names(hosts_at, _required(at, r, "hosts"), _check_host, "host")
    if known_hosts is not None:
        for h in hosts:
            if h not in known_hosts:
                hosts_at.fail(f"host {h!r} is not defined in [hosts]")
    groups = _names(at / "groups", _required(at, r, "groups"), _check_group, "group")
    devices: list[Device] = []
    dev_at = at / "devices"
    for host, table in _table(dev_at, r.get("devices", {})).items():
        if host not in hosts:
            (dev_at / host).fail(f"host {host!r} is not one of the resource's hosts")
        exports: dict[str, str] = {}
        for dev, export in _table(dev_at / host, table).items():
            d_at = dev_at / host / dev
            d_at.checked(check_device_name, dev)
            canonical = _export(d_at, export)
            if canonical in exports.values():
                d_at.fail(f"export {canonical} is already device {_key_for(exports, canonical)!r}")
            exports[dev] = canonical
            devices.append(Device(host, dev, canonical))
    return Resource(
        name=name,
        hosts=hosts,
        groups=groups,
        devices=tuple(devices),
        start=_opt_string(at / "start", r.get("start")),
        stop=_opt_string(at / "stop", r.get("stop")),
        monitor=_opt_string(at / "monitor", r.get("monitor")),
    )


def _key_for(d: Mapping[str, str], value: str) -> str:
    return next(k for k, v in d.items() if v == value)


def _export(at: _At, value: Any) -> str:
    text = _string(at, value)
    uri = at.checked(parse_uri, text)
    if uri.export.name is None:
        at.fail(f"{text!r} names no export (nbd://ADDR:PORT/EXPORT)")
    if uri.export.pvid is not None:
        at.fail(f"{text!r} carries a PVID: name the export alone (the host cache holds the PVID)")
    return str(uri)


# -- runtime resource records ---------------------------------------------------------------

_RECORD_KEYS = ("version", "name", *_RESOURCE_KEYS)


def resource_to_json(resource: Resource) -> bytes:
    """The record ``pairvol cluster resource create`` stores in etcd (stable key order)."""
    devices: dict[str, dict[str, str]] = {}
    for d in resource.devices:
        devices.setdefault(d.host, {})[d.name] = d.export
    doc = {
        "version": RESOURCE_RECORD_VERSION,
        "name": resource.name,
        "hosts": list(resource.hosts),
        "groups": list(resource.groups),
        "devices": devices,
        "start": resource.start,
        "stop": resource.stop,
        "monitor": resource.monitor,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def resource_from_json(
    data: bytes | str, *, name: str | None = None, known_hosts: Collection[str] | None = None
) -> Resource:
    """Decode and check a resource record: one UsageError, ``resource record NAME: KEY: ...``.

    ``name`` is the name the record is stored under (its key), which the record must repeat;
    ``known_hosts``, when given, are the hosts the resource may name."""
    at = _At(f"resource record {name}" if name else "resource record")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        at.fail(f"not JSON ({e})")
    record = _table(at, doc, _RECORD_KEYS)
    version = _required(at, record, "version")
    if isinstance(version, bool) or not isinstance(version, int):
        (at / "version").fail(f"must be an integer, not {_kind(version)}")
    if version != RESOURCE_RECORD_VERSION:
        (at / "version").fail(f"version {version} is not {RESOURCE_RECORD_VERSION}")
    rname = _string(at / "name", _required(at, record, "name"))
    if name is not None and rname != name:
        (at / "name").fail(f"the record is stored as {name!r} but names {rname!r}")
    at = _At(f"resource record {rname}")
    spec = {k: v for k, v in record.items() if k not in ("version", "name") and v is not None}
    return _resource(at, rname, spec, known_hosts)


def parse_device_option(text: str, hosts: Sequence[str]) -> list[tuple[str, str, str]]:
    """``--device NAME=EXPORT`` (on every host of the resource) or ``HOST:NAME=EXPORT`` (on
    one host) as ``(host, name, export)`` triples; the export is checked by
    :func:`new_resource`."""
    left, eq, export = text.partition("=")
    if not eq or not left or not export:
        raise UsageError(f"--device {text!r}: expected NAME=EXPORT or HOST:NAME=EXPORT")
    host, colon, dev = left.rpartition(":")
    if colon:
        if host not in hosts:
            raise UsageError(f"--device {text!r}: host {host!r} is not in --hosts")
        return [(host, dev, export)]
    return [(h, dev, export) for h in hosts]


def new_resource(
    name: str,
    *,
    hosts: Sequence[str],
    groups: Sequence[str],
    devices: Sequence[str] = (),
    start: str | None = None,
    stop: str | None = None,
    monitor: str | None = None,
    known_hosts: Collection[str] | None = None,
) -> Resource:
    """A resource from ``cluster resource create``'s options (``devices`` are the
    ``--device`` texts), checked as a record is: one UsageError per mistake."""
    table: dict[str, Any] = {}
    for text in devices:
        for host, dev, export in parse_device_option(text, hosts):
            per_host = table.setdefault(host, {})
            if dev in per_host:
                raise UsageError(f"--device {text!r}: device {dev!r} is given twice on {host}")
            per_host[dev] = export
    spec: dict[str, Any] = {"hosts": list(hosts), "groups": list(groups), "devices": table}
    for key, value in (("start", start), ("stop", stop), ("monitor", monitor)):
        if value is not None:
            spec[key] = value
    return _resource(_At(f"resource {name}"), name, spec, known_hosts)


EXAMPLE_CONFIG = """\
# pairvol cluster agent: one file, the same on every host.
[cluster]
name = "lab1"
secret_file = "/etc/pairvol/cluster.secret"   # relative paths: from this file's directory

[etcd]
endpoints = ["http://198.18.0.1:2379", "http://198.18.0.2:2379", "http://198.18.0.3:2379"]
timeout = 0.5                 # seconds, one request

[timing]                      # the defaults, spelt out (see cluster/config.py, Timing)
heartbeat_interval = 0.2
heartbeat_timeout = 1.0
lease_ttl = 2                 # whole seconds
lease_renew_interval = 1.0

[hosts.a]
agent = "198.18.0.2:10811"
node = "/var/lib/pairvol/a/control.sock"      # the storage node's control socket ...

[hosts.b]
agent = "198.18.0.3:10811"
node = "198.18.0.3:10810"                     # ... or its address

[resources.db]
hosts = ["a", "b"]            # preference order
groups = ["g1"]
start = "mount /dev/disk/by-label/db /srv/db && systemctl start postgresql"
stop = "systemctl stop postgresql; umount /srv/db"
monitor = "systemctl is-active --quiet postgresql"

[resources.db.devices.a]
pv0 = "nbd://198.18.0.2:10809/vol1"

[resources.db.devices.b]
pv0 = "nbd://198.18.0.3:10809/vol1"
"""
