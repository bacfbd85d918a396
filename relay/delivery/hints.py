"""Admin hints: what an administrator must do when Entra ID or Exchange Online says no.

Shared by the classifier (the hint travels with a verdict into logs and the dead-letter record) and
by the ``check`` command. The steps are docs/exchange.md's "Admin setup" list, numbered the same way, so a
log line can say "admin step 5" and the docs, ``check`` and this module agree on what that means.
Fix texts hold placeholders in angle brackets (``<MAILBOX>``); :meth:`Step.render` fills them in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "AADSTS_HINTS",
    "AUTH_FAILED",
    "AUTH_REJECTED",
    "BASIC_AUTH",
    "CONNECTIONS",
    "DAILY_QUOTA",
    "GRAPH_ACCESS_DENIED_HINT",
    "GRAPH_AUDIENCE_HINT",
    "GRAPH_PERMISSION_HINT",
    "GRAPH_TLS_HINT",
    "GRAPH_USER_HINT",
    "MAILBOX_FULL",
    "NOT_AUTHENTICATED",
    "NOT_SUPPORTED_HINT",
    "SENDER_THROTTLED",
    "SEND_AS",
    "SESSION_REFUSED",
    "SMTP_AUTH_DISABLED",
    "STEPS",
    "TLS_VERIFY_HINT",
    "TOO_BIG",
    "AadstsHint",
    "Hint",
    "Step",
    "fill_placeholders",
    "hint_for_aadsts",
    "parse_aadsts",
    "step_ref",
]


def fill_placeholders(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each ``<NAME>`` for which ``values`` has an entry (any case) replaced; the other
    placeholders stay for the admin to fill in."""
    lookup = {k.upper(): v for k, v in values.items()}
    return re.sub(r"<([A-Za-z_]+)>", lambda m: lookup.get(m.group(1).upper(), m.group(0)), text)


@dataclass(frozen=True)
class Step:
    number: int
    title: str
    fix: str  # what to do; PowerShell lines and URLs with <PLACEHOLDERS>

    def render(self, **values: str) -> str:
        """The fix text with ``<NAME>`` placeholders replaced by ``values['NAME']`` (case-insensitive)."""
        return fill_placeholders(self.fix, values)

    def __str__(self) -> str:
        return f"step {self.number} ({self.title})"


