"""``python -m services.media``: run one media process (SIGTERM drains it, see drain.py)."""

from __future__ import annotations

from services.media.app import create_app
from services.media.drain import Drain, DrainingServer
from services.media.settings import MediaSettings
from shared.service import server_config


def main() -> None:
    settings = MediaSettings()
    app = create_app(settings)
    drain = app.state.drain
    assert isinstance(drain, Drain)
    DrainingServer(server_config(app, settings, settings.port), drain).run()


if __name__ == "__main__":
    main()
