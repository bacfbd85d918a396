"""``oauth-smtp-relay check``: walk the chain from config to Exchange, one line per step.

config valid -> token acquired -> token claims (audience, tenant, SMTP.SendAsApp role, expiry) ->
TCP + STARTTLS to the SMTP host (certificate valid) -> AUTH XOAUTH2 per mailbox -> optional test
message. Each failure names the admin step to fix (docs/exchange.md, "Admin setup"; see relay.delivery.hints)
with the PowerShell or portal action filled in from the config.

The token is decoded for inspection, never printed; neither is any secret. A step that cannot run
because an earlier one failed is shown as SKIP, so the first FAIL is the one to fix first.

Each line is printed as soon as its step ends, and no step waits forever: the token steps have
``apps[].timeout`` (discovery and token request, through relay.microsoft.tokens), the SMTP steps
``delivery.timeout`` (at most 30 s) for the connection, the greeting, the TLS handshake and each
command. A failure says what actually happened: "connection refused", "connected, no SMTP greeting
within 30s", "connected, no TLS handshake within 30s", "no HTTP answer from ... within 30s",
"certificate verification failed".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import aiosmtplib
import requests

from relay.blocking import call_with_deadline
from relay.config import AppSettings, Settings, load_settings, load_warnings
from relay.delivery.classify import Stage, classify_exception, classify_reply, timeout_text
from relay.delivery.hints import STEPS, TLS_VERIFY_HINT, fill_placeholders, hint_for_aadsts, parse_aadsts
from relay.errors import ConfigError, TokenError, exception_chain
from relay.microsoft.exchange_setup import admin_consent_url
from relay.microsoft.graph import check_graph_claims
from relay.microsoft.tokens import Token, TokenProvider, build_http_session, host_of, http_failure
from relay.microsoft.upstream import tls_context_for
from relay.queue.problems import running_user, writable_problem

PASS, FAIL, SKIP = "pass", "fail", "skip"

#: a token expiring sooner than this is reported (Exchange refuses tokens about to expire).
_MIN_TOKEN_LIFETIME = 300.0


@dataclass
class Step:
    """One line of the checklist. ``kind`` is stable (config, token, claims, tcp, starttls, auth, send)
    so scripts and tests can branch on it; ``admin_step`` is the admin step to fix (docs/exchange.md, "Admin setup")."""

    name: str
    ok: bool
    detail: str = ""
    hint: str = ""
    kind: str = ""
    status: str = ""
    admin_step: int | None = None
    app: str | None = None
    mailbox: str | None = None

    def __post_init__(self) -> None:
        if not self.status:
            self.status = PASS if self.ok else FAIL


@dataclass
class Checklist:
    steps: list[Step] = field(default_factory=list)
    #: called with each step as it is added: the text output prints it at once (a slow or silent
    #: endpoint further down the chain does not hide what already passed or failed).
    on_step: Callable[[Step], None] | None = None

    def _append(self, step: Step) -> None:
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)

    def add(self, name: str, ok: bool, detail: str = "", hint: str = "", **kw: Any) -> bool:
        self._append(Step(name, ok, detail, hint, **kw))
        return ok

    def skip(self, name: str, why: str, **kw: Any) -> None:
        self._append(Step(name, False, why, "", status=SKIP, **kw))

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.status == PASS for s in self.steps)

    def first_failure(self) -> Step | None:
        return next((s for s in self.steps if s.status == FAIL), None)

    @staticmethod
    def render_step(s: Step) -> str:
        mark = {PASS: "PASS", FAIL: "FAIL", SKIP: "SKIP"}[s.status]
        lines = [f"[{mark}] {s.name}" + (f": {s.detail}" if s.detail else "")]
        if s.hint and s.status == FAIL:
            lines.extend(f"       {line}" if line else "" for line in s.hint.splitlines())
        return "\n".join(lines)

    def summary(self) -> str:
        failed = [s for s in self.steps if s.status == FAIL]
        if not failed:
            return "all checks passed"
        first = failed[0]
        where = f" (admin step {first.admin_step})" if first.admin_step else ""
        return f"{len(failed)} check(s) failed; fix the first one first: {first.name}{where}"

    def render(self) -> str:
        return "\n".join([*(self.render_step(s) for s in self.steps), self.summary()])

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "steps": [asdict(s) for s in self.steps]}


# --------------------------------------------------------------------------- helpers

def fill(text: str, app: AppSettings, mailbox: str | None = None) -> str:
    """Replace the ``<PLACEHOLDERS>`` the config can answer; leave the others for the admin."""
    values = {"APPLICATION_ID": app.client_id, "CLIENT_ID": app.client_id, "TENANT_ID": app.tenant_id,
              "TENANT": app.tenant_id, "AUTHORITY_HOST": app.effective_authority_host,
              "SCOPE": app.effective_scope}
    if mailbox:
        values["MAILBOX"] = mailbox
    return fill_placeholders(text, values)


def _resource_of(scope: str) -> str:
    return scope.removesuffix("/.default")


def _clean_description(exc: TokenError) -> str:
    """Entra's description without the repeated ``AADSTSnnn:`` prefix, one line, bounded."""
    text = re.sub(r"^AADSTS\d+:\s*", "", exc.description or "").strip()
    return text[:240] + ("..." if len(text) > 240 else "")


