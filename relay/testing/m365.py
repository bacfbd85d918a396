"""``SimulatedM365``: a whole Microsoft 365 (Entra ID token endpoint + Exchange Online SMTP) on loopback.

One object for tests, ``oauth-smtp-relay demo`` and the benchmarks, so they all set up tenants, apps
and mailboxes the same way an admin would (app registration, consent, ``New-ServicePrincipal``,
``Add-MailboxPermission``, ``Add-RecipientPermission``) and flip the same switches.

:meth:`SimulatedM365.standard` builds the usual fixture:

==================  ======================================  =============================================
what                value                                   rights
==================  ======================================  =============================================
tenant              ``11111111-1111-1111-1111-111111111111``
app (client ID)     ``22222222-2222-2222-2222-222222222222`` secret :data:`STANDARD_SECRET`, SMTP.SendAsApp
                                                            with admin consent, service principal in EXO
mailbox             ``relay@contoso.com``                   the app has FullAccess (XOAUTH2 ``user=``)
other From address  ``alerts@contoso.com``                  the app has SendAs
==================  ======================================  =============================================
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from relay.testing.certs import AppCertificate, ServerCertificates, write_server_certificates
from relay.testing.entra import EXCHANGE_RESOURCE, SMTP_SEND_AS_APP, AppRegistration, EntraSimulator
from relay.testing.exchange import DEFAULT_MAX_SEND_SIZE, ExchangeLimits, ExchangeSimulator, Mailbox
from relay.testing.graph import GraphSimulator

STANDARD_TENANT = "11111111-1111-1111-1111-111111111111"
STANDARD_CLIENT_ID = "22222222-2222-2222-2222-222222222222"
STANDARD_SECRET = "sim~secret-value.0123456789abcdefghijklmnop"
"""A client secret *value* shaped like Entra ID's (40 characters, with ``~`` and ``.``)."""
STANDARD_MAILBOX = "relay@contoso.com"
STANDARD_SEND_AS = "alerts@contoso.com"
STANDARD_DOMAIN = "contoso.onmicrosoft.com"


