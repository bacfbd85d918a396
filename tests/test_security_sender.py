"""Sender policy end to end: what the simulated Exchange receives for each rewrite_from mode.

The standard tenant: relay@contoso.com is the mailbox (FullAccess, XOAUTH2 user=), the app holds
SendAs on alerts@contoso.com. The local user ``erp`` may send as both.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from typing import Any

import pytest

from relay.testing.exchange import AcceptedMessage
from relay.testing.harness import wait_until
from relay.testing.m365 import STANDARD_CLIENT_ID, STANDARD_MAILBOX, STANDARD_SEND_AS, STANDARD_TENANT, SimulatedM365
from relay.testing.smtp_client import RawSMTP
from tests.conftest import RelayFactory

RCPT = "someone@fabrikam.example"


def body(from_value: bytes, subject: str = "s", *extra: bytes) -> bytes:
    head = b"From: " + from_value + b"\r\nTo: someone@fabrikam.example\r\nSubject: " + subject.encode() + b"\r\n"
    return head + b"".join(e + b"\r\n" for e in extra) + b"\r\nHello.\r\n.\r\n"


def parse(m: AcceptedMessage) -> EmailMessage:
    msg = email.message_from_bytes(m.content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def header_lines(m: AcceptedMessage, name: bytes) -> list[bytes]:
    head = m.content.split(b"\r\n\r\n", 1)[0]
    return [line for line in head.split(b"\r\n") if line.lower().startswith(name.lower() + b":")]


def send(relay_port: int, sender: str, data: bytes, *, login: bool = True, smtputf8: bool = False) -> bytes:
    with RawSMTP(relay_port) as c:
        c.ehlo()
        if login:
            c.login()
        opts = " SMTPUTF8 BODY=8BITMIME" if smtputf8 else ""
        reply = c.cmd(f"MAIL FROM:<{sender}>{opts}")
        if not reply.startswith(b"250"):
            return reply
        c.expect(f"RCPT TO:<{RCPT}>", 250)
        c.expect("DATA", 354)
        c.send(data)
        return c.reply()


DISPLAY_NAMES: list[tuple[bytes, bytes]] = [
    (b'"Doe, Jane"', b'"Doe, Jane"'),
    (b'"Jane \\"JD\\" Doe"', b'"Jane \\"JD\\" Doe"'),
    (b"=?utf-8?q?J=C3=B6rg_M=C3=BCller=2C_Ops?=", b"=?utf-8?q?J=C3=B6rg_M=C3=BCller=2C_Ops?="),
    ('"Müller, Jörg"'.encode(), '"Müller, Jörg"'.encode()),
    ("山田 太郎".encode(), "山田 太郎".encode()),
]


@pytest.mark.parametrize(("display", "expected"), DISPLAY_NAMES, ids=[d[0].decode() for d in DISPLAY_NAMES])
def test_when_not_allowed_rewrites_envelope_and_from(relay: Any, m365: SimulatedM365, display: bytes,
                                                     expected: bytes) -> None:
    reply = send(relay.port, "ceo@contoso.com", body(display + b" <ceo@contoso.com>"), smtputf8=True)
    assert reply.startswith(b"250"), reply
    (m,) = m365.exchange.wait_for_messages(1)
    assert m.mail_from == STANDARD_MAILBOX and m.mailbox == STANDARD_MAILBOX
    assert header_lines(m, b"From") == [b"From: " + expected + b" <relay@contoso.com>"]
    assert header_lines(m, b"Reply-To") == [b"Reply-To: " + display + b" <ceo@contoso.com>"]
    msg = parse(m)
    assert msg["From"].addresses[0].addr_spec == STANDARD_MAILBOX
    assert msg["Reply-To"].addresses[0].addr_spec == "ceo@contoso.com"
    assert msg.get_content().strip() == "Hello."


def test_when_not_allowed_envelope_allowed_but_header_from_not(relay: Any, m365: SimulatedM365) -> None:
    reply = send(relay.port, STANDARD_MAILBOX, body(b'"The CEO" <ceo@contoso.com>'))
    assert reply.startswith(b"250"), reply
    (m,) = m365.exchange.wait_for_messages(1)
    assert m.mail_from == STANDARD_MAILBOX
    assert header_lines(m, b"From") == [b'From: "The CEO" <relay@contoso.com>']
    assert header_lines(m, b"Reply-To") == [b'Reply-To: "The CEO" <ceo@contoso.com>']


def test_allowed_sendas_address_passes_unchanged(relay: Any, m365: SimulatedM365) -> None:
    reply = send(relay.port, STANDARD_SEND_AS, body(b'"Alerts, Ops" <alerts@contoso.com>'))
    assert reply.startswith(b"250"), reply
    (m,) = m365.exchange.wait_for_messages(1)
    assert m.mail_from == STANDARD_SEND_AS and m.mailbox == STANDARD_MAILBOX
    assert header_lines(m, b"From") == [b'From: "Alerts, Ops" <alerts@contoso.com>']
    assert header_lines(m, b"Reply-To") == []


def test_never_refuses_envelope_and_header(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    relay = relay_factory(sender={"rewrite_from": "never"})
    assert send(relay.port, "ceo@contoso.com", body(b"<ceo@contoso.com>")).startswith(b"550 5.7.1")
    reply = send(relay.port, STANDARD_MAILBOX, body(b"CEO <ceo@contoso.com>"))
    assert reply.startswith(b"550 5.7.1") and b"header From" in reply
    assert send(relay.port, STANDARD_MAILBOX, body(b"Relay <relay@contoso.com>")).startswith(b"250")
    (m,) = m365.exchange.wait_for_messages(1)
    assert header_lines(m, b"From") == [b"From: Relay <relay@contoso.com>"]
    # The client's 250 can come before the spool records Exchange's 250 (invariant 1 allows it).
    wait_until(lambda: not relay.relay.spool.list(), 10, "the spool to record the deliveries")


def test_always_rewrites_even_allowed(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    relay = relay_factory(sender={"rewrite_from": "always"})
    assert send(relay.port, STANDARD_SEND_AS, body(b'"Doe, Jane" <alerts@contoso.com>')).startswith(b"250")
    (m,) = m365.exchange.wait_for_messages(1)
    assert m.mail_from == STANDARD_MAILBOX
    assert header_lines(m, b"From") == [b'From: "Doe, Jane" <relay@contoso.com>']
    assert header_lines(m, b"Reply-To") == [b'Reply-To: "Doe, Jane" <alerts@contoso.com>']


def test_existing_reply_to_kept(relay: Any, m365: SimulatedM365) -> None:
    reply = send(relay.port, "ceo@contoso.com", body(b"CEO <ceo@contoso.com>", "s", b"Reply-To: desk@contoso.com"))
    assert reply.startswith(b"250")
    (m,) = m365.exchange.wait_for_messages(1)
    assert header_lines(m, b"Reply-To") == [b"Reply-To: desk@contoso.com"]


def test_two_from_fields_refused(relay: Any, m365: SimulatedM365) -> None:
    reply = send(relay.port, STANDARD_MAILBOX, body(b"relay@contoso.com", "s", b"From: ceo@contoso.com"))
    assert reply.startswith(b"554 5.6.0")
    # a bare LF hides a second From from a naive parser; Exchange would see two after normalisation
    reply = send(relay.port, STANDARD_MAILBOX, body(b"relay@contoso.com\nFrom: ceo@contoso.com"))
    assert reply.startswith(b"554 5.6.0")
    assert m365.exchange.accepted == []


def test_header_sender_follows_the_same_rule_as_from(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    """Mail clients show ``Sender:`` as "<Sender> on behalf of <From>": a Sender the user may not use
    is removed (when_not_allowed) or refused (never); an allowed one is kept; two are refused."""
    relay = relay_factory()
    allowed = body(b"Relay <relay@contoso.com>", "kept", b"Sender: Alerts <alerts@contoso.com>")
    spoofed = body(b"Relay <relay@contoso.com>", "dropped", b"Sender: The CEO\r\n <ceo@contoso.com>")
    assert send(relay.port, STANDARD_MAILBOX, allowed).startswith(b"250")
    assert send(relay.port, STANDARD_MAILBOX, spoofed).startswith(b"250")
    two = body(b"relay@contoso.com", "two", b"Sender: relay@contoso.com", b"Sender: ceo@contoso.com")
    assert send(relay.port, STANDARD_MAILBOX, two).startswith(b"554 5.6.0")
    kept, dropped = m365.exchange.wait_for_messages(2)
    assert header_lines(kept, b"Sender") == [b"Sender: Alerts <alerts@contoso.com>"]
    assert header_lines(dropped, b"Sender") == [] and b"ceo@contoso.com" not in dropped.content
    assert header_lines(dropped, b"From") == [b"From: Relay <relay@contoso.com>"], "From was allowed: untouched"
    strict = relay_factory(sender={"rewrite_from": "never"})
    reply = send(strict.port, STANDARD_MAILBOX, spoofed)
    assert reply.startswith(b"550 5.7.1") and b"<ceo@contoso.com> (header Sender)" in reply, reply


def test_bare_lf_cannot_move_from_out_of_sight(relay: Any, m365: SimulatedM365) -> None:
    """``Subject: x\\n\\nFrom: ceo`` : after normalisation Exchange sees the header end at the bare LFs;
    the relay judges the same header block, so the allowed From is the one Exchange sees."""
    data = b"From: relay@contoso.com\r\nSubject: x\n\nFrom: ceo@contoso.com\r\n\r\nbody\r\n.\r\n"
    assert send(relay.port, STANDARD_MAILBOX, data).startswith(b"250")
    (m,) = m365.exchange.wait_for_messages(1)
    assert parse(m).get_all("From") == ["relay@contoso.com"]


def test_per_network_policy_and_per_user_mailbox(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    m365.add_mailbox(STANDARD_TENANT, "scanner@contoso.com", full_access=(STANDARD_CLIENT_ID,))
    from relay.testing.harness import DEMO_PASSWORD, quick_hash

    relay = relay_factory(
        accept={"networks": [{"network": "127.0.0.1/32", "may_send_as": ["alert*@contoso.com"],
                              "mailbox": STANDARD_MAILBOX}]},
        users=[{"name": "scan", "password_hash": quick_hash(DEMO_PASSWORD), "may_send_as": ["scanner@contoso.com"],
                "mailbox": "scanner@contoso.com"}, {"name": "erp", "password_hash": quick_hash(DEMO_PASSWORD)}],
        mailboxes=[{"address": STANDARD_MAILBOX, "app": "contoso"},
                   {"address": "scanner@contoso.com", "app": "contoso"}],
    )
    # network, allowed by pattern: unchanged, carried by relay@ (which has SendAs on alerts@)
    assert send(relay.port, STANDARD_SEND_AS, body(b"<alerts@contoso.com>", "net-ok"), login=False).startswith(b"250")
    # network, not allowed: rewritten to the network's mailbox
    assert send(relay.port, "printer@fabrikam.example", body(b"Printer <printer@fabrikam.example>", "net-rw"),
                login=False).startswith(b"250")
    # user with its own mailbox: rewritten to it, and it is the XOAUTH2 user
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login("scan", DEMO_PASSWORD)
        assert c.send_mail("device@scanner.local", [RCPT], body(b"Scanner 3F <device@scanner.local>", "user-rw")
                           ).startswith(b"250")
    msgs = {parse(m)["Subject"]: m for m in m365.exchange.wait_for_messages(3)}
    assert header_lines(msgs["net-ok"], b"From") == [b"From: <alerts@contoso.com>"]
    assert msgs["net-ok"].mail_from == STANDARD_SEND_AS
    assert msgs["net-rw"].mail_from == STANDARD_MAILBOX
    assert header_lines(msgs["net-rw"], b"From") == [b"From: Printer <relay@contoso.com>"]
    assert msgs["user-rw"].mailbox == "scanner@contoso.com" and msgs["user-rw"].mail_from == "scanner@contoso.com"
    assert header_lines(msgs["user-rw"], b"From") == [b"From: Scanner 3F <scanner@contoso.com>"]
    assert header_lines(msgs["user-rw"], b"Reply-To") == [b"Reply-To: Scanner 3F <device@scanner.local>"]
