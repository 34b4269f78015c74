"""The agent as a process: build it from the config, run it in the foreground or as a daemon,
find it (pid file, status file) and stop it.

Where an agent keeps its state (``STATE_DIR``): ``--state-dir``, else ``$PAIRVOL_AGENT_DIR``,
else ``/var/lib/pairvol/agent/CLUSTER-HOST``.  It holds ``agent.pid`` (unless ``--pidfile``
says otherwise), ``agent.json`` (the status, rewritten as it changes), ``events.jsonl`` and,
for a daemon, ``agent.log``.  The agent is ready once its ``cluster.started`` event is in the
log with its pid and its pid file exists; in the foreground it then also says ``READY=1`` to
systemd (:mod:`replicator.sd_notify`; nothing without ``$NOTIFY_SOCKET``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from cluster.agent import EVENTS, STATUS, Agent, ControlNode
from cluster.agent_link import Endpoint
from cluster.config import Config, load_config
from cluster.coord import EtcdCoord, Keys, list_resources
from replicator import sd_notify
from replicator.atomic_file import write_atomic
from replicator.errors import ExternalCommandFailed, IllegalState, NotFound, Timeout, UsageError
from replicator.events import read_events

AGENT_DIR_ENV = "PAIRVOL_AGENT_DIR"
CONFIG_ENV = "PAIRVOL_CLUSTER_CONFIG"
DEFAULT_CONFIG = "/etc/pairvol/cluster.toml"
DEFAULT_AGENT_ROOT = "/var/lib/pairvol/agent"
LOG = "agent.log"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
MIN_SECRET = 16


def config_path(given: str | None) -> str:
    return given or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def state_dir(given: str | None, config: Config | None = None, host: str | None = None) -> str:
    if given:
        return os.path.abspath(given)
    env = os.environ.get(AGENT_DIR_ENV)
    if env:
        return os.path.abspath(env)
    if config is None or host is None:
        raise UsageError(f"no agent state directory: give --state-dir or set ${AGENT_DIR_ENV}")
    return os.path.join(DEFAULT_AGENT_ROOT, f"{config.cluster}-{host}")


def read_cluster_secret(path: str) -> bytes:
    try:
        secret = Path(path).read_bytes().strip()
    except FileNotFoundError:
        raise NotFound(f"cluster secret file {path} does not exist") from None
    except OSError as e:
        raise IllegalState(f"cluster secret file {path}: {e.strerror}") from e
    if len(secret) < MIN_SECRET:
        raise UsageError(f"cluster secret file {path}: the secret is shorter than {MIN_SECRET}")
    return secret


def running_pid(pidfile: str) -> int | None:
    try:
        pid = int(Path(pidfile).read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return None if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid


def build(config: Config, host: str, directory: str) -> Agent:
    """An agent ready to run: etcd reachable (ConnectionFailed, exit 20, if not), its UDP
    port bound, its node's control socket known."""
    me = config.host(host)
    if me.node.socket is None:
        raise UsageError(
            f"config {config.source}: hosts.{host}.node: the agent reaches its own node by its "
            "control socket; give its path"
        )
    secret = read_cluster_secret(config.secret_file)
    coord = EtcdCoord(config.etcd.endpoints, config.etcd.timeout)
    try:
        list_resources(coord, Keys(config.cluster), known_hosts=config.host_names())
        peers = {h.name: h.agent for h in config.hosts if h.name != host}
        endpoint = Endpoint(host, me.agent, peers, config.cluster, secret)
    except BaseException:
        coord.close()
        raise
    return Agent(config, host, directory, coord, ControlNode(me.node.socket), endpoint=endpoint)


def preflight(config: Config, host: str) -> None:
    """What ``build`` checks first, from the process that starts a daemon, so that its
    errors keep their exit codes (etcd unreachable: exit 20)."""
    me = config.host(host)
    if me.node.socket is None:
        raise UsageError(
            f"config {config.source}: hosts.{host}.node: the agent reaches its own node by its "
            "control socket; give its path"
        )
    read_cluster_secret(config.secret_file)
    with EtcdCoord(config.etcd.endpoints, config.etcd.timeout) as coord:
        list_resources(coord, Keys(config.cluster), known_hosts=config.host_names())


