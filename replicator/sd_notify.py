"""systemd's readiness protocol (sd_notify(3)) in pure Python: no libsystemd, no dependency.

A ``Type=notify`` unit gets ``$NOTIFY_SOCKET``, the path of an ``AF_UNIX`` datagram socket (a
name starting with ``@`` is in the abstract namespace: the ``@`` stands for a leading NUL
byte).  The service sends it newline-separated ``KEY=VALUE`` assignments in one datagram;
``READY=1`` says start-up is finished, and systemd then starts the units ordered after it.
Without ``$NOTIFY_SOCKET`` (not started by systemd, or a unit of another type) every call is
a no-op, so the daemons call :func:`ready` unconditionally once they serve.
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def notify(state: str, *, unset_environment: bool = False) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to the service manager.

    Returns whether the message was sent: False without ``$NOTIFY_SOCKET``, and False when it
    names no usable socket (as libsystemd's sd_notify, a failure is not the daemon's to die
    of: a stale variable inherited from elsewhere must not stop it from starting; under
    systemd, the unit's start timeout reports it).  With ``unset_environment``,
    ``$NOTIFY_SOCKET`` is removed, so that the commands this process runs later cannot speak
    for it.
    """
    path = os.environ.get(NOTIFY_SOCKET_ENV, "")
    if unset_environment:
        os.environ.pop(NOTIFY_SOCKET_ENV, None)
    if len(path) < 2 or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    """``READY=1`` (with a ``STATUS=`` line if given); ``$NOTIFY_SOCKET`` is unset after it,
    as only the service's main process may report for it."""
    state = "READY=1" if status is None else f"READY=1\nSTATUS={status}"
    return notify(state, unset_environment=True)
