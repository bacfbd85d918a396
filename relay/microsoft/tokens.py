"""App-only OAuth 2.0 tokens from Microsoft Entra ID, one MSAL application per app registration.

Why this shape:
- MSAL keeps its token cache inside the ``ConfidentialClientApplication``; one instance per app
  registration, created once, is what makes "one token request per token lifetime" possible.
- MSAL is synchronous (requests). Calls run in a worker thread so the event loop never blocks; an
  ``asyncio.Lock`` makes them single-flight: 50 deliveries that need a token at once cause one request.
- We keep the current token and its expiry ourselves, so the hot path (every delivery) returns it
  without a thread hop. Ahead of expiry (``refresh_in`` from Entra, else 75 % of the lifetime) one
  background refresh fetches the next token while the current one is still handed out: no message
  waits on Entra ID.
- ``requests`` honours ``REQUESTS_CA_BUNDLE`` over ``verify=``; the session is built with
  ``trust_env=False`` so that the configured CA bundle and proxy are the ones used.
- Every wait has a deadline. MSAL ignores its own ``timeout`` when given an ``http_client``, so the
  session itself (:class:`TimeoutSession`) puts ``apps[].timeout`` on every request it sends: OIDC
  discovery and token requests alike. On the event loop's side the whole acquisition (discovery +
  token) has the same deadline and runs in a daemon thread (relay.blocking): a silent endpoint makes
  it a transient failure ("no answer from <host> within <N>s") and never holds up shutdown.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msal
import msal.exceptions
import requests

from relay.blocking import call_with_deadline
from relay.config import AppSettings
from relay.errors import ConfigError, TokenError, exception_chain

log = logging.getLogger("relay.tokens")

#: OAuth errors after which waiting (not an admin) may help.
_TRANSIENT_ERRORS = {"temporarily_unavailable", "server_error", "request_timeout"}
#: A token this close to expiry is not handed out any more (Exchange refuses "token will expire soon").
_EXPIRY_MARGIN = 120.0


@dataclass(frozen=True)
class Token:
    """An access token and when it stops being usable. ``value`` must never be logged."""

    value: str = ""
    expires_at: float = 0.0
    refresh_at: float = 0.0
    source: str = ""

    def __repr__(self) -> str:  # keep the secret out of any accidental repr/log
        return f"Token(expires_at={self.expires_at:.0f}, source={self.source!r})"

    def claims(self) -> dict[str, Any]:
        """The token's claims, decoded for inspection only (never trusted, never printed whole)."""
        import jwt  # with cryptography, ~9 MB: loaded when a token is first inspected, not at start

        try:
            return dict(jwt.decode(self.value, options={"verify_signature": False}))
        except jwt.PyJWTError:
            return {}


