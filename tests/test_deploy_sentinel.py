"""The prod overlay's Redis and Sentinel pods, run for real: their start scripts, as
rendered from deploy/k8s, in six network namespaces on one bridge (each "pod" its own IP,
its stable names in its own /etc/hosts, as a headless Service gives them), with Redis's
own binaries. Sentinel finds the primary and its replicas by name, fails over when the
primary is SIGKILLed, the old primary's pod comes back as a replica (it asks the
Sentinels), and a service configured with the rendered REDIS_SENTINELS follows it.

Only the paths are changed (``/data`` and ``/etc/redis/redis.conf`` to the test's own
directories); the scripts' logic, names and ports are the manifests'. Needs root and
iproute2 (``ip``), like the other network-namespace tests.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.netns import ip, require_netns
from tests.support.waiting import eventually
from tools.kustomize import render

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "a-test-redis-password"
REDIS_PODS = [f"redis-{i}" for i in range(3)]
SENTINEL_PODS = [f"redis-sentinel-{i}" for i in range(3)]


def stable_name(pod: str) -> str:
    service = "redis-sentinel" if pod.startswith("redis-sentinel") else "redis-headless"
    return f"{pod}.{service}"


@dataclass
class Pods:
    """One namespace per pod; ``run`` starts a pod's script, ``cli`` asks a server."""

    tag: str
    workdir: Path
    namespaces: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def run(self, pod: str, script: str, env: dict[str, str]) -> None:
        data = self.workdir / pod
        data.mkdir(exist_ok=True)
        conf = data / "redis.conf"  # the ConfigMap's file, its `dir /data` this pod's own
        conf.write_text((self.workdir / "redis.conf").read_text().replace("/data", str(data)))
        script = script.replace("/etc/redis/redis.conf", str(conf))
        script = script.replace("/data", str(data))
        log = (self.workdir / f"{pod}.log").open("ab")
        self.procs[pod] = subprocess.Popen(
            ["ip", "netns", "exec", self.namespaces[pod], "sh", "-c", script],
            env={**env, "HOSTNAME": pod, "PATH": f"{self.workdir / 'bin'}:{os.environ['PATH']}"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self, pod: str) -> None:
        proc = self.procs.pop(pod)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def cli(self, pod: str, *args: str, port: int = 6379, auth: bool = True) -> list[str]:
        """``redis-cli`` against a pod's server, from the first Sentinel pod's namespace."""
        env = {"PATH": os.environ["PATH"], **({"REDISCLI_AUTH": PASSWORD} if auth else {})}
        where = ["ip", "netns", "exec", self.namespaces[SENTINEL_PODS[0]]]
        result = subprocess.run(
            [*where, "redis-cli", "-h", stable_name(pod), "-p", str(port), "--raw", *args],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
        )
        return result.stdout.split() if result.returncode == 0 else []

    def primary_per_sentinel(self) -> set[str]:
        named = set()
        for pod in SENTINEL_PODS:
            reply = self.cli(
                pod, "sentinel", "get-master-addr-by-name", "dmcall", port=26379, auth=False
            )
            named.add(reply[0] if reply else "")
        return named

    def log(self, pod: str) -> str:
        path = self.workdir / f"{pod}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@contextmanager
def pods(workdir: Path) -> Iterator[Pods]:
    require_netns()
    tag = secrets.token_hex(3)
    subnet = int(tag[:2], 16) % 250 + 2
    bridge = f"dmb{tag}"
    net = Pods(tag, workdir)
    every = REDIS_PODS + SENTINEL_PODS
    addresses = {pod: f"10.214.{subnet}.{i + 2}" for i, pod in enumerate(every)}
    hosts = "127.0.0.1 localhost\n" + "".join(
        f"{addresses[pod]} {stable_name(pod)}\n" for pod in every
    )
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("link", "set", bridge, "up")
        for i, pod in enumerate(every):
            ns, host_if, ns_if = f"dmp{tag}{i}", f"vph{tag}{i}", f"vpn{tag}{i}"
            net.namespaces[pod] = ns
            ip("netns", "add", ns)
            ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            ip("link", "set", ns_if, "netns", ns)
            ip("link", "set", host_if, "master", bridge)
            ip("link", "set", host_if, "up")
            ip("addr", "add", f"{addresses[pod]}/24", "dev", ns_if, netns=ns)
            ip("link", "set", ns_if, "up", netns=ns)
            ip("link", "set", "lo", "up", netns=ns)
            # `ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts: the pod's DNS
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
        yield net
    finally:
        for proc in net.procs.values():
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        for i, ns in enumerate(net.namespaces.values()):
            subprocess.run(["ip", "link", "del", f"vph{tag}{i}"], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


def _find(objs: list[dict], kind: str, prefix: str) -> dict:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(prefix))


async def test_the_prod_sentinels_fail_redis_over_and_the_old_primary_rejoins_as_a_replica(
    k8s_tree: Path, tmp_path: Path
) -> None:
    objs = render(k8s_tree / "overlays" / "prod")
    redis_script = _find(objs, "StatefulSet", "redis")["spec"]["template"]["spec"]
    [redis_container] = redis_script["containers"]
    [redis_args] = redis_container["args"]
    sentinel = _find(objs, "StatefulSet", "redis-sentinel")["spec"]["template"]["spec"]
    [sentinel_args] = sentinel["containers"][0]["args"]
    config = _find(objs, "ConfigMap", "dmcall-config")["data"]
    redis_conf = _find(objs, "ConfigMap", "redis-config")["data"]["redis.conf"]

    work = tmp_path / "pods"
    (work / "bin").mkdir(parents=True)
    # The image's redis-sentinel is redis-server under that name, as Debian's is.
    (work / "bin" / "redis-sentinel").symlink_to(shutil.which("redis-server") or "redis-server")
    (work / "redis.conf").write_text(redis_conf)
    env = {"REDIS_PASSWORD": PASSWORD}

    with pods(work) as net:
        for pod in REDIS_PODS:
            net.run(pod, redis_args, {**env, "REDISCLI_AUTH": PASSWORD})
        for pod in SENTINEL_PODS:
            net.run(pod, sentinel_args, env)

        def watching() -> bool:
            replicas = net.cli("redis-0", "role")
            return (
                replicas[:1] == ["master"]
                and net.primary_per_sentinel() == {stable_name("redis-0")}
                and all(
                    len(net.cli(s, "sentinel", "replicas", "dmcall", port=26379, auth=False)) > 0
                    for s in SENTINEL_PODS
                )
            )

        try:
            await eventually(watching, timeout=40, step=0.5)
        except AssertionError as stuck:
            raise AssertionError(net.log("redis-sentinel-0") + net.log("redis-1")) from stuck
        assert net.cli("redis-1", "role")[:2] == ["slave", stable_name("redis-0")]
        # min-replicas-to-write 1: the primary takes writes once a replica has synced
        await eventually(lambda: net.cli("redis-0", "set", "call:kept", "yes") == ["OK"])
        assert net.cli("redis-0", "wait", "2", "5000") == ["2"]  # both replicas have it

        net.kill("redis-0")  # the primary's pod dies at once
        promoted = await eventually(
            lambda: (
                (named := net.primary_per_sentinel()) != {stable_name("redis-0")}
                and len(named) == 1
                and named
            ),
            timeout=60,
            step=0.5,
        )
        [new_primary] = promoted
        assert new_primary in {stable_name("redis-1"), stable_name("redis-2")}
        new_pod = new_primary.split(".")[0]
        await eventually(lambda: net.cli(new_pod, "role")[:1] == ["master"], timeout=20)
        assert net.cli(new_pod, "get", "call:kept") == ["yes"]

        # The old primary's pod starts again: it asks the Sentinels and replicates.
        net.run("redis-0", redis_args, {**env, "REDISCLI_AUTH": PASSWORD})
        await eventually(
            lambda: net.cli("redis-0", "role")[:2] == ["slave", new_primary], timeout=30
        )
        await eventually(lambda: net.cli("redis-0", "get", "call:kept") == ["yes"], timeout=20)
        assert net.primary_per_sentinel() == {new_primary}

        # A service with the rendered settings finds the new primary through the Sentinels.
        service_env = {
            "PATH": os.environ["PATH"],
            "REDIS_URL": f"redis://:{PASSWORD}@redis:6379/0",
            "REDIS_SENTINELS": config["REDIS_SENTINELS"],
            "REDIS_SENTINEL_MASTER": config["REDIS_SENTINEL_MASTER"],
            "DMCALL_ENV": "test",
        }
        # Right after the failover a write can meet a node still changing role, or a new
        # primary with no replica in sync yet (NOREPLICAS): to a service both are a 503,
        # so the probe retries as a client after Retry-After would.
        probe = (
            "import asyncio\n"
            "from redis.exceptions import ConnectionError\n"
            "from shared import redis as r\n"
            "from shared.settings import CommonSettings\n"
            "async def main():\n"
            "    client = r.connect(CommonSettings(), name='probe')\n"
            "    for _ in range(30):\n"
            "        try:\n"
            "            await client.set('call:new', 'placed')\n"
            "            break\n"
            "        except ConnectionError:\n"
            "            await asyncio.sleep(1)\n"
            "    print((await client.get('call:kept')).decode())\n"
            "    await client.aclose()\n"
            "asyncio.run(main())\n"
        )
        done = await asyncio.to_thread(
            subprocess.run,
            ["ip", "netns", "exec", net.namespaces[SENTINEL_PODS[1]], sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=60,
            env=service_env,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["yes"]
        assert net.cli(new_pod, "get", "call:new") == ["placed"]  # written to the primary
