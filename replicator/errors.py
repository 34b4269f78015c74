"""The one exception tree of pairvol.

Every failure a user can provoke is a subclass of :class:`PairvolError`.  Each class carries
the ``errno`` that the NBD plugin reports to clients and the ``exit_code`` that the CLI maps
it to; that mapping lives here and nowhere else (see README, "Exit codes").

As in trio, "we closed it" (:class:`Closed`) and "it broke under us" (:class:`PeerLost`) are
different errors.
"""

from __future__ import annotations

import errno as _errno


class PairvolError(Exception):
    """Base of every error pairvol raises on purpose.  The message is one line."""

    exit_code: int = 1
    errno: int = _errno.EIO


class UsageError(PairvolError):
    """Bad command-line input: a size, a name, a PVID that does not parse."""

    exit_code = 2
    errno = _errno.EINVAL


class NotFound(PairvolError):
    """A volume file, export, device name or peer that does not exist."""

    exit_code = 3
    errno = _errno.ENOENT


class AlreadyExists(PairvolError):
    """Refusing to create over something that is already there."""

    exit_code = 4
    errno = _errno.EEXIST


class IllegalState(PairvolError):
    """The object exists but the operation is not allowed in its current state."""

    exit_code = 5
    errno = _errno.EBUSY


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
