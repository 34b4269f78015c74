"""A volume in several pairs with real nodes (issue 8 item 5): two legs from one volume (sync
and async), a cascade through a middle volume, and SIGKILL at every durable step of adding
and of deleting a leg.  Real nbdkit nodes in network namespaces; every scenario ends with
``pair verify`` of each leg."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from labenv import CHUNK, LabEnv, digest, fill, lab_env, poll_until

from replicator.bitmap_store import BitmapStore
from replicator.events import read_events
from replicator.volume import Volume

pytestmark = pytest.mark.privileged

SMALL = 8 << 20


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    yield from lab_env(tmp_path_factory, "tm")


def verify(env: LabEnv, host: str, target: str) -> int:
    r = env.pv(host, "pair", "verify", target, "--json", ok=False)
    assert r.returncode in (0, 1), r.stderr
    return sum(p["mismatch_count"] for p in json.loads(r.stdout)["pairs"])


def create(env: LabEnv, target: str, primary: str, secondary: str, *extra: str) -> None:
    env.pv(primary[0], "pair", "create", target, "--primary", primary, "--secondary", secondary,
           *extra)  # fmt: skip


def legs_in_table(path: str) -> set[str]:
    with Volume.open(path) as v:
        table = BitmapStore(v.fd, v.header).read_table()
    return set(table.legs) if table is not None else set()


def pairs_of(env: LabEnv, host: str, volume: str) -> set[str]:
    shown = env.control(host, "pair.display")
    return {p["id"] for p in shown["pairs"] if p["volume"] == volume}


def forget(env: LabEnv, *groups: str) -> None:
    for g in groups:
        for host in ("a", "b"):
            env.pv(host, "pair", "delete", g, ok=False)


def test_two_legs_sync_and_async_from_one_volume(env: LabEnv) -> None:
    pa = env.volume("a", "mt", SMALL)
    pb1, pb2 = env.volume("b", "mt1", SMALL), env.volume("b", "mt2", SMALL)
    fill(env, "a", "mt", SMALL, seed=5)
    create(env, "mtn/x", "a:mt", "b:mt1")
    create(env, "mtf/x", "a:mt", "b:mt2", "--mode", "async")
    env.wait("a", "mtn/x", "PAIR")
    env.wait("a", "mtf/x", "PAIR")
    h = env.connect("a", "mt")
    try:
        for i in range(64):
            h.pwrite(os.urandom(4096), (i * 37 % 120) * CHUNK + 512 * (i % 8))
        h.flush()
    finally:
        h.shutdown()
    assert verify(env, "a", "mtn/x") == 0
    poll_until(lambda: verify(env, "a", "mtf/x"), lambda n: n == 0, what="far leg applied")
    assert digest(pa) == digest(pb1) == digest(pb2)
    assert legs_in_table(pa) == {"mtn/x", "mtf/x"}
    forget(env, "mtn", "mtf")
    assert legs_in_table(pa) == set()


def test_cascade_through_a_middle_volume(env: LabEnv) -> None:
    """a:c1 -> b:cm (sync), b:cm -> a:c2 (async): what a writes to c1 reaches c2 via b."""
    p1, pm, p2 = (
        env.volume("a", "c1", SMALL),
        env.volume("b", "cm", SMALL),
        env.volume("a", "c2", SMALL),
    )
    fill(env, "a", "c1", SMALL, seed=6)
    create(env, "cb/x", "b:cm", "a:c2", "--mode", "async")
    env.wait("b", "cb/x", "PAIR")
    create(env, "ca/x", "a:c1", "b:cm")
    env.wait("a", "ca/x", "PAIR")
    env.write("a", "c1", 3 * CHUNK + 100, os.urandom(2 * CHUNK))
    assert verify(env, "a", "ca/x") == 0
    poll_until(lambda: verify(env, "b", "cb/x"), lambda n: n == 0, what="cascade applied")
    assert digest(p1) == digest(pm) == digest(p2)
    forget(env, "ca", "cb")


def _restart_if_crashed(env: LabEnv, victim: str, mark: int) -> bool:
    """Did ``victim`` die at its armed step since ``mark``?  Then restart it; else disarm."""
    logged = read_events(env.events_path(victim))[mark:]
    if any(e.get("event") == "debug.crash" for e in logged):
        env.kill(victim)  # the node is gone; sweep up anything left
        env.start(victim)
        return True
    env.control(victim, "debug.crash-at", step=0)
    return False


def _first_leg(env: LabEnv, g1: str, seed: int) -> tuple[str, str]:
    """Volume ``{g1}v`` on a (with two spare volumes on b), in leg ``g1/x`` to b."""
    vol = f"{g1}v"
    pa = env.volume("a", vol, SMALL)
    env.volume("b", f"{vol}1", SMALL)
    env.volume("b", f"{vol}2", SMALL)
    fill(env, "a", vol, SMALL, seed=seed)
    create(env, f"{g1}/x", f"a:{vol}", f"b:{vol}1")
    return vol, pa


def _first_leg_goes_on(env: LabEnv, g1: str, vol: str, where: str) -> None:
    """Leg g1 still replicates and verifies (a restart with writes in flight suspends it:
    a resync brings it back), then it is deleted."""
    if env.side("a", f"{g1}/x")["state"] != "PAIR":
        env.pv("a", "pair", "resync", g1, ok=False)
    env.wait("a", f"{g1}/x", "PAIR")
    env.write("a", vol, CHUNK, os.urandom(CHUNK))
    assert verify(env, "a", f"{g1}/x") == 0, where
    forget(env, g1)


def _crash_add(env: LabEnv, victim: str, step: int) -> bool:
    """Leg g1 in PAIR; ``victim`` dies at its ``step``-th durable write while leg g2 is added
    to the same volume.  After the restart g1 is intact, the table names no leg without a
    pair, and g2 can be removed.  False once the create completed without that step."""
    g1, g2 = f"ka{victim}{step}", f"kb{victim}{step}"
    vol, pa = _first_leg(env, g1, step)
    env.wait("a", f"{g1}/x", "PAIR")
    mark = env.mark(victim)
    env.control(victim, "debug.crash-at", step=step)
    env.pv("a", "pair", "create", f"{g2}/x", "--primary", f"a:{vol}", "--secondary",
           f"b:{vol}2", ok=False)  # fmt: skip
    crashed = _restart_if_crashed(env, victim, mark)
    where = f"adding a leg, {victim} killed at step {step}"
    assert legs_in_table(pa) <= pairs_of(env, "a", vol) | {f"{g1}/x"}, where
    assert f"{g1}/x" in pairs_of(env, "a", vol), where
    forget(env, g2)
    assert legs_in_table(pa) == {f"{g1}/x"}, where
    _first_leg_goes_on(env, g1, vol, where)
    return crashed


def _crash_delete(env: LabEnv, victim: str, step: int) -> bool:
    """Two legs; ``victim`` dies at its ``step``-th durable write while one is deleted; the
    other leg is intact and its slots are its own."""
    g1, g2 = f"kd{victim}{step}", f"ke{victim}{step}"
    vol, pa = _first_leg(env, g1, step)
    create(env, f"{g2}/x", f"a:{vol}", f"b:{vol}2")
    env.wait("a", f"{g1}/x", "PAIR")
    env.wait("a", f"{g2}/x", "PAIR")
    mark = env.mark(victim)
    env.control(victim, "debug.crash-at", step=step)
    env.pv("a", "pair", "delete", g2, ok=False)
    crashed = _restart_if_crashed(env, victim, mark)
    where = f"deleting a leg, {victim} killed at step {step}"
    forget(env, g2)
    assert legs_in_table(pa) == {f"{g1}/x"}, where
    _first_leg_goes_on(env, g1, vol, where)
    return crashed


@pytest.mark.slow
@pytest.mark.parametrize("op", ["add", "delete"])
@pytest.mark.parametrize("victim", ["a", "b"])
def test_kill_at_every_durable_step_of_a_second_leg(env: LabEnv, op: str, victim: str) -> None:
    run = _crash_add if op == "add" else _crash_delete
    step = 1
    while run(env, victim, step):
        step += 1
        assert step < 20, "more durable steps than expected"
    print(f"{op} a leg, {victim}: killed at each of {step - 1} durable steps")
    assert step > 1, f"{op} made no durable step on {victim}: nothing was tested"
