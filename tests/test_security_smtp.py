"""Hostile SMTP: raw bytes at the real listener, checked at the simulated Exchange.

Each test speaks byte-exact SMTP over a real socket on 127.0.0.1 to a relay running against the
simulated Microsoft 365, then checks what Exchange recorded (``m365.exchange.accepted``): exactly the
messages the client meant, never an extra one. Every reply is checked for Python internals.
"""

from __future__ import annotations

import socket
import struct

import pytest

from relay.testing.harness import RelayThread, wait_until
from relay.testing.m365 import STANDARD_MAILBOX, STANDARD_SEND_AS, SimulatedM365
from relay.testing.smtp_client import RawSMTP, assert_clean_reply, plain_blob, simple_body
from tests.conftest import RelayFactory

RCPT = "someone@fabrikam.example"


def smuggled_body(separator: bytes) -> bytes:
    """A message whose body hides a second transaction behind a non-standard end-of-data."""
    return (
        b"From: relay@contoso.com\r\nTo: someone@fabrikam.example\r\nSubject: first\r\n\r\n"
        b"Hello" + separator
        + b"MAIL FROM:<alerts@contoso.com>\r\nRCPT TO:<smuggled@evil.example>\r\nDATA\r\n"
        b"From: alerts@contoso.com\r\nTo: smuggled@evil.example\r\nSubject: smuggled\r\n\r\n"
        b"smuggled body\r\n.\r\n"
    )


def assert_idle(relay: RelayThread) -> None:
    """Nothing left in the spool and no connection still counted."""
    state = relay.relay.listener_state
    wait_until(lambda: state.connections.open == 0, 10, "connections to close")
    assert not dict(state.connections.per_address)
    # The client's 250 can come before the spool records Exchange's 250 (invariant 1 allows it).
    wait_until(lambda: not relay.relay.spool.list(), 10, "the spool to record the deliveries")


SEPARATORS = [
    b"\n.\r\n",      # bare LF before the dot
    b"\r.\r\n",      # bare CR before the dot
    b"\n.\n",        # bare LFs on both sides
    b"\r\n.\n",      # CRLF, dot, bare LF
    b"\r\n.\r",      # CRLF, dot, bare CR (no LF)
    b"\n.\r",
    b"\r.\n",
    b"\r\n.\r\r\n",  # CR before the CRLF
    b"\r\n\x00.\r\n",
]


@pytest.mark.parametrize("separator", SEPARATORS, ids=[repr(s) for s in SEPARATORS])
def test_smuggling_payload_yields_exactly_the_messages_meant(relay: RelayThread, m365: SimulatedM365,
                                                             separator: bytes) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        reply = c.send_mail(STANDARD_MAILBOX, [RCPT], smuggled_body(separator))
        assert reply.startswith(b"250"), reply
        # The client then really sends a second message: that one, and only that, is the second.
        reply = c.send_mail(STANDARD_MAILBOX, ["second@fabrikam.example"], simple_body("second"))
        assert reply.startswith(b"250"), reply
        c.expect("QUIT", 221)
    accepted = m365.exchange.wait_for_messages(2, timeout=15)
    assert len(accepted) == 2
    first, second = accepted
    assert first.rcpt_tos == (RCPT,)
    assert second.rcpt_tos == ("second@fabrikam.example",)
    assert all("smuggled@evil.example" not in m.rcpt_tos for m in accepted)
    assert b"Subject: first" in first.content and b"Subject: second" in second.content
    # The smuggled text arrived as content of the first message, with normalised line endings.
    assert b"smuggled body" in first.content
    assert b"\r\n" in first.content and b"\n\n" not in first.content.replace(b"\r\n", b"")
    assert_idle(relay)
    assert len(m365.exchange.accepted) == 2


def test_smuggling_without_auth_from_allowlisted_network(relay: RelayThread, m365: SimulatedM365) -> None:
    """A device on the allowlist (no AUTH) cannot smuggle either."""
    with RawSMTP(relay.port) as c:
        c.ehlo()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], smuggled_body(b"\n.\n")).startswith(b"250")
        c.expect("QUIT", 221)
    accepted = m365.exchange.wait_for_messages(1, timeout=15)
    assert [m.rcpt_tos for m in accepted] == [(RCPT,)]
    assert_idle(relay)
    assert len(m365.exchange.accepted) == 1


