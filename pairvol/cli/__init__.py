"""``pairvol``: a thin command line over the importable API.

One module per object kind (volume, host, bench, demo); each exposes ``register(subparsers)``
and handler functions that return an exit code.  Errors become exit codes here and only here:
every :class:`~replicator.errors.PairvolError` carries its own ``exit_code`` and prints as one
line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pairvol.cli import agent, bench, cluster, demo, events, host, lab, node, pair, volume
from pairvol.cli.common import ArgumentParser
from replicator.errors import PairvolError, UsageError

KINDS = (volume, host, node, pair, agent, cluster, events, lab, bench, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pairvol",
        description="Block storage with replication and failover, served by nbdkit.",
    )
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind in KINDS:
        kind.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        result: int = args.func(args)
        return result
    except PairvolError as e:
        print(f"pairvol: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("pairvol: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


__all__ = ["UsageError", "build_parser", "main"]
