"""``pairvol events``: the nodes' and agents' event logs merged in time order, filtered with
``--since``, as text or JSON lines, and followed as they grow.

The logs are written by the daemons' own writer (:class:`replicator.events.EventLog`, on a
scripted clock) into a lab registry made here, so nothing runs but the command.  --follow runs
as a process of its own; the test waits on its output, never on a sleep.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from pairvol import lab
from pairvol.cli import events as events_cli
from pairvol.cli import main
from replicator.events import EventLog

pytestmark = pytest.mark.timeout(60)

T0 = 1_780_000_000.0  # 2026-05-28


@pytest.fixture(autouse=True)
def _hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No lab, node or agent of the machine running the tests."""
    monkeypatch.setenv("PAIRVOL_LAB_ROOT", str(tmp_path / "labs"))
    nodes = tmp_path / "nodes-table"
    nodes.write_text("")
    monkeypatch.setenv("PAIRVOL_NODES", str(nodes))
    for var in ("PAIRVOL_LAB", "PAIRVOL_NODE_DIR", "PAIRVOL_AGENT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(events_cli, "NODE_ROOT", str(tmp_path / "var/nodes"))
    monkeypatch.setattr(events_cli, "AGENT_ROOT", str(tmp_path / "var/agent"))


def make_lab(name: str, hosts: list[str], *, cluster: bool = True) -> lab.Lab:
    """A lab registry as ``lab up`` leaves it (nothing running: only the logs matter)."""
    root = Path(lab.lab_root(), name)
    hs = []
    for i, h in enumerate(hosts):
        (root / h / "agent").mkdir(parents=True)
        hs.append(lab.LabHost(lab=name, host=h, netns=f"{name}-{h}", address=f"198.18.1.{i + 1}",
                              dir=str(root / h), nbd_uri=f"nbd://198.18.1.{i + 1}/",
                              peer_port=10810, control=str(root / h / "control.sock")))  # fmt: skip
    c = {"config": str(root / "cluster.toml"), "secret_file": str(root / "cluster.secret"),
         "etcd_dir": str(root / "etcd")} if cluster else None  # fmt: skip
    made = lab.Lab(name=name, dir=str(root), subnet_index=1, secret_file=str(root / "secret"),
                   hosts=hs, state="up", cluster=c)  # fmt: skip
    (root / lab.REGISTRY).write_text(json.dumps(made.to_json()))
    return made


def emit(path: Path | str, ts: float, event: str, **fields: Any) -> None:
    EventLog(str(path), clock=lambda: ts).emit(event, **fields)


def node_log(lab_name: str, host: str) -> Path:
    return Path(lab.lab_root(), lab_name, host, "events.jsonl")


def agent_log(lab_name: str, host: str) -> Path:
    return Path(lab.lab_root(), lab_name, host, "agent", "events.jsonl")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["events", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def interleaved() -> None:
    """Four logs whose events alternate in time: each file alone is in order, the merge is
    not any file's order."""
    make_lab("l1", ["a", "b"])
    emit(node_log("l1", "a"), T0 + 1, "node.started", node="a", pid=10)
    emit(node_log("l1", "b"), T0 + 2, "node.started", node="b", pid=20)
    emit(agent_log("l1", "a"), T0 + 3, "cluster.started", host="a")
    emit(agent_log("l1", "b"), T0 + 4, "cluster.started", host="b")
    emit(node_log("l1", "a"), T0 + 5, "pair.state", group="g1", pair="p1", state="PAIR")
    emit(agent_log("l1", "b"), T0 + 6, "cluster.active", resource="r1", epoch=3)
    emit(node_log("l1", "b"), T0 + 7, "pair.state", group="g1", pair="p1", state="SSWS")


def test_merges_every_node_and_agent_log_in_time_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    interleaved()
    code, out, err = run(capsys, "--lab", "l1", "--json")
    assert (code, err) == (0, "")
    got = json_lines(out)
    assert [e["ts"] for e in got] == [T0 + i for i in range(1, 8)]
    assert [(e["kind"], e["source"], e["event"]) for e in got] == [
        ("node", "a", "node.started"),
        ("node", "b", "node.started"),
        ("agent", "a", "cluster.started"),
        ("agent", "b", "cluster.started"),
        ("node", "a", "pair.state"),
        ("agent", "b", "cluster.active"),
        ("node", "b", "pair.state"),
    ]
    assert got[5] == {
        "ts": T0 + 6,
        "time": dt.datetime.fromtimestamp(T0 + 6, dt.UTC).isoformat(),
        "kind": "agent",
        "source": "b",
        "lab": "l1",
        "event": "cluster.active",
        "fields": {"resource": "r1", "epoch": 3},
    }


def test_text_output_one_line_per_event(capsys: pytest.CaptureFixture[str]) -> None:
    interleaved()
    emit(node_log("l1", "a"), T0 + 8, "pair.error", detail="link lost: peer b", n=None, ok=True)
    code, out, _ = run(capsys, "--lab", "l1")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 8
    local = dt.datetime.fromtimestamp(T0 + 5).isoformat(sep=" ", timespec="milliseconds")
    assert lines[4] == f"{local}  node a   pair.state  group=g1 pair=p1 state=PAIR"
    assert lines[5].endswith("  agent b  cluster.active  epoch=3 resource=r1")
    assert lines[7].endswith('  pair.error  detail="link lost: peer b" n=null ok=true')
    for line in lines:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  (node|agent) [ab] ", line)


def test_the_whole_machine_labs_systemd_nodes_agents_and_the_node_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_lab("l1", ["a"], cluster=False)
    emit(node_log("l1", "a"), T0 + 1, "node.started", node="a")
    systemd_node = Path(events_cli.NODE_ROOT, "east")
    systemd_node.mkdir(parents=True)
    emit(systemd_node / "events.jsonl", T0 + 2, "node.started", node="east")
    agent = Path(events_cli.AGENT_ROOT, "c1-east")
    agent.mkdir(parents=True)
    (agent / "agent.json").write_text(json.dumps({"host": "east", "cluster": "c1"}))
    emit(agent / "events.jsonl", T0 + 3, "cluster.started", host="east")
    west = tmp_path / "west"
    west.mkdir()
    emit(west / "events.jsonl", T0 + 4, "node.started", node="west")
    Path(os.environ["PAIRVOL_NODES"]).write_text(f"west 198.18.0.2 {west}\n")
    monkeypatch.setenv("PAIRVOL_NODE_DIR", str(west))  # the same log again: read once
    code, out, err = run(capsys, "--json")
    assert (code, err) == (0, "")
    assert [(e["kind"], e["source"], e["lab"]) for e in json_lines(out)] == [
        ("node", "l1/a", "l1"),
        ("node", "east", None),
        ("agent", "east", None),
        ("node", "west", None),
    ]


def test_since_an_iso_time_or_a_duration(capsys: pytest.CaptureFixture[str]) -> None:
    interleaved()
    iso = dt.datetime.fromtimestamp(T0 + 5).isoformat()  # local time, as an operator types it
    code, out, _ = run(capsys, "--lab", "l1", "--json", "--since", iso)
    assert code == 0
    assert [e["ts"] for e in json_lines(out)] == [T0 + 5, T0 + 6, T0 + 7]
    utc = dt.datetime.fromtimestamp(T0 + 6, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    _, out, _ = run(capsys, "--lab", "l1", "--json", "--since", utc)
    assert [e["ts"] for e in json_lines(out)] == [T0 + 6, T0 + 7]
    now = time.time()
    emit(node_log("l1", "a"), now - 600, "old")
    emit(node_log("l1", "a"), now - 10, "recent")
    _, out, _ = run(capsys, "--lab", "l1", "--json", "--since", "5m")
    assert [e["event"] for e in json_lines(out)] == ["recent"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("500ms", 0.5),
     ("1.5m", 90), ("0s", 0)],
)  # fmt: skip
def test_parse_since_durations(text: str, seconds: float) -> None:
    assert events_cli.parse_since(text, 1000.0) == pytest.approx(1000.0 - seconds)


def test_parse_since_iso_times() -> None:
    assert events_cli.parse_since("2026-05-28T20:26:40+00:00", 0) == 1_780_000_000
    assert events_cli.parse_since("2026-05-28T20:26:40Z", 0) == 1_780_000_000
    naive = dt.datetime(2026, 5, 28, 12, 0, 0)
    assert events_cli.parse_since("2026-05-28 12:00:00", 0) == naive.timestamp()
    assert events_cli.parse_since("2026-05-28", 0) == dt.datetime(2026, 5, 28).timestamp()


@pytest.mark.parametrize(
    "text", ["yesterday", "5x", "-5m", "", "m", "5 m", "2026-13-01", "2026-05-28T25:00"]
)
def test_a_bad_since_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], text: str) -> None:
    interleaved()
    code, out, err = run(capsys, "--lab", "l1", f"--since={text}")
    assert (code, out) == (2, "")
    assert err == (
        f"pairvol: error: --since {text!r}: neither an ISO time (2026-05-01T12:00:00) "
        "nor a duration (30s, 5m, 2h, 1d)\n"
    )


