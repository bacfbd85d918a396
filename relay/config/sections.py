"""The sections around the apps and mailboxes: listeners and their TLS, who may send (networks and
users), sender rewriting, delivery and retries, limits, the spool, observability and the fleet."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator

from relay.config.values import Address, Duration, FrozenModel, Size, parse_host_port


class TlsMode(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class ListenSettings(FrozenModel):
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


class ListenerTlsSettings(FrozenModel):
    cert_file: Path
    key_file: Path
    min_version: Literal["1.2", "1.3"] = "1.2"


class AuthMode(StrEnum):
    OPTIONAL = "optional"  # allowlisted networks may send without AUTH; others must authenticate
    REQUIRED = "required"  # everyone authenticates
    NONE = "none"  # no AUTH offered: allowlisted networks only


class NetworkRule(FrozenModel):
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


class AcceptSettings(FrozenModel):
    networks: tuple[Annotated[NetworkRule, BeforeValidator(_network_rule)], ...] = (
        NetworkRule(network="127.0.0.0/8"),
        NetworkRule(network="::1"),
    )
    auth: AuthMode = AuthMode.OPTIONAL
    #: AUTH over a connection without TLS: allowed only from loopback unless set to ``anywhere``.
    plaintext_auth: Literal["loopback", "anywhere"] = "loopback"


class UserSettings(FrozenModel):
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

class RewriteFrom(StrEnum):
    NEVER = "never"
    WHEN_NOT_ALLOWED = "when-not-allowed"
    ALWAYS = "always"


class SenderSettings(FrozenModel):
    default_mailbox: Address | None = None
    rewrite_from: RewriteFrom = RewriteFrom.WHEN_NOT_ALLOWED


class PerMailboxSettings(FrozenModel):
    connections: int = Field(default=3, ge=1, le=50)
    #: messages per minute per mailbox; 0 disables pacing (benchmarks only: Exchange throttles).
    per_minute: int = Field(default=30, ge=0)


class RetrySettings(FrozenModel):
    first: Duration = 30.0
    max: Duration = 3600.0
    factor: float = Field(default=2.0, ge=1.0)


class DsnSettings(FrozenModel):
    to_sender: bool = False
    admin: Address | None = None


class DeliverySettings(FrozenModel):
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


class AuthFailureSettings(FrozenModel):
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


class LimitSettings(FrozenModel):
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


class SpoolSettings(FrozenModel):
    path: Path = Path("/var/spool/oauth-smtp-relay")
    fsync: bool = True
    #: refuse new mail (452 4.3.1) below this much free space, so the queue can always drain
    min_free: Size = 64 * 1024 * 1024


class ObservabilitySettings(FrozenModel):
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    http: str | None = None

    @field_validator("http")
    @classmethod
    def _check_http(cls, v: str | None) -> str | None:
        if v is not None:
            parse_host_port(v, 9465)
        return v


class FleetFallbackSettings(FrozenModel):
    """This relay's own share of each mailbox's limits while Redis cannot be reached."""

    connections: int = Field(default=1, ge=1, le=50)
    per_minute: int = Field(default=6, ge=0)


class FleetSettings(FrozenModel):
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

