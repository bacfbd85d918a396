"""The simulated Exchange Online SMTP endpoint, driven by real clients (aiosmtplib and smtplib)."""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import aiosmtplib
import jwt
import msal
import pytest
import requests

from relay.testing import (
    EXCHANGE_RESOURCE,
    GRAPH_RESOURCE,
    STANDARD_CLIENT_ID,
    STANDARD_MAILBOX,
    STANDARD_SECRET,
    STANDARD_SEND_AS,
    STANDARD_TENANT,
    ExchangeLimits,
    SimulatedM365,
    make_app_certificate,
    xoauth2_initial_response,
)
from tests.fakeclock import FakeClock

# The XOAUTH2 test vectors of docs/exchange.md: (user, token, base64 initial response).
VECTORS = [
    (
        "test@contoso.onmicrosoft.com",
        "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA",
        "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0Nj"
        "bFJDM0VvQUEBAQ==",
    ),
    ("user", "mF_9.B5f-4.1JqM", "dXNlcj11c2VyAWF1dGg9QmVhcmVyIG1GXzkuQjVmLTQuMUpxTQEB"),
]
OTHER_CLIENT = "44444444-4444-4444-4444-444444444444"


@pytest.fixture
def clock() -> FakeClock:
    """The simulator's injectable clock, moved by the test (rate and quota windows)."""
    return FakeClock(time.time())


@pytest.fixture
def m365(tmp_path: Path, clock: FakeClock) -> Iterator[SimulatedM365]:
    limits = ExchangeLimits(messages_per_minute=30, recipients_per_day=10_000, recipients_per_message=1_000)
    sim = SimulatedM365.standard(tmp_path, clock=clock, limits=limits)
    sim.add_app(STANDARD_TENANT, OTHER_CLIENT, secret="other")
    with sim:
        yield sim


def message(sender: str = STANDARD_MAILBOX, body: bytes = b"hello\r\n") -> bytes:
    return b"From: " + sender.encode() + b"\r\nTo: someone@example.com\r\nSubject: test\r\n\r\n" + body


async def connect(m365: SimulatedM365, *, starttls: bool = True) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(
        hostname=m365.smtp_host,
        port=m365.smtp_port,
        start_tls=False,
        tls_context=m365.certs.client_context(),
        timeout=5,
    )
    await client.connect()
    await client.ehlo()
    if starttls:
        await client.starttls()
        await client.ehlo()
    return client


async def session(m365: SimulatedM365, user: str = STANDARD_MAILBOX, token: str | None = None) -> aiosmtplib.SMTP:
    client = await connect(m365)
    await client.auth_xoauth2(user, token or m365.issue_token())
    return client


def hang_up(smtp: aiosmtplib.SMTP) -> None:
    """Abort rather than close: a TLS close needs loop turns the test's loop may not get before it ends."""
    if smtp.transport is not None:
        cast(asyncio.Transport, smtp.transport).abort()
    smtp.close()


@pytest.fixture
async def client(m365: SimulatedM365) -> AsyncIterator[aiosmtplib.SMTP]:
    smtp = await session(m365)
    yield smtp
    hang_up(smtp)


async def auth_reply(m365: SimulatedM365, raw: str) -> aiosmtplib.SMTPResponse:
    smtp = await connect(m365)
    try:
        return await smtp.execute_command(b"AUTH", b"XOAUTH2", raw.encode())
    finally:
        hang_up(smtp)


# -- greeting, EHLO, STARTTLS -----------------------------------------------------------------------


async def test_banner_and_ehlo_before_and_after_starttls(m365: SimulatedM365) -> None:
    smtp = await connect(m365, starttls=False)
    before = set(smtp.esmtp_extensions)
    assert {"size", "pipelining", "dsn", "enhancedstatuscodes", "starttls", "8bitmime", "binarymime"} <= before
    assert {"chunking", "smtputf8"} <= before and "auth" not in before
    assert smtp.esmtp_extensions["size"] == "157286400"
    await smtp.starttls()
    await smtp.ehlo()
    assert "starttls" not in smtp.esmtp_extensions
    assert smtp.esmtp_extensions["auth"] == "LOGIN XOAUTH2"
    hang_up(smtp)


