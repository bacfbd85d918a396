"""The Microsoft Graph transport against the simulated Graph endpoint.

Real HTTPS on loopback (the simulator's certificates), the real MSAL for the Graph token, the real
relay for the end-to-end cases; a fake clock where the scheduler's timing matters (429 Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import os
import smtplib
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from relay.config import settings_from_dict
from relay.delivery.classify import Action, GraphReply, Scope, classify_graph
from relay.delivery.scheduler import Delivery
from relay.envelope import Envelope, Route
from relay.errors import ConfigError
from relay.microsoft.graph import GraphSender, check_graph_claims, parse_retry_after, prepare_mime
from relay.microsoft.tokens import TokenProvider, TokenProviders
from relay.microsoft.transport import Dispatcher
from relay.microsoft.upstream import SessionPool, Submitter
from relay.observability import Metrics
from relay.queue.spool import Spool, State
from relay.testing.entra import GRAPH_RESOURCE
from relay.testing.harness import RelayThread, relay_config, wait_until
from relay.testing.m365 import STANDARD_CLIENT_ID, STANDARD_MAILBOX, STANDARD_SEND_AS, STANDARD_TENANT, SimulatedM365
from tests.conftest import RelayFactory
from tests.fakeclock import FakeClock

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
TO = "alice@fabrikam.example"
CC = "bob@fabrikam.example"
HIDDEN = "carol@fabrikam.example"  # only in RCPT TO: a Bcc the client kept out of the headers


# ---------------------------------------------------------------------------------------------- fixtures


def graph_config(m365: SimulatedM365, workdir: Path, *, mailbox: dict[str, Any] | None = None,
                 **overrides: Any) -> dict[str, Any]:
    base = relay_config(m365, workdir)
    app = {**base["apps"][0], "graph_host": m365.graph_host}
    mbx = {"address": STANDARD_MAILBOX, "app": "contoso", "transport": "graph", **(mailbox or {})}
    return relay_config(m365, workdir, overrides={"apps": [app], "mailboxes": [mbx], **overrides})


@pytest.fixture
def graph_m365(m365: SimulatedM365) -> SimulatedM365:
    m365.entra.set_graph_roles(STANDARD_TENANT, STANDARD_CLIENT_ID, ["Mail.Send"])
    return m365


def _wired_for_graph(relay: RelayThread) -> None:
    assert relay.relay.submitter.graph is not None, "the service wires Graph for graph mailboxes"


@pytest.fixture
def graph_relay(graph_m365: SimulatedM365, relay_factory: RelayFactory) -> Callable[..., RelayThread]:
    def make(**kwargs: Any) -> RelayThread:
        return relay_factory(build=lambda workdir: graph_config(graph_m365, workdir, **kwargs),
                             prepare=_wired_for_graph)

    return make


def message_with_attachment(attachment: bytes, *, subject: str = "Quarterly report") -> EmailMessage:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = STANDARD_MAILBOX
    msg["To"] = f"Alice <{TO}>"
    msg["Cc"] = CC
    msg["Subject"] = subject
    msg["Message-ID"] = email.utils.make_msgid(domain="erp.contoso.com")
    msg.set_content("Please find the report attached.\n")
    msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="report.pdf")
    return msg


def graph_token_requests(m365: SimulatedM365) -> int:
    return sum(1 for r in m365.entra.requests if r.method == "POST" and r.scope == GRAPH_SCOPE)


def send(relay: RelayThread, msg: EmailMessage, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.sendmail(STANDARD_MAILBOX, rcpts, msg.as_bytes())


# ---------------------------------------------------------------------------------------------- end to end


def test_bcc_and_attachment_arrive_intact_with_every_envelope_recipient(
        graph_m365: SimulatedM365, graph_relay: Callable[..., RelayThread]) -> None:
    relay = graph_relay()
    attachment = os.urandom(300_000)
    msg = message_with_attachment(attachment)
    send(relay, msg, [TO, CC, HIDDEN])

    [got] = graph_m365.graph.wait_for_messages(1, timeout=15)
    assert got.mailbox == STANDARD_MAILBOX and got.client_id == STANDARD_CLIENT_ID
    assert set(got.recipients) == {TO, CC, HIDDEN}, "Graph must reach every envelope recipient"
    assert got.bcc == (HIDDEN,) and got.to == (TO,) and got.cc == (CC,)
    # Intact: the original message is in the MIME byte for byte, after the one Bcc header we added.
    original = msg.as_bytes()
    assert got.mime.startswith(b"Bcc: " + HIDDEN.encode() + b"\r\n")
    assert got.mime.endswith(original[original.index(b"\r\n\r\n"):])
    parsed = email.message_from_bytes(got.mime, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    [part] = list(parsed.iter_attachments())
    assert part.get_filename() == "report.pdf" and part.get_content() == attachment
    assert parsed["Subject"] == "Quarterly report"
    assert not graph_m365.exchange.accepted, "a graph mailbox sends nothing by SMTP"
    assert sum(relay.relay.spool.stats().counts.values()) == 0, "delivered: gone from the spool"


def test_graph_token_is_requested_once_and_reused(graph_m365: SimulatedM365,
                                                  graph_relay: Callable[..., RelayThread]) -> None:
    relay = graph_relay()
    for i in range(3):
        send(relay, message_with_attachment(b"x" * 100, subject=f"n{i}"), [TO])
    graph_m365.graph.wait_for_messages(3, timeout=15)
    assert graph_token_requests(graph_m365) == 1
    token_posts = [r for r in graph_m365.entra.requests if r.method == "POST"]
    assert all(r.scope == GRAPH_SCOPE for r in token_posts), "no Exchange token is needed for Graph mail"


def test_a_4mb_message_is_refused_with_graphs_limit(graph_m365: SimulatedM365,
                                                    graph_relay: Callable[..., RelayThread]) -> None:
    relay = graph_relay()
    msg = message_with_attachment(os.urandom(4 * 1024 * 1024))
    # smtplib declares SIZE= (RFC 1870): refused at MAIL, before 4 MB travel for nothing.
    with pytest.raises(smtplib.SMTPSenderRefused) as at_mail:
        send(relay, msg, [TO])
    # A client that declares no size is refused after DATA, with the same limit named.
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.ehlo()
        assert client.mail(STANDARD_MAILBOX)[0] == 250
        assert client.rcpt(TO)[0] == 250
        code, reply = client.data(msg.as_bytes())
    for got_code, error in ((at_mail.value.smtp_code, at_mail.value.smtp_error), (code, reply)):
        assert got_code == 552
        text = error.decode() if isinstance(error, bytes) else error
        assert text.startswith("5.3.4") and "Graph" in text and "3000000" in text, text
    assert graph_m365.graph.requests == [], "refused before any request: nothing to retry blindly"
    assert not graph_m365.exchange.accepted


def test_a_4mb_message_goes_by_smtp_when_the_mailbox_falls_back(
        graph_m365: SimulatedM365, graph_relay: Callable[..., RelayThread]) -> None:
    relay = graph_relay(mailbox={"fallback_smtp": True})
    msg = message_with_attachment(os.urandom(4 * 1024 * 1024))
    send(relay, msg, [TO, HIDDEN])
    [got] = graph_m365.exchange.wait_for_messages(1, timeout=30)
    assert set(got.rcpt_tos) == {TO, HIDDEN}
    assert got.content.endswith(msg.as_bytes()[-1000:])
    assert graph_m365.graph.requests == []
    # A small message of the same mailbox still goes by Graph.
    send(relay, message_with_attachment(b"small"), [TO])
    graph_m365.graph.wait_for_messages(1, timeout=15)


def test_missing_mail_send_holds_and_never_bounces(graph_m365: SimulatedM365,
                                                   graph_relay: Callable[..., RelayThread]) -> None:
    graph_m365.entra.set_graph_roles(STANDARD_TENANT, STANDARD_CLIENT_ID, [])
    relay = graph_relay()
    send(relay, message_with_attachment(b"x"), [TO])  # 250 queued: no 5xx for a configuration problem
    wait_until(lambda: bool(relay.relay.delivery.held.holds()), 15, "the app to be held")
    [hold] = relay.relay.delivery.held.holds()
    assert hold.scope == "app" and hold.reason == "graph_permission" and "Mail.Send" in hold.hint
    assert relay.relay.spool.stats().counts.get(State.QUEUED, 0) == 1
    ok, _ = relay.relay.readiness()
    assert not ok


def test_an_access_policy_holds_only_that_mailbox(graph_m365: SimulatedM365,
                                                  graph_relay: Callable[..., RelayThread]) -> None:
    graph_m365.graph.restrict(STANDARD_CLIENT_ID, {STANDARD_SEND_AS})  # leaves relay@ out
    relay = graph_relay()
    send(relay, message_with_attachment(b"x"), [TO])
    wait_until(lambda: bool(relay.relay.delivery.held.holds()), 15, "the mailbox to be held")
    [hold] = relay.relay.delivery.held.holds()
    assert hold.scope == "mailbox" and hold.reason == "graph_access_denied"
    assert "Test-ApplicationAccessPolicy" in hold.hint


# ---------------------------------------------------------------------------------------------- 429 on a fake clock


async def test_429_is_retried_after_retry_after(graph_m365: SimulatedM365, tmp_path: Path) -> None:
    clock = FakeClock()
    config = graph_config(graph_m365, tmp_path, delivery={"retry": {"first": 5, "max": 3600}, "timeout": 10})
    settings = settings_from_dict(config)
    spool = Spool(settings.spool.path, clock=clock, fsync=False)
    spool.open()
    providers = TokenProviders(settings.apps)  # real time: the tokens come from the simulator
    tokens = {p.app.name: p for p in providers}
    graph = GraphSender.from_settings(settings, tokens)
    submitter = Dispatcher(Submitter(SessionPool(local_hostname="relay.test", timeout=10, idle_close=60),
                                     {a.name: a for a in settings.apps}, tokens), lambda _: 3, graph=graph)
    delivery = Delivery(settings, spool, submitter, Metrics(), clock=clock, sleep=clock.sleep)
    route = Route(app="contoso", mailbox=STANDARD_MAILBOX, sender=STANDARD_MAILBOX)
    entry = spool.store(Envelope(STANDARD_MAILBOX, (TO,)), route, message_with_attachment(b"x").as_bytes())

    async def round_() -> None:
        await delivery.tick()
        async with asyncio.timeout(20):
            await delivery.wait_idle()

    try:
        graph_m365.graph.throttle(retry_after=120)
        await round_()
        assert len(graph_m365.graph.requests) == 1 and graph_m365.graph.requests[0].status == 429
        deferred = spool.get(entry.id)
        assert deferred is not None and deferred.state is State.QUEUED
        assert deferred.next_attempt_at - clock() == pytest.approx(120)
        pause = delivery.held.blocks[("mailbox", STANDARD_MAILBOX)]
        assert pause.kind == "pause" and pause.until - clock() == pytest.approx(120)

        clock.advance(119)
        await round_()
        assert len(graph_m365.graph.requests) == 1, "nothing before Retry-After has passed"

        clock.advance(2)
        await round_()
        [got] = graph_m365.graph.wait_for_messages(1, timeout=10)
        assert got.recipients == (TO,)
        assert spool.get(entry.id) is None, "delivered: gone from the spool"
        assert graph_token_requests(graph_m365) == 1, "the Graph token is reused for the retry"
    finally:
        await delivery.stop(1)
        graph.close()
        providers.close()
        spool.close()


# ---------------------------------------------------------------------------------------------- units


async def test_sender_against_the_simulator_unit(graph_m365: SimulatedM365, tmp_path: Path) -> None:
    """503 is transient; a 401 (token for the wrong audience) is retried once with a fresh token."""
    settings = settings_from_dict(graph_config(graph_m365, tmp_path))
    app = settings.apps[0]
    provider = TokenProvider(app)
    sender = GraphSender.from_settings(settings, {"contoso": provider})
    route = Route(app="contoso", mailbox=STANDARD_MAILBOX, sender=STANDARD_MAILBOX)
    body = message_with_attachment(b"x").as_bytes()
    try:
        graph_m365.graph.fail_next(503, retry_after=7)
        outcome = await sender.submit(route, Envelope(STANDARD_MAILBOX, (TO,)), body, (TO,))
        assert outcome is not None and outcome.verdict.action is Action.RETRY
        assert outcome.verdict.retry_after == 7 and outcome.deferred == (TO,)

        graph_m365.graph.fail_next(401, "InvalidAuthenticationToken", "Access token validation failure.")
        outcome = await sender.submit(route, Envelope(STANDARD_MAILBOX, (TO,)), body, (TO,))
        assert outcome is not None
        assert outcome.verdict.action is Action.DELIVERED, outcome.verdict
        assert outcome.delivered == (TO,) and outcome.upstream_id
        assert graph_token_requests(graph_m365) == 2, "one fresh token after the 401"

        probe = await sender.probe(route)
        assert probe.action is Action.DELIVERED and "carries Mail.Send" in probe.reply
        assert graph_token_requests(graph_m365) == 3, "a probe always asks for a fresh token"
        graph_m365.entra.set_graph_roles(STANDARD_TENANT, STANDARD_CLIENT_ID, [])
        # No role in the token: maybe consent is missing, maybe RBAC for Applications grants Mail.Send
        # (tokens then carry no role). The probe lets the next attempt decide rather than hold forever.
        probe = await sender.probe(route)
        assert probe.action is Action.DELIVERED and "lacks the Mail.Send role" in probe.reply
        graph_m365.entra.stop()
        probe = await sender.probe(route)
        assert probe.action is Action.RETRY and probe.scope is Scope.APP
        graph_m365.entra.start()
    finally:
        sender.close()
        provider.close()


def test_check_graph_claims(m365: SimulatedM365) -> None:
    m365.entra.set_graph_roles(STANDARD_TENANT, STANDARD_CLIENT_ID, ["Mail.Send"])
    good, _ = m365.entra.issue_access_token(STANDARD_TENANT, STANDARD_CLIENT_ID, GRAPH_RESOURCE)
    ok, detail, hint = check_graph_claims(good)
    assert ok and "Mail.Send" in detail and hint == ""
    m365.entra.set_graph_roles(STANDARD_TENANT, STANDARD_CLIENT_ID, [])
    bare, _ = m365.entra.issue_access_token(STANDARD_TENANT, STANDARD_CLIENT_ID, GRAPH_RESOURCE)
    ok, detail, hint = check_graph_claims(bare)
    assert not ok and "lacks the Mail.Send role" in detail and "Grant admin consent" in hint
    exchange = m365.issue_token()
    ok, detail, _ = check_graph_claims(exchange)
    assert not ok and "not Microsoft Graph" in detail
    assert bare not in detail + hint


@pytest.mark.parametrize(("reply", "action", "reason", "scope"), [
    (GraphReply(202), Action.DELIVERED, "delivered", Scope.MESSAGE),
    (GraphReply(429, "ApplicationThrottled", retry_after=30), Action.RETRY, "throttled", Scope.MAILBOX),
    (GraphReply(503, "ServiceUnavailable"), Action.RETRY, "transient", Scope.MESSAGE),
    (GraphReply(500), Action.RETRY, "transient", Scope.MESSAGE),
    (GraphReply(401, "InvalidAuthenticationToken"), Action.HOLD, "graph_token_rejected", Scope.APP),
    (GraphReply(403, "ErrorAccessDenied"), Action.HOLD, "graph_access_denied", Scope.MAILBOX),
    (GraphReply(403, "ErrorSendAsDenied"), Action.FAILED, "sendas_denied", Scope.MESSAGE),
    (GraphReply(404, "ErrorInvalidUser"), Action.HOLD, "graph_unknown_mailbox", Scope.MAILBOX),
    (GraphReply(413), Action.FAILED, "too_big", Scope.MESSAGE),
    (GraphReply(400, "BadRequest", "The maximum request length supported is 4MB."), Action.FAILED, "too_big",
     Scope.MESSAGE),
    (GraphReply(400, "ErrorInvalidRecipients", "At least one recipient isn't valid."), Action.FAILED,
     "bad_recipient", Scope.MESSAGE),
    (GraphReply(400, "ErrorMimeContentInvalidBase64String"), Action.FAILED, "rejected", Scope.MESSAGE),
    (GraphReply(400, "ErrorSomethingNew"), Action.FAILED, "rejected", Scope.MESSAGE),
    (GraphReply(408), Action.RETRY, "transient", Scope.MESSAGE),
])
def test_classify_graph_rows(reply: GraphReply, action: Action, reason: str, scope: Scope) -> None:
    verdict = classify_graph(reply)
    assert (verdict.action, verdict.reason, verdict.scope) == (action, reason, scope)
    if action is Action.FAILED:
        assert verdict.code is not None and 500 <= verdict.code < 600 and verdict.enhanced.startswith("5.")
        assert verdict.reply.startswith(f"{verdict.code} {verdict.enhanced} ")


def test_classify_graph_details() -> None:
    assert classify_graph(GraphReply(429, retry_after=42)).retry_after == 42
    assert classify_graph(GraphReply(429)).retry_after == 60  # no header: a minute
    no_role = classify_graph(GraphReply(403, "ErrorAccessDenied"), token_has_role=False)
    assert (no_role.action, no_role.scope, no_role.reason) == (Action.HOLD, Scope.APP, "graph_permission")
    assert no_role.evict_token and "Mail.Send" in no_role.hint


def test_parse_retry_after() -> None:
    assert parse_retry_after("120") == 120
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = 1_767_603_600.0
    assert parse_retry_after("Mon, 05 Jan 2026 09:01:30 GMT", now) == pytest.approx(90)
    assert parse_retry_after("Mon, 05 Jan 2026 08:00:00 GMT", now) == 0
    assert parse_retry_after("999999") == 3600


def test_prepare_mime_adds_envelope_only_recipients_as_bcc() -> None:
    msg = b"From: a@contoso.com\r\nTo: Alice <alice@x.example>\r\nSubject: hi\r\n\r\nbody\r\n"
    out = prepare_mime(msg, ["alice@x.example", "carol@x.example", "dave@x.example"])
    assert out.added_bcc == ("carol@x.example", "dave@x.example") and out.removed == ()
    assert out.mime == b"Bcc: carol@x.example, dave@x.example\r\n" + msg
    assert prepare_mime(msg, ["ALICE@x.example"]).mime is msg, "nothing to change: the very same bytes"


def test_prepare_mime_merges_an_existing_bcc_and_keeps_lf_endings() -> None:
    msg = b"From: a@contoso.com\nTo: alice@x.example\nBcc: bob@x.example,\n  eve@x.example\n\nbody\n"
    out = prepare_mime(msg, ["alice@x.example", "bob@x.example", "carol@x.example"])
    assert out.mime == b"Bcc: bob@x.example, carol@x.example\nFrom: a@contoso.com\nTo: alice@x.example\n\nbody\n"
    assert out.removed == ("eve@x.example",)


def test_prepare_mime_removes_header_only_recipients() -> None:
    """``To: root`` of a cron mail, an address already delivered: Graph must not send to them."""
    msg = (b"From: a@contoso.com\r\nTo: root@host.example, \"Ops\" <ops@x.example>\r\n"
           b"Cc: done@x.example\r\nSubject: cron\r\n\r\nbody\r\n")
    out = prepare_mime(msg, ["ops@x.example"])
    assert out.removed == ("done@x.example", "root@host.example")
    assert out.mime == (b"From: a@contoso.com\r\nTo: Ops <ops@x.example>\r\nSubject: cron\r\n\r\nbody\r\n")
    headers_only = b"From: a@contoso.com\r\nTo: a@x.example"
    assert prepare_mime(headers_only, ["b@x.example"]).mime == b"Bcc: b@x.example\r\nFrom: a@contoso.com\r\n"


def test_prepare_mime_folds_long_bcc_lines() -> None:
    rcpts = [f"user{i:04d}@fabrikam.example" for i in range(300)]
    out = prepare_mime(b"From: a@contoso.com\r\nSubject: s\r\n\r\nb\r\n", rcpts)
    head = out.mime.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    parsed = email.message_from_bytes(out.mime, policy=email.policy.default)
    assert [a.addr_spec for a in parsed["Bcc"].addresses] == rcpts


def test_graph_config() -> None:
    base: dict[str, Any] = {
        "apps": [{"name": "c", "tenant_id": STANDARD_TENANT, "client_id": STANDARD_CLIENT_ID, "client_secret": "s",
                  "cloud": "gcc-high"}],
        "mailboxes": [{"address": "a@contoso.com", "app": "c", "transport": "graph", "fallback_smtp": True}],
    }
    settings = settings_from_dict(base)
    app = settings.apps[0]
    assert app.effective_graph_host == "https://graph.microsoft.us"
    assert app.effective_graph_scope == "https://graph.microsoft.us/.default"
    assert app.graph_max_mime == 3_000_000
    assert settings.mailboxes[0].transport == "graph"
    base["mailboxes"] = [{"address": "a@contoso.com", "app": "c", "fallback_smtp": True}]
    with pytest.raises(ConfigError, match="fallback_smtp only applies"):
        settings_from_dict(base)


def test_graph_body_is_base64_text_plain_on_the_wire(graph_m365: SimulatedM365, tmp_path: Path) -> None:
    """What the simulator accepts is what Graph documents; a JSON or non-base64 body is refused."""
    import requests

    token, _ = graph_m365.entra.issue_access_token(STANDARD_TENANT, STANDARD_CLIENT_ID, GRAPH_RESOURCE)
    url = f"{graph_m365.graph_host}/v1.0/users/{STANDARD_MAILBOX}/sendMail"
    auth = {"Authorization": f"Bearer {token}"}
    mime = b"From: relay@contoso.com\r\nTo: alice@fabrikam.example\r\nSubject: s\r\n\r\nb\r\n"
    with requests.Session() as s:
        s.trust_env = False  # REQUESTS_CA_BUNDLE would override verify=
        s.verify = str(graph_m365.ca_file)
        bad = s.post(url, data=b"not base64!", headers={**auth, "Content-Type": "text/plain"}, timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "ErrorMimeContentInvalidBase64String"
        good = s.post(url, data=base64.b64encode(mime), headers={**auth, "Content-Type": "text/plain"}, timeout=10)
        assert good.status_code == 202 and good.content == b""
        big = s.post(url, data=b"A" * (4 * 1024 * 1024 + 4), headers={**auth, "Content-Type": "text/plain"},
                     timeout=30)
        assert big.status_code == 413
        anonymous = s.post(url, data=base64.b64encode(mime), headers={"Content-Type": "text/plain"}, timeout=10)
        assert anonymous.status_code == 401


def test_prepare_mime_with_internationalised_addresses() -> None:
    """SMTPUTF8 messages: UTF-8 addresses match the envelope; bytes that are not UTF-8 survive as they were."""
    msg = ("From: a@contoso.com\r\nTo: \"Jörg, Ops\" <jörg@x.example>, gone@x.example\r\n"
           "Subject: s\r\n\r\nb\r\n").encode()
    out = prepare_mime(msg, ["jörg@x.example", "zoë@x.example"])
    assert out.removed == ("gone@x.example",) and out.added_bcc == ("zoë@x.example",)
    assert out.mime == ("Bcc: zoë@x.example\r\nFrom: a@contoso.com\r\nTo: \"Jörg, Ops\" <jörg@x.example>\r\n"
                        "Subject: s\r\n\r\nb\r\n").encode()
    latin1 = b"From: a@contoso.com\r\nTo: J\xf6rg <j@x.example>\r\nSubject: s\r\n\r\nb\r\n"
    out = prepare_mime(latin1, ["j@x.example", "k@x.example"])
    assert out.mime == b"Bcc: k@x.example\r\n" + latin1


def test_check_verifies_the_mail_send_role_for_graph_mailboxes(m365: SimulatedM365, tmp_path: Path) -> None:
    import asyncio

    from relay.check import Checklist, check_online
    from relay.config import settings_from_dict

    settings = settings_from_dict(graph_config(m365, tmp_path))
    m365.entra.set_graph_roles(STANDARD_TENANT, STANDARD_CLIENT_ID, [])
    checks = Checklist()
    asyncio.run(check_online(settings, checks))
    by_name = {s.name: s for s in checks.steps}
    claims = by_name["Graph token claims for app contoso"]
    assert not claims.ok and "Mail.Send" in claims.detail + claims.hint
    assert not any(name.startswith("AUTH XOAUTH2") for name in by_name), "a Graph-only mailbox needs no SMTP AUTH"
    m365.entra.set_graph_roles(STANDARD_TENANT, STANDARD_CLIENT_ID, ["Mail.Send"])
    checks = Checklist()
    asyncio.run(check_online(settings, checks))
    assert checks.ok, [(s.name, s.detail) for s in checks.steps if not s.ok]
