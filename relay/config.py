"""YAML configuration -> validated, frozen settings.

Secrets never need to sit in the file: any string may reference an environment variable as
``${NAME}``, and every secret has a ``*_file`` twin (systemd ``LoadCredential=`` puts files under
``$CREDENTIALS_DIRECTORY``, Docker under ``/run/secrets``). Every problem becomes a
:class:`relay.errors.ConfigError` naming the file, the key and the fix; the CLI exits 2 on it.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from relay.errors import ConfigError

# --------------------------------------------------------------------------- value parsers

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|k|mb|m|gb|g|kib|mib|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


def parse_duration(value: Any) -> float:
    """``10s``, ``5m``, ``24h``, ``1d``, ``250ms`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, 5m, 24h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 10s, 5m, 24h, got {value!r}")


def parse_size(value: Any) -> int:
    """``35MB``, ``512KiB`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 25MB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(f"expected a size such as 25MB or 512KiB, got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]

#: The nil GUID of documentation examples: never a real tenant or app, refused with a precise message.
_NIL_GUID = "00000000-0000-0000-0000-000000000000"
_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_ADDRESS_RE = re.compile(r"^[^@\s<>\x00]+@[^@\s<>\x00]+$")


def _address(value: str) -> str:
    if not _ADDRESS_RE.match(value):
        raise ValueError(f"expected an email address like user@contoso.com, got {value!r}")
    return value.lower()


Address = Annotated[str, BeforeValidator(lambda v: _address(v) if isinstance(v, str) else v)]


def parse_host_port(value: str, default_port: int) -> tuple[str, int]:
    """``127.0.0.1:2525``, ``[::1]:2525``, ``localhost`` -> (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif value.count(":") > 1:  # bare IPv6 address
        host, port = value, str(default_port)
    else:
        host, port = value, str(default_port)
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port (tests)
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:2525, got {value!r}")
    return host, int(port)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------- clouds

class Cloud(StrEnum):
    GLOBAL = "global"
    GCC = "gcc"
    GCC_HIGH = "gcc-high"
    DOD = "dod"
    CHINA = "china"
    HVE = "hve"


class CloudPreset(_Model):
    authority_host: str
    scope: str
    smtp_host: str
    connections: int = 3
    per_minute: int = 30
    #: Microsoft Graph root and its token scope (mailboxes with ``transport: graph``).
    graph_host: str = "https://graph.microsoft.com"
    graph_scope: str = "https://graph.microsoft.com/.default"


#: docs/exchange.md, "Clouds". DoD, China and HVE hosts are marked unverified there: every value is
#: overridable per app (authority_host, scope, smtp_host) and per mailbox (pacing).
CLOUDS: Mapping[Cloud, CloudPreset] = {
    Cloud.GLOBAL: CloudPreset(authority_host="https://login.microsoftonline.com",
                              scope="https://outlook.office365.com/.default", smtp_host="smtp.office365.com"),
    Cloud.GCC: CloudPreset(authority_host="https://login.microsoftonline.com",
                           scope="https://outlook.office365.com/.default", smtp_host="smtp.office365.com"),
    Cloud.GCC_HIGH: CloudPreset(authority_host="https://login.microsoftonline.us",
                                scope="https://outlook.office365.us/.default", smtp_host="smtp.office365.us",
                                graph_host="https://graph.microsoft.us",
                                graph_scope="https://graph.microsoft.us/.default"),
    Cloud.DOD: CloudPreset(authority_host="https://login.microsoftonline.us",
                           scope="https://outlook-dod.office365.us/.default",
                           smtp_host="outlook-dod.office365.us",
                           graph_host="https://dod-graph.microsoft.us",
                           graph_scope="https://dod-graph.microsoft.us/.default"),
    Cloud.CHINA: CloudPreset(authority_host="https://login.partner.microsoftonline.cn",
                             scope="https://partner.outlook.cn/.default", smtp_host="smtp.partner.outlook.cn",
                             graph_host="https://microsoftgraph.chinacloudapi.cn",
                             graph_scope="https://microsoftgraph.chinacloudapi.cn/.default"),
    # High Volume Email: internal recipients only; its limits are not published per minute the way
    # mailbox submission's are, so the pacing default is deliberately higher but still bounded.
    Cloud.HVE: CloudPreset(authority_host="https://login.microsoftonline.com",
                           scope="https://outlook.office365.com/.default", smtp_host="smtp.hve.mx.microsoft",
                           connections=3, per_minute=120),
}


# --------------------------------------------------------------------------- sections

class TlsMode(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class ListenSettings(_Model):
    address: str = "127.0.0.1:2525"
    tls: TlsMode = TlsMode.NONE

    @field_validator("address")
    @classmethod
    def _check_address(cls, v: str) -> str:
        parse_host_port(v, 2525)
        return v

    @property
    def host(self) -> str:
        return parse_host_port(self.address, 2525)[0]

    @property
    def port(self) -> int:
        return parse_host_port(self.address, 2525)[1]


class ListenerTlsSettings(_Model):
    cert_file: Path
    key_file: Path
    min_version: Literal["1.2", "1.3"] = "1.2"


class AuthMode(StrEnum):
    OPTIONAL = "optional"  # allowlisted networks may send without AUTH; others must authenticate
    REQUIRED = "required"  # everyone authenticates
    NONE = "none"  # no AUTH offered: allowlisted networks only


class NetworkRule(_Model):
    network: str
    may_send_as: tuple[str, ...] = ()
    mailbox: Address | None = None

    @field_validator("network")
    @classmethod
    def _check_network(cls, v: str) -> str:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ValueError(f"expected a network such as 10.0.0.0/8 or ::1, got {v!r}") from None
        return v


def _network_rule(value: Any) -> Any:
    return {"network": value} if isinstance(value, str) else value


class AcceptSettings(_Model):
    networks: tuple[Annotated[NetworkRule, BeforeValidator(_network_rule)], ...] = (
        NetworkRule(network="127.0.0.0/8"),
        NetworkRule(network="::1"),
    )
    auth: AuthMode = AuthMode.OPTIONAL
    #: AUTH over a connection without TLS: allowed only from loopback unless set to ``anywhere``.
    plaintext_auth: Literal["loopback", "anywhere"] = "loopback"


class UserSettings(_Model):
    name: str = Field(min_length=1)
    password_hash: str
    may_send_as: tuple[str, ...] = ()
    mailbox: Address | None = None

    @field_validator("password_hash")
    @classmethod
    def _check_hash(cls, v: str) -> str:
        if not v.startswith(("scrypt$", "$argon2")):
            raise ValueError(
                "expected a password hash made by `oauth-smtp-relay hash-password` (scrypt$...), "
                "never a plain password"
            )
        return v


class CertificateCredential(_Model):
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


class AppSettings(_Model):
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


class MailboxSettings(_Model):
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


class RewriteFrom(StrEnum):
    NEVER = "never"
    WHEN_NOT_ALLOWED = "when-not-allowed"
    ALWAYS = "always"


class SenderSettings(_Model):
    default_mailbox: Address | None = None
    rewrite_from: RewriteFrom = RewriteFrom.WHEN_NOT_ALLOWED


class PerMailboxSettings(_Model):
    connections: int = Field(default=3, ge=1, le=50)
    #: messages per minute per mailbox; 0 disables pacing (benchmarks only: Exchange throttles).
    per_minute: int = Field(default=30, ge=0)


class RetrySettings(_Model):
    first: Duration = 30.0
    max: Duration = 3600.0
    factor: float = Field(default=2.0, ge=1.0)


class DsnSettings(_Model):
    to_sender: bool = False
    admin: Address | None = None


class DeliverySettings(_Model):
    sync_wait: Duration = 10.0
    max_age: Duration = 86400.0
    timeout: Duration = 60.0
    retry: RetrySettings = RetrySettings()
    per_mailbox: PerMailboxSettings = PerMailboxSettings()
    idle_close: Duration = 60.0
    #: first interval between AUTH probes of a held mailbox/app (doubles while it stays broken)
    probe_interval: Duration = 30.0
    #: on SIGTERM, how long in-flight deliveries may finish before they are abandoned (they stay spooled)
    stop_grace: Duration = 10.0
    dsn: DsnSettings = DsnSettings()


class AuthFailureSettings(_Model):
    """Failed AUTH per client (an address; all of loopback is one client, IPv6 by /64): ``max``
    failures within ``window`` ban the client for ``ban``. An attempt takes its place in the count
    before its password is checked; a successful login clears no failure.

    Each failure before that also delays the answer by ``delay`` x (failures so far), at most
    ``max_delay``: a password guesser slows down, an app with a typo barely notices."""

    max: int = Field(default=10, ge=1)
    window: Duration = 600.0
    ban: Duration = 900.0
    delay: Duration = 0.2
    max_delay: Duration = 2.0


class LimitSettings(_Model):
    max_message_size: Size = 35 * 1024 * 1024
    max_recipients: int = Field(default=1000, ge=1)
    max_connections: int = Field(default=200, ge=1)
    max_connections_per_address: int = Field(default=50, ge=1)
    idle_timeout: Duration = 300.0
    data_timeout: Duration = 600.0
    #: longest a client connection may last: a command after it gets 421 4.4.2 and the connection is
    #: closed (a client sending NOOP every few seconds cannot keep a connection slot forever); one
    #: still silent or in DATA then is closed ``data_timeout`` later at the latest.
    max_session: Duration = Field(default=3600.0, gt=0)
    #: longest DATA line accepted. RFC 5321 says 998, but legacy apps write longer lines (HTML on one
    #: line) and Exchange Online accepts them, so the default is lenient; set 998 to be strict.
    line_length: int = Field(default=10000, ge=78)
    #: longest SMTP command line (RFC 5321 asks for at least 512; AUTH with an initial response and
    #: MAIL FROM with parameters need more).
    command_line_length: int = Field(default=4096, ge=512, le=65536)
    #: the header block of a message (all header lines together) may not exceed this.
    max_header_size: Size = Field(default=256 * 1024, ge=1024)
    auth_failures: AuthFailureSettings = AuthFailureSettings()


class SpoolSettings(_Model):
    path: Path = Path("/var/spool/oauth-smtp-relay")
    fsync: bool = True
    #: refuse new mail (452 4.3.1) below this much free space, so the queue can always drain
    min_free: Size = 64 * 1024 * 1024


class ObservabilitySettings(_Model):
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    http: str | None = None

    @field_validator("http")
    @classmethod
    def _check_http(cls, v: str | None) -> str | None:
        if v is not None:
            parse_host_port(v, 9465)
        return v


class FleetFallbackSettings(_Model):
    """This relay's own share of each mailbox's limits while Redis cannot be reached."""

    connections: int = Field(default=1, ge=1, le=50)
    per_minute: int = Field(default=6, ge=0)


class FleetSettings(_Model):
    """Several relays sending as the same mailboxes share its limits through Redis (docs/fleet.md)."""

    #: ``redis://host:6379/0`` or ``rediss://`` (TLS); a user name may be given (``redis://relay@host``),
    #: the password goes in ``password_file`` (or ``password: ${ENV}``).
    redis: str
    password: SecretStr | None = None
    #: CA bundle that signs the Redis server's certificate (``rediss://``); unset: the system's.
    ca_file: Path | None = None
    key_prefix: str = Field(default="oauth-smtp-relay:", min_length=1, max_length=100)
    #: names this relay in ``fleet status`` and in slot leases; unset: host name + process id.
    instance_id: str | None = Field(default=None, min_length=1, max_length=200)
    #: recipients per mailbox in any 24 hours, fleet-wide (Exchange Online allows 10,000); 0: no budget.
    recipients_per_day: int = Field(default=10_000, ge=0)
    fallback: FleetFallbackSettings = FleetFallbackSettings()
    #: longest wait for one Redis call; past it the relay uses its fallback share.
    deadline: Duration = Field(default=0.5, gt=0)
    #: a session slot's lease: renewed while the session lives, so a killed relay's slots come back
    #: within this time.
    lease_ttl: Duration = Field(default=30.0, ge=1)
    #: heartbeat, lease renewal and shared holds are synchronised this often.
    sync_interval: Duration = Field(default=1.0, gt=0)
    #: an idle Exchange session is closed (its slot given back to the fleet) after this long.
    idle_release: Duration = Field(default=2.0, gt=0)

    @field_validator("redis")
    @classmethod
    def _check_url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"expected a URL such as redis://redis:6379/0 or rediss://redis:6380/0, got {v!r}")
        if parts.password:
            raise ValueError("do not put the Redis password in the URL: set fleet.password_file "
                             "(or fleet.password: ${REDIS_PASSWORD})")
        return v

    @model_validator(mode="after")
    def _check_fallback(self) -> FleetSettings:
        if self.lease_ttl < 3 * self.sync_interval:
            raise ValueError(f"lease_ttl ({self.lease_ttl:g} s) must be at least three times sync_interval "
                             f"({self.sync_interval:g} s): leases are renewed every sync_interval")
        return self


class Settings(_Model):
    """The whole configuration. Frozen: a reload builds a new one."""

    listen: tuple[ListenSettings, ...] = (ListenSettings(),)
    tls: ListenerTlsSettings | None = None
    hostname: str | None = None
    accept: AcceptSettings = AcceptSettings()
    users: tuple[UserSettings, ...] = ()
    apps: tuple[AppSettings, ...] = Field(min_length=1)
    mailboxes: tuple[MailboxSettings, ...] = Field(min_length=1)
    sender: SenderSettings = SenderSettings()
    delivery: DeliverySettings = DeliverySettings()
    limits: LimitSettings = LimitSettings()
    spool: SpoolSettings = SpoolSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    #: optional: share each mailbox's limits with other relays through Redis (relay.fleet)
    fleet: FleetSettings | None = None

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        _unique("apps", [a.name for a in self.apps])
        _unique("mailboxes", [m.address for m in self.mailboxes])
        _unique("users", [u.name for u in self.users])
        app_names = {a.name for a in self.apps}
        for i, mbx in enumerate(self.mailboxes):
            if mbx.app not in app_names:
                raise _KeyedError(f"mailboxes[{i}].app",
                                  f"no app named {mbx.app!r}; apps are: {', '.join(sorted(app_names))}")
        mailboxes = {m.address for m in self.mailboxes}
        if self.sender.default_mailbox and self.sender.default_mailbox not in mailboxes:
            raise _KeyedError("sender.default_mailbox",
                              f"{self.sender.default_mailbox!r} is not listed under mailboxes")
        for i, user in enumerate(self.users):
            if user.mailbox and user.mailbox not in mailboxes:
                raise _KeyedError(f"users[{i}].mailbox", f"{user.mailbox!r} is not listed under mailboxes")
        for i, rule in enumerate(self.accept.networks):
            if rule.mailbox and rule.mailbox not in mailboxes:
                raise _KeyedError(f"accept.networks[{i}].mailbox",
                                  f"{rule.mailbox!r} is not listed under mailboxes")
        needs_tls = [lst.address for lst in self.listen if lst.tls is not TlsMode.NONE]
        if needs_tls and self.tls is None:
            raise _KeyedError("tls", f"listener(s) {', '.join(needs_tls)} use TLS: set tls.cert_file and tls.key_file")
        if self.accept.auth is not AuthMode.NONE and not self.users and self.accept.auth is AuthMode.REQUIRED:
            raise _KeyedError("users", "accept.auth is 'required' but no users are configured")
        _refuse_open_relay(self)
        return self

    def app(self, name: str) -> AppSettings:
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(name)

    def mailbox(self, address: str) -> MailboxSettings | None:
        address = address.lower()
        for mbx in self.mailboxes:
            if mbx.address == address:
                return mbx
        return None

    def _pacing_default(self, mbx: MailboxSettings, key: str) -> int:
        """delivery.per_mailbox.<key> when the admin set it, else the app's cloud preset (HVE differs)."""
        per_mailbox = self.delivery.per_mailbox
        if key in per_mailbox.model_fields_set:
            return int(getattr(per_mailbox, key))
        try:
            return int(getattr(self.app(mbx.app).preset, key))
        except KeyError:
            return int(getattr(per_mailbox, key))

    def mailbox_connections(self, mbx: MailboxSettings) -> int:
        return mbx.connections or self._pacing_default(mbx, "connections")

    def mailbox_per_minute(self, mbx: MailboxSettings) -> int:
        if mbx.per_minute is not None:
            return mbx.per_minute
        return self._pacing_default(mbx, "per_minute")


#: Address blocks that are never reachable from the Internet: allowlisting all of them is not an open
#: relay. Anything else counts as public.
_NON_PUBLIC_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(n) for n in (
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10",
        "::1/128", "fc00::/7", "fe80::/10",
    )
)
#: Widest allowlist entries that may contain public addresses (a large company's public range).
OPEN_RELAY_MIN_PREFIX = {4: 16, 6: 48}


