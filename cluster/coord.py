"""Coordination in etcd: leases, compare-and-swap transactions, watches, and the leader lock.

Theory of operation.  :class:`Coord` is the small interface the cluster agent needs from etcd:
a lease with keep-alive, a key-value store with revisions, atomic transactions that compare
before they act, and prefix watches.  Two classes implement it:

* :class:`EtcdCoord`, a thin adapter over etcd's HTTP/JSON gateway (``/v3/...``, through the
  ``etcd3gw`` client);
* :class:`FakeCoord`, an in-memory store with etcd's semantics and a clock the caller gives
  it, for pure-logic tests.  The same behavioural tests run against both
  (tests/test_coord.py), which is what makes the fake trustworthy.

etcd's semantics, as both keep them: one revision counter for the whole store, bumped once by
each change (a transaction's writes share one revision); ``create_revision`` 0 means "the key
does not exist" (a compare on it is how a key is created only if absent); a comparison of a
missing key's *value* is always false; a lease that is not renewed within its TTL expires and
every key attached to it is deleted, with one delete event per key; a watch delivers, in
revision order, every change under its prefix from its start revision on.

On top of :class:`Coord`, plain functions do the cluster's coordination and no I/O of their
own, so they run against either implementation: the key layout (:class:`Keys`, the one place
key names are made), the resource leader lock with its epoch (:func:`acquire_leader` and
friends, after Patroni's etcd3 DCS), the S-VOL lock (:func:`acquire_lock`), and the runtime
resource records (:func:`put_resource`; the codec is :mod:`cluster.config`).
docs/protocol.md, "Cluster coordination in etcd", is the contract.

Errors: an etcd that cannot be reached is :class:`~replicator.errors.ConnectionFailed` (one
line naming the endpoints); a request past its deadline is
:class:`~replicator.errors.Timeout`; a lease that is gone is
:class:`~replicator.errors.NotFound`; anything etcd refuses is
:class:`~replicator.errors.ProtocolError`; a watch used after :meth:`Watch.cancel` is
:class:`~replicator.errors.Closed`.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import queue
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from cluster.config import (
    Resource,
    check_cluster_name,
    parse_endpoint,
    resource_from_json,
    resource_to_json,
)
from replicator.errors import (
    AlreadyExists,
    Closed,
    ConnectionFailed,
    IllegalState,
    LeaseLost,
    NotFound,
    PairvolError,
    ProtocolError,
    Timeout,
    UsageError,
)
from replicator.header import check_name

if TYPE_CHECKING:
    import requests

#: etcd's shortest lease with its default election timeout (1 s): 1.5 x 1 s, rounded up.
ETCD_MIN_TTL = 2

# -- the data -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease: its id and the TTL etcd granted (which may exceed the one asked)."""

    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int  # 0: none


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The keys under a prefix, and the store's revision they were read at (watch from
    ``revision + 1`` to miss nothing after it)."""

    kvs: tuple[KeyValue, ...]
    revision: int


CompareTarget = Literal["value", "create", "mod", "version", "lease"]
CompareOp = Literal["==", "!=", "<", ">"]
_TARGETS: dict[str, tuple[str, str]] = {  # ours → (etcd's target, etcd's field)
    "value": ("VALUE", "value"),
    "create": ("CREATE", "create_revision"),
    "mod": ("MOD", "mod_revision"),
    "version": ("VERSION", "version"),
    "lease": ("LEASE", "lease"),
}
_OPS = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction: ``key``'s ``target`` ``op`` ``operand``.

    Build them with the class methods: ``Compare.create(key, "==", 0)`` (the key is absent),
    ``Compare.value(key, "==", b"a")``, ``Compare.mod(key, "==", rev)``, ``Compare.version``,
    ``Compare.lease``.  As in etcd, a missing key has create, mod and version 0 and lease 0,
    and a comparison of its value is false whatever the operator."""

    key: str
    target: CompareTarget
    op: CompareOp
    operand: bytes | int

    def __post_init__(self) -> None:
        _check_key(self.key)
        if self.target not in _TARGETS:
            raise UsageError(f"compare target {self.target!r} is not one of {sorted(_TARGETS)}")
        if self.op not in _OPS:
            raise UsageError(f"compare operator {self.op!r} is not one of {sorted(_OPS)}")
        if self.target == "value":
            if not isinstance(self.operand, bytes):
                raise UsageError(f"a value compare needs bytes, not {self.operand!r}")
        elif isinstance(self.operand, bool) or not isinstance(self.operand, int):
            raise UsageError(f"a {self.target} compare needs an integer, not {self.operand!r}")

    @classmethod
    def value(cls, key: str, op: CompareOp, value: bytes) -> Compare:
        return cls(key, "value", op, value)

    @classmethod
    def create(cls, key: str, op: CompareOp, revision: int) -> Compare:
        return cls(key, "create", op, revision)

    @classmethod
    def mod(cls, key: str, op: CompareOp, revision: int) -> Compare:
        return cls(key, "mod", op, revision)

    @classmethod
    def version(cls, key: str, op: CompareOp, version: int) -> Compare:
        return cls(key, "version", op, version)

    @classmethod
    def lease(cls, key: str, op: CompareOp, lease_id: int) -> Compare:
        return cls(key, "lease", op, lease_id)

    def holds(self, kv: KeyValue | None) -> bool:
        """Whether the condition holds for ``kv`` (None: the key is absent), as etcd decides."""
        if self.target == "value":
            if kv is None:
                return False
            actual: bytes | int = kv.value
        elif kv is None:
            actual = 0
        else:
            actual = {
                "create": kv.create_revision,
                "mod": kv.mod_revision,
                "version": kv.version,
                "lease": kv.lease,
            }[self.target]
        a: Any = actual
        b: Any = self.operand
        if self.op == "==":
            return bool(a == b)
        if self.op == "!=":
            return bool(a != b)
        if self.op == "<":
            return bool(a < b)
        return bool(a > b)


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0  # a lease id; 0 detaches the key from any lease, as etcd's put does

    def __post_init__(self) -> None:
        _check_key(self.key)
        if not isinstance(self.value, bytes):
            raise UsageError(f"the value of {self.key} must be bytes, not {self.value!r}")


