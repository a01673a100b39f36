"""Event handlers: policy's verdict and the media service's reports move calls.

``call_media_peer`` (from the call's node only) tells the other party ``call.peer``;
``media_node_draining`` moves each of that node's calls to another node.

One instance of the service handles each event (``Scope.SERVICE``). Each handler is
idempotent through the transition table: a duplicated or out-of-order event asks for a
step the table refuses, and is dropped (see ``CallService._consume``).
"""

from __future__ import annotations

from services.signaling.calls import CallService
from shared.bus import Bus, Delivery, Scope
from shared.contracts import (
    CallAuthorized,
    CallMediaConnected,
    CallMediaFailed,
    CallMediaPeer,
    CallRejected,
    MediaNodeDraining,
)

CONSUMER = "calls"


def register(bus: Bus, service: CallService) -> None:
    async def on_authorized(event: CallAuthorized, delivery: Delivery) -> None:
        await service.authorized(event)

    async def on_rejected(event: CallRejected, delivery: Delivery) -> None:
        await service.rejected(event)

    async def on_media_connected(event: CallMediaConnected, delivery: Delivery) -> None:
        await service.media_connected(event)

    async def on_media_failed(event: CallMediaFailed, delivery: Delivery) -> None:
        await service.media_failed(event)

    async def on_media_peer(event: CallMediaPeer, delivery: Delivery) -> None:
        await service.media_peer(event)

    async def on_node_draining(event: MediaNodeDraining, delivery: Delivery) -> None:
        await service.node_draining(event)

    bus.subscribe(
        CONSUMER,
        {
            CallAuthorized: on_authorized,
            CallRejected: on_rejected,
            CallMediaConnected: on_media_connected,
            CallMediaFailed: on_media_failed,
            CallMediaPeer: on_media_peer,
            MediaNodeDraining: on_node_draining,
        },
        scope=Scope.SERVICE,
    )
