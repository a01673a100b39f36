"""Event handlers: policy's verdict and the media service's reports move calls.

``call_media_peer`` (from the call's node only) tells the other party ``call.peer``;
``media_node_draining`` moves each of that node's calls to another node.

One instance of the service handles each event (``Scope.SERVICE``). Each handler is
idempotent through the transition table: a duplicated or out-of-order event asks for a
step the table refuses, and is dropped (see ``CallService._consume``). The bus's done mark
goes in the step's own commit (``marks_done``): no claim and no mark of their own per event.
"""

from __future__ import annotations

from services.signaling.calls import CallService
from shared.bus import Bus, Scope
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
            CallAuthorized: service.authorized,
            CallRejected: service.rejected,
            CallMediaConnected: service.media_connected,
            CallMediaFailed: service.media_failed,
            CallMediaPeer: service.media_peer,
            MediaNodeDraining: service.node_draining,
        },
        scope=Scope.SERVICE,
        marks_done=True,
    )