@dataclass(frozen=True, slots=True)
class Delete:
    key: str

    def __post_init__(self) -> None:
        _check_key(self.key)


@dataclass(frozen=True, slots=True)
class Get:
    key: str

    def __post_init__(self) -> None:
        _check_key(self.key)


Op = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class TxnResult:
    """``succeeded``: whether every compare held (the success ops ran, else the failure ops);
    ``revision``: the store's revision after it; ``gets``: one entry per :class:`Get` of the
    branch that ran, in order (None: absent); ``deleted``: keys its deletes removed."""

    succeeded: bool
    revision: int
    gets: tuple[KeyValue | None, ...] = ()
    deleted: int = 0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change: ``kind`` put or delete, at ``revision`` (the change's mod_revision).  A delete
    carries an empty value and create_revision 0."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int
    create_revision: int = 0
    version: int = 0
    lease: int = 0


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise UsageError(f"an etcd key must be a non-empty string, not {key!r}")


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with ``prefix``"."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\0"  # the whole key space
    p[-1] += 1
    return bytes(p)


# -- watches --------------------------------------------------------------------------------


class Watch:
    """The events of one watch, in revision order; its source fills the queue.

    ``get(timeout)`` returns the next event, or None when none came within ``timeout``
    seconds; a watch that broke raises its error (ConnectionFailed, IllegalState) on every
    later ``get``; after ``cancel()`` (ours) ``get`` raises Closed.  Nothing blocks longer
    than the timeout it is given."""

    def __init__(
        self,
        what: str,
        on_cancel: Callable[[], None] = lambda: None,
        poll: Callable[[], None] = lambda: None,
    ) -> None:
        self.what = what
        self._queue: queue.Queue[WatchEvent | PairvolError] = queue.Queue()
        self._on_cancel = on_cancel
        self._poll = poll
        self._error: PairvolError | None = None
        self._cancelled = False

    def push(self, item: WatchEvent | PairvolError) -> None:
        """For the source: an event, or the error that ended the watch."""
        self._queue.put(item)

    def get(self, timeout: float) -> WatchEvent | None:
        if self._cancelled:
            raise Closed(f"{self.what} was cancelled")
        if self._error is not None:
            raise self._error
        self._poll()
        try:
            item = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if isinstance(item, PairvolError):
            self._error = item
            raise item
        return item

    def events(self, timeout: float) -> Iterator[WatchEvent]:
        """Events as they come, until none came for ``timeout`` seconds."""
        while True:
            event = self.get(timeout)
            if event is None:
                return
            yield event

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._on_cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


# -- the interface --------------------------------------------------------------------------


class Coord(Protocol):
    """What the cluster agent needs from etcd.  Keys are strings, values bytes."""

    def grant_lease(self, ttl: int) -> Lease:
        """A new lease of at least ``ttl`` seconds (etcd raises a TTL under its minimum)."""
        ...

    def keepalive(self, lease: Lease) -> float:
        """Renew ``lease``; its TTL from now, in seconds.  LeaseLost if it expired or was
        revoked (it can never be renewed again)."""
        ...

    def revoke(self, lease: Lease) -> bool:
        """End ``lease`` now, deleting its keys; False if it was already gone."""
        ...

    def lease_remaining(self, lease_id: int) -> float | None:
        """Seconds left on a lease (etcd says whole seconds), None if it is gone."""
        ...

    def get(self, key: str) -> KeyValue | None: ...

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        """Every key starting with ``prefix``, in key order."""
        ...

    def snapshot(self, prefix: str) -> Snapshot: ...

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        """Store ``value``; the store's revision after it."""
        ...

    def delete(self, key: str) -> bool:
        """Delete ``key``; False if it was not there."""
        ...

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """If every compare holds, run ``success``, else ``failure``, atomically.  A branch
        may change a key once at most (etcd refuses more: ProtocolError)."""
        ...

    def watch(self, prefix: str, start_revision: int | None = None) -> Watch:
        """Events under ``prefix`` from ``start_revision`` (default: from now on).  When it
        returns, every later change is reported."""
        ...

    def close(self) -> None: ...


def _check_branch(ops: Sequence[Op]) -> None:
    """etcd refuses a branch that changes one key twice ("duplicate key given in txn")."""
    seen: set[str] = set()
    for op in ops:
        if not isinstance(op, Put | Delete | Get):
            raise UsageError(f"{op!r} is not a transaction operation (Put, Delete, Get)")
        if isinstance(op, Get):
            continue
        if op.key in seen:
            raise ProtocolError(
                f"etcd refused the transaction: it changes {op.key} twice", remote=False
            )
        seen.add(op.key)


# -- the fake -------------------------------------------------------------------------------


@dataclass(slots=True)
class _FakeLease:
    ttl: int
    deadline: float
    keys: set[str]


class FakeCoord:
    """In-memory :class:`Coord` with etcd's semantics, on the clock it is given.

    A lease expires when ``clock()`` reaches its deadline (grant or last keep-alive + TTL);
    expiry happens at the next call that looks (every method, and :meth:`Watch.get`), or at
    :meth:`expire`.  Safe to share between threads."""

    def __init__(self, clock: Callable[[], float], *, min_ttl: int = ETCD_MIN_TTL) -> None:
        self._clock = clock
        self._min_ttl = min_ttl
        self._lock = threading.RLock()
        self._revision = 1  # etcd's empty store is at revision 1
        self._kvs: dict[str, KeyValue] = {}
        self._leases: dict[int, _FakeLease] = {}
        self._lease_ids = itertools.count(0x5EED0001)
        self._history: list[WatchEvent] = []
        self._watches: list[tuple[str, Watch]] = []
        self._closed = False

    # leases

    def expire(self) -> list[int]:
        """Expire every lease whose deadline has passed; their ids."""
        with self._lock:
            now = self._clock()
            due = sorted(i for i, lease in self._leases.items() if now >= lease.deadline)
            for lease_id in due:
                self._end_lease(lease_id)
            return due

    def _poll(self) -> None:
        self.expire()

    def _end_lease(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id)
        keys = sorted(lease.keys)
        if keys:
            revision = self._revision + 1
            for key in keys:
                self._remove(key, revision)
            self._revision = revision

    def _checked(self) -> None:
        if self._closed:
            raise Closed("the coordination store was closed")
        self.expire()

    def grant_lease(self, ttl: int) -> Lease:
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
            raise UsageError(f"a lease TTL is a whole number of seconds above 0, not {ttl!r}")
        with self._lock:
            self._checked()
            ttl = max(ttl, self._min_ttl)
            lease_id = next(self._lease_ids)
            self._leases[lease_id] = _FakeLease(ttl, self._clock() + ttl, set())
            return Lease(lease_id, ttl)

    def keepalive(self, lease: Lease) -> float:
        with self._lock:
            self._checked()
            found = self._leases.get(lease.id)
            if found is None:
                raise _lease_gone(lease.id)
            found.deadline = self._clock() + found.ttl
            return float(found.ttl)

    def revoke(self, lease: Lease) -> bool:
        with self._lock:
            self._checked()
            if lease.id not in self._leases:
                return False
            self._end_lease(lease.id)
            return True

    def lease_remaining(self, lease_id: int) -> float | None:
        with self._lock:
            self._checked()
            found = self._leases.get(lease_id)
            return None if found is None else max(0.0, found.deadline - self._clock())

    # keys

    def get(self, key: str) -> KeyValue | None:
        _check_key(key)
        with self._lock:
            self._checked()
            return self._kvs.get(key)

    def snapshot(self, prefix: str) -> Snapshot:
        _check_key(prefix)
        with self._lock:
            self._checked()
            kvs = sorted(
                (kv for k, kv in self._kvs.items() if k.startswith(prefix)),
                key=lambda kv: kv.key.encode(),
            )
            return Snapshot(tuple(kvs), self._revision)

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        return list(self.snapshot(prefix).kvs)

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        op = Put(key, value, 0 if lease is None else lease.id)
        with self._lock:
            self._checked()
            self._check_lease(op.lease)
            self._revision += 1
            self._store(op, self._revision)
            return self._revision

    def delete(self, key: str) -> bool:
        _check_key(key)
        with self._lock:
            self._checked()
            if key not in self._kvs:
                return False
            self._revision += 1
            self._remove(key, self._revision)
            return True

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        for c in compares:
            if not isinstance(c, Compare):
                raise UsageError(f"{c!r} is not a Compare")
        _check_branch(success)
        _check_branch(failure)
        with self._lock:
            self._checked()
            ok = all(c.holds(self._kvs.get(c.key)) for c in compares)
            ops = success if ok else failure
            for op in ops:
                if isinstance(op, Put):
                    self._check_lease(op.lease)
            revision = self._revision + 1
            changed = False
            gets: list[KeyValue | None] = []
            deleted = 0
            for op in ops:
                if isinstance(op, Get):
                    gets.append(self._kvs.get(op.key))
                elif isinstance(op, Put):
                    self._store(op, revision)
                    changed = True
                elif op.key in self._kvs:
                    self._remove(op.key, revision)
                    changed = True
                    deleted += 1
            if changed:
                self._revision = revision
            return TxnResult(ok, self._revision, tuple(gets), deleted)

    def _check_lease(self, lease_id: int) -> None:
        if lease_id and lease_id not in self._leases:
            raise _lease_gone(lease_id)

    def _store(self, op: Put, revision: int) -> None:
        old = self._kvs.get(op.key)
        if old is not None and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(op.key)
        kv = KeyValue(
            key=op.key,
            value=op.value,
            create_revision=revision if old is None else old.create_revision,
            mod_revision=revision,
            version=1 if old is None else old.version + 1,
            lease=op.lease,
        )
        self._kvs[op.key] = kv
        if op.lease:
            self._leases[op.lease].keys.add(op.key)
        self._emit(
            WatchEvent("put", op.key, op.value, revision, kv.create_revision, kv.version, kv.lease)
        )

    def _remove(self, key: str, revision: int) -> None:
        old = self._kvs.pop(key)
        if old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        self._emit(WatchEvent("delete", key, b"", revision))

    def _emit(self, event: WatchEvent) -> None:
        self._history.append(event)
        for prefix, w in self._watches:
            if event.key.startswith(prefix):
                w.push(event)

    # watches

    def watch(self, prefix: str, start_revision: int | None = None) -> Watch:
        _check_key(prefix)
        with self._lock:
            self._checked()
            w: Watch

            def cancel() -> None:
                with self._lock:
                    self._watches = [(p, x) for p, x in self._watches if x is not w]

            w = Watch(f"watch of {prefix}", on_cancel=cancel, poll=self._poll)
            if start_revision is not None:
                for event in self._history:
                    if event.revision >= start_revision and event.key.startswith(prefix):
                        w.push(event)
            self._watches.append((prefix, w))
            return w

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for _, w in self._watches:
                w.push(Closed("the coordination store was closed"))
            self._watches = []


def _lease_gone(lease_id: int) -> LeaseLost:
    return LeaseLost(f"etcd lease {lease_id:x} is gone (expired or revoked)")


# -- etcd -----------------------------------------------------------------------------------

_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def _reason(exc: BaseException | None) -> str:
    """A short lower-case reason from a requests/urllib3 error: ``connection refused``."""
    text = str(exc) if exc is not None else ""
    m = _ERRNO_RE.search(text)
    if m:
        return m.group(1).strip().lower()
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        return "timed out"
    if "name or service not known" in low or "nodename nor servname" in low:
        return "name or service not known"
    return "connection failed"


def _server_error(detail: str | None) -> tuple[int | None, str]:
    """etcd's ``{"error", "code"}`` body as (gRPC code, message)."""
    try:
        doc = json.loads(detail or "")
    except json.JSONDecodeError:
        lines = (detail or "").strip().splitlines()
        return None, lines[0][:200] if lines else "no detail"
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):  # the watch stream's form
            doc = err
            err = doc.get("message")
        code = doc.get("code", doc.get("grpc_code"))
        return (code if isinstance(code, int) else None), str(err or doc.get("message") or doc)
    return None, str(doc)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    return base64.b64decode(text) if isinstance(text, str) else b""


