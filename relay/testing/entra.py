"""A simulated Microsoft Entra ID token endpoint that the real MSAL talks to over HTTPS.

Why a real HTTPS server rather than a mock of MSAL: the relay's token code is only trustworthy if MSAL
itself (discovery, caching, throttling, client assertions, error parsing) runs unmodified. So this
serves the few URLs MSAL requests for the client-credentials flow:

* ``GET /common/discovery/instance`` - instance discovery (only used when not disabled);
* ``GET /{tenant}/v2.0/.well-known/openid-configuration`` - tenant discovery;
* ``GET /{tenant}/discovery/v2.0/keys`` - the signing keys (JWKS) of the access tokens;
* ``POST /{tenant}/oauth2/v2.0/token`` - ``grant_type=client_credentials`` with a client secret or a
  ``private_key_jwt`` client assertion.

Errors carry Entra ID's shape (``error``, ``error_description`` starting ``AADSTSnnnn:``,
``error_codes``, ``trace_id``...), so code branching on AADSTS codes is tested against the real format.
Access tokens are RS256 JWTs signed by this simulator's own key; the simulated Exchange verifies them
in-process with :attr:`EntraSimulator.public_key`.

Everything listens on 127.0.0.1 only and is reached as ``https://localhost:PORT``.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import json
import logging
import random
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from relay.testing.certs import AppCertificate, ServerCertificates
from relay.testing.https import ServerThread, TLSHTTPServer

log = logging.getLogger(__name__)

EXCHANGE_RESOURCE = "https://outlook.office365.com"
"""The resource (token ``aud``) of scope ``https://outlook.office365.com/.default``."""
GRAPH_RESOURCE = "https://graph.microsoft.com"
"""Microsoft Graph, supported for a later Graph transport."""
SMTP_SEND_AS_APP = "SMTP.SendAsApp"
"""The application permission Exchange Online requires for SMTP AUTH with an app-only token."""
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_LIFETIME_RANGE = (3600, 5400)
"""Entra ID gives app-only tokens a random lifetime of 60-90 minutes; never assume 3599 s."""
ASSERTION_CLOCK_SKEW = 300
"""Seconds of clock skew tolerated on a client assertion's ``nbf``/``exp``."""


# ---------------------------------------------------------------------------------------------
# State model
# ---------------------------------------------------------------------------------------------


@dataclass
class AppRegistration:
    """An app registration plus its service principal in one tenant.

    ``secrets`` maps a secret *value* to its expiry (epoch seconds per the simulator clock, or None).
    ``roles`` are the Exchange Online application permissions granted, ``graph_roles`` those of
    Microsoft Graph; both only reach the token when ``admin_consent`` is true (like Entra ID, missing
    consent is no token error: the roles claim is simply absent).
    """

    client_id: str
    service_principal_id: str
    display_name: str = "oauth-smtp-relay"
    secrets: dict[str, float | None] = field(default_factory=dict)
    certificates: list[x509.Certificate] = field(default_factory=list)
    roles: tuple[str, ...] = (SMTP_SEND_AS_APP,)
    graph_roles: tuple[str, ...] = ()
    admin_consent: bool = True
    #: workload identity federation: (issuer, subject) -> the issuer's public key (PEM)
    federated: dict[tuple[str, str], bytes] = field(default_factory=dict)

    def certificate_for(self, x5t: str | None, x5t_s256: str | None) -> x509.Certificate | None:
        """The registered certificate a client assertion header points at, if any.

        Padding is ignored: MSAL sends base64url *with* ``=`` padding, RFC 7515 says without.
        """
        x5t = x5t.rstrip("=") if x5t else None
        x5t_s256 = x5t_s256.rstrip("=") if x5t_s256 else None
        for cert in self.certificates:
            if x5t is not None and _b64url(cert.fingerprint(hashes.SHA1())) == x5t:
                return cert
            if x5t_s256 is not None and _b64url(cert.fingerprint(hashes.SHA256())) == x5t_s256:
                return cert
        return None


@dataclass
class Tenant:
    """A directory: its apps and the resource principals (first-party APIs) present in it."""

    tenant_id: str
    domains: tuple[str, ...] = ()
    apps: dict[str, AppRegistration] = field(default_factory=dict)
    resources: set[str] = field(default_factory=lambda: {EXCHANGE_RESOURCE, GRAPH_RESOURCE})


