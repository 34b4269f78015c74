"""A storage node: the pairvol plugin running inside nbdkit as a long-lived service.

One nbdkit process per node serves every volume in the node's directory over NBD (TCP
``ADDR:10809`` and ``DIR/nbd.sock``, both inherited by socket activation, see
:mod:`replicator.node_process`) and, in the same process, runs the control API on
``DIR/control.sock``.  Because one process owns each volume's data, the write path of a pair
(next) needs no IPC.  The node writes its structured event log to ``DIR/events.jsonl``.

:class:`Service` is what the plugin talks to: the exporter alone (``volume=`` / ``dir=``), or the
exporter plus a :class:`Node` when ``node=NAME`` is configured.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import crc32c

from replicator.control import ControlServer
from replicator.errors import IllegalState, NotFound, UsageError
from replicator.events import EventLog
from replicator.export import Exporter, ExportHandle
from replicator.export_info import VolInfo
from replicator.pair.manager import PairManager
from replicator.peer_auth import PeerSecrets, parse_secrets
from replicator.peer_link import PeerServer
from replicator.tls import PeerTls, check_options
from replicator.wire import check_node_name

if TYPE_CHECKING:
    from replicator.metrics import MetricsServer

CONTROL_SOCKET = "control.sock"
NBD_SOCKET = "nbd.sock"
EVENTS = "events.jsonl"
PIDFILE = "node.pid"
LOG = "node.log"
NBD_PORT = 10809
PEER_PORT = 10810

NODE_KEYS = frozenset(
    {"node", "listen", "nbd-port", "peer-port", "secret-file", "metrics"}
    | {"tls-cert", "tls-key", "tls-ca"}
)


def _log_stderr(message: str) -> None:
    print(f"pairvol: {message}", file=sys.stderr, flush=True)


@dataclass
class NodeConfig:
    name: str = ""
    listen: str = ""
    nbd_port: int = NBD_PORT
    peer_port: int = PEER_PORT
    secret_file: str | None = None
    metrics: str = ""  # ADDR:PORT of the Prometheus endpoint (replicator/metrics.py); "": none
    tls_cert: str = ""  # TLS on peer links (replicator/tls.py): all three or none
    tls_key: str = ""
    tls_ca: str = ""

    def set(self, key: str, value: str) -> None:
        if key == "node":
            self.name = check_node_name(value)
        elif key == "listen":
            self.listen = value
        elif key in ("nbd-port", "peer-port"):
            try:
                port = int(value)
            except ValueError:
                port = -1
            if not 0 < port < 65536:
                raise UsageError(f"{key}={value!r} is not a TCP port")
            setattr(self, key.replace("-", "_"), port)
        elif key == "secret-file":
            self.secret_file = os.path.abspath(value)
        elif key in ("tls-cert", "tls-key", "tls-ca"):
            setattr(self, key.replace("-", "_"), os.path.abspath(value))
        elif key == "metrics":
            from replicator.metrics import parse_address  # only a node that serves metrics

            self.metrics = str(parse_address(value, "metrics="))
        else:
            raise UsageError(f"unknown node parameter {key!r}")

    def load_tls(self) -> PeerTls | None:
        """The peer links' TLS, if configured (all three files or none)."""
        if not check_options(self.tls_cert, self.tls_key, self.tls_ca):
            return None
        return PeerTls.load(self.tls_cert, self.tls_key, self.tls_ca)


def _listen_peer(address: str, port: int) -> socket.socket:
    """The replication listener (peers connect here; see replicator.peer_link)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as e:
        sock.close()
        raise IllegalState(f"cannot listen for peers on {address}:{port}: {e.strerror}") from e
    sock.listen(64)
    return sock


def read_secret(path: str) -> PeerSecrets:
    """The peer keys in the secret file ``path`` (docs/protocol.md, "Secrets"): a keyring of
    ``PEERNAME SECRET`` lines, or one bare secret shared by every node; never empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise NotFound(f"secret file {path} does not exist") from e
    except OSError as e:
        raise UsageError(f"cannot read secret file {path}: {e.strerror}") from e
    return parse_secrets(data, f"secret file {path}")


