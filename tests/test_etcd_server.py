"""Real etcd members (cluster.etcd_server): up and down, a member killed and restarted, a
three-member cluster that survives one loss and not two, a stop that fails loudly, and a
member inside a network namespace.  Every cluster is stopped by its fixture; a test that left
a process behind fails in teardown."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import require_programs, require_root
from labenv import poll_until

from cluster.coord import EtcdCoord
from cluster.etcd_server import EtcdCluster, free_ports
from replicator.errors import (
    ConnectionFailed,
    ExternalCommandFailed,
    IllegalState,
    NotFound,
    Timeout,
    UsageError,
)

Factory = Callable[..., EtcdCluster]


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[Factory]:
    """Makes clusters under tmp_path and, at teardown, stops them and checks that none of
    their processes is left."""
    made: list[EtcdCluster] = []

    def make(*args: object, **kwargs: object) -> EtcdCluster:
        c = EtcdCluster(str(tmp_path / f"etcd{len(made)}"), *args, **kwargs)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    pids = [p for c in made for i in range(len(c.members)) if (p := c.pid(i)) is not None]
    for c in made:
        c.stop()
    assert not [p for p in pids if psutil.pid_exists(p)], "etcd left behind"


def _put_get(endpoints: list[str], timeout: float = 5.0) -> None:
    key = f"/test/{uuid.uuid4().hex}"
    with EtcdCoord(endpoints, timeout) as c:
        c.put(key, b"v")
        kv = c.get(key)
        assert kv is not None and kv.value == b"v"


def test_one_member_up_and_down(clusters: Factory) -> None:
    require_programs("etcd")
    c = clusters()
    (ep,) = c.endpoints()
    assert ep.startswith("http://127.0.0.1:")
    c.start()
    assert c.running(0) and c.healthy(0)
    pid = c.pid(0)
    assert pid is not None
    m = c.members[0]
    assert os.path.isdir(m.data_dir) and m.data_dir.startswith(c.base_dir)
    assert os.path.getsize(m.log_path) > 0
    with open(m.pid_path) as f:
        assert f.read().split()[0] == str(pid)
    _put_get(c.endpoints())
    with pytest.raises(IllegalState, match="already started"):
        c.start()
    c.stop()
    assert not psutil.pid_exists(pid) and not c.running(0) and not c.healthy(0)
    assert not os.path.exists(m.pid_path)
    with pytest.raises(ConnectionFailed, match="unreachable"):
        _put_get(c.endpoints(), 1.0)
    c.stop()  # stopping a stopped cluster is nothing


def test_kill_and_restart_keeps_the_data(clusters: Factory) -> None:
    require_programs("etcd")
    c = clusters()
    c.start()
    with EtcdCoord(c.endpoints(), 5.0) as coord:
        coord.put("/kept", b"yes")
        c.kill_member(0)
        assert not c.running(0)
        with pytest.raises(IllegalState, match="not running"):
            c.kill_member(0)
        with pytest.raises(ConnectionFailed):
            coord.get("/kept")
        c.restart_member(0)
        with pytest.raises(IllegalState, match="still running"):
            c.restart_member(0)
        kv = coord.get("/kept")
        assert kv is not None and kv.value == b"yes"


def test_another_process_can_take_the_cluster_over(clusters: Factory, tmp_path: Path) -> None:
    require_programs("etcd")
    c = clusters()
    c.start()
    other = EtcdCluster.open(c.base_dir)
    assert other.endpoints() == c.endpoints() and other.running(0)
    assert other.pid(0) == c.pid(0)
    with open(os.path.join(c.base_dir, "etcd-cluster.json")) as f:
        assert json.load(f)["members"][0]["client_port"] == c.members[0].client_port
    other.stop()
    assert not c.running(0)
    with pytest.raises(NotFound, match="no etcd cluster"):
        EtcdCluster.open(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_three_members_survive_one_loss_not_two(clusters: Factory) -> None:
    require_programs("etcd")
    c = clusters(3)
    c.start()
    assert len(set(c.endpoints())) == 3
    _put_get(c.endpoints())
    c.kill_member(0)  # the first endpoint: the client moves on to the next
    # A proposal in flight when the leader goes is dropped by etcd and its client waits out
    # the request timeout: "survives" means the other two elect a leader and then serve.
    poll_until(lambda: [c.healthy(i) for i in (1, 2)], all, what="a new leader", timeout=20)
    _put_get(c.endpoints())
    with EtcdCoord(c.endpoints(), 5.0) as coord:
        coord.put("/seen/k", b"v")
    c.kill_member(1)
    with pytest.raises((Timeout, ConnectionFailed)):
        _put_get(c.endpoints(), 2.0)
    # Without a quorum a linearizable read fails too; a serializable one (cluster status's)
    # answers from the live member with what it has applied.
    with EtcdCoord(c.endpoints(), 1.0) as coord, pytest.raises((Timeout, ConnectionFailed)):
        coord.get("/seen/k")
    with EtcdCoord(c.endpoints(), 1.0, serializable=True) as coord:
        kv = coord.get("/seen/k")
        assert kv is not None and kv.value == b"v"
        assert [k.key for k in coord.get_prefix("/seen/")] == ["/seen/k"]
    c.restart_member(1)  # a quorum again
    poll_until(lambda: [c.healthy(i) for i in (1, 2)], all, what="a quorum again", timeout=20)
    _put_get(c.endpoints())
    c.restart_member(0)
    assert all(c.healthy(i) for i in range(3))


def _fake_etcd(tmp_path: Path, body: str) -> str:
    """A stand-in for the etcd binary (a Python script), to misbehave on purpose."""
    path = tmp_path / "fake-etcd"
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


SERVES_HEALTH_IGNORES_SIGTERM = """
import http.server, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
url = sys.argv[sys.argv.index("--listen-client-urls") + 1]
port = int(url.rsplit(":", 1)[1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b'{"health":"true"}')
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_a_member_that_ignores_sigterm_fails_the_stop(clusters: Factory, tmp_path: Path) -> None:
    c = clusters(etcd=_fake_etcd(tmp_path, SERVES_HEALTH_IGNORES_SIGTERM), stop_timeout=0.5)
    c.start()
    pid = c.pid(0)
    assert pid is not None
    with pytest.raises(
        IllegalState, match=r"m0 \(pid \d+\) ignored SIGTERM for 0.5s and was killed"
    ):
        c.stop()
    assert not psutil.pid_exists(pid)


def test_a_member_that_dies_at_start_names_its_error(clusters: Factory, tmp_path: Path) -> None:
    fake = _fake_etcd(
        tmp_path,
        'import json\nprint(json.dumps({"level": "fatal", "msg": "discovery failed",'
        ' "error": "bad flag"}))\nraise SystemExit(1)\n',
    )
    c = clusters(etcd=fake)
    with pytest.raises(ExternalCommandFailed) as info:
        c.start()
    assert "etcd member m0 exited with status 1 while starting: discovery failed: bad flag" in str(
        info.value
    )
    assert c.members[0].log_path in str(info.value)
    assert not c.running(0)


def test_a_member_that_never_gets_healthy_is_a_timeout(clusters: Factory, tmp_path: Path) -> None:
    c = clusters(etcd=_fake_etcd(tmp_path, "import time\ntime.sleep(60)\n"), start_timeout=0.5)
    with pytest.raises(Timeout, match=r"etcd member m0 not healthy within 0.5s"):
        c.start()
    assert not c.running(0)


def test_bad_arguments() -> None:
    with pytest.raises(UsageError):
        EtcdCluster("/tmp/x", 0)
    with pytest.raises(UsageError, match="3 members need 3 addresses"):
        EtcdCluster("/tmp/x", 3, ["127.0.0.1"])
    with pytest.raises(UsageError, match="one namespace need different addresses"):
        EtcdCluster("/tmp/x", 2, ["10.0.0.1", "10.0.0.1"], ["ns", "ns"])
    c = EtcdCluster("/tmp/x", 3, ["198.18.0.1", "198.18.0.2", "198.18.0.3"], ["a", "b", "c"])
    assert c.endpoints() == [f"http://198.18.0.{i}:2379" for i in (1, 2, 3)]
    with pytest.raises(UsageError, match="member 3 does not exist"):
        c.kill_member(3)
    with pytest.raises(ExternalCommandFailed, match="not installed"):
        EtcdCluster("/tmp/x", etcd="no-such-etcd-binary").start()


def test_free_ports_are_distinct() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20 and all(0 < p < 65536 for p in ports)


@pytest.mark.privileged
def test_a_member_in_a_network_namespace(clusters: Factory) -> None:
    require_root()
    require_programs("etcd", "etcdctl", "ip")
    ns = f"pvtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        c = clusters(1, ["127.0.0.1"], [ns])
        assert c.endpoints() == ["http://127.0.0.1:2379"]
        c.start()
        assert c.healthy(0)
        pids = subprocess.run(
            ["ip", "netns", "pids", ns], check=True, capture_output=True, text=True
        ).stdout.split()
        assert str(c.pid(0)) in pids  # etcd itself runs in the namespace
        put = subprocess.run(
            ["ip", "netns", "exec", ns, "etcdctl", "--endpoints", c.endpoints()[0],
             "put", "/k", "v"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert put.returncode == 0, put.stderr
        c.stop()
        left = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        assert left.stdout.split() == []
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
