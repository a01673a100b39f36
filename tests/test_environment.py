"""Issue 12, item 2: the environment fails closed.

A deployment that forgets ``DMCALL_ENV`` is production: no development tokens, and a
process holding a development secret refuses to start.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from shared.settings import DEV_JWT_SECRET, CommonSettings, Environment
from tools.stack import ServiceProcess, free_port

pytestmark = pytest.mark.e2e

SERVICES = ("signaling", "policy", "notifications", "media")


@pytest.fixture
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a deployment whose manifests forgot DMCALL_ENV (the tests set it for themselves)."""
    monkeypatch.delenv("DMCALL_ENV", raising=False)
    for name in ("AUTH_JWT_SECRET", "MEDIA_TOKEN_SECRET", "AUTH_JWT_PUBLIC_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_unset_environment_is_production_and_refuses_the_development_secrets(
    no_environment: None,
) -> None:
    with pytest.raises(ValidationError, match="AUTH_JWT_SECRET is the development default"):
        CommonSettings()
    settings = CommonSettings(auth_jwt_secret=secrets.token_hex(32), media_token_secret="x" * 40)
    assert settings.environment is Environment.PRODUCTION
    assert not settings.is_development


@pytest.mark.parametrize("service", SERVICES)
def test_a_process_without_environment_and_with_the_development_secret_does_not_start(
    service: str, no_environment: None, service_env: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in service_env.items() if k != "DMCALL_ENV"}
    log = tmp_path / f"{service}.log"
    proc = ServiceProcess(service, free_port(), env=env, log_path=log).start()
    assert proc.proc is not None
    try:
        code = proc.proc.wait(30)
    finally:
        proc.stop()
    assert code != 0
    assert DEV_JWT_SECRET not in log.read_text()  # the refusal names the setting, not the value
    assert "AUTH_JWT_SECRET is the development default" in log.read_text()


def test_a_deployment_that_forgets_the_environment_serves_no_development_token(
    no_environment: None, service_env: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in service_env.items() if k != "DMCALL_ENV"}
    env["AUTH_JWT_SECRET"] = secrets.token_hex(32)
    env["MEDIA_TOKEN_SECRET"] = secrets.token_hex(32)
    proc = ServiceProcess(
        "signaling", free_port(), env=env, log_path=tmp_path / "signaling.log"
    ).start()
    try:
        proc.wait_ready()
        response = httpx.post(f"{proc.url}/v1/dev/token", json={"user": "mallory"})
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "not_found"
        config = httpx.get(f"{proc.url}/config.json")
        assert config.status_code == 200
        assert config.json()["dev_sign_in"] is False
    finally:
        proc.stop()


def test_a_refused_start_does_not_print_the_secrets_it_read(
    no_environment: None, service_env: dict[str, str], tmp_path: Path
) -> None:
    real = "my-real-production-secret-" + secrets.token_hex(16)
    env = {k: v for k, v in service_env.items() if k != "DMCALL_ENV"}
    env["AUTH_JWT_SECRET"] = real  # MEDIA_TOKEN_SECRET is left at the development default
    log = tmp_path / "signaling.log"
    proc = ServiceProcess("signaling", free_port(), env=env, log_path=log).start()
    assert proc.proc is not None
    try:
        assert proc.proc.wait(30) != 0
    finally:
        proc.stop()
    text = log.read_text()
    assert "MEDIA_TOKEN_SECRET is the development default" in text
    for start in range(0, len(real) - 8):
        assert real[start : start + 8] not in text  # not even a shortened copy