@dataclass
class Node:
    config: NodeConfig
    directory: str
    exporter: Exporter
    shutdown: Callable[[], None]
    log: Callable[[str], None] = _log_stderr
    started: float = field(default_factory=time.time)
    events: EventLog = field(init=False)
    control: ControlServer = field(init=False)

    def __post_init__(self) -> None:
        self.events = EventLog(os.path.join(self.directory, EVENTS))
        path = self.config.secret_file
        secret = read_secret(path) if path else PeerSecrets()
        if secret.shared:
            self.log(
                f"secret file {path} holds one secret shared by every node: any node that has "
                "it can pose as any other (a keyring of PEERNAME SECRET lines cannot)"
            )
        self.secret = secret
        self.tls = self.config.load_tls()
        self.pairs = PairManager(
            self.config.name,
            self.directory,
            self.config.listen,
            self.config.peer_port,
            secret,
            self.events,
            self.log,
            tls=self.tls,
        )
        self.peer_server: PeerServer | None = None
        self.metrics: MetricsServer | None = None
        self.control = ControlServer(
            os.path.join(self.directory, CONTROL_SOCKET),
            {
                "node.status": self.status,
                "node.stop": self.stop_request,
                **self.pairs.handlers(),
            },
            self.log,
        )

    def start(self) -> None:
        if self.config.listen:
            sock = _listen_peer(self.config.listen, self.config.peer_port)
            self.peer_server = PeerServer(
                self.config.name,
                sock,
                self.secret,
                self.pairs.handle_peer,
                self.log,
                allow_no_secret=not self.secret,
                inline=self.pairs.receives_inline,
                tls=self.tls,
                compress_for=self.pairs.compress_for,
            )
        self.pairs.start()
        if self.peer_server is not None:
            self.peer_server.start()
        if self.config.metrics:  # before the control socket: the node is ready after both
            from replicator import metrics  # prometheus_client: only when asked for

            self.metrics = metrics.serve_node(
                metrics.parse_address(self.config.metrics, "metrics="),
                self.config.name,
                lambda: self.pairs.op_display({})["pairs"],
            )
        self.control.start()
        self.events.emit(
            "node.started",
            node=self.config.name,
            pid=os.getpid(),
            # which CRC32C the node computes with (the PyPI build has SSE4.2; Debian's has not)
            crc32c_hardware=bool(getattr(crc32c, "hardware_based", False)),
        )

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        self.control.stop()
        if self.peer_server is not None:
            self.peer_server.stop()
        self.pairs.stop()
        self.events.emit("node.stopped", node=self.config.name)

    def status(self, _args: dict[str, Any]) -> dict[str, Any]:
        volumes = []
        for v in self.exporter.volumes():
            info = VolInfo.from_header(v.header).to_json()
            volumes.append({**info, "path": v.path})
        listen = self.config.listen
        port = "" if self.config.nbd_port == NBD_PORT else f":{self.config.nbd_port}"
        shown = self.pairs.op_display({})
        return {
            "name": self.config.name,
            "dir": self.directory,
            "pid": os.getpid(),
            "started": self.started,
            "listen": listen,
            "nbd_uri": f"nbd://{listen}{port}/" if listen else None,
            "nbd_port": self.config.nbd_port,
            "nbd_socket": os.path.join(self.directory, NBD_SOCKET),
            "peer_port": self.config.peer_port,
            "authenticated_peers": self.config.secret_file is not None,
            "peer_secret": self._secret_kind(),
            "peer_keyring": list(self.secret.peers),
            "peer_tls": self.tls is not None,
            "volumes": volumes,
            "pairs": shown["pairs"],
            # Pairs that cannot be loaded: their volumes are served to nobody.
            "corrupt_pairs": shown["corrupt"],
        }

    def _secret_kind(self) -> str:
        if self.secret.peers:
            return "keyring"
        return "shared" if self.secret.shared else "none"

    def stop_request(self, _args: dict[str, Any]) -> dict[str, Any]:
        # Answer first, then ask nbdkit to shut down (its cleanup stops this node).
        threading.Timer(0.05, self.shutdown).start()
        return {"stopping": self.config.name}


class Service:
    """Everything the plugin delegates to: the exporter, and the node when configured."""

    def __init__(self, log: Callable[[str], None] = _log_stderr) -> None:
        self.exporter = Exporter()
        self.node_config = NodeConfig()
        self.node: Node | None = None
        self._log = log

    def config(self, key: str, value: str) -> None:
        if key in NODE_KEYS:
            self.node_config.set(key, value)
        else:
            self.exporter.config(key, value)

    def config_complete(self) -> None:
        self.exporter.config_complete()
        if self.node_config.name and self.exporter.directory is None:
            raise UsageError("node=NAME needs dir=DIR (a node serves a directory of volumes)")
        if self.node_config.secret_file is not None:
            read_secret(self.node_config.secret_file)
        self.node_config.load_tls()  # a bad or missing file fails nbdkit's start

    def after_fork(self, shutdown: Callable[[], None]) -> None:
        """Start the node's threads (nbdkit forks before this when daemonizing)."""
        if not self.node_config.name or self.node is not None:
            return
        assert self.exporter.directory is not None
        self.node = Node(self.node_config, self.exporter.directory, self.exporter, shutdown)
        self.node.start()

    def cleanup(self) -> None:
        if self.node is not None:
            self.node.stop()
            self.node = None

    def list_exports(self) -> list[tuple[str, str]]:
        return self.exporter.list_exports()

    def default_export(self) -> str:
        return self.exporter.default_export()

    def open(self, export_name: str, readonly: bool) -> ExportHandle:
        handle = self.exporter.open(export_name, readonly)
        if self.node is None:
            return handle
        return self.node.pairs.wrap(handle)
