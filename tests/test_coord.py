"""Coordination (cluster.coord): the same behaviour from the in-memory fake and from a real etcd,
the leader lock and its epoch, the S-VOL lock, the resource records, and etcd's failures.

Every behavioural test runs twice, against ``FakeCoord`` on a scripted clock and against an
``EtcdCoord`` talking to a real etcd process (one member on loopback, started once for the
module): that is what proves the fake faithful.  Each test works under a key prefix (and a
cluster name) of its own, so the tests share the etcd without seeing each other.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import require_programs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cluster.config import Resource, new_resource
from cluster.coord import (
    Compare,
    Coord,
    Delete,
    EtcdCoord,
    FakeCoord,
    Get,
    Keys,
    Lease,
    Put,
    Watch,
    WatchEvent,
    acquire_leader,
    acquire_lock,
    decode_leader,
    delete_resource,
    get_resource,
    list_resources,
    lock_holder,
    prefix_end,
    put_resource,
    read_epoch,
    read_leader,
    release_leader,
    release_lock,
)
from cluster.etcd_server import EtcdCluster, free_ports
from replicator.errors import (
    AlreadyExists,
    Closed,
    ConnectionFailed,
    LeaseLost,
    NotFound,
    ProtocolError,
    Timeout,
    UsageError,
)


class Clock:
    """A scripted clock: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    require_programs("etcd")
    cluster = EtcdCluster(str(tmp_path_factory.mktemp("etcd")))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Env:
    """One implementation under test.  ``patience``: how long to wait for an event that must
    come (real etcd expires a lease up to 0.5 s late); ``quiet``: how long to listen for one
    that must not."""

    kind: str
    coord: Coord
    prefix: str
    keys: Keys
    clock: Clock | None
    patience: float
    quiet: float

    def let_expire(self, lease: Lease) -> None:
        """Let ``lease`` run out unrenewed: the scripted clock jumps; real etcd needs time,
        which the caller's bounded wait for the delete event gives it."""
        if self.clock is not None:
            self.clock.advance(lease.ttl)

    def next_event(self, w: Watch) -> WatchEvent:
        event = w.get(self.patience)
        assert event is not None, f"no event within {self.patience}s"
        return event