def _int(value: Any) -> int:
    return int(value) if value is not None else 0  # the gateway sends int64 as strings


def _kv(doc: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=_unb64(doc.get("key")).decode("utf-8", "surrogateescape"),
        value=_unb64(doc.get("value")),
        create_revision=_int(doc.get("create_revision")),
        mod_revision=_int(doc.get("mod_revision")),
        version=_int(doc.get("version")),
        lease=_int(doc.get("lease")),
    )


def _op_json(op: Op) -> dict[str, Any]:
    key = _b64(op.key.encode())
    if isinstance(op, Put):
        body: dict[str, Any] = {"key": key, "value": _b64(op.value)}
        if op.lease:
            body["lease"] = op.lease
        return {"request_put": body}
    if isinstance(op, Delete):
        return {"request_delete_range": {"key": key}}
    return {"request_range": {"key": key}}


def _compare_json(c: Compare) -> dict[str, Any]:
    target, fieldname = _TARGETS[c.target]
    operand = _b64(c.operand) if isinstance(c.operand, bytes) else c.operand
    return {
        "key": _b64(c.key.encode()),
        "result": _OPS[c.op],
        "target": target,
        fieldname: operand,
    }


class EtcdCoord:
    """:class:`Coord` over etcd's HTTP/JSON gateway (etcd 3.4's ``/v3/``), via etcd3gw.

    ``endpoints`` are tried in turn: the one that answered last goes first, and a refused or
    unanswered connection moves on to the next.  A whole call takes at most about
    ``timeout`` seconds: each endpoint gets ``timeout / len(endpoints)`` to connect, and the
    request the rest of the time.  A request that was sent and got no answer in time is a
    Timeout and is not sent again (it may have been applied: the caller decides).

    Reads are linearizable (etcd's default: they go through the leader's quorum) unless
    ``serializable`` is set: then ``get`` and ``snapshot`` answer from whatever the member
    reached has applied (``etcdctl --consistency=s``), also while no leader is elected, and may
    be a moment behind.  Only a reader that displays state may ask for that (``cluster
    status``); a decision is never taken on a serializable read."""

    def __init__(
        self, endpoints: Sequence[str], timeout: float, *, serializable: bool = False
    ) -> None:
        import requests
        from etcd3gw.client import Etcd3Client

        if isinstance(endpoints, str) or not endpoints:
            raise UsageError("etcd: give at least one endpoint (http://HOST:PORT)")
        if not timeout > 0:
            raise UsageError(f"etcd: the request timeout must be above 0, not {timeout!r}")
        self.endpoints = [parse_endpoint(e) for e in endpoints]
        self.timeout = float(timeout)
        self._requests = requests
        self._clients: list[Etcd3Client] = []
        for ep in self.endpoints:
            u = urllib.parse.urlsplit(ep)
            assert u.hostname is not None
            self._clients.append(
                Etcd3Client(
                    host=u.hostname,
                    port=u.port or 2379,
                    protocol=u.scheme,
                    timeout=self.timeout,
                    api_path="/v3/",
                )
            )
        self.serializable = serializable
        self._current = 0
        self._lock = threading.Lock()
        self._watches: list[Watch] = []
        self._closed = False

    def __enter__(self) -> EtcdCoord:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            watches, self._watches = self._watches, []
        for w in watches:
            w.cancel()
        for c in self._clients:
            c.session.close()

    def _where(self) -> str:
        return f"etcd at {', '.join(self.endpoints)}"

    def _order(self) -> list[int]:
        n = len(self._clients)
        return [(self._current + k) % n for k in range(n)]

    def _call(self, path: str, payload: dict[str, Any], what: str) -> dict[str, Any]:
        """POST ``payload`` to ``/v3/path`` on the first endpoint that answers."""
        from etcd3gw import exceptions as gw
        from etcd3gw.client import Etcd3Client

        if self._closed:
            raise Closed(f"{self._where()}: the client was closed")
        exc = self._requests.exceptions
        deadline = time.monotonic() + self.timeout
        connect = self.timeout / len(self._clients)
        failed: list[tuple[str, str]] = []
        for i in self._order():
            ep = self.endpoints[i]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            base = self._clients[i]
            # etcd3gw's client with this call's (connect, read) deadline, on the shared session
            timeouts: Any = (min(connect, remaining), remaining)
            client = Etcd3Client(
                host=base.host,
                port=base.port,
                protocol=base.protocol,
                timeout=timeouts,
                api_path="/v3/",
                session=base.session,
            )
            try:
                doc = client.post(client.get_url(path), json=payload)
            except gw.ConnectionTimeoutError as e:
                if isinstance(e.__context__, exc.ConnectTimeout):
                    failed.append((ep, "timed out"))
                    continue
                if isinstance(e.__context__, exc.Timeout):
                    raise Timeout(
                        f"etcd at {ep}: no answer within {self.timeout:g}s ({what})"
                    ) from None
                raise Timeout(f"etcd at {ep}: {what}: {_server_error(e.detail_text)[1]}") from None
            except gw.ConnectionFailedError as e:
                if isinstance(e.__context__, exc.ConnectionError):
                    failed.append((ep, _reason(e.__context__)))
                else:  # HTTP 503: the member is up but cannot serve (no leader, say)
                    failed.append((ep, f"unavailable: {_server_error(e.detail_text)[1]}"))
                continue
            except gw.Etcd3Exception as e:
                code, message = _server_error(e.detail_text)
                if code == 5:  # gRPC NotFound: a lease
                    raise LeaseLost(f"etcd at {ep}: {what}: {message}") from None
                if code == 4:  # DeadlineExceeded
                    raise Timeout(f"etcd at {ep}: {what}: {message}") from None
                raise ProtocolError(f"etcd at {ep}: {what}: {message}") from None
            except (exc.RequestException, ValueError) as e:  # a broken or non-JSON answer
                raise ProtocolError(f"etcd at {ep}: {what}: {_reason(e)}") from None
            if not isinstance(doc, dict):
                raise ProtocolError(f"etcd at {ep}: {what}: the answer is not a JSON object")
            self._current = i
            return doc
        if not failed:
            raise Timeout(f"{self._where()}: no answer within {self.timeout:g}s ({what})")
        reasons = {r for _, r in failed}
        where = f"etcd at {', '.join(ep for ep, _ in failed)}"
        if len(reasons) == 1:
            raise ConnectionFailed(f"{where}: unreachable ({reasons.pop()})")
        detail = "; ".join(f"{ep}: {r}" for ep, r in failed)
        raise ConnectionFailed(f"{where}: unreachable ({detail})")

    # leases

    def grant_lease(self, ttl: int) -> Lease:
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
            raise UsageError(f"a lease TTL is a whole number of seconds above 0, not {ttl!r}")
        doc = self._call("lease/grant", {"TTL": ttl, "ID": 0}, "grant a lease")
        if doc.get("error"):
            raise ProtocolError(f"{self._where()}: grant a lease: {doc['error']}")
        return Lease(_int(doc.get("ID")), _int(doc.get("TTL")))

    def keepalive(self, lease: Lease) -> float:
        doc = self._call("lease/keepalive", {"ID": lease.id}, f"renew lease {lease.id:x}")
        result = doc.get("result")
        if not isinstance(result, dict):
            code, message = _server_error(json.dumps(doc))
            if code == 5:
                raise _lease_gone(lease.id)
            raise ProtocolError(f"{self._where()}: renew lease {lease.id:x}: {message}")
        ttl = _int(result.get("TTL"))
        if ttl <= 0:
            raise _lease_gone(lease.id)
        return float(ttl)

    def revoke(self, lease: Lease) -> bool:
        try:
            self._call("kv/lease/revoke", {"ID": lease.id}, f"revoke lease {lease.id:x}")
        except NotFound:
            return False
        return True

    def lease_remaining(self, lease_id: int) -> float | None:
        doc = self._call("kv/lease/timetolive", {"ID": lease_id}, f"look up lease {lease_id:x}")
        ttl = _int(doc.get("TTL"))
        return None if ttl < 0 else float(ttl)

    # keys

    def _range(self, request: dict[str, Any]) -> dict[str, Any]:
        return request | {"serializable": True} if self.serializable else request

    def get(self, key: str) -> KeyValue | None:
        _check_key(key)
        doc = self._call("kv/range", self._range({"key": _b64(key.encode())}), f"get {key}")
        kvs = doc.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    def snapshot(self, prefix: str) -> Snapshot:
        _check_key(prefix)
        raw = prefix.encode()
        doc = self._call(
            "kv/range",
            self._range({"key": _b64(raw), "range_end": _b64(prefix_end(raw))}),
            f"list {prefix}",
        )
        kvs = tuple(_kv(d) for d in doc.get("kvs") or [])
        return Snapshot(kvs, _int(doc.get("header", {}).get("revision")))

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        return list(self.snapshot(prefix).kvs)

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        op = Put(key, value, 0 if lease is None else lease.id)
        body = _op_json(op)["request_put"]
        doc = self._call("kv/put", body, f"put {key}")
        return _int(doc.get("header", {}).get("revision"))

    def delete(self, key: str) -> bool:
        _check_key(key)
        doc = self._call("kv/deleterange", {"key": _b64(key.encode())}, f"delete {key}")
        return _int(doc.get("deleted")) > 0

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        for c in compares:
            if not isinstance(c, Compare):
                raise UsageError(f"{c!r} is not a Compare")
        _check_branch(success)
        _check_branch(failure)
        payload = {
            "compare": [_compare_json(c) for c in compares],
            "success": [_op_json(op) for op in success],
            "failure": [_op_json(op) for op in failure],
        }
        keys = sorted({c.key for c in compares} | {op.key for op in [*success, *failure]})
        doc = self._call("kv/txn", payload, f"transaction on {', '.join(keys) or 'nothing'}")
        ok = bool(doc.get("succeeded"))
        gets: list[KeyValue | None] = []
        deleted = 0
        for r in doc.get("responses") or []:
            if "response_range" in r:
                kvs = r["response_range"].get("kvs") or []
                gets.append(_kv(kvs[0]) if kvs else None)
            elif "response_delete_range" in r:
                deleted += _int(r["response_delete_range"].get("deleted"))
        return TxnResult(ok, _int(doc.get("header", {}).get("revision")), tuple(gets), deleted)

    # watches

    def watch(self, prefix: str, start_revision: int | None = None) -> Watch:
        _check_key(prefix)
        if self._closed:
            raise Closed(f"{self._where()}: the client was closed")
        raw = prefix.encode()
        create: dict[str, Any] = {"key": _b64(raw), "range_end": _b64(prefix_end(raw))}
        if start_revision is not None:
            create["start_revision"] = start_revision
        deadline = time.monotonic() + self.timeout
        connect = self.timeout / len(self._clients)
        failed: list[tuple[str, str]] = []
        for i in self._order():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ep = self.endpoints[i]
            try:
                stream = _WatchStream(
                    self._clients[i].get_url("watch"),
                    {"create_request": create},
                    (min(connect, remaining), remaining),
                    ep,
                    prefix,
                )
            except _Unreachable as e:
                failed.append((ep, e.reason))
                continue
            self._current = i
            with self._lock:
                self._watches = [w for w in self._watches if not w.cancelled]
                self._watches.append(stream.watch)
            return stream.watch
        if not failed:
            raise Timeout(f"{self._where()}: no answer within {self.timeout:g}s (watch {prefix})")
        where = f"etcd at {', '.join(ep for ep, _ in failed)}"
        raise ConnectionFailed(
            f"{where}: unreachable ({'; '.join(sorted({r for _, r in failed}))})"
        )


