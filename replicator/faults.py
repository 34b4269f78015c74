"""Crash points: a node kills itself with SIGKILL at a chosen durable step.

Crash safety is tested by killing a node at *each* durable write of a multi-step operation
(split, resync, swap, delete) and checking, after the restart, that the invariants hold.  The
pair runtime calls :func:`step` right before every durable write it makes (a pair record, a
PVID, a header's VOL information, a bitmap, a file removed); nothing happens unless a test
armed a crash with :func:`arm` (over the control socket: ``debug.crash-at``, root only, as the
socket is).  Arming counts steps from then on: ``arm(3)`` dies just before the third.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

_lock = threading.Lock()
_countdown = 0
_trace: list[str] = []
_announce: Callable[[str, int], None] | None = None


def arm(after: int, announce: Callable[[str, int], None] | None = None) -> None:
    """Die at the ``after``-th durable step from now (0: disarm).  ``announce(label, n)`` is
    called just before the kill (the node writes it to its event log)."""
    global _countdown, _announce
    with _lock:
        _countdown = max(0, after)
        _announce = announce
        _trace.clear()


def trace() -> list[str]:
    """The labels of the steps taken since the last :func:`arm`."""
    with _lock:
        return list(_trace)


def step(label: str) -> None:
    """A durable write is about to happen."""
    global _countdown
    if not _countdown:  # the common case: one global read
        return
    with _lock:
        if not _countdown:
            return
        _trace.append(label)
        _countdown -= 1
        if _countdown:
            return
        announce, n = _announce, len(_trace)
    if announce is not None:
        announce(label, n)
    os.kill(os.getpid(), signal.SIGKILL)
