"""The pull's StoreGate (replicator/pair/pull.py): stores share it, a sync holds it alone.
A sync that flushed the bitmap while a store had written its data but not yet cleared its
bit, or that cleared bits over data its fdatasync started before, would make a bit durable
over data that is not: the orderings are forced here with events, not timed."""

from __future__ import annotations

import threading

from replicator.pair.pull import StoreGate

WAIT = 5.0


def test_a_sync_waits_for_the_stores_under_way() -> None:
    gate = StoreGate()
    inside, release, synced = threading.Event(), threading.Event(), threading.Event()

    def store() -> None:
        with gate.store():
            inside.set()
            release.wait(WAIT)

    def sync() -> None:
        with gate.sync():
            synced.set()

    s = threading.Thread(target=store)
    s.start()
    assert inside.wait(WAIT)
    y = threading.Thread(target=sync)
    y.start()
    assert not synced.wait(0.2)  # the store is still inside
    release.set()
    assert synced.wait(WAIT)
    s.join(WAIT)
    y.join(WAIT)


def test_a_store_waits_while_a_sync_runs_and_stores_share() -> None:
    gate = StoreGate()
    syncing, release, stored = threading.Event(), threading.Event(), threading.Event()

    def sync() -> None:
        with gate.sync():
            syncing.set()
            release.wait(WAIT)

    y = threading.Thread(target=sync)
    y.start()
    assert syncing.wait(WAIT)

    def store() -> None:
        with gate.store():
            stored.set()

    s = threading.Thread(target=store)
    s.start()
    assert not stored.wait(0.2)  # held back until the sync is done
    release.set()
    assert stored.wait(WAIT)
    y.join(WAIT)
    s.join(WAIT)
    with gate.store(), gate.store():  # stores share the gate (no sync waiting)
        pass
