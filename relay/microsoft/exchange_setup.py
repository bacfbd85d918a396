"""``oauth-smtp-relay exchange-setup``: the admin's to-do list, filled in from the relay's config.

Prints, per app registration, what docs/exchange.md's "Admin setup" asks for (steps 2-6): the API permission
and admin consent (with the multi-tenant consent URL on the app's own cloud), then the Exchange Online
PowerShell: ``New-ServicePrincipal`` (with the Enterprise-application Object ID warning, the classic
cause of 535 5.7.3), ``Add-MailboxPermission`` per mailbox, ``Add-RecipientPermission`` for every
extra From address the config lets users or networks send as, and ``Set-CASMailbox`` to enable SMTP
AUTH. Nothing is executed and nothing secret is printed: the output is for a tenant admin to review.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote

from relay.config import AppSettings, Cloud, Settings, load_settings

#: ``Connect-ExchangeOnline -ExchangeEnvironmentName`` per cloud (global, GCC and HVE use the default).
_EXO_ENVIRONMENT = {
    Cloud.GCC_HIGH: "O365USGovGCCHigh",
    Cloud.DOD: "O365USGovDoD",
    Cloud.CHINA: "O365China",
}

_EXACT_ADDRESS = re.compile(r"^[^@\s*?\[\]]+@[^@\s*?\[\]]+$")


def admin_consent_url(app: AppSettings, redirect_uri: str = "<REDIRECT_URI>") -> str:
    """The multi-tenant admin-consent URL (admin step 3, docs/exchange.md) on the app's cloud."""
    redirect = redirect_uri if redirect_uri.startswith("<") else quote(redirect_uri, safe="")
    return (f"{app.effective_authority_host}/{app.tenant_id}/v2.0/adminconsent"
            f"?client_id={app.client_id}&redirect_uri={redirect}&scope={app.effective_scope}")


def is_exact_address(pattern: str) -> bool:
    """``alerts@contoso.com`` yes; ``@contoso.com``, ``*@contoso.com``, ``alerts-*@...``, ``*`` no."""
    return bool(_EXACT_ADDRESS.match(pattern.strip()))


@dataclass
class AppPlan:
    app: AppSettings
    mailboxes: list[str] = field(default_factory=list)
    #: extra From address -> where the config allows it (``users[erp]``, ``accept.networks[10.0.0.0/8]``)
    send_as: dict[str, list[str]] = field(default_factory=dict)
    patterns: dict[str, list[str]] = field(default_factory=dict)


def plan(settings: Settings) -> list[AppPlan]:
    """Which mailboxes and extra From addresses each app registration needs rights on."""
    plans = {a.name: AppPlan(a) for a in settings.apps}
    mailbox_app = {m.address: m.app for m in settings.mailboxes}
    for mbx in settings.mailboxes:
        plans[mbx.app].mailboxes.append(mbx.address)
    principals: list[tuple[str, Iterable[str], str | None]] = [
        (f"users[{u.name}]", u.may_send_as, u.mailbox) for u in settings.users]
    principals += [(f"accept.networks[{r.network}]", r.may_send_as, r.mailbox) for r in settings.accept.networks]
    for where, patterns, own_mailbox in principals:
        carrier = own_mailbox or settings.sender.default_mailbox
        # The carrying mailbox's app sends it; without a carrier policy refuses such senders anyway.
        targets = [plans[mailbox_app[carrier]]] if carrier else []
        for pattern in patterns:
            p = pattern.strip().lower()
            if is_exact_address(p):
                if p in mailbox_app:
                    continue  # a mailbox sends as itself with FullAccess
                for target in targets:
                    target.send_as.setdefault(p, []).append(where)
            else:
                for target in targets:
                    target.patterns.setdefault(p, []).append(where)
    return list(plans.values())


def _ps(value: str) -> str:
    """A PowerShell single-quoted string."""
    return "'" + value.replace("'", "''") + "'"


def _credential(app: AppSettings) -> str:
    if app.certificate is not None:
        return "certificate (upload its public certificate under Certificates & secrets)"
    if app.federated_token_file is not None:
        return (f"federated credential (workload identity; token file {app.federated_token_file}, audience"
                " api://AzureADTokenExchange)")
    return "client secret (the secret's Value, not its Secret ID)"