def test_unknown_lab_bad_lab_name_and_no_logs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--lab", "nope")
    assert (code, out) == (3, "")
    assert err.startswith("pairvol: error: no lab named 'nope' in ") and err.count("\n") == 1
    code, _, err = run(capsys, "--lab", "Bad_Name")
    assert code == 2 and err.startswith("pairvol: error: lab name 'Bad_Name' is not valid")
    assert err.count("\n") == 1
    code, _, err = run(capsys)
    assert code == 3 and err.startswith("pairvol: error: no event logs on this machine: ")
    assert err.count("\n") == 1
    code, _, err = run(capsys, "--folow")
    assert code == 2 and err.count("\n") == 1


def test_a_torn_last_line_is_ignored_and_a_bad_line_skipped_with_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    interleaved()
    with open(node_log("l1", "b"), "ab") as f:  # what a writer killed mid-line leaves
        f.write(b'{"event": "pair.state", "ts": 1780000099.0, "sta')
    with open(node_log("l1", "a"), "ab") as f:
        f.write(b"not json\n")
    emit(node_log("l1", "a"), T0 + 9, "after.the.bad.line")
    code, out, err = run(capsys, "--lab", "l1", "--json")
    assert code == 0
    assert [e["event"] for e in json_lines(out)][-2:] == ["pair.state", "after.the.bad.line"]
    assert max(e["ts"] for e in json_lines(out)) == T0 + 9  # not the torn line's
    assert err == (
        f"pairvol: warning: {node_log('l1', 'a')}:3: not JSON (Expecting value: line 1 column "
        "1 (char 0)); skipped\n"
    )


