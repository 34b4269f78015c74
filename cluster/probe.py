"""Read PVIDs and VOL information straight from served volumes, and the access check.

Everything here bypasses the host PVID cache: it asks the NBD server.  The server publishes
each volume's identity in the export description (``replicator.export_info``), which libnbd
returns during option negotiation, so probing never transfers a data block.

One connection in libnbd's *option mode* answers several questions: ``NBD_OPT_INFO`` for
``NAME@PVID`` (the server runs the access check and refuses a wrong PVID), then, only when
refused, ``NBD_OPT_INFO`` for plain ``NAME`` to learn the PVID the volume actually has; the
client never sees the server's reason (nbdkit 1.32 cannot send it), so that second question is
how we name both PVIDs in the error.

Errors: a URI we do not accept is :class:`UsageError`; a server we cannot reach is
:class:`ConnectionFailed` (or :class:`Timeout`); an export the server does not have is
:class:`NotFound`; a server that is not pairvol's is :class:`ProtocolError`; a PVID that is not
the expected one is :class:`PvidMismatch`.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.parse
from dataclasses import dataclass, replace
from typing import Any

from replicator.errors import (
    ConnectionFailed,
    ExternalCommandFailed,
    IllegalState,
    NotFound,
    PeerLost,
    PvidMismatch,
    Timeout,
    UsageError,
)
from replicator.export_info import ExportName, VolInfo, parse_description, parse_export_name
from replicator.pvid import format_pvid, parse_pvid

DEFAULT_PORT = 10809
CONNECT_TIMEOUT = 30.0
SCHEMES = ("nbd", "nbd+unix")


@dataclass(frozen=True, slots=True)
class NbdUri:
    """A parsed ``nbd://HOST[:PORT]/[NAME][@PVID]`` or ``nbd+unix:///[NAME][@PVID]?socket=PATH``.

    ``str()`` is the canonical form (explicit port, absolute socket path), so two spellings of
    one export compare equal in the host cache.
    """

    host: str | None
    port: int | None
    socket: str | None
    export: ExportName

    @property
    def is_unix(self) -> bool:
        return self.socket is not None

    def with_export(self, name: str | None, pvid: str | None = None) -> NbdUri:
        return replace(self, export=ExportName(name, None if pvid is None else parse_pvid(pvid)))

    @property
    def server(self) -> str:
        """The canonical URI of the server alone (default export)."""
        return str(self.with_export(None))

    def __str__(self) -> str:
        path = "/" + urllib.parse.quote(self.export.name or "", safe="")
        if self.export.pvid is not None:
            path += "@" + format_pvid(self.export.pvid)
        if self.socket is not None:
            return f"nbd+unix://{path}?socket={urllib.parse.quote(self.socket, safe='/')}"
        assert self.host is not None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}{path}"


def parse_uri(text: str) -> NbdUri:
    """Accept the two URI forms pairvol uses; anything else is a :class:`UsageError`."""
    try:
        u = urllib.parse.urlsplit(text)
        port = u.port
    except ValueError as e:
        raise UsageError(f"NBD URI {text!r} is malformed: {e}") from e
    if u.scheme not in SCHEMES:
        raise UsageError(
            f"NBD URI {text!r}: scheme must be nbd:// (TCP) or nbd+unix:// (Unix socket)"
        )
    if u.fragment:
        raise UsageError(f"NBD URI {text!r} has a fragment ('#'); escape it as %23")
    path = urllib.parse.unquote(u.path)
    if path and not path.startswith("/"):
        raise UsageError(f"NBD URI {text!r}: the export name must follow a '/'")
    export = parse_export_name(path[1:])
    query = urllib.parse.parse_qs(u.query, keep_blank_values=True)
    if u.scheme == "nbd":
        if not u.hostname:
            raise UsageError(f"NBD URI {text!r} names no host (nbd://HOST[:PORT]/NAME)")
        if set(query):
            raise UsageError(f"NBD URI {text!r}: nbd:// takes no query parameters")
        if u.username or u.password:
            raise UsageError(f"NBD URI {text!r}: user names are not supported")
        return NbdUri(u.hostname, port or DEFAULT_PORT, None, export)
    if u.netloc:
        raise UsageError(f"NBD URI {text!r}: nbd+unix:// takes no host (nbd+unix:///NAME?...)")
    sockets = query.pop("socket", [])
    if len(sockets) != 1 or not sockets[0]:
        raise UsageError(f"NBD URI {text!r} needs exactly one ?socket=PATH")
    if query:
        raise UsageError(f"NBD URI {text!r}: unknown parameter {sorted(query)[0]!r}")
    return NbdUri(None, None, os.path.abspath(sockets[0]), export)


@dataclass(frozen=True, slots=True)
class Probed:
    """What a server said about one export: the URI (with the real export name, no PVID)."""

    uri: NbdUri
    info: VolInfo


def _nbd_module() -> Any:
    try:
        import nbd
    except ImportError as e:
        raise ExternalCommandFailed(
            "the libnbd Python binding is missing (install python3-libnbd)"
        ) from e
    return nbd


def _reason(e: Exception) -> str:
    """libnbd's message without the ``nbd_xxx:`` prefix: one line for our own error."""
    text = str(getattr(e, "string", None) or e)
    first = text.splitlines()[0] if text else type(e).__name__
    head, sep, rest = first.partition(": ")
    return rest if sep and head.startswith("nbd_") else first