class _Unreachable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _WatchStream:
    """One watch: a streaming POST read by a daemon thread into a :class:`Watch`.

    The constructor returns once etcd confirmed the watch (its ``created`` message), so no
    change after that is missed; it waits at most the timeout it is given.  Cancelling shuts
    the socket down, which ends the reader at once."""

    def __init__(
        self, url: str, body: dict[str, Any], timeout: tuple[float, float], ep: str, prefix: str
    ) -> None:
        import requests

        self._requests = requests
        self._ep = ep
        self._session = requests.Session()
        self._cancelled = threading.Event()
        self.watch = Watch(f"watch of {prefix} at {ep}", on_cancel=self._cancel)
        self._resp: requests.Response | None = None
        try:
            resp = self._session.post(url, json=body, stream=True, timeout=timeout)
        except requests.exceptions.ConnectTimeout:
            self._session.close()
            raise _Unreachable("timed out") from None
        except requests.exceptions.Timeout:
            self._session.close()
            raise Timeout(f"etcd at {ep}: no answer within {timeout[1]:g}s (watch)") from None
        except requests.exceptions.ConnectionError as e:
            self._session.close()
            raise _Unreachable(_reason(e)) from None
        self._resp = resp
        if resp.status_code != 200:
            _, message = _server_error(resp.text)
            self._close()
            raise ProtocolError(f"etcd at {ep}: watch {prefix}: {message}")
        self._sock = _stream_socket(resp)
        self._chunks = resp.iter_content(chunk_size=None)
        self._buffer = b""
        try:
            first = self._next_message()
        except (requests.exceptions.RequestException, OSError) as e:
            self._close()
            if isinstance(e, requests.exceptions.Timeout | socket.timeout):
                raise Timeout(f"etcd at {ep}: no answer within {timeout[1]:g}s (watch)") from None
            raise ConnectionFailed(f"etcd at {ep}: watch {prefix}: {_reason(e)}") from None
        error = self._error_in(first, prefix)
        if error is not None:
            self._close()
            raise error
        if first is None or not first.get("result", {}).get("created"):
            self._close()
            raise ProtocolError(f"etcd at {ep}: watch {prefix}: no confirmation from etcd")
        if self._sock is not None:
            self._sock.settimeout(None)  # from now on an idle watch is fine
        self._prefix = prefix
        self._thread = threading.Thread(target=self._read, name=f"etcd watch {prefix}", daemon=True)
        self._thread.start()

    def _next_message(self) -> dict[str, Any] | None:
        """The next JSON line of the stream; None at its end."""
        while b"\n" not in self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                if self._buffer.strip():
                    line, self._buffer = self._buffer, b""
                    return _message(line, self._ep)
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        if not line.strip():
            return self._next_message()
        return _message(line, self._ep)

    def _error_in(self, msg: dict[str, Any] | None, prefix: str) -> PairvolError | None:
        if msg is None:
            return None
        if "error" in msg:
            _, message = _server_error(json.dumps(msg))
            return ConnectionFailed(f"etcd at {self._ep}: watch {prefix}: {message}")
        result = msg.get("result", {})
        if result.get("canceled"):
            compacted = _int(result.get("compact_revision"))
            if compacted:
                return IllegalState(
                    f"etcd at {self._ep}: watch {prefix}: history before revision {compacted} "
                    "was compacted; read the keys again and watch from there"
                )
            reason = result.get("cancel_reason") or "cancelled by etcd"
            return ConnectionFailed(f"etcd at {self._ep}: watch {prefix}: {reason}")
        return None

    def _read(self) -> None:
        try:
            while not self._cancelled.is_set():
                msg = self._next_message()
                if msg is None:
                    raise ConnectionFailed(
                        f"etcd at {self._ep}: watch {self._prefix}: the stream ended"
                    )
                error = self._error_in(msg, self._prefix)
                if error is not None:
                    raise error
                for e in msg.get("result", {}).get("events") or []:
                    kv = _kv(e.get("kv", {}))
                    kind: Literal["put", "delete"] = (
                        "delete" if e.get("type") == "DELETE" else "put"
                    )
                    self.watch.push(
                        WatchEvent(
                            kind,
                            kv.key,
                            kv.value,
                            kv.mod_revision,
                            kv.create_revision,
                            kv.version,
                            kv.lease,
                        )
                    )
        except PairvolError as e:
            if not self._cancelled.is_set():
                self.watch.push(e)
        except (self._requests.exceptions.RequestException, OSError, ValueError) as e:
            if not self._cancelled.is_set():
                self.watch.push(
                    ConnectionFailed(f"etcd at {self._ep}: watch {self._prefix}: {_reason(e)}")
                )
        finally:
            self._close()

    def _cancel(self) -> None:
        self._cancelled.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):  # already closed: the reader is ending anyway
                self._sock.shutdown(socket.SHUT_RDWR)
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self._close()

    def _close(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self._session.close()


def _message(line: bytes, ep: str) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except ValueError:
        raise ProtocolError(f"etcd at {ep}: the watch stream sent {line[:60]!r}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"etcd at {ep}: the watch stream sent {line[:60]!r}")
    return doc


def _stream_socket(resp: requests.Response) -> socket.socket | None:
    """The socket under a streaming response (urllib3 keeps its connection while streaming)."""
    conn = getattr(resp.raw, "_connection", None)
    sock = getattr(conn, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


# -- the key layout -------------------------------------------------------------------------


class Keys:
    """Every etcd key of one cluster, made here and nowhere else::

    /pairvol/<cluster>/leader/<resource>    {"epoch": N, "holder": HOST}, under HOST's lease
    /pairvol/<cluster>/epoch/<resource>     N (decimal), no lease, never deleted
    /pairvol/<cluster>/lock/<volume>        HOST, under HOST's lease (the S-VOL lock)
    /pairvol/<cluster>/resource/<resource>  the runtime resource record (JSON)
    /pairvol/<cluster>/handover/<resource>  HOST a switchover released the leader key to
    /pairvol/<cluster>/request/<resource>   an operator's request to the active (JSON)
    """

    ROOT = "/pairvol/"

    def __init__(self, cluster: str) -> None:
        self.cluster = check_cluster_name(cluster, what="cluster name")
        self.root = f"{self.ROOT}{cluster}/"

    @property
    def leaders(self) -> str:
        return self.root + "leader/"

    @property
    def epochs(self) -> str:
        return self.root + "epoch/"

    @property
    def locks(self) -> str:
        return self.root + "lock/"

    @property
    def resources(self) -> str:
        return self.root + "resource/"

    @property
    def handovers(self) -> str:
        return self.root + "handover/"

    @property
    def requests(self) -> str:
        return self.root + "request/"

    def leader(self, resource: str) -> str:
        return self.leaders + check_cluster_name(resource, what="resource name")

    def handover(self, resource: str) -> str:
        return self.handovers + check_cluster_name(resource, what="resource name")

    def request(self, resource: str) -> str:
        return self.requests + check_cluster_name(resource, what="resource name")

    def epoch(self, resource: str) -> str:
        return self.epochs + check_cluster_name(resource, what="resource name")

    def lock(self, volume: str) -> str:
        """``volume`` is a volume name or a pair id ``GROUP/PAIR``."""
        parts = volume.split("/") if isinstance(volume, str) else [volume]
        if len(parts) > 2:
            raise UsageError(f"lock name {volume!r}: use VOLUME or GROUP/PAIR")
        for part in parts:
            check_name(part, what="lock name")
        return self.locks + volume

    def resource(self, name: str) -> str:
        return self.resources + check_cluster_name(name, what="resource name")


# -- the leader lock and the epoch ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Leader:
    """Who holds a resource: ``holder`` at ``epoch``, under lease ``lease``."""

    holder: str
    epoch: int
    lease: int
    revision: int  # the leader key's mod_revision


def encode_leader(holder: str, epoch: int) -> bytes:
    return json.dumps({"epoch": epoch, "holder": holder}, sort_keys=True).encode()


def decode_leader(kv: KeyValue) -> Leader:
    try:
        doc = json.loads(kv.value)
    except ValueError:
        doc = None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("holder"), str)
        or isinstance(doc.get("epoch"), bool)
        or not isinstance(doc.get("epoch"), int)
    ):
        raise ProtocolError(f"etcd key {kv.key} holds {kv.value[:80]!r}, not a leader record")
    return Leader(doc["holder"], doc["epoch"], kv.lease, kv.mod_revision)


def decode_epoch(kv: KeyValue) -> int:
    text = kv.value.decode("ascii", "replace")
    if not text.isdigit() or int(text) < 1:
        raise ProtocolError(f"etcd key {kv.key} holds {kv.value[:80]!r}, not an epoch")
    return int(text)


#: How often acquire_leader retries when the epoch moved but the leader key stayed absent
#: (another contender won and lost it again between our read and our transaction).
ACQUIRE_ATTEMPTS = 8


def acquire_leader(
    coord: Coord, keys: Keys, resource: str, holder: str, lease: Lease, *, floor: int = 0
) -> int | None:
    """Take the resource's leader key for ``holder`` under ``lease``; the new epoch, or None
    when someone else holds it.

    One transaction (Patroni's model), which succeeds only if the leader key is absent
    (``create_revision == 0``) and the epoch key is unchanged since we read it (its
    ``mod_revision``, 0 when it does not exist yet): it creates the leader key under the lease
    and writes the epoch ``max(epoch, floor) + 1`` (and deletes a switchover's handover
    key: whoever takes the key, the handover is over).  So two contenders never get the same
    epoch, and epochs only increase.  ``floor`` is an epoch known elsewhere (the storage
    nodes') that the new one must exceed.

    If the key is already ours under this very lease (a retry after a transaction whose
    answer was lost), its epoch is returned: the call is idempotent."""
    check_cluster_name(holder, what="holder")
    leader_key = keys.leader(resource)
    epoch_key = keys.epoch(resource)
    for _ in range(ACQUIRE_ATTEMPTS):
        current = coord.get(epoch_key)
        stored = 0 if current is None else decode_epoch(current)
        mod = 0 if current is None else current.mod_revision
        epoch = max(stored, floor) + 1
        result = coord.txn(
            [Compare.create(leader_key, "==", 0), Compare.mod(epoch_key, "==", mod)],
            [
                Put(leader_key, encode_leader(holder, epoch), lease.id),
                Put(epoch_key, b"%d" % epoch),
                Delete(keys.handover(resource)),  # a switchover's handover is used up
            ],
            [Get(leader_key)],
        )
        if result.succeeded:
            return epoch
        held = result.gets[0] if result.gets else None
        if held is not None:
            leader = decode_leader(held)
            if leader.holder == holder and leader.lease == lease.id:
                return leader.epoch
            return None
    raise IllegalState(
        f"resource {resource}: the epoch changed under {ACQUIRE_ATTEMPTS} attempts in a row "
        "to take the leader key; another agent is taking and dropping it"
    )


def read_leader(coord: Coord, keys: Keys, resource: str) -> Leader | None:
    kv = coord.get(keys.leader(resource))
    return None if kv is None else decode_leader(kv)


def read_epoch(coord: Coord, keys: Keys, resource: str) -> int:
    """The resource's last epoch (0: never led)."""
    kv = coord.get(keys.epoch(resource))
    return 0 if kv is None else decode_epoch(kv)


def release_leader(
    coord: Coord, keys: Keys, resource: str, holder: str, *, handover: str | None = None
) -> bool:
    """Delete the leader key if ``holder`` still holds it (compare-and-delete on the exact
    record we read, in a transaction); False if it is not ours (or gone).  The epoch stays.
    ``handover``: the host a switchover hands the resource to, written in the same
    transaction (the others hold back while it takes the key); None clears any."""
    key = keys.leader(resource)
    kv = coord.get(key)
    if kv is None or decode_leader(kv).holder != holder:
        return False
    then: list[Op] = [Delete(key)]
    if handover is None:
        then.append(Delete(keys.handover(resource)))
    else:
        then.append(Put(keys.handover(resource), check_cluster_name(handover).encode()))
    result = coord.txn(
        [Compare.value(key, "==", kv.value), Compare.mod(key, "==", kv.mod_revision)], then
    )
    return result.succeeded


def read_handover(coord: Coord, keys: Keys, resource: str) -> str | None:
    """The host the last switchover released ``resource`` to (None: none)."""
    kv = coord.get(keys.handover(resource))
    return None if kv is None else kv.value.decode("utf-8", "replace")


# -- operator requests to the active agent ---------------------------------------------------

#: What an operator can ask of a resource's active agent, and the states of a request.
REQUEST_OPS: Final = ("switchover", "split", "resync")
REQUEST_STATES: Final = ("pending", "accepted", "refused", "done", "failed")


@dataclass(frozen=True, slots=True)
class Request:
    """``pairvol cluster switchover|split|resync``: one request per resource at a time,
    written by the command, answered by the active agent in the same key."""

    id: str
    op: str
    state: str = "pending"
    to: str | None = None  # switchover: the target host
    target: str | None = None  # split/resync: a group of the resource (None: all of them)
    detail: str = ""
    revision: int = 0  # the key's mod_revision as read

    def encode(self) -> bytes:
        doc = {"id": self.id, "op": self.op, "state": self.state, "to": self.to,
               "target": self.target, "detail": self.detail}  # fmt: skip
        return json.dumps(doc, sort_keys=True).encode()


def decode_request(kv: KeyValue) -> Request:
    try:
        doc = json.loads(kv.value)
        req = Request(
            id=str(doc["id"]), op=str(doc["op"]), state=str(doc["state"]),
            to=doc.get("to"), target=doc.get("target"), detail=str(doc.get("detail") or ""),
            revision=kv.mod_revision,
        )  # fmt: skip
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"etcd key {kv.key} holds {kv.value[:80]!r}, not a request") from e
    if req.op not in REQUEST_OPS or req.state not in REQUEST_STATES:
        raise ProtocolError(f"etcd key {kv.key}: request op {req.op!r} state {req.state!r}")
    return req