@dataclass(frozen=True)
class RequestRecord:
    """One request as seen by the simulator. Never holds a secret or an assertion."""

    at: float
    method: str
    path: str
    status: int
    tenant: str | None = None
    client_id: str | None = None
    grant_type: str | None = None
    credential: str | None = None
    """``"secret"``, ``"assertion"`` or None: which kind was sent, never its value."""
    scope: str | None = None
    aadsts: int | None = None


@dataclass
class _InjectedFailure:
    status: int
    error: str
    aadsts: int | None
    retry_after: int | None
    remaining: int
    description: str | None


class EntraError(Exception):
    """An Entra ID error answer: HTTP status, OAuth ``error`` and AADSTS code + text."""

    def __init__(self, status: int, error: str, aadsts: int | None, text: str, retry_after: int | None = None) -> None:
        super().__init__(f"{status} {error} AADSTS{aadsts}: {text}")
        self.status = status
        self.error = error
        self.aadsts = aadsts
        self.text = text
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Response:
    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------------------------


class EntraSimulator:
    """The token endpoint: state (tenants, apps), switches, counters and the HTTPS server.

    All public methods are thread-safe: tests change state from their own thread while the server
    answers from its handler threads.
    """

    def __init__(
        self,
        certs: ServerCertificates,
        *,
        clock: Callable[[], float] = time.time,
        token_lifetime: int | None = None,
        seed: int = 0,
        signing_key: rsa.RSAPrivateKey | None = None,
    ) -> None:
        """``signing_key`` defaults to one key shared by all simulators of the process (see
        :func:`_shared_signing_key`)."""
        self._certs = certs
        self._clock = clock
        self._token_lifetime = token_lifetime
        self._random = random.Random(f"entra-{seed}")
        self._lock = threading.RLock()
        self._tenants: dict[str, Tenant] = {}
        self._failures: list[_InjectedFailure] = []
        self._delay = 0.0
        self._log: list[RequestRecord] = []
        self._token_counts: Counter[tuple[str, str]] = Counter()
        self._signing_key = signing_key or _shared_signing_key()
        self._kid = _b64url(hashlib.sha1(self.public_key_pem).digest())
        self._service = ServerThread(
            "entra-sim", lambda port: _TLSHTTPServer(("127.0.0.1", port), self, self._certs.server_context()))

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on 127.0.0.1 (an ephemeral port the first time, the same port on restart)."""
        self._service.start()

    def stop(self) -> None:
        """Close the listening socket: new connections are refused until :meth:`start`."""
        self._service.stop()

    def set_down(self, down: bool) -> None:
        """``True``: connection refused (server stopped); ``False``: back up on the same port."""
        if down:
            self.stop()
        else:
            self.start()

    @property
    def running(self) -> bool:
        with self._lock:
            return self._service.running

    @property
    def port(self) -> int:
        return self._service.port

    @property
    def authority_host(self) -> str:
        """``https://localhost:PORT``: the host name matches the server certificate."""
        return f"https://localhost:{self._service.port}"

    def authority(self, tenant_id: str) -> str:
        """What the relay passes to MSAL as ``authority``."""
        return f"{self.authority_host}/{tenant_id}"

    def token_endpoint(self, tenant_id: str) -> str:
        return f"{self.authority_host}/{tenant_id}/oauth2/v2.0/token"

    # -- state -------------------------------------------------------------------------------

    def add_tenant(self, tenant_id: str, *, domains: Iterable[str] = ()) -> Tenant:
        """Create a tenant (with Exchange Online and Graph present). Idempotent."""
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            if tenant is None:
                tenant = Tenant(tenant_id, tuple(d.lower() for d in domains))
                self._tenants[tenant_id] = tenant
            return tenant

    def remove_resource(self, tenant_id: str, resource: str) -> None:
        """Make a resource principal missing (e.g. no Exchange Online licence): AADSTS500011."""
        with self._lock:
            self._tenant(tenant_id).resources.discard(_normalise_resource(resource))

    def add_app(
        self,
        tenant_id: str,
        client_id: str,
        *,
        secret: str | None = None,
        secret_expires_at: float | None = None,
        certificate: AppCertificate | None = None,
        roles: Iterable[str] = (SMTP_SEND_AS_APP,),
        graph_roles: Iterable[str] = (),
        admin_consent: bool = True,
        service_principal_id: str | None = None,
    ) -> AppRegistration:
        """Register an app (and its enterprise application / service principal) in a tenant."""
        with self._lock:
            tenant = self._tenant(tenant_id)
            app = AppRegistration(
                client_id=client_id,
                service_principal_id=service_principal_id or self._uuid(),
                roles=tuple(roles),
                graph_roles=tuple(graph_roles),
                admin_consent=admin_consent,
            )
            if secret is not None:
                app.secrets[secret] = secret_expires_at
            if certificate is not None:
                app.certificates.append(certificate.certificate)
            tenant.apps[client_id] = app
            return app

    def app(self, tenant_id: str, client_id: str) -> AppRegistration:
        """The live registration (mutate it only through the methods below)."""
        with self._lock:
            return self._tenant(tenant_id).apps[client_id]

    def add_secret(self, tenant_id: str, client_id: str, secret: str, expires_at: float | None = None) -> None:
        with self._lock:
            self.app(tenant_id, client_id).secrets[secret] = expires_at

    def remove_secret(self, tenant_id: str, client_id: str, secret: str) -> None:
        with self._lock:
            self.app(tenant_id, client_id).secrets.pop(secret, None)

    def add_certificate(self, tenant_id: str, client_id: str, certificate: AppCertificate) -> None:
        with self._lock:
            self.app(tenant_id, client_id).certificates.append(certificate.certificate)

    def set_admin_consent(self, tenant_id: str, client_id: str, granted: bool) -> None:
        with self._lock:
            self.app(tenant_id, client_id).admin_consent = granted

    def set_graph_roles(self, tenant_id: str, client_id: str, roles: Iterable[str]) -> None:
        """Microsoft Graph application permissions (e.g. ``Mail.Send``) of the app."""
        with self._lock:
            self.app(tenant_id, client_id).graph_roles = tuple(roles)

    # -- switches ----------------------------------------------------------------------------

    def fail_with(
        self,
        status: int,
        error: str,
        aadsts: int | None = None,
        *,
        retry_after: int | None = None,
        times: int = 1,
        description: str | None = None,
    ) -> None:
        """Answer the next ``times`` token requests with this error (e.g. 503 temporarily_unavailable)."""
        with self._lock:
            self._failures.append(_InjectedFailure(status, error, aadsts, retry_after, times, description))

    def set_delay(self, seconds: float) -> None:
        """Wait this long before answering any request (a slow identity provider)."""
        with self._lock:
            self._delay = max(0.0, seconds)

    # -- counters ----------------------------------------------------------------------------

    @property
    def token_requests(self) -> int:
        """Token POSTs received (successful or not, injected failures included)."""
        with self._lock:
            return sum(self._token_counts.values())

    def token_requests_for(self, tenant_id: str, client_id: str) -> int:
        with self._lock:
            return self._token_counts[(tenant_id, client_id)]

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._log)

    # -- tokens ------------------------------------------------------------------------------

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        """The key that verifies access tokens (what Exchange fetches from the JWKS)."""
        return self._signing_key.public_key()

    @property
    def public_key_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def issue_access_token(
        self,
        tenant_id: str,
        client_id: str,
        resource: str = EXCHANGE_RESOURCE,
        *,
        lifetime: int | None = None,
        now: float | None = None,
        credential: str = "secret",
    ) -> tuple[str, int]:
        """Mint an access token directly (no HTTP, not counted): for tests and benchmarks.

        Returns ``(jwt, expires_in)``. The claims are those the token endpoint would issue.
        """
        with self._lock:
            tenant = self._tenant(tenant_id)
            app = tenant.apps[client_id]
            expires_in = lifetime if lifetime is not None else self._next_lifetime()
            issued = self._clock() if now is None else now
            token = self._sign(tenant, app, _normalise_resource(resource), issued, expires_in, credential)
            return token, expires_in

    def sign_claims(self, claims: Mapping[str, Any]) -> str:
        """Sign arbitrary claims with the token key: for tests of a verifier's checks."""
        return jwt.encode(dict(claims), self._signing_key, algorithm="RS256", headers=self._jwt_headers())

    # -- request handling (called from the HTTP handler threads) -----------------------------

    def handle(self, method: str, raw_path: str, form: Mapping[str, str], headers: Mapping[str, str]) -> _Response:
        """Route one request; never raises for a client mistake (answers like Entra ID instead)."""
        with self._lock:
            delay = self._delay
        if delay:
            time.sleep(delay)
        url = urlsplit(raw_path)
        parts = [p for p in url.path.split("/") if p]
        correlation = headers.get("client-request-id") or self._uuid()
        if method == "POST" and len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            return self._token(parts[0], url.path, form, correlation)
        if method == "GET":
            response = self._get(parts, parse_qs(url.query), correlation)
            self._record(RequestRecord(self._clock(), method, url.path, response.status))
            return response
        self._record(RequestRecord(self._clock(), method, url.path, 404))
        return _Response(404, {"error": "not_found", "error_description": f"no route for {method} {url.path}"})

    def _get(self, parts: list[str], query: Mapping[str, list[str]], correlation: str) -> _Response:
        if parts == ["common", "discovery", "instance"]:
            return self._instance_discovery(query, correlation)
        if len(parts) == 4 and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            return self._openid_configuration(parts[0], correlation)
        if len(parts) == 4 and parts[1:] == ["discovery", "v2.0", "keys"]:
            return _Response(200, {"keys": [self._jwk()]})
        return _Response(404, {"error": "not_found", "error_description": "no such endpoint"})

    def _instance_discovery(self, query: Mapping[str, list[str]], correlation: str) -> _Response:
        """Answer like ``https://login.microsoftonline.com/common/discovery/instance``."""
        endpoint = (query.get("authorization_endpoint") or [""])[0]
        target = urlsplit(endpoint)
        mine = f"localhost:{self._service.port}"
        # MSAL sends the host without the port (it keeps only the host name of the authority).
        if endpoint and target.netloc.lower() not in (
            mine,
            "localhost",
            f"127.0.0.1:{self._service.port}",
            "127.0.0.1",
        ):
            err = EntraError(400, "invalid_instance", 50049, "Unknown or invalid instance.")
            return self._error_response(err, correlation)
        tenant = next((p for p in target.path.split("/") if p), "common")
        return _Response(
            200,
            {
                "tenant_discovery_endpoint": (f"{self.authority_host}/{tenant}/v2.0/.well-known/openid-configuration"),
                "api-version": "1.1",
                "metadata": [{"preferred_network": mine, "preferred_cache": mine, "aliases": [mine]}],
            },
        )

    def _openid_configuration(self, tenant_ref: str, correlation: str) -> _Response:
        with self._lock:
            tenant = self._find_tenant(tenant_ref)
        if tenant is None:
            err = EntraError(400, "invalid_tenant", 90002, _tenant_not_found(tenant_ref))
            return self._error_response(err, correlation)
        base = f"{self.authority_host}/{tenant.tenant_id}"
        return _Response(
            200,
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base}/v2.0",
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
                "msgraph_host": "graph.microsoft.com",
            },
        )

    def _token(self, tenant_ref: str, path: str, form: Mapping[str, str], correlation: str) -> _Response:
        client_id = form.get("client_id")
        credential = "assertion" if form.get("client_assertion") else ("secret" if "client_secret" in form else None)
        try:
            body = self._token_body(tenant_ref, form)
            response = _Response(200, body)
            aadsts = None
        except EntraError as err:
            response = self._error_response(err, correlation)
            aadsts = err.aadsts
        with self._lock:
            tenant = self._find_tenant(tenant_ref)
            self._token_counts[(tenant.tenant_id if tenant else tenant_ref, client_id or "")] += 1
        self._record(
            RequestRecord(
                self._clock(),
                "POST",
                path,
                response.status,
                tenant_ref,
                client_id,
                form.get("grant_type"),
                credential,
                form.get("scope"),
                aadsts,
            )
        )
        return response

    def _token_body(self, tenant_ref: str, form: Mapping[str, str]) -> dict[str, Any]:
        """The checks of the client-credentials grant, in Entra ID's order; raises EntraError."""
        with self._lock:
            self._raise_injected_failure()
            tenant = self._find_tenant(tenant_ref)
            if tenant is None:
                raise EntraError(400, "invalid_request", 90002, _tenant_not_found(tenant_ref))
            if form.get("grant_type") != "client_credentials":
                raise EntraError(
                    400,
                    "unsupported_grant_type",
                    70003,
                    f"The app requested an unsupported grant type '{form.get('grant_type', '')}'.",
                )
            client_id = form.get("client_id", "")
            if not client_id:
                raise EntraError(
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'client_id'.",
                )
            app = tenant.apps.get(client_id)
            if app is None:
                raise EntraError(400, "unauthorized_client", 700016, _app_not_found(client_id, tenant.tenant_id))
            self._authenticate_client(tenant, app, form)
            resource = self._resource_for_scope(tenant, form.get("scope", ""))
            expires_in = self._next_lifetime()
            token = self._sign(tenant, app, resource, self._clock(), expires_in, _credential_kind(form))
        return {
            "token_type": "Bearer",
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "access_token": token,
        }

    def _raise_injected_failure(self) -> None:
        if not self._failures:
            return
        failure = self._failures[0]
        failure.remaining -= 1
        if failure.remaining <= 0:
            self._failures.pop(0)
        text = failure.description or _default_failure_text(failure.error)
        raise EntraError(failure.status, failure.error, failure.aadsts, text, failure.retry_after)

    def _authenticate_client(self, tenant: Tenant, app: AppRegistration, form: Mapping[str, str]) -> None:
        if "client_secret" in form:
            self._check_secret(app, form["client_secret"])
        elif form.get("client_assertion"):
            if form.get("client_assertion_type") != JWT_BEARER:
                raise EntraError(
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'client_assertion_type'.",
                )
            self._check_assertion(tenant, app, form["client_assertion"])
        else:
            raise EntraError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            )

    def _check_secret(self, app: AppRegistration, secret: str) -> None:
        if secret not in app.secrets:
            raise EntraError(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                f"secret value, not the client secret ID, for a secret added to app '{app.client_id}'.",
            )
        expires_at = app.secrets[secret]
        if expires_at is not None and expires_at <= self._clock():
            raise EntraError(
                401,
                "invalid_client",
                7000222,
                f"The provided client secret keys for app '{app.client_id}' are expired. Visit the Azure "
                "portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using "
                "certificate credentials for added security: https://aka.ms/certCreds.",
            )

    def _check_assertion(self, tenant: Tenant, app: AppRegistration, assertion: str) -> None:
        """Verify a ``private_key_jwt`` assertion against the registered certificates, or a federated
        assertion (workload identity) against the app's federated identity credentials."""
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise EntraError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from exc
        if not header.get("x5t") and not header.get("x5t#S256") and unverified.get("iss") != app.client_id:
            self._check_federated(app, assertion, unverified)
            return
        cert = app.certificate_for(header.get("x5t"), header.get("x5t#S256"))
        if cert is None:
            thumb = header.get("x5t") or header.get("x5t#S256") or "<none>"
            raise EntraError(
                401,
                "invalid_client",
                700027,
                "Client assertion failed signature validation. [Reason - The key was not found., Thumbprint "
                f"of key used by client: '{_unb64url_hex(thumb)}', Please visit the Azure Portal, Graph "
                f"Explorer or directly use MS Graph to see configured keys for app Id '{app.client_id}'.]",
            )
        try:
            claims = jwt.decode(
                assertion,
                cert.public_key(),  # type: ignore[arg-type]
                algorithms=["RS256", "PS256"],
                options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise EntraError(
                401,
                "invalid_client",
                700027,
                "Client assertion failed signature validation. [Reason - The provided signature value "
                "did not match the expected signature value.]",
            ) from exc
        self._check_assertion_claims(tenant, app, claims)

    def _check_federated(self, app: AppRegistration, assertion: str, unverified: Mapping[str, Any]) -> None:
        """A token from an external issuer (e.g. a Kubernetes service account) exchanged for an app
        token: issuer + subject must match a federated identity credential, audience
        ``api://AzureADTokenExchange``, signature by that issuer's key. Error codes per Entra ID."""
        key = app.federated.get((str(unverified.get("iss")), str(unverified.get("sub"))))
        if key is None:
            raise EntraError(
                400, "invalid_request", 700213,
                f"No matching federated identity record found for presented assertion subject "
                f"'{unverified.get('sub')}'. Check your federated identity credential Subject, Audience and Issuer.")
        try:
            jwt.decode(assertion, key, algorithms=["RS256"], audience=FEDERATED_AUDIENCE,
                       options={"verify_exp": True}, leeway=ASSERTION_CLOCK_SKEW)
        except jwt.ExpiredSignatureError as exc:
            raise EntraError(400, "invalid_client", 700024, "Client assertion is not within its valid time range.") \
                from exc
        except jwt.PyJWTError as exc:
            raise EntraError(401, "invalid_client", 700027, "Client assertion failed signature validation.") from exc

    def add_federated_credential(self, tenant_id: str, client_id: str, issuer: str, subject: str,
                                 public_key_pem: bytes) -> None:
        """Register a federated identity credential (issuer, subject) with the issuer's public key."""
        with self._lock:
            self._tenant(tenant_id).apps[client_id].federated[(issuer, subject)] = public_key_pem

    def _check_assertion_claims(self, tenant: Tenant, app: AppRegistration, claims: Mapping[str, Any]) -> None:
        # The codes below (other than 700027) are plausible but *unverified* against Entra ID.
        if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
            raise EntraError(
                401,
                "invalid_client",
                700023,
                "Client assertion iss and sub claims must be the client id.",
            )
        audiences = {f"{self.authority_host}/{ref}/oauth2/v2.0/token" for ref in (tenant.tenant_id, *tenant.domains)}
        aud = claims.get("aud")
        if not (aud in audiences or (isinstance(aud, list) and audiences.intersection(aud))):
            raise EntraError(
                401,
                "invalid_client",
                700212,
                f"The audience claim of the client assertion is not valid. Expected one of {sorted(audiences)}.",
            )
        now = self._clock()
        exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
        if (
            not isinstance(exp, int | float)
            or exp + ASSERTION_CLOCK_SKEW < now
            or (isinstance(nbf, int | float) and nbf - ASSERTION_CLOCK_SKEW > now)
        ):
            raise EntraError(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")

    def _resource_for_scope(self, tenant: Tenant, scope: str) -> str:
        scopes = [s for s in scope.split() if s not in ("offline_access", "openid", "profile")]
        if not scopes:
            raise EntraError(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
            )
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            raise EntraError(
                400,
                "invalid_scope",
                70011,
                "The provided request must include a 'scope' input parameter. The provided value for the "
                f"input parameter 'scope' is not valid. The scope {scope} is not valid.",
            )
        resource = _normalise_resource(scopes[0][: -len("/.default")])
        if resource not in tenant.resources:
            raise EntraError(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {resource} was not found in the tenant named "
                f"{tenant.tenant_id}. This can happen if the application has not been installed by the "
                "administrator of the tenant or consented to by any user in the tenant. You might have sent "
                "your authentication request to the wrong tenant.",
            )
        return resource

    # -- helpers -----------------------------------------------------------------------------

    def _sign(
        self,
        tenant: Tenant,
        app: AppRegistration,
        resource: str,
        now: float,
        expires_in: int,
        credential: str,
    ) -> str:
        issued = int(now)
        granted = app.roles if resource == EXCHANGE_RESOURCE else app.graph_roles
        claims: dict[str, Any] = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{tenant.tenant_id}/",
            "iat": issued,
            "nbf": issued,
            "exp": issued + expires_in,
            "app_displayname": app.display_name,
            "appid": app.client_id,
            "appidacr": "2" if credential == "assertion" else "1",
            "idp": f"https://sts.windows.net/{tenant.tenant_id}/",
            "idtyp": "app",
            "oid": app.service_principal_id,
            "sub": app.service_principal_id,
            "tid": tenant.tenant_id,
            "uti": _b64url(self._random.randbytes(16)),
            "ver": "1.0",
        }
        if app.admin_consent and granted:
            claims["roles"] = list(granted)
        return jwt.encode(claims, self._signing_key, algorithm="RS256", headers=self._jwt_headers())

    def _jwt_headers(self) -> dict[str, str]:
        return {"typ": "JWT", "x5t": self._kid, "kid": self._kid}

    def _jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.public_key))
        jwk.update({"kid": self._kid, "x5t": self._kid, "use": "sig"})
        return jwk

    def _next_lifetime(self) -> int:
        if self._token_lifetime is not None:
            return self._token_lifetime
        return self._random.randint(*DEFAULT_LIFETIME_RANGE)

    def _tenant(self, tenant_id: str) -> Tenant:
        tenant = self._find_tenant(tenant_id)
        if tenant is None:
            raise KeyError(f"unknown tenant {tenant_id!r}: call add_tenant first")
        return tenant

    def _find_tenant(self, ref: str) -> Tenant | None:
        ref = ref.lower()
        for tenant in self._tenants.values():
            if tenant.tenant_id.lower() == ref or ref in tenant.domains:
                return tenant
        return None

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._random.getrandbits(128), version=4))

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._log.append(record)

    def _error_response(self, err: EntraError, correlation: str) -> _Response:
        with self._lock:
            trace = self._uuid()
        stamp = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        prefix = f"AADSTS{err.aadsts}: " if err.aadsts is not None else ""
        body: dict[str, Any] = {
            "error": err.error,
            "error_description": (
                f"{prefix}{err.text}\r\nTrace ID: {trace}\r\nCorrelation ID: {correlation}\r\nTimestamp: {stamp}"
            ),
            "error_codes": [err.aadsts] if err.aadsts is not None else [],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": correlation,
        }
        if err.aadsts is not None:
            body["error_uri"] = f"{self.authority_host}/error?code={err.aadsts}"
        headers = {"x-ms-request-id": trace}
        if err.retry_after is not None:
            headers["Retry-After"] = str(err.retry_after)
        return _Response(err.status, body, headers)