def check_claims(app: AppSettings, token: Token, now: float) -> tuple[bool, str, str, int | None]:
    """(ok, detail, hint, admin step) for the token's claims. Only names and times are shown."""
    claims = token.claims()
    if not claims:
        return False, "the token is not a JWT this tool can decode", "", None
    problems: list[str] = []
    step: int | None = None
    expected_aud = _resource_of(app.effective_scope).rstrip("/")
    aud = str(claims.get("aud", ""))
    if aud.rstrip("/") != expected_aud:
        problems.append(f"audience is {aud!r}, expected {expected_aud!r}")
        step = step or 2
    tid = str(claims.get("tid", ""))
    if tid and "-" in app.tenant_id and tid.lower() != app.tenant_id.lower():
        problems.append(f"tenant is {tid}, expected {app.tenant_id}")
        step = step or 1
    appid = str(claims.get("appid", claims.get("azp", "")))
    if appid and appid.lower() != app.client_id.lower():
        problems.append(f"issued to app {appid}, expected {app.client_id}")
        step = step or 1
    raw_roles = claims.get("roles") or []
    roles = [str(r) for r in raw_roles] if isinstance(raw_roles, list) else [str(raw_roles)]
    if "SMTP.SendAsApp" not in roles:
        problems.append(f"roles [{', '.join(roles)}] lack SMTP.SendAsApp")
        step = step or 3
    exp = float(claims.get("exp", 0) or 0)
    left = exp - now
    if left < _MIN_TOKEN_LIFETIME:
        problems.append(f"the token expires in {int(left)} s (check this host's clock)")
    detail = (f"aud={aud} tid={tid or '-'} appid={appid or '-'} roles={','.join(roles) or '-'} "
              f"expires in {max(int(left), 0) // 60} min")
    if not problems:
        return True, detail, "", None
    hint = ""
    if "SMTP.SendAsApp" not in roles:
        hint = (
            "Entra ID issued a token without the SMTP.SendAsApp role: the API permission or the tenant admin"
            " consent is missing (Exchange will answer 535 5.7.3).\n"
            f"Admin step 2 ({STEPS[2].title}): {fill(STEPS[2].fix, app)}\n"
            f"Admin step 3 ({STEPS[3].title}): grant admin consent on the app's API permissions page"
            " (single tenant), or for a multi-tenant app have a tenant admin open:\n"
            f"  {admin_consent_url(app)}"
        )
    elif step == 1:
        hint = f"Admin step 1 ({STEPS[1].title}): {STEPS[1].fix}"
    elif step == 2:
        hint = f"The scope must be the Exchange Online resource + /.default (apps[{app.name}].scope)."
    return False, "; ".join(problems) + f" ({detail})", hint, step


