"""``python -m services.media``: run one media process."""

from __future__ import annotations

from services.media.app import create_app
from services.media.settings import MediaSettings
from shared.service import run


def main() -> None:
    settings = MediaSettings()
    run(create_app(settings), settings, settings.port)


if __name__ == "__main__":
    main()
