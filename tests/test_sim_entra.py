"""The simulated Entra ID token endpoint, driven by the real MSAL exactly as the relay will use it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import msal
import pytest
import requests

from relay.testing import (
    EXCHANGE_RESOURCE,
    GRAPH_RESOURCE,
    SMTP_SEND_AS_APP,
    STANDARD_CLIENT_ID,
    STANDARD_DOMAIN,
    STANDARD_SECRET,
    STANDARD_TENANT,
    AppCertificate,
    SimulatedM365,
    make_app_certificate,
)

SCOPE = [f"{EXCHANGE_RESOURCE}/.default"]
CERT_CLIENT = "33333333-3333-3333-3333-333333333333"


@pytest.fixture(scope="module")
def app_cert() -> AppCertificate:
    return make_app_certificate("relay-test")


@pytest.fixture
def m365(tmp_path: Path, app_cert: AppCertificate) -> Iterator[SimulatedM365]:
    sim = SimulatedM365.standard(tmp_path)
    sim.add_app(STANDARD_TENANT, CERT_CLIENT, certificate=app_cert)
    with sim:
        yield sim


def http_session(m365: SimulatedM365) -> requests.Session:
    """What the relay passes to MSAL: no environment (REQUESTS_CA_BUNDLE), trust the simulator's CA."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(m365.ca_file)
    return session


def msal_app(
    m365: SimulatedM365,
    credential: Any,
    *,
    client_id: str = STANDARD_CLIENT_ID,
    tenant: str = STANDARD_TENANT,
    **kwargs: Any,
) -> msal.ConfidentialClientApplication:
    kwargs.setdefault("instance_discovery", False)
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=m365.authority(tenant),
        http_client=http_session(m365),
        **kwargs,
    )


def decode(m365: SimulatedM365, token: str, audience: str = EXCHANGE_RESOURCE) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, m365.entra.public_key, algorithms=["RS256"], audience=audience)
    return claims


# -- success paths ---------------------------------------------------------------------------------


def test_secret_gets_exchange_token_then_msal_serves_from_cache(m365: SimulatedM365) -> None:
    app = msal_app(m365, STANDARD_SECRET)
    first = app.acquire_token_for_client(SCOPE)
    assert first["token_type"] == "Bearer"
    assert first["token_source"] == "identity_provider"
    assert 3600 <= first["expires_in"] <= 5400
    claims = decode(m365, first["access_token"])
    registration = m365.entra.app(STANDARD_TENANT, STANDARD_CLIENT_ID)
    assert claims["iss"] == f"https://sts.windows.net/{STANDARD_TENANT}/"
    assert claims["tid"] == STANDARD_TENANT
    assert claims["appid"] == STANDARD_CLIENT_ID
    assert claims["oid"] == registration.service_principal_id
    assert claims["roles"] == [SMTP_SEND_AS_APP]
    assert claims["exp"] - claims["iat"] == first["expires_in"]

    second = app.acquire_token_for_client(SCOPE)
    assert second["token_source"] == "cache"
    assert second["access_token"] == first["access_token"]
    assert m365.entra.token_requests == 1
    assert m365.entra.token_requests_for(STANDARD_TENANT, STANDARD_CLIENT_ID) == 1
    log = m365.entra.requests
    assert [(r.method, r.status) for r in log] == [("GET", 200), ("POST", 200)]
    assert log[1].grant_type == "client_credentials" and log[1].credential == "secret"
    assert STANDARD_SECRET not in repr(log)


def test_certificate_with_sha1_thumbprint_rs256(m365: SimulatedM365, app_cert: AppCertificate) -> None:
    credential = {"private_key": app_cert.private_key_pem.decode(), "thumbprint": app_cert.thumbprint_sha1_hex}
    result = msal_app(m365, credential, client_id=CERT_CLIENT).acquire_token_for_client(SCOPE)
    assert "access_token" in result, result
    claims = decode(m365, result["access_token"])
    assert claims["appid"] == CERT_CLIENT and claims["appidacr"] == "2"
    assert m365.entra.requests[-1].credential == "assertion"


def test_certificate_with_public_certificate_ps256(m365: SimulatedM365, app_cert: AppCertificate) -> None:
    credential = {
        "private_key": app_cert.private_key_pem.decode(),
        "public_certificate": app_cert.certificate_pem.decode(),
    }
    result = msal_app(m365, credential, client_id=CERT_CLIENT).acquire_token_for_client(SCOPE)
    assert "access_token" in result, result


