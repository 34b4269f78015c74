"""``pairvol host`` against a real nbdkit serving real volumes (no root needed here).

Attaching block devices needs root, FUSE and loop devices: see test_blockdev.py.  Here the
access check is exercised up to the point where it refuses (or, after a refresh, accepts).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PLUGIN, require_programs

from cluster.probe import check_access, parse_uri, probe
from pairvol.cli import build_parser, main
from replicator.errors import PvidMismatch, UsageError
from replicator.volume import Volume

READY_TIMEOUT = 30.0


class NbdServer:
    """nbdkit serving every volume in a directory on a Unix socket."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "vols"
        self.dir.mkdir()
        self.sock = root / "nbd.sock"
        self.log = root / "nbdkit.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def create(self, name: str, size: int = 8 << 20) -> Path:
        path = self.dir / f"{name}.img"
        Volume.create(str(path), size, name=name).close()
        return path

    def uri(self, name: str = "") -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def start(self, *plugin: str) -> None:
        """Serve ``self.dir`` with the pairvol plugin (or another nbdkit ``plugin`` + args)."""
        plugin = plugin or ("python", PLUGIN, f"dir={self.dir}")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["nbdkit", "--unix", str(self.sock), "--foreground", "--exit-with-parent", *plugin],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        # Ready when the socket exists (bounded: a server that never comes up fails the test).
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.sock.exists():
            assert self.proc.poll() is None, f"nbdkit exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, "nbdkit's socket never appeared"
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("nbdkit did not exit on SIGTERM")
        self.sock.unlink(missing_ok=True)  # nbdkit 1.32 leaves its socket behind


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NbdServer]:
    require_programs("nbdkit")
    s = NbdServer(tmp_path)
    s.create("alpha")
    s.create("beta")
    s.start()
    yield s
    s.stop()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "state" / "host-cache.json"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def host(capsys: pytest.CaptureFixture[str], cache: Path, *argv: str) -> tuple[int, str, str]:
    return run(capsys, "host", "--cache", str(cache), *argv)


def host_json(capsys: pytest.CaptureFixture[str], cache: Path, *argv: str) -> dict[str, object]:
    code, out, err = host(capsys, cache, *argv, "--json")
    assert code == 0, err
    doc: dict[str, object] = json.loads(out)
    return doc


def entries(capsys: pytest.CaptureFixture[str], cache: Path) -> dict[str, dict[str, object]]:
    doc = host_json(capsys, cache, "list")
    assert doc["cache"] == str(cache)
    return {e["name"]: e for e in doc["entries"]}  # type: ignore[attr-defined]


def volume_info(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, object]:
    code, out, _ = run(capsys, "volume", "info", str(path), "--json")
    assert code == 0
    info: dict[str, object] = json.loads(out)
    return info


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


# -- scan / list / refresh / forget -----------------------------------------------------------


