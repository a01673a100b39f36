"""``make bench-media``: what a media node costs per stream, forwarding vs transcoding,
1:1 calls vs a group call.

N concurrent 1:1 calls; each party publishes pre-encoded VP8 640x480 (~1 Mbps) plus
Opus (a "stream"), so the clients spend no CPU encoding. The same calls go through

- the forwarding SFU (``python -m services.media``, a real node with broker and Redis),
- the same node with one group call of ``--group-size`` participants (6), each
  publishing a stream that goes to every other one: size x (size - 1) forwarded streams,
- the transcoding path: aiortc's ``MediaRelay`` (tools/loadtest/transcoder.py),

one after the other in the same run. A *forwarded stream* is one published stream
delivered to one subscriber (in a 1:1 call each stream is forwarded once), so the CPU
per forwarded stream of the 1:1 calls and of the group call compare directly. For each
path it prints the server process's CPU-seconds per (forwarded) stream per 30 s (from
/proc, over the measured window), packet loss (gaps in the sequence numbers the
receiving clients see: clients do not NACK here), the share of video frames delivered,
and the delay inside the server: for the SFU, from a packet's arrival to the send of its
forwarded copy, one copy in 4 (its own ``node_forward_delay_ms``); for the transcoder,
from a video frame's last packet in to the re-encoded frame out.

With ``--janus`` the same 1:1 calls and group also go through Janus's videoroom
(Debian's ``janus``, a private server: tools/loadtest/janus.py), measured the same way,
``--rounds`` times alternating which server goes first, and the two are printed side by
side with their ratio; each figure carries the machine's load average.

    python -m tools.loadtest.bench_media --calls 5 --duration 20 [--group-size 6]
        [--transcode-calls 2] [--janus --rounds 2 --skip-transcode]

Clients run in worker processes (``--workers``) apart from the server measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tools.loadtest.deployment import process_stats, start_local
from tools.loadtest.profiling import (
    CallProfiler,
    Profiler,
    cprofile_dir,
    cprofile_lines,
    summary_lines,
)
from tools.stack import ROOT, free_port

CACHE = ROOT / ".run" / "bench-media"
NODE = "bench"


# --------------------------------------------------------------------------- worker side


def sent_records(call_id: str, user: str, client: Any) -> list[dict[str, Any]]:
    """What one party sent in the measured window, per kind."""
    return [
        {
            "role": "sent",
            "call_id": call_id,
            "user": user,
            "kind": kind,
            "sent_packets": client.sent[kind].window_packets,
            "sent_frames": client.sent[kind].window_frames,
        }
        for kind in ("video", "audio")
    ]


def received_record(
    call_id: str, source: str | None, user: str, kind: str | None, flow: Any
) -> dict[str, Any]:
    """What ``user`` got of ``source``'s ``kind`` in the window (gaps in the sequence: loss)."""
    seqs = flow.window_seqs
    return {
        "role": "received",
        "call_id": call_id,
        "from": source,
        "to": user,
        "kind": kind,
        "received_packets": len(seqs),
        "expected_packets": (max(seqs) - min(seqs) + 1) if seqs else 0,
        "received_frames": flow.window_frames,
    }


def slot_records(call_id: str, user: str, client: Any, users: dict[str, Any]) -> list[Any]:
    """What a client receiving several parties (``users``: mid -> whose) got of each."""
    kinds = {t.mid: t.kind for t in client.pc.getTransceivers()}
    return [
        received_record(call_id, users.get(mid), user, kinds.get(mid), flow)
        for mid, flow in client.by_mid.items()
    ]


async def _measure_when_told(clients: list[Any], results: Callable[[], list[Any]]) -> None:
    """Say READY; then, on stdin, MARK opens the measured window and STOP closes it, prints
    ``RESULT <json>`` and ends the clients."""
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while (line := (await reader.readline()).decode().strip()) not in ("STOP", ""):
        if line == "MARK":
            for client in clients:
                client.measuring = True
    for client in clients:
        client.measuring = False
    print("RESULT " + json.dumps(results()), flush=True)
    await asyncio.gather(*(c.close() for c in clients))