def test_certificate_from_pfx(m365: SimulatedM365, app_cert: AppCertificate, tmp_path: Path) -> None:
    pfx = tmp_path / "app.pfx"
    pfx.write_bytes(app_cert.pfx_bytes("s3cret"))
    credential = {"private_key_pfx_path": str(pfx), "passphrase": "s3cret"}
    result = msal_app(m365, credential, client_id=CERT_CLIENT).acquire_token_for_client(SCOPE)
    assert "access_token" in result, result


def test_domain_name_authority_and_graph_scope(m365: SimulatedM365) -> None:
    app = msal_app(m365, STANDARD_SECRET, tenant=STANDARD_DOMAIN)
    result = app.acquire_token_for_client([f"{GRAPH_RESOURCE}/.default"])
    claims = decode(m365, result["access_token"], audience=GRAPH_RESOURCE)
    assert claims["tid"] == STANDARD_TENANT
    assert "roles" not in claims  # no Graph application permission granted


def test_missing_admin_consent_gives_token_without_roles(m365: SimulatedM365) -> None:
    m365.set_admin_consent(STANDARD_TENANT, STANDARD_CLIENT_ID, False)
    result = msal_app(m365, STANDARD_SECRET).acquire_token_for_client(SCOPE)
    assert "roles" not in decode(m365, result["access_token"])


def test_instance_discovery_endpoint(m365: SimulatedM365) -> None:
    endpoint = f"{m365.authority_host}/common/discovery/instance"
    app = msal_app(m365, STANDARD_SECRET, instance_discovery=endpoint)
    assert "access_token" in app.acquire_token_for_client(SCOPE)
    assert m365.entra.requests[0].path == "/common/discovery/instance"
    answer = http_session(m365).get(
        endpoint,
        params={
            "authorization_endpoint": f"{m365.authority(STANDARD_TENANT)}/oauth2/v2.0/authorize",
            "api-version": "1.1",
        },
    )
    body = answer.json()
    assert body["tenant_discovery_endpoint"] == (
        f"{m365.authority(STANDARD_TENANT)}/v2.0/.well-known/openid-configuration"
    )
    assert body["api-version"] == "1.1" and body["metadata"]


def test_openid_configuration_and_keys(m365: SimulatedM365) -> None:
    session = http_session(m365)
    config = session.get(f"{m365.authority(STANDARD_TENANT)}/v2.0/.well-known/openid-configuration").json()
    assert config["token_endpoint"] == m365.entra.token_endpoint(STANDARD_TENANT)
    assert config["issuer"] == f"{m365.authority(STANDARD_TENANT)}/v2.0"
    keys = session.get(config["jwks_uri"]).json()["keys"]
    assert keys[0]["kty"] == "RSA"


def test_token_lifetime_override_and_seeded_lifetimes(tmp_path: Path) -> None:
    with SimulatedM365.standard(tmp_path / "short", token_lifetime=120) as short:
        result = msal_app(short, STANDARD_SECRET).acquire_token_for_client(SCOPE)
        assert result["expires_in"] == 120
    lifetimes = []
    for name in ("a", "b"):
        sim = SimulatedM365.standard(tmp_path / name, seed=7)
        lifetimes.append([sim.entra.issue_access_token(STANDARD_TENANT, STANDARD_CLIENT_ID)[1] for _ in range(3)])
    assert lifetimes[0] == lifetimes[1]
    assert all(3600 <= n <= 5400 for n in lifetimes[0])


# -- AADSTS errors -----------------------------------------------------------------------------------


def expect_error(result: dict[str, Any], error: str, code: int) -> None:
    assert "access_token" not in result
    assert result["error"] == error, result
    assert result["error_codes"] == [code]
    assert result["error_description"].startswith(f"AADSTS{code}: ")
    for part in ("\r\nTrace ID: ", "\r\nCorrelation ID: ", "\r\nTimestamp: "):
        assert part in result["error_description"]


@pytest.mark.parametrize(
    ("setup", "credential", "scope", "error", "code"),
    [
        ("none", "not-the-secret", SCOPE, "invalid_client", 7000215),
        ("expired", "old-secret", SCOPE, "invalid_client", 7000222),
        ("none", STANDARD_SECRET, ["https://outlook.office365.com/SMTP.Send"], "invalid_scope", 70011),
        ("none", STANDARD_SECRET, ["https://outlook.office365.us/.default"], "invalid_resource", 500011),
        ("no_exo", STANDARD_SECRET, SCOPE, "invalid_resource", 500011),
    ],
)
def test_aadsts_errors_surface_in_msal_result(
    m365: SimulatedM365, setup: str, credential: str, scope: list[str], error: str, code: int
) -> None:
    if setup == "expired":
        m365.entra.add_secret(STANDARD_TENANT, STANDARD_CLIENT_ID, "old-secret", expires_at=time.time() - 1)
    if setup == "no_exo":
        m365.entra.remove_resource(STANDARD_TENANT, EXCHANGE_RESOURCE)
    expect_error(msal_app(m365, credential).acquire_token_for_client(scope), error, code)


