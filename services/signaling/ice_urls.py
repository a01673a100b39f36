"""ICE server URLs as ``RTCIceServer.urls`` takes them (RFC 7064 ``stun:``, RFC 7065
``turn:``/``turns:``): the check the settings run on ``TURN_URLS``, and which URLs need TURN
credentials (turn.py mints them). A leaf: it imports nothing of the service.
"""

from __future__ import annotations

import re

# Scheme, host (name, IPv4 or [IPv6]), optional port; TURN ones optionally
# ?transport=udp|tcp.
ICE_URL = re.compile(
    r"^(?P<scheme>stun|turns?):"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
    r"(?P<query>\?transport=(?:udp|tcp))?$"
)


def needs_credentials(url: str) -> bool:
    """A ``turn:``/``turns:`` URL: the browser needs a username and credential for it."""
    return url.startswith(("turn:", "turns:"))


def check_ice_url(raw: str) -> str:
    """``raw`` stripped, if it is a ``stun:``, ``turn:`` or ``turns:`` URL; ValueError naming
    it otherwise."""
    url = raw.strip()
    match = ICE_URL.fullmatch(url)
    if match is None:
        raise ValueError(
            f"TURN_URLS: {raw!r} is not a stun:, turn: or turns: URL "
            "(host[:port], turn ones with an optional ?transport=udp|tcp)"
        )
    if match["scheme"] == "stun" and match["query"]:
        raise ValueError(f"TURN_URLS: {raw!r}: a stun: URL takes no ?transport")
    if match["port"] is not None and not 0 < int(match["port"]) < 65536:
        raise ValueError(f"TURN_URLS: {raw!r}: port out of range")
    return url
