"""What pairvol ships around the code: the systemd units (systemd/), the readiness protocol
they rest on (replicator/sd_notify.py), and the Vagrant lab (vagrant/).

The units are checked by ``systemd-analyze verify`` (a warning is a failure: verify exits 0
on an unknown key) and by pairvol's own argument parser, with the settings the Vagrant lab
writes; the lab's generated config by the parsers the daemons use; the Vagrantfile by
``vagrant validate`` (tools/setup installs Debian's vagrant and vagrant-libvirt, which
validate without a hypervisor).  Readiness is tested for real: a datagram socket bound here
receives the node's and the agent's ``READY=1``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, VENV_BIN, require, require_programs

from cluster import agent_process
from cluster.config import load_config
from cluster.etcd_server import EtcdCluster, free_ports
from pairvol.cli import build_parser
from replicator import control, node_process, sd_notify
from replicator.events import read_events
from replicator.node import read_secret
from replicator.node_table import load_node_table

pytestmark = pytest.mark.timeout(120)

UNITS = ROOT / "systemd"
VAGRANT = ROOT / "vagrant"
INSTALLED_PAIRVOL = "/usr/local/bin/pairvol"


def _load_lab_config() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lab_config", VAGRANT / "lab_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


lab_config = _load_lab_config()


# -- sd_notify ---------------------------------------------------------------------------


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A service manager's notification socket: abstract, as systemd's own."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"pairvol-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind("\0" + name)
    sock.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        yield sock
    finally:
        sock.close()


def test_sd_notify_sends_one_datagram_to_an_abstract_socket(
    notify_socket: socket.socket,
) -> None:
    assert sd_notify.notify("STATUS=warming up") is True
    assert notify_socket.recv(4096) == b"STATUS=warming up"
    assert os.environ["NOTIFY_SOCKET"].startswith("@")  # kept without unset_environment
    assert sd_notify.ready("serving") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving"
    assert "NOTIFY_SOCKET" not in os.environ  # ready() unsets it: children cannot speak for us
    assert sd_notify.ready() is False  # and a second call has nowhere to go


def test_sd_notify_to_a_socket_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd_notify.ready() is True
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, "", "relative/path", "@", "/nonexistent/notify"])
def test_sd_notify_without_a_usable_socket_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sd_notify.notify("READY=1") is False


def _ready_message(sock: socket.socket, proc: subprocess.Popen[bytes]) -> bytes:
    try:
        return sock.recv(4096)
    except TimeoutError:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"no READY=1 within the timeout; stdout {out!r} stderr {err!r}")


def _sigterm_and_wait(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail(f"pid {proc.pid} did not exit within {timeout}s of SIGTERM")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pv-pkg-") as d:  # short: unix socket paths
        yield Path(d)


def test_node_foreground_says_ready_once_it_serves_and_stops_on_sigterm(
    notify_socket: socket.socket, short_dir: Path
) -> None:
    """``pairvol node start --foreground``, as the unit runs it: READY=1 only once the
    control socket answers, nbdkit a child of the launcher without $NOTIFY_SOCKET, SIGTERM
    passed on, exit 0 and nothing left behind."""
    require_programs("nbdkit")
    port, peer = free_ports(2)
    proc = subprocess.Popen(
        [str(VENV_BIN / "pairvol"), "node", "start", "--foreground", "--name", "fg1",
         "--dir", str(short_dir), "--listen", "127.0.0.1", "--port", str(port),
         "--peer-port", str(peer)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    try:
        message = _ready_message(notify_socket, proc)
        assert message.startswith(b"READY=1\nSTATUS=node fg1 serving")
        status = control.call(str(short_dir / "control.sock"), "node.status", timeout=5)
        nbdkit = int(status["pid"])
        assert nbdkit == node_process.running_pid(str(short_dir))
        assert Path(f"/proc/{nbdkit}/stat").read_text().split(") ")[1].split()[1] == str(
            proc.pid
        )  # its parent is the launcher: it dies with it
        environ = Path(f"/proc/{nbdkit}/environ").read_bytes().split(b"\0")
        assert not [e for e in environ if e.startswith(b"NOTIFY_SOCKET=")]
        assert proc.poll() is None  # still in the foreground
    finally:
        code = _sigterm_and_wait(proc)
    out, err = (b.decode() for b in proc.communicate(timeout=10))
    assert code == 0, err
    assert "node fg1 started" in out
    assert not Path(f"/proc/{nbdkit}").exists()
    left = {p.name for p in short_dir.iterdir()}
    assert not left & {"nbd.sock", "control.sock", "node.pid"}, left
    assert [e["event"] for e in read_events(str(short_dir / "events.jsonl"))] == [
        "node.started",
        "node.stopped",
    ]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    require_programs("etcd")
    cluster = EtcdCluster(str(tmp_path_factory.mktemp("etcd")))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_agent_foreground_says_ready_and_stops_on_sigterm(
    notify_socket: socket.socket, short_dir: Path, etcd: EtcdCluster
) -> None:
    (agent_port,) = free_ports(1)
    (short_dir / "secret").write_text("s" * 32 + "\n")
    config = short_dir / "cluster.toml"
    config.write_text(
        f'[cluster]\nname = "pkg{os.getpid()}"\nsecret_file = "secret"\n'
        f'[etcd]\nendpoints = ["{etcd.endpoints()[0]}"]\n'
        f'[hosts.a]\nagent = "127.0.0.1:{agent_port}"\nnode = "{short_dir}/node.sock"\n'
    )
    state = short_dir / "agent"
    proc = subprocess.Popen(
        [str(VENV_BIN / "pairvol"), "agent", "start", "--host", "a", "--config", str(config),
         "--state-dir", str(state)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    try:
        assert _ready_message(notify_socket, proc).startswith(b"READY=1\nSTATUS=agent a")
        # ready means what a daemon's start waits for: cluster.started with its pid, pid file
        assert (state / "agent.pid").read_text().strip() == str(proc.pid)
        started = [e for e in read_events(str(state / "events.jsonl"))
                   if e["event"] == "cluster.started"]  # fmt: skip
        assert [e["pid"] for e in started] == [proc.pid]
    finally:
        code = _sigterm_and_wait(proc)
    _, err = proc.communicate(timeout=10)
    assert code == 0, err.decode()
    assert read_events(str(state / "events.jsonl"))[-1]["event"] == "cluster.stopped"


# -- the units -------------------------------------------------------------------------------


def _unit(name: str) -> dict[str, list[str]]:
    """``KEY: [values]`` of a unit file, every section together."""
    keys: dict[str, list[str]] = {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


@pytest.mark.parametrize("name", ["pairvol-node@.service", "pairvol-agent.service"])
def test_units_are_notify_services_that_restart_on_failure(name: str) -> None:
    unit = _unit(name)
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["ExecStart"][0].startswith(INSTALLED_PAIRVOL + " ")
    assert unit["EnvironmentFile"][0].startswith("/etc/pairvol/")
    assert unit["WantedBy"] == ["multi-user.target"]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify needs ExecStart's binary to exist: a copy of each unit runs the venv's
    pairvol instead of /usr/local/bin/pairvol (what vagrant/provision.sh links)."""
    require_programs("systemd-analyze")
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        assert INSTALLED_PAIRVOL in text
        (tmp_path / unit.name).write_text(
            text.replace(INSTALLED_PAIRVOL, str(VENV_BIN / "pairvol"))
        )
    shutil.copy(tmp_path / "pairvol-node@.service", tmp_path / "pairvol-node@a.service")
    paths = [str(p) for p in sorted(tmp_path.glob("*.service"))]
    assert len(paths) == 3
    r = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    output = (r.stdout + r.stderr).strip()
    assert r.returncode == 0, output
    # verify exits 0 on unknown keys and bad values; any word about our units is a failure
    assert not [ln for ln in output.splitlines() if "pairvol" in ln], output