async def _group_worker(args: argparse.Namespace, video: Any, audio: Any) -> None:
    """Some participants (``--members``) of one group call (``--prefix`` is its id)."""
    from services.media.settings import MediaSettings
    from shared.auth import MediaGrant, issue_media_token
    from tools.media_client import MediaClient

    settings = MediaSettings()
    call_id = args.prefix
    size = args.group_size
    clients: dict[str, MediaClient] = {}
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        for index in args.members.split(","):
            user = f"u{index}"
            client = MediaClient(video, audio, record=False, light=True, slots=size - 2)
            grant = MediaGrant(call_id, user, NODE, group="bench")
            response = await client.connect(
                f"{args.url}/v1/rooms/{call_id}/sessions",
                issue_media_token(settings, grant),
                http,
            )
            if response.status_code != 201:
                raise SystemExit(f"session refused: {response.status_code} {response.text}")
            clients[user] = client

        def receiving_all(client: MediaClient) -> bool:
            users = client.slot_users()
            flowing = {users.get(mid) for mid, flow in client.by_mid.items() if flow.packets}
            return len(flowing - {None}) == size - 1

        for _ in range(600):  # up to two minutes for every participant's media to arrive
            if all(receiving_all(c) for c in clients.values()):
                break
            await asyncio.sleep(0.2)

        def results() -> list[dict[str, Any]]:
            return [
                record
                for user, c in clients.items()
                for record in sent_records(call_id, user, c)
                + slot_records(call_id, user, c, c.slot_users())
            ]

        await _measure_when_told(list(clients.values()), results)


def _flows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The workers' records as one flow per (publisher's stream -> subscriber)."""
    sent = {(r["call_id"], r["user"], r["kind"]): r for r in records if r["role"] == "sent"}
    flows = []
    for r in records:
        source = sent.get((r["call_id"], r.get("from"), r["kind"]))
        if r["role"] != "received" or source is None:
            continue
        flows.append(
            {
                "call_id": r["call_id"],
                "kind": r["kind"],
                "from": r["from"],
                "to": r["to"],
                "sent_packets": source["sent_packets"],
                "sent_frames": source["sent_frames"],
                "received_packets": r["received_packets"],
                "expected_packets": r["expected_packets"],
                "received_frames": r["received_frames"],
            }
        )
    return flows


async def _worker(args: argparse.Namespace, video: Any, audio: Any) -> None:
    from services.media.settings import MediaSettings
    from shared.auth import MediaGrant, issue_media_token
    from tools.media_client import MediaClient

    settings = MediaSettings()
    calls: list[tuple[str, MediaClient, MediaClient]] = []
    # No keep-alive: a slow (niced) client must not reuse a connection the server closed.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        for index in range(args.calls):
            call_id = f"{args.prefix}-{index}"
            a = MediaClient(video, audio, record=False, light=True)
            b = MediaClient(video, audio, record=False, light=True)
            for user, client in (("a", a), ("b", b)):
                token = issue_media_token(settings, MediaGrant(call_id, user, NODE))
                response = await client.connect(
                    f"{args.url}/v1/rooms/{call_id}/sessions", token, http
                )
                if response.status_code != 201:
                    raise SystemExit(f"session refused: {response.status_code} {response.text}")
            calls.append((call_id, a, b))
        for _ in range(300):  # up to a minute for every party's video to arrive
            if all(c.received["video"].packets > 0 for _, a, b in calls for c in (a, b)):
                break
            await asyncio.sleep(0.2)

        def results() -> list[dict[str, Any]]:
            records: list[dict[str, Any]] = []
            for call_id, a, b in calls:
                for user, client, source in (("a", a, "b"), ("b", b, "a")):
                    records += sent_records(call_id, user, client)
                    records += [
                        received_record(call_id, source, user, kind, client.received[kind])
                        for kind in ("video", "audio")
                    ]
            return records

        await _measure_when_told([c for _, a, b in calls for c in (a, b)], results)


async def _janus_worker(args: argparse.Namespace, video: Any, audio: Any) -> None:
    """The same calls (or some members of the group) through Janus's videoroom."""
    from tools.loadtest import janus

    limits = httpx.Limits(max_keepalive_connections=0, max_connections=None)
    async with httpx.AsyncClient(timeout=90, limits=limits) as http:
        parties: list[janus.Party] = []
        if args.group_size:
            everyone = [f"u{i}" for i in range(1, args.group_size + 1)]
            mine = [
                await janus.join(http, args.url, args.prefix, f"u{i}")
                for i in args.members.split(",")
            ]
            for party in mine:
                await party.publish(args.group_size, video, audio)
            for party in mine:
                await party.subscribe([u for u in everyone if u != party.user])
            parties += mine
        for index in range(args.calls):
            call_id = f"{args.prefix}-{index}"
            a, b = [await janus.join(http, args.url, call_id, user) for user in ("a", "b")]
            for party in (a, b):
                await party.publish(2, video, audio)
            await a.subscribe(["b"])
            await b.subscribe(["a"])
            parties += (a, b)
        for _ in range(600):  # up to two minutes for every party's media to arrive
            if all(party.receiving() for party in parties):
                break
            await asyncio.sleep(0.2)

        def results() -> list[dict[str, Any]]:
            return [
                record
                for p in parties
                for record in sent_records(p.room, p.user, p.publisher)
                + slot_records(p.room, p.user, p.subscriber, p.feed_of_mid)
            ]

        await _measure_when_told([c for party in parties for c in party.clients()], results)
        await asyncio.gather(*(party.session.close() for party in parties))


