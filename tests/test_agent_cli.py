"""``pairvol agent`` and ``pairvol cluster`` with a real etcd and real agent processes.

The storage nodes are stand-ins (a control socket served by this test, recording every op),
so that this runs without namespaces; tests/test_agent_lab.py does the same with real nodes.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_programs

from cluster.etcd_server import EtcdCluster, free_ports
from pairvol.cli import main
from replicator.control import ControlServer
from replicator.errors import IllegalState
from replicator.events import read_events, wait_event

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    require_programs("etcd")
    cluster = EtcdCluster(str(tmp_path_factory.mktemp("etcd")))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


class FakeNode:
    """The control ops the agent uses, on a unix socket; the pair side's role and epochs."""

    def __init__(self, path: str, role: str) -> None:
        self.role = role
        self.cluster_epoch = 0
        self.summary: dict[str, Any] | None = None  # pair.takeover's "takeover", if set
        self.hydration: dict[str, Any] | None = None  # pair.display's, once taken over
        self.ops: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        ops = ("pair.display", "pair.fence", "pair.unfence", "pair.takeover", "pair.watchdog")
        handlers = {op: (lambda args, op=op: self.handle(op, args)) for op in ops}
        self.server = ControlServer(path, handlers, lambda _m: None)  # type: ignore[misc]
        self.server.start()

    def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.ops.append((op, args))
            if op in ("pair.fence", "pair.unfence", "pair.watchdog"):
                if args["epoch"] < self.cluster_epoch:
                    raise IllegalState(f"epoch {args['epoch']} refused: seen {self.cluster_epoch}")
                self.cluster_epoch = args["epoch"]
            if op == "pair.takeover":
                self.role = "primary"
            side = {"role": self.role, "state": "PAIR", "epoch": 0,
                    "cluster_epoch": self.cluster_epoch}  # fmt: skip
            if op == "pair.takeover" and self.summary is not None:
                side |= {"state": "SSWS", "takeover": dict(self.summary)}
            if self.role == "primary" and self.hydration is not None:  # (no id otherwise:
                # the agents' refresh machines would track the pair)
                side |= {"id": "g1/p1", "state": "SSWS", "hydration": dict(self.hydration)}
            return {"pairs": [side]}

    def seen(self, op: str) -> list[dict[str, Any]]:
        with self.lock:
            return [a for o, a in self.ops if o == op]


class Cluster:
    def __init__(self, tmp: Path, endpoint: str) -> None:
        self.tmp = tmp
        (tmp / "secret").write_text("s" * 32 + "\n")
        pa, pb = free_ports(2)
        self.nodes = {
            "a": FakeNode(str(tmp / "a.sock"), "primary"),
            "b": FakeNode(str(tmp / "b.sock"), "secondary"),
        }
        self.config = tmp / "cluster.toml"
        self.config.write_text(f"""
[cluster]
name = "c{os.getpid()}{tmp.name[-6:].replace("_", "")}"
secret_file = "secret"
[etcd]
endpoints = ["{endpoint}"]
[hosts.a]
agent = "127.0.0.1:{pa}"
node = "{tmp / "a.sock"}"
[hosts.b]
agent = "127.0.0.1:{pb}"
node = "{tmp / "b.sock"}"
[resources.r1]
hosts = ["a", "b"]
groups = ["g1"]
start = "touch {tmp}/started-$PAIRVOL_HOST-$PAIRVOL_EPOCH"
stop = "touch {tmp}/stopped-$PAIRVOL_HOST"
""")

    def dir(self, host: str) -> str:
        return str(self.tmp / f"agent-{host}")

    def events(self, host: str) -> str:
        return os.path.join(self.dir(host), "events.jsonl")

    def start(self, host: str) -> None:
        assert (
            main(["agent", "start", "--host", host, "--config", str(self.config),
                  "--state-dir", self.dir(host), "--daemon"]) == 0
        )  # fmt: skip

    def pid(self, host: str) -> int:
        return int(Path(self.dir(host), "agent.pid").read_text())

    def close(self) -> None:
        for h in ("a", "b"):
            pidfile = Path(self.dir(h), "agent.pid")
            if pidfile.exists():
                main(["agent", "stop", "--state-dir", self.dir(h)])
        for n in self.nodes.values():
            n.server.stop()


