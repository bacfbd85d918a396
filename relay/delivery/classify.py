"""One classifier for every upstream outcome: each Exchange reply or exception becomes one Verdict.

The reply table is docs/exchange.md's "Reply codes", kept here as data
(:data:`RULES`): the first rule whose reply code, enhanced status code, stable text token and stage
all match decides. Matching never looks at the bracketed tail (``[Hostname=... ]``), which varies.

Why rules are strict about a few things:

* ``5.7.3`` matches exactly: a prefix match would also catch ``5.7.30`` (basic auth), a different fix.
* ``SubmissionQuotaExceededException`` (daily recipient quota: wait) is tested before
  ``QuotaExceededException`` (Sent Items full: admin) because the first contains the second.
* ``5.2.252`` is both "SendAsDenied" and inside the "sender throttled" range ``5.2.251-5.2.255``;
  the SendAsDenied token decides first.
* A 5xx before MAIL FROM (greeting, EHLO, STARTTLS) says nothing about the message: it holds the app
  instead of failing mail (invariant 3: configuration errors hold, never bounce).

``reply`` texts are built from what the server said, or from a fixed description of an exception
(type, errno name, aiosmtplib's own message): never from ``repr(exc)`` or ``exc.args``, which could
carry a token or password passed as an argument.
"""

from __future__ import annotations

import errno
import re
import ssl
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiosmtplib

from relay.delivery import hints as H
from relay.delivery.hints import (
    GRAPH_ACCESS_DENIED_HINT,
    GRAPH_AUDIENCE_HINT,
    GRAPH_PERMISSION_HINT,
    GRAPH_USER_HINT,
    NOT_SUPPORTED_HINT,
    TLS_VERIFY_HINT,
    UNREACHABLE_HINT,
    Hint,
    hint_for_aadsts,
)
from relay.errors import TokenError, exception_chain
from relay.text import one_line

__all__ = [
    "GRAPH_RULES",
    "RETRY_THROTTLED",
    "RULES",
    "Action",
    "GraphReply",
    "GraphRule",
    "Outcome",
    "Rule",
    "Scope",
    "Stage",
    "Verdict",
    "classify_exception",
    "classify_graph",
    "classify_recipients",
    "classify_reply",
    "graph_failed",
    "parse_enhanced",
    "timeout_text",
]

#: seconds; what the rules dictate. The scheduler's backoff applies when a verdict says None.
RETRY_CONNECTIONS = 60.0  # 432 4.3.2: another connection of this mailbox will finish soon
RETRY_RATE = 60.0  # 421 4.4.2 submission rate: the per-minute window moves on
RETRY_QUOTA = 3600.0  # 554 5.2.0 SubmissionQuotaExceeded: rolling 24 h window; give up only at max_age
RETRY_SENDER_THROTTLED = 3600.0  # 550 5.2.25x: Exchange punishes repeated errors; stay away long
MAX_REPLY = 1000


class Action(StrEnum):
    DELIVERED = "delivered"  # accepted (at DATA: the message is Exchange's now)
    RETRY = "retry"  # transient: try again (after retry_after, or the scheduler's backoff)
    HOLD = "hold"  # configuration problem: stop sending for the scope, alarm, never bounce
    FAILED = "failed"  # permanent for the scope: do not retry blindly


class Stage(StrEnum):
    TOKEN = "token"  # noqa: S105 (a stage name, not a secret)
    CONNECT = "connect"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class Scope(StrEnum):
    MESSAGE = "message"  # this message
    RECIPIENT = "recipient"  # one recipient of this message
    MAILBOX = "mailbox"  # everything sent through this mailbox (user=)
    APP = "app"  # everything sent with this app registration / upstream


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str
    reply: str
    scope: Scope
    retry_after: float | None = None
    evict_token: bool = False
    hint: str = ""
    code: int | None = None
    enhanced: str = ""


@dataclass
class Outcome:
    """What one delivery attempt achieved, recipient by recipient.

    ``verdict`` is the verdict for the message as a whole (DELIVERED when every recipient is done or
    permanently refused); ``delivered`` are recipients Exchange accepted the message for, ``failed``
    permanently refused recipients, ``deferred`` recipients to try again.
    """

    verdict: Verdict
    delivered: tuple[str, ...] = ()
    failed: dict[str, Verdict] = field(default_factory=dict)
    deferred: tuple[str, ...] = ()
    upstream_id: str = ""
    duration: float = 0.0


