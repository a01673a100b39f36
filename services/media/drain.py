"""SIGTERM on a media node: drain first, stop after.

The server's signal handler does not stop the server on SIGTERM; it asks the app to
drain (:meth:`Drain.request`), and the app lets the server stop once its rooms are empty
or ``MEDIA_DRAIN_S`` passed (:meth:`Drain.finished`). SIGINT, and a SIGTERM that comes
before the app is up, stop the server as usual.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import FrameType

import uvicorn


class Drain:
    """Between the server (its signal handler) and the app's lifespan."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._begin: Callable[[], None] | None = None
        self._finish: Callable[[], None] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, begin: Callable[[], None]) -> None:
        """The app is up: a SIGTERM from now on calls ``begin`` on ``loop``."""
        self._loop, self._begin = loop, begin

    def detach(self) -> None:
        self._loop = self._begin = None

    def request(self, finish: Callable[[], None]) -> bool:
        """From the signal handler: start draining (once); ``finish`` stops the server.
        False when there is no app to drain: the server stops at once."""
        if self._loop is None or self._begin is None:
            return False
        if self._finish is None:
            self._finish = finish
            self._loop.call_soon_threadsafe(self._begin)
        return True

    def finished(self) -> None:
        """The drain is done: let the server stop."""
        if self._finish is not None:
            self._finish()


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose SIGTERM drains the app before it stops."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.should_exit and self.drain.request(self._stop):
            return
        super().handle_exit(sig, frame)

    def _stop(self) -> None:
        self.should_exit = True
