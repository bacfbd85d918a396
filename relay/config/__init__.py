"""YAML configuration -> validated, frozen settings.

Secrets never need to sit in the file: any string may reference an environment variable as
``${NAME}``, and every secret has a ``*_file`` twin (systemd ``LoadCredential=`` puts files under
``$CREDENTIALS_DIRECTORY``, Docker under ``/run/secrets``). Every problem becomes a
:class:`relay.errors.ConfigError` naming the file, the key and the fix; the CLI exits 2 on it.

One module per job; callers import from ``relay.config``:

- :mod:`relay.config.values`: durations, sizes, addresses, HOST:PORT; the frozen model of a section
- :mod:`relay.config.clouds`: Microsoft's clouds and their presets
- :mod:`relay.config.apps`: app registrations and mailboxes
- :mod:`relay.config.sections`: every other section (listen, tls, accept, users, sender, delivery,
  limits, spool, observability, fleet)
- :mod:`relay.config.networks`: loopback hosts and allowlist entries too wide to be safe
- :mod:`relay.config.settings`: the whole :class:`Settings` and its checks across sections (never an
  open relay)
- :mod:`relay.config.resolve`: ``${ENV}``, example placeholders, ``*_file`` secrets
- :mod:`relay.config.problems`: pydantic's errors in the admin's words (file, key, fix)
- :mod:`relay.config.loading`: a file -> :class:`Settings`; the warnings of the last load
"""

from __future__ import annotations

from relay.config.apps import AppSettings, CertificateCredential, MailboxSettings
from relay.config.clouds import CLOUDS, Cloud, CloudPreset
from relay.config.loading import load_settings, load_warnings, settings_from_dict
from relay.config.networks import OPEN_RELAY_MIN_PREFIX, is_loopback_host, too_wide
from relay.config.sections import (
    AcceptSettings,
    AuthFailureSettings,
    AuthMode,
    DeliverySettings,
    DsnSettings,
    FleetFallbackSettings,
    FleetSettings,
    LimitSettings,
    ListenerTlsSettings,
    ListenSettings,
    NetworkRule,
    ObservabilitySettings,
    PerMailboxSettings,
    RetrySettings,
    RewriteFrom,
    SenderSettings,
    SpoolSettings,
    TlsMode,
    UserSettings,
)
from relay.config.settings import Settings, open_relay_problem
from relay.config.values import Address, Duration, Size, parse_duration, parse_host_port, parse_size
from relay.errors import ConfigError

__all__ = [
    "CLOUDS",
    "OPEN_RELAY_MIN_PREFIX",
    "AcceptSettings",
    "Address",
    "AppSettings",
    "AuthFailureSettings",
    "AuthMode",
    "CertificateCredential",
    "Cloud",
    "CloudPreset",
    "ConfigError",
    "DeliverySettings",
    "DsnSettings",
    "Duration",
    "FleetFallbackSettings",
    "FleetSettings",
    "LimitSettings",
    "ListenSettings",
    "ListenerTlsSettings",
    "MailboxSettings",
    "NetworkRule",
    "ObservabilitySettings",
    "PerMailboxSettings",
    "RetrySettings",
    "RewriteFrom",
    "SenderSettings",
    "Settings",
    "Size",
    "SpoolSettings",
    "TlsMode",
    "UserSettings",
    "is_loopback_host",
    "load_settings",
    "load_warnings",
    "open_relay_problem",
    "parse_duration",
    "parse_host_port",
    "parse_size",
    "settings_from_dict",
    "too_wide",
]
