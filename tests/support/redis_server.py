"""Private redis-servers for tests that restart or kill Redis: a primary, a replica of it,
or a Sentinel watching one."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tools.stack import free_port


def _redis_server() -> str:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed for the Redis restart and failover tests"
    return binary


class PrivateRedis:
    """A redis-server of the test's own on a spare port, so restarting it harms no one.

    ``replica_of`` makes it a replica of that server; ``PrivateSentinel`` watches them.
    """

    def __init__(self, workdir: Path, *, replica_of: PrivateRedis | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir / f"redis-{self.port}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.replica_of = replica_of
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        argv = [_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.workdir)]
        if self.replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        return argv

    def start(self) -> None:
        log = (self.workdir / "server.log").open("ab")
        self.proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.cli("ping") == "PONG":
                return
            time.sleep(0.05)
        raise AssertionError(f"private redis on {self.port} did not start")

    def cli(self, *args: str) -> str:
        """One redis-cli command against this server; its reply as text ("" if it is down)."""
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, check=False
        )
        return done.stdout.decode().strip()

    def kill(self) -> None:
        """SIGKILL: the process dies with whatever it had not replicated yet."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        self.kill()


class PrivateSentinel(PrivateRedis):
    """A redis-sentinel of the test's own, watching ``primary`` as ``master``.

    Quick to judge: the primary is down after ``down_after_ms`` without an answer, and a
    failover that stalls is tried again after ``failover_timeout_ms``.
    """

    def __init__(
        self,
        workdir: Path,
        primary: PrivateRedis,
        *,
        master: str = "dmcall",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        super().__init__(workdir)
        self.primary = primary
        self.master = master
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        # Sentinel rewrites its config file as it learns, so each has a file of its own.
        conf = self.workdir / "sentinel.conf"
        m = self.master
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {m} 127.0.0.1 {self.primary.port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {m} {self.down_after_ms}\n"
            f"sentinel failover-timeout {m} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {m} 1\n"
        )
        # redis-sentinel is redis-server under another name (Debian ships it apart)
        return [_redis_server(), str(conf), "--sentinel"]

    def primary_port(self) -> int | None:
        """The port of the node this Sentinel calls primary now (None if it does not answer)."""
        reply = self.cli("sentinel", "get-master-addr-by-name", self.master).split()
        return int(reply[1]) if len(reply) == 2 else None
