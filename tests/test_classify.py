"""The classifier, row by row of EXCHANGE.md's reply table, plus exceptions and hints."""

from __future__ import annotations

import errno
import socket
import ssl

import aiosmtplib
import pytest

from relay.classify import (
    RULES,
    Action,
    Scope,
    Stage,
    Verdict,
    classify_exception,
    classify_recipients,
    classify_reply,
    parse_enhanced,
)
from relay.errors import TokenError
from relay.hints import AADSTS_HINTS, STEPS, hint_for_aadsts, parse_aadsts

# The bracketed tail varies per server and per reply; every row is tested with two of them.
TAILS = (
    "[Hostname=AM0PR02MB5345.eurprd02.prod.outlook.com]",
    "[MW4PR03CA0072.namprd03.prod.outlook.com 2025-03-14T09:21:07.311Z 08DD61F2A7B3C4D5]",
)

D, R, H, F = Action.DELIVERED, Action.RETRY, Action.HOLD, Action.FAILED

# (id, code, text without tail, stage, action, reason, scope, retry_after, evict_token, hint must contain)
TABLE = [
    (
        "235 authenticated",
        235,
        "2.7.0 Authentication successful",
        Stage.AUTH,
        D,
        "accepted",
        Scope.MESSAGE,
        None,
        False,
        "",
    ),
    (
        "250 at DATA",
        250,
        "2.0.0 OK <BN8PR12MB3364@contoso.com> Queued mail for delivery",
        Stage.DATA,
        D,
        "delivered",
        Scope.MESSAGE,
        None,
        False,
        "",
    ),
    ("250 at RCPT", 250, "2.1.5 Recipient OK", Stage.RCPT, D, "accepted", Scope.RECIPIENT, None, False, ""),
    (
        "535 5.7.3",
        535,
        "5.7.3 Authentication unsuccessful",
        Stage.AUTH,
        H,
        "auth_failed",
        Scope.MAILBOX,
        None,
        False,
        "steps 2",
    ),
    (
        "535 5.7.139 tenant",
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for"
        " the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
        Stage.AUTH,
        H,
        "auth_disabled",
        Scope.MAILBOX,
        None,
        False,
        "Set-CASMailbox",
    ),
    (
        "535 5.7.139 mailbox",
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"
        " for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.",
        Stage.AUTH,
        H,
        "auth_disabled",
        Scope.MAILBOX,
        None,
        False,
        "Set-CASMailbox",
    ),
    (
        "535 5.7.139 security defaults",
        535,
        "5.7.139 Authentication unsuccessful, user is locked by your"
        " organization's security defaults policy. Contact your administrator.",
        Stage.AUTH,
        H,
        "auth_disabled",
        Scope.MAILBOX,
        None,
        False,
        "security defaults",
    ),
    (
        "535 5.7.139 conditional access",
        535,
        "5.7.139 Authentication unsuccessful, the request did not meet the"
        " criteria to be authenticated successfully. Contact your administrator.",
        Stage.AUTH,
        H,
        "auth_disabled",
        Scope.MAILBOX,
        None,
        False,
        "Set-CASMailbox",
    ),
    (
        "550 5.7.30 basic auth",
        550,
        "5.7.30 Basic authentication is not supported for Client Submission.",
        Stage.AUTH,
        H,
        "basic_auth_rejected",
        Scope.APP,
        None,
        False,
        "XOAUTH2",
    ),
    (
        "530 5.7.57 not authenticated",
        530,
        "5.7.57 Client not authenticated to send mail.",
        Stage.MAIL,
        H,
        "not_authenticated",
        Scope.APP,
        None,
        False,
        "XOAUTH2",
    ),
    (
        "530 5.7.57 caused by 5.7.139",
        530,
        "5.7.57 Client not authenticated to send mail. Error: 535 5.7.139"
        " Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
        Stage.MAIL,
        H,
        "auth_disabled",
        Scope.MAILBOX,
        None,
        False,
        "Set-CASMailbox",
    ),
    (
        "432 4.3.2 thread limit",
        432,
        "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
        Stage.DATA,
        R,
        "throttled_connections",
        Scope.MAILBOX,
        60.0,
        False,
        "connections",
    ),
    (
        "432 4.3.2 concurrent",
        432,
        "4.3.2 Concurrent connections limit exceeded. Visit"
        " https://aka.ms/concurrent_sending for more information.",
        Stage.EHLO,
        R,
        "throttled_connections",
        Scope.MAILBOX,
        60.0,
        False,
        "connections",
    ),
    (
        "421 4.4.2 rate",
        421,
        "4.4.2 Message submission rate for this client has exceeded the configured limit",
        Stage.MAIL,
        R,
        "rate_limited",
        Scope.MAILBOX,
        60.0,
        False,
        "",
    ),
    (
        "421 4.4.2 dropped",
        421,
        "4.4.2 Connection dropped due to TimedOut",
        Stage.DATA,
        R,
        "transient",
        Scope.MESSAGE,
        None,
        False,
        "",
    ),
    (
        "421 4.3.2",
        421,
        "4.3.2 Service not available, closing transmission channel",
        Stage.MAIL,
        R,
        "transient",
        Scope.MESSAGE,
        None,
        False,
        "",
    ),
    (
        "451 4.7.0",
        451,
        "4.7.0 Temporary server error. Please try again later. PRX4",
        Stage.DATA,
        R,
        "transient",
        Scope.MESSAGE,
        None,
        False,
        "",
    ),
    (
        "450 other 4xx",
        450,
        "4.7.26 Temporary failure, try later",
        Stage.MAIL,
        R,
        "transient",
        Scope.MESSAGE,
        None,
        False,
        "",
    ),
    (
        "454 4xx at AUTH",
        454,
        "4.7.0 Temporary authentication failure",
        Stage.AUTH,
        R,
        "transient",
        Scope.MESSAGE,
        None,
        False,
        "",
    ),
    (
        "501 5.5.127",
        501,
        "5.5.127 Token will expire soon.",
        Stage.MAIL,
        R,
        "token_expiring",
        Scope.MESSAGE,
        0.0,
        True,
        "",
    ),
    (
        "554 5.2.0 SubmissionQuotaExceeded",
        554,
        "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException;"
        " Failed to process message due to a permanent exception with message"
        " [BeginDiagnosticData]Message submission quota exceeded.[EndDiagnosticData]",
        Stage.DATA,
        R,
        "quota_exceeded",
        Scope.MAILBOX,
        3600.0,
        False,
        "10,000",
    ),
    (
        "550 5.7.60 MAIL",
        550,
        "5.7.60 SMTP; Client does not have permissions to send as this sender",
        Stage.MAIL,
        F,
        "sendas_denied",
        Scope.MESSAGE,
        None,
        False,
        "Add-RecipientPermission",
    ),
    (
        "554 5.2.252 SendAsDenied",
        554,
        "5.2.252 SendAsDenied; noreply@contoso.com not allowed to send as"
        " erp@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied;"
        " Failed to process message due to a permanent exception with message"
        " [BeginDiagnosticData]Cannot submit message.[EndDiagnosticData]",
        Stage.DATA,
        F,
        "sendas_denied",
        Scope.MESSAGE,
        None,
        False,
        "Add-RecipientPermission",
    ),
    (
        "554 5.2.2 mailbox full",
        554,
        "5.2.2 mailbox full; STOREDRV.Submission.Exception:"
        "QuotaExceededException.MapiExceptionQuotaExceeded; Failed to process message due to a permanent"
        " exception with message [BeginDiagnosticData]Cannot save changes made to an item to store."
        "[EndDiagnosticData]",
        Stage.DATA,
        F,
        "mailbox_full",
        Scope.MESSAGE,
        None,
        False,
        "Sent Items",
    ),
    (
        "554 5.2.0 MessageSubmissionExceeded",
        554,
        "5.2.0 STOREDRV.Submission.Exception:"
        "MessageSubmissionExceededException; Failed to process message due to a permanent exception with"
        " message [BeginDiagnosticData]Message size exceeds the maximum allowed.[EndDiagnosticData]",
        Stage.DATA,
        F,
        "too_big",
        Scope.MESSAGE,
        None,
        False,
        "MaxSendSize",
    ),
    (
        "552 5.3.4 at MAIL SIZE",
        552,
        "5.3.4 Message size exceeds fixed maximum message size",
        Stage.MAIL,
        F,
        "too_big",
        Scope.MESSAGE,
        None,
        False,
        "MaxSendSize",
    ),
    (
        "552 5.3.4 at DATA",
        552,
        "5.3.4 Message size exceeds fixed maximum message size",
        Stage.DATA,
        F,
        "too_big",
        Scope.MESSAGE,
        None,
        False,
        "MaxSendSize",
    ),
    (
        "550 5.2.251",
        550,
        "5.2.251 Sender throttled due to continuous send as denied errors.",
        Stage.MAIL,
        R,
        "sender_throttled",
        Scope.MAILBOX,
        3600.0,
        False,
        "throttles",
    ),
    (
        "550 5.2.252 throttled",
        550,
        "5.2.252 Sender throttled due to continuous mailbox full errors.",
        Stage.MAIL,
        R,
        "sender_throttled",
        Scope.MAILBOX,
        3600.0,
        False,
        "throttles",
    ),
    (
        "550 5.2.253",
        550,
        "5.2.253 Sender throttled due to continuous invalid recipients errors.",
        Stage.RCPT,
        R,
        "sender_throttled",
        Scope.MAILBOX,
        3600.0,
        False,
        "throttles",
    ),
    (
        "550 5.2.254",
        550,
        "5.2.254 Sender throttled due to continuous message too big errors.",
        Stage.DATA,
        R,
        "sender_throttled",
        Scope.MAILBOX,
        3600.0,
        False,
        "throttles",
    ),
    (
        "550 5.2.255",
        550,
        "5.2.255 Sender throttled due to continuous submission errors.",
        Stage.MAIL,
        R,
        "sender_throttled",
        Scope.MAILBOX,
        3600.0,
        False,
        "throttles",
    ),
    (
        "550 5.1.10 RCPT",
        550,
        "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient nobody@contoso.com not found by"
        " SMTP address lookup",
        Stage.RCPT,
        F,
        "bad_recipient",
        Scope.RECIPIENT,
        None,
        False,
        "",
    ),
    (
        "550 5.1.1 RCPT",
        550,
        "5.1.1 RESOLVER.ADR.ExRecipNotFound; not found",
        Stage.RCPT,
        F,
        "bad_recipient",
        Scope.RECIPIENT,
        None,
        False,
        "",
    ),
    (
        "501 5.1.3 RCPT",
        501,
        "5.1.3 Invalid address",
        Stage.RCPT,
        F,
        "bad_recipient",
        Scope.RECIPIENT,
        None,
        False,
        "",
    ),
    (
        "550 5.4.1 RCPT other 5xx",
        550,
        "5.4.1 Recipient address rejected: Access denied.",
        Stage.RCPT,
        F,
        "recipient_refused",
        Scope.RECIPIENT,
        None,
        False,
        "",
    ),
    (
        "452 4.5.3 RCPT 4xx",
        452,
        "4.5.3 Too many recipients",
        Stage.RCPT,
        R,
        "transient",
        Scope.RECIPIENT,
        None,
        False,
        "",
    ),
    (
        "535 5.7.8 unknown at AUTH",
        535,
        "5.7.8 Error: authentication failed",
        Stage.AUTH,
        H,
        "auth_rejected",
        Scope.MAILBOX,
        None,
        False,
        "",
    ),
    (
        "554 at greeting",
        554,
        "5.7.1 Service unavailable; Client host blocked",
        Stage.CONNECT,
        H,
        "session_refused",
        Scope.APP,
        None,
        False,
        "",
    ),
    (
        "554 5.6.0 other 5xx",
        554,
        "5.6.0 Corrupt message content; STOREDRV.Submission.Exception:ConversionFailedException",
        Stage.DATA,
        F,
        "rejected",
        Scope.MESSAGE,
        None,
        False,
        "",
    ),
    (
        "550 5.7.708 other 5xx at MAIL",
        550,
        "5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
        Stage.MAIL,
        F,
        "rejected",
        Scope.MESSAGE,
        None,
        False,
        "",
    ),
]


