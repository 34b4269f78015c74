"""The pair runtime in one process: two storage nodes, a fake link, a scripted clock.

Issue 8, item 10.  Each node is a real :class:`~replicator.pair.manager.PairManager` over a
temporary directory of real volumes, started with ``timer_thread=False``: nothing runs in
the background but copy engines, and the test drives the one timer itself
(``get_timer()`` / ``handle_timer(now)``) with a :class:`ScriptedClock`, as aioquic's tests do.

The nodes reach each other as h11's ``ConnectionPair`` does: a :class:`FakeLink` joins them,
and the client a manager asks for (:meth:`PairManager.client_for`) is a :class:`LinkEnd` that
encodes each request with :mod:`replicator.wire`, hands the decoded message to the other
manager's ``handle_peer`` in a worker thread (as the real server's worker pool does, so a
callback into the caller's locks blocks as it would over TCP), and turns the answer back
into what the real :class:`~replicator.peer_link.PeerClient` returns or raises
(``PeerRefused`` for an Error frame; while cut, ``PeerLost`` then ``ConnectionFailed``, or
``Timeout`` for a silent cut; ``PeerLost`` once after the peer restarted).

Client I/O goes through the node's own path without nbdkit: an
:class:`~replicator.export.Exporter` over the node's directory, wrapped by
``PairManager.wrap`` (replicator/node.py, ``Service.open``).

No root, no sockets, no nbdkit, no sleeping longer than a few milliseconds (always bounded).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator import groups, wire
from replicator import pair_state as ps
from replicator.direct_io import DirectWriter
from replicator.errors import (
    Closed,
    ConnectionFailed,
    IllegalState,
    PairvolError,
    PeerLost,
    ProtocolError,
    Timeout,
    VolumeError,
)
from replicator.events import EventLog, read_events
from replicator.export import Exporter, ExportHandle
from replicator.header import Role
from replicator.journal import Journal
from replicator.pair.manager import PairManager
from replicator.pair.pull import PullEngine
from replicator.pair.side import Side
from replicator.pair.timer import HOUSEKEEPING
from replicator.peer_auth import PeerSecrets
from replicator.peer_link import FEATURES, PeerClient, PeerRefused, errno_of
from replicator.volume import Volume

MiB = 1 << 20
CHUNK = 64 * 1024
SIZE = 4 * MiB
PORT = 10810
INTERVAL = 1.0  # heartbeat interval (scripted seconds)
HB_TIMEOUT = 5.0  # heartbeat timeout (scripted seconds)
#: A request the fake link carries gets at most this long (real seconds) before it counts as
#: a hang (a deadlock in the runtime): the test then fails instead of waiting 15 s or forever.
REQUEST_CAP = 5.0
WAIT = 5.0  # how long (real seconds) a test waits for a copy or a state


# --------------------------------------------------------------------------------------------
# The harness


class ScriptedClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakeLink:
    """The network between two nodes (both directions).  ``cut()`` drops it: requests in
    either direction fail as the real client fails until ``heal()``.  A reset cut (the peer
    is gone, the host answers): ``PeerLost`` on a connection that was up, then
    ``ConnectionFailed`` on every reconnect attempt.  A silent cut (a partition: nothing
    answers): ``Timeout``, as if the request's whole timeout had passed."""

    def __init__(self, a: Node, b: Node) -> None:
        self.ends = (a, b)
        self.is_cut = False
        self.silent = False
        #: (sender, receiver, message type) -> how many crossed (delivered to the handler).
        self.sent: Counter[tuple[str, str, str]] = Counter()
        #: Handler failures that are not PairvolError (the real server answers EIO and logs
        #: them as bugs): a test fails if any shows up.
        self.bugs: list[str] = []
        #: Requests that got no answer within REQUEST_CAP: a deadlock, a test failure.
        self.hangs: list[str] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def cut(self, *, silent: bool = False) -> None:
        self.is_cut = True
        self.silent = silent

    def heal(self) -> None:
        self.is_cut = False

    def pings(self, sender: Node, receiver: Node) -> int:
        return self.sent[sender.name, receiver.name, "Ping"]

    def count(self, sender: Node, receiver: Node) -> int:
        return sum(
            n for (s, r, _), n in self.sent.items() if (s, r) == (sender.name, receiver.name)
        )

    def carry(
        self, sender: Node, receiver: Node, msg: wire.Message, timeout: float
    ) -> wire.Message:
        """One request, through the wire codec both ways, handled in a worker thread."""
        request = wire.encode(msg, 1)
        result: list[bytes] = []
        name = type(msg).__name__

        def serve() -> None:
            received = _decode(request).message
            response: wire.Message
            try:
                response = receiver.manager.handle_peer(sender.name, received)
                if type(response) not in wire.CODECS:
                    raise TypeError(f"handler returned {type(response).__name__}")
            except PairvolError as e:  # what peer_link's _ServerConn._handle answers
                response = wire.Error(errno_of(e), wire.clip_text(str(e)))
            except Exception as e:
                self.bugs.append(f"{receiver.name}: {name}: {type(e).__name__}: {e}")
                response = wire.Error(errno.EIO, wire.clip_text(f"internal error: {e}"))
            result.append(wire.encode(response, 1))

        t = threading.Thread(target=serve, name=f"fake-link {sender.name}->{receiver.name}")
        t.daemon = True
        with self._lock:
            self.sent[sender.name, receiver.name, name] += 1
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()
        t.join(min(timeout, REQUEST_CAP))
        if t.is_alive():
            self.hangs.append(f"{sender.name}->{receiver.name}: {name}")
            raise Timeout(f"peer {receiver.name!r} did not answer {name} within {timeout:g}s")
        answer = _decode(result[0]).message
        if isinstance(answer, wire.Error):
            raise PeerRefused(answer.code, answer.message, peer=receiver.name)
        return answer

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(deadline - time.monotonic(), 0.0))


def _decode(frame: bytes) -> wire.Frame:
    decoder = wire.FrameDecoder()
    decoder.feed(frame)
    out = decoder.next_frame()
    assert out is not None and decoder.next_frame() is None
    return out


class LinkEnd(PeerClient):
    """What ``client_for`` hands out: a PeerClient whose connection is the fake link.  The
    "handshake" happens at the first request (and the first after a cut): the peer's name
    is learnt then, and a node other than ``expect_peer`` is refused, as the real one is."""

    def __init__(self, lab: Lab, node: Node, host: str, port: int, expect: str | None) -> None:
        super().__init__(
            node.name, host, port, PeerSecrets(), node.log, allow_no_secret=True, expect_peer=expect
        )
        self.lab = lab
        self.node = node
        self._up = False
        self._gone = False
        self._generation = -1  # of the peer process this end is connected to

    def connected(self) -> bool:
        return self._up

    def request(self, msg: wire.Message, timeout: float = 30.0) -> wire.Message:
        if self._gone:
            raise Closed(f"the client for peer {self.where} is closed")
        self._check_request(msg)
        peer = self.lab.node_at(self.host, self.port)
        if peer is None:
            raise ConnectionFailed(f"cannot connect to {self.where}: no route to host")
        link = self.lab.link(self.node, peer)
        if self._up and peer.generation != self._generation:
            self._up = False
            raise PeerLost(f"lost the connection to peer {peer.name!r}: the peer restarted")
        if link.is_cut and link.silent:
            self._up = False
            name = type(msg).__name__
            raise Timeout(f"peer {peer.name!r} did not answer {name} within {timeout:g}s")
        if link.is_cut:
            if self._up:
                self._up = False
                raise PeerLost(f"lost the connection to peer {peer.name!r}: link cut")
            raise ConnectionFailed(f"cannot connect to {self.where}: link cut")
        if not self._up:
            if self.expect_peer is not None and self.expect_peer != peer.name:
                raise ConnectionFailed(
                    f"cannot connect to peer {self.expect_peer!r} at {self.where}: "
                    f"the peer is {peer.name!r}"
                )
            self._up = True
            self._peer_name = peer.name
            self._generation = peer.generation
        try:
            return link.carry(self.node, peer, msg, timeout)
        except Timeout:
            self._up = False  # a request that times out drops the connection
            raise

    def agreed(self, feature: int, timeout: float = 30.0) -> bool:
        """Both "Hellos" offer what this node offers: every node of the lab runs this code."""
        return bool(FEATURES & feature)

    def send(self, msg: wire.Message, timeout: float = 30.0) -> Answered:
        """As the real client's: the answer is collected later (here it is carried now; an
        error of the carrying is raised where the real one's would be: by ``result``)."""
        try:
            return Answered(self.request(msg, timeout), None)
        except PairvolError as e:
            return Answered(None, e)

    def notify(self, msg: wire.Message, timeout: float = 30.0) -> None:
        raise AssertionError("the pair runtime sends no notifications")

    def close(self) -> None:
        self._gone = True
        self._up = False


class Answered:
    """A :class:`LinkEnd`'s answer to a request sent with ``send``."""

    def __init__(self, reply: wire.Message | None, error: PairvolError | None) -> None:
        self.reply, self.error = reply, error

    def result(self) -> wire.Message:
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        if isinstance(self.reply, wire.Error):
            raise PeerRefused(self.reply.code, self.reply.message)
        return self.reply


