"""``pairvol volume``: every command through main([...]), bad inputs change nothing."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from pairvol.cli import main
from replicator import header as hdr


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def info(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, object]:
    code, out, _ = run(capsys, "volume", "info", str(path), "--json")
    assert code == 0
    result: dict[str, object] = json.loads(out)
    return result


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_create_info_set_pvid_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "data.img"
    code, out, _ = run(
        capsys, "volume", "create", str(p), "--size", "64M", "--pvid", "00c5247772d2f36b", "--json"
    )
    assert code == 0
    created = json.loads(out)
    assert created["pvid"] == "00c5247772d2f36b" and created["name"] == "data"
    i = info(capsys, p)
    assert i["size"] == 64 << 20 and i["header"] == "ok" and i["uuid"] == created["uuid"]

    code, out, _ = run(capsys, "volume", "set-pvid", str(p), "--new", "--json")
    assert code == 0
    changed = json.loads(out)
    assert changed["old_pvid"] == "00c5247772d2f36b" and changed["pvid"] != changed["old_pvid"]
    assert info(capsys, p)["pvid"] == changed["pvid"]

    code, _, _ = run(capsys, "volume", "set-pvid", str(p), "1234567890abcdef")
    assert code == 0 and info(capsys, p)["pvid"] == "1234567890abcdef"

    code, out, _ = run(capsys, "volume", "check", str(p), "--json")
    assert code == 0 and json.loads(out)["header"] == "ok"


def test_check_reports_and_repairs_a_damaged_slot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "v.img"
    assert run(capsys, "volume", "create", str(p), "--size", "1M")[0] == 0
    with open(p, "r+b") as f:
        f.seek(hdr.SLOT_OFFSETS[0] + 40)
        f.write(b"\x00\x01\x02")
    before = digest(p)
    code, out, err = run(capsys, "volume", "check", str(p), "--no-repair", "--json")
    assert code == 6 and "slot A damaged" in err and json.loads(out)["repaired"] == []
    assert digest(p) == before
    code, out, _ = run(capsys, "volume", "check", str(p), "--json")
    assert code == 0 and json.loads(out)["repaired"] == ["A"]
    assert run(capsys, "volume", "check", str(p), "--no-repair")[0] == 0


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["volume", "create", "{new}", "--size", "0"], 2, "zero"),
        (["volume", "create", "{new}", "--size=-64M"], 2, "negative"),
        (["volume", "create", "{new}", "--size", "lots"], 2, "not a size"),
        (["volume", "create", "{new}", "--size", "\u0666\u0664M"], 2, "not a size"),  # Arabic 64
        (["volume", "create", "{new}", "--size", "\uff16\uff14M"], 2, "not a size"),  # fullwidth
        (["volume", "create", "{new}", "--size", "1M", "--block-size", "\u0664K"], 2, "not a"),
        (["volume", "create", "{new}", "--size", "1M", "--name", "."], 2, "not allowed"),
        (["volume", "create", "{new}", "--size", "1M", "--name", ".."], 2, "not allowed"),
        (["volume", "create", "{dir}/...img", "--size", "1M"], 2, "'..' is not allowed"),
        (["volume", "create", "{new}", "--size", "1000"], 2, "multiple of the block size"),
        (["volume", "create", "{new}", "--size", "1M", "--pvid", "xyz"], 2, "malformed"),
        (["volume", "create", "{new}", "--size", "1M", "--pvid", "0" * 16], 2, "reserved"),
        (["volume", "create", "{new}", "--size", "1M", "--name", "a/b"], 2, "contains"),
        (["volume", "create", "{new}", "--size", "1M", "--block-size", "3000"], 2, "block size"),
        (["volume", "create", "{old}", "--size", "1M"], 4, "already exists"),
        (["volume", "create", "{dir}/no/such/v.img", "--size", "1M"], 3, "does not exist"),
        (["volume", "create", "{new}"], 2, "--size"),
        (["volume", "info", "{dir}/missing.img"], 3, "no such file"),
        (["volume", "info", "{junk}"], 6, "no valid header slot"),
        (["volume", "info", "{dir}"], 2, "is not a regular file (a directory)"),
        (["volume", "info", "{fifo}"], 2, "is not a regular file (a FIFO)"),
        (["volume", "check", "{fifo}"], 2, "is not a regular file (a FIFO)"),
        (["volume", "check", "{fifo}", "--no-repair"], 2, "is not a regular file (a FIFO)"),
        (["volume", "set-pvid", "{fifo}", "--new"], 2, "is not a regular file (a FIFO)"),
        (["volume", "info", "{sock}"], 2, "is not a regular file (a socket)"),
        (["volume", "info", "/dev/null"], 2, "is not a regular file (a character device)"),
        (["volume", "set-pvid", "{old}", "nothex"], 2, "malformed"),
        (["volume", "set-pvid", "{old}"], 2, "exactly one of"),
        (
            ["volume", "set-pvid", "{old}", "--new", "1234567890abcdef"],
            2,
            "unrecognized arguments: 1234567890abcdef",
        ),
        (["volume", "set-pvid", "{old}", "00c5247772d2f36b"], 5, "already has PVID"),
        (["volume", "frobnicate"], 2, "invalid choice"),
        ([], 2, "required"),
    ],
)
def test_bad_input_gives_one_line_error_and_changes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    message: str,
) -> None:
    old = tmp_path / "old.img"
    assert (
        run(capsys, "volume", "create", str(old), "--size", "1M", "--pvid", "00c5247772d2f36b")[0]
        == 0
    )
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a volume" * 1000)
    os.mkfifo(tmp_path / "fifo")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(tmp_path / "sock"))
    before = {f.name: digest(f) for f in tmp_path.iterdir() if f.is_file()}
    subst = {
        "new": str(tmp_path / "new.img"),
        "old": str(old),
        "dir": str(tmp_path),
        "junk": str(junk),
        "fifo": str(tmp_path / "fifo"),
        "sock": str(tmp_path / "sock"),
    }
    got, _out, err = run(capsys, *[a.format(**subst) for a in argv])
    assert got == code, err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("pairvol: error: ")
    after = {f.name: digest(f) for f in tmp_path.iterdir() if f.is_file()}
    assert after == before


def test_console_script_exit_codes(tmp_path: Path, pairvol_bin: str) -> None:
    r = subprocess.run(
        [pairvol_bin, "volume", "info", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert r.returncode == 3 and r.stderr.startswith("pairvol: error:")
    r = subprocess.run([pairvol_bin, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "volume" in r.stdout


def test_volume_info_on_a_fifo_answers_at_once(tmp_path: Path, pairvol_bin: str) -> None:
    fifo = tmp_path / "v.img"
    os.mkfifo(fifo)
    r = subprocess.run(
        [pairvol_bin, "volume", "info", str(fifo)], capture_output=True, text=True, timeout=20
    )
    assert r.returncode == 2 and r.stdout == ""
    assert (
        r.stderr
        == f"pairvol: error: {fifo} is not a regular file (a FIFO), so not a volume image\n"
    )