def is_loopback_host(host: str) -> bool:
    """Is ``host`` this machine: a listen address that only accepts local connections, or a client's
    address (IPv4 127/8, ::1, and IPv4-mapped IPv6 of those)? The listener asks the same question."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a DNS name other than localhost: assume it resolves beyond loopback
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def too_wide(network: str) -> bool:
    """An allowlist entry that opens the relay to (a large part of) the Internet.

    True when the entry contains public addresses and is wider than /16 (IPv4) or /48 (IPv6):
    ``0.0.0.0/0``, ``::/0``, ``0.0.0.0/1``, ``2000::/3``. Private blocks of any size (``10.0.0.0/8``,
    ``172.16.0.0/12``, ``fc00::/7``) and a public /24 are fine.
    """
    net = ipaddress.ip_network(network, strict=False)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        mapped = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}", strict=False)
        return too_wide(str(mapped))
    if any(net.version == block.version and net.subnet_of(block)  # type: ignore[arg-type]
           for block in _NON_PUBLIC_NETWORKS):
        return False
    return net.prefixlen < OPEN_RELAY_MIN_PREFIX[net.version]


def open_relay_problem(settings: Settings, listening: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """Invariant 4: never run as an open relay. ``listening`` is (host, address shown) of every
    listener to judge: the file's own ``listen`` at start, the sockets actually bound on a reload
    (a changed ``listen`` needs a restart, so the old sockets are the ones that take mail).

    An open relay: a listener reachable beyond loopback while mail without AUTH is accepted from a
    network that is too wide (:func:`too_wide`). Each half alone is fine: a wide allowlist on a
    loopback-only listener reaches nobody, and a public listener with ``accept.auth: required`` (or a
    narrow allowlist) only takes mail from known users or hosts. Returns (key, problem) or None.
    """
    if settings.accept.auth is AuthMode.REQUIRED:
        return None
    public = [address for host, address in listening if not is_loopback_host(host)]
    if not public:
        return None
    for i, rule in enumerate(settings.accept.networks):
        if too_wide(rule.network):
            return (
                f"accept.networks[{i}]",
                f"{rule.network!r} lets anyone on the Internet send mail without a password through this relay "
                f"(an open relay), and the relay listens beyond loopback on {', '.join(public)}. Fix: list only "
                "the networks of your own apps (e.g. 10.1.2.0/24), or set accept.auth: required so every client "
                "logs in, or listen on 127.0.0.1 only. Entries wider than /16 (IPv4) or /48 (IPv6) that contain "
                "public addresses are refused.",
            )
    return None


def _refuse_open_relay(settings: Settings) -> None:
    problem = open_relay_problem(settings, [(lst.host, lst.address) for lst in settings.listen])
    if problem is not None:
        raise _KeyedError(*problem)


class _KeyedError(ValueError):
    """A cross-reference problem that knows which key it is about."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(problem)


