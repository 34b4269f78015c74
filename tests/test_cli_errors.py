"""``pairvol pair``/``node`` against nodes that are not there, and input checked by the CLI:
one line on stderr, the error's exit code, never a quiet "no pairs" with exit 0."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pairvol import lab
from pairvol.cli import main
from replicator import control

NO_NODE = 20


@pytest.fixture(autouse=True)
def _hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No lab, no node table and no node directory from the machine running the tests."""
    monkeypatch.setenv("PAIRVOL_LAB_ROOT", str(tmp_path / "labs"))
    monkeypatch.delenv("PAIRVOL_LAB", raising=False)
    nodes = tmp_path / "nodes"
    nodes.write_text("")
    monkeypatch.setenv("PAIRVOL_NODES", str(nodes))
    monkeypatch.delenv("PAIRVOL_NODE_DIR", raising=False)


@pytest.fixture
def node_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pv-cli-") as d:  # short: a unix socket path
        yield Path(d)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("pairvol: error: ")


def stale_socket(node_dir: Path) -> None:
    """What a node killed with -9 leaves behind: a socket file nobody listens on."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(node_dir / "control.sock"))
    s.close()


COMMANDS = [
    ["pair", "display"],
    ["pair", "display", "g1"],
    ["pair", "display", "g1/p1", "--json"],
    ["pair", "split", "g1"],
    ["pair", "resync", "g1/p1"],
    ["pair", "resync", "g1", "--swap"],
    ["pair", "delete", "g1/p1"],
    ["pair", "takeover", "g1", "--force"],
    ["pair", "verify", "g1"],
    ["pair", "wait", "g1/p1", "--state", "PAIR", "--timeout", "5"],
    ["pair", "create", "g1/p1", "--primary", "n1:v1", "--secondary", "n2:v1"],
    ["node", "status"],
]


@pytest.mark.parametrize("how", ["no socket", "stale socket", "env", "missing dir"])
@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_an_unreachable_node_is_exit_20_with_one_line(
    node_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    how: str,
) -> None:
    where = node_dir / "gone" if how == "missing dir" else node_dir
    if how == "stale socket":
        stale_socket(node_dir)
    opt = "--dir" if argv[0] == "node" else "--node"
    if how == "env":
        monkeypatch.setenv("PAIRVOL_NODE_DIR", str(where))
        extra: list[str] = []
    else:
        extra = [opt, str(where)]
    code, out, err = run(capsys, *argv, *extra)
    assert code == NO_NODE, err
    assert out == "" and one_line(err), err
    assert "no node" in err and str(where) in err


def test_display_without_any_node_says_which_node(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "pair", "display")
    assert code == 2 and out == "" and one_line(err) and "which node?" in err


def make_lab(tmp_path: Path, controls: list[str]) -> None:
    root = tmp_path / "labs" / "t1"
    root.mkdir(parents=True)
    hosts = [
        lab.LabHost("t1", f"h{i}", f"t1-h{i}", f"10.99.0.{i + 2}", str(Path(c).parent), "", 7000, c)
        for i, c in enumerate(controls)
    ]
    lab._save(lab.Lab("t1", str(root), 1, str(root / "secret"), hosts, state="up"))
    assert lab.names() == ["t1"]


def test_display_over_the_labs_fails_when_no_lab_node_answers(
    tmp_path: Path, node_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (node_dir / "a").mkdir()
    (node_dir / "b").mkdir()
    stale_socket(node_dir / "a")
    make_lab(tmp_path, [str(node_dir / "a" / "control.sock"), str(node_dir / "b" / "control.sock")])
    code, out, err = run(capsys, "pair", "display")
    assert code == NO_NODE and out == "" and one_line(err), err
    assert "no lab node answered" in err


def side(node: str, role: str, peer: str) -> dict[str, Any]:
    return {
        "id": "g1/p1", "group": "g1", "pair": "p1", "role": role, "node": node, "volume": "v1",
        "peer": f"{peer}:v1", "peer_node": peer, "mode": "sync", "fence": "never",
        "state": "PAIR", "copy_percent": 100.0, "dirty_bytes": 0, "pvid": "00c5247772d2f36b",
        "last_copy_bytes": 0, "link": "up",
    }  # fmt: skip


def test_display_over_the_labs_shows_the_nodes_that_answer(
    tmp_path: Path, node_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (node_dir / "a").mkdir()
    (node_dir / "b").mkdir()
    up = control.ControlServer(
        str(node_dir / "a" / "control.sock"),
        {"pair.display": lambda _a: {"pairs": [side("h0", "primary", "h1")]}},
        print,
    )
    up.start()
    try:
        make_lab(
            tmp_path, [str(node_dir / "a" / "control.sock"), str(node_dir / "b" / "control.sock")]
        )
        code, out, err = run(capsys, "pair", "display")
    finally:
        up.stop()
    assert code == 0, err
    assert "h0:v1" in out and "PAIR" in out and err == ""


def test_a_node_that_answers_with_no_pairs_still_says_no_pairs(
    node_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    up = control.ControlServer(
        str(node_dir / "control.sock"), {"pair.display": lambda _a: {"pairs": []}}, print
    )
    up.start()
    try:
        code, out, err = run(capsys, "pair", "display", "--node", str(node_dir))
        assert (code, out, err) == (0, "no pairs\n", "")
        # A peer that is down leaves its half of the row unknown; the command still works.
        up.handlers["pair.display"] = lambda _a: {"pairs": [side("n1", "primary", "n2")]}
        code, out, err = run(capsys, "pair", "display", "--node", str(node_dir), "--json")
        assert code == 0 and '"secondary_state": "?"' in out, err
    finally:
        up.stop()


CREATE = ["pair", "create", "g1/p1", "--primary", "a:v1", "--secondary", "b:v1"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "async", "--high-watermark", "0"], "more than 0 and at most 100"),
        (["--mode", "async", "--high-watermark", "0.0"], "more than 0 and at most 100"),
        (["--mode", "async", "--high-watermark", "100.5"], "more than 0 and at most 100"),
        (["--mode", "async", "--high-watermark=-5"], "not a number"),
        (["--mode", "async", "--high-watermark", "nan"], "not a number"),
        (["--mode", "async", "--high-watermark", "inf"], "not a number"),
        (["--mode", "async", "--high-watermark", "1e2"], "not a number"),
        (["--mode", "async", "--high-watermark", "\u0668\u0660"], "not a number"),  # Arabic 80
        (["--mode", "async", "--high-watermark", "80%"], "not a number"),
        (["--high-watermark", "0"], "are for --mode async"),
        (["--high-watermark", "80"], "are for --mode async"),
    ],
)
def test_high_watermark_is_checked_by_the_cli(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code, out, err = run(capsys, *CREATE, *extra)
    assert code == 2 and out == "" and one_line(err), err
    assert message in err
    assert "between 0 and 100" not in err


@pytest.mark.parametrize("value", ["100", "0.5", "80", "62.5", ".5"])
def test_a_good_high_watermark_passes_the_check(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    # Past the check the CLI looks for node "a", which this machine does not know.
    code, _, err = run(capsys, *CREATE, "--mode", "async", "--high-watermark", value)
    assert code == 3 and "unknown node 'a'" in err, err
