"""Group commit on its own (replicator.group_commit), with a scripted fdatasync: the marks a
record vouches with, written-up-to across out-of-order completion, shared flushes, failure."""

from __future__ import annotations

import threading

import pytest

from replicator.errors import VolumeError
from replicator.group_commit import GroupCommit


class FakeSync:
    def __init__(self) -> None:
        self.calls = 0
        self.error: VolumeError | None = None
        self.gate: threading.Event | None = None

    def __call__(self) -> None:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(5)
        if self.error is not None:
            raise self.error


def test_marks_follow_out_of_order_completion() -> None:
    fs = FakeSync()
    gc = GroupCommit(fs, 10, "j")
    with gc.cond:
        assert gc.reserve() == (10, 9, 9)
        assert gc.reserve() == (11, 9, 9)
        gc.written(11)  # finished first: 10 is still in flight
        assert gc.written_upto() == 9
        assert gc.reserve() == (12, 9, 9)
        gc.written(10)
        assert gc.written_upto() == 11
        assert gc.reserve() == (13, 11, 9)
        gc.note_synced(11)
        assert gc.reserve() == (14, 11, 11)
    assert fs.calls == 0


def test_write_back_wait_needs_every_earlier_seq_written() -> None:
    fs = FakeSync()
    gc = GroupCommit(fs, 1, "j")
    gc.sync_appends = False
    with gc.cond:
        a, _, _ = gc.reserve()
        b, _, _ = gc.reserve()
        gc.written(b)
    done = threading.Event()

    def waiter() -> None:
        with gc.cond:
            gc.wait(b)
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not done.wait(0.2)  # a is not written yet
    with gc.cond:
        gc.written(a)
    t.join(5)
    assert done.is_set() and gc.durable == 2 and fs.calls == 0 and gc.synced == 0
    with gc.cond:
        gc.sync()
    assert (fs.calls, gc.synced, gc.data_syncs) == (1, 2, 1)
    with gc.cond:
        gc.sync()  # nothing new
    assert fs.calls == 1


def test_one_flush_serves_every_waiter() -> None:
    fs = FakeSync()
    fs.gate = threading.Event()
    gc = GroupCommit(fs, 1, "j")
    with gc.cond:
        seqs = [gc.reserve()[0] for _ in range(8)]
        for s in seqs:
            gc.written(s)
    threads = [threading.Thread(target=lambda s=s: _wait(gc, s)) for s in seqs]
    for t in threads:
        t.start()
    fs.gate.set()
    for t in threads:
        t.join(5)
    assert gc.durable == 8 and fs.calls == 1 and gc.data_syncs == 1


def _wait(gc: GroupCommit, seq: int) -> None:
    with gc.cond:
        gc.wait(seq)


def test_a_failed_flush_or_write_breaks_it_for_good() -> None:
    fs = FakeSync()
    fs.error = VolumeError("journal fdatasync: Input/output error")
    gc = GroupCommit(fs, 1, "j")
    with gc.cond:
        s, _, _ = gc.reserve()
        gc.written(s)
        with pytest.raises(VolumeError, match="fdatasync"):
            gc.wait(s)
        with pytest.raises(VolumeError, match="broken"):
            gc.check()
        gc.drain()  # returns: nothing more can become durable
    gc2 = GroupCommit(FakeSync(), 1, "j")
    gc2.sync_appends = False
    with gc2.cond:
        gc2.reserve()  # seq 1: its write fails
        b, _, _ = gc2.reserve()
        gc2.written(b)
        gc2.fail(VolumeError("journal write of seq 1: No space left on device"))
        with pytest.raises(VolumeError, match="broken"):
            gc2.wait(b)
        assert gc2.written_upto() == 0  # a stays in flight for ever


def test_an_unexpected_error_in_the_flush_leaves_the_lock_usable() -> None:
    class Boom(Exception):
        pass

    def fsync() -> None:
        raise Boom

    gc = GroupCommit(fsync, 1, "j")
    with gc.cond:
        s, _, _ = gc.reserve()
        gc.written(s)
        with pytest.raises(Boom):
            gc.wait(s)
    assert not gc.lock.locked()
