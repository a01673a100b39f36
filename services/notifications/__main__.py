"""``python -m services.notifications``: run one notifications process."""

from __future__ import annotations

from types import FrameType

import uvicorn
from fastapi import FastAPI

from services.notifications.app import create_app
from services.notifications.live import LiveHub
from services.notifications.settings import NotificationsSettings
from shared.service import server_config


class _Server(uvicorn.Server):
    """On SIGTERM/SIGINT, ends the open SSE streams first: uvicorn's graceful shutdown waits
    for responses to finish, and a live stream never does. Clients reconnect (to another
    instance) with Last-Event-ID and lose nothing."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        hub = getattr(self._app.state, "live_hub", None)
        if isinstance(hub, LiveHub):
            hub.close_threadsafe()
        super().handle_exit(sig, frame)


def main() -> None:
    settings = NotificationsSettings()
    app = create_app(settings)
    _Server(server_config(app, settings, settings.port), app).run()


if __name__ == "__main__":
    main()
