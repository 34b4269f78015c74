"""The host PVID cache: data round trips, atomic saves, corrupt files, entry naming, locking."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from cluster.pvid_cache import (
    CACHE_VERSION,
    DEFAULT_CACHE_PATH,
    Attachment,
    CacheEntry,
    CacheFile,
    PvidCache,
    cache_path,
    check_device_name,
)
from pairvol.cli import main
from replicator.errors import AlreadyExists, HeaderCorrupt, NotFound, PairvolError, UsageError
from replicator.export_info import VolInfo

PVID_A = "00c5247772d2f36b"
PVID_B = "9b1f0c2ad3e4f501"


def vol(name: str, pvid: str = PVID_A, generation: int = 1) -> VolInfo:
    return VolInfo(
        name=name,
        pvid=pvid,
        uuid=str(uuid.uuid4()),
        size=64 << 20,
        block_size=4096,
        generation=generation,
        role="simplex",
        pair=None,
        created_ns=1_790_000_000_000_000_000,
    )


def entry(name: str, pvid: str = PVID_A, attachment: Attachment | None = None) -> CacheEntry:
    return CacheEntry(
        uri=f"nbd+unix:///{name}?socket=/run/pairvol/nbd.sock",
        export=name,
        vol=vol(name, pvid),
        scanned_ns=1_790_000_000_123_456_789,
        attachment=attachment,
    )


ATTACHED = Attachment(
    method="nbdfuse-loop",
    device="/dev/loop3",
    uri=f"nbd+unix:///v1@{PVID_A}?socket=/run/pairvol/nbd.sock",
    attached_ns=1_790_000_001_000_000_000,
    helper_pid=4242,
    helper_started=1_790_000_000.25,
    mountpoint="/var/lib/pairvol/host-cache.attach/pv0/mnt",
    backing_file="/var/lib/pairvol/host-cache.attach/pv0/mnt/nbd",
    state_dir="/var/lib/pairvol/host-cache.attach/pv0",
    log="/var/lib/pairvol/host-cache.attach/pv0/nbdfuse.log",
)


def filled() -> PvidCache:
    c = PvidCache()
    c.record_scan(None, entry("v1", attachment=ATTACHED))
    c.record_scan(None, entry("v2", PVID_B))
    return c


# -- round trips ------------------------------------------------------------------------------


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    store = CacheFile(str(tmp_path / "sub" / "cache.json"))
    assert store.read().entries == {}  # no file, no directory: empty, and nothing created
    assert not (tmp_path / "sub").exists()
    orig = filled()
    with store.update() as c:
        c.entries.update(orig.entries)
    back = store.read()
    assert back == orig
    assert back.get("pv0").attachment == ATTACHED
    assert back.get("pv0").pvid == PVID_A and back.get("pv1").pvid == PVID_B
    doc = json.loads((tmp_path / "sub" / "cache.json").read_text())
    assert doc["version"] == CACHE_VERSION
    assert set(doc["entries"]) == {"pv0", "pv1"}
    assert doc["entries"]["pv0"]["pvid"] == PVID_A
    assert doc["entries"]["pv0"]["attachment"]["device"] == "/dev/loop3"
    assert doc["entries"]["pv1"]["attachment"] is None
    # Encoding is canonical: decode(encode(x)) encodes to the same bytes.
    data = back.encode()
    assert PvidCache.decode(data, "x").encode() == data


def test_entry_json_round_trip_is_exact() -> None:
    e = entry("v1", attachment=ATTACHED)
    assert CacheEntry.from_json(json.loads(json.dumps(e.to_json()))) == e
    assert Attachment.from_json(ATTACHED.to_json()) == ATTACHED


def test_update_saves_nothing_when_the_block_fails(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    store = CacheFile(str(path))
    with store.update() as c:
        c.record_scan(None, entry("v1"))
    before = path.read_bytes()
    with pytest.raises(NotFound), store.update() as c:
        c.record_scan(None, entry("v2"))
        c.get("nope")
    assert path.read_bytes() == before


# -- atomic save ------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_a_failed_save_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "cache.json"
    store = CacheFile(str(path))
    with store.update() as c:
        c.record_scan(None, entry("v1"))
    before = path.read_bytes()

    def boom(*args: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with (
        pytest.raises(PairvolError, match=r"cannot save host cache .*No space left"),
        store.update() as c,
    ):
        c.record_scan(None, entry("v2", PVID_B))
        # Only the save itself sees the failure (the crash "mid-save").
        monkeypatch.setattr(os, failing, boom)
    monkeypatch.undo()
    assert path.read_bytes() == before
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == ["cache.json", "cache.json.lock"]
    assert store.read().names() == ["pv0"]


# -- corrupt files ----------------------------------------------------------------------------


def _valid_doc() -> dict[str, object]:
    return json.loads(filled().encode())  # type: ignore[no-any-return]


def _corrupt_variants() -> list[tuple[str, bytes]]:
    def doc(mutate: object) -> bytes:
        d = _valid_doc()
        mutate(d)  # type: ignore[operator]
        return json.dumps(d).encode()

    def set_in_entry(key: str, value: object) -> object:
        return lambda d: d["entries"]["pv0"].__setitem__(key, value)

    return [
        ("not JSON", b"{ this is not json"),
        ("truncated", filled().encode()[:40]),
        ("empty", b""),
        ("binary", b"\xff\xfe\x00garbage"),
        ("a list", b"[]"),
        ("no version", doc(lambda d: d.pop("version"))),
        ("newer version", doc(lambda d: d.__setitem__("version", CACHE_VERSION + 1))),
        ("entries not an object", doc(lambda d: d.__setitem__("entries", []))),
        ("bad PVID", doc(set_in_entry("pvid", "xyz"))),
        ("PVIDs disagree", doc(set_in_entry("pvid", PVID_B))),
        ("missing uri", doc(lambda d: d["entries"]["pv0"].pop("uri"))),
        ("bad attachment", doc(set_in_entry("attachment", {"method": "teleport"}))),
        ("bad device name", doc(lambda d: d["entries"].__setitem__("../x", {}))),
    ]


@pytest.mark.parametrize(("what", "data"), _corrupt_variants(), ids=lambda x: str(x)[:20])
def test_a_corrupt_file_is_a_clear_error_and_never_reset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, data: bytes
) -> None:
    path = tmp_path / "cache.json"
    path.write_bytes(data)
    store = CacheFile(str(path))
    with pytest.raises(HeaderCorrupt, match=f"host cache {path} is corrupt"):
        store.read()
    with pytest.raises(HeaderCorrupt), store.update():
        pytest.fail("update() must not start on a corrupt cache")
    # Through the CLI: exit 6, one line naming the file, and the file is left alone.
    for argv in (["list"], ["forget", "pv0"], ["detach", "pv0"]):
        code = main(["host", "--cache", str(path), *argv])
        _, err = capsys.readouterr()
        assert code == 6, (what, argv)
        assert err.count("\n") == 1 and str(path) in err and "corrupt" in err
    assert path.read_bytes() == data


# -- naming -----------------------------------------------------------------------------------


def test_names_are_the_lowest_free_pvN_in_numeric_order() -> None:
    c = PvidCache()
    names = [c.record_scan(None, entry(f"v{i}"))[0] for i in range(12)]
    assert names == [f"pv{i}" for i in range(12)]
    assert c.names()[:3] == ["pv0", "pv1", "pv2"] and c.names()[-1] == "pv11"  # pv2 < pv10
    c.remove("pv1")
    assert c.next_name() == "pv1"
    assert c.next_name(taken={"pv1"}) == "pv12"
    name, old = c.record_scan("data-disk", entry("fresh"))
    assert (name, old) == ("data-disk", None) and c.names()[-1] == "data-disk"


def test_rescanning_updates_in_place_and_keeps_the_attachment() -> None:
    c = PvidCache()
    c.record_scan(None, entry("v1", attachment=ATTACHED))
    c.record_scan(None, entry("v2"))
    name, old = c.record_scan(None, entry("v1", PVID_B))
    assert name == "pv0" and old is not None and old.pvid == PVID_A
    assert len(c.entries) == 2
    assert c.get("pv0").pvid == PVID_B and c.get("pv0").attachment == ATTACHED
    # --as with the name it already has is an update too.
    assert c.record_scan("pv1", entry("v2", PVID_B))[0] == "pv1" and len(c.entries) == 2


def test_forced_names_never_clobber_another_volume() -> None:
    c = PvidCache()
    c.record_scan(None, entry("v1"))
    with pytest.raises(AlreadyExists, match="already means"):
        c.record_scan("pv0", entry("v2"))
    with pytest.raises(AlreadyExists, match="already in the host cache as 'pv0'"):
        c.record_scan("other", entry("v1"))
    assert c.names() == ["pv0"] and c.get("pv0").export == "v1"


@pytest.mark.parametrize("bad", ["", ".hidden", "-x", "a/b", "../up", "sp ace", "x" * 64, "é"])
def test_bad_device_names_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError, match="device name"):
        check_device_name(bad)
    assert check_device_name("hdisk0") == "hdisk0"


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(NotFound, match=r"'pv9'.*known: pv0, pv1"):
        filled().get("pv9")


def test_cache_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAIRVOL_HOST_CACHE", raising=False)
    assert cache_path(None) == DEFAULT_CACHE_PATH == "/var/lib/pairvol/host-cache.json"
    monkeypatch.setenv("PAIRVOL_HOST_CACHE", "/tmp/env-cache.json")
    assert cache_path(None) == "/tmp/env-cache.json"
    assert cache_path("/tmp/explicit.json") == "/tmp/explicit.json"


# -- locking ----------------------------------------------------------------------------------


def test_update_holds_an_exclusive_lock(tmp_path: Path) -> None:
    flock = shutil.which("flock")
    if flock is None:
        pytest.skip("needs util-linux flock")
    store = CacheFile(str(tmp_path / "cache.json"))

    def other_process_can_lock() -> bool:
        r = subprocess.run([flock, "--nonblock", store.lock_path, "true"], check=False)
        return r.returncode == 0

    with store.update() as c:
        c.record_scan(None, entry("v1"))
        assert not other_process_can_lock()
    assert other_process_can_lock()
    assert store.read().names() == ["pv0"]
