"""``oauth-smtp-relay check``: walk the chain from config to Exchange, one line per step.

config valid -> token acquired -> token claims (audience, tenant, SMTP.SendAsApp role, expiry) ->
TCP + STARTTLS to the SMTP host (certificate valid) -> AUTH XOAUTH2 per mailbox -> optional test
message. Each failure names the admin step to fix (EXCHANGE.md's numbered steps, see relay.hints).
The token is decoded for inspection, never printed; neither is any secret.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import aiosmtplib

from relay.classify import Stage, classify_exception, classify_reply
from relay.config import AppSettings, Settings, load_settings
from relay.errors import ConfigError, TokenError
from relay.hints import hint_for_aadsts
from relay.tokens import Token, TokenProvider
from relay.upstream import tls_context_for


@dataclass
class Step:
    name: str
    ok: bool
    detail: str = ""
    hint: str = ""


class Checklist:
    def __init__(self) -> None:
        self.steps: list[Step] = []

    def add(self, name: str, ok: bool, detail: str = "", hint: str = "") -> bool:
        self.steps.append(Step(name, ok, detail, hint))
        return ok

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    def render(self) -> str:
        lines = []
        for s in self.steps:
            mark = "PASS" if s.ok else "FAIL"
            lines.append(f"[{mark}] {s.name}" + (f": {s.detail}" if s.detail else ""))
            if s.hint and not s.ok:
                lines.extend(f"       {line}" for line in s.hint.splitlines())
        lines.append("all checks passed" if self.ok else "some checks failed")
        return "\n".join(lines)


def _resource_of(scope: str) -> str:
    return scope.removesuffix("/.default")


def check_claims(app: AppSettings, token: Token, now: float) -> tuple[bool, str, str]:
    claims = token.claims()
    problems = []
    aud = str(claims.get("aud", ""))
    if aud.rstrip("/") != _resource_of(app.effective_scope).rstrip("/"):
        problems.append(f"audience is {aud!r}, expected {_resource_of(app.effective_scope)!r}")
    tid = str(claims.get("tid", ""))
    if tid and "-" in app.tenant_id and tid.lower() != app.tenant_id.lower():
        problems.append(f"tenant is {tid}, expected {app.tenant_id}")
    roles = claims.get("roles") or []
    if "SMTP.SendAsApp" not in roles:
        problems.append(f"roles {roles or '[]'} lack SMTP.SendAsApp")
    exp = float(claims.get("exp", 0) or 0)
    detail = (f"aud={aud} tid={tid} roles={','.join(roles) or '-'} "
              f"expires in {max(int(exp - now), 0) // 60} min")
    if problems:
        hint = ("Step 2: add API permission Office 365 Exchange Online > Application > SMTP.SendAsApp.\n"
                "Step 3: grant admin consent for it (a token without the role is issued silently "
                "and Exchange then answers 535 5.7.3).")
        return False, "; ".join(problems) + f" ({detail})", hint
    return True, detail, ""


async def _check_app(settings: Settings, app: AppSettings, checks: Checklist, send_to: str | None) -> None:
    provider = TokenProvider(app)
    try:
        try:
            token = await provider.get()
        except TokenError as exc:
            detail = f"{exc.error}" + (f" AADSTS{exc.aadsts}" if exc.aadsts else "") + f": {exc.description}"
            checks.add(f"token for app {app.name}", False, detail, hint_for_aadsts(exc.aadsts, exc.description))
            return
        checks.add(f"token for app {app.name}", True, f"from {app.effective_authority_host}")
        ok, detail, hint = check_claims(app, token, time.time())
        checks.add(f"token claims for app {app.name}", ok, detail, hint)
        mailboxes = [m for m in settings.mailboxes if m.app == app.name]
        for mbx in mailboxes:
            await _check_mailbox(settings, app, mbx.address, token, checks,
                                 send_to if mbx is mailboxes[0] else None)
    finally:
        provider.close()


async def _check_mailbox(settings: Settings, app: AppSettings, mailbox: str, token: Token, checks: Checklist,
                         send_to: str | None) -> None:
    host = f"{app.effective_smtp_host}:{app.smtp_port}"
    smtp = aiosmtplib.SMTP(hostname=app.effective_smtp_host, port=app.smtp_port, start_tls=True,
                           tls_context=tls_context_for(app), timeout=settings.delivery.timeout)
    try:
        try:
            await smtp.connect()
        except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            verdict = classify_exception(exc, Stage.CONNECT)
            hint = ("Check that the host can reach it on TCP 587 (firewall, proxy) and that the certificate "
                    "is trusted (set smtp_ca_file for a TLS-inspecting middlebox).")
            checks.add(f"STARTTLS to {host}", False, verdict.reply, hint)
            return
        tls = smtp.get_transport_info("ssl_object")
        version = tls.version() if tls is not None else "?"
        checks.add(f"STARTTLS to {host}", True, f"{version}, certificate verified")
        try:
            await smtp.ehlo()
            await smtp.auth_xoauth2(mailbox, token.value)
        except aiosmtplib.SMTPResponseException as exc:
            verdict = classify_reply(exc.code, exc.message, Stage.AUTH)
            checks.add(f"AUTH XOAUTH2 as {mailbox}", False, f"{exc.code} {exc.message}", verdict.hint)
            return
        checks.add(f"AUTH XOAUTH2 as {mailbox}", True, "235 authenticated")
        if send_to:
            msg = EmailMessage()
            msg["From"] = mailbox
            msg["To"] = send_to
            msg["Subject"] = "oauth-smtp-relay check: test message"
            msg["Message-ID"] = make_msgid(domain=mailbox.split("@", 1)[1])
            msg.set_content("This test message was sent by `oauth-smtp-relay check --send-to`.\n")
            try:
                _errors, reply = await smtp.sendmail(mailbox, [send_to], msg.as_bytes())
                checks.add(f"test message to {send_to}", True, reply)
            except aiosmtplib.SMTPResponseException as exc:
                verdict = classify_reply(exc.code, exc.message, Stage.DATA)
                checks.add(f"test message to {send_to}", False, f"{exc.code} {exc.message}", verdict.hint)
    finally:
        if smtp.is_connected:
            try:
                await asyncio.wait_for(smtp.quit(), 5)
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                smtp.close()


async def check_online(settings: Settings, checks: Checklist, send_to: str | None = None) -> None:
    for app in settings.apps:
        await _check_app(settings, app, checks, send_to)


def run_check(args: argparse.Namespace) -> int:
    checks = Checklist()
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        checks.add("configuration", False, str(exc), "Fix the key named above; `config.example.yaml` explains each.")
        _output(args, checks)
        return 2
    summary = f"{len(settings.apps)} app(s), {len(settings.mailboxes)} mailbox(es), {len(settings.users)} user(s)"
    checks.add(f"configuration {args.config}", True, summary)
    if not args.offline:
        asyncio.run(check_online(settings, checks, args.send_to))
    _output(args, checks)
    return 0 if checks.ok else 1


def _output(args: argparse.Namespace, checks: Checklist) -> None:
    if getattr(args, "json", False):
        data: dict[str, Any] = {"ok": checks.ok, "steps": [asdict(s) for s in checks.steps]}
        print(json.dumps(data, indent=2))
    else:
        print(checks.render(), file=sys.stdout)
