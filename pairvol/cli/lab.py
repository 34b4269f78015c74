"""``pairvol lab``: multi-host labs in network namespaces (design: :mod:`pairvol.lab`).

pairvol lab up NAME --hosts a,b[,c...] [--cluster [--etcd-members N]] [--tls] [--json]
pairvol lab down NAME
pairvol lab status NAME [--json]
pairvol lab list [--json]
pairvol lab exec NAME HOST -- CMD...
pairvol lab cut NAME A B
pairvol lab heal NAME A B
pairvol lab isolate NAME HOST
pairvol lab rejoin NAME HOST
pairvol lab kill NAME HOST [--only agent]
pairvol lab start NAME HOST
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pairvol import lab as labs
from pairvol.cli.common import print_json, print_table
from replicator.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("lab", help="multi-host labs: hosts in network namespaces, a node on each")
    ls = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    u = ls.add_parser("up", help="create the namespaces and links, start a node on each host")
    u.add_argument("name")
    u.add_argument("--hosts", required=True, metavar="a,b[,c...]", help="host names")
    u.add_argument(
        "--cluster", action="store_true",
        help="also etcd, a cluster secret and config, and an agent on each host",
    )  # fmt: skip
    u.add_argument("--etcd-members", type=int, default=1, metavar="N",
                   help="etcd members, each in its own namespace (default 1)")  # fmt: skip
    u.add_argument("--tls", action="store_true",
                   help="TLS on peer links: a lab CA and a certificate per host")  # fmt: skip
    u.add_argument("--json", action="store_true")
    u.set_defaults(func=cmd_up)

    d = ls.add_parser("down", help="stop the nodes, delete the namespaces and the lab's state")
    d.add_argument("name")
    d.set_defaults(func=cmd_down)

    st = ls.add_parser("status", help="hosts, addresses, nodes, cuts and isolations of a lab")
    st.add_argument("name")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    li = ls.add_parser("list", help="the labs in the registry")
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_list)

    x = ls.add_parser("exec", help="run a command on a host (its namespace, dir, environment)")
    x.add_argument("name")
    x.add_argument("host")
    x.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    x.set_defaults(func=cmd_exec)

    for action, helptext, func in (
        ("cut", "break connectivity between two hosts (both ways)", cmd_cut),
        ("heal", "restore connectivity between two hosts", cmd_heal),
    ):
        c = ls.add_parser(action, help=helptext)
        c.add_argument("name")
        c.add_argument("a", metavar="A")
        c.add_argument("b", metavar="B")
        c.set_defaults(func=func)

    for action, helptext, func in (
        ("isolate", "cut a host off from every other host and every etcd member", cmd_isolate),
        ("rejoin", "undo isolate (cuts made with cut stay)", cmd_rejoin),
    ):
        c = ls.add_parser(action, help=helptext)
        c.add_argument("name")
        c.add_argument("host")
        c.set_defaults(func=func)

    k = ls.add_parser("kill", help="SIGKILL every process of a host")
    k.add_argument("name")
    k.add_argument("host")
    k.add_argument("--only", choices=["agent"], help="just the agent and what it runs")
    k.set_defaults(func=cmd_kill)

    s = ls.add_parser("start", help="start a host's node (and agent) again after a kill")
    s.add_argument("name")
    s.add_argument("host")
    s.set_defaults(func=cmd_start)


def cmd_up(args: argparse.Namespace) -> int:
    lab = labs.up(
        args.name, labs.parse_hosts(args.hosts), cluster=args.cluster,
        etcd_members=args.etcd_members, tls=args.tls,
    )  # fmt: skip
    if args.json:
        print_json(lab.to_json())
        return 0
    print(f"lab {lab.name} up: subnet {lab.subnet}, bridge in namespace {lab.bridge_netns}")
    print_table(
        [{"host": h.host, "address": h.address, "nbd": h.nbd_uri, "dir": h.dir} for h in lab.hosts],
        ["host", "address", "nbd", "dir"],
    )
    if lab.cluster is not None:
        print(f"cluster {lab.name}: etcd {', '.join(lab.cluster['endpoints'])}, "
              f"an agent on every host; config {lab.cluster['config']}")  # fmt: skip
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    done = labs.down(args.name)
    if not done:
        print(f"lab {args.name}: nothing to do (no such lab in {labs.lab_root()})")
    for line in done:
        print(f"lab {args.name}: {line}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    doc = labs.status(args.name)
    if args.json:
        print_json(doc)
        return 0
    print(f"lab {doc['name']} ({doc['state']}): subnet {doc['subnet']}, dir {doc['dir']}")
    rows = [
        {
            "host": h["host"],
            "address": h["address"],
            "nbd": h["nbd_uri"],
            "node": f"pid {h['node_pid']}" if h["node_pid"] else "down",
            "netns": h["netns"] if h["netns_exists"] else f"{h['netns']} (missing)",
            "metrics": " ".join(u for u in (h["node_metrics"], h["agent_metrics"]) if u),
        }
        for h in doc["hosts"]
    ]
    print_table(rows, ["host", "address", "nbd", "node", "netns", "metrics"])
    cuts = ", ".join(f"{a}-{b}" for a, b in doc["cuts"]) or "none"
    print(f"cuts: {cuts}")
    print(f"isolated: {', '.join(doc['isolated']) or 'none'}")
    print(
        f"peer links: {'TLS (lab CA in ' + doc['dir'] + '/tls)' if doc.get('tls') else 'plaintext'}"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for name in labs.names():
        lab = labs.load(name)
        rows.append(
            {
                "name": lab.name,
                "state": lab.state,
                "subnet": lab.subnet,
                "hosts": ",".join(h.host for h in lab.hosts),
            }
        )
    if args.json:
        print_json({"root": labs.lab_root(), "labs": rows})
    elif rows:
        print_table(rows, ["name", "state", "subnet", "hosts"])
    else:
        print(f"no labs in {labs.lab_root()}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("lab exec: no command given (pairvol lab exec NAME HOST -- CMD...)")
    sys.stdout.flush()
    return labs.exec_in(args.name, args.host, command)


def cmd_cut(args: argparse.Namespace) -> int:
    if labs.cut(args.name, args.a, args.b):
        print(f"lab {args.name}: cut {args.a} <-> {args.b}")
    else:
        print(f"lab {args.name}: {args.a} <-> {args.b} was already cut")
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    if labs.heal(args.name, args.a, args.b):
        print(f"lab {args.name}: healed {args.a} <-> {args.b}")
    else:
        print(f"lab {args.name}: {args.a} <-> {args.b} was not cut")
    return 0


def cmd_isolate(args: argparse.Namespace) -> int:
    if labs.isolate(args.name, args.host):
        print(f"lab {args.name}: isolated {args.host} from every other host and etcd member")
    else:
        print(f"lab {args.name}: {args.host} was already isolated")
    return 0


def cmd_rejoin(args: argparse.Namespace) -> int:
    if labs.rejoin(args.name, args.host):
        print(f"lab {args.name}: {args.host} rejoined")
    else:
        print(f"lab {args.name}: {args.host} was not isolated")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    pids = labs.kill_host(args.name, args.host, only=args.only)
    shown = " ".join(str(p) for p in pids) or "none were running"
    what = "the agent" if args.only else "every process"
    print(f"lab {args.name}: killed {what} of {args.host} ({shown})")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    started = labs.start_host(args.name, args.host)
    for what, pid in started.items():
        print(f"lab {args.name}: {what} {args.host} started (pid {pid})")
    return 0
