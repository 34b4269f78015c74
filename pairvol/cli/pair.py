"""``pairvol pair``: HORCM-style pair commands (paircreate, pairsplit, pairresync, ...).

The CLI talks to nodes through their control sockets.  Which node:

* ``pair create`` goes to the primary's node.  ``NODE`` in ``NODE:VOLUME`` is a node name
  (looked up in the labs on this machine, or the node in ``--node``/$PAIRVOL_NODE_DIR), or
  ``ADDR[:PORT]`` (the node's replication address; the command must then run against the
  primary's own node).
* the other commands go to ``--node``/$PAIRVOL_NODE_DIR; split and resync are carried out by
  the primary, so when this node holds the secondary and the primary's node is known (a lab),
  the command is forwarded there.
* ``pair display`` without a node shows every lab node on this machine, one row per pair with
  both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

from pairvol.cli import pair_check
from pairvol.cli.common import print_json, print_table
from pairvol.cli.node import NODE_DIR_ENV
from pairvol.cli.progress import WaitProgress
from replicator import control
from replicator.compression import CODECS, NONE
from replicator.errors import (
    ConnectionFailed,
    HeaderCorrupt,
    NotFound,
    Timeout,
    UsageError,
)
from replicator.header import check_name
from replicator.node import CONTROL_SOCKET, PEER_PORT
from replicator.node_table import NODES_ENV, NODES_FILE, is_address, load_node_table, parse_address
from replicator.pair.names import split_pair_id
from replicator.pair_state import DEFAULT_CHUNK, Fence, Mode, State
from replicator.sizes import format_size, parse_size


@dataclass(frozen=True)
class NodeSpec:
    name: str  # "" when given as an address
    host: str
    peer_port: int
    control: str | None  # control socket, when the node is on this machine


def _local_control(explicit: str | None) -> str | None:
    chosen = explicit or os.environ.get(NODE_DIR_ENV)
    return os.path.join(os.path.abspath(chosen), CONTROL_SOCKET) if chosen else None


def _require_control(explicit: str | None) -> str:
    path = _local_control(explicit)
    if path is None:
        raise UsageError(f"which node? give --node DIR or set {NODE_DIR_ENV}")
    return path


def _lab_hosts() -> list[Any]:
    try:
        from pairvol import lab
    except ImportError:  # pragma: no cover - the lab module ships with pairvol
        return []
    hosts = []
    for name in lab.names():
        try:
            hosts.extend(lab.load(name).hosts)
        except (NotFound, UsageError):
            continue
    return hosts


def _lab_node(name: str) -> NodeSpec | None:
    try:
        from pairvol import lab
    except ImportError:  # pragma: no cover
        return None
    h = lab.resolve_node(name)
    if h is None:
        return None
    return NodeSpec(h.host, h.address, h.peer_port, h.control)


def read_nodes(path: str | None = None) -> dict[str, NodeSpec]:
    """The node table (:mod:`replicator.node_table`: ``$PAIRVOL_NODES`` or /etc/pairvol/nodes),
    each node with its control socket when the table names its directory."""
    return {
        e.name: NodeSpec(
            e.name,
            e.host,
            e.peer_port,
            os.path.join(e.dir, CONTROL_SOCKET) if e.dir is not None else None,
        )
        for e in load_node_table(path)
    }


def resolve_node(text: str, local: str | None) -> NodeSpec:
    """``NODE`` (a lab host, the node table, the local node) or ``ADDR[:PORT]``."""
    found = _lab_node(text) if not is_address(text) else None
    if found is not None:
        return found
    if not is_address(text):
        listed = read_nodes().get(text)
        if listed is not None:
            return listed
    unreachable: ConnectionFailed | None = None
    if local is not None and not is_address(text):
        try:
            status = control.call(local, "node.status", timeout=10)
        except ConnectionFailed as e:
            status, unreachable = None, e
        if status is not None and status["name"] == text:
            return NodeSpec(text, status["listen"], status["peer_port"], local)
    if is_address(text):
        host, port = parse_address(text, PEER_PORT)
        return NodeSpec("", host, port, None)
    if unreachable is not None:
        # It may well be the --node's name: say that the node is down, not that it is unknown.
        raise ConnectionFailed(f"cannot tell which node {text!r} is: {unreachable}")
    raise NotFound(
        f"unknown node {text!r}: not a lab host here, not in the node table "
        f"(${NODES_ENV} or {NODES_FILE}), not the --node, not an address"
    )


def parse_side(text: str, what: str) -> tuple[str, str]:
    node, sep, volume = text.rpartition(":")
    if not sep or not node or not volume:
        raise UsageError(f"{what} {text!r} is not NODE:VOLUME")
    check_name(volume, what="volume name")
    return node, volume


def register(sub: Any) -> None:
    p = sub.add_parser("pair", help="create and manage replicated volume pairs")
    ps = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def node_opt(q: argparse.ArgumentParser) -> None:
        q.add_argument("--node", help=f"node directory to talk to (default ${NODE_DIR_ENV})")

    c = ps.add_parser("create", help="pair two volumes and start the initial copy")
    c.add_argument("target", metavar="GROUP/PAIR")
    c.add_argument("--primary", required=True, metavar="NODE:VOLUME")
    c.add_argument("--secondary", required=True, metavar="NODE:VOLUME")
    c.add_argument("--mode", choices=[m.value for m in Mode], default="sync")
    c.add_argument("--fence", choices=[f.value for f in Fence], default="never")
    c.add_argument("--chunk", default=format_size(DEFAULT_CHUNK), help="copy/bitmap granularity")
    c.add_argument("--auto-resync", action="store_true", help="resync when the link returns")
    c.add_argument("--max-rate", help="bandwidth limit per pair, e.g. 50M (bytes/s): its "
                   "copies and, async, its shipping (the group ships at its lowest)")  # fmt: skip
    c.add_argument("--compress", choices=list(CODECS), default=NONE,
                   help="compress the pair's volume data on the link (default none)")  # fmt: skip
    c.add_argument("--journal-size", help="async: the group journal's size (default 256M)")
    c.add_argument(
        "--high-watermark",
        metavar="PERCENT",
        help="async: PFUL above this journal use, more than 0 and at most 100 (default 80)",
    )
    node_opt(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_create)

    for name, helptext in (
        ("split", "suspend replication; the secondary gets a new PVID and is usable"),
        ("resync", "copy the differences and return to PAIR"),
        ("delete", "dissolve the pair (both sides back to SMPL)"),
    ):
        q = ps.add_parser(name, help=helptext)
        q.add_argument("target", metavar="GROUP[/PAIR]")
        if name == "resync":
            q.add_argument("--swap", action="store_true", help="reverse the direction first")
            q.add_argument("--max-rate", help="bandwidth limit per pair, copies and async "
                           "shipping (bytes/s; 0: none)")  # fmt: skip
        if name == "delete":
            q.add_argument("--force", action="store_true", help="also a side taken over whose "
                           "pull is not done (its image keeps what it never received as it "
                           "was), and here even if the peer refuses")  # fmt: skip
        node_opt(q)
        q.add_argument("--json", action="store_true")
        q.set_defaults(func=cmd_simple, op=f"pair.{name}")

    t = ps.add_parser("takeover", help="make the secondary usable (run on its node)")
    t.add_argument("target", metavar="GROUP[/PAIR]")
    t.add_argument(
        "--force", action="store_true", help="in COPY even if the old primary does not answer"
    )
    t.add_argument("--max-rate", metavar="RATE", help="bandwidth limit of the pull of what "
                   "this side lacks from the old primary (bytes/s, e.g. 50M)")  # fmt: skip
    node_opt(t)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_simple, op="pair.takeover")

    for name, helptext in (
        ("fence", "refuse client writes for the pairs on this node (the cluster agent's fence)"),
        ("unfence", "allow client writes again after a fence"),
        ("watchdog", "arm the cluster agent's watchdog: client writes stop unless re-armed"),
    ):
        q = ps.add_parser(name, help=helptext)
        q.add_argument("target", metavar="GROUP[/PAIR]")
        q.add_argument("--epoch", required=True, help="the cluster epoch (an older one is refused)")
        if name == "fence":
            q.add_argument("--reason", help="said in the log and to every refused client")
        if name == "watchdog":
            w = q.add_mutually_exclusive_group(required=True)
            w.add_argument("--seconds", type=float, help="refuse client writes after this long")
            w.add_argument("--off", action="store_true", help="disarm it")
        node_opt(q)
        q.add_argument("--json", action="store_true")
        q.set_defaults(func=cmd_hold, op=f"pair.{name}")

    v = ps.add_parser("verify", help="compare both sides chunk by chunk (digests only)")
    v.add_argument("target", metavar="GROUP[/PAIR]")
    v.add_argument("--repair", action="store_true", help="mark differing chunks for resync")
    node_opt(v)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    w = ps.add_parser("wait", help="wait until a pair reaches a state")
    w.add_argument("target", metavar="GROUP/PAIR")
    w.add_argument("--state", required=True, choices=[s.value for s in State])
    w.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    w.add_argument(
        "--progress",
        action="store_true",
        help="the copy's (or a takeover's pull's) progress on stderr: a bar on a terminal",
    )
    node_opt(w)
    w.set_defaults(func=cmd_wait)

    pair_check.register(ps, node_opt, _require_control)

    d = ps.add_parser("display", help="pairdisplay: the state of pairs")
    d.add_argument("target", nargs="?", metavar="GROUP[/PAIR]")
    node_opt(d)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_display)


def cmd_create(args: argparse.Namespace) -> int:
    group, pair = split_pair_id(args.target)
    if pair is None:
        raise UsageError(f"{args.target!r}: pair create needs GROUP/PAIR")
    chunk = parse_size(args.chunk)
    if chunk < 4096 or chunk > 16 << 20 or chunk & (chunk - 1):
        raise UsageError(f"--chunk {args.chunk}: a power of two from 4K to 16M")
    if args.mode == "async" and args.fence == "data":
        raise UsageError("--fence data needs --mode sync (an async secondary always lags)")
    if args.mode == "sync" and (args.journal_size is not None or args.high_watermark is not None):
        raise UsageError("--journal-size and --high-watermark are for --mode async")
    if args.journal_size and parse_size(args.journal_size) < 1 << 20:
        raise UsageError(f"--journal-size {args.journal_size}: at least 1M")
    high = None if args.high_watermark is None else parse_percent(args.high_watermark)
    local = _local_control(args.node)
    pnode, pvol = parse_side(args.primary, "--primary")
    snode, svol = parse_side(args.secondary, "--secondary")
    primary = resolve_node(pnode, local)
    secondary = resolve_node(snode, local)
    if (primary.host, primary.peer_port) == (secondary.host, secondary.peer_port) and pvol == svol:
        raise UsageError(f"--primary and --secondary are the same volume ({pnode}:{pvol})")
    where = primary.control or local
    if where is None:
        raise UsageError(
            f"cannot reach the primary's node {pnode}: run this with --node DIR of that node"
        )
    status = control.call(where, "node.status", timeout=10)
    if (primary.name and status["name"] != primary.name) or (
        not primary.name and status["listen"] != primary.host
    ):
        raise UsageError(f"the node at {where} is {status['name']}, not the primary {pnode}")
    result = control.call(
        where,
        "pair.create",
        {
            "group": group,
            "pair": pair,
            "volume": pvol,
            "peer_node": secondary.name,
            "peer_host": secondary.host,
            "peer_port": secondary.peer_port,
            "peer_volume": svol,
            "mode": args.mode,
            "fence": args.fence,
            "chunk": chunk,
            "auto_resync": args.auto_resync,
            "max_rate": _rate(args.max_rate),
            "compress": args.compress,
            "journal_size": parse_size(args.journal_size) if args.journal_size else None,
            "high_watermark": None if high is None else high / 100,  # the node takes 0 < x <= 1
        },
        timeout=120,
    )
    if args.json:
        print_json(result)
    else:
        print(
            f"pair {group}/{pair}: {pnode}:{pvol} -> {snode}:{svol} {args.mode} "
            f"fence={args.fence}: {result['state']} (PVID {result['pvid']})"
        )
    return 0


_PERCENT_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", re.ASCII)


def parse_percent(text: str, what: str = "--high-watermark") -> float:
    """A percentage more than 0 and at most 100, in ASCII digits (``80``, ``62.5``)."""
    raw = text.strip(" ")
    if not _PERCENT_RE.fullmatch(raw):
        raise UsageError(f"{what} {text!r} is not a number; give a percentage like 80")
    value = float(raw)
    if not 0 < value <= 100:
        raise UsageError(f"{what} {text}: the percentage must be more than 0 and at most 100")
    return value


def _rate(text: str | None) -> int:
    if text is None or text == "0":
        return 0
    return parse_size(text)


def _forward_target(local: str, op: str, target: str, swap: bool) -> str:
    """Split and resync run on the primary: forward from the secondary's node if we can."""
    if op not in ("pair.split", "pair.resync") or swap:
        return local
    try:
        shown = control.call(local, "pair.display", {"target": target}, timeout=10)
    except NotFound:
        return local
    pairs = shown["pairs"]
    if pairs and all(p["role"] == "secondary" for p in pairs):
        peers = {p["peer_node"] for p in pairs}
        if len(peers) == 1:
            spec = _lab_node(peers.pop())
            if spec is not None and spec.control:
                return spec.control
    return local


