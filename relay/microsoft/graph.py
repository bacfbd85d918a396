"""Microsoft Graph transport: the raw MIME message POSTed to ``/v1.0/users/{mailbox}/sendMail``.

For tenants that keep SMTP AUTH switched off, a mailbox may say ``transport: graph``. The message
goes unchanged but for its recipient headers (see below), base64-encoded, as ``Content-Type:
text/plain``, with an app-only token for ``https://graph.microsoft.com/.default`` (the Mail.Send
application permission). The token comes from the app registration's one MSAL application, second
scope (:meth:`relay.microsoft.tokens.TokenProvider.get` with ``scope=``): cached, single-flight, refreshed ahead.

Why the recipient headers are rewritten: Graph has no envelope. It rebuilds the recipients from the
``To``, ``Cc`` and ``Bcc`` headers of the MIME, and the envelope is the truth (docs/architecture.md, invariant 9). So:

* an envelope recipient missing from those headers (a Bcc the client put only in RCPT TO, an alias
  expanded by an MTA in front of us) is added to a ``Bcc`` header, or Graph would never deliver to it;
  Exchange removes ``Bcc`` from the copies recipients get, exactly like for a Bcc given by Outlook;
* a header address that is not a recipient of this attempt (already delivered, or never in RCPT TO:
  ``To: root`` of a cron mail whose envelope says ``admin@contoso.com``, a list address) is removed
  from the header, or Graph would deliver to it: unasked copies, and a way around the relay's
  recipient limits. Nothing else in the message is touched.

Graph's request limit is 4 MB and base64 adds a third: a MIME message over ``apps[].graph_max_mime``
(3,000,000 bytes by default) is refused permanently with ``552 5.3.4`` naming that limit, or, when the
mailbox has ``fallback_smtp: true``, goes by SMTP (:class:`relay.microsoft.transport.Dispatcher` does that).

HTTP runs in a worker thread with ``requests`` (no new dependency): the same session settings as the
token endpoint, ``trust_env=False``, the app's ``token_ca_file`` and proxy (``NO_PROXY`` is evaluated
against the Graph host). The answer becomes one :class:`relay.delivery.classify.Verdict` by the classifier's
Graph rows (:func:`relay.delivery.classify.classify_graph`).
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import email.utils
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from relay.blocking import call_with_deadline
from relay.config import AppSettings, MailboxSettings, Settings
from relay.delivery.classify import (
    Action,
    GraphReply,
    Outcome,
    Scope,
    Stage,
    Verdict,
    classify_exception,
    classify_graph,
    graph_failed,
)
from relay.delivery.hints import GRAPH_AUDIENCE_HINT, GRAPH_PERMISSION_HINT, GRAPH_TLS_HINT
from relay.envelope import Envelope, Route
from relay.errors import TokenError
from relay.microsoft.tokens import Token, TokenProvider, host_of, proxy_from_environment

log = logging.getLogger("relay.graph")

MAIL_SEND = "Mail.Send"
#: The longest Retry-After honoured; Graph asks for seconds to minutes.
RETRY_AFTER_MAX = 3600.0

# --------------------------------------------------------------------------------------- claims


def check_graph_claims(token: Token | str, now: float | None = None) -> tuple[bool, str, str]:
    """Does a Graph token carry what sendMail needs? ``(ok, detail, hint)`` for ``check``.

    Reads the claims without verifying the signature (we are the token's holder, not its audience):
    audience Microsoft Graph, not expired, ``roles`` containing ``Mail.Send``. Never returns the token.
    """
    value = token.value if isinstance(token, Token) else token
    import jwt  # loaded when a Graph token is inspected, not at start

    try:
        claims: dict[str, Any] = dict(jwt.decode(value, options={"verify_signature": False}))
    except jwt.PyJWTError:
        return False, "the Graph token is not a JWT", "Entra ID returned an unexpected token: run check again."
    aud = str(claims.get("aud", "")).rstrip("/")
    if "graph" not in aud.lower() and aud != "00000003-0000-0000-c000-000000000000":
        return False, f"the token's audience is {aud or '(none)'}, not Microsoft Graph", GRAPH_AUDIENCE_HINT
    exp = claims.get("exp")
    if isinstance(exp, int | float) and exp <= (time.time() if now is None else now):
        return False, "the Graph token has expired", "Check this host's clock (NTP)."
    roles = [str(r) for r in claims.get("roles") or []]
    if MAIL_SEND not in roles:
        shown = ", ".join(roles) if roles else "none"
        return (False, f"the Graph token lacks the Mail.Send role (roles: {shown}); Graph will answer 403 unless"
                " RBAC for Applications grants it", GRAPH_PERMISSION_HINT)
    return True, f"Graph token for {aud} carries Mail.Send", ""


def _token_has_mail_send(token: Token) -> bool:
    return MAIL_SEND in (token.claims().get("roles") or [])


# --------------------------------------------------------------------------------------- classifier


def too_big_verdict(size: int, limit: int) -> Verdict:
    """The permanent refusal of a message Graph cannot take in one request."""
    return graph_failed("too_big", 552, "5.3.4",
                        f"Message size exceeds Microsoft Graph's sendMail limit: {size} bytes of MIME, at most"
                        f" {limit} (a 4 MB request, base64-encoded); send it smaller or enable fallback_smtp for"
                        " this mailbox")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After``: seconds or an HTTP date -> seconds from now (0..RETRY_AFTER_MAX), None if absent."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_MAX)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


# --------------------------------------------------------------------------------------- MIME


_HEADER_END = re.compile(rb"\r?\n\r?\n")
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")
_SPECIALS = re.compile(r'[()<>@,:;.\\"\[\]]')
_ADDRESS_FIELDS = ("to", "cc", "bcc")


@dataclass(frozen=True)
class PreparedMime:
    mime: bytes
    added_bcc: tuple[str, ...]  # envelope recipients that were in no header
    removed: tuple[str, ...]  # header addresses that are not recipients of this attempt


def prepare_mime(message: bytes, recipients: Sequence[str]) -> PreparedMime:
    """Make the ``To``/``Cc``/``Bcc`` headers name exactly ``recipients`` (see the module docstring).

    Address fields that need no change stay byte for byte as they were; the body is never touched.
    """
    match = _HEADER_END.search(message)
    if match is None:  # headers only, no body
        head, rest = message, b""
    else:  # the separator's first line ending still belongs to the last header field
        cut = match.start() + (2 if match.group(0).startswith(b"\r\n") else 1)
        head, rest = message[:cut], message[cut:]
    eol = b"\r\n" if b"\r\n" in head else b"\n"
    wanted = {r.lower(): r for r in recipients}

    fields = _split_fields(head)
    parsed: dict[int, list[tuple[str, str]]] = {}
    for i, (name, raw) in enumerate(fields):
        if name in _ADDRESS_FIELDS:
            # UTF-8 as SMTPUTF8 allows; anything else survives as surrogates and is written back as it was.
            value = _UNFOLD.sub(" ", raw.decode("utf-8", "surrogateescape").split(":", 1)[1]).strip()
            parsed[i] = [(n, a) for n, a in email.utils.getaddresses([value]) if a]
    in_headers = {a.lower() for pairs in parsed.values() for _, a in pairs}
    removed = tuple(sorted(a for a in in_headers if a not in wanted))
    added = tuple(r for key, r in wanted.items() if key not in in_headers)
    if not removed and not added:
        return PreparedMime(message, (), ())

    out: list[bytes] = []
    bcc_pairs: list[tuple[str, str]] = []
    for i, (name, raw) in enumerate(fields):
        if i not in parsed:
            out.append(raw)
            continue
        pairs = parsed[i]
        if name == "bcc":
            bcc_pairs.extend((n, a) for n, a in pairs if a.lower() in wanted)
            continue  # all Bcc fields become one, written below
        if not any(a.lower() not in wanted for _, a in pairs):
            out.append(raw)
            continue
        kept = [(n, a) for n, a in pairs if a.lower() in wanted]
        if kept:
            out.append(_field(name.capitalize(), kept, eol))
    bcc_pairs.extend(("", r) for r in added)
    if bcc_pairs:
        out.insert(0, _field("Bcc", bcc_pairs, eol))
    return PreparedMime(b"".join(out) + rest, added, removed)


def _split_fields(head: bytes) -> list[tuple[str, bytes]]:
    """Header block -> [(lower-case name, raw bytes of the field incl. continuation lines and EOL)]."""
    fields: list[tuple[str, bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
            continue
        name = line.split(b":", 1)[0].strip().lower().decode("ascii", "replace") if b":" in line else ""
        fields.append((name, line))
    if fields and not fields[-1][1].endswith(b"\n"):
        name, raw = fields[-1]
        fields[-1] = (name, raw + (b"\r\n" if b"\r\n" in head else b"\n"))
    return fields


def _field(name: str, pairs: list[tuple[str, str]], eol: bytes) -> bytes:
    """``Name: a, b`` folded (RFC 5322 2.2.3) before 78 columns where the addresses allow."""
    items = [_format_address(n, a) for n, a in pairs]
    text = f"{name}:"
    column = len(text)
    newline = eol.decode("ascii")
    for j, item in enumerate(items):
        piece = " " + item + ("," if j < len(items) - 1 else "")
        if j > 0 and column + len(piece) > 78:
            text += newline  # fold: the piece's leading space makes the continuation line
            column = 0
        text += piece
        column += len(piece)
    return text.encode("utf-8", "surrogateescape") + eol


def _format_address(name: str, address: str) -> str:
    if not name:
        return address
    try:
        return email.utils.formataddr((name, address))
    except UnicodeError:  # an internationalised address (SMTPUTF8): the name goes as UTF-8 too
        if _SPECIALS.search(name):
            name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{name} <{address}>"


# --------------------------------------------------------------------------------------- sender


class TooBigForGraph(Exception):
    """The message exceeds ``graph_max_mime`` (internal: becomes a refusal or the SMTP fallback)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} > {limit}")
        self.size = size
        self.limit = limit