class Session:
    """One NBD connection held in option negotiation; ask about exports, then close.

    ``with Session(uri) as s: s.info("vol1")``.  No export is ever opened for I/O.
    """

    def __init__(self, uri: NbdUri, *, timeout: float = CONNECT_TIMEOUT) -> None:
        self.uri = uri
        nbd = _nbd_module()
        self._error: type[Exception] = nbd.Error
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.set_full_info(True)
        # aio connect + poll, so an unreachable host costs at most ``timeout``, not the
        # kernel's SYN retry budget.
        try:
            h.aio_connect_uri(uri.server)
            deadline = time.monotonic() + timeout
            while h.aio_is_connecting():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"NBD server {uri.server}: no answer within {timeout:g}s")
                h.poll(max(1, int(min(remaining, 1.0) * 1000)))
        except self._error as e:
            raise ConnectionFailed(f"cannot reach NBD server {uri.server}: {_reason(e)}") from e
        if not h.aio_is_negotiating():
            raise ConnectionFailed(f"NBD server {uri.server} closed the connection")
        self._h = h

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        h, self._h = self._h, None
        if h is None:
            return
        if h.aio_is_negotiating():
            # A polite goodbye; if the server went away first there is nothing left to close.
            with contextlib.suppress(self._error):
                h.opt_abort()

    def _ask(self, export: str) -> str | None:
        """The export's description, or None when the server refuses the export."""
        h = self._h
        if h is None:
            raise IllegalState("probe session is closed")
        h.set_export_name(export)
        try:
            h.opt_info()
        except self._error as e:
            if h.aio_is_negotiating():
                return None  # refused: unknown export, or the access check said no
            raise PeerLost(f"NBD server {self.uri.server}: {_reason(e)}") from e
        try:
            desc = h.get_export_description()
        except self._error:
            return ""  # no description at all: parse_description says "not pairvol"
        return str(desc) if desc is not None else ""

    def info(self, name: str) -> VolInfo | None:
        """PVID and VOL information of export ``name`` (None if the server has no such export)."""
        desc = self._ask(name)
        return None if desc is None else parse_description(desc)

    def exports(self) -> list[str]:
        h = self._h
        if h is None:
            raise IllegalState("probe session is closed")
        names: list[str] = []

        def collect(name: str, _description: str) -> int:
            names.append(name)
            return 0

        try:
            h.opt_list(collect)
        except self._error:
            return []  # listing is optional for a server; only used to improve a message
        return names

    def not_found(self, name: str | None) -> NotFound:
        served = ", ".join(self.exports()) or "none listed"
        what = f"no export named {name!r}" if name else "no default export"
        return NotFound(f"NBD server {self.uri.server}: {what} (exports: {served})")


def probe(uri: NbdUri, *, timeout: float = CONNECT_TIMEOUT) -> Probed:
    """Read PVID and VOL information straight from the served volume (bypassing any cache).

    A URI with ``@PVID`` is probed through the access check, like :func:`check_access`.
    """
    if uri.export.pvid is not None:
        checked = check_access(
            uri.with_export(uri.export.name), format_pvid(uri.export.pvid), str(uri), timeout
        )
        return Probed(uri.with_export(checked.name), checked)
    with Session(uri, timeout=timeout) as s:
        found = s.info(uri.export.name or "")
        if found is None:
            raise s.not_found(uri.export.name)
        info = found
    if uri.export.name is not None and info.name != uri.export.name:
        raise IllegalState(
            f"NBD server {uri.server}: export {uri.export.name!r} says it is volume {info.name!r}"
        )
    return Probed(uri.with_export(info.name), info)


def check_access(uri: NbdUri, pvid: str, where: str, timeout: float = CONNECT_TIMEOUT) -> VolInfo:
    """SPEC section 1's access check: the volume must carry ``pvid``.

    Asks for ``NAME@PVID``, so the server itself refuses a wrong identity; when it does,
    asks for ``NAME`` to learn the actual PVID and raises :class:`PvidMismatch` naming
    ``where`` (the device), the expected PVID and the actual one.
    """
    name = uri.export.name
    if name is None:
        raise UsageError(f"{where}: the access check needs an export name")
    expected = format_pvid(parse_pvid(pvid))
    with Session(uri, timeout=timeout) as s:
        info = s.info(f"{name}@{expected}")
        if info is not None:
            if info.pvid != expected:  # a server that ignores '@PVID' is not to be trusted
                raise PvidMismatch(where, expected, info.pvid)
            return info
        actual = s.info(name)
        if actual is None:
            raise s.not_found(name)
    if actual.pvid != expected:
        raise PvidMismatch(where, expected, actual.pvid)
    # Refused with the right PVID: it changed under us twice, or the name is ambiguous.
    raise IllegalState(
        f"{where}: the server refused {name}@{expected} although the volume reports that "
        "PVID; check the server's log"
    )
