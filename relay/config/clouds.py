"""Microsoft's clouds: each one's token authority, scopes, SMTP and Graph hosts and default pacing."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from relay.config.values import FrozenModel


class Cloud(StrEnum):
    GLOBAL = "global"
    GCC = "gcc"
    GCC_HIGH = "gcc-high"
    DOD = "dod"
    CHINA = "china"
    HVE = "hve"


class CloudPreset(FrozenModel):
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