def _discovery_error(app: AppSettings) -> TokenError:
    """MSAL refused to start because OIDC discovery failed: ask the same URL for Entra's error body."""
    url = f"{app.authority}/v2.0/.well-known/openid-configuration"
    session = build_http_session(app, os.environ)
    try:
        resp = session.get(url, timeout=app.timeout)
        try:
            body = resp.json()
        except ValueError:
            body = {}
    except requests.RequestException as exc:
        return http_failure(app.name, exc, app.effective_authority_host, app.timeout,
                            proxy=session.proxies.get("https"))
    finally:
        session.close()
    codes = body.get("error_codes") or []
    desc = str(body.get("error_description", "")).split("\r\n", 1)[0].split("\n", 1)[0]
    aadsts = int(codes[0]) if codes and str(codes[0]).isdigit() else parse_aadsts(desc)
    error = str(body.get("error", f"http_{resp.status_code}"))
    return TokenError(app.name, error, desc[:300] or f"discovery answered HTTP {resp.status_code}", aadsts=aadsts)


def _token_admin_step(exc: TokenError) -> int | None:
    from relay.delivery.hints import AADSTS_HINTS

    known = AADSTS_HINTS.get(exc.aadsts) if exc.aadsts else None
    if known is not None:
        return known.step
    return None if exc.transient else 4


# --------------------------------------------------------------------------- the walk