# --------------------------------------------------------------------------- orchestrator


def _cpu_seconds(pid: int) -> float:
    return process_stats(pid)["cpu_s"]


def _media(seconds: float) -> Path:
    from tools.media_client import encode_opus, encode_vp8

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"vp8-640x480-1mbps-opus-{seconds:g}s.pickle"
    if not path.exists():
        print(f"encoding {seconds:g} s of VP8 640x480 ~1 Mbps and Opus once (cached in {path})")
        with open(path, "wb") as fh:
            pickle.dump((encode_vp8(640, 480, seconds=seconds), encode_opus(1.0)), fh)
    return path


@dataclass
class Outcome:
    name: str
    calls: int
    window_s: float
    cpu_s: float
    flows: list[dict[str, Any]]
    delay_p50_ms: float | None
    delay_p99_ms: float | None
    delay_note: str
    loss_into_server: float | None = None
    client_load: list[float] | None = None
    forwarded: int | None = None
    """Forwarded streams of a group call (size x (size - 1)); a 1:1 call forwards 2."""
    server: str = "sfu"
    """What forwards: ``sfu`` (services/media), ``janus``, ``transcoder``."""
    load_avg: float = 0.0
    """The machine's 1-minute load average when the window closed (a shared machine)."""

    @property
    def streams(self) -> int:
        return self.forwarded if self.forwarded is not None else 2 * self.calls

    @property
    def cpu_per_stream_30s(self) -> float:
        """Per stream actually offered: when the clients could not send all their frames
        (a busy machine), the server's CPU is divided by the streams they did send."""
        offered = self.streams * min(1.0, self.frames_offered())
        return self.cpu_s / offered * 30 / self.window_s if offered else float("nan")

    def loss(self, kind: str) -> float:
        flows = [f for f in self.flows if f["kind"] == kind]
        expected = sum(f["expected_packets"] for f in flows)
        received = sum(f["received_packets"] for f in flows)
        return 1 - received / expected if expected else float("nan")

    def frames_offered(self) -> float:
        """Video frames the clients sent, of the 30 a second each stream should have."""
        sent = sum(f["sent_frames"] for f in self.flows if f["kind"] == "video")
        return sent / (30 * self.window_s * self.streams) if self.streams else float("nan")

    def frames_delivered(self) -> float:
        flows = [f for f in self.flows if f["kind"] == "video"]
        sent = sum(f["sent_frames"] for f in flows)
        return sum(f["received_frames"] for f in flows) / sent if sent else float("nan")


