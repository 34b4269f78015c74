"""``pairvol agent``: run, stop and inspect a host's cluster agent (:mod:`cluster.agent`).

pairvol agent start --host NAME --config FILE [--state-dir D] [--daemon] [--pidfile F]
                    [--metrics ADDR:PORT]
pairvol agent stop [--state-dir D] [--pidfile F]
pairvol agent status [--state-dir D] [--pidfile F] [--json]

The state directory is ``--state-dir``, else ``$PAIRVOL_AGENT_DIR``, else
``/var/lib/pairvol/agent/CLUSTER-HOST`` (start only: it knows the cluster and host); the config
is ``--config``, else ``$PAIRVOL_CLUSTER_CONFIG``, else /etc/pairvol/cluster.toml.
"""

from __future__ import annotations

import os
from typing import Any

from cluster import agent_process as ap
from cluster.agent import PIDFILE
from cluster.config import load_config
from pairvol.cli.common import print_json, print_table


def register(sub: Any) -> None:
    p = sub.add_parser("agent", help="the cluster agent of this host: start, stop, status")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    s = acts.add_parser("start", help="run the agent (foreground unless --daemon)")
    s.add_argument("--host", required=True, help="this host's name in the config")
    s.add_argument("--config", help=f"the cluster config (default ${ap.CONFIG_ENV})")
    s.add_argument("--state-dir", help=f"state directory (default ${ap.AGENT_DIR_ENV})")
    s.add_argument("--daemon", action="store_true", help="detach; return once it is ready")
    s.add_argument("--pidfile", help="pid file (default STATE_DIR/agent.pid)")
    s.add_argument(
        "--metrics", metavar="ADDR:PORT", help="serve Prometheus metrics over HTTP there"
    )
    s.set_defaults(func=cmd_start)

    t = acts.add_parser("stop", help="stop the agent (SIGTERM; waits until it is gone)")
    t.add_argument("--state-dir", help=f"state directory (default ${ap.AGENT_DIR_ENV})")
    t.add_argument("--pidfile")
    t.set_defaults(func=cmd_stop)

    st = acts.add_parser("status", help="the agent's resources, lease and peers")
    st.add_argument("--state-dir", help=f"state directory (default ${ap.AGENT_DIR_ENV})")
    st.add_argument("--pidfile")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)


def _pidfile(args: Any, directory: str) -> str:
    return os.path.abspath(args.pidfile) if args.pidfile else os.path.join(directory, PIDFILE)


def cmd_start(args: Any) -> int:
    if args.metrics:
        from replicator.metrics import parse_address

        parse_address(args.metrics)  # a bad one: exit 2 before anything starts
    path = ap.config_path(args.config)
    config = load_config(path)
    config.host(args.host)
    directory = ap.state_dir(args.state_dir, config, args.host)
    pidfile = _pidfile(args, directory)
    if not args.daemon:
        return ap.run_foreground(path, args.host, directory, pidfile, args.metrics)
    ap.preflight(config, args.host)
    argv = ["--host", args.host, "--config", os.path.abspath(path), "--state-dir", directory,
            "--pidfile", pidfile]  # fmt: skip
    if args.metrics:
        argv += ["--metrics", args.metrics]
    pid = ap.start_daemon(argv, directory, pidfile)
    print(f"agent {args.host} started (pid {pid}, state {directory})")
    return 0


def cmd_stop(args: Any) -> int:
    directory = ap.state_dir(args.state_dir)
    pid = ap.stop(directory, _pidfile(args, directory))
    print(f"agent stopped (pid {pid})")
    return 0


def cmd_status(args: Any) -> int:
    directory = ap.state_dir(args.state_dir)
    doc = ap.read_status(directory, _pidfile(args, directory))
    if args.json:
        print_json(doc)
        return 0
    state = f"running (pid {doc['pid']})" if doc["running"] else "not running"
    print(f"agent {doc.get('host', '?')} of cluster {doc.get('cluster', '?')}: {state}, "
          f"etcd {doc.get('etcd', '?')}")  # fmt: skip
    rows = [
        {"resource": r["name"], "role": r["role"], "epoch": r["epoch"],
         "failsafe": "yes" if r.get("failsafe") else ""}
        for r in doc.get("resources", [])
    ]  # fmt: skip
    if rows:
        print_table(rows, ["resource", "role", "epoch", "failsafe"])
    return 0
