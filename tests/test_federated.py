"""Workload identity federation: the client assertion is read from a token file on every token request."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.config import settings_from_dict
from relay.errors import TokenError
from relay.microsoft.tokens import TokenProvider
from relay.testing.harness import relay_config
from relay.testing.m365 import STANDARD_CLIENT_ID, STANDARD_MAILBOX, STANDARD_TENANT, SimulatedM365
from tests.conftest import RelayFactory

ISSUER = "https://oidc.prod-aks.azure.com/cluster-1/"
SUBJECT = "system:serviceaccount:mail:oauth-smtp-relay"


@pytest.fixture
def issuer_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def service_account_token(key: rsa.RSAPrivateKey, subject: str = SUBJECT) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": subject, "aud": "api://AzureADTokenExchange", "iat": now, "exp": now + 3600}
    return jwt.encode(claims, key, algorithm="RS256")


def federate(m365: SimulatedM365, key: rsa.RSAPrivateKey) -> None:
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    m365.entra.add_federated_credential(STANDARD_TENANT, STANDARD_CLIENT_ID, ISSUER, SUBJECT, pem)


def federated_app(m365: SimulatedM365, token_file: Path) -> dict[str, object]:
    app = dict(relay_config(m365, Path("/unused"))["apps"][0])
    del app["client_secret"]
    app["federated_token_file"] = str(token_file)
    return app


def test_relay_sends_with_a_federated_credential(m365: SimulatedM365, relay_factory: RelayFactory,
                                                 issuer_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    federate(m365, issuer_key)
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(service_account_token(issuer_key))
    relay = relay_factory(apps=[federated_app(m365, token_file)])
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as c:
        c.sendmail(STANDARD_MAILBOX, ["x@fabrikam.example"], b"Subject: federated\r\n\r\nbody\r\n")
    assert len(m365.exchange.accepted) == 1
    grant = [r for r in m365.entra.requests if r.path.endswith("/token")][-1]
    assert grant.credential == "assertion"


async def test_the_token_file_is_read_again_for_every_token_request(m365: SimulatedM365, tmp_path: Path,
                                                                    issuer_key: rsa.RSAPrivateKey) -> None:
    federate(m365, issuer_key)
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(service_account_token(issuer_key))
    config = relay_config(m365, tmp_path, overrides={"apps": [federated_app(m365, token_file)]})
    provider = TokenProvider(settings_from_dict(config).apps[0], environ={})
    try:
        assert (await provider.get()).claims()["appid"] == STANDARD_CLIENT_ID
        # Kubernetes rotates the projected token: here, to one for a subject Entra ID does not know.
        token_file.write_text(service_account_token(issuer_key, subject="system:serviceaccount:other:app"))
        await provider.evict()
        with pytest.raises(TokenError) as err:
            await provider.get()
        assert err.value.aadsts == 700213 and not err.value.transient
        token_file.write_text(service_account_token(issuer_key))
        await provider.evict()
        assert (await provider.get()).value
        assert m365.entra.token_requests == 3
    finally:
        provider.close()