def cmd_simple(args: argparse.Namespace) -> int:
    split_pair_id(args.target)
    local = _require_control(args.node)
    swap = bool(getattr(args, "swap", False))
    where = _forward_target(local, args.op, args.target, swap)
    payload: dict[str, Any] = {"target": args.target}
    if args.op == "pair.resync":
        payload["swap"] = swap
        if args.max_rate is not None:
            payload["max_rate"] = _rate(args.max_rate)
    if args.op in ("pair.takeover", "pair.delete"):
        payload["force"] = args.force
    if args.op == "pair.takeover" and args.max_rate is not None:
        payload["max_rate"] = _rate(args.max_rate)
    result = control.call(where, args.op, payload, timeout=120)
    if args.json:
        print_json(result)
    else:
        for p in result["pairs"]:
            print(f"pair {p['id']}: {p['role']} {p['state']} (PVID {p['pvid']})")
            if p.get("peer_not_told"):
                print(
                    f"  warning: the peer was not told ({p['peer_not_told']}); run the "
                    f"same command for {p['id']} on {p.get('peer', 'the peer')} too",
                    file=sys.stderr,
                )
            if p.get("discarding_chunks"):
                print(f"  overwrote {p['discarding_chunks']} chunks written on the other side")
            lost = p.get("not_received")
            if lost:
                print(_rpo_line(lost))
            took = p.get("takeover")
            if took and took.get("zero_loss"):
                pulled = took.get("pulled_chunks", 0)
                tail = (
                    f"; pulling {pulled} chunks from the old primary, then swapping back"
                    if pulled
                    else ""
                )
                print(f"  no data lost (the old primary fenced first){tail}")
    return 0


