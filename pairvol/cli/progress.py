"""``pair wait --progress``: a copy's (or a takeover's pull's) progress while waiting.

On a terminal, a bar redrawn in place (``rich``) with the percentage, the rate and the ETA;
otherwise (a log, a pipe) one plain line at most once a second, and only when it changed,
so that a script's log stays readable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from replicator.sizes import format_size


def copy_figures(side: dict[str, Any], elapsed: float) -> tuple[str, float, str, str] | None:
    """What to draw for ``side`` (a ``pair.display`` row): (what, percent, rate, ETA), or
    None when nothing is being copied.  A takeover's pull shows as ``hydration``."""
    hydration = side.get("hydration")
    if side.get("state") == "COPY":
        pct = float(side.get("copy_percent") or 0.0)
        rate, eta_s, what = side.get("copy_rate_bytes_s"), side.get("eta_seconds"), "COPY"
    elif hydration:
        pct = float(hydration.get("percent") or 0.0)
        rate, eta_s, what = hydration.get("rate_bytes_s"), hydration.get("eta_seconds"), "pull"
    else:
        return None
    if eta_s is None and 0 < pct < 100:
        eta_s = elapsed * (100 - pct) / pct
    eta = "?" if eta_s is None else f"{float(eta_s):.0f}s"
    speed = f"{format_size(int(rate))}/s" if rate else "-"
    return what, pct, speed, eta


class WaitProgress:
    """Shows the progress of one pair while ``pair wait`` polls it."""

    def __init__(
        self, target: str, stream: TextIO, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.target = target
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self._last, self._last_at = "", float("-inf")
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if stream.isatty():
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}  ETA {task.fields[eta]}"),
                console=Console(file=stream),
                transient=True,
            )

    def __enter__(self) -> WaitProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def show(self, side: dict[str, Any]) -> None:
        figures = copy_figures(side, self.clock() - self.started)
        if figures is None:
            return
        what, pct, rate, eta = figures
        if self._bar is not None:
            label = f"{self.target}: {what}"
            if self._task is None:
                self._task = self._bar.add_task(label, total=100.0, rate=rate, eta=eta)
            self._bar.update(self._task, description=label, completed=pct, rate=rate, eta=eta)
            return
        line = f"{self.target}: {what} {pct:5.1f}% {rate} ETA {eta}"
        now = self.clock()
        if line != self._last and now - self._last_at >= 1.0:
            print(line, file=self.stream, flush=True)
            self._last, self._last_at = line, now
