"""``pairvol cluster``: the cluster as etcd and the agents see it, and its runtime resources.

pairvol cluster status [--json]
pairvol cluster resource create NAME --group GROUP --hosts a,b [--device NAME=EXPORT ...]
                                [--start CMD] [--stop CMD] [--monitor CMD]
pairvol cluster resource delete NAME
pairvol cluster resource list [--json]

Every command takes ``--config FILE`` (default ``$PAIRVOL_CLUSTER_CONFIG``, else
/etc/pairvol/cluster.toml); inside a lab host both that and ``$PAIRVOL_AGENT_DIR`` (the local
agent, for the hosts' flags and the last failover) are set, so no option is needed.

``status --json``::

    {"cluster": NAME, "resources": [{"name", "active": HOST | null, "epoch", "lease_remaining",
      "hosts": [{"name", "flags": {...} | null}], "last_failover": {...} | null,
      "source": "config" | "etcd", "groups": [...],
      "pairs": [{"id", "role", "state", "epoch", "cluster_epoch", "writes", "fenced"}] | null}]}

``pairs`` are what this host's node says (``$PAIRVOL_NODE_DIR``; null without it).

A host's ``flags`` are the refresh flags its agent last announced (null: not known here; the
refresh protocol is not wired into the agent yet, so a known host shows ``{}``, all at rest).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from cluster import agent_process as ap
from cluster.agent import PIDFILE
from cluster.config import Config, Resource, load_config, new_resource
from cluster.coord import (
    EtcdCoord,
    Keys,
    delete_resource,
    get_resource,
    list_resources,
    put_resource,
    read_epoch,
    read_leader,
)
from pairvol.cli.common import print_json, print_table
from replicator import control
from replicator.errors import AlreadyExists, NotFound, PairvolError, UsageError
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

    ls = rs.add_parser("list", help="the resources: from the config file and from etcd")
    _common(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_resource_list)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"the cluster config (default ${ap.CONFIG_ENV})")


def _open(args: Any) -> tuple[Config, EtcdCoord, Keys]:
    config = load_config(ap.config_path(args.config))
    return config, EtcdCoord(config.etcd.endpoints, config.etcd.timeout), Keys(config.cluster)


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


def _pairs(groups: tuple[str, ...]) -> list[dict[str, Any]] | None:
    """The groups' pairs as this host's node sees them ($PAIRVOL_NODE_DIR), or None."""
    node_dir = os.environ.get("PAIRVOL_NODE_DIR")
    if not node_dir:
        return None
    out: list[dict[str, Any]] = []
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
    return out


def status_doc(args: Any) -> dict[str, Any]:
    config, coord, keys = _open(args)
    agent = _local_agent()
    with coord:
        out = []
        for r, source in _resources(config, coord, keys):
            leader = read_leader(coord, keys, r.name)
            remaining = None if leader is None else coord.lease_remaining(leader.lease)
            out.append({
                "name": r.name,
                "source": source,
                "groups": list(r.groups),
                "active": None if leader is None else leader.holder,
                "epoch": read_epoch(coord, keys, r.name),
                "lease_remaining": remaining,
                "hosts": [{"name": h, "flags": _flags(agent, h)} for h in r.hosts],
                "last_failover": _last_failover(agent, r.name),
                "pairs": _pairs(r.groups),
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
        })  # fmt: skip
    print(f"cluster {doc['cluster']}")
    print_table(rows, ["resource", "active", "epoch", "hosts", "last_failover"])
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