def test_banner_and_ehlo_greeting(m365: SimulatedM365) -> None:
    with socket.create_connection(("127.0.0.1", m365.smtp_port), timeout=5) as raw:
        banner = raw.makefile("rb").readline()
    assert banner.startswith(b"220 SIM01.prod.outlook.com Microsoft ESMTP MAIL Service ready at ")
    with smtplib.SMTP(m365.smtp_host, m365.smtp_port, timeout=5) as smtp:
        code, lines = smtp.ehlo("client.example")
        assert code == 250 and lines.startswith(b"SIM01.prod.outlook.com Hello [127.0.0.1]")


async def test_auth_and_mail_before_starttls_are_refused(m365: SimulatedM365) -> None:
    smtp = await connect(m365, starttls=False)
    raw = xoauth2_initial_response(STANDARD_MAILBOX, m365.issue_token())
    reply = await smtp.execute_command(b"AUTH", b"XOAUTH2", raw.encode())
    assert (reply.code, reply.message) == (504, "5.7.4 Unrecognized authentication type")
    reply = await smtp.execute_command(b"MAIL", b"FROM:<relay@contoso.com>")
    assert (reply.code, reply.message) == (530, "5.7.0 Must issue a STARTTLS command first")
    hang_up(smtp)


async def test_mail_after_tls_without_auth(m365: SimulatedM365) -> None:
    smtp = await connect(m365)
    reply = await smtp.execute_command(b"MAIL", b"FROM:<relay@contoso.com>")
    assert reply.code == 530 and reply.message.startswith("5.7.57 Client not authenticated to send mail")
    hang_up(smtp)


# -- accepted messages -----------------------------------------------------------------------------


async def test_accepted_bytes_identical_and_stored(m365: SimulatedM365, client: aiosmtplib.SMTP) -> None:
    body = b".leading dot\r\n..two dots\r\n.\r\nnot the end\r\n8-bit: \xc3\xa9\xe9\xff\r\n"
    data = message(body=body)
    errors, reply = await client.sendmail(STANDARD_MAILBOX, ["a@example.com", "b@example.com"], data)
    assert errors == {}
    assert reply.startswith("2.0.0 OK <") and reply.endswith("[Hostname=SIM01.prod.outlook.com]")
    [stored] = m365.exchange.accepted
    assert stored.content == data
    assert stored.eml_path.read_bytes() == data
    assert stored.queue_id in reply
    meta = json.loads(stored.json_path.read_text())
    assert meta["mail_from"] == STANDARD_MAILBOX
    assert meta["rcpt_tos"] == ["a@example.com", "b@example.com"]
    assert meta["mailbox"] == STANDARD_MAILBOX and meta["client_id"] == STANDARD_CLIENT_ID
    assert meta["tenant_id"] == STANDARD_TENANT and meta["size"] == len(data)
    assert stored.eml_path.name.startswith("000001-")
    stats = m365.exchange.stats()
    assert (stats.connections, stats.auth_successes, stats.messages_accepted) == (1, 1, 1)


async def test_queue_ids_unique_and_mail_options_kept(m365: SimulatedM365, client: aiosmtplib.SMTP) -> None:
    for _ in range(3):
        await client.sendmail(STANDARD_MAILBOX, ["a@example.com"], message(), mail_options=["BODY=8BITMIME"])
    accepted = m365.exchange.accepted
    assert len({m.queue_id for m in accepted}) == 3
    assert "BODY=8BITMIME" in accepted[0].mail_options


def test_smtplib_end_to_end_with_msal_token(m365: SimulatedM365) -> None:
    http = requests.Session()
    http.trust_env = False
    http.verify = str(m365.ca_file)
    app = msal.ConfidentialClientApplication(
        STANDARD_CLIENT_ID,
        client_credential=STANDARD_SECRET,
        authority=m365.authority(STANDARD_TENANT),
        http_client=http,
        instance_discovery=False,
    )
    token = app.acquire_token_for_client([f"{EXCHANGE_RESOURCE}/.default"])["access_token"]
    data = message(sender=STANDARD_SEND_AS, body=b".dot\r\n")
    with smtplib.SMTP(m365.smtp_host, m365.smtp_port, timeout=5) as smtp:
        smtp.starttls(context=m365.certs.client_context())
        smtp.ehlo()
        code, _ = smtp.docmd("AUTH", "XOAUTH2 " + xoauth2_initial_response(STANDARD_MAILBOX, token))
        assert code == 235
        smtp.sendmail(STANDARD_SEND_AS, ["x@example.com"], data)
    assert m365.exchange.wait_for_messages(1)[0].content == data


