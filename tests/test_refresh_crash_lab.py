"""SPEC 3's recovery in a lab: an agent SIGKILLed at every flag value of the refresh exchange.

One resource r1 on hosts a and b, owning the sync pair g1/p1 and a PVID-cache device pv1 on
each host.  For each flag (A1, A2, A3 on the active; B1, B2, B3 on the standby) and each
operation (``cluster split``, ``cluster resync``), the agent holding that flag kills itself
right after saving it (the driver's fault-injection file), and is started again.  The
survivor and the restarted agent finish the work from their flags, whether the resource
failed over meanwhile or not: every flag ends at 0 on both hosts, the active host has its
device attached (PVID-checked), and the standby's cached identity of its S-VOL is either
absent or the volume's true PVID, never a stale one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labenv import lab_of, poll_until
from test_agent_lab import Agents
from test_refresh_lab import agent_status, all_flags_zero, cache, export, ready

from cluster.refresh_driver import CRASH_FILE
from pairvol import lab as labmod
from replicator.events import read_events

pytestmark = pytest.mark.timeout(600)

FLAGS = ("A1", "A2", "A3", "B1", "B2", "B3")
CASES = [(op, flag) for flag in FLAGS for op in ("split", "resync")]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    for e in lab_of(tmp_path_factory, "tk", Agents, cluster=True, programs=("nbdfuse",)):
        e.volume("a", "v1")
        e.volume("b", "v1")
        e.pv("a", "pair", "create", "g1/p1", "--primary", "a:v1", "--secondary", "b:v1",
             "--fence", "data")  # fmt: skip
        e.wait("a", "g1/p1", "PAIR")
        e.cluster("a", "resource", "create", "r1", "--group", "g1", "--hosts", "a,b",
                  "--device", f"a:pv1={export(e, 'a', 'v1')}",
                  "--device", f"b:pv1={export(e, 'b', 'v1')}")  # fmt: skip
        e.wait_agent("a", "cluster.active", resource="r1")
        yield e


def active(env: Agents) -> str:
    def leader() -> Any:
        for host in ("a", "b"):
            r = env.cluster(host, "status", "--json", ok=False)
            if r.returncode == 0:
                return json.loads(r.stdout)["resources"][0]["active"]
        return None

    found: str = poll_until(leader, lambda h: h in ("a", "b"), what="an active host", timeout=60)
    return found


def settled(env: Agents, *, refreshed: bool = True) -> tuple[str, str]:
    """Wait until r1 runs somewhere, both agents are at rest (flags 0) and the active is
    ready; with ``refreshed``, the standby too (SPEC 3: a standby is ready only once an
    exchange refreshed it, so not right after a failover made it one); (active, standby)."""
    act = active(env)
    sb = "b" if act == "a" else "a"
    for host in (act, sb):
        want_ready = refreshed or host == act
        try:
            poll_until(lambda host=host, w=want_ready: all_flags_zero(env, host)
                       and (ready(env, host, "r1") or not w),
                       bool, what=f"{host}: flags 0" + (" and ready" if want_ready else ""),
                       timeout=60)  # fmt: skip
        except AssertionError as e:
            status = agent_status(env, host)
            events = {h: read_events(env.agent_events(h))[-25:] for h in (act, sb)}
            raise AssertionError(f"{e}; status: {status}; events: {events}") from None
    return act, sb


def paired(env: Agents) -> str:
    """Bring g1/p1 back to PAIR with the active host's side the primary; the active."""
    act, _ = settled(env, refreshed=False)
    row = env.side(act, "g1/p1")
    if row["primary"] != f"{act}:v1":  # a failover left the active's side SSWS
        env.pv(act, "pair", "resync", "g1", "--swap")
        env.wait(act, "g1/p1", "PAIR")
    elif row["state"] != "PAIR":
        env.cluster(act, "resync", "r1")
        env.wait(act, "g1/p1", "PAIR")
    return act


def normalize(env: Agents, want: str) -> tuple[str, str]:
    """Bring g1/p1 back to PAIR with the active host's side the primary and both caches
    true (a cluster split then a cluster resync), then split it if ``want`` is PSUS."""
    act = paired(env)
    env.cluster(act, "split", "r1")
    env.cluster(act, "resync", "r1")
    env.wait(act, "g1/p1", "PAIR")
    if want == "PSUS":
        env.cluster(act, "split", "r1")
    return settled(env)


def check_caches(env: Agents) -> None:
    """The active's device attached under its volume's PVID; the standby's S-VOL entry
    absent or true."""
    act, sb = settled(env, refreshed=False)
    row = env.side(act, "g1/p1")
    pvid = {row["primary"].split(":")[0]: row["pvid_primary"],
            row["secondary"].split(":")[0]: row["pvid_secondary"]}  # fmt: skip
    mine = cache(env, act)["pv1"]
    assert mine.attachment is not None and mine.pvid == pvid[act], (act, mine)
    theirs = cache(env, sb).get("pv1")
    assert theirs is None or theirs.pvid == pvid[sb], (sb, theirs, pvid)
    assert theirs is None or theirs.attachment is None


@pytest.mark.parametrize(("op", "flag"), CASES, ids=[f"{o}-{f}" for o, f in CASES])
def test_an_agent_killed_at_each_flag_recovers_both_caches(env: Agents, op: str, flag: str) -> None:
    try:
        act, sb = normalize(env, "PAIR" if op == "split" else "PSUS")
    except AssertionError as e:
        tails = {h: read_events(env.agent_events(h))[-30:] for h in ("a", "b")}
        raise AssertionError(f"{e}; the agents' last events: {tails}") from None
    victim = act if flag.startswith("A") else sb
    state = labmod.agent_dir(env.host(victim))
    mark = len(read_events(os.path.join(state, "events.jsonl")))
    Path(state, CRASH_FILE).write_text(flag + "\n")
    env.cluster(act, op, "r1", "--timeout", "20", ok=False)  # its agent may die under it
    crash = env.wait_agent(victim, "refresh.crash", after=mark)
    assert crash["flag"] == flag and crash["pair"] == "g1/p1"
    poll_until(lambda: labmod.agent_pid(env.host(victim)), lambda pid: pid is None,
               what=f"the agent of {victim} gone")  # fmt: skip
    assert not Path(state, CRASH_FILE).exists()
    labmod.start_host(env.name, victim)
    check_caches(env)
    act = paired(env)  # and the volumes are identical once paired again
    r = env.pv(act, "pair", "verify", "g1/p1", "--json", ok=False)
    assert r.returncode == 0, r.stdout + r.stderr
