"""The host PVID cache: SPEC section 1's "disk management information buffer".

Theory of operation.  A host keeps one small JSON file naming the volumes it uses.  Each entry
is keyed by a device name (``pv0``, ``pv1``, ... as AIX has ``hdisk0``) and records where the
volume is served (an NBD URI and export name), the PVID and VOL information last read from
the volume, when that read happened, and how the volume is attached as a block device right
now (if it is).  Normal access uses the cached PVID and never reads the disk; only a scan or
a refresh (:mod:`cluster.probe`) reads identities from the volume itself.

:class:`PvidCache` and :class:`CacheEntry` are pure data (no I/O, no clock).  :class:`CacheFile`
is the thin adapter around them: ``read()`` for looking, ``update()`` for read-modify-write
under an ``fcntl`` lock, saved with :func:`replicator.atomic_file.write_atomic` so a crash
leaves the old file or the new one.  A file that does not parse is an error naming the file,
never a silent reset: the cache is the host's only memory of which identity it trusts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from replicator.atomic_file import write_atomic
from replicator.errors import (
    AlreadyExists,
    HeaderCorrupt,
    NotFound,
    PairvolError,
    ProtocolError,
    UsageError,
)
from replicator.export_info import VolInfo
from replicator.pvid import format_pvid, parse_pvid

CACHE_VERSION = 1
DEFAULT_CACHE_PATH = "/var/lib/pairvol/host-cache.json"
CACHE_ENV = "PAIRVOL_HOST_CACHE"
AUTO_PREFIX = "pv"

# Device names become directory names (the nbdfuse mount point), so keep them boring.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")


def check_device_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"device name {name!r} is not valid: use 1-63 letters, digits, '_', '.', '-' "
            "(not starting with '.' or '-')"
        )
    return name


def cache_path(explicit: str | None = None) -> str:
    """``--cache PATH``, else ``$PAIRVOL_HOST_CACHE``, else the system default."""
    if explicit:
        return explicit
    return os.environ.get(CACHE_ENV) or DEFAULT_CACHE_PATH


# -- the data -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attachment:
    """How a cached volume is attached as a block device, with everything ``detach`` undoes.

    ``method`` is ``nbdfuse-loop`` (nbdfuse exposes the export as ``MOUNTPOINT/nbd``, losetup
    turns that file into ``/dev/loopN``) or ``nbd-client`` (the kernel's ``/dev/nbdN``).
    ``helper_pid``/``helper_started`` identify the helper process (nbdfuse, or nbd-client's
    daemon) so a recycled pid is never mistaken for it; ``backing_dev``/``backing_ino``
    identify the loop device's backing file even after its path went stale (a dead nbdfuse
    leaves a path the kernel reports as ``/nbd (deleted)``).
    """

    method: str
    device: str
    uri: str
    attached_ns: int
    helper_pid: int | None = None
    helper_started: float | None = None
    mountpoint: str | None = None
    backing_file: str | None = None
    backing_dev: int | None = None
    backing_ino: int | None = None
    state_dir: str | None = None
    log: str | None = None

    METHODS = ("nbdfuse-loop", "nbd-client")

    def to_json(self) -> dict[str, object]:
        return {
            "method": self.method,
            "device": self.device,
            "uri": self.uri,
            "attached_ns": self.attached_ns,
            "helper_pid": self.helper_pid,
            "helper_started": self.helper_started,
            "mountpoint": self.mountpoint,
            "backing_file": self.backing_file,
            "backing_dev": self.backing_dev,
            "backing_ino": self.backing_ino,
            "state_dir": self.state_dir,
            "log": self.log,
        }

    @classmethod
    def from_json(cls, d: object) -> Attachment:
        m = _mapping(d, "attachment")
        method = _str(m, "method")
        if method not in cls.METHODS:
            raise ValueError(f"attachment method {method!r} is unknown")
        pid = m.get("helper_pid")
        started = m.get("helper_started")
        if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0):
            raise ValueError(f"helper_pid {pid!r} is not a process id")
        if started is not None and not isinstance(started, int | float):
            raise ValueError(f"helper_started {started!r} is not a time")
        return cls(
            method=method,
            device=_str(m, "device"),
            uri=_str(m, "uri"),
            attached_ns=_int(m, "attached_ns"),
            helper_pid=pid,
            helper_started=None if started is None else float(started),
            mountpoint=_opt_str(m, "mountpoint"),
            backing_file=_opt_str(m, "backing_file"),
            backing_dev=_opt_int(m, "backing_dev"),
            backing_ino=_opt_int(m, "backing_ino"),
            state_dir=_opt_str(m, "state_dir"),
            log=_opt_str(m, "log"),
        )


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached volume.  ``uri`` names the server and the export (no ``@PVID``)."""

    uri: str
    export: str
    vol: VolInfo
    scanned_ns: int
    attachment: Attachment | None = None

    @property
    def pvid(self) -> str:
        """The cached PVID: what every access is checked against."""
        return self.vol.pvid

    def to_json(self) -> dict[str, object]:
        return {
            "uri": self.uri,
            "export": self.export,
            "pvid": self.pvid,
            "vol": self.vol.to_json(),
            "scanned_ns": self.scanned_ns,
            "attachment": None if self.attachment is None else self.attachment.to_json(),
        }

    @classmethod
    def from_json(cls, d: object) -> CacheEntry:
        m = _mapping(d, "entry")
        try:
            vol = VolInfo.from_json(_mapping(m.get("vol"), "vol"))
        except ProtocolError as e:
            raise ValueError(str(e)) from e
        pvid = format_pvid(parse_pvid(_str(m, "pvid")))
        if pvid != vol.pvid:
            raise ValueError(f"pvid {pvid} disagrees with vol.pvid {vol.pvid}")
        att = m.get("attachment")
        return cls(
            uri=_str(m, "uri"),
            export=_str(m, "export"),
            vol=vol,
            scanned_ns=_int(m, "scanned_ns"),
            attachment=None if att is None else Attachment.from_json(att),
        )


