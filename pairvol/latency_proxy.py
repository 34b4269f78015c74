"""A userspace TCP proxy that adds one-way delay, for benchmarks in labs (no ``tc netem`` here).

    python -m pairvol.latency_proxy --listen ADDR:PORT --target ADDR:PORT --delay-ms D
                                    [--jitter-ms J]

Run it on a lab host (``pairvol lab exec LAB a -- python -m pairvol.latency_proxy --listen
198.18.1.1:20809 --target 198.18.1.2:10809 --delay-ms 5``) and point the client at the
listening address: every byte then reaches the other side at least D ms after the proxy read
it, in both directions, so a round trip gains at least 2·D.  It prints one line
``listening on ADDR:PORT`` when ready and runs until SIGTERM or SIGINT.

From Python::

    with start_proxy(("127.0.0.1", 0), ("127.0.0.1", 10809), delay_s=0.05) as proxy:
        connect(proxy.address)

How: each direction of each connection has a reader thread that stamps every chunk with its
due time (arrival + delay + a uniform 0..jitter) and a writer thread that sends chunks in
order once due.  Due times never decrease, so jitter never reorders bytes; the configured
delay is a lower bound.  An end-of-stream is forwarded (``shutdown(SHUT_WR)``) after the same
delay; an error on either side closes both.  The per-direction queue is bounded, so a slow
receiver pushes back on the sender through TCP.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import queue
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType, TracebackType

from replicator.errors import ConnectionFailed, PairvolError, UsageError

CHUNK = 256 * 1024
QUEUE_CHUNKS = 256
CONNECT_TIMEOUT = 10.0

Endpoint = tuple[str, int]


def parse_endpoint(text: str) -> Endpoint:
    """``ADDR:PORT`` or ``[V6ADDR]:PORT`` → ``(addr, port)`` (UsageError if malformed)."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not 0 <= port < 65536:
        raise UsageError(f"{text!r} is not ADDR:PORT (an IP address and a TCP port)")
    return host, port


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


class _Connection:
    """One proxied connection: two directions, four threads."""

    def __init__(self, proxy: Proxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._open_directions = 2
        self.closed = False

    def start(self) -> None:
        for src, dst in ((self.client, self.server), (self.server, self.client)):
            q: queue.Queue[tuple[float, bytes | None]] = queue.Queue(QUEUE_CHUNKS)
            self.threads.append(threading.Thread(target=self._read, args=(src, q), daemon=True))
            self.threads.append(threading.Thread(target=self._write, args=(dst, q), daemon=True))
        for t in self.threads:
            t.start()

    def _read(self, src: socket.socket, q: queue.Queue[tuple[float, bytes | None]]) -> None:
        last = 0.0
        while True:
            try:
                data: bytes | None = src.recv(CHUNK) or None
            except OSError:
                data = None
            due = max(last, time.monotonic() + self.proxy.sample_delay())
            last = due
            while not self.closed:
                try:
                    q.put((due, data), timeout=0.2)
                    break
                except queue.Full:
                    continue
            if data is None or self.closed:
                return

    def _write(self, dst: socket.socket, q: queue.Queue[tuple[float, bytes | None]]) -> None:
        try:
            while not self.closed:
                try:
                    due, data = q.get(timeout=0.2)
                except queue.Empty:
                    continue
                wait = due - time.monotonic()
                if wait > 0 and self.proxy._stopping.wait(wait):
                    return
                if data is None:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except OSError:
            self.close()  # the other side broke: take the whole connection down
        finally:
            with self._lock:
                self._open_directions -= 1
                done = self._open_directions == 0
            if done:
                self.close()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class Proxy:
    """A running proxy; ``address`` is where it listens (the real port if 0 was asked)."""

    def __init__(
        self, listener: socket.socket, target: Endpoint, delay_s: float, jitter_s: float
    ) -> None:
        self._listener = listener
        host, port = listener.getsockname()[:2]
        self.address: Endpoint = (str(host), int(port))
        self.target = target
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self._stopping = threading.Event()
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._acceptor = threading.Thread(target=self._accept, name="latency-proxy", daemon=True)
        self._acceptor.start()

    def sample_delay(self) -> float:
        return self.delay_s + (self._rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            client.settimeout(None)
            try:
                server = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
            except OSError:
                client.close()  # the client sees the refusal as an immediate close
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, client, server)
            with self._lock:
                self._connections = [c for c in self._connections if not c.closed]
                self._connections.append(conn)
            conn.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection and wait for the threads to end."""
        self._stopping.set()
        self._listener.close()
        self._acceptor.join(timeout)
        with self._lock:
            connections = list(self._connections)
        for c in connections:
            c.close()
        deadline = time.monotonic() + timeout
        for c in connections:
            for t in c.threads:
                t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Proxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_proxy(
    listen: Endpoint | str, target: Endpoint | str, delay_s: float, jitter_s: float = 0.0
) -> Proxy:
    """Listen on ``listen`` and forward to ``target``, each direction delayed ``delay_s``."""
    if isinstance(listen, str):
        listen = parse_endpoint(listen)
    if isinstance(target, str):
        target = parse_endpoint(target)
    if not delay_s >= 0 or not jitter_s >= 0:
        raise UsageError(f"delay {delay_s} and jitter {jitter_s} must be >= 0")
    try:
        family = _family(listen[0])
    except ValueError as e:
        raise UsageError(f"{listen[0]!r} is not an IP address") from e
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(listen)
    except OSError as e:
        sock.close()
        raise ConnectionFailed(f"cannot listen on {listen[0]}:{listen[1]}: {e.strerror}") from e
    sock.listen(128)
    sock.settimeout(0.2)  # lets the acceptor notice stop() promptly
    return Proxy(sock, target, delay_s, jitter_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pairvol.latency_proxy", description="TCP proxy adding one-way delay"
    )
    parser.add_argument("--listen", required=True, metavar="ADDR:PORT")
    parser.add_argument("--target", required=True, metavar="ADDR:PORT")
    parser.add_argument("--delay-ms", required=True, type=float, metavar="D")
    parser.add_argument("--jitter-ms", type=float, default=0.0, metavar="J")
    args = parser.parse_args(argv)
    try:
        proxy = start_proxy(args.listen, args.target, args.delay_ms / 1000, args.jitter_ms / 1000)
    except PairvolError as e:
        print(f"latency_proxy: error: {e}", file=sys.stderr)
        return e.exit_code
    done = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = proxy.address
    print(f"listening on {host}:{port}", flush=True)
    while not done.wait(1.0):
        pass
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
