"""Multi-host labs on one machine: hosts in network namespaces, a storage node on each.

Usage::

    pairvol lab up NAME --hosts a,b[,c...] [--json]   # namespaces, links, one node per host
    pairvol lab up NAME --hosts a,b --cluster [--etcd-members N]   # ... plus etcd and agents
    pairvol lab status NAME [--json]                  # hosts, addresses, nodes, cuts
    pairvol lab list [--json]
    pairvol lab exec NAME HOST -- CMD...              # run CMD "on" HOST, pass its status
    pairvol lab cut NAME A B / pairvol lab heal NAME A B
    pairvol lab isolate NAME HOST / pairvol lab rejoin NAME HOST   # HOST alone, etcd included
    pairvol lab kill NAME HOST [--only agent]         # SIGKILL every process of HOST
    pairvol lab start NAME HOST                       # restart HOST's node (and agent)
    pairvol lab down NAME                             # remove everything (idempotent)

Design:

- **Namespaces.**  Host ``HOST`` of lab ``NAME`` is the network namespace ``NAME-HOST``.  The
  bridge lives in its own namespace ``NAME-br`` (device ``br0``), not in the root namespace:
  the machine's own interfaces, routes and firewall never see a lab, interface names only
  have to be unique inside a lab (``eth0`` in each host, ``vHOST`` on the bridge side, so
  host names are at most 14 characters), and deleting the namespaces removes every veth and
  the bridge.  ``up`` refuses if any of these namespaces already exists.
- **Addresses.**  Each lab gets its own /24 out of 198.18.0.0/15: subnet index K (1..511,
  the lowest one no other lab in the registry uses) gives ``198.(18+K//256).(K%256).0/24``,
  and the I-th host (from 0, in ``--hosts`` order) gets ``.I+1``.  Labs are isolated from
  each other and from the root namespace anyway; distinct subnets keep addresses unambiguous
  in logs and URIs.  Loopback is up in every host.
- **Nodes.**  On each host, inside its namespace: ``pairvol node start --name HOST --dir
  HOSTDIR --listen ADDR --secret-file LABROOT/NAME/HOST.keys``; NBD on ``ADDR:10809``, peers
  on ``ADDR:10810``, the control socket is ``HOSTDIR/control.sock``.  ``HOSTDIR`` is
  ``LABROOT/NAME/HOST``; the node serves the volumes found in that directory.  Prometheus
  metrics (``--metrics``): the node's on ``ADDR:9810``, the agent's (``--cluster``) on
  ``ADDR:9811``, reachable from the host's namespace (``lab status`` shows the URLs).
- **TLS** (``up --tls``).  ``LABROOT/NAME/tls/`` holds the lab's CA (``ca.pem``, ``ca.key``)
  and each host's certificate (``HOST.pem``, ``HOST.key``: CN and SAN DNS the host's name,
  SAN IP its address), made with ``cryptography``; every node starts with ``--tls-cert
  --tls-key --tls-ca`` and ``lab status --json`` says ``"tls": true``.
- **Peer keys.**  One key per link, so that no host can pose as another (docs/protocol.md,
  "Secrets").  ``LABROOT/NAME/secret`` (mode 0600) is the lab's master secret; the key of
  the link between hosts X and Y is ``HMAC-SHA256(master, "pairvol-lab-link-v1" 0 X 0 Y)``
  in hex, X < Y (:func:`link_key`).  Each host's keyring ``LABROOT/NAME/HOST.keys`` (mode
  0600; host names have no dot, so it never collides with a host directory) holds a line
  ``PEER KEY`` for every other host, and nothing it could use to pose as another host.  A
  lone host's keyring names only itself, so that it is not empty (no node accepts its own
  name from a peer).  A registry written before keyrings has no per-host ``secret_file``;
  its nodes keep using the shared ``secret``.
- **Registry.**  ``LABROOT`` is ``$PAIRVOL_LAB_ROOT`` or ``/var/lib/pairvol/labs``.  Each
  lab is described by ``LABROOT/NAME/lab.json``, replaced atomically (:mod:`replicator.
  atomic_file`) under ``LABROOT/.lock``.  It is written *before* anything is created
  (``"state": "building"``), so ``down`` can always find what a crashed ``up`` left behind.
- **up on an existing name** is refused (AlreadyExists, exit 4) even when the lab looks
  identical: an admin who re-runs ``up`` more likely forgot the lab than wants its state
  (cuts, killed nodes) silently kept.  A failed ``up`` removes what it built.
- **cut A B** adds ``blackhole`` routes (``ip route replace blackhole B/32`` in A's
  namespace and the reverse in B's), so nothing passes either way, established TCP
  connections included; other pairs are unaffected.  Locally sent packets to a cut peer are
  discarded (``connect`` fails at once with EINVAL; an established connection just stops
  getting acknowledgements).  ``heal`` deletes the routes.  Cuts are recorded in the registry;
  cutting a cut pair or healing a healthy one is a no-op.
- **isolate HOST** cuts HOST off, the same way, from every other host and from every etcd
  member (the blackhole routes go in HOST's namespace and in each member's, ``NAME_etcdJ``,
  as well as in the other hosts'): a partition with HOST alone on its side.  ``rejoin``
  undoes it.  Isolations are recorded apart from cuts (``"isolated"``), and a route stays as
  long as a cut or an isolation needs it: a host cut from B, then isolated and rejoined, is
  still cut from B.  Isolating an isolated host or rejoining one that is not isolated is a
  no-op.
- **kill HOST** SIGKILLs every process in the namespace (``ip netns pids``) and waits until
  each is gone, then detaches the loop devices the host's attachments left bound to their
  killed nbdfuse (as a crashed machine keeps none; :mod:`cluster.blockdev` says how only
  the host's own are found); **start HOST** starts its node again.
- **exec** runs in the host's namespace with cwd ``HOSTDIR`` and ``PAIRVOL_NODE_DIR``,
  ``PAIRVOL_LAB``, ``PAIRVOL_LAB_ROOT``, ``PAIRVOL_HOST_CACHE=HOSTDIR/host-cache.json`` set
  and the project's ``.venv/bin`` first on ``PATH``.  Its exit status is the command's
  (128+N if signal N killed it); a command not on ``PATH`` is NotFound (exit 3).  SIGTERM
  and SIGHUP sent to ``lab exec`` are passed on to the command.
- **Cluster** (``up --cluster``).  etcd member J (0..N-1, ``--etcd-members N``, default 1)
  runs in its own namespace ``NAME_etcdJ`` (``_`` cannot appear in a host's namespace, so no
  host collides), plugged into the lab's bridge (``etcdJ`` on the bridge side) at address
  ``.201+J`` of the lab's /24; its data is ``LABROOT/NAME/etcd``
  (:class:`cluster.etcd_server.EtcdCluster`).  The cluster secret is
  ``LABROOT/NAME/cluster.secret`` (mode 0600, generated), the agents' config
  ``LABROOT/NAME/cluster.toml`` (readable, commented: copy it to make a real cluster), with
  the cluster named after the lab, every host's agent on ``ADDR:10811`` and its node by its
  control socket, and no resources (``pairvol cluster resource create`` adds them).  Each
  host runs ``pairvol agent start --host HOST --config ... --state-dir HOSTDIR/agent
  --daemon`` in its namespace.  ``exec`` then also sets ``PAIRVOL_CLUSTER_CONFIG`` and
  ``PAIRVOL_AGENT_DIR``, so ``pairvol cluster ...`` and ``pairvol agent ...`` need no
  options on a lab host.  ``kill HOST --only agent`` SIGKILLs the agent and whatever it
  runs, and leaves the node up; ``start HOST`` starts the node if it is down and the agent.
- **down** stops each agent, detaches what each host's caches still have attached, stops
  each node (SIGTERM, then SIGKILL of whatever is left in the namespace, then the loop
  devices left bound to a killed nbdfuse are detached, as by ``kill``), then etcd, deletes
  the namespaces and removes ``LABROOT/NAME``; on an unknown or half-built lab it does what
  is left to do and exits 0.

``lab.json`` (also what ``up --json`` prints; ``status --json`` adds ``netns_exists``,
``node_pid`` and ``nbd_port`` to each host)::

    {"version": 1, "name": "lab1", "state": "building" | "up", "dir": "LABROOT/lab1",
     "subnet": "198.18.1.0/24", "subnet_index": 1, "secret_file": "LABROOT/lab1/secret",
     "bridge": {"netns": "lab1-br", "device": "br0"}, "created": 1700000000.0,
     "cuts": [["a", "b"]], "isolated": ["c"],
     "cluster": null | {"config": "LABROOT/lab1/cluster.toml", "secret_file": ...,
                 "etcd_dir": "LABROOT/lab1/etcd", "endpoints": ["http://198.18.1.201:2379"],
                 "etcd_netns": ["lab1_etcd0"], "etcd_addresses": ["198.18.1.201"]},
     "hosts": [{"lab": "lab1", "host": "a", "netns": "lab1-a", "address": "198.18.1.1",
                "dir": "LABROOT/lab1/a", "nbd_uri": "nbd://198.18.1.1/", "peer_port": 10810,
                "control": "LABROOT/lab1/a/control.sock",
                "secret_file": "LABROOT/lab1/a.keys"}, ...]}

Python API (used by the pair CLI): :func:`load`, :func:`names`, :func:`resolve_node`,
:class:`Lab`, :class:`LabHost`; the operations :func:`up`, :func:`down`, :func:`cut`,
:func:`heal`, :func:`isolate`, :func:`rejoin`, :func:`kill_host`, :func:`start_node`,
:func:`exec_in`, :func:`status`.
Latency for benchmarks: :mod:`pairvol.latency_proxy`, run inside a host with ``lab exec``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from cluster import agent_process, devices
from cluster.config import DEFAULT_AGENT_PORT
from cluster.etcd_server import CLIENT_PORT, EtcdCluster
from replicator import node_process
from replicator.atomic_file import write_atomic
from replicator.errors import (
    AlreadyExists,
    ExternalCommandFailed,
    HeaderCorrupt,
    IllegalState,
    NotFound,
    PairvolError,
    Timeout,
    UsageError,
)
from replicator.node import CONTROL_SOCKET, NBD_PORT, PEER_PORT

LAB_ROOT_ENV = "PAIRVOL_LAB_ROOT"
LAB_ENV = "PAIRVOL_LAB"
DEFAULT_LAB_ROOT = "/var/lib/pairvol/labs"
REGISTRY = "lab.json"
SECRET = "secret"
KEYRING_SUFFIX = ".keys"
TLS_DIR = "tls"
LINK_KEY_CONTEXT = b"pairvol-lab-link-v1"
LOCK = ".lock"
VERSION = 1

BRIDGE_NETNS_SUFFIX = "br"
BRIDGE_DEVICE = "br0"
HOST_DEVICE = "eth0"
NETWORK = ipaddress.IPv4Network("198.18.0.0/15")
SUBNETS = 512  # /24s in the /15; index 0 is left unused
MAX_HOSTS = 200

LAB_NAME_MAX = 24
HOST_NAME_MAX = 14  # the bridge-side veth is "v" + HOST, and interface names are <= 15 bytes
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")

IP_TIMEOUT = 30.0
#: Each host's node and agent serve Prometheus metrics on the host's address (--metrics).
NODE_METRICS_PORT = 9810
AGENT_METRICS_PORT = 9811
NODE_START_TIMEOUT = 60.0
KILL_TIMEOUT = 15.0

PROJECT = Path(__file__).resolve().parent.parent

CLUSTER_CONFIG = "cluster.toml"
CLUSTER_SECRET = "cluster.secret"
ETCD_DIR = "etcd"
AGENT_DIR = "agent"
ETCD_POSITION = 200  # etcd member J is at .201+J (hosts are at .1 to .200)
MAX_ETCD_MEMBERS = 9


# --------------------------------------------------------------------------- names, addresses


def check_lab_name(name: str) -> str:
    if not (0 < len(name) <= LAB_NAME_MAX and _NAME.fullmatch(name)):
        raise UsageError(
            f"lab name {name!r} is not valid: 1 to {LAB_NAME_MAX} characters of a-z, 0-9 and "
            "'-', not starting or ending with '-'"
        )
    return name


def check_host_name(name: str) -> str:
    if not (0 < len(name) <= HOST_NAME_MAX and _NAME.fullmatch(name)):
        raise UsageError(
            f"host name {name!r} is not valid: 1 to {HOST_NAME_MAX} characters of a-z, 0-9 and "
            "'-', not starting or ending with '-'"
        )
    if name == BRIDGE_NETNS_SUFFIX:
        raise UsageError(f"host name {name!r} is reserved (the lab's bridge namespace)")
    return name


def parse_hosts(text: str) -> list[str]:
    """``a,b,c`` → ``["a", "b", "c"]``: valid, distinct, 1 to MAX_HOSTS names."""
    hosts = [h.strip() for h in text.split(",")]
    for h in hosts:
        check_host_name(h)
    dupes = sorted({h for h in hosts if hosts.count(h) > 1})
    if dupes:
        raise UsageError(f"host {dupes[0]!r} is listed twice")
    if len(hosts) > MAX_HOSTS:
        raise UsageError(f"{len(hosts)} hosts is too many (at most {MAX_HOSTS})")
    return hosts


def subnet(index: int) -> ipaddress.IPv4Network:
    """The /24 of subnet index ``index`` (1..511) inside 198.18.0.0/15."""
    if not 0 < index < SUBNETS:
        raise UsageError(f"subnet index {index} is outside 1..{SUBNETS - 1}")
    return ipaddress.IPv4Network((int(NETWORK.network_address) + index * 256, 24))


def host_address(index: int, position: int) -> str:
    return str(subnet(index).network_address + 1 + position)


def free_subnet(used: set[int]) -> int:
    for k in range(1, SUBNETS):
        if k not in used:
            return k
    raise IllegalState(f"all {SUBNETS - 1} lab subnets of {NETWORK} are in use")


# --------------------------------------------------------------------------- the registry


@dataclass
class LabHost:
    lab: str
    host: str
    netns: str
    address: str
    dir: str
    nbd_uri: str
    peer_port: int
    control: str
    secret_file: str = ""  # the host's keyring ("": a registry from before keyrings)


@dataclass
class Lab:
    name: str
    dir: str
    subnet_index: int
    secret_file: str
    hosts: list[LabHost]
    state: str = "building"  # "building" until every node has started, then "up"
    cuts: list[tuple[str, str]] = field(default_factory=list)
    isolated: list[str] = field(default_factory=list)  # hosts cut off from all (isolate)
    created: float = field(default_factory=time.time)
    cluster: dict[str, Any] | None = None  # up --cluster: etcd, secret, config (see above)
    tls: bool = False  # up --tls: TLS on peer links, certificates in LABROOT/NAME/tls/

    @property
    def subnet(self) -> str:
        return str(subnet(self.subnet_index))

    @property
    def bridge_netns(self) -> str:
        return f"{self.name}-{BRIDGE_NETNS_SUFFIX}"

    def host(self, host: str) -> LabHost:
        for h in self.hosts:
            if h.host == host:
                return h
        known = ", ".join(h.host for h in self.hosts)
        raise NotFound(f"lab {self.name} has no host {host!r} (hosts: {known})")

    def is_cut(self, a: str, b: str) -> bool:
        return _pair(a, b) in self.cuts

    def is_isolated(self, host: str) -> bool:
        return host in self.isolated

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "name": self.name,
            "dir": self.dir,
            "state": self.state,
            "subnet": self.subnet,
            "subnet_index": self.subnet_index,
            "bridge": {"netns": self.bridge_netns, "device": BRIDGE_DEVICE},
            "secret_file": self.secret_file,
            "hosts": [asdict(h) for h in self.hosts],
            "cuts": [list(c) for c in self.cuts],
            "isolated": list(self.isolated),
            "created": self.created,
            "cluster": self.cluster,
            "tls": self.tls,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Lab:
        """Parse a registry document; anything malformed raises ValueError saying what."""
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("version") != VERSION:
            raise ValueError(f"version {doc.get('version')!r} is not {VERSION}")
        try:
            hosts = [LabHost(**h) for h in doc["hosts"]]
            cuts = [_pair(str(a), str(b)) for a, b in doc["cuts"]]
            isolated = [str(h) for h in doc.get("isolated", [])]  # absent before isolate
            unknown = set(isolated) - {h.host for h in hosts}
            if unknown:
                raise ValueError(f"isolated hosts {sorted(unknown)} are not hosts of the lab")
            return cls(
                name=str(doc["name"]),
                dir=str(doc["dir"]),
                subnet_index=int(doc["subnet_index"]),
                secret_file=str(doc["secret_file"]),
                hosts=hosts,
                state=str(doc["state"]),
                cuts=cuts,
                isolated=isolated,
                created=float(doc["created"]),
                cluster=_cluster_doc(doc.get("cluster")),
                tls=doc.get("tls", False) is True,  # absent before --tls
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed lab description: {e!r}") from e


def _cluster_doc(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(value.get(k), str) for k in ("config", "secret_file", "etcd_dir")
    ):
        raise ValueError(f"cluster: {value!r} is not a lab cluster description")
    return value


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def lab_root() -> str:
    return os.path.abspath(os.environ.get(LAB_ROOT_ENV) or DEFAULT_LAB_ROOT)


def _registry_path(name: str) -> str:
    return os.path.join(lab_root(), name, REGISTRY)


def names() -> list[str]:
    """The labs in the registry, sorted."""
    root = lab_root()
    try:
        entries = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [n for n in entries if os.path.isfile(os.path.join(root, n, REGISTRY))]


def load(name: str) -> Lab:
    """The lab called ``name`` (NotFound if there is none; HeaderCorrupt if unreadable)."""
    check_lab_name(name)
    path = _registry_path(name)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        known = ", ".join(names()) or "none"
        raise NotFound(f"no lab named {name!r} in {lab_root()} (labs: {known})") from None
    except (OSError, ValueError) as e:
        raise HeaderCorrupt(f"lab description {path} is unreadable: {e}") from e
    try:
        return Lab.from_json(doc)
    except ValueError as e:
        raise HeaderCorrupt(f"lab description {path}: {e}") from e


def _save(lab: Lab) -> None:
    data = json.dumps(lab.to_json(), indent=2, sort_keys=True).encode() + b"\n"
    write_atomic(os.path.join(lab.dir, REGISTRY), data)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise registry changes (name claims, subnet choice, cut records) across processes."""
    root = lab_root()
    os.makedirs(root, exist_ok=True)
    fd = os.open(os.path.join(root, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def resolve_node(node: str, lab: str | None = None) -> LabHost | None:
    """The lab host whose node is called ``node``.

    Looks in ``lab`` if given, else in ``$PAIRVOL_LAB`` if set, else in every lab (UsageError
    if several labs have such a host).  None if no lab has it.
    """
    chosen = lab or os.environ.get(LAB_ENV) or None
    candidates = [chosen] if chosen else names()
    found: list[LabHost] = []
    for name in candidates:
        with contextlib.suppress(NotFound):
            found.extend(h for h in load(name).hosts if h.host == node)
        if chosen is not None and not found:
            load(chosen)  # an explicit lab that does not exist is an error, not "no host"
    if len(found) > 1:
        labs = ", ".join(h.lab for h in found)
        raise UsageError(f"node {node!r} is in several labs ({labs}); choose one with ${LAB_ENV}")
    return found[0] if found else None


# --------------------------------------------------------------------------- helpers


def _run(cmd: Sequence[str], timeout: float = IP_TIMEOUT) -> str:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise ExternalCommandFailed(f"{cmd[0]} is not installed (run tools/setup)") from e
    except subprocess.TimeoutExpired as e:
        raise Timeout(f"{' '.join(cmd)} did not finish within {timeout:.0f}s") from e
    if r.returncode != 0:
        msg = (r.stderr.strip() or r.stdout.strip() or f"status {r.returncode}").splitlines()
        raise ExternalCommandFailed(f"{' '.join(cmd)}: {msg[-1]}")
    return r.stdout


def _ip(*args: str) -> str:
    return _run(["ip", *args])


def _require_root() -> None:
    if os.geteuid() != 0:
        raise IllegalState("labs need root (network namespaces)")


def netns_exists(netns: str) -> bool:
    return os.path.exists(os.path.join("/run/netns", netns))


def netns_pids(netns: str) -> list[int]:
    if not netns_exists(netns):
        return []
    return sorted(int(p) for p in _ip("netns", "pids", netns).split())


def _alive(pid: int) -> bool:
    """Whether any thread of ``pid`` runs (a lone zombie is dead: PID 1 may never reap it)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return len(tasks) > 1 or stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_netns(netns: str, timeout: float = KILL_TIMEOUT) -> list[int]:
    """SIGKILL every process in ``netns`` until none is left; return the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in netns_pids(netns) if _alive(p)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if pid not in killed:
                killed.append(pid)
        if not any(_alive(p) for p in killed) and not pids:
            return killed
        if time.monotonic() > deadline:
            left = [p for p in killed if _alive(p)]
            raise Timeout(f"processes {left} in {netns} survived SIGKILL for {timeout:.0f}s")
        time.sleep(0.02)


def bin_dir() -> str:
    """Where ``pairvol`` lives: the project's .venv/bin, else next to this interpreter."""
    venv = PROJECT / ".venv" / "bin"
    return str(venv) if (venv / "pairvol").exists() else os.path.dirname(sys.executable)


def host_env(lab: Lab, host: LabHost) -> dict[str, str]:
    """The environment of a command run "on" ``host`` (see ``lab exec``)."""
    path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env = dict(
        os.environ,
        PATH=f"{bin_dir()}:{path}",
        PAIRVOL_NODE_DIR=host.dir,
        PAIRVOL_LAB=lab.name,
        PAIRVOL_LAB_ROOT=lab_root(),
        PAIRVOL_HOST_CACHE=os.path.join(host.dir, "host-cache.json"),
    )
    if lab.cluster is not None:
        env[agent_process.CONFIG_ENV] = lab.cluster["config"]
        env[agent_process.AGENT_DIR_ENV] = agent_dir(host)
    else:
        env.pop(agent_process.CONFIG_ENV, None)
        env.pop(agent_process.AGENT_DIR_ENV, None)
    return env


def agent_dir(host: LabHost) -> str:
    return os.path.join(host.dir, AGENT_DIR)


def _node_start_cmd(lab: Lab, host: LabHost) -> list[str]:
    secret_file = host.secret_file or lab.secret_file
    return [
        "ip", "netns", "exec", host.netns,
        sys.executable, "-m", "pairvol", "node", "start", "--name", host.host,
        "--dir", host.dir, "--listen", host.address, "--secret-file", secret_file,
        "--metrics", f"{host.address}:{NODE_METRICS_PORT}",
        *_tls_options(lab, host),
    ]  # fmt: skip


def _tls_options(lab: Lab, host: LabHost) -> list[str]:
    """``--tls-*`` for the node of ``host`` in a lab made with ``--tls`` (see up)."""
    if not lab.tls:
        return []
    d = os.path.join(lab.dir, TLS_DIR)
    return ["--tls-cert", os.path.join(d, f"{host.host}.pem"),
            "--tls-key", os.path.join(d, f"{host.host}.key"),
            "--tls-ca", os.path.join(d, "ca.pem")]  # fmt: skip


def _make_certificates(lab: Lab) -> None:
    """The lab's CA and one certificate per host (CN and SAN DNS: the host's node name, SAN
    IP: its address), in ``LABROOT/NAME/tls/``; keys mode 0600."""
    from replicator.tls import new_ca, new_node_cert  # cryptography: only for --tls

    d = os.path.join(lab.dir, TLS_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    ca = new_ca(d, f"pairvol lab {lab.name} CA")
    for h in lab.hosts:
        new_node_cert(d, ca, h.host, h.address)


def link_key(master: bytes, a: str, b: str) -> str:
    """The key of the link between hosts ``a`` and ``b``: the same whichever side asks,
    different for every pair of hosts, and not computable without the lab's master secret."""
    x, y = _pair(a, b)
    text = b"\0".join((LINK_KEY_CONTEXT, x.encode(), y.encode()))
    return hmac.new(master, text, hashlib.sha256).hexdigest()


def keyring_text(master: bytes, host: str, hosts: Sequence[str]) -> str:
    """The secret file of ``host``: one ``PEER KEY`` line per other host of ``hosts``."""
    peers = [h for h in hosts if h != host] or [host]  # a lone host: see the module docstring
    lines = [f"# pairvol lab keyring of host {host}: PEERNAME SECRET, one key per link"]
    lines += [f"{peer} {link_key(master, host, peer)}" for peer in peers]
    return "\n".join(lines) + "\n"


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _start_nodes(lab: Lab, hosts: list[LabHost]) -> None:
    """Start the nodes of ``hosts`` in parallel; each returns once its node is ready."""
    procs = [
        (
            h,
            subprocess.Popen(
                _node_start_cmd(lab, h),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=host_env(lab, h),
            ),
        )
        for h in hosts
    ]
    failures: list[str] = []
    deadline = time.monotonic() + NODE_START_TIMEOUT
    for h, p in procs:
        try:
            _, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            failures.append(f"{h.host}: node start timed out")
            continue
        if p.returncode != 0:
            lines = err.strip().splitlines() or [f"status {p.returncode}"]
            failures.append(f"{h.host}: {lines[-1].removeprefix('pairvol: error: ')}")
    if failures:
        raise ExternalCommandFailed(f"lab {lab.name}: node start failed: {'; '.join(failures)}")


# --------------------------------------------------------------------------- operations


def up(
    name: str,
    hosts: Sequence[str],
    *,
    cluster: bool = False,
    etcd_members: int = 1,
    tls: bool = False,
) -> Lab:
    """Build lab ``name`` with ``hosts`` and start a node on each; AlreadyExists if it exists.
    With ``cluster``: etcd (``etcd_members`` members) and an agent on each host as well.
    With ``tls``: a lab CA, a certificate per host, and TLS on every peer link."""
    check_lab_name(name)
    hosts = parse_hosts(",".join(hosts))
    if not cluster and etcd_members != 1:
        raise UsageError("--etcd-members needs --cluster")
    if isinstance(etcd_members, bool) or not 0 < etcd_members <= MAX_ETCD_MEMBERS:
        raise UsageError(f"--etcd-members {etcd_members!r} is not 1 to {MAX_ETCD_MEMBERS}")
    _require_root()
    if cluster and shutil.which("etcd") is None:
        raise ExternalCommandFailed("etcd is not installed (run tools/setup)")
    if shutil.which("ip") is None:
        raise ExternalCommandFailed("ip (iproute2) is not installed (run tools/setup)")
    root = lab_root()
    with _locked():
        lab_dir = os.path.join(root, name)
        if os.path.exists(lab_dir):
            if not os.path.exists(os.path.join(lab_dir, REGISTRY)):
                raise AlreadyExists(f"{lab_dir} exists but describes no lab; remove it first")
            raise AlreadyExists(
                f"lab {name} already exists (pairvol lab status {name}; pairvol lab down {name})"
            )
        wanted = [f"{name}-{BRIDGE_NETNS_SUFFIX}"] + [f"{name}-{h}" for h in hosts]
        taken = [ns for ns in wanted if netns_exists(ns)]
        if taken:
            raise AlreadyExists(
                f"network namespace {taken[0]} already exists (another lab, or a leftover: "
                f"ip netns del {taken[0]})"
            )
        used = set()
        for other in names():
            with contextlib.suppress(PairvolError):
                used.add(load(other).subnet_index)
        index = free_subnet(used)
        os.makedirs(lab_dir, mode=0o755)
        secret_file = os.path.join(lab_dir, SECRET)
        master = secrets.token_hex(32)
        _write_private(secret_file, master + "\n")
        lab_hosts = []
        for i, h in enumerate(hosts):
            address = host_address(index, i)
            hdir = os.path.join(lab_dir, h)
            keyring = os.path.join(lab_dir, h + KEYRING_SUFFIX)
            _write_private(keyring, keyring_text(master.encode(), h, hosts))
            lab_hosts.append(
                LabHost(
                    lab=name,
                    host=h,
                    netns=f"{name}-{h}",
                    address=address,
                    dir=hdir,
                    nbd_uri=f"nbd://{address}/",
                    peer_port=PEER_PORT,
                    control=os.path.join(hdir, CONTROL_SOCKET),
                    secret_file=keyring,
                )
            )
        lab = Lab(name, lab_dir, index, secret_file, lab_hosts, tls=tls)
        if tls:
            _make_certificates(lab)
        if cluster:
            lab.cluster = _cluster_plan(lab, etcd_members)
        _save(lab)  # first, so that `down` finds whatever a crash leaves behind
    try:
        _build_network(lab)
        for lh in lab.hosts:
            os.makedirs(lh.dir, mode=0o755, exist_ok=True)
        _start_nodes(lab, lab.hosts)
        if lab.cluster is not None:
            _start_cluster(lab)
        lab.state = "up"
        with _locked():
            _save(lab)
    except BaseException:
        with contextlib.suppress(PairvolError):
            down(name)
        raise
    return lab


def _build_network(lab: Lab) -> None:
    br = lab.bridge_netns
    _ip("netns", "add", br)
    _ip("-n", br, "link", "set", "lo", "up")
    _ip("-n", br, "link", "add", BRIDGE_DEVICE, "type", "bridge")
    _ip("-n", br, "link", "set", BRIDGE_DEVICE, "up")
    prefix = subnet(lab.subnet_index).prefixlen
    for h in lab.hosts:
        _ip("netns", "add", h.netns)
        _ip("-n", h.netns, "link", "set", "lo", "up")
        port = f"v{h.host}"
        _ip("-n", br, "link", "add", port, "type", "veth", "peer", "name", HOST_DEVICE,
            "netns", h.netns)  # fmt: skip
        _ip("-n", br, "link", "set", port, "master", BRIDGE_DEVICE, "up")
        _ip("-n", h.netns, "addr", "add", f"{h.address}/{prefix}", "dev", HOST_DEVICE)
        _ip("-n", h.netns, "link", "set", HOST_DEVICE, "up")


# --------------------------------------------------------------------------- the cluster


def _cluster_plan(lab: Lab, members: int) -> dict[str, Any]:
    addresses = [host_address(lab.subnet_index, ETCD_POSITION + j) for j in range(members)]
    return {
        "config": os.path.join(lab.dir, CLUSTER_CONFIG),
        "secret_file": os.path.join(lab.dir, CLUSTER_SECRET),
        "etcd_dir": os.path.join(lab.dir, ETCD_DIR),
        "etcd_netns": [f"{lab.name}_etcd{j}" for j in range(members)],
        "etcd_addresses": addresses,
        "endpoints": [f"http://{a}:{CLIENT_PORT}" for a in addresses],
    }


def cluster_config_text(lab: Lab) -> str:
    """The agents' config of a lab: readable, every default spelt out."""
    assert lab.cluster is not None
    c = lab.cluster
    endpoints = ", ".join(f'"{e}"' for e in c["endpoints"])
    lines = [
        f"# pairvol cluster of lab {lab.name}: one file for every host's agent.",
        "# Copy and edit it for a real cluster (see cluster/config.py, EXAMPLE_CONFIG).",
        "[cluster]",
        f'name = "{lab.name}"',
        f'secret_file = "{c["secret_file"]}"',
        "",
        "[etcd]",
        f"endpoints = [{endpoints}]",
        "timeout = 0.5                 # seconds, one request",
        "",
        "[timing]                      # the defaults (cluster/config.py, Timing, says why)",
        "heartbeat_interval = 0.2",
        "heartbeat_timeout = 1.0",
        "lease_ttl = 2                 # whole seconds",
        "lease_renew_interval = 1.0",
    ]
    for h in lab.hosts:
        lines += [
            "",
            f"[hosts.{h.host}]",
            f'agent = "{h.address}:{DEFAULT_AGENT_PORT}"',
            f'node = "{h.control}"',
        ]
    lines += [
        "",
        "# Resources: add [resources.NAME] tables here, or at run time:",
        "#   pairvol cluster resource create NAME --group GROUP --hosts a,b --start CMD ...",
    ]
    return "\n".join(lines) + "\n"


_ETCD_STARTER = """
import json, sys
from cluster.etcd_server import EtcdCluster
from replicator.errors import PairvolError
a = json.loads(sys.argv[1])
try:
    EtcdCluster(a["dir"], len(a["netns"]), a["addresses"], a["netns"], token=a["token"]).start()
except PairvolError as e:
    sys.exit(f"pairvol: error: {e}")
"""


def _start_etcd(lab: Lab) -> None:
    """Start the lab's etcd from a process of its own that exits once etcd is healthy, so
    that the members are nobody's children here (``down`` stops them by their pid files)."""
    assert lab.cluster is not None
    c = lab.cluster
    spec = {"dir": c["etcd_dir"], "netns": c["etcd_netns"], "addresses": c["etcd_addresses"],
            "token": f"pairvol-lab-{lab.name}"}  # fmt: skip
    _run([sys.executable, "-c", _ETCD_STARTER, json.dumps(spec)], timeout=60.0)


def _start_cluster(lab: Lab) -> None:
    assert lab.cluster is not None
    c = lab.cluster
    prefix = subnet(lab.subnet_index).prefixlen
    for j, (ns, address) in enumerate(zip(c["etcd_netns"], c["etcd_addresses"], strict=True)):
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        port = f"etcd{j}"
        _ip("-n", lab.bridge_netns, "link", "add", port, "type", "veth", "peer", "name",
            HOST_DEVICE, "netns", ns)  # fmt: skip
        _ip("-n", lab.bridge_netns, "link", "set", port, "master", BRIDGE_DEVICE, "up")
        _ip("-n", ns, "addr", "add", f"{address}/{prefix}", "dev", HOST_DEVICE)
        _ip("-n", ns, "link", "set", HOST_DEVICE, "up")
    _start_etcd(lab)
    _write_private(c["secret_file"], secrets.token_hex(32) + "\n")
    write_atomic(c["config"], cluster_config_text(lab).encode())
    for h in lab.hosts:
        start_agent_on(lab, h)


def _agent_start_cmd(lab: Lab, host: LabHost) -> list[str]:
    assert lab.cluster is not None
    return [
        "ip", "netns", "exec", host.netns,
        sys.executable, "-m", "pairvol", "agent", "start", "--host", host.host,
        "--config", lab.cluster["config"], "--state-dir", agent_dir(host), "--daemon",
        "--metrics", f"{host.address}:{AGENT_METRICS_PORT}",
    ]  # fmt: skip


def agent_pid(host: LabHost) -> int | None:
    return agent_process.running_pid(os.path.join(agent_dir(host), "agent.pid"))


def start_agent_on(lab: Lab, host: LabHost) -> int:
    """Start ``host``'s agent (in its namespace, as a daemon); its pid."""
    if lab.cluster is None:
        raise IllegalState(f"lab {lab.name} has no cluster (lab up --cluster)")
    pid = agent_pid(host)
    if pid is not None:
        raise IllegalState(f"the agent of {host.host} in lab {lab.name} already runs (pid {pid})")
    r = subprocess.run(
        _agent_start_cmd(lab, host), capture_output=True, text=True, env=host_env(lab, host),
        timeout=agent_process.START_TIMEOUT + 10, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines() or [f"status {r.returncode}"]
        raise ExternalCommandFailed(
            f"lab {lab.name}: agent {host.host}: {lines[-1].removeprefix('pairvol: error: ')}"
        )
    started = agent_pid(host)
    if started is None:
        raise ExternalCommandFailed(f"lab {lab.name}: agent {host.host} exited after start")
    return started


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every process below it; the pids killed."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _, alive = psutil.wait_procs(procs, timeout=KILL_TIMEOUT)
    if alive:
        raise Timeout(f"processes {[p.pid for p in alive]} survived SIGKILL")
    return [p.pid for p in procs]


def _release_loops(h: LabHost) -> list[str]:
    """After every process of ``h`` was killed: detach the loop devices its attachments left
    bound to their dead nbdfuse (nothing else ever would; see :mod:`cluster.blockdev`)."""
    if not os.path.isdir(h.dir):
        return []
    done, failed = devices.release_loops(h.dir)
    return done + [f"could not detach {what}" for what in failed]


def down(name: str) -> list[str]:
    """Tear lab ``name`` down; return what was done (empty: there was nothing to do)."""
    check_lab_name(name)
    _require_root()
    try:
        lab: Lab | None = load(name)
    except NotFound:
        lab = None
    done: list[str] = []
    if lab is None:
        return done
    for h in lab.hosts if lab.cluster is not None else []:
        if agent_pid(h) is not None:
            try:
                pid = agent_process.stop(agent_dir(h), os.path.join(agent_dir(h), "agent.pid"))
                done.append(f"stopped agent {h.host} (pid {pid})")
            except PairvolError:
                pass  # SIGKILLed below with everything else in the namespace
    for h in lab.hosts:
        if os.path.isdir(h.dir):
            detached, _ = devices.detach_all(h.dir)  # a failure: released below
            done += [f"{h.host}: {step}" for step in detached]
        if node_process.running_pid(h.dir) is not None:
            try:
                pid = node_process.stop(h.dir, timeout=10.0)
                done.append(f"stopped node {h.host} (pid {pid})")
            except PairvolError:
                pass  # SIGKILLed below with everything else in the namespace
        killed = _kill_netns(h.netns)
        if killed:
            done.append(f"killed {len(killed)} process(es) on {h.host}")
        done += [f"{h.host}: {step}" for step in _release_loops(h)]
    etcd_netns: list[str] = []
    if lab.cluster is not None:
        etcd_netns = list(lab.cluster["etcd_netns"])
        if os.path.isdir(lab.cluster["etcd_dir"]):
            with contextlib.suppress(PairvolError, OSError, ValueError):
                EtcdCluster.open(lab.cluster["etcd_dir"]).stop()
                done.append("stopped etcd")
        for ns in etcd_netns:
            if _kill_netns(ns):
                done.append(f"killed what was left in {ns}")
    for ns in [h.netns for h in lab.hosts] + etcd_netns + [lab.bridge_netns]:
        if netns_exists(ns):
            _ip("netns", "del", ns)
            done.append(f"deleted namespace {ns}")
    if os.path.isdir(lab.dir):
        shutil.rmtree(lab.dir)
        done.append(f"removed {lab.dir}")
    return done


def start_node(name: str, host: str) -> int:
    """Start ``host``'s node again (after ``kill_host``); return its pid."""
    _require_root()
    lab = load(name)
    h = lab.host(host)
    if not netns_exists(h.netns):
        raise IllegalState(f"host {host} of lab {name} has no namespace {h.netns} (lab down?)")
    pid = node_process.running_pid(h.dir)
    if pid is not None:
        raise IllegalState(f"the node of {host} in lab {name} is already running (pid {pid})")
    _start_nodes(lab, [h])
    started = node_process.running_pid(h.dir)
    if started is None:
        raise ExternalCommandFailed(f"the node of {host} in lab {name} exited after start")
    return started


def start_host(name: str, host: str) -> dict[str, int]:
    """After a kill: start ``host``'s node if it is down and, in a cluster lab, its agent if
    it is down; the pids started (IllegalState if both already run)."""
    _require_root()
    lab = load(name)
    h = lab.host(host)
    started: dict[str, int] = {}
    if node_process.running_pid(h.dir) is None:
        started["node"] = start_node(name, host)
    if lab.cluster is not None and agent_pid(h) is None:
        started["agent"] = start_agent_on(lab, h)
    if not started:
        raise IllegalState(f"the node of {host} in lab {name} is already running")
    return started


def kill_host(name: str, host: str, *, only: str | None = None) -> list[int]:
    """SIGKILL every process of ``host`` and wait until all are gone; return their pids.
    ``only="agent"``: just the agent and what it runs (the node stays up)."""
    _require_root()
    lab = load(name)
    h = lab.host(host)
    if only is None:
        killed = _kill_netns(h.netns)
        _release_loops(h)  # a crashed machine keeps no loop device either
        return killed
    if only != "agent":
        raise UsageError(f"--only {only!r}: only 'agent' can be killed alone")
    if lab.cluster is None:
        raise IllegalState(f"lab {name} has no cluster, so no agent (lab up --cluster)")
    pid = agent_pid(h)
    return [] if pid is None else _kill_tree(pid)


def _check_pair(lab: Lab, a: str, b: str) -> tuple[LabHost, LabHost]:
    ha, hb = lab.host(a), lab.host(b)
    if a == b:
        raise UsageError(f"cannot cut or heal host {a} from itself")
    return ha, hb


def cut(name: str, a: str, b: str) -> bool:
    """Break connectivity between hosts ``a`` and ``b``; False if it was already cut."""
    _require_root()
    with _locked():
        lab = load(name)
        _check_pair(lab, a, b)
        if lab.is_cut(a, b):
            return False
        before = _blackholes(lab)
        lab.cuts.append(_pair(a, b))
        _route(lab, before)
    return True


def heal(name: str, a: str, b: str) -> bool:
    """Restore connectivity between ``a`` and ``b`` (unless an isolation of either still
    needs it cut); False if it was not cut."""
    _require_root()
    with _locked():
        lab = load(name)
        _check_pair(lab, a, b)
        if not lab.is_cut(a, b):
            return False
        before = _blackholes(lab)
        lab.cuts.remove(_pair(a, b))
        _route(lab, before)
    return True


def isolate(name: str, host: str) -> bool:
    """Cut ``host`` off from every other host and every etcd member; False if it already was."""
    _require_root()
    with _locked():
        lab = load(name)
        lab.host(host)
        if lab.is_isolated(host):
            return False
        before = _blackholes(lab)
        lab.isolated.append(host)
        _route(lab, before)
    return True


def rejoin(name: str, host: str) -> bool:
    """Undo ``isolate(name, host)`` (the host's own cuts stay); False if it was not isolated."""
    _require_root()
    with _locked():
        lab = load(name)
        lab.host(host)
        if not lab.is_isolated(host):
            return False
        before = _blackholes(lab)
        lab.isolated.remove(host)
        _route(lab, before)
    return True


def _reachable_from(lab: Lab, host: LabHost) -> list[tuple[str, str]]:
    """``(namespace, address)`` of everything on the lab's network but ``host``: the other
    hosts and the etcd members (each in a namespace of its own, see ``_cluster_plan``)."""
    others = [(h.netns, h.address) for h in lab.hosts if h.host != host.host]
    if lab.cluster is not None:
        c = lab.cluster
        others += list(zip(c["etcd_netns"], c["etcd_addresses"], strict=True))
    return others


def _blackholes(lab: Lab) -> set[tuple[str, str]]:
    """The blackhole routes ``(namespace, address)`` that the lab's cuts and isolations need,
    both directions of each: a route shared by a cut and an isolation goes with the last."""
    routes: set[tuple[str, str]] = set()
    for a, b in lab.cuts:
        ha, hb = lab.host(a), lab.host(b)
        routes |= {(ha.netns, hb.address), (hb.netns, ha.address)}
    for x in lab.isolated:
        hx = lab.host(x)
        for netns, address in _reachable_from(lab, hx):
            routes |= {(hx.netns, address), (netns, hx.address)}
    return routes


def _route(lab: Lab, before: set[tuple[str, str]]) -> None:
    """Bring the namespaces' blackhole routes from ``before`` to what ``lab`` needs now, then
    record ``lab`` (under ``_locked``)."""
    after = _blackholes(lab)
    for netns, address in sorted(after - before):
        _ip("-n", netns, "route", "replace", "blackhole", f"{address}/32")
    for netns, address in sorted(before - after):
        if _ip("-n", netns, "route", "show", "type", "blackhole", f"{address}/32").strip():
            _ip("-n", netns, "route", "del", "blackhole", f"{address}/32")
    _save(lab)


def exec_in(name: str, host: str, argv: Sequence[str]) -> int:
    """Run ``argv`` on ``host`` (see the module docstring); return its exit status."""
    if not argv:
        raise UsageError("no command given (pairvol lab exec NAME HOST -- CMD...)")
    _require_root()
    lab = load(name)
    h = lab.host(host)
    if not netns_exists(h.netns):
        raise IllegalState(f"host {host} of lab {name} has no namespace {h.netns}")
    env = host_env(lab, h)
    if "/" not in argv[0] and shutil.which(argv[0], path=env["PATH"]) is None:
        raise NotFound(f"command {argv[0]!r} not found on {host} (PATH={env['PATH']})")
    child = subprocess.Popen(["ip", "netns", "exec", h.netns, *argv], cwd=h.dir, env=env)
    with _forwarding_signals(child):
        code = child.wait()
    return code if code >= 0 else 128 - code


@contextlib.contextmanager
def _forwarding_signals(child: subprocess.Popen[bytes]) -> Iterator[None]:
    """Pass SIGTERM and SIGHUP on to ``child`` (``kill`` of ``lab exec`` reaches the command)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def status(name: str) -> dict[str, Any]:
    """The lab description plus what is running now."""
    lab = load(name)
    doc = lab.to_json()
    for entry, h in zip(doc["hosts"], lab.hosts, strict=True):
        entry["netns_exists"] = netns_exists(h.netns)
        entry["node_pid"] = node_process.running_pid(h.dir)
        entry["nbd_port"] = NBD_PORT
        entry["node_metrics"] = f"http://{h.address}:{NODE_METRICS_PORT}/metrics"
        entry["agent_metrics"] = (
            f"http://{h.address}:{AGENT_METRICS_PORT}/metrics" if lab.cluster else None
        )
    return doc
