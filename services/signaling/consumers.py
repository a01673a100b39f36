"""Event handlers: policy's verdict and the media service's reports move calls.

``call_media_peer`` (from the call's node only) tells the other party ``call.peer``;
``media_node_draining`` moves each of that node's calls to another node.

One instance of the service handles each event (``Scope.SERVICE``). Each handler is
idempotent through the transition table: a duplicated or out-of-order event asks for a
step the table refuses, and is dropped (see ``CallService._consume``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from services.signaling.calls import CallService
from shared.bus import Bus, Delivery, Handler, Scope
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
    bus.subscribe(
        CONSUMER,
        {
            CallAuthorized: _step(service.authorized),
            CallRejected: _step(service.rejected),
            CallMediaConnected: _step(service.media_connected),
            CallMediaFailed: _step(service.media_failed),
            CallMediaPeer: _step(service.media_peer),
            MediaNodeDraining: _step(service.node_draining),
        },
        scope=Scope.SERVICE,
    )


def _step(step: Callable[[Any], Awaitable[None]]) -> Handler:
    """A handler that hands the event to one of the service's steps (the delivery is not
    needed: the step's commit is idempotent through the transition table)."""

    async def handle(event: Any, delivery: Delivery) -> None:
        await step(event)

    return handle
