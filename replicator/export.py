"""The NBD export behind the nbdkit plugin: typed objects, no nbdkit import.

:class:`Exporter` holds the plugin's configuration (one volume, or a directory of them) and
resolves export names; :class:`ExportHandle` is one client connection's open volume.  Every
data-path method works on offsets in the *data area* and adds the header's ``data_offset``,
after a bounds check, so no client request can ever reach the header or metadata regions.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from replicator import falloc
from replicator.errors import NotFound, PvidMismatch, UsageError, VolumeError
from replicator.export_info import describe, parse_export_name
from replicator.header import Header
from replicator.pvid import format_pvid
from replicator.volume import Volume, looks_like_volume

# nbdkit's extent type bits (nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO).
EXTENT_DATA = 0
EXTENT_HOLE_ZERO = 3
MAX_REQUEST = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Listed:
    name: str
    path: str
    header: Header


class Exporter:
    """Plugin-wide state: which volumes are served, and how names map to them."""

    def __init__(self) -> None:
        self.volume_path: str | None = None
        self.directory: str | None = None

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

    def volumes(self) -> list[Listed]:
        """Every volume served, read fresh from disk (they may change while we run)."""
        if self.volume_path is not None:
            paths = [self.volume_path]
        else:
            assert self.directory is not None
            paths = []
            for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                if looks_like_volume(entry.path):
                    paths.append(entry.path)
        found = []
        for path in paths:
            with Volume.open(path) as v:
                found.append(Listed(v.header.name, path, v.header))
        return found

    def list_exports(self) -> list[tuple[str, str]]:
        return [(v.name, describe(v.header)) for v in self.volumes()]

    def default_export(self) -> str:
        vols = self.volumes()
        return vols[0].name if len(vols) == 1 else ""

    def resolve(self, export_name: str) -> str:
        """Map ``[NAME][@PVID]`` to a volume path and run the access check."""
        wanted = parse_export_name(export_name)
        vols = self.volumes()
        if wanted.name is None:
            if len(vols) != 1:
                names = ", ".join(v.name for v in vols) or "none"
                raise NotFound(f"no default export: name one of the volumes ({names})")
            matches = vols
        else:
            matches = [v for v in vols if v.name == wanted.name]
        if not matches:
            raise NotFound(f"no volume named {wanted.name!r} is served here")
        if len(matches) > 1:
            paths = ", ".join(v.path for v in matches)
            raise VolumeError(f"volume name {wanted.name!r} is ambiguous: {paths}", errno.EIO)
        chosen = matches[0]
        if wanted.pvid is not None and wanted.pvid != chosen.header.pvid:
            raise PvidMismatch(
                f"export {chosen.name!r} ({chosen.path})",
                format_pvid(wanted.pvid),
                chosen.header.pvid_hex,
            )
        return chosen.path

    def open(self, export_name: str, readonly: bool) -> ExportHandle:
        path = self.resolve(export_name)
        vol = Volume.open(path, writable=not readonly)
        return ExportHandle(vol, readonly)


class ExportHandle:
    """One connection's open volume.  Methods raise OSError or PairvolError with an errno."""

    __slots__ = ("base", "fd", "header", "readonly", "size", "volume")

    def __init__(self, volume: Volume, readonly: bool) -> None:
        self.volume = volume
        self.header = volume.header
        self.fd = volume.fd
        self.base = self.header.data_offset
        self.size = self.header.data_size
        self.readonly = readonly

    def close(self) -> None:
        self.volume.close()

    def description(self) -> str:
        return describe(self.header)

    def block_size(self) -> tuple[int, int, int]:
        return (1, self.header.block_size, MAX_REQUEST)

    def _check(self, count: int, offset: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise VolumeError(
                f"request [{offset}, {offset + count}) is outside the data area of {self.size}",
                errno.EINVAL,
            )

    def pread(self, buf: memoryview, offset: int) -> None:
        self._check(len(buf), offset)
        n = os.preadv(self.fd, [buf], self.base + offset)
        if n != len(buf):
            raise VolumeError(f"short read ({n} of {len(buf)} bytes) at {offset}")

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        self._check(len(buf), offset)
        n = os.pwritev(self.fd, [buf], self.base + offset, os.RWF_DSYNC if fua else 0)
        if n != len(buf):
            raise VolumeError(f"short write ({n} of {len(buf)} bytes) at {offset}", errno.ENOSPC)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, count: int, offset: int, fua: bool) -> None:
        self._check(count, offset)
        falloc.punch_hole(self.fd, self.base + offset, count)
        if fua:
            os.fdatasync(self.fd)

    def zero(self, count: int, offset: int, may_trim: bool, fua: bool) -> None:
        """Zero a range; punch a hole when allowed.  EOPNOTSUPP makes nbdkit write zeros."""
        self._check(count, offset)
        if may_trim:
            falloc.punch_hole(self.fd, self.base + offset, count)
        else:
            falloc.zero_range(self.fd, self.base + offset, count)
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
