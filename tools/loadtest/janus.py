"""Janus (Debian's ``janus``, its videoroom plugin) as the SFU ``bench_media --janus``
measures beside dmcall's: a private server, and the benchmark's own clients joining it.

The server is a process of its own (:func:`start`): a config folder under a temporary
one, plugin and transport folders holding only ``libjanus_videoroom.so`` and
``libjanus_http.so``, the REST API on a free port of 127.0.0.1, no STUN/TURN (host
candidates only), no session timeout, a DTLS certificate Janus makes itself.

A party is what a browser running Janus's own videoroom demo is: one Janus session
(``POST /janus``, events by long poll), a publisher handle (its offer: the same
pre-encoded VP8 + Opus :class:`tools.media_client.MediaClient` the SFU's bench sends)
and a subscriber handle (Janus offers the feeds it subscribes to, the client answers).
A 1:1 call is a room of 2 publishers each subscribing to the other; a group of n, a room
of n publishers each subscribing to the n - 1 others (one subscriber handle, multistream).
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tools.media_client import EncodedMedia, MediaClient
from tools.stack import free_port

JANUS = Path("/usr/bin/janus")


def _libraries() -> Path:
    """Where the package put its plugins and transports (``/usr/lib/<arch>/janus``)."""
    found = sorted(Path("/usr/lib").glob("*/janus/plugins/libjanus_videoroom.so"))
    if not JANUS.exists() or not found:
        raise SystemExit("Janus is not installed: make bench-janus (tools/machine.sh --janus)")
    return found[0].parent.parent


def _config(folder: Path, port: int) -> None:
    lib = _libraries()
    for kind, name in (("plugins", "videoroom"), ("transports", "http")):
        (folder / kind).mkdir()
        (folder / kind / f"libjanus_{name}.so").symlink_to(lib / kind / f"libjanus_{name}.so")
    for kind in ("events", "loggers"):
        (folder / kind).mkdir()
    (folder / "janus.jcfg").write_text(
        "general: {\n"
        f'  configs_folder = "{folder}"\n'
        f'  plugins_folder = "{folder}/plugins"\n'
        f'  transports_folder = "{folder}/transports"\n'
        f'  events_folder = "{folder}/events"\n'
        f'  loggers_folder = "{folder}/loggers"\n'
        "  debug_level = 4\n"
        "  session_timeout = 0\n"
        "}\n"
        "certificates: {}\n"
        "media: {}\n"
        'nat: { ice_ignore_list = "vmnet"  ignore_mdns = true }\n'
        "plugins: {}\ntransports: {}\nevents: {}\nloggers: {}\n"
    )
    (folder / "janus.transport.http.jcfg").write_text(
        'general: { json = "plain"  base_path = "/janus"  http = true\n'
        f'  port = {port}  ip = "127.0.0.1"  https = false }}\n'
        "admin: { admin_http = false  admin_https = false }\n"
        "cors: {}\n"
    )
    # string ids: a room is named by the call id, a publisher by the user
    (folder / "janus.plugin.videoroom.jcfg").write_text("general: { string_ids = true }\n")


@contextmanager
def start(log_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private Janus: its REST API's URL and its process (the one measured)."""
    with tempfile.TemporaryDirectory(prefix="janus-") as tmp, open(log_path, "wb") as log:
        port = free_port()
        _config(Path(tmp), port)
        proc = subprocess.Popen(
            [str(JANUS), "--configs-folder", tmp, "--disable-colors"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield f"http://127.0.0.1:{port}/janus", proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class JanusError(RuntimeError):
    pass


class Session:
    """One Janus session over HTTP: requests, and the events of its long poll."""

    def __init__(self, http: httpx.AsyncClient, url: str) -> None:
        self._http = http
        self._url = url
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._poll: asyncio.Task[None] | None = None
        self.id = 0

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._http.post(self._url + path, json=body)
        reply: dict[str, Any] = response.json()
        if reply.get("janus") == "error":
            raise JanusError(reply["error"])
        return reply

    async def open(self) -> None:
        reply = await self._post("", {"janus": "create", "transaction": uuid.uuid4().hex})
        self.id = reply["data"]["id"]
        self._poll = asyncio.get_running_loop().create_task(self._long_poll())

    async def _long_poll(self) -> None:
        while True:
            response = await self._http.get(f"{self._url}/{self.id}", params={"maxev": 10})
            events = response.json()
            for event in events if isinstance(events, list) else [events]:
                future = self._pending.pop(event.get("transaction", ""), None)
                if future is not None and not future.done():
                    future.set_result(event)

    async def attach(self) -> int:
        body = {"janus": "attach", "plugin": "janus.plugin.videoroom"}
        reply = await self._post(f"/{self.id}", {**body, "transaction": uuid.uuid4().hex})
        handle: int = reply["data"]["id"]
        return handle

    async def request(
        self, handle: int, body: dict[str, Any], jsep: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A videoroom request: its answer (a synchronous one, or the event that answers
        it); a plugin error raises :class:`JanusError`."""
        transaction = uuid.uuid4().hex
        future = self._pending[transaction] = asyncio.get_running_loop().create_future()
        message: dict[str, Any] = {"janus": "message", "transaction": transaction, "body": body}
        if jsep is not None:
            message["jsep"] = jsep
        reply = await self._post(f"/{self.id}/{handle}", message)
        if reply["janus"] == "ack":
            reply = await asyncio.wait_for(future, 60)
        self._pending.pop(transaction, None)
        data = reply["plugindata"]["data"]
        if "error" in data:
            raise JanusError(f"{data.get('error_code')}: {data['error']}")
        return reply

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.gather(self._poll, return_exceptions=True)
        await self._post(f"/{self.id}", {"janus": "destroy", "transaction": uuid.uuid4().hex})


ROOM_EXISTS = 427


class Party:
    """One participant: a session, its publisher (sending) and subscriber (receiving)."""

    def __init__(self, session: Session, room: str, user: str) -> None:
        self.session = session
        self.room = room
        self.user = user
        self.publisher: MediaClient | None = None
        self.subscriber: MediaClient | None = None
        self.feed_of_mid: dict[str, str] = {}
        """The subscriber's mid -> the user (feed) it carries."""

    async def publish(self, size: int, video: EncodedMedia, audio: EncodedMedia) -> None:
        """Create the room (unless there) and publish into it."""
        handle = await self.session.attach()
        create = {"request": "create", "room": self.room, "publishers": size}
        try:
            await self.session.request(
                handle, {**create, "audiocodec": "opus", "videocodec": "vp8"}
            )
        except JanusError as error:
            if not str(error).startswith(f"{ROOM_EXISTS}:"):
                raise
        join = {"request": "join", "ptype": "publisher", "room": self.room}
        await self.session.request(handle, {**join, "id": self.user, "display": self.user})
        self.publisher = MediaClient(video, audio, record=False, light=True)

        async def exchange(offer: str) -> str:
            jsep = {"type": "offer", "sdp": offer, "trickle": False}
            event = await self.session.request(handle, {"request": "publish"}, jsep)
            answer: str = event["jsep"]["sdp"]
            return answer

        await self.publisher.negotiate(exchange)

    async def subscribe(self, feeds: list[str]) -> None:
        """Receive ``feeds`` (each once published: retried until then, two minutes)."""
        handle = await self.session.attach()
        join = {"request": "join", "ptype": "subscriber", "room": self.room}
        streams = [{"feed": feed} for feed in feeds]
        for attempt in range(600):
            try:
                event = await self.session.request(handle, {**join, "streams": streams})
                break
            except JanusError:
                if attempt == 599:
                    raise
                await asyncio.sleep(0.2)
        self.feed_of_mid = {
            s["mid"]: s["feed_id"] for s in event["plugindata"]["data"]["streams"] if "feed_id" in s
        }
        self.subscriber = MediaClient(
            None, None, record=False, light=True, slots=len(feeds), room_channel=False
        )
        answer = await self.subscriber.answer(event["jsep"]["sdp"])
        await self.session.request(handle, {"request": "start"}, {"type": "answer", "sdp": answer})

    def receiving(self) -> bool:
        """Media arrives from every feed subscribed to."""
        assert self.subscriber is not None
        flowing = {self.feed_of_mid.get(m) for m, f in self.subscriber.by_mid.items() if f.packets}
        return flowing >= set(self.feed_of_mid.values())

    def clients(self) -> list[MediaClient]:
        return [c for c in (self.publisher, self.subscriber) if c is not None]


async def join(http: httpx.AsyncClient, url: str, room: str, user: str) -> Party:
    session = Session(http, url)
    await session.open()
    return Party(session, room, user)