# ---------------------------------------------------------------------------------------------
# HTTPS plumbing
# ---------------------------------------------------------------------------------------------


class _TLSHTTPServer(TLSHTTPServer):
    def __init__(self, address: tuple[str, int], sim: EntraSimulator, context: ssl.SSLContext) -> None:
        self.sim = sim
        super().__init__(address, _Handler, context, name="entra-sim", timeout=10)


class _Handler(BaseHTTPRequestHandler):
    """Translate HTTP to :meth:`EntraSimulator.handle` and back. HTTP/1.0: one request per connection,
    so stopping the server really cuts every client off (no lingering keep-alive connections)."""

    server: _TLSHTTPServer
    server_version = "Microsoft-IIS/10.0"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer("GET", {})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8", errors="replace") if length else ""
        form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        self._answer("POST", form)

    def _answer(self, method: str, form: Mapping[str, str]) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        response = self.server.sim.handle(method, self.path, form, headers)
        payload = json.dumps(response.body).encode()
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store, no-cache")
        self.send_header("Pragma", "no-cache")
        if "client-request-id" in headers:
            self.send_header("client-request-id", headers["client-request-id"])
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("entra-sim: " + format, *args)


# ---------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------


@functools.cache
def _shared_signing_key() -> rsa.RSAPrivateKey:
    """One token-signing key per process: RSA-2048 generation takes 50-500 ms and a test run starts
    dozens of simulators. Sharing it is harmless: each simulator still checks tenant, app and rights."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url_hex(value: str) -> str:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex().upper()
    except ValueError:
        return value


def _normalise_resource(resource: str) -> str:
    return resource.rstrip("/").lower()


def _credential_kind(form: Mapping[str, str]) -> str:
    return "assertion" if form.get("client_assertion") else "secret"


def _tenant_not_found(tenant: str) -> str:
    return (
        f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
        "into the correct cloud. Check with your subscription administrator, this may happen if there are no "
        "active subscriptions for the tenant."
    )


def _app_not_found(client_id: str, tenant_id: str) -> str:
    return (
        f"Application with identifier '{client_id}' was not found in the directory '{tenant_id}'. This can "
        "happen if the application has not been installed by the administrator of the tenant or consented to "
        "by any user in the tenant. You may have sent your authentication request to the wrong tenant."
    )


def _default_failure_text(error: str) -> str:
    if error == "temporarily_unavailable":
        return "The service is temporarily unavailable. Please try again later."
    return f"Simulated failure: {error}."