def test_pipelined_session_in_one_packet(relay: RelayThread, m365: SimulatedM365) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.send(
            f"AUTH PLAIN {plain_blob()}\r\nMAIL FROM:<{STANDARD_MAILBOX}>\r\nRCPT TO:<{RCPT}>\r\n"
            f"RCPT TO:<other@fabrikam.example>\r\nDATA\r\n".encode()
            + simple_body("pipelined")[:-3] + b".\r\nRSET\r\nNOOP\r\nQUIT\r\n"
        )
        codes = [int(c.reply()[:3]) for _ in range(8)]
        assert codes == [235, 250, 250, 250, 354, 250, 250, 250] or codes[:5] == [235, 250, 250, 250, 354]
        assert codes[5] == 250
        assert c.code() == 221
    accepted = m365.exchange.wait_for_messages(1, timeout=15)
    assert accepted[0].rcpt_tos == (RCPT, "other@fabrikam.example")
    assert_idle(relay)


def test_commands_before_ehlo_are_refused_then_the_session_works(relay: RelayThread, m365: SimulatedM365) -> None:
    with RawSMTP(relay.port) as c:
        for line in (f"MAIL FROM:<{STANDARD_MAILBOX}>", f"RCPT TO:<{RCPT}>", "DATA", f"AUTH PLAIN {plain_blob()}"):
            reply = c.cmd(line)
            assert reply.startswith(b"503 5.5.1"), (line, reply)
        c.expect("NOOP", 250)
        c.expect("RSET", 250)
        c.ehlo()
        c.login()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("after")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(1)) == 1


def test_bad_sequences_get_precise_answers(relay: RelayThread) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        assert c.cmd("DATA").startswith(b"503 5.5.1")
        assert c.cmd(f"RCPT TO:<{RCPT}>").startswith(b"503 5.5.1")
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}>", 250)
        assert c.cmd(f"MAIL FROM:<{STANDARD_MAILBOX}>").startswith(b"503 5.5.1")  # nested MAIL
        assert c.cmd("DATA").startswith(b"503 5.5.1")  # no recipient yet
        assert c.cmd("RCPT TO:<no-at-sign>").startswith(b"553 5.1.3")
        assert c.cmd("RCPT TO:").startswith(b"501 5.5.4")
        assert c.cmd("MAIL").startswith(b"501") or True
        assert c.cmd("XYZZY").startswith(b"500 5.5.2")
        assert c.cmd("VRFY postmaster").startswith(b"252")
        assert c.cmd("EXPN staff").startswith(b"502 5.5.1")
        assert c.cmd(b"").startswith(b"500 5.5.2")
        c.expect("RSET", 250)
        c.expect("QUIT", 221)
    assert_idle(relay)


def test_mail_from_size_and_data_size_limits(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    relay = relay_factory(limits={"max_message_size": 2000})
    with RawSMTP(relay.port) as c:
        ehlo = c.ehlo()
        assert b"250-SIZE 2000" in ehlo
        assert b"ENHANCEDSTATUSCODES" in ehlo and b"PIPELINING" in ehlo
        c.login()
        assert c.cmd(f"MAIL FROM:<{STANDARD_MAILBOX}> SIZE=2001").startswith(b"552 5.3.4")
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}> SIZE=1000", 250)
        c.expect(f"RCPT TO:<{RCPT}>", 250)
        c.expect("DATA", 354)
        c.send(simple_body("big", extra=b"x" * 78 + b"\r\n") * 1)  # fits
        assert c.reply().startswith(b"250")
        big = simple_body("too big", extra=(b"y" * 70 + b"\r\n") * 40)
        reply = c.send_mail(STANDARD_MAILBOX, [RCPT], big)
        assert reply.startswith(b"552 5.3.4"), reply
        c.expect("NOOP", 250)  # still in sync
    accepted = m365.exchange.wait_for_messages(1)
    assert len(accepted) == 1
    assert_idle(relay)
    assert len(m365.exchange.accepted) == 1


def test_recipient_limit(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    relay = relay_factory(limits={"max_recipients": 3})
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}>", 250)
        for i in range(3):
            c.expect(f"RCPT TO:<r{i}@fabrikam.example>", 250)
        assert c.cmd("RCPT TO:<r3@fabrikam.example>").startswith(b"452 4.5.3")
        c.expect("DATA", 354)
        c.send(simple_body("three"))
        assert c.reply().startswith(b"250")
    accepted = m365.exchange.wait_for_messages(1)
    assert accepted[0].rcpt_tos == tuple(f"r{i}@fabrikam.example" for i in range(3))


def test_default_recipient_limit_is_exchanges() -> None:
    from relay.config import LimitSettings

    assert LimitSettings().max_recipients == 1000


def test_command_line_length_limit(relay_factory: RelayFactory) -> None:
    relay = relay_factory(limits={"command_line_length": 600})
    with RawSMTP(relay.port) as c:
        c.ehlo()
        assert c.cmd("NOOP " + "x" * 700).startswith(b"500 5.5.2")
        # far beyond the reader's buffer: consumed to its end, answered once, still in sync
        assert c.cmd("NOOP " + "x" * 200_000).startswith(b"500 5.5.2")
        c.expect("NOOP", 250)
        c.login()


