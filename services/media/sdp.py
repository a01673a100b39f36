"""SDP text helpers: announcing the node's public address in an answer."""

from __future__ import annotations

import re

_CANDIDATE = re.compile(
    r"^(a=candidate:\S+ \d+ \S+ \d+ )(\S+)( \d+ typ host)(.*)$", re.MULTILINE | re.IGNORECASE
)
_CONNECTION = re.compile(r"^c=IN IP4 [^\s]+(\r?)$", re.MULTILINE)


def announce_public_ip(sdp: str, public_ip: str | None) -> str:
    """Host candidates (and the c= line) carry ``public_ip`` instead of the local address.

    The node listens on its local address; a 1:1 NAT or a Kubernetes NodePort maps the
    public one to it, with the same port, as Janus's ``nat_1_1_mapping`` does.
    """
    if not public_ip:
        return sdp
    sdp = _CANDIDATE.sub(lambda m: f"{m.group(1)}{public_ip}{m.group(3)}{m.group(4)}", sdp)
    return _CONNECTION.sub(lambda m: f"c=IN IP4 {public_ip}{m.group(1)}", sdp)


def looks_like_sdp(text: str) -> bool:
    return text.lstrip().startswith("v=0") and "\nm=" in text
