"""SDP text: checking a party's offer before aiortc sees it, and announcing the node's
public address in an answer.

:func:`check_offer` is the one place an offer is checked. It refuses what aiortc would
accept and then fail on (no DTLS fingerprint it can verify, no DTLS role, no ICE
credentials), and it drops the ICE candidates the SFU must not send connectivity checks
to: an offer names any address it likes, and every candidate kept is a target of STUN
requests from the node.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CANDIDATE = re.compile(
    r"^(a=candidate:\S+ \d+ \S+ \d+ )(\S+)( \d+ typ host)(.*)$", re.MULTILINE | re.IGNORECASE
)
_CONNECTION = re.compile(r"^c=IN IP4 [^\s]+(\r?)$", re.MULTILINE)

# What aiortc can verify a peer's certificate with (aiortc.rtcdtlstransport).
FINGERPRINT_ALGORITHMS = frozenset({"sha-256", "sha-384", "sha-512"})
DTLS_SETUP_VALUES = frozenset({"actpass", "active", "passive"})


class BadOffer(ValueError):
    """The offer cannot be answered; the message says why (it goes to the client)."""


@dataclass(frozen=True, slots=True)
class CandidateRules:
    """Which of an offer's ICE candidates the SFU sends connectivity checks to."""

    networks: tuple[IPNetwork, ...]
    """Networks allowed besides the public internet (loopback, private, link-local...)."""
    max_candidates: int
    """Candidates kept per offer, in the offer's order; later ones are dropped."""

    def allows(self, address: str) -> bool:
        """A public unicast address, or one inside :attr:`networks`.

        Not an IP address (an mDNS ``.local`` name or any other host name): never, as
        resolving it would send queries from the node (mDNS onto its own network).
        """
        try:
            ip: IPAddress = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
        if ip.is_multicast or ip.is_unspecified:
            return False
        if any(ip.version == net.version and ip in net for net in self.networks):
            return True
        return ip.is_global


@dataclass(frozen=True, slots=True)
class CheckedOffer:
    sdp: str
    """The offer with the dropped candidates removed."""
    dropped: int
    """Candidates removed: outside the allowed networks, or past the cap."""


def looks_like_sdp(text: str) -> bool:
    return text.lstrip().startswith("v=0") and "\nm=" in text


def check_offer(sdp: str, rules: CandidateRules) -> CheckedOffer:
    """The offer to give aiortc, or :class:`BadOffer` saying what is missing."""
    if not looks_like_sdp(sdp):
        raise BadOffer("the body is not an SDP offer")
    lines = sdp.splitlines(keepends=True)
    sections = _sections(lines)
    session, media = sections[0], sections[1:]
    for index, section in enumerate(media):
        _check_section(index, session, section)
    return _filter_candidates(lines, rules)


def _sections(lines: Sequence[str]) -> list[list[str]]:
    """The session part, then one list of lines per ``m=`` section (line ends stripped)."""
    sections: list[list[str]] = [[]]
    for line in lines:
        text = line.rstrip("\r\n")
        if text.startswith("m="):
            sections.append([])
        sections[-1].append(text)
    return sections


def _attribute(lines: Sequence[str], name: str) -> list[str]:
    prefix = f"a={name}:"
    return [line[len(prefix) :].strip() for line in lines if line.startswith(prefix)]


def _check_section(index: int, session: Sequence[str], section: Sequence[str]) -> None:
    """What aiortc needs of every media section (a session-level value counts for each)."""
    kind = section[0][2:].split(" ", 1)[0]
    where = f"media section {index} ({kind})"
    both = [*session, *section[1:]]
    for name in ("ice-ufrag", "ice-pwd"):
        if not any(_attribute(both, name)):
            raise BadOffer(f"{where} has no a={name}: the SFU cannot answer its ICE checks")
    fingerprints = _attribute(both, "fingerprint")
    if not fingerprints:
        raise BadOffer(f"{where} has no a=fingerprint: DTLS cannot be verified")
    for value in fingerprints:
        if len(value.split()) != 2:
            raise BadOffer(f"{where}: malformed a=fingerprint {value!r}")
    if not any(v.split()[0].lower() in FINGERPRINT_ALGORITHMS for v in fingerprints):
        raise BadOffer(
            f"{where} has no a=fingerprint the SFU can verify (it takes "
            f"{', '.join(sorted(FINGERPRINT_ALGORITHMS))})"
        )
    setup = _attribute(section[1:], "setup") or _attribute(session, "setup")
    if not setup or setup[0] not in DTLS_SETUP_VALUES:
        raise BadOffer(f"{where} has no a=setup of {', '.join(sorted(DTLS_SETUP_VALUES))}")


def _filter_candidates(lines: Sequence[str], rules: CandidateRules) -> CheckedOffer:
    kept: list[str] = []
    taken = dropped = 0
    for line in lines:
        if line.startswith("a=candidate:"):
            fields = line.split()
            if len(fields) < 8 or fields[6] != "typ":
                raise BadOffer(f"malformed ICE candidate {line.strip()[:120]!r}")
            if not rules.allows(fields[4]) or taken >= rules.max_candidates:
                dropped += 1
                continue
            taken += 1
        kept.append(line)
    if dropped:
        # With end-of-candidates, aioice fails at once when no pair is left. Without it,
        # the party's own checks still reach the node and make peer-reflexive candidates.
        kept = [line for line in kept if not line.startswith("a=end-of-candidates")]
    return CheckedOffer("".join(kept), dropped)


def announce_public_ip(sdp: str, public_ip: str | None) -> str:
    """Host candidates (and the c= line) carry ``public_ip`` instead of the local address.

    The node listens on its local address; a 1:1 NAT or a Kubernetes NodePort maps the
    public one to it, with the same port, as Janus's ``nat_1_1_mapping`` does.
    """
    if not public_ip:
        return sdp
    sdp = _CANDIDATE.sub(lambda m: f"{m.group(1)}{public_ip}{m.group(3)}{m.group(4)}", sdp)
    return _CONNECTION.sub(lambda m: f"c=IN IP4 {public_ip}{m.group(1)}", sdp)