class _Walk:
    def __init__(self, settings: Settings, checks: Checklist, send_to: str | None) -> None:
        self.settings = settings
        self.checks = checks
        self.send_to = send_to
        self.sent = False

    async def app(self, app: AppSettings) -> None:
        c = self.checks
        name = f"token for app {app.name}"
        token: Token | None = None
        role_missing = False
        provider: TokenProvider | None = None
        try:
            try:
                provider = TokenProvider(app)
            except ConfigError as exc:
                c.add(name, False, str(exc), fill(STEPS[4].fix, app), kind="token", admin_step=4, app=app.name)
            except (ValueError, requests.RequestException):
                # MSAL fetches the OIDC metadata at construction: an unknown tenant, or an
                # unreachable Entra ID, lands here without an AADSTS code; ask for it ourselves.
                try:
                    exc2 = await call_with_deadline(lambda: _discovery_error(app), app.timeout + 1,
                                                    name="check-discovery")
                except TimeoutError:
                    exc2 = TokenError(app.name, "timeout", f"no answer from {host_of(app.effective_authority_host)} "
                                      f"within {app.timeout:g}s", transient=True)
                self._token_failed(app, name, exc2)
            if provider is not None:
                try:
                    token = await provider.get()
                except TokenError as exc:
                    self._token_failed(app, name, exc)
            mine = [m for m in self.settings.mailboxes if m.app == app.name]
            smtp_mailboxes = [m for m in mine if m.transport == "smtp" or m.fallback_smtp]
            graph_mailboxes = [m for m in mine if m.transport == "graph"]
            if token is not None:
                c.add(name, True, f"from {app.effective_authority_host} for {app.effective_scope}",
                      kind="token", app=app.name)
            if provider is not None and graph_mailboxes:
                await self.graph(app, provider)
            if not smtp_mailboxes:
                return  # Graph only: no SMTP role, no SMTP host to check
            if token is not None:
                ok, detail, hint, step = check_claims(app, token, time.time())
                role_missing = not ok and "lack SMTP.SendAsApp" in detail
                c.add(f"token claims for app {app.name}", ok, detail, hint, kind="claims", admin_step=step,
                      app=app.name)
            else:
                c.skip(f"token claims for app {app.name}", "no token", kind="claims", app=app.name)
            # TCP + STARTTLS does not need a token: check it anyway, it may be a second problem.
            transport_ok = await self.transport(app)
            for mbx in smtp_mailboxes:
                auth = f"AUTH XOAUTH2 as {mbx.address}"
                if token is None or not transport_ok:
                    c.skip(auth, "no token" if token is None else "no TLS session", kind="auth", app=app.name,
                           mailbox=mbx.address)
                    continue
                await self.mailbox(app, mbx.address, token, role_missing)
        finally:
            if provider is not None:
                provider.close()

    async def graph(self, app: AppSettings, provider: TokenProvider) -> None:
        """Graph mailboxes: a token for the Graph scope carrying the Mail.Send application role."""
        name = f"Graph token for app {app.name}"
        try:
            token = await provider.get(app.effective_graph_scope)
        except TokenError as exc:
            self._token_failed(app, name, exc)
            return
        self.checks.add(name, True, f"for {app.effective_graph_scope}", kind="token", app=app.name)
        ok, detail, hint = check_graph_claims(token)
        self.checks.add(f"Graph token claims for app {app.name}", ok, detail, hint, kind="graph_claims",
                        app=app.name)

    def _token_failed(self, app: AppSettings, name: str, exc: TokenError) -> None:
        code = f" AADSTS{exc.aadsts}" if exc.aadsts else ""
        detail = f"{exc.error}{code}: {_clean_description(exc)}"
        hint = hint_for_aadsts(exc.aadsts, exc.description)
        step = _token_admin_step(exc)
        if exc.transient and exc.error in ("timeout", "tls_handshake_failed") and "proxy" in exc.description:
            hint = ("The HTTPS proxy for Entra ID (apps[].proxy, HTTPS_PROXY) accepted the connection but did not"
                    f" answer or forward it: check that it allows CONNECT to {host_of(app.effective_authority_host)}"
                    " and that it can reach it; apps[].timeout bounds the wait.")
        elif exc.transient and exc.error in ("timeout", "tls_handshake_failed"):
            hint = (f"Entra ID ({app.effective_authority_host}) accepted the connection but did not answer: a"
                    " firewall that drops the traffic, or a TLS-inspecting proxy that swallows it. Check the"
                    " firewall and the HTTPS proxy (apps[].proxy, HTTPS_PROXY); apps[].timeout bounds the wait.")
        elif exc.transient:
            hint = (f"Entra ID ({app.effective_authority_host}) could not be reached or answered with a"
                    " temporary error: check DNS, the firewall and the HTTPS proxy (apps[].proxy, HTTPS_PROXY),"
                    " then try again.")
        elif step is not None:
            hint += f"\n{fill(STEPS[step].fix, app)}"
        self.checks.add(name, False, detail, hint, kind="token", admin_step=step, app=app.name)

    @property
    def smtp_timeout(self) -> float:
        """Deadline of each SMTP wait (connect, greeting, TLS handshake, each command)."""
        return min(self.settings.delivery.timeout, 30.0)

    def _smtp(self, app: AppSettings) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(hostname=app.effective_smtp_host, port=app.smtp_port, start_tls=False,
                               local_hostname=self.settings.hostname or None, timeout=self.smtp_timeout)

    async def _open(self, app: AppSettings) -> aiosmtplib.SMTP:
        smtp = self._smtp(app)
        await smtp.connect()
        await smtp.ehlo()
        await smtp.starttls(tls_context=tls_context_for(app))
        await smtp.ehlo()
        return smtp

    async def transport(self, app: AppSettings) -> bool:
        """TCP connect and STARTTLS (certificate and host name verified), once per app."""
        c = self.checks
        host = f"{app.effective_smtp_host}:{app.smtp_port}"
        smtp = self._smtp(app)
        try:
            try:
                greeting = await smtp.connect()
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                if isinstance(exc, TimeoutError):
                    detail = timeout_text(exc, Stage.CONNECT, host, self.smtp_timeout)
                else:
                    detail = _connect_problem(exc) or classify_exception(exc, Stage.CONNECT).reply
                hint = (f"This host cannot open TCP {app.smtp_port} to {app.effective_smtp_host}: check DNS, the"
                        " firewall (outbound 587 is often blocked) and apps[].smtp_host/smtp_port.")
                if "no SMTP greeting" in detail:
                    hint = (f"{host} accepted the TCP connection but never greeted: a firewall or middlebox that"
                            " swallows SMTP, or apps[].smtp_host/smtp_port point at something that is not an"
                            " SMTP server (Exchange Online: smtp.office365.com:587).")
                c.add(f"TCP connection to {host}", False, detail, hint, kind="tcp", app=app.name)
                c.skip(f"STARTTLS to {host}", "no TCP connection", kind="starttls", app=app.name)
                return False
            c.add(f"TCP connection to {host}", True, f"{greeting.code} {greeting.message.split(' ', 1)[0]}",
                  kind="tcp", app=app.name)
            try:
                await smtp.ehlo()
                if not smtp.supports_extension("starttls"):
                    raise aiosmtplib.SMTPException("the server does not offer STARTTLS")
                await smtp.starttls(tls_context=tls_context_for(app))
                await smtp.ehlo()
            except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
                detail = (timeout_text(exc, Stage.STARTTLS, host, self.smtp_timeout) if isinstance(exc, TimeoutError)
                          else _tls_problem(exc))
                hint = TLS_VERIFY_HINT if detail.startswith("certificate verification failed") else (
                    "STARTTLS failed: check that apps[].smtp_host/smtp_port point at Exchange Online"
                    " (smtp.office365.com:587) and that no middlebox strips STARTTLS.")
                if app.smtp_ca_file:
                    hint += f"\nThe relay trusts only apps[{app.name}].smtp_ca_file = {app.smtp_ca_file}."
                c.add(f"STARTTLS to {host}", False, detail, hint, kind="starttls", app=app.name)
                return False
            tls = smtp.get_transport_info("ssl_object")
            version = tls.version() if tls is not None else "?"
            mechs = ", ".join(sorted(smtp.server_auth_methods)).upper() or "none"
            if "xoauth2" not in smtp.server_auth_methods:
                c.add(f"STARTTLS to {host}", False, f"{version}; AUTH offered: {mechs}",
                      "The server offers no AUTH XOAUTH2 after STARTTLS: this is not Exchange Online's submission"
                      " endpoint; check apps[].smtp_host/smtp_port.", kind="starttls", app=app.name)
                return False
            c.add(f"STARTTLS to {host}", True, f"{version}, certificate verified, AUTH {mechs}",
                  kind="starttls", app=app.name)
            return True
        finally:
            await _close(smtp)

    async def mailbox(self, app: AppSettings, mailbox: str, token: Token, role_missing: bool) -> None:
        c = self.checks
        name = f"AUTH XOAUTH2 as {mailbox}"
        try:
            smtp = await self._open(app)
        except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            host = f"{app.effective_smtp_host}:{app.smtp_port}"
            why = (timeout_text(exc, Stage.CONNECT, host, self.smtp_timeout) if isinstance(exc, TimeoutError)
                   else _tls_problem(exc))
            c.add(name, False, f"could not reconnect: {why}", kind="auth", app=app.name, mailbox=mailbox)
            return
        try:
            try:
                await smtp.auth_xoauth2(mailbox, token.value)
            except aiosmtplib.SMTPResponseException as exc:
                verdict = classify_reply(exc.code, exc.message, Stage.AUTH)
                step, hint = _auth_hint(app, mailbox, verdict.enhanced, verdict.hint, role_missing)
                c.add(name, False, f"{exc.code} {_strip_trace(exc.message)}", hint, kind="auth",
                      admin_step=step, app=app.name, mailbox=mailbox)
                return
            c.add(name, True, "235 2.7.0 authenticated", kind="auth", app=app.name, mailbox=mailbox)
            if self.send_to and not self.sent:
                self.sent = True
                await self._send(smtp, app, mailbox)
        finally:
            await _close(smtp)

    async def _send(self, smtp: aiosmtplib.SMTP, app: AppSettings, mailbox: str) -> None:
        assert self.send_to is not None
        msg = EmailMessage()
        msg["From"] = mailbox
        msg["To"] = self.send_to
        msg["Subject"] = "oauth-smtp-relay check: test message"
        msg["Message-ID"] = make_msgid(domain=mailbox.split("@", 1)[1])
        msg.set_content("This test message was sent by `oauth-smtp-relay check --send-to`.\n")
        name = f"test message from {mailbox} to {self.send_to}"
        try:
            _errors, reply = await smtp.sendmail(mailbox, [self.send_to], msg.as_bytes())
            c_detail = f"250 {reply}" if not reply.startswith("2") else reply
            self.checks.add(name, True, f"{c_detail} Message-ID {msg['Message-ID']}", kind="send", app=app.name,
                            mailbox=mailbox)
        except aiosmtplib.SMTPResponseException as exc:
            verdict = classify_reply(exc.code, exc.message, Stage.DATA)
            self.checks.add(name, False, f"{exc.code} {_strip_trace(exc.message)}", fill(verdict.hint, app, mailbox),
                            kind="send", app=app.name, mailbox=mailbox)