GROUP_MEMBERS_PER_WORKER = 2


def _start_workers(
    url: str,
    calls: int,
    workers: int,
    media: Path,
    prefix: str,
    nice: int,
    group_size: int = 0,
    server: str = "sfu",
) -> list[subprocess.Popen[str]]:
    procs = []
    per = [calls // workers + (1 if i < calls % workers else 0) for i in range(workers)]
    jobs: list[list[str]] = [
        ["--calls", str(count), "--prefix", f"{prefix}{index}"]
        for index, count in enumerate(c for c in per if c)
    ]
    if group_size:
        members = list(range(1, group_size + 1))
        step = GROUP_MEMBERS_PER_WORKER
        jobs = [
            [
                "--calls",
                "0",
                "--prefix",
                prefix,
                "--group-size",
                str(group_size),
                "--members",
                ",".join(str(m) for m in members[i : i + step]),
            ]
            for i in range(0, group_size, step)
        ]
    for job in jobs:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tools.loadtest.bench_media",
                    "worker",
                    "--url",
                    url,
                    *job,
                    "--media",
                    str(media),
                    "--client-nice",
                    str(nice),
                    *(["--janus"] if server == "janus" else []),
                ],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        )
    return procs


def _wait_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a client worker exited (code {proc.wait()})")
        if line.startswith(prefix):
            return line[len(prefix) :].strip()


def _measure(
    name: str,
    url: str,
    server_pid: int,
    calls: int,
    args: argparse.Namespace,
    media: Path,
    group_size: int = 0,
    server: str = "sfu",
) -> tuple[Outcome, str]:
    prefix = uuid.uuid4().hex[:8]
    workers = _start_workers(
        url, calls, args.workers, media, prefix, args.client_nice, group_size, server
    )
    try:
        for proc in workers:
            _wait_line(proc, "READY")
        time.sleep(args.warmup)
        for proc in workers:
            assert proc.stdin is not None
            proc.stdin.write("MARK\n")
            proc.stdin.flush()
        cpu0, t0 = _cpu_seconds(server_pid), time.monotonic()
        clients0 = [_cpu_seconds(p.pid) for p in workers]
        time.sleep(args.duration)
        cpu1, t1 = _cpu_seconds(server_pid), time.monotonic()
        clients1 = [_cpu_seconds(p.pid) for p in workers]
        flows: list[dict[str, Any]] = []
        for proc in workers:
            assert proc.stdin is not None
            proc.stdin.write("STOP\n")
            proc.stdin.flush()
        for proc in workers:
            flows += json.loads(_wait_line(proc, "RESULT "))
        for proc in workers:
            proc.wait(30)
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
    outcome = Outcome(name, calls, t1 - t0, cpu1 - cpu0, _flows(flows), None, None, "")
    outcome.server, outcome.load_avg = server, os.getloadavg()[0]
    outcome.client_load = [(b - a) / (t1 - t0) for a, b in zip(clients0, clients1, strict=True)]
    if group_size:
        outcome.forwarded = group_size * (group_size - 1)
        return outcome, prefix
    return outcome, f"{prefix}0-0"


def _room_stats(url: str, room: str, user: str, group: str | None) -> dict[str, Any]:
    from services.media.settings import MediaSettings
    from shared.auth import MediaGrant, issue_media_token

    token = issue_media_token(MediaSettings(), MediaGrant(room, user, NODE, group=group))
    body: dict[str, Any] = httpx.get(
        f"{url}/v1/rooms/{room}/stats", headers={"Authorization": f"Bearer {token}"}
    ).json()
    return body


