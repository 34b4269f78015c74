"""The one exception tree of pairvol.

Every failure a user can provoke is a subclass of :class:`PairvolError`.  Each class carries
the ``errno`` that the NBD plugin reports to clients and the ``exit_code`` that the CLI maps
it to; that mapping lives here and nowhere else (see README, "Exit codes").

As in trio, "we closed it" (:class:`Closed`) and "it broke under us" (:class:`PeerLost`) are
different errors.

Every class is in a registry under its ``kind`` (the class name unless the class sets
``kind``), wherever it is defined: subclassing :class:`PairvolError` is the one line that
registers it.  :func:`to_wire` and :func:`from_wire` carry an error across the node's control
socket by kind, so the CLI rebuilds the same class and exits with the same code as if the
error had been raised in its own process.
"""

from __future__ import annotations

import errno as _errno
import os as _os
from typing import Any, ClassVar

_REGISTRY: dict[str, type[PairvolError]] = {}


def _register(cls: type[PairvolError]) -> None:
    old = _REGISTRY.get(cls.kind)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(
            f"error kind {cls.kind!r} is taken by {old.__module__}.{old.__qualname__}; "
            f"give {cls.__module__}.{cls.__qualname__} its own kind"
        )
    _REGISTRY[cls.kind] = cls  # the same class again (a module reloaded) replaces itself


class PairvolError(Exception):
    """Base of every error pairvol raises on purpose.  The message is one line."""

    exit_code: int = 1
    errno: int = _errno.EIO
    #: The stable name of the class on the control socket; never reuse one for another class.
    kind: ClassVar[str] = "PairvolError"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__:
            cls.kind = cls.__name__
        _register(cls)


class UsageError(PairvolError):
    """Bad command-line input: a size, a name, a PVID that does not parse."""

    exit_code = 2
    errno = _errno.EINVAL


class NotFound(PairvolError):
    """A volume file, export, device name or peer that does not exist."""

    exit_code = 3
    errno = _errno.ENOENT


class LeaseLost(NotFound):
    """A coordination lease that expired or was revoked: its holder no longer holds what the
    lease held (the cluster agent fences itself)."""


class AlreadyExists(PairvolError):
    """Refusing to create over something that is already there."""

    exit_code = 4
    errno = _errno.EEXIST


class IllegalState(PairvolError):
    """The object exists but the operation is not allowed in its current state."""

    exit_code = 5
    errno = _errno.EBUSY


class JournalFull(IllegalState):
    """The entry does not fit in the journal's free space (SPEC section 2, "Journal overflow").
    Raised at once, never after waiting; the journal is unchanged."""


class PeerRefused(PairvolError):
    """The peer answered a request with an Error: ``code`` is its errno, ``message`` its text.
    (The peer *answered*: the link is fine, the request was refused.  A link that broke is
    :class:`ConnectionFailed` or :class:`PeerLost`.)"""

    exit_code = 5

    def __init__(self, code: int, message: str, *, peer: str | None = None) -> None:
        name = _errno.errorcode.get(code, f"errno {code}")
        text = message or _os.strerror(code)
        super().__init__(f"peer {peer!r} refused: {text} [{name}]" if peer else f"{text} [{name}]")
        self.code = code
        self.errno = code
        self.message = message
        self.peer = peer


class HeaderCorrupt(PairvolError):
    """No valid header slot: the file is not a pairvol volume or is damaged beyond repair."""

    exit_code = 6
    errno = _errno.EIO


class PvidMismatch(PairvolError):
    """SPEC section 1 access error: the PVID on the volume is not the one the caller expects."""

    exit_code = 7
    errno = _errno.EACCES

    def __init__(self, where: str, expected: str, actual: str) -> None:
        super().__init__(
            f"access error: {where}: expected PVID {expected} but the volume has PVID {actual}"
        )
        self.where = where
        self.expected = expected
        self.actual = actual


class VolumeError(PairvolError):
    """An I/O failure on a volume's image file; carries the OS errno."""

    def __init__(self, message: str, err: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


class ProtocolError(PairvolError):
    """A malformed or unexpected message, from a peer (remote=True) or from ourselves."""

    exit_code = 8
    errno = _errno.EPROTO
    remote: bool = True

    def __init__(self, message: str, *, remote: bool = True) -> None:
        super().__init__(message)
        self.remote = remote


class ExternalCommandFailed(PairvolError):
    """A helper program (nbdfuse, losetup, mkfs, fio, ...) failed."""

    exit_code = 9


class ConnectionFailed(PairvolError):
    """Could not reach a server or peer at all."""

    exit_code = 20
    errno = _errno.ECONNREFUSED


class PeerLost(ConnectionFailed):
    """The connection broke under us (as opposed to being closed by us)."""

    errno = _errno.ECONNRESET


class Closed(PairvolError):
    """We closed it ourselves; using it afterwards is a programming or state error."""

    exit_code = 5
    errno = _errno.EBADF


class Timeout(PairvolError):
    """No answer in time."""

    exit_code = 21
    errno = _errno.ETIMEDOUT


EXIT_OK = 0
EXIT_CODES: dict[str, int] = {
    "ok": EXIT_OK,
    "error": PairvolError.exit_code,
    "usage": UsageError.exit_code,
    "not-found": NotFound.exit_code,
    "exists": AlreadyExists.exit_code,
    "illegal-state": IllegalState.exit_code,
    "corrupt": HeaderCorrupt.exit_code,
    "access-error": PvidMismatch.exit_code,
    "protocol": ProtocolError.exit_code,
    "external-command": ExternalCommandFailed.exit_code,
    "connection": ConnectionFailed.exit_code,
    "timeout": Timeout.exit_code,
}


_register(PairvolError)


def error_class(kind: str) -> type[PairvolError] | None:
    """The registered class called ``kind``, or None."""
    return _REGISTRY.get(kind)


def to_wire(e: PairvolError) -> dict[str, Any]:
    """``e`` as the control socket carries it: ``{"kind", "bases", "message", "errno"}``.

    ``bases`` are the kinds of its ancestors, nearest first, so that a peer that does not
    know ``kind`` (an older CLI, or a class its process never imported) still rebuilds the
    nearest class it knows and exits with that class's code."""
    bases = [
        c.kind for c in type(e).__mro__[1:] if isinstance(c, type) and issubclass(c, PairvolError)
    ]
    return {"kind": type(e).kind, "bases": bases, "message": str(e), "errno": e.errno}


def from_wire(doc: Any) -> PairvolError:
    """The error an error object from :func:`to_wire` describes, of the same class when this
    process knows it, else of its nearest known base, else :class:`PairvolError`.

    The error is rebuilt from its message and errno alone: ``__init__`` is not called (its
    arguments are not on the wire), so class-specific attributes keep their class defaults.
    Raises ValueError if ``doc`` is not such an object."""
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        raise ValueError(f"not an error object: {doc!r}")
    message = doc.get("message", "")
    bases = doc.get("bases", [])
    if not isinstance(message, str) or not isinstance(bases, list):
        raise ValueError(f"not an error object: {doc!r}")
    cls: type[PairvolError] = PairvolError
    for kind in [doc["kind"], *bases]:
        found = _REGISTRY.get(kind) if isinstance(kind, str) else None
        if found is not None:
            cls = found
            break
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    code = doc.get("errno")
    if type(code) is int and 0 < code < 1 << 31:
        err.errno = code
    return err