STEPS: dict[int, Step] = {
    1: Step(
        1,
        "App registration in Microsoft Entra ID",
        "Register an application in Microsoft Entra ID (App registrations > New registration; single tenant,"
        " or multi-tenant for partners). Put its Application (client) ID and Directory (tenant) ID into the"
        " relay's apps: section (client_id, tenant_id).",
    ),
    2: Step(
        2,
        "API permission SMTP.SendAsApp",
        "In the app registration: API permissions > Add a permission > APIs my organization uses >"
        " Office 365 Exchange Online > Application permissions > SMTP.SendAsApp.\n"
        "Alternative without an Entra permission (RBAC for Applications, Exchange Online PowerShell):\n"
        "  New-ManagementRoleAssignment -Role 'Application SMTP.SendAsApp' -App <APPLICATION_ID>"
        " -CustomResourceScope <SCOPE>",
    ),
    3: Step(
        3,
        "Tenant admin consent",
        "Single tenant: API permissions > 'Grant admin consent for <TENANT>'.\n"
        "Multi-tenant: a tenant admin opens\n"
        "  <AUTHORITY_HOST>/<TENANT_ID>/v2.0/adminconsent?client_id=<CLIENT_ID>"
        "&redirect_uri=<REDIRECT_URI>&scope=<SCOPE>\n"
        "(global cloud: <AUTHORITY_HOST> is https://login.microsoftonline.com and <SCOPE> is"
        " https://outlook.office365.com/.default; other clouds: docs/clouds.md)\n"
        'Without consent Entra ID still issues a token, but it lacks roles: ["SMTP.SendAsApp"] and'
        " Exchange answers 535 5.7.3.",
    ),
    4: Step(
        4,
        "Credential (client secret, certificate or federated token)",
        "Certificates & secrets: create a client secret and copy its Value (shown once; not the Secret ID),"
        " or upload a certificate (preferred) and configure its private key and thumbprint, or use a"
        " federated credential (Kubernetes workload identity: AZURE_FEDERATED_TOKEN_FILE, audience"
        " api://AzureADTokenExchange). Point the relay's app at it (client_secret_file, certificate_file).",
    ),
    5: Step(
        5,
        "Exchange service principal and mailbox permissions",
        "In Exchange Online PowerShell, as a tenant admin:\n"
        "  New-ServicePrincipal -AppId <APPLICATION_ID> -ObjectId <ENTERPRISE_APP_OBJECT_ID>\n"
        "    (the Object ID from Enterprise applications, NOT from App registrations)\n"
        "  Get-ServicePrincipal | fl    # note the ID field: <SERVICE_PRINCIPAL_ID>\n"
        "  Add-MailboxPermission -Identity <MAILBOX> -User <SERVICE_PRINCIPAL_ID> -AccessRights FullAccess\n"
        "and for each other From address:\n"
        "  Add-RecipientPermission -Identity <FROM_ADDRESS> -Trustee <SERVICE_PRINCIPAL_ID>"
        " -AccessRights SendAs",
    ),
    6: Step(
        6,
        "SMTP AUTH enabled for the mailbox",
        "SMTP AUTH must be enabled for the tenant or the mailbox, even with OAuth:\n"
        "  Set-CASMailbox <MAILBOX> -SmtpClientAuthenticationDisabled $false\n"
        "(check with: Get-CASMailbox <MAILBOX> | fl SmtpClientAuthenticationDisabled; tenant-wide:"
        " Get-TransportConfig | fl SmtpClientAuthenticationDisabled). Security defaults or a conditional"
        " access policy can also block SMTP AUTH.",
    ),
}


def step_ref(*numbers: int) -> str:
    """``admin steps 2 (API permission ...), 3 (...)`` for a hint line."""
    parts = [f"{n} ({STEPS[n].title})" for n in numbers]
    return ("admin step " if len(parts) == 1 else "admin steps ") + ", ".join(parts)


@dataclass(frozen=True)
class AadstsHint:
    code: int
    meaning: str
    hint: str
    step: int | None


AADSTS_HINTS: dict[int, AadstsHint] = {
    h.code: h
    for h in (
        AadstsHint(
            7000215,
            "invalid client secret",
            "the secret's Value was expected, not the Secret ID; copy the Value of a new secret",
            4,
        ),
        AadstsHint(7000222, "client secret expired", "create a new client secret and configure it", 4),
        AadstsHint(700016, "app not found in tenant", "wrong client ID or tenant ID", 1),
        AadstsHint(
            90002, "tenant not found", "wrong tenant ID, or the app is configured for the wrong cloud", 1
        ),
        AadstsHint(
            700027,
            "certificate signature mismatch",
            "the configured certificate/thumbprint does not match the certificate uploaded to the app",
            4,
        ),
        AadstsHint(
            7000218, "no secret or assertion sent", "the credential is missing in the relay's config", 4
        ),
        AadstsHint(
            70011,
            "invalid scope",
            "the scope must end in /.default (e.g. https://outlook.office365.com/.default)",
            None,
        ),
        AadstsHint(
            500011,
            "resource principal not found",
            "Exchange Online is not in this tenant, or the app is configured for the wrong cloud",
            None,
        ),
    )
}

_AADSTS_RE = re.compile(r"AADSTS(\d{4,9})")


def parse_aadsts(text: str) -> int | None:
    """The first AADSTS code in ``text`` (``AADSTS7000215: Invalid client secret...``), or None."""
    m = _AADSTS_RE.search(text or "")
    return int(m.group(1)) if m else None