class GraphSender:
    """Sends routed messages of ``transport: graph`` mailboxes through Microsoft Graph."""

    def __init__(
        self,
        apps: Mapping[str, AppSettings],
        tokens: Mapping[str, TokenProvider],
        mailboxes: Sequence[MailboxSettings],
        *,
        timeout: float = 60.0,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import os

        self._apps = dict(apps)
        self._tokens = dict(tokens)
        self._mailboxes = {m.address.lower(): m for m in mailboxes}
        self._timeout = timeout
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._sessions: dict[str, requests.Session] = {}
        self.requests = 0  # sendMail requests sent (tests, metrics)

    @classmethod
    def from_settings(cls, settings: Settings, tokens: Mapping[str, TokenProvider], **kwargs: Any) -> GraphSender:
        """From a :class:`relay.config.Settings` and the providers by app name."""
        return cls({a.name: a for a in settings.apps}, tokens, settings.mailboxes,
                   timeout=settings.delivery.timeout, **kwargs)

    def handles(self, mailbox: str) -> bool:
        mbx = self._mailboxes.get(mailbox.lower())
        return mbx is not None and mbx.transport == "graph"

    def falls_back_to_smtp(self, mailbox: str) -> bool:
        mbx = self._mailboxes.get(mailbox.lower())
        return mbx is not None and mbx.fallback_smtp

    def _session(self, app: AppSettings) -> requests.Session:
        session = self._sessions.get(app.name)
        if session is None:
            session = requests.Session()
            session.trust_env = False
            session.verify = str(app.token_ca_file) if app.token_ca_file else True
            proxy = app.proxy or proxy_from_environment(app.effective_graph_host, self._environ)
            if proxy:
                session.proxies = {"https": proxy, "http": proxy}
            self._sessions[app.name] = session
        return session

    async def submit(self, route: Route, envelope: Envelope, body: bytes | Path,
                     recipients: tuple[str, ...]) -> Outcome | None:
        """One attempt for ``recipients``. None: too big for Graph and the mailbox has
        ``fallback_smtp``, so the caller sends it by SMTP."""
        app = self._apps[route.app]
        limit = app.graph_max_mime
        try:
            prepared = await asyncio.to_thread(_load_and_prepare, body, recipients, limit)
        except TooBigForGraph as exc:
            return self._too_big(route, exc.size, limit)
        except OSError as exc:
            # The spool file vanished or cannot be read: a local problem, try again later.
            return Outcome(verdict=classify_exception(exc, Stage.TOKEN), deferred=recipients)
        if len(prepared.mime) > limit:
            return self._too_big(route, len(prepared.mime), limit)
        if prepared.added_bcc or prepared.removed:
            log.info("recipient headers adjusted for Graph", extra={
                "event": "graph_recipients", "mailbox": route.mailbox, "added_bcc": len(prepared.added_bcc),
                "removed_header_only": len(prepared.removed)})
        payload = base64.b64encode(prepared.mime)
        provider = self._tokens[route.app]
        scope = app.effective_graph_scope
        try:
            token = await provider.get(scope)
            reply = await self._post(app, route.mailbox, token, payload)
            if reply.status == 401:
                # Graph refused this token (expired early, revoked, consent changed): once more, fresh.
                await provider.evict(token, scope=scope)
                token = await provider.get(scope)
                reply = await self._post(app, route.mailbox, token, payload)
        except TokenError as exc:
            verdict = classify_exception(exc, Stage.TOKEN)
            return Outcome(verdict=verdict, deferred=recipients if verdict.action is Action.RETRY else ())
        except requests.exceptions.SSLError:
            verdict = Verdict(Action.HOLD, "tls", f"TLS certificate verification failed for {app.effective_graph_host}",
                              Scope.APP, hint=GRAPH_TLS_HINT)
            return Outcome(verdict=verdict, deferred=recipients)
        except (requests.exceptions.Timeout, TimeoutError):
            text = f"Microsoft Graph: no answer from {host_of(app.effective_graph_host)} within {self._timeout:g}s"
            log.warning(text, extra={"event": "graph_timeout", "endpoint": host_of(app.effective_graph_host),
                                     "mailbox": route.mailbox})
            return Outcome(verdict=Verdict(Action.RETRY, "timeout", text, Scope.MESSAGE), deferred=recipients)
        except requests.RequestException as exc:
            text = f"Microsoft Graph unreachable: {type(exc).__name__}"
            return Outcome(verdict=Verdict(Action.RETRY, "connection", text, Scope.MESSAGE), deferred=recipients)
        verdict = classify_graph(reply, token_has_role=_token_has_mail_send(token))
        if verdict.evict_token:
            await provider.evict(token, scope=scope)
        if verdict.action is Action.DELIVERED:
            return Outcome(verdict=verdict, delivered=recipients, upstream_id=reply.request_id)
        return Outcome(verdict=verdict, deferred=recipients if verdict.action is not Action.FAILED else ())

    def _too_big(self, route: Route, size: int, limit: int) -> Outcome | None:
        if self.falls_back_to_smtp(route.mailbox):
            log.info("too big for Graph: sending by SMTP", extra={
                "event": "graph_fallback_smtp", "mailbox": route.mailbox, "size": size, "limit": limit})
            return None
        return Outcome(verdict=too_big_verdict(size, limit))

    async def _post(self, app: AppSettings, mailbox: str, token: Token, payload: bytes) -> GraphReply:
        url = f"{app.effective_graph_host}/v1.0/users/{quote(mailbox, safe='@')}/sendMail"
        headers = {
            "Authorization": f"Bearer {token.value}",
            "Content-Type": "text/plain",
            "client-request-id": str(uuid.uuid4()),
            "return-client-request-id": "true",
        }
        session = self._session(app)
        self.requests += 1

        connect_timeout = min(30.0, self._timeout)

        def post() -> GraphReply:
            with session.post(url, data=payload, headers=headers, timeout=(connect_timeout, self._timeout),
                              allow_redirects=False) as response:
                return _reply_from(response, self._clock())

        # A daemon thread with a deadline: a silent Graph endpoint never holds up the loop or shutdown.
        return await call_with_deadline(post, connect_timeout + self._timeout, name="graph-post")

    async def probe(self, route: Route) -> Verdict:
        """For a held Graph mailbox: can a fresh Graph token be had? Then let the next attempt tell.

        Graph has no side-effect-free sendMail, so the probe cannot see an access policy; and it does
        not insist on the Mail.Send role in the token, because a grant by RBAC for Applications gives
        tokens without it (holding those forever would be worse than one refused attempt per probe).
        """
        app = self._apps[route.app]
        provider = self._tokens[route.app]
        scope = app.effective_graph_scope
        try:
            await provider.evict(scope=scope)
            token = await provider.get(scope)
        except TokenError as exc:
            return classify_exception(exc, Stage.TOKEN)
        _, detail, _ = check_graph_claims(token, self._clock())
        return Verdict(Action.DELIVERED, "probe_ok", f"Microsoft Graph: {detail}", Scope.MAILBOX, code=250,
                       enhanced="2.0.0")

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()


def _load_and_prepare(body: bytes | Path, recipients: Sequence[str], limit: int) -> PreparedMime:
    """Worker thread: read the message (refusing early what cannot fit) and fix its recipient headers."""
    if isinstance(body, Path):
        size = body.stat().st_size
        # Header rewriting changes the size by a few hundred bytes at most: anything clearly over the
        # limit is not even read into memory.
        if size > limit + 64 * 1024:
            raise TooBigForGraph(size, limit)
        data = body.read_bytes()
    else:
        data = body
        if len(data) > limit + 64 * 1024:
            raise TooBigForGraph(len(data), limit)
    return prepare_mime(data, recipients)


def _reply_from(response: requests.Response, now: float) -> GraphReply:
    code = message = ""
    if response.content:
        try:
            error = response.json().get("error") or {}
            code = str(error.get("code", ""))
            message = str(error.get("message", ""))
        except (ValueError, AttributeError):
            message = response.text[:200]
    return GraphReply(
        status=response.status_code,
        code=code,
        message=message,
        retry_after=parse_retry_after(response.headers.get("Retry-After"), now),
        request_id=response.headers.get("request-id", ""),
    )