def render(settings: Settings, *, config: str = "config.yaml", redirect_uri: str | None = None,
           object_id: str | None = None, service_principal_id: str | None = None) -> str:
    out: list[str] = []
    add = out.append
    for p in plan(settings):
        app = p.app
        add(f"#### App {app.name!r}: tenant {app.tenant_id}, client ID {app.client_id}, cloud {app.cloud.value}")
        add("")
        add("## Admin steps 1-4 (Microsoft Entra admin center, App registrations)")
        add(f"1. App registration: Application (client) ID {app.client_id}, Directory (tenant) ID {app.tenant_id}.")
        add("2. API permissions > Add a permission > APIs my organization uses > Office 365 Exchange Online >")
        add("   Application permissions > SMTP.SendAsApp.")
        add("3. Admin consent. Single tenant: 'Grant admin consent' on the API permissions page.")
        add("   Multi-tenant app (partner): a tenant admin opens (redirect_uri must be one registered on the app)")
        add(f"   {admin_consent_url(app, redirect_uri or '<REDIRECT_URI>')}")
        add("   Without consent Entra ID still issues tokens, but without the SMTP.SendAsApp role: 535 5.7.3.")
        add(f"4. Credential in use by this config: {_credential(app)}.")
        add("")
        add("## Admin steps 5-6: Exchange Online PowerShell, as a tenant admin")
        add("```powershell")
        add("# Install-Module -Name ExchangeOnlineManagement    # once")
        env = _EXO_ENVIRONMENT.get(app.cloud)
        add("Connect-ExchangeOnline" + (f" -ExchangeEnvironmentName {env}" if env else ""))
        add("")
        add(f"$AppId = {_ps(app.client_id)}")
        add("# WARNING: -ObjectId is the Object ID of the *Enterprise application* (Entra admin center >")
        add("# Enterprise applications > this app > Overview), NOT the Object ID shown under App registrations.")
        add("# Using the App registration's Object ID is accepted here and then fails with 535 5.7.3.")
        add(f"$ObjectId = {_ps(object_id or '<ENTERPRISE_APP_OBJECT_ID>')}")
        display = _ps(f"oauth-smtp-relay {app.name}")
        add(f"New-ServicePrincipal -AppId $AppId -ObjectId $ObjectId -DisplayName {display}")
        add("")
        add("# <SERVICE_PRINCIPAL_ID> is the ID field of:")
        add("Get-ServicePrincipal | Where-Object AppId -eq $AppId | Format-List")
        add(f"$SpId = {_ps(service_principal_id or '<SERVICE_PRINCIPAL_ID>')}")
        add("")
        if p.mailboxes:
            add("# Each mailbox the relay authenticates as (XOAUTH2 user=): FullAccess, and SMTP AUTH enabled")
        for mbx in p.mailboxes:
            add(f"Add-MailboxPermission -Identity {_ps(mbx)} -User $SpId -AccessRights FullAccess")
            add(f"Set-CASMailbox -Identity {_ps(mbx)} -SmtpClientAuthenticationDisabled $false")
        if p.send_as:
            add("")
            add("# Extra From addresses the config allows (they are not mailboxes of the relay): SendAs")
            for address, where in sorted(p.send_as.items()):
                add(f"Add-RecipientPermission -Identity {_ps(address)} -Trustee $SpId -AccessRights SendAs"
                    f" -Confirm:$false    # {', '.join(where)}")
        if p.patterns:
            add("")
            add("# Sender patterns cannot be granted in one go: run Add-RecipientPermission for each address")
            add("# the apps really use as From (or let the relay rewrite the From: sender.rewrite_from).")
            for pattern, where in sorted(p.patterns.items()):
                add(f"#   {pattern}    # {', '.join(where)}")
        add("")
        add("# Verify:")
        for mbx in p.mailboxes:
            add(f"Get-MailboxPermission -Identity {_ps(mbx)} -User $SpId")
            add(f"Get-CASMailbox -Identity {_ps(mbx)} | Format-List SmtpClientAuthenticationDisabled")
        add("Get-TransportConfig | Format-List SmtpClientAuthenticationDisabled    # tenant-wide default")
        add("```")
        add("")
    add(f"Then run: oauth-smtp-relay check -c {config}")
    return "\n".join(out)


def run_exchange_setup(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, read_secrets=False)  # no credential needed to print commands
    print(render(settings, config=str(args.config), redirect_uri=getattr(args, "redirect_uri", None),
                 object_id=getattr(args, "object_id", None),
                 service_principal_id=getattr(args, "service_principal_id", None)))
    return 0