def _unique(section: str, names: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise _KeyedError(f"{section}[{i}]", f"{name!r} appears twice")
        seen.add(name)


# --------------------------------------------------------------------------- loading

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PLACEHOLDER_RE = re.compile(r"<[A-Z][A-Z0-9_ -]*>")
#: keys whose value is a secret; each has a ``<key>_file`` twin read at load time.
_SECRET_FILE_KEYS = {"client_secret_file": "client_secret", "pfx_password_file": "pfx_password",
                     "password_file": "password"}
_INLINE_SECRET_KEYS = {"client_secret", "pfx_password", "password"}
#: keys that hold an app's credential or point at it: only token requests need them.
_CREDENTIAL_KEYS = {*_SECRET_FILE_KEYS, *_INLINE_SECRET_KEYS, "private_key_file", "certificate_file", "pfx_file",
                    "federated_token_file"}


def _key_path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Resolver:
    """Expand ``${ENV}``, collect example placeholders, read ``*_file`` secrets.

    ``read_secrets=False`` (commands that need no credential: queue, health, exchange-setup): no
    secret file is read, and a credential key whose ``${VAR}`` is unset (``${CREDENTIALS_DIRECTORY}``
    outside the service) keeps its text. ``lenient_credentials`` does the latter while still reading
    every secret it can (``check --offline`` from an admin's shell); the keys left unread are listed
    in ``unread``.
    """

    def __init__(self, file: str, base: Path, env: Mapping[str, str], *, read_secrets: bool,
                 lenient_credentials: bool) -> None:
        self.file = file
        self.base = base
        self.env = env
        self.read_secrets = read_secrets
        self.lenient = lenient_credentials or not read_secrets
        self.inline_secrets: list[str] = []
        self.placeholders: list[tuple[str, str]] = []
        self.unread: list[str] = []
        self._unread_paths: set[tuple[str | int, ...]] = set()
        #: secret files to read once the whole file is known to hold no placeholder
        self._pending: list[tuple[dict[str, Any], str, Any, tuple[str | int, ...]]] = []

    def read_secret_files(self) -> None:
        for out, secret_key, secret_file, path in self._pending:
            out[secret_key] = _read_secret_file(secret_file, path, self.file, self.base)

    def resolve(self, node: Any, path: tuple[str | int, ...] = ()) -> Any:
        if isinstance(node, dict):
            return self._mapping(node, path)
        if isinstance(node, list):
            return [self.resolve(v, (*path, i)) for i, v in enumerate(node)]
        if isinstance(node, str):
            return self._string(node, path)
        return node

    def _mapping(self, node: dict[Any, Any], path: tuple[str | int, ...]) -> dict[str, Any]:
        file = self.file
        out: dict[str, Any] = {}
        for key, value in node.items():
            if not isinstance(key, str):
                raise ConfigError(file, _key_path((*path, str(key))), "keys must be strings")
            out[key] = self.resolve(value, (*path, key))
        for file_key, secret_key in _SECRET_FILE_KEYS.items():
            if file_key in out:
                if secret_key in out:
                    raise ConfigError(file, _key_path((*path, file_key)),
                                      f"give either {secret_key} or {file_key}, not both")
                secret_file = out.pop(file_key)
                out[secret_key] = "not-read"
                if self.read_secrets and (*path, file_key) not in self._unread_paths:
                    self._pending.append((out, secret_key, secret_file, (*path, file_key)))
            elif isinstance(out.get(secret_key), str) and secret_key in node and "${" not in str(node[secret_key]):
                self.inline_secrets.append(_key_path((*path, secret_key)))
        return out

    def _string(self, node: str, path: tuple[str | int, ...]) -> str:
        def substitute(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in self.env:
                return self.env[name]
            if self.lenient and path and path[-1] in _CREDENTIAL_KEYS:
                self._unread_paths.add(path)
                self.unread.append(f"{_key_path(path)} (${{{name}}} is not set)")
                return m.group(0)
            raise ConfigError(self.file, _key_path(path),
                              f"environment variable {name} is not set (referenced as ${{{name}}})")

        value = _ENV_RE.sub(substitute, node)
        if _PLACEHOLDER_RE.search(value):
            self.placeholders.append((_key_path(path), value))
        return value


def _read_secret_file(value: Any, path: tuple[str | int, ...], file: str, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(file, _key_path(path), "expected the path of a file holding the secret")
    secret_path = Path(value)
    if not secret_path.is_absolute():
        secret_path = base / secret_path
    try:
        text = secret_path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(file, _key_path(path),
                          f"cannot read {secret_path}: {exc.strerror or exc}; check the path and that the "
                          "relay's user may read it") from None
    if not text:
        raise ConfigError(file, _key_path(path), f"{secret_path} is empty")
    return text


def _relative_paths(settings_dict: dict[str, Any], base: Path) -> None:
    """File paths in the config are relative to the config file's folder."""
    def fix(node: Any, key: str) -> Any:
        if isinstance(node, str) and key.endswith(("_file", "path")) and not os.path.isabs(node):
            return str(base / node)
        if isinstance(node, dict):
            return {k: fix(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v, key) for v in node]
        return node

    for k, v in list(settings_dict.items()):
        settings_dict[k] = fix(v, k)


def _suggest(loc: tuple[str | int, ...], raw: Any) -> str:
    """'did you mean ...' for an unknown key, from the keys the model allows."""
    model: Any = Settings
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            for c in args:
                inner = getattr(c, "__origin__", None)
                if inner is not None:
                    for a in getattr(c, "__args__", ()):
                        if isinstance(a, type) and issubclass(a, BaseModel):
                            model = a
    if model is None:
        return ""
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {match[0]!r}?)" if match else f" (allowed: {', '.join(model.model_fields)})"


def load_settings(path: str | os.PathLike[str], env: Mapping[str, str] | None = None, *,
                  read_secrets: bool = True, unread_credentials: list[str] | None = None) -> Settings:
    """Read, resolve and validate a config file. Raises ConfigError naming file and key.

    ``read_secrets=False``: for commands that use no credential (see :class:`_Resolver`). A list
    passed as ``unread_credentials`` makes a credential key with an unset ``${VAR}`` no error: it is
    left unread and named in the list."""
    file = str(path)
    env = os.environ if env is None else env
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read the config file: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(file, "", f"not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(file, "", "expected a mapping of sections (listen, apps, mailboxes, ...)")
    base = Path(path).resolve().parent
    load_warnings.clear()  # warnings are about the file just loaded
    # read_secrets=False: commands that need no credential (exchange-setup, queue, health) work on an
    # admin's machine, or from a root shell, without the secret files and without CREDENTIALS_DIRECTORY.
    resolver = _Resolver(file, base, env, read_secrets=read_secrets,
                         lenient_credentials=unread_credentials is not None)
    resolved = resolver.resolve(raw)
    if resolver.placeholders:
        # All of them at once: the admin edits the file once, not once per placeholder.
        lines = [f"{value!r} is a placeholder from the example config: put the real value here"
                 for _, value in resolver.placeholders]
        problem = lines[0] + "".join(f"\n{file}: {key}: {line}"
                                     for (key, _), line in zip(resolver.placeholders[1:], lines[1:], strict=True))
        raise ConfigError(file, resolver.placeholders[0][0], problem)
    resolver.read_secret_files()
    if unread_credentials is not None:
        unread_credentials.extend(resolver.unread)
    _relative_paths(resolved, base)
    settings = settings_from_dict(resolved, file)
    if resolver.inline_secrets:
        _warn_if_readable(Path(path), resolver.inline_secrets)
    return settings


#: warnings produced while loading (e.g. world-readable file with inline secrets); the service logs them.
load_warnings: list[str] = []


def _warn_if_readable(path: Path, keys: list[str]) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        load_warnings.append(
            f"{path} holds an inline secret ({', '.join(keys)}) and is readable by group/others: "
            f"chmod 600 {path}, or move the secret to a *_file or ${{ENV}} reference"
        )


def settings_from_dict(data: Mapping[str, Any], file: str = "<config>") -> Settings:
    """Validate an already-resolved mapping (used by load_settings and by the demo)."""
    try:
        return Settings.model_validate(data)
    except _KeyedError as exc:
        raise ConfigError(file, exc.key, exc.problem) from None
    except ValidationError as exc:
        errors = exc.errors()
        # An entry that failed also makes its list look empty or its section invalid ("Tuple should
        # have at least 1 item"): that echo of the real problem is dropped, the real problem stays.
        locs = [tuple(err["loc"]) for err in errors]
        errors = [err for err, loc in zip(errors, locs, strict=True)
                  if not any(len(other) > len(loc) and other[:len(loc)] == loc for other in locs)]
        problems = list(dict.fromkeys(_describe(err, data) for err in errors))
        key, problem = problems[0]
        for other_key, other_problem in problems[1:_MAX_PROBLEMS]:
            problem += f"\n{file}: {other_key}: {other_problem}"
        if len(problems) > _MAX_PROBLEMS:
            problem += f"\n{file}: ... and {len(problems) - _MAX_PROBLEMS} more problem(s)"
        raise ConfigError(file, key, problem) from None


_MAX_PROBLEMS = 10

#: pydantic's wording -> the admin's, by error type (the rest keep their message, minus "Value error, ").
_PLAIN_PROBLEMS = {
    "string_type": "expected text",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "tuple_type": "expected a list, e.g. [a, b] or one '- item' per line",
    "list_type": "expected a list, e.g. [a, b] or one '- item' per line",
    "dict_type": "expected a mapping of keys (key: value), not a single value",
    "model_type": "expected a mapping of keys (key: value), not a single value",
    "model_attributes_type": "expected a mapping of keys (key: value), not a single value",
    "path_type": "expected a file or directory path",
}


def _describe(err: Any, data: Mapping[str, Any]) -> tuple[str, str]:
    """One pydantic error -> (key path, what is wrong and how to fix it)."""
    loc = tuple(err["loc"])
    inner = (err.get("ctx") or {}).get("error")
    if isinstance(inner, _KeyedError):
        return inner.key, inner.problem
    key = _key_path(loc)
    if err["type"] == "extra_forbidden":
        return key, "unknown key" + _suggest(loc, data)
    if err["type"] == "missing":
        return key, "required key is missing"
    if err["type"] in _PLAIN_PROBLEMS:
        return key, _PLAIN_PROBLEMS[err["type"]]
    ctx = err.get("ctx") or {}
    if err["type"] == "too_short":
        n = ctx.get("min_length", 1)
        return key, f"needs at least {n} {'entry' if n == 1 else 'entries'}"
    bounds = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "more than"),
              "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}
    if err["type"] in bounds and bounds[err["type"]][0] in ctx:
        name, words = bounds[err["type"]]
        return key, f"expected a number {words} {ctx[name]}"
    if err["type"] in ("enum", "literal_error") and "expected" in ctx:
        return key, f"expected one of {ctx['expected']}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return key, msg.replace("Input should be", "expected").replace("input should be", "expected")

