"""``make token USER=alice [SCOPE=platform]``: print a development token."""

from __future__ import annotations

import argparse

from shared.auth import issue_token
from shared.settings import CommonSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("user")
    parser.add_argument("--scope", default=None)
    parser.add_argument("--ttl", type=int, default=86_400, help="seconds")
    args = parser.parse_args()
    settings = CommonSettings()
    if not settings.is_development:
        raise SystemExit("development tokens are not issued in production")
    print(issue_token(settings, args.user, scope=args.scope or None, ttl_s=args.ttl))


if __name__ == "__main__":
    main()