async def test_null_sender_accepted(m365: SimulatedM365, client: aiosmtplib.SMTP) -> None:
    await client.sendmail("", ["a@example.com"], message())
    assert m365.exchange.accepted[0].mail_from == ""


# -- AUTH ------------------------------------------------------------------------------------------


async def test_raw_xoauth2_recorded_as_received(m365: SimulatedM365) -> None:
    for user, token, raw in VECTORS:
        assert xoauth2_initial_response(user, token) == raw
        reply = await auth_reply(m365, raw)
        assert (reply.code, reply.message.split(" [")[0]) == (535, "5.7.3 Authentication unsuccessful")
    attempts = m365.exchange.auth_attempts
    assert [a.raw for a in attempts] == [raw for _, _, raw in VECTORS]
    assert [a.user for a in attempts] == [user for user, _, _ in VECTORS]
    assert {a.reason for a in attempts} == {"invalid_token"}


async def test_two_step_xoauth2(m365: SimulatedM365) -> None:
    smtp = await connect(m365)
    reply = await smtp.execute_command(b"AUTH", b"XOAUTH2")
    assert reply.code == 334
    raw = xoauth2_initial_response(STANDARD_MAILBOX, m365.issue_token())
    reply = await smtp.execute_command(raw.encode())
    assert (reply.code, reply.message) == (235, "2.7.0 Authentication successful")
    hang_up(smtp)


def _bad_token(m365: SimulatedM365, case: str) -> str:
    entra = m365.entra
    if case == "expired":
        return m365.issue_token(now=time.time() - 7200, lifetime=3600)
    if case == "wrong_audience":
        return entra.issue_access_token(STANDARD_TENANT, STANDARD_CLIENT_ID, GRAPH_RESOURCE)[0]
    if case == "unknown_tenant":
        claims = {
            "aud": EXCHANGE_RESOURCE,
            "iss": "https://sts.windows.net/other/",
            "tid": "other",
            "exp": time.time() + 600,
            "appid": STANDARD_CLIENT_ID,
        }
        return entra.sign_claims(claims)
    key = make_app_certificate().private_key_pem  # a key that is not Entra's
    return jwt.encode({"aud": EXCHANGE_RESOURCE, "exp": time.time() + 600}, key, algorithm="RS256")


@pytest.mark.parametrize("case", ["malformed", "invalid_token", "expired", "wrong_audience", "unknown_tenant"])
async def test_bad_tokens_get_535_5_7_3(m365: SimulatedM365, case: str) -> None:
    if case == "malformed":
        raw = base64.b64encode(b"user=relay@contoso.com\x01auth=Basic x\x01\x01").decode()
    else:
        raw = xoauth2_initial_response(STANDARD_MAILBOX, _bad_token(m365, case))
    reply = await auth_reply(m365, raw)
    assert reply.code == 535
    assert reply.message.startswith("5.7.3 Authentication unsuccessful [SIM01.prod.outlook.com ")
    assert m365.exchange.auth_attempts[-1].reason == case


