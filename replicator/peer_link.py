"""Replication links over TCP: the thin I/O adapter around :mod:`replicator.wire` and
:mod:`replicator.peer_auth`.

Theory of operation
-------------------
A node runs one :class:`PeerServer` on its peer port and one :class:`PeerClient` per peer it
sends requests to.  Requests travel client -> server only; a node that must ask its peer
something uses its own client, so each TCP connection carries one direction of requests and
the two request-id spaces of docs/protocol.md never mix.

Every connection starts with the handshake (the client is the initiator, the server the
acceptor), with the decoder held at :data:`~replicator.wire.HANDSHAKE_MAX_PAYLOAD` and the
whole exchange under one deadline, counted from the connect or the accept (every receive
waits only for what is left of it, so a peer trickling a byte at a time cannot stretch it).
Then:

* **Server limits.**  Connections still in the handshake (strangers, until proven) and
  authenticated ones are counted apart: at most ``max_pending`` of the first, where a
  newcomer beyond the cap evicts the oldest pending handshake of the address that holds the
  most (a flood from one address evicts its own), and at most ``max_connections`` of the
  second, checked when a handshake succeeds (a peer over the cap is told so with an Error
  before the acceptor proves itself).  Strangers can therefore delay a real peer's handshake
  but never take its place.  Everything a stranger can make the server log (failed
  handshakes, evictions, refusals, failed accepts) goes through a :class:`LogLimiter`.
* **Server.**  One reader thread per connection decodes frames and hands each request to a
  small per-connection worker pool (grown on demand up to ``workers`` threads), except
  mirrored writes, which it carries out itself (:func:`inline_data`).  At most
  ``workers`` requests of a connection are in flight; beyond that the reader stops reading, so
  TCP pushes back on the peer.  Responses echo the request id and go out in completion order.
  A bad frame, a response-type message or a Goodbye ends the connection: nothing read after
  it reaches the handler.
* **Client.**  Connects lazily, in the first caller's thread.  Any number of threads may call
  :meth:`PeerClient.request` at once: each registers a waiter under a fresh request id, sends
  its frame under the connection's send lock (``sendmsg`` straight from the message's buffers)
  and sleeps on its own event; one reader thread wakes the waiter its response names.  When
  the connection breaks, every waiter fails at once with :class:`~replicator.errors.PeerLost`
  and the next request reconnects.  A request that gets no answer in time raises
  :class:`~replicator.errors.Timeout` and breaks the connection too: a sync link that stops
  answering is lost, and a half-dead connection must not linger.

Compression.  Both Hellos offer the codecs their node decodes (feature bits,
docs/protocol.md "Compression"); a Write's or Chunk's data goes out compressed with its pair's
codec (``compress_for(pair_id)``) when the peer offered it, and raw otherwise.  The decoder
takes compressed frames only in the codecs both offered, and only after the handshake.

Blocking and bounds.  Receives block without a timeout (TCP keepalive finds a dead peer; our
own close wakes them with ``shutdown``).  Sends block at most ``SO_SNDTIMEO``: the request's
remaining time on the client, ``send_timeout`` on the server.  A 64 MiB frame holds its
connection's send lock for as long as the kernel takes to accept it, and no longer.  Every
thread is a daemon, and ``stop``/``close`` join them with a bound.  The socket's file
descriptor is closed only under the send lock, so no thread can send on a reused descriptor.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import itertools
import os
import queue
import socket
import ssl
import struct
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Final

from replicator import compression, wire
from replicator.errors import (
    Closed,
    ConnectionFailed,
    PairvolError,
    PeerLost,
    ProtocolError,
    Timeout,
    UsageError,
)
from replicator.errors import PeerRefused as PeerRefused  # re-exported: it lives in errors
from replicator.peer_auth import Handshake, PeerSecrets, as_peer_secrets
from replicator.tls import TLS_HANDSHAKE_BYTE, PeerTls, identity_error
from replicator.tls import describe as tls_why

Handler = Callable[[str, wire.Message], wire.Message]
#: The codec a pair's volume data crosses the link with, by pair id (``pair create
#: --compress``); used only for codecs the peer offered in its Hello.
CompressFor = Callable[[str], str]
#: The Hello feature bits this node offers: the codecs it decodes, and Entries frames.
FEATURES: Final = compression.features(compression.available()) | wire.FEATURE_ENTRIES


def inline_data(msg: wire.Message) -> bool:
    """The requests a server's reader handles itself instead of handing them to a worker: a
    mirrored write (a Write or Zero without a journal sequence).  The hand-off to a worker
    (a queue, a wake-up, the GIL passed on) was about a third of the secondary's CPU per
    mirrored 4k write and a quarter per MiB (docs/benchmarks.md, "Replication speed, session
    4"); the write itself is a ``pwritev`` into the page cache.  Journal entries (``seq``,
    and Entries) go to workers here: the receiver may wait for the entry one follows (which a
    busy reader would never read).  A storage node passes its own predicate, which also takes the
    entries its receive journal takes at once (``PairManager.receives_inline``)."""
    return isinstance(msg, wire.Write | wire.Zero) and not msg.seq


#: Messages a client may send as requests (docs/protocol.md, "Requests and responses").
REQUESTS: Final = (
    wire.Ping,
    wire.PairCreate,
    wire.PairState,
    wire.BitmapRequest,
    wire.Write,
    wire.Entries,
    wire.Zero,
    wire.Flush,
    wire.Chunk,
    wire.ChunkRequest,
    wire.DigestRequest,
    wire.JournalStatus,
)
#: Messages that belong to the handshake and are never valid afterwards.
_SESSION: Final = (wire.Hello, wire.Auth, wire.AuthResult)

#: The handshake's deadline, from the accept (server) or the connect (client's default is
#: its own ``connect_timeout``).
HANDSHAKE_TIMEOUT: Final = 10.0
SEND_TIMEOUT: Final = 60.0
JOIN_TIMEOUT: Final = 5.0
WORKERS: Final = 8
#: Authenticated connections a server keeps at once (a node has one per peer).
MAX_CONNECTIONS: Final = 64
#: Connections in the handshake at once; a newcomer beyond that evicts one.
MAX_PENDING: Final = 16
#: Lines of each kind a stranger can provoke: at most LOG_BURST every LOG_INTERVAL seconds.
LOG_INTERVAL: Final = 10.0
LOG_BURST: Final = 3
#: Keepalive: probe after 10 s idle, every 5 s, give up after 3 misses (about 25 s).
_KEEPALIVE: Final = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
_TIMEVAL: Final = struct.Struct("@ll")
#: Buffers one sendmsg takes at most (Linux's UIO_MAXIOV; coalesced frames can exceed it).
_IOV_MAX: Final = 1024
#: TLS sends: parts smaller than this are joined into one write of at most _TLS_JOIN bytes.
_TLS_SMALL: Final = 64 << 10
_TLS_JOIN: Final = 256 << 10
#: How a TLS ClientHello's first bytes show in wire's "bad frame magic" error.
_TLS_HELLO: Final = f"bad frame magic {bytes([TLS_HANDSHAKE_BYTE, 3])!r}"[:-1]


# --------------------------------------------------------------------------------------------
# Errors


def errno_of(e: BaseException) -> int:
    """The errno to send for ``e`` in a wire Error: a PairvolError's own (IllegalState EBUSY,
    NotFound ENOENT, UsageError EINVAL, PvidMismatch EACCES, VolumeError its OS errno, ...),
    an OSError's, else EIO.  Never 0."""
    code = getattr(e, "errno", None) if isinstance(e, PairvolError | OSError) else None
    if type(code) is int and 0 < code < 1 << 32:
        return code
    return _errno.EIO


