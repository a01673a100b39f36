"""The address guard: where a push may go, so a push target cannot reach inside the network
(server-side request forgery). The API checks a target when it is registered, the push
worker again before every attempt.

A webhook URL must be http(s) (a Web Push endpoint https) and every address its
host resolves to must be public (not private, loopback, link-local, multicast or reserved;
an IPv6 form that wraps an IPv4 address, such as NAT64 or 6to4, is judged by that address)
unless ``NOTIFICATIONS_WEBHOOK_ALLOW_PRIVATE`` is set (which also admits http Web Push
endpoints, for a local test receiver). DNS may change between two checks, so the request
goes to the address that was checked (:func:`pinned`: the URL's host stays in ``Host`` and
TLS SNI), and DNS rebinding cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

from services.notifications.store import DeviceKind

MAX_URL_LENGTH = 2048


class UrlRefused(ValueError):
    """A webhook URL that may not be used; ``reason`` is a stable code for clients."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
"""The NAT64 well-known prefix (RFC 6052): DNS64 answers it for IPv4-only hosts."""
_SIXTOFOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses an IPv6 address stands for, where its form routes to them
    (IPv4-mapped, NAT64, 6to4, Teredo's server and client); None for any other address."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _NAT64:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return None


def is_public_address(address: str) -> bool:
    """Whether a push may go to ``address``: a global unicast address, judged by the IPv4
    address inside it when it is an IPv6 form that wraps one (docs/notifications.md)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        wrapped = embedded_ipv4(ip)
        if wrapped is not None:
            return all(_is_public_ipv4(v4) for v4 in wrapped)
        # Everything else outside 2000::/3 is refused, among it the forms that wrap an IPv4
        # address but reach no one outside a host or a site: IPv4-compatible ::a.b.c.d
        # (deprecated), SIIT ::ffff:0:a.b.c.d and NAT64's local-use 64:ff9b:1::/48.
        return ip in _GLOBAL_UNICAST_V6 and ip.is_global and not ip.is_multicast
    return _is_public_ipv4(ip)


def _is_public_ipv4(ip: ipaddress.IPv4Address) -> bool:
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


def check_push_endpoint(url: str, *, allow_insecure: bool) -> None:
    """A Web Push endpoint is https (plain http only where private addresses are allowed)."""
    if not allow_insecure and urlsplit(url).scheme != "https":
        raise UrlRefused(
            "insecure_endpoint",
            "a Web Push endpoint must be https:// (see NOTIFICATIONS_WEBHOOK_ALLOW_PRIVATE)",
        )


def check_url_shape(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an acceptable URL, or UrlRefused."""
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused("invalid_url", f"url is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused("invalid_url", f"url is not valid: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("invalid_url", "url must be http:// or https://")
    if not parts.hostname:
        raise UrlRefused("invalid_url", "url has no host")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("invalid_url", "url must not carry credentials")
    if parts.fragment:
        raise UrlRefused("invalid_url", "url must not have a fragment")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def resolve_allowed(url: str, *, allow_private: bool, kind: DeviceKind) -> str:
    """The address to send to: the URL's host resolved, every address checked."""
    _scheme, host, port = check_url_shape(url)
    if kind is DeviceKind.WEBPUSH:
        check_push_endpoint(url, allow_insecure=allow_private)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (OSError, UnicodeError) as exc:
        raise UrlRefused("unresolvable_host", f"host {host!r} does not resolve") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise UrlRefused("unresolvable_host", f"host {host!r} does not resolve")
    if not allow_private:
        for address in addresses:
            if not is_public_address(address):
                raise UrlRefused(
                    "private_address",
                    f"host {host!r} resolves to a private or loopback address; push "
                    "targets must be public (see NOTIFICATIONS_WEBHOOK_ALLOW_PRIVATE)",
                )
    return addresses[0]


def pinned(url: str, address: str) -> tuple[str, str, str]:
    """(url with the host replaced by ``address``, Host header, TLS server name)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = f"[{address}]" if ":" in address else address
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    host_header = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=netloc)), host_header, host
