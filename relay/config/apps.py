"""The Microsoft side of the config: app registrations (tenant, client, credential, cloud and its
overrides) and the mailboxes the relay sends as."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from relay.config.clouds import CLOUDS, Cloud, CloudPreset
from relay.config.values import Address, Duration, FrozenModel, Size

#: The nil GUID of documentation examples: never a real tenant or app, refused with a precise message.
_NIL_GUID = "00000000-0000-0000-0000-000000000000"
_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


class CertificateCredential(FrozenModel):
    """An app certificate: a PEM private key + the thumbprint (or the PEM certificate), or a PFX."""

    private_key_file: Path | None = None
    thumbprint: str | None = None
    certificate_file: Path | None = None
    pfx_file: Path | None = None
    pfx_password: SecretStr | None = None
    pfx_password_file: Path | None = None

    @model_validator(mode="after")
    def _one_form(self) -> CertificateCredential:
        if self.pfx_file is None and self.private_key_file is None:
            raise ValueError("give private_key_file (with thumbprint or certificate_file) or pfx_file")
        if self.pfx_file is not None and self.private_key_file is not None:
            raise ValueError("give either private_key_file or pfx_file, not both")
        if self.private_key_file is not None and not (self.thumbprint or self.certificate_file):
            raise ValueError("private_key_file needs thumbprint (SHA-1 hex from the portal) or certificate_file")
        if self.thumbprint is not None and not re.fullmatch(r"[0-9A-Fa-f:]{40,95}", self.thumbprint):
            raise ValueError("thumbprint must be the certificate's hex thumbprint as shown in the portal")
        return self


class AppSettings(FrozenModel):
    name: str = Field(min_length=1)
    cloud: Cloud = Cloud.GLOBAL
    tenant_id: str
    client_id: str
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    certificate: CertificateCredential | None = None
    #: Workload identity federation (Kubernetes): a file holding the projected service-account token.
    federated_token_file: Path | None = None
    authority_host: str | None = None
    scope: str | None = None
    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    #: CA bundle to trust for the token endpoint / for the SMTP host, in addition to nothing else:
    #: when set, only these CAs are trusted. Unset: the system's trust store.
    token_ca_file: Path | None = None
    smtp_ca_file: Path | None = None
    #: HTTPS proxy for Entra ID requests (SMTP goes direct). Unset: HTTPS_PROXY/NO_PROXY if present.
    proxy: str | None = None
    timeout: Duration = 30.0
    #: Microsoft Graph (mailboxes with ``transport: graph``): root URL and token scope; unset: the
    #: cloud's. Graph requests use the same proxy and CA bundle as the token endpoint (both are
    #: HTTPS APIs of Microsoft reached through the same company proxy).
    graph_host: str | None = None
    graph_scope: str | None = None
    #: Largest MIME message sent by Graph. sendMail takes at most 4 MB per request and the MIME goes
    #: base64-encoded (+33 %): 3,000,000 bytes of MIME are 4,000,000 bytes on the wire.
    graph_max_mime: Size = Field(default=3_000_000, ge=1024)

    @field_validator("tenant_id")
    @classmethod
    def _check_tenant(cls, v: str) -> str:
        if v == _NIL_GUID:
            raise ValueError(f"{v} is the all-zero example value, not a tenant: put the Directory (tenant) ID "
                             "from the app registration's Overview page")
        if not (_GUID_RE.match(v) or _DOMAIN_RE.match(v)):
            raise ValueError(
                "expected the Directory (tenant) ID GUID from the app registration's Overview page "
                "(or the tenant's domain, e.g. contoso.onmicrosoft.com)"
            )
        return v

    @field_validator("client_id")
    @classmethod
    def _check_client(cls, v: str) -> str:
        if v == _NIL_GUID:
            raise ValueError(f"{v} is the all-zero example value, not an app: put the Application (client) ID "
                             "from the app registration's Overview page")
        if not _GUID_RE.match(v):
            raise ValueError("expected the Application (client) ID GUID from the app registration's Overview page")
        return v

    @model_validator(mode="after")
    def _one_credential(self) -> AppSettings:
        given = [k for k in ("client_secret", "certificate", "federated_token_file") if getattr(self, k)]
        if len(given) == 0:
            raise ValueError(
                "no credential: set client_secret (or client_secret_file), certificate, or "
                "federated_token_file (admin step 4)"
            )
        if len(given) > 1:
            raise ValueError(f"give exactly one credential, found {', '.join(given)}")
        return self

    @property
    def preset(self) -> CloudPreset:
        return CLOUDS[self.cloud]

    @property
    def effective_authority_host(self) -> str:
        return (self.authority_host or self.preset.authority_host).rstrip("/")

    @property
    def authority(self) -> str:
        return f"{self.effective_authority_host}/{self.tenant_id}"

    @property
    def effective_scope(self) -> str:
        return self.scope or self.preset.scope

    @property
    def effective_smtp_host(self) -> str:
        return self.smtp_host or self.preset.smtp_host

    @property
    def effective_graph_host(self) -> str:
        return (self.graph_host or self.preset.graph_host).rstrip("/")

    @property
    def effective_graph_scope(self) -> str:
        return self.graph_scope or self.preset.graph_scope


class MailboxSettings(FrozenModel):
    address: Address
    app: str
    #: ``smtp``: SMTP AUTH XOAUTH2 (SMTP.SendAsApp). ``graph``: Microsoft Graph sendMail with the raw
    #: MIME (Mail.Send application permission), for tenants that keep SMTP AUTH switched off.
    transport: Literal["smtp", "graph"] = "smtp"
    #: ``transport: graph`` only: send messages too big for Graph (apps[].graph_max_mime) by SMTP
    #: instead of refusing them. Needs SMTP AUTH working for this mailbox as well.
    fallback_smtp: bool = False
    connections: int | None = Field(default=None, ge=1, le=50)
    per_minute: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _fallback_needs_graph(self) -> MailboxSettings:
        if self.fallback_smtp and self.transport != "graph":
            raise ValueError("fallback_smtp only applies to a mailbox with transport: graph")
        return self
