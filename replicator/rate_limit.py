"""A bandwidth limit for a long-lived sender (the async shipper's ``--max-rate``, like HUR's
path bandwidth limit): a token bucket that refills at ``rate()`` bytes per second and holds at
most ``burst`` seconds of it, so an idle hour does not buy an unthrottled burst."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimit:
    """``take(n)`` returns once ``n`` more bytes fit the rate; it waits otherwise (real
    seconds; ``stop`` ends the wait at once).  ``rate()`` is read at every take (0 or less:
    no limit), so a change applies to the next take."""

    def __init__(
        self,
        rate: Callable[[], int],
        stop: threading.Event,
        *,
        burst: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._stop = stop
        self._burst = burst
        self._clock = clock
        self._tokens = 0.0
        self._at = clock()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        rate = self._rate()
        if rate <= 0:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(self._tokens + (now - self._at) * rate, rate * self._burst)
            self._at = now
            self._tokens -= nbytes
            wait = -self._tokens / rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._stop.wait(wait)
