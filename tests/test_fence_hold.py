"""``pair fence`` / ``pair unfence``: the cluster agent's fence on a storage node (issue 9 §3),
in one process (test_runtime_inproc's harness)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_runtime_inproc import CHUNK, Lab, Node, noise, read, running_lab, wait_copy, write

from pairvol.cli import main
from replicator import wire
from replicator.errors import IllegalState, UsageError, VolumeError
from replicator.events import read_events


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Lab, Node, Node]]:
    with running_lab(tmp_path) as lab:
        a = lab.node("node-a", "10.0.0.1")
        b = lab.node("node-b", "10.0.0.2")
        lab.start()
        a.create("g/p1", b)
        wait_copy(a, "g/p1")
        yield lab, a, b


def test_fence_refuses_client_writes_until_unfenced(two: tuple[Lab, Node, Node]) -> None:
    lab, a, b = two
    h = a.open()
    before = noise(CHUNK)
    write(h, 0, before)
    out = a.cmd("pair.fence", target="g", epoch=3, reason="lease lost")
    assert out["pairs"][0]["fenced"] == {"epoch": 3, "reason": "lease lost"}
    with pytest.raises(VolumeError) as refused:
        write(h, CHUNK, noise(CHUNK))
    assert refused.value.errno == errno.EIO
    assert "fenced by the cluster at epoch 3 (lease lost)" in str(refused.value)
    assert read(h, 0, CHUNK) == before  # reads go on
    assert a.state("g/p1") == ("PAIR", "primary")  # replication itself is untouched
    assert any(e["event"] == "pair.fenced" for e in read_events(a.events_path))
    # A restart keeps the fence.
    a.restart()
    h = a.open()
    with pytest.raises(VolumeError):
        write(h, CHUNK, noise(CHUNK))
    # A stale agent can neither lift it nor fence at an older epoch.
    with pytest.raises(IllegalState, match="has seen epoch 3"):
        a.cmd("pair.unfence", target="g", epoch=2)
    with pytest.raises(IllegalState, match="has seen epoch 3"):
        a.cmd("pair.fence", target="g", epoch=1)
    a.cmd("pair.unfence", target="g", epoch=4)
    for _ in range(5):  # the restarted node finds its peer again
        if a.side("g/p1").machine.link_up:
            break
        lab.tick(1.0)
    assert a.state("g/p1") == ("PAIR", "primary")
    data = noise(CHUNK)
    write(h, CHUNK, data)
    assert b.image()[CHUNK : 2 * CHUNK] == data
    with pytest.raises(IllegalState, match="has seen epoch 4"):
        a.cmd("pair.fence", target="g", epoch=3)
    assert a.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 0


def test_a_fenced_secondary_still_takes_what_its_primary_sends(
    two: tuple[Lab, Node, Node],
) -> None:
    _, a, b = two
    b.cmd("pair.fence", target="g", epoch=1, reason="standby fenced")
    h = a.open()
    data = noise(2 * CHUNK)
    write(h, 4 * CHUNK, data)
    assert b.image()[4 * CHUNK : 6 * CHUNK] == data
    assert a.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 0


@pytest.mark.parametrize("bad", [-1, "3", True, None])
def test_a_bad_epoch_is_a_usage_error(two: tuple[Lab, Node, Node], bad: object) -> None:
    _, a, _ = two
    with pytest.raises(UsageError, match="not a cluster epoch"):
        a.cmd("pair.fence", target="g", epoch=bad)


@pytest.mark.parametrize("text", ["x", "-1", "1.5", "٣"])
def test_cli_epoch_must_be_ascii_digits(capsys: pytest.CaptureFixture[str], text: str) -> None:
    assert main(["pair", "fence", "g", "--epoch", text]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a cluster epoch" in err[0], err


def test_a_fence_fails_the_writes_in_flight_at_once_and_never_acknowledges_them(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fence=never, the secondary stalls (a partition): a mirrored write waits for it.  The
    fence must not wait for that write (it would hold the fence up to the link timeout, past
    the agent's lease), and the write must then fail, not be acknowledged once the link gives
    up and fence=never lets it complete locally."""
    _, a, b = two
    stalled, release = threading.Event(), threading.Event()
    handle = b.manager.handle_peer

    def stall(sender: str, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.Write):
            stalled.set()
            release.wait(20)
        return handle(sender, msg)

    monkeypatch.setattr(b.manager, "handle_peer", stall)
    h = a.open()
    outcome: list[object] = []

    def client() -> None:
        try:
            write(h, 0, noise(CHUNK))
            outcome.append("acknowledged")
        except VolumeError as e:
            outcome.append(e)

    writer = threading.Thread(target=client, daemon=True)
    writer.start()
    assert stalled.wait(10), "the mirrored write never reached the secondary"
    fenced: list[float] = []

    def fence() -> None:
        a.cmd("pair.fence", target="g", epoch=5, reason="lease")
        fenced.append(time.monotonic())

    fencer = threading.Thread(target=fence, daemon=True)
    fencer.start()
    fencer.join(5)
    try:
        assert fenced, "pair fence waited for the write stuck on the secondary"
        assert writer.is_alive()  # the write is still in flight
    finally:
        release.set()
    writer.join(10)
    (result,) = outcome
    assert isinstance(result, VolumeError) and result.errno == errno.EIO, result
    assert "while the write was in flight: not acknowledged" in str(result)


