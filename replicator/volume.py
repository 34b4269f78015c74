"""A volume: one image file holding a two-slot header, a metadata region and the data area.

This module does the file I/O around the pure codec in :mod:`replicator.header`.  Creation is
atomic (the image is built under a temporary name and linked into place, so a crash never
leaves a half-made volume under the real name) and never overwrites an existing file.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self, TypeVar

from replicator import header as hdr
from replicator.atomic_file import fsync_dir
from replicator.errors import (
    AlreadyExists,
    HeaderCorrupt,
    IllegalState,
    NotFound,
    PairvolError,
    UsageError,
    VolumeError,
)
from replicator.pvid import new_pvid

DEFAULT_BLOCK_SIZE = 4096
_T = TypeVar("_T", str, int)


_FILE_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISCHR, "a character device"),
)


def _require_regular(path: str, stat_fn: Callable[[_T], os.stat_result], target: _T) -> None:
    """UsageError unless ``target`` (a path, or an fd for fstat) is a regular file."""
    try:
        mode = stat_fn(target).st_mode
    except OSError as e:
        raise _os_error(e, path, "open") from e
    if stat.S_ISREG(mode):
        return
    kind = next((what for test, what in _FILE_TYPES if test(mode)), "an unknown kind of file")
    raise UsageError(f"{path} is not a regular file ({kind}), so not a volume image")


def _os_error(e: OSError, path: str, doing: str) -> PairvolError:
    if e.errno == errno.ENOENT:
        return NotFound(f"{path}: no such file ({doing})")
    if e.errno == errno.EEXIST:
        return AlreadyExists(f"{path} already exists; refusing to overwrite it")
    if e.errno == errno.EISDIR:
        return UsageError(f"{path} is a directory, not a volume image")
    return VolumeError(f"{path}: {doing}: {e.strerror}", e.errno or errno.EIO)


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    return data.ljust(size, b"\x00") if len(data) < size else data


def _pwrite_exact(fd: int, data: bytes, offset: int) -> None:
    n = os.pwrite(fd, data, offset)
    if n != len(data):
        raise VolumeError(f"short write ({n} of {len(data)} bytes) at offset {offset}")


@dataclass(frozen=True, slots=True)
class HeaderReport:
    """The result of reading the two header slots (and whether anything was repaired)."""

    choice: hdr.Choice
    repaired: tuple[int, ...] = ()

    @property
    def header(self) -> hdr.Header:
        return self.choice.header

    def health(self) -> str:
        if self.repaired:
            slots = ", ".join("AB"[i] for i in self.repaired)
            return f"repaired (slot {slots} rewritten from the good slot)"
        return self.choice.describe()

    def note(self, unrepaired: str = "not repaired") -> str | None:
        """One line for a log when a slot was bad: which, why, which generation was kept, and
        what became of it (``unrepaired`` says why it was left alone).  None when all is well."""
        choice = self.choice
        if choice.healthy:
            return None
        kept = next((i for i, s in enumerate(choice.slots) if s.status == "ok"), 0)
        bad = "; ".join(
            f"slot {'AB'[i]} {choice.slots[i].status} ({choice.slots[i].reason})"
            for i in choice.bad_slots
        )
        if self.repaired:
            done = f"slot {', '.join('AB'[i] for i in self.repaired)} rewritten from it"
        else:
            done = unrepaired
        return (
            f"header {bad}: kept slot {'AB'[kept]} (generation {choice.header.generation}); {done}"
        )


def looks_like_volume(path: str) -> bool:
    """Cheap test used when scanning a directory: is it a regular file that starts with the
    header magic?  (Never opens a FIFO or device, which could block or have side effects.)"""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            a = os.pread(fd, len(hdr.MAGIC), hdr.SLOT_OFFSETS[0])
            b = os.pread(fd, len(hdr.MAGIC), hdr.SLOT_OFFSETS[1])
        finally:
            os.close(fd)
    except OSError:
        return False
    return hdr.MAGIC in (a, b)


class Volume:
    """An open volume image.  Use :meth:`create` or :meth:`open`; close it (or use ``with``)."""

    def __init__(self, path: str, fd: int, report: HeaderReport, writable: bool) -> None:
        self.path = path
        self.fd = fd
        self.report = report
        self.writable = writable
        #: Set by :meth:`open` and :meth:`reread` when a header slot was damaged or stale: one
        #: line for the log (which slot, why, the generation kept, repaired or not).
        self.repair_note: str | None = None

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str,
        size: int,
        *,
        pvid: int | None = None,
        name: str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> Self:
        """Create a sparse volume at ``path``; refuse if anything already exists there."""
        if os.path.lexists(path):
            raise AlreadyExists(f"{path} already exists; refusing to overwrite it")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise NotFound(f"directory {directory} does not exist")
        if name is None:
            name = os.path.basename(path).rsplit(".", 1)[0] or os.path.basename(path)
        header = hdr.Header.new(
            pvid=pvid if pvid is not None else new_pvid(),
            name=name,
            data_size=size,
            block_size=block_size,
            created_ns=time.time_ns(),
            vol_uuid=uuid.uuid4(),
        )
        tmp = os.path.join(directory, f".{os.path.basename(path)}.creating-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _os_error(e, tmp, "create") from e
        try:
            os.ftruncate(fd, header.image_size)
            slot = hdr.encode(header)
            for off in hdr.SLOT_OFFSETS:
                _pwrite_exact(fd, slot, off)
            os.fsync(fd)
            os.link(tmp, path)  # atomic, and fails rather than replacing an existing file
        except OSError as e:
            os.close(fd)
            os.unlink(tmp)
            if e.errno == errno.EFBIG:
                raise UsageError(f"size {size} is too large for the filesystem of {path}") from e
            raise _os_error(e, path, "create") from e
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.unlink(tmp)
        fsync_dir(directory)
        report = HeaderReport(hdr.choose(slot, slot))
        return cls(path, fd, report, writable=True)

    @classmethod
    def open(cls, path: str, *, writable: bool = False, repair: bool | None = None) -> Self:
        """Open and validate a volume.

        Only a regular file is opened: a FIFO, socket, directory or device is refused before
        anything could block on it.  A damaged or stale slot is rewritten from the good one
        only when the volume is opened writable (``repair=False`` keeps it as it is), and
        either way :attr:`repair_note` says what was found, so the caller can log it."""
        do_repair = writable if repair is None else repair
        if do_repair and not writable:
            raise IllegalState(f"{path}: a header repair needs the volume opened writable")
        _require_regular(path, os.stat, path)
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, open must not wait
        # for a writer; fstat below refuses it.  It means nothing for a regular file.
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(path, flags | os.O_NONBLOCK)
        except OSError as e:
            raise _os_error(e, path, "open") from e
        try:
            _require_regular(path, os.fstat, fd)
            os.set_blocking(fd, True)
            choice = cls._read_choice(fd, path)
            vol = cls(path, fd, HeaderReport(choice), writable)
            size = os.fstat(fd).st_size
            if size < choice.header.image_size:
                raise HeaderCorrupt(
                    f"{path}: image is {size} bytes but the header needs "
                    f"{choice.header.image_size}; the file was truncated"
                )
            if do_repair and not choice.healthy:
                vol._repair()
            why = (
                "not repaired (opened read-only)" if not writable else "not repaired (asked not to)"
            )
            vol.repair_note = vol.report.note(why)
        except BaseException:
            os.close(fd)
            raise
        return vol

    @staticmethod
    def _read_choice(fd: int, path: str) -> hdr.Choice:
        try:
            a = _pread_exact(fd, hdr.SLOT_SIZE, hdr.SLOT_OFFSETS[0])
            b = _pread_exact(fd, hdr.SLOT_SIZE, hdr.SLOT_OFFSETS[1])
        except OSError as e:
            raise _os_error(e, path, "read header") from e
        try:
            return hdr.choose(a, b)
        except HeaderCorrupt as e:
            raise HeaderCorrupt(f"{path}: {e}") from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- header -----------------------------------------------------------------------------

    @property
    def header(self) -> hdr.Header:
        return self.report.header

    def reread(self) -> hdr.Header:
        """Read the header from disk again (another process may have changed it)."""
        self.report = HeaderReport(self._read_choice(self.fd, self.path))
        self.repair_note = self.report.note("not repaired (found by a re-read)")
        return self.header

    def _require_writable(self) -> None:
        if not self.writable:
            raise IllegalState(f"{self.path} is open read-only")

    def _repair(self) -> None:
        self._require_writable()
        choice = self.report.choice
        slot = hdr.encode(choice.header)
        try:
            for i in choice.bad_slots:
                _pwrite_exact(self.fd, slot, hdr.SLOT_OFFSETS[i])
            os.fsync(self.fd)
        except OSError as e:
            raise _os_error(e, self.path, "repair header") from e
        self.report = HeaderReport(choice, tuple(choice.bad_slots))

    def write_header(self, new: hdr.Header) -> hdr.Header:
        """Write ``new`` to slot A, sync, then slot B, sync: a crash leaves one good slot."""
        self._require_writable()
        if new.generation <= self.header.generation:
            raise IllegalState("a header update must bump the generation")
        slot = hdr.encode(new)
        try:
            for off in hdr.SLOT_OFFSETS:
                _pwrite_exact(self.fd, slot, off)
                os.fsync(self.fd)
        except OSError as e:
            raise _os_error(e, self.path, "write header") from e
        self.report = HeaderReport(hdr.choose(slot, slot))
        return new

    def set_pvid(self, pvid: int | None = None) -> hdr.Header:
        """Give the volume ``pvid``, or a fresh one when None.  Returns the new header."""
        old = self.header
        avoid = {old.pvid, old.prev_pvid}
        if pvid is None:
            pvid = new_pvid(avoid)
        elif pvid == old.pvid:
            raise IllegalState(f"{self.path} already has PVID {old.pvid_hex}")
        return self.write_header(old.next(pvid=pvid, prev_pvid=old.pvid))

    def update_info(self, **changes: object) -> hdr.Header:
        return self.write_header(self.header.next(**changes))
