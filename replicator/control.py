"""The node's control API: JSON lines over a unix socket (mode 0600).

A request is one line ``{"op": NAME, "args": {...}}``; the reply is one line, either
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": ERROR}`` where ERROR is
:func:`replicator.errors.to_wire`'s object::

    {"kind": "JournalFull", "bases": ["IllegalState", "PairvolError"],
     "message": "TEXT", "errno": 16}

``kind`` is the registered kind of the error's class (its class name), ``bases`` the kinds of
its ancestors, nearest first.  :func:`call` raises the same class again (or the nearest base
this process knows, or :class:`~replicator.errors.PairvolError`), so the CLI exits with the
code it would have had the node's error been raised in the CLI.  Older nodes send no
``bases`` and no ``errno``; both are optional.  The socket is the only way in; the file mode
keeps it to root.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from replicator import errors
from replicator.errors import (
    ConnectionFailed,
    PairvolError,
    PeerLost,
    ProtocolError,
    UsageError,
)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_LINE = 1 << 20


def error_from_reply(kind: str, message: str) -> PairvolError:
    """The error an older node's ``{"kind", "message"}`` reply names (see :func:`call`)."""
    return errors.from_wire({"kind": kind, "message": message})


def call(path: str, op: str, args: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
    """Send one request to the node at control socket ``path`` and return its result.

    A node that cannot be reached is :class:`ConnectionFailed` (exit 20), one that broke the
    connection :class:`PeerLost`, one that does not answer in ``timeout`` seconds
    :class:`~replicator.errors.Timeout` (21); an error reply raises the node's error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except TimeoutError:
            raise
        except OSError as e:
            raise _unreachable(path, e) from e
        try:
            sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
            with sock.makefile("rb") as f:
                line = f.readline(MAX_LINE)
        except TimeoutError:
            raise
        except OSError as e:
            raise PeerLost(f"the node at {path} broke the connection during {op}: {e}") from e
    except TimeoutError as e:
        raise errors.Timeout(f"the node at {path} did not answer {op} within {timeout:g}s") from e
    finally:
        sock.close()
    if not line.endswith(b"\n"):
        raise PeerLost(f"the node at {path} closed the connection during {op}")
    try:
        reply = json.loads(line)
        if reply["ok"]:
            return reply["result"]
        err = errors.from_wire(reply["error"])
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"malformed reply from the node at {path}: {e}") from e
    raise err


def _unreachable(path: str, e: OSError) -> ConnectionFailed:
    """One line saying why nothing answers at control socket ``path``."""
    directory = os.path.dirname(path) or "."
    if e.errno == errno.ENOENT:
        if not os.path.isdir(directory):
            return ConnectionFailed(f"no node here: node directory {directory} does not exist")
        return ConnectionFailed(f"no node is running in {directory} ({path} does not exist)")
    if e.errno == errno.ECONNREFUSED:
        return ConnectionFailed(
            f"no node is running in {directory} ({path} refuses connections: "
            "the node stopped or was killed)"
        )
    return ConnectionFailed(f"cannot reach the node at {path}: {e.strerror or e}")


class ControlServer:
    """Accepts control connections in a thread; each request runs its handler."""

    def __init__(self, path: str, handlers: dict[str, Handler], log: Callable[[str], None]) -> None:
        self.path = path
        self.handlers = handlers
        self.log = log
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is born 0600: no window where others can connect
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._closing.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                with conn.makefile("rb") as f:
                    line = f.readline(MAX_LINE)
                if not line:
                    return
                reply = self.dispatch(line)
                # Unbuffered: a client that gave up (timed out) must not break a later flush.
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                return  # the client went away; there is no one to answer

    def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            try:
                request = json.loads(line)
                op, args = request["op"], request.get("args", {})
            except (ValueError, KeyError, TypeError) as e:
                raise ProtocolError(f"malformed control request: {e}", remote=True) from e
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if handler is None or not isinstance(args, dict):
                raise UsageError(f"unknown control operation {op!r}")
            return {"ok": True, "result": handler(args)}
        except PairvolError as e:
            return {"ok": False, "error": errors.to_wire(e)}
        except Exception as e:  # a bug: report it, keep serving, leave a trace in the log
            self.log(f"control request failed: {type(e).__name__}: {e}")
            internal = PairvolError(f"internal: {type(e).__name__}: {e}")
            return {"ok": False, "error": errors.to_wire(internal)}
