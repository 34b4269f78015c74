"""Liveness of a peer link (replicator/liveness.py): a scripted clock, no sleeping.

Every test starts at now = 0.0 and asserts get_timer() exactly, as aioquic's tests do.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from replicator.errors import UsageError
from replicator.liveness import LinkState, Liveness, Lost, SendPing, Timers, earliest

TIMEOUT_REASON = "peer not heard from for 5s (heartbeat timeout)"


def test_a_quiet_link_pings_every_interval_then_is_lost_after_the_timeout() -> None:
    live = Liveness(1.0, 5.0, 0.0)
    assert live.state is LinkState.UP
    assert live.get_timer() == 1.0
    assert live.handle_timer(0.5) == []
    assert live.get_timer() == 1.0
    for t in (1.0, 2.0, 3.0, 4.0):
        assert live.handle_timer(t) == [SendPing()]
        assert live.get_timer() == t + 1.0
    # The fifth ping and the timeout fall due together: Lost first, then the probe.
    assert live.handle_timer(5.0) == [Lost(TIMEOUT_REASON), SendPing()]
    assert live.state is LinkState.DOWN
    assert live.get_timer() == 6.0
    assert live.handle_timer(6.0) == [SendPing()]  # probing while down
    assert live.get_timer() == 7.0


def test_hearing_the_peer_pushes_the_deadline() -> None:
    live = Liveness(1.0, 5.0, 0.0)
    assert live.handle_timer(1.0) == [SendPing()]
    live.heard(1.25)  # the Pong
    assert live.get_timer() == 2.0
    for t in (2.0, 3.0, 4.0, 5.0, 6.0):
        assert live.handle_timer(t) == [SendPing()]
    assert live.get_timer() == 6.25
    assert live.handle_timer(6.25) == [Lost(TIMEOUT_REASON)]
    assert live.get_timer() == 7.0


def test_traffic_sent_is_a_keepalive_so_no_ping_is_needed() -> None:
    live = Liveness(1.0, 5.0, 0.0)
    live.sent(0.75)
    live.heard(0.8)
    assert live.get_timer() == 1.75
    assert live.handle_timer(1.0) == []
    assert live.handle_timer(1.75) == [SendPing()]
    assert live.get_timer() == 2.75


def test_a_failed_request_loses_the_link_at_once_and_only_once() -> None:
    live = Liveness(1.0, 5.0, 0.0)
    assert live.failed(0.5, "connection refused") == [Lost("connection refused")]
    assert live.state is LinkState.DOWN
    assert live.failed(0.6, "again") == []
    assert live.get_timer() == 1.0
    assert live.handle_timer(20.0) == [SendPing()]  # never Lost twice
    assert live.get_timer() == 21.0


def test_restored_starts_a_fresh_deadline() -> None:
    live = Liveness(1.0, 5.0, 0.0, up=False)
    assert live.state is LinkState.DOWN
    assert live.get_timer() == 1.0
    live.heard(0.5)  # a stray message while down restores nothing by itself
    assert live.state is LinkState.DOWN
    assert live.handle_timer(1.0) == [SendPing()]
    live.restored(1.5)
    assert live.state is LinkState.UP
    assert live.get_timer() == 2.5
    for t in (2.5, 3.5, 4.5, 5.5):
        assert live.handle_timer(t) == [SendPing()]
    assert live.get_timer() == 6.5
    assert live.handle_timer(6.5) == [Lost(TIMEOUT_REASON), SendPing()]


def test_the_clock_never_goes_backwards() -> None:
    live = Liveness(1.0, 5.0, 0.0)
    live.heard(3.0)
    live.heard(1.0)  # late report of an earlier message: the deadline stays at 8.0
    live.sent(3.0)
    assert live.get_timer() == 4.0
    assert live.handle_timer(2.0) == []  # "2.0" is 3.0 now
    assert live.handle_timer(4.0) == [SendPing()]
    assert live.get_timer() == 5.0


@pytest.mark.parametrize(
    ("interval", "timeout", "now"),
    [
        (0.0, 5.0, 0.0),
        (5.0, 5.0, 0.0),
        (6.0, 5.0, 0.0),
        (-1.0, 5.0, 0.0),
        (1.0, float("inf"), 0.0),
        (float("nan"), 5.0, 0.0),
        (1.0, 5.0, float("nan")),
    ],
)
def test_parameters_are_checked(interval: float, timeout: float, now: float) -> None:
    with pytest.raises(UsageError):
        Liveness(interval, timeout, now)


def test_earliest_and_timers_arm_one_timer_for_several_cores() -> None:
    assert earliest([]) is None
    assert earliest([None, None]) is None
    assert earliest([None, 3.0, 1.5, 2.0]) == 1.5
    a, b = Liveness(1.0, 5.0, 0.0), Liveness(0.25, 30.0, 0.0)
    timers = Timers()
    assert timers.armed is None
    assert timers.update([a.get_timer(), b.get_timer(), None])
    assert timers.armed == 0.25
    assert not timers.update([a.get_timer(), b.get_timer()])  # unchanged: do not re-arm
    assert b.handle_timer(0.25) == [SendPing()]
    assert timers.update([a.get_timer(), b.get_timer()])
    assert timers.armed == 0.5
    assert timers.update([None])
    assert timers.armed is None


@settings(max_examples=200, deadline=None)
@given(delays=st.lists(st.floats(0.0, 3.9, allow_nan=False), min_size=1, max_size=40))
def test_a_peer_that_answers_every_ping_in_time_is_never_lost(delays: list[float]) -> None:
    """Each Pong comes back within timeout - interval: the link never goes down."""
    live = Liveness(1.0, 5.0, 0.0)
    now, pongs, sent = 0.0, list[float](), 0
    while now < 60.0:
        deadline = live.get_timer()
        assert deadline is not None
        if pongs and pongs[0] <= deadline:
            now = pongs.pop(0)
            live.heard(now)
            continue
        now = max(now, deadline)
        for action in live.handle_timer(now):
            assert action == SendPing()
            live.sent(now)
            pongs.append(now + delays[sent % len(delays)])
            pongs.sort()
            sent += 1
    assert live.state is LinkState.UP
    assert sent >= 59


class LivenessModel(RuleBasedStateMachine):
    """Random heard/sent/failed/restored/timer calls against a scripted clock, with a naive
    model of the two deadlines."""

    @initialize(up=st.booleans())
    def start(self, up: bool) -> None:
        self.live = Liveness(1.0, 5.0, 0.0, up=up)
        self.now = 0.0
        self.up = up
        self.heard_at = 0.0
        self.sent_at = 0.0

    @rule(dt=st.floats(0.0, 7.0, allow_nan=False))
    def wait(self, dt: float) -> None:
        self.now += dt

    @rule()
    def heard(self) -> None:
        self.live.heard(self.now)
        if self.up:
            self.heard_at = self.now

    @rule()
    def sent(self) -> None:
        self.live.sent(self.now)
        self.sent_at = self.now

    @rule()
    def failed(self) -> None:
        assert self.live.failed(self.now, "x") == ([Lost("x")] if self.up else [])
        self.up = False

    @rule()
    def restored(self) -> None:
        self.live.restored(self.now)
        self.up, self.heard_at, self.sent_at = True, self.now, self.now

    @rule()
    def timer(self) -> None:
        expected: list[Lost | SendPing] = []
        if self.up and self.now >= self.heard_at + 5.0:
            self.up = False
            expected.append(Lost(TIMEOUT_REASON))
        if self.now >= self.sent_at + 1.0:
            self.sent_at = self.now
            expected.append(SendPing())
        assert self.live.handle_timer(self.now) == expected

    @rule()
    def wake_at_timer(self) -> None:
        deadline = self.live.get_timer()
        assert deadline is not None
        self.now = max(self.now, deadline)
        self.timer()

    @invariant()
    def matches_the_model(self) -> None:
        assert self.live.up is self.up
        ping_at = self.sent_at + 1.0
        want = min(ping_at, self.heard_at + 5.0) if self.up else ping_at
        assert self.live.get_timer() == want


LivenessModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_liveness_random_sequences = LivenessModel.TestCase
