"""Real etcd members for the tests, the lab and the demo: start, stop, kill, restart.

Theory of operation.  :class:`EtcdCluster` runs one or more ``etcd`` processes that form one
cluster.  Everything a member owns lives under ``base_dir``: ``base_dir/mN/data`` (its data
directory), ``base_dir/mN/etcd.log`` (its output, appended across restarts) and
``base_dir/mN/etcd.pid`` (its pid and start time).  ``base_dir/etcd-cluster.json`` describes the
members, so another process can take the cluster over with :meth:`EtcdCluster.open` (``lab up``
starts etcd and exits; ``lab down`` stops it).

A member runs in a network namespace when one is given for it (``ip netns exec NS etcd ...``,
as the lab's hosts are).  Members on one address (loopback, in tests) get free ports, chosen
by binding port 0; if another process takes one before etcd binds it, the start is retried
with new ports.  Members on distinct addresses use etcd's ports, 2379 and 2380.

Readiness is etcd's own ``/health`` (true once the member has a leader and serves requests),
polled with a deadline; from a namespace, through ``etcdctl endpoint health`` run inside it.
Stopping sends SIGTERM and waits; a member still there after the bound is SIGKILLed and the
stop fails loudly (IllegalState), and one that survives SIGKILL is a Timeout: a test's
teardown must notice a process it could not end.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

from replicator.errors import (
    ExternalCommandFailed,
    IllegalState,
    NotFound,
    Timeout,
    UsageError,
)

CLIENT_PORT = 2379
PEER_PORT = 2380
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0  # above etcd's 7 s leadership-transfer timeout at stop
KILL_TIMEOUT = 5.0
HEALTH_TIMEOUT = 1.0  # one /health request
POLL = 0.05  # between health polls, always within a deadline
PORT_ATTEMPTS = 3
SPEC_FILE = "etcd-cluster.json"
MAX_MEMBERS = 9


@dataclass(frozen=True, slots=True)
class Member:
    """One etcd member: its name, where it listens, and its namespace (None: ours)."""

    index: int
    name: str
    address: str
    client_port: int
    peer_port: int
    netns: str | None
    dir: str

    @property
    def _host(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address

    @property
    def client_url(self) -> str:
        return f"http://{self._host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self._host}:{self.peer_port}"

    @property
    def data_dir(self) -> str:
        return os.path.join(self.dir, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "etcd.log")

    @property
    def pid_path(self) -> str:
        return os.path.join(self.dir, "etcd.pid")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports nobody listens on now (all bound at once, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address == "::1"


class EtcdCluster:
    """``members`` etcd processes forming one cluster under ``base_dir``.

    ``addresses`` (one per member, default 127.0.0.1 for all) and ``netns`` (one per member,
    None for "this namespace") say where each listens.  ``with EtcdCluster(...) as c:`` starts
    it and stops it at the end."""

    def __init__(
        self,
        base_dir: str,
        members: int = 1,
        addresses: Sequence[str] | None = None,
        netns: Sequence[str | None] | None = None,
        *,
        etcd: str = "etcd",
        token: str | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        if (
            isinstance(members, bool)
            or not isinstance(members, int)
            or not 0 < members <= MAX_MEMBERS
        ):
            raise UsageError(f"etcd members: {members!r} is not 1 to {MAX_MEMBERS}")
        addrs = list(addresses) if addresses is not None else ["127.0.0.1"] * members
        spaces = list(netns) if netns is not None else [None] * members
        if len(addrs) != members or len(spaces) != members:
            raise UsageError(
                f"etcd: {members} members need {members} addresses and namespaces "
                f"(got {len(addrs)} and {len(spaces)})"
            )
        self.base_dir = os.path.abspath(base_dir)
        self.etcd = etcd
        self.token = token or f"pairvol-{secrets.token_hex(4)}"
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._addresses = addrs
        self._netns = spaces
        if any(ns is not None for ns in spaces):
            # Each namespace has its ports to itself: etcd's own ports, one address each.
            places = list(zip(spaces, addrs, strict=True))
            if len(set(places)) < len(places):
                raise UsageError("etcd: two members in one namespace need different addresses")
            self._auto_ports = False
        else:
            # Members sharing an address (loopback, in tests) need ports of their own, and
            # loopback's well-known ports may be anybody's.
            self._auto_ports = len(set(addrs)) < len(addrs) or any(_is_loopback(a) for a in addrs)
        self.members: list[Member] = self._layout(
            [(CLIENT_PORT, PEER_PORT)] * members if not self._auto_ports else None
        )
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._started = False

    def _layout(self, ports: list[tuple[int, int]] | None) -> list[Member]:
        n = len(self._addresses)
        if ports is None:
            flat = free_ports(2 * n, self._addresses[0])
            ports = [(flat[2 * i], flat[2 * i + 1]) for i in range(n)]
        return [
            Member(
                index=i,
                name=f"m{i}",
                address=self._addresses[i],
                client_port=ports[i][0],
                peer_port=ports[i][1],
                netns=self._netns[i],
                dir=os.path.join(self.base_dir, f"m{i}"),
            )
            for i in range(n)
        ]

    # -- the spec file, for another process --------------------------------------------

    def _save_spec(self) -> None:
        doc = {
            "version": 1,
            "token": self.token,
            "members": [
                {
                    "name": m.name,
                    "address": m.address,
                    "client_port": m.client_port,
                    "peer_port": m.peer_port,
                    "netns": m.netns,
                }
                for m in self.members
            ],
        }
        path = os.path.join(self.base_dir, SPEC_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def open(cls, base_dir: str, *, etcd: str = "etcd") -> EtcdCluster:
        """The cluster another process started under ``base_dir`` (from its spec file)."""
        path = os.path.join(os.path.abspath(base_dir), SPEC_FILE)
        try:
            with open(path) as f:
                doc = json.load(f)
            specs = doc["members"]
            c = cls(
                base_dir,
                len(specs),
                [s["address"] for s in specs],
                [s["netns"] for s in specs],
                etcd=etcd,
                token=doc["token"],
            )
            c.members = [
                Member(
                    i,
                    s["name"],
                    s["address"],
                    int(s["client_port"]),
                    int(s["peer_port"]),
                    s["netns"],
                    os.path.join(c.base_dir, s["name"]),
                )
                for i, s in enumerate(specs)
            ]
        except FileNotFoundError:
            raise NotFound(f"no etcd cluster in {base_dir} (no {SPEC_FILE})") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"etcd cluster spec {path} is unreadable: {e}") from None
        c._started = any(c.running(i) for i in range(len(c.members)))
        return c

    # -- queries ---------------------------------------------------------------------------

    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def _pid(self, m: Member) -> int | None:
        """The member's live etcd process, by our child handle or its pid file (the pid
        must still be the process started then: a recycled pid is not it)."""
        proc = self._procs.get(m.index)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        try:
            with open(m.pid_path) as f:
                pid_text, started_text = f.read().split()
            pid, started = int(pid_text), float(started_text)
        except (OSError, ValueError):
            return None
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) > 0.05 or p.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return pid

    def running(self, i: int) -> bool:
        return self._pid(self._member(i)) is not None

    def pid(self, i: int) -> int | None:
        return self._pid(self._member(i))

    def _member(self, i: int) -> Member:
        if not 0 <= i < len(self.members):
            raise UsageError(f"etcd member {i} does not exist (0 to {len(self.members) - 1})")
        return self.members[i]

    def healthy(self, i: int) -> bool:
        """Whether member ``i`` answers /health with true (it has a leader and serves)."""
        m = self._member(i)
        if m.netns is None:
            try:
                with urllib.request.urlopen(m.client_url + "/health", timeout=HEALTH_TIMEOUT) as r:
                    doc = json.loads(r.read())
            except (OSError, ValueError, urllib.error.URLError):
                return False
            return isinstance(doc, dict) and doc.get("health") in ("true", True)
        etcdctl = shutil.which("etcdctl") or "etcdctl"
        try:
            done = subprocess.run(
                ["ip", "netns", "exec", m.netns, etcdctl, "--endpoints", m.client_url,
                 "--dial-timeout=1s", "--command-timeout=1s", "endpoint", "health"],
                capture_output=True, timeout=HEALTH_TIMEOUT + 2, env=_env(), check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    # -- start -----------------------------------------------------------------------------

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every member and wait until each is healthy (at most ``start_timeout``)."""
        if self._started:
            raise IllegalState(f"etcd cluster {self.base_dir} is already started")
        if shutil.which(self.etcd) is None:
            raise ExternalCommandFailed(f"{self.etcd} is not installed (run tools/setup)")
        fresh = not any(os.path.isdir(m.data_dir) for m in self.members)
        for attempt in range(PORT_ATTEMPTS):
            os.makedirs(self.base_dir, exist_ok=True)
            self._save_spec()
            for m in self.members:
                self._spawn(m, new=fresh)
            self._started = True
            try:
                self._wait_healthy(range(len(self.members)), self.start_timeout)
                return
            except _PortTaken:
                self._force_stop()
                if not (self._auto_ports and fresh) or attempt == PORT_ATTEMPTS - 1:
                    raise ExternalCommandFailed(
                        f"etcd in {self.base_dir}: a port was taken before etcd could bind it, "
                        f"{attempt + 1} times"
                    ) from None
                for m in self.members:
                    shutil.rmtree(m.data_dir, ignore_errors=True)
                self.members = self._layout(None)
            except BaseException:
                self._force_stop()
                raise

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def _spawn(self, m: Member, *, new: bool) -> None:
        os.makedirs(m.dir, exist_ok=True)
        argv = [
            shutil.which(self.etcd) or self.etcd,
            "--name", m.name,
            "--data-dir", m.data_dir,
            "--listen-client-urls", m.client_url,
            "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", self._initial_cluster(),
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new" if new else "existing",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if m.netns is not None:
            argv = ["ip", "netns", "exec", m.netns, *argv]
        with open(m.log_path, "ab") as log:
            log.write(f"--- pairvol: starting {m.name} at {time.time():.3f}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=m.dir,
                    env=_env(),
                    start_new_session=True,  # a Ctrl-C of the command that started it stays there
                )
            except OSError as e:
                raise ExternalCommandFailed(f"cannot run {argv[0]}: {e.strerror}") from None
        self._procs[m.index] = proc
        try:
            started = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            started = 0.0  # it died at once: _wait_healthy reports it
        with open(m.pid_path, "w") as f:
            f.write(f"{proc.pid} {started}\n")

    def _wait_healthy(self, indexes: Sequence[int] | range, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(indexes)
        while True:
            for i in list(waiting):
                m = self.members[i]
                proc = self._procs.get(i)
                if proc is not None and proc.poll() is not None:
                    line = _last_error(m.log_path)
                    if "address already in use" in line:
                        raise _PortTaken(line)
                    raise ExternalCommandFailed(
                        f"etcd member {m.name} exited with status {proc.returncode} while "
                        f"starting: {line} (log: {m.log_path})"
                    )
                if self.healthy(i):
                    waiting.remove(i)
            if not waiting:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(self.members[i].name for i in waiting)
                raise Timeout(
                    f"etcd member {names} not healthy within {timeout:g}s "
                    f"(log: {self.members[waiting[0]].log_path})"
                )
            time.sleep(min(POLL, left))

    # -- stop, kill, restart ---------------------------------------------------------------

    def kill_member(self, i: int) -> None:
        """SIGKILL member ``i`` and wait until it is gone (a host dying)."""
        m = self._member(i)
        pid = self._pid(m)
        if pid is None:
            raise IllegalState(f"etcd member {m.name} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not self._wait_gone(m, pid, KILL_TIMEOUT):
            raise Timeout(
                f"etcd member {m.name} (pid {pid}) survived SIGKILL for {KILL_TIMEOUT:g}s"
            )

    def restart_member(self, i: int, *, wait: bool = True) -> None:
        """Start member ``i`` again on its data; with ``wait``, until it is healthy (which
        needs a quorum of members up)."""
        m = self._member(i)
        if self._pid(m) is not None:
            raise IllegalState(f"etcd member {m.name} is still running")
        self._spawn(m, new=not os.path.isdir(m.data_dir))
        self._started = True
        if wait:
            self._wait_healthy([i], self.start_timeout)

    def stop(self) -> None:
        """SIGTERM every member and wait ``stop_timeout``; SIGKILL what is left and fail
        (IllegalState; Timeout if even SIGKILL did not end it).

        A leader that stops first tries to hand its leadership over, and when its peers are
        stopping too it gives up only after etcd's request timeout (5 s + 2 election
        timeouts: 7 s by default); stopping the members together costs that once, in
        parallel, which ``STOP_TIMEOUT`` leaves room for."""
        alive = [(m, pid) for m in self.members if (pid := self._pid(m)) is not None]
        for _, pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        stubborn = [
            (m, pid)
            for m, pid in alive
            if not self._wait_gone(m, pid, max(0.0, deadline - time.monotonic()))
        ]
        for _, pid in stubborn:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        survivors = [(m, pid) for m, pid in stubborn if not self._wait_gone(m, pid, KILL_TIMEOUT)]
        self._started = False
        left = {m.index for m, _ in survivors}
        for m, _ in alive:
            if m.index not in left:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(m.pid_path)
        if survivors:
            m, pid = survivors[0]
            raise Timeout(
                f"etcd member {m.name} (pid {pid}) survived SIGKILL for {KILL_TIMEOUT:g}s"
            )
        if stubborn:
            m, pid = stubborn[0]
            raise IllegalState(
                f"etcd member {m.name} (pid {pid}) ignored SIGTERM for {self.stop_timeout:g}s "
                "and was killed"
            )

    def _force_stop(self) -> None:
        for m in self.members:
            pid = self._pid(m)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_gone(m, pid, KILL_TIMEOUT)
        self._started = False

    def _wait_gone(self, m: Member, pid: int, timeout: float) -> bool:
        """Wait until ``pid`` exited (reaping our own child); whether it did in time."""
        proc = self._procs.get(m.index)
        if proc is not None and proc.pid == pid:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            del self._procs[m.index]
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                p = psutil.Process(pid)
                if p.status() == psutil.STATUS_ZOMBIE:
                    return True
            except psutil.NoSuchProcess:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL, left))


class _PortTaken(Exception):
    pass


def _env() -> dict[str, str]:
    """Our environment without ETCD_* (etcd reads its flags from those too)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}


def _last_error(path: str) -> str:
    """The last error etcd logged, as one line (its zap JSON ``msg`` and ``error``)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "no log"
    text = "no output"
    for line in reversed(lines):
        if not line.strip() or line.startswith("--- pairvol:"):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            return line.strip()[:300]
        if not isinstance(doc, dict):
            return line.strip()[:300]
        if doc.get("level") in ("error", "fatal", "panic", "warn") or text == "no output":
            msg = str(doc.get("msg", ""))
            err = doc.get("error")
            text = f"{msg}: {err}" if err else msg
            if doc.get("level") in ("error", "fatal", "panic"):
                return text[:300]
    return text[:300]