def test_the_watchdog_stops_client_writes_unless_re_armed_and_survives_a_restart(
    two: tuple[Lab, Node, Node],
) -> None:
    """The agent's watchdog: armed for 2 s, re-armed, then not: writes stop at the deadline
    on their own (the agent died alone).  A restart keeps it armed and expired; a stale epoch
    cannot touch it; --off disarms it."""
    lab, a, b = two
    h = a.open()
    out = a.cmd("pair.watchdog", target="g", epoch=2, seconds=2.0)
    assert out["pairs"][0]["watchdog"] == {"epoch": 2, "remaining": 2.0}
    lab.tick(1.5)
    write(h, 0, noise(CHUNK))  # before the deadline
    a.cmd("pair.watchdog", target="g", epoch=2, seconds=2.0)  # re-armed at 1.5: until 3.5
    lab.tick(1.5)
    write(h, 0, noise(CHUNK))
    lab.tick(0.6)  # past 3.5: the agent did not come back
    with pytest.raises(VolumeError) as refused:
        write(h, CHUNK, noise(CHUNK))
    assert refused.value.errno == errno.EIO and "watchdog (epoch 2) expired" in str(refused.value)
    assert a.show("g/p1")["writes"] == "REFUSE_WATCHDOG"
    data = noise(CHUNK)
    b_before = b.image()[: 2 * CHUNK]
    assert a.image()[CHUNK : 2 * CHUNK] != data and b_before == a.image()[: 2 * CHUNK]
    a.restart()
    h = a.open()
    with pytest.raises(VolumeError, match="watchdog"):
        write(h, CHUNK, data)  # armed in the pair file, no deadline after a restart
    with pytest.raises(IllegalState, match="has seen epoch 2"):
        a.cmd("pair.watchdog", target="g", epoch=1, off=True)
    for bad in (0, -1.0, 121.0, "2", True):
        with pytest.raises(UsageError, match="--seconds"):
            a.cmd("pair.watchdog", target="g", epoch=2, seconds=bad)
    a.cmd("pair.watchdog", target="g", epoch=2, off=True)
    assert a.show("g/p1")["watchdog"] is None
    for _ in range(5):  # the restarted node finds its peer again
        if a.side("g/p1").machine.link_up:
            break
        lab.tick(1.0)
    write(h, CHUNK, data)
    assert b.image()[CHUNK : 2 * CHUNK] == data
    assert a.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 0


def test_a_write_in_flight_when_the_watchdog_expires_is_not_acknowledged(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    lab, a, b = two
    a.cmd("pair.watchdog", target="g", epoch=1, seconds=1.0)
    stalled, release = threading.Event(), threading.Event()
    handle = b.manager.handle_peer

    def stall(sender: str, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.Write):
            stalled.set()
            release.wait(20)
        return handle(sender, msg)

    monkeypatch.setattr(b.manager, "handle_peer", stall)
    h = a.open()
    outcome: list[object] = []

    def client() -> None:
        try:
            write(h, 0, noise(CHUNK))
            outcome.append("acknowledged")
        except VolumeError as e:
            outcome.append(e)

    writer = threading.Thread(target=client, daemon=True)
    writer.start()
    assert stalled.wait(10)
    lab.clock.advance(1.5)  # the deadline passes while the write waits for the secondary
    release.set()
    writer.join(10)
    (result,) = outcome
    assert isinstance(result, VolumeError) and "while the write was in flight" in str(result)
