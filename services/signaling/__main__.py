"""``python -m services.signaling``: run one signaling process."""

from __future__ import annotations

from services.signaling.app import create_app
from services.signaling.settings import SignalingSettings
from shared.service import run


def main() -> None:
    settings = SignalingSettings()
    run(create_app(settings), settings, settings.port)


if __name__ == "__main__":
    main()
