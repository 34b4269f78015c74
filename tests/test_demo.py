"""README's main-job command, run as a user would (through the installed console script)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import require, require_programs, require_root


@pytest.mark.privileged
@pytest.mark.slow
def test_demo_runs_and_cleans_up(tmp_path: Path, pairvol_bin: str) -> None:
    require_root()
    require_programs("nbdkit", "nbdfuse", "losetup", "mkfs.ext4", "ip")
    require(Path("/dev/fuse").exists(), "needs /dev/fuse")
    work = tmp_path / "demo"
    r = subprocess.run(
        [pairvol_bin, "demo", "--workdir", str(work)], capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "same as a at the split: True" in out
    assert "every file from a present: True" in out
    assert "access error" in out and "expected PVID" in out
    assert "hidden secondary of pair demo/data" in out
    assert "demo finished successfully" in out
    # The lab is gone: no namespaces of it left.
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "demo" not in netns
    # Nothing left attached or mounted from the work directory.
    assert str(work) not in Path("/proc/mounts").read_text()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(work) not in loops