@pytest.fixture
def cluster(tmp_path: Path, etcd: EtcdCluster) -> Iterator[Cluster]:
    c = Cluster(tmp_path, etcd.endpoints()[0])
    try:
        yield c
    finally:
        c.close()


def test_agent_start_with_etcd_unreachable_is_one_line_exit_20(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (port,) = free_ports(1)
    c = Cluster(tmp_path, f"http://127.0.0.1:{port}")
    try:
        for daemon in ([], ["--daemon"]):
            code = main(["agent", "start", "--host", "a", "--config", str(c.config),
                         "--state-dir", c.dir("a"), *daemon])  # fmt: skip
            err = capsys.readouterr().err
            assert code == 20
            (line,) = err.strip().splitlines()
            assert line.startswith("pairvol: error: etcd at ") and "unreachable" in line
    finally:
        c.close()


def test_resource_create_list_delete(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ["--config", str(cluster.config)]
    create = ["cluster", "resource", "create", "r2", "--group", "g2", "--hosts", "b,a",
              "--device", "pv0=nbd://127.0.0.1:10809/v2", "--start", "true", *cfg]  # fmt: skip
    assert main(create) == 0
    capsys.readouterr()
    assert main(["cluster", "resource", "list", "--json", *cfg]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in doc["resources"]}
    assert by_name["r1"]["source"] == "config" and by_name["r2"]["source"] == "etcd"
    assert by_name["r2"]["hosts"] == ["b", "a"] and by_name["r2"]["groups"] == ["g2"]
    assert {d["host"] for d in by_name["r2"]["devices"]} == {"a", "b"}
    again = ["cluster", "resource", "create", "r2", "--group", "g2", "--hosts", "a,b", *cfg]
    assert main(again) == 4
    assert main(["cluster", "resource", "create", "r3", "--group", "g3", "--hosts", "a,z",
                 *cfg]) == 2  # fmt: skip
    assert main(["cluster", "resource", "delete", "r1", *cfg]) == 2  # in the config file
    assert main(["cluster", "resource", "delete", "r2", *cfg]) == 0
    assert main(["cluster", "resource", "delete", "r2", *cfg]) == 3
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(e.startswith("pairvol: error: ") for e in errors)


def test_agents_fail_over_when_the_active_agent_is_killed(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.start("a")
    cluster.start("b")
    wait_event(cluster.events("a"), "cluster.active", lambda e: e["resource"] == "r1")
    capsys.readouterr()
    assert main(["cluster", "status", "--json", "--config", str(cluster.config)]) == 0
    (r1,) = json.loads(capsys.readouterr().out)["resources"]
    assert r1["active"] == "a" and r1["epoch"] == 1
    assert [h["name"] for h in r1["hosts"]] == ["a", "b"]
    assert Path(cluster.tmp, "started-a-1").exists()
    assert main(["agent", "status", "--json", "--state-dir", cluster.dir("a")]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["running"] and status["resources"][0]["role"] == "active"

    os.kill(cluster.pid("a"), signal.SIGKILL)
    done = wait_event(cluster.events("b"), "cluster.failover.done", timeout=20)
    assert done["from"] == "a" and done["epoch"] == 2
    assert cluster.nodes["b"].seen("pair.takeover") == [{"target": "g1"}]
    assert cluster.nodes["b"].seen("pair.unfence")[-1]["epoch"] == 2
    assert Path(cluster.tmp, "started-b-2").exists()
    os.environ["PAIRVOL_AGENT_DIR"] = cluster.dir("b")
    try:
        assert main(["cluster", "status", "--json", "--config", str(cluster.config)]) == 0
    finally:
        del os.environ["PAIRVOL_AGENT_DIR"]
    (r1,) = json.loads(capsys.readouterr().out)["resources"]
    assert r1["active"] == "b" and r1["epoch"] == 2
    assert r1["last_failover"]["from"] == "a" and r1["last_failover"]["to"] == "b"
    assert all(h["flags"] == {} for h in r1["hosts"])

    assert main(["agent", "stop", "--state-dir", cluster.dir("b")]) == 0
    wait_event(cluster.events("b"), "cluster.stopped")
    assert Path(cluster.tmp, "stopped-b").exists()  # a clean stop stops the application
    assert cluster.nodes["b"].seen("pair.fence")[-1]["epoch"] == 2


def test_cluster_status_shows_a_zero_loss_takeover_and_its_hydration(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """b's node fenced the old primary and pulls what b lacked (SPEC 4): ``cluster status``
    on b says the takeover lost nothing, and shows the pull live from b's node."""
    b = cluster.nodes["b"]
    b.summary = {"previous": "PAIR", "fenced_old_primary": True, "pulled_chunks": 40,
                 "zero_loss": True}  # fmt: skip
    cluster.start("a")
    cluster.start("b")
    wait_event(cluster.events("a"), "cluster.active", lambda e: e["resource"] == "r1")
    os.kill(cluster.pid("a"), signal.SIGKILL)
    active = wait_event(cluster.events("b"), "cluster.active", timeout=20)
    assert active["takeover"] == {"g1": "SVOL-takeover"} and active["zero_loss"] is True
    assert active["takeover_report"]["g1"]["pulled_chunks"] == 40
    node_dir = tmp_path / "node-b"  # what $PAIRVOL_NODE_DIR names: b's control socket
    node_dir.mkdir()
    (node_dir / "control.sock").symlink_to(tmp_path / "b.sock")
    b.hydration = {"percent": 25.0, "pending_chunks": 30, "pulling": True,
                   "pulled_chunks": 10, "fetched_on_demand": 4, "fetch_ms_avg": 1.5,
                   "rate_bytes_s": 1 << 20, "eta_seconds": 1.9,
                   "suspended_by": None}  # fmt: skip
    cfg = ["--config", str(cluster.config)]
    capsys.readouterr()  # the agents' start lines

    def status(*extra: str) -> str:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PAIRVOL_AGENT_DIR", cluster.dir("b"))
            mp.setenv("PAIRVOL_NODE_DIR", str(node_dir))
            assert main(["cluster", "status", *extra, *cfg]) == 0
        return capsys.readouterr().out

    (r1,) = json.loads(status("--json"))["resources"]
    assert r1["active"] == "b"
    assert r1["takeover"] == {
        "host": "b", "groups": {"g1": "SVOL-takeover"}, "zero_loss": True, "pulled_chunks": 40,
        "report": {"g1": {"pairs": 1, "zero_loss": True, "pulled_chunks": 40,
                          "fenced_old_primary": True}},
    }  # fmt: skip
    assert r1["hydration"] == [{
        "group": "g1", "pair": "g1/p1", "percent": 25.0, "pending_chunks": 30,
        "fetched_on_demand": 4, "pulling": True, "rate_bytes_s": 1 << 20, "eta_seconds": 1.9,
        "suspended_by": None,
    }]  # fmt: skip
    text = status()
    assert "SVOL-takeover (zero data loss)" in text, text
    assert "r1 g1/p1: hydrating 25.0%, 30 chunks pending" in text and "ETA 1.9s" in text, text
    # The old primary's node lost too: the pull suspended, the pair PSUE (issue 11, item 4).
    b.hydration |= {"pulling": False, "suspended_by": "link", "rate_bytes_s": None}
    text = status()
    assert "r1 g1/p1: hydration suspended at 25.0% (PSUE, link" in text, text
    b.hydration = None  # the pull is done
    (r1,) = json.loads(status("--json"))["resources"]
    assert r1["hydration"] == [] and r1["takeover"]["zero_loss"] is True
    # Seen from a host whose agent is not the active one: b's failover record, on its
    # heartbeats, says it (without the groups' reports, kept off the datagrams).
    mark = len(read_events(cluster.events("a")))
    cluster.start("a")
    wait_event(cluster.events("a"), "cluster.standby", lambda e: e["resource"] == "r1",
               after=mark)  # fmt: skip
    capsys.readouterr()
    deadline = time.monotonic() + 20
    while True:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PAIRVOL_AGENT_DIR", cluster.dir("a"))
            assert main(["cluster", "status", "--json", *cfg]) == 0
        (r1,) = json.loads(capsys.readouterr().out)["resources"]
        if r1["takeover"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # a's status file follows its heartbeats from b: poll, bounded
    assert r1["takeover"] == {"host": "b", "groups": {"g1": "SVOL-takeover"},
                              "zero_loss": True, "pulled_chunks": 40, "report": None}  # fmt: skip
    assert r1["hydration"] is None  # no node here
