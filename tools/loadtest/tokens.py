"""Where the harness's bearer tokens come from: minted with the deployment's HS256 secret
(development deployments), or read from a file the platform issued (any deployment).

The file is JSON: ``{"platform": "<token with scope platform>", "users": {"<user id>":
"<token>", ...}}``. With a file the simulated users are exactly the file's users.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shared.auth import mint
from shared.ids import is_id


class TokenSourceError(ValueError):
    pass


@dataclass
class TokenSource:
    """Tokens for the platform identity and for each simulated user."""

    secret: str | None = None
    issuer: str | None = None
    audience: str | None = None
    ttl_s: int = 6 * 3600
    fixed: dict[str, str] = field(default_factory=dict)
    platform: str | None = None

    @classmethod
    def from_secret(
        cls, secret: str, *, issuer: str | None = None, audience: str | None = None
    ) -> TokenSource:
        return cls(secret=secret, issuer=issuer, audience=audience)

    @classmethod
    def from_file(cls, path: Path) -> TokenSource:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TokenSourceError(f"cannot read tokens from {path}: {exc}") from exc
        users = data.get("users") if isinstance(data, dict) else None
        platform = data.get("platform") if isinstance(data, dict) else None
        if not isinstance(users, dict) or not isinstance(platform, str):
            raise TokenSourceError(
                f"{path}: expected {{'platform': token, 'users': {{user_id: token}}}}"
            )
        bad = [u for u, t in users.items() if not is_id(u) or not isinstance(t, str)]
        if bad:
            raise TokenSourceError(f"{path}: invalid user ids or tokens: {bad[:5]}")
        return cls(fixed=dict(users), platform=platform)

    @property
    def mints(self) -> bool:
        return self.secret is not None

    def available_users(self) -> list[str] | None:
        """The users a file provides (None when tokens are minted for any user)."""
        return None if self.mints else sorted(self.fixed)

    def user(self, user_id: str) -> str:
        token = self.fixed.get(user_id)
        if token is None:
            token = self._mint(user_id, None)
            self.fixed[user_id] = token
        return token

    def platform_token(self) -> str:
        if self.platform is None:
            self.platform = self._mint("loadtest-platform", "platform")
        return self.platform

    def _mint(self, user_id: str, scope: str | None) -> str:
        if self.secret is None:
            raise TokenSourceError(f"no token for {user_id!r} in the token file")
        return mint(
            self.secret,
            user_id,
            ttl_s=self.ttl_s,
            scope=scope,
            issuer=self.issuer,
            audience=self.audience,
        )
