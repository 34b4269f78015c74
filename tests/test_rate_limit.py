"""replicator.rate_limit: the shipper's bandwidth limit, on a scripted clock (no timing)."""

from __future__ import annotations

import threading

import pytest

from replicator.rate_limit import RateLimit


class Stop(threading.Event):
    """A stop event whose waits are recorded and pass at once (the clock moves by them)."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(round(timeout, 6))
        self.clock[0] += timeout
        return False


@pytest.fixture
def limited() -> tuple[RateLimit, Stop, list[float], list[int]]:
    clock = [100.0]
    stop = Stop(clock)
    rate = [1000]
    return RateLimit(lambda: rate[0], stop, clock=lambda: clock[0]), stop, clock, rate


def test_it_holds_the_rate(limited: tuple[RateLimit, Stop, list[float], list[int]]) -> None:
    limit, stop, clock, _ = limited
    for _ in range(4):
        limit.take(500)
    assert stop.waits == [0.5, 0.5, 0.5, 0.5]  # 2000 bytes at 1000/s: 2 s
    assert clock[0] == pytest.approx(102.0)


def test_an_idle_spell_buys_at_most_the_burst(
    limited: tuple[RateLimit, Stop, list[float], list[int]],
) -> None:
    limit, stop, clock, _ = limited
    clock[0] += 3600.0  # an hour idle: a quarter second of rate is kept, not an hour's
    limit.take(250)
    assert stop.waits == []
    limit.take(250)
    assert stop.waits == [0.25]


def test_no_limit_and_a_changed_limit(
    limited: tuple[RateLimit, Stop, list[float], list[int]],
) -> None:
    limit, stop, _, rate = limited
    rate[0] = 0
    limit.take(10**9)
    assert stop.waits == []
    rate[0] = 2000  # applies to the next take
    limit.take(1000)
    assert stop.waits == [0.5]
