"""What the media tests share: the URL and grant a client joins a room with, the end of a
call, the media a client sends, and fixtures (a module makes one of its own with ``name = pytest.fixture(media.name)``)
for the clients, tasks and peer connections a test opens, closed after it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiortc import RTCPeerConnection

from services.media.settings import MediaSettings
from shared.auth import MediaGrant, issue_media_token
from shared.contracts import CallEnded, EndReason
from tools.media_client import EncodedMedia, MediaClient, encode_opus, encode_vp8
from tools.stack import ServiceProcess


def encoded_video() -> EncodedMedia:
    """160x120 VP8 at 150 kbps, two seconds (a client loops it): it costs little CPU."""
    return encode_vp8(160, 120, seconds=2.0, bitrate=150_000)


def encoded_audio() -> EncodedMedia:
    """A second of Opus (a client loops it)."""
    return encode_opus(1.0)


def sessions_url(proc: ServiceProcess, call_id: str) -> str:
    return f"{proc.url}/v1/rooms/{call_id}/sessions"


def media_token(
    settings: MediaSettings, call_id: str, user: str, node_id: str | None = None, **kwargs: Any
) -> str:
    """``user``'s grant for ``call_id`` on ``node_id`` (default: the settings' node, the
    module's ``NODE``); ``kwargs`` go to ``issue_media_token`` (``ttl_s``)."""
    grant = MediaGrant(call_id, user, node_id or settings.node_id)
    return issue_media_token(settings, grant, **kwargs)


def call_ended(call_id: str) -> CallEnded:
    """Alice hung up on Bob: every node closes the call's room, and refuses it after."""
    return CallEnded(
        call_id=call_id, caller="alice", callee="bob", reason=EndReason.USER_HANGUP, duration_s=1.0
    )


async def clients() -> AsyncIterator[Callable[..., MediaClient]]:
    """``clients(video, audio, **options)``: a ``MediaClient``, closed after the test."""
    opened: list[MediaClient] = []

    def open_client(*media: Any, **options: Any) -> MediaClient:
        opened.append(MediaClient(*media, **options))
        return opened[-1]

    yield open_client
    await asyncio.gather(*(client.close() for client in opened))


async def tasks() -> AsyncIterator[list[asyncio.Future[Any]]]:
    """The tasks a room under test starts, cancelled after the test."""
    started: list[asyncio.Future[Any]] = []
    yield started
    for task in started:
        task.cancel()
    await asyncio.gather(*started, return_exceptions=True)


async def peers() -> AsyncIterator[list[RTCPeerConnection]]:
    """The peer connections a test makes, closed after it."""
    made: list[RTCPeerConnection] = []
    yield made
    await asyncio.gather(*(pc.close() for pc in made))
