"""The DATA invariant, vector by vector, with no server: one DATA is one message.

Each vector is fed to a :class:`relay.intake.data.DataReceiver` through a real ``asyncio.StreamReader``
followed by the bytes of a next command. Whatever the vector (hostile headers, a failing policy, a
failing spool), the receiver must stop exactly after the end-of-data line (the next command is still
unread), give one outcome (None = complete, or one reply), and abort the body on every error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from relay.config import RewriteFrom, settings_from_dict
from relay.envelope import Route
from relay.errors import SpoolFull
from relay.intake.data import DataReceiver, prepare_headers
from relay.intake.policy import HeaderDecision, Policy, Principal, Refusal
from relay.intake.replies import INTERNAL_ERROR, SPOOL_FULL
from relay.intake.rewrite import from_addresses

NEXT = b"NOOP\r\n"
SMUGGLED = (b"RSET\r\nMAIL FROM:<relay@contoso.com>\r\nRCPT TO:<smuggled@evil.example>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n")


class Sink:
    """A body sink that records what it was given; can be told to fail after N writes."""

    def __init__(self, fail_after: int | None = None, error: Exception | None = None) -> None:
        self.data = bytearray()
        self.writes = 0
        self.aborted = False
        self.fail_after = fail_after
        self.error = error or SpoolFull("spool: disk full")

    def write(self, data: bytes) -> None:
        if self.fail_after is not None and self.writes >= self.fail_after:
            raise self.error
        self.writes += 1
        self.data += data

    def abort(self) -> None:
        self.aborted = True


MAILBOX = "relay@contoso.com"
APP = {"name": "contoso", "tenant_id": "11111111-1111-1111-1111-111111111111",
       "client_id": "22222222-2222-2222-2222-222222222222", "client_secret": "x"}


def policy(mode: str = "when-not-allowed") -> Policy:
    return Policy(settings_from_dict({
        "apps": [APP], "mailboxes": [{"address": MAILBOX, "app": "contoso"}],
        "users": [{"name": "erp", "password_hash": "scrypt$10$8$1$AAAA$BBBB", "may_send_as": [MAILBOX]}],
        "sender": {"rewrite_from": mode},
    }))


PRINCIPAL = Principal(name="user erp", may_send_as=(MAILBOX,), mailbox=MAILBOX)
ROUTE = Route(app="contoso", mailbox=MAILBOX, sender=MAILBOX)


def run(payload: bytes, check: Callable[[bytes], HeaderDecision | Refusal] | None, sink: Sink,
        **limits: int) -> tuple[str | None, bytes, float]:
    """Feed ``payload`` + the next command; (outcome, what is left unread, seconds taken)."""

    async def go() -> tuple[str | None, bytes, float]:
        reader = asyncio.StreamReader(limit=limits.pop("reader_limit", 64 * 1024))
        reader.feed_data(payload + NEXT)
        reader.feed_eof()
        receiver = DataReceiver(sink, limit=limits.get("limit", 10 * 1024 * 1024),
                                line_limit=limits.get("line_limit", 998),
                                header_limit=limits.get("header_limit", 256 * 1024), check_headers=check)
        started = time.perf_counter()
        outcome = await asyncio.wait_for(receiver.receive(reader), 30)
        took = time.perf_counter() - started
        rest = await reader.read()
        return outcome, rest, took

    return asyncio.run(go())


def message(header: bytes, body: bytes = SMUGGLED) -> bytes:
    return header + b"To: someone@fabrikam.example\r\nSubject: t\r\n\r\n" + body + b".\r\n"


HOSTILE_FROMS = [
    b"From: g:;;\r\n",
    b"From: g:;\r\n",
    b"From: g: ;, h: ;\r\n",
    b"From: g: a@b.example;;;\r\n",
    b"From: :;\r\n",
    b"From: " + b":" * 5000 + b"\r\n",
    b"From: " + b"(" * 3000 + b"a" + b")" * 3000 + b"\r\n",
    b"From: " + b"(" * 900 + b"\r\n",
    b"From: \"" + b"\\\"" * 400 + b"\r\n",
    b"From: " + b"\"" * 900 + b"\r\n",
    b"From: " + b"." * 950 + b"\r\n",
    b"From: " + b"a, " * 300 + b"\r\n",
    b"From: =?utf-8?q?=00?= <" + b"a" * 50 + b"@x.example>\r\n",
    b"From: <@route.example:a@b.example>\r\n",
    b"From: a@[127.0.0.1]\r\n",
    b"From: \"\\\r\n",
    b"From: \x00<relay@contoso.com>\r\n",
    b"From: relay@contoso.com\r\nFrom: ceo@contoso.com\r\n",
    b"Sender: g:;;\r\nFrom: relay@contoso.com\r\n",
    b"From : ceo@contoso.com\r\n",
    b"From\t: ceo@contoso.com\r\n",
    # 72 KB folded runs of the characters that made the RFC 5322 parser take seconds
    b"From: " + b"\r\n ".join([b"\"" * 70] * 1000) + b"\r\n",
    b"From: " + b"\r\n ".join([b"a." * 35] * 1000) + b"\r\n",
    b"From: " + b"\r\n ".join([b"a, " * 23] * 1000) + b"\r\n",
    b"From: x\r\n" + b" y\r\n" * 40000,  # many continuation lines: linear, not quadratic
]


@pytest.mark.parametrize("mode", ["when-not-allowed", "never", "always"])
@pytest.mark.parametrize("header", HOSTILE_FROMS, ids=[repr(h[:30]) for h in HOSTILE_FROMS])
def test_hostile_from_ends_exactly_at_end_of_data(header: bytes, mode: str) -> None:
    p = policy(mode)
    sink = Sink()
    outcome, rest, took = run(message(header), lambda h: p.header_from(PRINCIPAL, ROUTE, h), sink)
    assert rest == NEXT, "the DATA was not read exactly to its end-of-data line"
    assert took < 2.0, f"header judgement took {took:.2f} s"
    if outcome is None:
        assert not sink.aborted
        headers = bytes(sink.data).split(b"\r\n\r\n", 1)[0] + b"\r\n"
        froms = [f for f in headers.split(b"\r\n") if f.lower().startswith(b"from")]
        assert len(froms) == 1
        # Whatever was accepted carries a From that is the client's allowed address.
        assert from_addresses(froms[0] + b"\r\n") == (MAILBOX,), froms
        assert b"\x00" not in headers
    else:
        assert outcome[:1] in ("4", "5") and outcome[4:5].isdigit(), outcome
        assert sink.aborted


def test_policy_exception_gives_one_transient_reply_after_the_end() -> None:
    def broken(_headers: bytes) -> HeaderDecision:
        raise AttributeError("'Group' object has no attribute 'local_part'")

    sink = Sink()
    outcome, rest, _ = run(message(b"From: relay@contoso.com\r\n"), broken, sink)
    assert (outcome, rest, sink.aborted) == (INTERNAL_ERROR, NEXT, True)


@pytest.mark.parametrize("fail_after", [0, 1])
def test_spool_full_mid_body_gives_452_after_the_end(fail_after: int) -> None:
    body = b"".join(b"line %d of a long body\r\n" % i for i in range(20000)) + SMUGGLED
    sink = Sink(fail_after=fail_after)
    outcome, rest, _ = run(message(b"From: relay@contoso.com\r\n", body), None, sink)
    assert (outcome, rest, sink.aborted) == (SPOOL_FULL, NEXT, True)


def test_unexpected_sink_error_gives_451_after_the_end() -> None:
    sink = Sink(fail_after=0, error=RuntimeError("boom"))
    outcome, rest, _ = run(message(b"From: relay@contoso.com\r\n"), None, sink)
    assert (outcome, rest, sink.aborted) == (INTERNAL_ERROR, NEXT, True)


@pytest.mark.parametrize(("payload", "expected"), [
    (message(b"From: relay@contoso.com\r\n", b"x" * 2000 + b"\r\n" + SMUGGLED), "500 5.5.2"),
    (message(b"X-Long: " + b"x" * 2000 + b"\r\nFrom: relay@contoso.com\r\n"), "500 5.5.2"),
    (message(b"From: relay@contoso.com\r\n", b"y" * 500 + b"\r\n" * 300 + SMUGGLED), "552 5.3.4"),
    (message(b"X-Big: " + b"z\r\n " * 400 + b"\r\nFrom: relay@contoso.com\r\n"), "552 5.3.4"),
], ids=["long body line", "long header line", "too big", "header too big"])
def test_limits_give_one_reply_after_the_end(payload: bytes, expected: str) -> None:
    sink = Sink()
    outcome, rest, _ = run(payload, None, sink, limit=1000, line_limit=998, header_limit=1000)
    assert outcome is not None and outcome.startswith(expected), outcome
    assert rest == NEXT and sink.aborted


def test_complete_message_is_kept_and_unstuffed() -> None:
    sink = Sink()
    outcome, rest, _ = run(message(b"From: relay@contoso.com\r\n", b"..dot\r\nend\r\n"), None, sink)
    assert (outcome, rest, sink.aborted) == (None, NEXT, False)
    assert bytes(sink.data).endswith(b"\r\n\r\n.dot\r\nend\r\n")


@pytest.mark.parametrize("block", [b" From: ceo@contoso.com\r\nTo: x@y.example\r\n\r\n",
                                   b"\tFrom: ceo@contoso.com\r\n\r\n"])
def test_header_starting_with_a_continuation_line_is_refused(block: bytes) -> None:
    p = policy()
    refusal = prepare_headers(block, lambda h: p.header_from(PRINCIPAL, ROUTE, h))
    assert isinstance(refusal, Refusal) and refusal.reply.startswith("554 5.6.0"), refusal
    sink = Sink()
    outcome, rest, _ = run(block + b"body\r\n.\r\n", lambda h: p.header_from(PRINCIPAL, ROUTE, h), sink)
    assert outcome is not None and outcome.startswith("554 5.6.0") and rest == NEXT and sink.aborted


@pytest.mark.parametrize("name", [b"From :", b"From\t:", b"FROM  :", b"from:"])
def test_from_with_space_before_colon_is_judged_as_from(name: bytes) -> None:
    block = name + b" CEO <ceo@contoso.com>\r\nSubject: x\r\n\r\n"
    never = policy("never")
    refused = never.header_from(PRINCIPAL, ROUTE, block)
    assert isinstance(refused, Refusal) and refused.reply.startswith("550 5.7.1"), refused
    rewriting = policy(RewriteFrom.WHEN_NOT_ALLOWED.value)
    prepared = prepare_headers(block, lambda h: rewriting.header_from(PRINCIPAL, ROUTE, h))
    assert not isinstance(prepared, Refusal) and prepared.rewritten
    assert prepared.block.startswith(f"From: CEO <{MAILBOX}>\r\n".encode()), prepared.block


def test_nested_comments_are_rewritten_not_an_internal_error() -> None:
    """The legacy address parser recurses per nesting level (RecursionError): the From is rewritten to
    the mailbox without a display name instead of the message failing with 451."""
    p = policy("when-not-allowed")
    sink = Sink()
    header = b"From: " + b"(" * 600 + b"x" + b")" * 300 + b" <ceo@contoso.com>\r\n"
    outcome, rest, _ = run(message(header), lambda h: p.header_from(PRINCIPAL, ROUTE, h), sink)
    assert (outcome, rest) == (None, NEXT)
    assert bytes(sink.data).startswith(f"From: <{MAILBOX}>\r\n".encode())
