"""A standalone two-slot record file: the file I/O around :mod:`replicator.record_codec`.

The file is exactly two slots, A at offset 0 and B at ``slot_size`` (docs/format.md,
"Two-slot records").  It survives ``kill -9`` and power loss at any point:

* :func:`create` builds the whole file (both slots, generation 1) under a hidden temporary
  name in the same directory, ``fsync``s it, links it to its name (which refuses an existing
  file; ``replace=True`` renames over it instead) and ``fsync``s the directory.  A crash leaves
  no record or a complete one, plus at worst a ``.NAME.creating-XXXXXXXX`` leftover.
* :func:`write` takes the file's lock, chooses between the slots, and writes the next
  generation with ``os.pwrite`` + ``fdatasync`` to one slot and then the other, in
  :func:`~replicator.record_codec.next_write`'s order (the slot that does not hold the newest
  record first).  A torn write damages only the slot being written: the other one still holds
  the record as it was before the write, or as it is after it.
* :func:`read` chooses between the slots: the newest valid one wins, and :attr:`Record.note`
  says what was wrong with the other.  It never writes (the next :func:`write` rewrites both).

Only a file with no valid slot at all is an error (:class:`RecordCorrupt`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from dataclasses import dataclass

from replicator import record_codec as rc
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


class RecordCorrupt(HeaderCorrupt):
    """Neither slot of a record file is valid: the file names what was wrong with each."""


@dataclass(frozen=True, slots=True)
class Record:
    """What a record file holds: the newest valid payload and how the slots were found."""

    path: str
    payload: bytes
    generation: int
    choice: rc.Choice[bytes]
    #: One line for a log when a slot was damaged or stale (None when both were good):
    #: ``PATH: NAME slot B damaged (bad CRC32C (...)): kept slot A (generation 2)``.
    note: str | None = None


def _os_error(e: OSError, path: str, doing: str) -> PairvolError:
    if e.errno == errno.ENOENT:
        return NotFound(f"{path}: no such file ({doing})")
    if e.errno == errno.EEXIST:
        return AlreadyExists(f"{path} already exists; refusing to overwrite it")
    if e.errno == errno.EISDIR:
        return UsageError(f"{path} is a directory, not a record file")
    return VolumeError(f"{path}: {doing}: {e.strerror}", e.errno or errno.EIO)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (a short write continues; none at all is EIO)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite returned {n}")
        view = view[n:]
        offset += n


def _open(path: str, flags: int, doing: str) -> int:
    """Open ``path`` if it is a regular file (O_NONBLOCK: a FIFO put there never blocks)."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise _os_error(e, path, doing) from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{path} is not a regular file, so not a record file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _choice(path: str, codec: rc.SlotCodec, fd: int) -> rc.Choice[bytes]:
    try:
        image = os.pread(fd, 2 * codec.slot_size, 0)
    except OSError as e:
        raise _os_error(e, path, "read") from e
    picked = rc.read_pair(codec, image)
    if isinstance(picked, rc.NoValidSlot):
        raise RecordCorrupt(f"{path}: no valid {codec.name} slot ({picked.describe()})")
    return picked


def _record(path: str, codec: rc.SlotCodec, choice: rc.Choice[bytes]) -> Record:
    return Record(
        path, choice.value, choice.generation, choice, choice.note(f"{path}: {codec.name}")
    )


def _written(path: str, codec: rc.SlotCodec, image: bytes) -> Record:
    """The record both slots now hold."""
    choice = rc.read_pair(codec, image + image)
    assert isinstance(choice, rc.Choice)
    return _record(path, codec, choice)


def create(
    path: str, codec: rc.SlotCodec, payload: bytes, *, mode: int = 0o644, replace: bool = False
) -> Record:
    """Create the record file ``path`` holding ``payload`` at generation 1 in both slots.

    :class:`AlreadyExists` if ``path`` exists, unless ``replace`` (then the new file takes its
    place atomically: a reader sees the old file or the new one)."""
    image = codec.encode(1, payload)
    directory = os.path.dirname(os.path.abspath(path))
    if not replace and os.path.lexists(path):
        raise AlreadyExists(f"{path} already exists; refusing to overwrite it")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.creating-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as e:
        raise _os_error(e, tmp, "create") from e
    try:
        _pwrite_all(fd, image + image, 0)
        os.fsync(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, and fails rather than replacing an existing file
    except OSError as e:
        raise _os_error(e, path, "create") from e
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # gone already when renamed
            os.unlink(tmp)
    try:
        fsync_dir(directory)
    except OSError as e:
        raise _os_error(e, directory, "sync directory") from e
    return _written(path, codec, image)


def read(path: str, codec: rc.SlotCodec) -> Record:
    """The newest valid record in ``path``; :class:`RecordCorrupt` if no slot is valid."""
    fd = _open(path, os.O_RDONLY, "read")
    try:
        return _record(path, codec, _choice(path, codec, fd))
    finally:
        os.close(fd)


def write(
    path: str, codec: rc.SlotCodec, payload: bytes, *, expected_generation: int | None = None
) -> Record:
    """Make ``payload`` the record in ``path``, at the next generation; return it.

    Writers are serialized by an exclusive ``flock`` on the file.  ``expected_generation``
    makes it a compare-and-swap: :class:`IllegalState` (nothing written) unless the record
    is still at that generation.  :class:`RecordCorrupt` (nothing written) if no slot is
    valid: which generation to write above would be a guess; :func:`create` with
    ``replace=True`` starts the file over."""
    codec.encode(0, payload)  # a payload that cannot fit fails before the file is touched
    fd = _open(path, os.O_RDWR, "write")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            raise _os_error(e, path, "lock") from e
        choice = _choice(path, codec, fd)
        if expected_generation is not None and choice.generation != expected_generation:
            raise IllegalState(
                f"{path}: {codec.name} is at generation {choice.generation}, "
                f"not {expected_generation}; someone else wrote it"
            )
        plan = rc.next_write(choice)
        image = codec.encode(plan.generation, payload)
        try:
            for i in plan.order:
                _pwrite_all(fd, image, i * codec.slot_size)
                os.fdatasync(fd)
        except OSError as e:
            raise _os_error(e, path, f"write slot {'AB'[i]}") from e
    finally:
        os.close(fd)
    return _written(path, codec, image)
