"""The peer link's send side coalesces frames: whoever holds the send lock sends every frame
queued by then, in queue order, in one sendmsg (never more buffers than one sendmsg takes).
A fake socket records the calls, so the test is deterministic: the lock is held by the test
while the senders queue."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from replicator import wire
from replicator.peer_link import _IOV_MAX, _Link

WAIT = 10.0


class FakeSocket:
    """Takes everything it is given (``limit``: at most that many bytes per call)."""

    def __init__(self, limit: int | None = None) -> None:
        self.calls: list[int] = []  # buffers per sendmsg
        self.data = bytearray()
        self.limit = limit

    def sendmsg(self, buffers: Sequence[memoryview], *args: object) -> int:
        assert len(buffers) <= _IOV_MAX
        self.calls.append(len(buffers))
        took = 0
        for b in buffers:
            n = len(b) if self.limit is None else min(len(b), self.limit - took)
            self.data += b[:n]
            took += n
            if self.limit is not None and took >= self.limit:
                break
        return took

    def setsockopt(self, *args: object) -> None:
        pass


def frames(data: bytes) -> list[wire.Frame]:
    d = wire.FrameDecoder()
    d.feed(data)
    out = []
    while (f := d.next_frame()) is not None:
        out.append(f)
    return out


def test_frames_queued_while_the_lock_is_held_go_out_in_one_sendmsg() -> None:
    sock = FakeSocket()
    link = _Link(sock, "fake")  # type: ignore[arg-type]
    link.send_lock.acquire()
    senders = [
        threading.Thread(target=link.send, args=(wire.Write("g/p", i * 4096, b"x" * 4096), i + 1))
        for i in range(3)
    ]
    for t in senders:
        t.start()
    while True:  # all three queued (each then waits for the lock)
        with link._outbox_lock:
            if len(link._outbox) == 6:
                break
    link.send_lock.release()
    for t in senders:
        t.join(WAIT)
        assert not t.is_alive()
    assert sock.calls == [6]  # one sendmsg; the other two found their frames sent
    got = frames(bytes(sock.data))
    assert sorted(f.request_id for f in got) == [1, 2, 3]
    for f in got:
        assert f.message == wire.Write("g/p", (f.request_id - 1) * 4096, b"x" * 4096)


def test_more_buffers_than_one_sendmsg_takes_and_short_sends() -> None:
    sock = FakeSocket(limit=100_000)
    link = _Link(sock, "fake")  # type: ignore[arg-type]
    link.send_lock.acquire()
    n = _IOV_MAX // 2 + 8  # two buffers each: more than one sendmsg takes
    senders = [
        threading.Thread(
            target=link.send, args=(wire.Write("g/p", i * 512, bytes([i % 256]) * 512), i + 1)
        )
        for i in range(n)
    ]
    for t in senders:
        t.start()
    while True:
        with link._outbox_lock:
            if len(link._outbox) == 2 * n:
                break
    link.send_lock.release()
    for t in senders:
        t.join(WAIT)
        assert not t.is_alive()
    assert len(sock.calls) >= 2 and max(sock.calls) <= _IOV_MAX
    got = frames(bytes(sock.data))
    assert sorted(f.request_id for f in got) == list(range(1, n + 1))
    for f in got:
        i = f.request_id - 1
        assert f.message == wire.Write("g/p", i * 512, bytes([i % 256]) * 512)
