"""The node's control API: JSON lines over a unix socket (mode 0600).

A request is one line ``{"op": NAME, "args": {...}}``; the reply is one line, either
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": {"kind": CLASS, "message": TEXT}}``
where CLASS names a :mod:`replicator.errors` class, so the CLI exits with the same code the
node would have.  The socket is the only way in; the file mode keeps it to root.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from replicator import errors
from replicator.errors import ConnectionFailed, PairvolError, ProtocolError, UsageError

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_LINE = 1 << 20


def error_from_reply(kind: str, message: str) -> PairvolError:
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, PairvolError)):
        cls = PairvolError
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


def call(path: str, op: str, args: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
    """Send one request to the node at control socket ``path`` and return its result."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError as e:
            raise ConnectionFailed(f"no node is running here ({path} does not exist)") from e
        except OSError as e:
            raise ConnectionFailed(f"cannot reach the node at {path}: {e.strerror}") from e
        sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        with sock.makefile("rb") as f:
            line = f.readline(MAX_LINE)
    except TimeoutError as e:
        raise errors.Timeout(f"the node at {path} did not answer {op} within {timeout:.0f}s") from e
    finally:
        sock.close()
    if not line.endswith(b"\n"):
        raise ConnectionFailed(f"the node at {path} closed the connection during {op}")
    try:
        reply = json.loads(line)
        if reply["ok"]:
            return reply["result"]
        kind, message = str(reply["error"]["kind"]), str(reply["error"]["message"])
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"malformed reply from the node at {path}: {e}") from e
    raise error_from_reply(kind, message)


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
        with conn, conn.makefile("rwb") as f:
            line = f.readline(MAX_LINE)
            if not line:
                return
            reply = self.dispatch(line)
            with contextlib.suppress(OSError):
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

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
            return {"ok": False, "error": {"kind": type(e).__name__, "message": str(e)}}
        except Exception as e:  # a bug: report it, keep serving, leave a trace in the log
            self.log(f"control request failed: {type(e).__name__}: {e}")
            return {"ok": False, "error": {"kind": "PairvolError", "message": f"internal: {e}"}}