@dataclass(frozen=True)
class Rule:
    """One row of the table. Every given criterion must match; alternatives inside one match any.

    ``enhanced`` entries match exactly, or as a prefix when they end in ``.`` (``"5.1."``); ``""``
    matches a reply without one; ``tokens`` are lower-case substrings of the reply text. ``hint``
    (worded in relay.delivery.hints) is what an admin must do when this rule decides.
    """

    action: Action
    reason: str
    scope: Scope
    codes: frozenset[int] = frozenset()
    code_class: int | None = None  # first digit: 2, 4 or 5
    enhanced: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    stages: frozenset[Stage] = frozenset()
    not_stages: frozenset[Stage] = frozenset()
    retry_after: float | None = None
    evict_token: bool = False
    hint: Hint | None = None  # what an admin must do (hints.py words it); None: nothing

    def matches(self, code: int, enhanced: str, text: str, stage: Stage) -> bool:
        if self.codes and code not in self.codes:
            return False
        if self.code_class is not None and code // 100 != self.code_class:
            return False
        if self.stages and stage not in self.stages:
            return False
        if stage in self.not_stages:
            return False
        if self.enhanced and not any(
            enhanced.startswith(p) if p.endswith(".") else enhanced == p for p in self.enhanced
        ):
            return False
        return not self.tokens or any(t in text for t in self.tokens)


def _stages(*s: Stage) -> frozenset[Stage]:
    return frozenset(s)


A, S, St = Action, Scope, Stage
_PRE_MAIL = _stages(St.CONNECT, St.EHLO, St.STARTTLS)

