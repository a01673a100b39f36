"""``python -m services.policy``: run one policy process."""

from __future__ import annotations

from services.policy.app import create_app
from services.policy.settings import PolicySettings
from shared.service import run


def main() -> None:
    settings = PolicySettings()
    run(create_app(settings), settings, settings.port)


if __name__ == "__main__":
    main()