def put_request(coord: Coord, keys: Keys, resource: str, request: Request) -> bool:
    """Store a new pending request; False if one is still pending or accepted (one at a
    time: a finished one is replaced)."""
    key = keys.request(resource)
    kv = coord.get(key)
    if kv is not None:
        with contextlib.suppress(ProtocolError):
            if decode_request(kv).state in ("pending", "accepted"):
                return False
    mod = 0 if kv is None else kv.mod_revision
    result = coord.txn([Compare.mod(key, "==", mod)], [Put(key, request.encode())])
    return result.succeeded


def read_request(coord: Coord, keys: Keys, resource: str) -> Request | None:
    kv = coord.get(keys.request(resource))
    return None if kv is None else decode_request(kv)


def answer_request(
    coord: Coord, keys: Keys, resource: str, request: Request, state: str, detail: str = ""
) -> Request | None:
    """Move ``request`` (as read) to ``state``: the request as stored now, or None if the key
    changed since it was read."""
    key = keys.request(resource)
    answered = replace(request, state=state, detail=detail[:500])
    result = coord.txn([Compare.mod(key, "==", request.revision)], [Put(key, answered.encode())])
    return replace(answered, revision=result.revision) if result.succeeded else None


# -- the S-VOL lock -------------------------------------------------------------------------