def parse_epoch(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise UsageError(f"--epoch {text!r} is not a cluster epoch (a whole number, 0 or more)")
    return int(text)


def cmd_hold(args: argparse.Namespace) -> int:
    """``pair fence`` / ``unfence`` / ``watchdog``: on this node only (each node fences
    itself)."""
    split_pair_id(args.target)
    payload: dict[str, Any] = {"target": args.target, "epoch": parse_epoch(args.epoch)}
    if args.op == "pair.fence" and args.reason:
        payload["reason"] = args.reason
    if args.op == "pair.watchdog":
        payload.update(off=True) if args.off else payload.update(seconds=args.seconds)
    result = control.call(_require_control(args.node), args.op, payload, timeout=60)
    if args.json:
        print_json(result)
    else:
        for p in result["pairs"]:
            held, dog = p["fenced"], p["watchdog"]
            what = f"fenced at epoch {held['epoch']} ({held['reason']})" if held else "not fenced"
            if dog is not None:
                left = dog["remaining"]
                what += f", watchdog epoch {dog['epoch']}: " + (
                    f"{left:g}s left" if left > 0 else "expired"
                )
            print(f"pair {p['id']}: {p['role']} {p['state']}, {what}")
    return 0


def _rpo_line(lost: dict[str, Any]) -> str:
    if not lost["missing_entries"]:
        return f"  nothing lost: applied through sequence {lost['applied_seq']}"
    first, last = lost["missing_range"]
    age = lost.get("newest_missing_age_s")
    when = f", the newest written {age:.1f}s ago" if age is not None else ""
    return (
        f"  not received: sequences {first}..{last} ({lost['missing_entries']} writes{when}); "
        f"applied through {lost['applied_seq']}"
    )


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when both sides are identical, 1 when chunks differ (like cmp)."""
    split_pair_id(args.target)
    local = _require_control(args.node)
    where = _forward_target(local, "pair.split", args.target, False)
    result = control.call(where, "pair.verify", {"target": args.target, "repair": args.repair},
                          timeout=3600)  # fmt: skip
    if args.json:
        print_json(result)
    differ = 0
    for p in result["pairs"]:
        differ += p["mismatch_count"]
        if not args.json:
            shown = ", ".join(str(c) for c in p["mismatches"][:20])
            more = " ..." if p["mismatch_count"] > 20 else ""
            note = "; marked for the next resync" if p["repaired"] else ""
            print(
                f"pair {p['pair']}: {p['chunks']} chunks of {format_size(p['chunk_size'])} "
                f"compared, {p['mismatch_count']} differ"
                + (f" ({shown}{more}){note}" if p["mismatch_count"] else "")
            )
    return 1 if differ else 0


def _one(where: str, target: str) -> dict[str, Any]:
    pairs = control.call(where, "pair.display", {"target": target}, timeout=10)["pairs"]
    if len({p["id"] for p in pairs}) != 1:
        raise UsageError(f"{target!r}: name one pair (GROUP/PAIR)")
    # A local pair shows both of its sides here: the primary's view is the pair's.
    pairs.sort(key=lambda p: p["role"] != "primary")
    result: dict[str, Any] = pairs[0]
    return result


def cmd_wait(args: argparse.Namespace) -> int:
    _group, pair = split_pair_id(args.target)
    if pair is None:
        raise UsageError(f"{args.target!r}: pair wait needs GROUP/PAIR")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    where = _require_control(args.node)
    deadline = time.monotonic() + args.timeout
    shown = WaitProgress(args.target, sys.stderr) if args.progress else None
    with shown or contextlib.nullcontext():
        while True:
            p = _one(where, args.target)
            if shown is not None:
                shown.show(p)
            if p["state"] == args.state:
                break
            if time.monotonic() > deadline:
                raise Timeout(
                    f"pair {args.target} is {p['state']} after {args.timeout:g}s, not {args.state}"
                )
            time.sleep(0.1)
    print(f"pair {args.target}: {p['state']}")
    return 0


def _collect(
    controls: list[str],
    target: str | None,
    *,
    required: bool,
    corrupt: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[ConnectionFailed | Timeout]]:
    """Every side the nodes at ``controls`` show, and the nodes that did not answer.

    A node that does not answer is an error when ``required`` (the node the user named);
    otherwise (a peer, one lab host among several) it is returned for the caller to judge.
    Pairs a node cannot load are appended to ``corrupt`` (with the node's name)."""
    sides: list[dict[str, Any]] = []
    down: list[ConnectionFailed | Timeout] = []
    for where in controls:
        try:
            shown = control.call(where, "pair.display", {"target": target} if target else {}, 10)
        except NotFound:
            continue
        except (ConnectionFailed, Timeout) as e:
            if required:
                raise
            down.append(e)
            continue
        sides.extend(shown["pairs"])
        if corrupt is not None:
            corrupt.extend({**c, "node": shown.get("node")} for c in shown.get("corrupt", []))
    return sides, down


def merge_sides(sides: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per pair from the sides' views: the primary's view wins for the pair state."""
    by_id: dict[str, dict[str, Any]] = {}
    for s in sides:
        row = by_id.setdefault(s["id"], {"group": s["group"], "pair": s["pair"]})
        row[s["role"]] = s
    rows = []
    for pid in sorted(by_id):
        row = by_id[pid]
        p: dict[str, Any] | None = row.get("primary")
        sec: dict[str, Any] | None = row.get("secondary")
        lead: dict[str, Any] = p or sec or {}
        copy = lead["copy_percent"]
        rows.append(
            {
                "id": pid,
                "group": row["group"],
                "pair": row["pair"],
                "primary": f"{p['node']}:{p['volume']}" if p else lead["peer"],
                "secondary": f"{sec['node']}:{sec['volume']}" if sec else "?",
                "mode": lead["mode"],
                "fence": lead["fence"],
                "compress": lead.get("compress", NONE),
                "state": p["state"] if p else lead["state"],
                "secondary_state": sec["state"] if sec else "?",
                "copy_percent": copy,
                "dirty_primary": p["dirty_bytes"] if p else None,
                "dirty_secondary": sec["dirty_bytes"] if sec else None,
                "pvid_primary": p["pvid"] if p else None,
                "pvid_secondary": sec["pvid"] if sec else None,
                "last_copy_bytes": (p or lead)["last_copy_bytes"],
                "copy_rate_bytes_s": (p or lead).get("copy_rate_bytes_s"),
                "eta_seconds": (p or lead).get("eta_seconds"),
                "link": lead["link"],
                "journal": (p or lead).get("journal"),
                "secondary_journal": sec.get("journal") if sec else None,
                "sides": {k: v for k, v in (("primary", p), ("secondary", sec)) if v},
            }
        )
    return rows


def _state_cell(r: dict[str, Any]) -> str:
    """The primary's state; the secondary's after a slash where it differs."""
    other = r["secondary_state"]
    return str(r["state"]) if other in ("?", r["state"]) else f"{r['state']}/{other}"


def cmd_display(args: argparse.Namespace) -> int:
    if args.target:
        split_pair_id(args.target)
    local = _local_control(args.node)
    corrupt: list[dict[str, Any]] = []
    if local:
        sides, _ = _collect([local], args.target, required=True, corrupt=corrupt)
        # Add the peers' views where the lab tells us how to reach them; a peer that is down
        # leaves its half of the row unknown ("?"), as pairdisplay shows it.
        for peer in sorted({s["peer_node"] for s in sides if s["peer_node"]}):
            spec = _lab_node(peer)
            if spec is not None and spec.control and spec.control != local:
                sides.extend(_collect([spec.control], args.target, required=False)[0])
    else:
        controls = [h.control for h in _lab_hosts()]
        if not controls:
            raise UsageError(
                f"which node? give --node DIR or set {NODE_DIR_ENV} (no lab is up on this machine)"
            )
        sides, down = _collect(controls, args.target, required=False, corrupt=corrupt)
        if len(down) == len(controls):
            raise ConnectionFailed(f"no lab node answered: {down[0]}")
    rows = merge_sides(sides)
    if args.target and not rows and not corrupt:
        raise NotFound(f"no pair {args.target} on the nodes asked")
    # A pair its node cannot load is reported, never hidden: exit 6 (corrupt), as HORCM's
    # pairdisplay fails on a damaged pair.
    status = HeaderCorrupt.exit_code if corrupt else 0
    if args.json:
        print_json({"pairs": rows, "corrupt": corrupt})
        return status
    for c in corrupt:
        print(f"pair {c['id']} on node {c['node']}: CORRUPT: {c['reason']}", file=sys.stderr)
    if not rows:
        if not corrupt:
            print("no pairs")
        return status

    def num(v: object) -> str:
        return "-" if v is None else format_size(int(v)) if isinstance(v, int) else str(v)

    table = [
        {
            "group": r["group"],
            "pair": r["pair"],
            "primary": r["primary"],
            "secondary": r["secondary"],
            "mode": r["mode"],
            "fence": r["fence"],
            "state": r["state"]
            + ("" if r["secondary_state"] in ("?", r["state"]) else f"/{r['secondary_state']}"),
            "copy%": "-" if r["copy_percent"] is None else f"{r['copy_percent']:.0f}",
            "dirty-p": num(r["dirty_primary"]),
            "dirty-s": num(r["dirty_secondary"]),
            "pvid-p": r["pvid_primary"] or "-",
            "pvid-s": r["pvid_secondary"] or "-",
        }
        for r in rows
    ]
    print_table(table, list(table[0]))
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        j = r.get("journal")
        if j and "newest_seq" in j:
            groups[r["group"]] = {
                "group": r["group"],
                "journal": f"{format_size(j['journal_used'])}/{format_size(j['journal_bytes'])}",
                "use%": f"{j['journal_percent']:.0f}",
                "newest-p": j["newest_seq"],
                "applied-s": j["secondary_applied"],
                "lag": j["lag_entries"],
                "lag-s": f"{j['lag_seconds']:.1f}",
            }
    if groups:
        print()
        print_table(list(groups.values()), list(next(iter(groups.values()))))
    return status