class LabManager(PairManager):
    """A PairManager whose peer clients are ends of the lab's fake links (its own cache and
    ``expect`` check in client_for stay as they are)."""

    lab: Lab
    node: Node

    def new_client(self, host: str, port: int, expect: str | None) -> PeerClient:
        return LinkEnd(self.lab, self.node, host, port, expect)


class Node:
    """One storage node: a directory of volumes, an event log, a pair manager."""

    def __init__(self, lab: Lab, name: str, listen: str, volumes: dict[str, int]) -> None:
        self.lab = lab
        self.name = name
        self.listen = listen
        self.directory = lab.tmp / name
        self.directory.mkdir()
        self.events_path = str(lab.tmp / f"{name}.events.jsonl")
        self.lines: list[str] = []
        self.paths: dict[str, str] = {}
        for vol, size in volumes.items():
            path = str(self.directory / f"{vol}.img")
            Volume.create(path, size, name=vol).close()
            self.paths[vol] = path
        self.exporter = Exporter(warn=self.log)
        self.exporter.config("dir", str(self.directory))
        self.exporter.config_complete()
        self.generation = 0
        self.handles: list[ExportHandle] = []
        self.started = False
        self.manager = self._new_manager()

    def _new_manager(self) -> LabManager:
        m = LabManager(
            self.name,
            str(self.directory),
            self.listen,
            PORT,
            PeerSecrets(),
            EventLog(self.events_path),
            self.log,
            clock=self.lab.clock,
            heartbeat_interval=INTERVAL,
            heartbeat_timeout=HB_TIMEOUT,
            async_link_timeout=30.0,
        )
        m.lab = self.lab
        m.node = self
        return m

    def log(self, line: str) -> None:
        self.lines.append(line)

    def start(self) -> None:
        self.manager.start(timer_thread=False)
        self.started = True

    def stop(self) -> None:
        """The node goes away: requests to it fail to connect from now on."""
        for h in self.handles:
            with contextlib.suppress(PairvolError, OSError):
                h.close()
        self.handles.clear()
        if self.started:
            self.started = False
            self.manager.stop()

    def restart(self) -> None:
        """Stop the node and start a new manager over the same directory (the peers'
        connections to it break, as a restarted process's would)."""
        self.stop()
        self.generation += 1
        self.manager = self._new_manager()
        self.start()

    # -- commands, as the control socket would run them ---------------------------------------

    def cmd(self, op: str, **args: Any) -> dict[str, Any]:
        return self.manager.handlers()[op](args)

    def create(self, pid: str, peer: Node, **kw: Any) -> dict[str, Any]:
        group, pair = pid.split("/")
        args: dict[str, Any] = {
            "group": group,
            "pair": pair,
            "volume": "vol",
            "peer_node": peer.name,
            "peer_host": peer.listen,
            "peer_port": PORT,
            "peer_volume": "vol",
            "mode": "sync",
            "fence": "never",
            "chunk": CHUNK,
            "auto_resync": False,
            "max_rate": 0,
            "journal_size": None,
            "high_watermark": None,
        }
        args.update(kw)
        return self.cmd("pair.create", **args)

    def side(self, pid: str, volume: str | None = None) -> Side:
        return self.manager.sides[pid if volume is None else f"{pid}@{volume}"]

    def show(self, pid: str, volume: str | None = None) -> dict[str, Any]:
        rows: list[dict[str, Any]] = [
            r
            for r in self.cmd("pair.display")["pairs"]
            if r["id"] == pid and (volume is None or r["volume"] == volume)
        ]
        assert len(rows) == 1, rows
        return rows[0]

    def state(self, pid: str, volume: str | None = None) -> tuple[str, str]:
        r = self.side(pid, volume).record
        return (str(r.state), r.role.label)

    def events(self, name: str, pid: str, **match: Any) -> list[dict[str, Any]]:
        """This node's ``name`` events of pair ``pid`` (machine events name it by group and
        pair) whose fields match."""
        group, pair = pid.split("/")
        match.update(group=group, pair=pair)
        return [
            e
            for e in read_events(self.events_path)
            if e["event"] == name and all(e.get(k) == v for k, v in match.items())
        ]

    # -- client I/O, as the nbdkit plugin would do it -------------------------------------------

    def open(self, vol: str = "vol") -> ExportHandle:
        h = self.manager.wrap(self.exporter.open(vol, readonly=False))
        self.handles.append(h)
        return h

    def image(self, vol: str = "vol") -> bytes:
        """The volume's whole data area, read from the image file."""
        with Volume.open(self.paths[vol]) as v:
            h = v.header
            fd = v.fd
            data = b"".join(_pread_all(fd, h.data_offset, h.data_size))
        assert len(data) == SIZE
        return data

    def pvid(self, vol: str = "vol") -> int:
        with Volume.open(self.paths[vol]) as v:
            return v.header.pvid


def _pread_all(fd: int, offset: int, size: int) -> Iterator[bytes]:
    pos = 0
    while pos < size:
        piece = os.pread(fd, min(MiB, size - pos), offset + pos)
        assert piece, "short image"
        yield piece
        pos += len(piece)


class Lab:
    """Nodes, the links between them and the one scripted clock they share."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clock = ScriptedClock()
        self.nodes: dict[str, Node] = {}
        self.links: dict[frozenset[str], FakeLink] = {}
        self.timer_rounds = 0

    def node(self, name: str, listen: str, volumes: dict[str, int] | None = None) -> Node:
        n = Node(self, name, listen, volumes or {"vol": SIZE})
        self.nodes[name] = n
        return n

    def start(self) -> None:
        for n in self.nodes.values():
            n.start()

    def node_at(self, host: str, port: int) -> Node | None:
        return next(
            (n for n in self.nodes.values() if n.listen == host and port == PORT and n.started),
            None,
        )

    def link(self, a: Node, b: Node) -> FakeLink:
        key = frozenset((a.name, b.name))
        if key not in self.links:
            self.links[key] = FakeLink(a, b)
        return self.links[key]

    # -- the one timer, driven by the test ----------------------------------------------------

    def tick(self, seconds: float = 0.0) -> None:
        """Advance the clock, then run every node's timer at the new ``now`` (calling it
        early is allowed: it does what is due and nothing else)."""
        now = self.clock.advance(seconds)
        for n in self.nodes.values():
            n.manager.handle_timer(now)

    def run(self, seconds: float) -> int:
        """What the timer threads would do over ``seconds`` of scripted time: jump to the
        earliest deadline any node asks for, run that node's timer, ask again.  Returns the
        number of timer calls; fails on a busy loop (a deadline that does not move)."""
        end = self.clock.now + seconds
        calls = 0
        stuck = 0
        while True:
            due = [(n.manager.get_timer(), n) for n in self.nodes.values()]
            finite = [(t, n) for t, n in due if t is not None]
            assert all(math.isfinite(t) for t, _ in finite)
            if not finite:
                break
            t, node = min(finite, key=lambda x: x[0])
            if t > end:
                break
            stuck = stuck + 1 if t <= self.clock.now else 0
            assert stuck < 20, f"{node.name}: get_timer() stays at {t} (busy loop)"
            self.clock.now = max(self.clock.now, t)
            node.manager.handle_timer(self.clock.now)
            calls += 1
        self.clock.now = end
        self.timer_rounds += calls
        return calls

    def stop(self) -> None:
        for n in self.nodes.values():
            n.stop()
        for link in self.links.values():
            link.join(REQUEST_CAP)


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll (a millisecond apart, bounded) until ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.001)


def wait_copy(node: Node, pid: str, volume: str | None = None) -> None:
    """The copy this node's side runs is over (the engine thread joined), and it is PAIR.
    The engine fires CopyDone and tells the peer in its own thread, so both sides are
    PAIR once it has ended."""
    side = node.side(pid, volume)
    engine = side.engine
    assert engine is not None, f"{node.name} {pid}: no copy engine"
    engine.thread.join(WAIT)
    assert not engine.thread.is_alive(), f"{node.name} {pid}: copy still running"
    assert side.record.state is ps.State.PAIR, (side.record, node.lines[-5:])


def write(h: ExportHandle, offset: int, data: bytes) -> None:
    h.pwrite(memoryview(bytearray(data)), offset, False)


def read(h: ExportHandle, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    h.pread(memoryview(buf), offset)
    return bytes(buf)


def assert_same(a: bytes, b: bytes) -> None:
    if a == b:
        return
    first = next(i for i in range(0, len(a), CHUNK) if a[i : i + CHUNK] != b[i : i + CHUNK])
    count = sum(1 for i in range(0, len(a), CHUNK) if a[i : i + CHUNK] != b[i : i + CHUNK])
    raise AssertionError(f"volumes differ in {count} chunks, the first is chunk {first // CHUNK}")


def identical(x: Node, y: Node, xvol: str = "vol", yvol: str = "vol") -> None:
    assert_same(x.image(xvol), y.image(yvol))


def noise(n: int) -> bytes:
    return random.randbytes(n)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with running_lab(tmp_path) as lab:
        yield lab


@contextlib.contextmanager
def running_lab(tmp_path: Path) -> Iterator[Lab]:
    """A lab over ``tmp_path``, checked when it ends: no thread left running, no handler bug,
    no hung request, no crash in any node's log."""
    before = set(threading.enumerate())
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.stop()
        deadline = time.monotonic() + 5
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        while left and time.monotonic() < deadline:
            time.sleep(0.005)
            left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        assert not left, f"threads left running: {[t.name for t in left]}"
        for link in lab.links.values():
            assert not link.bugs, link.bugs
            assert not link.hangs, f"requests that hung (deadlock?): {link.hangs}"
        for n in lab.nodes.values():
            if os.environ.get("INPROC_DUMP"):
                print(f"--- {n.name}", *n.lines, sep="\n")
            crashes = [x for x in n.lines if "crashed" in x or "timer:" in x]
            assert not crashes, crashes