def run_foreground(
    config_file: str, host: str, directory: str, pidfile: str, metrics: str | None = None
) -> int:
    """Run the agent here until it stops; ``metrics``: serve Prometheus metrics at this
    ``ADDR:PORT`` (:mod:`cluster.metrics`)."""
    address = None
    if metrics:
        from replicator.metrics import parse_address  # prometheus_client: only when asked for

        address = parse_address(metrics)
    config = load_config(config_file)
    os.makedirs(directory, exist_ok=True)
    pid = running_pid(pidfile)
    if pid is not None and pid != os.getpid():
        raise IllegalState(f"an agent already runs for {directory} (pid {pid})")
    agent = build(config, host, directory)
    server = None
    if address is not None:
        from cluster.metrics import serve_agent

        server = serve_agent(address, agent)
    write_atomic(pidfile, f"{os.getpid()}\n".encode())

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        agent.stop()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        # ready as a daemon is (cluster.started logged, pid file written): tell systemd
        sd_notify.ready(f"agent {host} of cluster {config.cluster}")
        agent.run()
    finally:
        if server is not None:
            server.stop()
        with contextlib.suppress(FileNotFoundError):
            if running_pid(pidfile) == os.getpid():
                os.unlink(pidfile)
    return 0


def start_daemon(argv: Sequence[str], directory: str, pidfile: str) -> int:
    """Run ``pairvol agent start ARGV`` (without --daemon) detached; its pid once it is ready."""
    os.makedirs(directory, exist_ok=True)
    pid = running_pid(pidfile)
    if pid is not None:
        raise IllegalState(f"an agent already runs for {directory} (pid {pid})")
    log_path = os.path.join(directory, LOG)
    seen = len(read_events(os.path.join(directory, EVENTS)))
    with open(log_path, "ab") as log:
        log_start = log.tell()
        # setsid --fork: the agent is nobody's child here (no zombie, no process to wait for)
        subprocess.run(
            ["setsid", "--fork", sys.executable, "-m", "pairvol", "agent", "start", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=True,
            check=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        pid = running_pid(pidfile)
        events = read_events(os.path.join(directory, EVENTS))[seen:]
        if pid is not None and any(
            e.get("event") == "cluster.started" and e.get("pid") == pid for e in events
        ):
            return pid
        tail = Path(log_path).read_bytes()[log_start:].decode(errors="replace")
        errors = [ln for ln in tail.splitlines() if ln.startswith("pairvol: ")]
        if errors:
            reason = errors[-1].removeprefix("pairvol: ").removeprefix("error: ")
            raise ExternalCommandFailed(f"the agent exited at start: {reason}")
        if time.monotonic() > deadline:
            raise Timeout(f"the agent was not ready within {START_TIMEOUT:.0f}s (log: {log_path})")
        time.sleep(0.05)


def stop(directory: str, pidfile: str, timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM the agent and wait until it is gone; its pid (NotFound if none runs)."""
    pid = running_pid(pidfile)
    if pid is None:
        raise NotFound(f"no agent runs for {directory}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running_pid(pidfile) == pid:
        if time.monotonic() > deadline:
            raise Timeout(f"the agent (pid {pid}) did not exit within {timeout:.0f}s of SIGTERM")
        time.sleep(0.05)
    return pid


def read_status(directory: str, pidfile: str) -> dict[str, Any]:
    """The agent's last status, with ``running`` (and ``pid``) as things are now."""
    path = os.path.join(directory, STATUS)
    try:
        doc: dict[str, Any] = json.loads(Path(path).read_text())
    except FileNotFoundError:
        doc = {}
    except ValueError as e:
        raise IllegalState(f"agent status {path} is unreadable: {e}") from e
    pid = running_pid(pidfile)
    doc["running"] = pid is not None
    doc["pid"] = pid
    doc["state_dir"] = directory
    return doc
