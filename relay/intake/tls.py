"""The listeners' TLS (STARTTLS and implicit TLS): the admin's certificate and key, loaded once at
start; one that cannot be loaded is a config error naming the key, not a traceback."""

from __future__ import annotations

import ssl

from relay.config import Settings
from relay.errors import ConfigError


def listener_tls(settings: Settings, config_file: str) -> ssl.SSLContext | None:
    """The listeners' TLS context, or None without ``tls:``. A certificate or key that cannot be
    loaded is a configuration error naming the key (not a traceback at start)."""
    if settings.tls is None:
        return None
    cert, key = settings.tls.cert_file, settings.tls.key_file
    try:
        return make_server_tls_context(str(cert), str(key), settings.tls.min_version)
    except (OSError, ssl.SSLError) as exc:
        reason = (exc.reason if isinstance(exc, ssl.SSLError) else None) or exc.strerror or str(exc)
        raise ConfigError(config_file, "tls.cert_file",
                          f"cannot load the certificate {cert} with the key {key}: {reason}; both must be PEM "
                          "files readable by the relay's user, and the key must belong to the certificate") from None


def make_server_tls_context(cert_file: str, key_file: str, min_version: str) -> ssl.SSLContext:
    """The listener's TLS: the admin's certificate and key, TLS 1.2 or newer, no compression,
    no renegotiation, server cipher preference (Python's defaults already drop weak ciphers)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):
        ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert_file, key_file)
    return ctx

