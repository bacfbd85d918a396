"""The simulated Microsoft 365 used by tests, ``oauth-smtp-relay demo`` and the benchmarks.

Real protocols on loopback only (HTTPS token endpoint for MSAL, SMTP with STARTTLS for the relay),
faithful to ``docs/exchange.md``. Never imported by the relay pipeline.
"""

from relay.testing.certs import (
    AppCertificate,
    ServerCertificates,
    make_app_certificate,
    server_ssl_context,
    write_server_certificates,
)
from relay.testing.entra import (
    EXCHANGE_RESOURCE,
    GRAPH_RESOURCE,
    SMTP_SEND_AS_APP,
    AppRegistration,
    EntraSimulator,
    RequestRecord,
)
from relay.testing.exchange import (
    AcceptedMessage,
    AuthAttempt,
    ExchangeLimits,
    ExchangeSimulator,
    ExchangeStats,
    Mailbox,
    xoauth2_initial_response,
)
from relay.testing.m365 import (
    STANDARD_CLIENT_ID,
    STANDARD_DOMAIN,
    STANDARD_MAILBOX,
    STANDARD_SECRET,
    STANDARD_SEND_AS,
    STANDARD_TENANT,
    SimulatedM365,
)

__all__ = [
    "EXCHANGE_RESOURCE",
    "GRAPH_RESOURCE",
    "SMTP_SEND_AS_APP",
    "STANDARD_CLIENT_ID",
    "STANDARD_DOMAIN",
    "STANDARD_MAILBOX",
    "STANDARD_SECRET",
    "STANDARD_SEND_AS",
    "STANDARD_TENANT",
    "AcceptedMessage",
    "AppCertificate",
    "AppRegistration",
    "AuthAttempt",
    "EntraSimulator",
    "ExchangeLimits",
    "ExchangeSimulator",
    "ExchangeStats",
    "Mailbox",
    "RequestRecord",
    "ServerCertificates",
    "SimulatedM365",
    "make_app_certificate",
    "server_ssl_context",
    "write_server_certificates",
    "xoauth2_initial_response",
]