def hint_for_aadsts(code: int | None, description: str) -> str:
    """A one-paragraph hint for an Entra ID token error. Never echoes the description."""
    if code is None:
        code = parse_aadsts(description)
    if code is None:
        return (
            "Entra ID refused the token request: check the tenant ID and client ID ("
            + step_ref(1)
            + ") and the credential ("
            + step_ref(4)
            + ")."
        )
    known = AADSTS_HINTS.get(code)
    if known is None:
        return (
            f"AADSTS{code}: see https://login.microsoftonline.com/error?code={code}; check "
            + step_ref(1, 4)
            + "."
        )
    where = f" ({step_ref(known.step)})" if known.step is not None else ""
    return f"AADSTS{code} {known.meaning}: {known.hint}{where}."


@dataclass(frozen=True)
class Hint:
    """What an admin must do about one kind of Exchange reply; the classifier's rules carry it
    (:data:`relay.delivery.classify.RULES`). ``extras``: (lower-case token, sentence) pairs; the sentence of the
    first token found in the reply text is appended."""

    text: str
    extras: tuple[tuple[str, str], ...] = ()

    def render(self, reply_text: str) -> str:
        """The hint for a reply whose text (lower case) is ``reply_text``."""
        extra = next((sentence for token, sentence in self.extras if token in reply_text), "")
        return self.text + extra


AUTH_FAILED = Hint(
    "Exchange refused the token (535 5.7.3). One of four causes: the service principal is not"
    " registered in Exchange, or registered with the wrong Object ID (use the Enterprise"
    " application's Object ID, not the App registration's); the service principal has no"
    " FullAccess on the mailbox named in user=; or the token lacks the SMTP.SendAsApp role"
    " (permission or admin consent missing). Fix: "
    + step_ref(2, 3, 5)
    + ": New-ServicePrincipal -AppId <APPLICATION_ID> -ObjectId <ENTERPRISE_APP_OBJECT_ID>;"
    " Add-MailboxPermission -Identity <MAILBOX> -User <SERVICE_PRINCIPAL_ID>"
    " -AccessRights FullAccess."
)
SMTP_AUTH_DISABLED = Hint(
    "SMTP AUTH is disabled for the tenant or the mailbox (" + step_ref(6) + "): "
    "Set-CASMailbox <MAILBOX> -SmtpClientAuthenticationDisabled $false.",
    extras=(
        ("security defaults",
         " The tenant's security defaults block SMTP AUTH: turn them off or use a policy exception."),
        ("conditional access", " A conditional access policy blocks SMTP AUTH for this sign-in."),
    ),
)
BASIC_AUTH = Hint(
    "Exchange saw Basic authentication: the relay must authenticate upstream with XOAUTH2 only;"
    " check that the app's upstream settings do not configure a username/password."
)
NOT_AUTHENTICATED = Hint(
    "Exchange says the relay is not authenticated: upstream sessions must STARTTLS and AUTH"
    " XOAUTH2 before MAIL FROM; check the upstream host/port (smtp.office365.com:587)."
)
SENDER_THROTTLED = Hint(
    "Exchange throttles the sender after repeated permanent errors: fix the cause of the earlier"
    " failures (SendAs rights, bad recipients, size); the relay waits before trying again."
)
SEND_AS = Hint(
    "The service principal may not send as this From address ("
    + step_ref(5)
    + "): Add-RecipientPermission -Identity <FROM_ADDRESS> -Trustee <SERVICE_PRINCIPAL_ID>"
    " -AccessRights SendAs, or let policy rewrite the From to the mailbox."
)
DAILY_QUOTA = Hint(
    "The mailbox used its 10,000 recipients per rolling 24 hours: mail waits and is retried;"
    " spread traffic over more mailboxes if this recurs."
)
TOO_BIG = Hint(
    "The message is larger than the mailbox's MaxSendSize: the sender must send less, or an admin"
    " raises it (Set-Mailbox <MAILBOX> -MaxSendSize 35MB)."
)
MAILBOX_FULL = Hint(
    "The sending mailbox is full (usually its Sent Items): an admin must empty it or raise its"
    " quota (Set-Mailbox <MAILBOX> -ProhibitSendQuota ...), or stop saving sent copies."
)
CONNECTIONS = Hint(
    "Too many concurrent connections for the mailbox: lower delivery.per_mailbox.connections (max 3)."
)


