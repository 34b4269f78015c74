"""``pairvol volume``: create, inspect, re-identify and check volume image files."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from pairvol.cli.common import print_json
from replicator.errors import HeaderCorrupt, UsageError
from replicator.header import Header
from replicator.pvid import format_pvid, parse_pvid
from replicator.sizes import format_size, parse_size
from replicator.volume import Volume


def register(sub: Any) -> None:
    p = sub.add_parser("volume", help="create and inspect volume image files")
    vs = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    c = vs.add_parser("create", help="create a new sparse volume image")
    c.add_argument("path")
    c.add_argument("--size", required=True, help="data size, e.g. 64M or 10G")
    c.add_argument("--pvid", help="PVID to assign (16 hex digits); default: a new unique one")
    c.add_argument("--name", help="volume (export) name; default: the file name without suffix")
    c.add_argument("--block-size", default="4096", help="logical block size (512..64K)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_create)

    i = vs.add_parser("info", help="show PVID and VOL information")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    s = vs.add_parser("set-pvid", help="give the volume a new PVID")
    s.add_argument("path")
    s.add_argument("--new", action="store_true", help="generate a fresh unique PVID")
    s.add_argument("pvid", nargs="?", help="the PVID to assign (16 hex digits)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_set_pvid)

    k = vs.add_parser("check", help="verify both header slots; repair a damaged one")
    k.add_argument("path")
    k.add_argument("--no-repair", action="store_true", help="only report")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_check)


def info_dict(h: Header, path: str, health: str) -> dict[str, Any]:
    """The stable JSON schema of ``volume info --json`` (also used by ``volume create``)."""
    return {
        "path": path,
        "pvid": h.pvid_hex,
        "prev_pvid": format_pvid(h.prev_pvid) if h.prev_pvid else None,
        "name": h.name,
        "uuid": str(h.uuid),
        "size": h.data_size,
        "block_size": h.block_size,
        "created": dt.datetime.fromtimestamp(h.created_ns / 1e9, dt.UTC).isoformat(),
        "generation": h.generation,
        "role": h.role.label,
        "pair": h.pair or None,
        "data_offset": h.data_offset,
        "meta_offset": h.meta_offset,
        "meta_size": h.meta_size,
        "header": health,
    }


def _show(d: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(d)
        return
    width = max(len(k) for k in d)
    for k, v in d.items():
        if k == "size":
            v = f"{v} ({format_size(v)})"
        print(f"{k.ljust(width)}  {'-' if v is None else v}")


def cmd_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    block_size = parse_size(args.block_size, what="block size")
    pvid = parse_pvid(args.pvid) if args.pvid is not None else None
    with Volume.create(args.path, size, pvid=pvid, name=args.name, block_size=block_size) as v:
        _show(info_dict(v.header, args.path, v.report.health()), args.json)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with Volume.open(args.path) as v:
        _show(info_dict(v.header, args.path, v.report.health()), args.json)
    return 0


def cmd_set_pvid(args: argparse.Namespace) -> int:
    if args.new == (args.pvid is not None):
        raise UsageError("volume set-pvid: give exactly one of --new or a PVID")
    pvid = None if args.new else parse_pvid(args.pvid)
    with Volume.open(args.path, writable=True) as v:
        old = v.header.pvid_hex
        h = v.set_pvid(pvid)
        if args.json:
            print_json({"path": args.path, "old_pvid": old, "pvid": h.pvid_hex})
        else:
            print(f"{args.path}: PVID {old} -> {h.pvid_hex}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with Volume.open(args.path, writable=not args.no_repair) as v:
        choice = v.report.choice
        slots = [
            {"slot": "AB"[i], "status": s.status, "reason": s.reason}
            for i, s in enumerate(choice.slots)
        ]
        result = {
            "path": args.path,
            "pvid": v.header.pvid_hex,
            "header": v.report.health(),
            "slots": slots,
            "repaired": ["AB"[i] for i in v.report.repaired],
        }
        if args.json:
            print_json(result)
        else:
            print(f"{args.path}: header {result['header']}")
        if args.no_repair and not choice.healthy:
            raise HeaderCorrupt(f"{args.path}: header {choice.describe()}")
    return 0
