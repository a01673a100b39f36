"""``DMCALL_TLS_CERT_FILE``/``DMCALL_TLS_KEY_FILE``: a service serves HTTPS itself (media
nodes do: clients reach each node at its own public https URL)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.settings import CommonSettings
from tests.support.waiting import eventually
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_both_files_or_neither(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMCALL_TLS_CERT_FILE", "/etc/tls/tls.crt")
    with pytest.raises(ValueError, match="DMCALL_TLS_KEY_FILE"):
        CommonSettings()


async def test_a_service_serves_https(spawn: Callable[..., ServiceProcess], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    proc = spawn("policy", wait=False, DMCALL_TLS_CERT_FILE=str(cert), DMCALL_TLS_KEY_FILE=str(key))
    context = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{proc.port}"
    async with httpx.AsyncClient(verify=context, timeout=2) as client:

        async def ready() -> bool:
            try:
                return (await client.get(f"{url}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(ready, timeout=30, step=0.2)
        assert (await client.get(f"{url}/healthz")).json()["status"] == "ok"
    async with httpx.AsyncClient(timeout=2) as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(f"http://127.0.0.1:{proc.port}/healthz")