def acquire_lock(coord: Coord, keys: Keys, volume: str, holder: str, lease: Lease) -> bool:
    """Take ``volume``'s lock for ``holder`` under ``lease`` (created only if absent); True if
    ``holder`` holds it now under this lease (also when it already did)."""
    check_cluster_name(holder, what="holder")
    key = keys.lock(volume)
    result = coord.txn(
        [Compare.create(key, "==", 0)], [Put(key, holder.encode(), lease.id)], [Get(key)]
    )
    if result.succeeded:
        return True
    held = result.gets[0] if result.gets else None
    return held is not None and held.value == holder.encode() and held.lease == lease.id


def release_lock(coord: Coord, keys: Keys, volume: str, holder: str) -> bool:
    """Delete ``volume``'s lock if ``holder`` holds it; False if not."""
    key = keys.lock(volume)
    result = coord.txn([Compare.value(key, "==", holder.encode())], [Delete(key)])
    return result.succeeded


def lock_holder(coord: Coord, keys: Keys, volume: str) -> str | None:
    kv = coord.get(keys.lock(volume))
    return None if kv is None else kv.value.decode("utf-8", "replace")


# -- runtime resource records ---------------------------------------------------------------


def put_resource(coord: Coord, keys: Keys, resource: Resource, *, replace: bool = False) -> int:
    """Store a resource record; AlreadyExists if one by that name exists (unless
    ``replace``).  The revision it was stored at."""
    key = keys.resource(resource.name)
    data = resource_to_json(resource)
    if replace:
        return coord.put(key, data)
    result = coord.txn([Compare.create(key, "==", 0)], [Put(key, data)])
    if not result.succeeded:
        raise AlreadyExists(f"resource {resource.name!r} already exists in cluster {keys.cluster}")
    return result.revision


def get_resource(
    coord: Coord, keys: Keys, name: str, *, known_hosts: Sequence[str] | None = None
) -> Resource | None:
    kv = coord.get(keys.resource(name))
    return None if kv is None else resource_from_json(kv.value, name=name, known_hosts=known_hosts)


def delete_resource(coord: Coord, keys: Keys, name: str) -> bool:
    """Delete the record (its epoch key stays: a resource made again keeps counting)."""
    return coord.delete(keys.resource(name))


def list_resources(
    coord: Coord, keys: Keys, *, known_hosts: Sequence[str] | None = None
) -> list[Resource]:
    out = []
    for kv in coord.get_prefix(keys.resources):
        name = kv.key[len(keys.resources) :]
        out.append(resource_from_json(kv.value, name=name, known_hosts=known_hosts))
    return sorted(out, key=lambda r: r.name)
