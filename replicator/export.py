"""The NBD export behind the nbdkit plugin: typed objects, no nbdkit import.

:class:`Exporter` holds the plugin's configuration (one volume, or a directory of them) and
resolves export names; :class:`ExportHandle` is one client connection's open volume.  Every
data-path method works on offsets in the *data area* and adds the header's ``data_offset``,
after a bounds check, so no client request can ever reach the header or metadata regions.

Errors are :class:`~replicator.errors.PairvolError` or :class:`OSError`; both carry the errno
the plugin hands to nbdkit.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from replicator import falloc
from replicator.errors import NotFound, PairvolError, PvidMismatch, UsageError, VolumeError
from replicator.export_info import ExportName, describe, parse_export_name
from replicator.header import Header
from replicator.pvid import format_pvid
from replicator.volume import Volume, looks_like_volume

# nbdkit's extent type bits (nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO).
EXTENT_DATA = 0
EXTENT_HOLE_ZERO = 3
MAX_REQUEST = 0xFFFFFFFF


def _warn_stderr(message: str) -> None:
    print(f"pairvol: {message}", file=sys.stderr, flush=True)


#: Thread id -> the handle whose *plain* request (no pair policy) that thread is carrying out.
#: The plugin's fast path publishes itself here before it looks at ``handle.plain``; a pair
#: created under open handles flips ``plain`` and then waits, with :func:`quiesce`, until no
#: plain request is left in flight on them (an RCU-style grace period: two dict stores per
#: request instead of a lock; docs/decisions.md, "Open handles follow the volume's role").
INFLIGHT: dict[int, object] = {}
get_ident = threading.get_ident

#: The requests the plugin received and the bytes they asked for, per op (the metrics'
#: ``pairvol_io_*_total``, replicator/metrics.py).  Each thread counts in a row of its own,
#: keyed by thread id like INFLIGHT, so the hot path is two plain integer increments, with no
#: lock and no lost update; :func:`io_totals` sums the rows.  Row: requests, bytes per op.
IO_OPS = ("read", "write", "trim", "zero", "flush", "cache")
IO_READ, IO_WRITE, IO_TRIM, IO_ZERO, IO_FLUSH, IO_CACHE = range(0, 2 * len(IO_OPS), 2)
IO_ROWS: dict[int, list[int]] = {}


def io_row() -> list[int]:
    """The calling thread's row of counters (made on its first request)."""
    return IO_ROWS.setdefault(get_ident(), [0] * (2 * len(IO_OPS)))


def io_totals() -> dict[str, tuple[int, int]]:
    """op -> (requests, bytes), over every thread's row."""
    rows = list(IO_ROWS.values())
    return {
        op: (sum(r[2 * i] for r in rows), sum(r[2 * i + 1] for r in rows))
        for i, op in enumerate(IO_OPS)
    }


def quiesce(handles: Collection[object], timeout: float = 30.0) -> None:
    """Return once no thread is inside a plain request on any of ``handles``."""
    if not handles:
        return
    ids = {id(h) for h in handles}
    deadline = time.monotonic() + timeout
    while any(id(h) in ids for h in list(INFLIGHT.values()) if h is not None):
        if time.monotonic() > deadline:
            raise VolumeError(f"plain requests did not finish within {timeout:g}s", errno.EIO)
        time.sleep(0.001)


@dataclass(frozen=True, slots=True)
class Listed:
    name: str
    path: str
    header: Header


class Exporter:
    """Plugin-wide state: which volumes are served, and how names map to them.

    Nothing about the volumes is cached: every listing and every new connection reads the
    headers again, so a volume created, re-PVIDed or removed while nbdkit runs is seen at once.
    """

    def __init__(self, warn: Callable[[str], None] = _warn_stderr) -> None:
        self.volume_path: str | None = None
        self.directory: str | None = None
        self._warn = warn

    def config(self, key: str, value: str) -> None:
        if key == "volume":
            self.volume_path = os.path.abspath(value)
        elif key == "dir":
            self.directory = os.path.abspath(value)
        else:
            raise UsageError(f"unknown parameter {key!r}; expected volume=PATH or dir=DIR")

    def config_complete(self) -> None:
        if (self.volume_path is None) == (self.directory is None):
            raise UsageError("give exactly one of volume=PATH or dir=DIR")
        if self.directory is not None and not os.path.isdir(self.directory):
            raise NotFound(f"dir={self.directory} is not a directory")
        if self.volume_path is not None:
            with Volume.open(self.volume_path):  # fail at start-up, not at first connection
                pass

    def _candidates(self) -> list[str]:
        assert self.directory is not None
        paths = []
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            # Dot files include Volume.create's half-built ".NAME.creating-XXXX" images.
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            if looks_like_volume(entry.path):
                paths.append(entry.path)
        return paths

    def volumes(self) -> list[Listed]:
        """Every volume served, read fresh from disk (they may change while we run)."""
        if self.volume_path is not None:
            with Volume.open(self.volume_path) as v:
                return [Listed(v.header.name, self.volume_path, v.header)]
        found = []
        for path in self._candidates():
            try:
                with Volume.open(path) as v:
                    found.append(Listed(v.header.name, path, v.header))
            except PairvolError as e:
                # One damaged (or just deleted) file must not take every other export down.
                self._warn(f"not serving {path}: {e}")
        return found

    def list_exports(self) -> list[tuple[str, str]]:
        return [(v.name, describe(v.header)) for v in self.volumes()]

    def default_export(self) -> str:
        vols = self.volumes()
        return vols[0].name if len(vols) == 1 else ""

    def _select(self, wanted: ExportName) -> Listed:
        vols = self.volumes()
        if wanted.name is None:
            if len(vols) != 1:
                names = ", ".join(v.name for v in vols) or "none"
                raise NotFound(f"no default export: name one of the volumes ({names})")
            return vols[0]
        matches = [v for v in vols if v.name == wanted.name]
        if not matches:
            raise NotFound(f"no volume named {wanted.name!r} is served here")
        if len(matches) > 1:
            paths = ", ".join(v.path for v in matches)
            raise VolumeError(f"volume name {wanted.name!r} is ambiguous: {paths}", errno.EIO)
        return matches[0]

    def open(self, export_name: str, readonly: bool) -> ExportHandle:
        """Open the export ``[NAME][@PVID]`` names, after SPEC section 1's access check."""
        wanted = parse_export_name(export_name)
        chosen = self._select(wanted)
        vol = Volume.open(chosen.path, writable=not readonly)
        if vol.repair_note is not None and not readonly:
            self._warn(f"{chosen.path}: {vol.repair_note}")  # a repair is never silent
        try:
            # Check the header read through the descriptor we are about to serve, not the one
            # from the scan: a PVID changed in between must not slip through.
            h = vol.header
            if wanted.name is not None and h.name != wanted.name:
                raise NotFound(f"{chosen.path} was renamed to {h.name!r} while being opened")
            if wanted.pvid is not None and wanted.pvid != h.pvid:
                raise PvidMismatch(
                    f"export {h.name!r} ({chosen.path})", format_pvid(wanted.pvid), h.pvid_hex
                )
        except BaseException:
            vol.close()
            raise
        return ExportHandle(vol, readonly, wanted.pvid)


