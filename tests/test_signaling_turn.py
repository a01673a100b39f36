"""TURN REST credentials and the ICE servers signaling hands out.

The minting and the settings are pure (no I/O); the API and the accept hand-off are
checked against real signaling processes over HTTP and WebSockets. Every credential is
verified here the way coturn does it, with hmac/hashlib, not with the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from services.signaling.settings import SignalingSettings
from services.signaling.turn import IceServers, mint_turn_credential
from shared.media_registry import MediaRegistry
from shared.settings import CommonSettings
from tests.conftest import auth
from tests.support.signaling import NODE, Device, allow_call, place_and_accept
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

SECRET = "a-turn-secret-shared-with-coturn"
TURN_URLS = ["turn:turn.example.com:3478?transport=udp", "turns:turn.example.com:5349"]
STUN_URLS = ["stun:stun.example.com:3478"]


def coturn_accepts(secret: str, server: dict[str, Any], user: str, *, at: float) -> bool:
    """What coturn's use-auth-secret checks: the HMAC of the username, the expiry, and
    (ours) whose credential it is."""
    expiry, _, who = server["username"].partition(":")
    expected = base64.b64encode(
        hmac.new(secret.encode(), server["username"].encode(), hashlib.sha1).digest()
    ).decode()
    return hmac.compare_digest(expected, server["credential"]) and int(expiry) > at and who == user


def settings_of(**env: Any) -> SignalingSettings:
    return SignalingSettings(environment="test", **env)


# --------------------------------------------------------------------------- minting


def test_credential_is_coturns_rest_scheme() -> None:
    minted = mint_turn_credential(SECRET, "alice", ttl_s=600, now=1_700_000_000.7)
    assert minted.username == "1700000600:alice"
    assert minted.expires_at == 1_700_000_600
    digest = hmac.new(SECRET.encode(), b"1700000600:alice", hashlib.sha1).digest()
    assert minted.credential == base64.b64encode(digest).decode()
    assert len(base64.b64decode(minted.credential)) == 20  # a SHA-1 HMAC


def test_credential_names_the_user_and_expires_after_the_ttl() -> None:
    before = int(time.time())
    minted = mint_turn_credential(SECRET, "bob_2-x", ttl_s=3600)
    after = int(time.time())
    expiry, user = minted.username.split(":")
    assert user == "bob_2-x"
    assert before + 3600 <= int(expiry) == minted.expires_at <= after + 3600


def test_credential_depends_on_secret_user_and_time() -> None:
    base = mint_turn_credential(SECRET, "alice", ttl_s=600, now=1000)
    assert mint_turn_credential(SECRET, "alice", ttl_s=600, now=1000) == base
    assert mint_turn_credential("another-secret", "alice", ttl_s=600, now=1000) != base
    assert mint_turn_credential(SECRET, "bob", ttl_s=600, now=1000).credential != base.credential
    assert mint_turn_credential(SECRET, "alice", ttl_s=601, now=1000).credential != (
        base.credential
    )


def test_a_user_id_with_a_colon_is_refused() -> None:
    with pytest.raises(ValueError, match="':'"):
        mint_turn_credential(SECRET, "mallory:alice", ttl_s=600)


def test_ice_servers_give_turn_urls_credentials_and_stun_urls_none() -> None:
    ice = IceServers(tuple(STUN_URLS + TURN_URLS), SECRET, 900)
    stun, turn = ice.for_user("alice", now=5000)
    assert stun == {"urls": STUN_URLS}
    assert turn["urls"] == TURN_URLS
    assert turn["username"] == "5900:alice"
    assert coturn_accepts(SECRET, turn, "alice", at=5899)
    assert not coturn_accepts(SECRET, turn, "alice", at=5900)
    assert not coturn_accepts("not-the-secret", turn, "alice", at=5000)

    assert IceServers().for_user("alice") == []
    assert IceServers(tuple(STUN_URLS)).for_user("alice") == [{"urls": STUN_URLS}]
    only_turn = IceServers(tuple(TURN_URLS), SECRET).for_user("alice")
    assert [set(s) for s in only_turn] == [{"urls", "username", "credential"}]


# --------------------------------------------------------------------------- settings


def test_settings_default_to_no_ice_servers() -> None:
    settings = settings_of()
    assert settings.turn_urls == [] and settings.turn_secret is None
    assert 60 <= settings.turn_ttl_s <= 86_400
    assert IceServers.from_settings(settings).for_user("alice") == []


def test_settings_read_the_deployments_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURN_URLS", json.dumps(STUN_URLS + TURN_URLS))
    monkeypatch.setenv("TURN_SECRET", SECRET)
    monkeypatch.setenv("TURN_TTL_S", "120")
    settings = SignalingSettings()
    assert settings.turn_urls == STUN_URLS + TURN_URLS
    assert settings.turn_secret is not None
    assert settings.turn_secret.get_secret_value() == SECRET
    assert SECRET not in repr(settings)  # never in a log line
    assert settings.turn_ttl_s == 120


def test_turn_urls_without_the_secret_are_refused() -> None:
    for urls in (TURN_URLS, ["turns:turn.example.com"], [*STUN_URLS, "turn:10.0.0.1:3478"]):
        with pytest.raises(ValidationError, match=r"TURN_SECRET .* is required"):
            settings_of(turn_urls=urls)
        with pytest.raises(ValidationError, match=r"TURN_SECRET .* is required"):
            settings_of(turn_urls=urls, turn_secret="")
    # STUN needs no credentials, so no secret either.
    assert settings_of(turn_urls=STUN_URLS).turn_urls == STUN_URLS


def test_production_refuses_a_short_turn_secret() -> None:
    production = {
        "environment": "production",
        "auth_jwt_secret": "x" * 40,
        "media_token_secret": "y" * 40,
        "turn_urls": TURN_URLS,
    }
    with pytest.raises(ValidationError, match="TURN_SECRET must be at least 16"):
        SignalingSettings(**production, turn_secret="short")
    assert SignalingSettings(**production, turn_secret=SECRET).turn_urls == TURN_URLS


@pytest.mark.parametrize(
    "url",
    [
        "turn://turn.example.com:3478",  # not a URI form browsers take
        "http://turn.example.com",
        "turn:",
        "turn:turn.example.com:3478?transport=sctp",
        "stun:stun.example.com?transport=udp",  # STUN URIs have no transport
        "turn:turn.example.com:70000",
        "turn:user@turn.example.com",
        "turn:turn example.com",
    ],
)
def test_bad_ice_urls_are_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="TURN_URLS"):
        settings_of(turn_urls=[url], turn_secret=SECRET)


def test_good_ice_urls_are_taken() -> None:
    urls = [
        "stun:stun.l.google.com:19302",
        "turn:192.0.2.10",
        "turn:[2001:db8::1]:3478?transport=tcp",
        "turns:turn.example.com:443?transport=tcp",
    ]
    assert settings_of(turn_urls=urls, turn_secret=SECRET).turn_urls == urls


@pytest.mark.parametrize("ttl", [0, 59, 86_401])
def test_turn_ttl_is_bounded(ttl: int) -> None:
    with pytest.raises(ValidationError, match=r"turn_ttl_s|TURN_TTL_S"):
        settings_of(turn_ttl_s=ttl)


# --------------------------------------------------------------------------- over HTTP


async def test_ice_servers_endpoint_mints_credentials_for_the_token_user(
    spawn: Callable[..., ServiceProcess], token: Callable[..., str]
) -> None:
    signaling = spawn(
        "signaling",
        TURN_URLS=json.dumps(STUN_URLS + TURN_URLS),
        TURN_SECRET=SECRET,
        TURN_TTL_S="600",
    )
    async with httpx.AsyncClient(base_url=signaling.url, timeout=15) as http:
        before = time.time()
        response = await http.get("/v1/ice-servers", headers=auth(token("alice")))
        after = time.time()
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert body["ttl_s"] == 600
        stun, turn = body["ice_servers"]
        assert stun == {"urls": STUN_URLS}
        assert turn["urls"] == TURN_URLS
        assert coturn_accepts(SECRET, turn, "alice", at=after)
        expiry = int(turn["username"].split(":")[0])
        assert int(before) + 600 <= expiry <= int(after) + 600

        bob = (await http.get("/v1/ice-servers", headers=auth(token("bob")))).json()
        assert coturn_accepts(SECRET, bob["ice_servers"][1], "bob", at=after)

        # No token, or a bad one: 401 with the usual JSON error; nothing minted.
        for headers in ({}, {"Authorization": "Bearer not-a-token"}):
            refused = await http.get("/v1/ice-servers", headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"] == "unauthorized"
            assert "credential" not in refused.text


async def test_ice_servers_endpoint_is_empty_when_not_configured(
    spawn: Callable[..., ServiceProcess], token: Callable[..., str]
) -> None:
    signaling = spawn("signaling")
    async with httpx.AsyncClient(base_url=signaling.url, timeout=15) as http:
        response = await http.get("/v1/ice-servers", headers=auth(token("alice")))
        assert response.status_code == 200, response.text
        assert response.json()["ice_servers"] == []
        assert (await http.get("/v1/ice-servers")).status_code == 401
        assert "/v1/ice-servers" in (await http.get("/openapi.json")).json()["paths"]


def test_signaling_refuses_to_start_with_turn_urls_but_no_secret(
    spawn: Callable[..., ServiceProcess],
) -> None:
    signaling = spawn("signaling", wait=False, TURN_URLS=json.dumps(TURN_URLS))
    with pytest.raises(RuntimeError, match="exited"):
        signaling.wait_ready()
    assert signaling.log_path is not None
    log = signaling.log_path.read_text()
    assert "TURN_SECRET (coturn's static-auth-secret) is required" in log


async def test_accept_hands_each_party_its_own_ice_servers(
    spawn: Callable[..., ServiceProcess],
    token: Callable[..., str],
    settings: CommonSettings,
    redis_client: Redis,
) -> None:
    policy = spawn("policy")
    signaling = spawn(
        "signaling", TURN_URLS=json.dumps(TURN_URLS), TURN_SECRET=SECRET, TURN_TTL_S="900"
    )
    await MediaRegistry(redis_client, settings).heartbeat(NODE, ttl_s=600)
    async with httpx.AsyncClient(base_url=policy.url, timeout=15) as policy_http:
        await allow_call(policy_http, token("platform-svc", scope="platform"), "alice", "bob")

    alice = await Device.connect(signaling.url, token("alice"), "alice", "a1")
    bob = await Device.connect(signaling.url, token("bob"), "bob", "b1")
    try:
        async with httpx.AsyncClient(base_url=signaling.url, timeout=15) as http:
            call_id, accepted = await place_and_accept(http, token, alice, bob)
            now = time.time()
            (to_bob,) = accepted.json()["ice_servers"]
            assert to_bob["urls"] == TURN_URLS
            assert coturn_accepts(SECRET, to_bob, "bob", at=now)

            pushed = await alice.expect(type="call.state", call_id=call_id, state="accepted")
            (to_alice,) = pushed["ice_servers"]
            assert coturn_accepts(SECRET, to_alice, "alice", at=now)
            assert pushed["media_token"]

            # A fresh media token comes with fresh ICE servers too.
            again = await http.post(f"/v1/calls/{call_id}/media", headers=auth(token("alice")))
            assert again.status_code == 200
            assert coturn_accepts(SECRET, again.json()["ice_servers"][0], "alice", at=now)
    finally:
        await alice.close()
        await bob.close()