def test_a_broken_unit_fails_the_verify_check(tmp_path: Path) -> None:
    """The negative control of the check above: it sees what verify only warns about."""
    require_programs("systemd-analyze")
    text = (UNITS / "pairvol-agent.service").read_text()
    bad = tmp_path / "pairvol-agent.service"
    bad.write_text(text.replace(INSTALLED_PAIRVOL, str(VENV_BIN / "pairvol")).replace(
        "Type=notify", "Type=notify\nReadyness=1"))  # fmt: skip
    r = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert "Readyness" in r.stdout + r.stderr


def _env_file(path: Path) -> dict[str, str]:
    """systemd's EnvironmentFile= syntax, as much of it as the lab writes."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value[1:-1] if value[:1] == value[-1:] == '"' and len(value) > 1 else value
    return env


def _exec_argv(command: str, instance: str, env: dict[str, str]) -> list[str]:
    """ExecStart= as systemd expands it: %i, ${VAR} as one word, $VAR split on spaces."""
    words: list[str] = []
    for word in shlex.split(command.replace("%i", instance)):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            words += env.get(whole.group(1), "").split()
        else:
            words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return words


@pytest.fixture
def lab_root(tmp_path: Path) -> Path:
    """Host a's files as vagrant/provision.sh installs them, with secrets made by the
    Vagrantfile's own generator (secrets.rb) when Ruby is here (tools/setup's vagrant
    brings it)."""
    secrets = tmp_path / "secrets"
    spec = lab_config.load_spec()
    require_programs("ruby")
    r = subprocess.run(
        ["ruby", "-e", "require ARGV[0]; PairvolSecrets.generate(ARGV[1], ARGV[2..])",
         str(VAGRANT / "secrets.rb"), str(secrets), *spec.hosts],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    root = tmp_path / "root"
    assert (
        lab_config.main(["--host", "a", "--secrets", str(secrets / "a"), "--root", str(root)]) == 0
    )
    return root


def test_the_lab_config_is_what_the_daemons_accept(
    lab_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = lab_config.load_spec()
    etc = lab_root / "etc/pairvol"
    config = load_config(str(etc / "cluster.toml"))
    assert config.cluster == spec.cluster
    assert list(config.host_names()) == list(spec.hosts)
    assert config.etcd.endpoints == (f"http://{spec.witness}:2379",)
    for h in config.hosts:
        assert h.node.socket == f"/var/lib/pairvol/nodes/{h.name}/control.sock"
        assert h.agent[0] == spec.hosts[h.name]
    assert config.secret_file == "/etc/pairvol/cluster.secret"
    agent_process.read_cluster_secret(str(etc / "cluster.secret"))
    keys = read_secret(str(etc / "node-a.keys"))
    assert keys.peers == ("b",)
    secrets = tmp_path / "secrets"
    assert read_secret(str(secrets / "b/node.keys")).for_peer("a") == keys.for_peer("b")
    for secret in ("cluster.secret", "node-a.keys"):
        assert (etc / secret).stat().st_mode & 0o777 == 0o600
    table = load_node_table(str(etc / "nodes"))
    assert [(e.name, e.host, e.dir) for e in table] == [
        ("a", spec.hosts["a"], "/var/lib/pairvol/nodes/a"),
        ("b", spec.hosts["b"], None),
    ]
    # provisioning again changes nothing
    capsys.readouterr()
    assert lab_config.main(["--host", "a", "--secrets", str(secrets / "a"),
                            "--root", str(lab_root)]) == 0  # fmt: skip
    assert capsys.readouterr().out == ""


def test_the_units_run_commands_pairvol_accepts(lab_root: Path) -> None:
    """ExecStart of each unit, expanded with the lab's settings files, parses as the
    intended ``pairvol node start --foreground`` / ``agent start`` invocation."""
    parser = build_parser()
    node_env = _env_file(lab_root / "etc/pairvol/node-a.env")
    argv = _exec_argv(_unit("pairvol-node@.service")["ExecStart"][0], "a", node_env)
    assert argv[0] == INSTALLED_PAIRVOL
    args = parser.parse_args(argv[1:])
    assert (args.kind, args.action, args.foreground) == ("node", "start", True)
    assert (args.name, args.dir, args.listen) == ("a", "/var/lib/pairvol/nodes/a", "198.18.10.11")
    assert args.secret_file == "/etc/pairvol/node-a.keys"
    agent_env = _env_file(lab_root / "etc/pairvol/agent.env")
    argv = _exec_argv(_unit("pairvol-agent.service")["ExecStart"][0], "", agent_env)
    args = parser.parse_args(argv[1:])
    assert (args.kind, args.action, args.host, args.daemon) == ("agent", "start", "a", False)
    assert args.config == "/etc/pairvol/cluster.toml"
    profile = (lab_root / "etc/profile.d/pairvol.sh").read_text()
    assert "PAIRVOL_NODE_DIR=/var/lib/pairvol/nodes/a\n" in profile
    assert f"PAIRVOL_AGENT_DIR={agent_process.DEFAULT_AGENT_ROOT}/vlab-a\n" in profile


def test_the_witness_etcd_drop_in_verifies(tmp_path: Path) -> None:
    require_programs("systemd-analyze")
    base = Path("/lib/systemd/system/etcd.service")
    require(base.exists(), "needs etcd-server's etcd.service (run tools/setup)")
    spec = lab_config.load_spec()
    lab_config.install(lab_config.witness_files(spec), str(tmp_path / "root"))
    units = tmp_path / "units"
    (units / "etcd.service.d").mkdir(parents=True)
    shutil.copy(base, units)
    drop_in = tmp_path / "root/etc/systemd/system/etcd.service.d/pairvol.conf"
    shutil.copy(drop_in, units / "etcd.service.d")
    assert f"ETCD_ADVERTISE_CLIENT_URLS=http://{spec.witness}:2379\n" in drop_in.read_text()
    r = subprocess.run(["systemd-analyze", "verify", "etcd.service"], capture_output=True,
                       text=True, timeout=60, check=False,
                       env=dict(os.environ, SYSTEMD_UNIT_PATH=f"{units}:"))  # fmt: skip
    output = (r.stdout + r.stderr).strip()
    assert r.returncode == 0, output
    assert "pairvol.conf" not in output, output


# -- vagrant ---------------------------------------------------------------------------------


def _vagrant(
    tmp_path: Path, project: Path, *argv: str, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VAGRANT_")}
    environ |= {"VAGRANT_HOME": str(tmp_path / "vagrant.d"),
                "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), **env}  # fmt: skip
    return subprocess.run(["vagrant", *argv], cwd=project, capture_output=True, text=True,
                          timeout=120, check=False, env=environ)  # fmt: skip


@pytest.fixture
def vagrant_project(tmp_path: Path) -> Path:
    """vagrant/ copied (Vagrant writes .vagrant/ into the project even with
    VAGRANT_DOTFILE_PATH elsewhere): the checkout stays as it is."""
    require_programs("vagrant")
    project = tmp_path / "repo" / "vagrant"
    shutil.copytree(VAGRANT, project, ignore=shutil.ignore_patterns(".vagrant", ".secrets"))
    return project


def test_vagrant_validate(tmp_path: Path, vagrant_project: Path) -> None:
    r = _vagrant(tmp_path, vagrant_project, "validate")  # libvirt, the Vagrantfile's default
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout
    # VirtualBox itself is not here: its provider blocks are skipped, the rest is checked
    r = _vagrant(tmp_path, vagrant_project, "validate", "--ignore-provider",
                 VAGRANT_DEFAULT_PROVIDER="virtualbox")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (vagrant_project / ".secrets").exists()  # made by `vagrant up` only


def test_vagrant_validate_sees_a_broken_vagrantfile(tmp_path: Path, vagrant_project: Path) -> None:
    vagrantfile = vagrant_project / "Vagrantfile"
    vagrantfile.write_text(
        vagrantfile.read_text().replace("lv.cpus = 2", "lv.cpus = 2\n    lv.cpu_count = 2")
    )
    r = _vagrant(tmp_path, vagrant_project, "validate")
    assert r.returncode != 0
    assert "cpu_count" in r.stdout + r.stderr


def test_the_lab_is_on_one_network_in_198_18_0_0_15() -> None:
    import ipaddress

    spec = lab_config.load_spec()
    addresses = [ipaddress.ip_address(a) for a in [*spec.hosts.values(), spec.witness]]
    assert len(set(addresses)) == 3
    assert all(a in ipaddress.ip_network("198.18.0.0/15") for a in addresses)
    assert len({ipaddress.ip_network(f"{a}/24", strict=False) for a in addresses}) == 1
