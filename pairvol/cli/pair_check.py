"""``pairvol pair check``: HORCM's ``pairvolchk -ss``, its state as the exit status.

A HORCM script reads a volume's pair state from ``pairvolchk -ss``'s return value; the same
values come back here, so such a script ports over by changing the command:

- 11: SMPL (the volume is in no pair);
- sync pairs (TrueCopy's values): P-VOL 22 COPY, 23 PAIR, 24 PSUS, 25 PSUE; S-VOL 32 COPY,
  33 PAIR, 34 PSUS, 35 PSUE;
- async pairs (TrueCopy Async / Universal Replicator: 20 more, with the journal's states):
  P-VOL 42 COPY, 43 PAIR, 44 PSUS, 45 PSUE, 47 PFUL, 48 PFUS; S-VOL 52, 53, 54, 55, 57, 58;
- SSWS, which pairvolchk folds into S-VOL PSUS, has a value of its own: 37 (sync), 59 (async).

A group's state is the truth table of ``pairvolchk -ss``: COPY if any pair copies, else
PSUE, else PFUL, else PAIR, else PFUS, else PSUS, else SSWS.  A failure exits as every
pairvol command does (2 to 9, 20, 21: none of them a state's value), with one line on
stderr.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from replicator import control
from replicator.errors import IllegalState, NotFound, UsageError
from replicator.pair.names import split_pair_id
from replicator.pair_state import State

SMPL_CODE = 11
_BASE = {("primary", "sync"): 20, ("secondary", "sync"): 30}
_BASE |= {("primary", "async"): 40, ("secondary", "async"): 50}
_OFFSET = {State.COPY: 2, State.PAIR: 3, State.PSUS: 4, State.PSUE: 5, State.PFUL: 7}
_OFFSET |= {State.PFUS: 8}
SSWS_CODE = {"sync": 37, "async": 59}
#: pairvolchk -ss's group status: the first of these that any pair of the group is in.
GROUP_ORDER = (State.COPY, State.PSUE, State.PFUL, State.PAIR, State.PFUS, State.PSUS, State.SSWS)


def check_code(role: str, state: State, mode: str) -> int:
    """The exit status of one side: ``role`` primary/secondary, ``mode`` sync/async."""
    if state is State.SMPL:
        return SMPL_CODE
    if state is State.SSWS:
        return SSWS_CODE[mode]
    base = _BASE.get((role, mode))
    offset = _OFFSET.get(state)
    if base is None or offset is None:
        raise IllegalState(f"no pairvolchk value for a {mode} {role} in {state}")
    if mode == "sync" and state in (State.PFUL, State.PFUS):
        raise IllegalState(f"a sync pair is never {state}")
    return base + offset


def group_state(states: Iterable[State]) -> State:
    """The group's state from its pairs' (``pairvolchk -ss``'s truth table)."""
    seen = set(states)
    for state in GROUP_ORDER:
        if state in seen:
            return state
    return State.SMPL


def register(ps: Any, node_opt: Any, require_control: Callable[[str | None], str]) -> None:
    """``pair check`` under ``pair`` (``require_control``: the node's control socket from
    ``--node`` or the environment, as every ``pair`` command finds it)."""
    c = ps.add_parser(
        "check",
        help="pairvolchk -ss: the pair's state as the exit status (table in README)",
    )
    c.add_argument("target", nargs="?", metavar="GROUP[/PAIR]")
    c.add_argument("--volume", help="the pair of this node's volume instead (SMPL: 11)")
    c.add_argument(
        "--role",
        choices=["primary", "secondary"],
        help="of a pair with both sides on this node, which one (default primary)",
    )
    node_opt(c)
    c.set_defaults(func=cmd_check, require_control=require_control)


def cmd_check(args: argparse.Namespace) -> int:
    if (args.target is None) == (args.volume is None):
        raise UsageError("pair check needs GROUP[/PAIR] or --volume NAME, one of them")
    if args.target is not None:
        split_pair_id(args.target)
    where = args.require_control(args.node)
    shown = control.call(where, "pair.display", {"target": args.target} if args.target else {}, 10)
    sides: list[dict[str, Any]] = shown["pairs"]
    if args.volume is not None:
        sides = [s for s in sides if s["volume"] == args.volume]
        if not sides:
            print(f"volume {args.volume}: SMPL")
            return SMPL_CODE
    chosen = _one_side_per_pair(sides, args.role)
    roles = {s["role"] for s in chosen}
    modes = {s["mode"] for s in chosen}
    if len(roles) > 1 or len(modes) > 1:
        what = " and ".join(sorted(roles | modes))
        raise IllegalState(f"{args.target or args.volume}: its pairs are {what}: check one pair")
    state = group_state(State(s["state"]) for s in chosen)
    role, mode = roles.pop(), modes.pop()
    code = check_code(role, state, mode)
    vol = "P-VOL" if role == "primary" else "S-VOL"
    print(f"{args.target or args.volume}: {vol} {state} ({mode}): {code}")
    return code


def _one_side_per_pair(sides: Sequence[dict[str, Any]], role: str | None) -> list[dict[str, Any]]:
    """This node's side of each pair; of a local pair (both sides here) the one in ``role``
    (the primary unless told)."""
    by_pair: dict[str, list[dict[str, Any]]] = {}
    for s in sides:
        by_pair.setdefault(s["id"], []).append(s)
    out = []
    for pid, mine in sorted(by_pair.items()):
        if role is not None:
            wanted = [s for s in mine if s["role"] == role]
            if not wanted:
                raise NotFound(f"pair {pid} has no {role} side on this node")
            mine = wanted
        mine.sort(key=lambda s: s["role"] != "primary")
        out.append(mine[0])
    if not out:
        raise NotFound("no such pair on this node")
    return out