class SimulatedM365:
    """Token endpoint and Exchange SMTP server on 127.0.0.1 with ephemeral ports.

    Use as a context manager or with :meth:`start` / :meth:`stop`. Both servers run in their own
    threads, so the caller may be synchronous or asynchronous. ``workdir`` receives ``certs/``
    (``ca.pem`` for the relay to trust) and ``exchange-out/`` (the accepted messages).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        clock: Callable[[], float] = time.time,
        token_lifetime: int | None = None,
        seed: int = 0,
        limits: ExchangeLimits | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.clock = clock
        self.certs: ServerCertificates = write_server_certificates(self.workdir / "certs")
        self.entra = EntraSimulator(self.certs, clock=clock, token_lifetime=token_lifetime, seed=seed)
        self.exchange = ExchangeSimulator(
            self.certs,
            self.workdir / "exchange-out",
            token_key=self.entra.public_key,
            clock=clock,
            seed=seed,
            limits=limits,
        )
        # Microsoft Graph sendMail (transport: graph): same certificates, same token key, and the
        # mailboxes (and their SendAs rights) of the simulated Exchange.
        self.graph = GraphSimulator(
            self.certs,
            self.workdir / "graph-out",
            token_key=self.entra.public_key,
            directory=self._graph_directory,
            clock=clock,
            seed=seed,
        )

    @classmethod
    def standard(cls, workdir: Path, **kwargs: object) -> SimulatedM365:
        """The fixture of the module docstring (not started)."""
        m365 = cls(workdir, **kwargs)  # type: ignore[arg-type]
        m365.add_tenant(STANDARD_TENANT, domains=(STANDARD_DOMAIN,))
        m365.add_app(STANDARD_TENANT, STANDARD_CLIENT_ID, secret=STANDARD_SECRET)
        m365.add_mailbox(STANDARD_TENANT, STANDARD_MAILBOX, full_access=(STANDARD_CLIENT_ID,))
        m365.add_mailbox(STANDARD_TENANT, STANDARD_SEND_AS, send_as=(STANDARD_CLIENT_ID,))
        return m365

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> SimulatedM365:
        self.entra.start()
        self.exchange.start()
        self.graph.start()
        return self

    def stop(self) -> None:
        self.graph.stop()
        self.exchange.stop()
        self.entra.stop()

    def __enter__(self) -> SimulatedM365:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- where things are --------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        """The CA certificate the relay must trust for both servers."""
        return self.certs.ca_file

    @property
    def authority_host(self) -> str:
        return self.entra.authority_host

    def authority(self, tenant_id: str) -> str:
        """MSAL ``authority`` for a tenant: ``https://localhost:PORT/<tenant>``."""
        return self.entra.authority(tenant_id)

    @property
    def smtp_host(self) -> str:
        return self.exchange.host

    @property
    def smtp_port(self) -> int:
        return self.exchange.port

    @property
    def outdir(self) -> Path:
        return self.exchange.outdir

    @property
    def graph_host(self) -> str:
        """``https://localhost:PORT`` of the simulated Graph (``apps[].graph_host``)."""
        return self.graph.host

    def _graph_directory(self, address: str) -> tuple[str | None, frozenset[str]]:
        try:
            mailbox = self.exchange.mailbox(address)
        except KeyError:
            return None, frozenset()
        return mailbox.tenant_id, frozenset(mailbox.send_as)

    # -- admin setup -------------------------------------------------------------------------

    def add_tenant(self, tenant_id: str, *, domains: Iterable[str] = (), smtp_auth_enabled: bool = True) -> None:
        self.entra.add_tenant(tenant_id, domains=domains)
        self.exchange.add_tenant(tenant_id, smtp_auth_disabled=not smtp_auth_enabled)

    def add_app(
        self,
        tenant_id: str,
        client_id: str,
        *,
        secret: str | None = None,
        secret_expires_at: float | None = None,
        certificate: AppCertificate | None = None,
        roles: Iterable[str] = (SMTP_SEND_AS_APP,),
        admin_consent: bool = True,
        service_principal: bool = True,
        graph_roles: Iterable[str] = (),
    ) -> AppRegistration:
        """App registration + enterprise app; ``service_principal`` also runs ``New-ServicePrincipal``.

        ``graph_roles``: Microsoft Graph application permissions, e.g. ``("Mail.Send",)``."""
        app = self.entra.add_app(
            tenant_id,
            client_id,
            secret=secret,
            secret_expires_at=secret_expires_at,
            certificate=certificate,
            roles=roles,
            graph_roles=graph_roles,
            admin_consent=admin_consent,
        )
        if service_principal:
            self.exchange.register_service_principal(tenant_id, client_id, app.service_principal_id)
        return app

    def add_mailbox(
        self,
        tenant_id: str,
        address: str,
        *,
        full_access: Iterable[str] = (),
        send_as: Iterable[str] = (),
        smtp_auth_enabled: bool | None = None,
        max_send_size: int = DEFAULT_MAX_SEND_SIZE,
    ) -> Mailbox:
        """A mailbox; ``smtp_auth_enabled=None`` follows the tenant setting (Exchange's default)."""
        return self.exchange.add_mailbox(
            tenant_id,
            address,
            full_access=full_access,
            send_as=send_as,
            smtp_auth_enabled=smtp_auth_enabled,
            max_send_size=max_send_size,
        )

    # -- switches (delegates, so callers need not know which server owns which) ---------------

    def set_admin_consent(self, tenant_id: str, client_id: str, granted: bool) -> None:
        self.entra.set_admin_consent(tenant_id, client_id, granted)

    def register_service_principal(self, tenant_id: str, client_id: str, object_id: str | None = None) -> None:
        """``New-ServicePrincipal``; ``object_id`` defaults to the right (enterprise app) object ID."""
        oid = object_id or self.entra.app(tenant_id, client_id).service_principal_id
        self.exchange.register_service_principal(tenant_id, client_id, oid)

    def remove_service_principal(self, tenant_id: str, client_id: str) -> None:
        self.exchange.remove_service_principal(tenant_id, client_id)

    def grant_full_access(self, address: str, client_id: str) -> None:
        self.exchange.grant_full_access(address, client_id)

    def revoke_full_access(self, address: str, client_id: str) -> None:
        self.exchange.revoke_full_access(address, client_id)

    def grant_send_as(self, address: str, client_id: str) -> None:
        self.exchange.grant_send_as(address, client_id)

    def revoke_send_as(self, address: str, client_id: str) -> None:
        self.exchange.revoke_send_as(address, client_id)

    def set_mailbox_smtp_auth(self, address: str, enabled: bool | None) -> None:
        self.exchange.set_mailbox_smtp_auth(address, enabled)

    def set_tenant_smtp_auth(self, tenant_id: str, enabled: bool) -> None:
        self.exchange.set_tenant_smtp_auth(tenant_id, enabled)

    def set_quota_exhausted(self, address: str, exhausted: bool) -> None:
        self.exchange.set_quota_exhausted(address, exhausted)

    def issue_token(
        self, tenant_id: str = STANDARD_TENANT, client_id: str = STANDARD_CLIENT_ID, **kwargs: object
    ) -> str:
        """An Exchange access token minted without HTTP (for SMTP-only tests and benchmarks)."""
        token, _ = self.entra.issue_access_token(tenant_id, client_id, EXCHANGE_RESOURCE, **kwargs)  # type: ignore[arg-type]
        return token
