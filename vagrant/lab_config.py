"""The pairvol configuration of one VM of the Vagrant lab, from ``lab.json``.

    lab_config.py --host a --secrets DIR [--root /]   # a storage host: node, agent, config
    lab_config.py --host witness [--root /]          # the witness: etcd's drop-in
    lab_config.py --host witness --print-endpoint    # the agents' etcd endpoint

provision.sh runs it with the checkout's ``.venv/bin/python``, after tools/setup.  It writes
only what differs from what is there (each file atomically, with its mode) and prints the
path of every file it changed.  Every file is checked first by the parser the daemons use
(``cluster.config.parse_config``, ``replicator.peer_auth.parse_secrets``,
``replicator.node_table.parse_node_table``), so a lab that provisions is one they accept.

A storage host HOST gets:

- ``/etc/pairvol/cluster.toml``: the agents' config, the same on every host (cluster/config.py):
  the witness's etcd, each host's agent on ``ADDR:10811`` and its node by its control socket;
  no resources (``pairvol cluster resource create`` adds them at run time);
- ``/etc/pairvol/cluster.secret`` (0600): the agents' shared secret, and
  ``/etc/pairvol/node-HOST.keys`` (0600): the node's keyring, one key per link; both from
  ``--secrets DIR`` (``cluster.secret``, ``node.keys``: secrets.rb made them on the machine
  that runs Vagrant);
- ``/etc/pairvol/node-HOST.env`` and ``/etc/pairvol/agent.env``: the settings of
  ``pairvol-node@HOST.service`` and ``pairvol-agent.service`` (systemd/);
- ``/etc/pairvol/nodes``: the node table (every storage host, with the local node's
  directory), so that ``pair create --secondary b:VOLUME`` finds b;
- ``/etc/profile.d/pairvol.sh``: ``$PAIRVOL_NODE_DIR`` and ``$PAIRVOL_AGENT_DIR``, so that
  ``pairvol pair ...``, ``pairvol cluster ...`` and ``pairvol events`` need no options.

The node's directory is ``/var/lib/pairvol/nodes/HOST`` (provision.sh mounts the extra disk
there); the agent's state is ``/var/lib/pairvol/agent/CLUSTER-HOST``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cluster.agent_process import DEFAULT_AGENT_ROOT, DEFAULT_CONFIG, MIN_SECRET
from cluster.config import DEFAULT_AGENT_PORT, check_cluster_name, parse_config
from cluster.etcd_server import CLIENT_PORT, PEER_PORT
from replicator.errors import PairvolError, UsageError
from replicator.node import CONTROL_SOCKET
from replicator.node_table import NODES_FILE, parse_node_table
from replicator.peer_auth import parse_secrets

LAB_FILE = Path(__file__).resolve().with_name("lab.json")
WITNESS = "witness"
ETC = "/etc/pairvol"
NODE_ROOT = "/var/lib/pairvol/nodes"
CLUSTER_SECRET = f"{ETC}/cluster.secret"
AGENT_ENV = f"{ETC}/agent.env"
PROFILE = "/etc/profile.d/pairvol.sh"
ETCD_DROP_IN = "/etc/systemd/system/etcd.service.d/pairvol.conf"

Files = dict[str, tuple[bytes, int]]  # absolute path on the VM -> (content, mode)


@dataclass(frozen=True)
class LabSpec:
    cluster: str
    hosts: dict[str, str]  # storage host -> address
    witness: str  # the witness's address

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> LabSpec:
        hosts = doc["hosts"]
        if not isinstance(hosts, dict) or not hosts or WITNESS in hosts:
            raise UsageError(f"lab.json: hosts must name the storage hosts (not {WITNESS!r})")
        return cls(
            cluster=check_cluster_name(str(doc["cluster"]), what="cluster name"),
            hosts={str(h): str(a) for h, a in hosts.items()},
            witness=str(doc["witness"]),
        )

    def etcd_endpoint(self) -> str:
        return f"http://{self.witness}:{CLIENT_PORT}"


def load_spec(path: Path = LAB_FILE) -> LabSpec:
    return LabSpec.from_json(json.loads(path.read_text()))


def node_dir(host: str) -> str:
    return f"{NODE_ROOT}/{host}"


def keyring_path(host: str) -> str:
    return f"{ETC}/node-{host}.keys"


def node_env_path(host: str) -> str:
    return f"{ETC}/node-{host}.env"


def agent_dir(spec: LabSpec, host: str) -> str:
    return f"{DEFAULT_AGENT_ROOT}/{spec.cluster}-{host}"


def cluster_config_text(spec: LabSpec) -> str:
    lines = [
        f"# pairvol cluster {spec.cluster}: the Vagrant lab's agents (vagrant/lab_config.py).",
        "# The same file on every host; cluster/config.py documents every key.",
        "[cluster]",
        f'name = "{spec.cluster}"',
        f'secret_file = "{CLUSTER_SECRET}"',
        "",
        "[etcd]                        # the witness",
        f'endpoints = ["{spec.etcd_endpoint()}"]',
        "timeout = 0.5                 # seconds, one request",
        "",
        "[timing]                      # the defaults (cluster/config.py, Timing, says why)",
        "heartbeat_interval = 0.2",
        "heartbeat_timeout = 1.0",
        "lease_ttl = 2                 # whole seconds",
        "lease_renew_interval = 1.0",
    ]
    for host, address in spec.hosts.items():
        lines += [
            "",
            f"[hosts.{host}]",
            f'agent = "{address}:{DEFAULT_AGENT_PORT}"',
            f'node = "{node_dir(host)}/{CONTROL_SOCKET}"   # its node, by its control socket',
        ]
    lines += [
        "",
        "# Resources: [resources.NAME] tables here, or at run time:",
        "#   pairvol cluster resource create NAME --group GROUP --hosts a,b --device ...",
    ]
    return "\n".join(lines) + "\n"


def node_table_text(spec: LabSpec, local: str) -> str:
    lines = ["# NAME  ADDR[:PEERPORT]  [DIR]   (the Vagrant lab's storage nodes)"]
    for host, address in spec.hosts.items():
        lines.append(f"{host} {address}" + (f" {node_dir(host)}" if host == local else ""))
    return "\n".join(lines) + "\n"


def storage_host_files(spec: LabSpec, host: str, cluster_secret: bytes, keyring: bytes) -> Files:
    """Every file of storage host ``host``, checked as the daemons will read them."""
    if host not in spec.hosts:
        raise UsageError(f"{host!r} is not a storage host of the lab ({', '.join(spec.hosts)})")
    config = cluster_config_text(spec)
    parsed = parse_config(config, f"{ETC}/cluster.toml")
    assert parsed.host(host).node.socket == f"{node_dir(host)}/{CONTROL_SOCKET}"
    if len(cluster_secret.strip()) < MIN_SECRET:
        raise UsageError(f"cluster secret: shorter than {MIN_SECRET} characters")
    peers = parse_secrets(keyring, f"keyring of {host}")
    expected = sorted(set(spec.hosts) - {host})
    if peers.shared or sorted(peers.peers) != expected:
        raise UsageError(f"keyring of {host}: must have one key for each of {expected}")
    table = node_table_text(spec, host)
    parse_node_table(table, NODES_FILE)
    node_env = (
        f"# pairvol-node@{host}.service (systemd/pairvol-node@.service), vagrant/lab_config.py\n"
        f"PAIRVOL_LISTEN={spec.hosts[host]}\n"
        f'PAIRVOL_NODE_OPTS="--secret-file {keyring_path(host)}"\n'
    )
    agent_env = (
        "# pairvol-agent.service (systemd/pairvol-agent.service), vagrant/lab_config.py\n"
        f"PAIRVOL_AGENT_HOST={host}\n"
    )
    profile = (
        "# pairvol's CLI on this lab host (vagrant/lab_config.py): which node, which agent\n"
        f"export PAIRVOL_NODE_DIR={node_dir(host)}\n"
        f"export PAIRVOL_AGENT_DIR={agent_dir(spec, host)}\n"
        f"export PAIRVOL_CLUSTER_CONFIG={DEFAULT_CONFIG}\n"
    )
    return {
        DEFAULT_CONFIG: (config.encode(), 0o644),
        CLUSTER_SECRET: (cluster_secret, 0o600),
        keyring_path(host): (keyring, 0o600),
        node_env_path(host): (node_env.encode(), 0o644),
        AGENT_ENV: (agent_env.encode(), 0o644),
        NODES_FILE: (table.encode(), 0o644),
        PROFILE: (profile.encode(), 0o644),
    }


def witness_files(spec: LabSpec) -> Files:
    """The drop-in that makes Debian's etcd.service the lab's one-member etcd."""
    w = spec.witness
    settings = {
        "ETCD_NAME": WITNESS,
        "ETCD_DATA_DIR": "/var/lib/etcd/pairvol",
        "ETCD_LISTEN_CLIENT_URLS": f"http://{w}:{CLIENT_PORT},http://127.0.0.1:{CLIENT_PORT}",
        "ETCD_ADVERTISE_CLIENT_URLS": spec.etcd_endpoint(),
        "ETCD_LISTEN_PEER_URLS": f"http://{w}:{PEER_PORT}",
        "ETCD_INITIAL_ADVERTISE_PEER_URLS": f"http://{w}:{PEER_PORT}",
        "ETCD_INITIAL_CLUSTER": f"{WITNESS}=http://{w}:{PEER_PORT}",
        "ETCD_INITIAL_CLUSTER_TOKEN": f"pairvol-vagrant-{spec.cluster}",
        "ETCD_INITIAL_CLUSTER_STATE": "new",
    }
    text = "\n".join(
        [
            "# The Vagrant lab's etcd: the witness, the agents' one member (vagrant/lab_config.py)",
            "[Unit]",
            "# it binds the lab address, which must be up",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            *(f"Environment={k}={v}" for k, v in settings.items()),
            "Restart=on-failure",
            "RestartSec=2",
        ]
    )
    return {ETCD_DROP_IN: ((text + "\n").encode(), 0o644)}


def install(files: Files, root: str = "/") -> list[str]:
    """Write each file under ``root`` unless it already holds that content with that mode;
    the paths written."""
    changed = []
    for path, (content, mode) in files.items():
        target = os.path.join(root, path.lstrip("/"))
        try:
            same = Path(target).read_bytes() == content and os.stat(target).st_mode & 0o777 == mode
        except FileNotFoundError:
            same = False
        if same:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".lab_config.")
        try:
            os.fchmod(fd, mode)
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        changed.append(path)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab_config.py", description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True, help=f"a storage host of lab.json, or {WITNESS}")
    p.add_argument("--secrets", help="the host's secrets (cluster.secret, node.keys)")
    p.add_argument("--root", default="/", help="write under this directory (default /)")
    p.add_argument("--lab", default=str(LAB_FILE), help="the lab description (lab.json)")
    p.add_argument("--print-endpoint", action="store_true", help="print etcd's URL, write nothing")
    args = p.parse_args(argv)
    try:
        spec = load_spec(Path(args.lab))
        if args.print_endpoint:
            print(spec.etcd_endpoint())
            return 0
        if args.host == WITNESS:
            files = witness_files(spec)
        else:
            if not args.secrets:
                raise UsageError(f"--secrets DIR is needed for storage host {args.host}")
            secrets = Path(args.secrets)
            try:
                cluster_secret = (secrets / "cluster.secret").read_bytes()
                keyring = (secrets / "node.keys").read_bytes()
            except FileNotFoundError as e:
                raise UsageError(f"{e.filename} is missing (made by the first vagrant up)") from e
            files = storage_host_files(spec, args.host, cluster_secret, keyring)
        for path in install(files, args.root):
            print(path)
    except PairvolError as e:
        print(f"lab_config.py: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