RULES: tuple[Rule, ...] = (
    # -- accepted
    Rule(A.DELIVERED, "delivered", S.MESSAGE, code_class=2, stages=_stages(St.DATA)),
    Rule(A.DELIVERED, "accepted", S.RECIPIENT, code_class=2, stages=_stages(St.RCPT)),
    Rule(A.DELIVERED, "accepted", S.MESSAGE, code_class=2),
    # -- token too old (high-volume endpoint): evict, re-auth, retry at once
    Rule(A.RETRY, "token_expiring", S.MESSAGE, enhanced=("5.5.127",), retry_after=0.0, evict_token=True),
    # -- configuration: hold, never bounce
    Rule(A.HOLD, "auth_disabled", S.MAILBOX, enhanced=("5.7.139",), hint=H.SMTP_AUTH_DISABLED),
    Rule(A.HOLD, "auth_disabled", S.MAILBOX, tokens=("smtpclientauthentication is disabled",),
         hint=H.SMTP_AUTH_DISABLED),
    Rule(A.HOLD, "auth_failed", S.MAILBOX, codes=frozenset({535}), enhanced=("5.7.3",), hint=H.AUTH_FAILED),
    Rule(A.HOLD, "basic_auth_rejected", S.APP, enhanced=("5.7.30",), hint=H.BASIC_AUTH),
    Rule(A.HOLD, "basic_auth_rejected", S.APP, tokens=("basic authentication is not supported",), hint=H.BASIC_AUTH),
    Rule(A.HOLD, "not_authenticated", S.APP, enhanced=("5.7.57",), hint=H.NOT_AUTHENTICATED),
    Rule(A.HOLD, "not_authenticated", S.APP, codes=frozenset({530}), hint=H.NOT_AUTHENTICATED),
    # -- throttling: transient, paced per mailbox
    Rule(
        A.RETRY,
        "throttled_connections",
        S.MAILBOX,
        codes=frozenset({432}),
        enhanced=("4.3.2",),
        retry_after=RETRY_CONNECTIONS,
        hint=H.CONNECTIONS,
    ),
    Rule(
        A.RETRY,
        "rate_limited",
        S.MAILBOX,
        codes=frozenset({421}),
        enhanced=("4.4.2",),
        tokens=("rate",),
        retry_after=RETRY_RATE,
    ),
    # -- daily recipient quota: looks permanent, is not (before QuotaExceededException below)
    Rule(
        A.RETRY,
        "quota_exceeded",
        S.MAILBOX,
        tokens=("submissionquotaexceededexception",),
        retry_after=RETRY_QUOTA,
        hint=H.DAILY_QUOTA,
    ),
    # -- permanent for this message (SendAsDenied before the 5.2.251-255 range: 5.2.252 is both)
    Rule(A.FAILED, "sendas_denied", S.MESSAGE, enhanced=("5.7.60",), hint=H.SEND_AS),
    Rule(A.FAILED, "sendas_denied", S.MESSAGE, tokens=("sendasdenied",), hint=H.SEND_AS),
    Rule(A.FAILED, "too_big", S.MESSAGE, tokens=("messagesubmissionexceededexception",), hint=H.TOO_BIG),
    Rule(A.FAILED, "too_big", S.MESSAGE, enhanced=("5.3.4",), hint=H.TOO_BIG),
    Rule(A.FAILED, "mailbox_full", S.MESSAGE, enhanced=("5.2.2",), not_stages=_stages(St.RCPT),
         hint=H.MAILBOX_FULL),
    Rule(
        A.FAILED, "mailbox_full", S.MESSAGE, tokens=("quotaexceededexception",), not_stages=_stages(St.RCPT),
        hint=H.MAILBOX_FULL,
    ),
    # -- Exchange punishes repeated permanent errors: stay away from the mailbox for long
    Rule(
        A.RETRY,
        "sender_throttled",
        S.MAILBOX,
        code_class=5,
        enhanced=("5.2.251", "5.2.253", "5.2.254", "5.2.255"),
        retry_after=RETRY_SENDER_THROTTLED,
        hint=H.SENDER_THROTTLED,
    ),
    Rule(
        A.RETRY,
        "sender_throttled",
        S.MAILBOX,
        code_class=5,
        tokens=("sender throttled",),
        retry_after=RETRY_SENDER_THROTTLED,
        hint=H.SENDER_THROTTLED,
    ),
    # 5.2.252 with neither SendAsDenied nor "sender throttled" in the text: throttled, but no telling
    # what the admin should fix
    Rule(
        A.RETRY,
        "sender_throttled",
        S.MAILBOX,
        code_class=5,
        enhanced=("5.2.252",),
        retry_after=RETRY_SENDER_THROTTLED,
    ),
    # -- per recipient
    Rule(A.FAILED, "bad_recipient", S.RECIPIENT, code_class=5, enhanced=("5.1.",), stages=_stages(St.RCPT)),
    Rule(A.FAILED, "recipient_refused", S.RECIPIENT, code_class=5, stages=_stages(St.RCPT)),
    Rule(A.RETRY, "transient", S.RECIPIENT, code_class=4, stages=_stages(St.RCPT)),
    # -- an unknown refusal of AUTH is a configuration problem of that mailbox (a bare 535 most
    #    likely the one Exchange words as 535 5.7.3)
    Rule(A.HOLD, "auth_rejected", S.MAILBOX, codes=frozenset({535}), enhanced=("",), stages=_stages(St.AUTH),
         hint=H.AUTH_FAILED),
    Rule(A.HOLD, "auth_rejected", S.MAILBOX, code_class=5, stages=_stages(St.AUTH), hint=H.AUTH_REJECTED),
    # -- a 5xx before MAIL FROM is about the session, not the message
    Rule(A.HOLD, "session_refused", S.APP, code_class=5, stages=_PRE_MAIL, hint=H.SESSION_REFUSED),
    # -- the rest
    Rule(A.RETRY, "transient", S.MESSAGE, code_class=4),
    Rule(A.FAILED, "rejected", S.MESSAGE, code_class=5),
)

_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


def parse_enhanced(text: str) -> str:
    """The RFC 3463 enhanced status code at the start of a reply text (``5.7.3``), or ''."""
    m = _ENHANCED_RE.match(text.lstrip())
    return ".".join(m.groups()) if m else ""


def _clean(text: str) -> str:
    """One line, no control characters, bounded length."""
    return one_line(text, MAX_REPLY, squeeze=True)


def _strip_code(code: int, text: str) -> str:
    """Drop a leading ``550 ``/``550-`` when the caller passed a whole reply line as text."""
    text = text.strip()
    for sep in (" ", "-"):
        if text.startswith(f"{code}{sep}"):
            return text[4:]
    return text