@dataclass(slots=True)
class PvidCache:
    """The whole cache: device name → entry.  Pure data; see :class:`CacheFile` for I/O."""

    entries: dict[str, CacheEntry] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Names in a stable, human order: pv2 before pv10."""
        return sorted(self.entries, key=_name_order)

    def get(self, name: str) -> CacheEntry:
        try:
            return self.entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise NotFound(f"no device named {name!r} in the host cache (known: {known})") from None

    def find(self, uri: str, export: str) -> str | None:
        """The name under which this server URI + export is already recorded, if any."""
        for name in self.names():
            e = self.entries[name]
            if e.uri == uri and e.export == export:
                return name
        return None

    def next_name(self, taken: set[str] | frozenset[str] = frozenset()) -> str:
        """The lowest free ``pvN`` (also avoiding ``taken``, names promised in this batch)."""
        n = 0
        while f"{AUTO_PREFIX}{n}" in self.entries or f"{AUTO_PREFIX}{n}" in taken:
            n += 1
        return f"{AUTO_PREFIX}{n}"

    def record_scan(self, name: str | None, entry: CacheEntry) -> tuple[str, CacheEntry | None]:
        """Store a freshly scanned volume; return its name and the entry it replaced.

        The same URI + export keeps its name (a rescan updates, it never duplicates) and its
        attachment.  ``name`` forces a name; it must not already mean a different volume.
        """
        existing = self.find(entry.uri, entry.export)
        if name is None:
            name = existing if existing is not None else self.next_name()
        else:
            check_device_name(name)
            if existing is not None and existing != name:
                raise AlreadyExists(
                    f"{entry.uri} is already in the host cache as {existing!r}; "
                    f"forget it first to record it as {name!r}"
                )
            if existing is None and name in self.entries:
                raise AlreadyExists(
                    f"device name {name!r} already means {self.entries[name].uri}; "
                    "choose another name or forget it first"
                )
        old = self.entries.get(name)
        if old is not None:
            entry = replace(entry, attachment=old.attachment)
        self.entries[name] = entry
        return name, old

    def set_info(self, name: str, vol: VolInfo, scanned_ns: int) -> CacheEntry:
        """A refresh: new PVID and VOL information, read straight from the volume."""
        entry = replace(self.get(name), vol=vol, scanned_ns=scanned_ns)
        self.entries[name] = entry
        return entry

    def set_attachment(self, name: str, attachment: Attachment | None) -> CacheEntry:
        entry = replace(self.get(name), attachment=attachment)
        self.entries[name] = entry
        return entry

    def remove(self, name: str) -> CacheEntry:
        entry = self.get(name)
        del self.entries[name]
        return entry

    def to_json(self) -> dict[str, object]:
        return {
            "version": CACHE_VERSION,
            "entries": {n: self.entries[n].to_json() for n in self.names()},
        }

    @classmethod
    def from_json(cls, d: object) -> PvidCache:
        """Parse a cache document; anything malformed raises ValueError saying what."""
        m = _mapping(d, "cache")
        version = m.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError("no integer 'version' field")
        if version > CACHE_VERSION:
            raise ValueError(f"version {version} is newer than this pairvol ({CACHE_VERSION})")
        if version < 1:
            raise ValueError(f"version {version} is not a cache version")
        entries: dict[str, CacheEntry] = {}
        for name, e in _mapping(m.get("entries"), "entries").items():
            if not _NAME_RE.fullmatch(name):
                raise ValueError(f"device name {name!r} is not valid")
            try:
                entries[name] = CacheEntry.from_json(e)
            except (ValueError, UsageError) as err:
                raise ValueError(f"entry {name!r}: {err}") from err
        return cls(entries)

    def encode(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> PvidCache:
        """Bytes → cache; a corrupt file is one clear :class:`HeaderCorrupt` line."""
        try:
            doc = json.loads(data.decode("utf-8"))
            return cls.from_json(doc)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError, UsageError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise HeaderCorrupt(
                f"host cache {where} is corrupt ({detail}); "
                "repair or remove it, then scan the volumes again"
            ) from e


def _name_order(name: str) -> tuple[int, str, int]:
    m = re.fullmatch(rf"{AUTO_PREFIX}(\d+)", name)
    return (0, "", int(m.group(1))) if m else (1, name, 0)


def _mapping(d: object, what: str) -> dict[str, Any]:
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        raise ValueError(f"{what} is not a JSON object")
    return d


def _str(m: dict[str, Any], key: str) -> str:
    v = m.get(key)
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} is not a string")
    return v


def _opt_str(m: dict[str, Any], key: str) -> str | None:
    return None if m.get(key) is None else _str(m, key)


def _opt_int(m: dict[str, Any], key: str) -> int | None:
    return None if m.get(key) is None else _int(m, key)


def _int(m: dict[str, Any], key: str) -> int:
    v = m.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"field {key!r} is not an integer")
    return v


# -- the file -------------------------------------------------------------------------------


class CacheFile:
    """The cache on disk.  ``read()`` to look; ``with update() as cache:`` to change it.

    ``update`` holds an exclusive ``flock`` on ``PATH.lock`` from load to save, so two
    ``pairvol host`` commands never lose each other's changes, and saves only when the block
    finishes without an exception: a failed command leaves the file exactly as it was.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    @property
    def lock_path(self) -> str:
        return self.path + ".lock"

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path)

    def _load(self) -> PvidCache:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return PvidCache()
        except IsADirectoryError:
            raise UsageError(f"host cache {self.path} is a directory") from None
        except OSError as e:
            raise HeaderCorrupt(f"host cache {self.path} cannot be read: {e.strerror}") from e
        return PvidCache.decode(data, self.path)

    @contextlib.contextmanager
    def _locked(self, kind: int) -> Iterator[None]:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise PairvolError(f"cannot lock host cache {self.lock_path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, kind)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def read(self) -> PvidCache:
        """The current cache (empty if there is no file yet).  Creates nothing."""
        if not os.path.isdir(self.directory):
            return PvidCache()
        with self._locked(fcntl.LOCK_SH):
            return self._load()

    @contextlib.contextmanager
    def update(self) -> Iterator[PvidCache]:
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
        except OSError as e:
            raise PairvolError(f"cannot create {self.directory}: {e.strerror}") from e
        with self._locked(fcntl.LOCK_EX):
            cache = self._load()
            yield cache
            self.save(cache)

    def save(self, cache: PvidCache) -> None:
        """Replace the file atomically (callers normally go through :meth:`update`).

        A failure (disk full, crash) leaves the previous file in place, byte for byte."""
        try:
            write_atomic(self.path, cache.encode())
        except OSError as e:
            raise PairvolError(f"cannot save host cache {self.path}: {e.strerror or e}") from e