@pytest.mark.parametrize(
    ("fault", "reason", "expected"),
    [
        ("no_consent", "missing_role", "5.7.3 Authentication unsuccessful"),
        ("no_sp", "service_principal", "5.7.3 Authentication unsuccessful"),
        ("wrong_object_id", "service_principal", "5.7.3 Authentication unsuccessful"),
        ("no_full_access", "no_full_access", "5.7.3 Authentication unsuccessful"),
        ("unknown_mailbox", "no_full_access", "5.7.3 Authentication unsuccessful"),
        (
            "mailbox_disabled",
            "smtp_auth_disabled",
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. "
            "Visit https://aka.ms/smtp_auth_disabled for more information.",
        ),
        (
            "tenant_disabled",
            "smtp_auth_disabled",
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
            "Visit https://aka.ms/smtp_auth_disabled for more information.",
        ),
    ],
)
async def test_admin_setup_failures(m365: SimulatedM365, fault: str, reason: str, expected: str) -> None:
    user = STANDARD_MAILBOX
    if fault == "no_consent":
        m365.set_admin_consent(STANDARD_TENANT, STANDARD_CLIENT_ID, False)
    elif fault == "no_sp":
        m365.remove_service_principal(STANDARD_TENANT, STANDARD_CLIENT_ID)
    elif fault == "wrong_object_id":
        m365.register_service_principal(STANDARD_TENANT, STANDARD_CLIENT_ID, "app-registration-object-id")
    elif fault == "no_full_access":
        m365.revoke_full_access(STANDARD_MAILBOX, STANDARD_CLIENT_ID)
    elif fault == "unknown_mailbox":
        user = "nobody@contoso.com"
    elif fault == "mailbox_disabled":
        m365.set_mailbox_smtp_auth(STANDARD_MAILBOX, False)
    elif fault == "tenant_disabled":
        m365.set_tenant_smtp_auth(STANDARD_TENANT, False)
    reply = await auth_reply(m365, xoauth2_initial_response(user, m365.issue_token()))
    assert reply.code == 535
    assert reply.message.split(" [")[0] == expected
    assert m365.exchange.auth_attempts[-1].reason == reason


async def test_mailbox_setting_overrides_tenant(m365: SimulatedM365) -> None:
    m365.set_tenant_smtp_auth(STANDARD_TENANT, False)
    m365.set_mailbox_smtp_auth(STANDARD_MAILBOX, True)
    reply = await auth_reply(m365, xoauth2_initial_response(STANDARD_MAILBOX, m365.issue_token()))
    assert reply.code == 235


async def test_admin_fixes_permission_while_running(m365: SimulatedM365) -> None:
    m365.revoke_full_access(STANDARD_MAILBOX, STANDARD_CLIENT_ID)
    raw = xoauth2_initial_response(STANDARD_MAILBOX, m365.issue_token())
    assert (await auth_reply(m365, raw)).code == 535
    m365.grant_full_access(STANDARD_MAILBOX, STANDARD_CLIENT_ID)
    assert (await auth_reply(m365, raw)).code == 235
    stats = m365.exchange.stats()
    assert (stats.auth_failures, stats.auth_successes) == (1, 1)


async def test_basic_auth_and_plain_refused(m365: SimulatedM365) -> None:
    smtp = await connect(m365)
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
        await smtp.auth_login("relay@contoso.com", "password")
    assert refused.value.code == 535
    assert refused.value.message.startswith("5.7.139 Authentication unsuccessful, basic authentication is disabled.")
    reply = await smtp.execute_command(b"AUTH", b"PLAIN", base64.b64encode(b"\0u\0p"))
    assert (reply.code, reply.message) == (504, "5.7.4 Unrecognized authentication type")
    hang_up(smtp)
    assert m365.exchange.auth_attempts[-1].reason == "basic_auth"
    assert "password" not in repr(m365.exchange.auth_attempts)


# -- MAIL / RCPT / DATA policy -----------------------------------------------------------------------


async def test_send_as_refused_at_mail(m365: SimulatedM365, client: aiosmtplib.SMTP) -> None:
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await client.sendmail("ceo@contoso.com", ["a@example.com"], message())
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.7.60 SMTP; Client does not have permissions to send as this sender")


async def test_send_as_granted_address_and_refused_at_data(m365: SimulatedM365, client: aiosmtplib.SMTP) -> None:
    await client.sendmail(STANDARD_SEND_AS, ["a@example.com"], message(sender=STANDARD_SEND_AS))
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await client.sendmail(STANDARD_MAILBOX, ["a@example.com"], message(sender="ceo@contoso.com"))
    assert refused.value.code == 554
    assert refused.value.message.startswith(
        "5.2.252 SendAsDenied; relay@contoso.com not allowed to send as ceo@contoso.com; "
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
        "Failed to process message due to a permanent exception with message"
    )
    assert len(m365.exchange.accepted) == 1
    m365.revoke_send_as(STANDARD_SEND_AS, STANDARD_CLIENT_ID)
    with pytest.raises(aiosmtplib.SMTPSenderRefused):
        await client.sendmail(STANDARD_SEND_AS, ["a@example.com"], message(sender=STANDARD_SEND_AS))


