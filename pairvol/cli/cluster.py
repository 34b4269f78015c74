"""``pairvol cluster``: the cluster as etcd and the agents see it, and its runtime resources.

pairvol cluster status [--json]
pairvol cluster resource create NAME --group GROUP --hosts a,b [--device NAME=EXPORT ...]
                                [--start CMD] [--stop CMD] [--monitor CMD]
pairvol cluster resource delete NAME
pairvol cluster resource list [--json]
pairvol cluster switchover RESOURCE [--to HOST] [--timeout S]
pairvol cluster split|resync RESOURCE|GROUP [--timeout S]

Every command takes ``--config FILE`` (default ``$PAIRVOL_CLUSTER_CONFIG``, else
/etc/pairvol/cluster.toml); inside a lab host both that and ``$PAIRVOL_AGENT_DIR`` (the local
agent, for the hosts' flags and the last failover) are set, so no option is needed.

``status --json``::

    {"cluster": NAME, "resources": [{"name", "active": HOST | null, "epoch", "lease_remaining",
      "hosts": [{"name", "flags": {...} | null}], "last_failover": {...} | null,
      "source": "config" | "etcd", "groups": [...],
      "pairs": [{"id", "role", "state", "epoch", "cluster_epoch", "writes", "fenced"}] | null}]}

``pairs`` are what this host's node says (``$PAIRVOL_NODE_DIR``; null without it).

An active resource's ``takeover`` (null otherwise, or when no agent here knows it) says how
its active host took it over: ``{"host", "groups": {GROUP: "nop" | "swap" | "SVOL-takeover"
| "PVOL-PSUE" | "PVOL-PSUS"}, "zero_loss": bool | null, "pulled_chunks": int | null,
"report": {GROUP: {"zero_loss", "pulled_chunks", "fenced_old_primary", "pairs",
["not_received_entries"]}} | null}``.  ``zero_loss`` is null when no group was taken over
(``nop``, ``swap``), true when every acknowledged write is there (an ``SVOL-takeover`` whose
old primary's node answered: SPEC 4, the missing chunks pulled in the background; or a sync
pair in PAIR); ``report`` is known on the active host itself (its agent's status), the rest
also from a peer's last failover.  ``hydration`` lists, live from this host's node, each pair
still pulling what its takeover lacked: ``[{"group", "pair", "percent", "pending_chunks",
"fetched_on_demand", "pulling", "rate_bytes_s", "eta_seconds"}]`` (null without
``$PAIRVOL_NODE_DIR``; run it on the active host).

``switchover`` is the planned move (``crm resource move``, HORCM's swap): the active agent
stops the application, fences its node, splits the groups (async: drained), then releases the
leader key naming the target, which swaps the pairs (``resync --swap``: only differences are
copied), unfences and starts the application.  The command asks through etcd (the resource's
request key, answered by the active agent) and returns once the target is active, with the
time it took.  Failback is the same command back.

``split`` and ``resync`` run the replica operation with SPEC 3's refresh exchange around it
(cluster/refresh_driver.py): the active agent saves its flags, tells the standby, runs the
split or resync on its node, refreshes its own cache, and the standby reads the S-VOL's new
identity straight from the volume (split) or erases its entries (resync) before the command
returns; a plain ``pair split`` skips all that, and the standby's cache goes stale.

A host's ``flags`` are the refresh flags its agent last announced, per pair (null: not known
here).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import uuid
from typing import Any

from cluster import agent_process as ap
from cluster.agent import PIDFILE
from cluster.config import Config, Resource, load_config, new_resource
from cluster.coord import (
    EtcdCoord,
    Keys,
    Request,
    answer_request,
    delete_resource,
    get_resource,
    list_resources,
    put_request,
    put_resource,
    read_epoch,
    read_leader,
    read_request,
)
from pairvol.cli.common import print_json, print_table
from replicator import control
from replicator.errors import (
    AlreadyExists,
    ConnectionFailed,
    IllegalState,
    NotFound,
    PairvolError,
    Timeout,
    UsageError,
)
from replicator.node import CONTROL_SOCKET


def register(sub: Any) -> None:
    p = sub.add_parser("cluster", help="the cluster: status, runtime resources")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    st = acts.add_parser("status", help="per resource: the active host, epoch, flags, failover")
    _common(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    r = acts.add_parser("resource", help="resources stored in etcd (pcs resource style)")
    rs = r.add_subparsers(dest="resource_action", metavar="ACTION", required=True)
    c = rs.add_parser("create", help="store a new resource; the agents pick it up")
    c.add_argument("name")
    c.add_argument("--group", action="append", required=True, dest="groups",
                   help="a pair group it owns (repeat for several)")  # fmt: skip
    c.add_argument("--hosts", required=True, metavar="a,b", help="hosts, in preference order")
    c.add_argument("--device", action="append", default=[], dest="devices",
                   metavar="[HOST:]NAME=EXPORT", help="a PVID-cache device (repeat)")  # fmt: skip
    c.add_argument("--start", help="the application's start command")
    c.add_argument("--stop", help="its stop command")
    c.add_argument("--monitor", help="its monitor command")
    _common(c)
    c.set_defaults(func=cmd_resource_create)

    d = rs.add_parser("delete", help="delete a resource stored in etcd")
    d.add_argument("name")
    _common(d)
    d.set_defaults(func=cmd_resource_delete)

    sw = acts.add_parser("switchover", help="planned move: stop, swap the pairs, start on --to")
    sw.add_argument("resource")
    sw.add_argument("--to", help="the target host (default: the next live host in order)")
    sw.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    _common(sw)
    sw.set_defaults(func=cmd_switchover)

    for op, text in (
        ("split", "split with the standby PVID-refresh protocol (SPEC 3)"),
        ("resync", "resync with the standby PVID-refresh protocol (SPEC 3)"),
    ):
        x = acts.add_parser(op, help=text)
        x.add_argument("target", metavar="RESOURCE|GROUP")
        x.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
        _common(x)
        x.set_defaults(func=cmd_replica)

    ls = rs.add_parser("list", help="the resources: from the config file and from etcd")
    _common(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_resource_list)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"the cluster config (default ${ap.CONFIG_ENV})")


def _open(args: Any, *, serializable: bool = False) -> tuple[Config, EtcdCoord, Keys]:
    config = load_config(ap.config_path(args.config))
    coord = EtcdCoord(config.etcd.endpoints, config.etcd.timeout, serializable=serializable)
    return config, coord, Keys(config.cluster)


def _resources(config: Config, coord: EtcdCoord, keys: Keys) -> list[tuple[Resource, str]]:
    out = [(r, "config") for r in config.resources]
    names = {r.name for r in config.resources}
    for r in list_resources(coord, keys, known_hosts=config.host_names()):
        if r.name not in names:
            out.append((r, "etcd"))
    return sorted(out, key=lambda x: x[0].name)


def _local_agent() -> dict[str, Any] | None:
    directory = os.environ.get(ap.AGENT_DIR_ENV)
    if not directory:
        return None
    doc = ap.read_status(directory, os.path.join(directory, PIDFILE))
    return doc if "host" in doc else None


def _flags(agent: dict[str, Any] | None, host: str) -> Any:
    if agent is None:
        return None
    if agent.get("host") == host:
        return agent.get("flags", {})
    peer = agent.get("peers", {}).get(host)
    return None if peer is None else peer.get("flags", {})


def _last_failover(agent: dict[str, Any] | None, name: str) -> Any:
    if agent is None:
        return None
    seen = [r.get("last_failover") for r in agent.get("resources", []) if r["name"] == name]
    for peer in agent.get("peers", {}).values():
        seen.append(peer.get("resources", {}).get(name, {}).get("last_failover"))
    known = [f for f in seen if isinstance(f, dict)]
    return max(known, key=lambda f: f.get("at", 0)) if known else None


#: What ``status`` shows of a pair's hydration (``pair display``'s, SPEC 4).
HYDRATION_KEYS = ("percent", "pending_chunks", "fetched_on_demand", "pulling", "rate_bytes_s",
                  "eta_seconds", "suspended_by")  # fmt: skip


def _pairs(
    groups: tuple[str, ...],
) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
    """The groups' pairs as this host's node sees them ($PAIRVOL_NODE_DIR), and those still
    hydrating after a takeover; (None, None) without a node here."""
    node_dir = os.environ.get("PAIRVOL_NODE_DIR")
    if not node_dir:
        return None, None
    out: list[dict[str, Any]] = []
    hydrating: list[dict[str, Any]] = []
    for group in groups:
        try:
            doc = control.call(os.path.join(node_dir, CONTROL_SOCKET), "pair.display",
                               {"target": group}, timeout=5.0)  # fmt: skip
        except PairvolError as e:
            out.append({"group": group, "error": str(e)})
            continue
        for p in doc.get("pairs", []):
            out.append({k: p.get(k) for k in ("id", "role", "state", "epoch", "cluster_epoch",
                                               "writes", "fenced")})  # fmt: skip
            h = p.get("hydration")
            if isinstance(h, dict):
                hydrating.append({"group": group, "pair": p.get("id")}
                                 | {k: h.get(k) for k in HYDRATION_KEYS})  # fmt: skip
    return out, hydrating


def _takeover(
    agent: dict[str, Any] | None, name: str, active: str | None, last: Any
) -> dict[str, Any] | None:
    """How the active host took the resource over: from its own agent's status when that
    agent is this host's (with each group's report), else from the last failover to it."""
    if active is None:
        return None
    if agent is not None and agent.get("host") == active:
        for r in agent.get("resources", []):
            if r.get("name") == name and r.get("takeover"):
                report = r.get("takeover_report") or {}
                pulled = sum(int(g.get("pulled_chunks") or 0) for g in report.values())
                return {"host": active, "groups": r["takeover"], "zero_loss": r.get("zero_loss"),
                        "pulled_chunks": pulled, "report": report}  # fmt: skip
    if isinstance(last, dict) and last.get("to") == active and last.get("takeover"):
        return {"host": active, "groups": last["takeover"], "zero_loss": last.get("zero_loss"),
                "pulled_chunks": last.get("pulled_chunks"), "report": None}  # fmt: skip
    return None


def _takeover_text(t: dict[str, Any] | None) -> str:
    if t is None:
        return "-"
    names = ",".join(sorted(set(t["groups"].values())))
    if t["zero_loss"] is True:
        return f"{names} (zero data loss)"
    if t["zero_loss"] is False:
        return f"{names} (writes may be lost)"
    return names


def _hydration_text(resource: str, h: dict[str, Any]) -> str:
    rate = h.get("rate_bytes_s")
    eta = h.get("eta_seconds")
    if h.get("suspended_by"):  # PSUE: the old primary's node cannot be reached
        return (
            f"{resource} {h['pair']}: hydration suspended at {h.get('percent')}% (PSUE, "
            f"{h['suspended_by']}: the old primary cannot be reached), "
            f"{h.get('pending_chunks')} chunks pending, read with EIO until it is back"
        )
    return (
        f"{resource} {h['pair']}: hydrating {h.get('percent')}%, "
        f"{h.get('pending_chunks')} chunks pending, {h.get('fetched_on_demand')} fetched on "
        f"demand, {'-' if rate is None else f'{rate / 2**20:.1f} MiB/s'}, "
        f"ETA {'-' if eta is None else f'{eta:g}s'}"
    )


def _lease_remaining(coord: EtcdCoord, lease: int) -> float | None:
    """Seconds left on ``lease``, None when it is gone or only etcd's leader could say and
    there is none now (an election): the status is still shown."""
    try:
        return coord.lease_remaining(lease)
    except (Timeout, ConnectionFailed):
        return None


def status_doc(args: Any) -> dict[str, Any]:
    # Serializable reads: the status answers from any live etcd member, also during an
    # election or without a quorum, as crm_mon shows its node's view; nothing is decided on it.
    config, coord, keys = _open(args, serializable=True)
    agent = _local_agent()
    with coord:
        out = []
        for r, source in _resources(config, coord, keys):
            leader = read_leader(coord, keys, r.name)
            remaining = None if leader is None else _lease_remaining(coord, leader.lease)
            active = None if leader is None else leader.holder
            last = _last_failover(agent, r.name)
            pairs, hydration = _pairs(r.groups)
            out.append({
                "name": r.name,
                "source": source,
                "groups": list(r.groups),
                "active": active,
                "epoch": read_epoch(coord, keys, r.name),
                "lease_remaining": remaining,
                "hosts": [{"name": h, "flags": _flags(agent, h)} for h in r.hosts],
                "last_failover": last,
                "takeover": _takeover(agent, r.name, active, last),
                "pairs": pairs,
                "hydration": hydration,
            })  # fmt: skip
    return {"cluster": config.cluster, "resources": out}


def cmd_status(args: Any) -> int:
    doc = status_doc(args)
    if args.json:
        print_json(doc)
        return 0
    rows = []
    for r in doc["resources"]:
        lf = r["last_failover"]
        rows.append({
            "resource": r["name"], "active": r["active"] or "-", "epoch": r["epoch"],
            "hosts": ",".join(h["name"] for h in r["hosts"]),
            "last_failover": "-" if lf is None else
            f"{lf['from']}->{lf['to']} {lf['seconds']}s epoch {lf['epoch']}",
            "takeover": _takeover_text(r["takeover"]),
        })  # fmt: skip
    print(f"cluster {doc['cluster']}")
    print_table(rows, ["resource", "active", "epoch", "hosts", "last_failover", "takeover"])
    for r in doc["resources"]:
        for h in r["hydration"] or []:
            print(_hydration_text(r["name"], h))
    return 0


def cmd_resource_create(args: Any) -> int:
    config, coord, keys = _open(args)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    resource = new_resource(
        args.name, hosts=hosts, groups=args.groups, devices=args.devices, start=args.start,
        stop=args.stop, monitor=args.monitor, known_hosts=config.host_names(),
    )  # fmt: skip
    if any(r.name == args.name for r in config.resources):
        raise AlreadyExists(f"resource {args.name!r} is defined in {config.source}")
    with coord:
        put_resource(coord, keys, resource)
    print(f"resource {args.name} created (hosts {','.join(hosts)}, groups {','.join(args.groups)})")
    return 0


def cmd_resource_delete(args: Any) -> int:
    config, coord, keys = _open(args)
    if any(r.name == args.name for r in config.resources):
        raise UsageError(f"resource {args.name!r} is defined in {config.source}: edit it there")
    with coord:
        if get_resource(coord, keys, args.name, known_hosts=config.host_names()) is None:
            raise NotFound(f"no resource {args.name!r} in cluster {config.cluster}")
        delete_resource(coord, keys, args.name)
    print(f"resource {args.name} deleted")
    return 0


def cmd_resource_list(args: Any) -> int:
    config, coord, keys = _open(args)
    with coord:
        rows: list[dict[str, Any]] = [
            {"name": r.name, "source": source, "hosts": list(r.hosts), "groups": list(r.groups),
             "devices": [{"host": d.host, "name": d.name, "export": d.export} for d in r.devices],
             "start": r.start, "stop": r.stop, "monitor": r.monitor}
            for r, source in _resources(config, coord, keys)
        ]  # fmt: skip
    if args.json:
        print_json({"cluster": config.cluster, "resources": rows})
        return 0
    table = [{**r, "hosts": ",".join(r["hosts"]), "groups": ",".join(r["groups"])} for r in rows]
    print_table(table, ["name", "source", "hosts", "groups"])
    return 0


#: How long the active agent has to accept or refuse a request (it polls every heartbeat).
ANSWER_TIMEOUT = 10.0
POLL = 0.1


def cmd_switchover(args: Any) -> int:
    config, coord, keys = _open(args)
    if not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout}: give a positive number of seconds")
    with coord:
        found = [r for r, _ in _resources(config, coord, keys) if r.name == args.resource]
        if not found:
            raise NotFound(f"no resource {args.resource!r} in cluster {config.cluster}")
        (r,) = found
        if args.to is not None and args.to not in r.hosts:
            raise UsageError(
                f"--to {args.to}: not a host of resource {r.name} ({','.join(r.hosts)})"
            )
        leader = read_leader(coord, keys, r.name)
        if leader is None:
            raise IllegalState(f"resource {r.name} has no active host to switch over from")
        if args.to == leader.holder:
            raise UsageError(f"resource {r.name} is already active on {args.to}")
        req = Request(id=uuid.uuid4().hex[:12], op="switchover", to=args.to)
        started = time.monotonic()
        answer = _ask(coord, keys, r.name, req, leader.holder)
        deadline = started + args.timeout
        try:
            while True:
                now = read_leader(coord, keys, r.name)
                moved = now is not None and now.holder != leader.holder
                if now is not None and moved and args.to in (None, now.holder):
                    break
                answer = read_request(coord, keys, r.name) or answer
                if answer.id == req.id and answer.state == "failed":
                    raise IllegalState(
                        f"resource {r.name}: the switchover failed on {leader.holder}: "
                        f"{answer.detail or 'see its agent events'}"
                    )
                if time.monotonic() > deadline:
                    raise Timeout(
                        f"resource {r.name}: no host took over from {leader.holder} within "
                        f"{args.timeout:g}s (see pairvol cluster status)"
                    )
                time.sleep(POLL)
        finally:
            _close_request(coord, keys, r.name, req.id)
    took = time.monotonic() - started
    print(f"resource {r.name}: {leader.holder} -> {now.holder} in {took:.2f}s (epoch {now.epoch})")
    return 0


def _ask(coord: EtcdCoord, keys: Keys, resource: str, req: Request, active: str) -> Request:
    """Store ``req`` for the resource's active agent and wait for it to accept it; its
    answer (IllegalState if refused)."""
    if not put_request(coord, keys, resource, req):
        raise IllegalState(f"resource {resource}: another request is still being carried out")
    answer = _wait_answer(coord, keys, resource, req.id, active)
    if answer.state == "refused":
        _close_request(coord, keys, resource, req.id)
        raise IllegalState(f"resource {resource}: {active} refused: {answer.detail}")
    return answer


def cmd_replica(args: Any) -> int:
    """``cluster split|resync RESOURCE|GROUP``: the replica operation with the standby
    PVID-refresh exchange around it (SPEC 3), carried out by the resource's active agent."""
    op = args.action
    config, coord, keys = _open(args)
    if not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout}: give a positive number of seconds")
    with coord:
        resources = [r for r, _ in _resources(config, coord, keys)]
        by_name = [r for r in resources if r.name == args.target]
        by_group = [r for r in resources if args.target in r.groups]
        if not by_name and not by_group:
            raise NotFound(
                f"no resource or group {args.target!r} in cluster {config.cluster} "
                f"(resources: {', '.join(r.name for r in resources) or 'none'})"
            )
        r = (by_name or by_group)[0]
        group = None if by_name else args.target
        leader = read_leader(coord, keys, r.name)
        if leader is None:
            raise IllegalState(f"resource {r.name} has no active host to run the {op} on")
        req = Request(id=uuid.uuid4().hex[:12], op=op, target=group)
        started = time.monotonic()
        answer = _ask(coord, keys, r.name, req, leader.holder)
        pairs = answer.detail.split()
        deadline = started + args.timeout
        try:
            while answer.state not in ("done", "failed"):
                if time.monotonic() > deadline:
                    raise Timeout(
                        f"resource {r.name}: the {op} of {args.target} was not over within "
                        f"{args.timeout:g}s (see pairvol cluster status)"
                    )
                time.sleep(POLL)
                got = read_request(coord, keys, r.name)
                if got is None or got.id != req.id:
                    raise IllegalState(f"resource {r.name}: the {op} request was replaced")
                answer = got
            if answer.state == "done":
                pairs = answer.detail.split() or pairs
        finally:
            _close_request(coord, keys, r.name, req.id)
    if answer.state == "failed":
        raise IllegalState(f"resource {r.name}: the {op} failed on {leader.holder}: "
                           f"{answer.detail}")  # fmt: skip
    took = time.monotonic() - started
    print(f"resource {r.name}: {op} of {', '.join(pairs) or args.target} done on "
          f"{leader.holder}, every host's PVID cache refreshed, in {took:.2f}s")  # fmt: skip
    return 0


def _wait_answer(coord: EtcdCoord, keys: Keys, resource: str, rid: str, active: str) -> Request:
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while time.monotonic() < deadline:
        got = read_request(coord, keys, resource)
        if got is not None and got.id == rid and got.state != "pending":
            return got
        time.sleep(POLL)
    _close_request(coord, keys, resource, rid)
    raise Timeout(f"resource {resource}: the agent on {active} did not answer within "
                  f"{ANSWER_TIMEOUT:g}s (is it running?)")  # fmt: skip


def _close_request(coord: EtcdCoord, keys: Keys, resource: str, rid: str) -> None:
    """The command's request is over, whatever its agent said last: mark it so (a request
    left pending or accepted would refuse the next one)."""
    with contextlib.suppress(PairvolError):
        got = read_request(coord, keys, resource)
        if got is not None and got.id == rid and got.state in ("pending", "accepted"):
            answer_request(coord, keys, resource, got, "done", "closed by the command")