def _server_side(outcome: Outcome, url: str, call_id: str, args: argparse.Namespace) -> None:
    """Loss into the node (its receivers' count) and its forwarding delay, from the stats."""
    group = outcome.forwarded is not None
    received = lost = 0
    stats: dict[str, Any] = {}
    for room in sorted({f["call_id"] for f in outcome.flows}):
        body = _room_stats(url, room, "u1" if group else "a", "bench" if group else None)
        if args.verbose:
            print(json.dumps(body))
        for party in body.get("participants", []):
            received += party["packets_in"]
            lost += party["packets_lost_in"]
        if room == call_id:
            stats = body
    outcome.loss_into_server = lost / (received + lost) if received + lost else None
    delays = stats.get("node_forward_delay_ms", {})
    outcome.delay_p50_ms = delays.get("p50")
    outcome.delay_p99_ms = delays.get("p99")
    outcome.delay_note = "packet in -> forwarded copy sent (last 50k packets)"


def _forwarded_packets(url: str) -> int:
    """The node's ``dmcall_media_forwarded_packets_total`` (every forwarded copy)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("dmcall_media_forwarded_packets_total"):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _run_forwarding(args: argparse.Namespace, media: Path) -> list[Outcome]:
    stamp = uuid.uuid4().hex[:8]
    profiles = cprofile_dir(CACHE, stamp) if args.cprofile else None
    deployment = start_local(
        CACHE / "logs",
        ("media",),
        env={
            "MEDIA_NODE_ID": NODE,
            "MEDIA_CAPACITY": str(max(args.calls, 1) + 5),
            "MEDIA_TIMEOUT_S": "60",
            "MEDIA_ICE_TIMEOUT_S": "60",  # a loaded machine: no call failed before it starts
        },
        cprofile_dir=profiles,
    )
    (url,) = deployment.urls("media")
    pid = deployment.pid("media") or 0
    profiler = None
    if args.profile:
        profiler = Profiler(deployment, CACHE, stamp, skip=())
        profiler.start(2 * (args.warmup + args.duration) + 120)  # until the node stops
    call_profiler = None
    if profiles is not None:
        call_profiler = CallProfiler(deployment, profiles)
        call_profiler.start()
    calls_profile = None
    try:
        outcomes: list[Outcome] = []
        for outcome, call_id in _calls_and_group("forwarding", url, pid, args, media, "sfu"):
            _server_side(outcome, url, call_id, args)
            outcomes.append(outcome)
        if call_profiler is not None:
            forwarded = _forwarded_packets(url)
            calls_profile = call_profiler.finish(forwarded, unit="packet forwarded")
    finally:
        deployment.stop()
    if calls_profile is not None:
        print("\nthe SFU's Python calls (cProfile, whole run, warm-ups included)")
        for line in cprofile_lines(calls_profile, top=18):
            print(line)
    if profiler is not None:
        print("\nwhere the SFU's time went (py-spy, whole run)")
        for line in summary_lines(profiler.finish(), top=18):
            print(line)
    return outcomes


def _calls_and_group(
    name: str, url: str, pid: int, args: argparse.Namespace, media: Path, server: str
) -> Iterator[tuple[Outcome, str]]:
    """The 1:1 calls, then the group call, through one server: each outcome as soon as it
    is measured (the node's stats of the calls are read before the group's run)."""
    if args.calls > 0:
        label = f"{name} (services/media)" if server == "sfu" else name
        yield _measure(label, url, pid, args.calls, args, media, server=server)
    if args.group_size > 1:
        label = f"{name}, a group of {args.group_size}"
        yield _measure(label, url, pid, 1, args, media, args.group_size, server)


def _run_janus(args: argparse.Namespace, media: Path) -> list[Outcome]:
    """The same calls and group through Janus's videoroom (tools/loadtest/janus.py)."""
    from tools.loadtest import janus

    with janus.start(CACHE / "janus.log") as (url, server):
        _wait_http(f"{url}/info", server)
        measured = list(_calls_and_group("Janus videoroom", url, server.pid, args, media, "janus"))
    for outcome, _ in measured:
        outcome.delay_note = "not measured (Janus gives no such figure)"
    return [outcome for outcome, _ in measured]


