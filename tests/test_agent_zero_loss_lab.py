"""The agent's failover with zero data loss (issue 11, item 7; SPEC 4), in a lab: real etcd,
real agents, real nodes in namespaces.

The scenario: an async pair g/p1 (a -> b) under resource r1, its bandwidth limited to
1 MiB/s both ways (``--max-rate``: the link is slow, as HUR's path limit models it), so
that a backlog of several MiB builds behind a filler and a stamped writer on a.  Only a's
agent is killed: a's node stops the writes by its watchdog and still answers.  b's agent
fails over through ``pair takeover``, which fences a, takes what b lacks and pulls it in the
background while b serves I/O (``SVOL-takeover``, zero data loss).  Every acknowledged
stamp reads back on b while the pull still runs (those chunks fetched on demand, since the
pull goes lowest chunk first and the stamps sit at the top of the volume); writes made on b
into chunks not pulled yet survive the pull; the pair ends reversed in PAIR and verified.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from labenv import CHUNK, SIZE, lab_of, nbd, poll_until
from test_agent_lab import BLOCK, NBLOCKS, Agents, Writer, stamp

from pairvol import lab as labmod
from replicator.events import read_events

pytestmark = pytest.mark.timeout(300)

PID = "gz/p1"
GROUP = "gz"
RATE = "1M"
FILL = 8 << 20  # the filler's bytes at the start of the volume: the backlog's bulk
TOP = SIZE - NBLOCKS * BLOCK  # the stamped writer's area: the volume's last chunks
FILL_SEED = 71


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    yield from lab_of(tmp_path_factory, "tz", Agents, cluster=True)


class TopWriter(Writer):
    """test_agent_lab's Writer, its blocks at ``TOP`` (pulled last: the pull goes lowest
    chunk first, so that a read of a stamp meets a chunk still pending)."""

    def run(self) -> None:
        h = self.env.connect(self.host, self.volume)
        try:
            while True:
                n = len(self.log) + 1
                block = self.rng.randrange(NBLOCKS)
                self.log.append(block)
                h.pwrite(stamp(self.base + n), TOP + block * BLOCK)
                with self.cond:
                    self.acked, self.acked_at = n, time.time()
                    self.cond.notify_all()
        except nbd.Error:
            pass  # the node's watchdog refuses the writes once the agent is gone
        finally:
            with self.cond:
                self.ended = True
                self.cond.notify_all()
            with contextlib.suppress(Exception):
                h.shutdown()


def check_top_stamps(env: Agents, host: str, writer: Writer) -> None:
    """test_agent_lab's check_stamps over ``TOP``: each block holds its last acknowledged
    stamp, or a later one of that very block (in flight when the writes stopped)."""
    last = [0] * NBLOCKS
    for n, block in enumerate(writer.log[: writer.acked], start=1):
        last[block] = n
    h = env.connect(host, "v1")
    try:
        for block in range(NBLOCKS):
            got = int.from_bytes(h.pread(8, TOP + block * BLOCK), "little") - writer.base
            if not 0 < got <= len(writer.log):
                assert last[block] == 0, f"block {block}: acknowledged {last[block]}, lost"
                continue
            assert got >= last[block], f"block {block}: stamp {got}, acknowledged {last[block]}"
            assert writer.log[got - 1] == block, f"block {block}: stamp {got} of another block"
    finally:
        h.shutdown()


def filler() -> bytes:
    """What labenv.fill writes with FILL_SEED, MiB by MiB."""
    rng = random.Random(FILL_SEED)
    return b"".join(rng.randbytes(1 << 20) for _ in range(FILL >> 20))


def fill(env: Agents, host: str, data: bytes) -> None:
    h = env.connect(host, "v1")
    try:
        for off in range(0, len(data), 1 << 20):
            h.pwrite(data[off : off + (1 << 20)], off)
        h.flush()
    finally:
        h.shutdown()


def read_fill(env: Agents, host: str) -> bytes:
    h = env.connect(host, "v1")
    try:
        return b"".join(h.pread(1 << 20, off) for off in range(0, FILL, 1 << 20))
    finally:
        h.shutdown()


def hydration(env: Agents, host: str) -> dict[str, Any] | None:
    (side,) = env.control(host, "pair.display", target=PID)["pairs"]
    h = side["hydration"]
    return None if h is None else dict(h)


def agent_mark(env: Agents, host: str) -> int:
    return len(read_events(env.agent_events(host)))


def _reversed_pair(env: Agents, host: str, after: int) -> None:
    """The pull done, the node swaps back on its own (issue 11, item 5; ``pair.reverse``):
    the pair ends reversed in PAIR with ``host`` its primary."""
    env.wait_event(host, "pair.pull.done", after=after, pair=PID, timeout=60)
    env.wait_event(host, "pair.reverse", after=after, target=GROUP, timeout=30)
    env.wait(host, PID, "PAIR", timeout=60)
    (side,) = env.control(host, "pair.display", target=PID)["pairs"]
    assert side["role"] == "primary", side


def test_an_agent_killed_alone_fails_over_with_zero_data_loss(env: Agents) -> None:
    # The pair is created from b, then swapped to a with the same limit: both sides carry
    # it, a's shipping (a backlog builds) and b's pull after the takeover (it lasts seconds).
    for host in ("a", "b"):
        env.volume(host, "v1")
    env.pv("b", "pair", "create", PID, "--primary", "b:v1", "--secondary", "a:v1",
           "--mode", "async", "--max-rate", RATE)  # fmt: skip
    env.wait("b", PID, "PAIR")
    env.pv("b", "pair", "split", GROUP)
    env.pv("a", "pair", "resync", GROUP, "--swap", "--max-rate", RATE)
    env.wait("a", PID, "PAIR")
    env.cluster("a", "resource", "create", "r1", "--group", GROUP, "--hosts", "a,b")
    env.wait_agent("a", "cluster.active", resource="r1")
    env.wait_agent("b", "cluster.standby", resource="r1")

    writer = TopWriter(env, "a", "v1", seed=int(os.environ.get("PAIRVOL_TEST_SEED", "1")))
    writer.start()
    writer.wait_acked(50)
    truth = bytearray(filler())
    fill(env, "a", bytes(truth))  # 8 MiB at once, shipped at 1 MiB/s
    writer.wait_acked(writer.acked + 200)  # stamps behind the filler in the journal
    (side,) = env.control("a", "pair.display", target=PID)["pairs"]
    assert side["journal"]["backlog_bytes"] >= 4 << 20, side["journal"]  # several MiB unsent

    mark_b, node_b = agent_mark(env, "b"), env.mark("b")
    labmod.kill_host(env.name, "a", only="agent")  # a's node lives on, and answers
    writer.wait_ended()  # a's node refuses the writes by its watchdog
    active = env.wait_agent("b", "cluster.active", resource="r1", after=mark_b)
    # The zero-loss path: the name horctakeover gives it, and the report beside it.
    assert active["takeover"] == {GROUP: "SVOL-takeover"}
    assert active["zero_loss"] is True
    report = active["takeover_report"][GROUP]
    assert report["zero_loss"] is True and report["fenced_old_primary"] is True, report
    assert report["pulled_chunks"] > 0, report

    # Every acknowledged stamp reads back on b while the pull is still under way; the
    # chunks of the stamps, at the top, are pulled last: those reads fetch them on demand.
    before = hydration(env, "b")
    assert before is not None and before["pending_chunks"] > 0, before
    check_top_stamps(env, "b", writer)
    during = hydration(env, "b")
    assert during is not None and during["pending_chunks"] > 0, during
    assert during["fetched_on_demand"] > before["fetched_on_demand"], (before, during)
    env.forbid("b", "pair.pull.done", after=node_b)  # not finished when the stamps were read

    # Writes on b into chunks of the filler not pulled yet: each is fetched, then merged;
    # the pull must never bring a's older data over them.
    pending = hydration(env, "b")
    assert pending is not None
    h = env.connect("b", "v1")
    try:
        for n, chunk in enumerate(range(FILL // CHUNK - 1, FILL // CHUNK - 40, -8), start=1):
            at = chunk * CHUNK + 1000
            data = stamp(10**9 + n)[: 3 * 1024]
            h.pwrite(data, at)
            truth[at : at + len(data)] = data
        h.flush()
    finally:
        h.shutdown()
    after = hydration(env, "b")
    assert after is not None, "the pull ended before the writes since the takeover"
    assert after["fetched_on_demand"] > pending["fetched_on_demand"], (pending, after)

    # cluster status on b: a takeover with zero data loss, and the pull, live.
    (res,) = json.loads(env.cluster("b", "status", "--json").stdout)["resources"]
    assert res["active"] == "b" and res["takeover"]["zero_loss"] is True, res
    assert res["takeover"]["groups"] == {GROUP: "SVOL-takeover"}
    assert res["takeover"]["report"][GROUP]["pulled_chunks"] == report["pulled_chunks"]
    (shown,) = res["hydration"]
    assert shown["pair"] == PID and shown["pending_chunks"] > 0, shown
    text = env.cluster("b", "status").stdout
    assert "SVOL-takeover (zero data loss)" in text and f"r1 {PID}: hydrating" in text, text

    env.wait_event("b", "pair.pull.done", after=node_b, pair=PID, timeout=60)
    poll_until(lambda: hydration(env, "b"), lambda x: x is None, what="b consistent")
    assert read_fill(env, "b") == truth  # a's filler, with b's writes over it
    check_top_stamps(env, "b", writer)

    _reversed_pair(env, "b", after=node_b)
    r = env.pv("b", "pair", "verify", PID, "--json", ok=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_fill(env, "b") == truth  # and a holds the same: verified
