"""A RabbitMQ node of the test's own, for tests that kill the broker: the shared one on
5672 is never touched.

The node has its own name (``dmcall-test-<port>@localhost``), AMQP and distribution
ports, data directory, configuration (only its listener; no plugins) and Erlang cookie
(``HOME`` is its work directory). Killed and started again with the same directory, it
comes back with its durable queues and the messages it had confirmed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tools.stack import free_port

_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's; /usr/sbin's wrappers switch user


def _tool(name: str) -> str:
    path = _BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed (make machine installs RabbitMQ)")
    return found


class PrivateRabbit:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"dmcall-test-{self.port}@localhost"
        self.workdir = workdir / f"rabbitmq-{self.port}"
        (self.workdir / "mnesia").mkdir(parents=True, exist_ok=True)
        (self.workdir / "log").mkdir(exist_ok=True)
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self.workdir / "enabled_plugins").write_text("[].\n")
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def _pid_file(self) -> Path:
        return self.workdir / "node.pid"

    def _env(self) -> dict[str, str]:
        w = self.workdir
        return {
            **os.environ,
            "HOME": str(w),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self._pid_file),
        }

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the node and return once it takes connections."""
        self._pid_file.unlink(missing_ok=True)
        env = self._env()
        subprocess.run([_tool("rabbitmq-server"), "-detached"], env=env, check=True)
        wait = [_tool("rabbitmqctl"), "-n", self.node, "wait", str(self._pid_file)]
        waited = subprocess.run(
            [*wait, "--timeout", str(int(timeout_s))],
            env=env,
            capture_output=True,
            check=False,
        )
        if waited.returncode != 0:
            self.stop()
            raise AssertionError(
                f"private RabbitMQ {self.node} did not start: {waited.stdout.decode()}"
                f"{waited.stderr.decode()}"
            )
        self.pid = int(self._pid_file.read_text().strip())

    def kill(self) -> None:
        """SIGKILL: the broker dies as a crashed machine's would, without a clean stop."""
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.pid = None

    def stop(self) -> None:
        self.kill()
        # anything left of the node (its command lines name its directory; epmd, which
        # the shared broker uses too, does not and stays)
        subprocess.run(["pkill", "-KILL", "-f", str(self.workdir)], check=False)