def _auth_hint(app: AppSettings, mailbox: str, enhanced: str, hint: str, role_missing: bool) -> tuple[int | None, str]:
    """The admin step and the filled-in fix for a refused AUTH (5.7.3, 5.7.139, ...)."""
    hint = fill(hint, app, mailbox)
    if enhanced == "5.7.139":
        return 6, (f"{hint}\nExchange Online PowerShell (admin step 6, {STEPS[6].title}), as a tenant admin:\n"
                   f"  Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false\n"
                   f"  Get-CASMailbox -Identity {mailbox} | Format-List SmtpClientAuthenticationDisabled    # verify\n"
                   "  Get-TransportConfig | Format-List SmtpClientAuthenticationDisabled    # tenant-wide default")
    if enhanced == "5.7.3":
        first = ("The token lacks SMTP.SendAsApp (see the claims step above): fix admin steps 2 and 3 first.\n"
                 if role_missing else "")
        cause = hint.split(" Fix: ", 1)[0]
        setup = (f"  New-ServicePrincipal -AppId {app.client_id} -ObjectId <ENTERPRISE_APP_OBJECT_ID>\n"
                 "    # the Object ID from Enterprise applications, NOT from App registrations\n"
                 f"  Get-ServicePrincipal | Where-Object AppId -eq '{app.client_id}' | Format-List"
                 "    # its ID field is <SERVICE_PRINCIPAL_ID>\n"
                 f"  Add-MailboxPermission -Identity {mailbox} -User <SERVICE_PRINCIPAL_ID> -AccessRights FullAccess\n"
                 "(`oauth-smtp-relay exchange-setup -c CONFIG` prints this for every mailbox and From address)")
        return (3 if role_missing else 5), (
            f"{first}{cause}\nExchange Online PowerShell (admin step 5, {STEPS[5].title}), as a tenant admin:\n"
            f"{setup}")
    return None, hint


