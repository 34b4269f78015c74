"""Start and stop an nbdkit process serving pairvol volumes.

This is how pairvol itself runs nbdkit (the demo, the tests, and later the storage node), so
the server options chosen from benchmarks (docs/benchmarks.md) live in one place:
:data:`NBDKIT_OPTIONS`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from replicator.errors import ExternalCommandFailed, Timeout, UsageError

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = str(ROOT / "plugins" / "pairvol.py")
NBD_PORT = 10809

#: nbdkit options for the pairvol plugin, chosen by measurement (docs/benchmarks.md).
#: Four worker threads per connection: at 4k, nbdkit's default 16 threads mostly fight over
#: the GIL (one thread is fastest locally), but a synchronous mirror waits a network round
#: trip per write with the GIL released, and one thread would allow one write in flight.
#: Four keeps 1M streaming at the C file plugin's speed and 4k within noise of two threads,
#: and ran 3.5x one thread's 4k writes with a simulated 200 us mirror round trip.
NBDKIT_OPTIONS: tuple[str, ...] = ("--threads", "4")

#: NBD clients a storage node serves at once unless told otherwise.  Each costs nbdkit a
#: connection thread and ``--threads`` workers (300 clients made 1,513 threads, issue 7);
#: nbdkit's limit filter refuses the ones beyond it as they connect.
NBD_MAX_CONNECTIONS = 64


def check_max_connections(n: int) -> int:
    """A client limit for nbdkit's limit filter: at least 1, or 0 for no limit."""
    if type(n) is not int or n < 0:
        raise UsageError(f"max connections {n!r} is not a number >= 0 (0: no limit)")
    return n


def plugin_command(
    *params: str, extra: tuple[str, ...] = (), max_connections: int | None = None
) -> list[str]:
    """The argv that runs nbdkit with the pairvol plugin and ``params`` (volume=, dir=);
    with ``max_connections``, through the limit filter (0: no limit)."""
    limit: tuple[str, ...] = ()
    if max_connections is not None:
        extra = ("--filter=limit", *extra)
        limit = (f"limit={check_max_connections(max_connections)}",)
    return ["nbdkit", *NBDKIT_OPTIONS, *extra, "python", PLUGIN, *params, *limit]


def captive_command(*params: str) -> list[str]:
    """For libnbd's ``connect_command``: stdin/stdout socket, dies with its parent."""
    return plugin_command(*params, extra=("-s", "--exit-with-parent"))


@dataclass
class NbdkitServer:
    """One nbdkit process on a unix socket (and optionally TCP), run in the background."""

    params: tuple[str, ...]
    socket: Path
    listen: str | None = None
    port: int = NBD_PORT
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def pidfile(self) -> Path:
        return self.socket.with_suffix(".pid")

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def tcp_uri(self, export: str = "") -> str:
        if self.listen is None:
            raise ExternalCommandFailed("this server does not listen on TCP")
        port = "" if self.port == NBD_PORT else f":{self.port}"
        return f"nbd://{self.listen}{port}/{export}"

    def start(self, timeout: float = 30.0) -> NbdkitServer:
        for stale in (self.socket, self.pidfile):
            stale.unlink(missing_ok=True)
        extra = ["--foreground", "--unix", str(self.socket), "--pidfile", str(self.pidfile)]
        if self.listen is not None:
            # nbdkit takes either --unix or -i/-p; a second listener needs a second process,
            # so with TCP we listen on TCP only and clients on this host use the same address.
            extra = ["--foreground", "-i", self.listen, "-p", str(self.port)]
            extra += ["--pidfile", str(self.pidfile)]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                plugin_command(*self.params, extra=tuple(extra)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while not self.pidfile.exists():  # nbdkit writes the pidfile once it is listening
            if self.proc.poll() is not None:
                raise ExternalCommandFailed(
                    f"nbdkit exited with status {self.proc.returncode} at start-up"
                    + (f"; see {self.log}" if self.log else "")
                )
            if time.monotonic() > deadline:
                self.stop()
                raise Timeout(f"nbdkit did not become ready within {timeout:.0f}s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then wait; a server that will not exit is an error (after SIGKILL)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise ExternalCommandFailed(
                    f"nbdkit (pid {proc.pid}) ignored SIGTERM for {timeout:.0f}s"
                ) from None
        self.pidfile.unlink(missing_ok=True)

    def __enter__(self) -> NbdkitServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
