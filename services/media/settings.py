"""Settings of the media service (env prefix ``MEDIA_``, plus the common ones)."""

from __future__ import annotations

import ipaddress

from pydantic import Field, IPvAnyNetwork, model_validator
from pydantic_settings import SettingsConfigDict

from services.media.sdp import CandidateRules, IPNetwork
from shared.settings import CommonSettings

EVERY_NETWORK: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("0.0.0.0/0"),
    ipaddress.IPv6Network("::/0"),
)


class MediaSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIA_")

    port: int = Field(8004, ge=1, le=65535)
    node_id: str = Field(
        "media-1",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="This node's id: media tokens name it, the registry lists it.",
    )
    public_url: str | None = Field(
        None,
        description="The HTTP base clients reach this node at (registered for signaling); "
        "default http://<DMCALL_HOST>:<MEDIA_PORT>.",
    )
    capacity: int = Field(20, ge=1, le=10_000, description="Rooms (1:1 calls) this node takes.")
    timeout_s: float = Field(
        15.0,
        gt=0,
        description="call_media_failed(media_timeout) when both parties' media does not "
        "flow this long after the room opened (a session still connecting is judged by "
        "ice_timeout_s instead; a connected party that goes silent by rejoin_grace_s).",
    )
    ice_timeout_s: float = Field(
        15.0,
        ge=1.0,
        le=120.0,
        description="call_media_failed(ice_failed) when a session's ICE and DTLS have not "
        "connected this long after its offer came (aioice alone takes tens of "
        "seconds to give up on a check list).",
    )
    heartbeat_s: float = Field(
        0.5,
        gt=0,
        description="Registry heartbeat period (and at once when the load or draining changes).",
    )
    registry_ttl_s: int = Field(
        2, ge=1, description="A node not heard of this long is gone (its calls are moved)."
    )
    stall_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="A connected party whose packets stop this long is reconnecting "
        "(call_media_peer); connected again when they flow.",
    )
    rejoin_grace_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="call_media_failed(media_timeout) only when a party stayed "
        "reconnecting this long (signaling reads the same variable).",
    )
    drain_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="On SIGTERM a node forwards at most this long while its calls move "
        "(until its rooms are empty), then exits.",
    )
    public_ip: str | None = Field(
        None,
        description="Address advertised in ICE candidates instead of the host's own (behind "
        "NAT, on Kubernetes with hostNetwork or a NodePort/LoadBalancer).",
    )
    udp_port_min: int | None = Field(None, ge=1024, le=65535)
    udp_port_max: int | None = Field(None, ge=1024, le=65535)
    ice_addresses: list[str] = Field(
        default_factory=list,
        description="Local addresses to gather ICE host candidates on (JSON list); "
        "default: every interface but loopback.",
    )
    udp_receive_buffer_bytes: int = Field(
        4 * 1024 * 1024,
        ge=65_536,
        description="SO_RCVBUF of each media socket: what arrives while the event loop is "
        "busy elsewhere waits there instead of being dropped (capped by net.core.rmem_max).",
    )
    keyframe_interval_s: float = Field(
        0.5, ge=0, description="At most one keyframe request (PLI) to a publisher this often."
    )
    ice_candidate_networks: list[IPvAnyNetwork] | None = Field(
        None,
        description="Networks besides the public internet whose ICE candidates the SFU "
        'sends connectivity checks to (JSON list of CIDRs, e.g. ["10.0.0.0/8"] when '
        "clients share a private network with the nodes). Candidates on other loopback, "
        "private, link-local or otherwise non-public addresses, and mDNS (.local) names, "
        "are dropped from offers. Unset: none in production; every address in "
        "development and test (everything runs on one host).",
    )
    ice_max_candidates: int = Field(
        32,
        ge=1,
        le=1000,
        description="ICE candidates kept per offer (after the network filter); later ones "
        "are dropped.",
    )
    ended_call_memory_s: float = Field(
        900.0,
        gt=0,
        description="How long a call that ended is refused a new session; also how long "
        "a call this node was granted (a media token presented) is remembered, so that "
        "its end is recorded. Ended calls this node never saw are not recorded.",
    )
    unseen_ended_call_memory_s: float = Field(
        180.0,
        gt=0,
        description="How long the end of a call this node never saw is remembered (a late "
        "session with a still-valid media token is refused 409); keep it above "
        "SIGNALING_MEDIA_TOKEN_TTL_S (120).",
    )

    @model_validator(mode="after")
    def _port_range(self) -> MediaSettings:
        if (self.udp_port_min is None) != (self.udp_port_max is None):
            raise ValueError("set both MEDIA_UDP_PORT_MIN and MEDIA_UDP_PORT_MAX, or neither")
        if self.udp_port_min is not None and self.udp_port_max is not None:
            if self.udp_port_min > self.udp_port_max:
                raise ValueError("MEDIA_UDP_PORT_MIN is above MEDIA_UDP_PORT_MAX")
        return self

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def candidate_rules(self) -> CandidateRules:
        networks = self.ice_candidate_networks
        if networks is None:
            allowed = EVERY_NETWORK if self.is_development else ()
        else:
            allowed = tuple(networks)
        return CandidateRules(networks=allowed, max_candidates=self.ice_max_candidates)

    @property
    def udp_port_range(self) -> tuple[int, int] | None:
        if self.udp_port_min is None or self.udp_port_max is None:
            return None
        return (self.udp_port_min, self.udp_port_max)