def error_from_wire(code: int, message: str) -> PeerRefused:
    """The exception a wire ``Error(code, message)`` answer raises."""
    return PeerRefused(code, message)


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _check_secret(secret: bytes | PeerSecrets, allow_no_secret: bool) -> PeerSecrets:
    keys = as_peer_secrets(secret)
    if not keys and not allow_no_secret:
        raise UsageError("no peer secret configured; replication links need a shared secret")
    return keys


class LogLimiter:
    """At most ``burst`` log lines of one kind in each ``interval`` seconds.  Pure: ``now``
    comes in, so a scripted clock tests it.

    :meth:`admit` says whether to write a line now and, if so, how many lines of its kind were
    suppressed since the last one written (the line should say so); :meth:`flush` returns the
    counts not reported yet.
    """

    def __init__(self, interval: float = LOG_INTERVAL, burst: int = LOG_BURST) -> None:
        if interval < 0 or burst < 1:
            raise UsageError("a log limit needs interval >= 0 and burst >= 1")
        self.interval = interval
        self.burst = burst
        self._windows: dict[str, tuple[float, int]] = {}  # kind: (window start, lines written)
        self._suppressed: dict[str, int] = {}

    def admit(self, kind: str, now: float) -> tuple[bool, int]:
        window = self._windows.get(kind)
        start, written = (now, 0) if window is None or now - window[0] >= self.interval else window
        if written >= self.burst:
            self._windows[kind] = (start, written)
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False, 0
        self._windows[kind] = (start, written + 1)
        return True, self._suppressed.pop(kind, 0)

    def flush(self) -> dict[str, int]:
        out, self._suppressed = self._suppressed, {}
        return out


# --------------------------------------------------------------------------------------------
# One connection: socket, decoder, send lock


class _Eof(Exception):
    """The peer closed its end."""


class _Busy(Exception):
    """The server refused an authenticated peer: too many connections."""


class _TlsFailed(Exception):
    """The TLS handshake failed, or the peer spoke (or did not speak) TLS against our
    configuration; the message is one line."""


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE:
        opt = getattr(socket, name, None)
        if opt is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)