def test_unknown_client_id(m365: SimulatedM365) -> None:
    result = msal_app(m365, "x", client_id="99999999-9999-9999-9999-999999999999").acquire_token_for_client(SCOPE)
    expect_error(result, "unauthorized_client", 700016)


def test_no_credential_sent(m365: SimulatedM365) -> None:
    # MSAL always sends a credential; a raw request shows what a misconfigured client gets.
    answer = http_session(m365).post(
        m365.entra.token_endpoint(STANDARD_TENANT),
        data={"grant_type": "client_credentials", "client_id": STANDARD_CLIENT_ID, "scope": SCOPE[0]},
        headers={"client-request-id": "corr-1"},
    )
    assert answer.status_code == 401
    body = answer.json()
    expect_error(body, "invalid_client", 7000218)
    assert body["correlation_id"] == "corr-1" and body["trace_id"] and body["timestamp"]


def test_certificate_not_registered_and_wrong_key(m365: SimulatedM365, app_cert: AppCertificate) -> None:
    other = make_app_certificate("someone-else")
    unknown = {"private_key": other.private_key_pem.decode(), "thumbprint": other.thumbprint_sha1_hex}
    expect_error(
        msal_app(m365, unknown, client_id=CERT_CLIENT).acquire_token_for_client(SCOPE), "invalid_client", 700027
    )
    forged = {"private_key": other.private_key_pem.decode(), "thumbprint": app_cert.thumbprint_sha1_hex}
    expect_error(
        msal_app(m365, forged, client_id=CERT_CLIENT).acquire_token_for_client(SCOPE), "invalid_client", 700027
    )


def test_unknown_tenant(m365: SimulatedM365) -> None:
    missing = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        msal_app(m365, STANDARD_SECRET, tenant=missing)
    session = http_session(m365)
    discovery = session.get(f"{m365.authority(missing)}/v2.0/.well-known/openid-configuration")
    assert discovery.status_code == 400 and discovery.json()["error"] == "invalid_tenant"
    token = session.post(
        m365.entra.token_endpoint(missing),
        data={"grant_type": "client_credentials", "client_id": "x", "client_secret": "y", "scope": SCOPE[0]},
    )
    assert token.status_code == 400
    expect_error(token.json(), "invalid_request", 90002)


# -- switches --------------------------------------------------------------------------------------


def test_fail_with_503_and_retry_after(m365: SimulatedM365) -> None:
    app = msal_app(m365, STANDARD_SECRET)
    m365.entra.fail_with(503, "temporarily_unavailable", None, retry_after=30)
    # MSAL raises on HTTP 5xx instead of returning the error body.
    with pytest.raises(msal.exceptions.MsalServiceError, match="503"):
        app.acquire_token_for_client(SCOPE)
    # MSAL honours Retry-After: the second call is answered from its throttle cache.
    with pytest.raises(msal.exceptions.MsalServiceError, match="503"):
        app.acquire_token_for_client(SCOPE)
    assert m365.entra.token_requests == 1
    fresh = msal_app(m365, STANDARD_SECRET).acquire_token_for_client(SCOPE)
    assert "access_token" in fresh


def test_fail_with_aadsts_for_n_requests(m365: SimulatedM365) -> None:
    m365.entra.fail_with(400, "invalid_request", 90002, times=2)
    for _ in range(2):
        expect_error(msal_app(m365, STANDARD_SECRET).acquire_token_for_client(SCOPE), "invalid_request", 90002)
    assert "access_token" in msal_app(m365, STANDARD_SECRET).acquire_token_for_client(SCOPE)


def test_down_refuses_connections_then_recovers_on_same_port(m365: SimulatedM365) -> None:
    app = msal_app(m365, STANDARD_SECRET)
    port = m365.entra.port
    m365.entra.set_down(True)
    with pytest.raises(requests.exceptions.ConnectionError):
        app.acquire_token_for_client(SCOPE)
    m365.entra.set_down(False)
    assert m365.entra.port == port
    assert "access_token" in app.acquire_token_for_client(SCOPE)


def test_artificial_delay(m365: SimulatedM365) -> None:
    app = msal_app(m365, STANDARD_SECRET)
    m365.entra.set_delay(0.3)
    started = time.monotonic()
    assert "access_token" in app.acquire_token_for_client(SCOPE)
    assert time.monotonic() - started >= 0.3