def _run_transcoding(args: argparse.Namespace, media: Path) -> Outcome:
    port = free_port()
    log = open(CACHE / "transcoder.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "tools.loadtest.transcoder", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/healthz", server)
        outcome, _ = _measure(
            "transcoding (aiortc MediaRelay)", url, server.pid, args.transcode_calls, args, media
        )
        delays = httpx.get(f"{url}/delays").json()
        outcome.delay_p50_ms, outcome.delay_p99_ms = delays["p50_ms"], delays["p99_ms"]
        outcome.delay_note = "video frame's last packet in -> re-encoded frame out"
        outcome.server = "transcoder"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    return outcome


def _wait_http(url: str, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}); see {CACHE}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _report(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    print(
        f"\nmedia benchmark: {args.duration:g} s measured after {args.warmup:g} s warm-up; "
        f"a stream = one party's VP8 640x480 ~1 Mbps + Opus, forwarded to one subscriber "
        f"(a group of n forwards n x (n - 1)); {os.cpu_count()} CPUs, "
        "shared with whatever else runs on this machine\n"
    )
    header = (
        f"{'path':<34}{'calls':>6}{'streams':>8}{'CPU-s/stream/30s':>18}{'loss video':>12}"
        f"{'loss audio':>12}{'sent':>8}{'recv':>8}{'delay p50':>11}{'delay p99':>11}{'load':>6}"
    )
    print(header)
    print("-" * len(header))
    for o in outcomes:
        print(
            f"{o.name:<34}{o.calls:>6}{o.streams:>8}{o.cpu_per_stream_30s:>18.3f}"
            f"{o.loss('video'):>12.2%}{o.loss('audio'):>12.2%}"
            f"{o.frames_offered():>8.0%}{o.frames_delivered():>8.0%}"
            f"{_fmt(o.delay_p50_ms, '.3f'):>8} ms{_fmt(o.delay_p99_ms, '.3f'):>8} ms"
            f"{o.load_avg:>6.1f}"
        )
    print(
        "\n  sent: video frames the clients sent, of 30/s per stream (below ~95%: the clients "
        "did not get the CPU to offer the load,\n  and CPU-s/stream is per stream offered: "
        "streams x sent); recv: frames received in the window / frames sent in it;\n"
        "  load: the machine's 1-minute load average as the window closed"
    )
    for o in outcomes:
        if args.verbose:
            for flow in o.flows:
                print("   ", json.dumps(flow))
        print(
            f"  {o.name}: server CPU {o.cpu_s:.2f} s over {o.window_s:.1f} s "
            f"({o.cpu_s / o.window_s:.0%} of a core); delay = {o.delay_note}"
        )
        if o.client_load:
            loads = ", ".join(f"{load:.0%}" for load in o.client_load)
            print(f"    client worker processes' CPU (of a core each): {loads}")
        if o.loss_into_server is not None:
            print(
                f"    of the loss, on the way into the server (its receivers' count, whole "
                f"run): {o.loss_into_server:.2%}"
            )
    one_to_one, group = _mean_cpu(outcomes, "sfu", False), _mean_cpu(outcomes, "sfu", True)
    transcoding = _mean_cpu(outcomes, "transcoder", False)
    if one_to_one and group:
        print(
            f"  per forwarded stream, the group of {args.group_size} costs "
            f"{group / one_to_one:.2f}x what the 1:1 calls do"
        )
    if one_to_one and transcoding:
        print(
            f"  transcoding costs {transcoding / one_to_one:.1f}x the CPU per stream of forwarding"
        )
    for grouped, what in ((False, f"{args.calls} 1:1 calls"), (True, "the group")):
        ours, janus = _mean_cpu(outcomes, "sfu", grouped), _mean_cpu(outcomes, "janus", grouped)
        if ours and janus:
            print(
                f"  {what}: services/media {ours:.3f}, Janus {janus:.3f} CPU-s per forwarded "
                f"stream per 30 s (mean of the rounds): services/media / Janus = {ours / janus:.2f}"
            )


def _mean_cpu(outcomes: list[Outcome], server: str, group: bool) -> float | None:
    """Mean CPU-s per stream per 30 s of one server's 1:1 calls (or group) over the rounds."""
    values = [
        o.cpu_per_stream_30s
        for o in outcomes
        if o.server == server and (o.forwarded is not None) == group and o.cpu_per_stream_30s > 0
    ]
    return sum(values) / len(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode")
    worker = sub.add_parser("worker")
    worker.add_argument("--url", required=True)
    worker.add_argument("--calls", type=int, required=True)
    worker.add_argument("--prefix", required=True)
    worker.add_argument("--media", required=True)
    worker.add_argument("--client-nice", type=int, default=5)
    worker.add_argument("--group-size", type=int, default=0)
    worker.add_argument("--members", default="")
    worker.add_argument("--janus", action="store_true")
    parser.add_argument(
        "--calls", type=int, default=5, help="concurrent 1:1 calls (2 streams each)"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per path")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--transcode-calls", type=int, default=None, help="default: min(calls, 2)")
    parser.add_argument("--skip-transcode", action="store_true")
    parser.add_argument(
        "--group-size",
        type=int,
        default=6,
        help="participants of the group call measured after the 1:1 calls (0: none)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="client processes (default: 1 per 6 calls)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="sample the SFU with py-spy (GIL held)"
    )
    parser.add_argument(
        "--cprofile",
        action="store_true",
        help="run the SFU under cProfile: Python function calls per packet forwarded",
    )
    parser.add_argument(
        "--client-nice", type=int, default=5, help="niceness of the client processes"
    )
    parser.add_argument(
        "--janus",
        action="store_true",
        help="the same calls and group through Janus's videoroom too (Debian's janus)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --janus: rounds of both, alternating which goes first",
    )
    parser.add_argument("--verbose", action="store_true", help="print every flow and room")
    args = parser.parse_args()
    if args.mode == "worker":
        # The clients are the load, not what is measured: they yield the CPU to the server.
        os.nice(args.client_nice)
        from services.media import aiortc_internals

        # ... and buffer what arrives while they wait for it, as the node does.
        aiortc_internals.configure_ice(None, [], 4 * 1024 * 1024)
        video, audio = pickle.loads(Path(args.media).read_bytes())
        run = _janus_worker if args.janus else _group_worker if args.group_size else _worker
        asyncio.run(run(args, video, audio))
        return
    if args.transcode_calls is None:
        args.transcode_calls = min(args.calls, 2)
    if args.workers is None:
        args.workers = max(1, (args.calls + 5) // 6)
    # the services default to production; the clients' media tokens are a test deployment's
    os.environ.setdefault("DMCALL_ENV", "test")
    media = _media(3.0)
    outcomes: list[Outcome] = []
    for index in range(args.rounds if args.janus else 1):
        servers = [_run_forwarding, _run_janus] if args.janus else [_run_forwarding]
        for run_server in servers[:: -1 if index % 2 else 1]:  # alternating which goes first
            for outcome in run_server(args, media):
                if args.rounds > 1:
                    outcome.name += f" [{index + 1}]"
                outcomes.append(outcome)
    if not args.skip_transcode and args.transcode_calls > 0:
        outcomes.append(_run_transcoding(args, media))
    _report(outcomes, args)


if __name__ == "__main__":
    main()