class _Link:
    """A connected socket with its frame decoder; sends are serialized, receives belong to one
    thread at a time (the handshake's, then the reader's)."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where
        self.decoder = wire.FrameDecoder(max_payload=wire.HANDSHAKE_MAX_PAYLOAD, codecs=frozenset())
        #: Codecs both Hellos offered (none until the handshake is done), and the pairs' own.
        self.codecs: frozenset[str] = frozenset()
        #: The Hello feature bits both sides offered (0 until the handshake is done).
        self.features = 0
        self.compress_for: CompressFor | None = None
        self.send_lock = threading.Lock()
        # Frames waiting for the send lock.  Whoever holds it sends every frame queued by then
        # in one sendmsg, so threads sending at once share the syscall and the segment.
        self._outbox: list[wire.Blob] = []
        self._outbox_lock = threading.Lock()
        self._fd_closed = False
        self._sndtimeo: float | None = None  # what SO_SNDTIMEO is set to
        #: The SO_SNDTIMEO of sends without a deadline (None: block until sent or broken).
        self.send_timeout: float | None = None
        self.refusal_sent = False
        self.tls = False  # the socket is an SSLSocket (start_tls)

    def start_tls(self, ctx: ssl.SSLContext, server_side: bool, deadline: float) -> None:
        """Wrap the socket in TLS and run TLS's handshake by ``deadline``; _TlsFailed."""
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        self.sock = ctx.wrap_socket(
            self.sock, server_side=server_side, do_handshake_on_connect=False
        )
        self.tls = True
        try:
            self.sock.do_handshake()
        except (OSError, EOFError) as e:
            raise _TlsFailed(f"TLS handshake failed: {tls_why(e)}") from None

    def send(self, msg: wire.Message, request_id: int = 0, deadline: float | None = None) -> None:
        """Send one frame; OSError if the socket fails, TimeoutError past ``deadline`` (or
        when the kernel's SO_SNDTIMEO runs out).

        Frames are coalesced: the frame is queued, and whoever gets the send lock sends every
        queued frame, in queue order, in one ``sendmsg``.  A sender that finds its frame gone
        returns once the holder that took it is done; if that send failed, the connection is
        broken and the caller hears of it (a request's waiter fails, a server response's
        connection is aborted)."""
        parts = wire.encode_parts(msg, request_id, compress=self._codec(msg))
        with self._outbox_lock:
            self._outbox += parts
        if deadline is None:
            self.send_lock.acquire()
        elif not self.send_lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            with self._outbox_lock:  # still queued: take it back (the connection fails anyway)
                if parts and any(p is parts[0] for p in self._outbox):
                    self._outbox = [p for p in self._outbox if not any(p is q for q in parts)]
            raise TimeoutError("waited too long for the connection's send lock")
        try:
            if self._fd_closed:
                raise OSError(_errno.EBADF, "connection closed")
            with self._outbox_lock:
                batch, self._outbox = self._outbox, []
            if not batch:
                return  # sent along with an earlier frame, by the holder before us
            if deadline is not None:
                self._set_send_timeout(deadline - time.monotonic())
            elif self._sndtimeo != self.send_timeout:
                self._set_send_timeout(self.send_timeout)
            self._send_parts(batch, deadline)
        finally:
            self.send_lock.release()

    def _codec(self, msg: wire.Message) -> str:
        """The codec for ``msg``'s data: its pair's, if the peer decodes it."""
        if self.compress_for is None or not isinstance(msg, wire.Write | wire.Chunk):
            return compression.NONE
        codec = self.compress_for(msg.pair_id)
        return codec if codec in self.codecs else compression.NONE

    def _send_parts(self, parts: list[wire.Blob], deadline: float | None) -> None:
        if self.tls:
            self._send_tls(parts, deadline)
            return
        views = [memoryview(p) for p in parts]
        while views:
            try:
                n = self.sock.sendmsg(views[:_IOV_MAX], (), socket.MSG_NOSIGNAL)
            except BlockingIOError:  # SO_SNDTIMEO ran out with nothing sent
                raise TimeoutError("the peer stopped reading") from None
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views:
                views[0] = views[0][n:]
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("the peer stopped reading")
                    self._set_send_timeout(left)

    def _send_tls(self, parts: list[wire.Blob], deadline: float | None) -> None:
        """An SSLSocket has no ``sendmsg``: small parts (headers, 4k payloads) are joined
        into one write, large ones are written from their own buffers (SSL_write makes the
        records; it writes all or fails).  SO_SNDTIMEO running out is a want-write error."""
        sock = self.sock
        joined = bytearray()
        try:
            for p in parts:
                if len(p) < _TLS_SMALL:
                    joined += p
                    if len(joined) < _TLS_JOIN:
                        continue
                    sock.sendall(joined)
                    joined = bytearray()
                    continue
                if joined:
                    sock.sendall(joined)
                    joined = bytearray()
                if deadline is not None:
                    self._set_send_timeout(deadline - time.monotonic())
                sock.sendall(memoryview(p))
            if joined:
                sock.sendall(joined)
        except (ssl.SSLWantWriteError, BlockingIOError):
            raise TimeoutError("the peer stopped reading") from None

    def _set_send_timeout(self, seconds: float | None) -> None:
        # Only a blocking socket (after the handshake) obeys it; 0 means "forever".
        usec = 0 if seconds is None else max(int(seconds * 1e6), 1)
        tv = _TIMEVAL.pack(usec // 1_000_000, usec % 1_000_000)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._sndtimeo = seconds

    def receive(self, deadline: float | None = None) -> wire.Frame:
        """The next frame (blocking, or until ``deadline``: each receive waits only for what
        is left of it); ProtocolError, OSError, TimeoutError, or _Eof."""
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the deadline passed")
                self.sock.settimeout(left)
            with self.decoder.get_buffer() as buf:
                n = self.sock.recv_into(buf)
            if n == 0:
                if self.decoder.mid_frame:
                    raise _Eof("the peer closed the connection in the middle of a frame")
                raise _Eof("the peer closed the connection")
            self.decoder.buffer_updated(n)

    def handshake(
        self, hs: Handshake, deadline: float, admit: Callable[[], str | None] | None = None
    ) -> None:
        """Run ``hs`` to completion by ``deadline`` (ProtocolError, TimeoutError, OSError or
        _Eof if not); then lift the payload limit and make the socket blocking.  ``admit``
        runs once the peer is proven, before our last replies go out: a reason it returns is
        sent as Error(EBUSY) instead, and raised as _Busy."""
        for m in hs.start():
            self.send(m, 0, deadline)
        while not hs.done:
            try:
                frame = self.receive(deadline)
            except _Eof as e:
                raise _Eof(f"{e} during the handshake") from None
            replies = hs.receive(frame.message)
            if hs.done and admit is not None and (refusal := admit()) is not None:
                self.refusal_sent = True
                with contextlib.suppress(OSError, TimeoutError):
                    self.send(wire.Error(_errno.EBUSY, wire.clip_text(refusal)), 0, deadline)
                raise _Busy(refusal)
            for m in replies:
                self.send(m, 0, deadline)
            if hs.failed:  # we refused the peer's proof, and the replies told it so
                assert hs.error is not None
                self.refusal_sent = True
                raise hs.error
        # The limit applies from the frame after the handshake's last (the decoder looks at
        # most one frame ahead, so frames already read are parsed under the new limit).
        self.decoder.max_payload = wire.MAX_PAYLOAD
        self.features = hs.features or 0
        self.codecs = compression.codecs_of(self.features) & compression.available()
        self.decoder.codecs = self.codecs
        self.sock.settimeout(None)

    def shutdown(self) -> None:
        """Wake every thread blocked on the socket; the fd stays open until :meth:`close`.
        On TLS, the TCP socket's own shutdown: SSLSocket's drops the TLS object first, and a
        sender between the two would write plaintext."""
        with contextlib.suppress(OSError):  # not connected any more: nothing to wake
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def drain(self, deadline: float) -> None:
        """Before closing a refused connection: say we are done, then read and drop what the
        peer still sends until it closes (or ``deadline``), so that unread data does not make
        the close a reset, which would lose the TLS alert that tells the peer why."""
        with contextlib.suppress(OSError, ValueError):
            self.sock.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(65536):
                    return

    def close(self) -> None:
        self.shutdown()
        with self.send_lock:
            self._fd_closed = True
            self.sock.close()

    def try_send(self, msg: wire.Message, timeout: float = 1.0, *, request_id: int = 0) -> None:
        """Best effort (a parting Error or refusal); failures are ignored."""
        with contextlib.suppress(OSError, TimeoutError):
            self.send(msg, request_id, time.monotonic() + timeout)


def _join(threads: list[threading.Thread], deadline: float) -> None:
    me = threading.current_thread()
    for t in threads:
        if t is not me and t.ident is not None:
            t.join(max(deadline - time.monotonic(), 0.0))


# --------------------------------------------------------------------------------------------
# Server


class PeerServer:
    """Accepts peer connections on a listening TCP socket, authenticates them and answers
    their requests with ``handler(peer_name, request)``; ``peer_name`` is the name the
    handshake proved (with a keyring, by that name's own key).

    ``secret``: :class:`~replicator.peer_auth.PeerSecrets`, or bytes for a shared secret;
    ``workers``: requests of one connection handled at once (each may hold a 64 MiB frame);
    ``inline``: which requests the connection's reader handles itself, in arrival order,
    without a worker (default :func:`inline_data`);
    ``handshake_timeout``: each handshake's deadline, from the accept;
    ``max_pending``: connections in the handshake at once (a newcomer evicts one);
    ``max_connections``: authenticated connections at once (a peer beyond that is refused);
    ``log_interval``, ``log_burst``: the limit on lines strangers can make us log;
    ``tls``: serve TLS only (a client without TLS is refused), with client certificates
    required; without it, a client that speaks TLS is refused.
    """

    def __init__(
        self,
        node_name: str,
        sock: socket.socket,
        secret: bytes | PeerSecrets,
        handler: Handler,
        log: Callable[[str], None],
        *,
        allow_no_secret: bool = False,
        workers: int = WORKERS,
        inline: Callable[[wire.Message], bool] = inline_data,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_pending: int = MAX_PENDING,
        log_interval: float = LOG_INTERVAL,
        log_burst: int = LOG_BURST,
        tls: PeerTls | None = None,
        compress_for: CompressFor | None = None,
    ) -> None:
        wire.check_node_name(node_name)
        secrets = _check_secret(secret, allow_no_secret)
        if workers < 1 or max_connections < 1 or max_pending < 1:
            raise UsageError("workers, max_connections and max_pending must be at least 1")
        if not handshake_timeout > 0:
            raise UsageError("the handshake timeout must be positive")
        self.node_name = node_name
        self.handler = handler
        self.log = log
        self.allow_no_secret = allow_no_secret
        self.workers = workers
        self.inline = inline
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.tls = tls
        self.compress_for = compress_for
        self._secrets = secrets
        self._sock = sock
        self._address: tuple[str, int] = sock.getsockname()[:2]
        self._lock = threading.Lock()
        self._conns: set[_ServerConn] = set()  # every connection, to stop them
        self._pending: dict[_ServerConn, None] = {}  # in the handshake, oldest first
        self._active: set[_ServerConn] = set()  # authenticated
        self._limiter = LogLimiter(log_interval, log_burst)
        self._log_lock = threading.Lock()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    def start(self) -> None:
        if self._thread is not None:
            raise UsageError("peer server already started")
        self._sock.settimeout(None)  # accept() blocks until a peer comes or stop() wakes it
        self._thread = threading.Thread(target=self._accept_loop, name="peer-accept", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Close the listener and every connection (waiting requests of clients fail at once),
        then join the threads, waiting at most ``timeout`` for handlers that are still busy."""
        deadline = time.monotonic() + timeout
        self._closing.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        if self._thread is not None:
            _join([self._thread], deadline)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.abort()
        for c in conns:
            _join(c.threads(), deadline)
        with self._log_lock:
            unreported = self._limiter.flush()
        for kind, n in sorted(unreported.items()):
            self.log(f"peer link: {n} more {kind!r} lines were suppressed")

    def connection_counts(self) -> tuple[int, int]:
        """(connections in the handshake, authenticated connections) right now."""
        with self._lock:
            return len(self._pending), len(self._active)

    def _note(self, kind: str, line: str) -> None:
        """Log a line a stranger can provoke, within the rate limit."""
        with self._log_lock:
            write, suppressed = self._limiter.admit(kind, time.monotonic())
        if write:
            more = f" ({suppressed} more like it suppressed before this)" if suppressed else ""
            self.log(line + more)

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                sock, addr = self._sock.accept()
            except OSError as e:
                if self._closing.is_set():
                    return
                # EMFILE and friends: say so and back off instead of spinning.
                self._note("accept", f"peer link: accept failed: {_why(e)}")
                self._closing.wait(0.5)
                continue
            where = f"{addr[0]}:{addr[1]}"
            deadline = time.monotonic() + self.handshake_timeout
            victim: _ServerConn | None = None
            with self._lock:
                closing = self._closing.is_set()
                if not closing:
                    if len(self._pending) >= self.max_pending:
                        victim = self._victim()
                        del self._pending[victim]
                    conn = _ServerConn(self, sock, where, addr[0], deadline)
                    self._conns.add(conn)
                    self._pending[conn] = None
            if closing:
                sock.close()
                continue
            if victim is not None:
                victim.abort()
                self._note(
                    "evicted",
                    f"peer link from {victim.where}: dropped, still unauthenticated when "
                    f"{self.max_pending} handshakes were pending",
                )
            conn.start()

    def _victim(self) -> _ServerConn:
        """The pending handshake a newcomer evicts: the oldest of the address that holds the
        most, so that a flood from one address evicts its own connections first."""
        counts = Counter(c.address for c in self._pending)
        most = max(counts.values())
        return next(c for c in self._pending if counts[c.address] == most)

    def _admit(self, conn: _ServerConn) -> str | None:
        """``conn`` authenticated: None if it may stay, else why not."""
        with self._lock:
            self._pending.pop(conn, None)
            if len(self._active) >= self.max_connections:
                return f"too many peer connections ({self.max_connections} authenticated open)"
            self._active.add(conn)
            return None

    def _forget(self, conn: _ServerConn) -> None:
        with self._lock:
            self._conns.discard(conn)
            self._pending.pop(conn, None)
            self._active.discard(conn)


class _ServerConn:
    """One accepted connection: a reader thread and a small pool of worker threads."""

    def __init__(
        self, server: PeerServer, sock: socket.socket, where: str, address: str, deadline: float
    ) -> None:
        self.server = server
        self.link = _Link(sock, where)
        self.link.compress_for = server.compress_for
        self.where = where
        self.address = address  # the peer's IP address
        self.deadline = deadline  # the handshake's
        self.peer: str | None = None
        self._queue: queue.SimpleQueue[wire.Frame | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._inflight = 0
        self._closed = False
        self._workers: list[threading.Thread] = []
        self._reader = threading.Thread(target=self._run, name=f"peer-in {where}", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def threads(self) -> list[threading.Thread]:
        with self._cond:
            return [self._reader, *self._workers]

    def abort(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.link.shutdown()

    def _who(self) -> str:
        return f"peer {self.peer!r} ({self.where})" if self.peer else f"peer link from {self.where}"

    # -- reader ----------------------------------------------------------------------------

    def _run(self) -> None:
        server = self.server
        try:
            if not self._handshake():
                return
            self._serve()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
                workers = len(self._workers)
            for _ in range(workers):
                self._queue.put(None)
            self.link.close()
            server._forget(self)

    def _handshake(self) -> bool:
        server = self.server
        hs = Handshake(
            "acceptor",
            server._secrets,
            server.node_name,
            allow_no_secret=server.allow_no_secret,
            features=FEATURES,
        )
        try:
            _tune(self.link.sock)
            self._start_tls()
            self.link.handshake(
                hs, self.deadline, admit=lambda: self._tls_identity(hs) or server._admit(self)
            )
        except _TlsFailed as e:
            if not self._closed:
                server._note("tls", f"{self._who()}: {e}")
                self.link.drain(min(self.deadline, time.monotonic() + 1.0))
            return False
        except _Busy as e:
            if not self._closed:
                server._note("busy", f"peer {hs.peer_name!r} ({self.where}): refused: {e}")
            return False
        except ProtocolError as e:
            if not self._closed and server.tls is None and _TLS_HELLO in str(e):
                why = "refused: the peer speaks TLS, this node has no TLS on peer links"
                server._note("tls", f"{self._who()}: {why}")
                self.link.try_send(wire.Error(_errno.EPROTO, wire.clip_text(why)))
            elif not self._closed:
                server._note("handshake", f"{self._who()}: handshake failed: {e}")
                if not self.link.refusal_sent:  # else AuthResult(ok=False) already said why
                    self.link.try_send(wire.Error(_errno.EPROTO, wire.clip_text(str(e))))
            return False
        except TimeoutError:
            if not self._closed:
                why = f"not done within {server.handshake_timeout:g}s of the accept"
                server._note("handshake", f"{self._who()}: handshake failed: {why}")
            return False
        except (OSError, _Eof) as e:
            if not self._closed:
                server._note("handshake", f"{self._who()}: handshake failed: {_why(e)}")
            return False
        self.peer = hs.peer_name
        self.link.send_timeout = server.send_timeout
        note = " (NOT authenticated: no secret on either side)" if hs.unauthenticated else ""
        server.log(f"peer {self.peer!r} connected from {self.where}{note}")
        return True

    def _start_tls(self) -> None:
        """Look at the peer's first byte: TLS or not must match ours (else _TlsFailed, and a
        plaintext peer is told so in its own protocol); then TLS's handshake, if ours."""
        server, link = self.server, self.link
        if server.tls is None:
            return  # unchanged: our Hello goes out at once (a TLS peer: see _handshake)
        link.sock.settimeout(max(self.deadline - time.monotonic(), 0.001))
        first = link.sock.recv(1, socket.MSG_PEEK)
        if not first:
            raise _Eof("the peer closed the connection before the handshake")
        if first[0] != TLS_HANDSHAKE_BYTE:
            link.try_send(
                wire.Error(_errno.EPROTO, f"node {server.node_name} requires TLS on peer links")
            )
            raise _TlsFailed("refused: plaintext peer link, this node requires TLS")
        link.start_tls(server.tls.server, True, self.deadline)

    def _tls_identity(self, hs: Handshake) -> str | None:
        """With TLS, the node the handshake proved must be the one the certificate names."""
        if not self.link.tls or hs.peer_name is None:
            return None
        return identity_error(self.link.sock, hs.peer_name)

    def _serve(self) -> None:
        server = self.server
        while True:
            try:
                frame = self.link.receive()
            except ProtocolError as e:
                if not self._closed:
                    server.log(f"{self._who()}: closing the connection: {e}")
                    self.link.try_send(wire.Error(_errno.EPROTO, wire.clip_text(str(e))))
                return
            except _Eof as e:
                if not self._closed:
                    server.log(f"{self._who()}: {e}")
                return
            except OSError as e:
                if not self._closed:
                    server.log(f"{self._who()}: connection failed: {_why(e)}")
                return
            msg = frame.message
            if isinstance(msg, wire.Goodbye):
                server.log(f"{self._who()} said goodbye: {msg.reason or 'no reason given'}")
                return
            if not isinstance(msg, REQUESTS):
                why = f"unexpected {type(msg).__name__} (not a request)"
                server.log(f"{self._who()}: closing the connection: {why}")
                self.link.try_send(wire.Error(_errno.EPROTO, why))
                return
            if self.server.inline(msg):
                self._handle(frame)  # no hand-off to a worker: see ``inline_data``
                continue
            if not self._dispatch(frame):
                return

    def _dispatch(self, frame: wire.Frame) -> bool:
        """Queue ``frame`` for a worker, waiting while ``workers`` requests are in flight."""
        with self._cond:
            while self._inflight >= self.server.workers and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._inflight += 1
            if self._inflight > len(self._workers):
                n = len(self._workers)
                t = threading.Thread(
                    target=self._work, name=f"peer-work {self.where} #{n}", daemon=True
                )
                self._workers.append(t)
                t.start()
        self._queue.put(frame)
        return True

    # -- workers ---------------------------------------------------------------------------

    def _work(self) -> None:
        while (frame := self._queue.get()) is not None:
            try:
                if not self._closed:
                    self._handle(frame)
            finally:
                with self._cond:
                    self._inflight -= 1
                    self._cond.notify_all()

    def _handle(self, frame: wire.Frame) -> None:
        server = self.server
        msg, rid = frame.message, frame.request_id
        assert self.peer is not None
        name = type(msg).__name__
        response: wire.Message
        try:
            response = server.handler(self.peer, msg)
            if type(response) not in wire.CODECS:
                raise TypeError(f"handler returned {type(response).__name__}, not a message")
        except PairvolError as e:
            response = wire.Error(errno_of(e), wire.clip_text(str(e)))
        except Exception as e:  # a bug: answer, keep serving, leave a trace in the log
            where = traceback.extract_tb(e.__traceback__)[-1]
            at = f"{os.path.basename(where.filename)}:{where.lineno}"
            server.log(f"{self._who()}: {name} #{rid} failed: {type(e).__name__}: {e} ({at})")
            text = f"internal error: {type(e).__name__}: {e}"
            response = wire.Error(_errno.EIO, wire.clip_text(text))
        if rid == 0:
            if isinstance(response, wire.Error):
                server.log(f"{self._who()}: {name} notification failed: {response.message}")
            return
        if self._closed:
            return
        try:
            self.link.send(response, rid)
        except ProtocolError as e:  # the handler built something that does not encode
            server.log(f"{self._who()}: {name} #{rid}: cannot send the response: {e}")
            text = wire.clip_text(f"internal error: {e}")
            self.link.try_send(wire.Error(_errno.EIO, text), request_id=rid)
        except (OSError, TimeoutError) as e:
            if not self._closed:
                server.log(f"{self._who()}: sending the response failed: {_why(e)}")
            self.abort()


# --------------------------------------------------------------------------------------------
# Client


class _Waiter:
    """One request's answer.  A bare lock, held from the start and released once by whoever
    fills in the answer (the reader or :meth:`_ClientConn.fail`), is the cheapest wake-up
    there is: ``threading.Event`` builds a Condition and a fresh lock for every wait."""

    __slots__ = ("_lock", "error", "response")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.response: wire.Message | None = None
        self.error: PairvolError | None = None

    def set(self) -> None:
        """Called once: the waiter was taken out of the pending table under its lock."""
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        return self._lock.acquire(timeout=-1 if timeout is None else timeout)


class PendingReply:
    """The answer to one request sent by :meth:`PeerClient.send`, collected by
    :meth:`result` (in any thread, once): the response, or the request's error."""

    __slots__ = ("_conn", "_deadline", "_name", "_rid", "_timeout", "_waiter")

    def __init__(
        self,
        conn: _ClientConn,
        waiter: _Waiter,
        rid: int,
        name: str,
        deadline: float,
        timeout: float,
    ) -> None:
        self._conn = conn
        self._waiter = waiter
        self._rid = rid
        self._name = name
        self._deadline = deadline
        self._timeout = timeout

    def result(self) -> wire.Message:
        """The response.  Raises PeerLost, Timeout (the connection is dropped), PeerRefused
        (an Error answer) or Closed, as :meth:`PeerClient.request` does."""
        conn, waiter, rid, name, timeout = (
            self._conn, self._waiter, self._rid, self._name, self._timeout
        )  # fmt: skip
        if not waiter.wait(max(self._deadline - time.monotonic(), 0.0)):
            with conn._lock:
                late = conn._pending.pop(rid, None) is None
            if not late:
                conn.fail(f"no answer to {name} #{rid} within {timeout:g}s")
                raise Timeout(f"peer {conn.peer!r} did not answer {name} within {timeout:g}s")
            waiter.wait()  # answered or failed just now
        if waiter.error is not None:
            raise waiter.error
        response = waiter.response
        assert response is not None
        if isinstance(response, wire.Error):
            raise PeerRefused(response.code, response.message, peer=conn.peer)
        return response


class _ClientConn:
    """One established outbound connection: pending requests and the reader thread."""

    def __init__(self, client: PeerClient, link: _Link, peer: str) -> None:
        self.client = client
        self.link = link
        self.peer = peer
        self._lock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self.reason: str | None = None  # why it ended; None while it is up
        self._by_us = False
        self.reader = threading.Thread(
            target=self._read, name=f"peer-out {peer} {link.where}", daemon=True
        )

    @property
    def alive(self) -> bool:
        return self.reason is None

    def _gone(self, reason: str, by_us: bool) -> PairvolError:
        if by_us:
            return Closed(f"connection to peer {self.peer!r} closed: {reason}")
        return PeerLost(f"lost the connection to peer {self.peer!r} ({self.link.where}): {reason}")

    def call(self, msg: wire.Message, deadline: float, timeout: float) -> wire.Message:
        return self.send(msg, deadline, timeout).result()

    def send(self, msg: wire.Message, deadline: float, timeout: float) -> PendingReply:
        """Send ``msg`` under a fresh request id; its answer is collected later."""
        waiter = _Waiter()
        name = type(msg).__name__
        with self._lock:
            if self.reason is not None:
                raise self._gone(self.reason, self._by_us)
            rid = next(self._ids)
            self._pending[rid] = waiter
        try:
            self.link.send(msg, rid, deadline)
        except ProtocolError:  # our own message does not encode: nothing was sent
            with self._lock:
                self._pending.pop(rid, None)
            raise
        except TimeoutError:
            self.fail(f"sending {name} #{rid} took longer than {timeout:g}s")
            raise Timeout(f"peer {self.peer!r} did not take {name} within {timeout:g}s") from None
        except OSError as e:
            self.fail(f"send failed: {_why(e)}")  # fails our waiter too: raised on result()
        return PendingReply(self, waiter, rid, name, deadline, timeout)

    def notify(self, msg: wire.Message, deadline: float) -> None:
        if self.reason is not None:
            raise self._gone(self.reason, self._by_us)
        try:
            self.link.send(msg, 0, deadline)
        except TimeoutError:
            self.fail("sending a notification timed out")
            raise Timeout(f"peer {self.peer!r} did not take {type(msg).__name__}") from None
        except OSError as e:
            self.fail(f"send failed: {_why(e)}")
            raise self._gone(f"send failed: {_why(e)}", False) from None

    def fail(self, reason: str, *, by_us: bool = False) -> None:
        """End the connection (once): every waiter fails, the reader wakes and closes the fd,
        and, unless we closed it, the client hears of the loss."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            self._by_us = by_us
            waiters = list(self._pending.values())
            self._pending.clear()
        self.link.shutdown()
        for w in waiters:
            w.error = self._gone(reason, by_us)
            w.set()
        if not by_us:
            self.client._lost(self, reason)

    def _read(self) -> None:
        try:
            reason = self._read_loop()
        except ProtocolError as e:
            reason = f"protocol error: {e}"
        except _Eof as e:
            reason = str(e)
        except OSError as e:
            reason = f"connection failed: {_why(e)}"
        self.fail(reason)
        self.link.close()

    def _read_loop(self) -> str:
        while True:
            frame = self.link.receive()
            msg, rid = frame.message, frame.request_id
            if isinstance(msg, wire.Goodbye):
                return f"the peer said goodbye: {msg.reason or 'no reason given'}"
            if isinstance(msg, wire.Error) and rid == 0:
                code = _errno.errorcode.get(msg.code, str(msg.code))
                return f"the peer reported {code}: {msg.message}"
            if isinstance(msg, _SESSION) or rid == 0:
                raise ProtocolError(f"unexpected {type(msg).__name__} with request id {rid}")
            with self._lock:
                waiter = self._pending.pop(rid, None)
            if waiter is None:
                raise ProtocolError(f"{type(msg).__name__} answers unknown request id {rid}")
            waiter.response = msg
            waiter.set()


class PeerClient:
    """One outbound replication connection to a peer, shared by any number of threads.

    Connected lazily by the first request and again by the first request after a failure;
    there is no background reconnect.  :meth:`close` is final: later requests raise
    :class:`~replicator.errors.Closed`.  ``on_disconnect(reason)`` is called once each time an
    established connection is lost (not when we close it), from the thread that noticed.

    ``secret``: :class:`~replicator.peer_auth.PeerSecrets`, or bytes for a shared secret.
    ``expect_peer``: the only peer name to accept; with a keyring, the handshake then proves
    that the peer holds that name's key, so :attr:`peer_name` is never another node's.
    ``tls``: connect with TLS (the server's certificate checked against our CA, ours sent),
    and accept the peer only if its certificate names the node the handshake proved.
    """

    def __init__(
        self,
        node_name: str,
        host: str,
        port: int,
        secret: bytes | PeerSecrets,
        log: Callable[[str], None],
        *,
        expect_peer: str | None = None,
        connect_timeout: float = 5.0,
        allow_no_secret: bool = False,
        tls: PeerTls | None = None,
        compress_for: CompressFor | None = None,
    ) -> None:
        wire.check_node_name(node_name)
        if expect_peer is not None:
            wire.check_node_name(expect_peer)
        keys = _check_secret(secret, allow_no_secret)
        self.node_name = node_name
        self.host = host
        self.port = port
        self.log = log
        self.expect_peer = expect_peer
        self.connect_timeout = connect_timeout
        self.allow_no_secret = allow_no_secret
        self.tls = tls  # read at each connect
        self.compress_for = compress_for
        self.on_disconnect: Callable[[str], None] | None = None
        self._secrets = keys
        self._lock = threading.Lock()  # _conn, _closed, _attempts, _failure, _peer_name
        self._connect_lock = threading.Lock()  # one connection attempt at a time
        self._conn: _ClientConn | None = None
        self._closed = False
        self._attempts = 0
        self._failure: str | None = None  # why the last attempt failed
        self._peer_name: str | None = None

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def peer_name(self) -> str | None:
        """The peer's authenticated node name (from the latest handshake; None before one)."""
        return self._peer_name

    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and conn.alive

    def agreed(self, feature: int, timeout: float = 30.0) -> bool:
        """Whether both Hellos of the connection (made now if there is none) offered the
        Hello.features bit ``feature``.  Raises what :meth:`request` raises for connecting."""
        return bool(self._connection(time.monotonic() + timeout).link.features & feature)

    def request(self, msg: wire.Message, timeout: float = 30.0) -> wire.Message:
        """Send a request and return its response.  Raises ConnectionFailed (cannot connect or
        authenticate), PeerLost (the connection broke meanwhile), Timeout (no answer within
        ``timeout`` seconds, including connecting; the connection is dropped), PeerRefused (the
        peer answered with an Error) or Closed (after :meth:`close`)."""
        self._check_request(msg)
        deadline = time.monotonic() + timeout
        return self._connection(deadline).call(msg, deadline, timeout)

    def send(self, msg: wire.Message, timeout: float = 30.0) -> PendingReply:
        """Send a request now and collect its response later (``result()``): many in
        flight from one thread, in the order sent.  Raises what :meth:`request` raises, but
        for the answer's own errors, which ``result()`` raises."""
        self._check_request(msg)
        deadline = time.monotonic() + timeout
        return self._connection(deadline).send(msg, deadline, timeout)

    def notify(self, msg: wire.Message, timeout: float = 30.0) -> None:
        """Send a request as a notification (request id 0): no answer, no confirmation."""
        self._check_request(msg)
        deadline = time.monotonic() + timeout
        self._connection(deadline).notify(msg, deadline)

    def disconnect(self, reason: str = "disconnected by us") -> None:
        """Drop the current connection (waiters get Closed); the next request reconnects."""
        with self._lock:
            conn = self._conn
        if conn is not None:
            conn.fail(reason, by_us=True)
            _join([conn.reader], time.monotonic() + JOIN_TIMEOUT)

    def close(self) -> None:
        """Final: the connection closes, waiters and later requests get Closed (an attempt to
        connect that is under way closes its connection when it completes)."""
        with self._lock:
            self._closed = True
        self.disconnect("the client was closed")

    # -- internals -------------------------------------------------------------------------

    @staticmethod
    def _check_request(msg: wire.Message) -> None:
        if not isinstance(msg, REQUESTS):
            raise ProtocolError(f"{type(msg).__name__} is not a request", remote=False)

    def _connection(self, deadline: float) -> _ClientConn:
        with self._lock:
            if self._closed:
                raise Closed(f"the client for peer {self.where} is closed")
            if self._conn is not None and self._conn.alive:
                return self._conn
            seen = self._attempts
        if not self._connect_lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise Timeout(f"still connecting to peer {self.where}")
        try:
            with self._lock:
                if self._closed:
                    raise Closed(f"the client for peer {self.where} is closed")
                if self._conn is not None and self._conn.alive:
                    return self._conn
                if self._attempts != seen and self._failure is not None:
                    raise ConnectionFailed(self._failure)  # the attempt we waited for failed
                self._attempts += 1
            try:
                conn = self._connect(deadline)
            except ConnectionFailed as e:
                with self._lock:
                    self._failure = str(e)
                raise
            with self._lock:
                closed = self._closed
                if not closed:
                    self._conn = conn
                    self._peer_name = conn.peer
                    self._failure = None
            if closed:
                conn.link.close()
                raise Closed(f"the client for peer {self.where} is closed")
            conn.reader.start()
            return conn
        finally:
            self._connect_lock.release()

    def _connect(self, request_deadline: float) -> _ClientConn:
        label = f"peer {self.expect_peer!r} at {self.where}" if self.expect_peer else self.where
        deadline = min(time.monotonic() + self.connect_timeout, request_deadline)
        try:
            sock = socket.create_connection(
                (self.host, self.port), timeout=max(deadline - time.monotonic(), 0.001)
            )
        except OSError as e:
            raise ConnectionFailed(f"cannot connect to {label}: {_why(e)}") from None
        link = _Link(sock, self.where)
        link.compress_for = self.compress_for
        hs = Handshake(
            "initiator",
            self._secrets,
            self.node_name,
            expect_peer=self.expect_peer,
            allow_no_secret=self.allow_no_secret,
            features=FEATURES,
        )
        tls = self.tls
        try:
            _tune(sock)
            if tls is not None:
                link.start_tls(tls.client, False, deadline)
            link.handshake(hs, deadline)
            why = identity_error(link.sock, hs.peer_name)
            if why is not None:
                raise _TlsFailed(f"refused: {why}")
        except _TlsFailed as e:
            link.close()
            raise ConnectionFailed(f"cannot connect to {label}: {e}") from None
        except ssl.SSLError as e:  # TLS 1.3: the server refuses our certificate after its Finished
            link.close()
            why = f"TLS handshake failed: {tls_why(e)}"
            raise ConnectionFailed(f"cannot connect to {label}: {why}") from None
        except ProtocolError as e:
            link.try_send(wire.Goodbye(wire.clip_text(f"handshake failed: {e}")), 0.2)
            link.close()
            raise ConnectionFailed(f"cannot connect to {label}: {e}") from None
        except (OSError, TimeoutError, _Eof) as e:
            link.close()
            raise ConnectionFailed(f"cannot connect to {label}: {_why(e)}") from None
        peer = hs.peer_name
        assert peer is not None
        note = " (NOT authenticated: no secret on either side)" if hs.unauthenticated else ""
        self.log(f"connected to peer {peer!r} at {self.where}{note}")
        return _ClientConn(self, link, peer)

    def _lost(self, conn: _ClientConn, reason: str) -> None:
        self.log(f"lost the connection to peer {conn.peer!r} at {self.where}: {reason}")
        callback = self.on_disconnect
        if callback is None:
            return
        try:
            callback(reason)
        except Exception as e:  # the callback's bug must not kill our reader
            self.log(f"on_disconnect callback failed: {type(e).__name__}: {e}")