class TimeoutSession(requests.Session):
    """A requests session whose every request carries a timeout (``timeout`` when the caller gives none).

    MSAL sends its requests through ``http_client.get/post`` without a timeout; requests would then
    wait on a silent socket forever.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().request(method, url, *args, **kwargs)


def host_of(url: str) -> str:
    """``host[:port]`` of a URL, for messages ("no answer from login.microsoftonline.com within 30s")."""
    return url.split("://", 1)[-1].split("/", 1)[0]


def _seconds(value: float) -> str:
    return f"{value:g}s"


def build_http_session(app: AppSettings, environ: Mapping[str, str]) -> requests.Session:
    """A requests session that trusts exactly the configured CA, uses exactly the configured proxy and
    puts ``apps[].timeout`` on every request."""
    session = TimeoutSession(app.timeout)
    session.trust_env = False
    session.verify = str(app.token_ca_file) if app.token_ca_file else True
    proxy = app.proxy or proxy_from_environment(app.effective_authority_host, environ)
    if proxy:
        session.proxies = {"https": proxy, "http": proxy}
    return session


def proxy_from_environment(url: str, environ: Mapping[str, str]) -> str | None:
    """HTTPS_PROXY / https_proxy honouring NO_PROXY, as curl and requests understand them."""
    proxy = environ.get("HTTPS_PROXY") or environ.get("https_proxy")
    if not proxy:
        return None
    no_proxy = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
    host = url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*" or host == entry.lstrip(".") or host.endswith("." + entry.lstrip(".")):
            return None
    return proxy


def build_credential(app: AppSettings, file: str = "<config>") -> str | dict[str, Any]:
    """The ``client_credential`` MSAL wants, from the configured secret, certificate or federated file."""
    if app.client_secret is not None:
        return app.client_secret.get_secret_value()
    if app.federated_token_file is not None:
        path = app.federated_token_file

        def read_assertion() -> str:
            # Re-read on every token request: Kubernetes rotates the projected token file.
            return Path(path).read_text(encoding="utf-8").strip()

        return {"client_assertion": read_assertion}
    # cryptography (~8 MB) only for certificate credentials.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    cert = app.certificate
    assert cert is not None  # guaranteed by AppSettings validation
    key = f"apps[{app.name}].certificate"
    try:
        if cert.pfx_file is not None:
            password = cert.pfx_password.get_secret_value().encode() if cert.pfx_password else None
            private_key, certificate, _ = pkcs12.load_key_and_certificates(cert.pfx_file.read_bytes(), password)
            if private_key is None or certificate is None:
                raise ConfigError(file, f"{key}.pfx_file", "the PFX holds no private key and certificate")
            key_pem = private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode()
            return {
                "private_key": key_pem,
                "thumbprint": certificate.fingerprint(hashes.SHA1()).hex(),  # noqa: S303 - Entra's x5t is SHA-1
                "public_certificate": certificate.public_bytes(serialization.Encoding.PEM).decode(),
            }
        assert cert.private_key_file is not None
        key_pem = cert.private_key_file.read_text(encoding="utf-8")
        serialization.load_pem_private_key(key_pem.encode(), password=None)  # fail early, clearly
        credential: dict[str, Any] = {"private_key": key_pem}
        if cert.certificate_file is not None:
            pem = cert.certificate_file.read_bytes()
            certificate = x509.load_pem_x509_certificate(pem)
            credential["public_certificate"] = pem.decode()
            credential["thumbprint"] = certificate.fingerprint(hashes.SHA1()).hex()  # noqa: S303
        if cert.thumbprint:
            credential["thumbprint"] = cert.thumbprint.replace(":", "").lower()
        return credential
    except ConfigError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(file, key, f"cannot load the certificate credential: {reason}") from None


@dataclass
class _ScopeState:
    """The token of one scope, its single-flight lock and its background refresh."""

    token: Token = Token()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    refresh_task: asyncio.Task[None] | None = None



def http_failure(app: str, exc: requests.RequestException, url: str, timeout: float,
                 proxy: str | None = None) -> TokenError:
    """What a failed HTTPS request to ``url`` (Entra ID) really met, as a :class:`TokenError`.

    Tells apart: no TCP connection, connected but no TLS handshake, no HTTP answer, a proxy that
    accepts but does not answer CONNECT, a proxy that cannot be reached, a peer that closed the
    connection, and a certificate that is not trusted (the only one an admin must fix: not transient).
    """
    host = host_of(url)
    within = _seconds(timeout)
    via = f" through the proxy {host_of(proxy)}" if proxy else ""
    chain = exception_chain(exc)
    texts = " | ".join(str(e).lower() for e in chain)
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain):
        return TokenError(app, "tls_verification_failed",
                          f"the certificate of {host} is not trusted; if a TLS-inspecting proxy re-signs it, set "
                          "token_ca_file to its CA", transient=False)
    if isinstance(exc, requests.exceptions.Timeout) or any(isinstance(e, TimeoutError) for e in chain):
        where = f"no answer from {host}{via} within {within}"
        if "handshake operation timed out" in texts:
            what = f"{where}: connected, no TLS handshake"
        elif "read operation timed out" in texts:
            what = f"{where}: connected, no HTTP answer"
        elif proxy and isinstance(exc, requests.exceptions.ReadTimeout):
            what = (f"no answer from the proxy {host_of(proxy)} within {within}: it accepted the connection but"
                    f" did not answer CONNECT {host}")
        elif isinstance(exc, requests.exceptions.ConnectTimeout):
            what = f"no answer from {host_of(proxy) if proxy else host} within {within}: no TCP connection"
        else:
            what = where
        return TokenError(app, "timeout", what, transient=True)
    if isinstance(exc, requests.exceptions.ProxyError):
        refused = " (connection refused)" if "refused" in texts else ""
        return TokenError(app, "proxy_unreachable",
                          f"the HTTPS proxy for Entra ID ({host_of(proxy or '')}) cannot be reached{refused}",
                          transient=True)
    if any(isinstance(e, ssl.SSLError) for e in chain):
        closed = "eof" in texts or "reset" in texts
        what = (f"{host}{via} closed the connection during the TLS handshake" if closed
                else f"TLS handshake with {host}{via} failed")
        return TokenError(app, "tls_handshake_failed", what, transient=True)
    if any(isinstance(e, ConnectionResetError | ConnectionAbortedError | http.client.RemoteDisconnected)
           for e in chain):
        return TokenError(app, "connection_closed", f"{host}{via} closed the connection before answering",
                          transient=True)
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return TokenError(app, "unreachable", f"cannot reach {host}: connection refused", transient=True)
    return TokenError(app, "unreachable", f"cannot reach {host}: {type(exc).__name__}", transient=True)


class TokenProvider:
    """Tokens for one app registration. Create once; share between all deliveries.

    One MSAL application serves every scope of the registration: the app's SMTP scope (the default,
    ``app.effective_scope``) and, for mailboxes sending by Microsoft Graph, ``app.effective_graph_scope``.
    Each scope has its own current token, single-flight lock and refresh: a Graph token never stands
    in for an Exchange one (their audiences differ) and one scope's fetch never waits on the other's.
    """

    def __init__(
        self,
        app: AppSettings,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        config_file: str = "<config>",
    ) -> None:
        import os

        self.app = app
        self._clock = clock
        self._session = build_http_session(app, os.environ if environ is None else environ)
        # Credential problems (unreadable key, bad PFX) are config errors: raise them at start.
        self._credential = build_credential(app, config_file)
        # MSAL fetches the tenant's OIDC metadata when the application is created: that must not stop
        # the relay from starting (and spooling mail) while Entra ID is unreachable, so it is created
        # on first use, in the worker thread, and again after a failure.
        self._msal_app: msal.ConfidentialClientApplication | None = None
        self._msal_lock = threading.Lock()  # two scopes may fetch at once, in two worker threads
        self.default_scope = app.effective_scope
        self._scopes: dict[str, _ScopeState] = {self.default_scope: _ScopeState()}
        self.requests = 0  # token requests that reached (or tried to reach) Entra ID, all scopes
        self.failures = 0
        self.on_acquired: Callable[[Token], None] | None = None
        self.on_failed: Callable[[TokenError], None] | None = None

    # The default scope's state under the names the rest of the relay (and its tests) know.
    @property
    def _token(self) -> Token:
        return self._scopes[self.default_scope].token

    @_token.setter
    def _token(self, token: Token) -> None:
        self._scopes[self.default_scope].token = token

    @property
    def _lock(self) -> asyncio.Lock:
        return self._scopes[self.default_scope].lock

    @property
    def _refresh_task(self) -> asyncio.Task[None] | None:
        return self._scopes[self.default_scope].refresh_task

    @property
    def current(self) -> Token:
        return self._token

    def _state(self, scope: str | None) -> tuple[str, _ScopeState]:
        key = scope or self.default_scope
        state = self._scopes.get(key)
        if state is None:
            state = self._scopes[key] = _ScopeState()
        return key, state

    def _usable(self, token: Token) -> bool:
        return bool(token.value) and self._clock() < token.expires_at - _EXPIRY_MARGIN

    async def get(self, scope: str | None = None) -> Token:
        """A usable token for ``scope`` (default: the app's SMTP scope); starts a background refresh
        when the current one is due for it."""
        key, state = self._state(scope)
        token = state.token
        if self._usable(token):
            if self._clock() >= token.refresh_at and state.refresh_task is None:
                state.refresh_task = asyncio.get_running_loop().create_task(self._background_refresh(key))
            return token
        async with state.lock:
            token = state.token
            if self._usable(token):  # another task fetched it while we waited
                return token
            return await self._fetch(key, force=True)

    async def _background_refresh(self, scope: str) -> None:
        state = self._scopes[scope]
        try:
            async with state.lock:
                if self._clock() >= state.token.refresh_at:
                    await self._fetch(scope, force=True)
        except TokenError as exc:
            log.warning("token refresh failed; the current token stays in use until it expires",
                        extra={"event": "token_refresh_failed", "app": self.app.name, "error": str(exc)})
        finally:
            state.refresh_task = None

    async def evict(self, rejected: Token | None = None, scope: str | None = None) -> None:
        """The server rejected the token: drop it so the next :meth:`get` fetches a new one.

        ``rejected`` avoids evicting a newer token fetched by a concurrent delivery meanwhile.
        """
        _, state = self._state(scope)
        async with state.lock:
            if rejected is None or rejected.value == state.token.value:
                state.token = Token()
                await asyncio.to_thread(self._forget_cached_token)

    async def _fetch(self, scope: str, *, force: bool) -> Token:
        state = self._scopes[scope]
        if force:
            await asyncio.to_thread(self._forget_cached_token)
        self.requests += 1
        try:
            try:
                # apps[].timeout bounds each request (TimeoutSession) and, with a second of margin
                # for the request's own, more precise, diagnosis, the whole acquisition.
                result = await call_with_deadline(lambda: self._acquire(scope), self.app.timeout + 1,
                                                  name=f"token-{self.app.name}")
            except TimeoutError:
                # The worker thread is still waiting on a silent socket (it ends by its own timeout).
                raise TokenError(self.app.name, "timeout",
                                 f"no answer from {host_of(self.app.effective_authority_host)} within "
                                 f"{_seconds(self.app.timeout)}", transient=True) from None
        except TokenError as exc:
            self.failures += 1
            log.warning("token request failed: %s", exc.description, extra={
                "event": "token_failed", "app": self.app.name, "error": exc.error,
                "endpoint": host_of(self.app.effective_authority_host), "transient": exc.transient,
                **({"aadsts": exc.aadsts} if exc.aadsts else {})})
            if self.on_failed:
                self.on_failed(exc)
            raise
        token = self._token_from(result)
        state.token = token
        if self.on_acquired:
            self.on_acquired(token)
        log.info("token acquired", extra={
            "event": "token_acquired", "app": self.app.name, "source": token.source,
            "expires_in": round(token.expires_at - self._clock()),
            **({"scope": scope} if scope != self.default_scope else {}),
        })
        return token

    def _msal(self) -> msal.ConfidentialClientApplication:
        """The one MSAL application of this app registration (worker thread only)."""
        with self._msal_lock:
            if self._msal_app is None:
                self._msal_app = msal.ConfidentialClientApplication(
                    self.app.client_id,
                    client_credential=self._credential,
                    authority=self.app.authority,
                    http_client=self._session,
                    instance_discovery=False,
                    timeout=self.app.timeout,
                )
            return self._msal_app

    def _forget_cached_token(self) -> None:
        # MSAL evicts the app's tokens of every scope; ours stay in ``_scopes`` and are still used.
        if self._msal_app is not None:
            self._msal_app.remove_tokens_for_client()

    def _acquire(self, scope: str | None = None) -> dict[str, Any]:
        """Runs in a worker thread: the only place that calls MSAL for a token."""
        try:
            result = self._msal().acquire_token_for_client(scopes=[scope or self.default_scope])
        except requests.RequestException as exc:
            raise http_failure(self.app.name, exc, self.app.effective_authority_host, self.app.timeout,
                               proxy=self._session.proxies.get("https")) from None
        except msal.exceptions.MsalServiceError as exc:
            # MSAL raises this for HTTP errors it cannot parse as OAuth errors (5xx, 429 pages).
            raise TokenError(self.app.name, "server_error", f"Entra ID answered {str(exc)[:80]}",
                             transient=True) from None
        except ValueError:
            # MSAL raises ValueError when the tenant's OIDC metadata cannot be had (HTTP 400 with
            # AADSTS90002 for an unknown tenant): a wrong tenant ID or cloud, not a passing fault.
            raise TokenError(self.app.name, "invalid_tenant",
                             f"no OpenID configuration for tenant {self.app.tenant_id} at "
                             f"{self.app.effective_authority_host}", aadsts=90002, transient=False) from None
        if not isinstance(result, dict):
            raise TokenError(self.app.name, "invalid_response", "MSAL returned no result", transient=True)
        if "access_token" in result:
            return result
        error = str(result.get("error", "unknown_error"))
        description = str(result.get("error_description", "")).split("\r\n", 1)[0].split("\n", 1)[0]
        codes = result.get("error_codes") or []
        aadsts = int(codes[0]) if codes and str(codes[0]).isdigit() else None
        transient = error in _TRANSIENT_ERRORS or (aadsts is None and error in {"unknown_error"})
        raise TokenError(self.app.name, error, description[:300], aadsts=aadsts, transient=transient)

    def _token_from(self, result: Mapping[str, Any]) -> Token:
        now = self._clock()
        expires_in = float(result.get("expires_in", 3600))
        refresh_in = result.get("refresh_in")
        refresh_after = float(refresh_in) if refresh_in else expires_in * 0.75
        refresh_after = min(refresh_after, max(expires_in - 2 * _EXPIRY_MARGIN, 0.0))
        return Token(
            value=str(result["access_token"]),
            expires_at=now + expires_in,
            refresh_at=now + refresh_after,
            source=str(result.get("token_source", "identity_provider")),
        )

    def close(self) -> None:
        for state in self._scopes.values():
            if state.refresh_task is not None:
                state.refresh_task.cancel()
        self._session.close()


class TokenProviders:
    """The providers of all configured apps, by app name."""

    def __init__(self, apps: tuple[AppSettings, ...], **kwargs: Any) -> None:
        self._by_name = {app.name: TokenProvider(app, **kwargs) for app in apps}

    def __getitem__(self, name: str) -> TokenProvider:
        return self._by_name[name]

    def __iter__(self) -> Any:
        return iter(self._by_name.values())

    def close(self) -> None:
        for provider in self._by_name.values():
            provider.close()