def test_scan_records_what_the_volumes_say(
    server: NbdServer, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = host_json(capsys, cache, "scan", server.uri("alpha"), server.uri("beta"))
    scanned = {e["name"]: e for e in doc["scanned"]}  # type: ignore[attr-defined]
    assert set(scanned) == {"pv0", "pv1"}
    for name, vol in (("pv0", "alpha"), ("pv1", "beta")):
        truth = volume_info(capsys, server.dir / f"{vol}.img")
        e = scanned[name]
        assert e["action"] == "added" and e["old_pvid"] is None and e["export"] == vol
        assert e["pvid"] == truth["pvid"] and e["attachment"] is None
        v = e["vol"]
        assert (v["uuid"], v["size"], v["name"], v["generation"]) == (
            truth["uuid"],
            truth["size"],
            vol,
            truth["generation"],
        )
        assert e["uri"] == server.uri(vol)  # canonical: absolute socket path
    assert json.loads(cache.read_text())["version"] == 1

    listed = entries(capsys, cache)
    assert {n: e["pvid"] for n, e in listed.items()} == {n: e["pvid"] for n, e in scanned.items()}
    code, out, _ = host(capsys, cache, "list")
    assert code == 0 and "pv0" in out and "alpha" in out and scanned["pv1"]["pvid"] in out


def test_rescan_updates_the_same_entry(
    server: NbdServer,
    cache: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host_json(capsys, cache, "scan", server.uri("alpha"))
    # Same export spelled differently: a relative socket path.
    monkeypatch.chdir(tmp_path)
    doc = host_json(capsys, cache, "scan", "nbd+unix:///alpha?socket=nbd.sock")
    (again,) = doc["scanned"]  # type: ignore[misc]
    assert again["name"] == "pv0" and again["action"] == "unchanged"
    assert list(entries(capsys, cache)) == ["pv0"]

    code, _, _ = run(capsys, "volume", "set-pvid", str(server.dir / "alpha.img"), "--new")
    assert code == 0
    new_pvid = volume_info(capsys, server.dir / "alpha.img")["pvid"]
    doc = host_json(capsys, cache, "scan", server.uri("alpha"), server.uri("beta"))
    rescanned, added = doc["scanned"]  # type: ignore[misc]
    assert rescanned["name"] == "pv0" and rescanned["action"] == "updated"
    assert rescanned["pvid"] == new_pvid and rescanned["old_pvid"] == again["pvid"]
    assert added["name"] == "pv1" and added["action"] == "added"


def test_scan_as_a_chosen_name(
    server: NbdServer, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = host_json(capsys, cache, "scan", server.uri("beta"), "--as", "hdisk7")
    assert doc["scanned"][0]["name"] == "hdisk7"  # type: ignore[index]
    assert entries(capsys, cache)["hdisk7"]["export"] == "beta"
    # The next automatic name is still pv0.
    doc = host_json(capsys, cache, "scan", server.uri("alpha"))
    assert doc["scanned"][0]["name"] == "pv0"  # type: ignore[index]


def test_refresh_reads_the_volume_and_prints_old_and_new(
    server: NbdServer, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host_json(capsys, cache, "scan", server.uri("alpha"))
    old = entries(capsys, cache)["pv0"]["pvid"]
    assert run(capsys, "volume", "set-pvid", str(server.dir / "alpha.img"), "--new")[0] == 0
    new = volume_info(capsys, server.dir / "alpha.img")["pvid"]
    assert entries(capsys, cache)["pv0"]["pvid"] == old  # list never reads the volume

    code, out, _ = host(capsys, cache, "refresh", "pv0")
    assert code == 0 and out.strip() == f"pv0: PVID {old} -> {new}"
    assert entries(capsys, cache)["pv0"]["pvid"] == new
    doc = host_json(capsys, cache, "refresh", "pv0")
    assert (doc["old_pvid"], doc["pvid"], doc["changed"]) == (new, new, False)
    assert doc["vol"]["generation"] == volume_info(capsys, server.dir / "alpha.img")["generation"]  # type: ignore[index]


def test_forget(server: NbdServer, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host_json(capsys, cache, "scan", server.uri("alpha"), server.uri("beta"))
    doc = host_json(capsys, cache, "forget", "pv0")
    assert doc["name"] == "pv0" and doc["forgotten"]["export"] == "alpha"  # type: ignore[index]
    assert list(entries(capsys, cache)) == ["pv1"]
    doc = host_json(capsys, cache, "scan", server.uri("alpha"))
    assert doc["scanned"][0]["name"] == "pv0"  # type: ignore[index]  # lowest free name again


# -- the access check -------------------------------------------------------------------------


def test_attach_is_refused_after_the_pvid_changes_until_refresh(
    server: NbdServer, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host_json(capsys, cache, "scan", server.uri("alpha"))
    cached = entries(capsys, cache)["pv0"]["pvid"]
    assert run(capsys, "volume", "set-pvid", str(server.dir / "alpha.img"), "--new")[0] == 0
    actual = volume_info(capsys, server.dir / "alpha.img")["pvid"]
    before = digest(cache)

    code, out, err = host(capsys, cache, "attach", "pv0")
    assert code == 7 and out == ""
    assert err.count("\n") == 1 and "access error" in err and "pv0" in err
    assert f"expected PVID {cached}" in err and f"the volume has PVID {actual}" in err
    assert digest(cache) == before

    # The check attach runs: refused with both PVIDs, then accepted once refreshed.
    uri = parse_uri(server.uri("alpha"))
    with pytest.raises(PvidMismatch) as refused:
        check_access(uri, str(cached), "pv0")
    assert (refused.value.expected, refused.value.actual) == (cached, actual)
    assert host(capsys, cache, "refresh", "pv0")[0] == 0
    assert entries(capsys, cache)["pv0"]["pvid"] == actual
    assert check_access(uri, str(actual), "pv0").pvid == actual


def test_the_server_enforces_name_at_pvid(server: NbdServer) -> None:
    """Connecting as NAME@PVID with a stale PVID is refused by nbdkit itself."""
    import nbd

    good = Volume.open(str(server.dir / "beta.img")).header.pvid_hex
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///beta@{good}?socket={server.sock}")
    assert h.get_size() == 8 << 20
    h.shutdown()
    stale = "0123456789abcdef"
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(f"nbd+unix:///beta@{stale}?socket={server.sock}")


# -- bad inputs change nothing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["scan", "http://example.com/alpha"], 2, "scheme must be nbd"),
        (["scan", "nbd+unix:///alpha"], 2, "socket=PATH"),
        (["scan", "nbd://"], 2, "names no host"),
        (["scan", "nbd://127.0.0.1:99999/alpha"], 2, "malformed"),
        (["scan", "nbd+unix:///al@pha?socket=x"], 2, "malformed"),
        (["scan", "{uri:alpha}", "{uri:beta}", "--as", "two"], 2, "exactly one NBD-URI"),
        (["scan", "{uri:alpha}", "--as", "../x"], 2, "device name"),
        (["scan", "{uri:beta}", "--as", "pv0"], 4, "already means"),
        (["scan", "{uri:alpha}", "--as", "other"], 4, "already in the host cache as 'pv0'"),
        (["scan", "{uri:nope}"], 3, "no export named 'nope' (exports: alpha, beta)"),
        (["scan", "{uri:}"], 3, "no default export"),
        (["scan", "nbd://127.0.0.1:1/alpha"], 20, "cannot reach NBD server"),
        (["scan", "nbd+unix:///alpha?socket=/nonexistent/sock"], 20, "cannot reach"),
        (["scan", "{uri:beta}", "nbd://127.0.0.1:1/alpha"], 20, "cannot reach"),
        (["attach", "pv9"], 3, "no device named 'pv9'"),
        (["detach", "pv9"], 3, "no device named 'pv9'"),
        (["refresh", "pv9"], 3, "no device named 'pv9'"),
        (["forget", "pv9"], 3, "no device named 'pv9'"),
        (["detach", "pv0"], 5, "not attached"),
        (["frobnicate"], 2, "invalid choice"),
        (["scan"], 2, "required"),
    ],
)
def test_bad_input_exit_code_and_cache_unchanged(
    server: NbdServer,
    cache: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    message: str,
) -> None:
    host_json(capsys, cache, "scan", server.uri("alpha"))
    before = digest(cache)
    args = [server.uri(a[5:-1]) if a.startswith("{uri:") else a for a in argv]
    got, out, err = host(capsys, cache, *args)
    assert got == code, err
    assert message in err and err.count("\n") == 1 and err.startswith("pairvol: error: ")
    assert out == ""
    assert digest(cache) == before
    assert list(entries(capsys, cache)) == ["pv0"]


def test_unreachable_server_for_cached_devices(
    server: NbdServer, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host_json(capsys, cache, "scan", server.uri("alpha"))
    before = digest(cache)
    server.stop()
    for action in ("attach", "refresh"):
        code, _, err = host(capsys, cache, action, "pv0")
        assert code == 20 and "cannot reach NBD server" in err, (action, err)
    assert digest(cache) == before
    assert entries(capsys, cache)["pv0"]["attachment"] is None  # list needs no server


def test_commands_on_a_missing_cache_create_nothing(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert host_json(capsys, cache, "list")["entries"] == []
    assert not cache.parent.exists()  # looking creates nothing
    assert host(capsys, cache, "attach", "pv0")[0] == 3
    assert not cache.exists()  # a failed command saves nothing (only the lock file may appear)


def test_cache_location_from_env_and_option_position(
    server: NbdServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env_cache = tmp_path / "env.json"
    monkeypatch.setenv("PAIRVOL_HOST_CACHE", str(env_cache))
    code, _, _ = run(capsys, "host", "scan", server.uri("beta"))
    assert code == 0 and env_cache.exists()
    other = tmp_path / "other.json"
    # --cache also works after the action, and beats the environment.
    code, out, _ = run(capsys, "host", "list", "--cache", str(other), "--json")
    assert code == 0 and json.loads(out) == {"cache": str(other), "entries": []}
    code, out, _ = run(capsys, "host", "list", "--json")
    assert [e["export"] for e in json.loads(out)["entries"]] == ["beta"]


# -- the installed console script ------------------------------------------------------------


def test_console_script(server: NbdServer, cache: Path, pairvol_bin: str) -> None:
    def pv(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [pairvol_bin, "host", "--cache", str(cache), *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    r = pv("scan", server.uri("alpha"), "--json")
    assert r.returncode == 0, r.stderr
    cached = json.loads(r.stdout)["scanned"][0]["pvid"]
    r = subprocess.run(
        [pairvol_bin, "volume", "set-pvid", str(server.dir / "alpha.img"), "--new", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    actual = json.loads(r.stdout)["pvid"]
    before = digest(cache)
    r = pv("attach", "pv0")
    assert r.returncode == 7 and r.stdout == ""
    assert r.stderr.strip() == (
        f"pairvol: error: access error: device 'pv0' ({server.uri('alpha')}): "
        f"expected PVID {cached} but the volume has PVID {actual}"
    )
    assert digest(cache) == before
    r = pv("refresh", "pv0", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["pvid"] == actual
    r = pv("list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["entries"][0]["pvid"] == actual


def test_parser_errors_are_usage_errors_not_system_exit() -> None:
    with pytest.raises(UsageError, match="--as"):
        build_parser().parse_args(["host", "scan", "nbd://h/x", "--as"])


# -- URIs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("nbd://storage1/vol1", "nbd://storage1:10809/vol1"),
        ("nbd://storage1:10810/vol1", "nbd://storage1:10810/vol1"),
        ("nbd://[fd00::1]:10809/vol1", "nbd://[fd00::1]:10809/vol1"),
        ("nbd://10.0.0.2", "nbd://10.0.0.2:10809/"),
        ("nbd+unix:///vol1?socket=/run/nbd.sock", "nbd+unix:///vol1?socket=/run/nbd.sock"),
        ("nbd+unix:///?socket=/run/nbd.sock", "nbd+unix:///?socket=/run/nbd.sock"),
        (
            "nbd+unix:///vol1@00C5247772D2F36B?socket=/run/nbd.sock",
            "nbd+unix:///vol1@00c5247772d2f36b?socket=/run/nbd.sock",
        ),
        ("nbd://h/we%3Fird", "nbd://h:10809/we%3Fird"),
    ],
)
def test_uri_canonical_form(given: str, canonical: str) -> None:
    uri = parse_uri(given)
    assert str(uri) == canonical
    assert str(parse_uri(canonical)) == canonical  # canonical is a fixed point


def test_uri_parts() -> None:
    u = parse_uri("nbd://h:99/vol1@00c5247772d2f36b")
    assert (u.host, u.port, u.socket) == ("h", 99, None)
    assert (u.export.name, u.export.pvid) == ("vol1", 0x00C5247772D2F36B)
    assert u.server == "nbd://h:99/" and str(u.with_export("vol1")) == "nbd://h:99/vol1"
    assert parse_uri("nbd+unix:///x?socket=/s").is_unix


def test_a_server_that_is_not_pairvol_is_a_protocol_error(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_programs("nbdkit")
    other = NbdServer(tmp_path)
    other.start("memory", "1M")
    try:
        code, _, err = host(capsys, cache, "scan", other.uri())
        assert code == 8 and "is not from a pairvol server" in err
        assert not cache.exists()
    finally:
        other.stop()


def test_probe_with_pvid_runs_the_access_check(server: NbdServer) -> None:
    pvid = Volume.open(str(server.dir / "alpha.img")).header.pvid_hex
    found = probe(parse_uri(server.uri(f"alpha@{pvid}")))
    assert found.info.pvid == pvid and str(found.uri) == server.uri("alpha")
    with pytest.raises(PvidMismatch, match=f"but the volume has PVID {pvid}"):
        probe(parse_uri(server.uri("alpha@0123456789abcdef")))
