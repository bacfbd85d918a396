"""RFC 3464 DSNs for dead letters: to the sender and the admin, never in a loop."""

from __future__ import annotations

import email
import email.policy
import smtplib
from typing import Any

from relay.delivery.dsn import build_dsn, dsn_recipients, is_automatic
from relay.envelope import Envelope
from relay.testing.harness import wait_until
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365
from tests.conftest import RelayFactory


def test_dead_letter_sends_dsn_to_sender_and_admin(m365: SimulatedM365, relay_factory: RelayFactory) -> None:
    m365.exchange.unknown_recipients.add("nobody@contoso.com")
    relay = relay_factory(delivery={"sync_wait": 0, "dsn": {"to_sender": True, "admin": "postmaster@contoso.com"}})
    raw = (f"From: {STANDARD_MAILBOX}\r\nTo: nobody@contoso.com\r\nSubject: to nobody\r\n"
           "Message-ID: <dsn-test@app.test>\r\n\r\nsecret body text\r\n").encode()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as c:
        c.sendmail(STANDARD_MAILBOX, ["nobody@contoso.com"], raw)
    wait_until(lambda: len(m365.exchange.accepted) == 1, 30, "the DSN at Exchange")
    [dsn] = m365.exchange.accepted
    assert set(dsn.rcpt_tos) == {STANDARD_MAILBOX, "postmaster@contoso.com"}
    msg = email.message_from_bytes(dsn.content, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; nobody@contoso.com" in status
    assert "Action: failed" in status
    assert "Status: 5.1.10" in status
    assert "Message-ID: <dsn-test@app.test>" in parts[2].get_content()
    assert b"secret body text" not in dsn.content, "a DSN carries the original headers, never the body"
    # The DSN's own row goes once the relay has recorded Exchange's 250 (just after Exchange has it).
    wait_until(lambda: len(relay.relay.spool.list()) == 1, 30, "the DSN recorded as delivered")
    assert [e.state.value for e in relay.relay.spool.list()] == ["dead"]


def test_no_dsn_for_null_sender_or_automatic_mail() -> None:
    dsn = build_dsn(reporting_host="relay.test", mailbox="relay@contoso.com", original=Envelope("a@b.c", ("x@y.z",)),
                    original_headers=b"From: a@b.c\r\n\r\n", failed={"x@y.z": "550 5.1.1 no"}, queue_id="q1",
                    arrival=0.0, recipients=("a@b.c",), reason="test")
    head = dsn.split(b"\r\n\r\n", 1)[0]
    assert is_automatic(head)
    sender = Envelope("a@b.c", ("x@y.z",))
    both: dict[str, Any] = {"to_sender": True, "admin": "postmaster@b.c"}
    assert dsn_recipients(sender, head, **both) == []  # a DSN is never answered, not even to the admin
    assert dsn_recipients(Envelope("", ("x@y.z",)), b"From: a@b.c\r\n\r\n", **both) == ["postmaster@b.c"]
    assert dsn_recipients(sender, b"Auto-Submitted: auto-generated\r\n\r\n", **both) == []
    plain = b"Auto-Submitted: no\r\nFrom: a@b.c\r\n\r\n"
    assert dsn_recipients(sender, plain, **both) == ["a@b.c", "postmaster@b.c"]
    assert dsn_recipients(sender, plain, to_sender=False, admin="postmaster@b.c") == ["postmaster@b.c"]
    assert dsn_recipients(sender, plain, to_sender=True, admin=None) == ["a@b.c"]
    assert dsn_recipients(sender, plain, to_sender=True, admin="a@b.c") == ["a@b.c"]


def test_is_automatic_reads_fields_whatever_comes_before_them() -> None:
    many = b"X-Filler: a\r\n" * 40000
    assert is_automatic(many + b"auto-submitted :\r\n auto-generated\r\n\r\n")
    assert is_automatic(many + b"Content-Type: multipart/report;\r\n report-type=\"delivery-status\"\r\n\r\n")
    assert not is_automatic(many + b"Auto-Submitted: no\r\nAuto-Submitted: auto-replied\r\n\r\n")