def _strip_trace(message: str) -> str:
    """Exchange's reply without the bracketed ``[server timestamp id]`` tail."""
    return re.sub(r"\s*\[[^\]]*\]\s*$", "", message).strip()



def _connect_problem(exc: BaseException) -> str:
    """'connection refused' / 'host name not found' / 'connection closed by the server', or ''."""
    for cause in exception_chain(exc):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return f"host name not found ({cause.strerror})"
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected) or "Connection lost" in str(exc):
        return "connected, then the server closed the connection without a greeting"
    return ""


def _tls_problem(exc: BaseException) -> str:
    """Certificate not trusted versus a handshake that failed or a peer that hung up: only the first
    is the trust store's business."""
    for cause in exception_chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate verification failed: {cause.verify_message or cause.reason}"
        if isinstance(cause, ssl.SSLEOFError | ConnectionResetError | aiosmtplib.SMTPServerDisconnected):
            return "the server closed the connection during the TLS handshake"
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed: {cause.reason or cause}"
    return f"{type(exc).__name__}: {exc}"[:300]


async def _close(smtp: aiosmtplib.SMTP) -> None:
    if smtp.is_connected:
        try:
            await asyncio.wait_for(smtp.quit(), 5)
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            smtp.close()


async def check_online(settings: Settings, checks: Checklist, send_to: str | None = None) -> None:
    walk = _Walk(settings, checks, send_to)
    for app in settings.apps:
        await walk.app(app)
    if send_to and not walk.sent:
        checks.skip(f"test message to {send_to}", "no mailbox authenticated", kind="send")