async def test_recipient_not_found_and_too_many(m365: SimulatedM365, client: aiosmtplib.SMTP) -> None:
    m365.exchange.add_unknown_recipient("ghost@contoso.com")
    errors, _ = await client.sendmail(STANDARD_MAILBOX, ["ghost@contoso.com", "a@example.com"], message())
    code, text = errors["ghost@contoso.com"]
    assert code == 550 and text.startswith("5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found")
    assert m365.exchange.accepted[0].rcpt_tos == ("a@example.com",)

    m365.exchange.limits.recipients_per_message = 2
    await client.mail(STANDARD_MAILBOX)
    for rcpt in ("a@example.com", "b@example.com"):
        await client.rcpt(rcpt)
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await client.rcpt("c@example.com")
    assert (refused.value.code, refused.value.message.split(" [")[0]) == (452, "4.5.3 Too many recipients")


async def test_size_limits(m365: SimulatedM365, client: aiosmtplib.SMTP) -> None:
    m365.exchange.set_max_send_size(STANDARD_MAILBOX, 1000)
    reply = await client.execute_command(b"MAIL", b"FROM:<relay@contoso.com>", b"SIZE=5000")
    assert reply.code == 552 and reply.message.startswith("5.3.4 Message size exceeds fixed maximum message size")
    await client.rset()
    # Without SIZE= (aiosmtplib's sendmail would add it) the size is only known at the end of DATA.
    await client.mail(STANDARD_MAILBOX)
    await client.rcpt("a@example.com")
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await client.data(message(body=b"x" * 990 + b"\r\n"))
    assert refused.value.code == 554
    assert refused.value.message.startswith("5.2.0 STOREDRV.Submission.Exception:MessageSubmissionExceededException; ")


async def test_daily_recipient_quota(m365: SimulatedM365, clock: FakeClock, client: aiosmtplib.SMTP) -> None:
    m365.exchange.limits.recipients_per_day = 5
    await client.sendmail(STANDARD_MAILBOX, [f"r{i}@example.com" for i in range(3)], message())
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await client.sendmail(STANDARD_MAILBOX, [f"s{i}@example.com" for i in range(3)], message())
    assert refused.value.code == 554
    assert "STOREDRV.Submission.Exception:SubmissionQuotaExceededException;" in refused.value.message
    clock.advance(86_401)
    await client.sendmail(STANDARD_MAILBOX, [f"s{i}@example.com" for i in range(3)], message())
    m365.set_quota_exhausted(STANDARD_MAILBOX, True)
    with pytest.raises(aiosmtplib.SMTPDataError):
        await client.sendmail(STANDARD_MAILBOX, ["t@example.com"], message())


async def test_message_rate_limit_closes(m365: SimulatedM365, clock: FakeClock, client: aiosmtplib.SMTP) -> None:
    m365.exchange.limits.messages_per_minute = 3
    for _ in range(3):
        await client.sendmail(STANDARD_MAILBOX, ["a@example.com"], message())
    reply = await client.execute_command(b"MAIL", b"FROM:<relay@contoso.com>")
    assert reply.code == 421 and reply.message.startswith("4.4.2 Message submission rate for this client")
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.execute_command(b"NOOP")
    clock.advance(61)
    again = await session(m365)
    await again.sendmail(STANDARD_MAILBOX, ["a@example.com"], message())
    hang_up(again)


async def test_sender_thread_limit_432(m365: SimulatedM365) -> None:
    sessions = [await session(m365) for _ in range(4)]
    for smtp in sessions[:3]:
        await smtp.mail(STANDARD_MAILBOX)
    reply = await sessions[3].execute_command(b"MAIL", b"FROM:<relay@contoso.com>")
    assert reply.code == 432
    assert reply.message.startswith("4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded")
    assert m365.exchange.stats().max_concurrent_sessions[STANDARD_MAILBOX] == 4
    hang_up(sessions[0])
    assert await m365.exchange.await_until(lambda: m365.exchange.concurrent_sessions(STANDARD_MAILBOX) == 3)
    await sessions[3].mail(STANDARD_MAILBOX)
    for smtp in sessions[1:]:
        hang_up(smtp)