def test_an_unreadable_log_is_skipped_with_one_warning(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").mkdir()  # not a file: what a broken node directory may hold
    warnings: list[str] = []
    tail = events_cli.Tail(events_cli.Source("node", "n", str(tmp_path / "events.jsonl")))
    tail.warn = warnings.append
    assert tail.read() == [] and tail.read() == []
    assert warnings == [f"{tmp_path / 'events.jsonl'}: Is a directory; skipped"]


def test_a_log_that_is_truncated_or_replaced_is_read_again_from_its_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"
    emit(path, T0 + 1, "one")
    emit(path, T0 + 2, "two")
    tail = events_cli.Tail(events_cli.Source("node", "n", str(path)))
    assert [e.event for e in tail.read()] == ["one", "two"]
    assert tail.read() == []
    path.write_text("")
    emit(path, T0 + 3, "three")  # shorter than what was read: truncated
    assert [e.event for e in tail.read()] == ["three"]
    other = tmp_path / "new.jsonl"
    for i in range(5):
        emit(other, T0 + 10 + i, f"n{i}")
    os.replace(other, path)  # a new file under the same name
    assert [e.event for e in tail.read()] == [f"n{i}" for i in range(5)]


# -- --follow --------------------------------------------------------------------------------


class Follower:
    """``pairvol events --follow`` as a process; its output read as it comes."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pairvol", "events", "--follow", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=dict(os.environ),
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.out = self.proc.stdout
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.out, selectors.EVENT_READ)
        self.buffer = b""
        self.lines: list[str] = []

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> dict[str, Any]:
        """The first JSON line (from the start) that matches, reading until it comes."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                record: dict[str, Any] = json.loads(line)
                if predicate(record):
                    return record
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"not in the output within {timeout}s: {self.lines}")
            if self.selector.select(timeout=left):
                chunk = os.read(self.out.fileno(), 65536)
                self.buffer += chunk
                *complete, self.buffer = self.buffer.split(b"\n")
                self.lines += [c.decode() for c in complete]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, str]:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            pytest.fail(f"events --follow did not exit within {timeout}s of signal {sig}")
        _, err = self.proc.communicate(timeout=10)
        self.selector.close()
        return code, err.decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_follow_prints_what_is_appended_and_exits_0_on_a_signal(sig: int) -> None:
    interleaved()
    f = Follower("--lab", "l1", "--json")
    try:
        f.wait_for(lambda e: e["ts"] == T0 + 7)  # everything so far, first
        with open(agent_log("l1", "a"), "ab") as log:
            log.write(b'{"event": "cluster.failover", "resource": "r1", ')  # mid-write
        emit(node_log("l1", "b"), T0 + 20, "pair.state", state="PAIR")
        got = f.wait_for(lambda e: e["ts"] == T0 + 20)
        assert (got["source"], got["fields"]) == ("b", {"state": "PAIR"})
        with open(agent_log("l1", "a"), "ab") as log:
            log.write(b'"ts": 1780000021.0}\n')  # the line's end: now it is an event
        got = f.wait_for(lambda e: e["event"] == "cluster.failover")
        assert (got["kind"], got["source"], got["fields"]) == ("agent", "a", {"resource": "r1"})
    finally:
        code, err = f.stop(sig)
    assert (code, err) == (0, "")
    assert [json.loads(line)["ts"] for line in f.lines] == [
        *(T0 + i for i in range(1, 8)),
        T0 + 20,
        T0 + 21,
    ]


def test_follow_picks_up_a_log_that_appears_later() -> None:
    """The machine view finds new logs while it follows: here a lab made after the start."""
    interleaved()
    f = Follower("--json")
    try:
        f.wait_for(lambda e: e["ts"] == T0 + 7)
        make_lab("l2", ["c"], cluster=False)
        emit(node_log("l2", "c"), T0 + 30, "node.started", node="c")
        got = f.wait_for(lambda e: e["ts"] == T0 + 30)
        assert (got["source"], got["lab"]) == ("l2/c", "l2")
    finally:
        code, err = f.stop()
    assert code == 0, err