@pytest.fixture
def two(lab: Lab) -> tuple[Lab, Node, Node]:
    a = lab.node("node-a", "10.0.0.1")
    b = lab.node("node-b", "10.0.0.2")
    lab.start()
    return lab, a, b


def paired(lab: Lab, a: Node, b: Node, pid: str = "g/p1", **kw: Any) -> None:
    a.create(pid, b, **kw)
    wait_copy(a, pid)
    assert b.state(pid) == ("PAIR", "secondary")


# --------------------------------------------------------------------------------------------
# The timer


def test_get_timer_is_finite_and_moves_forward(two: tuple[Lab, Node, Node]) -> None:
    lab, a, b = two
    t0 = a.manager.get_timer()
    assert t0 is not None and math.isfinite(t0)  # the housekeeping round, even with no pair
    paired(lab, a, b)
    now = lab.clock.now
    seen: list[float] = []
    for _ in range(30):
        t = a.manager.get_timer()
        assert t is not None and math.isfinite(t)
        assert t <= max(now, lab.clock.now) + INTERVAL  # the heartbeat is never overdue
        seen.append(t)
        lab.clock.now = max(lab.clock.now, t)
        a.manager.handle_timer(lab.clock.now)
        b.manager.handle_timer(lab.clock.now)
        after = a.manager.get_timer()
        assert after is not None and after > lab.clock.now, "handle_timer left its deadline due"
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert seen[-1] - seen[0] >= 10 * INTERVAL  # moved by whole rounds, not by tiny steps
    assert a.state("g/p1") == ("PAIR", "primary") and b.state("g/p1") == ("PAIR", "secondary")


# --------------------------------------------------------------------------------------------
# Create, copy, split, resync, swap


