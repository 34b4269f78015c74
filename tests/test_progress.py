"""``pair wait --progress`` (pairvol/cli/progress.py): a bar on a terminal, plain lines at
most once a second elsewhere; a copy and a takeover's pull alike."""

from __future__ import annotations

import io

from pairvol.cli.progress import WaitProgress, copy_figures


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def copying(pct: float, rate: int | None = 4 << 20, eta: float | None = 12.0) -> dict[str, object]:
    return {"state": "COPY", "copy_percent": pct, "copy_rate_bytes_s": rate, "eta_seconds": eta}


def test_figures_of_a_copy_a_pull_and_of_nothing() -> None:
    assert copy_figures(copying(25.0), 3.0) == ("COPY", 25.0, "4M/s", "12s")
    # No ETA from the node: from the time so far (3 s for 25%: 9 s to go).
    assert copy_figures(copying(25.0, rate=None, eta=None), 3.0) == ("COPY", 25.0, "-", "9s")
    pull = {"state": "SSWS", "hydration": {"percent": 80.0, "rate_bytes_s": 1 << 20,
                                           "eta_seconds": 2.0}}  # fmt: skip
    assert copy_figures(pull, 1.0) == ("pull", 80.0, "1M/s", "2s")
    assert copy_figures({"state": "PAIR", "hydration": None}, 1.0) is None


def test_not_on_a_terminal_plain_lines_at_most_once_a_second_when_changed() -> None:
    out, clock = io.StringIO(), Clock()
    with WaitProgress("g/p", out, clock) as shown:
        shown.show(copying(10.0))
        clock.now += 0.5
        shown.show(copying(20.0))  # too soon
        clock.now += 0.6
        shown.show(copying(20.0))
        clock.now += 2
        shown.show(copying(20.0))  # unchanged
        shown.show({"state": "PAIR"})
    lines = out.getvalue().splitlines()
    assert lines == ["g/p: COPY  10.0% 4M/s ETA 12s", "g/p: COPY  20.0% 4M/s ETA 12s"]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_on_a_terminal_a_bar_redrawn_in_place() -> None:
    out = Tty()
    with WaitProgress("g/p", out) as shown:
        shown.show(copying(40.0))
        shown.show(copying(60.0, eta=5.0))
    drawn = out.getvalue()
    assert "g/p: COPY" in drawn and "60%" in drawn and "ETA 5s" in drawn, drawn
    assert "\x1b" in drawn  # cursor control: drawn in place, not a line per poll
