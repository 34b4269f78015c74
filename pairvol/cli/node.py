"""``pairvol node``: start, stop and inspect a storage node."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pairvol.cli.common import print_json, print_table
from replicator import control, node_process
from replicator.errors import UsageError
from replicator.node import CONTROL_SOCKET, NBD_PORT, PEER_PORT
from replicator.server import NBD_MAX_CONNECTIONS
from replicator.tls import check_options

NODE_DIR_ENV = "PAIRVOL_NODE_DIR"


def node_dir(explicit: str | None) -> str:
    """The node directory a command talks to: ``--dir``, else $PAIRVOL_NODE_DIR."""
    chosen = explicit or os.environ.get(NODE_DIR_ENV)
    if not chosen:
        raise UsageError(f"which node? give --dir DIR or set {NODE_DIR_ENV}")
    return os.path.abspath(chosen)


def register(sub: Any) -> None:
    p = sub.add_parser("node", help="start, stop and inspect a storage node")
    ns = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    s = ns.add_parser("start", help="serve a directory of volumes and replicate them")
    s.add_argument("--name", required=True, help="node name (unique among peers)")
    s.add_argument("--dir", required=True, help="the volume directory this node owns")
    s.add_argument("--listen", required=True, help="IP address for NBD and peers")
    s.add_argument("--port", type=int, default=NBD_PORT, help=f"NBD port (default {NBD_PORT})")
    s.add_argument("--peer-port", type=int, default=PEER_PORT, help="replication port")
    s.add_argument(
        "--secret-file",
        help="peer keys: lines 'PEERNAME SECRET' (one key per link), or one shared secret",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=NBD_MAX_CONNECTIONS,
        metavar="N",
        help=f"NBD clients served at once, more are refused (default {NBD_MAX_CONNECTIONS}; "
        "0: no limit)",
    )
    s.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics over HTTP there (default: none)",
    )
    for opt, what in (("cert", "this node's certificate"), ("key", "its private key"),
                      ("ca", "the CA that signs every node's certificate")):  # fmt: skip
        s.add_argument(
            f"--tls-{opt}",
            metavar="FILE",
            help=f"TLS on peer links (give all three --tls-* or none): {what} (PEM)",
        )
    s.add_argument(
        "--foreground",
        action="store_true",
        help="stay until the node exits, passing SIGTERM on to it, and report readiness to "
        "systemd (Type=notify); by default the node is left running in the background",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_start)

    t = ns.add_parser("stop", help="stop the node (SIGTERM; waits until it is gone)")
    t.add_argument("--dir", help=f"node directory (default ${NODE_DIR_ENV})")
    t.set_defaults(func=cmd_stop)

    st = ns.add_parser("status", help="show the node, its volumes and pairs")
    st.add_argument("--dir", help=f"node directory (default ${NODE_DIR_ENV})")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)


def cmd_start(args: argparse.Namespace) -> int:
    for opt in ("port", "peer_port"):
        if not 0 < getattr(args, opt) < 65536:
            raise UsageError(f"--{opt.replace('_', '-')} {getattr(args, opt)} is not a TCP port")
    tls = (args.tls_cert, args.tls_key, args.tls_ca)
    pid = node_process.start(
        args.name,
        args.dir,
        args.listen,
        nbd_port=args.port,
        peer_port=args.peer_port,
        secret_file=args.secret_file,
        max_connections=args.max_connections,
        foreground=args.foreground,
        metrics=args.metrics,
        tls=tls if check_options(*tls) else None,
    )
    if args.json:
        print_json({"name": args.name, "pid": pid, "dir": os.path.abspath(args.dir)})
    else:
        print(f"node {args.name} started (pid {pid}), serving {os.path.abspath(args.dir)}")
    if args.foreground:
        sys.stdout.flush()
        return node_process.wait_foreground(pid, args.name, os.path.abspath(args.dir))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    pid = node_process.stop(node_dir(args.dir))
    print(f"node stopped (pid {pid})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = control.call(os.path.join(node_dir(args.dir), CONTROL_SOCKET), "node.status")
    if args.json:
        print_json(status)
        return 0
    print(f"node {status['name']} (pid {status['pid']}) dir {status['dir']}")
    print(f"NBD {status['nbd_uri']} and nbd+unix:///NAME?socket={status['nbd_socket']}")
    rows = [
        {"volume": v["name"], "pvid": v["pvid"], "size": v["size"], "role": v["role"]}
        for v in status["volumes"]
    ]
    print_table(rows, ["volume", "pvid", "size", "role"])
    return 0