def test_sync_pair_create_split_resync_swap(two: tuple[Lab, Node, Node]) -> None:
    _, a, b = two
    pid = "g/p1"
    ha = a.open()  # opened while the volume is simplex: issue 7 item 1
    before = {0: noise(3 * CHUNK), 2 * MiB + 512: noise(CHUNK + 4096), SIZE - CHUNK: noise(CHUNK)}
    for off, data in before.items():
        write(ha, off, data)
    hb = b.open()
    write(hb, MiB, noise(2 * CHUNK))  # the secondary's old contents are overwritten by the copy
    hb.close()

    result = a.create(pid, b)
    assert result["state"] in ("COPY", "PAIR") and result["role"] == "primary"
    write(ha, 3 * MiB, noise(CHUNK))  # during the copy (or just after): mirrored either way
    wait_copy(a, pid)
    assert b.state(pid) == ("PAIR", "secondary")
    assert [e["state"] for e in a.events("pair.state", pid)] == ["COPY", "PAIR"]
    assert [e["state"] for e in b.events("pair.state", pid)] == ["COPY", "PAIR"]
    assert b.pvid() == a.pvid()  # a hidden secondary carries its primary's PVID
    with pytest.raises(IllegalState, match="hidden secondary"):
        b.open()

    # The handle opened before the create is mirrored: acknowledged means on both sides.
    data = noise(CHUNK // 2)
    write(ha, MiB + 100, data)
    assert b.image()[MiB + 100 : MiB + 100 + len(data)] == data
    ha.zero(CHUNK, 2 * MiB, False, False)
    ha.flush()
    identical(a, b)
    assert a.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 0

    # Split: PSUS on both sides, the secondary gets a PVID of its own.
    a.cmd("pair.split", target="g")
    assert a.state(pid) == ("PSUS", "primary") and b.state(pid) == ("PSUS", "secondary")
    assert b.pvid() != a.pvid()
    hb = b.open()
    write(ha, 0, noise(CHUNK))  # chunk 0 on A
    write(hb, 5 * CHUNK, noise(10))  # chunk 5 on B
    write(hb, 40 * CHUNK, noise(2 * CHUNK))  # chunks 40, 41 on B
    assert a.show(pid)["dirty_bytes"] == CHUNK
    assert b.show(pid)["dirty_bytes"] == 3 * CHUNK
    assert a.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 4

    # Resync: the secondary's writes are overwritten (said before anything is copied).
    out = a.cmd("pair.resync", target="g")
    assert out["pairs"][0]["discarding_chunks"] == 3
    wait_copy(a, pid)
    assert b.state(pid) == ("PAIR", "secondary")
    assert b.pvid() == a.pvid()
    with pytest.raises(VolumeError) as refused:
        write(hb, 0, b"x" * 512)  # the open S-VOL connection follows the role: hidden
    assert refused.value.errno == errno.EPERM
    identical(a, b)

    # Swap: run on the secondary's node; the roles reverse and B copies to A.
    a.cmd("pair.split", target="g")
    write(hb, 7 * CHUNK, noise(CHUNK))  # B's changes since the split are the new truth
    b.cmd("pair.resync", target="g", swap=True)
    wait_copy(b, pid)
    assert b.state(pid) == ("PAIR", "primary") and a.state(pid) == ("PAIR", "secondary")
    assert a.pvid() == b.pvid()
    identical(a, b)
    with pytest.raises(VolumeError) as refused:
        write(ha, 0, b"y" * 512)  # A is the hidden secondary now
    assert refused.value.errno == errno.EPERM
    data = noise(CHUNK)
    write(hb, 9 * CHUNK, data)  # B's old handle (opened as a PSUS secondary) now mirrors
    assert a.image()[9 * CHUNK : 10 * CHUNK] == data
    identical(a, b)
    assert b.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 0


# --------------------------------------------------------------------------------------------
# Link loss


def _heal_and_wait(lab: Lab, a: Node, b: Node, pid: str) -> int:
    """Heal the link and run the timers until both sides have their link back; returns how
    many Pings crossed meanwhile."""
    link = lab.link(a, b)
    pings = link.pings(a, b) + link.pings(b, a)
    link.heal()
    for _ in range(10):
        if a.side(pid).machine.link_up and b.side(pid).machine.link_up:
            break
        lab.tick(INTERVAL)
    assert a.side(pid).machine.link_up and b.side(pid).machine.link_up
    assert a.events("pair.link", pid, up=True)
    return link.pings(a, b) + link.pings(b, a) - pings


@pytest.mark.parametrize("cut", ["reset", "silent"])
def test_link_loss_by_failed_write_fence_never(two: tuple[Lab, Node, Node], cut: str) -> None:
    lab, a, b = two
    pid = "g/p1"
    paired(lab, a, b)
    ha = a.open()
    link = lab.link(a, b)
    link.cut(silent=cut == "silent")
    assert a.state(pid) == ("PAIR", "primary")  # nobody noticed yet
    acked = noise(CHUNK)
    write(ha, 10 * CHUNK, acked)  # fence=never: the client gets success
    assert a.state(pid) == ("PSUE", "primary")
    assert a.side(pid).record.cause is ps.Cause.LINK
    lost = a.events("pair.link", pid, up=False)
    assert len(lost) == 1 and "write to the secondary failed" in lost[0]["reason"]
    assert a.show(pid)["writes"] == "LOCAL_RECORD"
    sent = link.count(a, b)
    write(ha, 20 * CHUNK, noise(100))  # recorded, nothing tried on the link
    assert link.count(a, b) == sent
    assert a.show(pid)["dirty_bytes"] == 2 * CHUNK
    assert b.image()[10 * CHUNK : 11 * CHUNK] != acked

    assert _heal_and_wait(lab, a, b, pid) >= 1  # the Ping per link brought it back
    assert a.state(pid) == ("PSUE", "primary")  # no auto-resync: that is the operator's call
    a.cmd("pair.resync", target="g")
    wait_copy(a, pid)
    identical(a, b)
    assert b.image()[10 * CHUNK : 11 * CHUNK] == acked


@pytest.mark.parametrize("how", ["jump", "step"])
def test_link_loss_by_the_heartbeat_timer(two: tuple[Lab, Node, Node], how: str) -> None:
    """No traffic, link cut: the timer suspends both sides.  ``jump``: the clock passes the
    heartbeat timeout in one go, the machines' deadline fires.  ``step``: one interval at a
    time, the first failed Ping does it."""
    lab, a, b = two
    pid = "g/p1"
    paired(lab, a, b)
    lab.link(a, b).cut()
    lab.tick(INTERVAL / 4)  # not due yet: nothing changes
    assert a.state(pid) == ("PAIR", "primary") and b.state(pid) == ("PAIR", "secondary")
    if how == "jump":
        lab.tick(HB_TIMEOUT + 0.1)
        want = "heartbeat timeout"
    else:
        for _ in range(int(HB_TIMEOUT)):
            lab.tick(INTERVAL)
            if a.state(pid)[0] == "PSUE" and b.state(pid)[0] == "PSUE":
                break
        want = "heartbeat failed"
    for n, role in ((a, "primary"), (b, "secondary")):
        assert n.state(pid) == ("PSUE", role)
        lost = n.events("pair.link", pid, up=False)
        assert len(lost) == 1 and want in lost[0]["reason"], lost
    assert _heal_and_wait(lab, a, b, pid) >= 1
    a.cmd("pair.resync", target="g")
    wait_copy(a, pid)
    identical(a, b)


@pytest.mark.parametrize("cut", ["reset", "silent"])
def test_fence_data_refuses_what_the_secondary_cannot_take(
    two: tuple[Lab, Node, Node], cut: str
) -> None:
    lab, a, b = two
    pid = "g/p1"
    paired(lab, a, b, fence="data")
    ha = a.open()
    for _ in range(8):
        off = random.randrange(0, SIZE // 512 - 64) * 512
        write(ha, off, noise(random.randrange(1, 64) * 512))
    acknowledged = a.image()  # every write above was acknowledged
    lab.link(a, b).cut(silent=cut == "silent")
    with pytest.raises(VolumeError) as failed:
        write(ha, 30 * CHUNK, noise(4096))
    assert failed.value.errno == errno.EIO
    assert a.state(pid) == ("PSUE", "primary")
    assert a.show(pid)["writes"] == "REFUSE_FENCED"
    assert a.events("pair.writes", pid, decision="REFUSE_FENCED")
    with pytest.raises(VolumeError) as refused:
        write(ha, 31 * CHUNK, noise(4096))  # refused before anything is written
    assert refused.value.errno == errno.EIO
    with pytest.raises(VolumeError) as refused:
        ha.zero(4096, 32 * CHUNK, False, False)
    assert refused.value.errno == errno.EIO
    assert a.image()[31 * CHUNK : 33 * CHUNK] == acknowledged[31 * CHUNK : 33 * CHUNK]

    # Everything acknowledged is on the secondary, before any heal or resync (and the
    # refused write, which A wrote locally before the secondary failed, is not).
    assert_same(b.image(), acknowledged)
    _heal_and_wait(lab, a, b, pid)
    assert a.show(pid)["writes"] == "REFUSE_FENCED"  # until the operator resyncs
    a.cmd("pair.resync", target="g")
    wait_copy(a, pid)
    identical(a, b)
    write(ha, 31 * CHUNK, noise(4096))  # mirrored again
    identical(a, b)


def test_a_local_write_that_fails_after_the_mirror_was_sent_suspends_the_pair(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirrored write goes to the secondary first, then to the local volume while the
    secondary writes it.  If the local write then fails, the secondary may hold a write the
    primary does not: the pair must not stay PAIR with nothing dirty."""
    lab, a, b = two
    pid = "g/p1"
    paired(lab, a, b)
    ha = a.open()
    plain = ExportHandle.pwrite
    broken = {"on": True}

    def pwrite(self: ExportHandle, buf: memoryview, offset: int, fua: bool) -> None:
        if self is ha and broken["on"]:
            raise VolumeError("short write (0 of 4096 bytes) at 655360", errno.ENOSPC)
        plain(self, buf, offset, fua)

    monkeypatch.setattr(ExportHandle, "pwrite", pwrite)
    sent = noise(4096)
    with pytest.raises(VolumeError) as failed:
        write(ha, 10 * CHUNK, sent)
    assert failed.value.errno == errno.ENOSPC  # the client hears the local error
    assert b.image()[10 * CHUNK : 10 * CHUNK + 4096] == sent  # the secondary took it
    assert a.image()[10 * CHUNK : 10 * CHUNK + 4096] != sent  # this volume did not
    assert a.state(pid) == ("PSUE", "primary")
    assert a.side(pid).record.cause is ps.Cause.DISK
    assert a.show(pid)["dirty_bytes"] == CHUNK  # the chunk that differs, recorded

    broken["on"] = False
    write(ha, 20 * CHUNK, noise(4096))  # recorded, as in any PSUE
    a.cmd("pair.resync", target="g")
    wait_copy(a, pid)
    identical(a, b)
    assert b.image()[10 * CHUNK : 10 * CHUNK + 4096] != sent  # the primary's data won


def test_takeover_while_cut_fences_the_old_primary(two: tuple[Lab, Node, Node]) -> None:
    """Issue 7 item 8: after a takeover on the secondary, the old primary must stop taking
    writes as soon as it hears of the newer epoch (REFUSE_STALE, EIO)."""
    lab, a, b = two
    pid = "g/p1"
    paired(lab, a, b)
    ha = a.open()
    write(ha, 0, noise(CHUNK))
    lab.link(a, b).cut()
    out = b.cmd("pair.takeover", target="g")
    assert out["pairs"][0]["state"] == "SSWS"
    assert b.state(pid) == ("SSWS", "secondary")
    hb = b.open()
    new_truth = noise(2 * CHUNK)
    write(hb, 12 * CHUNK, new_truth)
    write(ha, 50 * CHUNK, noise(CHUNK))  # the old primary, not yet told: PSUE, recorded
    assert a.state(pid) == ("PSUE", "primary")

    _heal_and_wait(lab, a, b, pid)
    # The reconnect's state exchange told A of B's newer epoch: A is fenced.
    assert a.side(pid).record.stale
    assert a.show(pid)["writes"] == "REFUSE_STALE"
    with pytest.raises(VolumeError) as refused:
        write(ha, 0, noise(4096))
    assert refused.value.errno == errno.EIO

    b.cmd("pair.resync", target="g", swap=True)
    wait_copy(b, pid)
    assert b.state(pid) == ("PAIR", "primary") and a.state(pid) == ("PAIR", "secondary")
    identical(a, b)
    assert a.image()[12 * CHUNK : 14 * CHUNK] == new_truth
    data = noise(CHUNK)
    write(hb, 60 * CHUNK, data)
    assert a.image()[60 * CHUNK : 61 * CHUNK] == data


def test_the_reader_takes_a_journal_entry_itself_only_when_it_cannot_wait(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection's reader carries out a journal entry itself (no worker hand-off) only
    when the receive journal takes it at once: the next one, with room.  One that would wait
    for its predecessor or for space goes to a worker, or the reader, waiting, would never
    read what it waits for (nor a Ping)."""
    _, a, b = two
    pid = "g/p1"
    a.create(pid, b, mode="async", journal_size=MiB)
    wait_copy(a, pid)
    g = b.manager.secondaries["g"]
    nxt = g.journal.last_seq + 1
    inline = b.manager.receives_inline
    assert inline(wire.Write(pid, 0, b"x" * 4096))  # mirrored (no seq)
    assert inline(wire.Write(pid, 0, b"x" * 4096, seq=nxt))
    assert inline(wire.Zero(pid, 0, CHUNK, seq=nxt))
    assert inline(wire.Write(pid, 0, b"x" * 4096, seq=max(nxt - 1, 1)))  # a duplicate: acked
    assert not inline(wire.Write(pid, 0, b"x" * 4096, seq=nxt + 1))  # waits for nxt
    assert not inline(wire.Write("g/nope", 0, b"x" * 4096, seq=nxt))
    assert not inline(wire.Ping(1))
    monkeypatch.setattr(type(g.journal), "free_bytes", property(lambda _j: 4096))
    assert not inline(wire.Write(pid, 0, b"x" * 4096, seq=nxt))  # would wait for space


def test_an_async_side_swapped_to_primary_ships_what_is_written_to_it(
    two: tuple[Lab, Node, Node],
) -> None:
    """After resync --swap the new async primary ships its journal: its group's shipper was
    started only at create and at a node's start, so writes after a swap (or after the swap
    back that ends a takeover's pull) piled up unshipped until the node restarted, with the
    pair in PAIR."""
    _, a, b = two
    pid = "g/p1"
    a.create(pid, b, mode="async", journal_size=MiB)
    wait_copy(a, pid)
    a.cmd("pair.split", target="g")
    b.cmd("pair.resync", target="g", swap=True)
    wait_copy(b, pid)
    hb = b.open()
    for i in range(8):
        write(hb, i * 2 * CHUNK + 100, noise(4096))
    hb.flush()
    journal = lambda: b.show(pid)["journal"]  # noqa: E731
    wait_until(
        "the new primary's journal shipped and applied", lambda: journal()["lag_entries"] == 0
    )
    assert journal()["secondary_applied"] >= 8
    identical(a, b)


def test_an_async_side_swapped_to_secondary_opens_its_journal_at_once(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A takeover opens no journal: an async side that becomes the secondary by a swap has its
    group's receive journal open at once, as one loaded or created as the secondary has.  The
    first takeover on a host that had come back opened it there (the failover bench: 0.7 s
    of a 2 s failover, for the scan of an empty 256 MiB ring)."""
    _, a, b = two
    pid = "g/p1"
    a.create(pid, b, mode="async", journal_size=MiB)
    wait_copy(a, pid)
    assert "g" in b.manager.secondaries and "g" not in a.manager.secondaries
    a.cmd("pair.split", target="g")
    b.cmd("pair.resync", target="g", swap=True)
    wait_copy(b, pid)
    assert a.state(pid) == ("PAIR", "secondary")
    assert "g" in a.manager.secondaries  # before anything was shipped to it

    opened: list[str] = []
    real = groups.open_journal

    def open_journal(path: str, group: str, capacity: int) -> Journal:
        opened.append(path)
        return real(path, group, capacity)

    monkeypatch.setattr(groups, "open_journal", open_journal)
    b.stop()
    out = a.cmd("pair.takeover", target="g")
    assert out["pairs"][0]["state"] == "SSWS" and opened == []


def swapped_back(lab: Lab, a: Node, b: Node, pid: str) -> None:
    """The pull done, the taken-over side b swaps back on its own at the next housekeeping
    round (issue 11, item 5): it becomes the primary and copies what was written since the
    takeover to a; both end identical in PAIR, and ``pair verify`` says so."""
    side = b.side(pid)
    assert side.doc.reverse_after_pull and side.record.state is ps.State.SSWS
    lab.tick(HOUSEKEEPING)
    wait_until(
        "the swap back",
        lambda: any(e["event"] == "pair.reverse" for e in read_events(b.events_path)),
    )
    assert side.record.role is Role.PRIMARY and not side.doc.reverse_after_pull
    wait_copy(b, pid)
    identical(a, b)
    assert b.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 0


def _taken_over_mid_copy(lab: Lab, a: Node, b: Node, pid: str) -> tuple[bytes, Side]:
    """a's volume filled and paired to b with a slow copy, then a forced takeover on b whose
    pull runs at four chunks a second: a's image (the takeover's point in time) and b's
    side, with nearly everything still pending."""
    write(a.open(), 0, noise(SIZE))
    a.create(pid, b, max_rate=4 * CHUNK)
    b.cmd("pair.takeover", target="g", force=True, max_rate=4 * CHUNK)
    side = b.side(pid)
    assert side.record.copy_incomplete and side.copy_map.count() > 40
    return a.image(), side


def test_reads_and_writes_of_chunks_not_here_yet_fetch_them_on_demand(
    two: tuple[Lab, Node, Node],
) -> None:
    """Issue 11, items 2 and 3: a read of a chunk not copied yet fetches it from the old
    primary, returns it, stores it and clears its bit; a read across chunks of every kind is
    assembled; a write or a zero smaller than a chunk into a chunk not copied yet fetches it
    first and merges.  The pull never overwrites any of it."""
    lab, a, b = two
    pid = "g/p1"
    truth, side = _taken_over_mid_copy(lab, a, b, pid)
    want = bytearray(truth)
    hb = b.open()

    last = SIZE - CHUNK
    assert side.copy_map.test(last // CHUNK)
    assert read(hb, last, CHUNK) == truth[last:]  # copy on read: the bytes at once
    # Stored by the pull's store thread, then its bit cleared (the read did not wait).
    wait_until("the fetched chunk stored", lambda: not side.copy_map.test(last // CHUNK))
    assert b.image()[last:] == truth[last:]  # stored here

    at = 50 * CHUNK + 10
    mine = noise(100)
    write(hb, at, mine)  # into a pending chunk: fetched, then merged
    want[at : at + 100] = mine
    hb.zero(4096, 55 * CHUNK + 8192, False, False)  # trim or zero: written, too
    want[55 * CHUNK + 8192 : 55 * CHUNK + 12288] = bytes(4096)
    span = (49 * CHUNK, 7 * CHUNK)  # pending, written, pending..., zeroed, pending
    assert read(hb, *span) == bytes(want[span[0] : span[0] + span[1]])
    assert side.engine is not None and side.engine.on_demand >= 6
    shown = b.show(pid)["hydration"]
    assert shown["fetched_on_demand"] == side.engine.on_demand and shown["pulling"]
    assert 0 < shown["percent"] < 100 and shown["pending_chunks"] == side.copy_map.count()
    assert shown["fetch_ms_avg"] is not None
    assert read(hb, last, CHUNK) == truth[last:]  # here now: a local read
    reads = b.show(pid)["hydration"]["read_latency"]
    assert reads["fetched"]["count"] == 2 and reads["local"]["count"] == 1, reads
    assert all(reads[k]["p50_ms"] is not None for k in ("fetched", "local"))
    assert reads["fetched"]["p99_ms"] >= reads["fetched"]["p50_ms"]

    side.doc.pull_rate = 0  # let the background pull finish
    wait_until("the pull's end", lambda: not side.record.copy_incomplete)
    assert b.show(pid)["hydration"] is None
    done = [e for e in read_events(b.events_path) if e["event"] == "pair.pull.done"]
    assert done[-1]["fetched_on_demand"] >= 6
    assert done[-1]["read_latency"]["fetched"]["count"] == 2
    assert_same(b.image(), bytes(want))
    swapped_back(lab, a, b, pid)


def test_an_async_takeover_loses_nothing_while_the_old_primary_answers(
    two: tuple[Lab, Node, Node],
) -> None:
    """Issue 11, item 1: an async pair with a backlog (its shipping throttled), taken over
    on the secondary while the old primary's node answers: the old primary is fenced, this
    side takes its copy and difference bitmaps (its journal folded in) and is writable at
    once; every acknowledged write of the old primary reads back here before the pull is
    done, and after it the image is the old primary's, with the writes made since."""
    lab, a, b = two
    pid = "g/p1"
    a.create(pid, b, mode="async", journal_size=MiB)
    wait_copy(a, pid)
    a.side(pid).doc.max_rate = 16 << 10  # ships 16 KiB a second: a backlog builds
    ha = a.open()
    for i in range(20):
        write(ha, i * 3 * CHUNK + 512, noise(8192))
    ha.flush()
    truth = a.image()
    assert b.image() != truth  # the backlog: b lacks most of it
    out = b.cmd("pair.takeover", target="g")["pairs"][0]
    assert out["state"] == "SSWS" and out["not_received"]["pulled_from_old_primary_chunks"] > 0
    side = b.side(pid)
    assert side.record.copy_incomplete and not side.record.svol_consistent
    assert a.show(pid)["writes"] == "REFUSE_STALE"  # fenced first
    hb = b.open()
    assert read(hb, 0, SIZE) == truth  # every acknowledged write, before the pull is done
    mine = noise(4096)
    write(hb, 7 * CHUNK, mine)  # a write since the takeover
    want = bytearray(truth)
    want[7 * CHUNK : 7 * CHUNK + 4096] = mine
    wait_until("the pull's end", lambda: not side.record.copy_incomplete)
    assert side.record.svol_consistent
    assert_same(b.image(), bytes(want))
    assert side.doc.pulled_epoch == side.record.epoch
    swapped_back(lab, a, b, pid)
    # The swap back copied only the chunk written here since the takeover: a's difference
    # bitmap still held its folded backlog, which b had just pulled from it (it copied all of
    # it back, and reported it as overwritten).
    assert b.side(pid).doc.last_copy_bytes == CHUNK
    assert not [e for e in read_events(b.events_path) if e["event"] == "pair.resync.overwrite"]


def test_the_old_primary_serves_a_piece_of_chunks_in_one_answer(
    two: tuple[Lab, Node, Node],
) -> None:
    """The pull asks for pieces of up to 1 MiB (ChunkRequest.count): one answer holds
    them all, the last chunk of the volume short; a piece past the end is refused."""
    _, a, b = two
    pid = "g/p1"
    image = noise(SIZE)
    write(a.open(), 0, image)
    a.create(pid, b)
    wait_copy(a, pid)
    side = b.side(pid)
    n = SIZE // CHUNK
    got = side.request(wire.ChunkRequest(pid, n - 3, 3))
    assert isinstance(got, wire.Chunk) and got.index == n - 3
    assert bytes(got.data) == image[(n - 3) * CHUNK :]
    with pytest.raises(PeerRefused, match="outside the volume"):
        side.request(wire.ChunkRequest(pid, n - 2, 3))
    with pytest.raises(ProtocolError, match="count"):
        wire.ChunkRequest(pid, 0, 0)


def test_a_restarted_new_primary_serves_chunks_not_here_yet_at_once(
    two: tuple[Lab, Node, Node],
) -> None:
    """After a restart (a kill during the pull) the side still pulling asks its old primary
    before it serves anyone: a client's first read of a chunk not here yet is fetched.  It
    was refused with EIO until the timer's first heartbeat brought the link back (seen as a
    flaky lab test reading right after the restart)."""
    lab, a, b = two
    pid = "g/p1"
    truth, side = _taken_over_mid_copy(lab, a, b, pid)
    b.restart()  # no tick: the timer has not run
    side = b.side(pid)
    assert side.record.copy_incomplete and side.machine.link_up
    pending = next(side.copy_map.iter_set())
    at = pending * CHUNK
    assert read(b.open(), at, CHUNK) == truth[at : at + CHUNK]


def test_a_takeovers_max_rate_limits_its_pull_only(two: tuple[Lab, Node, Node]) -> None:
    """``pair takeover --max-rate`` limits the pull it starts; the pair keeps its own
    ``--max-rate`` (it stayed on the pair, and limited the swap back and every copy after)."""
    lab, a, b = two
    pid = "g/p1"
    write(a.open(), 0, noise(SIZE))
    a.create(pid, b, max_rate=4 * CHUNK)
    b.cmd("pair.takeover", target="g", max_rate=2 * CHUNK)
    side = b.side(pid)
    assert side.record.copy_incomplete
    assert (side.pull_rate, side.max_rate) == (2 * CHUNK, 4 * CHUNK)
    b.restart()
    side = b.side(pid)
    assert (side.pull_rate, side.max_rate) == (2 * CHUNK, 4 * CHUNK)
    side.doc.pull_rate = 0  # the rest at full speed (the throttle cannot be scripted)
    for _ in range(10):  # the link comes back on the timer, then the pull resumes
        if side.machine.link_up:
            break
        lab.tick(INTERVAL)
    wait_until("the pull's end", lambda: not side.record.copy_incomplete)
    assert side.doc.pull_rate is None and side.pull_rate == side.max_rate == 4 * CHUNK
    b.restart()
    assert b.side(pid).doc.pull_rate is None and b.side(pid).max_rate == 4 * CHUNK


def test_a_chunk_not_here_yet_is_refused_while_the_old_primary_is_unreachable(
    two: tuple[Lab, Node, Node],
) -> None:
    """Issue 11, item 4: the old primary lost during the pull: the pair goes PSUE (the
    takeover stands), a read of a chunk not here yet fails with EIO naming the pair, the
    rest reads and takes writes; nothing but a forced delete is allowed meanwhile.  The old
    primary back, the pull resumes (SSWS), ends, and the swap back keeps the write made
    while it was away."""
    lab, a, b = two
    pid = "g/p1"
    truth, side = _taken_over_mid_copy(lab, a, b, pid)
    hb = b.open()
    last = SIZE - CHUNK
    assert read(hb, last, CHUNK) == truth[last:]  # fetched on demand while a answers
    lab.link(a, b).cut()
    lab.tick(HB_TIMEOUT + 0.1)
    assert b.state(pid) == ("PSUE", "secondary")
    shown = b.show(pid)
    assert shown["hydration"]["suspended_by"] == "link" and shown["writes"] == "LOCAL_RECORD"
    assert not shown["hidden"] and side.record.pulling
    pending = next(side.copy_map.iter_set())
    with pytest.raises(VolumeError, match=f"pair {pid}: .*not here yet") as refused:
        read(hb, pending * CHUNK, 4096)
    assert refused.value.errno == errno.EIO
    assert read(hb, last, CHUNK) == truth[last:]  # what is here still reads
    write(hb, last, b"x" * 512)  # and takes writes
    expected = bytearray(truth)
    expected[last : last + 512] = b"x" * 512
    with pytest.raises(IllegalState, match="delete --force"):
        b.cmd("pair.delete", target="g")
    with pytest.raises(IllegalState, match="already taken over"):
        b.cmd("pair.takeover", target="g", force=True)
    side.doc.pull_rate = 0  # the resumed pull runs at full speed
    lab.link(a, b).heal()
    lab.tick(INTERVAL)  # the heartbeat finds a again
    wait_until("the pull's end", lambda: not side.record.pulling)
    assert [e["state"] for e in b.events("pair.state", pid)][-2:] == ["PSUE", "SSWS"]
    swapped_back(lab, a, b, pid)
    assert a.image() == bytes(expected)


def test_the_old_primary_is_not_deleted_under_a_side_that_still_pulls_from_it(
    two: tuple[Lab, Node, Node],
) -> None:
    """``pair delete`` on the old primary announces SMPL; the side still pulling refuses it
    (EBUSY), so nothing is deleted there: the pull would be stranded with chunks it can
    never have.  ``--force`` deletes the old primary's side anyway, and the peer says
    nothing was deleted there."""
    lab, a, b = two
    pid = "g/p1"
    truth, side = _taken_over_mid_copy(lab, a, b, pid)
    with pytest.raises(IllegalState, match=r"nothing deleted .*--force"):
        a.cmd("pair.delete", target="g")
    assert a.state(pid) == ("PSUE", "primary") and b.side(pid).record.pulling
    side.doc.pull_rate = 0
    wait_until("the pull's end", lambda: not side.record.pulling)
    assert_same(b.image(), truth)  # the pull went on from the side kept
    swapped_back(lab, a, b, pid)


def test_a_forced_delete_of_the_old_primary_leaves_the_puller_refusing_only_what_it_lacks(
    two: tuple[Lab, Node, Node],
) -> None:
    """The operator insists: the old primary's side goes; the pulling side keeps its pair
    (it refused the delete) and what it has, refuses what it lacks (a has nothing to give
    any more), and is itself deleted only by force."""
    lab, a, b = two
    pid = "g/p1"
    truth, side = _taken_over_mid_copy(lab, a, b, pid)
    hb = b.open()
    last = SIZE - CHUNK
    assert read(hb, last, CHUNK) == truth[last:]  # fetched on demand: here now
    out = a.cmd("pair.delete", target="g", force=True)
    assert "refused" in str(out["pairs"][0]["peer_not_told"])
    assert side.record.pulling  # b kept its pair: the peer's delete was refused there
    assert read(hb, last, CHUNK) == truth[last:]
    pending = next(side.copy_map.iter_set())
    with pytest.raises(VolumeError, match="not here yet"):
        read(hb, pending * CHUNK, 4096)  # a has no such pair any more
    with pytest.raises(IllegalState, match="delete --force"):
        b.cmd("pair.delete", target="g")
    (row,) = b.cmd("pair.delete", target="g", force=True)["pairs"]
    assert row["state"] == "SMPL"
    assert any("never received from the old primary" in line for line in b.lines)


def test_a_read_has_a_fetched_chunk_before_its_store_and_a_write_waits_for_the_store(
    two: tuple[Lab, Node, Node],
) -> None:
    """A read of a chunk not here yet returns the old primary's bytes as soon as they come
    (the store waits behind the pull's writes, 5-50 ms at full speed); the chunk stays
    pending, under its lock, until the store is done.  A write into it meanwhile waits
    for the store, so the late store never overwrites it."""
    lab, a, b = two
    pid = "g/p1"
    truth, side = _taken_over_mid_copy(lab, a, b, pid)
    engine = side.engine
    assert isinstance(engine, PullEngine)
    target = SIZE // CHUNK - 1
    entered, release = threading.Event(), threading.Event()
    real_store = engine._store

    def slow_store(first: int, count: int, data: bytes | memoryview) -> None:
        if (first, count) == (target, 1):
            entered.set()
            assert release.wait(WAIT)
        real_store(first, count, data)

    engine._store = slow_store  # type: ignore[method-assign]
    last = target * CHUNK
    assert read(b.open(), last, CHUNK) == truth[last:]  # while its store is held
    assert entered.is_set() and side.copy_map.test(target)  # not stored: still pending
    written = threading.Event()

    def writer() -> None:
        write(b.open(), last + 100, b"w" * 100)
        written.set()

    t = threading.Thread(target=writer)
    t.start()
    assert not written.wait(0.2)  # held behind the store, however long it takes
    release.set()
    t.join(WAIT)
    assert written.is_set() and not side.copy_map.test(target)
    want = bytearray(truth[last:])
    want[100:200] = b"w" * 100
    assert b.image()[last:] == bytes(want)


def test_a_fetch_on_demand_never_waits_behind_the_pulls_pieces(
    two: tuple[Lab, Node, Node],
) -> None:
    """The old primary's reader serves ChunkRequests inline, in order: a client's fetch on
    the connection that carries the pull's pieces (8 of 4 MiB in flight) waited for up to
    32 MiB of them.  The pieces go on the peer's bulk connection; fetches on demand, like
    heartbeats and states, on the other."""
    lab, a, b = two
    pid = "g/p1"
    truth, side = _taken_over_mid_copy(lab, a, b, pid)
    seen: dict[str, list[wire.ChunkRequest]] = {"main": [], "bulk": []}

    def recording(client: PeerClient, lane: str) -> None:
        carry = client.request

        def request(msg: wire.Message, timeout: float = 30.0) -> wire.Message:
            if isinstance(msg, wire.ChunkRequest):
                seen[lane].append(msg)
            return carry(msg, timeout)

        client.request = request  # type: ignore[method-assign]

    recording(side.peer_client(), "main")
    recording(side.bulk_client(), "bulk")
    assert side.bulk_client() is not side.peer_client()
    hb = b.open()
    last = SIZE - CHUNK
    assert read(hb, last, CHUNK) == truth[last:]  # fetched on demand
    side.doc.pull_rate = 0
    wait_until("the pull's end", lambda: not side.record.pulling)
    assert [m.index for m in seen["main"]] == [last // CHUNK]
    assert seen["bulk"] and last // CHUNK not in {m.index for m in seen["bulk"]}
    assert max(m.count for m in seen["bulk"]) > 1  # unthrottled: pieces of many chunks
    swapped_back(lab, a, b, pid)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "refused"])
def test_the_pulls_landings_go_beneath_the_page_cache(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """The pull's pieces are written with O_DIRECT (replicator.direct_io): buffered, their
    copy into fresh page-cache pages and the inode lock held 2.5x as long as the transfer
    (docs/benchmarks.md, session 12).  Where direct I/O is refused, the same landings are
    written buffered: either way b ends with a's image."""
    lab, a, b = two
    pid = "g/p1"
    written: list[int] = []
    carry = DirectWriter.write

    def counting(self: DirectWriter, data: bytes | memoryview, pos: int) -> bool:
        done = carry(self, data, pos) if direct else False
        if done:
            written.append(len(data))
        return done

    monkeypatch.setattr(DirectWriter, "write", counting)
    truth, side = _taken_over_mid_copy(lab, a, b, pid)
    side.doc.pull_rate = 0
    wait_until("the pull's end", lambda: not side.record.pulling)
    assert_same(b.image(), truth)
    if direct:
        assert sum(written) > SIZE // 2  # nearly all of it was pending
    else:
        assert not written
    swapped_back(lab, a, b, pid)


def test_an_initial_copy_into_holes_goes_beneath_the_page_cache_and_a_resync_does_not(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new secondary's copied Writes into ranges that hold nothing go direct (1 GiB copied
    in 2.5-3.0 s, was 4.6-5.5); a range with data here, and every Write of a differential
    resync (overwrites, faster buffered), is written buffered.  Either way: identical."""
    _, a, b = two
    pid = "g/p1"
    spots: list[tuple[int, int]] = []
    carry = DirectWriter.write

    def counting(self: DirectWriter, data: bytes | memoryview, pos: int) -> bool:
        done = carry(self, data, pos)
        if done:
            spots.append((pos, len(data)))
        return done

    monkeypatch.setattr(DirectWriter, "write", counting)
    write(a.open(), 0, noise(SIZE))
    hb = b.open()
    write(hb, MiB, noise(2 * CHUNK))  # data here before the pair: overwritten buffered
    hb.close()
    a.create(pid, b)
    wait_copy(a, pid)
    identical(a, b)
    assert sum(n for _, n in spots) >= SIZE // 2
    at = b.side(pid).data_offset + MiB
    assert not [(p, n) for p, n in spots if p < at + 2 * CHUNK and p + n > at]
    a.cmd("pair.split", target="g")
    write(a.open(), 0, noise(SIZE))
    spots.clear()
    a.cmd("pair.resync", target="g")
    wait_copy(a, pid)
    identical(a, b)
    assert not spots
    assert a.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 0


def test_a_takeover_during_the_copy_needs_no_force_while_the_old_primary_answers(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11, item 1: in COPY a takeover without force takes the old primary's pending
    bitmap and pulls it (no data lost); without an answer it is refused, naming force (which
    takes the half-built image), and nothing moved."""
    lab, a, b = two
    pid = "g/p1"
    write(a.open(), 0, noise(SIZE))
    a.create(pid, b, max_rate=4 * CHUNK)
    side = b.side(pid)
    assert side.record.state is ps.State.COPY

    def silent(**_: Any) -> None:
        raise ConnectionFailed("no answer (the test)")

    with monkeypatch.context() as m:
        m.setattr(side.exchange, "query", silent)
        with pytest.raises(IllegalState, match="use force"):
            b.cmd("pair.takeover", target="g")
    assert side.record.state is ps.State.COPY and a.show(pid)["writes"] != "REFUSE_STALE"
    truth = a.image()
    out = b.cmd("pair.takeover", target="g", max_rate=4 * CHUNK)["pairs"][0]
    assert out["state"] == "SSWS" and out["takeover"]["zero_loss"]
    assert out["takeover"]["previous"] == "COPY" and out["takeover"]["pulled_chunks"] > 40
    assert a.show(pid)["writes"] == "REFUSE_STALE"
    assert side.record.copy_incomplete and side.doc.reverse_after_pull
    hb = b.open()
    assert read(hb, 0, SIZE) == truth  # every chunk, most fetched on demand
    side.doc.pull_rate = 0
    wait_until("the pull's end", lambda: not side.record.copy_incomplete)
    swapped_back(lab, a, b, pid)


def test_a_write_that_covers_whole_chunks_not_here_yet_fetches_nothing(
    two: tuple[Lab, Node, Node],
) -> None:
    """Issue 11 (the hydration core, replicator/pair/hydration.py): a write, a zero or a trim
    that covers a whole chunk not here yet overwrites all of it and needs no fetch, so it is
    served while the old primary cannot be reached; it fetched the chunk first, and failed
    with EIO.  Its data is synced before its written bit (its pending bit still covers it
    until then); after a crash that left both bits on disk, the local data wins, the pull
    never carries the old chunk over it, and the swap back carries it to the old primary."""
    lab, a, b = two
    pid = "g/p1"
    truth, side = _taken_over_mid_copy(lab, a, b, pid)
    want = bytearray(truth)
    hb = b.open()

    def chunks(first: int, count: int) -> bytes:
        return read(hb, first * CHUNK, count * CHUNK)

    def wanted(first: int, count: int) -> bytes:
        return bytes(want[first * CHUNK : (first + count) * CHUNK])

    assert chunks(40, 1) == wanted(40, 1) and chunks(43, 1) == wanted(43, 1)  # fetched here
    assert all(side.copy_map.test(c) for c in (41, 42, 44, 45, 46, 47))
    lab.link(a, b).cut()
    assert side.engine is not None
    fetched = side.engine.on_demand

    mine = noise(3 * CHUNK)
    at = 40 * CHUNK + 100  # part of 40, all of 41 and 42 (not here), part of 43
    write(hb, at, mine)
    want[at : at + len(mine)] = mine
    hb.zero(CHUNK, 45 * CHUNK, False, False)  # all of 45, not here
    hb.trim(CHUNK, 46 * CHUNK, False)  # all of 46, not here
    want[45 * CHUNK : 47 * CHUNK] = bytes(2 * CHUNK)
    with pytest.raises(VolumeError, match="not here yet") as refused:
        write(hb, 47 * CHUNK + 10, b"y" * 10)  # part of a chunk not here: needs a fetch
    assert refused.value.errno == errno.EIO
    assert side.engine.on_demand == fetched  # nothing was fetched
    for c in (41, 42, 45, 46):
        assert side.diff_map.test(c) and not side.copy_map.test(c)
    assert side.copy_map.test(44) and side.copy_map.test(47) and not side.diff_map.test(47)
    assert chunks(40, 4) == wanted(40, 4) and chunks(45, 2) == wanted(45, 2)

    # A crash after a whole chunk's written bit but before its pending bit's sync: both set.
    with side.bitmap_lock:
        side.copy_map.set_chunk(41)
    side.flush_copy_map()
    side.doc.pull_rate = 0
    side.save()
    assert side.store.load(side.record.copy_slot, side.chunk_size).test(41)
    assert side.store.load(side.record.diff_slot, side.chunk_size).test(41)
    lab.link(a, b).heal()
    b.restart()  # the pull resumes at once (the old primary is asked at start-up)
    side = b.side(pid)
    hb = b.open()
    assert chunks(41, 1) == wanted(41, 1)  # the local data is newer: no fetch needed
    for _ in range(10):  # the link comes back on the timer, then the pull resumes
        if side.machine.link_up:
            break
        lab.tick(INTERVAL)
    wait_until("the pull's end", lambda: not side.record.copy_incomplete)
    assert_same(b.image(), bytes(want))
    swapped_back(lab, a, b, pid)


def test_a_forced_takeover_that_cannot_take_the_pending_bitmap_reveals_nothing(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old primary's pending bitmap is durable here before the record that reveals the
    taken-over side.  The move's record came first: when the bitmap request failed (or the
    node died before the bitmap was saved), the side was left SSWS with an empty pending set,
    also after a restart, and served every chunk it had never received."""
    lab, a, b = two
    pid = "g/p1"
    write(a.open(), 0, noise(SIZE))
    a.create(pid, b, max_rate=4 * CHUNK)  # COPY for 16 s
    side = b.side(pid)

    def cut(which: ps.BitmapRef) -> None:
        raise ConnectionFailed("cut")

    monkeypatch.setattr(side.copies, "fetch_bitmap", cut)
    with pytest.raises(ConnectionFailed, match="cannot take the old primary's pending bitmap"):
        b.cmd("pair.takeover", target="g", force=True)
    assert b.state(pid) == ("COPY", "secondary") and not side.record.copy_incomplete
    b.restart()
    assert b.state(pid) == ("COPY", "secondary")
    with pytest.raises(IllegalState, match="hidden secondary"):
        b.open()

    # The restarted node's side is a new one, with its own (real) bitmap request.
    for _ in range(10):
        if b.side(pid).machine.link_up:
            break
        lab.tick(INTERVAL)
    b.cmd("pair.takeover", target="g", force=True)
    side = b.side(pid)
    assert side.record.copy_incomplete and side.copy_map.count() > 0
    side.doc.pull_rate = 0
    wait_until("the pull's end", lambda: not side.record.copy_incomplete)
    identical(a, b)


def test_the_pull_never_overwrites_a_chunk_written_since_the_takeover(
    two: tuple[Lab, Node, Node],
) -> None:
    """After a forced takeover of an incomplete copy, the pull clears a chunk's pending bit
    in memory and makes it durable only with its next sync (every 64 chunks).  A client may
    write the chunk meanwhile; a kill then leaves its pending bit set on disk, beside the
    write's difference bit, and the resumed pull fetched the chunk again over the client's
    acknowledged, flushed write.  Emulated: the bit set again and persisted, the node
    restarted.  A chunk written since the takeover is never fetched: the local data is newer."""
    lab, a, b = two
    pid = "g/p1"
    write(a.open(), 0, noise(SIZE))
    a.create(pid, b, max_rate=4 * CHUNK)  # 64 chunks at 4 a second: COPY for 16 s
    b.cmd("pair.takeover", target="g", force=True, max_rate=4 * CHUNK)
    side = b.side(pid)
    assert side.record.state is ps.State.SSWS and side.record.copy_incomplete
    wait_until("the pull's first chunk", lambda: not side.copy_map.test(0))
    hb = b.open()
    mine = noise(CHUNK // 2)
    write(hb, 100, mine)  # allowed: chunk 0 is here
    hb.flush()
    assert side.diff_map.test(0)
    # The write made the chunk it wrote durable first: data, then its cleared bit.
    assert not side.store.load(side.record.copy_slot, side.chunk_size).test(0)
    with side.bitmap_lock:
        side.copy_map.set_chunk(0)  # as the disk has it after a kill before the pull's sync
    side.flush_copy_map()
    side.doc.pull_rate = 0
    side.save()
    durable = side.store.load(side.record.copy_slot, side.chunk_size)
    assert durable.test(0) and side.store.load(side.record.diff_slot, side.chunk_size).test(0)
    b.restart()  # the pull resumes at once (the old primary is asked at start-up)
    side = b.side(pid)

    def pulled() -> bool:
        return any(e["event"] == "pair.pull.done" for e in read_events(b.events_path))

    for _ in range(10):  # the link comes back on the timer, then the pull resumes
        if side.machine.link_up:
            break
        lab.tick(INTERVAL)
    wait_until("the pull's end", pulled)
    wait_until("consistent", lambda: not b.side(pid).record.copy_incomplete)
    assert b.image()[100 : 100 + len(mine)] == mine
    assert b.state(pid) == ("SSWS", "secondary")


# --------------------------------------------------------------------------------------------
# Heartbeats: one Ping per link, however many pairs


# "timer" once failed: each machine asked for a Ping at its own phase and every request was
# sent (one Ping per pair per interval); the link's Ping now sets every machine's phase.
@pytest.mark.parametrize("drive", ["steps", "timer"])
def test_one_ping_per_link_per_round(lab: Lab, drive: str) -> None:
    """Issue 8 item 3.  Three pairs share the link, created at different moments (so their
    machines' heartbeat deadlines differ); with no traffic, each node sends one Ping per
    heartbeat interval over the link.  ``steps``: the clock moves by whole intervals;
    ``timer``: it follows get_timer() as the timer thread does."""
    vols = {f"vol{i}": SIZE for i in range(3)}
    a = lab.node("node-a", "10.0.0.1", vols)
    b = lab.node("node-b", "10.0.0.2", vols)
    lab.start()
    for i in range(3):
        a.create(f"g/p{i}", b, volume=f"vol{i}", peer_volume=f"vol{i}")
        wait_copy(a, f"g/p{i}")
        lab.tick(0.3)  # the next pair's machine starts its heartbeat 0.3 s later
    lab.run(2 * INTERVAL)  # settle
    link = lab.link(a, b)
    ab, ba = link.pings(a, b), link.pings(b, a)
    others = link.count(a, b) + link.count(b, a) - ab - ba
    rounds = 10
    if drive == "steps":
        for _ in range(rounds):
            lab.tick(INTERVAL)
    else:
        lab.run(rounds * INTERVAL)
    assert link.count(a, b) + link.count(b, a) - link.pings(a, b) - link.pings(b, a) == others
    # One per interval and direction (each node watches the link with its own Ping).
    assert link.pings(a, b) - ab == rounds, drive
    assert link.pings(b, a) - ba == rounds, drive
    for i in range(3):
        assert a.state(f"g/p{i}") == ("PAIR", "primary")
        assert b.state(f"g/p{i}") == ("PAIR", "secondary")


# --------------------------------------------------------------------------------------------
# A local pair (both volumes on one node)


def test_local_pair_create_split_resync(lab: Lab) -> None:
    a = lab.node("node-a", "10.0.0.1", {"vol": SIZE, "vol2": SIZE})
    lab.start()
    pid = "g/local"
    h = a.open()
    write(h, MiB, noise(3 * CHUNK))
    a.create(pid, a, peer_node="", peer_host=a.listen, peer_volume="vol2")
    wait_copy(a, pid, "vol")
    assert a.state(pid, "vol") == ("PAIR", "primary")
    assert a.state(pid, "vol2") == ("PAIR", "secondary")
    write(h, 0, noise(CHUNK))
    identical(a, a, "vol", "vol2")

    lab.run(3 * HB_TIMEOUT)  # the halves ping each other in-process: still PAIR
    assert a.state(pid, "vol") == ("PAIR", "primary")
    assert a.state(pid, "vol2") == ("PAIR", "secondary")
    assert not lab.links  # nothing went over a link

    a.cmd("pair.split", target="g")
    assert a.state(pid, "vol") == ("PSUS", "primary")
    assert a.state(pid, "vol2") == ("PSUS", "secondary")
    assert a.pvid("vol") != a.pvid("vol2")
    h2 = a.open("vol2")
    write(h, 4 * CHUNK, noise(CHUNK))
    write(h2, 9 * CHUNK, noise(CHUNK))
    out = a.cmd("pair.resync", target="g")
    assert [p["discarding_chunks"] for p in out["pairs"]] == [1]
    wait_copy(a, pid, "vol")
    assert a.state(pid, "vol2") == ("PAIR", "secondary")
    identical(a, a, "vol", "vol2")
    assert a.cmd("pair.verify", target="g")["pairs"][0]["mismatch_count"] == 0


# --------------------------------------------------------------------------------------------
# Stop and restart


def test_stop_during_a_copy_then_restart_resumes_it(two: tuple[Lab, Node, Node]) -> None:
    """Stopping a node mid-copy joins the engine at once (no thread left) and keeps the copy
    durable; the restarted node's pair waits for its peer (link down), the timer's Ping
    brings the link back and the copy resumes where it stopped."""
    lab, a, b = two
    pid = "g/p1"
    h = a.open()
    for off in range(0, SIZE, MiB):
        write(h, off, noise(MiB))
    # 4 MiB/s: the engine's first runs wait for their budget (real seconds: the throttle
    # reads the scripted clock, which stands still), so the copy is surely under way.
    a.create(pid, b, max_rate=4 * MiB)
    engine = a.side(pid).engine
    assert engine is not None and engine.thread.is_alive()
    began = time.monotonic()
    a.restart()
    assert time.monotonic() - began < 2.0, "stop waited for the throttled copy"
    assert not engine.thread.is_alive()
    assert a.state(pid) == ("COPY", "primary")
    assert not a.side(pid).machine.link_up  # restored from disk: waits for the peer
    a.side(pid).doc.max_rate = 0  # the rest at full speed (the throttle cannot be scripted)
    for _ in range(5):
        if a.side(pid).machine.link_up:
            break
        lab.tick(INTERVAL)
    assert a.side(pid).machine.link_up
    wait_copy(a, pid)
    assert b.state(pid) == ("PAIR", "secondary")
    identical(a, b)


def test_read_latency_percentiles_by_kind_nearest_rank_of_the_newest() -> None:
    from replicator.pair.pull import ReadLatency

    r = ReadLatency()
    assert r.summary()["fetched"] == {"count": 0, "p50_ms": None, "p99_ms": None}
    for ms in range(1, 101):  # 1..100 ms, fetched
        r.note(True, ms / 1000)
    r.note(False, 0.0002)
    s = r.summary()
    assert s["fetched"] == {"count": 100, "p50_ms": 50.0, "p99_ms": 99.0}
    assert s["local"] == {"count": 1, "p50_ms": 0.2, "p99_ms": 0.2}
    for _ in range(ReadLatency.SAMPLES):
        r.note(True, 0.001)
    assert r.summary()["fetched"] == {"count": 100 + ReadLatency.SAMPLES, "p50_ms": 1.0,
                                      "p99_ms": 1.0}  # fmt: skip


def test_the_secondary_keeps_the_pairs_max_rate_for_its_pull(two: tuple[Lab, Node, Node]) -> None:
    """``pair create --max-rate`` reaches the secondary (PairCreate.max_rate): a takeover
    there pulls at the pair's rate without being told again (the cluster agent's takeover
    gives none); before, the secondary had no limit and pulled at full speed."""
    _, a, b = two
    pid = "g/p1"
    write(a.open(), 0, noise(SIZE))
    a.create(pid, b, max_rate=4 * CHUNK)
    side = b.side(pid)
    assert side.doc.max_rate == 4 * CHUNK
    b.cmd("pair.takeover", target="g")  # no --max-rate
    assert side.record.copy_incomplete and side.max_rate == 4 * CHUNK
    assert side.copy_map.count() > 40  # still pulling, at four chunks a second


def test_a_fold_writes_each_pairs_bitmap_once_not_once_per_entry(
    two: tuple[Lab, Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11, time to ready: a takeover's fold of the old primary's backlog made the
    difference bitmap durable once per newly dirty chunk (a write and an fdatasync each: a
    backlog of thousands of chunks took seconds); now once per pair.  The bits are the same."""
    _, a, b = two
    pid = "g/p1"
    a.create(pid, b, mode="async", journal_size=4 * MiB)
    wait_copy(a, pid)
    side = a.side(pid)
    side.doc.max_rate = 1  # nothing ships: a backlog
    ha = a.open()
    chunks = list(range(0, SIZE // CHUNK, 2))
    for c in chunks:
        write(ha, c * CHUNK + 100, noise(512))
    flushes = []
    real = side.store.flush
    monkeypatch.setattr(side.store, "flush", lambda *a: flushes.append(1) or real(*a))
    assert a.manager.primaries["g"].fold() >= len(chunks)
    assert len(flushes) == 1
    assert [c for c in range(SIZE // CHUNK) if side.diff_map.test(c)] == chunks