def run_check(args: argparse.Namespace) -> int:
    """Exit 0 when every step passes, 1 when one fails, 2 when the configuration itself is invalid."""
    checks = Checklist()
    offline = bool(getattr(args, "offline", False))
    # Offline, from an admin's shell: ${CREDENTIALS_DIRECTORY} exists only inside the service, so a
    # credential behind it is left unread (and said so) rather than refused; the unit's ExecStartPre
    # has the variable and reads it.
    unread: list[str] | None = [] if offline else None
    # The steps say what went wrong; the relay's own warnings (token_failed...) would repeat it on stderr.
    logging.getLogger("relay").addHandler(logging.NullHandler())
    if not getattr(args, "json", False):
        # Text output: each step as it ends, the summary at the end.
        checks.on_step = lambda step: print(Checklist.render_step(step), flush=True)
    try:
        settings = load_settings(args.config, unread_credentials=unread)
    except ConfigError as exc:
        checks.add("configuration", False, str(exc), _config_hint(exc), kind="config")
        _output(args, checks)
        return 2
    summary = f"{len(settings.apps)} app(s), {len(settings.mailboxes)} mailbox(es), {len(settings.users)} user(s)"
    checks.add(f"configuration {args.config}", True, summary, kind="config")
    for warning in load_warnings:
        # An inline secret in a file others can read is a leak waiting to happen: fail the check.
        checks.add("configuration file permissions", False, warning,
                   "chmod 600 the file, or move the secret to a *_file or ${ENV} reference.", kind="config")
    if offline:
        _check_listener_tls(settings, str(args.config), checks)
        _check_spool(settings, checks)
        if unread:
            _note(f"not read here: {', '.join(unread)}; the service has the variable (systemd sets "
                  "CREDENTIALS_DIRECTORY for it), and the online check run as in docs/systemd.md reads it")
        if getattr(args, "send_to", None):
            _note("--send-to is ignored with --offline: no test message was sent (run check without --offline "
                  "to send one)")
    else:
        asyncio.run(check_online(settings, checks, getattr(args, "send_to", None)))
    _output(args, checks)
    return 0 if checks.ok else 1


def _config_hint(exc: ConfigError) -> str:
    if exc.problem.startswith("not valid YAML"):
        return ("The file is not valid YAML at the line shown: check its indentation, and quote values that"
                " start with ':', '*', '&', '[' or '{' or contain ': ' (e.g. \"::1\").")
    if not exc.key:
        return ""
    return "Fix the key(s) named above; `oauth-smtp-relay example-config` prints an example with every key explained."


def _check_listener_tls(settings: Settings, file: str, checks: Checklist) -> None:
    """The listeners' certificate and key load (serve would stop at start otherwise)."""
    if settings.tls is None:
        return
    from relay.intake.tls import listener_tls

    try:
        listener_tls(settings, file)
    except ConfigError as exc:
        checks.add("listener TLS certificate", False, str(exc), "", kind="config")
        return
    checks.add("listener TLS certificate", True, f"{settings.tls.cert_file} loads with its key", kind="config")


def _check_spool(settings: Settings, checks: Checklist) -> None:
    """The relay's user must be able to write the spool: a bad spool fails here, before the start."""
    path = settings.spool.path
    problem = writable_problem(path)
    if problem is None:
        checks.add(f"spool {path}", True, f"writable by user {running_user()}", kind="spool")
    else:
        checks.add(f"spool {path}", False, problem,
                   "Give the spool to the user the relay runs as (chown -R), or set spool.path to a directory it"
                   " may write; under systemd use /var/lib/oauth-smtp-relay/spool (StateDirectory=, see"
                   " docs/systemd.md).", kind="spool")


def _note(text: str) -> None:
    """Something the admin should know that is neither a pass nor a failure (stderr: --json stays clean)."""
    print(f"note: {text}", file=sys.stderr)


def _output(args: argparse.Namespace, checks: Checklist) -> None:
    if getattr(args, "json", False):
        print(json.dumps(checks.as_dict(), indent=2))
    elif checks.on_step is not None:
        print(checks.summary(), flush=True)  # the steps are printed already
    else:
        print(checks.render(), file=sys.stdout)
