"""``pairvol host``: the host PVID cache (SPEC section 1) and block-device attachment.

    pairvol host [--cache PATH] scan NBD-URI... [--as NAME] [--json]
    pairvol host [--cache PATH] attach NAME [--json]
    pairvol host [--cache PATH] detach NAME [--json]
    pairvol host [--cache PATH] refresh NAME [--json]
    pairvol host [--cache PATH] list [--json]
    pairvol host [--cache PATH] forget NAME [--json]

``scan`` and ``refresh`` read identities from the served volumes; ``attach`` trusts the cached
PVID and lets the server check it (a changed PVID is an access error, exit 7, until a
``refresh``).  A command that fails leaves the cache file exactly as it was.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from typing import Any

from cluster import blockdev, devices
from cluster.probe import Probed, parse_uri, probe
from cluster.pvid_cache import (
    Attachment,
    CacheEntry,
    CacheFile,
    cache_path,
    check_device_name,
)
from pairvol.cli.common import print_json, print_table
from replicator.errors import IllegalState, UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("host", help="the host PVID cache: scan, attach and refresh volumes")
    p.add_argument(
        "--cache",
        metavar="PATH",
        help="host cache file (default: $PAIRVOL_HOST_CACHE or /var/lib/pairvol/host-cache.json)",
    )
    # Also accepted after the action (``host list --cache X``); SUPPRESS keeps the subparser
    # from overwriting a value given before the action.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    common.add_argument("--json", action="store_true", help="print a stable JSON document")
    hs = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    s = hs.add_parser("scan", parents=[common], help="read PVID and VOL info from served volumes")
    s.add_argument("uris", nargs="+", metavar="NBD-URI")
    s.add_argument("--as", dest="as_name", metavar="NAME", help="device name (one URI only)")
    s.set_defaults(func=cmd_scan)

    a = hs.add_parser("attach", parents=[common], help="attach as a block device (PVID-checked)")
    a.add_argument("name")
    a.add_argument(
        "--method",
        choices=("auto", "nbd-client", "nbdfuse-loop"),
        default="auto",
        help="nbd-client when /dev/nbd* exists, else nbdfuse + losetup (default: auto)",
    )
    a.set_defaults(func=cmd_attach)

    d = hs.add_parser("detach", parents=[common], help="undo an attach")
    d.add_argument("name")
    d.set_defaults(func=cmd_detach)

    r = hs.add_parser("refresh", parents=[common], help="re-read PVID and VOL info from the volume")
    r.add_argument("name")
    r.set_defaults(func=cmd_refresh)

    ls = hs.add_parser("list", parents=[common], help="show the cache (does not read volumes)")
    ls.set_defaults(func=cmd_list)

    f = hs.add_parser("forget", parents=[common], help="remove a (detached) device from the cache")
    f.add_argument("name")
    f.set_defaults(func=cmd_forget)


# -- JSON shapes ------------------------------------------------------------------------------


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat()


def attachment_dict(att: Attachment | None, live: bool = False) -> dict[str, Any] | None:
    if att is None:
        return None
    d: dict[str, Any] = dict(att.to_json())
    d["attached"] = _iso(att.attached_ns)
    if live:
        d["status"] = blockdev.status(att)
    return d


def entry_dict(name: str, e: CacheEntry, live: bool = False) -> dict[str, Any]:
    """The stable JSON schema of one cached device (``host list``, ``scan``, ``attach``)."""
    return {
        "name": name,
        "uri": e.uri,
        "export": e.export,
        "pvid": e.pvid,
        "vol": e.vol.to_json(),
        "scanned": _iso(e.scanned_ns),
        "scanned_ns": e.scanned_ns,
        "device": e.attachment.device if e.attachment else None,
        "attachment": attachment_dict(e.attachment, live),
    }


def _store(args: argparse.Namespace) -> CacheFile:
    return CacheFile(cache_path(args.cache))


# -- commands ---------------------------------------------------------------------------------


def cmd_scan(args: argparse.Namespace) -> int:
    if args.as_name is not None:
        if len(args.uris) != 1:
            raise UsageError("host scan: --as NAME names one device; give exactly one NBD-URI")
        check_device_name(args.as_name)
    uris = [parse_uri(u) for u in args.uris]  # every URI parses before any is probed
    found: list[Probed] = [probe(u) for u in uris]  # all volumes answer, or nothing changes
    now = time.time_ns()
    store = _store(args)
    results = []
    with store.update() as cache:
        for p in found:
            entry = CacheEntry(uri=str(p.uri), export=p.info.name, vol=p.info, scanned_ns=now)
            name, old = cache.record_scan(args.as_name, entry)
            if old is None:
                action = "added"
            elif old.vol == entry.vol:
                action = "unchanged"
            else:
                action = "updated"
            d = entry_dict(name, cache.get(name))
            d["action"] = action
            d["old_pvid"] = None if old is None else old.pvid
            results.append(d)
    if args.json:
        print_json({"cache": store.path, "scanned": results})
    else:
        for d in results:
            change = f" (was {d['old_pvid']})" if d["old_pvid"] not in (None, d["pvid"]) else ""
            print(f"{d['name']}: {d['uri']} PVID {d['pvid']}{change} [{d['action']}]")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    entry = devices.attach(
        _store(args), args.name, method=None if args.method == "auto" else args.method
    )
    if args.json:
        print_json(entry_dict(args.name, entry))
    else:
        assert entry.attachment is not None
        print(entry.attachment.device)
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    att, steps = devices.detach(_store(args), args.name)
    if args.json:
        print_json({"name": args.name, "device": att.device, "detached": True, "steps": steps})
    else:
        print(f"{args.name}: detached {att.device}")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    store = _store(args)
    before = store.read().get(args.name)
    found = probe(parse_uri(before.uri))  # straight from the volume, bypassing the cache
    with store.update() as cache:
        old = cache.get(args.name)
        if old.uri != before.uri:
            raise IllegalState(f"{args.name} was re-recorded meanwhile; refresh again")
        entry = cache.set_info(args.name, found.info, time.time_ns())
    result = {
        "name": args.name,
        "old_pvid": old.pvid,
        "pvid": entry.pvid,
        "changed": old.pvid != entry.pvid,
        "vol": entry.vol.to_json(),
        "attached": entry.attachment is not None,
    }
    if args.json:
        print_json(result)
    else:
        print(f"{args.name}: PVID {old.pvid} -> {entry.pvid}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    cache = store.read()
    rows = [entry_dict(n, cache.entries[n], live=True) for n in cache.names()]
    if args.json:
        print_json({"cache": store.path, "entries": rows})
        return 0
    table = [
        {
            "name": r["name"],
            "pvid": r["pvid"],
            "volume": r["export"],
            "size": r["vol"]["size"],
            "device": r["device"] or "-",
            "uri": r["uri"],
        }
        for r in rows
    ]
    print_table(table, ["name", "pvid", "volume", "size", "device", "uri"])
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    store = _store(args)
    with store.update() as cache:
        entry = cache.get(args.name)
        if entry.attachment is not None:
            raise IllegalState(
                f"{args.name} is attached as {entry.attachment.device}; detach it first"
            )
        cache.remove(args.name)
    if args.json:
        print_json({"name": args.name, "forgotten": entry_dict(args.name, entry)})
    else:
        print(f"{args.name}: forgotten")
    return 0