def classify_reply(code: int, text: str, stage: Stage) -> Verdict:
    """Classify an SMTP reply ``code`` + ``text`` (the text after the code, lines joined) at ``stage``."""
    body = _strip_code(code, text or "")
    enhanced = parse_enhanced(body)
    reply = _clean(f"{code} {body}" if body else str(code))
    lowered = body.lower()
    if not 200 <= code <= 599 or code // 100 == 3:
        return Verdict(A.RETRY, "unexpected_reply", reply, S.MESSAGE, code=code, enhanced=enhanced)
    for rule in RULES:
        if rule.matches(code, enhanced, lowered, stage):
            hint = rule.hint.render(lowered) if rule.hint is not None and rule.action is not A.DELIVERED else ""
            return Verdict(
                action=rule.action,
                reason=rule.reason,
                reply=reply,
                scope=rule.scope,
                retry_after=rule.retry_after,
                evict_token=rule.evict_token,
                hint=hint,
                code=code,
                enhanced=enhanced,
            )
    # Unreachable: 2xx, 4xx and 5xx each have a catch-all rule.
    return Verdict(A.RETRY, "unexpected_reply", reply, S.MESSAGE, code=code, enhanced=enhanced)


def classify_recipients(exc: aiosmtplib.SMTPRecipientsRefused) -> dict[str, Verdict]:
    """One verdict per refused recipient (aiosmtplib raises this when every recipient was refused)."""
    return {r.recipient: classify_reply(r.code, r.message, St.RCPT) for r in exc.recipients}


_SEVERITY = {A.HOLD: 3, A.RETRY: 2, A.FAILED: 1, A.DELIVERED: 0}



def _oserror_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "") if isinstance(exc.errno, int) else ""
    parts = [type(exc).__name__]
    if name:
        parts.append(name)
    if exc.strerror:
        parts.append(str(exc.strerror))
    return _clean(": ".join(parts))


def _smtp_text(exc: aiosmtplib.SMTPException) -> str:
    # aiosmtplib's own messages ("Connection lost", "Timed out waiting for server response",
    # "Error connecting to host on port 587: [Errno 111] Connection refused") carry no secrets.
    return _clean(f"{type(exc).__name__}: {exc.message}")


def timeout_text(exc: BaseException, stage: Stage, endpoint: str, seconds: float) -> str:
    """What a passed SMTP deadline means, naming the endpoint: no TCP connection, no greeting, no TLS
    handshake, or no answer to a command (``stage``) within ``seconds``."""
    message = exc.message if isinstance(exc, aiosmtplib.SMTPException) else ""
    where = f"no answer from {endpoint} within {seconds:g}s"
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError):
        if "ready message" in message:
            return f"{where}: connected, no SMTP greeting"
        return f"{where}: no TCP connection"
    if "upgrading transport" in message:
        return f"{where}: connected, no TLS handshake"
    return f"{where} (at {stage})"