TLS_VERIFY_HINT = (
    "The upstream server's certificate failed verification: check the SMTP host name (e.g."
    " smtp.office365.com for the global cloud), the system CA certificates, and any TLS-intercepting proxy"
    " or firewall between the relay and Exchange Online; if a middlebox re-signs the certificate, set the"
    " app's smtp_ca_file to its CA."
)

UNREACHABLE_HINT = (
    "The app's SMTP host did not answer or could not be reached before any message was sent: check that"
    " this machine can reach it (smtp.office365.com:587 for the global cloud) through DNS, firewall and"
    " proxy; `oauth-smtp-relay check` names the step that does not answer."
)

NOT_SUPPORTED_HINT = (
    "The upstream server does not offer STARTTLS or AUTH XOAUTH2: check the upstream host and port"
    " (smtp.office365.com:587 with STARTTLS for the global cloud)."
)

AUTH_REJECTED = Hint(
    "Exchange refused the relay's authentication: run `oauth-smtp-relay check` and verify "
    + step_ref(2, 3, 5, 6)
    + "."
)

SESSION_REFUSED = Hint(
    "Exchange refused the session before any message was sent (greeting, EHLO or STARTTLS): check the"
    " upstream host and port, and whether Exchange blocks the relay's public IP address."
)

GRAPH_PERMISSION_HINT = (
    "The Graph token lacks the Mail.Send application permission. In Entra ID > App registrations > API"
    " permissions: Add a permission > Microsoft Graph > Application permissions > Mail.Send, then"
    " 'Grant admin consent' (multi-tenant: the adminconsent URL with"
    " scope=https://graph.microsoft.com/.default). If Mail.Send is granted by RBAC for Applications instead"
    " (New-ManagementRoleAssignment -Role 'Application Mail.Send' -App <AppId> -CustomResourceScope"
    " <scope>), the token carries no role by design: check that the scope includes this mailbox with"
    " Test-ServicePrincipalAuthorization -Identity <SERVICE_PRINCIPAL_ID> -Resource <MAILBOX>."
)
GRAPH_ACCESS_DENIED_HINT = (
    "Graph refused this mailbox although the token carries Mail.Send: an application access policy"
    " (New-ApplicationAccessPolicy -AccessRight RestrictAccess) or an RBAC for Applications scope leaves"
    " it out. Test with Test-ApplicationAccessPolicy -Identity <MAILBOX> -AppId <APPLICATION_ID> and add"
    " the mailbox to the policy's group or scope (changes can take up to an hour)."
)
GRAPH_AUDIENCE_HINT = (
    "Graph rejected the token twice (401): check that apps[].cloud matches the tenant's cloud, and that"
    " graph_host and graph_scope belong together (https://graph.microsoft.com with"
    " https://graph.microsoft.com/.default; GCC High graph.microsoft.us; DoD dod-graph.microsoft.us)."
)
GRAPH_USER_HINT = (
    "Graph does not know this mailbox: check the address in mailboxes[] (the primary SMTP address or"
    " UPN), that it has an Exchange Online mailbox (licence), and that the app's tenant_id is its tenant."
)
GRAPH_TLS_HINT = (
    "The Graph endpoint's certificate failed verification: check apps[].graph_host and, if a"
    " TLS-inspecting proxy re-signs certificates, set apps[].token_ca_file to its CA (Graph uses the same"
    " CA bundle and proxy as the token endpoint)."
)
