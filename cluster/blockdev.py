"""Turn an NBD export into a real block device, and undo it completely.

Two methods, chosen by what the kernel offers:

``nbd-client``
    The kernel NBD driver (``/dev/nbdN``): ``nbd-client -N EXPORT HOST PORT /dev/nbdN`` or
    ``nbd-client -N EXPORT -unix SOCKET /dev/nbdN``; undone by ``nbd-client -d``.
``nbdfuse-loop``
    No NBD driver (containers, many VMs): ``nbdfuse`` exposes the export as the file
    ``MOUNTPOINT/nbd`` and ``losetup`` turns that file into ``/dev/loopN``.  Undone by
    ``losetup -d``, ``fusermount3 -u`` (which makes nbdfuse exit), killing nbdfuse only if it
    is somehow still there, and removing the mount point.  A FUSE mount made under ``ip
    netns exec`` (a lab host) lives in that command's own mount namespace: a detach from
    elsewhere cannot see it and SIGTERMs nbdfuse at once, which unmounts it and exits.

The loop device is the one piece the kernel keeps when nbdfuse dies (SIGKILLed with its
lab host): it stays bound to the dead file, whose path reads ``/nbd`` once the FUSE mount's
namespace is gone, so no path identifies it any more.  So the attach records the binding
as the kernel numbers it, ``STATE_DIR/loop.json`` (the device, its ``diskseq``, the boot):
``diskseq`` changes on every set-up and every detach of a device, so the record names that
one binding and nothing else.  ``detach`` trusts it over the path, and :func:`release_loop`
detaches a recorded binding still in place after its helper was killed (a lab's ``down``
and ``kill``), never a device set up by anyone else.

Either way the export name carries ``@PVID``, so the *server* refuses the connection if the
volume's identity changed: data is never served under the wrong identity, even if the
caller's own access check raced with a PVID change.

Everything needed to undo an attachment is returned as an
:class:`~cluster.pvid_cache.Attachment` and kept in the host cache, so ``detach`` works from
a fresh process, and still works when the helper process has died meanwhile.

psutil (helper liveness, without mistaking a recycled pid for the helper) and pyudev (listing
block devices, waiting for udev to settle a new one) are used when present; without them the
module falls back to ``/proc`` and ``/sys``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import signal
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from cluster.probe import NbdUri
from cluster.pvid_cache import Attachment
from replicator.atomic_file import write_atomic
from replicator.errors import (
    ExternalCommandFailed,
    IllegalState,
    NotFound,
    PairvolError,
    Timeout,
)

READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
FUSE_FILE = "nbd"
LOOP_RECORD = "loop.json"
UDEV_CONTROL = "/run/udev/control"
BOOT_ID = "/proc/sys/kernel/random/boot_id"


# -- helpers: external commands ---------------------------------------------------------------


def run(argv: Sequence[str], what: str) -> str:
    """Run a helper program; a failure is one :class:`ExternalCommandFailed` line."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ExternalCommandFailed(f"{what}: {argv[0]} is not installed") from e
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {r.returncode}"
        raise ExternalCommandFailed(f"{what}: {argv[0]} failed: {detail}")
    return r.stdout


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` until true; :class:`Timeout` after ``timeout`` seconds (a bound, not a
    delay: it returns as soon as the condition holds)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise Timeout(f"{what} (waited {timeout:g}s)")
        time.sleep(POLL_INTERVAL)


# -- processes ----------------------------------------------------------------------------------


def process_start_time(pid: int) -> float | None:
    """The process's start time as psutil reports it (None without psutil or process)."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def helper_alive(pid: int | None, started: float | None = None, name: str | None = None) -> bool:
    """Is the recorded helper still running?  A zombie is dead; a recycled pid (different
    start time, or a different program) is not our helper."""
    if pid is None:
        return False
    try:
        import psutil
    except ImportError:
        return _proc_alive(pid, name)
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None and abs(p.create_time() - started) > 0.5:
            return False
        return name is None or p.name() == name
    except psutil.Error:  # NoSuchProcess, AccessDenied on a pid that is not ours
        return False


def _proc_alive(pid: int, name: str | None) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            fields = f.read()
    except OSError:
        return False
    comm = fields[fields.find("(") + 1 : fields.rfind(")")]
    state = fields[fields.rfind(")") + 2 : fields.rfind(")") + 3]
    return state not in ("Z", "X") and (name is None or comm == name[:15])


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone is what we want
        os.kill(pid, sig)


# -- mounts, loop devices, block devices --------------------------------------------------------


def _unescape_mount_field(s: str) -> str:
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        s = s.replace(code, ch)
    return s


def mounts() -> list[tuple[str, str, str]]:
    """(source, mountpoint, fstype) of every mount, from /proc/self/mounts."""
    out = []
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append(
                    (_unescape_mount_field(parts[0]), _unescape_mount_field(parts[1]), parts[2])
                )
    return out


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    return any(mp == real for _, mp, _ in mounts())


def mounted_at(device: str) -> list[str]:
    """Where a block device is mounted (by device path)."""
    real = os.path.realpath(device)
    return [mp for src, mp, _ in mounts() if src in (device, real)]


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _sys_block(device: str) -> str:
    return os.path.join("/sys/class/block", os.path.basename(os.path.realpath(device)))


def _read_sys(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def loop_backing_file(device: str) -> str | None:
    """The file behind a loop device, or None if the device is not set up."""
    return _read_sys(os.path.join(_sys_block(device), "loop", "backing_file"))


_LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64_SIZE = 232  # struct loop_info64; lo_device and lo_inode are its first two u64


def loop_backing_id(device: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file behind a loop device, from LOOP_GET_STATUS64; None if
    the device is free or absent.  Raises OSError when the kernel cannot stat the backing
    file (ENOTCONN: its FUSE server died)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        buf = fcntl.ioctl(fd, _LOOP_GET_STATUS64, bytes(_LOOP_INFO64_SIZE))
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENOTTY, errno.EINVAL):
            return None  # free loop device, or not a loop device at all
        raise
    finally:
        os.close(fd)
    dev, ino = struct.unpack_from("=QQ", buf)
    return dev, ino


def loop_is_backed_by(device: str, dev: int | None, ino: int | None, path: str | None) -> bool:
    """Is ``device`` a loop device over our file?  By (dev, ino) when the kernel can still
    stat the file; by path when it cannot (a dead nbdfuse), reading sysfs only: a lookup
    through a dead FUSE mount makes the kernel report the path as ``... (deleted)``."""
    try:
        ident = loop_backing_id(device)
    except OSError:
        back = loop_backing_file(device)
        return back is not None and path is not None and back.removesuffix(" (deleted)") == path
    if ident is None:
        return False
    if dev is not None and ino is not None:
        return ident == (dev, ino)
    return path is not None and loop_backing_file(device) == path


def loop_devices_backed_by(dev: int | None, ino: int | None, path: str | None) -> list[str]:
    """Every loop device over our file (see :func:`loop_is_backed_by`)."""
    names = sorted(glob.glob("/sys/class/block/loop*/loop"))
    devices = ["/dev/" + n.split("/")[4] for n in names]
    return [d for d in devices if loop_is_backed_by(d, dev, ino, path)]


def loop_devices_of(path: str) -> list[str]:
    """Loop devices whose backing file is ``path`` (what ``losetup -j`` reports)."""
    real = os.path.realpath(path)
    found = []
    for d in sorted(glob.glob("/sys/class/block/loop*/loop/backing_file")):
        back = _read_sys(d)
        if back is not None and back.removesuffix(" (deleted)") in (path, real):
            found.append("/dev/" + d.split("/")[4])
    return found


@dataclass(frozen=True, slots=True)
class LoopBinding:
    """One binding of a loop device to a file, as the kernel numbers it: the device's
    ``diskseq`` is bumped by every set-up and every detach, so while it (and the boot) is
    still the recorded one the device is still bound to the file we gave it, whatever the
    file's path reads now (``/nbd`` once its FUSE mount's namespace is gone)."""

    device: str
    diskseq: int
    boot_id: str

    def in_place(self) -> bool:
        return (
            _read_sys(BOOT_ID) == self.boot_id
            and loop_diskseq(self.device) == self.diskseq
            and loop_backing_file(self.device) is not None
        )


def loop_diskseq(device: str) -> int | None:
    """The device's ``diskseq`` (kernel 5.15 and later; None before, or no device)."""
    text = _read_sys(os.path.join(_sys_block(device), "diskseq"))
    return int(text) if text is not None and text.isdigit() else None


def current_binding(device: str) -> LoopBinding | None:
    seq, boot = loop_diskseq(device), _read_sys(BOOT_ID)
    return None if seq is None or not boot else LoopBinding(device, seq, boot)


def write_loop_record(state_dir: str, binding: LoopBinding) -> None:
    doc = {"device": binding.device, "diskseq": binding.diskseq, "boot_id": binding.boot_id}
    write_atomic(os.path.join(state_dir, LOOP_RECORD), json.dumps(doc).encode() + b"\n", 0o600)


def read_loop_record(state_dir: str | None) -> LoopBinding | None:
    """The binding an attach recorded in ``state_dir`` (None: none, or unreadable)."""
    text = _read_sys(os.path.join(state_dir, LOOP_RECORD)) if state_dir else None
    if text is None:
        return None
    try:
        doc = json.loads(text)
        binding = LoopBinding(str(doc["device"]), int(doc["diskseq"]), str(doc["boot_id"]))
    except (ValueError, TypeError, KeyError):
        return None
    return binding if binding.device.startswith("/dev/loop") else None


def release_loop(state_dir: str) -> list[str]:
    """Detach the loop device the attachment in ``state_dir`` set up, if that binding is
    still in place; what was done.  For after its nbdfuse was killed (a lab host's teardown
    or crash), when nothing else would ever detach it; a device since detached, or set up
    again by anyone else, has another diskseq and is left alone.  A device still open
    (mounted) is detached by the kernel at its last close (``losetup -d`` sets autoclear)."""
    binding = read_loop_record(state_dir)
    if binding is None or not binding.in_place():
        return []
    run(["losetup", "-d", binding.device], f"detach {binding.device}")
    return [f"losetup -d {binding.device}"]


def list_block_devices() -> list[str]:
    """Device nodes of every block device, via pyudev (falls back to /sys/class/block)."""
    try:
        import pyudev
    except ImportError:
        return sorted("/dev/" + n for n in os.listdir("/sys/class/block"))
    ctx = pyudev.Context()
    nodes = [d.device_node for d in ctx.list_devices(subsystem="block")]
    return sorted(str(n) for n in nodes if n)


def udev_running() -> bool:
    return os.path.exists(UDEV_CONTROL)


def wait_for_block_device(path: str, timeout: float = READY_TIMEOUT) -> None:
    """Return once ``path`` is a block device and, where udev runs, udev has processed it
    (so its /dev/disk/by-* links and permissions exist)."""
    try:
        import pyudev
    except ImportError:
        pyudev = None
    if pyudev is None or not udev_running():
        wait_until(lambda: is_block_device(path), timeout, f"{path} did not appear")
        return
    ctx = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(ctx)
    monitor.filter_by("block")
    monitor.start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pyudev.Devices.from_device_file(ctx, path).is_initialized:
                return
        except (pyudev.DeviceNotFoundError, OSError, ValueError):
            pass  # not there yet: wait for the next udev event
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"udev did not settle {path} within {timeout:g}s")
        monitor.poll(timeout=min(remaining, 1.0))


def nbd_devices() -> list[str]:
    """Kernel NBD devices (/dev/nbdN); empty when the driver is not loaded."""
    return [d for d in list_block_devices() if os.path.basename(d).startswith("nbd")] or sorted(
        glob.glob("/dev/nbd[0-9]*")
    )


def nbd_driver_present() -> bool:
    return any(is_block_device(d) for d in nbd_devices())


def _nbd_in_use(device: str) -> bool:
    sysdir = _sys_block(device)
    return os.path.exists(os.path.join(sysdir, "pid")) or _read_sys(
        os.path.join(sysdir, "size")
    ) not in (None, "0")


# -- attach / detach ----------------------------------------------------------------------------


def attach(
    uri: NbdUri,
    *,
    state_dir: str,
    now_ns: int,
    method: str | None = None,
    block_size: int | None = None,
    timeout: float = READY_TIMEOUT,
) -> Attachment:
    """Attach the export ``uri`` (whose export name should carry ``@PVID``) as a block device.

    ``state_dir`` is this attachment's private directory (mount point, pidfile, log).  On any
    failure everything already set up is undone before the error is raised.
    """
    if uri.export.name is None:
        raise IllegalState(f"{uri}: attach needs an export name")
    chosen = method or ("nbd-client" if nbd_driver_present() else "nbdfuse-loop")
    if chosen == "nbd-client":
        return _attach_nbd_client(uri, now_ns, block_size, timeout)
    if chosen == "nbdfuse-loop":
        return _attach_nbdfuse(uri, state_dir, now_ns, timeout)
    raise IllegalState(f"unknown attach method {chosen!r}")


def _attach_nbd_client(
    uri: NbdUri, now_ns: int, block_size: int | None, timeout: float
) -> Attachment:
    present = [d for d in nbd_devices() if is_block_device(d)]
    if not present:
        raise NotFound("no /dev/nbd* devices: the nbd kernel module is not loaded (modprobe nbd)")
    free = [d for d in present if not _nbd_in_use(d)]
    if not free:
        raise IllegalState(f"every NBD device ({len(present)}) is in use")
    device = free[0]
    export = str(uri.export)
    argv = ["nbd-client", "-N", export]
    if uri.socket is not None:
        argv += ["-unix", uri.socket]
    else:
        assert uri.host is not None
        argv += [uri.host, str(uri.port)]
    argv.append(device)
    if block_size in (512, 1024, 2048, 4096):
        argv += ["-b", str(block_size)]
    run(argv, f"connect {device} to {uri}")
    pid_text = _read_sys(os.path.join(_sys_block(device), "pid"))
    pid = int(pid_text) if pid_text and pid_text.isdigit() else None
    att = Attachment(
        method="nbd-client",
        device=device,
        uri=str(uri),
        attached_ns=now_ns,
        helper_pid=pid,
        helper_started=None if pid is None else process_start_time(pid),
    )
    try:
        wait_for_block_device(device, timeout)
    except BaseException as e:
        _undo(att, e)
        raise
    return att


def _attach_nbdfuse(uri: NbdUri, state_dir: str, now_ns: int, timeout: float) -> Attachment:
    mnt = os.path.join(state_dir, "mnt")
    pidfile = os.path.join(state_dir, "nbdfuse.pid")
    log = os.path.join(state_dir, "nbdfuse.log")
    backing = os.path.join(mnt, FUSE_FILE)
    if os.path.isdir(mnt) and is_mountpoint(mnt):
        raise IllegalState(f"{mnt} is still mounted from an earlier attach; detach first")
    os.makedirs(mnt, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)  # a leftover would make us trust a dead pid
    # sh backgrounds nbdfuse and exits at once, so nbdfuse is nobody's child here (never our
    # zombie) and outlives this command; setsid keeps it out of our session's signals.
    shell = 'log=$1; shift; setsid "$@" </dev/null >>"$log" 2>&1 & echo $!'
    argv = ["nbdfuse", "-P", pidfile, mnt, str(uri)]
    out = run(["sh", "-c", shell, "sh", log, *argv], "start nbdfuse")
    launched = int(out.split()[0])
    att = Attachment(
        method="nbdfuse-loop",
        device="",
        uri=str(uri),
        attached_ns=now_ns,
        helper_pid=launched,
        mountpoint=mnt,
        backing_file=backing,
        state_dir=state_dir,
        log=log,
    )

    def ready() -> bool:
        if os.path.exists(pidfile) and os.path.exists(backing):
            return True
        if not helper_alive(launched):
            raise ExternalCommandFailed(f"nbdfuse {uri} exited: {_log_tail(log)}")
        return False

    try:
        wait_until(ready, timeout, f"nbdfuse did not make {backing}")
        pid_text = _read_sys(pidfile)
        pid = int(pid_text) if pid_text and pid_text.isdigit() else launched
        st = os.stat(backing)
        att = replace(
            att,
            helper_pid=pid,
            helper_started=process_start_time(pid),
            backing_dev=st.st_dev,
            backing_ino=st.st_ino,
        )
        device = run(
            ["losetup", "--find", "--show", "--direct-io=off", backing], f"loop {backing}"
        ).strip()
        att = replace(att, device=device)
        binding = current_binding(device)  # read before the check: then it is that binding
        if loop_backing_id(device) != (st.st_dev, st.st_ino):
            raise ExternalCommandFailed(f"losetup made {device}, but it is not backed by {backing}")
        if binding is not None:
            write_loop_record(state_dir, binding)
        wait_for_block_device(device, timeout)
    except BaseException as e:
        _undo(att, e)
        raise
    return att


def _undo(att: Attachment, error: BaseException) -> None:
    """Best-effort rollback of a half-made attachment; a rollback failure is added to the
    original error (which the caller re-raises) rather than replacing it."""
    try:
        detach(att)
    except PairvolError as cleanup:
        error.add_note(f"cleanup after the failed attach also failed: {cleanup}")


def _log_tail(log: str | None) -> str:
    text = _read_sys(log) if log else None
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def detach(att: Attachment, *, timeout: float = EXIT_TIMEOUT) -> list[str]:
    """Undo everything ``attach`` did; return what was done, in order.

    Safe to repeat, and clean when the helper already died.  Refuses (IllegalState) while
    the block device is mounted, since pulling it would lose the filesystem's dirty data.
    """
    if att.device:
        where = mounted_at(att.device)
        if where and _device_is_ours(att):
            raise IllegalState(f"{att.device} is mounted on {where[0]}; unmount it first")
    if att.method == "nbd-client":
        return _detach_nbd_client(att, timeout)
    return _detach_nbdfuse(att, timeout)


def _device_is_ours(att: Attachment) -> bool:
    """Is the recorded device still the one we set up (not freed, not reused by others)?
    A loop device by the binding recorded at attach (its diskseq) when there is one: it
    holds when the backing file's path no longer does (see the module's docstring)."""
    if att.method == "nbd-client":
        return _nbd_in_use(att.device)
    binding = read_loop_record(att.state_dir)
    if binding is not None and binding.device == att.device:
        return binding.in_place()
    return loop_is_backed_by(att.device, att.backing_dev, att.backing_ino, att.backing_file)


def _detach_nbd_client(att: Attachment, timeout: float) -> list[str]:
    done = []
    if is_block_device(att.device) and _nbd_in_use(att.device):
        run(["nbd-client", "-d", att.device], f"disconnect {att.device}")
        done.append(f"nbd-client -d {att.device}")
    done += _stop_helper(att, timeout)
    return done


def _detach_nbdfuse(att: Attachment, timeout: float) -> list[str]:
    done = []
    if att.device and _device_is_ours(att):
        run(["losetup", "-d", att.device], f"detach {att.device}")
        done.append(f"losetup -d {att.device}")
    mnt = att.mountpoint
    unmounted = False
    if mnt is not None and is_mountpoint(mnt):
        _unmount_fuse(mnt, alive=helper_alive(att.helper_pid, att.helper_started), timeout=timeout)
        done.append(f"fusermount3 -u {mnt}")
        unmounted = True
    done += _stop_helper(att, timeout, unmounted=unmounted)
    if att.state_dir is not None:
        _remove_state_dir(att, mnt)
        done.append(f"removed {att.state_dir}")
    return done


def _unmount_fuse(mnt: str, *, alive: bool, timeout: float) -> None:
    """fusermount3 -u; the loop device lets go of the file asynchronously, so EBUSY is
    retried until ``timeout``.  A mount whose nbdfuse died is unmounted lazily if need be."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            run(["fusermount3", "-u", mnt], f"unmount {mnt}")
            return
        except ExternalCommandFailed as e:
            if not is_mountpoint(mnt):
                return
            if time.monotonic() >= deadline:
                if alive:
                    raise
                run(["fusermount3", "-u", "-z", mnt], f"unmount {mnt} (lazily)")
                return
            if "busy" not in str(e).lower() and not alive:
                run(["fusermount3", "-u", "-z", mnt], f"unmount {mnt} (lazily)")
                return
            time.sleep(POLL_INTERVAL)


def _stop_helper(att: Attachment, timeout: float, *, unmounted: bool = True) -> list[str]:
    """Unmounting makes nbdfuse exit by itself; only a helper still there is signalled.  When
    we could not unmount (the mount is in another mount namespace: attached under ``ip netns
    exec``), waiting is pointless: SIGTERM at once, nbdfuse unmounts on it and exits."""
    pid, started = att.helper_pid, att.helper_started
    if pid is None or not helper_alive(pid, started):
        return []
    if att.method == "nbd-client":
        return []  # the kernel's nbd-client daemon exits when its device is disconnected
    if unmounted:
        with contextlib.suppress(Timeout):
            wait_until(lambda: not helper_alive(pid, started), timeout, "nbdfuse exit")
            return []
    _signal(pid, signal.SIGTERM)
    with contextlib.suppress(Timeout):
        wait_until(lambda: not helper_alive(pid, started), timeout, "nbdfuse exit")
        return [f"SIGTERM nbdfuse {pid}"]
    _signal(pid, signal.SIGKILL)
    wait_until(lambda: not helper_alive(pid, started), timeout, f"nbdfuse {pid} did not die")
    return [f"SIGKILL nbdfuse {pid}"]


def _remove_state_dir(att: Attachment, mnt: str | None) -> None:
    state_dir = att.state_dir
    assert state_dir is not None
    if mnt is not None and is_mountpoint(mnt):
        raise IllegalState(f"{mnt} is still mounted; not removing {state_dir}")
    for path in (
        os.path.join(state_dir, "nbdfuse.pid"),
        os.path.join(state_dir, LOOP_RECORD),
        att.log,
    ):
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    for d in (mnt, state_dir):
        if d is None:
            continue
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno == errno.ENOTEMPTY:
                raise IllegalState(f"{d} is not empty; left in place") from e
            raise


def status(att: Attachment) -> dict[str, object]:
    """Live facts about an attachment (local only: no NBD traffic, no volume access)."""
    return {
        "device_present": bool(att.device) and is_block_device(att.device),
        "device_ours": bool(att.device) and _device_is_ours(att),
        "mounted_on": mounted_at(att.device) if att.device else [],
        "helper_alive": helper_alive(att.helper_pid, att.helper_started),
        "fuse_mounted": att.mountpoint is not None and is_mountpoint(att.mountpoint),
    }