def classify_exception(exc: BaseException, stage: Stage) -> Verdict:
    """Classify what went wrong at ``stage`` when no (or no usable) reply came back.

    Do not pass ``asyncio.CancelledError``: cancellation is not an outcome; re-raise it.
    """
    if isinstance(exc, TokenError):
        code_text = f" AADSTS{exc.aadsts}" if exc.aadsts is not None else ""
        first = (exc.description or "").splitlines()[0] if exc.description else ""
        reply = _clean(
            f"token request failed: {exc.error}{code_text}" + (f": {first[:200]}" if first else "")
        )
        if exc.transient:
            return Verdict(A.RETRY, "token_unavailable", reply, S.APP)
        return Verdict(
            A.HOLD, "token_config", reply, S.APP, hint=hint_for_aadsts(exc.aadsts, exc.description)
        )

    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        verdicts = list(classify_recipients(exc).values())
        if not verdicts:
            return Verdict(A.RETRY, "transient", "SMTPRecipientsRefused: no recipients", S.MESSAGE)
        return max(verdicts, key=lambda v: _SEVERITY[v.action])

    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
            stage = St.RCPT
        elif isinstance(exc, aiosmtplib.SMTPSenderRefused):
            stage = St.MAIL
        elif isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            stage = St.AUTH
        if 200 <= exc.code <= 599:
            return classify_reply(exc.code, exc.message, stage)
        return Verdict(A.RETRY, "transient", _smtp_text(exc), S.MESSAGE, code=None)

    chain = exception_chain(exc)
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            detail = (
                getattr(e, "verify_message", None)
                or getattr(e, "reason", None)
                or "certificate verify failed"
            )
            return Verdict(
                A.HOLD,
                "tls",
                _clean(f"TLS certificate verification failed: {detail}"),
                S.APP,
                hint=TLS_VERIFY_HINT,
            )
    for e in chain:
        if isinstance(e, ssl.SSLError):
            return Verdict(
                A.RETRY,
                "transient",
                _clean(f"TLS error: {getattr(e, 'reason', None) or type(e).__name__}"),
                S.MESSAGE,
            )

    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        if "smtputf8" in exc.message.lower():
            return Verdict(A.FAILED, "not_supported", _smtp_text(exc), S.MESSAGE)
        return Verdict(A.HOLD, "not_supported", _smtp_text(exc), S.APP, hint=NOT_SUPPORTED_HINT)
    # Before MAIL the session belongs to no message: a host that is silent, refuses or cannot be
    # resolved fails every message of the app the same way (the host is the app's smtp_host), so the
    # app is paused (docs/exchange.md, "Reply codes": pause) instead of each message waiting out its timeout.
    host_down = stage in _PRE_MAIL
    where, hint = (S.APP, UNREACHABLE_HINT) if host_down else (S.MESSAGE, "")
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError, SMTPTimeoutError, SMTPConnectTimeoutError
        text = _smtp_text(exc) if isinstance(exc, aiosmtplib.SMTPException) else "timeout"
        return Verdict(A.RETRY, "timeout", text, where, hint=hint)
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        return Verdict(A.RETRY, "connection", _smtp_text(exc), where, hint=hint)
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return Verdict(A.RETRY, "connection", _smtp_text(exc), S.MESSAGE)
    if isinstance(exc, aiosmtplib.SMTPException):
        return Verdict(A.RETRY, "transient", _smtp_text(exc), S.MESSAGE)
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return Verdict(A.RETRY, "connection", _oserror_text(exc), S.MESSAGE)
    if isinstance(exc, OSError):  # refused, unreachable, socket.gaierror, ...
        return Verdict(A.RETRY, "connection", _oserror_text(exc), where, hint=hint)
    return Verdict(A.RETRY, "internal_error", _clean(f"unexpected {type(exc).__name__}"), S.MESSAGE)


# -- Microsoft Graph -------------------------------------------------------------------------------

#: seconds to wait after a 429 that names no Retry-After
RETRY_THROTTLED = 60.0
_GRAPH_MAX_TEXT = 400


@dataclass(frozen=True)
class GraphReply:
    """What Graph answered: HTTP status, the ``error.code``/``error.message`` of its JSON body."""

    status: int
    code: str = ""
    message: str = ""
    retry_after: float | None = None
    request_id: str = ""

    def text(self) -> str:
        parts = [f"HTTP {self.status}"]
        if self.code:
            parts.append(self.code)
        text = " ".join(parts)
        if self.message:
            text += f": {one_line(self.message, _GRAPH_MAX_TEXT)}"
        return text


@dataclass(frozen=True)
class GraphRule:
    """One row of the Graph table: every given criterion must match; alternatives inside one match any.

    ``codes`` are lower-case ``error.code`` values, matched exactly, or as a prefix when they end in
    ``*``; ``tokens`` are lower-case substrings of ``error.message``. A permanent refusal names the
    SMTP reply it stands for (``smtp``: code, enhanced code, what happened), as Exchange would have.
    """

    action: Action
    reason: str
    scope: Scope
    statuses: frozenset[int] | range = frozenset()
    codes: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    token_has_role: bool | None = None  # None: either
    retry_after: float | None = None  # when Graph names no Retry-After (or the rule ignores it)
    honours_retry_after: bool = False
    evict_token: bool = False
    hint: str = ""
    smtp: tuple[int, str, str] | None = None

    def matches(self, reply: GraphReply, code: str, message: str, token_has_role: bool) -> bool:
        if self.statuses and reply.status not in self.statuses:
            return False
        if self.token_has_role is not None and token_has_role is not self.token_has_role:
            return False
        if self.codes and not any(code.startswith(c[:-1]) if c.endswith("*") else code == c for c in self.codes):
            return False
        return not self.tokens or any(t in message for t in self.tokens)


def _graph_failed(reason: str, smtp: tuple[int, str, str], **criteria: Any) -> GraphRule:
    return GraphRule(A.FAILED, reason, S.MESSAGE, smtp=smtp, **criteria)


_TOO_BIG = (552, "5.3.4", "Message too big for Microsoft Graph")