def test_data_line_too_long_keeps_the_session_in_sync(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    relay = relay_factory(limits={"line_length": 100})
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        # A long line (beyond even the reader's buffer) whose tail looks like the end of data, and a
        # shorter over-long one: neither ends DATA early, both refuse the message once.
        for long_line in (b"A" * 50_000 + b".\r\n", b"B" * 150 + b"\r\n"):
            body = (b"Subject: long\r\n\r\n" + long_line
                    + f"MAIL FROM:<{STANDARD_SEND_AS}>\r\nRCPT TO:<x@evil.example>\r\n".encode() + b".\r\n")
            reply = c.send_mail(STANDARD_MAILBOX, [RCPT], body)
            assert reply.startswith(b"500 5.5.2"), reply
            c.expect("NOOP", 250)
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("ok")).startswith(b"250")
    accepted = m365.exchange.wait_for_messages(1)
    assert len(accepted) == 1 and b"Subject: ok" in accepted[0].content
    assert_idle(relay)


def test_header_block_limit(relay_factory: RelayFactory, m365: SimulatedM365) -> None:
    relay = relay_factory(limits={"max_header_size": 2048})
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        body = b"".join(f"X-Filler-{i}: {'z' * 60}\r\n".encode() for i in range(60)) + b"\r\nbody\r\n.\r\n"
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], body).startswith(b"552 5.3.4")
        c.expect("NOOP", 250)
    assert_idle(relay)
    assert m365.exchange.accepted == []


def test_malformed_and_oversized_auth(relay: RelayThread, m365: SimulatedM365) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        assert c.cmd("AUTH").startswith(b"501")
        assert c.cmd("AUTH PLAIN a b c").startswith(b"501")
        assert c.cmd("AUTH CRAM-MD5").startswith(b"504 5.5.4")
        assert c.cmd("AUTH PLAIN !!!not-base64!!!").startswith(b"501 5.5.2")
        assert c.cmd("AUTH PLAIN " + "QUFB" * 2000).startswith(b"500 5.5.2")  # over the command limit
        assert c.cmd("AUTH PLAIN dGVzdA==").startswith(b"501 5.5.2")  # no NULs inside
        assert c.cmd("AUTH PLAIN =").startswith(b"501 5.5.2")  # empty
        # two-step: an oversized answer, an invalid one, an abort
        assert c.cmd("AUTH PLAIN").startswith(b"334")
        assert c.cmd(b"A" * 300_000).startswith(b"500 5.5.6")
        assert c.cmd("AUTH PLAIN").startswith(b"334")
        assert c.cmd(b"\xff\xfe\x00garbage").startswith(b"501 5.5.2")
        assert c.cmd("AUTH LOGIN").startswith(b"334")
        assert c.cmd("*").startswith(b"501")
        assert c.cmd("AUTH LOGIN").startswith(b"334")
        assert c.cmd("ZXJw").startswith(b"334")  # "erp"
        assert c.cmd("d3Jvbmc=").startswith(b"535 5.7.8")  # "wrong"
        assert c.cmd(f"AUTH PLAIN {plain_blob('nobody', 'x')}").startswith(b"535 5.7.8")
        c.login()
        assert c.cmd(f"AUTH PLAIN {plain_blob()}").startswith(b"503")  # already authenticated
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("after auth noise")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(1)) == 1


@pytest.mark.parametrize("line", [
    b"EHL\xc3\x96 app.test",
    b"\x00\x01\x02\x03",
    b"\xff\xfe\xfd",
    b"NOOP \xc3\x28 8-bit argument",
    b"HELO \xe2\x82\xac",
    b"MAIL\x00FROM:<a@b>",
    b"\x1b[31mRED",
])
def test_8bit_and_control_bytes_in_commands(relay: RelayThread, m365: SimulatedM365, line: bytes) -> None:
    with RawSMTP(relay.port) as c:
        reply = c.cmd(line)
        assert reply[:1] in (b"2", b"5"), reply
        assert b"\r" not in reply and b"\x00" not in reply and b"\x1b" not in reply
        c.ehlo()
        c.login()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("fine")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(1)) == 1


@pytest.mark.parametrize("address", [
    b"relay\r@contoso.com", b"relay\x00@contoso.com", b"re\x0blay@contoso.com", b"\xff\xfe@contoso.com",
    b"relay@contoso.com\rRCPT TO:<x@y>",
])
def test_control_characters_in_addresses_refused(relay: RelayThread, m365: SimulatedM365, address: bytes) -> None:
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        reply = c.cmd(b"MAIL FROM:<" + address + b">")
        assert reply.startswith((b"553", b"501", b"550")), reply
        c.expect(f"MAIL FROM:<{STANDARD_MAILBOX}>", 250)
        reply = c.cmd(b"RCPT TO:<" + address.replace(b"contoso.com", b"fabrikam.example") + b">")
        assert reply.startswith((b"553", b"501")), reply
        c.expect("RSET", 250)
    assert m365.exchange.accepted == []


