"""The structured event log every pairvol daemon writes: one JSON object per line.

Tests and operators wait on events, never on sleeps: :func:`wait_event` follows the file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from replicator.errors import Timeout


class EventLog:
    def __init__(self, path: str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"ts": round(self._clock(), 6), "event": event, **fields}
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        return record


def read_events(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def wait_event(
    path: str,
    event: str,
    match: Callable[[dict[str, Any]], bool] = lambda _e: True,
    *,
    after: int = 0,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Wait until the log holds an ``event`` (after the first ``after`` lines) that matches."""
    deadline = time.monotonic() + timeout
    while True:
        for record in read_events(path)[after:]:
            if record.get("event") == event and match(record):
                return record
        if time.monotonic() > deadline:
            raise Timeout(f"no {event!r} event in {path} within {timeout:.0f}s")
        time.sleep(0.02)
