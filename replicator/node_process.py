"""Starting and stopping a storage node's nbdkit process.

The launcher opens both NBD listeners itself (TCP ``ADDR:PORT`` and the unix socket
``DIR/nbd.sock``) and hands them to nbdkit by socket activation (``LISTEN_FDS=2``): nbdkit alone
can listen on a unix socket *or* TCP, not both.  The node is ready when its control socket
exists; nbdkit's pidfile is ``DIR/node.pid``.

``start`` leaves nbdkit running on its own (an orphan, a child of init); ``start(...,
foreground=True)`` keeps it a child of this process, and :func:`wait_foreground` then tells
systemd the node is ready (``READY=1``, :mod:`replicator.sd_notify`) and waits for it: that is
``pairvol node start --foreground``, what ``systemd/pairvol-node@.service`` runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import signal
import socket
import time
from pathlib import Path
from types import FrameType

from replicator import control, sd_notify
from replicator.errors import (
    ConnectionFailed,
    ExternalCommandFailed,
    IllegalState,
    NotFound,
    Timeout,
    UsageError,
)
from replicator.node import (
    CONTROL_SOCKET,
    LOG,
    NBD_PORT,
    NBD_SOCKET,
    PEER_PORT,
    PIDFILE,
    read_secret,
)
from replicator.server import NBD_MAX_CONNECTIONS, check_max_connections, plugin_command
from replicator.tls import PeerTls
from replicator.wire import check_node_name


def running_pid(directory: str) -> int | None:
    """The pid of the node serving ``directory``, if one is alive."""
    try:
        pid = int(Path(directory, PIDFILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    try:  # a recycled pid is not our node (an exiting one has an empty command line)
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return None
    if comm != "nbdkit" or not _alive(pid):
        return None
    return pid


def _listen_tcp(address: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError as e:
        raise UsageError(f"--listen {address!r} is not an IP address") from e
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise IllegalState(f"{address}:{port} is already in use") from e
        raise UsageError(f"cannot listen on {address}:{port}: {e.strerror}") from e
    sock.listen(128)
    return sock


def _listen_unix(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # stale: we checked no node is running here
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    return sock


def node_command(
    name: str,
    directory: str,
    listen: str,
    nbd_port: int,
    peer_port: int,
    secret: str | None,
    max_connections: int = NBD_MAX_CONNECTIONS,
    *,
    metrics: str | None = None,
    tls: tuple[str, str, str] | None = None,
) -> list[str]:
    """nbdkit's argv for a node; at most ``max_connections`` NBD clients at once (0: no
    limit), over TCP and the unix socket together, the ones beyond refused at connect.
    ``metrics``: ``ADDR:PORT`` of its Prometheus endpoint (replicator/metrics.py)."""
    params = [f"dir={directory}", f"node={name}", f"listen={listen}", f"peer-port={peer_port}"]
    params.append(f"nbd-port={nbd_port}")
    if secret:
        params.append(f"secret-file={secret}")
    if metrics:
        params.append(f"metrics={metrics}")
    if tls is not None:  # TLS on peer links: (certificate, key, CA) files
        params += [f"tls-cert={tls[0]}", f"tls-key={tls[1]}", f"tls-ca={tls[2]}"]
    return plugin_command(
        *params,
        extra=("--foreground", "--pidfile", os.path.join(directory, PIDFILE)),
        max_connections=max_connections,
    )


def _spawn_detached(
    cmd: list[str], log_path: str, listeners: tuple[socket.socket, ...], *, detach: bool = True
) -> int:
    """Run ``cmd`` as an orphan in its own session, with ``listeners`` as fds 3, 4, ...

    nbdkit runs in the foreground under socket activation and arms a parent-death signal at
    start-up, so it must not have a parent that will exit: the grandchild waits until its
    intermediate parent is gone (it is then a child of init) before it execs.  Returns the
    pid of the process that execs ``cmd``.  ``detach=False``: ``cmd`` is our own child (the
    foreground node, which dies with us), in our session.
    """
    read_end, write_end = os.pipe()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked children
        try:
            if detach:
                os.setsid()
                middle = os.getpid()
                if os.fork() != 0:
                    os._exit(0)
                while os.getppid() == middle:
                    time.sleep(0.001)
            os.write(write_end, str(os.getpid()).encode())
            # Park everything above the target range first, so no dup2 clobbers a source.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in (null_fd, log_fd)]
            socks = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 100) for sock in listeners]
            os.dup2(high[0], 0)
            os.dup2(high[1], 1)
            os.dup2(high[1], 2)
            for i, fd in enumerate(socks):
                os.dup2(fd, 3 + i)  # a real dup2 (fd != 3+i) clears close-on-exec
            env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(listeners)))
            env.pop(sd_notify.NOTIFY_SOCKET_ENV, None)  # the node's readiness is ours to say
            os.execvpe(cmd[0], cmd, env)
        finally:
            os._exit(127)
    os.close(write_end)
    os.close(log_fd)
    os.close(null_fd)
    status = os.waitpid(child, 0)[1] if detach else 0
    with os.fdopen(read_end, "rb") as f:
        reported = f.read()
    if status != 0 or not reported:
        raise ExternalCommandFailed(f"could not start {cmd[0]} (status {status})")
    return int(reported)


def start(
    name: str,
    directory: str,
    listen: str,
    *,
    nbd_port: int = NBD_PORT,
    peer_port: int = PEER_PORT,
    secret_file: str | None = None,
    max_connections: int = NBD_MAX_CONNECTIONS,
    timeout: float = 30.0,
    foreground: bool = False,
    metrics: str | None = None,
    tls: tuple[str, str, str] | None = None,
) -> int:
    """Start a node in the background; return its pid once its control socket answers.
    ``max_connections``: NBD clients served at once (0: no limit).  ``foreground``: nbdkit
    stays this process's child (then :func:`wait_foreground`).  ``metrics``: serve Prometheus
    metrics at this ``ADDR:PORT`` (UsageError if it is not one).  ``tls``: (certificate, key,
    CA) files for TLS on peer links, checked now (replicator/tls.py)."""
    check_node_name(name)
    check_max_connections(max_connections)
    if metrics:
        from replicator.metrics import parse_address  # prometheus_client: only when asked for

        metrics = str(parse_address(metrics))
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise NotFound(f"--dir {directory} is not a directory")
    if secret_file is not None:
        secret_file = os.path.abspath(secret_file)
        read_secret(secret_file)
    if tls is not None:
        loaded = PeerTls.load(*tls)  # NotFound or UsageError naming the file
        tls = (loaded.cert, loaded.key, loaded.ca)
    pid = running_pid(directory)
    if pid is not None:
        raise IllegalState(f"a node (pid {pid}) is already serving {directory}")
    for stale in (CONTROL_SOCKET, PIDFILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, stale))
    log_size = (
        os.path.getsize(os.path.join(directory, LOG))
        if os.path.exists(os.path.join(directory, LOG))
        else 0
    )
    tcp = _listen_tcp(listen, nbd_port)
    unix = _listen_unix(os.path.join(directory, NBD_SOCKET))
    cmd = node_command(
        name,
        directory,
        listen,
        nbd_port,
        peer_port,
        secret_file,
        max_connections,
        metrics=metrics,
        tls=tls,
    )

    log_path = os.path.join(directory, LOG)
    launched = _spawn_detached(cmd, log_path, (tcp, unix), detach=not foreground)
    tcp.close()
    unix.close()
    control_path = os.path.join(directory, CONTROL_SOCKET)
    deadline = time.monotonic() + timeout
    while True:
        if not _alive(launched):
            raise ExternalCommandFailed(
                f"node {name} exited at start-up: {_tail(log_path, log_size)}"
            )
        pid = running_pid(directory)
        if pid is not None and os.path.exists(control_path):
            with contextlib.suppress(ConnectionFailed):
                control.call(control_path, "node.status", timeout=5)
                return pid
        if time.monotonic() > deadline:
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            raise Timeout(
                f"node {name} did not become ready within {timeout:.0f}s; "
                f"see {os.path.join(directory, LOG)}"
            )
        time.sleep(0.02)


def wait_foreground(pid: int, name: str, directory: str) -> int:
    """After ``start(..., foreground=True)`` returned ``pid``: report readiness to systemd
    (a no-op without ``$NOTIFY_SOCKET``), pass SIGTERM and SIGINT on to nbdkit and wait until
    it exits; its exit status (128+N if signal N ended it), its sockets and pid file gone."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        sd_notify.ready(f"node {name} serving (nbdkit pid {pid})")
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for leftover in (NBD_SOCKET, CONTROL_SOCKET, PIDFILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, leftover))
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _alive(pid: int) -> bool:
    """Whether any thread of ``pid`` still runs.

    A SIGKILLed multi-threaded process shows its leader as a zombie while the other threads
    are still exiting, and those still hold its files and listening sockets; nothing is gone
    until every thread is.  PID 1 here may never reap the zombie, so a lone zombie counts as
    dead.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return len(tasks) > 1 or stat.rsplit(")", 1)[1].split()[0] != "Z"


def _tail(log_path: str, since: int) -> str:
    """The last line nbdkit logged since ``since``: usually the reason it exited."""
    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").strip().splitlines()
    except FileNotFoundError:
        lines = []
    return lines[-1] if lines else f"no message; see {log_path}"


def stop(directory: str, timeout: float = 20.0) -> int:
    """SIGTERM the node serving ``directory`` and wait until it is gone; return its pid."""
    directory = os.path.abspath(directory)
    pid = running_pid(directory)
    if pid is None:
        raise IllegalState(f"no node is running in {directory}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running_pid(directory) == pid:
        if time.monotonic() > deadline:
            raise Timeout(f"node pid {pid} did not exit within {timeout:.0f}s of SIGTERM")
        time.sleep(0.02)
    for leftover in (NBD_SOCKET, CONTROL_SOCKET, PIDFILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, leftover))
    return pid