#: The Graph rows of the classifier table (docs/graph.md); the first rule that matches decides.
GRAPH_RULES: tuple[GraphRule, ...] = (
    GraphRule(A.DELIVERED, "delivered", S.MESSAGE, statuses=range(200, 300)),
    GraphRule(A.RETRY, "throttled", S.MAILBOX, statuses=frozenset({429}), retry_after=RETRY_THROTTLED,
              honours_retry_after=True),
    GraphRule(A.RETRY, "transient", S.MESSAGE, statuses=range(500, 1000), honours_retry_after=True),
    # -- too big, however Graph says it
    _graph_failed("too_big", _TOO_BIG, statuses=frozenset({413})),
    _graph_failed("too_big", _TOO_BIG,
                  codes=("errormessagesizeexceeded", "requestentitytoolarge", "errorrequestentitytoolarge")),
    _graph_failed("too_big", _TOO_BIG, tokens=("maximum request length",)),
    # -- the token, the permission, the mailbox: configuration, hold
    GraphRule(A.HOLD, "graph_token_rejected", S.APP, statuses=frozenset({401}), evict_token=True,
              hint=GRAPH_AUDIENCE_HINT),
    _graph_failed("sendas_denied", (550, "5.7.60", "Microsoft Graph: no SendAs right for the From address"),
                  statuses=frozenset({403}), codes=("errorsendasdenied",)),
    GraphRule(A.HOLD, "graph_permission", S.APP, statuses=frozenset({403}), token_has_role=False,
              evict_token=True, hint=GRAPH_PERMISSION_HINT),
    GraphRule(A.HOLD, "graph_access_denied", S.MAILBOX, statuses=frozenset({403}),
              hint=GRAPH_ACCESS_DENIED_HINT),
    GraphRule(A.HOLD, "graph_unknown_mailbox", S.MAILBOX, statuses=frozenset({404}), hint=GRAPH_USER_HINT),
    GraphRule(A.RETRY, "transient", S.MESSAGE, statuses=frozenset({408, 409, 423, 425}),
              honours_retry_after=True),
    # -- permanent for this message
    _graph_failed("bad_recipient", (550, "5.1.3", "Microsoft Graph refused the recipients"),
                  codes=("errorinvalidrecipients", "errorinvalidrecipientscount")),
    _graph_failed("rejected", (554, "5.6.0", "Microsoft Graph could not read the message"),
                  codes=("errormimecontent*",)),
    _graph_failed("rejected", (554, "5.0.0", "Microsoft Graph refused the message")),
)


def graph_failed(reason: str, code: int, enhanced: str, text: str) -> Verdict:
    """A permanent refusal of a message by (or for) Graph, worded as the SMTP reply it stands for."""
    return Verdict(A.FAILED, reason, one_line(f"{code} {enhanced} {text}", _GRAPH_MAX_TEXT), S.MESSAGE,
                   code=code, enhanced=enhanced)


def classify_graph(reply: GraphReply, *, token_has_role: bool = True) -> Verdict:
    """One Graph answer -> one Verdict, by :data:`GRAPH_RULES`.

    ``token_has_role``: whether the token used carried Mail.Send; decides whether a 403 is about the
    app (permission, consent: hold the app) or about this mailbox (access policy: hold the mailbox).
    """
    code, message = reply.code.lower(), reply.message.lower()
    for rule in GRAPH_RULES:
        if rule.matches(reply, code, message, token_has_role):
            return _graph_verdict(rule, reply)
    # Unreachable: the last rule matches everything.
    return graph_failed("rejected", 554, "5.0.0", f"Microsoft Graph refused the message ({reply.text()})")


def _graph_verdict(rule: GraphRule, reply: GraphReply) -> Verdict:
    if rule.action is A.DELIVERED:
        return Verdict(A.DELIVERED, rule.reason, f"250 2.0.0 Accepted by Microsoft Graph ({reply.status})",
                       rule.scope, code=250, enhanced="2.0.0")
    if rule.smtp is not None:
        code, enhanced, what = rule.smtp
        return graph_failed(rule.reason, code, enhanced, f"{what} ({reply.text()})")
    retry_after = rule.retry_after
    if rule.honours_retry_after and reply.retry_after is not None:
        retry_after = reply.retry_after
    return Verdict(rule.action, rule.reason, f"Microsoft Graph: {reply.text()}", rule.scope,
                   retry_after=retry_after, evict_token=rule.evict_token, hint=rule.hint)