class ExportHandle:
    """One connection's open volume.  Methods raise OSError or PairvolError with an errno."""

    __slots__ = ("base", "fd", "header", "readonly", "size", "volume", "want_pvid")
    #: The plugin may bypass pread/pwrite for plain volumes (see plugins/pairvol.py).
    plain = True

    def __init__(self, volume: Volume, readonly: bool, want_pvid: int | None = None) -> None:
        self.volume = volume
        self.header = volume.header
        self.fd = volume.fd
        self.base = self.header.data_offset
        self.size = self.header.data_size
        self.readonly = readonly
        #: The PVID the client named (``NAME@PVID``), checked again whenever the PVID changes.
        self.want_pvid = want_pvid

    def close(self) -> None:
        self.volume.close()

    def description(self) -> str:
        return describe(self.header)

    def block_size(self) -> tuple[int, int, int]:
        return (1, self.header.block_size, MAX_REQUEST)

    def _outside(self, count: int, offset: int) -> VolumeError:
        return VolumeError(
            f"request [{offset}, {offset + count}) is outside the data area of {self.size} bytes",
            errno.EINVAL,
        )

    def _check(self, count: int, offset: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise self._outside(count, offset)

    # pread and pwrite are the hot path (benchmarked against nbdkit's C file plugin): the
    # bounds check is inlined and the client's buffer goes straight to the syscall.

    def pread(self, buf: memoryview, offset: int) -> None:
        count = len(buf)
        if offset < 0 or offset + count > self.size:
            raise self._outside(count, offset)
        done = os.preadv(self.fd, [buf], self.base + offset)
        if done != count:
            raise VolumeError(f"short read ({done} of {count} bytes) at {offset}", errno.EIO)

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        count = len(buf)
        if offset < 0 or offset + count > self.size:
            raise self._outside(count, offset)
        done = os.pwritev(self.fd, [buf], self.base + offset, os.RWF_DSYNC if fua else 0)
        if done != count:
            raise VolumeError(f"short write ({done} of {count} bytes) at {offset}", errno.ENOSPC)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, count: int, offset: int, fua: bool) -> None:
        """Punch a hole.  Trim is advisory in NBD, so a filesystem without hole punching
        makes it a no-op rather than an error."""
        self._check(count, offset)
        try:
            falloc.punch_hole(self.fd, self.base + offset, count)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            return
        if fua:
            os.fdatasync(self.fd)

    def zero(self, count: int, offset: int, may_trim: bool, fua: bool) -> None:
        """Zero a range: punch a hole when the client allows it, else FALLOC_FL_ZERO_RANGE.

        Where the filesystem has neither (ZERO_RANGE is missing on tmpfs, for one) the
        OSError(EOPNOTSUPP) propagates, and nbdkit, given that errno, writes zeros itself
        (or, for a fast-zero request, tells the client zeroing would be slow)."""
        self._check(count, offset)
        pos = self.base + offset
        punched = False
        if may_trim:
            try:
                falloc.punch_hole(self.fd, pos, count)
                punched = True
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
        if not punched:
            falloc.zero_range(self.fd, pos, count)
        if fua:
            os.fdatasync(self.fd)

    def cache(self, count: int, offset: int) -> None:
        self._check(count, offset)
        os.posix_fadvise(self.fd, self.base + offset, count, os.POSIX_FADV_WILLNEED)

    def extents(self, count: int, offset: int, req_one: bool) -> list[tuple[int, int, int]]:
        """Data and hole extents of [offset, offset+count) from SEEK_DATA/SEEK_HOLE."""
        self._check(count, offset)
        out: list[tuple[int, int, int]] = []
        pos, end = self.base + offset, self.base + offset + count
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data at or after pos
                    raise
                data = end
            if data > pos:
                stop = min(data, end)
                out.append((pos - self.base, stop - pos, EXTENT_HOLE_ZERO))
                pos = stop
            else:
                hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
                out.append((pos - self.base, hole - pos, EXTENT_DATA))
                pos = hole
            if req_one:
                break
        return out