@pytest.fixture(params=["fake", "etcd"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    tag = uuid.uuid4().hex[:10]
    keys = Keys(f"t{tag}")
    if request.param == "fake":
        clock = Clock()
        fake = FakeCoord(clock)
        yield Env("fake", fake, f"/test/{tag}/", keys, clock, 1.0, 0.05)
        fake.close()
    else:
        cluster: EtcdCluster = request.getfixturevalue("etcd")
        with EtcdCoord(cluster.endpoints(), 5.0) as coord:
            yield Env("etcd", coord, f"/test/{tag}/", keys, None, 10.0, 0.3)


# -- keys and revisions ---------------------------------------------------------------------


def test_put_get_delete_and_revisions(env: Env) -> None:
    c, k = env.coord, env.prefix + "k"
    assert c.get(k) is None
    r1 = c.put(k, b"one")
    kv = c.get(k)
    assert kv is not None
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (
        k,
        b"one",
        r1,
        r1,
        1,
        0,
    )
    r2 = c.put(k, b"two")
    assert r2 > r1
    kv = c.get(k)
    assert kv is not None and (kv.create_revision, kv.mod_revision, kv.version) == (r1, r2, 2)
    assert c.delete(k) is True
    assert c.delete(k) is False
    assert c.get(k) is None
    r3 = c.put(k, b"")  # created again: a new create_revision, version 1, an empty value
    kv = c.get(k)
    assert kv is not None and (kv.value, kv.create_revision, kv.version) == (b"", r3, 1)
    assert r3 > r2 + 1  # the delete took a revision of its own


def test_prefix_listing_is_in_key_order_and_bounded(env: Env) -> None:
    c, p = env.coord, env.prefix
    for name in ["b", "a/x", "a", "c\u00e9"]:
        c.put(p + name, name.encode())
    last = c.put(p[:-1] + "0", b"outside")  # the same prefix without its '/': not under it
    snap = c.snapshot(p)
    assert [kv.key[len(p) :] for kv in snap.kvs] == ["a", "a/x", "b", "c\u00e9"]
    assert snap.revision == last  # the store's revision, not the prefix's
    assert [kv.key for kv in c.get_prefix(p + "a")] == [p + "a", p + "a/x"]
    assert c.get_prefix(p + "zz") == []


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"


# -- transactions ---------------------------------------------------------------------------


def test_txn_create_only_if_absent(env: Env) -> None:
    c, k = env.coord, env.prefix + "k"
    first = c.txn([Compare.create(k, "==", 0)], [Put(k, b"a")], [Get(k)])
    assert first.succeeded and first.gets == ()
    second = c.txn([Compare.create(k, "==", 0)], [Put(k, b"b")], [Get(k)])
    assert not second.succeeded
    assert second.revision == first.revision  # nothing was written
    (held,) = second.gets
    assert held is not None and held.value == b"a"


def test_txn_compares_as_etcd_does(env: Env) -> None:
    c, k, missing = env.coord, env.prefix + "k", env.prefix + "missing"
    rev = c.put(k, b"m")
    c.put(k, b"m")  # version 2
    holds = {
        "value ==": Compare.value(k, "==", b"m"),
        "value !=": Compare.value(k, "!=", b"x"),
        "value <": Compare.value(k, "<", b"n"),
        "value >": Compare.value(k, ">", b"l"),
        "create ==": Compare.create(k, "==", rev),
        "mod >": Compare.mod(k, ">", rev),
        "version ==": Compare.version(k, "==", 2),
        "lease ==": Compare.lease(k, "==", 0),
        "missing create == 0": Compare.create(missing, "==", 0),
        "missing mod == 0": Compare.mod(missing, "==", 0),
        "missing version < 1": Compare.version(missing, "<", 1),
    }
    fails = {
        "value == other": Compare.value(k, "==", b"x"),
        "mod == old": Compare.mod(k, "==", rev),
        "create > now": Compare.create(k, ">", rev),
        # A missing key's value compares false whatever the operator (etcd: "no way to
        # represent a missing value").
        "missing value ==": Compare.value(missing, "==", b""),
        "missing value !=": Compare.value(missing, "!=", b"x"),
    }
    for name, cmp in holds.items():
        assert c.txn([cmp], [], []).succeeded, name
    for name, cmp in fails.items():
        assert not c.txn([cmp], [], []).succeeded, name
    assert not c.txn([*holds.values(), fails["mod == old"]], [], []).succeeded
    assert c.txn([], [], []).succeeded  # no condition: success


def test_txn_writes_share_one_revision(env: Env) -> None:
    c, p = env.coord, env.prefix
    c.put(p + "gone", b"x")
    before = c.snapshot(p).revision
    r = c.txn([], [Put(p + "a", b"1"), Put(p + "b", b"2"), Delete(p + "gone"), Get(p + "a")])
    assert r.succeeded and r.revision == before + 1 and r.deleted == 1
    a, b = c.get(p + "a"), c.get(p + "b")
    assert a is not None and b is not None and a.mod_revision == b.mod_revision == r.revision
    (got,) = r.gets
    assert got is not None and got.value == b"1"  # a Get after a Put sees it
    # A delete of nothing and a read change nothing: no new revision.
    r2 = c.txn([], [Delete(p + "never"), Get(p + "never")])
    assert r2.revision == r.revision and r2.gets == (None,) and r2.deleted == 0


def test_txn_refuses_a_key_changed_twice(env: Env) -> None:
    c, k = env.coord, env.prefix + "k"
    with pytest.raises(ProtocolError, match="twice"):
        c.txn([], [Put(k, b"1"), Put(k, b"2")])
    with pytest.raises(ProtocolError, match="twice"):
        c.txn([], [], [Put(k, b"1"), Delete(k)])
    assert c.get(k) is None


def test_bad_operations_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        Put("", b"x")
    with pytest.raises(UsageError):
        Put("/k", "text")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Compare.value("/k", "==", 3)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Compare.mod("/k", "==", b"3")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Compare("/k", "mod", "<=", 3)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        FakeCoord(Clock()).txn(["x"], [])  # type: ignore[list-item]


# -- leases ---------------------------------------------------------------------------------


def test_lease_grant_keepalive_revoke(env: Env) -> None:
    c, k = env.coord, env.prefix + "k"
    lease = c.grant_lease(1)
    assert lease.ttl == 2  # etcd raises a TTL below its minimum (2 s with default timing)
    c.put(k, b"v", lease)
    kv = c.get(k)
    assert kv is not None and kv.lease == lease.id
    assert c.keepalive(lease) == 2.0
    remaining = c.lease_remaining(lease.id)
    assert remaining is not None and 0 < remaining <= 2
    w = c.watch(env.prefix)
    assert c.revoke(lease) is True
    event = env.next_event(w)
    assert (event.kind, event.key, event.value) == ("delete", k, b"")
    assert c.get(k) is None
    assert c.revoke(lease) is False
    assert c.lease_remaining(lease.id) is None
    with pytest.raises(NotFound, match="is gone"):
        c.keepalive(lease)
    with pytest.raises(NotFound):
        c.put(k, b"v", lease)
    with pytest.raises(NotFound):
        c.txn([], [Put(k, b"v", lease.id)])
    assert c.get(k) is None


def test_an_unrenewed_lease_expires_and_deletes_its_keys(env: Env) -> None:
    c, p = env.coord, env.prefix
    lease = c.grant_lease(2)
    kept = c.grant_lease(30)
    c.put(p + "a", b"1", lease)
    c.put(p + "b", b"2", lease)
    c.put(p + "kept", b"3", kept)
    c.put(p + "moved", b"4", lease)
    c.put(p + "moved", b"5")  # a put without a lease detaches the key from its lease
    with c.watch(p) as w:
        env.let_expire(lease)
        c.keepalive(kept)
        gone = sorted([env.next_event(w), env.next_event(w)], key=lambda e: e.key)
        assert [(e.kind, e.key) for e in gone] == [("delete", p + "a"), ("delete", p + "b")]
        assert gone[0].revision == gone[1].revision  # one revocation, one revision
        assert w.get(env.quiet) is None
    assert [kv.key for kv in c.get_prefix(p)] == [p + "kept", p + "moved"]
    with pytest.raises(NotFound):
        c.keepalive(lease)
    c.revoke(kept)


def test_fake_expiry_is_exact_on_its_clock() -> None:
    clock = Clock()
    c = FakeCoord(clock)
    lease = c.grant_lease(3)
    c.put("/k", b"v", lease)
    clock.advance(2.9)
    assert c.keepalive(lease) == 3.0  # renewed at 2.9: now due at 5.9
    clock.advance(2.9)
    assert c.get("/k") is not None
    assert c.lease_remaining(lease.id) == pytest.approx(0.1)
    clock.advance(0.1)
    assert c.expire() == [lease.id]
    assert c.get("/k") is None
    with pytest.raises(UsageError):
        c.grant_lease(0)


# -- watches --------------------------------------------------------------------------------


def test_watch_reports_changes_in_order_from_now(env: Env) -> None:
    c, p = env.coord, env.prefix
    c.put(p + "before", b"0")
    with c.watch(p) as w:
        r1 = c.put(p + "a", b"1")
        c.put(env.prefix[:-1] + "-outside", b"x")
        r2 = c.put(p + "a", b"2")
        r3 = c.txn([], [Delete(p + "a"), Put(p + "b", b"3")]).revision
        events = [env.next_event(w) for _ in range(4)]
        assert [(e.kind, e.key[len(p) :], e.value, e.revision) for e in events] == [
            ("put", "a", b"1", r1),
            ("put", "a", b"2", r2),
            ("delete", "a", b"", r3),
            ("put", "b", b"3", r3),
        ]
        assert (events[1].create_revision, events[1].version) == (r1, 2)
        assert w.get(env.quiet) is None
    with pytest.raises(Closed):
        w.get(0)


def test_watch_from_a_revision_replays_history(env: Env) -> None:
    c, p = env.coord, env.prefix
    r1 = c.put(p + "a", b"1")
    c.delete(p + "a")
    r3 = c.put(p + "b", b"2")
    with c.watch(p, start_revision=r1) as w:
        got = list(w.events(env.quiet if env.kind == "fake" else 1.0))
    assert [(e.kind, e.key[len(p) :]) for e in got] == [("put", "a"), ("delete", "a"), ("put", "b")]
    # The snapshot-then-watch pattern misses nothing in between.
    snap = c.snapshot(p)
    assert snap.revision >= r3
    c.put(p + "c", b"3")
    with c.watch(p, start_revision=snap.revision + 1) as w:
        event = env.next_event(w)
        assert event.key == p + "c"


def test_two_watches_are_independent(env: Env) -> None:
    c, p = env.coord, env.prefix
    w1 = c.watch(p + "x/")
    w2 = c.watch(p)
    c.put(p + "x/1", b"1")
    c.put(p + "y", b"2")
    assert env.next_event(w1).key == p + "x/1"
    assert [env.next_event(w2).key, env.next_event(w2).key] == [p + "x/1", p + "y"]
    w1.cancel()
    w1.cancel()  # twice is fine
    c.put(p + "x/2", b"3")
    assert env.next_event(w2).key == p + "x/2"
    w2.cancel()


# -- the leader lock and the epoch ----------------------------------------------------------


def test_leader_acquire_release_and_epochs(env: Env) -> None:
    c, keys = env.coord, env.keys
    la, lb = c.grant_lease(30), c.grant_lease(30)
    assert read_leader(c, keys, "db") is None and read_epoch(c, keys, "db") == 0
    assert acquire_leader(c, keys, "db", "a", la) == 1
    leader = read_leader(c, keys, "db")
    assert leader is not None and (leader.holder, leader.epoch, leader.lease) == ("a", 1, la.id)
    assert acquire_leader(c, keys, "db", "b", lb) is None  # held
    assert acquire_leader(c, keys, "db", "a", la) == 1  # a retry by the holder: idempotent
    assert acquire_leader(c, keys, "db", "a", lb) is None  # the same name, another lease
    assert release_leader(c, keys, "db", "b") is False  # not b's
    assert read_epoch(c, keys, "db") == 1
    assert release_leader(c, keys, "db", "a") is True
    assert release_leader(c, keys, "db", "a") is False
    assert read_leader(c, keys, "db") is None
    assert read_epoch(c, keys, "db") == 1  # the epoch stays when the leader goes
    assert acquire_leader(c, keys, "db", "b", lb) == 2
    assert acquire_leader(c, keys, "other", "b", lb) == 1  # epochs are per resource
    # A lease that ends frees the leader key; the next epoch is higher still.
    c.revoke(lb)
    assert read_leader(c, keys, "db") is None
    assert acquire_leader(c, keys, "db", "a", la, floor=7) == 8  # above the nodes' epoch 7
    assert release_leader(c, keys, "db", "a")
    assert acquire_leader(c, keys, "db", "a", la, floor=3) == 9  # a floor never lowers it
    c.revoke(la)


def test_acquire_retries_when_the_epoch_moved_under_it(env: Env) -> None:
    """Between our read of the epoch and our transaction, another contender takes the key
    and drops it again: our transaction fails with the key absent, and we try again."""
    c, keys = env.coord, env.keys
    la, lb = c.grant_lease(30), c.grant_lease(30)

    class Interfering:
        def __init__(self) -> None:
            self.done = False

        def __getattr__(self, name: str) -> Any:
            return getattr(c, name)

        def txn(self, *args: Any, **kwargs: Any) -> Any:
            if not self.done:
                self.done = True
                assert acquire_leader(c, keys, "db", "b", lb) == 1
                assert release_leader(c, keys, "db", "b")
            return c.txn(*args, **kwargs)

    assert acquire_leader(Interfering(), keys, "db", "a", la) == 2  # type: ignore[arg-type]
    c.revoke(la)
    c.revoke(lb)


def test_leader_key_and_epoch_key_layout(env: Env) -> None:
    c, keys = env.coord, env.keys
    lease = c.grant_lease(30)
    assert acquire_leader(c, keys, "db", "a", lease) == 1
    leader_kv = c.get(f"/pairvol/{keys.cluster}/leader/db")
    epoch_kv = c.get(f"/pairvol/{keys.cluster}/epoch/db")
    assert leader_kv is not None and epoch_kv is not None
    assert leader_kv.value == b'{"epoch": 1, "holder": "a"}' and leader_kv.lease == lease.id
    assert epoch_kv.value == b"1" and epoch_kv.lease == 0
    assert leader_kv.mod_revision == epoch_kv.mod_revision  # one transaction
    c.revoke(lease)


def test_a_corrupt_leader_or_epoch_key_is_a_protocol_error(env: Env) -> None:
    c, keys = env.coord, env.keys
    c.put(keys.epoch("db"), b"seven")
    lease = c.grant_lease(30)
    with pytest.raises(ProtocolError, match="not an epoch"):
        acquire_leader(c, keys, "db", "a", lease)
    c.put(keys.leader("db"), b"{}")
    with pytest.raises(ProtocolError, match="not a leader record"):
        read_leader(c, keys, "db")
    c.revoke(lease)


def test_keys_refuse_names_that_are_not_one_segment() -> None:
    keys = Keys("c1")
    assert keys.lock("g1/p1") == "/pairvol/c1/lock/g1/p1"
    for bad in ["a/b", "", "..", "a b"]:
        with pytest.raises(UsageError):
            keys.leader(bad)
    for bad in ["a/b/c", "g1/", "v@1"]:
        with pytest.raises(UsageError):
            keys.lock(bad)
    with pytest.raises(UsageError):
        Keys("a/b")


# -- the S-VOL lock -------------------------------------------------------------------------


def test_svol_lock(env: Env) -> None:
    c, keys = env.coord, env.keys
    la, lb = c.grant_lease(30), c.grant_lease(30)
    assert lock_holder(c, keys, "g1/p1") is None
    assert acquire_lock(c, keys, "g1/p1", "a", la) is True
    assert acquire_lock(c, keys, "g1/p1", "a", la) is True  # already ours
    assert acquire_lock(c, keys, "g1/p1", "b", lb) is False
    assert acquire_lock(c, keys, "g1/p1", "a", lb) is False  # ours by name, not by lease
    assert lock_holder(c, keys, "g1/p1") == "a"
    assert release_lock(c, keys, "g1/p1", "b") is False
    assert release_lock(c, keys, "g1/p1", "a") is True
    assert acquire_lock(c, keys, "g1/p1", "b", lb) is True
    c.revoke(lb)  # a holder that dies lets go
    assert lock_holder(c, keys, "g1/p1") is None
    assert acquire_lock(c, keys, "g1/p1", "a", la) is True
    c.revoke(la)


# -- runtime resource records ---------------------------------------------------------------


def _resource(name: str, hosts: tuple[str, ...] = ("a", "b")) -> Resource:
    return new_resource(name, hosts=list(hosts), groups=[f"g-{name}"], start="true")


def test_resource_records(env: Env) -> None:
    c, keys = env.coord, env.keys
    assert list_resources(c, keys) == [] and get_resource(c, keys, "db") is None
    put_resource(c, keys, _resource("web"))
    put_resource(c, keys, _resource("db"))
    with pytest.raises(AlreadyExists, match="'db' already exists"):
        put_resource(c, keys, _resource("db", ("a",)))
    put_resource(c, keys, _resource("db", ("a",)), replace=True)
    assert get_resource(c, keys, "db") == _resource("db", ("a",))
    assert [r.name for r in list_resources(c, keys)] == ["db", "web"]
    with pytest.raises(UsageError, match="resource record web: hosts: host 'b' is not defined"):
        list_resources(c, keys, known_hosts=["a"])
    c.put(keys.resource("bad"), b"{not json")
    with pytest.raises(UsageError, match="resource record bad: not JSON"):
        get_resource(c, keys, "bad")
    assert delete_resource(c, keys, "bad") and delete_resource(c, keys, "db")
    assert not delete_resource(c, keys, "db")
    assert [r.name for r in list_resources(c, keys)] == ["web"]


# -- racing contenders ----------------------------------------------------------------------


def test_contenders_racing_on_real_etcd_never_share_an_epoch(etcd: EtcdCluster) -> None:
    """Threads, each with its own client and lease, grab and drop the leader key as fast as
    they can.  At most one believes it leads at any moment, and every won epoch is new and
    higher than the one before."""
    keys = Keys(f"race{uuid.uuid4().hex[:8]}")
    lock = threading.Lock()
    leading: list[str] = []
    won: list[int] = []
    errors: list[BaseException] = []
    rounds = 25

    def contender(name: str) -> None:
        try:
            with EtcdCoord(etcd.endpoints(), 5.0) as c:
                lease = c.grant_lease(30)
                for _ in range(rounds):
                    epoch = acquire_leader(c, keys, "db", name, lease)
                    if epoch is None:
                        continue
                    with lock:
                        leading.append(name)
                        assert len(leading) == 1, f"two leaders: {leading}"
                        assert not won or epoch > won[-1], (won[-3:], epoch)
                        won.append(epoch)
                    with lock:
                        leading.remove(name)
                    assert release_leader(c, keys, "db", name)
                c.revoke(lease)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=contender, args=(n,)) for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    assert won and len(set(won)) == len(won)
    with EtcdCoord(etcd.endpoints(), 5.0) as c:
        assert read_epoch(c, keys, "db") == won[-1]


class Turns:
    """Runs contender threads one coordination call at a time, in an order chosen by
    ``choose`` (hypothesis), so every interleaving of their calls can be tried."""

    def __init__(self, coord: Coord, choose: Callable[[list[int]], int]) -> None:
        self.coord = coord
        self.choose = choose
        self.cond = threading.Condition()
        self.waiting: set[int] = set()
        self.turn: int | None = None
        self.finished: set[int] = set()

    def view(self, i: int) -> Coord:
        turns = self

        class View:
            def __getattr__(self, name: str) -> Any:
                method = getattr(turns.coord, name)

                def call(*args: Any, **kwargs: Any) -> Any:
                    with turns.cond:
                        turns.waiting.add(i)
                        turns.cond.notify_all()
                        assert turns.cond.wait_for(lambda: turns.turn == i, timeout=10)
                        turns.waiting.discard(i)
                    try:
                        return method(*args, **kwargs)
                    finally:
                        with turns.cond:
                            turns.turn = None
                            turns.cond.notify_all()

                return call

        return View()  # type: ignore[return-value]

    def run(self, bodies: list[Callable[[Coord], None]], check: Callable[[], None]) -> None:
        errors: list[BaseException] = []

        def body(i: int) -> None:
            try:
                bodies[i](self.view(i))
            except BaseException as e:
                errors.append(e)
            finally:
                with self.cond:
                    self.finished.add(i)
                    self.cond.notify_all()

        threads = [threading.Thread(target=body, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        n = len(bodies)
        while True:
            with self.cond:
                settled = self.cond.wait_for(
                    lambda: self.turn is None and len(self.waiting | self.finished) == n,
                    timeout=10,
                )
                assert settled, "a contender neither called nor finished"
                check()
                if len(self.finished) == n:
                    break
                self.turn = self.choose(sorted(self.waiting))
                self.cond.notify_all()
        for t in threads:
            t.join(timeout=10)
        if errors:
            raise errors[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_interleaving_of_contenders_on_the_fake(data: st.DataObject) -> None:
    """Three contenders each try twice to take the key, hold it, and drop it; their calls
    interleave in every order hypothesis tries.  After every single call: at most one
    contender believes it leads, and it holds the key at the epoch it was given."""
    clock = Clock()
    fake = FakeCoord(clock)
    keys = Keys("c1")
    believers: dict[str, int] = {}
    won: list[int] = []
    guard = threading.Lock()

    def contender(name: str) -> Callable[[Coord], None]:
        def body(c: Coord) -> None:
            lease = c.grant_lease(30)
            for _ in range(2):
                epoch = acquire_leader(c, keys, "db", name, lease)
                if epoch is None:
                    continue
                with guard:
                    believers[name] = epoch
                    won.append(epoch)
                released = release_leader(c, keys, "db", name)
                with guard:
                    del believers[name]
                assert released

        return body

    def check() -> None:
        with guard:
            assert len(believers) <= 1, believers
            held = fake.get(keys.leader("db"))
            for name, epoch in believers.items():
                assert held is not None
                leader = decode_leader(held)
                assert (leader.holder, leader.epoch) == (name, epoch)

    def choose(waiting: list[int]) -> int:
        return data.draw(st.sampled_from(waiting))

    Turns(fake, choose).run([contender(n) for n in ("a", "b", "c")], check)
    assert won and len(set(won)) == len(won) and won == sorted(won)
    assert read_epoch(fake, keys, "db") == won[-1]


class LeaderMachine(RuleBasedStateMachine):
    """acquire/release/keepalive/expiry of the leader lock on the fake, against a model: who
    holds the key, the epoch, and each contender's lease deadline."""

    NAMES = ("a", "b", "c")

    @initialize()
    def start(self) -> None:
        self.clock = Clock()
        self.coord = FakeCoord(self.clock)
        self.keys = Keys("c1")
        self.leases: dict[str, Lease | None] = dict.fromkeys(self.NAMES)
        self.deadline: dict[str, float] = {}
        self.holder: str | None = None
        self.epoch = 0

    def _expire_model(self) -> None:
        for name, lease in self.leases.items():
            if lease is not None and self.clock.now >= self.deadline[name]:
                self.leases[name] = None
                if self.holder == name:
                    self.holder = None

    @rule(name=st.sampled_from(NAMES), ttl=st.integers(1, 4))
    def grant(self, name: str, ttl: int) -> None:
        self._expire_model()
        if self.leases[name] is None:
            lease = self.coord.grant_lease(ttl)
            assert lease.ttl == max(ttl, 2)
            self.leases[name] = lease
            self.deadline[name] = self.clock.now + lease.ttl

    @rule(name=st.sampled_from(NAMES), floor=st.sampled_from([0, 0, 0, 5, 20]))
    def acquire(self, name: str, floor: int) -> None:
        self._expire_model()
        lease = self.leases[name]
        if lease is None:
            return
        got = acquire_leader(self.coord, self.keys, "r", name, lease, floor=floor)
        if self.holder is None:
            self.epoch = max(self.epoch, floor) + 1
            self.holder = name
            assert got == self.epoch
        elif self.holder == name:
            assert got == self.epoch
        else:
            assert got is None

    @rule(name=st.sampled_from(NAMES))
    def release(self, name: str) -> None:
        self._expire_model()
        released = release_leader(self.coord, self.keys, "r", name)
        assert released == (self.holder == name)
        if released:
            self.holder = None

    @rule(name=st.sampled_from(NAMES))
    def keepalive(self, name: str) -> None:
        self._expire_model()
        lease = self.leases[name]
        if lease is not None:
            self.coord.keepalive(lease)
            self.deadline[name] = self.clock.now + lease.ttl

    @rule(name=st.sampled_from(NAMES))
    def revoke(self, name: str) -> None:
        self._expire_model()
        lease = self.leases[name]
        if lease is not None:
            assert self.coord.revoke(lease)
            self.leases[name] = None
            if self.holder == name:
                self.holder = None

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 3.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: hasattr(self, "coord"))
    @invariant()
    def agrees_with_the_model(self) -> None:
        self._expire_model()
        leader = read_leader(self.coord, self.keys, "r")
        assert (leader.holder if leader else None) == self.holder
        if leader is not None:
            assert leader.epoch == self.epoch
            lease = self.leases[leader.holder]
            assert lease is not None and leader.lease == lease.id
        assert read_epoch(self.coord, self.keys, "r") == self.epoch


TestLeaderMachine = LeaderMachine.TestCase
TestLeaderMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


# -- etcd's failures ------------------------------------------------------------------------


def test_unreachable_etcd_is_one_line_naming_it() -> None:
    (port,) = free_ports(1)
    with EtcdCoord([f"http://127.0.0.1:{port}"], 2.0) as c, pytest.raises(ConnectionFailed) as info:
        c.get("/k")
    assert str(info.value) == f"etcd at http://127.0.0.1:{port}: unreachable (connection refused)"
    assert info.value.exit_code == 20
    p1, p2 = free_ports(2)
    with EtcdCoord([f"http://127.0.0.1:{p1}", f"http://127.0.0.1:{p2}"], 2.0) as c:
        with pytest.raises(ConnectionFailed) as info:
            c.grant_lease(2)
        with pytest.raises(ConnectionFailed):
            c.watch("/k")
    assert str(info.value) == (
        f"etcd at http://127.0.0.1:{p1}, http://127.0.0.1:{p2}: unreachable (connection refused)"
    )


def test_the_next_endpoint_answers_when_the_first_is_down(etcd: EtcdCluster) -> None:
    (dead,) = free_ports(1)
    with EtcdCoord([f"http://127.0.0.1:{dead}", *etcd.endpoints()], 2.0) as c:
        key = f"/test/{uuid.uuid4().hex}"
        c.put(key, b"v")
        kv = c.get(key)
        assert kv is not None and kv.value == b"v"
        with c.watch(key) as w:
            c.delete(key)
            event = w.get(10)
            assert event is not None and event.kind == "delete"


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


def test_a_request_past_its_deadline_is_a_timeout(silent_server: str) -> None:
    with EtcdCoord([silent_server], 0.3) as c:
        with pytest.raises(Timeout, match=rf"^etcd at {silent_server}: no answer within 0.3s"):
            c.keepalive(Lease(1, 2))
        with pytest.raises(Timeout):
            c.txn([], [Put("/k", b"v")])
        with pytest.raises(Timeout):
            c.watch("/k")


def test_bad_endpoints_and_closed_clients() -> None:
    with pytest.raises(UsageError, match="etcd endpoint"):
        EtcdCoord(["localhost:2379"], 1.0)
    with pytest.raises(UsageError):
        EtcdCoord([], 1.0)
    with pytest.raises(UsageError):
        EtcdCoord(["http://127.0.0.1:2379"], 0)
    c = EtcdCoord(["http://127.0.0.1:2379"], 1.0)
    c.close()
    with pytest.raises(Closed):
        c.get("/k")
    fake = FakeCoord(Clock())
    w = fake.watch("/")
    fake.close()
    with pytest.raises(Closed):
        w.get(0)
    with pytest.raises(Closed):
        fake.get("/k")


def test_a_watch_breaks_loudly_when_etcd_goes(tmp_path: Path) -> None:
    require_programs("etcd")
    with EtcdCluster(str(tmp_path)) as cluster, EtcdCoord(cluster.endpoints(), 2.0) as c:
        w = c.watch("/k")
        cluster.kill_member(0)
        with pytest.raises(ConnectionFailed, match="watch /k"):
            w.get(10)
        with pytest.raises(ConnectionFailed):  # and stays broken
            w.get(0)
        w.cancel()


def test_an_expired_lease_is_lease_lost_not_just_not_found() -> None:
    now = [100.0]
    coord = FakeCoord(lambda: now[0])
    lease = coord.grant_lease(2)
    now[0] += 5
    with pytest.raises(LeaseLost, match="gone"):
        coord.keepalive(lease)
