"""Hostile clients against limits: brute force by person, session slots, UTF-8 without SMTPUTF8, AUTH
mechanism names, the health server and reload safety. Real sockets on loopback, bounded waits."""

from __future__ import annotations

import base64

import pytest

from relay.listener import RelayHandler, RelaySMTP
from relay.testing.harness import RelayThread
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365
from tests.test_security_support import RawSMTP

RCPT = "someone@fabrikam.example"


# ---- AUTH mechanism names ------------------------------------------------------------------------

def test_only_mechanisms_are_named_auth_() -> None:
    """aiosmtpd takes every ``auth_*`` attribute of the protocol and the handler for a mechanism."""
    names = {n for cls in (RelaySMTP, RelayHandler) for n in dir(cls) if n.startswith("auth_")}
    assert names == {"auth_PLAIN", "auth_LOGIN"}


def test_ehlo_lists_exactly_plain_and_login(relay: RelayThread) -> None:
    with RawSMTP(relay.port) as c:
        lines = c.ehlo().split(b"\r\n")
        auth = [line for line in lines if line[4:].startswith(b"AUTH")]
        assert len(auth) == 1
        assert sorted(auth[0][4:].split()[1:]) == [b"LOGIN", b"PLAIN"]


@pytest.mark.parametrize("mechanism", ["OFFERED", "offered", "CRAM-MD5"])
def test_unknown_mechanism_gets_504(relay: RelayThread, mechanism: str) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        assert c.cmd(f"AUTH {mechanism}").startswith(b"504 5.5.4")
        c.login()  # the session is still usable


# ---- UTF-8 addresses without SMTPUTF8 --------------------------------------------------------------

def test_utf8_recipient_without_smtputf8_is_refused_at_rcpt(relay: RelayThread, m365: SimulatedM365) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}>", 250)
        assert c.cmd("RCPT TO:<jürgen@fabrikam.example>".encode()).startswith(b"553 5.6.7")
        assert c.cmd("RCPT TO:<用户@例子.example>".encode()).startswith(b"553 5.6.7")
        # an ASCII recipient in the same transaction is fine, and the message goes out to it alone
        c.expect(f"RCPT TO:<{RCPT}>", 250)
        c.expect("DATA", 354)
        c.send(b"From: relay@contoso.com\r\nTo: someone@fabrikam.example\r\nSubject: ascii\r\n\r\nHi\r\n.\r\n")
        assert c.reply().startswith(b"250")
    messages = m365.exchange.wait_for_messages(1)
    assert [m.rcpt_tos for m in messages] == [(RCPT,)]


def test_utf8_sender_without_smtputf8_is_refused_at_mail(relay: RelayThread) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        assert c.cmd("MAIL FROM:<relé@contoso.com>".encode()).startswith(b"553 5.6.7")
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}>", 250)  # the session stays usable


def test_utf8_recipient_with_smtputf8_is_not_refused_for_its_encoding(relay: RelayThread) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}> SMTPUTF8", 250)
        assert not c.cmd("RCPT TO:<jürgen@fabrikam.example>".encode()).startswith(b"553")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