@pytest.mark.parametrize("tail", TAILS, ids=["hostname", "timestamp"])
@pytest.mark.parametrize(
    ("code", "text", "stage", "action", "reason", "scope", "retry_after", "evict", "hint"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_reply_table(
    code: int,
    text: str,
    stage: Stage,
    action: Action,
    reason: str,
    scope: Scope,
    retry_after: float | None,
    evict: bool,
    hint: str,
    tail: str,
) -> None:
    v = classify_reply(code, f"{text} {tail}", stage)
    assert (v.action, v.reason, v.scope) == (action, reason, scope)
    assert v.retry_after == retry_after
    assert v.evict_token is evict
    assert v.code == code
    assert v.enhanced == text.split()[0]
    assert v.reply == f"{code} {text} {tail}"
    if hint:
        assert hint in v.hint
    if action is Action.DELIVERED:
        assert v.hint == ""
    if action is Action.HOLD:
        assert v.hint, "a hold must tell the admin what to do"


def test_5_7_3_is_not_5_7_30() -> None:
    assert classify_reply(535, "5.7.3 Authentication unsuccessful", Stage.AUTH).reason == "auth_failed"
    assert classify_reply(550, "5.7.30 Basic authentication is not supported", Stage.AUTH).reason == (
        "basic_auth_rejected"
    )
    assert parse_enhanced("5.7.30 x") == "5.7.30" and parse_enhanced("5.7.3 x") == "5.7.3"
    assert (
        parse_enhanced("5.7.3") == "5.7.3" and parse_enhanced("no code") == "" and parse_enhanced("5.7") == ""
    )


def test_5_7_3_hint_names_the_four_causes_and_steps() -> None:
    h = classify_reply(535, "5.7.3 Authentication unsuccessful [x]", Stage.AUTH).hint
    for needle in (
        "not registered",
        "Object ID",
        "FullAccess",
        "SMTP.SendAsApp",
        "2 (",
        "3 (",
        "5 (",
        "New-ServicePrincipal",
        "Add-MailboxPermission",
    ):
        assert needle in h


def test_multiline_and_code_prefixed_text() -> None:
    v = classify_reply(554, "554 5.2.2 mailbox full;\nQuotaExceededException", Stage.DATA)
    assert v.reason == "mailbox_full" and v.reply == "554 5.2.2 mailbox full; QuotaExceededException"
    assert "\n" not in v.reply
    v = classify_reply(451, "", Stage.DATA)
    assert v.action is Action.RETRY and v.reply == "451"


def test_reply_is_bounded() -> None:
    v = classify_reply(550, "5.7.1 " + "x" * 5000, Stage.DATA)
    assert len(v.reply) <= 1000


def test_unexpected_codes_retry() -> None:
    assert classify_reply(354, "Start mail input", Stage.DATA).reason == "unexpected_reply"
    assert classify_reply(-1, "Malformed response", Stage.DATA).action is Action.RETRY
    assert classify_reply(600, "?", Stage.DATA).action is Action.RETRY


def test_rules_are_data() -> None:
    assert isinstance(RULES, tuple) and len(RULES) > 20
    assert {r.action for r in RULES} == set(Action)


# --------------------------------------------------------------------------- exceptions

T = " [Hostname=AM0PR02MB5345.eurprd02.prod.outlook.com]"


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


def _cert_error() -> ssl.SSLCertVerificationError:
    e = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    e.verify_message = "Hostname mismatch, certificate is not valid for 'smtp.office365.com'."
    return e


EXCEPTIONS = [
    (
        "auth error 5.7.3",
        aiosmtplib.SMTPAuthenticationError(535, "5.7.3 Authentication unsuccessful" + T),
        Stage.MAIL,
        H,
        "auth_failed",
        Scope.MAILBOX,
    ),
    (
        "sender refused 5.7.60",
        aiosmtplib.SMTPSenderRefused(
            550, "5.7.60 SMTP; Client does not have permissions to send as this sender" + T, "erp@contoso.com"
        ),
        Stage.DATA,
        F,
        "sendas_denied",
        Scope.MESSAGE,
    ),
    (
        "recipient refused 5.1.10",
        aiosmtplib.SMTPRecipientRefused(
            550,
            "5.1.10 RESOLVER.ADR.RecipientNotFound;"
            " Recipient x@contoso.com not found by SMTP address lookup" + T,
            "x@contoso.com",
        ),
        Stage.DATA,
        F,
        "bad_recipient",
        Scope.RECIPIENT,
    ),
    (
        "data error SendAsDenied",
        aiosmtplib.SMTPDataError(
            554,
            "5.2.252 SendAsDenied; STOREDRV.Submission."
            "Exception:SendAsDeniedException.MapiExceptionSendAsDenied" + T,
        ),
        Stage.DATA,
        F,
        "sendas_denied",
        Scope.MESSAGE,
    ),
    (
        "response 432",
        aiosmtplib.SMTPResponseException(432, "4.3.2 Concurrent connections limit exceeded" + T),
        Stage.EHLO,
        R,
        "throttled_connections",
        Scope.MAILBOX,
    ),
    (
        "helo error 421",
        aiosmtplib.SMTPHeloError(421, "4.3.2 Service not available" + T),
        Stage.EHLO,
        R,
        "transient",
        Scope.MESSAGE,
    ),
    (
        "connect response 554",
        aiosmtplib.SMTPConnectResponseError(554, "5.7.1 Service unavailable" + T),
        Stage.CONNECT,
        H,
        "session_refused",
        Scope.APP,
    ),
    (
        "response code -1",
        aiosmtplib.SMTPResponseException(-1, "Malformed SMTP response line"),
        Stage.DATA,
        R,
        "transient",
        Scope.MESSAGE,
    ),
    (
        "disconnected",
        aiosmtplib.SMTPServerDisconnected("Connection lost"),
        Stage.DATA,
        R,
        "connection",
        Scope.MESSAGE,
    ),
    (
        "connect error",
        aiosmtplib.SMTPConnectError(
            "Error connecting to smtp.office365.com on port 587: [Errno 111] Connection refused"
        ),
        Stage.CONNECT,
        R,
        "connection",
        Scope.MESSAGE,
    ),
    (
        "connect timeout",
        aiosmtplib.SMTPConnectTimeoutError("Timed out connecting to smtp.office365.com on port 587"),
        Stage.CONNECT,
        R,
        "timeout",
        Scope.MESSAGE,
    ),
    (
        "read timeout",
        aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"),
        Stage.DATA,
        R,
        "timeout",
        Scope.MESSAGE,
    ),
    (
        "smtp timeout",
        aiosmtplib.SMTPTimeoutError("Timed out while upgrading transport"),
        Stage.STARTTLS,
        R,
        "timeout",
        Scope.MESSAGE,
    ),
    ("asyncio timeout", TimeoutError(), Stage.DATA, R, "timeout", Scope.MESSAGE),
    (
        "connection reset",
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        Stage.DATA,
        R,
        "connection",
        Scope.MESSAGE,
    ),
    (
        "dns failure",
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        Stage.CONNECT,
        R,
        "connection",
        Scope.MESSAGE,
    ),
    (
        "plain OSError",
        OSError(errno.ENETUNREACH, "Network is unreachable"),
        Stage.CONNECT,
        R,
        "connection",
        Scope.MESSAGE,
    ),
    (
        "tls handshake",
        ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
        Stage.STARTTLS,
        R,
        "transient",
        Scope.MESSAGE,
    ),
    (
        "tls eof",
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
        Stage.STARTTLS,
        R,
        "transient",
        Scope.MESSAGE,
    ),
    ("cert verify", _cert_error(), Stage.STARTTLS, H, "tls", Scope.APP),
    (
        "cert verify wrapped",
        _caused(aiosmtplib.SMTPConnectError("Error connecting"), _cert_error()),
        Stage.CONNECT,
        H,
        "tls",
        Scope.APP,
    ),
    (
        "no AUTH offered",
        aiosmtplib.SMTPNotSupported("SMTP AUTH extension not supported by server."),
        Stage.AUTH,
        H,
        "not_supported",
        Scope.APP,
    ),
    (
        "no STARTTLS",
        aiosmtplib.SMTPNotSupported("SMTP STARTTLS extension not supported by server."),
        Stage.STARTTLS,
        H,
        "not_supported",
        Scope.APP,
    ),
    (
        "no SMTPUTF8",
        aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server"),
        Stage.MAIL,
        F,
        "not_supported",
        Scope.MESSAGE,
    ),
    (
        "other smtp exception",
        aiosmtplib.SMTPException("SMTP instance is already connected"),
        Stage.CONNECT,
        R,
        "transient",
        Scope.MESSAGE,
    ),
    (
        "token transient",
        TokenError(
            "contoso", "temporarily_unavailable", "HTTP 503 from login.microsoftonline.com", transient=True
        ),
        Stage.TOKEN,
        R,
        "token_unavailable",
        Scope.APP,
    ),
    (
        "token config",
        TokenError(
            "contoso",
            "invalid_client",
            "AADSTS7000215: Invalid client secret provided."
            " Ensure the secret being sent in the request is the client secret value,"
            " not the client secret ID.\r\n"
            "Trace ID: 0a1b2c3d Correlation ID: 4e5f Timestamp: 2025-03-14 09:21:07Z",
            aadsts=7000215,
        ),
        Stage.TOKEN,
        H,
        "token_config",
        Scope.APP,
    ),
    ("unexpected bug", KeyError("x"), Stage.DATA, R, "internal_error", Scope.MESSAGE),
]


@pytest.mark.parametrize(
    ("exc", "stage", "action", "reason", "scope"), [e[1:] for e in EXCEPTIONS], ids=[e[0] for e in EXCEPTIONS]
)
def test_exceptions(exc: BaseException, stage: Stage, action: Action, reason: str, scope: Scope) -> None:
    v = classify_exception(exc, stage)
    assert isinstance(v, Verdict)
    assert (v.action, v.reason, v.scope) == (action, reason, scope)
    assert v.reply and "\n" not in v.reply and "\r" not in v.reply
    if action is Action.HOLD:
        assert v.hint


def test_response_exception_keeps_server_reply() -> None:
    v = classify_exception(
        aiosmtplib.SMTPAuthenticationError(535, "5.7.3 Authentication unsuccessful" + T), Stage.AUTH
    )
    assert v.reply == "535 5.7.3 Authentication unsuccessful" + T and v.code == 535 and v.enhanced == "5.7.3"


def test_token_config_hint_and_safe_reply() -> None:
    exc = TokenError(
        "contoso",
        "invalid_client",
        "AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 1",
        aadsts=7000215,
    )
    v = classify_exception(exc, Stage.TOKEN)
    assert "Secret ID" in v.hint and "step 4" in v.hint
    assert (
        v.reply == "token request failed: invalid_client AADSTS7000215:"
        " AADSTS7000215: Invalid client secret provided."
    )
    assert "Trace ID" not in v.reply


def test_no_secret_from_exception_arguments() -> None:
    secret = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.SECRET"
    for exc in (
        ValueError(f"Bearer {secret}"),
        RuntimeError("password", secret),
        KeyError(secret),
        OSError(errno.EIO, "I/O error", f"/run/secrets/{secret}"),
    ):
        v = classify_exception(exc, Stage.AUTH)
        assert secret not in v.reply and secret not in v.hint and "SECRET" not in repr(v)


def test_recipients_refused_per_recipient_and_combined() -> None:
    exc = aiosmtplib.SMTPRecipientsRefused(
        [
            aiosmtplib.SMTPRecipientRefused(
                550, "5.1.10 RESOLVER.ADR.RecipientNotFound" + T, "a@contoso.com"
            ),
            aiosmtplib.SMTPRecipientRefused(452, "4.5.3 Too many recipients" + T, "b@contoso.com"),
        ]
    )
    per = classify_recipients(exc)
    assert per["a@contoso.com"].action is Action.FAILED and per["a@contoso.com"].scope is Scope.RECIPIENT
    assert per["b@contoso.com"].action is Action.RETRY
    assert classify_exception(exc, Stage.RCPT).action is Action.RETRY  # something may still go through later
    only_bad = aiosmtplib.SMTPRecipientsRefused(
        [
            aiosmtplib.SMTPRecipientRefused(550, "5.1.1 not found" + T, "a@contoso.com"),
        ]
    )
    v = classify_exception(only_bad, Stage.DATA)
    assert (v.action, v.reason, v.scope) == (Action.FAILED, "bad_recipient", Scope.RECIPIENT)
    assert classify_exception(aiosmtplib.SMTPRecipientsRefused([]), Stage.RCPT).action is Action.RETRY


# --------------------------------------------------------------------------- hints


@pytest.mark.parametrize("code", sorted(AADSTS_HINTS))
def test_aadsts_hints(code: int) -> None:
    h = hint_for_aadsts(code, "")
    known = AADSTS_HINTS[code]
    assert h.startswith(f"AADSTS{code} {known.meaning}")
    if known.step is not None:
        assert f"step {known.step}" in h
    assert hint_for_aadsts(None, f"AADSTS{code}: something happened") == h


def test_aadsts_unknown_and_missing() -> None:
    assert "AADSTS50034" in hint_for_aadsts(50034, "")
    assert "step 1" in hint_for_aadsts(None, "no code here") or "steps 1" in hint_for_aadsts(None, "")
    assert parse_aadsts("Error: AADSTS700016: Application with identifier 'x' was not found") == 700016
    assert parse_aadsts("") is None
    assert "Secret ID" in hint_for_aadsts(7000215, "")


def test_steps_and_render() -> None:
    assert sorted(STEPS) == [1, 2, 3, 4, 5, 6]
    assert "New-ServicePrincipal" in STEPS[5].fix and "Add-RecipientPermission" in STEPS[5].fix
    assert "Set-CASMailbox" in STEPS[6].fix
    assert "SMTP.SendAsApp" in STEPS[2].fix and "adminconsent" in STEPS[3].fix
    text = STEPS[6].render(mailbox="noreply@contoso.com")
    assert "Set-CASMailbox noreply@contoso.com -SmtpClientAuthenticationDisabled $false" in text
    assert "<CLIENT_ID>" in STEPS[3].render(tenant_id="t")
    us = STEPS[3].render(tenant_id="t", authority_host="https://login.microsoftonline.us",
                         scope="https://outlook.office365.us/.default")
    assert "  https://login.microsoftonline.us/t/v2.0/adminconsent?client_id=<CLIENT_ID>" in us
    assert "&scope=https://outlook.office365.us/.default\n" in us


def test_hints_travel_with_the_rule_that_decides() -> None:
    assert "Set-CASMailbox" in classify_reply(535, "5.7.139 Authentication unsuccessful", Stage.AUTH).hint
    assert "Add-RecipientPermission" in classify_reply(554, "5.2.252 SendAsDenied", Stage.DATA).hint
    assert "Add-RecipientPermission" in classify_reply(550, "5.7.60 Client does not have permissions", Stage.MAIL).hint
    assert classify_reply(451, "4.7.0 Temporary server error", Stage.DATA).hint == ""
    disabled = "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"
    assert classify_reply(535, f"{disabled}; security defaults", Stage.AUTH).hint.endswith(
        "The tenant's security defaults block SMTP AUTH: turn them off or use a policy exception.")
    assert classify_reply(535, f"{disabled}; conditional access policy", Stage.AUTH).hint.endswith(
        "A conditional access policy blocks SMTP AUTH for this sign-in.")
    assert classify_reply(535, disabled, Stage.AUTH).hint.endswith("-SmtpClientAuthenticationDisabled $false.")


def test_every_rule_that_holds_carries_a_hint() -> None:
    from relay.classify import RULES

    assert [r.reason for r in RULES if r.action is Action.HOLD and r.hint is None] == []
    assert [r.reason for r in RULES if r.action is Action.DELIVERED and r.hint is not None] == []