def _abrupt_close(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0): the rudest disconnect."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


DISCONNECT_POINTS: list[tuple[str, list[bytes]]] = [
    ("after greeting", []),
    ("mid command", [b"EHLO app"]),
    ("after EHLO", [b"EHLO app.test\r\n"]),
    ("mid AUTH challenge", [b"EHLO app.test\r\n", b"AUTH LOGIN\r\n"]),
    ("mid AUTH answer", [b"EHLO app.test\r\n", b"AUTH PLAIN\r\n", b"AGVy"]),
    ("after MAIL", [b"EHLO app.test\r\n", b"MAIL FROM:<relay@contoso.com>\r\n"]),
    ("right after DATA", [b"EHLO app.test\r\n", b"MAIL FROM:<relay@contoso.com>\r\n",
                          b"RCPT TO:<someone@fabrikam.example>\r\n", b"DATA\r\n"]),
    ("mid headers", [b"EHLO app.test\r\n", b"MAIL FROM:<relay@contoso.com>\r\n",
                     b"RCPT TO:<someone@fabrikam.example>\r\n", b"DATA\r\n", b"Subject: cut"]),
    ("mid body", [b"EHLO app.test\r\n", b"MAIL FROM:<relay@contoso.com>\r\n",
                  b"RCPT TO:<someone@fabrikam.example>\r\n", b"DATA\r\n", b"Subject: cut\r\n\r\n" + b"b" * 100_000]),
    ("before final dot", [b"EHLO app.test\r\n", b"MAIL FROM:<relay@contoso.com>\r\n",
                          b"RCPT TO:<someone@fabrikam.example>\r\n", b"DATA\r\n", b"Subject: cut\r\n\r\nbody\r\n"]),
]


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_disconnects_anywhere(relay: RelayThread, m365: SimulatedM365, rst: bool) -> None:
    for _name, chunks in DISCONNECT_POINTS:
        c = RawSMTP(relay.port)
        for chunk in chunks:
            c.send(chunk)
        if rst:
            _abrupt_close(c.sock)
        else:
            c.sock.shutdown(socket.SHUT_WR)
            c.close()
    assert_idle(relay)
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("still serving")).startswith(b"250")
    accepted = m365.exchange.wait_for_messages(1)
    assert len(accepted) == 1  # nothing cut short was ever forwarded
    assert_idle(relay)


def test_unexpected_error_reply_has_no_internals(relay: RelayThread, m365: SimulatedM365,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    policy = relay.relay.listener_state.policy

    def explode(*args: object) -> object:
        raise RuntimeError("internal detail /etc/secret at line 42")

    monkeypatch.setattr(policy, "route", explode)
    with RawSMTP(relay.port) as c:
        c.ehlo()
        c.login()
        reply = c.cmd(f"MAIL FROM:<{STANDARD_MAILBOX}>")
        assert reply == b"451 4.3.0 Local error in processing, try again later"
        assert b"internal detail" not in reply and b"RuntimeError" not in reply
        monkeypatch.undo()
        assert c.send_mail(STANDARD_MAILBOX, [RCPT], simple_body("recovered")).startswith(b"250")
    assert len(m365.exchange.wait_for_messages(1)) == 1


def test_no_reply_without_enhanced_status_code(relay: RelayThread) -> None:
    """Every 4xx/5xx reply carries an enhanced status code (RFC 2034), even aiosmtpd's own."""
    import re

    probes = [b"XYZZY", b"", b"HELO", b"EHLO", b"MAIL FROM:<a@b> BODY=WRONG", b"MAIL FROM:<a@b> FOO=1",
              b"MAIL FROM:<a@b> SIZE=abc", b"RCPT TO:<a@b> NOTIFY=NEVER", b"STARTTLS", b"AUTH PLAIN",
              b"QUIT extra", b"RSET extra", b"DATA"]
    with RawSMTP(relay.port) as c:
        c.ehlo()
        for probe in probes:
            reply = c.cmd(probe)
            if reply.startswith(b"334"):
                reply = c.cmd(b"*")
            if reply[:1] in (b"4", b"5"):
                assert re.match(rb"^[45]\d\d [45]\.\d+\.\d+ ", reply), (probe, reply)
            assert_clean_reply(reply)
            c.cmd("RSET")
        c.expect("QUIT", 221)