# -- fault switches -----------------------------------------------------------------------------------


async def test_fault_connect_421(m365: SimulatedM365) -> None:
    m365.exchange.inject("connect")
    smtp = aiosmtplib.SMTP(hostname=m365.smtp_host, port=m365.smtp_port, start_tls=False, timeout=5)
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
        await smtp.connect()
    assert refused.value.code == 421
    assert refused.value.message == "4.3.2 Service not available, closing transmission channel"
    await (await session(m365)).quit()  # one-shot: the next connection is fine


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("ehlo", "421 4.3.2 Service not available, closing transmission channel"),
        ("auth", "501 5.5.127 Token will expire soon"),
        ("mail", "432 4.3.2 Concurrent connections limit exceeded"),
        ("rcpt", "451 4.7.0 Temporary server error. Please try again later. PRX2"),
        ("data", "451 4.7.0 Temporary server error. Please try again later. PRX2"),
    ],
)
async def test_fault_replies_by_stage(m365: SimulatedM365, stage: str, reply: str) -> None:
    code, text = int(reply[:3]), reply[4:]
    smtp = await connect(m365, starttls=False)
    await smtp.starttls()
    m365.exchange.inject(stage, reply)
    if stage == "ehlo":
        with pytest.raises(aiosmtplib.SMTPResponseException) as failed:
            await smtp.ehlo()
        assert (failed.value.code, failed.value.message) == (code, text)
        hang_up(smtp)
        return
    await smtp.ehlo()
    token = m365.issue_token()
    if stage == "auth":
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
            await smtp.auth_xoauth2(STANDARD_MAILBOX, token)
        assert (failed.value.code, failed.value.message) == (code, text)
        await smtp.auth_xoauth2(STANDARD_MAILBOX, token)  # one-shot
    else:
        await smtp.auth_xoauth2(STANDARD_MAILBOX, token)
        with pytest.raises(aiosmtplib.SMTPException):
            await smtp.sendmail(STANDARD_MAILBOX, ["a@example.com"], message())
        await smtp.rset()
    await smtp.sendmail(STANDARD_MAILBOX, ["a@example.com"], message())
    assert len(m365.exchange.accepted) == 1
    hang_up(smtp)


async def test_fault_starttls(m365: SimulatedM365) -> None:
    m365.exchange.inject("starttls", "454 4.7.0 Temporary authentication failure")
    smtp = await connect(m365, starttls=False)
    with pytest.raises(aiosmtplib.SMTPResponseException) as failed:
        await smtp.starttls()
    assert failed.value.code == 454
    await smtp.starttls()
    hang_up(smtp)


async def test_fault_times_and_clear(m365: SimulatedM365, client: aiosmtplib.SMTP) -> None:
    m365.exchange.inject("rcpt", "450 4.2.0 busy", times=None)
    for _ in range(3):
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await client.sendmail(STANDARD_MAILBOX, ["a@example.com"], message())
        await client.rset()
    m365.exchange.clear_faults()
    await client.sendmail(STANDARD_MAILBOX, ["a@example.com"], message())


async def test_drop_mid_data(m365: SimulatedM365, client: aiosmtplib.SMTP) -> None:
    m365.exchange.drop_mid_data()
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.sendmail(STANDARD_MAILBOX, ["a@example.com"], message(body=b"line\r\n" * 20_000))
    assert m365.exchange.accepted == []
    again = await session(m365)
    await again.sendmail(STANDARD_MAILBOX, ["a@example.com"], message())
    hang_up(again)


async def test_slow_server_delay(m365: SimulatedM365, client: aiosmtplib.SMTP) -> None:
    m365.exchange.set_reply_delay(0.3)
    started = asyncio.get_running_loop().time()
    await client.noop()
    assert asyncio.get_running_loop().time() - started >= 0.3
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await client.noop(timeout=0.1)
