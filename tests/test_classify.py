"""The classifier, row by row of the reply table in docs/exchange.md, plus exceptions and hints."""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass

import aiosmtplib
import pytest

from relay.delivery.classify import (
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
from relay.delivery.hints import AADSTS_HINTS, STEPS, hint_for_aadsts, parse_aadsts
from relay.errors import TokenError

# The bracketed tail varies per server and per reply; every row is tested with two of them.
TAILS = (
    "[Hostname=AM0PR02MB5345.eurprd02.prod.outlook.com]",
    "[MW4PR03CA0072.namprd03.prod.outlook.com 2025-03-14T09:21:07.311Z 08DD61F2A7B3C4D5]",
)

D, R, H, F = Action.DELIVERED, Action.RETRY, Action.HOLD, Action.FAILED


@dataclass(frozen=True)
class Row:
    """One reply of the table: what Exchange says at a stage, and the verdict the relay must reach."""

    id: str
    code: int
    text: str  # without the bracketed tail
    stage: Stage
    action: Action
    reason: str
    scope: Scope
    retry_after: float | None = None
    evict_token: bool = False
    hint: str = ""  # the hint must contain this


TABLE: list[Row] = [
    Row(
        "235 authenticated", code=235, text="2.7.0 Authentication successful", stage=Stage.AUTH, action=D,
        reason="accepted", scope=Scope.MESSAGE,
    ),
    Row(
        "250 at DATA", code=250, text="2.0.0 OK <BN8PR12MB3364@contoso.com> Queued mail for delivery", stage=Stage.DATA,
        action=D, reason="delivered", scope=Scope.MESSAGE,
    ),
    Row(
        "250 at RCPT", code=250, text="2.1.5 Recipient OK", stage=Stage.RCPT, action=D, reason="accepted",
        scope=Scope.RECIPIENT,
    ),
    Row(
        "535 5.7.3", code=535, text="5.7.3 Authentication unsuccessful", stage=Stage.AUTH, action=H,
        reason="auth_failed", scope=Scope.MAILBOX, hint="steps 2",
    ),
    Row(
        "535 5.7.139 tenant", code=535,
        text="5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for"
             " the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
        stage=Stage.AUTH, action=H, reason="auth_disabled", scope=Scope.MAILBOX, hint="Set-CASMailbox",
    ),
    Row(
        "535 5.7.139 mailbox", code=535,
        text="5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"
             " for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.",
        stage=Stage.AUTH, action=H, reason="auth_disabled", scope=Scope.MAILBOX, hint="Set-CASMailbox",
    ),
    Row(
        "535 5.7.139 security defaults", code=535,
        text="5.7.139 Authentication unsuccessful, user is locked by your"
             " organization's security defaults policy. Contact your administrator.",
        stage=Stage.AUTH, action=H, reason="auth_disabled", scope=Scope.MAILBOX, hint="security defaults",
    ),
    Row(
        "535 5.7.139 conditional access", code=535,
        text="5.7.139 Authentication unsuccessful, the request did not meet the"
             " criteria to be authenticated successfully. Contact your administrator.",
        stage=Stage.AUTH, action=H, reason="auth_disabled", scope=Scope.MAILBOX, hint="Set-CASMailbox",
    ),
    Row(
        "550 5.7.30 basic auth", code=550, text="5.7.30 Basic authentication is not supported for Client Submission.",
        stage=Stage.AUTH, action=H, reason="basic_auth_rejected", scope=Scope.APP, hint="XOAUTH2",
    ),
    Row(
        "530 5.7.57 not authenticated", code=530, text="5.7.57 Client not authenticated to send mail.",
        stage=Stage.MAIL, action=H, reason="not_authenticated", scope=Scope.APP, hint="XOAUTH2",
    ),
    Row(
        "530 5.7.57 caused by 5.7.139", code=530,
        text="5.7.57 Client not authenticated to send mail. Error: 535 5.7.139"
             " Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
        stage=Stage.MAIL, action=H, reason="auth_disabled", scope=Scope.MAILBOX, hint="Set-CASMailbox",
    ),
    Row(
        "432 4.3.2 thread limit", code=432, text="4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
        stage=Stage.DATA, action=R, reason="throttled_connections", scope=Scope.MAILBOX, retry_after=60.0,
        hint="connections",
    ),
    Row(
        "432 4.3.2 concurrent", code=432,
        text="4.3.2 Concurrent connections limit exceeded. Visit"
             " https://aka.ms/concurrent_sending for more information.",
        stage=Stage.EHLO, action=R, reason="throttled_connections", scope=Scope.MAILBOX, retry_after=60.0,
        hint="connections",
    ),
    Row(
        "421 4.4.2 rate", code=421,
        text="4.4.2 Message submission rate for this client has exceeded the configured limit", stage=Stage.MAIL,
        action=R, reason="rate_limited", scope=Scope.MAILBOX, retry_after=60.0,
    ),
    Row(
        "421 4.4.2 dropped", code=421, text="4.4.2 Connection dropped due to TimedOut", stage=Stage.DATA, action=R,
        reason="transient", scope=Scope.MESSAGE,
    ),
    Row(
        "421 4.3.2", code=421, text="4.3.2 Service not available, closing transmission channel", stage=Stage.MAIL,
        action=R, reason="transient", scope=Scope.MESSAGE,
    ),
    Row(
        "451 4.7.0", code=451, text="4.7.0 Temporary server error. Please try again later. PRX4", stage=Stage.DATA,
        action=R, reason="transient", scope=Scope.MESSAGE,
    ),
    Row(
        "450 other 4xx", code=450, text="4.7.26 Temporary failure, try later", stage=Stage.MAIL, action=R,
        reason="transient", scope=Scope.MESSAGE,
    ),
    Row(
        "454 4xx at AUTH", code=454, text="4.7.0 Temporary authentication failure", stage=Stage.AUTH, action=R,
        reason="transient", scope=Scope.MESSAGE,
    ),
    Row(
        "501 5.5.127", code=501, text="5.5.127 Token will expire soon.", stage=Stage.MAIL, action=R,
        reason="token_expiring", scope=Scope.MESSAGE, retry_after=0.0, evict_token=True,
    ),
    Row(
        "554 5.2.0 SubmissionQuotaExceeded", code=554,
        text="5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException;"
             " Failed to process message due to a permanent exception with message"
             " [BeginDiagnosticData]Message submission quota exceeded.[EndDiagnosticData]",
        stage=Stage.DATA, action=R, reason="quota_exceeded", scope=Scope.MAILBOX, retry_after=3600.0, hint="10,000",
    ),
    Row(
        "550 5.7.60 MAIL", code=550, text="5.7.60 SMTP; Client does not have permissions to send as this sender",
        stage=Stage.MAIL, action=F, reason="sendas_denied", scope=Scope.MESSAGE, hint="Add-RecipientPermission",
    ),
    Row(
        "554 5.2.252 SendAsDenied", code=554,
        text="5.2.252 SendAsDenied; noreply@contoso.com not allowed to send as"
             " erp@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied;"
             " Failed to process message due to a permanent exception with message"
             " [BeginDiagnosticData]Cannot submit message.[EndDiagnosticData]",
        stage=Stage.DATA, action=F, reason="sendas_denied", scope=Scope.MESSAGE, hint="Add-RecipientPermission",
    ),
    Row(
        "554 5.2.2 mailbox full", code=554,
        text="5.2.2 mailbox full; STOREDRV.Submission.Exception:"
             "QuotaExceededException.MapiExceptionQuotaExceeded; Failed to process message due to a permanent"
             " exception with message [BeginDiagnosticData]Cannot save changes made to an item to store."
             "[EndDiagnosticData]",
        stage=Stage.DATA, action=F, reason="mailbox_full", scope=Scope.MESSAGE, hint="Sent Items",
    ),
    Row(
        "554 5.2.0 MessageSubmissionExceeded", code=554,
        text="5.2.0 STOREDRV.Submission.Exception:"
             "MessageSubmissionExceededException; Failed to process message due to a permanent exception with"
             " message [BeginDiagnosticData]Message size exceeds the maximum allowed.[EndDiagnosticData]",
        stage=Stage.DATA, action=F, reason="too_big", scope=Scope.MESSAGE, hint="MaxSendSize",
    ),
    Row(
        "552 5.3.4 at MAIL SIZE", code=552, text="5.3.4 Message size exceeds fixed maximum message size",
        stage=Stage.MAIL, action=F, reason="too_big", scope=Scope.MESSAGE, hint="MaxSendSize",
    ),
    Row(
        "552 5.3.4 at DATA", code=552, text="5.3.4 Message size exceeds fixed maximum message size", stage=Stage.DATA,
        action=F, reason="too_big", scope=Scope.MESSAGE, hint="MaxSendSize",
    ),
    Row(
        "550 5.2.251", code=550, text="5.2.251 Sender throttled due to continuous send as denied errors.",
        stage=Stage.MAIL, action=R, reason="sender_throttled", scope=Scope.MAILBOX, retry_after=3600.0,
        hint="throttles",
    ),
    Row(
        "550 5.2.252 throttled", code=550, text="5.2.252 Sender throttled due to continuous mailbox full errors.",
        stage=Stage.MAIL, action=R, reason="sender_throttled", scope=Scope.MAILBOX, retry_after=3600.0,
        hint="throttles",
    ),
    Row(
        "550 5.2.253", code=550, text="5.2.253 Sender throttled due to continuous invalid recipients errors.",
        stage=Stage.RCPT, action=R, reason="sender_throttled", scope=Scope.MAILBOX, retry_after=3600.0,
        hint="throttles",
    ),
    Row(
        "550 5.2.254", code=550, text="5.2.254 Sender throttled due to continuous message too big errors.",
        stage=Stage.DATA, action=R, reason="sender_throttled", scope=Scope.MAILBOX, retry_after=3600.0,
        hint="throttles",
    ),
    Row(
        "550 5.2.255", code=550, text="5.2.255 Sender throttled due to continuous submission errors.", stage=Stage.MAIL,
        action=R, reason="sender_throttled", scope=Scope.MAILBOX, retry_after=3600.0, hint="throttles",
    ),
    Row(
        "550 5.1.10 RCPT", code=550,
        text="5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient nobody@contoso.com not found by"
             " SMTP address lookup",
        stage=Stage.RCPT, action=F, reason="bad_recipient", scope=Scope.RECIPIENT,
    ),
    Row(
        "550 5.1.1 RCPT", code=550, text="5.1.1 RESOLVER.ADR.ExRecipNotFound; not found", stage=Stage.RCPT, action=F,
        reason="bad_recipient", scope=Scope.RECIPIENT,
    ),
    Row(
        "501 5.1.3 RCPT", code=501, text="5.1.3 Invalid address", stage=Stage.RCPT, action=F, reason="bad_recipient",
        scope=Scope.RECIPIENT,
    ),
    Row(
        "550 5.4.1 RCPT other 5xx", code=550, text="5.4.1 Recipient address rejected: Access denied.", stage=Stage.RCPT,
        action=F, reason="recipient_refused", scope=Scope.RECIPIENT,
    ),
    Row(
        "452 4.5.3 RCPT 4xx", code=452, text="4.5.3 Too many recipients", stage=Stage.RCPT, action=R,
        reason="transient", scope=Scope.RECIPIENT,
    ),
    Row(
        "535 5.7.8 unknown at AUTH", code=535, text="5.7.8 Error: authentication failed", stage=Stage.AUTH, action=H,
        reason="auth_rejected", scope=Scope.MAILBOX,
    ),
    Row(
        "554 at greeting", code=554, text="5.7.1 Service unavailable; Client host blocked", stage=Stage.CONNECT,
        action=H, reason="session_refused", scope=Scope.APP,
    ),
    Row(
        "554 5.6.0 other 5xx", code=554,
        text="5.6.0 Corrupt message content; STOREDRV.Submission.Exception:ConversionFailedException", stage=Stage.DATA,
        action=F, reason="rejected", scope=Scope.MESSAGE,
    ),
    Row(
        "550 5.7.708 other 5xx at MAIL", code=550,
        text="5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.", stage=Stage.MAIL,
        action=F, reason="rejected", scope=Scope.MESSAGE,
    ),
]


@pytest.mark.parametrize("tail", TAILS, ids=["hostname", "timestamp"])
@pytest.mark.parametrize("row", [pytest.param(row, id=row.id) for row in TABLE])
def test_reply_table(row: Row, tail: str) -> None:
    v = classify_reply(row.code, f"{row.text} {tail}", row.stage)
    assert (v.action, v.reason, v.scope) == (row.action, row.reason, row.scope)
    assert v.retry_after == row.retry_after
    assert v.evict_token is row.evict_token
    assert v.code == row.code
    assert v.enhanced == row.text.split()[0]
    assert v.reply == f"{row.code} {row.text} {tail}"
    if row.hint:
        assert row.hint in v.hint
    if row.action is Action.DELIVERED:
        assert v.hint == ""
    if row.action is Action.HOLD:
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


@dataclass(frozen=True)
class ExceptionRow:
    """An exception raised at a stage, and the verdict the relay must reach."""

    id: str
    exc: BaseException
    stage: Stage
    action: Action
    reason: str
    scope: Scope


EXCEPTIONS: list[ExceptionRow] = [
    ExceptionRow(
        "auth error 5.7.3", exc=aiosmtplib.SMTPAuthenticationError(535, "5.7.3 Authentication unsuccessful" + T),
        stage=Stage.MAIL, action=H, reason="auth_failed", scope=Scope.MAILBOX,
    ),
    ExceptionRow(
        "sender refused 5.7.60",
        exc=aiosmtplib.SMTPSenderRefused(
            550, "5.7.60 SMTP; Client does not have permissions to send as this sender" + T, "erp@contoso.com"
            ),
        stage=Stage.DATA, action=F, reason="sendas_denied", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "recipient refused 5.1.10",
        exc=aiosmtplib.SMTPRecipientRefused(
            550,
            "5.1.10 RESOLVER.ADR.RecipientNotFound;"
            " Recipient x@contoso.com not found by SMTP address lookup" + T,
            "x@contoso.com",
            ),
        stage=Stage.DATA, action=F, reason="bad_recipient", scope=Scope.RECIPIENT,
    ),
    ExceptionRow(
        "data error SendAsDenied",
        exc=aiosmtplib.SMTPDataError(
            554,
            "5.2.252 SendAsDenied; STOREDRV.Submission."
            "Exception:SendAsDeniedException.MapiExceptionSendAsDenied" + T,
            ),
        stage=Stage.DATA, action=F, reason="sendas_denied", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "response 432", exc=aiosmtplib.SMTPResponseException(432, "4.3.2 Concurrent connections limit exceeded" + T),
        stage=Stage.EHLO, action=R, reason="throttled_connections", scope=Scope.MAILBOX,
    ),
    ExceptionRow(
        "helo error 421", exc=aiosmtplib.SMTPHeloError(421, "4.3.2 Service not available" + T), stage=Stage.EHLO,
        action=R, reason="transient", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "connect response 554", exc=aiosmtplib.SMTPConnectResponseError(554, "5.7.1 Service unavailable" + T),
        stage=Stage.CONNECT, action=H, reason="session_refused", scope=Scope.APP,
    ),
    ExceptionRow(
        "response code -1", exc=aiosmtplib.SMTPResponseException(-1, "Malformed SMTP response line"), stage=Stage.DATA,
        action=R, reason="transient", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "disconnected", exc=aiosmtplib.SMTPServerDisconnected("Connection lost"), stage=Stage.DATA, action=R,
        reason="connection", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "connect error",
        exc=aiosmtplib.SMTPConnectError(
            "Error connecting to smtp.office365.com on port 587: [Errno 111] Connection refused"
            ),
        stage=Stage.CONNECT, action=R, reason="connection", scope=Scope.APP,
    ),
    ExceptionRow(
        "connect timeout",
        exc=aiosmtplib.SMTPConnectTimeoutError("Timed out connecting to smtp.office365.com on port 587"),
        stage=Stage.CONNECT, action=R, reason="timeout", scope=Scope.APP,
    ),
    ExceptionRow(
        "read timeout", exc=aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"), stage=Stage.DATA,
        action=R, reason="timeout", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "smtp timeout", exc=aiosmtplib.SMTPTimeoutError("Timed out while upgrading transport"), stage=Stage.STARTTLS,
        action=R, reason="timeout", scope=Scope.APP,
    ),
    ExceptionRow(
        "asyncio timeout", exc=TimeoutError(), stage=Stage.DATA, action=R, reason="timeout", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "connection reset", exc=ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), stage=Stage.DATA,
        action=R, reason="connection", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "dns failure", exc=socket.gaierror(socket.EAI_NONAME, "Name or service not known"), stage=Stage.CONNECT,
        action=R, reason="connection", scope=Scope.APP,
    ),
    ExceptionRow(
        "plain OSError", exc=OSError(errno.ENETUNREACH, "Network is unreachable"), stage=Stage.CONNECT, action=R,
        reason="connection", scope=Scope.APP,
    ),
    # After the greeting a dropped or reset session is this attempt's trouble, not the host's.
    ExceptionRow(
        "reset at connect", exc=ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        stage=Stage.CONNECT, action=R, reason="connection", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "disconnected at connect", exc=aiosmtplib.SMTPServerDisconnected("Connection lost"), stage=Stage.CONNECT,
        action=R, reason="connection", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "refused at data", exc=ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), stage=Stage.DATA,
        action=R, reason="connection", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "tls handshake", exc=ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), stage=Stage.STARTTLS,
        action=R, reason="transient", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "tls eof", exc=ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), stage=Stage.STARTTLS, action=R,
        reason="transient", scope=Scope.MESSAGE,
    ),
    ExceptionRow("cert verify", exc=_cert_error(), stage=Stage.STARTTLS, action=H, reason="tls", scope=Scope.APP),
    ExceptionRow(
        "cert verify wrapped", exc=_caused(aiosmtplib.SMTPConnectError("Error connecting"), _cert_error()),
        stage=Stage.CONNECT, action=H, reason="tls", scope=Scope.APP,
    ),
    ExceptionRow(
        "no AUTH offered", exc=aiosmtplib.SMTPNotSupported("SMTP AUTH extension not supported by server."),
        stage=Stage.AUTH, action=H, reason="not_supported", scope=Scope.APP,
    ),
    ExceptionRow(
        "no STARTTLS", exc=aiosmtplib.SMTPNotSupported("SMTP STARTTLS extension not supported by server."),
        stage=Stage.STARTTLS, action=H, reason="not_supported", scope=Scope.APP,
    ),
    ExceptionRow(
        "no SMTPUTF8", exc=aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server"), stage=Stage.MAIL,
        action=F, reason="not_supported", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "other smtp exception", exc=aiosmtplib.SMTPException("SMTP instance is already connected"), stage=Stage.CONNECT,
        action=R, reason="transient", scope=Scope.MESSAGE,
    ),
    ExceptionRow(
        "token transient",
        exc=TokenError(
            "contoso", "temporarily_unavailable", "HTTP 503 from login.microsoftonline.com", transient=True
            ),
        stage=Stage.TOKEN, action=R, reason="token_unavailable", scope=Scope.APP,
    ),
    ExceptionRow(
        "token config",
        exc=TokenError(
            "contoso",
            "invalid_client",
            "AADSTS7000215: Invalid client secret provided."
            " Ensure the secret being sent in the request is the client secret value,"
            " not the client secret ID.\r\n"
            "Trace ID: 0a1b2c3d Correlation ID: 4e5f Timestamp: 2025-03-14 09:21:07Z",
            aadsts=7000215,
            ),
        stage=Stage.TOKEN, action=H, reason="token_config", scope=Scope.APP,
    ),
    ExceptionRow(
        "unexpected bug", exc=KeyError("x"), stage=Stage.DATA, action=R, reason="internal_error", scope=Scope.MESSAGE,
    ),
]


@pytest.mark.parametrize("row", [pytest.param(row, id=row.id) for row in EXCEPTIONS])
def test_exceptions(row: ExceptionRow) -> None:
    v = classify_exception(row.exc, row.stage)
    assert isinstance(v, Verdict)
    assert (v.action, v.reason, v.scope) == (row.action, row.reason, row.scope)
    assert v.reply and "\n" not in v.reply and "\r" not in v.reply
    if row.action is Action.HOLD:
        assert v.hint
    if row.action is Action.RETRY and row.scope is Scope.APP and row.stage is not Stage.TOKEN:
        # A pause for an unreachable host says where to look.
        assert "firewall" in v.hint and "check" in v.hint


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
    from relay.delivery.classify import RULES

    assert [r.reason for r in RULES if r.action is Action.HOLD and r.hint is None] == []
    assert [r.reason for r in RULES if r.action is Action.DELIVERED and r.hint is not None] == []
